//! What an IO mechanism must provide to run wharf's workers.
//!
//! A backend is a runtime to run one worker on the current thread, a listener type made from a
//! bound std socket (TCP or Unix-domain: one listener type, one [`Conn`] type for both, so a
//! plugin instance serves either), the [`Conn`] its listener accepts, and a UDP socket type
//! ([`crate::udp::DatagramSocket`]). Everything else (admission, metering,
//! idle timeouts, draining) is shared code in [`crate::worker`], so swapping backends changes the
//! IO path and nothing else.
//!
//! [`sys`] holds the socket helpers the two built-in backends share (non-blocking `recv`,
//! `poll`-based peer checks, `sendfile`), and [`mmsg`] batched UDP calls: support for backend
//! authors, not plugin API.

use crate::conn::Conn;
use crate::peer::Peer;
use std::future::Future;
use std::io;

pub mod mmsg;
pub mod sys;

/// An IO backend (epoll via tokio, io_uring via the `io-uring` crate or tokio-uring, ...).
pub trait Backend: 'static {
    /// The name used in configs, logs and the `backend` metric label.
    const NAME: &'static str;
    /// Its listening socket.
    type Listener: Listener;

    /// Builds this backend's single-threaded runtime on the current thread and runs `fut` on it
    /// to completion. `tokio::task::spawn_local` and `tokio::time` work inside. Tasks still
    /// running when `fut` returns are dropped, which closes their connections.
    fn block_on<F: Future>(fut: F) -> io::Result<F::Output>;

    /// Its UDP socket ([`crate::udp`]).
    type Datagrams: crate::udp::DatagramSocket;

    /// Adopts a bound, listening, non-blocking socket. Called inside [`Backend::block_on`].
    fn listener(socket: std::net::TcpListener) -> io::Result<Self::Listener>;

    /// Adopts a bound, listening, non-blocking Unix-domain stream socket, likewise. Its
    /// connections are the same [`Listener::Conn`] type as TCP ones.
    fn unix_listener(socket: std::os::unix::net::UnixListener) -> io::Result<Self::Listener>;

    /// Adopts a bound, non-blocking UDP socket. Called inside [`Backend::block_on`].
    fn datagram_socket(socket: std::net::UdpSocket) -> io::Result<Self::Datagrams>;
}

/// A listening socket of some backend.
#[allow(async_fn_in_trait)] // worker-local futures, never sent across threads
pub trait Listener: 'static {
    /// The connections it accepts.
    type Conn: Conn + 'static;

    /// Accepts one connection (TCP ones with `TCP_NODELAY` set: request/response protocols
    /// want it), with who connected: the client's address, or a Unix peer's credentials
    /// ([`crate::peer::peer_credentials`]).
    async fn accept(&self) -> io::Result<(Self::Conn, Peer)>;
}
