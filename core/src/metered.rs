//! The connection wrapper every plugin actually talks to.
//!
//! [`Metered`] sits between a backend's connection and the plugin, so byte counting and the
//! idle timeout are one mechanism for every plugin and backend. Bytes are counted as each
//! operation completes (a long transfer shows up in `rate()` while it runs), with handles
//! registered once per service.
//!
//! The idle timer is armed lazily: one `Sleep` per connection, reset only when it fires early
//! (its deadline is then moved to `start of the pending operation + idle_timeout`). Operations
//! themselves only read the clock, so the timeout costs no timer-wheel work per read or write.

use std::fs::File;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use tokio::time::{Instant, Sleep};

use crate::conn::{BufResult, Conn};
use crate::gate::Ticket;
use crate::shutdown::Shutdown;

/// Largest piece of a file sent (and counted) at once.
const SEND_FILE_WINDOW: u64 = 1024 * 1024;

/// A connection counted into its service's metrics and bounded by its idle timeout.
pub struct Metered<C> {
    inner: C,
    ticket: Ticket,
    idle: Option<IdleTimer>,
    /// The stop signal, for [`Conn::read_idle`].
    shutdown: Shutdown,
}

struct IdleTimer {
    timeout: Duration,
    sleep: Pin<Box<Sleep>>,
}

impl IdleTimer {
    /// Runs `op`, failing with `TimedOut` if it makes no progress for `timeout`.
    async fn bound<T>(&mut self, op: impl Future<Output = BufResult<T>>) -> BufResult<T> {
        let deadline = Instant::now() + self.timeout;
        let mut op = std::pin::pin!(op);
        std::future::poll_fn(|cx| {
            if let Poll::Ready(out) = op.as_mut().poll(cx) {
                return Poll::Ready(out);
            }
            while self.sleep.as_mut().poll(cx).is_ready() {
                if Instant::now() >= deadline {
                    let err = io::Error::new(io::ErrorKind::TimedOut, "idle timeout");
                    return Poll::Ready((Err(err), Vec::new()));
                }
                self.sleep.as_mut().reset(deadline);
            }
            Poll::Pending
        })
        .await
    }
}

impl<C: Conn> Metered<C> {
    pub(crate) fn new(
        inner: C,
        ticket: Ticket,
        idle_timeout: Option<Duration>,
        shutdown: Shutdown,
    ) -> Self {
        let idle = idle_timeout.map(|timeout| IdleTimer {
            timeout,
            sleep: Box::pin(tokio::time::sleep(timeout)),
        });
        Metered {
            inner,
            ticket,
            idle,
            shutdown,
        }
    }
}

/// A counted, idle-bounded read; a free function over the fields it needs, so
/// [`Conn::read_idle`] can race it against the (separately borrowed) stop signal.
async fn counted_read<C: Conn>(
    inner: &mut C,
    idle: &mut Option<IdleTimer>,
    ticket: &Ticket,
    buf: Vec<u8>,
) -> BufResult<usize> {
    let (res, buf) = match idle {
        Some(idle) => idle.bound(inner.read(buf)).await,
        None => inner.read(buf).await,
    };
    if let Ok(n) = res {
        ticket.gate().metrics.received.increment(n as u64);
    }
    (res, buf)
}

impl<C: Conn> Metered<C> {
    /// A read between requests once the process is stopping (no read of ours is pending): a request
    /// the client already sent is still served; a silent connection ends now, like a client
    /// that closed.
    fn drain_read(&mut self, mut buf: Vec<u8>) -> BufResult<usize> {
        if buf.capacity() == buf.len() {
            buf.reserve(crate::buffer::IDLE);
        }
        match self.try_read(&mut buf) {
            Ok(Some(n)) => (Ok(n), buf),
            Ok(None) => (Ok(0), buf),
            Err(e) => (Err(e), buf),
        }
    }
}

impl<C: Conn> Conn for Metered<C> {
    async fn read(&mut self, buf: Vec<u8>) -> BufResult<usize> {
        counted_read(&mut self.inner, &mut self.idle, &self.ticket, buf).await
    }

    async fn read_idle(&mut self, buf: Vec<u8>) -> BufResult<usize> {
        // Only a shutdown (a drain with a deadline) ends idle connections: a reload retiring
        // this generation leaves its established sessions working until they end or idle out.
        if self.shutdown.is_stopping() {
            return self.drain_read(buf);
        }
        let read = counted_read(&mut self.inner, &mut self.idle, &self.ticket, buf);
        tokio::select! {
            biased;
            done = read => done,
            // Stopping while nothing has arrived: end the connection like a client that
            // closed. No second read here: on io_uring the dropped read may still be armed in
            // the kernel and would take whatever arrives next.
            _ = self.shutdown.stopping() => (Ok(0), Vec::new()),
        }
    }

    async fn write(&mut self, buf: Vec<u8>, from: usize) -> BufResult<usize> {
        let (res, buf) = match &mut self.idle {
            Some(idle) => idle.bound(self.inner.write(buf, from)).await,
            None => self.inner.write(buf, from).await,
        };
        if let Ok(n) = res {
            self.ticket.gate().metrics.sent.increment(n as u64);
        }
        (res, buf)
    }

    async fn send_file(&mut self, file: &File, offset: u64, len: u64) -> io::Result<u64> {
        // In windows, so a long transfer is counted as it moves and the idle timeout sees
        // progress.
        let mut sent = 0;
        while sent < len {
            let window = (len - sent).min(SEND_FILE_WINDOW);
            let res = match &mut self.idle {
                Some(idle) => {
                    let op = async {
                        let res = self.inner.send_file(file, offset + sent, window).await;
                        (res, Vec::new())
                    };
                    idle.bound(op).await.0
                }
                None => self.inner.send_file(file, offset + sent, window).await,
            };
            let n = res?;
            self.ticket.gate().metrics.sent.increment(n);
            sent += n;
            if n < window {
                break;
            }
        }
        Ok(sent)
    }

    fn try_read(&mut self, buf: &mut Vec<u8>) -> io::Result<Option<usize>> {
        let res = self.inner.try_read(buf);
        if let Ok(Some(n)) = res {
            self.ticket.gate().metrics.received.increment(n as u64);
        }
        res
    }

    fn peer_closed(&self) -> bool {
        self.inner.peer_closed()
    }

    fn peer_finished_sending(&self) -> bool {
        self.inner.peer_finished_sending()
    }

    async fn blocking<R: Send + 'static>(
        &self,
        job: impl FnOnce() -> R + Send + 'static,
    ) -> io::Result<R> {
        if self.peer_closed() {
            return Err(crate::conn::peer_reset());
        }
        self.ticket.gate().blocking().run(job).await
    }

    async fn shutdown(&mut self) -> io::Result<()> {
        self.inner.shutdown().await
    }

    fn peer_addr(&self) -> SocketAddr {
        self.inner.peer_addr()
    }

    fn record_request(&self, outcome: &'static str, elapsed: Duration) {
        self.ticket.gate().record_request(outcome, elapsed);
    }
}
