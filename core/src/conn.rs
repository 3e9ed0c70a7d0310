//! The transport trait: one accepted connection, seen through owned buffers.
//!
//! io_uring hands a buffer to the kernel for the whole duration of an operation, so a buffer
//! cannot be borrowed across an `.await`: it is passed by value and handed back with the result,
//! the way tokio-uring and monoio do. The epoll backend implements the same contract trivially,
//! and so does the in-memory pipe in [`crate::testing`]. Plugins are written against this trait
//! only and never learn which backend they run on.
//!
//! The methods are native `async fn`s, statically dispatched: a plugin's `serve` is generic over
//! the connection type, so no read or write allocates or goes through a vtable.
//!
//! A `Conn` is transport only: bytes in and out, and what the socket itself can tell. What the
//! framework knows about the connection (the client's address, the drain signal, request
//! metrics, the blocking pool) is the [`Context`](crate::Context) that `serve` receives next to
//! it; reading in frames (lines, length-prefixed) is [`crate::framing`].

use std::fs::File;
use std::io;
use std::os::fd::BorrowedFd;

/// The result of an owned-buffer operation: the outcome, and the buffer handed back.
///
/// On error the returned buffer may be a different (possibly empty) allocation, because the
/// original can still be owned by a cancelled kernel operation.
pub type BufResult<T> = (io::Result<T>, Vec<u8>);

/// What one [`Conn::try_splice_to_pipe`] or [`Conn::try_splice_from_pipe`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spliced {
    /// This many bytes moved.
    Moved(usize),
    /// The source is at its end: the client finished sending (to a pipe), or every writer of
    /// the pipe closed it (from a pipe).
    Ended,
    /// The connection is not ready (nothing to read, or no room to send): wait with
    /// [`Conn::readable`] or [`Conn::writable`].
    ConnNotReady,
    /// The pipe is not ready (full when splicing into it, empty when splicing from it): wait
    /// for the pipe.
    PipeNotReady,
}

/// One client connection.
///
/// Futures are not `Send`: a connection lives and dies on the worker thread that accepted it.
#[allow(async_fn_in_trait)] // deliberate: thread-per-core tasks never need `Send` futures
pub trait Conn {
    /// Reads into the spare capacity of `buf` (`buf.len()..buf.capacity()`), appending to its
    /// contents. Returns the number of bytes read; `0` means the peer closed its sending side.
    /// A buffer without spare capacity is an `InvalidInput` error, never a silent `0`.
    async fn read(&mut self, buf: Vec<u8>) -> BufResult<usize>;

    /// Writes some of `buf[from..]` and returns how many bytes were written.
    async fn write(&mut self, buf: Vec<u8>, from: usize) -> BufResult<usize>;

    /// Writes all of `buf`, looping over [`Conn::write`].
    async fn write_all(&mut self, mut buf: Vec<u8>) -> BufResult<()> {
        let mut from = 0;
        while from < buf.len() {
            let (res, returned) = self.write(buf, from).await;
            buf = returned;
            match res {
                Ok(0) => return (Err(io::ErrorKind::WriteZero.into()), buf),
                Ok(n) => from += n,
                Err(e) => return (Err(e), buf),
            }
        }
        (Ok(()), buf)
    }

    /// Reads what has already arrived into the spare capacity of `buf`, without waiting:
    /// `Ok(None)` when nothing is ready, `Ok(Some(0))` at end of stream. For protocols that must
    /// tell "the client paused" from "more bytes are queued". Never use it while a read of this
    /// connection is pending (on io_uring's tokio-uring fallback, a read whose future was
    /// dropped still is).
    fn try_read(&mut self, buf: &mut Vec<u8>) -> io::Result<Option<usize>>;

