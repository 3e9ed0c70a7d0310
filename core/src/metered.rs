//! The transport wrapper every plugin actually talks to.
//!
//! [`Metered`] sits between a backend's connection and the plugin, so byte counting and the
//! idle timeout are one mechanism for every plugin and backend. It is transport only: the
//! drain signal and request metrics are the connection's [`Context`](crate::Context). Bytes are counted as each
//! operation completes (a long transfer shows up in `rate()` while it runs), with handles
//! registered once per service.
//!
//! The idle timer is armed lazily: one `Sleep` per connection, reset only when it fires early
//! (its deadline is then moved to `start of the pending operation + idle_timeout`). Operations
//! themselves only read the clock, so the timeout costs no timer-wheel work per read or write.

use std::fs::File;
use std::future::Future;
use std::io;
use std::os::fd::BorrowedFd;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

use crate::access_log::ConnBytes;
use crate::conn::{BufResult, Conn, Spliced};
use crate::metrics::ServiceMetrics;

/// Largest piece of a file sent (and counted) at once.
const SEND_FILE_WINDOW: u64 = 1024 * 1024;

/// A connection counted into its service's metrics and bounded by its idle timeout.
pub struct Metered<C> {
    inner: C,
    /// The service generation's handles; only the byte counters are used here.
    metrics: Arc<ServiceMetrics>,
    idle: Option<IdleTimer>,
    /// Bytes read ahead of the plugin (past the end of a PROXY header) and handed back with
    /// [`Metered::unread`]: the next reads return them first. Empty (no allocation) otherwise.
    unread: Vec<u8>,
    /// How much of `unread` has been returned.
    unread_from: usize,
    /// This connection's own byte counts, for its access log line (only when the service
    /// logs): two plain adds per operation.
    bytes: Option<Rc<ConnBytes>>,
}

struct IdleTimer {
    timeout: Duration,
    sleep: Pin<Box<Sleep>>,
    /// The waker the sleep last registered: while it is still this task's and the sleep has
    /// not fired, a pending operation need not poll the sleep again.
    registered: Option<Waker>,
}

impl IdleTimer {
    /// Runs `op`, failing it with `TimedOut` once it has been pending for the timeout. A plain
    /// `poll_fn`, not an `async fn`: one state machine less on every read and write.
    fn bound<'a, T, F: Future<Output = BufResult<T>>>(
        &'a mut self,
        mut op: Pin<&'a mut F>,
    ) -> impl Future<Output = BufResult<T>> + 'a {
        // Read the clock only for an operation that has to wait (most writes never do).
        let mut deadline = None;
        std::future::poll_fn(move |cx| {
            if let Poll::Ready(out) = op.as_mut().poll(cx) {
                return Poll::Ready(out);
            }
            let deadline = *deadline.get_or_insert_with(|| Instant::now() + self.timeout);
            // The sleep is re-armed lazily: it fires at some earlier operation's deadline, and
            // only then is the current operation's deadline checked and the sleep moved to it.
            // Until it fires, it will wake this task anyway, so most pending operations skip
            // polling it (a waker registration each time).
            let registered = self
                .registered
                .as_ref()
                .is_some_and(|w| w.will_wake(cx.waker()));
            if registered && !self.sleep.is_elapsed() {
                return Poll::Pending;
            }
            // Outside tokio's cooperative budget: a budget-exhausted poll would return
            // `Pending` without arming the timer, and the check above would then skip it for
            // good (a client could switch its own idle timeout off).
            while std::pin::pin!(tokio::task::coop::unconstrained(self.sleep.as_mut()))
                .poll(cx)
                .is_ready()
            {
                if Instant::now() >= deadline {
                    let err = io::Error::new(io::ErrorKind::TimedOut, "idle timeout");
                    return Poll::Ready((Err(err), Vec::new()));
                }
                self.sleep.as_mut().reset(deadline);
            }
            if !registered {
                self.registered = Some(cx.waker().clone());
            }
            Poll::Pending
        })
    }
}

impl<C: Conn> Metered<C> {
    /// Wraps `inner`, counting its bytes into `metrics` and failing an operation that makes
    /// no progress for `idle_timeout` (if any) with `TimedOut`.
    pub(crate) fn new(
        inner: C,
        metrics: Arc<ServiceMetrics>,
        idle_timeout: Option<Duration>,
    ) -> Self {
        let idle = idle_timeout.map(|timeout| IdleTimer {
            timeout,
            sleep: Box::pin(tokio::time::sleep(timeout)),
            registered: None,
        });
        Metered {
            inner,
            metrics,
            idle,
            unread: Vec::new(),
            unread_from: 0,
            bytes: None,
        }
    }

