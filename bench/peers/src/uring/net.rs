//! TCP on the driver: a listener with multishot accept and connections with multishot
//! receive from the buffer ring, `SEND`, and direct descriptors, each falling back to the
//! one-shot or plain form the driver's [`Settings`](super::Settings) allow.
//!
//! The API is owned-buffer (like wharf's `Conn::read`): a receive appends to the caller's
//! `Vec`. With the buffer ring that is a copy out of the kernel-chosen buffer, after which the
//! buffer goes straight back to the ring; without it the kernel writes into the `Vec` itself
//! (held by the operation's slot until it completes, so a dropped receive is safe).

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::time::Duration;

use io_uring::{cqueue, opcode, squeue, types};

use super::{Completion, Driver, Op, OpKind};

/// A connection's socket: a direct descriptor (slot in the ring's file table) or an fd.
enum Socket {
    Direct(u32),
    Fd(OwnedFd),
}

/// Builds an SQE for either kind of descriptor.
macro_rules! on_socket {
    ($socket:expr, |$fd:ident| $build:expr) => {
        match $socket {
            Socket::Direct(slot) => {
                let $fd = types::Fixed(*slot);
                $build
            }
            Socket::Fd(fd) => {
                let $fd = types::Fd(fd.as_raw_fd());
                $build
            }
        }
    };
}

/// A listening socket whose accepts go through the ring.
pub struct Listener {
    driver: Driver,
    socket: OwnedFd,
    local: SocketAddr,
    accepts: Option<Op>,
}

impl Listener {
    /// Binds `addr` (SO_REUSEADDR + SO_REUSEPORT, backlog 1024, TCP_NODELAY, which accepted
    /// sockets inherit: a direct descriptor cannot be given socket options by fd).
    pub fn bind(driver: &Driver, addr: SocketAddr) -> io::Result<Listener> {
        let socket = crate::reuseport_listener(addr)?;
        // Set on the listener, inherited by accepted sockets: a direct descriptor cannot be
        // given socket options by fd.
        socket.set_nodelay(true)?;
        // The ring waits for the listener itself; a non-blocking one could make an accept
        // complete with EAGAIN instead of waiting.
        socket.set_nonblocking(false)?;
        let local = socket
            .local_addr()?
            .as_socket()
            .ok_or_else(|| io::Error::other("listener has no IP address"))?;
        // SAFETY: socket2 gives up ownership of the fd.
        let socket = unsafe { OwnedFd::from_raw_fd(socket.into_raw_fd()) };
        Ok(Listener {
            driver: driver.clone(),
            socket,
            local,
            accepts: None,
        })
    }

