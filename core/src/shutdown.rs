//! Stopping: drain signals with an optional deadline, and each worker's count of open
//! connections.
//!
//! A drain is one mechanism used at two scopes. The process-wide [`ShutdownTrigger`]
//! (SIGTERM/SIGINT) stops every accept loop; each service generation's own trigger (held by its
//! [`ServiceGate`](crate::gate::ServiceGate)) is pulled when a config reload removes or replaces
//! the service, and at shutdown. A reload drains without a deadline: the old generation's
//! connections, idle sessions included, keep working under its settings until they end on
//! their own (or by their idle timeout). A shutdown sets one, `grace` from now: connections
//! finish what they are doing, those idle between requests end at once
//! ([`Shutdown::stopping`], used by [`Context::read_idle`](crate::Context::read_idle)), and whatever
//! is still open at the deadline is closed; a deadline can only be brought forward, never
//! pushed back.

use std::cell::Cell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use tokio::sync::{watch, Notify};

/// The state a drain signal carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Drain {
    /// Serving normally.
    Running,
    /// Draining; open connections are closed at the deadline, if there is one.
    Draining(Option<Instant>),
}

/// Starts a drain for everyone holding the matching [`Shutdown`].
pub struct ShutdownTrigger(watch::Sender<Drain>);

/// A cloneable, runtime-independent view of a drain signal and its deadline.
#[derive(Clone)]
pub struct Shutdown(watch::Receiver<Drain>);

/// A new signal pair.
pub fn channel() -> (ShutdownTrigger, Shutdown) {
    let (tx, rx) = watch::channel(Drain::Running);
    (ShutdownTrigger(tx), Shutdown(rx))
}

impl ShutdownTrigger {
    /// Starts the drain (if not started yet) with connections still open after `grace` closed;
    /// an earlier deadline set before stands.
    pub fn trigger(&self, grace: Duration) {
        let deadline = Instant::now() + grace;
        self.0.send_if_modified(|state| {
            let sooner = match *state {
                Drain::Running | Drain::Draining(None) => true,
                Drain::Draining(Some(at)) => deadline < at,
            };
            if sooner {
                *state = Drain::Draining(Some(deadline));
            }
            sooner
        });
    }

    /// Starts the drain without a deadline: connections end on their own.
    pub fn trigger_without_deadline(&self) {
        self.0.send_if_modified(|state| {
            let first = *state == Drain::Running;
            if first {
                *state = Drain::Draining(None);
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
        let _ = self.0.wait_for(|s| *s != Drain::Running).await;
    }

    /// Whether the drain has started.
    pub fn is_triggered(&self) -> bool {
        *self.0.borrow() != Drain::Running
    }

    /// Whether the drain has a deadline: the process is stopping (a reload's drain has none
    /// until a shutdown sets one).
    pub fn is_stopping(&self) -> bool {
        matches!(*self.0.borrow(), Drain::Draining(Some(_)))
    }

    /// Completes once the drain has a deadline (the process is stopping), or the trigger was
    /// dropped. A reload retiring a generation does not complete it: its established
    /// connections go on until they end or idle out.
    pub async fn stopping(&mut self) {
        let _ = self
            .0
            .wait_for(|s| matches!(s, Drain::Draining(Some(_))))
            .await;
    }

    /// Completes at the drain's deadline: time to close whatever is still open. Follows a
    /// deadline set or brought forward while waiting. A dropped trigger that never set one
    /// counts as a deadline now.
    pub async fn deadline(&mut self) {
        loop {
            let state = *self.0.borrow_and_update();
            match state {
                Drain::Draining(Some(at)) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(at.into()) => return,
                        changed = self.0.changed() => if changed.is_err() { return },
                    }
                }
                Drain::Running | Drain::Draining(None) => {
                    if self.0.changed().await.is_err() {
                        return;
                    }
                }
            }
        }
    }
}

/// Counts a worker's open connections so shutdown can wait for them.
#[derive(Clone, Default)]
pub(crate) struct ConnTracker(Rc<TrackerInner>);

#[derive(Default)]
struct TrackerInner {
    open: Cell<usize>,
    /// Connections closed by a drain deadline rather than ending on their own.
    cut: Cell<usize>,
    idle: Notify,
}

/// Held by a connection's task; dropping it marks the connection closed.
pub(crate) struct Tracked(Rc<TrackerInner>);

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

    /// Records `n` connections being closed by a drain deadline.
    pub fn record_cut(&self, n: usize) {
        self.0.cut.set(self.0.cut.get() + n);
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
    async fn the_earliest_deadline_stands() {
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
    async fn a_drain_without_deadline_gets_one_at_shutdown() {
        let (trigger, mut rx) = channel();
        trigger.trigger_without_deadline();
        assert!(rx.is_triggered());
        let mut early = rx.clone();
        let waiting = tokio::time::timeout(Duration::from_millis(100), early.deadline());
        assert!(waiting.await.is_err(), "no deadline yet");
        let started = Instant::now();
        let deadline = tokio::spawn(async move { rx.deadline().await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        trigger.trigger(Duration::from_secs(60));
        trigger.trigger(Duration::from_millis(100));
        trigger.trigger(Duration::from_secs(60));
        deadline.await.unwrap();
        let waited = started.elapsed();
        assert!(
            waited < Duration::from_secs(30),
            "brought forward: {waited:?}"
        );
    }

    #[tokio::test]
    async fn only_a_deadline_means_stopping() {
        let (trigger, rx) = channel();
        trigger.trigger_without_deadline();
        assert!(rx.is_triggered() && !rx.is_stopping());
        let mut early = rx.clone();
        let waiting = tokio::time::timeout(Duration::from_millis(50), early.stopping());
        assert!(waiting.await.is_err(), "a reload's drain is not a stop");
        let mut later = rx.clone();
        let stopping = tokio::spawn(async move { later.stopping().await });
        trigger.trigger(Duration::from_secs(60));
        stopping.await.unwrap();
        assert!(rx.is_stopping());
    }

    #[tokio::test]
    async fn a_dropped_trigger_ends_the_wait() {
        let (trigger, mut rx) = channel();
        drop(trigger);
        rx.wait().await;
        rx.deadline().await;
    }
}