    /// Waits until a read would not block: bytes, end of stream or an error are ready for
    /// [`Conn::try_read`]. Cancel-safe on every backend (it waits for readiness and starts no
    /// read), so a plugin that must watch the client and something else at once (the process
    /// plugin: the client and a child's pipes) can drop it whenever the other side is ready,
    /// which a dropped [`Conn::read`] on io_uring's tokio-uring fallback cannot be. It may wake
    /// spuriously: follow it with `try_read` and wait again on `Ok(None)`. The default says
    /// `Unsupported`.
    async fn readable(&mut self) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "this connection cannot wait for readiness",
        ))
    }

    /// The local address of the socket (the address the client connected to), when the
    /// connection has one. The default: `None`.
    fn local_addr(&self) -> Option<std::net::SocketAddr> {
        None
    }

    /// Whether the peer is gone: the connection was reset or failed (`POLLHUP`/`POLLERR`),
    /// checked without consuming input or waiting, so a long-running request can stop work
    /// nobody will read. A half-closed peer (it sent FIN with `shutdown(SHUT_WR)`, or closed
    /// after sending) is *not* gone: it may still be reading, so it gets its answer; end of
    /// stream is what [`Conn::read`] returning `0` reports, not this.
    fn peer_closed(&self) -> bool;

    /// Whether the peer has finished sending (it sent FIN: `shutdown(SHUT_WR)` or a close;
    /// `POLLRDHUP`), or is gone as [`Conn::peer_closed`] says; checked without consuming input
    /// or waiting.
    ///
    /// A peer that finished sending may still be reading, so this is *not* a disconnect in
    /// general: use it only for work whose result the peer has not been sent any of and that
    /// it may not want at all. file-get's resume at the very end of a file (`get f <size>`)
    /// is the case: nothing of the file is sent, so a client that asked and closed never
    /// answers with a reset, and [`Conn::peer_closed`] would let it cost a whole-file hash;
    /// such a client gives up its trailer instead. The default (`false`: never finished) keeps
    /// connections that cannot tell serving.
    fn peer_finished_sending(&self) -> bool {
        false
    }

    /// Sends `len` bytes of `file` starting at `offset`; returns how many were sent, fewer only
    /// if the file ended first. Backends override it with a zero-copy path that keeps file
    /// reads off the worker; this portable fallback reads 64 KiB at a time and writes them.
    async fn send_file(&mut self, file: &File, offset: u64, len: u64) -> io::Result<u64> {
        use std::os::unix::fs::FileExt;
        let mut sent = 0u64;
        let mut buf = vec![0u8; 64 * 1024];
        while sent < len {
            let want = (len - sent).min(buf.len() as u64) as usize;
            buf.resize(want, 0);
            let n = file.read_at(&mut buf, offset + sent)?;
            if n == 0 {
                break;
            }
            buf.truncate(n);
            let (res, returned) = self.write_all(buf).await;
            buf = returned;
            res?;
            sent += n as u64;
        }
        Ok(sent)
    }

    /// Waits until a write would not block. Cancel-safe; it may wake spuriously. For the
    /// splice calls below. The default says `Unsupported`.
    async fn writable(&mut self) -> io::Result<()> {
        Err(io::ErrorKind::Unsupported.into())
    }

    /// Whether the connection's bytes can move to and from pipes with `splice(2)`, in the
    /// kernel, without passing through a buffer of ours: true for a plain socket on a backend
    /// that drives its readiness (epoll), false for TLS (the bytes on the wire are not the
    /// plugin's), io_uring (its multishot receive would race a splice for the bytes) and the
    /// in-memory pipe. When false, the splice calls say `Unsupported`: copy instead.
    fn can_splice(&self) -> bool {
        false
    }

    /// Moves up to `len` bytes the client sent into `pipe` (a non-blocking pipe's write end)
    /// without waiting, in the kernel. Counted like a read.
    fn try_splice_to_pipe(&mut self, pipe: BorrowedFd<'_>, len: usize) -> io::Result<Spliced> {
        let _ = (pipe, len);
        Err(io::ErrorKind::Unsupported.into())
    }

    /// Moves up to `len` bytes from `pipe` (a non-blocking pipe's read end) to the client
    /// without waiting, in the kernel. Counted like a write.
    fn try_splice_from_pipe(&mut self, pipe: BorrowedFd<'_>, len: usize) -> io::Result<Spliced> {
        let _ = (pipe, len);
        Err(io::ErrorKind::Unsupported.into())
    }

    /// Shuts down the sending side (TCP FIN); the peer sees end of stream.
    async fn shutdown(&mut self) -> io::Result<()>;
}
