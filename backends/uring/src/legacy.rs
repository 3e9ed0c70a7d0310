//! The io_uring backend's fallback: tokio-uring's completion-based IO, for kernels without
//! what the ring path needs (multishot receive and provided-buffer rings, Linux 6.0), or when
//! `WHARF_URING_FALLBACK=1` asks for it.
//!
//! Same worker model as epoll (one ring and one `SO_REUSEPORT` listener per worker thread), so a
//! backend swap changes only the IO mechanism. Buffers are handed to the kernel for the duration
//! of each operation, which is exactly the owned-buffer contract of [`Conn`].

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd};

use tokio_uring::buf::BoundedBuf;
use wharf_core::backend::mmsg::MultiMsg;
use wharf_core::backend::sys::{self, no_spare_capacity, StreamKind};
use wharf_core::backend::Listener;
use wharf_core::conn::{BufResult, Conn};
use wharf_core::datagram::Packets;
use wharf_core::on_stream;
use wharf_core::peer::{peer_credentials, Peer};
use wharf_core::udp::DatagramSocket;

/// Submission queue entries per worker ring.
pub(crate) const RING_ENTRIES: u32 = 1024;

/// Runs `fut` on a tokio-uring runtime.
pub fn block_on<F: Future>(fut: F) -> io::Result<F::Output> {
    let rt = match tokio_uring::Runtime::new(&runtime_builder(true)) {
        // Kernels before 6.0 reject the tuning flags: run without them.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            tokio_uring::Runtime::new(&runtime_builder(false))?
        }
        other => other?,
    };
    Ok(rt.block_on(fut))
}

/// Adopts a listening TCP socket.
pub fn listener(socket: std::net::TcpListener) -> io::Result<StreamListener> {
    socket.set_nonblocking(true)?;
    Ok(StreamListener::Tcp(tokio::net::TcpListener::from_std(
        socket,
    )?))
}

/// Adopts a listening Unix-domain stream socket.
pub fn unix_listener(socket: std::os::unix::net::UnixListener) -> io::Result<StreamListener> {
    socket.set_nonblocking(true)?;
    Ok(StreamListener::Unix(tokio::net::UnixListener::from_std(
        socket,
    )?))
}

/// Adopts a bound UDP socket.
pub fn datagram_socket(socket: std::net::UdpSocket) -> io::Result<UdpSocket> {
    // io_uring answers operations on a non-blocking socket with EAGAIN instead of waiting.
    socket.set_nonblocking(false)?;
    Ok(UdpSocket {
        socket: tokio_uring::net::UdpSocket::from_std(socket),
        scratch: MultiMsg::new(wharf_core::udp::BATCH),
    })
}

/// A worker's UDP socket: one ring receive (`recvmsg` with an owned buffer, through
/// tokio-uring's `recv_from`) waits for the first datagram of a batch; what else is queued is
/// taken with one `recvmmsg` (`MSG_DONTWAIT`, which never blocks the ring's thread); the
/// replies go out with one `sendmmsg` (`MSG_DONTWAIT` likewise), and only a reply the full
/// send buffer refuses waits, as a ring send (`sendmsg`, through `send_to`). Multishot
/// receives (one submission, many completions, from a provided buffer ring) would save the
/// ring receive per batch, but tokio-uring 0.5 offers neither multishot `recvmsg` nor buffer
/// rings for UDP.
pub struct UdpSocket {
    socket: tokio_uring::net::UdpSocket,
    scratch: MultiMsg,
}

impl DatagramSocket for UdpSocket {
    async fn recv_batch(&mut self, into: &mut Packets) -> io::Result<()> {
        let Some(packet) = into.next_free() else {
            return Ok(());
        };
        let buf = std::mem::take(&mut packet.buf);
        let (res, buf) = self.socket.recv_from(buf).await;
        packet.buf = buf;
        packet.peer = res?.1;
        into.commit();
        // Nothing more queued (or an error, reported by the next wait) ends the batch here.
        let _ = self.scratch.recv(self.socket.as_raw_fd(), into);
        Ok(())
    }

    async fn send_batch(&mut self, from: &mut Packets) -> (usize, u64) {
        let fd = self.socket.as_raw_fd();
        let (mut sent, mut bytes) = (0, 0);
        let mut next = 0;
        while next < from.len() {
            match self.scratch.send(fd, &from.filled()[next..]) {
                Ok((n, b)) => {
                    sent += n;
                    bytes += b;
                    next += n.max(1);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // The send buffer is full: this reply waits in the ring for room.
                    let packet = &mut from.filled_mut()[next];
                    let buf = std::mem::take(&mut packet.buf);
                    let (res, buf) = self.socket.send_to(buf, packet.peer).await;
                    packet.buf = buf;
                    if let Ok(n) = res {
                        sent += 1;
                        bytes += n as u64;
                    }
                    next += 1;
                }
                // The socket refused this datagram (an unreachable destination, say): skip it.
                Err(_) => next += 1,
            }
        }
        (sent, bytes)
    }

    fn raw_fd(&self) -> std::os::fd::RawFd {
        self.socket.as_raw_fd()
    }
}

/// The ring setup. With `tuned`, two flags that fit the thread-per-core model:
///
/// - `COOP_TASKRUN`: completions are run when the worker next enters the kernel instead of
///   interrupting it with an IPI. Measured on loopback HTTP with 64 connections: +35% requests
///   per second and 30% less CPU per request (see BENCHMARKS.md).
/// - `SINGLE_ISSUER`: only the worker thread submits, so the kernel can skip locking.
///
/// `DEFER_TASKRUN` would go further but tokio-uring waits for completions through epoll on the
/// ring fd, which never becomes readable when completions are deferred: it hangs.
fn runtime_builder(tuned: bool) -> tokio_uring::Builder {
    let mut ring = tokio_uring::uring_builder();
    if tuned {
        ring.setup_coop_taskrun().setup_single_issuer();
    }
    let mut builder = tokio_uring::builder();
    builder.entries(RING_ENTRIES).uring_builder(&ring);
    builder
}

