//! The config model and its loader.
//!
//! Sources, later ones winning: a TOML file (or the embedded default), `WHARF_`-prefixed
//! environment variables split on `__` (`WHARF_SERVICES__ECHO__LISTEN=0.0.0.0:7000`), then
//! command-line flags. Every section is checked separately so one run reports every error, each
//! naming where the value came from (file or environment variable) and its key.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use figment::providers::{Env, Format, Toml};
use figment::value::{Dict, Value};
use figment::{Figment, Provider};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::net::Cidr;

/// The whole resolved configuration.
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    /// Process-wide settings.
    pub server: ServerConfig,
    /// The Prometheus endpoint; `None` turns metrics off.
    pub metrics: Option<MetricsConfig>,
    /// Services by the name the user gave them.
    pub services: BTreeMap<String, ServiceConfig>,
}

/// `[server]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Which IO mechanism the workers use.
    pub backend: BackendChoice,
    /// Worker threads; 0 means one per CPU.
    pub workers: usize,
    /// How long open connections may run after SIGTERM/SIGINT before they are closed.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            backend: BackendChoice::Auto,
            workers: 0,
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

/// `server.backend`
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendChoice {
    /// io_uring when the kernel allows a ring, else epoll.
    #[default]
    Auto,
    /// tokio (epoll readiness).
    Epoll,
    /// tokio-uring (completion-based io_uring).
    IoUring,
}

impl BackendChoice {
    /// The spelling used in configs and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            BackendChoice::Auto => "auto",
            BackendChoice::Epoll => "epoll",
            BackendChoice::IoUring => "io_uring",
        }
    }
}

/// `[metrics]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address of the `/metrics` HTTP endpoint.
    pub listen: SocketAddr,
    /// Networks allowed to scrape; others get 403. Empty allows everyone who can connect.
    #[serde(default)]
    pub allow_from: Vec<Cidr>,
}

/// `[services.<name>]`: which plugin, where, and the limits the framework applies to it.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// Registered plugin name.
    pub plugin: String,
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Connections open at once; more are closed at accept and counted as rejected.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Close a connection whose read or write makes no progress for this long; `0s` disables.
    #[serde(default = "default_idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Blocking-pool jobs (file opens, hashing, directory reads) this service runs at once,
    /// across all workers; more wait in line (first come, first served).
    #[serde(default = "default_max_blocking")]
    pub max_blocking: usize,
    /// Client networks allowed to connect; empty allows everyone who can reach `listen`.
    #[serde(default)]
    pub allow_from: Vec<Cidr>,
    /// Plugin options, checked by the plugin's own typed struct (see [`ConfigSource::extract`]).
    #[serde(default, skip_serializing)]
    pub options: Dict,
}

fn default_max_connections() -> usize {
    10_000
}

fn default_max_blocking() -> usize {
    8
}

/// Most `max_blocking` accepted: each job can occupy a thread.
pub const MAX_BLOCKING: usize = 256;

fn default_idle_timeout() -> Duration {
    Duration::from_secs(300)
}

/// One problem in the configuration, located by source and key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Where the value came from: a file path, an environment variable, or the embedded default.
    pub origin: String,
    /// Dotted key path, e.g. `services.echo.options.transform`.
    pub key: String,
    /// What is wrong, with the valid choices where there is a fixed set.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}: {}", self.origin, self.message)
        } else {
            write!(f, "{}: {}: {}", self.origin, self.key, self.message)
        }
    }
}

/// The merged configuration sources, kept so plugin options can be extracted (with full key
/// paths in errors) once the plugin is known.
#[derive(Clone)]
pub struct ConfigSource {
    figment: Figment,
    origin: String,
}

/// Most worker threads accepted.
const MAX_WORKERS: usize = 1024;

/// Prefix of environment overrides.
pub const ENV_PREFIX: &str = "WHARF_";

/// `WHARF_LOG` is the log filter, not a config key.
const LOG_ENV_KEY: &str = "log";

/// Keys allowed at the top level.
const SECTIONS: &[&str] = &["server", "metrics", "services"];

