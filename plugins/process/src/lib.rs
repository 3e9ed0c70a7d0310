//! The process plugin: any program as a service. Each connection runs the configured program
//! with the connection on its stdin and stdout (inetd's `nowait`), the way inetd, xinetd,
//! systemd's `Accept=yes` and djb's `tcpserver` have let operators turn a program into a
//! network service from a config line; the program learns who its client is from UCSPI
//! environment variables.
//!
//! The program never holds the socket: wharf copies between the connection and the child's
//! pipes, so everything the framework does for a connection (byte metrics, `idle_timeout`,
//! drain, TLS, PROXY protocol, admission) applies to it as to any plugin, and the program
//! needs no TLS of its own.
//!
//! What makes it safe to expose:
//!
//! - **No shell, nothing inherited**: `argv` is resolved at startup (absolute, or found on a
//!   fixed system `PATH`); the environment is cleared, then the configured `env` and the
//!   UCSPI variables are set ([`ucspi_env`]).
//! - **Bounded**: at most `max_concurrent` programs per service across workers and reloads
//!   (more connections are refused at once: outcome `busy`); each session at most `timeout`
//!   long; the program's stderr goes to wharf's log in bounded, rate-limited lines
//!   ([`stderr`]), never to the client.
//! - **Nothing left behind** ([`session`]): each program runs in its own process group; when
//!   the program exits, the client leaves, the session times out or the server stops, the
//!   whole group is killed and the leader reaped.
//! - **Not root by accident**: when wharf runs as root, programs run as `user`, by default
//!   `nobody` (supplementary groups dropped); only `user = "root"` runs them as root.

pub mod session;
pub mod stderr;

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use wharf_core::program::{self, Credentials, Launch};
use wharf_core::{Conn, Context, OptionDoc, Peer, Plugin, PluginError, Service, Spliced};

use session::Child;
use stderr::StderrLog;

/// Time between SIGTERM and SIGKILL for a program that must stop.
pub const KILL_GRACE: Duration = Duration::from_secs(1);

/// Bytes moved per read, in each direction.
const CHUNK: usize = 64 * 1024;

/// How often a session whose client finished sending checks that the client is still there.
const CLIENT_CHECK: Duration = Duration::from_millis(250);

/// The gauge of programs running, per service.
pub const RUNNING_METRIC: &str = "wharf_process_running";

/// The UCSPI variables wharf sets; `env` may not set them.
pub const UCSPI_VARIABLES: &[&str] = &[
    "PROTO",
    "TCPREMOTEIP",
    "TCPREMOTEPORT",
    "TCPLOCALIP",
    "TCPLOCALPORT",
    "UNIXREMOTEUID",
    "UNIXREMOTEGID",
    "UNIXREMOTEPID",
    "TLS_IDENTITY",
];

/// `[services.<name>.options]` of a process service.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProcessOptions {
    /// The program (absolute, or a bare name found on the system `PATH`) and its arguments.
    pub argv: Vec<String>,
    /// The program's environment besides the UCSPI variables (nothing is inherited).
    pub env: BTreeMap<String, String>,
    /// Working directory of the program.
    pub cwd: PathBuf,
    /// Programs running at once for this service, across workers; more connections are
    /// refused at once.
    pub max_concurrent: usize,
    /// Longest a session may last; then the program's group is stopped.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// CPU niceness of the program (0-19).
    pub nice: i32,
    /// The user to run the program as; when wharf runs as root, `nobody` unless set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// The group to run the program as (default: `user`'s primary group).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
}

impl Default for ProcessOptions {
    fn default() -> Self {
        ProcessOptions {
            argv: Vec::new(),
            env: [("PATH".to_string(), program::SAFE_PATH.to_string())].into(),
            cwd: PathBuf::from("/"),
            max_concurrent: 64,
            timeout: Duration::from_secs(3600),
            nice: 0,
            user: None,
            group: None,
        }
    }
}

/// A process service.
pub struct Process {
    launch: Launch,
    timeout: Duration,
    max_concurrent: usize,
    /// The program slots, shared with the generation this one replaced when a reload kept
    /// `max_concurrent` ([`Plugin::inherit`]), else made on first use.
    slots: std::sync::OnceLock<Arc<Semaphore>>,
}

