//! The config model and its loader.
//!
//! Sources, later ones winning: a TOML file (or the embedded default), `WHARF_`-prefixed
//! environment variables split on `__` (`WHARF_SERVICES__ECHO__LISTEN=0.0.0.0:7000`), then
//! command-line flags. Every section is checked separately so one run reports every error, each
//! naming where the value came from (file or environment variable) and its key.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;
use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::value::{Dict, Value};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::listen::Listen;
use crate::net::Cidr;
use crate::unix::SocketMode;

/// The whole resolved configuration.
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    /// Process-wide settings.
    pub server: ServerConfig,
    /// The Prometheus endpoint; `None` turns metrics off.
    pub metrics: Option<MetricsConfig>,
    /// The access log; `None` turns it off.
    pub access_log: Option<AccessLogConfig>,
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

/// An IO backend the workers can run: the one list of backends (the binary's `backends`
/// module maps each to its implementation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackendKind {
    /// tokio (epoll readiness).
    Epoll,
    /// tokio-uring (completion-based io_uring).
    IoUring,
}

impl BackendKind {
    /// Every backend, in the order they are listed to users.
    pub const ALL: [BackendKind; 2] = [BackendKind::Epoll, BackendKind::IoUring];

    /// The spelling used in configs, on the command line and in metric labels.
    pub const fn as_str(self) -> &'static str {
        match self {
            BackendKind::Epoll => "epoll",
            BackendKind::IoUring => "io_uring",
        }
    }

    /// Other spellings accepted for this backend.
    pub const fn aliases(self) -> &'static [&'static str] {
        match self {
            BackendKind::Epoll => &[],
            BackendKind::IoUring => &["io-uring", "uring"],
        }
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for BackendKind {
    type Err = UnknownBackend;

    fn from_str(s: &str) -> Result<Self, UnknownBackend> {
        BackendKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s || k.aliases().contains(&s))
            .ok_or_else(|| UnknownBackend(s.to_string()))
    }
}

/// A backend name that is none of [`BackendChoice::NAMES`] (nor an alias).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownBackend(pub String);

impl fmt::Display for UnknownBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "unknown backend `{}`; valid choices: {}",
            self.0,
            BackendChoice::NAMES.join(", ")
        )
    }
}

impl std::error::Error for UnknownBackend {}

/// `server.backend`: a backend, or `auto` (io_uring when the kernel allows a ring, else epoll).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackendChoice {
    /// io_uring when the kernel allows a ring, else epoll.
    #[default]
    Auto,
    /// This backend, or a startup error if it cannot run.
    Kind(BackendKind),
}

impl BackendChoice {
    /// Every value's spelling: `auto`, then each backend's.
    pub const NAMES: [&'static str; BackendKind::ALL.len() + 1] = {
        let mut names = ["auto"; BackendKind::ALL.len() + 1];
        let mut i = 0;
        while i < BackendKind::ALL.len() {
            names[i + 1] = BackendKind::ALL[i].as_str();
            i += 1;
        }
        names
    };

    /// The spelling used in configs and on the command line.
    pub const fn as_str(self) -> &'static str {
        match self {
            BackendChoice::Auto => "auto",
            BackendChoice::Kind(kind) => kind.as_str(),
        }
    }
}

impl From<BackendKind> for BackendChoice {
    fn from(kind: BackendKind) -> Self {
        BackendChoice::Kind(kind)
    }
}

impl std::str::FromStr for BackendChoice {
    type Err = UnknownBackend;

    fn from_str(s: &str) -> Result<Self, UnknownBackend> {
        match s {
            "auto" => Ok(BackendChoice::Auto),
            other => other.parse().map(BackendChoice::Kind),
        }
    }
}

impl Serialize for BackendChoice {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for BackendChoice {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        name.parse()
            .map_err(|_| serde::de::Error::unknown_variant(&name, &BackendChoice::NAMES))
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
    /// Where clients reach it: a TCP address, `unix:/path` or `unix:@name`, or `udp:IP:port`
    /// (see [`Listen`]).
    pub listen: Listen,
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
    /// Client identities (names from verified TLS client certificates) allowed to use the
    /// service; empty allows every client the TLS settings accept. Needs `tls.client_ca`.
    #[serde(default)]
    pub allow_identities: Vec<String>,
    /// Unix-domain listeners: the socket file's permission bits, in octal (`"0660"`, the
    /// default: the owner and the file's group may connect). Not for `unix:@name`.
    #[serde(default)]
    pub socket_mode: Option<SocketMode>,
    /// Unix-domain listeners: the group the socket file is given (a name or a numeric ID), so
    /// that its members may connect; absent: wharf's own group. Not for `unix:@name`.
    #[serde(default)]
    pub socket_group: Option<String>,
    /// Unix-domain listeners: user IDs of the peers admitted (`SO_PEERCRED`); a peer passes if
    /// its uid is here or its gid is in `allow_gids`. Both empty: every peer that can connect.
    #[serde(default)]
    pub allow_uids: Vec<u32>,
    /// Unix-domain listeners: group IDs of the peers admitted (the peer's primary group).
    #[serde(default)]
    pub allow_gids: Vec<u32>,
    /// PROXY protocol: connections from `trusted_proxies` must start with a header of this
    /// version naming the real client, which then counts as the peer for everything
    /// (`allow_from`, per-source limits, logs, plugins). Absent: off.
    #[serde(default)]
    pub proxy_protocol: Option<ProxyProtocol>,
    /// Peers allowed to send a PROXY header; required with `proxy_protocol`, which refuses
    /// connections from anyone else.
    #[serde(default)]
    pub trusted_proxies: Vec<Cidr>,
    /// How long a trusted proxy has, from accept, to send the whole PROXY header.
    #[serde(default = "default_proxy_header_timeout", with = "humantime_serde")]
    pub proxy_header_timeout: Duration,
    /// Connections open at once from one client source (an IPv4 address, or an IPv6 prefix of
    /// `source_prefix_v6` bits); absent: no per-source bound below `max_connections`.
    #[serde(default)]
    pub max_connections_per_source: Option<usize>,
    /// New connections per second the whole service accepts (a token bucket with a burst of
    /// one second's worth); absent: no bound.
    #[serde(default)]
    pub max_connection_rate: Option<u32>,
    /// New connections per second from one client source (same bucket shape); absent: no
    /// bound.
    #[serde(default)]
    pub max_connection_rate_per_source: Option<u32>,
    /// IPv6 clients are grouped into sources by this prefix length (a host usually gets a
    /// /64, so rotating addresses inside it does not dodge a per-source limit).
    #[serde(default = "default_source_prefix_v6")]
    pub source_prefix_v6: u8,
    /// UDP services: the largest datagram answered, in bytes; larger ones are dropped and
    /// counted (`reason="max_datagram_size"`). Each worker holds two batches of buffers this
    /// size per UDP socket.
    #[serde(default = "crate::udp::default_max_datagram_size")]
    pub max_datagram_size: usize,
    /// UDP services: datagrams per second answered from one source (a token bucket with a
    /// burst of one second's worth); `0`: no bound. On by default: see `crate::udp`.
    #[serde(default = "crate::udp::default_max_datagram_rate_per_source")]
    pub max_datagram_rate_per_source: u32,
    /// UDP services: datagrams per second the whole service answers; absent: no bound.
    #[serde(default)]
    pub max_datagram_rate: Option<u32>,
    /// Whether this service writes to the access log (when `[access_log]` is configured).
    #[serde(default = "default_true")]
    pub access_log: bool,
    /// `[services.<name>.tls]`: TLS on this service's connections; absent means plaintext.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Plugin options, checked by the plugin's own typed struct (see [`ConfigSource::extract`]).
    #[serde(default, skip_serializing)]
    pub options: Dict,
}

/// `proxy_protocol`: which PROXY protocol header versions a service accepts.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ProxyProtocol {
    /// The text header (`PROXY TCP4 ...\r\n`) only.
    V1,
    /// The binary header only.
    V2,
    /// Either, told apart by their first bytes.
    Any,
}

/// `[access_log]`: one line per connection and per request, written off the workers.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AccessLogConfig {
    /// The file lines are appended to, reopened on SIGUSR1; `-` is standard error. A relative
    /// path is relative to the config file's directory.
    pub path: PathBuf,
    /// How each line is written.
    #[serde(default)]
    pub format: AccessLogFormat,
    /// Lines waiting to be written at most; more are dropped and counted in
    /// `wharf_access_log_dropped_total` rather than slowing a worker down.
    #[serde(default = "default_access_log_buffer")]
    pub buffer_lines: usize,
}