    /// The bound address (with the real port if 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The next connection. Transient errors (aborted handshakes, EINTR) are skipped; running
    /// out of descriptors waits 10 ms (a tokio timer) and re-arms; other errors are returned
    /// and the next call re-arms.
    pub async fn accept(&mut self) -> io::Result<Conn> {
        let direct = self.driver.settings().direct;
        loop {
            let c = if self.driver.settings().multishot_accept {
                let socket = self.socket.as_raw_fd();
                let arm = || {
                    // Direct descriptors are not in the fd table, so no CLOEXEC (the kernel
                    // refuses the flag with a file index).
                    opcode::AcceptMulti::new(types::Fd(socket))
                        .allocate_file_index(direct)
                        .flags(if direct { 0 } else { libc::SOCK_CLOEXEC })
                        .build()
                };
                let kind = OpKind::Accept { direct };
                match self
                    .driver
                    .next_multishot(&mut self.accepts, kind, arm)
                    .await?
                {
                    Some(c) => c,
                    None => continue,
                }
            } else {
                let mut sqe = opcode::Accept::new(
                    types::Fd(self.socket.as_raw_fd()),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                )
                .flags(if direct { 0 } else { libc::SOCK_CLOEXEC });
                if direct {
                    sqe = sqe.file_index(Some(types::DestinationSlot::auto_target()));
                }
                let op = self
                    .driver
                    .start(OpKind::Accept { direct }, sqe.build(), None)?;
                op.completion().await.0
            };
            match c.result {
                r if r >= 0 => {
                    let socket = if direct {
                        Socket::Direct(r as u32)
                    } else {
                        // SAFETY: the accept returned a new fd that nobody else owns.
                        Socket::Fd(unsafe { OwnedFd::from_raw_fd(r) })
                    };
                    return Ok(Conn {
                        driver: self.driver.clone(),
                        socket,
                        recv: None,
                    });
                }
                r if matches!(-r, libc::EINTR | libc::EAGAIN | libc::ECONNABORTED) => continue,
                r if matches!(
                    -r,
                    libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM
                ) =>
                {
                    eprintln!(
                        "uring: accept: {} (waiting 10 ms)",
                        io::Error::from_raw_os_error(-r)
                    );
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                r => return Err(io::Error::from_raw_os_error(-r)),
            }
        }
    }
}

/// An accepted connection. Dropping it cancels its receive and closes the socket (a `CLOSE`
/// on the ring for a direct descriptor).
pub struct Conn {
    driver: Driver,
    socket: Socket,
    /// The armed multishot receive, if any.
    recv: Option<Op>,
}

impl Conn {
    /// Receives at least one byte and appends what arrived to `buf`; `Ok(0)` is end of
    /// stream. Hands `buf` back in every case.
    pub async fn recv(&mut self, mut buf: Vec<u8>) -> (io::Result<usize>, Vec<u8>) {
        let settings = self.driver.settings().clone();
        if !settings.buffer_ring {
            // The kernel writes into `buf` itself; the slot owns it until the completion.
            let start = buf.len();
            buf.reserve(4096);
            let spare = buf.capacity() - start;
            // SAFETY (of the pointer): `buf` moves into the slot; its heap block does not move.
            let ptr = unsafe { buf.as_mut_ptr().add(start) };
            let sqe = on_socket!(&self.socket, |fd| opcode::Recv::new(fd, ptr, spare as u32)
                .build());
            let op = match self.driver.start(OpKind::Recv, sqe, Some(buf)) {
                Ok(op) => op,
                Err(e) => return (Err(e), Vec::new()),
            };
            let (c, held) = op.completion().await;
            let mut buf = held.unwrap_or_default();
            return match c.error() {
                Some(e) => (Err(e), buf),
                None => {
                    // SAFETY: the kernel wrote `result` bytes after `start`.
                    unsafe { buf.set_len(start + c.result as usize) };
                    (Ok(c.result as usize), buf)
                }
            };
        }
        loop {
            let c = if settings.multishot_recv {
                let group = self.driver.with_buffers(|b| b.group()).unwrap_or(0);
                let socket = &self.socket;
                let arm = || on_socket!(socket, |fd| opcode::RecvMulti::new(fd, group).build());
                match self
                    .driver
                    .next_multishot(&mut self.recv, OpKind::Recv, arm)
                    .await
                {
                    Ok(Some(c)) => c,
                    Ok(None) => continue,
                    Err(e) => return (Err(e), buf),
                }
            } else {
                let (group, size) = self
                    .driver
                    .with_buffers(|b| (b.group(), b.buf_size()))
                    .unwrap_or((0, 0));
                let sqe = on_socket!(&self.socket, |fd| opcode::Recv::new(
                    fd,
                    std::ptr::null_mut(),
                    size as u32
                )
                .buf_group(group)
                .build()
                .flags(squeue::Flags::BUFFER_SELECT));
                match self.driver.start(OpKind::Recv, sqe, None) {
                    Ok(op) => op.completion().await.0,
                    Err(e) => return (Err(e), buf),
                }
            };
            match self.take(c, &mut buf) {
                Taken::Bytes(n) => {
                    // Take whatever else already arrived, so one send answers it all.
                    let mut total = n;
                    while let Some(op) = self.recv.as_mut() {
                        match op.try_next() {
                            Some(c) if c.result > 0 => match self.take(c, &mut buf) {
                                Taken::Bytes(n) => total += n,
                                _ => break,
                            },
                            Some(c) => {
                                // Keep an end or error for the next call.
                                op.put_back(c);
                                break;
                            }
                            None => break,
                        }
                    }
                    return (Ok(total), buf);
                }
                Taken::Eof => return (Ok(0), buf),
                Taken::Retry => {
                    self.recv = None;
                    tokio::task::yield_now().await;
                }
                Taken::Error(e) => return (Err(e), buf),
            }
        }
    }

