//! The epoll backend: tokio's readiness-based IO.
//!
//! Each worker is a current-thread tokio runtime with a `LocalSet` (connection tasks are not
//! `Send` and never migrate) and its own `SO_REUSEPORT` listener (or a clone of the one
//! Unix-domain listener every worker shares; and a UDP socket, for UDP services). Reads go
//! straight into the
//! spare capacity of the caller's buffer, so owned-buffer IO costs nothing extra here.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use tokio::io::{AsyncRead, AsyncWriteExt, Interest};
use wharf_core::backend::mmsg::MultiMsg;
use wharf_core::backend::sys::{self, no_spare_capacity, SpliceDirection, StreamKind};
use wharf_core::backend::{Backend, Listener};
use wharf_core::conn::{BufResult, Conn, Spliced};
use wharf_core::datagram::Packets;
use wharf_core::on_stream;
use wharf_core::peer::{peer_credentials, Peer};
use wharf_core::udp::DatagramSocket;

/// The tokio/epoll backend.
pub struct Epoll;

impl Backend for Epoll {
    const NAME: &'static str = "epoll";
    type Listener = StreamListener;
    type Datagrams = UdpSocket;

    fn block_on<F: Future>(fut: F) -> io::Result<F::Output> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let out = tokio::task::LocalSet::new().block_on(&rt, fut);
        // Blocking-pool work (a hashing thread, a stuck file read) must not hold the exit.
        rt.shutdown_timeout(std::time::Duration::from_secs(1));
        Ok(out)
    }

    fn listener(socket: std::net::TcpListener) -> io::Result<StreamListener> {
        Ok(StreamListener::Tcp(tokio::net::TcpListener::from_std(
            socket,
        )?))
    }

    fn unix_listener(socket: std::os::unix::net::UnixListener) -> io::Result<StreamListener> {
        Ok(StreamListener::Unix(tokio::net::UnixListener::from_std(
            socket,
        )?))
    }

    fn datagram_socket(socket: std::net::UdpSocket) -> io::Result<UdpSocket> {
        Ok(UdpSocket {
            socket: tokio::net::UdpSocket::from_std(socket)?,
            scratch: MultiMsg::new(wharf_core::udp::BATCH),
        })
    }
}

/// A worker's UDP socket: one readiness wait per batch, then one `recvmmsg` takes what is
/// queued (up to the batch size); the replies go out with `sendmmsg`, waiting for writability
/// only when the send buffer is full ([`wharf_core::backend::mmsg`]).
pub struct UdpSocket {
    socket: tokio::net::UdpSocket,
    scratch: MultiMsg,
}

