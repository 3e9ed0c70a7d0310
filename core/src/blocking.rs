//! The per-service blocking budget: how many blocking-pool jobs one service runs at once.
//!
//! tokio's blocking pool is shared by everything on a worker and grows to hundreds of threads,
//! so a plugin that runs one blocking job per client lets a crowd of clients take every thread
//! (and the memory of each) from every other service. Plugins therefore run blocking work
//! through [`Conn::blocking`](crate::Conn::blocking), which a served connection routes through
//! its service's [`BlockingBudget`]: a fair (FIFO) semaphore of `services.<name>.max_blocking`
//! permits shared by all workers of the service. The permit is moved into the job, so it is held
//! exactly while the job runs, also when the future that waits for it was dropped.
//!
//! Jobs should be short and bounded (one file open, one chunk of a hash): a job that waits for
//! a client would hold its permit as long as the client wants.

use std::io;
use std::sync::Arc;
use std::time::Instant;

use metrics::{Counter, Gauge, Histogram};
use tokio::sync::Semaphore;

use crate::gate::{names, ServiceLabels};

/// One service's budget of concurrent blocking jobs, with its metric handles.
pub struct BlockingBudget {
    permits: Arc<Semaphore>,
    size: usize,
    running: Gauge,
    queued: Counter,
    queue_time: Histogram,
}

impl BlockingBudget {
    /// A budget of `size` concurrent jobs (at least 1). With `previous` of the same size (a
    /// reloaded generation of the service), the permits are shared, so the two generations
    /// together stay within it.
    pub fn new(size: usize, labels: &ServiceLabels, previous: Option<&BlockingBudget>) -> Self {
        let size = size.max(1);
        let permits = match previous {
            Some(p) if p.size == size => Arc::clone(&p.permits),
            _ => Arc::new(Semaphore::new(size)),
        };
        let l = labels.with(&[]);
        let budget = BlockingBudget {
            permits,
            size,
            running: metrics::gauge!(names::BLOCKING_RUNNING, l.clone()),
            queued: metrics::counter!(names::BLOCKING_QUEUED, l.clone()),
            queue_time: metrics::histogram!(names::BLOCKING_QUEUE_DURATION, l),
        };
        budget.queued.increment(0);
        budget.running.increment(0.0);
        budget
    }

    /// Runs `job` on the blocking pool once a permit is free (first come, first served). An
    /// error means the job panicked.
    pub async fn run<R: Send + 'static>(
        &self,
        job: impl FnOnce() -> R + Send + 'static,
    ) -> io::Result<R> {
        let asked = Instant::now();
        let permit = match Arc::clone(&self.permits).try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                self.queued.increment(1);
                Arc::clone(&self.permits)
                    .acquire_owned()
                    .await
                    .map_err(|_| io::Error::other("blocking budget closed"))?
            }
        };
        self.queue_time.record(asked.elapsed().as_secs_f64());
        let running = Running::start(self.running.clone());
        tokio::task::spawn_blocking(move || {
            let _held = (permit, running);
            job()
        })
        .await
        .map_err(|e| io::Error::other(format!("blocking job failed: {e}")))
    }
}

/// Counts a job in the running gauge until it ends (or panics).
struct Running(Gauge);

impl Running {
    fn start(gauge: Gauge) -> Self {
        gauge.increment(1.0);
        Running(gauge)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    fn labels() -> ServiceLabels {
        ServiceLabels {
            service: "s".into(),
            plugin: "p".into(),
            backend: "test".into(),
        }
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap()
    }

    #[test]
    fn at_most_size_jobs_run_at_once_and_all_finish() {
        let budget = Arc::new(BlockingBudget::new(2, &labels(), None));
        let now = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let jobs = (0..10).map(|i| {
            let (now, peak, budget) = (Arc::clone(&now), Arc::clone(&peak), Arc::clone(&budget));
            async move {
                budget
                    .run(move || {
                        let n = now.fetch_add(1, Ordering::SeqCst) + 1;
                        peak.fetch_max(n, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_millis(20));
                        now.fetch_sub(1, Ordering::SeqCst);
                        i
                    })
                    .await
                    .unwrap()
            }
        });
        let done = runtime().block_on(futures_join_all(jobs));
        assert_eq!(done, (0..10).collect::<Vec<_>>());
        assert_eq!(peak.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn a_dropped_waiter_does_not_free_the_permit_of_a_running_job() {
        let budget = BlockingBudget::new(1, &labels(), None);
        let (release, released) = std::sync::mpsc::channel::<()>();
        runtime().block_on(async {
            let first = budget.run(move || released.recv().ok());
            // Start the job, then drop the future waiting for it.
            let timed_out = tokio::time::timeout(Duration::from_millis(50), first).await;
            assert!(timed_out.is_err());
            // The job still runs and still holds the only permit.
            let second = tokio::time::timeout(Duration::from_millis(100), budget.run(|| 2));
            assert!(
                second.await.is_err(),
                "the permit was freed while its job ran"
            );
            release.send(()).unwrap();
            assert_eq!(budget.run(|| 3).await.unwrap(), 3);
        });
    }

    #[test]
    fn a_panicking_job_is_an_error_and_returns_its_permit() {
        let budget = BlockingBudget::new(1, &labels(), None);
        runtime().block_on(async {
            let err = budget.run(|| panic!("boom")).await.map(|_: ()| ());
            assert!(err.is_err());
            assert_eq!(budget.run(|| 7).await.unwrap(), 7);
        });
    }

    #[test]
    fn generations_of_one_size_share_their_permits() {
        let old = BlockingBudget::new(3, &labels(), None);
        let same = BlockingBudget::new(3, &labels(), Some(&old));
        let other = BlockingBudget::new(4, &labels(), Some(&old));
        assert!(Arc::ptr_eq(&old.permits, &same.permits));
        assert!(!Arc::ptr_eq(&old.permits, &other.permits));
    }

    /// Polls every future to completion, in order of the results.
    async fn futures_join_all<F>(futs: impl Iterator<Item = F>) -> Vec<F::Output>
    where
        F: std::future::Future + 'static,
        F::Output: 'static,
    {
        let handles: Vec<_> = futs.map(Box::pin).collect();
        let mut out = Vec::new();
        let local = tokio::task::LocalSet::new();
        let spawned: Vec<_> = handles
            .into_iter()
            .map(|f| local.spawn_local(f))
            .collect::<Vec<_>>();
        local.await;
        for h in spawned {
            out.push(h.await.unwrap());
        }
        out
    }
}
