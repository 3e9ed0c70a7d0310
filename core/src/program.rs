//! Programs wharf starts for its clients, the same way for every plugin that runs them (exec's
//! allowlisted commands, the process plugin's sessions).
//!
//! What must not differ between those plugins lives here once:
//!
//! - **resolution at startup** ([`resolve`]): an absolute path, or a bare name looked up in a
//!   `PATH`-style list of absolute directories; never a relative path, never a shell;
//! - **the launch** ([`Launch::command`]): `argv[0]` as a shell would pass it, a cleared
//!   environment plus the configured one, a working directory, optionally another user and
//!   group (when wharf runs as root); the caller then spawns it through
//!   [`crate::children::spawn`] (its own process group, recorded so nothing outlives wharf) and
//!   applies [`set_nice`];
//! - **watching a child without reaping it** ([`pidfd_open`], [`exited_unreaped`]), so its
//!   process group can be killed while the group id is still ours (the order
//!   [`crate::children::kill_and_reap`] keeps);
//! - **nothing inherited by accident** ([`close_inherited_on_exec`]): descriptors wharf itself
//!   inherited from whatever started it are never passed on to the programs.

use std::ffi::CString;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The fixed `PATH` programs are looked up in (and the default `PATH` of their environment):
/// system directories only, never the working directory.
pub const SAFE_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// Finds `program` in `path` (a `PATH`-style list) unless it is already absolute. Only
/// absolute entries of `path` count: a relative one would resolve against wharf's working
/// directory here but the program's `cwd` at run time.
pub fn resolve(program: &str, path: Option<&str>) -> Result<PathBuf, String> {
    let candidate = Path::new(program);
    let found = if candidate.is_absolute() {
        Some(candidate.to_path_buf())
    } else if program.contains('/') {
        return Err(format!(
            "`{program}`: use an absolute path or a bare program name"
        ));
    } else {
        path.unwrap_or("")
            .split(':')
            .filter(|dir| dir.starts_with('/'))
            .map(|dir| Path::new(dir).join(program))
            .find(|p| is_executable(p))
    };
    match found {
        Some(p) if is_executable(&p) => Ok(p),
        Some(p) => Err(format!("`{}` is not an executable file", p.display())),
        None => Err(format!("`{program}` not found in {}", path.unwrap_or(""))),
    }
}

/// Whether `p` is a regular file with an execute bit.
pub fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The user and group a program runs as, resolved at startup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Credentials {
    /// User id.
    pub uid: u32,
    /// Group id (supplementary groups are dropped: std does so when root sets a uid).
    pub gid: u32,
}

/// Resolves `user` (a name or a numeric id) and `group` (likewise; absent: the user's primary
/// group) to ids.
pub fn credentials(user: &str, group: Option<&str>) -> Result<Credentials, String> {
    let (uid, primary) = lookup_user(user)?;
    let gid = match group {
        None => primary,
        Some(group) => lookup_group(group)?,
    };
    Ok(Credentials { uid, gid })
}

/// A user's id and primary group, by name or number.
fn lookup_user(user: &str) -> Result<(u32, u32), String> {
    let name = CString::new(user).map_err(|_| format!("`{user}`: contains NUL"))?;
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: a zeroed passwd is a valid out-parameter.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call; `buf` outlives the use of `pwd`'s fields.
    let rc = unsafe {
        libc::getpwnam_r(
            name.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut found,
        )
    };
    if rc == 0 && !found.is_null() {
        return Ok((pwd.pw_uid, pwd.pw_gid));
    }
    if let Ok(uid) = user.parse::<u32>() {
        // A numeric id need not have a passwd entry; its group is then its own number.
        // SAFETY: as above, looked up by id.
        let rc =
            unsafe { libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr(), buf.len(), &mut found) };
        let gid = if rc == 0 && !found.is_null() {
            pwd.pw_gid
        } else {
            uid
        };
        return Ok((uid, gid));
    }
    Err(format!("no user `{user}` on this system"))
}

/// A group's id, by name or number.
pub fn lookup_group(group: &str) -> Result<u32, String> {
    let name = CString::new(group).map_err(|_| format!("`{group}`: contains NUL"))?;
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: a zeroed group is a valid out-parameter.
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call.
    let rc = unsafe {
        libc::getgrnam_r(
            name.as_ptr(),
            &mut grp,
            buf.as_mut_ptr(),
            buf.len(),
            &mut found,
        )
    };
    if rc == 0 && !found.is_null() {
        return Ok(grp.gr_gid);
    }
    group
        .parse::<u32>()
        .map_err(|_| format!("no group `{group}` on this system"))
}