/// `access_log.format`.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AccessLogFormat {
    /// One JSON object per line.
    #[default]
    Json,
    /// `key=value` pairs, quoted where needed.
    Logfmt,
}

/// Most `access_log.buffer_lines` accepted.
pub const MAX_ACCESS_LOG_BUFFER: usize = 1 << 20;

fn default_access_log_buffer() -> usize {
    16 * 1024
}

fn default_true() -> bool {
    true
}

/// Longest `proxy_header_timeout` accepted.
pub const MAX_PROXY_HEADER_TIMEOUT: Duration = Duration::from_secs(60);

fn default_proxy_header_timeout() -> Duration {
    Duration::from_secs(5)
}

fn default_source_prefix_v6() -> u8 {
    64
}

/// `[services.<name>.tls]`: the files and policy of a service's TLS. The files are read and
/// checked before anything binds and again on every reload. A relative file path is relative
/// to the config file's directory (to the working directory for the embedded default), as
/// [`ConfigSource::resolve`] leaves it.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The certificate chain, PEM, leaf first.
    pub cert: std::path::PathBuf,
    /// The private key of the leaf certificate, PEM (PKCS#8, SEC1 or PKCS#1).
    pub key: std::path::PathBuf,
    /// CA certificates (PEM) that sign client certificates; set, clients are asked for one.
    #[serde(default)]
    pub client_ca: Option<std::path::PathBuf>,
    /// Whether a client certificate is required (the default with `client_ca`) or optional.
    #[serde(default)]
    pub client_auth: ClientAuth,
    /// The oldest TLS version accepted.
    #[serde(default)]
    pub min_version: TlsVersion,
    /// ALPN protocols offered, in preference order; absent means the plugin's default
    /// (http-hello: `["http/1.1"]`, others none).
    #[serde(default)]
    pub alpn: Option<Vec<String>>,
    /// A handshake not finished within this long (from accept) is abandoned.
    #[serde(default = "default_handshake_timeout", with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// Handshakes in progress at once on each worker; more connections wait (without being
    /// read) for a slot, their `handshake_timeout` running, so a flood of slow or silent
    /// handshakes holds bounded memory and established connections keep being served.
    #[serde(default = "default_max_handshakes")]
    pub max_handshakes: usize,
}

impl TlsConfig {
    /// Makes the relative file paths relative to `dir` (the config file's directory).
    pub fn resolve_paths(&mut self, dir: &Path) {
        for path in [&mut self.cert, &mut self.key]
            .into_iter()
            .chain(self.client_ca.as_mut())
        {
            if path.is_relative() {
                *path = dir.join(&*path);
            }
        }
    }
}

/// `tls.client_auth`.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    /// A client without a valid certificate from `client_ca` fails the handshake.
    #[default]
    Required,
    /// A client may present no certificate (its identity is then absent); one it presents
    /// must still verify.
    Optional,
}

/// `tls.min_version`.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
pub enum TlsVersion {
    /// TLS 1.2 and 1.3.
    #[default]
    #[serde(rename = "1.2")]
    Tls12,
    /// TLS 1.3 only.
    #[serde(rename = "1.3")]
    Tls13,
}

/// Most `tls.max_handshakes` accepted: each handshake in progress holds a TLS session's state.
pub const MAX_HANDSHAKES: usize = 4096;

/// Longest `tls.handshake_timeout` accepted.
pub const MAX_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(300);

fn default_max_handshakes() -> usize {
    64
}

fn default_handshake_timeout() -> Duration {
    Duration::from_secs(10)
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
    /// The offending value as written (TOML, shortened), or `(value hidden)` for a secret;
    /// `None` when there is no single value to show (a table, a missing key, an environment
    /// override, whose value may be a secret).
    pub value: Option<String>,
    /// What is wrong, with the valid choices where there is a fixed set.
    pub message: String,
}

impl fmt::Display for ConfigError {
    /// One line: control characters (a newline in a quoted key or value) are escaped, so a
    /// config cannot forge log lines.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let origin = Escaped(&self.origin);
        let message = Escaped(&self.message);
        match (self.key.as_str(), &self.value) {
            ("", _) => write!(f, "{origin}: {message}"),
            (key, None) => write!(f, "{origin}: {}: {message}", Escaped(key)),
            (key, Some(value)) => {
                write!(
                    f,
                    "{origin}: {} = {}: {message}",
                    Escaped(key),
                    Escaped(value)
                )
            }
        }
    }
}

/// Text with its control characters escaped (`\n`, `\u{1b}`).
struct Escaped<'a>(&'a str);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in self.0.chars() {
            if c.is_control() {
                write!(f, "{}", c.escape_default())?;
            } else {
                write!(f, "{c}")?;
            }
        }
        Ok(())
    }
}

/// The merged configuration sources, kept so plugin options can be extracted (with full key
/// paths in errors) once the plugin is known.
///
/// The sources are merged once, when loaded, and every later lookup reads that one tree: a
/// figment re-merges all its sources on each lookup, which made checking N services cost
/// O(N²) (4000 services took 30 s).
#[derive(Clone)]
pub struct ConfigSource {
    /// The file (or embedded default), then the environment, then flags.
    merged: Dict,
    /// The file (or embedded default) alone, to tell which tables an override created.
    base: Dict,
    /// Each environment override as (dotted key path, variable name), sorted by name.
    env: Vec<(String, String)>,
    /// Where the base config came from.
    origin: String,
    /// What relative file paths (the TLS files) are relative to: the config file's directory;
    /// empty (the working directory) for the embedded default and config text.
    base_dir: PathBuf,
}

/// Most worker threads accepted.
const MAX_WORKERS: usize = 1024;

/// Largest config file read: far above any real one (10 000 services take about 1 MiB).
pub const MAX_CONFIG_BYTES: u64 = 16 << 20;

/// Deepest nesting of tables and arrays accepted in a file or an environment value. The deepest
/// real key (an exec command's `argv`) is 7 levels down; parsers recurse per level, so an
/// unbounded depth overflows the stack.
pub const MAX_DEPTH: usize = 32;

/// What `wharf config` and `wharf check` print in place of a secret's value. A config holding
/// it is refused (see [`ConfigSource::extract`]), so a pasted dump never runs with it as, say,
/// its token.
pub const SECRET_PLACEHOLDER: &str = "<redacted>";

/// How errors name the embedded default config (`wharf serve` without `--config`).
pub const EMBEDDED_ORIGIN: &str = "embedded configs/default.toml";

/// Prefix of environment overrides.
pub const ENV_PREFIX: &str = "WHARF_";

/// `WHARF_` variables that are not config keys: the log filter (`WHARF_LOG`) and the switch
/// to the io_uring backend's tokio-uring fallback (`WHARF_URING_FALLBACK`).
const NON_CONFIG_ENV_KEYS: &[&str] = &["log", "uring_fallback"];

/// Keys allowed at the top level.
const SECTIONS: &[&str] = &["server", "metrics", "access_log", "services"];

impl ConfigSource {
    /// Merges `file` (or, when `None`, the `embedded` default TOML), the `WHARF_` variables of
    /// `env` (pass `std::env::vars_os()`; other variables are ignored) and `overrides`
    /// (command-line flags). Every problem with the sources themselves (unreadable or oversized
    /// file, TOML syntax, nesting depth, an override that names no key) is reported here.
    pub fn load(
        file: Option<&Path>,
        embedded: &str,
        env: impl IntoIterator<Item = (OsString, OsString)>,
        overrides: Dict,
    ) -> Result<Self, Vec<ConfigError>> {
        match file {
            Some(path) => {
                let origin = path.display().to_string();
                let text = read_config_file(path).map_err(|message| {
                    vec![ConfigError {
                        origin: origin.clone(),
                        key: String::new(),
                        value: None,
                        message,
                    }]
                })?;
                let mut source = Self::from_parts(&text, &origin, env, overrides)?;
                source.base_dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
                Ok(source)
            }
            None => Self::from_parts(embedded, EMBEDDED_ORIGIN, env, overrides),
        }
    }

