//! The running server as the main thread tracks it: each service's socket, its current
//! generation (gate and plugin instance), the generations a reload retired and that still
//! drain, the workers' control channels, and the settings in effect.
//!
//! It is built once the sockets are bound ([`super::bootstrap`]), changed only by a reload
//! ([`super::reload`]: what happens on SIGHUP), and drained at the end ([`super::drain`]).

use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::watch;
use tracing::info;
use wharf_core::access_log::AccessLog;
use wharf_core::config::Config;
use wharf_core::gate::ServiceGate;
use wharf_core::listen::Listen;
use wharf_core::metrics::ServiceLabels;
use wharf_core::net::Cidr;
use wharf_core::tls::TlsSettings;
use wharf_core::unix::SocketFile;
use wharf_core::worker::{ControlSender, HandlerOf, SlotId, WorkerService};

use super::bootstrap::BoundService;
use crate::backends::CompiledBackend;
use crate::plan::PlannedService;
use crate::registry::Instance;
use crate::reload::ServiceKey;
use crate::status::{Board, ServiceFacts};

/// One running service, as the main thread tracks it.
#[derive(Clone)]
pub(super) struct RunningService {
    pub key: ServiceKey,
    /// The address its socket actually has (port 0 resolved, or the activated socket's).
    pub bound: Listen,
    pub slot: SlotId,
    /// The generation serving new connections.
    pub gate: Arc<ServiceGate>,
    /// Its socket came from systemd, which keeps its own copy open.
    pub activated: bool,
    /// A Unix socket's file: removed when the last holder (this, its clones in a reload's
    /// next set) is dropped, so a reload that removes or moves the service removes it.
    pub file: Option<Arc<SocketFile>>,
    /// The plugin instance of that generation, which a replacing one inherits bounds from.
    pub instance: Instance,
}

/// Everything the main thread needs to reload and to stop.
pub(super) struct Running<B: CompiledBackend> {
    pub workers: Vec<ControlSender<B>>,
    pub services: Vec<RunningService>,
    next_slot: SlotId,
    /// Generations a reload replaced, still draining (until their last connection ends).
    pub retired: Vec<Weak<ServiceGate>>,
    /// The settings in effect (restart-only ones stay as started).
    pub config: Config,
    /// `metrics.allow_from` as the metrics endpoint reads it.
    pub metrics_allow: watch::Sender<Vec<Cidr>>,
    /// What the status page shows: the services, reloads, the drain.
    pub status: Board,
    /// The access log's writer, when `[access_log]` is configured (restart-only).
    pub access_log: Option<AccessLog>,
}

impl<B: CompiledBackend> Running<B> {
    /// A server about to run `config` (no service yet: see [`Running::start_service`]).
    pub fn new(config: Config, status: Board, access_log: Option<AccessLog>) -> Self {
        let allow = config
            .metrics
            .as_ref()
            .map(|m| m.allow_from.clone())
            .unwrap_or_default();
        Running {
            workers: Vec::new(),
            services: Vec::new(),
            next_slot: 0,
            retired: Vec::new(),
            config,
            metrics_allow: watch::channel(allow).0,
            status,
            access_log,
        }
    }

    /// A gate and instance for a planned service. If a service of that name is running
    /// (wherever it listens), the new generation shares its `max_connections` count, its
    /// blocking threads, and what its plugin shares across generations ([`Plugin::inherit`]:
    /// exec's process slots, output budget and auth-failure buckets).
    ///
    /// [`Plugin::inherit`]: wharf_core::Plugin::inherit
    pub fn new_generation(&self, svc: &PlannedService) -> HandlerOf<B> {
        let labels = ServiceLabels {
            service: svc.name.clone(),
            plugin: svc.config.plugin.clone(),
            backend: B::NAME.to_string(),
        };
        let previous = self.services.iter().find(|s| s.key.name == svc.name);
        if let Some(previous) = previous {
            svc.built.inherit_from(&previous.instance);
        }
        let gate = ServiceGate::new(
            labels,
            &svc.config,
            svc.built.outcomes,
            previous.map(|p| &*p.gate),
        );
        let service = match &svc.tls {
            Some(loaded) => {
                let settings = TlsSettings::new(loaded, &svc.config);
                B::instance(&svc.built.instances_over_tls(settings))
            }
            None => B::instance(&svc.built.instances),
        };
        let access_log = self.access_log.as_ref().and_then(|log| {
            log.for_service(
                &svc.name,
                &svc.config.plugin,
                svc.built.outcomes,
                svc.config.access_log,
            )
        });
        HandlerOf::<B> {
            gate,
            service,
            access_log,
            datagrams: svc.built.datagrams.clone(),
        }
    }

    /// A new listening socket for `svc` (one descriptor per worker): how the main thread
    /// tracks it, and what each worker starts.
    pub fn start_service(
        &mut self,
        svc: &PlannedService,
        bound: BoundService,
    ) -> (RunningService, Vec<WorkerService<B>>) {
        self.next_slot += 1;
        let (slot, handler) = (self.next_slot, self.new_generation(svc));
        let per_worker = bound
            .group
            .into_iter()
            .map(|socket| WorkerService {
                slot,
                socket,
                handler: handler.clone(),
            })
            .collect();
        let service = RunningService {
            key: ServiceKey::of(svc),
            bound: bound.addr,
            slot,
            gate: handler.gate,
            activated: bound.activated,
            file: bound.file,
            instance: Arc::clone(&svc.built.instance),
        };
        (service, per_worker)
    }

    /// Logs the `listening` line of `s`.
    pub fn log_listening(&self, s: &RunningService) {
        let config = self.config.services.get(&s.key.name);
        let plugin = config.map_or("", |c| c.plugin.as_str());
        let tls = config.is_some_and(|c| c.tls.is_some());
        info!(
            service = %s.key.name,
            plugin = %plugin,
            tls,
            listen = %s.bound,
            backend = %B::NAME,
            workers = self.workers.len(),
            "listening"
        );
    }

    /// Puts the running services (name, plugin, address) on the status board.
    pub fn publish_services(&self) {
        let services = self
            .services
            .iter()
            .map(|s| ServiceFacts {
                name: s.key.name.clone(),
                plugin: self
                    .config
                    .services
                    .get(&s.key.name)
                    .map_or_else(String::new, |c| c.plugin.clone()),
                listen: vec![s.bound.to_string()],
            })
            .collect();
        self.status.set_services(services);
    }

    /// Takes the reloadable settings of `new`; restart-only ones stay as started.
    pub fn adopt_settings(&mut self, new: &Config) {
        self.config.server.shutdown_grace = new.server.shutdown_grace;
        self.config.services = new.services.clone();
        if let (Some(running), Some(new)) = (self.config.metrics.as_mut(), new.metrics.as_ref()) {
            running.allow_from = new.allow_from.clone();
            self.metrics_allow.send_replace(new.allow_from.clone());
        }
    }

    /// Drains every generation, current and retired, within `grace` (shutdown).
    pub fn drain_all_within(&self, grace: Duration) {
        for s in &self.services {
            s.gate.drain_within(grace);
        }
        for gate in self.retired.iter().filter_map(Weak::upgrade) {
            gate.drain_within(grace);
        }
    }
}
