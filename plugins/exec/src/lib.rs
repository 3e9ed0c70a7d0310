//! The exec plugin: runs allowlisted commands for remote clients. Security-critical.
//!
//! Wire contract (docs/protocols.md, exec): the client sends a command line (terminated or not, see
//! `wharf_core::command`), the server answers with the result's length in decimal, waits for an
//! acknowledgement, then sends the result: stdout, then stderr, then a last line such as
//! `[exit status 2]` when the command did not succeed.
//!
//! What makes it safe to expose:
//!
//! - **Nothing runs unless allowlisted**, and never through a shell ([`policy`]).
//! - **Every process is bounded** ([`run`]): timeout with the whole process group killed,
//!   capped output, cleared environment plus configured `env`, configured `cwd`, and at most
//!   `max_concurrent` processes per service; none outlives wharf (`wharf_core::children`).
//! - **Results are bounded together** ([`budget`]): the output held by running commands and by
//!   results waiting for their client's ack never exceeds `max_pending_output` per service.
//! - **Clients are accountable**: optional `token` auth with failures logged and limited per
//!   source ([`throttle`]); commands an entry's `identities` reserve for some clients (names
//!   from verified TLS client certificates, [`policy`]); every command that runs logged with
//!   the client's address and identity; and a client that resets its connection has its
//!   command killed (a half-closed one is still reading: it gets its result).
//! - **The access log never holds arguments**: a request's line carries the command word
//!   (the first word of the line, `auth` for a login) and how the process ended (`exit` or
//!   `signal`), never the arguments or the token (`log_fields`).
//! - **Workers never block**: spawning, reading output and waiting run on the blocking pool;
//!   the connection task only watches the client and waits for the result.

pub mod budget;
pub mod policy;
pub mod run;
pub mod throttle;

use std::collections::BTreeMap;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use wharf_core::command::{send_framed, CommandReader, Frame};
use wharf_core::{Conn, Context, OptionDoc, Plugin, PluginError, Service};

use policy::{Entry, Refusal};
use run::{Ending, Job, Outcome};

/// Result texts that mean "refused", shared with `wharf client exec` so it can set its exit
/// status from them.
pub mod refusals {
    /// A word that is not in the allowlist.
    pub const NOT_ALLOWED: &str = "command not allowed: ";
    /// Arguments to an entry without `allow_args`.
    pub const NO_ARGS: &str = "command does not take arguments: ";
    /// An empty line.
    pub const EMPTY: &str = "empty command";
    /// NUL or other control bytes.
    pub const CONTROL: &str = "command contains control characters";
    /// Over 4096 bytes.
    pub const TOO_LONG: &str = "command too long (max 4096 bytes)";
    /// Not UTF-8.
    pub const NOT_UTF8: &str = "command is not valid UTF-8";
    /// Every process slot stayed busy for the command's whole timeout.
    pub const BUSY: &str = "server busy: too many commands running";
    /// The service's `max_pending_output` stayed spent for the command's whole timeout.
    pub const BUSY_OUTPUT: &str = "server busy: too much output waiting for clients";
    /// The program could not be started.
    pub const CANNOT_RUN: &str = "cannot run ";
    /// No `auth <token>` first.
    pub const AUTH_REQUIRED: &str = "auth required";
    /// A wrong token.
    pub const AUTH_FAILED: &str = "auth failed";
    /// Too many failures from the client's address: its token was not even checked.
    pub const AUTH_THROTTLED: &str =
        "auth failed: too many failures from this address, retry later";

    /// Every refusal prefix.
    pub const ALL: &[&str] = &[
        NOT_ALLOWED,
        NO_ARGS,
        EMPTY,
        CONTROL,
        TOO_LONG,
        NOT_UTF8,
        BUSY,
        BUSY_OUTPUT,
        CANNOT_RUN,
        AUTH_REQUIRED,
        AUTH_FAILED,
        AUTH_THROTTLED,
    ];
}

/// The result when a command printed nothing and succeeded (the tutorial's wording).
pub const NO_OUTPUT: &str = "cmd has no output...";

/// Default `max_pending_output`: 64 MiB per service.
pub const DEFAULT_MAX_PENDING_OUTPUT: u64 = 64 * 1024 * 1024;

/// Room for the notes a result may get beyond its output (`[exit status N]`...).
const NOTE_ROOM: u64 = 256;

