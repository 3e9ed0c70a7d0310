//! The io_uring backend.
//!
//! Two implementations behind one backend name, chosen once per process ([`mode`], logged):
//!
//! - the ring path ([`ring`], on the [`driver`]): the `io-uring` crate inside tokio's
//!   current-thread runtime, with one multishot accept per listener, one multishot receive
//!   from a provided-buffer ring per connection, `SEND`, submissions batched once per turn of
//!   the scheduler, SINGLE_ISSUER + DEFER_TASKRUN. It needs Linux 6.0 (multishot receive) and
//!   a kernel that grants a provided-buffer ring;
//! - the fallback ([`legacy`]): tokio-uring 0.5, for kernels without those, or when
//!   `WHARF_URING_FALLBACK=1` is set (to compare the two, or to get around a kernel bug).
//!
//! UDP services run on tokio's reactor in the ring path (the epoll backend's
//! [`wharf_backend_epoll::UdpSocket`]: a readiness wait per batch, then `recvfrom` until the
//! queue is empty), on tokio-uring's ring operations in the fallback.
//!
//! [`probe`] tells, before any worker starts, whether this process may create a ring at all:
//! container seccomp profiles and `kernel.io_uring_disabled` refuse it, and the runtimes would
//! otherwise fail deep inside a worker.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::BorrowedFd;
use std::sync::OnceLock;

use wharf_backend_epoll::Epoll;
use wharf_core::backend::{Backend, Listener};
use wharf_core::conn::{BufResult, Conn, Spliced};
use wharf_core::datagram::Packets;
use wharf_core::peer::Peer;
use wharf_core::udp::DatagramSocket;

pub mod driver;
pub mod legacy;
pub mod ring;

/// The environment variable that forces the tokio-uring fallback (`1`).
pub const FALLBACK_ENV: &str = "WHARF_URING_FALLBACK";

/// Which implementation this process runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// The ring path on the driver.
    Ring,
    /// tokio-uring, and why.
    Fallback(String),
}

/// The implementation this process runs, decided (and logged) on first use: the ring path
/// unless [`FALLBACK_ENV`] is `1` or the kernel lacks what it needs.
pub fn mode() -> &'static Mode {
    static MODE: OnceLock<Mode> = OnceLock::new();
    MODE.get_or_init(|| {
        let mode = if std::env::var(FALLBACK_ENV).as_deref() == Ok("1") {
            Mode::Fallback(format!("{FALLBACK_ENV}=1"))
        } else {
            match driver::supported() {
                Ok(()) => Mode::Ring,
                Err(why) => Mode::Fallback(why),
            }
        };
        match &mode {
            Mode::Ring => tracing::info!(
                "io_uring: multishot accept and receive, provided-buffer ring, batched submissions"
            ),
            Mode::Fallback(why) => {
                tracing::warn!("io_uring: running on the tokio-uring fallback because {why}")
            }
        }
        mode
    })
}

fn ring_mode() -> bool {
    *mode() == Mode::Ring
}

/// The io_uring backend.
pub struct IoUring;

impl Backend for IoUring {
    const NAME: &'static str = "io_uring";
    type Listener = StreamListener;
    type Datagrams = UdpSocket;

    fn block_on<F: Future>(fut: F) -> io::Result<F::Output> {
        if ring_mode() {
            ring::block_on(&driver::Features::default(), fut)
        } else {
            legacy::block_on(fut)
        }
    }

    fn listener(socket: std::net::TcpListener) -> io::Result<StreamListener> {
        Ok(if ring_mode() {
            StreamListener::Ring(ring::Listener::tcp(socket)?)
        } else {
            StreamListener::Fallback(legacy::listener(socket)?)
        })
    }

    fn unix_listener(socket: std::os::unix::net::UnixListener) -> io::Result<StreamListener> {
        Ok(if ring_mode() {
            StreamListener::Ring(ring::Listener::unix(socket)?)
        } else {
            StreamListener::Fallback(legacy::unix_listener(socket)?)
        })
    }

    fn datagram_socket(socket: std::net::UdpSocket) -> io::Result<UdpSocket> {
        Ok(if ring_mode() {
            UdpSocket::Reactor(Epoll::datagram_socket(socket)?)
        } else {
            UdpSocket::Fallback(legacy::datagram_socket(socket)?)
        })
    }
}

/// A worker's listening socket, of the implementation this process runs.
pub enum StreamListener {
    /// On the ring.
    Ring(ring::Listener),
    /// On tokio-uring.
    Fallback(legacy::StreamListener),
}

impl Listener for StreamListener {
    type Conn = StreamConn;

    async fn accept(&self) -> io::Result<(StreamConn, Peer)> {
        match self {
            StreamListener::Ring(l) => l.accept().await.map(|(c, p)| (StreamConn::Ring(c), p)),
            StreamListener::Fallback(l) => {
                l.accept().await.map(|(c, p)| (StreamConn::Fallback(c), p))
            }
        }
    }
}

/// A connection, of the implementation this process runs.
pub enum StreamConn {
    /// On the ring.
    Ring(ring::Conn),
    /// On tokio-uring.
    Fallback(legacy::StreamConn),
}