/// A worker's listening socket. Connections are accepted on readiness (tokio's reactor, which
/// tokio-uring runs on) and served through the ring: accepting is not the hot path, and an
/// io_uring accept cannot be cancelled with tokio-uring 0.5 (a dropped operation stays armed),
/// so a stopped listener could only be silenced by `shutdown(2)`, which would also stop a
/// socket shared with systemd (socket activation), or by every worker (a Unix socket).
pub enum StreamListener {
    /// A TCP listener.
    Tcp(tokio::net::TcpListener),
    /// A Unix-domain stream listener.
    Unix(tokio::net::UnixListener),
}

/// tokio-uring does not cancel an operation whose future is dropped: the kernel keeps it in
/// flight, and the op keeps the socket open. `shutdown(2)` completes pending operations (a
/// receive sees end of stream), so dropping a connection really closes it. Without this, an
/// idle-timed-out client would never be disconnected.
fn complete_pending_ops(fd: std::os::fd::RawFd) {
    // SAFETY: `fd` belongs to a socket we still own (called from Drop, before it is closed).
    unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
}

impl Listener for StreamListener {
    type Conn = StreamConn;

    async fn accept(&self) -> io::Result<(StreamConn, Peer)> {
        // io_uring answers operations on a non-blocking socket with EAGAIN instead of waiting.
        let (stream, peer) = match self {
            StreamListener::Tcp(l) => {
                let (stream, peer) = l.accept().await?;
                let stream = stream.into_std()?;
                stream.set_nonblocking(false)?;
                stream.set_nodelay(true)?;
                let stream = Stream::Tcp(tokio_uring::net::TcpStream::from_std(stream));
                (stream, Peer::Ip(peer))
            }
            StreamListener::Unix(l) => {
                let (stream, _) = l.accept().await?;
                let stream = stream.into_std()?;
                let credentials = peer_credentials(stream.as_fd())?;
                stream.set_nonblocking(false)?;
                let stream = Stream::Unix(tokio_uring::net::UnixStream::from_std(stream));
                (stream, Peer::Unix(credentials))
            }
        };
        let readiness = sys::ReadReadiness::default();
        Ok((StreamConn { readiness, stream }, peer))
    }
}

/// The socket of an accepted connection.
type Stream = StreamKind<tokio_uring::net::TcpStream, tokio_uring::net::UnixStream>;

/// An accepted connection (TCP or Unix-domain).
pub struct StreamConn {
    /// Declared before `stream`: deregistered before the socket closes.
    readiness: sys::ReadReadiness,
    stream: Stream,
}

impl Drop for StreamConn {
    fn drop(&mut self) {
        complete_pending_ops(self.stream.as_raw_fd());
    }
}

impl Conn for StreamConn {
    async fn read(&mut self, buf: Vec<u8>) -> BufResult<usize> {
        if buf.len() == buf.capacity() {
            return (Err(no_spare_capacity()), buf);
        }
        // A plain Vec would be read into from offset 0 (tokio-uring's `IoBufMut for Vec` points
        // at the start and only raises `len`), overwriting unconsumed input such as the first
        // half of an HTTP head. A slice from `len` reads into the spare capacity and advances
        // `len` by what arrived, as the trait specifies.
        let len = buf.len();
        let (res, slice) = on_stream!(&self.stream, s => s.read(buf.slice(len..)).await);
        (res, slice.into_inner())
    }

    async fn write(&mut self, buf: Vec<u8>, from: usize) -> BufResult<usize> {
        let (res, slice) = on_stream!(&self.stream, s => s.write(buf.slice(from..)).submit().await);
        (res, slice.into_inner())
    }

    fn try_read(&mut self, buf: &mut Vec<u8>) -> io::Result<Option<usize>> {
        sys::recv_now(self.stream.as_raw_fd(), buf)
    }

    /// Through tokio's reactor (which tokio-uring runs on): a readiness wait, unlike a ring
    /// read, is cancelled for good when its future is dropped.
    async fn readable(&mut self) -> io::Result<()> {
        self.readiness.readable(self.stream.as_raw_fd()).await
    }

    /// The TCP address connected to; `None` on a Unix socket.
    fn local_addr(&self) -> Option<SocketAddr> {
        if let Stream::Unix(_) = self.stream {
            return None;
        }
        // SAFETY: the stream's descriptor is open while `self` is borrowed.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(self.stream.as_raw_fd()) };
        sys::local_addr(fd)
    }

    fn peer_closed(&self) -> bool {
        sys::peer_closed(self.stream.as_raw_fd())
    }

    fn peer_finished_sending(&self) -> bool {
        sys::peer_finished_sending(self.stream.as_raw_fd())
    }

    /// `sendfile(2)` on the worker, waiting for socket writability through tokio's reactor
    /// (which runs under tokio-uring): tokio-uring 0.5 exposes no splice or sendfile
    /// operation, and running it on the blocking pool held a thread for as long as a client did
    /// not read. See BENCHMARKS.md for the comparison with ring reads and writes.
    async fn send_file(&mut self, file: &std::fs::File, offset: u64, len: u64) -> io::Result<u64> {
        // SAFETY: the stream's descriptor is open while `self` is borrowed.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(self.stream.as_raw_fd()) };
        sys::sendfile_on_reactor(fd, file, offset, len).await
    }

    async fn shutdown(&mut self) -> io::Result<()> {
        on_stream!(&self.stream, s => s.shutdown(std::net::Shutdown::Write))
    }
}