/// `outcome` label values (`wharf_requests_total`, one per connection).
pub mod outcome {
    /// The program exited with status 0.
    pub const OK: &str = "ok";
    /// The program exited with another status, or was killed by a signal not sent by wharf.
    pub const NONZERO_EXIT: &str = "nonzero_exit";
    /// The session reached `timeout`.
    pub const TIMEOUT: &str = "timeout";
    /// Nothing moved either way for the service's `idle_timeout`.
    pub const IDLE: &str = "idle";
    /// The client reset the connection or stopped reading it.
    pub const CLIENT_LEFT: &str = "client_left";
    /// The server stopped (SIGTERM) during the session.
    pub const STOPPED: &str = "stopped";
    /// `max_concurrent` programs were running: refused without starting one.
    pub const BUSY: &str = "busy";
    /// The program could not be started.
    pub const FAILED: &str = "failed";
}

impl Process {
    fn slots(&self) -> &Arc<Semaphore> {
        self.slots
            .get_or_init(|| Arc::new(Semaphore::new(self.max_concurrent)))
    }
}

/// The UCSPI environment of a session (djb's `tcpserver` and `unixserver` names). For an IP
/// client (`cx.peer()`, which is the PROXY-protocol client when the service has
/// `proxy_protocol`): `PROTO=TCP`, its address, and the local address when the connection
/// knows it. For a local process on a Unix socket: `PROTO=UNIX` and its credentials,
/// `UNIXREMOTEUID`, `UNIXREMOTEGID` and `UNIXREMOTEPID` (when visible). `TLS_IDENTITY` when a
/// verified TLS client certificate named the client.
pub fn ucspi_env(
    peer: Peer,
    local: Option<SocketAddr>,
    identity: Option<&str>,
) -> Vec<(String, String)> {
    let var = |name: &str, value: String| (name.to_string(), value);
    let mut env = match peer {
        Peer::Ip(peer) => {
            let mut env = vec![
                var("PROTO", "TCP".into()),
                var("TCPREMOTEIP", peer.ip().to_canonical().to_string()),
                var("TCPREMOTEPORT", peer.port().to_string()),
            ];
            if let Some(local) = local {
                env.push(var("TCPLOCALIP", local.ip().to_canonical().to_string()));
                env.push(var("TCPLOCALPORT", local.port().to_string()));
            }
            env
        }
        Peer::Unix(credentials) => {
            let mut env = vec![
                var("PROTO", "UNIX".into()),
                var("UNIXREMOTEUID", credentials.uid.to_string()),
                var("UNIXREMOTEGID", credentials.gid.to_string()),
            ];
            if let Some(pid) = credentials.pid {
                env.push(var("UNIXREMOTEPID", pid.to_string()));
            }
            env
        }
    };
    if let Some(identity) = identity {
        env.push(var("TLS_IDENTITY", identity.to_string()));
    }
    env
}

/// How a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// The program exited by itself.
    Exited,
    TimedOut,
    Idle,
    ClientLeft,
    Stopped,
}

/// What woke the session up.
enum Event {
    Deadline,
    Idle,
    Stopping,
    KillNow,
    Exited,
    Stdout(io::Result<usize>),
    Stderr(io::Result<usize>),
    StdinWritten(io::Result<usize>),
    /// Splicing: stdout has bytes (or its end) for the client.
    StdoutReady(io::Result<()>),
    /// Splicing: stdin, full before, has room again.
    StdinRoom,
    ClientReadable(io::Result<()>),
    ClientCheck,
}

