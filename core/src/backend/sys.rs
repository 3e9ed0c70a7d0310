//! Socket helpers for backend implementations (not for plugins): what the epoll and io_uring
//! [`Conn`]s share, straight on file descriptors. A plugin never needs these: it sees only
//! [`Conn`] and [`Context`](crate::Context) (the one exception: [`pipe_ready_now`], for a
//! plugin that splices to its own pipes).

use std::io;

#[cfg(doc)]
use crate::conn::Conn;
use crate::conn::Spliced;

/// A socket of one of the two stream kinds a backend serves: the shape of each backend's
/// connection (and listener) type, which must be one type for TCP and Unix-domain alike.
/// [`on_stream!`](crate::on_stream) runs the same code on either.
pub enum StreamKind<T, U> {
    /// A TCP socket.
    Tcp(T),
    /// A Unix-domain stream socket.
    Unix(U),
}

impl<T: std::os::fd::AsRawFd, U: std::os::fd::AsRawFd> std::os::fd::AsRawFd for StreamKind<T, U> {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        crate::on_stream!(self, s => s.as_raw_fd())
    }
}

/// Runs the same expression on either kind of a [`StreamKind`]:
/// `on_stream!(&self.stream, s => s.readable().await)`.
#[macro_export]
macro_rules! on_stream {
    ($stream:expr, $s:ident => $body:expr) => {
        match $stream {
            $crate::backend::sys::StreamKind::Tcp($s) => $body,
            $crate::backend::sys::StreamKind::Unix($s) => $body,
        }
    };
}

/// The error every [`Conn`] implementation returns for a read into a full buffer.
pub fn no_spare_capacity() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        "read into a buffer with no spare capacity",
    )
}

/// Non-blocking `recv` into the spare capacity of `buf`, straight on a socket descriptor; the
/// shared implementation of [`Conn::try_read`] for socket backends.
pub fn recv_now(fd: std::os::fd::RawFd, buf: &mut Vec<u8>) -> io::Result<Option<usize>> {
    let spare = buf.spare_capacity_mut();
    if spare.is_empty() {
        return Err(no_spare_capacity());
    }
    // SAFETY: the pointer and length describe `buf`'s spare capacity, which recv only writes;
    // `set_len` then covers exactly the bytes it wrote.
    let n = unsafe {
        libc::recv(
            fd,
            spare.as_mut_ptr().cast(),
            spare.len(),
            libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        let err = io::Error::last_os_error();
        return match err.kind() {
            io::ErrorKind::WouldBlock => Ok(None),
            _ => Err(err),
        };
    }
    let n = n as usize;
    // SAFETY: recv initialized `n` bytes of the spare capacity.
    unsafe { buf.set_len(buf.len() + n) };
    Ok(Some(n))
}

/// The states always reported by `poll(2)`: the connection was reset or failed.
const GONE: libc::c_short = libc::POLLHUP | libc::POLLERR | libc::POLLNVAL;

/// Whether the peer of a connected socket is gone: the connection was reset or failed
/// (`POLLHUP`, `POLLERR`), asked with a zero-timeout `poll(2)` that neither waits nor consumes.
/// A half-close (`POLLRDHUP`: the peer sent FIN but may still be reading) is deliberately not
/// a disconnect. Shared implementation of [`Conn::peer_closed`].
pub fn peer_closed(fd: std::os::fd::RawFd) -> bool {
    // Asking for nothing: the states in GONE are reported anyway.
    poll_now(fd, 0) & GONE != 0
}

/// Whether a read of a connected socket would not block now: bytes or end of stream are
/// queued, or the connection failed (zero-timeout `poll(2)`, like [`peer_closed`]).
pub fn readable_now(fd: std::os::fd::RawFd) -> bool {
    poll_now(fd, libc::POLLIN | libc::POLLRDHUP) & (libc::POLLIN | libc::POLLRDHUP | GONE) != 0
}

/// The local address of a socket (`getsockname`); `None` if it has none (or the call fails).
/// Shared implementation of [`Conn::local_addr`].
pub fn local_addr(fd: std::os::fd::BorrowedFd<'_>) -> Option<std::net::SocketAddr> {
    socket2::SockRef::from(&fd).local_addr().ok()?.as_socket()
}

/// Waits for a socket to become readable through tokio's reactor, for a backend whose reads do
/// not go through it (io_uring): the shared implementation of [`Conn::readable`] there. The
/// socket is registered on first use and stays registered until this is dropped, which must
/// happen before the socket is closed (declare it before the socket in the owning struct).
#[derive(Default)]
pub struct ReadReadiness(Option<tokio::io::unix::AsyncFd<Unowned>>);

/// A descriptor registered with the reactor without being owned by it (closing stays its
/// owner's).
struct Unowned(std::os::fd::RawFd);

impl std::os::fd::AsRawFd for Unowned {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0
    }
}