impl ConfigSource {
    /// Merges `file` (or, when `None`, the `embedded` default TOML), the `WHARF_` environment and
    /// `overrides` (command-line flags).
    pub fn load(
        file: Option<&Path>,
        embedded: &str,
        overrides: impl Provider,
    ) -> Result<Self, Vec<ConfigError>> {
        let (base, origin) = match file {
            Some(path) => {
                let origin = path.display().to_string();
                if !path.is_file() {
                    return Err(vec![ConfigError {
                        origin,
                        key: String::new(),
                        message: "config file not found (or not a regular file)".into(),
                    }]);
                }
                (Figment::from(Toml::file_exact(path)), origin)
            }
            None => (
                Figment::from(Toml::string(embedded)),
                "embedded configs/default.toml".to_string(),
            ),
        };
        let figment = base
            .merge(Env::prefixed(ENV_PREFIX).ignore(&[LOG_ENV_KEY]).split("__"))
            .merge(overrides);
        Ok(ConfigSource { figment, origin })
    }

    /// A config given as TOML text, named `origin` in errors, without environment overrides.
    pub fn from_toml_str(text: &str, origin: &str) -> Self {
        ConfigSource {
            figment: Figment::from(Toml::string(text)),
            origin: origin.to_string(),
        }
    }

    /// Where the base config came from, for messages.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// Resolves and checks every framework-level section, reporting all errors at once.
    pub fn config(&self) -> Result<Config, Vec<ConfigError>> {
        let (config, errors) = self.resolve();
        if errors.is_empty() {
            Ok(config)
        } else {
            Err(errors)
        }
    }

    /// Like [`ConfigSource::config`], but returns whatever did parse alongside the errors, so
    /// callers can go on checking (plugins, options) and report everything in one run.
    pub fn resolve(&self) -> (Config, Vec<ConfigError>) {
        let mut errors = Vec::new();
        let top: Dict = match self.figment.extract() {
            Ok(top) => top,
            Err(e) => {
                let config = Config {
                    server: ServerConfig::default(),
                    metrics: None,
                    services: BTreeMap::new(),
                };
                return (config, self.errors(e, ""));
            }
        };
        for key in top.keys().filter(|k| !SECTIONS.contains(&k.as_str())) {
            errors.push(self.error_at(
                key,
                format!(
                    "unknown section `{key}`, expected one of: {}",
                    SECTIONS.join(", ")
                ),
            ));
        }

        let server = self.section("server", &mut errors).unwrap_or_default();
        let metrics = self.section("metrics", &mut errors);

        let mut services = BTreeMap::new();
        match top.get("services") {
            None => {}
            Some(Value::Dict(_, names)) => {
                for name in names.keys() {
                    if let Err(message) = check_service_name(name) {
                        errors.push(self.error_at(&format!("services.{name}"), message));
                        continue;
                    }
                    if let Some(svc) = self.section(&format!("services.{name}"), &mut errors) {
                        services.insert(name.clone(), svc);
                    }
                }
            }
            Some(_) => {
                errors.push(self.error_at("services", "expected a table of services".into()))
            }
        }
        if services.is_empty() && errors.iter().all(|e| !e.key.starts_with("services")) {
            errors.push(self.error_at("services", "no service is configured".into()));
        }
        errors.extend(self.check_bounds(&server, &services));
        let config = Config {
            server,
            metrics,
            services,
        };
        (config, errors)
    }

    /// Range checks serde cannot express.
    fn check_bounds(
        &self,
        server: &ServerConfig,
        services: &BTreeMap<String, ServiceConfig>,
    ) -> Vec<ConfigError> {
        const DAY: Duration = Duration::from_secs(24 * 3600);
        let mut errors = Vec::new();
        if server.workers > MAX_WORKERS {
            errors.push(self.error_at("server.workers", format!("at most {MAX_WORKERS}")));
        }
        if server.shutdown_grace > DAY {
            errors.push(self.error_at("server.shutdown_grace", "at most 24h".into()));
        }
        for (name, svc) in services {
            if svc.max_connections == 0 {
                let key = format!("services.{name}.max_connections");
                errors.push(self.error_at(&key, "must be at least 1".into()));
            }
            if !(1..=MAX_BLOCKING).contains(&svc.max_blocking) {
                let key = format!("services.{name}.max_blocking");
                errors.push(self.error_at(&key, format!("must be 1..={MAX_BLOCKING}")));
            }
            if svc.idle_timeout > DAY {
                let key = format!("services.{name}.idle_timeout");
                errors.push(self.error_at(&key, "at most 24h (\"0s\" turns it off)".into()));
            }
        }
        errors
    }