#[wharf_core::async_trait(?Send)]
impl Service for Process {
    async fn serve<C: Conn + 'static>(&self, mut conn: C, cx: &Context) -> io::Result<()> {
        let started = Instant::now();
        let (service, peer) = (cx.service(), cx.peer());
        let Ok(slot) = Arc::clone(self.slots()).try_acquire_owned() else {
            tracing::debug!(service, %peer, "process: max_concurrent programs running, refused");
            cx.record_request(outcome::BUSY, started.elapsed());
            return Ok(());
        };
        let mut launch = self.launch.clone();
        launch
            .env
            // Behind a proxy, the address the client connected to is the one its header named.
            .extend(ucspi_env(
                peer,
                cx.proxied_destination().or_else(|| conn.local_addr()),
                cx.identity(),
            ));
        let spawned = cx.blocking(&conn, move || session::spawn(&launch)).await;
        let spawned = match spawned {
            Ok(Ok(spawned)) => spawned,
            Ok(Err(e)) | Err(e) => {
                tracing::warn!(service, %peer, error = %e, "process: cannot start the program");
                cx.record_request(outcome::FAILED, started.elapsed());
                return Ok(());
            }
        };
        let mut child = match Child::adopt(spawned) {
            Ok(child) => child,
            Err(e) => {
                tracing::warn!(service, %peer, error = %e, "process: cannot watch the program");
                cx.record_request(outcome::FAILED, started.elapsed());
                return Ok(());
            }
        };
        let running = Running::enter(service);
        let pid = child.pid();
        tracing::debug!(service, %peer, pid, "process: started");
        let mut log = StderrLog::new(service, pid);
        let mut shut = false;
        let deadline = started + self.timeout;
        let ending = relay(&mut conn, cx, &mut child, &mut log, deadline, &mut shut).await;
        let status = stop(&mut conn, &mut child, &mut log, ending, shut).await;
        log.finish();
        drop(running);
        drop(slot);
        let label = match (ending, &status) {
            (Ending::Exited, Ok(status)) if status.success() => outcome::OK,
            (Ending::Exited, _) => outcome::NONZERO_EXIT,
            (Ending::TimedOut, _) => outcome::TIMEOUT,
            (Ending::Idle, _) => outcome::IDLE,
            (Ending::ClientLeft, _) => outcome::CLIENT_LEFT,
            (Ending::Stopped, _) => outcome::STOPPED,
        };
        let elapsed = started.elapsed();
        cx.record_request(label, elapsed);
        let status = status.map_or_else(|e| e.to_string(), |s| s.to_string());
        tracing::info!(
            service,
            %peer,
            pid,
            outcome = label,
            %status,
            seconds = elapsed.as_secs_f64(),
            "process: session ended"
        );
        Ok(())
    }
}

