//! How a protocol becomes a named, configurable plugin.
//!
//! A plugin is a [`Service`] (and, to serve UDP, a [`DatagramService`]) plus a name, a one-line description and a typed options struct.
//! The options struct is deserialized with `deny_unknown_fields` from
//! `[services.<name>.options]`, so a typo is an error that names the key, not a silent default.
//! Options that hold secrets are declared ([`Plugin::SECRETS`]) so that nothing prints them.

use serde::de::DeserializeOwned;
use serde::Serialize;

#[cfg(doc)]
use crate::datagram::DatagramService;
use crate::datagram::Erase;
use crate::service::Service;

/// A registrable protocol.
pub trait Plugin: Service + Sized {
    /// The name configs use in `plugin = "..."`.
    const NAME: &'static str;
    /// One line for `wharf plugins`.
    const DESCRIPTION: &'static str;
    /// Documentation of each option, for `wharf plugins` (defaults come from `Options::default`).
    const OPTIONS: &'static [OptionDoc];
    /// The `outcome` label values of `wharf_requests_total`, for plugins that have requests
    /// (see [`Context::record_request`](crate::Context::record_request)). Registered at startup so
    /// every series exists from the first scrape. Empty: no request metrics.
    const OUTCOMES: &'static [&'static str] = &[];
    /// Options whose values are secrets (keys under `options`, dotted for nested ones, e.g.
    /// `token`): `wharf check`, `wharf plugins`, logs and config errors show that they are set,
    /// never their value. Empty: nothing to hide.
    const SECRETS: &'static [&'static str] = &[];
    /// The ALPN protocols the service offers when it speaks TLS and its config names none
    /// (`tls.alpn`), in preference order, e.g. `&["http/1.1"]`. Empty: no ALPN.
    const ALPN: &'static [&'static str] = &[];
    /// Whether the plugin also answers datagrams, so that it can serve a `udp:` address:
    /// `Some(wharf_core::datagram::erase::<Self>)` for a plugin that implements
    /// [`DatagramService`]. `None` (the default): stream connections only, and a `udp:`
    /// address is a config error.
    const DATAGRAMS: Option<Erase<Self>> = None;

    /// The typed options. Use `#[serde(deny_unknown_fields, default)]`.
    type Options: DeserializeOwned + Serialize + Default;

    /// Builds the service from validated options. Called each time the config is loaded, for
    /// every service: by `wharf check` and `wharf config`, at `wharf serve` before any socket
    /// is bound, and on every reload (an error rejects the whole reload; for a service whose
    /// settings did not change, the new instance is dropped and the running one goes on).
    /// Checks that need the outside world (a directory exists...) belong here; side effects a
    /// second instance would trip over (binding, background tasks) do not.
    fn build(options: Self::Options) -> Result<Self, PluginError>;

    /// Called when a config reload replaces a running generation of this service with this
    /// newly built one, before it serves anything: the place to share bounds that must hold for
    /// the service as a whole (process slots, memory budgets, rate limits), so that the old
    /// generation's open sessions and the new one's count together. Nothing else carries over
    /// from `previous`. The default shares nothing.
    fn inherit(&self, previous: &Self) {
        let _ = previous;
    }
}

/// One documented option.
#[derive(Debug, Clone, Copy)]
pub struct OptionDoc {
    /// Key under `options`.
    pub name: &'static str,
    /// Type and allowed values, e.g. `"none" | "upper"`.
    pub kind: &'static str,
    /// What it does.
    pub help: &'static str,
}

/// A problem found while building a plugin from its options.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct PluginError {
    /// The option at fault (its key under `options`), when there is one.
    pub option: Option<String>,
    /// What is wrong, in words a user can act on.
    pub message: String,
}

impl PluginError {
    /// An error about one option.
    pub fn option(name: impl Into<String>, message: impl Into<String>) -> Self {
        PluginError {
            option: Some(name.into()),
            message: message.into(),
        }
    }
}