    fn take(&mut self, c: Completion, buf: &mut Vec<u8>) -> Taken {
        if c.result > 0 {
            let Some(bid) = cqueue::buffer_select(c.flags) else {
                return Taken::Error(io::Error::other("receive completed without a buffer"));
            };
            let n = c.result as usize;
            return match self
                .driver
                .with_buffers(|b| b.consume(bid, n, |bytes| buf.extend_from_slice(bytes)))
            {
                Some(Ok(())) => Taken::Bytes(n),
                Some(Err(e)) => Taken::Error(io::Error::other(format!("buffer ring: {e:?}"))),
                None => Taken::Error(io::Error::other("no buffer ring")),
            };
        }
        if let Some(bid) = cqueue::buffer_select(c.flags) {
            // A zero-length or failed receive should not carry a buffer; give it back if so.
            let _ = self.driver.with_buffers(|b| b.discard(bid));
        }
        match -c.result {
            0 => Taken::Eof,
            libc::ENOBUFS => {
                // Every buffer is out: the multishot receive ended. Let the tasks holding
                // buffers run (they give them back), then re-arm.
                self.driver.count(|s| s.enobufs += 1);
                Taken::Retry
            }
            libc::EINTR | libc::EAGAIN => Taken::Retry,
            e => Taken::Error(io::Error::from_raw_os_error(e)),
        }
    }

    /// Sends all of `buf` (SEND on the ring, resubmitted after a short send). Hands `buf`
    /// back in every case.
    pub async fn send_all(&mut self, buf: Vec<u8>) -> (io::Result<()>, Vec<u8>) {
        let mut buf = buf;
        let mut sent = 0usize;
        while sent < buf.len() {
            let len = (buf.len() - sent).min(u32::MAX as usize) as u32;
            // SAFETY (of the pointer): `buf` moves into the slot; its heap block does not move.
            let ptr = unsafe { buf.as_ptr().add(sent) };
            let sqe = on_socket!(&self.socket, |fd| opcode::Send::new(fd, ptr, len)
                .flags(libc::MSG_NOSIGNAL)
                .build());
            let op = match self.driver.start(OpKind::Send, sqe, Some(buf)) {
                Ok(op) => op,
                Err(e) => return (Err(e), Vec::new()),
            };
            let (c, held) = op.completion().await;
            buf = held.unwrap_or_default();
            match c.result {
                0 => return (Err(io::ErrorKind::WriteZero.into()), buf),
                r if r > 0 => sent += r as usize,
                r if matches!(-r, libc::EINTR | libc::EAGAIN) => {}
                r => return (Err(io::Error::from_raw_os_error(-r)), buf),
            }
        }
        (Ok(()), buf)
    }
}

enum Taken {
    Bytes(usize),
    Eof,
    Retry,
    Error(io::Error),
}

impl Drop for Conn {
    fn drop(&mut self) {
        // The receive's own drop cancels it first (same submission batch, in order).
        self.recv = None;
        if let Socket::Direct(slot) = self.socket {
            self.driver
                .fire_and_forget(opcode::Close::new(types::Fixed(slot)).build());
        }
        // An `Fd` closes itself; a cancelled receive holds its own file reference.
    }
}