/// Runs the same expression on either implementation's connection.
macro_rules! on_conn {
    ($conn:expr, $c:ident => $body:expr) => {
        match $conn {
            StreamConn::Ring($c) => $body,
            StreamConn::Fallback($c) => $body,
        }
    };
}

impl Conn for StreamConn {
    async fn read(&mut self, buf: Vec<u8>) -> BufResult<usize> {
        on_conn!(self, c => c.read(buf).await)
    }

    async fn write(&mut self, buf: Vec<u8>, from: usize) -> BufResult<usize> {
        on_conn!(self, c => c.write(buf, from).await)
    }

    fn try_read(&mut self, buf: &mut Vec<u8>) -> io::Result<Option<usize>> {
        on_conn!(self, c => c.try_read(buf))
    }

    async fn readable(&mut self) -> io::Result<()> {
        on_conn!(self, c => c.readable().await)
    }

    fn local_addr(&self) -> Option<SocketAddr> {
        on_conn!(self, c => c.local_addr())
    }

    fn peer_closed(&self) -> bool {
        on_conn!(self, c => c.peer_closed())
    }

    fn peer_finished_sending(&self) -> bool {
        on_conn!(self, c => c.peer_finished_sending())
    }

    async fn send_file(&mut self, file: &std::fs::File, offset: u64, len: u64) -> io::Result<u64> {
        on_conn!(self, c => c.send_file(file, offset, len).await)
    }

    async fn writable(&mut self) -> io::Result<()> {
        on_conn!(self, c => c.writable().await)
    }

    fn can_splice(&self) -> bool {
        on_conn!(self, c => c.can_splice())
    }

    fn try_splice_to_pipe(&mut self, pipe: BorrowedFd<'_>, len: usize) -> io::Result<Spliced> {
        on_conn!(self, c => c.try_splice_to_pipe(pipe, len))
    }

    fn try_splice_from_pipe(&mut self, pipe: BorrowedFd<'_>, len: usize) -> io::Result<Spliced> {
        on_conn!(self, c => c.try_splice_from_pipe(pipe, len))
    }

    async fn shutdown(&mut self) -> io::Result<()> {
        on_conn!(self, c => c.shutdown().await)
    }
}

/// A worker's UDP socket, of the implementation this process runs.
pub enum UdpSocket {
    /// On tokio's reactor, as in the epoll backend (the ring path).
    Reactor(wharf_backend_epoll::UdpSocket),
    /// On tokio-uring.
    Fallback(legacy::UdpSocket),
}

impl DatagramSocket for UdpSocket {
    async fn recv_batch(&mut self, into: &mut Packets) -> io::Result<()> {
        match self {
            UdpSocket::Reactor(s) => s.recv_batch(into).await,
            UdpSocket::Fallback(s) => s.recv_batch(into).await,
        }
    }

    async fn send_batch(&mut self, from: &mut Packets) -> (usize, u64) {
        match self {
            UdpSocket::Reactor(s) => s.send_batch(from).await,
            UdpSocket::Fallback(s) => s.send_batch(from).await,
        }
    }

    fn raw_fd(&self) -> std::os::fd::RawFd {
        match self {
            UdpSocket::Reactor(s) => s.raw_fd(),
            UdpSocket::Fallback(s) => s.raw_fd(),
        }
    }
}

/// Checks that an io_uring instance can be created here, explaining why not when it cannot.
pub fn probe() -> Result<(), String> {
    if let Ok(v) = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled") {
        match v.trim() {
            "2" => return Err("io_uring is disabled by sysctl kernel.io_uring_disabled=2".into()),
            "1" if !is_root() => {
                return Err(
                    "io_uring is restricted by sysctl kernel.io_uring_disabled=1 (privileged \
                     processes or the io_uring_group only)"
                        .into(),
                )
            }
            _ => {}
        }
    }
    // The same ring a worker creates (size and flags), so "the probe passed" means workers
    // will start too (ENOMEM from the locked-memory limit shows up here, not later).
    let ring = io_uring::IoUring::builder()
        .setup_coop_taskrun()
        .setup_single_issuer()
        .build(legacy::RING_ENTRIES)
        .or_else(|_| io_uring::IoUring::new(legacy::RING_ENTRIES));
    match ring {
        Ok(ring) => {
            drop(ring);
            // Decided and logged once, at startup, before any worker runs.
            mode();
            Ok(())
        }
        Err(e) => Err(match e.raw_os_error() {
            Some(libc::ENOSYS) => "the kernel does not support io_uring (ENOSYS)".into(),
            Some(libc::EPERM) => {
                "io_uring_setup is not permitted (EPERM: a seccomp filter, such as a container \
                 runtime's default profile, or sysctl kernel.io_uring_disabled)"
                    .into()
            }
            Some(libc::ENOMEM) => {
                "io_uring_setup failed with ENOMEM (locked-memory limit too low: raise \
                 `ulimit -l`)"
                    .into()
            }
            _ => format!("io_uring_setup failed: {e}"),
        }),
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}
