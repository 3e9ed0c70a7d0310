//! The backend's ring path: listeners and connections on the [`driver`](crate::driver).
//!
//! - The runtime ([`block_on`]) is tokio's current-thread one with a `LocalSet`, plus the
//!   driver task: tokio timers, `spawn_local` and tokio's reactor work as on epoll.
//! - A listener keeps one multishot `ACCEPT` armed for its life (plain fds: `poll`-based peer
//!   checks, credentials, `getsockname` and `sendfile` need one, and direct descriptors
//!   measured no clear gain). The client's address comes from `getpeername`.
//! - A connection keeps one multishot `RECV` armed from the provided-buffer ring; the driver
//!   copies each completion's bytes into the operation's stash and gives the buffer back at
//!   once, and a read copies from the stash into the caller's spare capacity. So a
//!   dropped read loses nothing (the bytes wait in the stash, in order), and
//!   `try_read` never calls `recv(2)` itself: it takes the stash after a
//!   [`Driver::turn_now`], so bytes can never overtake bytes the ring already took.
//! - A write is one `SEND` whose `Vec` the operation's slot owns until the kernel is done
//!   with it: a dropped write frees nothing under the kernel.

use std::cell::RefCell;
use std::future::{poll_fn, Future};
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::task::Poll;

use io_uring::{opcode, types};
use wharf_core::backend::sys::{self, no_spare_capacity};
use wharf_core::conn::BufResult;
use wharf_core::peer::{peer_credentials, Peer};

use crate::driver::{Completion, CurrentGuard, Driver, Features, Op, OpKind};

/// Runs `fut` on a tokio current-thread runtime with a `LocalSet` and a ring driver (set up
/// with `features`), then drops what is still running and cancels what the kernel still has.
/// An error if the ring cannot be set up, or if the driver stops (the ring failed).
pub fn block_on<F: Future>(features: &Features, fut: F) -> io::Result<F::Output> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    let out = local.block_on(&rt, async {
        let driver = Driver::new(features)?;
        let _current = CurrentGuard::set(&driver);
        let mut run = tokio::task::spawn_local(driver.run());
        let fut = std::pin::pin!(fut);
        tokio::select! {
            biased;
            out = fut => Ok(out),
            r = &mut run => Err(io::Error::other(format!(
                "the io_uring driver stopped: {}",
                match r {
                    Ok(Err(e)) => e.to_string(),
                    Ok(Ok(())) => "ended".into(),
                    Err(e) => e.to_string(),
                }
            ))),
        }
    });
    // Connections still open are dropped with their tasks here (their operations are
    // cancelled); the driver goes with the last of them, cancelling what is left
    // synchronously before its memory is freed.
    drop(local);
    // Blocking-pool work (a hashing thread, a stuck file read) must not hold the exit.
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    out
}

/// What a listener listens on.
enum Kind {
    Tcp,
    Unix,
}

/// A listening socket whose accepts come from one multishot `ACCEPT`.
pub struct Listener {
    driver: Driver,
    socket: OwnedFd,
    kind: Kind,
    accepts: RefCell<Option<Op>>,
}

impl Listener {
    /// Adopts a bound, listening TCP socket (on this thread's ring runtime).
    pub fn tcp(socket: std::net::TcpListener) -> io::Result<Listener> {
        Self::adopt(socket.into(), Kind::Tcp)
    }

    /// Adopts a bound, listening Unix-domain stream socket.
    pub fn unix(socket: std::os::unix::net::UnixListener) -> io::Result<Listener> {
        Self::adopt(socket.into(), Kind::Unix)
    }

    fn adopt(socket: OwnedFd, kind: Kind) -> io::Result<Listener> {
        // The kernel waits for connections itself (poll-armed); a blocking listener keeps an
        // accept retried from io-wq from ever ending in EAGAIN.
        set_nonblocking(socket.as_raw_fd(), false)?;
        Ok(Listener {
            driver: Driver::current()?,
            socket,
            kind,
            accepts: RefCell::new(None),
        })
    }