    /// Extracts `key` (a dotted path) as `T`; an absent key deserializes from an empty table, so
    /// a struct with defaults needs no section at all and a required field is reported by name.
    pub fn extract<T: DeserializeOwned>(&self, key: &str) -> Result<T, Vec<ConfigError>> {
        let figment = if self.figment.contains(key) {
            self.figment.clone()
        } else {
            self.figment
                .clone()
                .join(figment::providers::Serialized::default(key, Dict::new()))
        };
        figment.extract_inner(key).map_err(|e| self.errors(e, key))
    }

    /// Builds an error located at `key`, attributed to whichever source set that key.
    pub fn error_at(&self, key: &str, message: String) -> ConfigError {
        let origin = self
            .figment
            .find_metadata(key)
            .map(|md| self.describe_origin(md, key))
            .unwrap_or_else(|| self.origin.clone());
        ConfigError {
            origin,
            key: key.to_string(),
            message,
        }
    }

    fn section<T: DeserializeOwned>(&self, key: &str, errors: &mut Vec<ConfigError>) -> Option<T> {
        if !self.figment.contains(key) {
            return None;
        }
        match self.figment.extract_inner(key) {
            Ok(v) => Some(v),
            Err(e) => {
                errors.extend(self.errors(e, key));
                None
            }
        }
    }

    /// Converts figment's errors; `prefix` is the key that was extracted (figment appends its parts to
    /// the end of the error path; we want them first).
    fn errors(&self, error: figment::Error, prefix: &str) -> Vec<ConfigError> {
        error
            .into_iter()
            .map(|e| {
                let mut path = e.path.clone();
                let prefix_parts: Vec<&str> = prefix.split('.').filter(|p| !p.is_empty()).collect();
                if path.ends_with(
                    &prefix_parts
                        .iter()
                        .map(|p| p.to_string())
                        .collect::<Vec<_>>(),
                ) {
                    path.truncate(path.len() - prefix_parts.len());
                }
                let key = std::iter::once(prefix)
                    .filter(|p| !p.is_empty())
                    .chain(path.iter().map(String::as_str))
                    .collect::<Vec<_>>()
                    .join(".");
                let origin = match &e.metadata {
                    Some(md) => self.describe_origin(md, &key),
                    None => self.origin.clone(),
                };
                ConfigError {
                    origin,
                    key,
                    message: describe_kind(&e.kind),
                }
            })
            .collect()
    }

    fn describe_origin(&self, md: &figment::Metadata, key: &str) -> String {
        if let Some(figment::Source::File(_)) = md.source {
            // One file at most: name it as the user wrote it.
            return self.origin.clone();
        }
        if md.name.contains("environment") {
            // The variable that set this key: WHARF_ + path segments joined by `__`.
            let var = key
                .split('.')
                .filter(|k| !k.is_empty())
                .map(str::to_ascii_uppercase)
                .collect::<Vec<_>>()
                .join("__");
            return format!("environment variable {ENV_PREFIX}{var}");
        }
        self.origin.clone()
    }
}

/// figment's wording, with the valid choices spelled plainly.
fn describe_kind(kind: &figment::error::Kind) -> String {
    use figment::error::Kind;
    match kind {
        Kind::UnknownVariant(found, expected) => {
            format!(
                "unknown value `{found}`; valid choices: {}",
                expected.join(", ")
            )
        }
        Kind::UnknownField(found, expected) => {
            format!("unknown key `{found}`; valid keys: {}", expected.join(", "))
        }
        Kind::MissingField(name) => format!("missing required key `{name}`"),
        other => other.to_string(),
    }
}

