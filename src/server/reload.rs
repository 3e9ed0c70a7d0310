//! What happens on SIGHUP (or, with `--watch-config`, when the config file changes), from the
//! signal to the log line.
//!
//! 1. The signal is caught ([`super::signals`]); the serving loop ([`super::serving`]) calls
//!    [`reload_unless_stopped`], which tells systemd `RELOADING=1` and runs the reload while
//!    still listening for signals: a stop signal abandons it (nothing is applied before the
//!    workers are told, and after that the process is stopping anyway), another SIGHUP is
//!    remembered and runs next.
//! 2. [`Running::reload`] loads and validates the config again, off the runtime (same file,
//!    same command-line overrides). An invalid config is logged and counted; nothing changes.
//! 3. [`Running::apply`] is a transaction: [`crate::reload::diff`] matches the running
//!    services to the new ones (keep, swap a handler on the same socket, start, stop); every
//!    new address is bound first, so an address in use leaves everything as it was; then each
//!    worker gets its batch of changes and acknowledges it; then the replaced generations are
//!    retired (they drain their connections) and the new settings take effect.
//! 4. One log line says what changed, and `wharf_config_reloads_total{result}` counts it
//!    ([`super::process_metrics`]); systemd hears `READY=1` again.
//!
//! The decisions (the diff, the restart-only settings, the file watcher) are in
//! [`crate::reload`], free of sockets and threads.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::oneshot;
use tracing::{error, info, warn};
use wharf_core::config::ConfigError;
use wharf_core::gate::ServiceGate;
use wharf_core::listen::Listen;
use wharf_core::worker::{Change, Control, SlotId};

use super::bootstrap::{bind_service, file_settings, BoundService};
use super::process_metrics::ReloadResult;
use super::running::{Running, RunningService};
use super::signals::{Signal, Signals};
use super::LoadPlan;
use crate::backends::CompiledBackend;
use crate::notify;
use crate::plan::Plan;
use crate::reload::{self, ServiceKey, Step};
use crate::status::ReloadOutcome;

/// Runs one reload (`why` names its trigger) unless a stop signal comes first, which it
/// returns. A SIGHUP during the reload sets `pending_hup`.
pub(super) async fn reload_unless_stopped<B: CompiledBackend>(
    running: &mut Running<B>,
    why: &str,
    load: &LoadPlan,
    signals: &mut Signals,
    pending_hup: &mut bool,
) -> Option<Signal> {
    notify::reloading();
    let running_log = running.access_log.clone();
    let mut job = std::pin::pin!(running.reload(why, load));
    loop {
        tokio::select! {
            biased;
            signal = signals.recv() => match signal {
                Signal::Hup => *pending_hup = true,
                Signal::Usr1 => super::reopen_access_log(running_log.as_ref()),
                stop => {
                    warn!(signal = stop.name(), "stop signal during a reload: abandoning the reload");
                    return Some(stop);
                }
            },
            _ = &mut job => break,
        }
    }
    notify::notify("READY=1");
    None
}

impl<B: CompiledBackend> Running<B> {
    /// Loads the config again and applies it; logs and counts the outcome. Never stops the
    /// server: whatever goes wrong, the running configuration stays.
    async fn reload(&mut self, why: &str, load: &LoadPlan) {
        info!(trigger = why, "reloading the configuration");
        let started = Instant::now();
        let load = Arc::clone(load);
        let loaded = tokio::task::spawn_blocking(move || load())
            .await
            .unwrap_or_else(|e| {
                Err(vec![ConfigError {
                    origin: "reload".into(),
                    key: String::new(),
                    value: None,
                    message: format!("loading the config panicked: {e}"),
                }])
            });
        let (result, outcome) = match loaded {
            Err(errors) => {
                for e in &errors {
                    error!("config error: {e}");
                }
                warn!(
                    errors = errors.len(),
                    "reload rejected: the configuration is invalid; still running the previous one"
                );
                (ReloadResult::Invalid, ReloadOutcome::Invalid(errors.len()))
            }
            Ok(plan) => match self.apply(plan, started).await {
                Ok(summary) => (ReloadResult::Success, ReloadOutcome::Applied(summary)),
                Err(ApplyError::Unchanged(msg)) => {
                    error!("reload failed: {msg}; still running the previous configuration");
                    (ReloadResult::Failed, ReloadOutcome::Failed)
                }
                Err(ApplyError::Partial(msg)) => {
                    error!("reload failed: partly applied ({msg}); some workers may not serve the new configuration: restart wharf");
                    (ReloadResult::Failed, ReloadOutcome::Failed)
                }
            },
        };
        result.record();
        self.publish_services();
        self.status.record_reload(why, outcome);
    }

