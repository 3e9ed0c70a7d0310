//! The exec plugin: runs allowlisted commands for remote clients. Security-critical.
//!
//! Wire contract (PROTOCOLS.md, exec): the client sends a command line (terminated or not, see
//! `wharf_core::command`), the server answers with the result's length in decimal, waits for an
//! acknowledgement, then sends the result: stdout, then stderr, then a last line such as
//! `[exit status 2]` when the command did not succeed.
//!
//! What makes it safe to expose:
//!
//! - **Nothing runs unless allowlisted**, and never through a shell ([`policy`]).
//! - **Every process is bounded** ([`run`]): timeout with the whole process group killed,
//!   capped output, cleared environment plus configured `env`, configured `cwd`, and at most
//!   `max_concurrent` processes per service.
//! - **Clients are accountable**: optional `token` auth, and a client that disconnects has its
//!   command killed.
//! - **Workers never block**: spawning, reading output and waiting run on the blocking pool;
//!   the connection task only watches the client and waits for the result.

pub mod policy;
pub mod run;

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use wharf_core::command::{send_framed, CommandReader, Frame};
use wharf_core::{Conn, OptionDoc, Plugin, PluginError, Service};

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
    /// The program could not be started.
    pub const CANNOT_RUN: &str = "cannot run ";
    /// No `auth <token>` first.
    pub const AUTH_REQUIRED: &str = "auth required";
    /// A wrong token.
    pub const AUTH_FAILED: &str = "auth failed";

    /// Every refusal prefix.
    pub const ALL: &[&str] = &[
        NOT_ALLOWED,
        NO_ARGS,
        EMPTY,
        CONTROL,
        TOO_LONG,
        NOT_UTF8,
        BUSY,
        CANNOT_RUN,
        AUTH_REQUIRED,
        AUTH_FAILED,
    ];
}

/// The result when a command printed nothing and succeeded (the tutorial's wording).
pub const NO_OUTPUT: &str = "cmd has no output...";

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
}

/// An exec service.
pub struct Exec {
    allowlist: BTreeMap<String, Entry>,
    env: Vec<(String, String)>,
    cwd: PathBuf,
    slots: Arc<Semaphore>,
    token: Option<String>,
    nice: i32,
}

/// `outcome` label values.
mod outcome {
    pub const OK: &str = "ok";
    pub const NONZERO_EXIT: &str = "nonzero_exit";
    pub const TIMEOUT: &str = "timeout";
    pub const REFUSED: &str = "refused";
    pub const AUTH_FAILED: &str = "auth_failed";
}

#[wharf_core::async_trait(?Send)]
impl Service for Exec {
    async fn serve<C: Conn + 'static>(&self, mut conn: C) -> io::Result<()> {
        let mut reader = CommandReader::default();
        let mut authenticated = self.token.is_none();
        loop {
            let line = match reader.next(&mut conn).await? {
                Frame::Closed => return Ok(()),
                Frame::Command(line) => line,
                Frame::TooLong => {
                    reader.discard_buffered();
                    let text = refusals::TOO_LONG.as_bytes().to_vec();
                    send_framed(&mut conn, &mut reader, text).await?;
                    conn.record_request(outcome::REFUSED, Duration::ZERO);
                    return conn.shutdown().await;
                }
                Frame::NotUtf8 if !authenticated => {
                    // Not an `auth` line either: same answer as any other first command.
                    let text = refusals::AUTH_REQUIRED.as_bytes().to_vec();
                    send_framed(&mut conn, &mut reader, text).await?;
                    conn.record_request(outcome::AUTH_FAILED, Duration::ZERO);
                    return conn.shutdown().await;
                }
                Frame::NotUtf8 => {
                    let text = refusals::NOT_UTF8.as_bytes().to_vec();
                    if !send_framed(&mut conn, &mut reader, text).await? {
                        return Ok(());
                    }
                    conn.record_request(outcome::REFUSED, Duration::ZERO);
                    continue;
                }
            };
            let started = Instant::now();
            if !authenticated {
                let (text, accepted) = self.authenticate(&line);
                if !send_framed(&mut conn, &mut reader, text.as_bytes().to_vec()).await? {
                    return Ok(());
                }
                if !accepted {
                    conn.record_request(outcome::AUTH_FAILED, started.elapsed());
                    return conn.shutdown().await;
                }
                authenticated = true;
                continue;
            }
            let Some((result, label)) = self.execute(&line, &conn).await? else {
                // The client left while its command ran; the command was killed.
                return Ok(());
            };
            if !send_framed(&mut conn, &mut reader, result).await? {
                return Ok(());
            }
            conn.record_request(label, started.elapsed());
        }
    }
}