impl DatagramSocket for UdpSocket {
    async fn recv_batch(&mut self, into: &mut Packets) -> io::Result<()> {
        let fd = self.socket.as_raw_fd();
        loop {
            let scratch = &mut self.scratch;
            match self
                .socket
                .try_io(Interest::READABLE, || scratch.recv(fd, into))
            {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            self.socket.readable().await?;
        }
    }

    async fn send_batch(&mut self, from: &mut Packets) -> (usize, u64) {
        let fd = self.socket.as_raw_fd();
        let (mut sent, mut bytes) = (0, 0);
        let mut next = 0;
        let packets = from.filled();
        while next < packets.len() {
            let scratch = &mut self.scratch;
            let rest = &packets[next..];
            match self
                .socket
                .try_io(Interest::WRITABLE, || scratch.send(fd, rest))
            {
                Ok((n, b)) => {
                    sent += n;
                    bytes += b;
                    next += n.max(1);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if self.socket.writable().await.is_err() {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
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

/// A worker's listening socket: TCP or Unix-domain.
pub enum StreamListener {
    /// A TCP listener.
    Tcp(tokio::net::TcpListener),
    /// A Unix-domain stream listener.
    Unix(tokio::net::UnixListener),
}

impl Listener for StreamListener {
    type Conn = StreamConn;

    async fn accept(&self) -> io::Result<(StreamConn, Peer)> {
        match self {
            StreamListener::Tcp(l) => {
                let (stream, peer) = l.accept().await?;
                stream.set_nodelay(true)?;
                let stream = Stream::Tcp(stream);
                Ok((StreamConn { stream }, Peer::Ip(peer)))
            }
            StreamListener::Unix(l) => {
                let (stream, _) = l.accept().await?;
                let credentials = peer_credentials(stream.as_fd())?;
                let stream = Stream::Unix(stream);
                Ok((StreamConn { stream }, Peer::Unix(credentials)))
            }
        }
    }
}

/// The socket of an accepted connection.
type Stream = StreamKind<tokio::net::TcpStream, tokio::net::UnixStream>;

/// An accepted connection (TCP or Unix-domain).
pub struct StreamConn {
    stream: Stream,
}

impl Drop for StreamConn {
    fn drop(&mut self) {
        // End the connection for the peer now, whatever else may still refer to the socket
        // (nothing in wharf duplicates it today; this keeps it that way for the peer).
        // SAFETY: the descriptor is still open (closed after this, by the stream's own Drop).
        unsafe { libc::shutdown(self.stream.as_raw_fd(), libc::SHUT_RDWR) };
    }
}

impl Conn for StreamConn {
    async fn read(&mut self, mut buf: Vec<u8>) -> BufResult<usize> {
        if buf.len() == buf.capacity() {
            return (Err(no_spare_capacity()), buf);
        }
        // One readiness-driven `recv` into the spare capacity, straight through `poll_read`
        // (tokio's `read_buf` does the same behind a generic buffer layer: see BENCHMARKS.md,
        // "Echo's per-connection cost"). `poll_read` clears the readiness after a short
        // read, so a request/response exchange makes no extra `recv` that finds nothing.
        let stream = &mut self.stream;
        let res = std::future::poll_fn(|cx| {
            let mut spare = tokio::io::ReadBuf::uninit(buf.spare_capacity_mut());
            on_stream!(&mut *stream, s => std::pin::Pin::new(s).poll_read(cx, &mut spare))
                .map_ok(|()| spare.filled().len())
        })
        .await;
        if let Ok(n) = res {
            // SAFETY: `poll_read` initialized (filled) the first `n` bytes of the spare
            // capacity.
            unsafe { buf.set_len(buf.len() + n) };
        }
        (res, buf)
    }

    async fn write(&mut self, buf: Vec<u8>, from: usize) -> BufResult<usize> {
        let res = on_stream!(&mut self.stream, s => s.write(&buf[from..]).await);
        (res, buf)
    }

    fn try_read(&mut self, buf: &mut Vec<u8>) -> io::Result<Option<usize>> {
        if buf.len() == buf.capacity() {
            return Err(no_spare_capacity());
        }
        match on_stream!(&self.stream, s => s.try_read_buf(buf)) {
            Ok(n) => Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn readable(&mut self) -> io::Result<()> {
        on_stream!(&self.stream, s => s.readable().await)
    }

    /// The TCP address connected to; `None` on a Unix socket.
    fn local_addr(&self) -> Option<SocketAddr> {
        match &self.stream {
            Stream::Tcp(s) => s.local_addr().ok(),
            Stream::Unix(_) => None,
        }
    }

    fn peer_closed(&self) -> bool {
        sys::peer_closed(self.stream.as_raw_fd())
    }

    fn peer_finished_sending(&self) -> bool {
        sys::peer_finished_sending(self.stream.as_raw_fd())
    }

    /// `sendfile(2)` driven by socket readiness, on the worker: no thread per transfer, and
    /// a slow client costs nothing but its socket. Pages already in the page cache (the case
    /// this is built for) are copied at memory speed; a cold page makes that one call wait
    /// for the disk.
    async fn send_file(&mut self, file: &std::fs::File, offset: u64, len: u64) -> io::Result<u64> {
        let mut off = i64::try_from(offset).map_err(io::Error::other)?;
        let mut sent = 0u64;
        let fd = self.stream.as_raw_fd();
        while sent < len {
            on_stream!(&self.stream, s => s.writable().await)?;
            let once = on_stream!(&self.stream, s => s.try_io(tokio::io::Interest::WRITABLE, || {
                sys::sendfile_once(fd, file, &mut off, len - sent)
            }));
            match once {
                Ok(0) => break, // the file is shorter than promised
                Ok(n) => sent += n as u64,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(sent)
    }

    async fn writable(&mut self) -> io::Result<()> {
        on_stream!(&self.stream, s => s.writable().await)
    }

    fn can_splice(&self) -> bool {
        true
    }

    fn try_splice_to_pipe(&mut self, pipe: BorrowedFd<'_>, len: usize) -> io::Result<Spliced> {
        self.splice(pipe, SpliceDirection::ToPipe, len)
    }

    fn try_splice_from_pipe(&mut self, pipe: BorrowedFd<'_>, len: usize) -> io::Result<Spliced> {
        self.splice(pipe, SpliceDirection::FromPipe, len)
    }

    async fn shutdown(&mut self) -> io::Result<()> {
        on_stream!(&mut self.stream, s => AsyncWriteExt::shutdown(s).await)
    }
}

impl StreamConn {
    /// One splice under the socket's readiness: a socket found not ready clears it, so the
    /// next `readable`/`writable` waits for the kernel.
    fn splice(
        &self,
        pipe: BorrowedFd<'_>,
        direction: SpliceDirection,
        len: usize,
    ) -> io::Result<Spliced> {
        let (sock, pipe) = (self.stream.as_raw_fd(), pipe.as_raw_fd());
        let interest = match direction {
            SpliceDirection::ToPipe => tokio::io::Interest::READABLE,
            SpliceDirection::FromPipe => tokio::io::Interest::WRITABLE,
        };
        sys::conn_not_ready(on_stream!(&self.stream, s => {
            s.try_io(interest, || sys::splice_step(sock, pipe, direction, len))
        }))
    }
}
