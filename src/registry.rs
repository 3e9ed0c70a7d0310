//! The plugin registry: plugin names to constructors, type-erased once per backend.
//!
//! A plugin's `serve` is generic over the connection type, so this is where a plugin meets the
//! concrete connection types of the compiled-in backends: registering `P` instantiates
//! `P::serve` for each of them. A third-party binary registers its own plugins the same way:
//!
//! ```no_run
//! let mut registry = wharf::Registry::with_builtins();
//! // registry.register::<my_plugin::MyPlugin>();
//! std::process::exit(wharf::cli::main(registry));
//! ```

use std::any::Any;
use std::collections::BTreeMap;
use std::sync::Arc;

use wharf_core::config::{ConfigError, ConfigSource, SECRET_PLACEHOLDER};
use wharf_core::tls::{Tls, TlsSettings};
use wharf_core::{DatagramService, OptionDoc, Plugin};

use crate::backends::ServiceInstances;

/// The plugins a binary knows, by name.
#[derive(Default)]
pub struct Registry {
    plugins: BTreeMap<&'static str, PluginEntry>,
}

/// What the registry knows about one plugin.
pub struct PluginEntry {
    /// Name used in `plugin = "..."`.
    pub name: &'static str,
    /// One-line description.
    pub description: &'static str,
    /// Documented options.
    pub options: &'static [OptionDoc],
    /// Request outcomes (`wharf_requests_total{outcome}`), empty for plugins without requests.
    pub outcomes: &'static [&'static str],
    /// ALPN protocols offered over TLS when `tls.alpn` is absent ([`Plugin::ALPN`]).
    pub alpn: &'static [&'static str],
    /// Whether it answers datagrams, so it can serve a `udp:` address ([`Plugin::DATAGRAMS`]).
    pub datagrams: bool,
    /// The default options (`Options::default()`) as a TOML table, secrets replaced by
    /// [`SECRET_PLACEHOLDER`]: what `wharf plugins` shows as each option's default.
    pub defaults: fn() -> toml::Table,
    build: fn(&ConfigSource, &str) -> Result<BuiltService, Vec<ConfigError>>,
}

/// A configured service instance, ready to be served by either backend.
pub struct BuiltService {
    /// The instance as each backend calls it.
    pub instances: ServiceInstances,
    /// Every resolved option as TOML, secrets included: what a reload compares to tell whether
    /// the service changed. Never print or log it: [`BuiltService::shown_options`] is for that.
    pub options: String,
    /// The resolved options with each secret's value replaced by [`SECRET_PLACEHOLDER`], for
    /// `wharf check` and `wharf config`.
    pub shown_options: toml::Table,
    /// The plugin's request outcomes, registered as metric series at startup.
    pub outcomes: &'static [&'static str],
    /// The instance as a UDP service answers datagrams with it, if the plugin can.
    pub datagrams: Option<Arc<dyn DatagramService>>,
    /// The same instance once more, for [`BuiltService::inherit_from`] across a reload.
    pub instance: Instance,
    inherit: fn(&dyn Any, &dyn Any),
    /// The instance behind a TLS handshake, as each backend calls it.
    over_tls: Box<dyn Fn(TlsSettings) -> ServiceInstances + Send + Sync>,
}

/// A plugin instance with its type erased, kept by a running service so the generation that
/// replaces it can [`inherit`](wharf_core::Plugin::inherit) from it.
pub type Instance = Arc<dyn Any + Send + Sync>;

impl BuiltService {
    /// Lets this newly built generation share the service-wide bounds of `previous`, the
    /// running instance it replaces (see [`wharf_core::Plugin::inherit`]). Nothing happens when
    /// `previous` is another plugin.
    pub fn inherit_from(&self, previous: &Instance) {
        (self.inherit)(&*self.instance, &**previous);
    }

    /// The instance as each backend calls it for a service with TLS: wrapped in the
    /// framework's TLS layer ([`Tls`]), which handshakes, applies `allow_identities` and then
    /// hands the session to the plugin. One wrapper per service generation, so a reload with
    /// new certificate files gives new connections the new certificate.
    pub fn instances_over_tls(&self, settings: TlsSettings) -> ServiceInstances {
        (self.over_tls)(settings)
    }
}

