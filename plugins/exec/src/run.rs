//! Running one child process to completion, off the IO path.
//!
//! [`run`] is blocking code, called on tokio's blocking pool so a worker never waits on a
//! fork, a pipe or a child. One `poll(2)` loop watches the child's stdout, stderr, a pidfd (its
//! exit) and a cancel pipe (the client vanished), so both output pipes drain concurrently (a
//! child filling stderr cannot deadlock) and every limit is enforced in one place:
//!
//! - output beyond `max_output` is read and discarded (the child is never blocked on a full
//!   pipe) and the result says it was cut;
//! - at the deadline, or on cancel, the child's whole process group gets SIGTERM, then SIGKILL
//!   after [`KILL_GRACE`];
//! - when the child exits, whatever it left running in its group is killed, and the child is
//!   always reaped: no zombies, no stragglers.

use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Time between SIGTERM and SIGKILL for a child that must stop.
pub const KILL_GRACE: Duration = Duration::from_secs(1);

/// Everything needed to start one process.
#[derive(Debug, Clone)]
pub struct Job {
    /// Absolute path of the program.
    pub program: PathBuf,
    /// Arguments after argv[0].
    pub args: Vec<String>,
    /// The complete environment (nothing is inherited).
    pub env: Vec<(String, String)>,
    /// Working directory.
    pub cwd: PathBuf,
    /// Wall-clock limit.
    pub timeout: Duration,
    /// Bytes of stdout + stderr kept.
    pub max_output: usize,
    /// Niceness of the process (0 = unchanged).
    pub nice: i32,
}

/// How the process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// Exited with this status code.
    Exited(i32),
    /// Killed by this signal (not by us).
    Signaled(i32),
    /// We killed it at its deadline.
    TimedOut,
    /// We killed it because the client went away.
    Cancelled,
}

/// What a finished job produced.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// stdout, at most `max_output` bytes.
    pub stdout: Vec<u8>,
    /// stderr, at most `max_output` minus what stdout kept.
    pub stderr: Vec<u8>,
    /// Output bytes dropped beyond `max_output`.
    pub cut: u64,
    /// How it ended.
    pub ending: Ending,
}

/// The write end of a job's cancel pipe: dropping it (or calling `cancel`) stops the job.
pub struct Canceller(Option<OwnedFd>);

impl Canceller {
    /// Asks the job to kill its child.
    pub fn cancel(&mut self) {
        self.0 = None;
    }
}

/// The read end, owned by the job.
pub struct CancelSignal(OwnedFd);

/// A connected cancel pair.
pub fn cancel_pair() -> io::Result<(Canceller, CancelSignal)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 just created both descriptors and nothing else owns them.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    Ok((Canceller(Some(write)), CancelSignal(read)))
}

