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
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use wharf_core::program::{self, exited_unreaped, pidfd_open};

/// Time between SIGTERM and SIGKILL for a child that must stop.
pub const KILL_GRACE: Duration = Duration::from_secs(1);

/// Everything needed to start one process.
#[derive(Debug, Clone)]
pub struct Job {
    /// Absolute path of the program.
    pub program: PathBuf,
    /// Arguments after `argv[0]`.
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
    let launch = program::Launch {
        program: job.program.clone(),
        args: job.args.clone(),
        env: job.env.clone(),
        cwd: job.cwd.clone(),
        nice: job.nice,
        credentials: None,
    };
    let mut cmd = launch.command();
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // Its own process group (so a timeout kills everything it started), recorded process-wide
    // so that nothing of it outlives wharf.
    let (mut child, registered) = wharf_core::children::spawn(&mut cmd)?;
    let pid = registered.pgid();
    program::set_nice(pid, job.nice);
    let mut out = Pipe::new(child.stdout.take());
    let mut err = Pipe::new(child.stderr.take());
    let supervised = supervise(job, pid, &cancel, &mut out, &mut err);

    // Whatever happened (even an error above), nothing of the group survives and the leader
    // is reaped, in that order (see `kill_and_reap`).
    let status = wharf_core::children::kill_and_reap(&mut child, registered)?;
    let mut outcome = supervised?;
    // Collect what is still buffered in the pipes (every writer in the group is dead now).
    out.finish(&mut outcome.stdout, &mut outcome.cut)?;
    err.finish(&mut outcome.stderr, &mut outcome.cut)?;
    let stderr_room = job.max_output.saturating_sub(outcome.stdout.len());
    if outcome.stderr.len() > stderr_room {
        outcome.cut += (outcome.stderr.len() - stderr_room) as u64;
        outcome.stderr.truncate(stderr_room);
    }
    if outcome.ending == Ending::Exited(0) {
        outcome.ending = match (status.code(), status.signal()) {
            (Some(code), _) => Ending::Exited(code),
            (None, Some(sig)) => Ending::Signaled(sig),
            (None, None) => Ending::Exited(-1),
        };
    }
    Ok(outcome)
}

/// Drains output until the leader exits, the deadline passes or the job is cancelled; stops
/// the group in the last two cases. Never reaps the leader (see [`run`]).
fn supervise(
    job: &Job,
    pid: libc::pid_t,
    cancel: &CancelSignal,
    out: &mut Pipe<std::process::ChildStdout>,
    err: &mut Pipe<std::process::ChildStderr>,
) -> io::Result<Outcome> {
    let deadline = Instant::now() + job.timeout;
    let pidfd = pidfd_open(pid);
    // Each pipe keeps up to `max_output`; the concatenation is cut to `max_output` at the end,
    // so stdout keeps priority whatever order the bytes arrive in.
    out.budget = job.max_output;
    err.budget = job.max_output;
    let mut outcome = Outcome {
        stdout: Vec::new(),
        stderr: Vec::new(),
        cut: 0,
        ending: Ending::Exited(0),
    };
    loop {
        let now = Instant::now();
        if now >= deadline {
            outcome.ending = Ending::TimedOut;
            break;
        }
        // Without a pidfd (old kernels, fd exhaustion) exit is polled every 10 ms.
        let cap = if pidfd.is_some() { 1000 } else { 10 };
        let wait_ms = (deadline - now).as_millis().clamp(1, cap) as i32;
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
            outcome.ending = Ending::Cancelled;
            break;
        }
        if out_at.is_some_and(|i| fds[i].revents != 0) {
            out.drain(&mut outcome.stdout, &mut outcome.cut)?;
        }
        if err_at.is_some_and(|i| fds[i].revents != 0) {
            err.drain(&mut outcome.stderr, &mut outcome.cut)?;
        }
        let exited = match &pidfd {
            Some(_) => fds[1].revents != 0,
            None => exited_unreaped(pid),
        };
        if exited {
            return Ok(outcome);
        }
    }
    terminate_group(pid);
    Ok(outcome)
}

/// SIGTERM to the group, SIGKILL after [`KILL_GRACE`] if the leader is still running.
fn terminate_group(pid: libc::pid_t) {
    // SAFETY: signalling our own child's process group.
    unsafe { libc::kill(-pid, libc::SIGTERM) };
    let until = Instant::now() + KILL_GRACE;
    while Instant::now() < until && !exited_unreaped(pid) {
        std::thread::sleep(Duration::from_millis(5));
    }
    // SAFETY: as above; the leader is not reaped yet, so the group id is still ours.
    unsafe { libc::kill(-pid, libc::SIGKILL) };
}

/// One output pipe: read while data flows, closed at end of stream.
struct Pipe<R> {
    reader: Option<R>,
    /// Bytes this pipe may still keep.
    budget: usize,
}

impl<R: Read + AsRawFd> Pipe<R> {
    fn new(reader: Option<R>) -> Self {
        if let Some(r) = &reader {
            set_nonblocking(r.as_raw_fd());
        }
        Pipe { reader, budget: 0 }
    }

    fn fd(&self) -> Option<RawFd> {
        self.reader.as_ref().map(AsRawFd::as_raw_fd)
    }

    /// Reads what is available now (at most 64 reads, so a writer that keeps refilling the
    /// pipe cannot hold the loop past its deadline), keeping at most `budget` bytes.
    fn drain(&mut self, into: &mut Vec<u8>, cut: &mut u64) -> io::Result<()> {
        let Some(reader) = &mut self.reader else {
            return Ok(());
        };
        let budget = &mut self.budget;
        let mut chunk = [0u8; 64 * 1024];
        for _ in 0..64 {
            match reader.read(&mut chunk) {
                Ok(0) => {
                    self.reader = None;
                    return Ok(());
                }
                Ok(n) => {
                    let keep = n.min(*budget);
                    // Grow by doubling, but never past what this pipe may keep: the memory a
                    // running command holds is bounded by its `max_output`, not twice that.
                    if into.capacity() - into.len() < keep {
                        let limit = into.len() + *budget;
                        let want = (into.capacity() * 2).max(into.len() + keep).min(limit);
                        into.reserve_exact(want - into.len());
                    }
                    into.extend_from_slice(&chunk[..keep]);
                    *budget -= keep;
                    *cut += (n - keep) as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Drains what is left after the group was killed, then closes the pipe.
    fn finish(&mut self, into: &mut Vec<u8>, cut: &mut u64) -> io::Result<()> {
        self.drain(into, cut)?;
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
