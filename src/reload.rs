//! Config reload: deciding what a new configuration changes, and noticing a changed file.
//!
//! `wharf serve` reloads on SIGHUP and, with `--watch-config`, when the file's content changes.
//! This module holds the decisions, free of sockets and threads so they are unit-tested:
//!
//! - [`diff`] matches the running services to the new ones. A listening socket is the costly,
//!   user-visible thing (closing it refuses connections), so sockets are kept whenever the
//!   address is: same name and address keeps the socket (and the whole service when nothing
//!   else changed); a service renamed, or moved onto an address another service is leaving,
//!   inherits that socket; only addresses no running service has are bound afresh.
//! - [`restart_only`] lists settings a running process cannot change (the backend, the worker
//!   count, the metrics listener), which a reload reports instead of half-applying.
//! - [`FileWatcher`] polls the config file's content (not its mtime: Kubernetes swaps a
//!   ConfigMap volume through a symlink, and editors write in place or by rename), and reports
//!   a change once it has stayed the same for one poll, so a half-written file is not loaded.
//!
//! `serve` applies the outcome (see `serve::Running::apply`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use tracing::warn;
use wharf_core::config::Config;

use crate::plan::PlannedService;

/// How often `--watch-config` reads the file.
pub const WATCH_INTERVAL: Duration = Duration::from_millis(500);

/// What identifies a service for matching: its name, its configured address and a fingerprint
/// of every setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceKey {
    /// The config name.
    pub name: String,
    /// `listen` as configured (port 0 stays 0).
    pub listen: SocketAddr,
    /// Every setting, framework-level and the plugin's resolved options.
    pub fingerprint: String,
}

impl ServiceKey {
    /// The key of a planned (validated and built) service.
    pub fn of(svc: &PlannedService) -> Self {
        // `options` are skipped by ServiceConfig's Serialize; the plugin's resolved options
        // (typed, defaults filled in) stand for them, so `a = 1` and a default of 1 agree.
        let framework = toml::to_string(&svc.config).unwrap_or_default();
        ServiceKey {
            name: svc.name.clone(),
            listen: svc.config.listen,
            fingerprint: format!("{framework}\n[options]\n{}", svc.built.options),
        }
    }
}

/// What happens to one service in a reload. Indices are into the running and the new lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Nothing changed: the running service stays as it is.
    Keep {
        /// Running index.
        running: usize,
        /// New index.
        new: usize,
    },
    /// The new service takes over the running one's socket; the old generation drains.
    Swap {
        /// Running index.
        running: usize,
        /// New index.
        new: usize,
    },
    /// A new address: bind it.
    Start {
        /// New index.
        new: usize,
    },
    /// No new service takes this socket: close it, drain the service.
    Stop {
        /// Running index.
        running: usize,
    },
}

/// Matches running services to new ones. Steps come out in the order they should be applied:
/// new sockets first, then handler swaps, then closures, so nothing that continues has a gap.
pub fn diff(running: &[ServiceKey], new: &[ServiceKey]) -> Vec<Step> {
    let mut taken = vec![false; running.len()];
    let mut placed: Vec<Option<Step>> = vec![None; new.len()];

    // Same name, same address: the same service, changed or not.
    for (n, key) in new.iter().enumerate() {
        let found = running
            .iter()
            .enumerate()
            .find(|(r, old)| !taken[*r] && old.name == key.name && old.listen == key.listen);
        if let Some((r, old)) = found {
            taken[r] = true;
            placed[n] = Some(if old.fingerprint == key.fingerprint {
                Step::Keep { running: r, new: n }
            } else {
                Step::Swap { running: r, new: n }
            });
        }
    }
    // A fixed address another service is leaving (renamed, or addresses swapped): inherit its
    // socket rather than close and re-bind it. Port 0 means "any port", never a shared one.
    for (n, key) in new.iter().enumerate() {
        if placed[n].is_some() || key.listen.port() == 0 {
            continue;
        }
        let found = running
            .iter()
            .enumerate()
            .find(|(r, old)| !taken[*r] && old.listen == key.listen);
        if let Some((r, _)) = found {
            taken[r] = true;
            placed[n] = Some(Step::Swap { running: r, new: n });
        }
    }

    let mut steps: Vec<Step> = (0..new.len())
        .filter(|&n| placed[n].is_none())
        .map(|new| Step::Start { new })
        .collect();
    steps.extend(placed.into_iter().flatten());
    steps.extend(
        (0..running.len())
            .filter(|&r| !taken[r])
            .map(|running| Step::Stop { running }),
    );
    steps
}