    /// Like [`ConfigSource::load`] on config text named `origin` in errors, without touching
    /// the file system or the process environment: for tests, tools and fuzzing.
    pub fn from_parts(
        text: &str,
        origin: &str,
        env: impl IntoIterator<Item = (OsString, OsString)>,
        overrides: Dict,
    ) -> Result<Self, Vec<ConfigError>> {
        let mut errors = Vec::new();
        let base = parse_toml(text).unwrap_or_else(|(key, message)| {
            errors.push(ConfigError {
                origin: origin.to_string(),
                key,
                value: None,
                message,
            });
            Dict::new()
        });
        let (env_dict, env) = parse_env(&base, env).unwrap_or_else(|e| {
            errors.extend(e);
            Default::default()
        });
        if !errors.is_empty() {
            return Err(errors);
        }
        let mut merged = base.clone();
        merge(&mut merged, env_dict);
        merge(&mut merged, overrides);
        Ok(ConfigSource {
            merged,
            base,
            env,
            origin: origin.to_string(),
            base_dir: PathBuf::new(),
        })
    }

    /// Where the base config came from, for messages.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The `WHARF_*` variables that set keys, by name (for `wharf check`).
    pub fn env_overrides(&self) -> impl Iterator<Item = &str> {
        self.env.iter().map(|(_, name)| name.as_str())
    }

