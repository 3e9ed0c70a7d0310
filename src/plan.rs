//! From config sources to a validated plan: every service's plugin resolved and built.
//!
//! `wharf check` stops here; `wharf serve` binds the plan. Nothing in this module touches the
//! network, and it collects every error instead of stopping at the first.

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::Path;

use figment::value::{Dict, Value};
use wharf_core::config::{BackendChoice, Config, ConfigError, ConfigSource, ServiceConfig};
use wharf_core::listen::Listen;
use wharf_core::tls::files::LoadedTls;

use crate::registry::{BuiltService, PluginEntry, Registry};

/// The embedded default configuration.
pub const DEFAULT_CONFIG: &str = include_str!("../configs/default.toml");

/// Command-line flags that override config keys.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    /// `--backend`
    pub backend: Option<BackendChoice>,
    /// `--workers`
    pub workers: Option<usize>,
}

/// A validated configuration with every service built.
pub struct Plan {
    /// Where the configuration came from.
    pub origin: String,
    /// The framework-level settings.
    pub config: Config,
    /// Services in name order.
    pub services: Vec<PlannedService>,
    /// Kept for locating errors found later (bind failures).
    pub source: ConfigSource,
    /// The access log file, opened for appending (created) while planning, before anything
    /// binds; `None` without `[access_log]` or with `path = "-"` (standard error).
    pub access_log_file: Option<std::fs::File>,
}

/// One service, validated and built.
pub struct PlannedService {
    /// The name the config gave it.
    pub name: String,
    /// Its framework-level settings.
    pub config: ServiceConfig,
    /// The plugin instance.
    pub built: BuiltService,
    /// `[services.<name>.tls]`, its files read and checked; `None` for a plaintext service.
    pub tls: Option<LoadedTls>,
}

/// Loads `file` (or the embedded default) with the `WHARF_` variables of `env` (the process's
/// `std::env::vars_os()`; other variables are ignored) and the flags, validates and builds
/// everything; returns every error found.
pub fn load(
    file: Option<&Path>,
    env: impl IntoIterator<Item = (OsString, OsString)>,
    overrides: &Overrides,
    registry: &Registry,
) -> Result<Plan, Vec<ConfigError>> {
    let source = ConfigSource::load(file, DEFAULT_CONFIG, env, overrides_dict(overrides))?;
    build(source, registry)
}

/// Like [`load`] on a config given as text (`origin` names it in errors), without environment
/// overrides: for tools and tests.
pub fn load_str(text: &str, origin: &str, registry: &Registry) -> Result<Plan, Vec<ConfigError>> {
    load_parts(text, origin, [], registry)
}

/// Like [`load`] on a config given as text and environment variables given as pairs, touching
/// neither the file system nor the process environment: for tests and fuzzing.
pub fn load_parts(
    text: &str,
    origin: &str,
    env: impl IntoIterator<Item = (OsString, OsString)>,
    registry: &Registry,
) -> Result<Plan, Vec<ConfigError>> {
    build(
        ConfigSource::from_parts(text, origin, env, Dict::new())?,
        registry,
    )
}

