//! Phase 1 of `wharf serve`: take every listening socket, before any worker starts.
//!
//! Each service's TCP address is bound once per worker (`SO_REUSEPORT`), a Unix-domain socket
//! once for all of them ([`wharf_core::unix`]: stale files, mode and group), or either is taken
//! from the sockets systemd passed (socket activation, [`crate::activation`]); then the metrics
//! listener. Doing
//! it all on the main thread first makes a busy port a one-line error (exit status
//! [`ADDRESS_IN_USE`](wharf_core::exit_status::ADDRESS_IN_USE)) with nothing half-running.
//! A reload binds its new addresses with [`bind_service`] too ([`super::reload`]). The workers
//! are started next, in [`super::workers`].

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;

use wharf_core::listen::{Listen, ListenSocket, UnixName};
use wharf_core::net::{bind_reuseport_group, bind_reuseport_udp_group};
use wharf_core::unix::{self, SocketFile};

use super::ServeError;
use crate::activation::Activated;
use crate::plan::{Plan, PlannedService};

/// One service's listening socket, one descriptor per worker.
pub(super) struct BoundService {
    /// The address it actually has (port 0 resolved, or the activated socket's).
    pub addr: Listen,
    /// One descriptor per worker.
    pub group: Vec<ListenSocket>,
    /// It came from systemd, which keeps its own copy open.
    pub activated: bool,
    /// A Unix socket's file, removed once the last holder lets go (exit, or a reload that
    /// removes or moves the service).
    pub file: Option<Arc<SocketFile>>,
}

/// Every socket `wharf serve` starts with.
pub(super) struct Bound {
    /// In the order of the plan's services.
    pub services: Vec<BoundService>,
    /// The metrics endpoint's, if `[metrics]` is configured.
    pub metrics: Option<TcpListener>,
}