    /// Resolves and checks every framework-level section; returns whatever did parse alongside
    /// every error found, so callers can go on checking (plugins, options) and report
    /// everything in one run.
    pub fn resolve(&self) -> (Config, Vec<ConfigError>) {
        let mut errors = Vec::new();
        for key in self
            .merged
            .keys()
            .filter(|k| !SECTIONS.contains(&k.as_str()))
        {
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
        let mut access_log: Option<AccessLogConfig> = self.section("access_log", &mut errors);
        if let Some(log) = &mut access_log {
            if log.path.is_relative() && log.path.as_os_str() != "-" {
                log.path = self.base_dir.join(&log.path);
            }
        }

        let mut services = BTreeMap::new();
        match self.merged.get("services") {
            None => {}
            Some(Value::Dict(_, names)) => {
                for (name, value) in names {
                    let key = format!("services.{name}");
                    if let Err(message) = check_service_name(name) {
                        errors.push(self.error_at(&key, message));
                        continue;
                    }
                    match self.deserialize_at::<ServiceConfig>(&key, value, &[]) {
                        Ok(mut svc) => {
                            if let Some(tls) = &mut svc.tls {
                                tls.resolve_paths(&self.base_dir);
                            }
                            crate::unix::resolve_path(&mut svc.listen, &self.base_dir);
                            services.insert(name.clone(), svc);
                        }
                        Err(e) => errors.extend(e),
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
        errors.extend(self.check_tls(&services));
        errors.extend(self.check_edge(access_log.as_ref(), &services));
        errors.extend(crate::udp::check_config(self, &services));
        let config = Config {
            server,
            metrics,
            access_log,
            services,
        };
        (config, errors)
    }

    /// Each service's `plugin`, by service name, where it is a string: also for services whose
    /// other keys are wrong, so that their plugin options are checked in the same run.
    pub fn plugins_by_service(&self) -> BTreeMap<String, String> {
        let Some(Value::Dict(_, services)) = self.merged.get("services") else {
            return BTreeMap::new();
        };
        services
            .iter()
            .filter_map(|(name, service)| {
                let plugin = service.as_dict()?.get("plugin")?.as_str()?;
                Some((name.clone(), plugin.to_string()))
            })
            .collect()
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
            errors.push(self.value_error_at("server.workers", format!("at most {MAX_WORKERS}")));
        }
        if server.shutdown_grace > DAY {
            errors.push(self.value_error_at("server.shutdown_grace", "at most 24h".into()));
        }
        for (name, svc) in services {
            if svc.max_connections == 0 {
                let key = format!("services.{name}.max_connections");
                errors.push(self.value_error_at(&key, "must be at least 1".into()));
            }
            if !(1..=MAX_BLOCKING).contains(&svc.max_blocking) {
                let key = format!("services.{name}.max_blocking");
                errors.push(self.value_error_at(&key, format!("must be 1..={MAX_BLOCKING}")));
            }
            if svc.idle_timeout > DAY {
                let key = format!("services.{name}.idle_timeout");
                errors.push(self.value_error_at(&key, "at most 24h (\"0s\" turns it off)".into()));
            }
        }
        errors
    }

    /// The PROXY protocol, per-source limit and access log settings.
    fn check_edge(
        &self,
        access_log: Option<&AccessLogConfig>,
        services: &BTreeMap<String, ServiceConfig>,
    ) -> Vec<ConfigError> {
        let mut errors = Vec::new();
        if let Some(log) = access_log {
            if log.path.as_os_str().is_empty() {
                let message = "a file path, or \"-\" for standard error".into();
                errors.push(self.value_error_at("access_log.path", message));
            }
            if !(1..=MAX_ACCESS_LOG_BUFFER).contains(&log.buffer_lines) {
                let message = format!("must be 1..={MAX_ACCESS_LOG_BUFFER}");
                errors.push(self.value_error_at("access_log.buffer_lines", message));
            }
        }
        for (name, svc) in services {
            let key = |k: &str| format!("services.{name}.{k}");
            let unix = matches!(svc.listen, Listen::Unix(_));
            match (svc.proxy_protocol, svc.trusted_proxies.is_empty()) {
                // On a Unix socket, who may send a header is who may connect (checked below).
                (Some(_), true) if !unix => errors.push(self.error_at(
                    &key("trusted_proxies"),
                    "required with proxy_protocol: the proxies allowed to name a client (anyone \
                     else could claim any address)"
                        .into(),
                )),
                (None, false) => errors.push(self.error_at(
                    &key("trusted_proxies"),
                    "needs proxy_protocol = \"v1\", \"v2\" or \"any\"".into(),
                )),
                _ => {}
            }
            if svc.proxy_header_timeout.is_zero()
                || svc.proxy_header_timeout > MAX_PROXY_HEADER_TIMEOUT
            {
                errors.push(self.value_error_at(
                    &key("proxy_header_timeout"),
                    "must be more than 0s and at most 60s".into(),
                ));
            }
            if let Some(n) = svc.max_connections_per_source {
                if n == 0 || n > svc.max_connections {
                    let message = format!("must be 1..={} (max_connections)", svc.max_connections);
                    errors.push(self.value_error_at(&key("max_connections_per_source"), message));
                }
            }
            for (k, rate) in [
                ("max_connection_rate", svc.max_connection_rate),
                (
                    "max_connection_rate_per_source",
                    svc.max_connection_rate_per_source,
                ),
            ] {
                if rate == Some(0) {
                    let message = "must be at least 1 (leave it out for no bound)".into();
                    errors.push(self.value_error_at(&key(k), message));
                }
            }
            if !(1..=128).contains(&svc.source_prefix_v6) {
                errors
                    .push(self.value_error_at(&key("source_prefix_v6"), "must be 1..=128".into()));
            }
            for (k, message) in crate::unix::check_service(svc) {
                errors.push(self.error_at(&key(k), message));
            }
        }
        errors
    }

    /// The TLS settings that need no file (the files are read and checked by
    /// [`crate::tls::files::load`], when the plan is built).
    fn check_tls(&self, services: &BTreeMap<String, ServiceConfig>) -> Vec<ConfigError> {
        let mut errors = Vec::new();
        for (name, svc) in services {
            let key = |k: &str| format!("services.{name}.{k}");
            let client_ca = svc.tls.as_ref().and_then(|t| t.client_ca.as_ref());
            if !svc.allow_identities.is_empty() && client_ca.is_none() {
                errors.push(self.error_at(
                    &key("allow_identities"),
                    "needs tls.client_ca: identities come from client certificates signed by it"
                        .into(),
                ));
            }
            for (i, identity) in svc.allow_identities.iter().enumerate() {
                if identity.is_empty() {
                    let key = key(&format!("allow_identities.{i}"));
                    errors.push(self.value_error_at(&key, "an empty identity".into()));
                }
            }
            let Some(tls) = &svc.tls else { continue };
            if client_ca.is_none() && lookup(&self.merged, &key("tls.client_auth")).is_some() {
                errors.push(self.error_at(
                    &key("tls.client_auth"),
                    "needs tls.client_ca: the CA that signs the client certificates".into(),
                ));
            }
            for (i, protocol) in tls.alpn.iter().flatten().enumerate() {
                if protocol.is_empty() || protocol.len() > crate::tls::files::MAX_ALPN_BYTES {
                    let key = key(&format!("tls.alpn.{i}"));
                    let message = format!(
                        "an ALPN protocol name is 1 to {} bytes",
                        crate::tls::files::MAX_ALPN_BYTES
                    );
                    errors.push(self.value_error_at(&key, message));
                }
            }
            if tls.handshake_timeout.is_zero() || tls.handshake_timeout > MAX_HANDSHAKE_TIMEOUT {
                errors.push(self.value_error_at(
                    &key("tls.handshake_timeout"),
                    "must be more than 0s and at most 5m (a handshake takes milliseconds; a long \
                     timeout lets silent clients hold handshake slots)"
                        .into(),
                ));
            }
            if !(1..=MAX_HANDSHAKES).contains(&tls.max_handshakes) {
                let message = format!("must be 1..={MAX_HANDSHAKES} (per worker)");
                errors.push(self.value_error_at(&key("tls.max_handshakes"), message));
            }
        }
        errors
    }

    /// Extracts `key` (a dotted path) as `T`; an absent key deserializes from an empty table, so
    /// a struct with defaults needs no section at all and a required field is reported by name.
    /// Errors about the keys in `secrets` (relative to `key`, e.g. `token`) never quote the
    /// value, and a secret set to [`SECRET_PLACEHOLDER`] is an error.
    pub fn extract<T: DeserializeOwned>(
        &self,
        key: &str,
        secrets: &[&str],
    ) -> Result<T, Vec<ConfigError>> {
        let empty = Value::from(Dict::new());
        let value = lookup(&self.merged, key).unwrap_or(&empty);
        let placeholders: Vec<ConfigError> = secrets
            .iter()
            .map(|secret| format!("{key}.{secret}"))
            .filter(|path| {
                lookup(&self.merged, path).and_then(Value::as_str) == Some(SECRET_PLACEHOLDER)
            })
            .map(|path| {
                let message = format!(
                    "`{SECRET_PLACEHOLDER}` stands for a secret `wharf config` does not print; \
                     write the real value here"
                );
                self.secret_error_at(&path, message)
            })
            .collect();
        match self.deserialize_at(key, value, secrets) {
            Ok(_) if !placeholders.is_empty() => Err(placeholders),
            Ok(parsed) => Ok(parsed),
            Err(mut errors) => {
                errors.extend(placeholders);
                Err(errors)
            }
        }
    }

    /// Builds an error located at `key`, attributed to whichever source set that key.
    pub fn error_at(&self, key: &str, message: String) -> ConfigError {
        ConfigError {
            origin: self.origin_of(key),
            key: key.to_string(),
            value: None,
            message,
        }
    }

    /// Like [`ConfigSource::error_at`] for an invalid value: the error quotes it.
    pub fn value_error_at(&self, key: &str, message: String) -> ConfigError {
        ConfigError {
            value: lookup(&self.merged, key).and_then(|v| self.quote(key, v)),
            ..self.error_at(key, message)
        }
    }

    /// Like [`ConfigSource::value_error_at`] for a key that holds a secret: the error says
    /// `(value hidden)` instead of quoting it.
    pub fn secret_error_at(&self, key: &str, message: String) -> ConfigError {
        ConfigError {
            value: lookup(&self.merged, key).map(|_| HIDDEN.to_string()),
            ..self.error_at(key, message)
        }
    }

    /// `value` (found at `key`) as the user wrote it, inline TOML cut to a readable length; no
    /// quote for a table (its keys have their own errors) or for a value an environment
    /// variable set (it may be a secret the plugin did not declare).
    fn quote(&self, key: &str, value: &Value) -> Option<String> {
        const MAX_QUOTE: usize = 80;
        if matches!(value, Value::Dict(..)) || self.env.iter().any(|(path, _)| within(path, key)) {
            return None;
        }
        let text = toml::Value::try_from(value).ok()?.to_string();
        Some(match text.char_indices().nth(MAX_QUOTE) {
            Some((cut, _)) => format!("{}...", &text[..cut]),
            None => text,
        })
    }

    fn section<T: DeserializeOwned>(&self, key: &str, errors: &mut Vec<ConfigError>) -> Option<T> {
        let value = self.merged.get(key)?;
        self.deserialize_at(key, value, &[])
            .map_err(|e| errors.extend(e))
            .ok()
    }

    /// Deserializes `value`, found at `key`, reporting errors under `key`: every error, not
    /// just the first. serde stops at the first bad key, so after each error the key at fault is
    /// taken out (its default applies, or it becomes a missing key, which is not reported again)
    /// and the value deserialized once more; each round removes a key, so it ends.
    fn deserialize_at<T: DeserializeOwned>(
        &self,
        key: &str,
        value: &Value,
        secrets: &[&str],
    ) -> Result<T, Vec<ConfigError>> {
        let mut error = match value.deserialize() {
            Ok(parsed) => return Ok(parsed),
            Err(e) => e,
        };
        let mut errors = Vec::new();
        let mut rest = value.clone();
        let mut removed: Vec<Vec<String>> = Vec::new();
        loop {
            let mut progress = false;
            for e in error {
                let caused_by_us = match &e.kind {
                    figment::error::Kind::MissingField(field) => {
                        let mut path = e.path.clone();
                        path.push(field.to_string());
                        removed.contains(&path)
                    }
                    _ => false,
                };
                if !caused_by_us {
                    errors.push(self.error_from(&e, key, value, secrets));
                }
                if let Some(path) = remove_at(&mut rest, &e.path) {
                    removed.push(path);
                    progress = true;
                }
            }
            if !progress {
                return Err(errors);
            }
            error = match rest.deserialize::<T>() {
                Ok(_) => return Err(errors),
                Err(e) => e,
            };
        }
    }

    /// Converts one figment error, whose path is relative to `prefix` (where `value` is).
    fn error_from(
        &self,
        e: &figment::Error,
        prefix: &str,
        value: &Value,
        secrets: &[&str],
    ) -> ConfigError {
        let key = std::iter::once(prefix)
            .filter(|p| !p.is_empty())
            .chain(e.path.iter().map(String::as_str))
            .collect::<Vec<_>>()
            .join(".");
        let secret = secrets
            .iter()
            .any(|s| within(&format!("{prefix}.{s}"), &key));
        let relative = e.path.join(".");
        let found = if relative.is_empty() {
            Some(value)
        } else {
            value.as_dict().and_then(|d| lookup(d, &relative))
        };
        let quoted = match (&e.kind, found) {
            (figment::error::Kind::MissingField(_), _) | (_, None) => None,
            (_, Some(_)) if secret => Some(HIDDEN.to_string()),
            (_, Some(found)) => self.quote(&key, found),
        };
        ConfigError {
            origin: self.origin_of(&key),
            key,
            value: quoted,
            message: describe_kind(&e.kind, secret),
        }
    }

    /// The source that set `key`: the environment variable that set it or a value containing
    /// it, else the one that created the table it names (when the file has no such table),
    /// else the file.
    fn origin_of(&self, key: &str) -> String {
        let var = self
            .env
            .iter()
            .filter(|(path, _)| within(path, key))
            .max_by_key(|(path, _)| path.len())
            .or_else(|| {
                if key.is_empty() || lookup(&self.base, key).is_some() {
                    return None;
                }
                self.env.iter().find(|(path, _)| within(key, path))
            });
        match var {
            Some((_, var)) => format!("environment variable {var}"),
            None => self.origin.clone(),
        }
    }
}

/// How an error shows the value of a secret key.
const HIDDEN: &str = "(value hidden)";

/// Removes the deepest key of `path` that `value` has as a table key (an error inside an array
/// removes the whole array); returns the path removed, `None` when nothing could be (an error
/// about `value` as a whole).
fn remove_at(value: &mut Value, path: &[String]) -> Option<Vec<String>> {
    let (first, rest) = path.split_first()?;
    let Value::Dict(_, dict) = value else {
        return None;
    };
    let inner = dict.get_mut(first)?;
    if let Some(mut deeper) = remove_at(inner, rest) {
        deeper.insert(0, first.clone());
        return Some(deeper);
    }
    dict.remove(first);
    Some(vec![first.clone()])
}

/// Whether dotted key `inner` is `outer` or lies inside it.
fn within(outer: &str, inner: &str) -> bool {
    inner
        .strip_prefix(outer)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
}

/// The value at a dotted key; a number segment indexes an array (`allow_from.1`).
fn lookup<'a>(dict: &'a Dict, key: &str) -> Option<&'a Value> {
    let mut parts = key.split('.');
    let mut value = dict.get(parts.next()?)?;
    for part in parts {
        match value {
            Value::Dict(_, d) => value = d.get(part)?,
            Value::Array(_, items) => value = items.get(part.parse::<usize>().ok()?)?,
            _ => return None,
        }
    }
    Some(value)
}

/// Merges `src` into `dst`: tables merge key by key, anything else replaces.
fn merge(dst: &mut Dict, src: Dict) {
    for (key, value) in src {
        match (dst.get_mut(&key), value) {
            (Some(Value::Dict(_, d)), Value::Dict(_, s)) => merge(d, s),
            (_, value) => {
                dst.insert(key, value);
            }
        }
    }
}

/// Reads a file that must be a regular one (a FIFO would block the reader; a device never
/// ends) of at most `max_bytes`: the TLS files, and the files `--watch-config` polls.
pub fn read_regular_file(path: &Path, max_bytes: u64) -> std::io::Result<Vec<u8>> {
    if !std::fs::metadata(path)?.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    let mut content = Vec::new();
    std::fs::File::open(path)?
        .take(max_bytes + 1)
        .read_to_end(&mut content)?;
    if content.len() as u64 > max_bytes {
        return Err(std::io::Error::other(format!(
            "larger than {max_bytes} bytes"
        )));
    }
    Ok(content)
}

/// Reads a config file: a regular file, at most [`MAX_CONFIG_BYTES`], UTF-8.
fn read_config_file(path: &Path) -> Result<String, String> {
    if !path.is_file() {
        return Err("config file not found (or not a regular file)".into());
    }
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_CONFIG_BYTES + 1).read_to_end(&mut bytes))
        .map_err(|e| format!("cannot read the config file: {e}"))?;
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        return Err(format!(
            "the config file is larger than {} MiB",
            MAX_CONFIG_BYTES >> 20
        ));
    }
    String::from_utf8(bytes)
        .map_err(|e| format!("not valid UTF-8 (at byte {})", e.utf8_error().valid_up_to()))
}