/// Copies between the client and the program until the program exits or the session must
/// end; returns why it ended. The client's bytes go to stdin (closed when the client finishes
/// sending), stdout goes to the client (whose sending side is shut down when stdout ends), and
/// stderr goes to the log.
async fn relay<C: Conn>(
    conn: &mut C,
    cx: &Context,
    child: &mut Child,
    log: &mut StderrLog,
    deadline: Instant,
    shut: &mut bool,
) -> Ending {
    // Client bytes not yet written to stdin: `to_child[written..]`.
    let mut to_child: Vec<u8> = Vec::new();
    let mut written = 0;
    let mut from_child: Vec<u8> = Vec::with_capacity(CHUNK);
    let mut err_buf: Vec<u8> = Vec::with_capacity(4096);
    let mut client_done = false;
    // Splicing: the client's bytes wait for room in stdin.
    let mut stdin_full = false;
    // After a server stop: SIGTERM sent, SIGKILL due at this instant.
    let mut kill_at: Option<Instant> = None;
    // The last time a byte moved, either way, on the connection or a pipe: the session ends
    // (outcome `idle`) `idle_timeout` after it. The connection's own idle timer only runs
    // while one of its reads or writes waits, which is not the case while client bytes wait
    // for a program that does not read them, nor after the client finished sending.
    let idle_timeout = cx.idle_timeout();
    let mut last_progress = Instant::now();
    loop {
        // Readiness waits do not count against tokio's cooperative budget: a program that
        // keeps a pipe full (say, newlines to stderr as fast as it can) would otherwise keep
        // this task running forever and stall every other connection of the worker.
        tokio::task::consume_budget().await;
        let pending = written < to_child.len();
        // Bytes move in the kernel (splice) when the connection allows it, else through
        // `to_child` and `from_child`.
        let splicing = conn.can_splice();
        // Unbiased: a program flooding stderr cannot starve its stdout, nor one side the other.
        let event = tokio::select! {
            _ = tokio::time::sleep_until(deadline) => Event::Deadline,
            _ = tokio::time::sleep_until(last_progress + idle_timeout.unwrap_or_default()),
                if idle_timeout.is_some() => Event::Idle,
            _ = cx.stopping(), if kill_at.is_none() => Event::Stopping,
            _ = tokio::time::sleep_until(kill_at.unwrap_or(deadline)), if kill_at.is_some() => {
                Event::KillNow
            }
            _ = child.exited() => Event::Exited,
            read = read_opt(child.stderr.as_ref(), &mut err_buf) => Event::Stderr(read),
            read = read_opt(child.stdout.as_ref(), &mut from_child), if !splicing => {
                Event::Stdout(read)
            }
            ready = ready_opt(child.stdout.as_ref(), false), if splicing => {
                Event::StdoutReady(ready)
            }
            _ = ready_opt(child.stdin.as_ref(), true), if stdin_full => Event::StdinRoom,
            wrote = write_opt(child.stdin.as_ref(), &to_child[written..]), if pending => {
                Event::StdinWritten(wrote)
            }
            ready = conn.readable(), if !client_done && !pending && !stdin_full => {
                Event::ClientReadable(ready)
            }
            _ = tokio::time::sleep(CLIENT_CHECK), if client_done => Event::ClientCheck,
        };
        if matches!(
            event,
            Event::Stdout(Ok(1..)) | Event::Stderr(Ok(1..)) | Event::StdinWritten(Ok(1..))
        ) {
            last_progress = Instant::now();
        }
        match event {
            Event::Deadline => return Ending::TimedOut,
            Event::Idle => return Ending::Idle,
            Event::Stopping => {
                // Ask the program to finish; what it still writes reaches the client.
                child.signal(libc::SIGTERM);
                kill_at = Some(Instant::now() + KILL_GRACE);
            }
            Event::KillNow => return Ending::Stopped,
            Event::Exited => {
                return match kill_at {
                    Some(_) => Ending::Stopped,
                    None => Ending::Exited,
                };
            }
            Event::Stderr(Ok(0)) | Event::Stderr(Err(_)) => child.stderr = None,
            Event::Stderr(Ok(_)) => {
                log.feed(&err_buf);
                err_buf.clear();
            }
            Event::Stdout(Ok(0)) | Event::Stdout(Err(_)) | Event::StdoutReady(Err(_)) => {
                // The program is done writing: the client sees end of stream.
                child.stdout = None;
                *shut = true;
                if conn.shutdown().await.is_err() {
                    return Ending::ClientLeft;
                }
            }
            Event::Stdout(Ok(_)) => {
                let send = conn.write_all(std::mem::take(&mut from_child));
                let (res, mut buf) = match tokio::time::timeout_at(deadline, send).await {
                    Ok(done) => done,
                    Err(_) => return Ending::TimedOut,
                };
                if let Err(e) = res {
                    return client_error(&e);
                }
                buf.clear();
                if buf.capacity() < CHUNK {
                    buf.reserve_exact(CHUNK);
                }
                from_child = buf;
            }
            Event::StdoutReady(Ok(())) => {
                let Some(stdout) = child.stdout.as_ref() else {
                    continue;
                };
                match splice_stdout(conn, stdout.get_ref().as_fd(), deadline).await {
                    Ok(StdoutSplice::Moved) => last_progress = Instant::now(),
                    Ok(StdoutSplice::NotReady) => {}
                    Ok(StdoutSplice::Ended) => {
                        child.stdout = None;
                        *shut = true;
                        if conn.shutdown().await.is_err() {
                            return Ending::ClientLeft;
                        }
                    }
                    Err(ending) => return ending,
                }
            }
            Event::StdinRoom => stdin_full = false,
            Event::StdinWritten(Ok(n)) => {
                written += n;
                if written == to_child.len() {
                    to_child.clear();
                    written = 0;
                }
            }
            Event::StdinWritten(Err(_)) => {
                // The program closed its stdin (EPIPE): what the client sends is dropped.
                child.stdin = None;
                to_child.clear();
                written = 0;
            }
            Event::ClientReadable(Err(e)) => return client_error(&e),
            Event::ClientReadable(Ok(())) if splicing && child.stdin.is_some() => {
                let res = match child.stdin.as_ref() {
                    Some(stdin) => conn.try_splice_to_pipe(stdin.get_ref().as_fd(), CHUNK),
                    None => continue,
                };
                match res {
                    Ok(Spliced::Moved(_)) => last_progress = Instant::now(),
                    Ok(Spliced::ConnNotReady) => {}
                    Ok(Spliced::PipeNotReady) => stdin_full = true,
                    Ok(Spliced::Ended) => {
                        client_done = true;
                        child.stdin = None;
                    }
                    // The program closed its stdin: what the client sends from now on is
                    // read and dropped (the copying path).
                    Err(e) if e.raw_os_error() == Some(libc::EPIPE) => child.stdin = None,
                    Err(e) => return client_error(&e),
                }
            }
            Event::ClientReadable(Ok(())) => {
                to_child.reserve_exact(CHUNK);
                match conn.try_read(&mut to_child) {
                    Ok(None) => {}
                    Ok(Some(0)) => {
                        // The client finished sending: the program sees end of input.
                        client_done = true;
                        child.stdin = None;
                    }
                    Ok(Some(_)) if child.stdin.is_none() => {
                        last_progress = Instant::now();
                        to_child.clear();
                    }
                    Ok(Some(_)) => last_progress = Instant::now(),
                    Err(e) => return client_error(&e),
                }
            }
            Event::ClientCheck => {
                if conn.peer_closed() {
                    return Ending::ClientLeft;
                }
            }
        }
    }
}