/// Binds (or takes from systemd) every service's socket and the metrics listener.
pub(super) fn bind_all(plan: &Plan, workers: usize) -> Result<Bound, ServeError> {
    let mut activated = Activated::from_env().map_err(ServeError::failure)?;
    let mut services = Vec::with_capacity(plan.services.len());
    for svc in &plan.services {
        // Socket activation passes stream sockets; a UDP service binds its own.
        let passed = match svc.config.listen.is_stream() {
            true => activated.take(&svc.name, Some(&svc.config.listen)),
            false => None,
        };
        let bound = match passed {
            Some(socket) => share_activated(socket, workers).map_err(|e| {
                ServeError::failure(format!("socket activation: {}: {e}", svc.name))
            })?,
            None => bind_service(plan, svc, workers)?,
        };
        services.push(bound);
    }
    let metrics_addr = plan.config.metrics.as_ref().map(|m| m.listen);
    let metrics_listen = metrics_addr.map(Listen::Tcp);
    let metrics = match (
        metrics_addr,
        activated.take("metrics", metrics_listen.as_ref()),
    ) {
        (Some(_), Some(ListenSocket::Unix(_) | ListenSocket::Udp(_))) => {
            return Err(ServeError::failure(
                "socket activation: the `metrics` socket is not a TCP socket; the metrics \
                 endpoint listens on TCP",
            ))
        }
        (Some(_), Some(ListenSocket::Tcp(socket))) => {
            socket
                .set_nonblocking(true)
                .map_err(|e| ServeError::failure(format!("socket activation: metrics: {e}")))?;
            Some(socket)
        }
        (Some(addr), None) => {
            Some(bind_metrics(addr).map_err(|e| bind_error(plan, "metrics.listen", &addr, &e))?)
        }
        (None, Some(_)) => {
            return Err(ServeError::failure(
                "socket activation passed a `metrics` socket but the config has no [metrics] \
                 section",
            ))
        }
        (None, None) => None,
    };
    let unused = activated.leftover();
    if !unused.is_empty() {
        return Err(ServeError::failure(format!(
            "socket activation passed sockets {} that match no service by name or listen \
             address (services: {})",
            unused.join(", "),
            plan.services
                .iter()
                .map(|s| s.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    Ok(Bound { services, metrics })
}

/// One socket systemd passed, shared by every worker (each accepts on its own descriptor).
fn share_activated(socket: ListenSocket, workers: usize) -> io::Result<BoundService> {
    Ok(BoundService {
        addr: socket.local_listen()?,
        group: share(socket, workers)?,
        activated: true,
        file: None,
    })
}

/// One descriptor of `socket` per worker, non-blocking.
fn share(socket: ListenSocket, workers: usize) -> io::Result<Vec<ListenSocket>> {
    (0..workers.max(1))
        .map(|_| {
            let copy = match &socket {
                ListenSocket::Tcp(s) => ListenSocket::Tcp(s.try_clone()?),
                ListenSocket::Unix(s) => ListenSocket::Unix(s.try_clone()?),
                ListenSocket::Udp(s) => ListenSocket::Udp(s.try_clone()?),
            };
            match &copy {
                ListenSocket::Tcp(s) => s.set_nonblocking(true)?,
                ListenSocket::Unix(s) => s.set_nonblocking(true)?,
                ListenSocket::Udp(s) => s.set_nonblocking(true)?,
            }
            Ok(copy)
        })
        .collect()
}

/// The mode and group `svc`'s socket file gets (`socket_mode`, `socket_group`).
pub(super) fn file_settings(
    plan: &Plan,
    svc: &PlannedService,
) -> Result<unix::FileSettings, ServeError> {
    let gid = match &svc.config.socket_group {
        None => None,
        Some(group) => Some(wharf_core::program::lookup_group(group).map_err(|e| {
            let key = format!("services.{}.socket_group", svc.name);
            ServeError::failure(plan.source.error_at(&key, e).to_string())
        })?),
    };
    Ok(unix::FileSettings {
        mode: svc.config.socket_mode,
        gid,
    })
}

/// Binds a Unix-domain service's socket (see [`wharf_core::unix::bind`]), shared by every
/// worker.
fn bind_unix(
    plan: &Plan,
    svc: &PlannedService,
    name: &UnixName,
    workers: usize,
) -> Result<BoundService, ServeError> {
    let key = |k: &str| format!("services.{}.{k}", svc.name);
    unix::bind(name, file_settings(plan, svc)?)
        .map_err(|e| match e.kind() {
            io::ErrorKind::PermissionDenied => io::Error::other(format!(
                "{e} (no permission to create the socket file in its directory?)"
            )),
            _ => e,
        })
        .and_then(|bound| {
            Ok(BoundService {
                addr: svc.config.listen.clone(),
                group: share(ListenSocket::Unix(bound.listener), workers)?,
                activated: false,
                file: bound.file.map(Arc::new),
            })
        })
        .map_err(|e| bind_error(plan, &key("listen"), &svc.config.listen, &e))
}

/// Binds `svc`'s address for every worker; errors name the config key.
pub(super) fn bind_service(
    plan: &Plan,
    svc: &PlannedService,
    workers: usize,
) -> Result<BoundService, ServeError> {
    let group: io::Result<Vec<ListenSocket>> = match &svc.config.listen {
        Listen::Unix(name) => return bind_unix(plan, svc, name, workers),
        Listen::Tcp(addr) => bind_reuseport_group(*addr, workers)
            .map(|group| group.into_iter().map(ListenSocket::Tcp).collect()),
        Listen::Udp(addr) => bind_reuseport_udp_group(*addr, workers)
            .map(|group| group.into_iter().map(ListenSocket::Udp).collect()),
    };
    let bound = group.and_then(|group| {
        Ok(BoundService {
            addr: group[0].local_listen()?,
            group,
            activated: false,
            file: None,
        })
    });
    bound.map_err(|e| {
        let key = format!("services.{}.listen", svc.name);
        bind_error(plan, &key, &svc.config.listen, &e)
    })
}

fn bind_metrics(addr: SocketAddr) -> io::Result<TcpListener> {
    let listener = TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// What a bind error says when the address is taken.
const ADDRESS_IN_USE_HINT: &str = "(another process is listening there)";

/// A bind error located at its config key, with a hint; an address in use gets its own exit
/// status.
fn bind_error(plan: &Plan, key: &str, addr: &dyn std::fmt::Display, e: &io::Error) -> ServeError {
    let in_use = format!(" {ADDRESS_IN_USE_HINT}");
    let hint = match e.kind() {
        io::ErrorKind::AddrInUse => in_use.as_str(),
        io::ErrorKind::AddrNotAvailable => " (no local interface has that address)",
        io::ErrorKind::PermissionDenied => " (ports below 1024 need privileges)",
        _ => "",
    };
    let located = plan
        .source
        .error_at(key, format!("cannot listen on {addr}: {e}{hint}"))
        .to_string();
    if e.kind() == io::ErrorKind::AddrInUse {
        ServeError::address_in_use(located)
    } else {
        ServeError::failure(located)
    }
}
