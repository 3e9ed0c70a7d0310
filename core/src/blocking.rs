//! The per-service blocking budget: how many blocking jobs one service runs at once.
//!
//! tokio's blocking pool is shared by everything on a worker and grows to 512 threads, so a
//! plugin that runs one blocking job per client lets a crowd of clients take every thread (and
//! the memory of each) from every other service. Plugins therefore run blocking work through
//! [`Context::blocking`](crate::Context::blocking), which on a served connection goes through
//! its service's [`BlockingBudget`]: `services.<name>.max_blocking` threads of the service's own,
//! shared by all its workers and started on first use, taking jobs first come, first served. A
//! job holds its thread exactly while it runs, also when the future that waits for it was
//! dropped; a queued job whose waiter is gone is skipped. A permit semaphore in front of
//! tokio's pool was tried first: a thread that had just released its permit was not yet idle
//! when the next job came, so tokio started another, and the thread count drifted well above
//! the budget.
//!
//! Jobs should be short and bounded (one file open, one chunk of a hash): a job that waits for
//! a client would hold its thread as long as the client wants.

use std::io;
use std::sync::atomic::{AtomicIsize, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Instant;

use tokio::sync::oneshot;

use crate::metrics::{BlockingSeries, ServiceLabels};

type Job = Box<dyn FnOnce() + Send>;

/// One service's threads for blocking jobs, with its metric handles.
pub struct BlockingBudget {
    pool: Arc<Pool>,
}

struct Pool {
    size: usize,
    queue: mpsc::Sender<Job>,
    jobs: Arc<Mutex<mpsc::Receiver<Job>>>,
    started: AtomicUsize,
    /// Threads waiting for a job minus jobs sent and not yet taken: above 0, that many
    /// threads are free to take a job at once; at or below 0, a new job waits behind others
    /// (or for a thread still starting). Threads add 1 just before they wait for a job, and
    /// each submitted job takes 1, so a thread that goes from one job straight to a queued one
    /// is never counted as free.
    free: Arc<AtomicIsize>,
    series: BlockingSeries,
}

impl BlockingBudget {
    /// A budget of `size` threads (at least 1). With `previous` of the same size (a reloaded
    /// generation of the service), the threads are shared, so the two generations together
    /// stay within it.
    pub fn new(size: usize, labels: &ServiceLabels, previous: Option<&BlockingBudget>) -> Self {
        let size = size.max(1);
        if let Some(p) = previous.filter(|p| p.pool.size == size) {
            return BlockingBudget {
                pool: Arc::clone(&p.pool),
            };
        }
        let (tx, rx) = mpsc::channel();
        let pool = Pool {
            size,
            queue: tx,
            jobs: Arc::new(Mutex::new(rx)),
            started: AtomicUsize::new(0),
            free: Arc::new(AtomicIsize::new(0)),
            series: BlockingSeries::register(labels),
        };
        BlockingBudget {
            pool: Arc::new(pool),
        }
    }

    /// Runs `job` on one of the service's threads once one is free (first come, first
    /// served). An error means the job panicked or no thread could be started.
    pub async fn run<R: Send + 'static>(
        &self,
        job: impl FnOnce() -> R + Send + 'static,
    ) -> io::Result<R> {
        let pool = &self.pool;
        let asked = Instant::now();
        let (tx, rx) = oneshot::channel();
        let (running, queue_time) = (pool.series.running.clone(), pool.series.queue_time.clone());
        let wrapped: Job = Box::new(move || {
            if tx.is_closed() {
                return; // nobody waits for it any more
            }
            queue_time.record(asked.elapsed().as_secs_f64());
            running.increment(1.0);
            let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
            running.decrement(1.0);
            let _ = tx.send(out);
        });
        pool.submit(wrapped)?;
        match rx.await {
            Ok(Ok(out)) => Ok(out),
            Ok(Err(_panic)) => Err(io::Error::other("blocking job panicked")),
            Err(_) => Err(io::Error::other("blocking job dropped")),
        }
    }
}