/// What one splice of stdout to the client did.
enum StdoutSplice {
    Moved,
    /// The pipe was empty after all.
    NotReady,
    /// The program closed its stdout.
    Ended,
}

/// Moves what the program wrote to the client in the kernel, waiting (until `deadline`, and
/// within the connection's idle timeout) while the client's socket has no room.
async fn splice_stdout<C: Conn>(
    conn: &mut C,
    stdout: BorrowedFd<'_>,
    deadline: Instant,
) -> Result<StdoutSplice, Ending> {
    loop {
        match conn.try_splice_from_pipe(stdout, CHUNK) {
            Ok(Spliced::Moved(_)) => return Ok(StdoutSplice::Moved),
            Ok(Spliced::PipeNotReady) => return Ok(StdoutSplice::NotReady),
            Ok(Spliced::Ended) => return Ok(StdoutSplice::Ended),
            Ok(Spliced::ConnNotReady) => {
                match tokio::time::timeout_at(deadline, conn.writable()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return Err(client_error(&e)),
                    Err(_) => return Err(Ending::TimedOut),
                }
            }
            Err(e) => return Err(client_error(&e)),
        }
    }
}

/// Why a client-side error ended the session.
fn client_error(e: &io::Error) -> Ending {
    match e.kind() {
        io::ErrorKind::TimedOut => Ending::Idle,
        _ => Ending::ClientLeft,
    }
}

/// Ends the program after `ending` and reaps it; sends the client what the program wrote
/// before it exited. Returns the leader's exit status.
async fn stop<C: Conn>(
    conn: &mut C,
    child: &mut Child,
    log: &mut StderrLog,
    ending: Ending,
    shut: bool,
) -> io::Result<std::process::ExitStatus> {
    if ending != Ending::Exited {
        // SIGTERM to the group, SIGKILL after the grace if the leader is still there.
        child.signal(libc::SIGTERM);
        let _ = tokio::time::timeout(KILL_GRACE, child.exited()).await;
    }
    // The rest of the group is killed now, whatever it is doing, and the leader reaped
    // (waited for through its pidfd, never by blocking the worker).
    let status = child.finish().await;
    // Every writer of the group is dead: what is left in the pipes is all there is.
    if let Some(err) = child.stderr.take() {
        let mut buf = Vec::with_capacity(4096);
        while let Ok(Some(n)) = read_now(&err, &mut buf) {
            if n == 0 {
                break;
            }
            log.feed(&buf);
            buf.clear();
        }
    }
    if let Some(out) = child.stdout.take() {
        if matches!(ending, Ending::Exited | Ending::Stopped) {
            let mut buf = Vec::with_capacity(CHUNK);
            while let Ok(Some(n)) = read_now(&out, &mut buf) {
                if n == 0 {
                    break;
                }
                let (res, returned) = conn.write_all(buf).await;
                if res.is_err() {
                    break;
                }
                buf = returned;
                buf.clear();
            }
        }
    }
    if !shut && matches!(ending, Ending::Exited | Ending::Stopped) {
        let _ = conn.shutdown().await;
    }
    status
}

