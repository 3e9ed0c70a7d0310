//! The memory an exec service's results may hold, all connections together.
//!
//! A finished result waits in memory until its client acknowledges the size line, and a client
//! that never does holds it until its idle timeout: without a shared bound, `max_output` x
//! connections could pin gigabytes. Each command reserves its worst case (`max_output`) from
//! the service's [`Budget`] (`max_pending_output`) before it runs, shrinks the reservation to
//! the real size of its result when it finishes, and gives it back when the result has been
//! sent or the connection ends. A command that finds the budget spent waits, up to its
//! timeout, like one waiting for a `max_concurrent` slot.
//!
//! Not first-come-first-served on purpose: a small reservation goes ahead of a large one that
//! does not fit yet (tokio's semaphore is fair, so one waiting large command would hold up
//! every small one behind it).

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;

/// A pool of bytes shared by one service's connections.
pub struct Budget {
    available: Mutex<u64>,
    returned: Notify,
}

impl Budget {
    /// A pool of `bytes`.
    pub fn new(bytes: u64) -> Arc<Self> {
        Arc::new(Budget {
            available: Mutex::new(bytes),
            returned: Notify::new(),
        })
    }

    /// Takes `bytes` now if they are available.
    pub fn try_reserve(self: &Arc<Self>, bytes: u64) -> Option<Reservation> {
        let mut available = self
            .available
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        (*available >= bytes).then(|| {
            *available -= bytes;
            Reservation {
                budget: Arc::clone(self),
                bytes,
            }
        })
    }

    /// Waits up to `limit` for `bytes`; `None` if they never became available.
    pub async fn reserve(self: &Arc<Self>, bytes: u64, limit: Duration) -> Option<Reservation> {
        tokio::time::timeout(limit, async {
            loop {
                // Registered before the check, so a release in between is not missed.
                let returned = self.returned.notified();
                if let Some(r) = self.try_reserve(bytes) {
                    return r;
                }
                returned.await;
            }
        })
        .await
        .ok()
    }

    /// Bytes not reserved now.
    pub fn available(&self) -> u64 {
        *self
            .available
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn give_back(&self, bytes: u64) {
        if bytes == 0 {
            return;
        }
        *self
            .available
            .lock()
            .unwrap_or_else(PoisonError::into_inner) += bytes;
        self.returned.notify_waiters();
    }
}

/// Bytes taken from a [`Budget`], returned when dropped.
pub struct Reservation {
    budget: Arc<Budget>,
    bytes: u64,
}

impl Reservation {
    /// Keeps only `bytes` of the reservation (no-op if it holds less), returning the rest.
    pub fn shrink_to(&mut self, bytes: u64) {
        if bytes < self.bytes {
            self.budget.give_back(self.bytes - bytes);
            self.bytes = bytes;
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.give_back(self.bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reservations_shrink_return_and_let_small_ones_pass_a_large_waiter() {
        let budget = Budget::new(100);
        let mut a = budget.try_reserve(80).unwrap();
        assert!(budget.try_reserve(30).is_none());
        // A large waiter that cannot fit yet...
        let big = {
            let budget = Arc::clone(&budget);
            tokio::spawn(async move { budget.reserve(90, Duration::from_secs(30)).await })
        };
        tokio::task::yield_now().await;
        // ...does not hold up a small one that fits.
        let small = budget.reserve(20, Duration::from_millis(10)).await.unwrap();
        a.shrink_to(10);
        assert_eq!(budget.available(), 70);
        drop(small);
        drop(a);
        let big = big
            .await
            .unwrap()
            .expect("fits once the others are returned");
        assert_eq!(budget.available(), 10);
        assert!(budget
            .reserve(20, Duration::from_millis(20))
            .await
            .is_none());
        drop(big);
        assert_eq!(budget.available(), 100);
    }
}