    /// Also counts this connection's bytes into `bytes` (for its access log line).
    pub(crate) fn count_into(&mut self, bytes: Rc<ConnBytes>) {
        self.bytes = Some(bytes);
    }

    fn count_received(&self, n: u64) {
        self.metrics.received.increment(n);
        if let Some(b) = &self.bytes {
            b.received.set(b.received.get() + n);
        }
    }

    fn count_sent(&self, n: u64) {
        self.metrics.sent.increment(n);
        if let Some(b) = &self.bytes {
            b.sent.set(b.sent.get() + n);
        }
    }

    /// Hands `bytes` back: the next reads return them before anything else from the peer.
    /// They were counted when first read and are not counted again. For the framework's
    /// readers that run before the plugin (the PROXY protocol header) and may read past
    /// their end; any bytes still unread from an earlier call come after `bytes`.
    pub(crate) fn unread(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        let rest = self.unread.split_off(self.unread_from);
        self.unread.clear();
        self.unread.extend_from_slice(bytes);
        self.unread.extend_from_slice(&rest);
        self.unread_from = 0;
    }

    /// Whether handed-back bytes are still waiting (`unread` is emptied once all are taken).
    fn has_unread(&self) -> bool {
        !self.unread.is_empty()
    }

    /// Moves handed-back bytes into `buf`'s spare capacity; `None` when there are none.
    fn take_unread(&mut self, buf: &mut Vec<u8>) -> Option<usize> {
        if !self.has_unread() {
            return None;
        }
        let n = (buf.capacity() - buf.len()).min(self.unread.len() - self.unread_from);
        buf.extend_from_slice(&self.unread[self.unread_from..self.unread_from + n]);
        self.unread_from += n;
        if self.unread_from == self.unread.len() {
            self.unread = Vec::new();
            self.unread_from = 0;
        }
        Some(n)
    }
}

impl<C: Conn> Conn for Metered<C> {
    async fn read(&mut self, mut buf: Vec<u8>) -> BufResult<usize> {
        if buf.capacity() > buf.len() {
            if let Some(n) = self.take_unread(&mut buf) {
                return (Ok(n), buf);
            }
        }
        let (res, buf) = match &mut self.idle {
            Some(idle) => idle.bound(std::pin::pin!(self.inner.read(buf))).await,
            None => self.inner.read(buf).await,
        };
        if let Ok(n) = res {
            self.count_received(n as u64);
        }
        (res, buf)
    }

    async fn write(&mut self, buf: Vec<u8>, from: usize) -> BufResult<usize> {
        let (res, buf) = match &mut self.idle {
            Some(idle) => {
                idle.bound(std::pin::pin!(self.inner.write(buf, from)))
                    .await
            }
            None => self.inner.write(buf, from).await,
        };
        if let Ok(n) = res {
            self.count_sent(n as u64);
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
                    idle.bound(std::pin::pin!(op)).await.0
                }
                None => self.inner.send_file(file, offset + sent, window).await,
            };
            let n = res?;
            self.count_sent(n);
            sent += n;
            if n < window {
                break;
            }
        }
        Ok(sent)
    }

    fn try_read(&mut self, buf: &mut Vec<u8>) -> io::Result<Option<usize>> {
        if buf.capacity() > buf.len() {
            if let Some(n) = self.take_unread(buf) {
                return Ok(Some(n));
            }
        }
        let res = self.inner.try_read(buf);
        if let Ok(Some(n)) = res {
            self.count_received(n as u64);
        }
        res
    }

    /// Bounded by the idle timeout like a read: a wait that sees nothing for `idle_timeout`
    /// fails with `TimedOut`. Handed-back bytes are ready at once.
    async fn readable(&mut self) -> io::Result<()> {
        if self.has_unread() {
            return Ok(());
        }
        match &mut self.idle {
            Some(idle) => {
                let op = async { (self.inner.readable().await, Vec::new()) };
                idle.bound(std::pin::pin!(op)).await.0
            }
            None => self.inner.readable().await,
        }
    }

    /// Bounded by the idle timeout like a write.
    async fn writable(&mut self) -> io::Result<()> {
        match &mut self.idle {
            Some(idle) => {
                let op = async { (self.inner.writable().await, Vec::new()) };
                idle.bound(std::pin::pin!(op)).await.0
            }
            None => self.inner.writable().await,
        }
    }

    /// Not while handed-back bytes wait: they must reach the plugin first, through reads.
    fn can_splice(&self) -> bool {
        !self.has_unread() && self.inner.can_splice()
    }

    fn try_splice_to_pipe(&mut self, pipe: BorrowedFd<'_>, len: usize) -> io::Result<Spliced> {
        if self.has_unread() {
            return Err(io::ErrorKind::Unsupported.into());
        }
        let res = self.inner.try_splice_to_pipe(pipe, len);
        if let Ok(Spliced::Moved(n)) = res {
            self.count_received(n as u64);
        }
        res
    }

    fn try_splice_from_pipe(&mut self, pipe: BorrowedFd<'_>, len: usize) -> io::Result<Spliced> {
        let res = self.inner.try_splice_from_pipe(pipe, len);
        if let Ok(Spliced::Moved(n)) = res {
            self.count_sent(n as u64);
        }
        res
    }

    fn local_addr(&self) -> Option<std::net::SocketAddr> {
        self.inner.local_addr()
    }

    fn peer_closed(&self) -> bool {
        self.inner.peer_closed()
    }

    fn peer_finished_sending(&self) -> bool {
        self.inner.peer_finished_sending()
    }

    async fn shutdown(&mut self) -> io::Result<()> {
        self.inner.shutdown().await
    }
}

