//! The `/status` document, version 1. Field names are a stable interface (documented in
//! `docs/status.md`): add fields freely, but renaming or removing one means a new `version`.
//! The HTML page is rendered from this same document, so the two never disagree.

use std::collections::BTreeMap;

use serde::Serialize;

use super::history::History;
use super::{Facts, SAMPLE_EVERY};
use crate::metrics_http::Readiness;

/// The version of the document's shape.
pub const VERSION: u32 = 1;

/// Everything `/status` answers.
#[derive(Serialize, Debug)]
pub struct Document {
    pub version: u32,
    pub wharf_version: &'static str,
    /// When this document was made, Unix seconds.
    pub now_unix: f64,
    /// When the counters in it were read (at most a second before `now_unix`); `null` before
    /// the first sample.
    pub sampled_unix: Option<f64>,
    pub started_unix: f64,
    pub uptime_seconds: f64,
    /// `starting`, `ready`, `draining` or `failed` (as `/readyz` sees it).
    pub state: &'static str,
    /// Why the server failed, for `failed`.
    pub state_reason: Option<String>,
    /// Set once a drain (shutdown) has begun.
    pub drain: Option<Drain>,
    pub backend: Backend,
    pub workers: usize,
    pub config: ConfigHealth,
    /// The time axis of every service's `history`.
    pub history: Axis,
    pub services: Vec<Service>,
}

#[derive(Serialize, Debug)]
pub struct Drain {
    pub elapsed_seconds: f64,
    pub grace_seconds: f64,
}

#[derive(Serialize, Debug)]
pub struct Backend {
    /// `epoll` or `io_uring`.
    pub name: &'static str,
    /// `configured`, or why `auto` chose it.
    pub why: String,
}

#[derive(Serialize, Debug)]
pub struct ConfigHealth {
    /// The running configuration is the last one asked for: no reload yet, or the last one
    /// succeeded.
    pub healthy: bool,
    pub reloads: Reloads,
    pub last_reload: Option<LastReload>,
}

#[derive(Serialize, Debug)]
pub struct Reloads {
    pub success: u64,
    pub invalid: u64,
    pub failed: u64,
}

#[derive(Serialize, Debug)]
pub struct LastReload {
    pub at_unix: f64,
    /// `SIGHUP` or `config file changed`.
    pub trigger: String,
    /// `success`, `invalid` or `failed`.
    pub result: &'static str,
    /// What changed, or why nothing did.
    pub detail: String,
}

#[derive(Serialize, Debug)]
pub struct Axis {
    pub interval_seconds: f64,
    /// The end of each interval, Unix seconds, oldest first.
    pub unix: Vec<f64>,
}

#[derive(Serialize, Debug)]
pub struct Service {
    pub name: String,
    pub plugin: String,
    pub listen: Vec<String>,
    pub connections: Connections,
    pub bytes: Bytes,
    pub rates: Rates,
    /// `null` for plugins without requests (echo).
    pub requests: Option<Requests>,
    pub history: ServiceHistory,
}

#[derive(Serialize, Debug)]
pub struct Connections {
    pub active: u64,
    pub accepted: u64,
    /// By reason: `allow_from`, `max_connections`.
    pub rejected: BTreeMap<String, u64>,
}

#[derive(Serialize, Debug)]
pub struct Bytes {
    pub received: u64,
    pub sent: u64,
}

/// Over the last sampling interval; `null` until two samples exist.
#[derive(Serialize, Debug)]
pub struct Rates {
    pub received_bytes_per_second: Option<f64>,
    pub sent_bytes_per_second: Option<f64>,
    pub accepted_per_second: Option<f64>,
    pub requests_per_second: Option<f64>,
}

#[derive(Serialize, Debug)]
pub struct Requests {
    pub total: u64,
    pub by_outcome: BTreeMap<String, u64>,
    /// Over about the last minute; `null` without requests in it.
    pub p50_seconds: Option<f64>,
    pub p99_seconds: Option<f64>,
}

/// Aligned with the document's `history.unix`; `null` where there is no sample.
#[derive(Serialize, Debug)]
pub struct ServiceHistory {
    pub received_bytes_per_second: Vec<Option<f64>>,
    pub sent_bytes_per_second: Vec<Option<f64>>,
    pub active: Vec<Option<u64>>,
}

impl Document {
    pub(super) fn build(
        facts: &Facts,
        readiness: &Readiness,
        history: &History,
        now_unix: f64,
    ) -> Self {
        let (state, state_reason) = readiness.state();
        let last = |v: &[Option<f64>]| v.last().copied().flatten();
        let mut running: Vec<_> = facts.services.iter().collect();
        running.sort_by(|a, b| a.name.cmp(&b.name));
        let services = running
            .into_iter()
            .map(|s| {
                let c = history.latest(&s.name).cloned().unwrap_or_default();
                let r = history.rates(&s.name);
                let requests = (!c.requests.is_empty()).then(|| Requests {
                    total: c.requests_total(),
                    p50_seconds: history.latency_quantile(&s.name, 0.5),
                    p99_seconds: history.latency_quantile(&s.name, 0.99),
                    by_outcome: c.requests.clone(),
                });
                Service {
                    name: s.name.clone(),
                    plugin: s.plugin.clone(),
                    listen: s.listen.clone(),
                    connections: Connections {
                        active: c.active,
                        accepted: c.accepted,
                        rejected: c.rejected.clone(),
                    },
                    bytes: Bytes {
                        received: c.received,
                        sent: c.sent,
                    },
                    rates: Rates {
                        received_bytes_per_second: last(&r.received),
                        sent_bytes_per_second: last(&r.sent),
                        accepted_per_second: last(&r.accepted),
                        requests_per_second: last(&r.requests),
                    },
                    requests,
                    history: ServiceHistory {
                        received_bytes_per_second: r.received,
                        sent_bytes_per_second: r.sent,
                        active: r.active,
                    },
                }
            })
            .collect();
        let reloads = facts.reloads;
        Document {
            version: VERSION,
            wharf_version: env!("CARGO_PKG_VERSION"),
            now_unix,
            sampled_unix: history.sampled_at(),
            started_unix: facts.started_unix,
            uptime_seconds: facts.started.elapsed().as_secs_f64(),
            state,
            state_reason,
            drain: facts.drain.map(|(since, grace)| Drain {
                elapsed_seconds: since.elapsed().as_secs_f64(),
                grace_seconds: grace.as_secs_f64(),
            }),
            backend: Backend {
                name: facts.backend,
                why: facts.backend_why.clone(),
            },
            workers: facts.workers,
            config: ConfigHealth {
                healthy: facts
                    .last_reload
                    .as_ref()
                    .is_none_or(|r| r.result == "success"),
                reloads: Reloads {
                    success: reloads.success,
                    invalid: reloads.invalid,
                    failed: reloads.failed,
                },
                last_reload: facts.last_reload.as_ref().map(|r| LastReload {
                    at_unix: r.at_unix,
                    trigger: r.trigger.clone(),
                    result: r.result,
                    detail: r.detail.clone(),
                }),
            },
            history: Axis {
                interval_seconds: SAMPLE_EVERY.as_secs_f64(),
                unix: history.rate_times(),
            },
            services,
        }
    }

    /// The document as JSON.
    pub fn to_json(&self) -> String {
        // Plain data with string keys: serializing cannot fail.
        serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }
}