/// Service names become metric label values and `__`-separated environment keys, so they stay
/// simple: lowercase ASCII letters, digits, `-` and `_`.
fn check_service_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "service name `{name}` must be 1-64 characters of a-z, 0-9, `-` and `_`"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use figment::providers::Serialized;

    fn load(toml: &str) -> ConfigSource {
        ConfigSource::load(None, toml, Serialized::defaults(Dict::new())).unwrap()
    }

    #[test]
    fn full_config_resolves_with_defaults() {
        let src = load(
            r#"
            [server]
            backend = "epoll"
            [metrics]
            listen = "127.0.0.1:9898"
            [services.echo]
            plugin = "echo"
            listen = "127.0.0.1:6969"
            allow_from = ["127.0.0.1", "10.0.0.0/8"]
            idle_timeout = "90s"
            [services.echo.options]
            transform = "upper"
            "#,
        );
        let cfg = src.config().unwrap();
        assert_eq!(cfg.server.backend, BackendChoice::Epoll);
        assert_eq!(cfg.server.shutdown_grace, Duration::from_secs(30));
        let echo = &cfg.services["echo"];
        assert_eq!(echo.idle_timeout, Duration::from_secs(90));
        assert_eq!(echo.max_connections, 10_000);
        assert_eq!(echo.allow_from.len(), 2);
    }

    #[test]
    fn every_error_is_reported_with_its_key() {
        let src = load(
            r#"
            [server]
            backend = "kqueue"
            [services.echo]
            plugin = "echo"
            listen = "nowhere"
            [services.two]
            plugin = "echo"
            listen = "127.0.0.1:1"
            max_conections = 5
            [bogus]
            "#,
        );
        let errors = src.config().unwrap_err();
        let text: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
        let all = text.join("\n");
        assert!(all.contains("server.backend"), "{all}");
        assert!(
            all.contains("valid choices: auto, epoll, io_uring"),
            "{all}"
        );
        assert!(all.contains("services.echo.listen"), "{all}");
        assert!(all.contains("services.two.max_conections"), "{all}");
        assert!(all.contains("bogus"), "{all}");
        assert!(errors.len() >= 4, "{all}");
    }

    #[test]
    fn bad_service_names_and_empty_configs_are_errors() {
        let errors = load("[services.Echo]\nplugin='echo'\nlisten='127.0.0.1:1'\n")
            .config()
            .unwrap_err();
        assert!(
            errors[0].to_string().contains("services.Echo"),
            "{errors:?}"
        );
        let errors = load("").config().unwrap_err();
        assert!(errors[0].message.contains("no service"), "{errors:?}");
        let errors = load("[services]\n").config().unwrap_err();
        assert!(errors[0].message.contains("no service"), "{errors:?}");
        let errors = load(
            "[server]\nworkers = 5000\n[services.e]\nplugin='echo'\nlisten='127.0.0.1:1'\n\
             max_connections = 0\nidle_timeout = '400days'\n",
        )
        .config()
        .unwrap_err();
        let keys: Vec<&str> = errors.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "server.workers",
                "services.e.max_connections",
                "services.e.idle_timeout"
            ]
        );
    }

    #[test]
    fn extract_names_nested_option_keys() {
        #[derive(Deserialize, Debug)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct Opts {
            transform: String,
        }
        let src = load("[services.e]\nplugin='echo'\nlisten='127.0.0.1:1'\n[services.e.options]\ntransfrom='upper'\n");
        let errors = src.extract::<Opts>("services.e.options").unwrap_err();
        assert_eq!(errors[0].key, "services.e.options.transfrom", "{errors:?}");
        // absent section: required field reported under the section's path
        let src = load("[services.e]\nplugin='echo'\nlisten='127.0.0.1:1'\n");
        let errors = src.extract::<Opts>("services.e.options").unwrap_err();
        assert!(errors[0].to_string().contains("transform"), "{errors:?}");
    }
}