/// Validates every section and builds every service of `source`.
fn build(source: ConfigSource, registry: &Registry) -> Result<Plan, Vec<ConfigError>> {
    let (config, mut errors) = source.resolve();
    let mut services = Vec::new();
    let mut addresses: HashMap<Listen, String> = HashMap::new();
    if let Some(metrics) = &config.metrics {
        addresses.insert(Listen::Tcp(metrics.listen), "metrics.listen".into());
    }

    for (name, svc) in &config.services {
        let key = format!("services.{name}.listen");
        if !svc.listen.is_ephemeral() {
            if let Some(other) = addresses.insert(svc.listen.clone(), key.clone()) {
                errors.push(source.value_error_at(&key, format!("already used by {other}")));
            }
        }
        let Some(plugin) = registry.get(&svc.plugin) else {
            errors.push(unknown_plugin(&source, registry, name, &svc.plugin));
            continue;
        };
        if let Err(e) = check_datagrams(&source, name, svc, plugin) {
            errors.push(e);
            continue;
        }
        let tls = load_tls(&source, name, svc, plugin.alpn).unwrap_or_else(|e| {
            errors.extend(e);
            None
        });
        match plugin.build(&source, name) {
            Ok(built) => services.push(PlannedService {
                name: name.clone(),
                config: svc.clone(),
                built,
                tls,
            }),
            Err(e) if needs_the_repository(&source, name, &svc.plugin, &e) => {
                tracing::warn!(
                    service = %name,
                    "left out of the embedded default config: {}; run wharf from the \
                     repository (its files/ directory) or give a config with --config",
                    e[0]
                );
            }
            Err(e) => errors.extend(e),
        }
    }

    // A service whose framework keys are wrong still has its plugin and options checked, so
    // that one run reports every error.
    for (name, plugin) in source.plugins_by_service() {
        if config.services.contains_key(&name) {
            continue;
        }
        match registry.get(&plugin) {
            Some(entry) => errors.extend(entry.build(&source, &name).err().unwrap_or_default()),
            None => errors.push(unknown_plugin(&source, registry, &name, &plugin)),
        }
    }

    // Opened (created) now, so that a path it cannot write is a config error before anything
    // binds, and `wharf check` finds it too.
    let access_log_file = match &config.access_log {
        Some(log) => wharf_core::access_log::open(log).unwrap_or_else(|e| {
            let message = format!("cannot open {} for appending: {e}", log.path.display());
            errors.push(source.value_error_at("access_log.path", message));
            None
        }),
        None => None,
    };

    if errors.is_empty() {
        Ok(Plan {
            origin: source.origin().to_string(),
            config,
            services,
            source,
            access_log_file,
        })
    } else {
        Err(errors)
    }
}

/// Reads and checks a service's TLS files (`default_alpn`: the plugin's, when the config names
/// none); each problem becomes an error at its key under
/// `services.<name>.tls`.
fn load_tls(
    source: &ConfigSource,
    name: &str,
    svc: &ServiceConfig,
    default_alpn: &[&str],
) -> Result<Option<LoadedTls>, Vec<ConfigError>> {
    let Some(tls) = &svc.tls else {
        return Ok(None);
    };
    wharf_core::tls::files::load(tls, default_alpn)
        .map(Some)
        .map_err(|errors| {
            errors
                .into_iter()
                .map(|e| source.error_at(&format!("services.{name}.tls.{}", e.key), e.message))
                .collect()
        })
}

/// A `udp:` address needs a plugin that answers datagrams.
fn check_datagrams(
    source: &ConfigSource,
    name: &str,
    svc: &ServiceConfig,
    plugin: &PluginEntry,
) -> Result<(), ConfigError> {
    if svc.listen.is_stream() || plugin.datagrams {
        return Ok(());
    }
    Err(source.value_error_at(
        &format!("services.{name}.listen"),
        format!(
            "plugin `{}` serves stream connections only, not UDP datagrams (plugins that \
             answer datagrams say so in `wharf plugins`)",
            plugin.name
        ),
    ))
}

fn unknown_plugin(
    source: &ConfigSource,
    registry: &Registry,
    service: &str,
    plugin: &str,
) -> ConfigError {
    source.value_error_at(
        &format!("services.{service}.plugin"),
        format!(
            "unknown plugin `{plugin}`; valid choices: {}",
            registry.names().join(", ")
        ),
    )
}

/// The embedded default's file-get service serves `files`, relative to the working directory:
/// the repository's sample files. Started anywhere else, that service is left out (with a
/// warning) rather than stopping `wharf serve` from any directory; a config file given with
/// `--config` gets no such leniency.
fn needs_the_repository(
    source: &ConfigSource,
    service: &str,
    plugin: &str,
    errors: &[ConfigError],
) -> bool {
    let root_key = format!("services.{service}.options.root");
    source.origin() == wharf_core::config::EMBEDDED_ORIGIN
        && plugin == "file-get"
        && !errors.is_empty()
        && errors.iter().all(|e| e.key == root_key)
}