impl ReadReadiness {
    /// Completes once a read of `fd` would not block (see [`readable_now`]). Cancel-safe.
    /// `fd` must be the same open socket on every call.
    pub async fn readable(&mut self, fd: std::os::fd::RawFd) -> io::Result<()> {
        if readable_now(fd) {
            return Ok(());
        }
        if self.0.is_none() {
            let interest = tokio::io::Interest::READABLE;
            // SAFETY: the caller keeps `fd` open, the same socket, for as long as this is
            // registered (it is dropped before the socket closes, see the type's docs).
            // Registration only watches the descriptor; nothing here reads from it.
            let registered =
                unsafe { tokio::io::unix::AsyncFd::register_with_interest(Unowned(fd), interest) };
            self.0 = Some(registered?);
        }
        let registered = self.0.as_ref().expect("registered above");
        loop {
            let mut guard = registered.readable().await?;
            if readable_now(fd) {
                return Ok(());
            }
            // Cleared only after checking, so an edge that comes in between is not lost.
            guard.clear_ready();
        }
    }
}

/// Whether the peer of a connected socket has finished sending: it sent FIN (`POLLRDHUP`, also
/// with unread bytes still queued) or the connection was reset or failed, asked like
/// [`peer_closed`]. Shared implementation of
/// [`Conn::peer_finished_sending`].
pub fn peer_finished_sending(fd: std::os::fd::RawFd) -> bool {
    poll_now(fd, libc::POLLRDHUP) & (libc::POLLRDHUP | GONE) != 0
}

/// The events of `fd` now (`poll(2)` with a zero timeout: it neither waits nor consumes); none
/// if the call fails.
fn poll_now(fd: std::os::fd::RawFd, events: libc::c_short) -> libc::c_short {
    let mut pfd = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    // SAFETY: one valid pollfd, zero timeout.
    let n = unsafe { libc::poll(&mut pfd, 1, 0) };
    if n > 0 {
        pfd.revents
    } else {
        0
    }
}

/// Most bytes one `sendfile(2)` call moves (the kernel's own per-call limit).
pub const SENDFILE_MAX: u64 = 0x7fff_f000;

/// Which way [`splice_step`] moves bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpliceDirection {
    /// From the socket into the pipe (what the client sent).
    ToPipe,
    /// From the pipe to the socket (to the client).
    FromPipe,
}

/// One non-blocking `splice(2)` of up to `len` bytes between the socket `sock` and `pipe`,
/// classified for [`Conn::try_splice_to_pipe`] and [`Conn::try_splice_from_pipe`]. It fails with
/// `WouldBlock` only when the *socket* is the side not ready, so a backend can run it under
/// its reactor's readiness for the socket (tokio's `try_io`), which clears that readiness on
/// `WouldBlock`; a pipe not ready is [`Spliced::PipeNotReady`] (told apart with a zero-timeout
/// `poll(2)` of the pipe) and leaves the socket's readiness alone.
///
/// The socket must be non-blocking (a blocking socket could make the call wait).
pub fn splice_step(
    sock: std::os::fd::RawFd,
    pipe: std::os::fd::RawFd,
    direction: SpliceDirection,
    len: usize,
) -> io::Result<Spliced> {
    let (from, to) = match direction {
        SpliceDirection::ToPipe => (sock, pipe),
        SpliceDirection::FromPipe => (pipe, sock),
    };
    let flags = libc::SPLICE_F_NONBLOCK | libc::SPLICE_F_MOVE;
    let n = loop {
        // SAFETY: both descriptors are open for the call; no offsets (sockets and pipes have
        // none).
        let n = unsafe {
            libc::splice(
                from,
                std::ptr::null_mut(),
                to,
                std::ptr::null_mut(),
                len,
                flags,
            )
        };
        if n >= 0 {
            break n as usize;
        }
        let err = io::Error::last_os_error();
        match err.kind() {
            io::ErrorKind::Interrupted => continue,
            io::ErrorKind::WouldBlock => {
                let pipe_ready = pipe_ready_now(pipe, direction == SpliceDirection::ToPipe);
                return if pipe_ready {
                    Err(err)
                } else {
                    Ok(Spliced::PipeNotReady)
                };
            }
            _ => return Err(err),
        }
    };
    Ok(if n == 0 {
        Spliced::Ended
    } else {
        Spliced::Moved(n)
    })
}