/// What a command reserves from the budget while it runs: each output pipe may fill up to
/// `max_output` before the concatenation is cut, plus the notes.
fn running_reservation(max_output: usize) -> u64 {
    (max_output as u64)
        .saturating_mul(2)
        .saturating_add(NOTE_ROOM)
}

/// How often a running command checks that its client is still there.
const CLIENT_CHECK: Duration = Duration::from_millis(100);

/// `[services.<name>.options]` of an exec service.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExecOptions {
    /// The allowlist: `[services.<name>.options.commands.<word>]`.
    pub commands: BTreeMap<String, CommandOptions>,
    /// Default wall-clock limit per command.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Default bytes of output kept per command.
    pub max_output: u64,
    /// The whole environment of a command (nothing is inherited).
    pub env: BTreeMap<String, String>,
    /// Working directory of commands.
    pub cwd: PathBuf,
    /// Processes running at once for this service; more wait, up to their timeout.
    pub max_concurrent: usize,
    /// When set, a connection's first command must be `auth <token>`.
    pub token: Option<String>,
    /// CPU niceness of commands (0-19): higher yields more readily to the IO workers.
    pub nice: i32,
    /// Bytes all of the service's running commands and unacknowledged results may hold.
    pub max_pending_output: u64,
    /// Failed `auth` attempts allowed per source address (IPv6: /64) and minute, after a
    /// burst of 5; more are refused without checking the token.
    pub auth_failures_per_minute: u32,
}

impl Default for ExecOptions {
    fn default() -> Self {
        ExecOptions {
            commands: BTreeMap::new(),
            timeout: Duration::from_secs(10),
            max_output: 1024 * 1024,
            env: [(
                "PATH".to_string(),
                "/usr/local/bin:/usr/bin:/bin".to_string(),
            )]
            .into(),
            cwd: PathBuf::from("/"),
            max_concurrent: 16,
            token: None,
            nice: 10,
            max_pending_output: DEFAULT_MAX_PENDING_OUTPUT,
            auth_failures_per_minute: 60,
        }
    }
}

/// One allowlist entry as configured.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CommandOptions {
    /// Program (absolute, or found in `env.PATH` at startup) and fixed arguments.
    pub argv: Vec<String>,
    /// Whether clients may append arguments.
    #[serde(default)]
    pub allow_args: bool,
    /// Overrides the service's `timeout`.
    #[serde(
        default,
        with = "humantime_serde::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub timeout: Option<Duration>,
    /// Overrides the service's `max_output`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_output: Option<u64>,
    /// Only clients with one of these identities (from verified TLS client certificates) may
    /// run it; absent: any client of the service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identities: Option<Vec<String>>,
}

/// An exec service.
pub struct Exec {
    allowlist: BTreeMap<String, Entry>,
    env: Vec<(String, String)>,
    cwd: PathBuf,
    token: Option<String>,
    nice: i32,
    /// The sizes of this generation's bounds.
    sizes: LimitSizes,
    /// The bounds, shared with the generation this one replaced when a reload kept their
    /// sizes ([`Plugin::inherit`]), else made on first use.
    limits: std::sync::OnceLock<Arc<Limits>>,
}

/// `max_concurrent`, `max_pending_output`, `auth_failures_per_minute`.
type LimitSizes = (usize, u64, u32);

/// What bounds a service as a whole, across its workers and reload generations: old sessions
/// and new ones draw from the same process slots, output budget and failure buckets, so a
/// reload (every few seconds under `--watch-config`) cannot multiply them.
struct Limits {
    sizes: LimitSizes,
    slots: Arc<Semaphore>,
    output: Arc<budget::Budget>,
    throttle: throttle::AuthThrottle,
}

impl Exec {
    fn limits(&self) -> &Arc<Limits> {
        self.limits.get_or_init(|| {
            let (concurrent, pending, auth) = self.sizes;
            Arc::new(Limits {
                sizes: self.sizes,
                slots: Arc::new(Semaphore::new(concurrent)),
                output: budget::Budget::new(pending),
                throttle: throttle::AuthThrottle::new(auth),
            })
        })
    }
}

/// `outcome` label values.
mod outcome {
    pub const OK: &str = "ok";
    pub const NONZERO_EXIT: &str = "nonzero_exit";
    pub const TIMEOUT: &str = "timeout";
    pub const REFUSED: &str = "refused";
    pub const BUSY: &str = "busy";
    pub const AUTH_FAILED: &str = "auth_failed";
}

