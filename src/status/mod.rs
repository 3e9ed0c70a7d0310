//! The operator's window: a live status page (`GET /`) and the same data as JSON
//! (`GET /status`, version 1, every field in `docs/status.md`), served by the metrics listener
//! ([`crate::metrics_http`]), under its `allow_from` and its limits.
//!
//! Where the data comes from:
//!
//! - **facts** the server sets as they change ([`Board`]): version, start time, the backend in
//!   use and why, workers, each running service's plugin and address, the last reload and the
//!   drain. The server phases (`src/server/`) call [`Board`]'s setters; nothing else writes it.
//! - **counters** from the metrics registry the services already record into (bytes, accepted
//!   and rejected connections, active connections, requests by outcome, request latency
//!   buckets). The `metrics` crate's handles are write-only and the exporter keeps its registry
//!   private, so one ticker ([`run_sampler`], once a second) reads the registry's rendering and
//!   keeps the few series the page needs ([`series`]) in a bounded ring ([`history`]): the data
//!   path is not touched, and the cost is one small render a second whether anyone watches or
//!   not (measured in docs/status.md).
//! - the server's state (ready, draining, failed) from [`Readiness`], the same one `/readyz`
//!   answers from.
//!
//! [`json`] assembles the document, [`page`] renders it as HTML (a static snapshot that works
//! without JavaScript) and serves the embedded assets (uPlot for the charts, vendored in
//! `assets/`) the page's script uses to update itself every second.

mod history;
pub mod json;
pub mod page;
mod series;

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use metrics_exporter_prometheus::PrometheusHandle;

use crate::metrics_http::Readiness;
use history::History;

/// How often the sampler reads the registry: the resolution of the charts and rates.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(1);
/// How many samples the ring keeps: 5 minutes of charts.
pub const HISTORY_LEN: usize = 300;

/// The facts the server sets, shared by the server phases and the metrics listener.
#[derive(Clone)]
pub struct Board(Arc<Mutex<Facts>>);

/// What the server knows about itself, as the status shows it. No secrets: service options and
/// key paths are never copied here.
struct Facts {
    started: Instant,
    started_unix: f64,
    backend: &'static str,
    backend_why: String,
    workers: usize,
    services: Vec<ServiceFacts>,
    reloads: ReloadCounts,
    last_reload: Option<Reload>,
    /// When the drain began, and its grace.
    drain: Option<(Instant, Duration)>,
}

/// A running service as the status lists it.
#[derive(Clone, Debug)]
pub struct ServiceFacts {
    /// The config name.
    pub name: String,
    /// The plugin it runs.
    pub plugin: String,
    /// The addresses it accepts on (port 0 resolved).
    pub listen: Vec<String>,
}

/// How many reloads ended each way since the start.
#[derive(Clone, Copy, Default)]
struct ReloadCounts {
    success: u64,
    invalid: u64,
    failed: u64,
}

/// The last config reload.
#[derive(Clone)]
struct Reload {
    at_unix: f64,
    trigger: String,
    result: &'static str,
    /// What changed (success), or why it was not applied, without config values.
    detail: String,
}

/// The outcome of a reload, as [`Board::record_reload`] takes it.
pub enum ReloadOutcome {
    /// Applied; what changed (the summary the log line has).
    Applied(String),
    /// The new config had this many errors; nothing changed.
    Invalid(usize),
    /// Valid but not (fully) applied; the details are in the log.
    Failed,
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl Board {
    /// A server starting now on `backend` (chosen for `why`) with `workers` threads.
    pub fn new(backend: &'static str, why: String, workers: usize) -> Self {
        Board(Arc::new(Mutex::new(Facts {
            started: Instant::now(),
            started_unix: unix_now(),
            backend,
            backend_why: why,
            workers,
            services: Vec::new(),
            reloads: ReloadCounts::default(),
            last_reload: None,
            drain: None,
        })))
    }

    fn lock(&self) -> MutexGuard<'_, Facts> {
        // Nothing panics while holding it; the facts stay usable if something did.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The services running now (at the start and after each reload).
    pub fn set_services(&self, services: Vec<ServiceFacts>) {
        self.lock().services = services;
    }

    /// A reload triggered by `trigger` (`SIGHUP`, `config file changed`) ended with `outcome`.
    pub fn record_reload(&self, trigger: &str, outcome: ReloadOutcome) {
        let mut facts = self.lock();
        let (result, detail) = match outcome {
            ReloadOutcome::Applied(summary) => {
                facts.reloads.success += 1;
                ("success", summary)
            }
            ReloadOutcome::Invalid(errors) => {
                facts.reloads.invalid += 1;
                (
                    "invalid",
                    format!("{errors} configuration error(s); still running the previous one (see the log)"),
                )
            }
            ReloadOutcome::Failed => {
                facts.reloads.failed += 1;
                ("failed", "could not be applied (see the log)".to_string())
            }
        };
        facts.last_reload = Some(Reload {
            at_unix: unix_now(),
            trigger: trigger.to_string(),
            result,
            detail,
        });
    }

    /// The drain began; open connections have `grace` to finish.
    pub fn set_draining(&self, grace: Duration) {
        self.lock().drain.get_or_insert((Instant::now(), grace));
    }
}

/// Everything `/` and `/status` are answered from.
pub struct Status {
    board: Board,
    readiness: Readiness,
    history: Mutex<History>,
}

impl Status {
    /// The status of the server whose facts are on `board` and whose state is `readiness`.
    pub fn new(board: Board, readiness: Readiness) -> Arc<Self> {
        Arc::new(Status {
            board,
            readiness,
            history: Mutex::new(History::new(HISTORY_LEN)),
        })
    }

    fn history(&self) -> MutexGuard<'_, History> {
        self.history.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes one sample from `exposition` (the registry's rendering) taken at `unix` seconds.
    fn sample(&self, unix: f64, exposition: &str) {
        let counters = series::per_service(exposition);
        self.history().push(unix, counters);
    }

    /// The status document as of the last sample.
    pub fn document(&self) -> json::Document {
        let facts = self.board.lock();
        let history = self.history();
        json::Document::build(&facts, &self.readiness, &history, unix_now())
    }
}

/// Samples the registry every [`SAMPLE_EVERY`] until the task is dropped.
pub async fn run_sampler(status: Arc<Status>, handle: PrometheusHandle) {
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tick.tick().await;
        let exposition = handle.render();
        status.sample(unix_now(), &exposition);
    }
}