/// Parses config text: no byte-order mark, nesting at most [`MAX_DEPTH`], TOML syntax errors
/// as one line without the source excerpt (which could show a secret). An error is the key it
/// is at, when one can be told (empty otherwise), and the message.
fn parse_toml(text: &str) -> Result<Dict, (String, String)> {
    if text.starts_with('\u{feff}') {
        return Err((
            String::new(),
            "the file starts with a UTF-8 byte-order mark (BOM); save it as UTF-8 without one"
                .into(),
        ));
    }
    let depth = toml_depth(text);
    if depth > MAX_DEPTH {
        return Err((
            String::new(),
            format!("tables and arrays nested {depth} levels deep; at most {MAX_DEPTH}"),
        ));
    }
    toml::from_str(text).map_err(|e: toml::de::Error| {
        let message = e.message().trim().replace('\n', "; ");
        match e.span() {
            Some(span) => {
                let before = &text[..span.start.min(text.len())];
                let line = before.matches('\n').count() + 1;
                let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
                (
                    key_at_line(text, line),
                    format!("TOML syntax error at line {line}, column {column}: {message}"),
                )
            }
            None => (String::new(), format!("TOML syntax error: {message}")),
        }
    })
}

/// The key a line of config text is about, read without parsing (the text may not parse): the
/// last `[table]` header above it joined with the line's own `key =`, or the header itself.
/// Empty when neither is plain (quoted keys, a line inside a multi-line value): a guess never
/// names a wrong key.
fn key_at_line(text: &str, line: usize) -> String {
    let plain = |key: &str| {
        let key = key.trim();
        (!key.is_empty()
            && key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b)))
        .then(|| key.split('.').map(str::trim).collect::<Vec<_>>().join("."))
    };
    let mut table = Some(String::new());
    let mut lines = text.lines().take(line).peekable();
    while let Some(current) = lines.next() {
        let trimmed = current.trim();
        let header = trimmed
            .strip_prefix('[')
            .and_then(|h| h.split(']').next())
            .map(|h| h.trim_start_matches('['));
        let last = lines.peek().is_none();
        if let Some(header) = header {
            table = plain(header);
            if last {
                return table.unwrap_or_default();
            }
        } else if last {
            let Some(table) = table else {
                return String::new();
            };
            let own = trimmed.split_once('=').and_then(|(k, _)| plain(k));
            return match own {
                Some(own) if table.is_empty() => own,
                Some(own) => format!("{table}.{own}"),
                None => table,
            };
        }
    }
    String::new()
}

/// What is wrong, in a user's terms: "a non-negative integer", not `usize`; the valid choices
/// spelled plainly. For a `secret` key, nothing derived from the value.
fn describe_kind(kind: &figment::error::Kind, secret: bool) -> String {
    use figment::error::Kind;
    match kind {
        Kind::UnknownVariant(_, expected) if secret => {
            format!("unknown value; valid choices: {}", expected.join(", "))
        }
        Kind::UnknownVariant(found, expected) => {
            format!(
                "unknown value `{found}`; valid choices: {}",
                expected.join(", ")
            )
        }
        Kind::UnknownField(found, expected) => unknown_key(found, expected),
        Kind::MissingField(name) => format!("missing required key `{name}`"),
        Kind::InvalidType(actual, expected) | Kind::InvalidValue(actual, expected) => {
            let expected = in_user_terms(expected);
            if matches!(kind, Kind::InvalidType(..)) {
                format!("expected {expected}, found {}", kind_of(actual))
            } else {
                format!("expected {expected}")
            }
        }
        Kind::Message(_) if secret => "invalid value".into(),
        Kind::Message(message) => match message.as_str() {
            "invalid socket address syntax" => {
                "expected an IP address with port, like \"127.0.0.1:7000\"".into()
            }
            "invalid IP address syntax" => "expected an IP address, like \"127.0.0.1\"".into(),
            other => other.to_string(),
        },
        other => other.to_string(),
    }
}

/// Most valid keys listed after an unknown one; a section with more (a service has about 30)
/// names the nearest instead, so the error stays one readable line.
const MAX_KEYS_LISTED: usize = 8;

/// "unknown key": the valid keys, or for a long list the one the user most likely meant.
fn unknown_key(found: &str, expected: &[&str]) -> String {
    if expected.len() > MAX_KEYS_LISTED {
        let nearest = expected
            .iter()
            .map(|k| (strsim::levenshtein(found, k), *k))
            .min()
            .filter(|(d, _)| *d <= 2);
        if let Some((_, key)) = nearest {
            return format!("unknown key `{found}`; did you mean `{key}`?");
        }
        return format!(
            "unknown key `{found}`; valid keys: {}, ... ({} in all: see the README's \
             configuration reference)",
            expected[..MAX_KEYS_LISTED].join(", "),
            expected.len()
        );
    }
    format!("unknown key `{found}`; valid keys: {}", expected.join(", "))
}

/// serde's name for an expected type, as a user would say it.
fn in_user_terms(expected: &str) -> String {
    match expected {
        "usize" | "u8" | "u16" | "u32" | "u64" | "u128" => "a non-negative integer",
        "isize" | "i8" | "i16" | "i32" | "i64" | "i128" => "an integer",
        "f32" | "f64" => "a number",
        "a boolean" | "bool" => "true or false",
        "a string" | "a borrowed string" | "a character" | "char" => "a string",
        "a sequence" => "an array",
        "a map" => "a table",
        "path string" => "a path (a string)",
        "a duration" => "a duration like \"30s\" or \"1m 30s\"",
        "socket address" => "an IP address with port, like \"127.0.0.1:7000\"",
        "IP address" => "an IP address, like \"127.0.0.1\"",
        other if other.starts_with("struct ") => "a table",
        other => return other.to_string(),
    }
    .to_string()
}

/// What kind of value was found, without the value itself.
fn kind_of(actual: &figment::error::Actual) -> &'static str {
    use figment::error::Actual;
    match actual {
        Actual::Bool(_) => "true or false",
        Actual::Unsigned(_) | Actual::Signed(_) => "an integer",
        Actual::Float(_) => "a number with a fraction",
        Actual::Char(_) | Actual::Str(_) => "a string",
        Actual::Seq => "an array",
        Actual::Map => "a table",
        _ => "another kind of value",
    }
}

