//! Every child process group wharf started and has not finished with, process-wide, so that no
//! child outlives wharf whatever way it exits.
//!
//! A plugin that runs processes (exec; any future process plugin) starts each one in its own
//! process group through [`spawn`], which records the group until the returned [`Registered`]
//! guard drops. Whatever path ends the process (the end of a drain, a grace period that
//! expired while commands ran, a second SIGTERM/SIGINT that calls `std::process::exit`, a
//! startup error after workers started, a panic unwinding out of `serve`), the binary calls
//! [`kill_all`] first: every recorded group gets SIGKILL, and from then on [`spawn`] refuses to
//! start anything, so a blocking thread still inside a plugin while the runtimes are torn down
//! cannot leave a new child behind.
//!
//! Group ids are safe to signal while recorded: the guard must be dropped *before* the group's
//! leader is reaped, so the id cannot have been reused by an unrelated process.

use std::collections::BTreeSet;
use std::io;
use std::process::{Child, Command, ExitStatus};
use std::sync::{Mutex, PoisonError, RwLock};

/// Whether [`kill_all`] has run. Spawns hold it for reading (so they run concurrently), and
/// [`kill_all`] takes it for writing: it waits for spawns in progress, whose groups it then
/// sees, and no spawn starts after it.
static CLOSED: RwLock<bool> = RwLock::new(false);
/// The live groups.
static GROUPS: Mutex<BTreeSet<libc::pid_t>> = Mutex::new(BTreeSet::new());

fn groups() -> std::sync::MutexGuard<'static, BTreeSet<libc::pid_t>> {
    GROUPS.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Records one live process group until dropped. Drop it before reaping the group's leader.
#[must_use = "the group is forgotten when the guard drops"]
pub struct Registered(libc::pid_t);

impl Registered {
    /// The process group id (the leader's pid).
    pub fn pgid(&self) -> libc::pid_t {
        self.0
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        groups().remove(&self.0);
    }
}

/// Spawns `cmd` as the leader of a new process group and records the group. Fails (without
/// starting anything) once [`kill_all`] has run: wharf is exiting.
pub fn spawn(cmd: &mut Command) -> io::Result<(Child, Registered)> {
    use std::os::unix::process::CommandExt;
    cmd.process_group(0);
    // Held across the spawn so that kill_all either sees this group or runs before it starts.
    let closed = CLOSED.read().unwrap_or_else(PoisonError::into_inner);
    if *closed {
        return Err(io::Error::other("wharf is exiting: no new processes"));
    }
    let child = cmd.spawn()?;
    let pgid = child.id() as libc::pid_t;
    groups().insert(pgid);
    Ok((child, Registered(pgid)))
}

/// Ends a process group started with [`spawn`] for good, in the only safe order: SIGKILL to
/// the whole group (whatever the leader left running in it) while the leader is still
/// unreaped (so the group id cannot have been reused), then the record dropped, then the
/// leader reaped. Blocks until the leader is gone (prompt after SIGKILL). Returns its status.
pub fn kill_and_reap(child: &mut Child, registered: Registered) -> io::Result<ExitStatus> {
    crate::program::signal_group(registered.pgid(), libc::SIGKILL);
    drop(registered);
    child.wait()
}

/// [`kill_and_reap`] for a caller that must not block (a connection's task, on a worker): the
/// leader is reaped at once if it is already gone (its status returned), else by a
/// short-lived thread (`None`).
pub fn kill_and_reap_detached(mut child: Child, registered: Registered) -> Option<ExitStatus> {
    crate::program::signal_group(registered.pgid(), libc::SIGKILL);
    drop(registered);
    match child.try_wait() {
        Ok(Some(status)) => Some(status),
        Ok(None) => {
            let reaper = std::thread::Builder::new().name("wharf-reaper".into());
            if let Err(e) = reaper.spawn(move || child.wait()) {
                tracing::warn!(error = %e, "cannot start a thread to reap a killed child");
            }
            None
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot reap a killed child");
            None
        }
    }
}

/// SIGKILLs every recorded process group and refuses new ones from now on. Called on every
/// exit path of `wharf serve`; idempotent. Returns how many groups were signalled.
pub fn kill_all() -> usize {
    let mut closed = CLOSED.write().unwrap_or_else(PoisonError::into_inner);
    *closed = true;
    let groups = groups();
    for &pgid in groups.iter() {
        // SAFETY: signalling a process group we started whose leader is not reaped yet.
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
    }
    groups.len()
}

/// Groups recorded now (for tests and diagnostics).
pub fn live() -> usize {
    groups().len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    #[test]
    fn kill_all_kills_recorded_groups_and_refuses_new_ones() {
        let (mut child, registered) = spawn(Command::new("sleep").arg("30")).unwrap();
        assert!(live() >= 1);
        assert!(kill_all() >= 1);
        let status = child.wait().unwrap();
        assert_eq!(status.signal(), Some(libc::SIGKILL));
        drop(registered);
        let refused = spawn(&mut Command::new("true"));
        assert!(refused.is_err(), "no process starts once wharf is exiting");
    }
}
