//! The epoll backend: tokio's readiness-based IO.
//!
//! Each worker is a current-thread tokio runtime with a `LocalSet` (connection tasks are not
//! `Send` and never migrate) and its own `SO_REUSEPORT` listener (and UDP socket, for UDP
//! services). Reads go straight into the
//! spare capacity of the caller's buffer, so owned-buffer IO costs nothing extra here.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wharf_core::backend::sys::{self, no_spare_capacity, SpliceDirection};
use wharf_core::backend::{Backend, Listener};
use wharf_core::conn::{BufResult, Conn, Spliced};
use wharf_core::datagram::Packets;
use wharf_core::udp::DatagramSocket;

/// The tokio/epoll backend.
pub struct Epoll;

impl Backend for Epoll {
    const NAME: &'static str = "epoll";
    type Listener = TcpListener;
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

    fn listener(socket: std::net::TcpListener) -> io::Result<TcpListener> {
        Ok(TcpListener(tokio::net::TcpListener::from_std(socket)?))
    }

    fn datagram_socket(socket: std::net::UdpSocket) -> io::Result<UdpSocket> {
        Ok(UdpSocket(tokio::net::UdpSocket::from_std(socket)?))
    }
}

/// A worker's UDP socket: one readiness wait per batch, then `recvfrom` until the queue is
/// empty (or the batch full); replies with `sendto`, waiting for writability only when the
/// send buffer is full.
pub struct UdpSocket(tokio::net::UdpSocket);

impl DatagramSocket for UdpSocket {
    async fn recv_batch(&mut self, into: &mut Packets) -> io::Result<()> {
        loop {
            while let Some(packet) = into.next_free() {
                match self.0.try_recv_buf_from(&mut packet.buf) {
                    Ok((_, peer)) => {
                        packet.peer = peer;
                        into.commit();
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if into.is_empty() => return Err(e),
                    Err(_) => break,
                }
            }
            if !into.is_empty() {
                return Ok(());
            }
            self.0.readable().await?;
        }
    }

    async fn send_batch(&mut self, from: &mut Packets) -> (usize, u64) {
        let (mut sent, mut bytes) = (0, 0);
        for packet in from.filled() {
            loop {
                match self.0.try_send_to(&packet.buf, packet.peer) {
                    Ok(n) => {
                        sent += 1;
                        bytes += n as u64;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        if self.0.writable().await.is_ok() {
                            continue;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => {}
                }
                break;
            }
        }
        (sent, bytes)
    }

    fn raw_fd(&self) -> std::os::fd::RawFd {
        self.0.as_raw_fd()
    }
}

/// A worker's listening socket.
pub struct TcpListener(tokio::net::TcpListener);

impl Listener for TcpListener {
    type Conn = TcpConn;

    async fn accept(&self) -> io::Result<(TcpConn, SocketAddr)> {
        let (stream, peer) = self.0.accept().await?;
        stream.set_nodelay(true)?;
        Ok((TcpConn { stream }, peer))
    }
}

/// An accepted connection.
pub struct TcpConn {
    stream: tokio::net::TcpStream,
}

impl Drop for TcpConn {
    fn drop(&mut self) {
        // End the connection for the peer now, whatever else may still refer to the socket
        // (nothing in wharf duplicates it today; this keeps it that way for the peer).
        // SAFETY: the descriptor is still open (closed after this, by the stream's own Drop).
        unsafe { libc::shutdown(self.stream.as_raw_fd(), libc::SHUT_RDWR) };
    }
}

impl Conn for TcpConn {
    async fn read(&mut self, mut buf: Vec<u8>) -> BufResult<usize> {
        if buf.len() == buf.capacity() {
            return (Err(no_spare_capacity()), buf);
        }
        // `read_buf` fills spare capacity only; it never grows a Vec that has room.
        let res = self.stream.read_buf(&mut buf).await;
        (res, buf)
    }

    async fn write(&mut self, buf: Vec<u8>, from: usize) -> BufResult<usize> {
        let res = self.stream.write(&buf[from..]).await;
        (res, buf)
    }

    fn try_read(&mut self, buf: &mut Vec<u8>) -> io::Result<Option<usize>> {
        if buf.len() == buf.capacity() {
            return Err(no_spare_capacity());
        }
        match self.stream.try_read_buf(buf) {
            Ok(n) => Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn readable(&mut self) -> io::Result<()> {
        self.stream.readable().await
    }

    fn local_addr(&self) -> Option<SocketAddr> {
        self.stream.local_addr().ok()
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
            self.stream.writable().await?;
            let once = self.stream.try_io(tokio::io::Interest::WRITABLE, || {
                sys::sendfile_once(fd, file, &mut off, len - sent)
            });
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
        self.stream.writable().await
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
        AsyncWriteExt::shutdown(&mut self.stream).await
    }
}

impl TcpConn {
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
        sys::conn_not_ready(
            self.stream
                .try_io(interest, || sys::splice_step(sock, pipe, direction, len)),
        )
    }
}