impl Exec {
    /// Checks an `auth <token>` line in constant time.
    fn authenticate(&self, line: &str) -> (&'static str, bool) {
        let Some(expected) = &self.token else {
            return ("ok", true);
        };
        match line.strip_prefix("auth ") {
            Some(given) if constant_time_eq(given.trim().as_bytes(), expected.as_bytes()) => {
                ("ok", true)
            }
            Some(_) => (refusals::AUTH_FAILED, false),
            None => (refusals::AUTH_REQUIRED, false),
        }
    }

    /// Runs one command line; `None` if the client disconnected meanwhile.
    async fn execute<C: Conn>(
        &self,
        line: &str,
        conn: &C,
    ) -> io::Result<Option<(Vec<u8>, &'static str)>> {
        let approved = match policy::check(&self.allowlist, line) {
            Ok(approved) => approved,
            Err(Refusal(text)) => return Ok(Some((text.into_bytes(), outcome::REFUSED))),
        };
        let entry = &self.allowlist[approved.name];
        let Ok(Ok(slot)) =
            tokio::time::timeout(entry.timeout, Arc::clone(&self.slots).acquire_owned()).await
        else {
            return Ok(Some((refusals::BUSY.as_bytes().to_vec(), outcome::REFUSED)));
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
                return Ok(Some((text.into_bytes(), outcome::REFUSED)));
            }
            Err(join) => return Err(io::Error::other(format!("command runner failed: {join}"))),
        };
        Ok(Some(render(&outcome, entry)))
    }
}

/// The result text and the outcome label of a finished command.
fn render(o: &Outcome, entry: &Entry) -> (Vec<u8>, &'static str) {
    let mut text = Vec::with_capacity(o.stdout.len() + o.stderr.len() + 64);
    text.extend_from_slice(&o.stdout);
    text.extend_from_slice(&o.stderr);
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
    (text, label)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Finds `program` in `path` (a `PATH`-style list) unless it is already absolute.
fn resolve_program(program: &str, path: Option<&str>) -> Result<PathBuf, String> {
    let candidate = Path::new(program);
    let found = if candidate.is_absolute() {
        Some(candidate.to_path_buf())
    } else if program.contains('/') {
        return Err(format!(
            "`{program}`: use an absolute path or a bare program name"
        ));
    } else {
        // Only absolute PATH entries: a relative one would resolve against wharf's working
        // directory here but the command's `cwd` at run time.
        path.unwrap_or("")
            .split(':')
            .filter(|dir| dir.starts_with('/'))
            .map(|dir| Path::new(dir).join(program))
            .find(|p| is_executable(p))
    };
    match found {
        Some(p) if is_executable(&p) => Ok(p),
        Some(p) => Err(format!("`{}` is not an executable file", p.display())),
        None => Err(format!("`{program}` not found in env.PATH")),
    }
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

impl Plugin for Exec {
    const NAME: &'static str = "exec";
    const DESCRIPTION: &'static str =
        "runs allowlisted commands (never through a shell) and returns their output";
    const OPTIONS: &'static [OptionDoc] = &[
        OptionDoc {
            name: "commands",
            kind: "table: <word> = { argv = [...], allow_args = false, timeout?, max_output? }",
            help: "the allowlist; the first word of a command line selects an entry",
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
    ];
    const OUTCOMES: &'static [&'static str] = &[
        outcome::OK,
        outcome::NONZERO_EXIT,
        outcome::TIMEOUT,
        outcome::REFUSED,
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
            let program = resolve_program(program, path)
                .map_err(|e| PluginError::option(format!("{key}.argv"), e))?;
            let timeout = spec.timeout.unwrap_or(o.timeout);
            if timeout.is_zero() {
                return Err(PluginError::option(
                    format!("{key}.timeout"),
                    "must be more than 0s",
                ));
            }
            allowlist.insert(
                word.clone(),
                Entry {
                    program,
                    fixed_args: fixed.to_vec(),
                    allow_args: spec.allow_args,
                    timeout,
                    max_output: usize::try_from(spec.max_output.unwrap_or(o.max_output))
                        .unwrap_or(usize::MAX),
                },
            );
        }
        Ok(Exec {
            allowlist,
            env: o.env.into_iter().collect(),
            cwd: o.cwd,
            slots: Arc::new(Semaphore::new(o.max_concurrent)),
            token: o.token,
            nice: o.nice,
        })
    }
}

#[cfg(test)]
mod tests;
