//! Stopping: the process-wide stop signal and each worker's count of open connections.
//!
//! SIGTERM/SIGINT flips one [`ShutdownTrigger`]; every worker holds a [`Shutdown`] and stops its
//! accept loops at once. The worker then waits on its [`ConnTracker`] until its connections end
//! or the grace period runs out, whichever is first.

use std::cell::Cell;
use std::rc::Rc;
use std::time::Duration;

use tokio::sync::{watch, Notify};

/// Flips the stop signal for everyone holding a [`Shutdown`].
pub struct ShutdownTrigger(watch::Sender<bool>);

/// A cloneable, runtime-independent view of the stop signal.
#[derive(Clone)]
pub struct Shutdown(watch::Receiver<bool>);

/// A new signal pair.
pub fn channel() -> (ShutdownTrigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (ShutdownTrigger(tx), Shutdown(rx))
}

impl ShutdownTrigger {
    /// Tells every worker to stop accepting and drain.
    pub fn trigger(&self) {
        self.0.send_replace(true);
    }
}

impl Shutdown {
    /// Completes once shutdown has been triggered (or the trigger was dropped).
    pub async fn wait(&mut self) {
        let _ = self.0.wait_for(|stop| *stop).await;
    }

    /// Whether shutdown has been triggered.
    pub fn is_triggered(&self) -> bool {
        *self.0.borrow()
    }
}

/// Counts a worker's open connections so shutdown can wait for them.
#[derive(Clone, Default)]
pub struct ConnTracker(Rc<TrackerInner>);

#[derive(Default)]
struct TrackerInner {
    open: Cell<usize>,
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

    /// Waits until no connection is open, for at most `grace`. Returns whether all finished.
    pub async fn drain(&self, grace: Duration) -> bool {
        let all_closed = async {
            loop {
                let notified = self.0.idle.notified();
                if self.0.open.get() == 0 {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(grace, all_closed).await.is_ok()
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