/// Settings that differ between `running` and `new` but only take effect after a restart,
/// worded for the log.
pub fn restart_only(running: &Config, new: &Config) -> Vec<String> {
    let mut changed = Vec::new();
    let (a, b) = (&running.server, &new.server);
    if a.backend != b.backend {
        changed.push(format!(
            "server.backend ({} -> {})",
            a.backend.as_str(),
            b.backend.as_str()
        ));
    }
    if a.workers != b.workers {
        changed.push(format!("server.workers ({} -> {})", a.workers, b.workers));
    }
    let listen = |c: &Config| c.metrics.as_ref().map(|m| m.listen);
    if listen(running) != listen(new) {
        let show = |a: Option<SocketAddr>| a.map_or("off".to_string(), |a| a.to_string());
        changed.push(format!(
            "metrics.listen ({} -> {})",
            show(listen(running)),
            show(listen(new))
        ));
    }
    changed
}

/// Notices when the config file's content changes, for `--watch-config`.
pub struct FileWatcher {
    path: PathBuf,
    /// The content the running config was (last) loaded from.
    loaded: Option<Vec<u8>>,
    /// A new content seen at the last poll, waiting to be seen again unchanged.
    settling: Option<Vec<u8>>,
    /// Whether the last read failed (to log a failure once, not every poll).
    failing: bool,
}

impl FileWatcher {
    /// Watches `path`, taking its current content as the loaded one.
    pub fn new(path: PathBuf) -> Self {
        let mut w = FileWatcher {
            path,
            loaded: None,
            settling: None,
            failing: false,
        };
        w.mark_loaded();
        w
    }

    /// Records the file's content now as the one the next load reads. Call just before any
    /// reload, whatever triggered it, so the watcher does not report that content again.
    pub fn mark_loaded(&mut self) {
        self.loaded = std::fs::read(&self.path).ok();
        self.settling = None;
    }

    /// Reads the file; true when its content differs from the loaded one and has not changed
    /// since the previous poll.
    pub fn poll(&mut self) -> bool {
        let content = match std::fs::read(&self.path) {
            Ok(c) => {
                self.failing = false;
                c
            }
            Err(e) => {
                if !self.failing {
                    warn!(path = %self.path.display(), error = %e, "--watch-config: cannot read the config file; still running the loaded configuration");
                }
                self.failing = true;
                return false;
            }
        };
        if self.loaded.as_ref() == Some(&content) {
            self.settling = None;
            return false;
        }
        if self.settling.as_ref() == Some(&content) {
            return true;
        }
        self.settling = Some(content);
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str, listen: &str, fingerprint: &str) -> ServiceKey {
        ServiceKey {
            name: name.into(),
            listen: listen.parse().unwrap(),
            fingerprint: fingerprint.into(),
        }
    }

    #[test]
    fn unchanged_changed_added_removed() {
        let running = [
            key("a", "127.0.0.1:7001", "x"),
            key("b", "127.0.0.1:7002", "x"),
            key("c", "127.0.0.1:7003", "x"),
        ];
        let new = [
            key("a", "127.0.0.1:7001", "x"),
            key("b", "127.0.0.1:7002", "y"),
            key("d", "127.0.0.1:7004", "x"),
        ];
        assert_eq!(
            diff(&running, &new),
            [
                Step::Start { new: 2 },
                Step::Keep { running: 0, new: 0 },
                Step::Swap { running: 1, new: 1 },
                Step::Stop { running: 2 },
            ]
        );
    }