fn overrides_dict(o: &Overrides) -> Dict {
    let mut server = Dict::new();
    if let Some(backend) = o.backend {
        server.insert("backend".into(), Value::from(backend.as_str()));
    }
    if let Some(workers) = o.workers {
        server.insert("workers".into(), Value::from(workers as u64));
    }
    let mut top = Dict::new();
    if !server.is_empty() {
        top.insert("server".into(), Value::from(server));
    }
    top
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn write_config(text: &str) -> tempfile_path::TempConfig {
        tempfile_path::TempConfig::new(text)
    }

    /// A tiny self-cleaning temp file (no extra crate for one test helper).
    mod tempfile_path {
        pub struct TempConfig(pub std::path::PathBuf);
        impl TempConfig {
            pub fn new(text: &str) -> Self {
                use std::sync::atomic::{AtomicUsize, Ordering};
                static N: AtomicUsize = AtomicUsize::new(0);
                let path = std::env::temp_dir().join(format!(
                    "wharf-plan-{}-{}.toml",
                    std::process::id(),
                    N.fetch_add(1, Ordering::Relaxed)
                ));
                let mut f = std::fs::File::create(&path).unwrap();
                super::Write::write_all(&mut f, text.as_bytes()).unwrap();
                TempConfig(path)
            }
        }
        impl Drop for TempConfig {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
    }

    #[test]
    fn embedded_default_is_valid_and_binds_loopback_only() {
        let plan = load(None, [], &Overrides::default(), &Registry::with_builtins()).unwrap();
        assert!(!plan.services.is_empty());
        for s in &plan.services {
            assert!(
                s.config.listen.is_local(),
                "{} binds {}",
                s.name,
                s.config.listen
            );
        }
        assert!(plan.config.metrics.unwrap().listen.ip().is_loopback());
    }

    #[test]
    fn plugin_and_option_errors_name_file_key_and_choices() {
        let cfg = write_config(
            "[services.a]\nplugin = 'ech'\nlisten = '127.0.0.1:7001'\n\
             [services.b]\nplugin = 'echo'\nlisten = '127.0.0.1:7002'\n\
             [services.b.options]\ntransfrom = 'upper'\n\
             [services.c]\nplugin = 'echo'\nlisten = '127.0.0.1:7002'\n\
             [services.c.options]\ntransform = 'lower'\n",
        );
        let errors = load(
            Some(&cfg.0),
            [],
            &Overrides::default(),
            &Registry::with_builtins(),
        )
        .err()
        .unwrap();
        let all: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
        let file = cfg.0.display().to_string();
        assert!(all.iter().all(|e| e.starts_with(&file)), "{all:#?}");
        let has = |needle: &str| all.iter().any(|e| e.contains(needle));
        assert!(
            has("services.a.plugin = \"ech\": unknown plugin `ech`; valid choices: echo"),
            "{all:#?}"
        );
        assert!(
            has("services.b.options.transfrom = \"upper\": unknown key"),
            "{all:#?}"
        );
        assert!(
            has("services.c.options.transform = \"lower\": unknown value `lower`; valid choices: none, upper"),
            "{all:#?}"
        );
        assert!(
            has("services.c.listen = \"127.0.0.1:7002\": already used by services.b.listen"),
            "{all:#?}"
        );
    }

    #[test]
    fn cli_overrides_win() {
        let o = Overrides {
            backend: Some(wharf_core::config::BackendKind::Epoll.into()),
            workers: Some(3),
        };
        let plan = load(None, [], &o, &Registry::with_builtins()).unwrap();
        let epoll = BackendChoice::Kind(wharf_core::config::BackendKind::Epoll);
        assert_eq!(plan.config.server.backend, epoll);
        assert_eq!(plan.config.server.workers, 3);
    }
}