/// A read of a pipe that may be closed already (then it never completes).
async fn read_opt(
    pipe: Option<&tokio::io::unix::AsyncFd<std::fs::File>>,
    buf: &mut Vec<u8>,
) -> io::Result<usize> {
    match pipe {
        Some(pipe) => session::read_pipe(pipe, buf).await,
        None => std::future::pending().await,
    }
}

/// Readiness of a pipe that may be closed already (then it never completes).
async fn ready_opt(
    pipe: Option<&tokio::io::unix::AsyncFd<std::fs::File>>,
    writable: bool,
) -> io::Result<()> {
    match pipe {
        Some(pipe) => session::pipe_ready(pipe, writable).await,
        None => std::future::pending().await,
    }
}

/// A write to a pipe that may be closed already (then it fails like a closed pipe).
async fn write_opt(
    pipe: Option<&tokio::io::unix::AsyncFd<std::fs::File>>,
    data: &[u8],
) -> io::Result<usize> {
    match pipe {
        Some(pipe) => session::write_pipe(pipe, data).await,
        None => Err(io::ErrorKind::BrokenPipe.into()),
    }
}

/// What a pipe has now, without waiting: `None` if nothing (or the pipe is not readable).
fn read_now(
    pipe: &tokio::io::unix::AsyncFd<std::fs::File>,
    buf: &mut Vec<u8>,
) -> io::Result<Option<usize>> {
    use std::io::Read;
    let start = buf.len();
    buf.resize(buf.capacity().max(start + 1), 0);
    let res = pipe.get_ref().read(&mut buf[start..]);
    match res {
        Ok(n) => {
            buf.truncate(start + n);
            Ok(Some(n))
        }
        Err(e) => {
            buf.truncate(start);
            match e.kind() {
                io::ErrorKind::WouldBlock => Ok(None),
                _ => Err(e),
            }
        }
    }
}

/// One running program in [`RUNNING_METRIC`], until dropped.
struct Running(metrics::Gauge);

impl Running {
    fn enter(service: &str) -> Running {
        static DESCRIBED: std::sync::Once = std::sync::Once::new();
        DESCRIBED.call_once(|| {
            metrics::describe_gauge!(
                RUNNING_METRIC,
                "Programs running for process services (at most max_concurrent each)."
            );
        });
        let gauge = metrics::gauge!(RUNNING_METRIC, "service" => service.to_owned());
        gauge.increment(1.0);
        Running(gauge)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

impl Plugin for Process {
    const NAME: &'static str = "process";
    const DESCRIPTION: &'static str =
        "runs a program per connection, the connection on its stdin and stdout (inetd-style, \
         UCSPI variables, never through a shell)";
    const OPTIONS: &'static [OptionDoc] = &[
        OptionDoc {
            name: "argv",
            kind: "array of strings",
            help: "the program (absolute, or a bare name found in /usr/local/bin:/usr/bin:/bin \
                   at startup) and its arguments; no shell",
        },
        OptionDoc {
            name: "env",
            kind: "table of strings",
            help: "the program's environment besides the UCSPI variables (PROTO, TCPREMOTEIP, \
                   TCPREMOTEPORT, TCPLOCALIP, TCPLOCALPORT, UNIXREMOTEUID, UNIXREMOTEGID, \
                   UNIXREMOTEPID, TLS_IDENTITY); nothing is inherited",
        },
        OptionDoc {
            name: "cwd",
            kind: "path",
            help: "working directory of the program",
        },
        OptionDoc {
            name: "max_concurrent",
            kind: "integer",
            help: "programs running at once for the service, across workers; more connections \
                   are closed at once (outcome `busy`)",
        },
        OptionDoc {
            name: "timeout",
            kind: "duration",
            help: "longest session; then the program's process group gets SIGTERM, SIGKILL 1s \
                   later",
        },
        OptionDoc {
            name: "nice",
            kind: "integer 0-19",
            help: "CPU niceness of the program",
        },
        OptionDoc {
            name: "user",
            kind: "user name or id (optional)",
            help: "run the program as this user (only root can switch); when wharf runs as \
                   root the default is `nobody`, and `root` must be named to run as root",
        },
        OptionDoc {
            name: "group",
            kind: "group name or id (optional)",
            help: "run the program with this group (default: the user's primary group); needs \
                   `user`",
        },
    ];
    const OUTCOMES: &'static [&'static str] = &[
        outcome::OK,
        outcome::NONZERO_EXIT,
        outcome::TIMEOUT,
        outcome::IDLE,
        outcome::CLIENT_LEFT,
        outcome::STOPPED,
        outcome::BUSY,
        outcome::FAILED,
    ];
    type Options = ProcessOptions;