fn inherit<P: Plugin>(new: &dyn Any, previous: &dyn Any) {
    if let (Some(new), Some(previous)) = (new.downcast_ref::<P>(), previous.downcast_ref::<P>()) {
        new.inherit(previous);
    }
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// A registry with the built-in plugins.
    pub fn with_builtins() -> Self {
        let mut registry = Self::new();
        registry.register::<wharf_plugin_echo::Echo>();
        registry.register::<wharf_plugin_http_hello::HttpHello>();
        registry.register::<wharf_plugin_exec::Exec>();
        registry.register::<wharf_plugin_file_get::FileGet>();
        registry.register::<wharf_plugin_process::Process>();
        registry
    }

    /// Adds plugin `P`. A second plugin with the same name replaces the first.
    pub fn register<P: Plugin>(&mut self) -> &mut Self {
        self.plugins.insert(
            P::NAME,
            PluginEntry {
                name: P::NAME,
                description: P::DESCRIPTION,
                options: P::OPTIONS,
                outcomes: P::OUTCOMES,
                alpn: P::ALPN,
                datagrams: P::DATAGRAMS.is_some(),
                defaults: || shown::<P>(&P::Options::default()).0,
                build: build::<P>,
            },
        );
        self
    }

    /// The plugin registered as `name`.
    pub fn get(&self, name: &str) -> Option<&PluginEntry> {
        self.plugins.get(name)
    }

    /// All plugins, by name.
    pub fn iter(&self) -> impl Iterator<Item = &PluginEntry> {
        self.plugins.values()
    }

    /// Registered names, for "valid choices" messages.
    pub fn names(&self) -> Vec<&'static str> {
        self.plugins.keys().copied().collect()
    }
}

impl PluginEntry {
    /// Extracts and checks `[services.<service>.options]`, then builds the service.
    pub fn build(
        &self,
        source: &ConfigSource,
        service: &str,
    ) -> Result<BuiltService, Vec<ConfigError>> {
        (self.build)(source, service)
    }
}

fn build<P: Plugin>(
    source: &ConfigSource,
    service: &str,
) -> Result<BuiltService, Vec<ConfigError>> {
    let key = format!("services.{service}.options");
    let options: P::Options = source.extract(&key, P::SECRETS)?;
    let rendered =
        toml::to_string(&options).unwrap_or_else(|e| format!("# cannot render options: {e}"));
    let (shown, secrets) = shown::<P>(&options);
    let instance = P::build(options).map_err(|e| {
        let (key, secret) = match &e.option {
            Some(option) => (
                format!("{key}.{option}"),
                P::SECRETS.contains(&option.as_str()),
            ),
            None => (key.clone(), false),
        };
        // A plugin's message should not quote a secret; make sure of it.
        let message = secrets
            .iter()
            .filter(|s| !s.is_empty())
            .fold(e.message, |m, s| m.replace(s.as_str(), SECRET_PLACEHOLDER));
        vec![if secret {
            source.secret_error_at(&key, message)
        } else {
            source.value_error_at(&key, message)
        }]
    })?;
    let instance = Arc::new(instance);
    let plugin = Arc::clone(&instance);
    let datagrams = P::DATAGRAMS.map(|erase| erase(Arc::clone(&instance)));
    Ok(BuiltService {
        instances: ServiceInstances::of(&instance),
        instance,
        inherit: inherit::<P>,
        over_tls: Box::new(move |settings| {
            ServiceInstances::of(&Arc::new(Tls::new(Arc::clone(&plugin), settings)))
        }),
        options: rendered,
        shown_options: shown,
        outcomes: P::OUTCOMES,
        datagrams,
    })
}

/// `options` as a TOML table with every secret ([`Plugin::SECRETS`]) replaced by
/// [`SECRET_PLACEHOLDER`], and the secrets' values (as text) found on the way. Options that do
/// not serialize as a table show as an empty one: nothing is shown, so nothing can leak.
fn shown<P: Plugin>(options: &P::Options) -> (toml::Table, Vec<String>) {
    let mut table = toml::Table::try_from(options).unwrap_or_default();
    let mut secrets = Vec::new();
    for path in P::SECRETS {
        let mut parts = path.split('.').peekable();
        let mut current = &mut table;
        while let Some(part) = parts.next() {
            if parts.peek().is_none() {
                if let Some(value) = current.get_mut(part) {
                    secrets.push(match &*value {
                        toml::Value::String(s) => s.clone(),
                        other => other.to_string(),
                    });
                    *value = toml::Value::String(SECRET_PLACEHOLDER.into());
                }
                break;
            }
            match current.get_mut(part) {
                Some(toml::Value::Table(inner)) => current = inner,
                _ => break,
            }
        }
    }
    (table, secrets)
}
