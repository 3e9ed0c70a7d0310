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
//! - [`FileWatcher`] polls the content of the config file and of the running services' TLS
//!   files (not their mtime: Kubernetes swaps a ConfigMap or Secret volume through a symlink,
//!   certbot swaps symlinks, editors write in place or by rename), and reports a change once it
//!   has stayed the same for one poll, so a half-written file is not loaded.
//!
//! [`crate::server::reload`] applies the outcome: that is where "what happens on SIGHUP" is
//! told from start to end.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tracing::warn;
use wharf_core::config::Config;
use wharf_core::listen::Listen;

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
    pub listen: Listen,
    /// Every setting, framework-level and the plugin's resolved options, and the content of
    /// its TLS files (a digest).
    pub fingerprint: String,
    /// The files besides the config the service was built from (its TLS files), each with the
    /// digest of the content it was built from: what `--watch-config` also polls.
    pub files: Vec<(PathBuf, String)>,
}

impl ServiceKey {
    /// The key of a planned (validated and built) service.
    pub fn of(svc: &PlannedService) -> Self {
        // `options` are skipped by ServiceConfig's Serialize; the plugin's resolved options
        // (typed, defaults filled in) stand for them, so `a = 1` and a default of 1 agree.
        // A config that cannot be rendered never matches anything: "changed" is the safe side.
        let framework = toml::to_string(&svc.config).unwrap_or_else(|e| {
            static UNIQUE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let n = UNIQUE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            format!("# unrenderable ({e}) #{n}")
        });
        let mut fingerprint = format!("{framework}\n[options]\n{}", svc.built.options);
        let mut files = Vec::new();
        if let Some(tls) = &svc.tls {
            fingerprint.push_str(&format!("\n[tls files]\n{}", tls.fingerprint));
            files.extend(tls.files.iter().cloned().zip(tls.digests.iter().cloned()));
        }
        ServiceKey {
            name: svc.name.clone(),
            listen: svc.config.listen.clone(),
            fingerprint,
            files,
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
/// `bound` is the address each running service's socket actually has (a port-0 service's port,
/// so pinning it to that port keeps the socket).
pub fn diff(running: &[ServiceKey], bound: &[Listen], new: &[ServiceKey]) -> Vec<Step> {
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
        if placed[n].is_some() || key.listen.is_ephemeral() {
            continue;
        }
        let found = running.iter().enumerate().find(|(r, old)| {
            !taken[*r] && (old.listen == key.listen || bound.get(*r) == Some(&key.listen))
        });
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
    // One writer thread, one file and one format for the whole process.
    if running.access_log != new.access_log {
        let show = |c: &Config| {
            c.access_log.as_ref().map_or("off".to_string(), |l| {
                format!("{} {:?} {}", l.path.display(), l.format, l.buffer_lines)
            })
        };
        changed.push(format!("access_log ({} -> {})", show(running), show(new)));
    }
    changed
}

/// Settings outside the services that a reload applies and that differ between `running` and
/// `new`, by key (for the reload's log line).
pub fn reloaded_settings(running: &Config, new: &Config) -> Vec<&'static str> {
    let mut changed = Vec::new();
    if running.server.shutdown_grace != new.server.shutdown_grace {
        changed.push("server.shutdown_grace");
    }
    if let (Some(a), Some(b)) = (&running.metrics, &new.metrics) {
        if a.allow_from != b.allow_from {
            changed.push("metrics.allow_from");
        }
    }
    changed
}

/// Largest file `--watch-config` reads.
const MAX_WATCHED_BYTES: u64 = 4 << 20;

/// Reads every watched file (`paths`, from [`FileWatcher::paths`]) for the watcher, off the
/// async runtime (a hung mount must not stall the health endpoints), refusing anything but a
/// regular file of sane size (a FIFO would block). Returns each file's digest, never its
/// content (a key file is a secret).
pub async fn read_watched(paths: Vec<PathBuf>) -> io::Result<Vec<String>> {
    let read = move || {
        paths
            .iter()
            .map(|path| {
                wharf_core::config::read_regular_file(path, MAX_WATCHED_BYTES)
                    .map(|content| wharf_core::tls::files::content_digest(&content))
                    .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))
            })
            .collect::<io::Result<Vec<String>>>()
    };
    tokio::task::spawn_blocking(read)
        .await
        .unwrap_or_else(|e| Err(io::Error::other(e.to_string())))
}

/// Notices when the config file's content changes, or that of a file the running services
/// were built from (TLS certificates and keys, which certbot or cert-manager replace without
/// touching the config), for `--watch-config`.
pub struct FileWatcher {
    /// The config file first, then the running services' files.
    watched: Vec<Watched>,
    /// New digests seen at the last poll, waiting to be seen again unchanged.
    settling: Option<Vec<String>>,
    /// Whether the last read failed (to log a failure once, not every poll).
    failing: bool,
}

/// One watched file.
struct Watched {
    path: PathBuf,
    /// The digest of the content the running config was (last) loaded from; `None` when that
    /// is unknown (any content is then a change).
    loaded: Option<String>,
}