    /// Applies a validated plan: binds new addresses first (any failure there leaves everything
    /// as it was), then tells every worker, then retires the generations that were replaced.
    /// Returns what changed, as logged.
    async fn apply(&mut self, plan: Plan, started: Instant) -> Result<String, ApplyError> {
        let running: Vec<ServiceKey> = self.services.iter().map(|s| s.key.clone()).collect();
        let bound: Vec<Listen> = self.services.iter().map(|s| s.bound.clone()).collect();
        let new: Vec<ServiceKey> = plan.services.iter().map(ServiceKey::of).collect();
        let steps = reload::diff(&running, &bound, &new);

        // 1. Check and bind; nothing has changed yet if this fails.
        self.check_removable(&steps)?;
        let sockets = self.bind_new(&plan, &steps)?;
        self.update_socket_files(&plan, &steps)?;
        // 2. The changes, per worker, and the state that results.
        let batch = self.prepare(&plan, &steps, sockets);
        // 3. Every worker applies its batch; wait until all have.
        let failures = self.tell_workers(batch.per_worker).await;
        // 4. The replaced generations finish their connections; the new state is in effect.
        let mut summary = batch.summary;
        summary.settings = reload::reloaded_settings(&self.config, &plan.config);
        self.commit(&plan, batch.next, batch.retired);
        for s in self
            .services
            .iter()
            .filter(|s| summary.listening.contains(&s.slot))
        {
            self.log_listening(s);
        }
        let outcome = if failures.is_empty() {
            "configuration reloaded"
        } else {
            "configuration partly applied"
        };
        info!(config = %plan.origin, took = ?started.elapsed(), "{outcome}: {summary}");
        let restart = reload::restart_only(&self.config, &plan.config);
        if !restart.is_empty() {
            warn!(
                settings = %restart.join(", "),
                "these settings changed but only take effect after a restart"
            );
        }
        if failures.is_empty() {
            Ok(summary.to_string())
        } else {
            Err(ApplyError::Partial(failures.join("; ")))
        }
    }

    /// A socket systemd passed cannot be closed or moved by a reload.
    fn check_removable(&self, steps: &[Step]) -> Result<(), ApplyError> {
        for step in steps {
            if let Step::Stop { running } = *step {
                let s = &self.services[running];
                if s.activated {
                    return Err(ApplyError::Unchanged(format!(
                        "service `{}` listens on {}, a socket systemd passed (socket activation): \
                         removing or moving it needs the .socket unit changed and a restart",
                        s.key.name, s.bound
                    )));
                }
            }
        }
        Ok(())
    }

    /// Binds the address of every started service, by its index in the plan.
    fn bind_new(
        &self,
        plan: &Plan,
        steps: &[Step],
    ) -> Result<HashMap<usize, BoundService>, ApplyError> {
        let mut sockets = HashMap::new();
        for step in steps {
            if let Step::Start { new } = *step {
                let svc = &plan.services[new];
                let bound = bind_service(plan, svc, self.workers.len()).map_err(|e| {
                    ApplyError::Unchanged(self.explain_overlap(e.to_string(), &svc.config.listen))
                })?;
                sockets.insert(new, bound);
            }
        }
        Ok(sockets)
    }