/// Runs `job` to completion (blocking).
pub fn run(job: &Job, cancel: CancelSignal) -> io::Result<Outcome> {
    let mut cmd = Command::new(&job.program);
    cmd.args(&job.args)
        .env_clear()
        .envs(job.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&job.cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so a timeout kills everything it started.
        .process_group(0);
    let mut child = cmd.spawn()?;
    let pid = child.id() as libc::pid_t;
    if job.nice != 0 {
        // Lower the child's CPU priority (its own children inherit it) so a burst of commands
        // cannot starve the IO workers. Set from here rather than in a pre_exec hook, which
        // would force fork() instead of the much cheaper posix_spawn.
        // SAFETY: setpriority on our own child's pid.
        unsafe { libc::setpriority(libc::PRIO_PROCESS, pid as libc::id_t, job.nice) };
    }
    let deadline = Instant::now() + job.timeout;

    let pidfd = pidfd_open(pid);
    let mut out = Pipe::new(child.stdout.take());
    let mut err = Pipe::new(child.stderr.take());
    let mut outcome = Outcome {
        stdout: Vec::new(),
        stderr: Vec::new(),
        cut: 0,
        ending: Ending::Exited(0),
    };
    // Each pipe keeps up to `max_output`; the concatenation is cut to `max_output` at the end,
    // so stdout keeps priority whatever order the bytes arrive in.
    let (mut out_budget, mut err_budget) = (job.max_output, job.max_output);
    let mut stop: Option<Ending> = None;
    let mut exited = false;

    // Phase 1: until the child exits (or must be stopped), drain both pipes.
    while !exited && stop.is_none() {
        let now = Instant::now();
        if now >= deadline {
            stop = Some(Ending::TimedOut);
            break;
        }
        let wait_ms = (deadline - now).as_millis().clamp(1, 1000) as i32;
        let mut fds = vec![poll_in(cancel.0.as_raw_fd())];
        if let Some(fd) = &pidfd {
            fds.push(poll_in(fd.as_raw_fd()));
        }
        let out_at = out.fd().map(|fd| {
            fds.push(poll_in(fd));
            fds.len() - 1
        });
        let err_at = err.fd().map(|fd| {
            fds.push(poll_in(fd));
            fds.len() - 1
        });
        poll(&mut fds, wait_ms)?;
        if fds[0].revents != 0 {
            stop = Some(Ending::Cancelled);
            break;
        }
        if out_at.is_some_and(|i| fds[i].revents != 0) {
            out.drain(&mut outcome.stdout, &mut out_budget, &mut outcome.cut)?;
        }
        if err_at.is_some_and(|i| fds[i].revents != 0) {
            err.drain(&mut outcome.stderr, &mut err_budget, &mut outcome.cut)?;
        }
        // Without a pidfd (old kernels), exit is noticed when both pipes close or by polling.
        exited = match &pidfd {
            Some(_) if fds[1].revents == 0 => false,
            _ => child.try_wait()?.is_some() || (out.fd().is_none() && err.fd().is_none()),
        };
    }

    // Phase 2: stop the child if needed, then make sure nothing of its group survives.
    let stopped = stop.is_some();
    if let Some(reason) = stop {
        terminate_group(pid, &mut child)?;
        outcome.ending = reason;
    }
    let status = child.wait()?;
    // SAFETY: signalling our own child's process group (pgid == its pid).
    unsafe { libc::kill(-pid, libc::SIGKILL) };
    // Collect what is still buffered in the pipes (bounded: every writer is dead now).
    out.finish(&mut outcome.stdout, &mut out_budget, &mut outcome.cut)?;
    err.finish(&mut outcome.stderr, &mut err_budget, &mut outcome.cut)?;
    let stderr_room = job.max_output.saturating_sub(outcome.stdout.len());
    if outcome.stderr.len() > stderr_room {
        outcome.cut += (outcome.stderr.len() - stderr_room) as u64;
        outcome.stderr.truncate(stderr_room);
    }
    if !stopped {
        outcome.ending = match (status.code(), status.signal()) {
            (Some(code), _) => Ending::Exited(code),
            (None, Some(sig)) => Ending::Signaled(sig),
            (None, None) => Ending::Exited(-1),
        };
    }
    Ok(outcome)
}

/// SIGTERM to the group, SIGKILL after [`KILL_GRACE`] if the leader is still alive.
fn terminate_group(pid: libc::pid_t, child: &mut std::process::Child) -> io::Result<()> {
    // SAFETY: signalling our own child's process group.
    unsafe { libc::kill(-pid, libc::SIGTERM) };
    let until = Instant::now() + KILL_GRACE;
    while Instant::now() < until {
        if child.try_wait()?.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    // SAFETY: as above; harmless if the group is already gone.
    unsafe { libc::kill(-pid, libc::SIGKILL) };
    Ok(())
}

/// One output pipe: read while data flows, closed at end of stream.
struct Pipe<R> {
    reader: Option<R>,
}

impl<R: Read + AsRawFd> Pipe<R> {
    fn new(reader: Option<R>) -> Self {
        if let Some(r) = &reader {
            set_nonblocking(r.as_raw_fd());
        }
        Pipe { reader }
    }

    fn fd(&self) -> Option<RawFd> {
        self.reader.as_ref().map(AsRawFd::as_raw_fd)
    }

    /// Reads what is available now, keeping at most `budget` bytes.
    fn drain(&mut self, into: &mut Vec<u8>, budget: &mut usize, cut: &mut u64) -> io::Result<()> {
        let Some(reader) = &mut self.reader else {
            return Ok(());
        };
        let mut chunk = [0u8; 64 * 1024];
        loop {
            match reader.read(&mut chunk) {
                Ok(0) => {
                    self.reader = None;
                    return Ok(());
                }
                Ok(n) => {
                    let keep = n.min(*budget);
                    into.extend_from_slice(&chunk[..keep]);
                    *budget -= keep;
                    *cut += (n - keep) as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Drains what is left after every writer has exited.
    fn finish(&mut self, into: &mut Vec<u8>, budget: &mut usize, cut: &mut u64) -> io::Result<()> {
        self.drain(into, budget, cut)?;
        self.reader = None;
        Ok(())
    }
}

fn poll_in(fd: RawFd) -> libc::pollfd {
    libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }
}

fn poll(fds: &mut [libc::pollfd], timeout_ms: i32) -> io::Result<()> {
    // SAFETY: `fds` is a valid, exclusively borrowed array of pollfd.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    Ok(())
}

fn set_nonblocking(fd: RawFd) {
    // SAFETY: fcntl on a descriptor we own.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
    }
}

/// A pidfd for `pid` (Linux 5.3+), readable once the process exits; `None` where unsupported.
fn pidfd_open(pid: libc::pid_t) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags; it returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    // SAFETY: on success the descriptor is new and ours.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}