/// Parses the `WHARF_` variables of `vars` into a table of overrides and, for each, its dotted
/// key path and name. A variable that names no key (an empty segment, a stray character), whose
/// value is not UTF-8 or nested too deep, or that collides with another is an error naming it;
/// none is ever skipped silently. Values are never quoted in errors: they may be secrets.
#[allow(clippy::type_complexity)]
fn parse_env(
    base: &Dict,
    vars: impl IntoIterator<Item = (OsString, OsString)>,
) -> Result<(Dict, Vec<(String, String)>), Vec<ConfigError>> {
    let mut vars: Vec<(String, OsString)> = vars
        .into_iter()
        .map(|(name, value)| (name.to_string_lossy().into_owned(), value))
        .filter(|(name, _)| {
            name.get(..ENV_PREFIX.len())
                .is_some_and(|p| p.eq_ignore_ascii_case(ENV_PREFIX))
                && !NON_CONFIG_ENV_KEYS
                    .iter()
                    .any(|k| name[ENV_PREFIX.len()..].eq_ignore_ascii_case(k))
        })
        .collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));

    let mut dict = Dict::new();
    let mut keys: Vec<(String, String)> = Vec::new();
    let mut errors = Vec::new();
    for (name, value) in vars {
        let error = |key: &str, message: String| ConfigError {
            origin: format!("environment variable {name}"),
            key: key.to_string(),
            value: None,
            message,
        };
        let path = match env_key_path(&name[ENV_PREFIX.len()..]) {
            Ok(path) => spelled_as_in(base, path),
            Err(message) => {
                errors.push(error("", message));
                continue;
            }
        };
        let key = path.join(".");
        let Some(text) = value.to_str() else {
            errors.push(error(&key, "the value is not valid UTF-8".into()));
            continue;
        };
        let depth = env_value_depth(text);
        if depth > MAX_DEPTH {
            let message = format!("the value is nested {depth} levels deep; at most {MAX_DEPTH}");
            errors.push(error(&key, message));
            continue;
        }
        if let Some((_, other)) = keys
            .iter()
            .find(|(p, _)| within(p, &key) || within(&key, p))
        {
            let message = format!("sets the same key as {other}, or one inside it");
            errors.push(error(&key, message));
            continue;
        }
        let value: Value = text.parse().unwrap_or_else(|never| match never {});
        insert(&mut dict, &path, value);
        keys.push((key, name));
    }
    if errors.is_empty() {
        Ok((dict, keys))
    } else {
        Err(errors)
    }
}

/// `SERVICES__ECHO__LISTEN` to `["services", "echo", "listen"]`.
fn env_key_path(name: &str) -> Result<Vec<String>, String> {
    const HOW: &str = "overrides are WHARF_ + the key path with `__` between segments, \
                       e.g. WHARF_SERVICES__ECHO__LISTEN";
    let segments: Vec<&str> = name.split("__").collect();
    if segments.iter().any(|s| s.is_empty()) {
        return Err(format!(
            "names no key: an empty segment (a leading, trailing or doubled `__`); {HOW}"
        ));
    }
    if let Some(bad) = segments.iter().find(|s| {
        !s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    }) {
        return Err(format!(
            "names no key: `{bad}` has a character other than A-Z, 0-9, `_` and `-`; {HOW}"
        ));
    }
    Ok(segments.iter().map(|s| s.to_ascii_lowercase()).collect())
}

/// `path` (lowercase, from a variable name) spelled as the keys the file already has, compared
/// without case: `WHARF_SERVICES__EXEC__OPTIONS__ENV__PATH` overrides an `env` table's `PATH`
/// instead of adding a `path` next to it. Segments the file does not have stay lowercase.
fn spelled_as_in(base: &Dict, path: Vec<String>) -> Vec<String> {
    let mut table = Some(base);
    path.into_iter()
        .map(|segment| {
            let found = table.and_then(|t| {
                t.get_key_value(&segment)
                    .or_else(|| t.iter().find(|(k, _)| k.eq_ignore_ascii_case(&segment)))
            });
            match found {
                Some((key, value)) => {
                    table = match value {
                        Value::Dict(_, inner) => Some(inner),
                        _ => None,
                    };
                    key.clone()
                }
                None => {
                    table = None;
                    segment
                }
            }
        })
        .collect()
}

/// Sets `path` in `dict` to `value`, creating tables on the way (callers rule out collisions).
fn insert(dict: &mut Dict, path: &[String], value: Value) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut table = dict;
    for part in parents {
        let entry = table
            .entry(part.clone())
            .or_insert_with(|| Value::from(Dict::new()));
        if !matches!(entry, Value::Dict(..)) {
            *entry = Value::from(Dict::new());
        }
        let Value::Dict(_, inner) = entry else {
            unreachable!("made a table just above")
        };
        table = inner;
    }
    table.insert(last.clone(), value);
}

/// How deep figment's (recursive) value parser would nest on `text`: `[` and `{` outside
/// strings and character literals. A `"` opens a string, and a `'` a one-character literal,
/// only where that parser may start a key or a value (at the start, after `[`, `{` or `,`), so
/// no bracket it would enter is hidden from the count; elsewhere quotes are ordinary characters
/// to it, and counting what they enclose only overestimates. (After `=` a quote is not taken as
/// a string: in a bare value `=` is an ordinary character.)
fn env_value_depth(text: &str) -> usize {
    let (mut depth, mut deepest) = (0usize, 0usize);
    let mut value_start = true;
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c.is_ascii_whitespace() {
            continue;
        }
        match c {
            '"' if value_start => {
                let mut escaped = false;
                for c in chars.by_ref() {
                    match c {
                        _ if escaped => escaped = false,
                        '\\' => escaped = true,
                        '"' => break,
                        _ => {}
                    }
                }
            }
            '\'' if value_start => {
                chars.next();
                chars.next();
            }
            '[' | '{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            ']' | '}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        value_start = matches!(c, '[' | '{' | ',');
    }
    deepest
}

/// An upper bound on how deeply `text` nests tables and arrays, read before parsing (the TOML
/// parser bounds arrays and inline tables, but not dotted keys, and the deserializer and the
/// destructor recurse once per level). Each level is a segment of a `[table]` header or of a
/// dotted key (`a.b.c = 1`, also inside inline tables), or an array or inline table; strings
/// and comments are skipped as TOML lexes them.
fn toml_depth(text: &str) -> usize {
    let bytes = text.as_bytes();
    let mut deepest = 0;
    let mut header = 0; // levels of the current [table] header
    let mut top_key = 0; // dots in the current top-level key
    let mut top_in_key = false;
    let mut frames: Vec<(bool, usize, bool)> = Vec::new(); // (inline table?, key dots, in key)
    let mut line_start = true;
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        i += 1;
        match c {
            b' ' | b'\t' | b'\r' => continue,
            b'\n' => {
                if frames.is_empty() {
                    line_start = true;
                    top_key = 0;
                    top_in_key = false;
                }
                continue;
            }
            b'#' => {
                i += bytes[i..]
                    .iter()
                    .position(|&b| b == b'\n')
                    .unwrap_or(bytes.len() - i);
                continue;
            }
            b'"' | b'\'' => {
                i = skip_string(bytes, i - 1);
                if line_start && frames.is_empty() {
                    line_start = false;
                    top_in_key = true;
                }
                continue;
            }
            _ => {}
        }
        if line_start && frames.is_empty() {
            line_start = false;
            if c == b'[' {
                // A header: count its segments up to the closing bracket.
                header = 1 + usize::from(bytes.get(i) == Some(&b'['));
                while i < bytes.len() && bytes[i] != b']' && bytes[i] != b'\n' {
                    match bytes[i] {
                        b'"' | b'\'' => i = skip_string(bytes, i),
                        b'.' => {
                            header += 1;
                            i += 1;
                        }
                        _ => i += 1,
                    }
                }
                deepest = deepest.max(header);
                continue;
            }
            top_in_key = true;
        }
        match c {
            b'.' => match frames.last_mut() {
                Some((_, dots, true)) => *dots += 1,
                None if top_in_key => top_key += 1,
                _ => {}
            },
            b'=' => match frames.last_mut() {
                Some((_, _, in_key)) => *in_key = false,
                None => top_in_key = false,
            },
            b'[' | b'{' => frames.push((c == b'{', 0, c == b'{')),
            b',' => {
                if let Some((true, dots, in_key)) = frames.last_mut() {
                    *dots = 0;
                    *in_key = true;
                }
            }
            b']' | b'}' => {
                frames.pop();
            }
            _ => {}
        }
        let depth = header + top_key + 1 + frames.iter().map(|f| 1 + f.1).sum::<usize>();
        deepest = deepest.max(depth);
    }
    deepest
}

