//! One running program: its process group, its three pipes and its exit, watched through
//! tokio's reactor.
//!
//! The pipes and the exit are plain descriptors registered with [`AsyncFd`] (non-blocking
//! pipes, and a pidfd that becomes readable when the leader exits), not `tokio::process`:
//! that works the same on both backends (the io_uring workers run tokio-uring, itself on a
//! tokio reactor), needs no SIGCHLD handler, and leaves the reap to us, so the whole group is
//! killed while its id is still ours (the order [`wharf_core::children::kill_and_reap`] keeps),
//! without a blocking `wait()` on the worker ([`Child::finish`]).
//!
//! A [`Child`] that is dropped with its program still running (the session's task was
//! aborted at the end of a drain, or a spawn finished after its connection was gone) kills
//! the group and reaps the leader on the way out: nothing outlives its session.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use wharf_core::backend::sys;
use wharf_core::children::{self, Registered};
use wharf_core::program::{self, Launch};

/// How often exit is checked where pidfds are missing (kernels before 5.3).
const EXIT_POLL: Duration = Duration::from_millis(20);

/// Longest a session waits for its program's leader to exit after SIGKILL before leaving the
/// reap to a thread (SIGKILL is prompt unless the process is stuck in the kernel).
pub const REAP_WAIT: Duration = Duration::from_secs(2);

/// A started program, not registered with any reactor yet (it is made on a blocking thread
/// and handed to a worker). Dropped unadopted (its connection went away while it started),
/// it kills its group and reaps the leader.
pub struct Spawned(Option<Parts>);

/// What a [`Spawned`] holds until a [`Child`] adopts it.
struct Parts {
    child: std::process::Child,
    registered: Registered,
    stdin: OwnedFd,
    stdout: OwnedFd,
    stderr: OwnedFd,
    pidfd: Option<OwnedFd>,
}

impl Spawned {
    /// The leader's pid (and the group's id); `None` once adopted.
    pub fn pid(&self) -> Option<i32> {
        self.0.as_ref().map(|p| p.registered.pgid())
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if let Some(parts) = self.0.take() {
            children::kill_and_reap_detached(parts.child, parts.registered);
        }
    }
}

impl std::fmt::Debug for Spawned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spawned").field("pid", &self.pid()).finish()
    }
}

/// Starts `launch` with three pipes, in its own recorded process group (blocking: a fork or
/// `posix_spawn`).
pub fn spawn(launch: &Launch) -> io::Result<Spawned> {
    let mut cmd = launch.command();
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let (mut child, registered) = children::spawn(&mut cmd)?;
    let pid = registered.pgid();
    program::set_nice(pid, launch.nice);
    let pidfd = program::pidfd_open(pid);
    let (stdin, stdout, stderr) = (
        child.stdin.take().map(OwnedFd::from),
        child.stdout.take().map(OwnedFd::from),
        child.stderr.take().map(OwnedFd::from),
    );
    let (Some(stdin), Some(stdout), Some(stderr)) = (stdin, stdout, stderr) else {
        children::kill_and_reap_detached(child, registered);
        return Err(io::Error::other("the child's pipes are missing"));
    };
    Ok(Spawned(Some(Parts {
        child,
        registered,
        stdin,
        stdout,
        stderr,
        pidfd,
    })))
}

/// A running program as a session drives it, on a worker.
pub struct Child {
    /// `None` once reaped.
    leader: Option<(std::process::Child, Registered)>,
    pid: i32,
    /// `None` once closed (the client finished sending, or the program closed its end).
    pub stdin: Option<AsyncFd<File>>,
    /// `None` at end of stream.
    pub stdout: Option<AsyncFd<File>>,
    /// `None` at end of stream.
    pub stderr: Option<AsyncFd<File>>,
    exit: Option<AsyncFd<OwnedFd>>,
}

impl Child {
    /// Registers a spawned program's descriptors with the current reactor.
    pub fn adopt(mut spawned: Spawned) -> io::Result<Child> {
        let Parts {
            child,
            registered,
            stdin,
            stdout,
            stderr,
            pidfd,
        } = spawned
            .0
            .take()
            .ok_or_else(|| io::Error::other("adopted twice"))?;
        let pid = registered.pgid();
        // Owned by `Child` first, so an error below still kills and reaps it.
        let mut this = Child {
            leader: Some((child, registered)),
            pid,
            stdin: None,
            stdout: None,
            stderr: None,
            exit: None,
        };
        this.stdin = Some(async_pipe(stdin)?);
        this.stdout = Some(async_pipe(stdout)?);
        this.stderr = Some(async_pipe(stderr)?);
        this.exit = pidfd.map(watch).transpose()?;
        Ok(this)
    }

