//! Phase 2 of `wharf serve`: start one worker thread per configured worker, each running
//! [`wharf_core::worker::run`] on the chosen backend with its own descriptor of every
//! service's socket, and wait until each has adopted its sockets.
//!
//! It also watches the threads for the rest of the process's life: a worker that ends while
//! the server is not stopping (it panicked outside a connection's task, or its runtime ended)
//! is reported through [`WorkerDeaths`], which the serving loop ([`super::serving`]) turns
//! into an error in the log, a `/readyz` that says why, and a stop. The sockets come from
//! [`super::bootstrap`]; the threads are joined by [`super::drain`].

use std::io;
use std::panic::{self, AssertUnwindSafe};
use std::sync::{mpsc, Arc};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use tokio::sync::watch;
use wharf_core::shutdown::{Shutdown, ShutdownTrigger};
use wharf_core::worker::{self, ControlSender, WorkerService};

use super::ServeError;
use crate::backends::CompiledBackend;

/// The started worker threads.
pub(super) struct Workers<B: CompiledBackend> {
    /// One control channel per worker, in worker order (reloads go through them).
    pub controls: Vec<ControlSender<B>>,
    /// The threads, joined at the end of the drain.
    pub threads: Vec<JoinHandle<io::Result<()>>>,
    /// Hears of a worker that ended before the server began to stop.
    pub deaths: WorkerDeaths,
}

/// Starts a worker thread for each entry of `per_worker` (its sockets) and waits until every
/// one is accepting. On failure the started ones are told to stop (`trigger`).
pub(super) fn start<B: CompiledBackend>(
    per_worker: Vec<Vec<WorkerService<B>>>,
    stop: &Shutdown,
    trigger: &ShutdownTrigger,
) -> Result<Workers<B>, ServeError> {
    let count = per_worker.len();
    let deaths = WorkerDeaths::new(stop.clone());
    let (ready_tx, ready_rx) = mpsc::channel::<io::Result<()>>();
    let mut controls = Vec::with_capacity(count);
    let mut threads = Vec::with_capacity(count);
    for (id, services) in per_worker.into_iter().enumerate() {
        let (control, control_rx) = worker::control_channel::<B>();
        controls.push(control);
        let (stop, ready) = (stop.clone(), ready_tx.clone());
        let body = move || {
            worker::run::<B>(id, services, control_rx, stop, move |r| {
                let _ = ready.send(r);
            })
        };
        let thread = spawn_watched(id, &deaths, body)
            .map_err(|e| ServeError::failure(format!("cannot start worker thread: {e}")))?;
        threads.push(thread);
    }
    drop(ready_tx);
    for _ in 0..count {
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                trigger.trigger(Duration::ZERO);
                return Err(ServeError::failure(format!(
                    "{} backend failed to start: {e}",
                    B::NAME
                )));
            }
            Err(_) => {
                return Err(ServeError::failure(format!(
                    "{} worker died during startup",
                    B::NAME
                )));
            }
        }
    }
    Ok(Workers {
        controls,
        threads,
        deaths,
    })
}