    #[test]
    fn a_renamed_service_and_swapped_addresses_keep_their_sockets() {
        let running = [
            key("a", "127.0.0.1:7001", "x"),
            key("b", "127.0.0.1:7002", "x"),
            key("old", "127.0.0.1:7003", "x"),
        ];
        let new = [
            key("a", "127.0.0.1:7002", "x"),
            key("b", "127.0.0.1:7001", "x"),
            key("renamed", "127.0.0.1:7003", "x"),
        ];
        assert_eq!(
            diff(&running, &new),
            [
                Step::Swap { running: 1, new: 0 },
                Step::Swap { running: 0, new: 1 },
                Step::Swap { running: 2, new: 2 },
            ]
        );
    }

    #[test]
    fn port_zero_is_kept_by_name_only() {
        let running = [key("a", "127.0.0.1:0", "x")];
        assert_eq!(
            diff(&running, &[key("a", "127.0.0.1:0", "x")]),
            [Step::Keep { running: 0, new: 0 }]
        );
        assert_eq!(
            diff(&running, &[key("b", "127.0.0.1:0", "x")]),
            [Step::Start { new: 0 }, Step::Stop { running: 0 }]
        );
    }

    #[test]
    fn a_moved_service_gets_a_new_socket_and_the_old_one_closes() {
        let running = [key("a", "127.0.0.1:7001", "x")];
        let new = [key("a", "127.0.0.1:7005", "x")];
        assert_eq!(
            diff(&running, &new),
            [Step::Start { new: 0 }, Step::Stop { running: 0 }]
        );
    }

    #[test]
    fn the_fingerprint_covers_plugin_options_and_framework_settings() {
        use crate::plan::load_str;
        use crate::registry::Registry;
        let registry = Registry::with_builtins();
        let base = "[services.e]\nplugin = 'echo'\nlisten = '127.0.0.1:7001'\n";
        let keys = |text: &str| {
            let plan = load_str(text, "test.toml", &registry).unwrap();
            ServiceKey::of(&plan.services[0])
        };
        let plain = keys(base);
        // Spelling a default out changes nothing.
        assert_eq!(
            plain,
            keys(&format!("{base}[services.e.options]\ntransform = 'none'\n"))
        );
        assert_ne!(
            plain,
            keys(&format!(
                "{base}[services.e.options]\ntransform = 'upper'\n"
            ))
        );
        assert_ne!(plain, keys(&format!("{base}max_connections = 5\n")));
        assert_ne!(plain, keys(&format!("{base}allow_from = ['10.0.0.0/8']\n")));
    }

    #[test]
    fn restart_only_settings_are_named() {
        use crate::plan::load_str;
        use crate::registry::Registry;
        let registry = Registry::with_builtins();
        let service = "[services.e]\nplugin = 'echo'\nlisten = '127.0.0.1:7001'\n";
        let config = |text: &str| {
            let text = format!("{text}{service}");
            load_str(&text, "t.toml", &registry).unwrap().config
        };
        let a = config("[server]\nworkers = 1\nbackend = 'epoll'\n");
        let b = config(
            "[server]\nworkers = 2\nbackend = 'epoll'\nshutdown_grace = '1s'\n\
             [metrics]\nlisten = '127.0.0.1:9100'\n",
        );
        assert_eq!(
            restart_only(&a, &b),
            [
                "server.workers (1 -> 2)",
                "metrics.listen (off -> 127.0.0.1:9100)"
            ]
        );
        assert!(restart_only(&a, &a).is_empty());
    }

    #[test]
    fn the_watcher_waits_for_a_settled_change() {
        let dir = std::env::temp_dir().join(format!("wharf-watch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.toml");
        std::fs::write(&path, "a").unwrap();
        let mut w = FileWatcher::new(path.clone());
        assert!(!w.poll());
        std::fs::write(&path, "b").unwrap();
        assert!(!w.poll(), "a change is reported once it has settled");
        assert!(w.poll());
        w.mark_loaded();
        assert!(!w.poll());
        std::fs::remove_file(&path).unwrap();
        assert!(!w.poll(), "a missing file is not a change");
        std::fs::write(&path, "b").unwrap();
        assert!(!w.poll(), "back as loaded");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