    /// A changed service that keeps its Unix socket file gets the file's new `socket_mode` and
    /// `socket_group` (the socket itself stays, so open connections and the path do).
    fn update_socket_files(&self, plan: &Plan, steps: &[Step]) -> Result<(), ApplyError> {
        for step in steps {
            let Step::Swap { running, new } = *step else {
                continue;
            };
            let Some(file) = &self.services[running].file else {
                continue; // a TCP or UDP address, an abstract name, or systemd's socket
            };
            let svc = &plan.services[new];
            let settings =
                file_settings(plan, svc).map_err(|e| ApplyError::Unchanged(e.to_string()))?;
            file.apply(settings).map_err(|e| {
                ApplyError::Unchanged(format!(
                    "services.{}: cannot give {} its socket_mode and socket_group: {e}",
                    svc.name,
                    file.path().display()
                ))
            })?;
        }
        Ok(())
    }

    /// What each worker must change, and the services that will be running after.
    fn prepare(
        &mut self,
        plan: &Plan,
        steps: &[Step],
        mut sockets: HashMap<usize, BoundService>,
    ) -> Batch<B> {
        let workers = self.workers.len();
        let mut batch = Batch {
            per_worker: (0..workers).map(|_| Vec::new()).collect(),
            next: (0..plan.services.len()).map(|_| None).collect(),
            retired: Vec::new(),
            summary: Summary::default(),
        };
        for step in steps {
            match *step {
                Step::Keep { running, new } => {
                    batch.next[new] = Some(self.services[running].clone());
                    batch.summary.unchanged += 1;
                }
                Step::Swap { running, new } => {
                    let svc = &plan.services[new];
                    let old = &self.services[running];
                    let (slot, bound, activated) = (old.slot, old.bound.clone(), old.activated);
                    batch.retired.push(Arc::clone(&old.gate));
                    batch
                        .summary
                        .changed
                        .push(describe_swap(&old.key, &svc.name));
                    if old.key.name != svc.name {
                        batch.summary.listening.push(slot);
                    }
                    let handler = self.new_generation(svc);
                    for c in &mut batch.per_worker {
                        c.push(Change::Swap {
                            slot,
                            handler: handler.clone(),
                        });
                    }
                    batch.next[new] = Some(RunningService {
                        key: ServiceKey::of(svc),
                        bound,
                        slot,
                        gate: handler.gate,
                        activated,
                        file: old.file.clone(),
                        instance: Arc::clone(&svc.built.instance),
                    });
                }
                Step::Start { new } => {
                    let svc = &plan.services[new];
                    let Some(socket) = sockets.remove(&new) else {
                        continue; // every Start was bound by bind_new
                    };
                    let addr = socket.addr.clone();
                    let (service, started) = self.start_service(svc, socket);
                    for (c, started) in batch.per_worker.iter_mut().zip(started) {
                        c.push(Change::Start(started));
                    }
                    batch.summary.added.push(format!("{} ({addr})", svc.name));
                    batch.summary.listening.push(service.slot);
                    batch.next[new] = Some(service);
                }
                Step::Stop { running } => {
                    let old = &self.services[running];
                    for c in &mut batch.per_worker {
                        c.push(Change::Stop(old.slot));
                    }
                    batch.retired.push(Arc::clone(&old.gate));
                    batch
                        .summary
                        .removed
                        .push(format!("{} ({})", old.key.name, old.bound));
                }
            }
        }
        batch
    }

