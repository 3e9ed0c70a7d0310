//! The metrics of the `wharf` process as a whole, as opposed to a service's (those are
//! `wharf_core`'s, recorded by the workers): which build is running, and how config reloads
//! went. Names, help text and recording live here together; `/metrics` serves them next to the
//! services' series (see [`crate::metrics_http`]).

/// Gauge, label `version`: always 1; the label says which build is running.
pub const BUILD_INFO: &str = "wharf_build_info";
/// Counter, label `result` ([`ReloadResult`]): config reloads.
pub const CONFIG_RELOADS: &str = "wharf_config_reloads_total";
/// Gauge: 1 if the last config reload (or the start) succeeded, 0 if it did not.
pub const CONFIG_LAST_RELOAD_SUCCESSFUL: &str = "wharf_config_last_reload_successful";

/// Describes the process metrics and sets their starting values (every reload result at 0,
/// so a rate over them exists before the first reload). Call once, after the recorder is
/// installed.
pub fn register() {
    metrics::describe_gauge!(BUILD_INFO, "Build information; the value is always 1.");
    metrics::describe_counter!(
        CONFIG_RELOADS,
        "Config reloads (SIGHUP, --watch-config), by result: success, invalid, failed."
    );
    metrics::describe_gauge!(
        CONFIG_LAST_RELOAD_SUCCESSFUL,
        "1 if the last config reload succeeded (or none was tried), 0 if it was rejected."
    );
    metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    for result in ReloadResult::ALL {
        metrics::counter!(CONFIG_RELOADS, "result" => result.as_str()).increment(0);
    }
    metrics::gauge!(CONFIG_LAST_RELOAD_SUCCESSFUL).set(1.0);
}

/// The outcomes `wharf_config_reloads_total{result}` counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReloadResult {
    /// Applied.
    Success,
    /// The new config has errors; nothing changed.
    Invalid,
    /// Valid, but could not be applied (an address in use...); nothing changed, or only part
    /// of it when a worker could not take its share.
    Failed,
}

impl ReloadResult {
    const ALL: [ReloadResult; 3] = [Self::Success, Self::Invalid, Self::Failed];

    fn as_str(self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::Invalid => "invalid",
            Self::Failed => "failed",
        }
    }

    /// Counts this outcome and sets the "last reload successful" gauge.
    pub fn record(self) {
        metrics::counter!(CONFIG_RELOADS, "result" => self.as_str()).increment(1);
        let ok = matches!(self, Self::Success);
        metrics::gauge!(CONFIG_LAST_RELOAD_SUCCESSFUL).set(if ok { 1.0 } else { 0.0 });
    }
}