    /// The next accept completion. The first look also runs a [`Driver::turn_now`], so a
    /// caller that does not wait (a drain with a zero timeout) still gets the connections
    /// already in the backlog.
    async fn next_accept(&self) -> io::Result<Completion> {
        let mut looked = false;
        poll_fn(|cx| loop {
            let mut accepts = self.accepts.borrow_mut();
            if accepts.as_ref().is_none_or(Op::is_finished) {
                if accepts.take().is_some() {
                    self.driver.count(|s| s.multishot_rearms += 1);
                }
                let sqe = opcode::AcceptMulti::new(types::Fd(self.socket.as_raw_fd()))
                    .flags(libc::SOCK_CLOEXEC)
                    .build();
                *accepts = Some(self.driver.start(OpKind::Accept, sqe, None)?);
            }
            let Some(op) = accepts.as_mut() else {
                continue;
            };
            if let Some(c) = op.try_next() {
                return Poll::Ready(Ok(c));
            }
            if op.is_finished() {
                continue;
            }
            if !looked {
                looked = true;
                drop(accepts);
                self.driver.turn_now()?;
                continue;
            }
            op.register(cx);
            return Poll::Pending;
        })
        .await
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        // Cancel the accept now rather than at the driver's next turn: until the kernel drops
        // it, it holds the socket open, and a TCP socket in a `SO_REUSEPORT` group would keep
        // being handed connections only to reset them.
        self.accepts.get_mut().take();
        if let Err(e) = self.driver.submit_now() {
            tracing::warn!("io_uring: cancelling a listener's accept: {e}");
        }
    }
}

impl wharf_core::backend::Listener for Listener {
    type Conn = Conn;

    /// Connections that fail before they are set up (reset at once) are skipped; running
    /// out of descriptors is returned (the worker backs off) and the next call re-arms.
    async fn accept(&self) -> io::Result<(Conn, Peer)> {
        loop {
            let c = self.next_accept().await?;
            if c.result < 0 {
                match -c.result {
                    libc::EINTR | libc::EAGAIN | libc::ECONNABORTED => continue,
                    e => return Err(io::Error::from_raw_os_error(e)),
                }
            }
            // SAFETY: the accept returned a new fd that nobody else owns.
            let socket = unsafe { OwnedFd::from_raw_fd(c.result) };
            let peer = match self.kind {
                Kind::Tcp => set_nodelay(&socket)
                    .and_then(|()| peer_addr(&socket))
                    .map(Peer::Ip),
                Kind::Unix => peer_credentials(socket.as_fd()).map(Peer::Unix),
            };
            // A client that reset before we looked: next.
            let Ok(peer) = peer else { continue };
            let conn = Conn {
                driver: self.driver.clone(),
                recv: None,
                tcp: matches!(self.kind, Kind::Tcp),
                socket,
            };
            return Ok((conn, peer));
        }
    }
}

fn set_nonblocking(fd: RawFd, on: bool) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor the caller owns.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    let want = if on {
        flags | libc::O_NONBLOCK
    } else {
        flags & !libc::O_NONBLOCK
    };
    // SAFETY: as above.
    if want != flags && unsafe { libc::fcntl(fd, libc::F_SETFL, want) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn set_nodelay(socket: &OwnedFd) -> io::Result<()> {
    socket2::SockRef::from(socket).set_nodelay(true)
}

fn peer_addr(socket: &OwnedFd) -> io::Result<SocketAddr> {
    socket2::SockRef::from(socket)
        .peer_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::other("the peer has no IP address"))
}

/// An accepted connection (TCP or Unix-domain) on the ring.
pub struct Conn {
    driver: Driver,
    /// The armed multishot receive, if any (with what it received and nobody read yet).
    recv: Option<Op>,
    tcp: bool,
    /// Declared last: closed after the receive's cancel is queued.
    socket: OwnedFd,
}

/// What a look at the receive found.
enum Ready {
    /// This many bytes moved into the caller's buffer, or end of stream (`0`), or an error.
    Done(io::Result<usize>),
    /// Nothing yet: wait for the receive's next completion.
    Wait,
}

impl Conn {
    /// The armed receive, armed now if it was not.
    fn armed(&mut self) -> io::Result<&mut Op> {
        let op = match self.recv.take() {
            Some(op) => op,
            None => {
                let sqe = opcode::RecvMulti::new(
                    types::Fd(self.socket.as_raw_fd()),
                    self.driver.buffer_group(),
                )
                .build();
                self.driver.start(OpKind::Recv, sqe, None)?
            }
        };
        Ok(self.recv.insert(op))
    }

    /// Takes what the receive has (bytes first, then its end), arming it if it is not armed;
    /// never waits.
    fn look(&mut self, buf: &mut Vec<u8>) -> Ready {
        loop {
            let op = match self.armed() {
                Ok(op) => op,
                Err(e) => return Ready::Done(Err(e)),
            };
            let n = op.take_bytes(buf);
            if n > 0 {
                return Ready::Done(Ok(n));
            }
            if let Some(c) = op.try_next() {
                match -c.result {
                    0 => return Ready::Done(Ok(0)),
                    // Ended without an error: out of provided buffers (they are back by now:
                    // every one is returned as it is reaped), paused because the stash was
                    // full (now empty), or interrupted. Re-armed below.
                    libc::ENOBUFS => self.driver.count(|s| s.enobufs += 1),
                    libc::ECANCELED | libc::EINTR | libc::EAGAIN => {}
                    e if e > 0 => return Ready::Done(Err(io::Error::from_raw_os_error(e))),
                    // A data completion is never queued (its bytes went to the stash).
                    _ => {}
                }
                continue;
            }
            if op.is_finished() {
                self.driver.count(|s| s.multishot_rearms += 1);
                self.recv = None;
                continue;
            }
            return Ready::Wait;
        }
    }