    /// Sends each worker its changes and waits for every answer; returns what failed.
    async fn tell_workers(&self, per_worker: Vec<Vec<Change<B>>>) -> Vec<String> {
        let mut acks = Vec::with_capacity(per_worker.len());
        let mut failures = Vec::new();
        for (id, (control, changes)) in self.workers.iter().zip(per_worker).enumerate() {
            let (done, ack) = oneshot::channel();
            match control.send(Control { changes, done }) {
                Ok(()) => acks.push(ack),
                Err(_) => failures.push(format!("worker {id} is gone")),
            }
        }
        for ack in acks {
            match ack.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => failures.push(e.to_string()),
                Err(_) => failures.push("a worker ended during the reload".into()),
            }
        }
        failures
    }

    /// Retires the replaced generations and puts the new services and settings in effect.
    fn commit(
        &mut self,
        plan: &Plan,
        next: Vec<Option<RunningService>>,
        retired: Vec<Arc<ServiceGate>>,
    ) {
        for gate in retired {
            gate.retire();
            self.retired.push(Arc::downgrade(&gate));
        }
        self.retired.retain(|g| g.strong_count() > 0);
        self.services = next.into_iter().flatten().collect();
        self.adopt_settings(&plan.config);
    }

    /// Adds to a bind error when the address overlaps a socket of this very process (the
    /// same port on a wildcard and a specific address, or the metrics listener): that is not
    /// "another process", and only a restart can move between them.
    fn explain_overlap(&self, msg: String, wanted: &Listen) -> String {
        let overlaps = |have: &Listen| match (have, wanted) {
            (Listen::Tcp(have), Listen::Tcp(wanted)) | (Listen::Udp(have), Listen::Udp(wanted)) => {
                have.port() == wanted.port()
                    && (have.ip() == wanted.ip()
                        || have.ip().is_unspecified()
                        || wanted.ip().is_unspecified())
            }
            (have, wanted) => have == wanted,
        };
        let ours = self
            .services
            .iter()
            .map(|s| (s.key.name.as_str(), s.bound.clone()))
            .chain(
                self.config
                    .metrics
                    .as_ref()
                    .map(|m| ("metrics", Listen::Tcp(m.listen))),
            )
            .find(|(_, have)| overlaps(have));
        match ours {
            Some((name, have)) => format!(
                "{msg}; it overlaps `{name}` on {have} in this process: moving between \
                 overlapping addresses needs a restart"
            ),
            None => msg,
        }
    }
}

/// A reload's changes, prepared before any worker hears of them.
struct Batch<B: CompiledBackend> {
    /// Each worker's changes, in worker order.
    per_worker: Vec<Vec<Change<B>>>,
    /// The running services after the reload, by the new plan's index.
    next: Vec<Option<RunningService>>,
    /// The generations replaced or stopped.
    retired: Vec<Arc<ServiceGate>>,
    summary: Summary,
}

fn describe_swap(old: &ServiceKey, new_name: &str) -> String {
    if old.name == new_name {
        old.name.clone()
    } else {
        format!("{} (was {})", new_name, old.name)
    }
}

/// Why a valid config could not be applied.
enum ApplyError {
    /// Found before anything changed (an address in use...).
    Unchanged(String),
    /// Some workers could not take their part; the rest is in effect.
    Partial(String),
}

/// What a reload did, for its log line.
#[derive(Default)]
struct Summary {
    unchanged: usize,
    changed: Vec<String>,
    added: Vec<String>,
    removed: Vec<String>,
    /// Reloadable settings outside the services that changed.
    settings: Vec<&'static str>,
    /// Slots to announce with a `listening` line (added, or serving under a new name).
    listening: Vec<SlotId>,
}

/// `changed=a, b added=c (addr) removed=... settings=... unchanged=N`, each only when there is
/// something to say; `no changes` when nothing changed.
impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let lists = [
            ("changed", self.changed.join(", ")),
            ("added", self.added.join(", ")),
            ("removed", self.removed.join(", ")),
            ("settings", self.settings.join(", ")),
        ];
        let mut said = Vec::new();
        for (name, list) in lists.iter().filter(|(_, list)| !list.is_empty()) {
            said.push(format!("{name}={list}"));
        }
        if said.is_empty() {
            said.push("no changes".into());
        }
        if self.unchanged > 0 {
            said.push(format!("unchanged={}", self.unchanged));
        }
        f.write_str(&said.join(" "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_says_only_what_changed() {
        let nothing = Summary {
            unchanged: 2,
            ..Summary::default()
        };
        assert_eq!(nothing.to_string(), "no changes unchanged=2");
        let added = Summary {
            added: vec!["x (127.0.0.1:7)".into()],
            ..Summary::default()
        };
        assert_eq!(added.to_string(), "added=x (127.0.0.1:7)");
        let mixed = Summary {
            unchanged: 1,
            changed: vec!["a".into(), "b (was c)".into()],
            removed: vec!["d (127.0.0.1:8)".into()],
            settings: vec!["server.shutdown_grace"],
            ..Summary::default()
        };
        assert_eq!(
            mixed.to_string(),
            "changed=a, b (was c) removed=d (127.0.0.1:8) settings=server.shutdown_grace \
             unchanged=1"
        );
    }
}