/// The index just after the TOML string that starts at `start` (a `"` or `'`, possibly
/// tripled); basic strings honour backslash escapes. An unterminated string runs to the end
/// (multi-line) or the end of the line.
fn skip_string(bytes: &[u8], start: usize) -> usize {
    let quote = bytes[start];
    let triple = bytes.get(start..start + 3) == Some(&[quote; 3][..]);
    let mut i = start + if triple { 3 } else { 1 };
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'\\' && quote == b'"' {
            i += 2;
            continue;
        }
        if !triple && b == b'\n' {
            return i;
        }
        if b == quote && (!triple || bytes.get(i..i + 3) == Some(&[quote; 3][..])) {
            return i + if triple { 3 } else { 1 };
        }
        i += 1;
    }
    bytes.len()
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

    #[test]
    fn an_unknown_key_in_a_long_section_names_the_nearest_one() {
        let keys = [
            "plugin",
            "listen",
            "max_connections",
            "idle_timeout",
            "max_blocking",
        ];
        let many: Vec<&str> = keys
            .iter()
            .chain(&["allow_from", "a", "b", "c"])
            .copied()
            .collect();
        assert_eq!(
            unknown_key("alow_from", &many),
            "unknown key `alow_from`; did you mean `allow_from`?"
        );
        let far = unknown_key("zzzzzzzz", &many);
        assert!(
            far.starts_with("unknown key `zzzzzzzz`; valid keys: plugin, listen,"),
            "{far}"
        );
        assert!(
            far.ends_with("(9 in all: see the README's configuration reference)"),
            "{far}"
        );
        assert_eq!(
            unknown_key("transfrom", &["transform"]),
            "unknown key `transfrom`; valid keys: transform"
        );
    }

    #[test]
    fn backend_names_and_aliases_parse_and_print_back() {
        assert_eq!(BackendChoice::NAMES, ["auto", "epoll", "io_uring"]);
        for name in BackendChoice::NAMES {
            assert_eq!(name.parse::<BackendChoice>().unwrap().as_str(), name);
        }
        for alias in ["io-uring", "uring"] {
            assert_eq!(alias.parse(), Ok(BackendKind::IoUring));
        }
        let err = "kqueue".parse::<BackendChoice>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown backend `kqueue`; valid choices: auto, epoll, io_uring"
        );
    }

    fn load(toml: &str) -> ConfigSource {
        ConfigSource::from_parts(toml, "test.toml", [], Dict::new()).unwrap()
    }

    /// [`ConfigSource::resolve`] as a `Result`: the config when there is no error.
    fn resolved(src: &ConfigSource) -> Result<Config, Vec<ConfigError>> {
        let (config, errors) = src.resolve();
        if errors.is_empty() {
            Ok(config)
        } else {
            Err(errors)
        }
    }

    /// The errors of resolving `toml`, as displayed.
    fn error_lines(src: &ConfigSource) -> Vec<String> {
        src.resolve().1.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn tls_settings_that_need_a_client_ca_or_a_sane_value_are_refused() {
        let tls = "[services.e.tls]\ncert = '/c.pem'\nkey = '/c.key'\n";
        assert_eq!(
            error_lines(&load(&format!(
                "{ECHO}allow_identities = ['ops', '']\n{tls}client_auth = 'optional'\n\
                 alpn = ['http/1.1', '', '{}']\nhandshake_timeout = '0s'\n",
                "x".repeat(256)
            ))),
            [
                "test.toml: services.e.allow_identities: needs tls.client_ca: identities come \
                 from client certificates signed by it",
                "test.toml: services.e.allow_identities.1 = \"\": an empty identity",
                "test.toml: services.e.tls.client_auth: needs tls.client_ca: the CA that signs \
                 the client certificates",
                "test.toml: services.e.tls.alpn.1 = \"\": an ALPN protocol name is 1 to 255 bytes",
                &format!(
                    "test.toml: services.e.tls.alpn.2 = \"{}...: an ALPN protocol name is 1 to \
                     255 bytes",
                    "x".repeat(79)
                ),
                "test.toml: services.e.tls.handshake_timeout = \"0s\": must be more than 0s and \
                 at most 5m (a handshake takes milliseconds; a long timeout lets silent clients \
                 hold handshake slots)",
            ]
        );
        // Without TLS at all, identities cannot be known either.
        assert_eq!(
            error_lines(&load(&format!("{ECHO}allow_identities = ['ops']\n"))).len(),
            1
        );
        // With a client CA, all of it is fine.
        let fine = format!(
            "{ECHO}allow_identities = ['ops']\n{tls}client_ca = '/ca.pem'\n\
             client_auth = 'optional'\nalpn = ['http/1.1']\nhandshake_timeout = '5m'\n"
        );
        assert_eq!(error_lines(&load(&fine)), Vec::<String>::new());
    }

    #[test]
    fn relative_tls_paths_are_relative_to_the_config_file() {
        let dir = std::env::temp_dir().join(format!("wharf-config-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("wharf.toml");
        let text = format!(
            "{ECHO}[services.e.tls]\ncert = 'tls/c.pem'\nkey = '/abs/c.key'\nclient_ca = 'ca.pem'\n"
        );
        std::fs::write(&file, &text).unwrap();
        let src = ConfigSource::load(Some(&file), "", [], Dict::new()).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let config = resolved(&src).unwrap();
        let tls = config.services["e"].tls.as_ref().unwrap();
        assert_eq!(tls.cert, dir.join("tls/c.pem"));
        assert_eq!(tls.key, Path::new("/abs/c.key"));
        assert_eq!(tls.client_ca.as_deref(), Some(&*dir.join("ca.pem")));
        // Config text without a file: relative to the working directory, as written.
        let config = resolved(&load(&text)).unwrap();
        let tls = config.services["e"].tls.as_ref().unwrap();
        assert_eq!(tls.cert, Path::new("tls/c.pem"));
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
        let cfg = resolved(&src).unwrap();
        assert_eq!(cfg.server.backend, BackendChoice::Kind(BackendKind::Epoll));
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
        let errors = resolved(&src).unwrap_err();
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
    fn every_bad_key_of_a_service_is_reported_with_its_value_in_user_terms() {
        let src = load(
            "[services.e]\nplugin = 'echo'\nlisten = 'nowhere'\nmax_connections = 'lots'\n\
             idle_timeout = 'soon'\nallow_from = ['10.0.0.0/8', 'bogus']\nmax_blocking = -1\n",
        );
        let errors: Vec<String> = resolved(&src)
            .unwrap_err()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            errors,
            [
                "test.toml: services.e.allow_from.1 = \"bogus\": `bogus` is not an IP address or \
                 CIDR network",
                "test.toml: services.e.idle_timeout = \"soon\": expected a duration like \"30s\" \
                 or \"1m 30s\"",
                "test.toml: services.e.listen = \"nowhere\": expected an IP address with port, \
                 like \"127.0.0.1:7000\", or unix:/path/to.sock, unix:@name, udp:IP:port",
                "test.toml: services.e.max_blocking = -1: expected a non-negative integer",
                "test.toml: services.e.max_connections = \"lots\": expected a non-negative \
                 integer, found a string",
            ]
        );
        // A missing required key is reported once; one the checker took out is not reported.
        let errors =
            resolved(&load("[services.e]\nplugin = 'echo'\nmax_blocking = 'x'\n")).unwrap_err();
        let keys: Vec<&str> = errors.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(
            keys,
            ["services.e.max_blocking", "services.e"],
            "{errors:?}"
        );
        assert!(errors[1].message.contains("missing required key `listen`"));
    }

    #[test]
    fn bad_service_names_and_empty_configs_are_errors() {
        let errors = resolved(&load(
            "[services.Echo]\nplugin='echo'\nlisten='127.0.0.1:1'\n",
        ))
        .unwrap_err();
        assert!(
            errors[0].to_string().contains("services.Echo"),
            "{errors:?}"
        );
        let errors = resolved(&load("")).unwrap_err();
        assert!(errors[0].message.contains("no service"), "{errors:?}");
        let errors = resolved(&load("[services]\n")).unwrap_err();
        assert!(errors[0].message.contains("no service"), "{errors:?}");
        let errors = resolved(&load(
            "[server]\nworkers = 5000\n[services.e]\nplugin='echo'\nlisten='127.0.0.1:1'\n\
             max_connections = 0\nidle_timeout = '400days'\n",
        ))
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

    fn with_env(toml: &str, vars: &[(&str, &str)]) -> Result<ConfigSource, Vec<ConfigError>> {
        let env = vars
            .iter()
            .map(|(k, v)| (OsString::from(k), OsString::from(v)));
        ConfigSource::from_parts(toml, "test.toml", env, Dict::new())
    }

    const ECHO: &str = "[services.e]\nplugin = 'echo'\nlisten = '127.0.0.1:1'\n";

    #[test]
    fn every_env_override_names_a_key_or_is_an_error_naming_it() {
        // Empty segments (doubled, leading, trailing `__`) used to vanish silently.
        for var in [
            "WHARF_SERVICES__E____ALLOW_FROM",
            "WHARF___SERVICES__E__ALLOW_FROM",
            "WHARF_SERVICES__E__ALLOW_FROM__",
            "WHARF_",
            "WHARF_SERVICES__E__ALLOW FROM",
        ] {
            let errors = with_env(ECHO, &[(var, "[\"10.0.0.0/8\"]")]).err().unwrap();
            assert_eq!(errors.len(), 1, "{errors:?}");
            let text = errors[0].to_string();
            assert!(
                text.starts_with(&format!("environment variable {var}: ")),
                "{text}"
            );
            assert!(text.contains("names no key"), "{text}");
        }
        let first_error = |var: &str, value: &str| {
            let src = with_env(ECHO, &[(var, value)]).unwrap();
            resolved(&src).unwrap_err()[0].to_string()
        };
        // A well-formed override that names no real key is an error naming the variable.
        let error = first_error("WHARF_SERVICES__E__ALLOW_FRM", "[]");
        assert!(
            error.starts_with("environment variable WHARF_SERVICES__E__ALLOW_FRM: services.e"),
            "{error}"
        );
        // A real key is applied, attributed to its variable; WHARF_LOG and others are ignored.
        let src = with_env(
            ECHO,
            &[
                ("WHARF_SERVICES__E__ALLOW_FROM", "[\"10.0.0.0/8\"]"),
                ("WHARF_LOG", "debug"),
                ("WHARF_URING_FALLBACK", "1"),
                ("HOME", "/root"),
            ],
        )
        .unwrap();
        assert_eq!(resolved(&src).unwrap().services["e"].allow_from.len(), 1);
        assert_eq!(
            first_error("WHARF_SERVICES__E__LISTEN", "nowhere"),
            "environment variable WHARF_SERVICES__E__LISTEN: services.e.listen: \
             expected an IP address with port, like \"127.0.0.1:7000\", or \
             unix:/path/to.sock, unix:@name, udp:IP:port"
        );
        // A service created by the environment alone: its errors name the variable.
        let error = first_error("WHARF_SERVICES__NEW__LISTEN", "127.0.0.1:2");
        assert!(
            error.starts_with("environment variable WHARF_SERVICES__NEW__LISTEN: services.new"),
            "{error}"
        );
        // Two variables for one key, and a value that is not UTF-8.
        let errors = with_env(
            ECHO,
            &[
                ("WHARF_SERVER__WORKERS", "1"),
                ("WHARF_server__workers", "2"),
            ],
        )
        .err()
        .unwrap();
        assert!(errors[0].message.contains("same key"), "{errors:?}");
        use std::os::unix::ffi::OsStringExt;
        let env = [(
            OsString::from("WHARF_SERVER__WORKERS"),
            OsString::from_vec(vec![0xff, b'1']),
        )];
        let errors = ConfigSource::from_parts(ECHO, "t", env, Dict::new())
            .err()
            .unwrap();
        assert!(errors[0].message.contains("not valid UTF-8"), "{errors:?}");
    }

    #[test]
    fn env_overrides_reach_keys_spelled_with_capitals() {
        // Variable names are case-insensitive: the override lands on the key the file has
        // (`PATH`), not on a new lowercase `path` beside it that nothing reads.
        let toml = "[services.x]\nplugin = 'exec'\nlisten = '127.0.0.1:1'\n\
                    [services.x.options.env]\nPATH = '/bin'\n";
        let src = with_env(
            toml,
            &[("WHARF_SERVICES__X__OPTIONS__ENV__PATH", "/nonexistent")],
        )
        .unwrap();
        let env: BTreeMap<String, String> = src.extract("services.x.options.env", &[]).unwrap();
        assert_eq!(env.len(), 1, "{env:?}");
        assert_eq!(env["PATH"], "/nonexistent");
        // A key the file does not have is created lowercase, as before.
        let src = with_env(toml, &[("WHARF_SERVICES__X__OPTIONS__ENV__LANG", "C")]).unwrap();
        let env: BTreeMap<String, String> = src.extract("services.x.options.env", &[]).unwrap();
        assert_eq!(env["lang"], "C");
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_stack_overflow() {
        let deep = |open: &str, close: &str, n: usize| open.repeat(n) + &close.repeat(n);
        for value in [
            deep("[", "]", 20_000),
            deep("{a=", "}", 20_000),
            format!("[\"x\", {}]", deep("[", "]", 20_000)),
            // brackets hidden from a naive scan by a quote figment does not treat as a string
            format!("[x=\", {}]", deep("[", "]", 20_000)),
            format!("[{}{}]", "'[',".repeat(50), deep("[", "]", 20_000)),
        ] {
            let errors = with_env(ECHO, &[("WHARF_SERVICES__E__ALLOW_FROM", &value)])
                .err()
                .unwrap();
            assert!(errors[0].message.contains("nested"), "{errors:?}");
            assert!(!errors[0].message.contains("[["), "quotes the value");
        }
        // Strings may hold any brackets.
        let ok = format!("[\"{}\"]", "[".repeat(100));
        assert!(with_env(ECHO, &[("WHARF_SERVICES__E__ALLOW_FROM", &ok)]).is_ok());

        let dotted = vec!["a"; 20_000].join(".");
        for text in [
            format!("x = {}", deep("[", "]", 20_000)),
            format!("x = {}", deep("{a=", "}", 20_000)),
            format!("[{dotted}]\n"),
            format!("[[{dotted}]]\n"),
            format!("{dotted} = 1\n"),
            format!("x = {{ {dotted} = 1 }}\n"),
            format!("x = [{{ y = [{{ {dotted} = 1 }}] }}]\n"),
            format!("\"q\".{dotted} = 1\n"),
        ] {
            let errors = with_env(&text, &[]).err().unwrap();
            assert!(errors[0].message.contains("nested"), "{errors:?}");
        }
        // Real configs are far from the bound; dots in strings, floats and comments are not levels.
        let fine = format!(
            "{ECHO}[services.e.options]\ntransform = 'upper' # {dotted}\n\
             [services.x.options.commands]\nup = {{ argv = [\"{dotted}\"], timeout = \"1.5s\" }}\n"
        );
        assert!(with_env(&fine, &[]).is_ok());
    }

    #[test]
    fn byte_order_marks_and_syntax_errors_are_one_line_without_source_text() {
        let errors = with_env(&format!("\u{feff}{ECHO}"), &[]).err().unwrap();
        assert_eq!(errors[0].origin, "test.toml");
        assert!(errors[0].message.contains("byte-order mark"), "{errors:?}");
        let errors = with_env("[services.e]\ntoken = \"s3cret\n", &[])
            .err()
            .unwrap();
        let text = errors[0].to_string();
        assert!(
            text.starts_with("test.toml: services.e.token: TOML syntax error at line 2"),
            "{text}"
        );
        assert!(!text.contains("s3cret") && !text.contains('\n'), "{text}");
    }

    #[test]
    fn errors_at_secret_keys_never_quote_the_value() {
        #[derive(Deserialize, Debug)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct Opts {
            token: Vec<String>,
            other: Vec<String>,
        }
        let errors = |options: &str| {
            let src = load(&format!("{ECHO}[services.e.options]\n{options}"));
            let errors = src.extract::<Opts>("services.e.options", &["token"]);
            format!("{:?}", errors.unwrap_err())
        };
        let all = errors("token = 's3cret'\nother = []\n");
        assert!(!all.contains("s3cret"), "{all}");
        assert!(all.contains("services.e.options.token"), "{all}");
        assert!(all.contains("expected an array, found a string"), "{all}");
        assert!(all.contains("(value hidden)"), "{all}");
        // other keys quote their value
        let all = errors("token = []\nother = 'visible'\n");
        assert!(all.contains("\\\"visible\\\""), "{all}");
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
        let errors = src.extract::<Opts>("services.e.options", &[]).unwrap_err();
        assert_eq!(errors[0].key, "services.e.options.transfrom", "{errors:?}");
        // absent section: required field reported under the section's path
        let src = load("[services.e]\nplugin='echo'\nlisten='127.0.0.1:1'\n");
        let errors = src.extract::<Opts>("services.e.options", &[]).unwrap_err();
        assert!(errors[0].to_string().contains("transform"), "{errors:?}");
    }
}