impl Pool {
    fn submit(&self, job: Job) -> io::Result<()> {
        // Take a free thread; with none, start one if the budget allows, else wait in line.
        let claimed = self.free.fetch_sub(1, Ordering::AcqRel) > 0;
        if !claimed {
            let grown = self
                .started
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    (n < self.size).then_some(n + 1)
                })
                .is_ok();
            if grown {
                if let Err(e) = self.spawn_thread() {
                    self.free.fetch_add(1, Ordering::AcqRel);
                    return Err(e);
                }
            } else {
                self.series.queued.increment(1);
            }
        }
        self.queue
            .send(job)
            .map_err(|_| io::Error::other("blocking threads are gone"))
    }

    fn spawn_thread(&self) -> io::Result<()> {
        let (jobs, free) = (Arc::clone(&self.jobs), Arc::clone(&self.free));
        let spawned = std::thread::Builder::new()
            .name("wharf-blocking".into())
            .spawn(move || loop {
                // Free from now until a job arrives (whose submit took the 1 back).
                free.fetch_add(1, Ordering::AcqRel);
                let next = jobs.lock().unwrap_or_else(|p| p.into_inner()).recv();
                match next {
                    Ok(job) => job(),
                    Err(_) => return, // the service is gone
                }
            });
        if let Err(e) = spawned {
            self.started.fetch_sub(1, Ordering::AcqRel);
            return Err(e);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::names;
    use metrics::{Counter, Gauge, Histogram};
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
    fn a_dropped_waiter_does_not_free_the_thread_of_a_running_job() {
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
    fn a_panicking_job_is_an_error_and_frees_its_thread() {
        let budget = BlockingBudget::new(1, &labels(), None);
        runtime().block_on(async {
            let err = budget.run(|| panic!("boom")).await.map(|_: ()| ());
            assert!(err.is_err());
            assert_eq!(budget.run(|| 7).await.unwrap(), 7);
        });
    }

    #[test]
    fn max_blocking_defaults_to_8_and_is_bounded() {
        use crate::config::{ConfigSource, MAX_BLOCKING};
        let service =
            |extra: &str| format!("[services.f]\nplugin = 'echo'\nlisten = '127.0.0.1:1'\n{extra}");
        let source = |text: &str| {
            ConfigSource::from_parts(text, "test", [], figment::value::Dict::new()).unwrap()
        };
        let (config, errors) = source(&service("")).resolve();
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(config.services["f"].max_blocking, 8);
        for bad in [0, MAX_BLOCKING + 1] {
            let text = service(&format!("max_blocking = {bad}\n"));
            let (_, errors) = source(&text).resolve();
            assert_eq!(errors[0].key, "services.f.max_blocking", "{errors:?}");
        }
    }

    #[test]
    fn generations_of_one_size_share_their_threads() {
        let old = BlockingBudget::new(3, &labels(), None);
        let same = BlockingBudget::new(3, &labels(), Some(&old));
        let other = BlockingBudget::new(4, &labels(), Some(&old));
        assert!(Arc::ptr_eq(&old.pool, &same.pool));
        assert!(!Arc::ptr_eq(&old.pool, &other.pool));
    }

    #[test]
    fn a_thousand_jobs_use_at_most_size_threads() {
        let budget = Arc::new(BlockingBudget::new(3, &labels(), None));
        let jobs = (0..1000).map(|i| {
            let budget = Arc::clone(&budget);
            async move { budget.run(move || i).await.unwrap() }
        });
        let done = runtime().block_on(futures_join_all(jobs));
        assert_eq!(done.len(), 1000);
        assert_eq!(budget.pool.started.load(Ordering::SeqCst), 3);
    }

    /// Counts `wharf_blocking_jobs_queued_total` in an atomic; every other metric is dropped.
    struct QueuedRecorder(Arc<std::sync::atomic::AtomicU64>);

    impl metrics::Recorder for QueuedRecorder {
        fn describe_counter(
            &self,
            _: metrics::KeyName,
            _: Option<metrics::Unit>,
            _: metrics::SharedString,
        ) {
        }
        fn describe_gauge(
            &self,
            _: metrics::KeyName,
            _: Option<metrics::Unit>,
            _: metrics::SharedString,
        ) {
        }
        fn describe_histogram(
            &self,
            _: metrics::KeyName,
            _: Option<metrics::Unit>,
            _: metrics::SharedString,
        ) {
        }
        fn register_counter(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> Counter {
            if key.name() == names::BLOCKING_QUEUED {
                Counter::from_arc(Arc::clone(&self.0))
            } else {
                Counter::noop()
            }
        }
        fn register_gauge(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> Gauge {
            Gauge::noop()
        }
        fn register_histogram(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> Histogram {
            Histogram::noop()
        }
    }

    #[test]
    fn every_burst_larger_than_the_pool_is_counted_as_queued() {
        let queued = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let recorder = QueuedRecorder(Arc::clone(&queued));
        let budget = Arc::new(metrics::with_local_recorder(&recorder, || {
            BlockingBudget::new(2, &labels(), None)
        }));
        for burst in 1..=3u64 {
            // 5 jobs on 2 threads, all submitted before the first one ends: 3 wait in line.
            let jobs = (0..5).map(|_| {
                let budget = Arc::clone(&budget);
                async move {
                    budget
                        .run(|| std::thread::sleep(Duration::from_millis(30)))
                        .await
                        .unwrap()
                }
            });
            runtime().block_on(futures_join_all(jobs));
            assert_eq!(queued.load(Ordering::SeqCst), 3 * burst, "burst {burst}");
            // Both threads back waiting before the next burst (they are once they count).
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while budget.pool.free.load(Ordering::SeqCst) < 2 {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the threads never came back"
                );
                std::thread::sleep(Duration::from_millis(1));
            }
            assert_eq!(budget.pool.free.load(Ordering::SeqCst), 2);
        }
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