/// Whether wharf runs as root (effective uid 0): only then can it start programs as another
/// user.
pub fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Everything needed to start one program, resolved at startup.
#[derive(Debug, Clone)]
pub struct Launch {
    /// Absolute path of the program.
    pub program: PathBuf,
    /// Arguments after `argv[0]`.
    pub args: Vec<String>,
    /// The complete environment (nothing is inherited).
    pub env: Vec<(String, String)>,
    /// Working directory.
    pub cwd: PathBuf,
    /// Niceness (0: unchanged), applied with [`set_nice`] after the spawn.
    pub nice: i32,
    /// Another user and group to run as; `None`: wharf's own.
    pub credentials: Option<Credentials>,
}

impl Launch {
    /// The command, ready for [`crate::children::spawn`]; stdio is the caller's to set.
    pub fn command(&self) -> Command {
        use std::os::unix::process::CommandExt;
        let mut cmd = Command::new(&self.program);
        // argv[0], which programs put in their error messages, is the program's name as a
        // shell would pass it (`ls: cannot access ...`), not the absolute path it was found at.
        if let Some(name) = self.program.file_name() {
            cmd.arg0(name);
        }
        cmd.args(&self.args)
            .env_clear()
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .current_dir(&self.cwd);
        if let Some(c) = self.credentials {
            // Group first is std's order too; as root, std also drops supplementary groups.
            cmd.gid(c.gid).uid(c.uid);
        }
        cmd
    }
}

/// Lowers the CPU priority of process `pid` (its own children inherit it) so a burst of
/// programs cannot starve the IO workers. Set from the parent after the spawn rather than in a
/// `pre_exec` hook, which would force `fork()` instead of the much cheaper `posix_spawn`.
pub fn set_nice(pid: libc::pid_t, nice: i32) {
    if nice != 0 {
        // SAFETY: setpriority on our own child's pid.
        unsafe { libc::setpriority(libc::PRIO_PROCESS, pid as libc::id_t, nice) };
    }
}

/// A pidfd for `pid` (Linux 5.3+), readable once the process exits; `None` where unsupported.
pub fn pidfd_open(pid: libc::pid_t) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags; it returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    // SAFETY: on success the descriptor is new and ours.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Whether our child `pid` has exited, without reaping it (`waitid` with `WNOWAIT`).
pub fn exited_unreaped(pid: libc::pid_t) -> bool {
    // SAFETY: a zeroed siginfo_t is a valid out-parameter; waitid only inspects our child.
    unsafe {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        let flags = libc::WEXITED | libc::WNOHANG | libc::WNOWAIT;
        libc::waitid(libc::P_PID, pid as libc::id_t, &mut info, flags) == 0 && info.si_pid() != 0
    }
}

/// Sends `signal` to process group `pgid`.
pub fn signal_group(pgid: libc::pid_t, signal: libc::c_int) {
    // SAFETY: signalling a process group the caller started and whose leader is not reaped.
    unsafe { libc::kill(-pgid, signal) };
}

/// Marks every descriptor from 3 up close-on-exec, so that nothing wharf inherited from what
/// started it (a shell's stray descriptors, say) reaches the programs it runs. Call first
/// thing at startup, before any thread or descriptor of wharf's own exists. The systemd
/// socket-activation descriptors are among them, which is what activation wants anyway (it
/// marks the ones it claims close-on-exec too); close-on-exec closes nothing in wharf itself.
/// Uses `close_range(2)` (Linux 5.11), else walks `/proc/self/fd`.
pub fn close_inherited_on_exec() {
    // SAFETY: close_range with CLOSE_RANGE_CLOEXEC only sets a flag on descriptors.
    let done = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    } == 0;
    if done {
        return;
    }
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    // Collected first: the directory's own descriptor is among the entries while it is read.
    let fds: Vec<RawFd> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|&fd| fd >= 3)
        .collect();
    for fd in fds {
        // SAFETY: F_GETFD/F_SETFD only read and set the close-on-exec flag; a descriptor
        // closed meanwhile (the directory's) makes them fail harmlessly.
        unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFD);
            if flags >= 0 {
                libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolution_is_absolute_or_on_the_path_never_relative() {
        assert!(resolve("sh", Some(SAFE_PATH)).unwrap().is_absolute());
        assert!(resolve("/bin/sh", None).is_ok());
        assert!(resolve("./sh", Some(SAFE_PATH)).is_err());
        assert!(resolve("bin/sh", Some(SAFE_PATH)).is_err());
        // Relative PATH entries are ignored.
        assert!(resolve("sh", Some("bin:.")).is_err());
        assert!(resolve("no-such-program-here", Some(SAFE_PATH)).is_err());
        assert!(resolve("/etc/passwd", None)
            .unwrap_err()
            .contains("not an executable"));
    }

    #[test]
    fn credentials_by_name_and_number() {
        let root = credentials("root", None).unwrap();
        assert_eq!(root, Credentials { uid: 0, gid: 0 });
        assert_eq!(credentials("0", Some("0")).unwrap(), root);
        assert!(credentials("no-such-user-here", None).is_err());
        assert!(credentials("root", Some("no-such-group-here")).is_err());
    }
}