#[wharf_core::async_trait(?Send)]
impl Service for Exec {
    async fn serve<C: Conn + 'static>(&self, mut conn: C, cx: &Context) -> io::Result<()> {
        let mut reader = CommandReader::default();
        let mut authenticated = self.token.is_none();
        loop {
            let line = match reader.next(&mut conn, cx).await? {
                Frame::Closed => return Ok(()),
                Frame::Command(line) => line,
                Frame::TooLong => {
                    reader.discard_buffered();
                    let text = refusals::TOO_LONG.as_bytes().to_vec();
                    send_framed(&mut conn, &mut reader, text).await?;
                    cx.record_request(outcome::REFUSED, Duration::ZERO);
                    return conn.shutdown().await;
                }
                Frame::NotUtf8 if !authenticated => {
                    // Not an `auth` line either: same answer as any other first command.
                    let text = refusals::AUTH_REQUIRED.as_bytes().to_vec();
                    send_framed(&mut conn, &mut reader, text).await?;
                    cx.record_request(outcome::AUTH_FAILED, Duration::ZERO);
                    return conn.shutdown().await;
                }
                Frame::NotUtf8 => {
                    let text = refusals::NOT_UTF8.as_bytes().to_vec();
                    let more = send_framed(&mut conn, &mut reader, text).await?;
                    cx.record_request(outcome::REFUSED, Duration::ZERO);
                    if !more {
                        return conn.shutdown().await;
                    }
                    continue;
                }
            };
            let started = Instant::now();
            if !authenticated {
                let (text, accepted) = self.authenticate(&line, &cx.peer());
                let more = send_framed(&mut conn, &mut reader, text.as_bytes().to_vec()).await?;
                if !accepted {
                    // `auth` only: never the token, nor a first line that was not a login.
                    cx.record_request_with(outcome::AUTH_FAILED, started.elapsed(), |f| {
                        if line.starts_with("auth ") {
                            f.str("command", "auth");
                        }
                    });
                    return conn.shutdown().await;
                }
                if !more {
                    return conn.shutdown().await;
                }
                authenticated = true;
                continue;
            }
            let Some(executed) = self.execute(&line, &conn, cx).await? else {
                // The client reset the connection while its command ran; it was killed.
                return Ok(());
            };
            log_command(cx, &line, &executed);
            let Executed {
                result,
                outcome: label,
                reservation,
                ended,
                ..
            } = executed;
            let sent = send_framed(&mut conn, &mut reader, result).await;
            // The result is sent (or cannot be): its memory goes back to the service's budget.
            drop(reservation);
            cx.record_request_with(label, started.elapsed(), |f| log_fields(f, &line, ended));
            if !sent? {
                // Half-closed: it got its result and can send no further command.
                return conn.shutdown().await;
            }
        }
    }
}

impl Exec {
    /// Checks an `auth <token>` line in constant time, unless `peer`'s source has used up its
    /// failures; counts and logs (rate-limited, never the token) every failure.
    fn authenticate(&self, line: &str, peer: &wharf_core::Peer) -> (&'static str, bool) {
        let Some(expected) = &self.token else {
            return ("ok", true);
        };
        let Some(given) = line.strip_prefix("auth ") else {
            return (refusals::AUTH_REQUIRED, false);
        };
        let throttle = &self.limits().throttle;
        if !throttle.allowed(peer) {
            throttle.failed(peer, true);
            return (refusals::AUTH_THROTTLED, false);
        }
        if constant_time_eq(given.trim().as_bytes(), expected.as_bytes()) {
            return ("ok", true);
        }
        throttle.failed(peer, false);
        (refusals::AUTH_FAILED, false)
    }