    /// The leader's pid (and the group's id).
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Completes once the leader has exited (it is not reaped: see [`Child::finish`]).
    pub async fn exited(&self) -> io::Result<()> {
        match &self.exit {
            Some(pidfd) => pidfd.readable().await.map(|_| ()),
            None => loop {
                if program::exited_unreaped(self.pid) {
                    return Ok(());
                }
                tokio::time::sleep(EXIT_POLL).await;
            },
        }
    }

    /// Sends `signal` to the whole group (nothing once it is reaped).
    pub fn signal(&self, signal: libc::c_int) {
        if self.leader.is_some() {
            program::signal_group(self.pid, signal);
        }
    }

    /// Kills what is left of the group and reaps the leader; returns its status. The wait for
    /// the leader is asynchronous (its pidfd, or polling), bounded by [`REAP_WAIT`]: a leader
    /// that is still there then (stuck in the kernel, state D) is handed to a reaper thread
    /// ([`children::kill_and_reap_detached`]) and the session goes on without its status.
    pub async fn finish(&mut self) -> io::Result<ExitStatus> {
        // SIGKILL while the leader is unreaped: the group id is still ours.
        self.signal(libc::SIGKILL);
        let _ = tokio::time::timeout(REAP_WAIT, self.exited()).await;
        let (child, registered) = self
            .leader
            .take()
            .ok_or_else(|| io::Error::other("already reaped"))?;
        children::kill_and_reap_detached(child, registered).ok_or_else(|| {
            io::Error::other("the program did not exit after SIGKILL: reaped in the background")
        })
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if let Some((child, registered)) = self.leader.take() {
            children::kill_and_reap_detached(child, registered);
        }
    }
}

/// A pipe end, non-blocking, watched by the reactor. (The other end, the child's, is a
/// different open file: its mode is untouched.)
fn async_pipe(fd: OwnedFd) -> io::Result<AsyncFd<File>> {
    // SAFETY: fcntl on a descriptor we own.
    unsafe {
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    watch(File::from(fd))
}

/// Registers a descriptor this value owns with the reactor.
fn watch<T: AsRawFd>(owned: T) -> io::Result<AsyncFd<T>> {
    // SAFETY: `T` (a `File` or an `OwnedFd`) owns its descriptor: it stays open, the same
    // open file, until the `AsyncFd` (which owns `T`) is dropped.
    unsafe { AsyncFd::register(owned) }.map_err(|e| e.into_parts().1)
}

/// Reads what the pipe has into the spare capacity of `buf` (waiting until it has something):
/// the count, `0` at end of stream.
pub async fn read_pipe(pipe: &AsyncFd<File>, buf: &mut Vec<u8>) -> io::Result<usize> {
    loop {
        let mut guard = pipe.readable().await?;
        let spare = buf.capacity() - buf.len();
        let start = buf.len();
        buf.resize(start + spare, 0);
        let res = guard.try_io(|f| f.get_ref().read(&mut buf[start..]));
        match res {
            Ok(Ok(n)) => {
                buf.truncate(start + n);
                return Ok(n);
            }
            Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => buf.truncate(start),
            Ok(Err(e)) => {
                buf.truncate(start);
                return Err(e);
            }
            // Not ready after all: the guard cleared the readiness; wait again.
            Err(_would_block) => buf.truncate(start),
        }
    }
}

/// Waits until the pipe is ready for a read (`writable` false) or a write (true) that does not
/// block, for a splice that moves the bytes itself. The reactor's readiness is checked against
/// the pipe (a zero-timeout poll) and cleared when stale, so a splice that found the pipe not
/// ready makes the next wait wait for the kernel.
pub async fn pipe_ready(pipe: &AsyncFd<File>, writable: bool) -> io::Result<()> {
    let interest = if writable {
        tokio::io::Interest::WRITABLE
    } else {
        tokio::io::Interest::READABLE
    };
    loop {
        let mut guard = pipe.ready(interest).await?;
        if sys::pipe_ready_now(pipe.as_raw_fd(), writable) {
            return Ok(());
        }
        guard.clear_ready();
    }
}

/// Writes some of `data` to the pipe (waiting until it has room): the count.
pub async fn write_pipe(pipe: &AsyncFd<File>, data: &[u8]) -> io::Result<usize> {
    loop {
        let mut guard = pipe.writable().await?;
        match guard.try_io(|f| f.get_ref().write(data)) {
            Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
            Ok(res) => return res,
            Err(_would_block) => {}
        }
    }
}
