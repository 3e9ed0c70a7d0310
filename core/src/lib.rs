//! wharf-core: everything a protocol plugin and a backend share.
//!
//! The layout follows the data path of one connection:
//!
//! - [`listen`]: the `listen` address of a service: TCP, Unix-domain or UDP.
//! - [`net`]: listening sockets (one `SO_REUSEPORT` socket per worker), CIDR rules, and which
//!   client a peer address counts as.
//! - [`peer`]: who is at the other end: an IP address, or a Unix peer's credentials.
//! - [`unix`]: Unix-domain listeners: the socket file bound safely, its mode and group, its
//!   removal, and the config rules of Unix services.
//! - [`backend`]: what an IO mechanism (epoll, io_uring) must provide: a worker runtime, a
//!   [`backend::Listener`] and a [`Conn`]; [`backend::sys`] holds the socket helpers backend
//!   implementations share (not plugin API).
//! - [`worker`]: the accept loop and the worker body every backend runs: admission, metering,
//!   spawning, graceful drain.
//! - [`gate`]: per-service admission (`allow_from`, `max_connections`), in two steps: at
//!   accept, and once the client's address is known.
//! - [`proxy`]: the PROXY protocol header that names the client behind a load balancer.
//! - [`sources`]: per-source limits and connection rates, in bounded memory.
//! - [`metrics`]: every framework metric: names, HELP text, labels, per-service handles.
//! - [`blocking`]: each service's own threads for blocking jobs (`max_blocking`).
//! - [`access_log`]: one line per connection and per request, written off the workers.
//! - [`metered`]: the [`Conn`] wrapper that counts bytes and enforces `idle_timeout`.
//! - [`service`], [`conn`] and [`context`]: what a plugin author meets: `serve(conn, cx)`,
//!   the transport, and what the framework knows and offers about the connection (peer, drain
//!   signal, request metrics, blocking jobs).
//! - [`datagram`] and [`udp`]: UDP services: what a plugin answering datagrams implements,
//!   and the datagram loop, admission and reflection limits every backend runs.
//! - [`framing`]: lines, length-prefixed frames and exact reads over a [`Conn`], drain-aware.
//! - [`plugin`]: how a plugin names itself and declares typed options.
//! - [`config`]: the figment-based config model and its error reporting.
//! - [`exit_status`]: the exit statuses of the `wharf` command.
//! - [`buffer`]: read buffers sized for what the client does (small while it is idle).
//! - [`command`]: the command framing of exec and file-get (lines, or a pause, end a command).
//! - [`children`]: the process-wide registry of child process groups, killed on every exit.
//! - [`program`]: how programs started for clients are resolved, launched and watched (exec,
//!   process).
//! - [`shutdown`]: drain signals with deadlines (process stop, a reload retiring a service
//!   generation) and the per-worker connection tracker used to drain.
//! - [`testing`]: an in-memory [`Conn`] and a detached [`Context`], so plugins are unit-tested
//!   without sockets.

pub mod access_log;
pub mod backend;
pub mod blocking;
pub mod buffer;
pub mod children;
pub mod command;
pub mod config;
pub mod conn;
pub mod context;
pub mod datagram;
pub mod exit_status;
pub mod framing;
pub mod gate;
pub mod listen;
pub mod md5;
pub mod metered;
pub mod metrics;
pub mod net;
pub mod peer;
pub mod plugin;
pub mod program;
pub mod proxy;
pub mod service;
pub mod shutdown;
pub mod sources;
pub mod testing;
pub mod tls;
pub mod udp;
pub mod unix;
pub mod worker;

pub use async_trait::async_trait;
pub use conn::{BufResult, Conn, Spliced};
pub use context::{Context, Elapsed};
pub use datagram::{Datagram, DatagramService, Replies};
pub use peer::{Peer, PeerCredentials};
pub use plugin::{OptionDoc, Plugin, PluginError};
pub use service::{DynService, Service};