    /// Runs one command line for the client of `cx`; `None` if the client reset the
    /// connection meanwhile.
    async fn execute<C: Conn>(
        &self,
        line: &str,
        conn: &C,
        cx: &Context,
    ) -> io::Result<Option<Executed>> {
        let approved = match policy::check(&self.allowlist, line, cx.identity()) {
            Ok(approved) => approved,
            Err(Refusal { text, by_identity }) => {
                let mut refused = Executed::answer(text.into_bytes(), outcome::REFUSED);
                if by_identity {
                    refused.audit = Audit::IdentityRefused;
                }
                return Ok(Some(refused));
            }
        };
        let entry = &self.allowlist[approved.name];
        // Memory for its output, then a process slot, both within the command's timeout.
        let waiting_until = Instant::now() + entry.timeout;
        let reserve = running_reservation(entry.max_output);
        let Some(mut reservation) = self.limits().output.reserve(reserve, entry.timeout).await
        else {
            let text = refusals::BUSY_OUTPUT.as_bytes().to_vec();
            return Ok(Some(Executed::answer(text, outcome::BUSY)));
        };
        let Ok(Ok(slot)) = tokio::time::timeout_at(
            waiting_until,
            Arc::clone(&self.limits().slots).acquire_owned(),
        )
        .await
        else {
            let text = refusals::BUSY.as_bytes().to_vec();
            return Ok(Some(Executed::answer(text, outcome::BUSY)));
        };
        let mut args = entry.fixed_args.clone();
        args.extend(approved.extra_args.iter().map(|a| a.to_string()));
        let job = Job {
            program: entry.program.clone(),
            args,
            env: self.env.clone(),
            cwd: self.cwd.clone(),
            timeout: entry.timeout,
            max_output: entry.max_output,
            nice: self.nice,
        };
        let (mut canceller, cancel) = run::cancel_pair()?;
        let mut running = std::pin::pin!(tokio::task::spawn_blocking(move || {
            let _slot = slot;
            run::run(&job, cancel)
        }));
        let mut client_left = false;
        let finished = loop {
            tokio::select! {
                done = &mut running => break done,
                _ = tokio::time::sleep(CLIENT_CHECK), if !client_left => {
                    if conn.peer_closed() {
                        client_left = true;
                        canceller.cancel();
                    }
                }
            }
        };
        if client_left {
            return Ok(None);
        }
        let outcome = match finished {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(e)) => {
                let text = format!("{}{}: {e}", refusals::CANNOT_RUN, approved.name);
                let mut failed = Executed::answer(text.into_bytes(), outcome::REFUSED);
                failed.audit = Audit::Ran;
                return Ok(Some(failed));
            }
            Err(join) => return Err(io::Error::other(format!("command runner failed: {join}"))),
        };
        let ended = match outcome.ending {
            run::Ending::Exited(code) => Some(Ended::Exit(code)),
            run::Ending::Signaled(signal) => Some(Ended::Signal(signal)),
            run::Ending::TimedOut | run::Ending::Cancelled => None,
        };
        let (text, label) = render(outcome, entry);
        reservation.shrink_to(text.capacity() as u64);
        Ok(Some(Executed {
            result: text,
            outcome: label,
            reservation: Some(reservation),
            audit: Audit::Ran,
            ended,
        }))
    }
}

/// What became of one command line.
struct Executed {
    /// The result the client gets.
    result: Vec<u8>,
    /// Its `outcome` label.
    outcome: &'static str,
    /// The share of the output budget the result holds until it is sent.
    reservation: Option<budget::Reservation>,
    /// How it is logged.
    audit: Audit,
    /// How the process ended, when one ran and ended by itself.
    ended: Option<Ended>,
}

/// How a command's process ended, for the access log.
#[derive(Debug, Clone, Copy)]
enum Ended {
    /// Exited with this status.
    Exit(i32),
    /// Killed by this signal (not by wharf).
    Signal(i32),
}

/// A command's access log fields: the command word (the first word of the line, as the
/// client typed it) and how the process ended. Never the arguments: they may hold secrets.
fn log_fields(f: &mut wharf_core::access_log::Fields<'_>, line: &str, ended: Option<Ended>) {
    if let Some(word) = line.split_ascii_whitespace().next() {
        f.str("command", word);
    }
    match ended {
        Some(Ended::Exit(code)) => f.i64("exit", code.into()),
        Some(Ended::Signal(signal)) => f.i64("signal", signal.into()),
        None => {}
    }
}

impl Executed {
    /// An answer before anything ran, holding no budget.
    fn answer(result: Vec<u8>, outcome: &'static str) -> Self {
        Executed {
            result,
            outcome,
            reservation: None,
            audit: Audit::TurnedAway,
            ended: None,
        }
    }
}

/// What a command line's log line says, and at which level ([`log_command`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Audit {
    /// A program was started, or failed to start: info, with the whole line.
    Ran,
    /// The entry exists, but the client's identity may not run it: info, the first word.
    IdentityRefused,
    /// Refused or busy before anything ran: debug (any client can send these in bulk), the
    /// first word only (a second `auth <token>` line lands here: its token is never logged).
    TurnedAway,
}

