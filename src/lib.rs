//! The `wharf` binary as a library: CLI, plugin registry, config planning and `serve`.
//!
//! - [`server`]: `wharf serve`'s lifecycle in phases (bind, start workers, serve, reload on
//!   SIGHUP, drain); [`server`]'s `reload` module is what happens on SIGHUP.
//! - [`backends`]: the only place that maps a backend name to its implementation crate.
//! - [`registry`]: plugin names to constructors; [`plan`]: config to built services;
//!   [`reload`]: what a new config changes (pure decisions); [`metrics_http`]: `/metrics`,
//!   `/healthz`, `/readyz`; [`status`]: the status page (`/`) and `/status` JSON it also
//!   serves; [`activation`], [`notify`]: systemd.
//!
//! It is a library so that a third-party binary can reuse all of it and add its own plugins
//! with one `register` line (see [`registry`]). The framework itself lives in `wharf-core`,
//! the IO backends in `backends/`, and each protocol in its own crate under `plugins/`.
//!
//! The module docs are written for contributors and link to private items (the lifecycle
//! phases of [`server`]); `cargo doc --document-private-items` renders those links.
#![allow(rustdoc::private_intra_doc_links)]

pub mod activation;
pub mod backends;
pub mod cli;
pub mod client;
pub mod metrics_http;
pub mod notify;
pub mod plan;
pub mod registry;
pub mod reload;
pub mod server;
pub mod status;

pub use registry::Registry;