    fn build(o: ProcessOptions) -> Result<Self, PluginError> {
        let Some((name, args)) = o.argv.split_first() else {
            return Err(PluginError::option("argv", "must name a program"));
        };
        let program_path = program::resolve(name, Some(program::SAFE_PATH))
            .map_err(|e| PluginError::option("argv", e))?;
        if o.max_concurrent == 0 {
            return Err(PluginError::option("max_concurrent", "must be at least 1"));
        }
        if o.timeout.is_zero() {
            return Err(PluginError::option("timeout", "must be more than 0s"));
        }
        if !(0..=19).contains(&o.nice) {
            return Err(PluginError::option("nice", "must be between 0 and 19"));
        }
        if !o.cwd.is_dir() {
            return Err(PluginError::option(
                "cwd",
                format!("`{}` is not an existing directory", o.cwd.display()),
            ));
        }
        for key in o.env.keys() {
            if UCSPI_VARIABLES.contains(&key.as_str()) {
                return Err(PluginError::option(
                    format!("env.{key}"),
                    "is set by wharf for each connection (UCSPI)",
                ));
            }
            if key.is_empty() || key.contains('=') || key.contains('\0') {
                return Err(PluginError::option(
                    format!("env.{key}"),
                    "is not a valid variable name",
                ));
            }
        }
        let credentials = credentials(o.user.as_deref(), o.group.as_deref())?;
        Ok(Process {
            launch: Launch {
                program: program_path,
                args: args.to_vec(),
                env: o.env.into_iter().collect(),
                cwd: o.cwd,
                nice: o.nice,
                credentials,
            },
            timeout: o.timeout,
            max_concurrent: o.max_concurrent,
            slots: std::sync::OnceLock::new(),
        })
    }

    fn inherit(&self, previous: &Self) {
        if previous.max_concurrent == self.max_concurrent {
            // Set before this generation serves anything, so nothing made its own yet.
            let _ = self.slots.set(Arc::clone(previous.slots()));
        }
    }
}

/// The account programs run as when wharf runs as root and `user` names none.
pub const DEFAULT_USER_AS_ROOT: &str = "nobody";

/// The credentials to switch to: the root rule (see the module docs).
fn credentials(
    user: Option<&str>,
    group: Option<&str>,
) -> Result<Option<Credentials>, PluginError> {
    let root = program::running_as_root();
    if user.is_none() && group.is_some() {
        return Err(PluginError::option("group", "needs `user`"));
    }
    let user = match (user, root) {
        (Some(user), _) => user,
        // Never root by default: root only when `user = "root"` says so.
        (None, true) => DEFAULT_USER_AS_ROOT,
        (None, false) => return Ok(None),
    };
    let resolved = program::credentials(user, group).map_err(|e| {
        let key = if e.contains("group") { "group" } else { "user" };
        let hint = if root && group.is_none() && user == DEFAULT_USER_AS_ROOT {
            " (wharf runs as root, and programs run as `nobody` unless `user` names another \
             account)"
        } else {
            ""
        };
        PluginError::option(key, format!("{e}{hint}"))
    })?;
    if !root {
        // SAFETY: geteuid/getegid have no preconditions and cannot fail.
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        if resolved.uid != uid || (group.is_some() && resolved.gid != gid) {
            return Err(PluginError::option(
                "user",
                "wharf is not running as root: it cannot start programs as another user or group",
            ));
        }
        // Already who it should be: nothing to switch.
        return Ok(None);
    }
    Ok(Some(resolved))
}

#[cfg(test)]
mod tests;