/// Logs one command line with who sent it (see [`Audit`]). Commands that run are bounded by
/// `max_concurrent`; the line is client input, so it is cut at 256 characters and escaped by
/// `{:?}`.
fn log_command(cx: &Context, line: &str, executed: &Executed) {
    let command = match executed.audit {
        Audit::Ran => line.trim(),
        Audit::IdentityRefused | Audit::TurnedAway => {
            line.split_ascii_whitespace().next().unwrap_or("")
        }
    };
    let command = policy::printable(command, 256);
    let identity = cx.identity().unwrap_or("-");
    let (service, peer, outcome) = (cx.service(), cx.peer(), executed.outcome);
    match executed.audit {
        Audit::Ran => {
            tracing::info!(service, %peer, identity, ?command, outcome, "exec: command")
        }
        Audit::IdentityRefused => tracing::info!(
            service,
            %peer,
            identity,
            ?command,
            outcome,
            "exec: command refused: not allowed for this identity"
        ),
        Audit::TurnedAway => {
            tracing::debug!(service, %peer, identity, ?command, outcome, "exec: command")
        }
    }
}

/// The result text and the outcome label of a finished command, sized to fit.
fn render(o: Outcome, entry: &Entry) -> (Vec<u8>, &'static str) {
    // stdout's buffer is reused: no second copy of the output while the result is built.
    let mut text = o.stdout;
    text.reserve_exact(o.stderr.len() + NOTE_ROOM as usize);
    text.extend_from_slice(&o.stderr);
    drop(o.stderr);
    let note = |text: &mut Vec<u8>, line: String| {
        if text.last().is_some_and(|&b| b != b'\n') {
            text.push(b'\n');
        }
        text.extend_from_slice(line.as_bytes());
        text.push(b'\n');
    };
    if o.cut > 0 {
        note(
            &mut text,
            format!(
                "[output cut at {} bytes: {} more dropped]",
                entry.max_output, o.cut
            ),
        );
    }
    let label = match o.ending {
        Ending::Exited(0) => outcome::OK,
        Ending::Exited(code) => {
            note(&mut text, format!("[exit status {code}]"));
            outcome::NONZERO_EXIT
        }
        Ending::Signaled(sig) => {
            note(&mut text, format!("[killed by signal {sig}]"));
            outcome::NONZERO_EXIT
        }
        Ending::TimedOut | Ending::Cancelled => {
            note(
                &mut text,
                format!("[timed out after {}s]", entry.timeout.as_secs_f64()),
            );
            outcome::TIMEOUT
        }
    };
    if text.is_empty() {
        text.extend_from_slice(NO_OUTPUT.as_bytes());
    }
    text.shrink_to_fit();
    (text, label)
}

