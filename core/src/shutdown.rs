//! Stopping: drain signals with a deadline, and each worker's count of open connections.
//!
//! A drain is one mechanism used at two scopes. The process-wide [`ShutdownTrigger`]
//! (SIGTERM/SIGINT) stops every accept loop; each service generation's own trigger (held by its
//! [`ServiceGate`](crate::gate::ServiceGate)) is pulled at shutdown and when a config reload
//! removes or replaces the service. Either way connections finish what they are doing (a
//! keep-alive connection closes between requests), and whatever is still open at the deadline,
//! `grace` after the trigger, is closed.

use std::cell::Cell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use tokio::sync::{watch, Notify};

/// Starts a drain for everyone holding the matching [`Shutdown`].
pub struct ShutdownTrigger(watch::Sender<Option<Instant>>);

/// A cloneable, runtime-independent view of a drain signal and its deadline.
#[derive(Clone)]
pub struct Shutdown(watch::Receiver<Option<Instant>>);

/// A new signal pair.
pub fn channel() -> (ShutdownTrigger, Shutdown) {
    let (tx, rx) = watch::channel(None);
    (ShutdownTrigger(tx), Shutdown(rx))
}

impl ShutdownTrigger {
    /// Starts the drain: no new work, and connections still open after `grace` are closed.
    /// Only the first call counts; a later one never extends or shortens the deadline.
    pub fn trigger(&self, grace: Duration) {
        let deadline = Instant::now() + grace;
        self.0.send_if_modified(|current| {
            let first = current.is_none();
            if first {
                *current = Some(deadline);
            }
            first
        });
    }

    /// Another receiver of this signal.
    pub fn subscribe(&self) -> Shutdown {
        Shutdown(self.0.subscribe())
    }
}

impl Shutdown {
    /// Completes once the drain has started (or the trigger was dropped).
    pub async fn wait(&mut self) {
        let _ = self.0.wait_for(Option::is_some).await;
    }

    /// Whether the drain has started.
    pub fn is_triggered(&self) -> bool {
        self.0.borrow().is_some()
    }

    /// Completes at the drain's deadline: time to close whatever is still open. A dropped
    /// trigger that never fired counts as a deadline now.
    pub async fn deadline(&mut self) {
        self.wait().await;
        let deadline = *self.0.borrow();
        if let Some(at) = deadline {
            tokio::time::sleep_until(at.into()).await;
        }
    }
}

/// Counts a worker's open connections so shutdown can wait for them.
#[derive(Clone, Default)]
pub struct ConnTracker(Rc<TrackerInner>);

#[derive(Default)]
struct TrackerInner {
    open: Cell<usize>,
    /// Connections closed by a drain deadline rather than ending on their own.
    cut: Cell<usize>,
    idle: Notify,
}

/// Held by a connection's task; dropping it marks the connection closed.
pub struct Tracked(Rc<TrackerInner>);

impl ConnTracker {
    /// Counts one more open connection until the returned guard drops.
    pub fn track(&self) -> Tracked {
        self.0.open.set(self.0.open.get() + 1);
        Tracked(Rc::clone(&self.0))
    }

    /// Open connections on this worker.
    pub fn open(&self) -> usize {
        self.0.open.get()
    }

    /// Connections closed so far because a drain deadline came before they ended.
    pub fn cut(&self) -> usize {
        self.0.cut.get()
    }

    /// Waits until no connection is open, or until `shutdown`'s deadline (plus a moment for the
    /// connections' own deadline handling to run). Returns whether all finished.
    pub async fn drain(&self, mut shutdown: Shutdown) -> bool {
        let all_closed = async {
            loop {
                let notified = self.0.idle.notified();
                if self.0.open.get() == 0 {
                    return;
                }
                notified.await;
            }
        };
        let deadline = async {
            shutdown.deadline().await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        tokio::select! {
            _ = all_closed => true,
            _ = deadline => self.0.open.get() == 0,
        }
    }
}

impl Tracked {
    /// Records that this connection is being closed by a drain deadline.
    pub fn cut(&self) {
        self.0.cut.set(self.0.cut.get() + 1);
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        let open = self.0.open.get() - 1;
        self.0.open.set(open);
        if open == 0 {
            self.0.idle.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_first_trigger_sets_the_deadline() {
        let (trigger, mut rx) = channel();
        assert!(!rx.is_triggered());
        let started = Instant::now();
        trigger.trigger(Duration::from_millis(200));
        trigger.trigger(Duration::from_secs(100));
        assert!(rx.is_triggered());
        rx.deadline().await;
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(200) && waited < Duration::from_secs(50),
            "{waited:?}"
        );
    }

    #[tokio::test]
    async fn a_dropped_trigger_ends_the_wait() {
        let (trigger, mut rx) = channel();
        drop(trigger);
        rx.wait().await;
        rx.deadline().await;
    }
}