impl FileWatcher {
    /// Watches the config file `path`; `loaded` is its content read just before the running
    /// config was loaded. The services' files are added by [`FileWatcher::watch_services`].
    pub fn new(path: PathBuf, loaded: Option<Vec<u8>>) -> Self {
        let loaded = loaded.map(|c| wharf_core::tls::files::content_digest(&c));
        FileWatcher {
            watched: vec![Watched { path, loaded }],
            settling: None,
            failing: false,
        }
    }

    /// The config file.
    pub fn path(&self) -> &Path {
        &self.watched[0].path
    }

    /// Every watched file, the config file first: what [`read_watched`] reads for
    /// [`FileWatcher::observe`] and [`FileWatcher::mark_loaded`].
    pub fn paths(&self) -> Vec<PathBuf> {
        self.watched.iter().map(|w| w.path.clone()).collect()
    }

    /// Watches the files of the running services (`keys`), after a start or a reload. A file
    /// already watched keeps what the watcher last saw (read before the reload); a new one is
    /// taken as loaded with the content the service was built from, so nothing changed in
    /// between goes unnoticed.
    pub fn watch_services<'a>(&mut self, keys: impl IntoIterator<Item = &'a ServiceKey>) {
        let mut watched: Vec<Watched> = self.watched.drain(..1).collect();
        let mut previous: Vec<Watched> = std::mem::take(&mut self.watched);
        for (path, digest) in keys.into_iter().flat_map(|k| &k.files) {
            if watched.iter().any(|w| &w.path == path) {
                continue;
            }
            let known = previous
                .iter_mut()
                .find(|w| &w.path == path)
                .and_then(|w| w.loaded.take());
            watched.push(Watched {
                path: path.clone(),
                loaded: known.or_else(|| Some(digest.clone())),
            });
        }
        self.watched = watched;
        self.settling = None;
    }

    /// Records the digests (read just before a reload, whatever triggered it) as the loaded
    /// ones, so the watcher does not report that content again. `None`: unknown.
    pub fn mark_loaded(&mut self, digests: Option<Vec<String>>) {
        let mut digests = digests.map(Vec::into_iter);
        for w in &mut self.watched {
            w.loaded = digests.as_mut().and_then(Iterator::next);
        }
        self.settling = None;
    }

    /// Takes one poll's read of [`FileWatcher::paths`]; when some content differs from the
    /// loaded one and has not changed since the previous poll, says which (for the log). The
    /// content is then taken as the loaded one: the caller is about to load it.
    pub fn observe(&mut self, read: io::Result<Vec<String>>) -> Option<String> {
        let digests = match read {
            Ok(d) if d.len() == self.watched.len() => {
                self.failing = false;
                d
            }
            Ok(_) => return None,
            Err(e) => {
                if !self.failing {
                    warn!(error = %e, "--watch-config: cannot read a watched file; still running the loaded configuration");
                }
                self.failing = true;
                return None;
            }
        };
        let changed = self
            .watched
            .iter()
            .zip(&digests)
            .position(|(w, d)| w.loaded.as_ref() != Some(d));
        let Some(changed) = changed else {
            self.settling = None;
            return None;
        };
        if self.settling.as_ref() != Some(&digests) {
            self.settling = Some(digests);
            return None;
        }
        let why = match changed {
            0 => "config file changed".to_string(),
            i => format!("{} changed", self.watched[i].path.display()),
        };
        self.mark_loaded(Some(digests));
        Some(why)
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
            files: Vec::new(),
        }
    }

    /// Sockets bound where configured (no port 0).
    fn bound(running: &[ServiceKey]) -> Vec<Listen> {
        running.iter().map(|k| k.listen.clone()).collect()
    }

    #[test]
    fn pinning_a_port_zero_service_to_its_port_keeps_the_socket() {
        let running = [key("a", "127.0.0.1:0", "x")];
        let bound = ["127.0.0.1:40000".parse().unwrap()];
        assert_eq!(
            diff(&running, &bound, &[key("a", "127.0.0.1:40000", "x")]),
            [Step::Swap { running: 0, new: 0 }]
        );
    }

    #[test]
    fn a_rename_plus_a_new_service_on_the_old_address() {
        // `a` moves away and `b` takes its address: b inherits the socket, a binds anew.
        let running = [key("a", "127.0.0.1:7001", "x")];
        let new = [
            key("a", "127.0.0.1:7002", "x"),
            key("b", "127.0.0.1:7001", "x"),
        ];
        assert_eq!(
            diff(&running, &bound(&running), &new),
            [Step::Start { new: 0 }, Step::Swap { running: 0, new: 1 }]
        );
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
            diff(&running, &bound(&running), &new),
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
            diff(&running, &bound(&running), &new),
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
            diff(&running, &bound(&running), &[key("a", "127.0.0.1:0", "x")]),
            [Step::Keep { running: 0, new: 0 }]
        );
        assert_eq!(
            diff(&running, &bound(&running), &[key("b", "127.0.0.1:0", "x")]),
            [Step::Start { new: 0 }, Step::Stop { running: 0 }]
        );
    }

    #[test]
    fn a_moved_service_gets_a_new_socket_and_the_old_one_closes() {
        let running = [key("a", "127.0.0.1:7001", "x")];
        let new = [key("a", "127.0.0.1:7005", "x")];
        assert_eq!(
            diff(&running, &bound(&running), &new),
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

    /// Digests standing for contents.
    fn read(contents: &[&str]) -> io::Result<Vec<String>> {
        Ok(contents.iter().map(|c| c.to_string()).collect())
    }

    #[test]
    fn the_watcher_waits_for_a_settled_change() {
        let mut w = FileWatcher::new("c.toml".into(), None);
        w.mark_loaded(Some(vec!["a".into()]));
        let changed = Some("config file changed".to_string());
        assert_eq!(w.observe(read(&["a"])), None);
        assert_eq!(
            w.observe(read(&["b"])),
            None,
            "a change is reported once it has settled"
        );
        assert_eq!(w.observe(read(&["b"])), changed);
        assert_eq!(w.observe(read(&["b"])), None, "reported once, then loaded");
        w.mark_loaded(Some(vec!["b".into()]));
        assert_eq!(w.observe(read(&["b"])), None);
        assert_eq!(
            w.observe(Err(io::Error::other("gone"))),
            None,
            "a missing file is not a change"
        );
        assert_eq!(w.observe(read(&["b"])), None, "back as loaded");
        assert_eq!(w.observe(read(&["c"])), None);
        assert_eq!(w.observe(read(&["d"])), None, "still changing");
        assert_eq!(w.observe(read(&["d"])), changed);
    }

    #[test]
    fn the_watcher_starts_from_the_content_read_before_the_load() {
        let mut w = FileWatcher::new("c.toml".into(), Some(b"x".to_vec()));
        let x = wharf_core::tls::files::content_digest(b"x");
        assert_eq!(w.observe(Ok(vec![x.clone()])), None);
        assert_eq!(w.observe(Ok(vec![x])), None);
    }

    fn with_files(files: &[(&str, &str)]) -> ServiceKey {
        ServiceKey {
            files: files
                .iter()
                .map(|(path, digest)| (PathBuf::from(path), digest.to_string()))
                .collect(),
            ..key("s", "127.0.0.1:1", "x")
        }
    }

    #[test]
    fn the_watcher_notices_a_service_file_alone_changing() {
        let mut w = FileWatcher::new("c.toml".into(), None);
        w.mark_loaded(Some(vec!["config".into()]));
        // Two services sharing a certificate: each file is watched once.
        w.watch_services(&[
            with_files(&[("s.pem", "cert"), ("s.key", "key")]),
            with_files(&[("s.pem", "cert"), ("s.key", "key")]),
        ]);
        assert_eq!(w.paths(), ["c.toml", "s.pem", "s.key"].map(PathBuf::from));
        assert_eq!(w.observe(read(&["config", "cert", "key"])), None);
        // certbot renews: both files change, the config does not.
        assert_eq!(w.observe(read(&["config", "cert2", "key2"])), None);
        assert_eq!(
            w.observe(read(&["config", "cert2", "key2"])),
            Some("s.pem changed".into())
        );
        assert_eq!(w.observe(read(&["config", "cert2", "key2"])), None);
    }

    #[test]
    fn after_a_reload_the_watcher_keeps_what_it_saw_and_takes_new_files_as_loaded() {
        let mut w = FileWatcher::new("c.toml".into(), None);
        w.mark_loaded(Some(vec!["config".into()]));
        w.watch_services(&[with_files(&[("a.pem", "a")])]);
        // Seen just before the reload: a.pem as "a2". The new plan read it as "a3" (it
        // changed during the load) and added b.pem.
        w.mark_loaded(Some(vec!["config2".into(), "a2".into()]));
        w.watch_services(&[with_files(&[("a.pem", "a3"), ("b.pem", "b")])]);
        assert_eq!(w.paths(), ["c.toml", "a.pem", "b.pem"].map(PathBuf::from));
        assert_eq!(w.observe(read(&["config2", "a2", "b"])), None);
        // a.pem is "a3" now, which the watcher had not seen: a change (a reload that finds
        // nothing new to do), never a missed one.
        assert_eq!(w.observe(read(&["config2", "a3", "b"])), None);
        assert_eq!(
            w.observe(read(&["config2", "a3", "b"])),
            Some("a.pem changed".into())
        );
        // A service gone: its file is no longer watched.
        w.watch_services(std::iter::empty());
        assert_eq!(w.paths(), [PathBuf::from("c.toml")]);
    }

    #[tokio::test]
    async fn the_watcher_reads_only_regular_files() {
        let fifo = std::env::temp_dir().join(format!("wharf-fifo-{}", std::process::id()));
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo with a valid C string.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let read = read_watched(vec![fifo.clone()]).await;
        std::fs::remove_file(&fifo).unwrap();
        let e = read.unwrap_err().to_string();
        assert!(
            e.ends_with(&format!("{}: not a regular file", fifo.display())),
            "{e}"
        );
    }
}
