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
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use tokio::time::{Instant, Sleep};

use crate::conn::{BufResult, Conn};
use crate::metrics::ServiceMetrics;

/// Largest piece of a file sent (and counted) at once.
const SEND_FILE_WINDOW: u64 = 1024 * 1024;

/// A connection counted into its service's metrics and bounded by its idle timeout.
pub struct Metered<C> {
    inner: C,
    /// The service generation's handles; only the byte counters are used here.
    metrics: Arc<ServiceMetrics>,
    idle: Option<IdleTimer>,
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
        });
        Metered {
            inner,
            metrics,
            idle,
        }
    }
}

impl<C: Conn> Conn for Metered<C> {
    async fn read(&mut self, buf: Vec<u8>) -> BufResult<usize> {
        let (res, buf) = match &mut self.idle {
            Some(idle) => idle.bound(self.inner.read(buf)).await,
            None => self.inner.read(buf).await,
        };
        if let Ok(n) = res {
            self.metrics.received.increment(n as u64);
        }
        (res, buf)
    }

    async fn write(&mut self, buf: Vec<u8>, from: usize) -> BufResult<usize> {
        let (res, buf) = match &mut self.idle {
            Some(idle) => idle.bound(self.inner.write(buf, from)).await,
            None => self.inner.write(buf, from).await,
        };
        if let Ok(n) = res {
            self.metrics.sent.increment(n as u64);
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
            self.metrics.sent.increment(n);
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
            self.metrics.received.increment(n as u64);
        }
        res
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