    /// Waits for the armed receive's next completion (after a look said `Wait`).
    fn register(&self, cx: &mut std::task::Context<'_>) {
        if let Some(op) = &self.recv {
            op.register(cx);
        } else {
            cx.waker().wake_by_ref();
        }
    }

    fn fd(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        // End the connection for the peer now: the cancelled receive holds a reference to
        // the socket until the kernel reports it cancelled.
        // SAFETY: the descriptor is still open (closed after this, by `socket`'s own Drop).
        unsafe { libc::shutdown(self.socket.as_raw_fd(), libc::SHUT_RDWR) };
        // The receive's own drop cancels it.
        self.recv = None;
    }
}

impl wharf_core::conn::Conn for Conn {
    async fn read(&mut self, mut buf: Vec<u8>) -> BufResult<usize> {
        if buf.len() == buf.capacity() {
            return (Err(no_spare_capacity()), buf);
        }
        let res = poll_fn(|cx| match self.look(&mut buf) {
            Ready::Done(res) => Poll::Ready(res),
            Ready::Wait => {
                self.register(cx);
                Poll::Pending
            }
        })
        .await;
        (res, buf)
    }

    async fn write(&mut self, buf: Vec<u8>, from: usize) -> BufResult<usize> {
        let mut buf = buf;
        loop {
            let Some(rest) = buf.len().checked_sub(from).filter(|&n| n > 0) else {
                return (Ok(0), buf);
            };
            let len = rest.min(u32::MAX as usize) as u32;
            // SAFETY (of the pointer): `buf` moves into the slot; its heap block does not move
            // and is freed only after the final completion.
            let ptr = unsafe { buf.as_ptr().add(from) };
            let sqe = opcode::Send::new(types::Fd(self.socket.as_raw_fd()), ptr, len)
                .flags(libc::MSG_NOSIGNAL)
                .build();
            let op = match self.driver.start(OpKind::Send, sqe, Some(buf)) {
                Ok(op) => op,
                Err(e) => return (Err(e), Vec::new()),
            };
            let (c, held) = op.completion().await;
            buf = held.unwrap_or_default();
            match c.result {
                r if r >= 0 => return (Ok(r as usize), buf),
                r if matches!(-r, libc::EINTR | libc::EAGAIN) => {}
                r => return (Err(io::Error::from_raw_os_error(-r)), buf),
            }
        }
    }

    fn try_read(&mut self, buf: &mut Vec<u8>) -> io::Result<Option<usize>> {
        if buf.len() == buf.capacity() {
            return Err(no_spare_capacity());
        }
        for first in [true, false] {
            match self.look(buf) {
                Ready::Done(res) => return res.map(Some),
                // What already arrived may still be in the kernel's queues: reap, look again.
                Ready::Wait if first => self.driver.turn_now()?,
                Ready::Wait => {}
            }
        }
        Ok(None)
    }

    /// Ready when the receive has bytes or its end for a read or `try_read`.
    /// Cancel-safe: it only registers interest in the armed receive.
    async fn readable(&mut self) -> io::Result<()> {
        poll_fn(|cx| {
            if self.recv.as_ref().is_some_and(Op::has_ready) {
                return Poll::Ready(Ok(()));
            }
            if self.recv.as_ref().is_some_and(Op::is_finished) {
                self.driver.count(|s| s.multishot_rearms += 1);
                self.recv = None;
            }
            self.armed()?.register(cx);
            Poll::Pending
        })
        .await
    }

    /// The TCP address connected to; `None` on a Unix socket.
    fn local_addr(&self) -> Option<SocketAddr> {
        if !self.tcp {
            return None;
        }
        sys::local_addr(self.fd())
    }

    fn peer_closed(&self) -> bool {
        sys::peer_closed(self.socket.as_raw_fd())
    }

    fn peer_finished_sending(&self) -> bool {
        sys::peer_finished_sending(self.socket.as_raw_fd())
    }

    /// `sendfile(2)` on the worker, waiting for writability through tokio's reactor: no
    /// thread per transfer (see BENCHMARKS.md, file-get).
    async fn send_file(&mut self, file: &std::fs::File, offset: u64, len: u64) -> io::Result<u64> {
        let fd = self.socket.as_fd();
        sys::sendfile_on_reactor(fd, file, offset, len).await
    }

    async fn shutdown(&mut self) -> io::Result<()> {
        socket2::SockRef::from(&self.socket).shutdown(std::net::Shutdown::Write)
    }
}
