//! Signals: SIGTERM and SIGINT stop the server, SIGHUP reloads it, SIGUSR1 reopens the
//! access log (logrotate's convention, see `deploy/logrotate/wharf`).
//!
//! `wharf serve` catches SIGHUP from its first instruction ([`catch_early_sighup`]), because a
//! `systemctl reload` or a ConfigMap watcher may send one while the config is still loading,
//! and SIGHUP's default action would kill the process. Once the sockets are bound, tokio's
//! handlers take over ([`Signals::install`], [`hand_over_sighup`]) and the serving loop
//! ([`super::serving`]) acts on them: a stop leads to the drain ([`super::drain`]), a SIGHUP to a
//! reload ([`super::reload`]).

use std::io;

static EARLY_SIGHUP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
/// Set once tokio's handler is in place. Tokio's handler (signal-hook-registry) also calls the
/// handler it replaced, this one, for every later SIGHUP: without this flag a SIGHUP arriving
/// during startup would be seen twice, and cause two reloads.
static SIGHUP_HANDED_OVER: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_early_sighup(_: libc::c_int) {
    use std::sync::atomic::Ordering::SeqCst;
    if !SIGHUP_HANDED_OVER.load(SeqCst) {
        EARLY_SIGHUP.store(true, SeqCst);
    }
}

/// A SIGUSR1 came before tokio's handler was installed.
static EARLY_SIGUSR1: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_early_sigusr1(_: libc::c_int) {
    EARLY_SIGUSR1.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// Call first thing in `serve`: until the real handlers are installed (after the config is
/// loaded and every socket bound), a SIGHUP (`systemctl reload`, a ConfigMap watcher) would
/// otherwise kill the process. It is remembered and acted on once serving.
pub fn catch_early_sighup() {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(
            libc::SIGHUP,
            on_early_sighup as extern "C" fn(libc::c_int) as libc::sighandler_t,
        )
    };
    // Likewise SIGUSR1 (a log rotation while starting), whose default action is to kill.
    // SAFETY: as above.
    unsafe {
        libc::signal(
            libc::SIGUSR1,
            on_early_sigusr1 as extern "C" fn(libc::c_int) as libc::sighandler_t,
        )
    };
}

/// Whether a SIGUSR1 came before tokio's handler (call after [`Signals::install`]): the
/// access log is then reopened once, in case the file was renamed while starting.
pub(super) fn early_sigusr1() -> bool {
    EARLY_SIGUSR1.swap(false, std::sync::atomic::Ordering::SeqCst)
}

/// Call right after installing tokio's SIGHUP handler: from then on its stream reports every
/// SIGHUP. Returns whether one came before. (One arriving between tokio's `sigaction` and this
/// call is reported by both: a second reload of an unchanged file, which is harmless.)
pub(super) fn hand_over_sighup() -> bool {
    use std::sync::atomic::Ordering::SeqCst;
    SIGHUP_HANDED_OVER.store(true, SeqCst);
    EARLY_SIGHUP.swap(false, SeqCst)
}

/// The signals `serve` acts on.
#[derive(Clone, Copy)]
pub(super) enum Signal {
    Term,
    Int,
    Hup,
    Usr1,
}

impl Signal {
    pub(super) fn name(self) -> &'static str {
        match self {
            Signal::Term => "SIGTERM",
            Signal::Int => "SIGINT",
            Signal::Hup => "SIGHUP",
            Signal::Usr1 => "SIGUSR1",
        }
    }
}

/// SIGTERM, SIGINT (stop), SIGHUP (reload) and SIGUSR1 (reopen the access log), installed
/// before workers start.
pub(super) struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
    usr1: tokio::signal::unix::Signal,
}

impl Signals {
    pub(super) fn install() -> io::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
            usr1: signal(SignalKind::user_defined1())?,
        })
    }

    pub(super) async fn recv(&mut self) -> Signal {
        tokio::select! {
            _ = self.term.recv() => Signal::Term,
            _ = self.int.recv() => Signal::Int,
            _ = self.hup.recv() => Signal::Hup,
            _ = self.usr1.recv() => Signal::Usr1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// The only test in this binary that touches SIGHUP: the handlers are process-wide.
    #[test]
    fn each_sighup_is_reported_once_across_the_hand_over_to_tokio() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        catch_early_sighup();
        // SAFETY: raise(3) delivers to this thread, whose handler only stores to an atomic.
        let raise = || assert_eq!(unsafe { libc::raise(libc::SIGHUP) }, 0);
        raise();
        let mut hup = rt
            .block_on(async {
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            })
            .unwrap();
        // Before the hand-over: reported by the early flag (tokio was not there yet).
        assert!(hand_over_sighup());
        // After it: tokio's stream reports it, the early handler (which tokio's calls too)
        // no longer does.
        raise();
        let got =
            rt.block_on(async { tokio::time::timeout(Duration::from_secs(10), hup.recv()).await });
        assert_eq!(got, Ok(Some(())));
        assert!(!EARLY_SIGHUP.load(std::sync::atomic::Ordering::SeqCst));
    }
}
