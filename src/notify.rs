//! systemd's readiness protocol (`sd_notify`), for `Type=notify` units: `READY=1` once every
//! service is listening, `RELOADING=1` and `READY=1` around a config reload, `STOPPING=1` when
//! the drain starts. With it, systemd does not consider wharf started (nor send it a reload)
//! before it can take one. Without `NOTIFY_SOCKET` in the environment, nothing is sent.
//!
//! The lifecycle phases in [`crate::server`] send these: `READY=1` when serving starts,
//! `RELOADING=1` in the reload phase, `STOPPING=1` in the drain.

use std::os::unix::net::UnixDatagram;

use tracing::debug;

/// Sends `state` (newline-separated `KEY=VALUE` pairs) to systemd, if it is listening.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sent = UnixDatagram::unbound().and_then(|socket| {
        let bytes = path.as_encoded_bytes();
        match bytes.strip_prefix(b"@") {
            // An abstract socket name (Linux).
            Some(name) => {
                use std::os::linux::net::SocketAddrExt;
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
                socket.send_to_addr(state.as_bytes(), &addr)
            }
            None => socket.send_to(state.as_bytes(), &path),
        }
    });
    if let Err(e) = sent {
        debug!(error = %e, state, "cannot notify systemd");
    }
}

/// `RELOADING=1` with the timestamp systemd wants next to it.
pub fn reloading() {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    let usec = now.tv_sec as u64 * 1_000_000 + now.tv_nsec as u64 / 1_000;
    notify(&format!("RELOADING=1\nMONOTONIC_USEC={usec}"));
}