/// An entry's `identities`: at least one, each a name a client could have.
fn check_identities(identities: &[String]) -> Result<(), &'static str> {
    if identities.is_empty() {
        return Err("must name at least one identity (without it, every client may run it)");
    }
    // What the TLS layer never gives as an identity (its rule: such names count as absent).
    if identities
        .iter()
        .any(|id| id.is_empty() || id.chars().any(char::is_control))
    {
        return Err("an identity cannot be empty or hold control characters");
    }
    Ok(())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Plugin for Exec {
    const NAME: &'static str = "exec";
    const DESCRIPTION: &'static str =
        "runs allowlisted commands (never through a shell) and returns their output";
    const OPTIONS: &'static [OptionDoc] = &[
        OptionDoc {
            name: "commands",
            kind: "table: <word> = { argv = [...], allow_args = false, timeout?, max_output?, \
                   identities? }",
            help: "the allowlist; the first word of a command line selects an entry; \
                   `identities` (TLS client certificate names) restricts who may run it",
        },
        OptionDoc {
            name: "timeout",
            kind: "duration",
            help: "wall-clock limit per command; the whole process group is killed",
        },
        OptionDoc {
            name: "max_output",
            kind: "integer (bytes)",
            help: "stdout + stderr kept per command; the rest is dropped with a note",
        },
        OptionDoc {
            name: "env",
            kind: "table of strings",
            help: "the complete environment of commands (nothing is inherited)",
        },
        OptionDoc {
            name: "cwd",
            kind: "path",
            help: "working directory of commands",
        },
        OptionDoc {
            name: "max_concurrent",
            kind: "integer",
            help: "processes running at once; more wait up to their timeout, then are refused",
        },
        OptionDoc {
            name: "nice",
            kind: "integer 0-19",
            help: "CPU niceness of commands, so bursts of them cannot starve the IO workers",
        },
        OptionDoc {
            name: "token",
            kind: "string (optional)",
            help: "require `auth <token>` as each connection's first command",
        },
        OptionDoc {
            name: "max_pending_output",
            kind: "integer (bytes)",
            help: "output all running commands (2 x max_output each) and unacknowledged results \
                   of the service may hold; more commands wait up to their timeout, then are \
                   refused (outcome `busy`)",
        },
        OptionDoc {
            name: "auth_failures_per_minute",
            kind: "integer",
            help: "failed `auth` attempts per source address (IPv6: /64; on a Unix socket: per \
                   uid) and minute, after a burst of 5; beyond it tokens are not even checked",
        },
    ];
    const OUTCOMES: &'static [&'static str] = &[
        outcome::OK,
        outcome::NONZERO_EXIT,
        outcome::TIMEOUT,
        outcome::REFUSED,
        outcome::BUSY,
        outcome::AUTH_FAILED,
    ];
    const SECRETS: &'static [&'static str] = &["token"];
    type Options = ExecOptions;

    fn build(o: ExecOptions) -> Result<Self, PluginError> {
        if o.max_concurrent == 0 {
            return Err(PluginError::option("max_concurrent", "must be at least 1"));
        }
        if o.timeout.is_zero() {
            return Err(PluginError::option("timeout", "must be more than 0s"));
        }
        if o.auth_failures_per_minute == 0 {
            return Err(PluginError::option(
                "auth_failures_per_minute",
                "must be at least 1",
            ));
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
        if o.token
            .as_deref()
            .is_some_and(|t| t.trim().is_empty() || t.trim() != t)
        {
            return Err(PluginError::option(
                "token",
                "must be non-empty, without surrounding spaces",
            ));
        }
        let path = o.env.get("PATH").map(String::as_str);
        let mut allowlist = BTreeMap::new();
        for (word, spec) in &o.commands {
            let key = format!("commands.{word}");
            if word.is_empty()
                || word
                    .bytes()
                    .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
            {
                return Err(PluginError::option(
                    key,
                    "a command word cannot contain spaces",
                ));
            }
            let Some((program, fixed)) = spec.argv.split_first() else {
                return Err(PluginError::option(
                    format!("{key}.argv"),
                    "must name a program",
                ));
            };
            let program = wharf_core::program::resolve(program, path)
                .map_err(|e| PluginError::option(format!("{key}.argv"), e))?;
            let timeout = spec.timeout.unwrap_or(o.timeout);
            if timeout.is_zero() {
                return Err(PluginError::option(
                    format!("{key}.timeout"),
                    "must be more than 0s",
                ));
            }
            if let Some(identities) = &spec.identities {
                check_identities(identities)
                    .map_err(|e| PluginError::option(format!("{key}.identities"), e))?;
            }
            let max_output = spec.max_output.unwrap_or(o.max_output);
            let max_output = usize::try_from(max_output).unwrap_or(usize::MAX);
            if running_reservation(max_output) > o.max_pending_output {
                let key = match spec.max_output {
                    Some(_) => format!("{key}.max_output"),
                    None => "max_output".to_string(),
                };
                return Err(PluginError::option(
                    key,
                    format!(
                        "{max_output} bytes cannot run within max_pending_output = {} (a \
                         running command reserves 2 x max_output + {NOTE_ROOM} bytes)",
                        o.max_pending_output
                    ),
                ));
            }
            allowlist.insert(
                word.clone(),
                Entry {
                    program,
                    fixed_args: fixed.to_vec(),
                    allow_args: spec.allow_args,
                    timeout,
                    max_output,
                    identities: spec.identities.clone(),
                },
            );
        }
        Ok(Exec {
            allowlist,
            env: o.env.into_iter().collect(),
            cwd: o.cwd,
            token: o.token,
            nice: o.nice,
            sizes: (
                o.max_concurrent,
                o.max_pending_output,
                o.auth_failures_per_minute,
            ),
            limits: std::sync::OnceLock::new(),
        })
    }

    fn inherit(&self, previous: &Self) {
        let shared = previous.limits();
        if shared.sizes == self.sizes {
            // Set before this generation serves anything, so nothing made its own yet.
            let _ = self.limits.set(Arc::clone(shared));
        }
    }
}

#[cfg(test)]
mod tests;