/// Whether an operation on a pipe end would not block now: a write (`writable`: there is
/// room, or the reader is gone and a write fails at once) or a read (bytes, or end of stream).
/// A zero-timeout `poll(2)`.
pub fn pipe_ready_now(pipe: std::os::fd::RawFd, writable: bool) -> bool {
    let events = if writable {
        libc::POLLOUT
    } else {
        libc::POLLIN
    };
    poll_now(pipe, events) & (events | GONE) != 0
}

/// Maps the `WouldBlock` of a [`splice_step`] run under the socket's readiness to
/// [`Spliced::ConnNotReady`].
pub fn conn_not_ready(res: io::Result<Spliced>) -> io::Result<Spliced> {
    match res {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Spliced::ConnNotReady),
        other => other,
    }
}

/// One `sendfile(2)` call: up to `count` bytes of `file` from `*offset` (advanced by the
/// kernel) to the socket `sock`.
pub fn sendfile_once(
    sock: std::os::fd::RawFd,
    file: &std::fs::File,
    offset: &mut i64,
    count: u64,
) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    let count = count.min(SENDFILE_MAX) as usize;
    // SAFETY: both descriptors are open for the duration of the call; `offset` is ours.
    let n = unsafe { libc::sendfile(sock, file.as_raw_fd(), offset, count) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Sends `len` bytes of `file` from `offset` to the socket `sock` with `sendfile(2)`, on the
/// calling worker, waiting for writability through tokio's reactor: a client that does not read
/// costs its socket and nothing else (no thread). For a socket tokio does not poll already
/// (io_uring's): it is switched to non-blocking mode and registered with the reactor for the
/// duration of the call, and put back as it was afterwards, also when the future is dropped.
/// No other operation of the socket may run meanwhile (the caller holds the connection
/// exclusively). Returns the bytes sent, fewer than `len` only if the file ended first.
///
/// Pages already in the page cache are copied at memory speed; a cold page makes that one call
/// wait for the disk, as on the epoll backend.
pub async fn sendfile_on_reactor(
    sock: std::os::fd::BorrowedFd<'_>,
    file: &std::fs::File,
    offset: u64,
    len: u64,
) -> io::Result<u64> {
    use std::os::fd::AsRawFd;
    use tokio::io::{unix::AsyncFd, Interest};

    /// The socket's descriptor, registered without being owned (closing stays its owner's).
    struct Registered(std::os::fd::RawFd);
    impl AsRawFd for Registered {
        fn as_raw_fd(&self) -> std::os::fd::RawFd {
            self.0
        }
    }

    let fd = sock.as_raw_fd();
    let mut off = i64::try_from(offset).map_err(io::Error::other)?;
    let _mode = NonBlocking::set(fd)?;
    // Declared after the mode guard: dropped (deregistered) before the mode is restored.
    // SAFETY: `sock` is borrowed for this whole call, so the descriptor stays open and refers
    // to the same socket until `ready` is dropped at its end.
    let ready = unsafe { AsyncFd::register_with_interest(Registered(fd), Interest::WRITABLE) }?;
    let mut sent = 0u64;
    while sent < len {
        // Try first: a fresh registration knows no readiness yet, and waiting for the reactor
        // to report a socket that is already writable costs a round trip per call.
        match sendfile_once(fd, file, &mut off, len - sent) {
            Ok(0) => break, // the file is shorter than promised
            Ok(n) => {
                sent += n as u64;
                // A client that keeps up must not keep the worker from its other connections.
                tokio::task::consume_budget().await;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // Cleared before the next try, so an edge that comes in between is not lost.
                ready.writable().await?.clear_ready();
            }
            Err(e) => return Err(e),
        }
    }
    Ok(sent)
}

/// Holds a descriptor in non-blocking mode; restores its previous mode on drop.
struct NonBlocking {
    fd: std::os::fd::RawFd,
    was: libc::c_int,
}

impl NonBlocking {
    fn set(fd: std::os::fd::RawFd) -> io::Result<Self> {
        // SAFETY: fcntl on a descriptor the caller keeps open for the guard's lifetime.
        let was = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        if was < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: as above.
        if unsafe { libc::fcntl(fd, libc::F_SETFL, was | libc::O_NONBLOCK) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(NonBlocking { fd, was })
    }
}

impl Drop for NonBlocking {
    fn drop(&mut self) {
        // SAFETY: the descriptor is still open (see `set`).
        unsafe { libc::fcntl(self.fd, libc::F_SETFL, self.was) };
    }
}