/// A metered in-memory pipe on a paused clock, for this module's tests and those of the
/// framework's readers that run before the plugin ([`crate::proxy`]).
#[cfg(test)]
pub(crate) fn paused_pipe(
    idle_timeout: Duration,
    test: impl AsyncFnOnce(Metered<crate::testing::MemConn>, crate::testing::Client),
) {
    let labels = crate::metrics::ServiceLabels {
        service: "t".into(),
        plugin: "echo".into(),
        backend: "test".into(),
    };
    let metrics = Arc::new(ServiceMetrics::register(&labels, &[], false));
    // The clock only moves when everything is waiting.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    tokio::task::LocalSet::new().block_on(&rt, async {
        let (conn, client) = crate::testing::pipe();
        test(Metered::new(conn, metrics, Some(idle_timeout)), client).await;
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{Client, MemConn};

    const TIMEOUT: Duration = Duration::from_secs(10);

    fn paused(test: impl AsyncFnOnce(Metered<MemConn>, Client)) {
        paused_pipe(TIMEOUT, test);
    }

    async fn read(conn: &mut Metered<MemConn>) -> io::Result<usize> {
        conn.read(Vec::with_capacity(64)).await.0
    }

    /// A read that gets nothing fails with `TimedOut` once the timeout has passed from its start.
    async fn times_out_after_the_timeout(conn: &mut Metered<MemConn>) {
        let started = Instant::now();
        let err = read(conn).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        let waited = started.elapsed();
        assert!(
            waited >= TIMEOUT && waited < TIMEOUT + Duration::from_secs(1),
            "{waited:?}"
        );
    }

    #[test]
    fn unread_bytes_come_back_first_in_pieces_then_the_peer_s() {
        paused(async |mut conn, client| {
            client.write_all(b"peer").await.unwrap();
            conn.unread(b"abcdef");
            let (res, buf) = conn.read(Vec::with_capacity(4)).await;
            assert_eq!((res.unwrap(), &buf[..]), (4, &b"abcd"[..]));
            let mut buf = Vec::with_capacity(64);
            assert_eq!(conn.try_read(&mut buf).unwrap(), Some(2));
            assert_eq!(&buf[..], b"ef");
            let (res, buf) = conn.read(buf).await;
            assert_eq!((res.unwrap(), &buf[..]), (4, &b"efpeer"[..]));
        });
    }

    #[test]
    fn a_read_waiting_longer_than_the_timeout_fails() {
        paused(async |mut conn, _client| {
            times_out_after_the_timeout(&mut conn).await;
        });
    }

    #[test]
    fn progress_before_each_deadline_keeps_the_connection() {
        paused(async |mut conn, client| {
            let talk = async {
                for _ in 0..4 {
                    tokio::time::sleep(TIMEOUT * 6 / 10).await;
                    client.write_all(b"x").await.unwrap();
                }
            };
            let serve = async {
                for _ in 0..4 {
                    assert_eq!(read(&mut conn).await.unwrap(), 1);
                }
            };
            tokio::join!(talk, serve);
        });
    }

    /// The deadline runs from the start of the operation that waits, not from the last one: a
    /// connection with no operation in flight (the plugin was busy) is not idle.
    #[test]
    fn time_without_an_operation_in_flight_does_not_count() {
        paused(async |mut conn, client| {
            tokio::time::sleep(TIMEOUT * 3).await;
            let talk = async {
                tokio::time::sleep(TIMEOUT / 2).await;
                client.write_all(b"late").await.unwrap();
            };
            let (res, ()) = tokio::join!(read(&mut conn), talk);
            assert_eq!(res.unwrap(), 4);

            tokio::time::sleep(TIMEOUT * 2).await;
            times_out_after_the_timeout(&mut conn).await;
        });
    }
}