/// Starts thread `wharf-worker-{id}` running `body`; if it ends (returns or panics) while the
/// server is not stopping, `deaths` hears of it. A panic still reaches the thread's joiner.
fn spawn_watched(
    id: usize,
    deaths: &WorkerDeaths,
    body: impl FnOnce() -> io::Result<()> + Send + 'static,
) -> io::Result<JoinHandle<io::Result<()>>> {
    let deaths = deaths.clone();
    thread::Builder::new()
        .name(format!("wharf-worker-{id}"))
        .spawn(move || match panic::catch_unwind(AssertUnwindSafe(body)) {
            Ok(result) => {
                let how = match &result {
                    Ok(()) => "its runtime ended".to_string(),
                    Err(e) => format!("its runtime failed: {e}"),
                };
                deaths.ended(id, how);
                result
            }
            Err(payload) => {
                deaths.ended(id, format!("it panicked: {}", panic_message(&*payload)));
                panic::resume_unwind(payload)
            }
        })
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

/// The first worker that ended while the server was not stopping, if any: what `/readyz`
/// reports and what stops the server.
#[derive(Clone)]
pub struct WorkerDeaths {
    first: Arc<watch::Sender<Option<String>>>,
    stop: Shutdown,
}

impl WorkerDeaths {
    /// Watches workers of a server whose stop is signalled by `stop`.
    pub fn new(stop: Shutdown) -> Self {
        WorkerDeaths {
            first: Arc::new(watch::channel(None).0),
            stop,
        }
    }

    /// Worker `id` ended, `how`; ignored once the server is stopping (workers end then).
    fn ended(&self, id: usize, how: String) {
        if self.stop.is_triggered() {
            return;
        }
        self.first.send_if_modified(|first| {
            let new = first.is_none();
            if new {
                *first = Some(format!("worker {id} ended: {how}"));
            }
            new
        });
    }

    /// Why the first worker died, if one did.
    pub fn reason(&self) -> Option<String> {
        self.first.borrow().clone()
    }

    /// Completes with the reason once a worker has died.
    pub async fn wait(&self) -> String {
        let mut rx = self.first.subscribe();
        let reason = match rx.wait_for(Option::is_some).await {
            Ok(reason) => reason.clone(),
            // The sender lives in `self`: never reached.
            Err(_) => None,
        };
        match reason {
            Some(reason) => reason,
            None => std::future::pending().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deaths() -> (ShutdownTrigger, WorkerDeaths) {
        let (trigger, stop) = wharf_core::shutdown::channel();
        (trigger, WorkerDeaths::new(stop))
    }

    #[test]
    fn a_worker_thread_that_panics_is_reported_with_its_message() {
        let (_trigger, deaths) = deaths();
        let thread = spawn_watched(3, &deaths, || panic!("slot table corrupt")).unwrap();
        assert!(thread.join().is_err(), "the panic still reaches the joiner");
        assert_eq!(
            deaths.reason().as_deref(),
            Some("worker 3 ended: it panicked: slot table corrupt")
        );
    }

    #[test]
    fn a_worker_whose_runtime_ends_before_the_stop_is_reported() {
        let (_trigger, deaths) = deaths();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let thread = spawn_watched(1, &deaths, || Ok(())).unwrap();
        let reason = rt
            .block_on(async { tokio::time::timeout(Duration::from_secs(10), deaths.wait()).await });
        assert_eq!(reason.as_deref(), Ok("worker 1 ended: its runtime ended"));
        thread.join().unwrap().unwrap();
    }

    #[test]
    fn workers_ending_after_the_stop_are_not_deaths() {
        let (trigger, deaths) = deaths();
        trigger.trigger(Duration::ZERO);
        spawn_watched(0, &deaths, || Ok(()))
            .unwrap()
            .join()
            .unwrap()
            .unwrap();
        let panicked = spawn_watched(1, &deaths, || panic!("late")).unwrap();
        assert!(panicked.join().is_err());
        assert_eq!(deaths.reason(), None);
    }

    /// A real worker ([`worker::run`] on the epoll backend) that returns without a stop: its
    /// main thread went away (control channel and stop trigger dropped, never triggered).
    #[test]
    fn a_real_worker_that_returns_before_the_stop_is_reported() {
        let (trigger, stop) = wharf_core::shutdown::channel();
        let deaths = WorkerDeaths::new(stop.clone());
        let (control, control_rx) = worker::control_channel::<wharf_backend_epoll::Epoll>();
        let thread = spawn_watched(0, &deaths, move || {
            worker::run::<wharf_backend_epoll::Epoll>(0, Vec::new(), control_rx, stop, |_| {})
        })
        .unwrap();
        // The main thread goes away without a stop (its trigger dropped, not triggered).
        drop(control);
        drop(trigger);
        thread.join().unwrap().unwrap();
        assert_eq!(
            deaths.reason().as_deref(),
            Some("worker 0 ended: its runtime ended")
        );
    }
}
