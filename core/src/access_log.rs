//! The access log: one line per connection when it ends, and one per request for plugins that
//! have requests, written off the workers.
//!
//! It exists so that an operator can say who did what (the real client behind a proxy, its TLS
//! identity, bytes, duration, outcome) without a plugin ever formatting a line itself: plugins
//! add their request fields through [`Fields`], from
//! [`Context::record_request_with`](crate::Context::record_request_with), and the framework
//! writes everything else.
//!
//! # Cost and shape
//!
//! A line is formatted on the worker, straight into a per-thread batch (no allocation per
//! line, no lock, no cross-thread wakeup per line). A batch is handed to the writer thread when
//! it holds [`BATCH_BYTES`] or `min(buffer_lines, BATCH_LINES)` lines, or [`BATCH_WINDOW`]
//! after its first line (a local task per worker, [`flush_batches`], waits for that). The
//! writer thread writes each batch with one `write_all`, unbuffered (a batch is already large;
//! a buffer would only copy it again).
//!
//! Formatting a line is kept to a few hundred instructions (an http-hello request line: see
//! BENCHMARKS.md, "Edge features"): the constant start of a service's lines (keys, separators,
//! `event`, `service`, `plugin`) is rendered once per service with a slot for the time, and a
//! connection's client fields once per connection, so a line begins with one copy; so is the
//! `outcome` field of each outcome the plugin declares. The time of a request line is the
//! instant its plugin read for the duration ([`Elapsed::since`]), told as wall time from a
//! per-thread base taken each second (no clock read per line), or one `clock_gettime`; the
//! text up to the second is cached per thread. Each field is appended with one capacity check
//! and short copies done inline (no `memcpy` call per piece); numbers below 1000 are written
//! by hand, durations in fixed point; a value is checked eight bytes at a time and copied as
//! it is unless it needs escaping or quoting. Batches' buffers are reused (no allocation, no
//! fresh pages per batch).
//!
//! **A worker never waits for the writer.** Lines handed over and not yet written are at most
//! `buffer_lines`; a batch that does not fit is dropped whole and its lines are counted in
//! `wharf_access_log_dropped_total`, as are lines a failed write lost. (Why not
//! `tracing-appender`'s non-blocking writer: it allocates and sends each line on its own,
//! waking the writer per line, and knows nothing of reopening a file.)
//!
//! **Rotation**: [`AccessLog::reopen`] (SIGUSR1) makes the writer finish the batch it is
//! writing, flush, and open the path again; batches are whole lines, so a line is never torn
//! between two files and none is lost.
//!
//! # Escaping
//!
//! Values are `&str` (never invalid UTF-8) and escaped here: in JSON, `"`, `\`, control
//! characters (C0, DEL, C1), U+2028/U+2029, zero-width and bidirectional formatting
//! characters become escapes; in logfmt a value is quoted when
//! it is empty or holds a space, `=`, `"` or anything escaped, and escaped the same way inside
//! the quotes. A value longer than [`MAX_VALUE_BYTES`] is cut (at a character boundary) and
//! ends with `...`. Keys are `&'static str` chosen by the code (lowercase, digits and `_`).

use std::cell::{Cell, RefCell};
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use metrics::Counter;
use tokio::sync::Notify;

use crate::config::{AccessLogConfig, AccessLogFormat};
use crate::context::Elapsed;
use crate::peer::Peer;

/// Appends `[parts]` to `out` with one capacity check, copying short parts with a few loads
/// and stores instead of a `memcpy` call each (a line is a dozen parts of a few bytes: with
/// `extend_from_slice` per part, the calls and checks were a third of a line's cost). A macro
/// rather than a loop over the parts: each part's copy is its own code, so a literal's length
/// is known where it is copied (a couple of stores, no branch on its length).
macro_rules! append {
    ($out:expr, [$($part:expr),+ $(,)?] $(,)?) => {{
        let out: &mut Vec<u8> = $out;
        let mut total = 0usize;
        $(
            total = total
                .checked_add(<[u8]>::len($part))
                .expect("an access log line fits in memory");
        )+
        out.reserve(total);
        let mut len = out.len();
        let base = out.as_mut_ptr();
        $(
            let part: &[u8] = $part;
            // SAFETY: `reserve(total)` made room for all the parts after the first `len`
            // bytes, and `part` cannot lie inside `out` (borrowed shared while `out` is
            // borrowed mutably).
            unsafe { copy_short(part, base.add(len)) };
            len += part.len();
        )+
        // SAFETY: `reserve` made the capacity at least `len`, and every byte up to `len` was
        // written, before (by `out` itself) or above.
        unsafe { out.set_len(len) };
    }};
}

/// Counter: access log lines dropped (the writer was behind by `buffer_lines`, or a write
/// failed).
pub const DROPPED: &str = "wharf_access_log_dropped_total";

/// Bytes of lines a worker batches before handing them to the writer.
pub const BATCH_BYTES: usize = 64 * 1024;
/// Lines a worker batches at most before handing them to the writer (fewer if `buffer_lines`
/// is smaller).
pub const BATCH_LINES: usize = 512;
/// How long a worker's first batched line waits for company before the batch is handed over.
pub const BATCH_WINDOW: Duration = Duration::from_millis(20);
/// Longest value written; longer ones are cut and end with `...`.
pub const MAX_VALUE_BYTES: usize = 1024;

/// How a connection ended, the `outcome` of its line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnOutcome {
    /// The plugin finished: the client closed, or the protocol's exchange was over.
    Closed,
    /// An IO or protocol error ended it.
    Error,
    /// `idle_timeout` (or a plugin's own deadline reported as a timeout) ended it.
    Timeout,
    /// Still open at the end of a shutdown's grace period: the server closed it.
    Cut,
    /// Refused at admission; the line carries the `reason`.
    Refused,
}

impl ConnOutcome {
    /// The `outcome` value.
    pub fn as_str(self) -> &'static str {
        match self {
            ConnOutcome::Closed => "closed",
            ConnOutcome::Error => "error",
            ConnOutcome::Timeout => "timeout",
            ConnOutcome::Cut => "cut",
            ConnOutcome::Refused => "refused",
        }
    }

    /// The outcome of a plugin's `serve` result.
    pub fn of(result: &io::Result<()>) -> Self {
        match result {
            Ok(()) => ConnOutcome::Closed,
            Err(e) if e.kind() == io::ErrorKind::TimedOut => ConnOutcome::Timeout,
            Err(_) => ConnOutcome::Error,
        }
    }
}

/// Registers the HELP text of the access log's metric. Call once after installing a recorder.
pub fn describe() {
    metrics::describe_counter!(
        DROPPED,
        "Access log lines dropped: the writer was buffer_lines behind, or a write failed."
    );
}

/// Opens the access log file of `config` for appending (creating it), as startup, `wharf check`
/// and every reopen do; `None` for `-` (standard error).
pub fn open(config: &AccessLogConfig) -> io::Result<Option<File>> {
    if is_stderr(&config.path) {
        return Ok(None);
    }
    open_path(&config.path).map(Some)
}

fn is_stderr(path: &Path) -> bool {
    path.as_os_str() == "-"
}

fn open_path(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

/// The process's access log: the writer thread and what workers need to reach it. Clones share
/// it.
#[derive(Clone)]
pub struct AccessLog {
    shared: Arc<Shared>,
}

struct Shared {
    format: AccessLogFormat,
    /// `buffer_lines`.
    capacity: usize,
    /// Lines handed to the writer and not yet written.
    queued: AtomicUsize,
    dropped: AtomicU64,
    dropped_metric: Counter,
    writer: mpsc::Sender<Message>,
    /// Buffers of written batches, emptied, for the workers' next batches: a batch costs no
    /// allocation and never grows by copies, and its pages are not given back to the kernel
    /// and faulted in again (glibc trims a freed 64 KiB at the top of a heap). At most
    /// [`SPARE_BUFFERS`].
    spare: Mutex<Vec<Vec<u8>>>,
}

/// Written batches' buffers kept for reuse, at most.
const SPARE_BUFFERS: usize = 8;
/// A batch buffer's capacity: [`BATCH_BYTES`] and the line that crosses it (a line longer
/// than that grows the buffer, which is then not kept).
const BATCH_CAPACITY: usize = BATCH_BYTES + 16 * 1024;

enum Message {
    /// Whole lines, and how many.
    Lines(Vec<u8>, usize),
    /// Open the path again (SIGUSR1).
    Reopen,
    /// Write everything, flush, answer, end.
    Stop(mpsc::Sender<()>),
}

impl AccessLog {
    /// Starts the writer thread for `config`, appending to `file` (from [`open`]; `None`
    /// writes to standard error). Register the metrics recorder first: the dropped counter's
    /// handle is taken here.
    pub fn start(config: &AccessLogConfig, file: Option<File>) -> io::Result<AccessLog> {
        let (tx, rx) = mpsc::channel();
        let shared = Arc::new(Shared {
            format: config.format,
            capacity: config.buffer_lines.max(1),
            queued: AtomicUsize::new(0),
            dropped: AtomicU64::new(0),
            dropped_metric: metrics::counter!(DROPPED),
            writer: tx,
            spare: Mutex::new(Vec::new()),
        });
        shared.dropped_metric.increment(0);
        let sink = match file {
            Some(file) => Sink::File(file),
            None => Sink::Stderr,
        };
        let path = (!is_stderr(&config.path)).then(|| config.path.clone());
        let writer = Writer {
            out: sink,
            path,
            shared: Arc::clone(&shared),
            failing: false,
        };
        std::thread::Builder::new()
            .name("wharf-access-log".into())
            .spawn(move || writer.run(rx))?;
        Ok(AccessLog { shared })
    }

    /// Asks the writer to reopen the file (logrotate renamed it and sent SIGUSR1): lines
    /// handed over before are written to the old file, later ones to the new one.
    pub fn reopen(&self) {
        let _ = self.shared.writer.send(Message::Reopen);
    }

    /// Writes what was handed over and flushes, waiting at most `limit` (a writer stuck on
    /// a full pipe is left behind).
    pub fn stop(&self, limit: Duration) {
        flush_thread();
        let (done, finished) = mpsc::channel();
        if self.shared.writer.send(Message::Stop(done)).is_ok() {
            let _ = finished.recv_timeout(limit);
        }
    }

    /// Lines dropped so far.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// The handle one service generation writes through (`None` when the service has
    /// `access_log = false`). `outcomes` are its plugin's request outcomes
    /// ([`Plugin::OUTCOMES`](crate::Plugin::OUTCOMES)), whose fields are rendered once here.
    pub fn for_service(
        &self,
        service: &str,
        plugin: &str,
        outcomes: &'static [&'static str],
        enabled: bool,
    ) -> Option<ServiceLog> {
        if !enabled {
            return None;
        }
        let format = self.shared.format;
        let outcomes = outcomes
            .iter()
            .map(|&outcome| {
                let mut bytes = Vec::new();
                Fields {
                    out: &mut bytes,
                    format,
                }
                .str("outcome", outcome);
                (outcome, bytes.into_boxed_slice())
            })
            .collect();
        Some(ServiceLog(Arc::new(ServiceLogInner {
            shared: Arc::clone(&self.shared),
            request_head: Head::render(format, "request", service, plugin),
            connection_head: Head::render(format, "connection", service, plugin),
            outcomes,
            batch_lines: self.shared.capacity.min(BATCH_LINES),
        })))
    }
}

/// What one service generation writes its lines through: the log and the service's own
/// fields, formatted once. Cheap to clone.
#[derive(Clone)]
pub struct ServiceLog(Arc<ServiceLogInner>);

struct ServiceLogInner {
    shared: Arc<Shared>,
    /// The start of this service's request lines, rendered once.
    request_head: Head,
    /// The start of its connection lines.
    connection_head: Head,
    /// The plugin's declared outcomes and their `outcome` fields, rendered (a request line
    /// copies its outcome's instead of checking and escaping the value each time).
    outcomes: Box<[RenderedOutcome]>,
    /// Lines after which a batch is handed over: `min(buffer_lines, BATCH_LINES)`.
    batch_lines: usize,
}

/// A declared outcome and its `outcome` field, rendered.
type RenderedOutcome = (&'static str, Box<[u8]>);

impl ServiceLogInner {
    /// The rendered `outcome` field of a declared outcome (the same static text: a pointer
    /// comparison, the content as the fallback).
    #[inline(always)]
    fn outcome_field(&self, outcome: &'static str) -> Option<&[u8]> {
        self.outcomes
            .iter()
            .find(|(o, _)| std::ptr::eq(*o, outcome) || same_text(o, outcome))
            .map(|(_, rendered)| &rendered[..])
    }
}

/// Whether `a` and `b` are the same text: the lengths, then the bytes, inline (an outcome is
/// a few bytes; a `memcmp` call costs more than comparing them).
#[inline(always)]
fn same_text(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).all(|(x, y)| x == y)
}

/// The constant start of one kind of line of one service, rendered when the service starts:
/// `{"time":"<24 bytes>","event":"request","service":"web","plugin":"http-hello"` (logfmt:
/// `time=<24 bytes> event=request service=web plugin=http-hello`). A line copies it whole and
/// writes the time into its slot, so a line's keys, separators and the service's own fields
/// cost one copy instead of a dozen appends and three escape scans.
struct Head {
    bytes: Box<[u8]>,
    /// Where the time's [`TIME_LEN`] bytes go.
    time_at: usize,
}

/// Bytes of a line's time: `2025-12-01T02:38:04.007Z`.
const TIME_LEN: usize = 24;

impl Head {
    fn render(format: AccessLogFormat, event: &str, service: &str, plugin: &str) -> Head {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(match format {
            AccessLogFormat::Json => b"{\"time\":\"",
            AccessLogFormat::Logfmt => b"time=",
        });
        let time_at = bytes.len();
        bytes.extend_from_slice(&[b'0'; TIME_LEN]);
        if format == AccessLogFormat::Json {
            bytes.push(b'"');
        }
        let mut fields = Fields {
            out: &mut bytes,
            format,
        };
        fields.str("event", event);
        fields.str("service", service);
        fields.str("plugin", plugin);
        Head {
            bytes: bytes.into_boxed_slice(),
            time_at,
        }
    }
}

/// The facts about a connection every line of it carries.
pub struct Who<'a> {
    /// The client (after PROXY protocol).
    pub client: Peer,
    /// The proxy, when a PROXY header named the client.
    pub proxy: Option<Peer>,
    /// The TLS identity.
    pub identity: Option<&'a str>,
}

/// Most bytes the framework's own fields after `who` take: outcome and reason words, three
/// numbers, a duration, the line's end. Reserved with the line, so that they never grow the
/// batch piecemeal (a plugin's fields reserve their own).
const FRAMEWORK_FIELDS_BOUND: usize = 160;

/// A connection's client fields (`client`, `proxy`, `identity`) formatted for one service's
/// log, after the start of its request lines: what every line of the connection begins with,
/// made once per connection by [`ServiceLog::who`].
pub struct ClientFields {
    /// The service's request line start (with its time slot), then the client fields.
    request_start: Box<[u8]>,
    /// Where the client fields begin in `request_start`.
    who_at: usize,
}

impl ClientFields {
    fn who(&self) -> &[u8] {
        &self.request_start[self.who_at..]
    }
}

impl ServiceLog {
    /// `client`, `proxy` and `identity` formatted for this log: a connection's context makes
    /// them once, for all its lines.
    pub fn who(&self, who: &Who<'_>) -> ClientFields {
        let head = &self.0.request_head.bytes;
        let mut out = Vec::with_capacity(head.len() + 64);
        out.extend_from_slice(head);
        Fields {
            out: &mut out,
            format: self.0.shared.format,
        }
        .who(who);
        ClientFields {
            request_start: out.into_boxed_slice(),
            who_at: head.len(),
        }
    }

    /// Writes the line of a connection that ended with `outcome` after `duration`, having
    /// read `bytes_in` and written `bytes_out`; `who` is from [`ServiceLog::who`].
    pub fn connection(
        &self,
        who: &ClientFields,
        outcome: ConnOutcome,
        duration: Duration,
        bytes_in: u64,
        bytes_out: u64,
    ) {
        let head = &self.0.connection_head;
        self.line(&head.bytes, who.who(), head.time_at, None, |f| {
            f.word("outcome", outcome.as_str());
            f.u64("bytes_in", bytes_in);
            f.u64("bytes_out", bytes_out);
            f.duration("duration_ms", duration);
        });
    }

    /// Writes the line of a connection refused at admission for `reason`.
    pub fn refused(&self, who: &Who<'_>, reason: &str) {
        let head = &self.0.connection_head;
        self.line(&head.bytes, &[], head.time_at, None, |f| {
            f.who(who);
            f.word("outcome", ConnOutcome::Refused.as_str());
            f.str("reason", reason);
        });
    }

    /// Writes the line of a request that ended with `outcome` after `elapsed`, with the
    /// plugin's own `fields`; `who` is from [`ServiceLog::who`]. The line's time is when
    /// `elapsed` was measured, if it says ([`Elapsed::since`]), else now.
    #[inline]
    pub fn request(
        &self,
        who: &ClientFields,
        outcome: &'static str,
        elapsed: impl Into<Elapsed>,
        fields: impl FnOnce(&mut Fields<'_>),
    ) {
        let inner = &*self.0;
        let elapsed = elapsed.into();
        // The request head and the client fields are one copy.
        let time_at = inner.request_head.time_at;
        self.line(&who.request_start, &[], time_at, elapsed.ended(), |f| {
            match inner.outcome_field(outcome) {
                Some(rendered) => f.rendered(rendered),
                None => f.str("outcome", outcome),
            }
            f.duration("duration_ms", elapsed.duration());
            fields(f);
        });
    }

    /// Formats one line into this thread's batch: `head` with the time in its slot at
    /// `time_at` (the wall clock at `at`, or now), `who`, then what `rest` adds.
    #[inline]
    fn line(
        &self,
        head: &[u8],
        who: &[u8],
        time_at: usize,
        at: Option<Instant>,
        rest: impl FnOnce(&mut Fields<'_>),
    ) {
        let inner = &*self.0;
        let shared = &inner.shared;
        BATCH.with(|batch| {
            let mut batch = batch.borrow_mut();
            let batch = &mut *batch;
            batch.adopt(shared);
            let format = shared.format;
            let buf = &mut batch.buf;
            buf.reserve(head.len() + who.len() + FRAMEWORK_FIELDS_BOUND);
            let start = buf.len();
            buf.extend_from_slice(head);
            let time = &mut buf[start + time_at..][..TIME_LEN];
            batch
                .clock
                .write_at(at, time.try_into().expect("the time slot"));
            if !who.is_empty() {
                buf.extend_from_slice(who);
            }
            rest(&mut Fields { out: buf, format });
            match format {
                AccessLogFormat::Json => buf.extend_from_slice(b"}\n"),
                AccessLogFormat::Logfmt => buf.push(b'\n'),
            }
            batch.lines += 1;
            let full = batch.lines >= inner.batch_lines || batch.buf.len() >= BATCH_BYTES;
            if full || !batch.flusher_waits() {
                batch.hand_over();
            }
        });
    }
}

/// The fields of one line, as a plugin adds its own (see
/// [`Context::record_request_with`](crate::Context::record_request_with)). Keys are lowercase
/// words chosen in code; values are escaped for the format, so client input is safe to pass.
/// Do not add a field that may hold a secret (a token, a command's arguments, a query string).
pub struct Fields<'a> {
    out: &'a mut Vec<u8>,
    format: AccessLogFormat,
}

impl Fields<'_> {
    /// A text field.
    #[inline(always)]
    pub fn str(&mut self, key: &'static str, value: &str) {
        debug_assert_key(key);
        let bytes = value.as_bytes();
        match self.format {
            AccessLogFormat::Json if bytes.len() <= MAX_VALUE_BYTES && plain_json(bytes) => {
                self.plain_str(key, bytes);
            }
            AccessLogFormat::Logfmt
                if !bytes.is_empty() && bytes.len() <= MAX_VALUE_BYTES && plain_logfmt(bytes) =>
            {
                self.plain_str(key, bytes);
            }
            _ => self.escaped(key, value),
        }
    }

    /// A text field from bytes the client sent that should be UTF-8 (a request's method or
    /// path as read): written as [`Fields::str`] writes them when they are UTF-8, as `?` when
    /// they are not. Spares the caller a UTF-8 check: the scan for bytes to escape is one.
    #[inline(always)]
    pub fn bytes(&mut self, key: &'static str, value: &[u8]) {
        let plain = match self.format {
            AccessLogFormat::Json => value.len() <= MAX_VALUE_BYTES && plain_json(value),
            AccessLogFormat::Logfmt => {
                !value.is_empty() && value.len() <= MAX_VALUE_BYTES && plain_logfmt(value)
            }
        };
        match plain {
            // Printable ASCII: UTF-8, nothing to escape or quote.
            true => self.plain_str(key, value),
            false => self.str(key, std::str::from_utf8(value).unwrap_or("?")),
        }
    }

    /// A field rendered before by these rules (a declared outcome's).
    #[inline(always)]
    fn rendered(&mut self, field: &[u8]) {
        append!(self.out, [field]);
    }

    /// A text field whose value was found plain (printable ASCII, nothing to escape or, in
    /// logfmt, to quote).
    #[inline(always)]
    fn plain_str(&mut self, key: &'static str, value: &[u8]) {
        match self.format {
            AccessLogFormat::Json => {
                append!(self.out, [b",\"", key.as_bytes(), b"\":\"", value, b"\""]);
            }
            AccessLogFormat::Logfmt => append!(self.out, [b" ", key.as_bytes(), b"=", value]),
        }
    }

    /// A text field whose value needs escaping or quoting (or cutting): the slow path of
    /// [`Fields::str`], kept out of line.
    #[cold]
    #[inline(never)]
    fn escaped(&mut self, key: &'static str, value: &str) {
        self.key(key);
        self.out.push(b'"');
        escape_into(self.out, value);
        self.out.push(b'"');
    }

    /// A text field whose value the framework chose from its own words (an outcome): nothing
    /// to escape, nothing to quote.
    #[inline]
    fn word(&mut self, key: &'static str, value: &'static str) {
        debug_assert!(
            !value.is_empty() && plain_json(value.as_bytes()) && plain_logfmt(value.as_bytes()),
            "not a plain word: {value:?}"
        );
        debug_assert_key(key);
        match self.format {
            AccessLogFormat::Json => {
                append!(
                    self.out,
                    [b",\"", key.as_bytes(), b"\":\"", value.as_bytes(), b"\""],
                );
            }
            AccessLogFormat::Logfmt => {
                append!(self.out, [b" ", key.as_bytes(), b"=", value.as_bytes()])
            }
        }
    }

    /// A field whose value needs no quoting or escaping in either format: a number, its
    /// `digits` then `suffix`.
    #[inline(always)]
    fn bare(&mut self, key: &'static str, digits: &[u8], suffix: &[u8]) {
        debug_assert_key(key);
        match self.format {
            AccessLogFormat::Json => {
                append!(self.out, [b",\"", key.as_bytes(), b"\":", digits, suffix]);
            }
            AccessLogFormat::Logfmt => {
                append!(self.out, [b" ", key.as_bytes(), b"=", digits, suffix])
            }
        }
    }

    /// A number then `suffix`: below 1000 (a status, most durations) by hand, larger ones with
    /// `itoa`.
    #[inline(always)]
    fn number(&mut self, key: &'static str, value: u64, suffix: &[u8]) {
        let mut large = itoa::Buffer::new();
        let digits: &[u8] = if value < 1000 {
            // Without the leading zeros of its three digits.
            let skip = usize::from(value < 10) + usize::from(value < 100);
            &DIGITS[value as usize][skip..]
        } else {
            large.format(value).as_bytes()
        };
        self.bare(key, digits, suffix);
    }

    /// An unsigned number.
    #[inline]
    pub fn u64(&mut self, key: &'static str, value: u64) {
        self.number(key, value, b"");
    }

    /// A signed number.
    #[inline]
    pub fn i64(&mut self, key: &'static str, value: i64) {
        self.bare(key, itoa::Buffer::new().format(value).as_bytes(), b"");
    }

    /// A duration in milliseconds, to the microsecond (`1.234`), in fixed point (no `u128`,
    /// no float).
    #[inline]
    fn duration(&mut self, key: &'static str, value: Duration) {
        let micros = micros(value);
        let [a, b, c] = DIGITS[(micros % 1000) as usize];
        let frac = [b'.', a, b, c];
        self.number(key, micros / 1000, &frac);
    }

    /// `client`, then `proxy` and `identity` when there are. A Unix-domain peer (the client,
    /// or the proxy that named it) is written `unix`, followed by its `uid`, `gid` and `pid`.
    fn who(&mut self, who: &Who<'_>) {
        self.peer("client", who.client);
        if let Some(proxy) = who.proxy {
            self.peer("proxy", proxy);
        }
        if let Some(identity) = who.identity {
            self.str("identity", identity);
        }
    }

    /// A peer: its address, or `unix` and its credentials.
    fn peer(&mut self, key: &'static str, peer: Peer) {
        match peer {
            Peer::Ip(addr) => self.addr(key, addr),
            Peer::Unix(credentials) => {
                self.str(key, "unix");
                self.u64("uid", credentials.uid.into());
                self.u64("gid", credentials.gid.into());
                if let Some(pid) = credentials.pid {
                    self.u64("pid", pid.into());
                }
            }
        }
    }

    /// An address, `ip:port` (`[v6]:port`).
    fn addr(&mut self, key: &'static str, value: SocketAddr) {
        self.key(key);
        let quote = self.format == AccessLogFormat::Json;
        if quote {
            self.out.push(b'"');
        }
        // Digits, dots, colons and brackets only: nothing to escape.
        let _ = write!(self.out, "{value}");
        if quote {
            self.out.push(b'"');
        }
    }

    /// The key and its separators: `,"key":` or ` key=`.
    fn key(&mut self, key: &'static str) {
        debug_assert_key(key);
        match self.format {
            AccessLogFormat::Json => append!(self.out, [b",\"", key.as_bytes(), b"\":"]),
            AccessLogFormat::Logfmt => append!(self.out, [b" ", key.as_bytes(), b"="]),
        }
    }
}

/// The three digits of each number below 1000 (`000` to `999`): a number, a fraction or the
/// milliseconds of a time is one load instead of three divisions.
static DIGITS: [[u8; 3]; 1000] = {
    let mut digits = [[0u8; 3]; 1000];
    let mut n = 0;
    while n < 1000 {
        digits[n] = [
            b'0' + (n / 100) as u8,
            b'0' + (n / 10 % 10) as u8,
            b'0' + (n % 10) as u8,
        ];
        n += 1;
    }
    digits
};

/// Keys are chosen in code: lowercase words (digits and `_` allowed), never escaped.
#[inline(always)]
fn debug_assert_key(key: &str) {
    debug_assert!(
        !key.is_empty()
            && key
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
        "access log keys are lowercase words: {key:?}"
    );
}

/// Copies `src` to `dst`: up to 16 bytes with two (possibly overlapping) unaligned loads and
/// stores, longer with `copy_nonoverlapping`.
///
/// # Safety
///
/// `dst` must be valid for writing `src.len()` bytes and not overlap `src`.
#[inline(always)]
unsafe fn copy_short(src: &[u8], dst: *mut u8) {
    use std::ptr::{read_unaligned, write_unaligned};
    let n = src.len();
    let s = src.as_ptr();
    // SAFETY (all branches): every read is within `src` (offsets below `n`, each access
    // within the `n` bytes), every write within the `n` bytes at `dst`, per the contract.
    unsafe {
        if n > 16 {
            std::ptr::copy_nonoverlapping(s, dst, n);
        } else if n >= 8 {
            let head = read_unaligned(s.cast::<u64>());
            let tail = read_unaligned(s.add(n - 8).cast::<u64>());
            write_unaligned(dst.cast::<u64>(), head);
            write_unaligned(dst.add(n - 8).cast::<u64>(), tail);
        } else if n >= 4 {
            let head = read_unaligned(s.cast::<u32>());
            let tail = read_unaligned(s.add(n - 4).cast::<u32>());
            write_unaligned(dst.cast::<u32>(), head);
            write_unaligned(dst.add(n - 4).cast::<u32>(), tail);
        } else if n > 0 {
            // 1 to 3 bytes: first, middle, last (some the same byte).
            *dst = *s;
            *dst.add(n / 2) = *s.add(n / 2);
            *dst.add(n - 1) = *s.add(n - 1);
        }
    }
}

/// A byte repeated in each of a word's 8 lanes.
const fn lanes(byte: u8) -> u64 {
    u64::from_ne_bytes([byte; 8])
}

/// Whether a lane of `word` is zero.
#[inline(always)]
fn has_zero(word: u64) -> bool {
    word.wrapping_sub(lanes(1)) & !word & lanes(0x80) != 0
}

/// Whether a lane of `word` is below `limit` (at most 0x80).
#[inline(always)]
fn has_below(word: u64, limit: u8) -> bool {
    word.wrapping_sub(lanes(limit)) & !word & lanes(0x80) != 0
}

/// Whether a lane of `word` equals `byte`.
#[inline(always)]
fn has_byte(word: u64, byte: u8) -> bool {
    has_zero(word ^ lanes(byte))
}

/// Whether `bytes` can be written in JSON quotes as they are: printable ASCII other than `"`
/// and `\` (non-ASCII goes the slow way: C1 controls and invisible formatting characters are
/// escaped).
#[inline]
fn plain_json(bytes: &[u8]) -> bool {
    plain(bytes, JSON_ESCAPES, |w| {
        has_below(w, 0x20) || has_byte(w, b'"') || has_byte(w, b'\\')
    })
}

/// Whether `bytes` can be a logfmt value unquoted: printable ASCII other than space, `"`, `=`
/// and `\`.
#[inline]
fn plain_logfmt(bytes: &[u8]) -> bool {
    plain(bytes, LOGFMT_QUOTES, |w| {
        has_below(w, 0x21) || has_byte(w, b'"') || has_byte(w, b'=') || has_byte(w, b'\\')
    })
}

/// Whether no byte of `bytes` is non-ASCII, DEL, or found by `special` (eight bytes at a
/// time), then, for the last few bytes, has a bit of `class` in [`BYTE_CLASS`].
#[inline(always)]
fn plain(bytes: &[u8], class: u8, special: impl Fn(u64) -> bool) -> bool {
    let mut words = bytes.chunks_exact(8);
    for word in &mut words {
        let w = u64::from_ne_bytes(word.try_into().expect("8 bytes"));
        if w & lanes(0x80) != 0 || has_byte(w, 0x7f) || special(w) {
            return false;
        }
    }
    words
        .remainder()
        .iter()
        .all(|&b| BYTE_CLASS[usize::from(b)] & class == 0)
}

/// [`BYTE_CLASS`] bit: JSON escapes the byte, or it starts a character that is looked at
/// closer (non-ASCII).
const JSON_ESCAPES: u8 = 1;
/// [`BYTE_CLASS`] bit: a logfmt value with the byte is quoted.
const LOGFMT_QUOTES: u8 = 2;

/// What each byte needs, by the bits above (for the bytes [`plain_json`] and
/// [`plain_logfmt`] look at one by one).
static BYTE_CLASS: [u8; 256] = {
    let mut class = [0u8; 256];
    let mut b = 0;
    while b < 256 {
        let byte = b as u8;
        if byte < 0x20 || byte >= 0x7f || byte == b'"' || byte == b'\\' {
            class[b] |= JSON_ESCAPES;
        }
        if !byte.is_ascii_graphic() || byte == b'"' || byte == b'=' || byte == b'\\' {
            class[b] |= LOGFMT_QUOTES;
        }
        b += 1;
    }
    class
};

/// Appends `value` escaped (JSON string rules, which logfmt's quoted values share), cut at
/// [`MAX_VALUE_BYTES`].
fn escape_into(out: &mut Vec<u8>, value: &str) {
    let (value, cut) = if value.len() > MAX_VALUE_BYTES {
        let mut end = MAX_VALUE_BYTES;
        while !value.is_char_boundary(end) {
            end -= 1;
        }
        (&value[..end], true)
    } else {
        (value, false)
    };
    let bytes = value.as_bytes();
    let mut plain_from = 0;
    let mut i = 0;
    while i < bytes.len() {
        // Printable ASCII other than `"` and `\` (nearly every byte of a real line) is copied
        // in bulk; only the rest is looked at as a character.
        let b = bytes[i];
        if (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\' {
            i += 1;
            continue;
        }
        let c = value[i..].chars().next().unwrap_or('\u{fffd}');
        let escape: Option<&[u8]> = match c {
            '"' => Some(b"\\\""),
            '\\' => Some(b"\\\\"),
            '\n' => Some(b"\\n"),
            '\r' => Some(b"\\r"),
            '\t' => Some(b"\\t"),
            c if c.is_control() || is_invisible(c) => None,
            _ => {
                i += c.len_utf8();
                continue;
            }
        };
        out.extend_from_slice(&bytes[plain_from..i]);
        match escape {
            Some(e) => out.extend_from_slice(e),
            None => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
        }
        i += c.len_utf8();
        plain_from = i;
    }
    out.extend_from_slice(&bytes[plain_from..]);
    if cut {
        out.extend_from_slice(b"...");
    }
}

/// Characters that are not control characters but change how a line reads without showing:
/// line and paragraph separators, zero-width characters and bidirectional overrides (a
/// right-to-left override could make a terminal show a line reordered, "Trojan Source").
fn is_invisible(c: char) -> bool {
    matches!(
        c,
        '\u{2028}'
            | '\u{2029}'
            | '\u{200b}'..='\u{200f}'
            | '\u{202a}'..='\u{202e}'
            | '\u{2060}'..='\u{2064}'
            | '\u{2066}'..='\u{2069}'
            | '\u{feff}'
    )
}

thread_local! {
    // A constant initializer: no lazy initialization checked on each line.
    static BATCH: RefCell<Batch> = const {
        RefCell::new(Batch {
            buf: Vec::new(),
            lines: 0,
            owner: None,
            clock: Clock {
                second: 0,
                prefix: [0; 19],
                base: None,
            },
            flusher: None,
        })
    };
}

/// A thread's lines not yet handed to the writer.
struct Batch {
    buf: Vec<u8>,
    lines: usize,
    /// The log the lines belong to.
    owner: Option<Arc<Shared>>,
    clock: Clock,
    /// This thread's [`flush_batches`] task, when it runs: told when a batch starts.
    flusher: Option<Rc<Flusher>>,
}

struct Flusher {
    notify: Notify,
    /// A batch is started and the flusher was told.
    armed: Cell<bool>,
}

impl Batch {
    /// Makes the batch `shared`'s, handing over another log's lines first.
    #[inline(always)]
    fn adopt(&mut self, shared: &Arc<Shared>) {
        if !matches!(&self.owner, Some(owner) if Arc::ptr_eq(owner, shared)) {
            self.change_owner(shared);
        }
    }

    #[cold]
    fn change_owner(&mut self, shared: &Arc<Shared>) {
        self.hand_over();
        self.owner = Some(Arc::clone(shared));
        if self.buf.capacity() == 0 {
            self.buf = shared.spare_buffer();
        }
    }

    /// Whether a flusher will hand this batch over soon (telling it, for a new batch).
    #[inline(always)]
    fn flusher_waits(&self) -> bool {
        match &self.flusher {
            Some(f) => {
                if !f.armed.replace(true) {
                    f.notify.notify_one();
                }
                true
            }
            None => false,
        }
    }

    /// Hands the lines to the writer, or drops and counts them if it is `buffer_lines` behind.
    fn hand_over(&mut self) {
        if let Some(f) = &self.flusher {
            f.armed.set(false);
        }
        let n = std::mem::take(&mut self.lines);
        let Some(shared) = &self.owner else {
            self.buf.clear();
            return;
        };
        if n == 0 {
            return;
        }
        let fits = shared
            .queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| {
                (q + n <= shared.capacity).then_some(q + n)
            })
            .is_ok();
        if fits {
            let lines = std::mem::replace(&mut self.buf, shared.spare_buffer());
            if shared.writer.send(Message::Lines(lines, n)).is_err() {
                shared.queued.fetch_sub(n, Ordering::AcqRel);
                shared.count_dropped(n);
            }
        } else {
            self.buf.clear();
            shared.count_dropped(n);
        }
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        self.hand_over();
    }
}

impl Shared {
    /// An empty buffer for a batch: a written batch's, if one is kept.
    fn spare_buffer(&self) -> Vec<u8> {
        let spare = self
            .spare
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        spare.unwrap_or_else(|| Vec::with_capacity(BATCH_CAPACITY))
    }

    /// Keeps a written batch's buffer for a next batch (unless enough are kept, or a very
    /// long line grew it).
    fn give_back(&self, mut buf: Vec<u8>) {
        if buf.capacity() > BATCH_CAPACITY {
            return;
        }
        buf.clear();
        let mut spare = self.spare.lock().unwrap_or_else(PoisonError::into_inner);
        if spare.len() < SPARE_BUFFERS {
            spare.push(buf);
        }
    }

    fn count_dropped(&self, n: usize) {
        self.dropped.fetch_add(n as u64, Ordering::Relaxed);
        self.dropped_metric.increment(n as u64);
    }
}

/// Hands this thread's batched lines to the writer now (a worker's last act).
pub fn flush_thread() {
    let _ = BATCH.try_with(|b| {
        if let Ok(mut b) = b.try_borrow_mut() {
            b.hand_over();
        }
    });
}

/// Runs on each worker (a local task) for as long as it serves: hands a batch over
/// [`BATCH_WINDOW`] after its first line, so lines reach the file even when traffic stops.
/// Without it, each line is handed over at once.
pub async fn flush_batches() {
    let flusher = Rc::new(Flusher {
        notify: Notify::new(),
        armed: Cell::new(false),
    });
    BATCH.with(|b| b.borrow_mut().flusher = Some(Rc::clone(&flusher)));
    // Dropped with the task (the worker ends): lines from then on are handed over at once.
    struct Uninstall;
    impl Drop for Uninstall {
        fn drop(&mut self) {
            let _ = BATCH.try_with(|b| {
                if let Ok(mut b) = b.try_borrow_mut() {
                    b.flusher = None;
                    b.hand_over();
                }
            });
        }
    }
    let _uninstall = Uninstall;
    loop {
        flusher.notify.notified().await;
        tokio::time::sleep(BATCH_WINDOW).await;
        if flusher.armed.get() {
            flush_thread();
        }
    }
}

/// RFC 3339 UTC time with milliseconds; the part up to the second is formatted once a second.
#[derive(Default)]
struct Clock {
    second: u64,
    /// `YYYY-MM-DDTHH:MM:SS` of `second`.
    prefix: [u8; 19],
    /// A monotonic instant and the wall clock at it (microseconds since the epoch), taken
    /// less than a second before the instants told from it: an instant a plugin read for a
    /// request's duration is told as wall time with no clock read of its own. Taken again
    /// after a second, so lines follow a step of the wall clock within a second.
    base: Option<(Instant, u64)>,
}

/// How long a [`Clock`]'s base serves.
const REBASE_AFTER: Duration = Duration::from_secs(1);

/// Microseconds in `d` (saturating: a duration of centuries does not wrap).
#[inline(always)]
fn micros(d: Duration) -> u64 {
    d.as_secs()
        .saturating_mul(1_000_000)
        .saturating_add(u64::from(d.subsec_micros()))
}

impl Clock {
    /// Writes the wall clock at `at`, or now.
    #[inline]
    fn write_at(&mut self, at: Option<Instant>, out: &mut [u8; TIME_LEN]) {
        let Some(at) = at else {
            return self.write_now(out);
        };
        let wall = match self.base {
            Some((base, wall)) => match at.checked_duration_since(base) {
                Some(since) if since < REBASE_AFTER => wall + micros(since),
                Some(_) => self.rebase(at),
                // Read before the base (a batch's lines after the line that renewed it).
                None => wall.saturating_sub(micros(base.duration_since(at))),
            },
            None => self.rebase(at),
        };
        let second = wall / 1_000_000;
        let millis = (wall % 1_000_000 / 1000) as u32;
        self.write_parts(second, millis, out);
    }

    /// Takes the base at `at` from the clocks read now; returns the wall time at `at`.
    #[cold]
    fn rebase(&mut self, at: Instant) -> u64 {
        let now = Instant::now();
        let wall = micros(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default(),
        );
        let at_wall = wall.saturating_sub(micros(now.saturating_duration_since(at)));
        self.base = Some((at, at_wall));
        at_wall
    }

    /// Writes the wall clock now: read with one `clock_gettime` (the vDSO's, no system call)
    /// and no `Duration` arithmetic (`SystemTime::now` and `duration_since` cost about 300
    /// instructions more); within a second only the milliseconds are computed.
    fn write_now(&mut self, out: &mut [u8; TIME_LEN]) {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid timespec for clock_gettime to fill.
        if unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) } != 0 {
            return self.write(SystemTime::now(), out);
        }
        let second = u64::try_from(ts.tv_sec).unwrap_or(0);
        let millis = u32::try_from(ts.tv_nsec / 1_000_000).unwrap_or(0);
        self.write_parts(second, millis, out);
    }

    fn write(&mut self, now: SystemTime, out: &mut [u8; TIME_LEN]) {
        let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
        self.write_parts(since.as_secs(), since.subsec_millis(), out);
    }

    fn write_parts(&mut self, second: u64, ms: u32, out: &mut [u8; TIME_LEN]) {
        if second != self.second || self.prefix[0] == 0 {
            self.new_second(second);
        }
        out[..19].copy_from_slice(&self.prefix);
        out[19] = b'.';
        out[20..23].copy_from_slice(&DIGITS[(ms % 1000) as usize]);
        out[23] = b'Z';
    }

    #[cold]
    fn new_second(&mut self, second: u64) {
        let text =
            humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(second)).to_string();
        self.prefix.copy_from_slice(&text.as_bytes()[..19]);
        self.second = second;
    }

    #[cfg(test)]
    fn format(&mut self, now: SystemTime) -> [u8; TIME_LEN] {
        let mut out = [0; TIME_LEN];
        self.write(now, &mut out);
        out
    }

    #[cfg(test)]
    fn format_now(&mut self) -> [u8; TIME_LEN] {
        let mut out = [0; TIME_LEN];
        self.write_now(&mut out);
        out
    }
}

/// Where the writer writes.
enum Sink {
    File(File),
    Stderr,
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Sink::File(f) => f.write(buf),
            // Whole, under stderr's lock: never interleaved with the server's own log lines.
            Sink::Stderr => io::stderr().lock().write_all(buf).map(|()| buf.len()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Sink::File(f) => f.flush(),
            Sink::Stderr => io::stderr().flush(),
        }
    }
}

/// The writer thread's state.
struct Writer {
    /// Written to with one `write_all` per batch, unbuffered: a batch is already up to
    /// [`BATCH_BYTES`] of whole lines, and a buffer would only copy it once more.
    out: Sink,
    /// The file's path (`None`: standard error, never reopened).
    path: Option<PathBuf>,
    shared: Arc<Shared>,
    /// A write failed and was reported; the next success is reported too.
    failing: bool,
}

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Message>) {
        loop {
            let message = match rx.try_recv() {
                Ok(m) => m,
                Err(mpsc::TryRecvError::Empty) => {
                    // Nothing waiting: what was written reaches its destination now.
                    self.flush();
                    match rx.recv() {
                        Ok(m) => m,
                        Err(_) => return self.flush(),
                    }
                }
                Err(mpsc::TryRecvError::Disconnected) => return self.flush(),
            };
            match message {
                Message::Lines(lines, n) => {
                    if self.failing {
                        // The failed write may have ended mid-line: start on a line of our
                        // own, so only that one line is torn.
                        let _ = self.out.write_all(b"\n");
                    }
                    let result = self.out.write_all(&lines);
                    self.shared.give_back(lines);
                    self.shared.queued.fetch_sub(n, Ordering::AcqRel);
                    self.report(result, n);
                }
                Message::Reopen => self.reopen(),
                Message::Stop(done) => {
                    self.flush();
                    let _ = done.send(());
                    return;
                }
            }
        }
    }

    fn flush(&mut self) {
        let result = self.out.flush();
        self.report(result, 0);
    }

    /// Counts lines a failed write lost and says so once per run of failures.
    fn report(&mut self, result: io::Result<()>, lines: usize) {
        match result {
            Ok(()) if self.failing => {
                self.failing = false;
                tracing::info!("access log: writing again");
            }
            Ok(()) => {}
            Err(e) => {
                self.shared.count_dropped(lines);
                if !self.failing {
                    self.failing = true;
                    tracing::error!(error = %e, "access log: write failed; lines are dropped and counted in wharf_access_log_dropped_total");
                }
            }
        }
    }

    fn reopen(&mut self) {
        let Some(path) = self.path.clone() else {
            return;
        };
        // Every batch handed over before is written (or, failing, counted as dropped): the
        // old file holds whole lines only.
        self.flush();
        match open_path(&path) {
            Ok(file) => {
                self.out = Sink::File(file);
                tracing::info!(path = %path.display(), "access log reopened");
            }
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "access log: cannot reopen; still writing to the file open before")
            }
        }
    }
}

/// Bytes a connection moved, counted by its [`Metered`](crate::metered::Metered) transport
/// for its access log line.
#[derive(Default, Debug)]
pub struct ConnBytes {
    /// Read from the client.
    pub received: Cell<u64>,
    /// Written to the client.
    pub sent: Cell<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(format: AccessLogFormat, fill: impl FnOnce(&mut Fields<'_>)) -> String {
        let mut out = Vec::new();
        fill(&mut Fields {
            out: &mut out,
            format,
        });
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn json_values_escape_quotes_backslashes_and_control_characters() {
        let got = line(AccessLogFormat::Json, |f| {
            f.str("a", "x\"y\\z\n\r\t\u{1b}[31m\u{7f}\u{85}\u{2028}é");
            f.u64("n", 42);
            f.i64("s", -3);
        });
        assert_eq!(
            got,
            ",\"a\":\"x\\\"y\\\\z\\n\\r\\t\\u001b[31m\\u007f\\u0085\\u2028é\",\"n\":42,\"s\":-3"
        );
        let parsed: serde_json::Value =
            serde_json::from_str(&format!("{{{}}}", &got[1..])).unwrap();
        assert_eq!(parsed["a"], "x\"y\\z\n\r\t\u{1b}[31m\u{7f}\u{85}\u{2028}é");
    }

    #[test]
    fn invisible_formatting_characters_are_escaped() {
        let mut out = Vec::new();
        escape_into(&mut out, "a\u{202e}b\u{200b}c\u{feff}d\u{2066}e");
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "a\\u202eb\\u200bc\\ufeffd\\u2066e"
        );
    }

    #[test]
    fn logfmt_quotes_only_what_needs_it() {
        let got = line(AccessLogFormat::Logfmt, |f| {
            f.str("plain", "/a/b.txt");
            f.str("space", "a b");
            f.str("eq", "k=v");
            f.str("empty", "");
            f.str("quote", "say \"hi\"\nnext=1");
            f.str("utf8", "é");
        });
        assert_eq!(
            got,
            " plain=/a/b.txt space=\"a b\" eq=\"k=v\" empty=\"\" quote=\"say \\\"hi\\\"\\nnext=1\" \
             utf8=\"é\""
        );
    }

    #[test]
    fn the_word_scans_agree_with_the_byte_table_for_every_byte_and_position() {
        // The 8-byte scans against the definition, one byte at a time: each byte value at
        // each position of a value long enough for two words and a remainder.
        let mut value = [b'a'; 19];
        for position in 0..value.len() {
            for byte in 0..=255u8 {
                value[position] = byte;
                let json = value
                    .iter()
                    .all(|&b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\');
                let logfmt = value
                    .iter()
                    .all(|&b| b.is_ascii_graphic() && b != b'"' && b != b'=' && b != b'\\');
                assert_eq!(plain_json(&value), json, "byte {byte:#x} at {position}");
                assert_eq!(plain_logfmt(&value), logfmt, "byte {byte:#x} at {position}");
            }
            value[position] = b'a';
        }
    }

    #[test]
    fn appends_of_every_short_length_copy_exactly() {
        let source: Vec<u8> = (0..40u8).collect();
        for first in 0..=source.len() {
            for second in [0, 1, 2, 3, 4, 7, 8, 9, 15, 16, 17, 33] {
                let mut out = b"x".to_vec();
                append!(&mut out, [&source[..first], b"-", &source[..second]]);
                let mut expected = b"x".to_vec();
                expected.extend_from_slice(&source[..first]);
                expected.push(b'-');
                expected.extend_from_slice(&source[..second]);
                assert_eq!(out, expected, "{first} then {second}");
            }
        }
    }

    #[test]
    fn numbers_are_written_whole_on_both_sides_of_the_fast_path() {
        let got = line(AccessLogFormat::Json, |f| {
            for n in [0, 7, 10, 99, 100, 200, 999, 1000, 65_535, u64::MAX] {
                f.u64("n", n);
            }
            f.i64("s", i64::MIN);
        });
        assert_eq!(
            got,
            ",\"n\":0,\"n\":7,\"n\":10,\"n\":99,\"n\":100,\"n\":200,\"n\":999,\"n\":1000,\
             \"n\":65535,\"n\":18446744073709551615,\"s\":-9223372036854775808"
        );
    }

    #[test]
    fn a_line_is_its_service_head_the_time_and_the_fields_in_both_formats() {
        for format in [AccessLogFormat::Json, AccessLogFormat::Logfmt] {
            let path = temp_path(&format!("shape-{format:?}.log"));
            let _ = std::fs::remove_file(&path);
            let cfg = config(&path, format, 100);
            let log = AccessLog::start(&cfg, open(&cfg).unwrap()).unwrap();
            let service = log
                .for_service("web", "http-hello", &["ok", "2xx"], true)
                .unwrap();
            let who = Who {
                client: crate::Peer::Ip("[::1]:4000".parse().unwrap()),
                proxy: None,
                identity: Some("bob smith"),
            };
            let conn = service.who(&who);
            service.request(&conn, "ok", Duration::from_micros(1_234), |f| {
                f.str("method", "GET");
                f.str("target", "/a b");
                f.u64("status", 200);
            });
            service.connection(&conn, ConnOutcome::Timeout, Duration::from_secs(3), 5, 6);
            service.refused(&who, "per_source");
            flush_thread();
            log.stop(Duration::from_secs(5));
            let text = std::fs::read_to_string(&path).unwrap();
            let lines: Vec<&str> = text.lines().collect();
            assert_eq!(lines.len(), 3, "{text}");
            let (start, time_at) = match format {
                AccessLogFormat::Json => ("{\"time\":\"", 9),
                AccessLogFormat::Logfmt => ("time=", 5),
            };
            let mut rests = Vec::new();
            for l in &lines {
                assert!(l.starts_with(start), "{l}");
                let time = &l[time_at..time_at + TIME_LEN];
                humantime::parse_rfc3339(time).unwrap();
                rests.push(&l[time_at + TIME_LEN..]);
            }
            let expected: [&str; 3] = match format {
                AccessLogFormat::Json => [
                    "\",\"event\":\"request\",\"service\":\"web\",\"plugin\":\"http-hello\",\
                     \"client\":\"[::1]:4000\",\"identity\":\"bob smith\",\"outcome\":\"ok\",\
                     \"duration_ms\":1.234,\"method\":\"GET\",\"target\":\"/a b\",\"status\":200}",
                    "\",\"event\":\"connection\",\"service\":\"web\",\"plugin\":\"http-hello\",\
                     \"client\":\"[::1]:4000\",\"identity\":\"bob smith\",\"outcome\":\"timeout\",\
                     \"bytes_in\":5,\"bytes_out\":6,\"duration_ms\":3000.000}",
                    "\",\"event\":\"connection\",\"service\":\"web\",\"plugin\":\"http-hello\",\
                     \"client\":\"[::1]:4000\",\"identity\":\"bob smith\",\"outcome\":\"refused\",\
                     \"reason\":\"per_source\"}",
                ],
                AccessLogFormat::Logfmt => [
                    " event=request service=web plugin=http-hello client=[::1]:4000 \
                     identity=\"bob smith\" outcome=ok duration_ms=1.234 method=GET \
                     target=\"/a b\" status=200",
                    " event=connection service=web plugin=http-hello client=[::1]:4000 \
                     identity=\"bob smith\" outcome=timeout bytes_in=5 bytes_out=6 \
                     duration_ms=3000.000",
                    " event=connection service=web plugin=http-hello client=[::1]:4000 \
                     identity=\"bob smith\" outcome=refused reason=per_source",
                ],
            };
            assert_eq!(rests, expected);
            if format == AccessLogFormat::Json {
                for l in &lines {
                    serde_json::from_str::<serde_json::Value>(l).unwrap();
                }
            }
            let _ = std::fs::remove_file(&path);
        }
    }

    #[test]
    fn long_values_are_cut_at_a_character_boundary() {
        let long = "é".repeat(MAX_VALUE_BYTES);
        let got = line(AccessLogFormat::Json, |f| f.str("v", &long));
        let value = got.trim_start_matches(",\"v\":\"").trim_end_matches('"');
        assert!(value.ends_with("..."));
        assert_eq!(value.len(), MAX_VALUE_BYTES + 3);
    }

    #[test]
    fn durations_are_milliseconds_to_the_microsecond() {
        let got = line(AccessLogFormat::Logfmt, |f| {
            f.duration("d", Duration::from_micros(1_234_567));
            f.duration("z", Duration::ZERO);
        });
        assert_eq!(got, " d=1234.567 z=0.000");
    }

    #[test]
    fn the_clock_writes_rfc3339_with_milliseconds() {
        let mut clock = Clock::default();
        let t = UNIX_EPOCH + Duration::from_millis(1_764_556_684_007);
        assert_eq!(&clock.format(t), b"2025-12-01T02:38:04.007Z");
        let later = t + Duration::from_millis(1_999);
        assert_eq!(&clock.format(later), b"2025-12-01T02:38:06.006Z");
        // The fast path reads the same clock.
        let before = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let now = clock.format_now();
        let text = std::str::from_utf8(&now).unwrap();
        let second = humantime::parse_rfc3339(&format!("{}Z", &text[..19])).unwrap();
        let second = second.duration_since(UNIX_EPOCH).unwrap().as_secs();
        assert!(second >= before && second <= before + 2, "{text}");
    }

    #[test]
    fn an_instant_is_told_as_the_wall_clock_at_it() {
        let millis = |text: [u8; TIME_LEN]| -> i64 {
            let t = humantime::parse_rfc3339(std::str::from_utf8(&text).unwrap()).unwrap();
            t.duration_since(UNIX_EPOCH).unwrap().as_millis() as i64
        };
        let mut clock = Clock::default();
        let at = |clock: &mut Clock, instant: Instant| {
            let mut out = [0; TIME_LEN];
            clock.write_at(Some(instant), &mut out);
            millis(out)
        };
        let now = Instant::now();
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        // The first instant is the base; the next is within a second after it; then one
        // past that second (the base is taken again), and two before the new base.
        let cases = [3000, 2500, 0, 1200, 500];
        for ms_ago in cases {
            let told = at(&mut clock, now - Duration::from_millis(ms_ago));
            let expected = wall - ms_ago as i64;
            // The two clocks are read a moment apart, on a machine that may be busy.
            assert!(
                (told - expected).abs() <= 20,
                "{ms_ago} ms ago: told {told}, expected {expected}"
            );
        }
        // Without an instant: now.
        let mut out = [0; TIME_LEN];
        clock.write_at(None, &mut out);
        assert!((millis(out) - wall).abs() <= 1000, "{}", millis(out) - wall);
    }

    #[test]
    fn a_declared_outcome_is_written_as_any_other_value() {
        // The same requests through a service that declares the outcomes (their fields
        // rendered once) and one that does not (each checked and escaped per line).
        for format in [AccessLogFormat::Json, AccessLogFormat::Logfmt] {
            let path = temp_path(&format!("outcomes-{format:?}.log"));
            let _ = std::fs::remove_file(&path);
            let cfg = config(&path, format, 100);
            let log = AccessLog::start(&cfg, open(&cfg).unwrap()).unwrap();
            const OUTCOMES: &[&str] = &["ok", "needs quoting=\"yes\"", ""];
            let declared = log.for_service("s", "p", OUTCOMES, true).unwrap();
            let undeclared = log.for_service("s", "p", &[], true).unwrap();
            let who = Who {
                client: Peer::Ip("127.0.0.1:4000".parse().unwrap()),
                proxy: None,
                identity: None,
            };
            for service in [&declared, &undeclared] {
                let conn = service.who(&who);
                for &outcome in OUTCOMES {
                    service.request(&conn, outcome, Duration::from_micros(7), |f| f.u64("n", 1));
                }
            }
            flush_thread();
            log.stop(Duration::from_secs(5));
            let text = std::fs::read_to_string(&path).unwrap();
            let rests: Vec<&str> = text
                .lines()
                .map(|l| &l[l.find("event").unwrap()..])
                .collect();
            assert_eq!(rests.len(), 2 * OUTCOMES.len(), "{text}");
            let (a, b) = rests.split_at(OUTCOMES.len());
            assert_eq!(a, b);
            let quoted = match format {
                AccessLogFormat::Json => "\"outcome\":\"needs quoting=\\\"yes\\\"\"",
                AccessLogFormat::Logfmt => "outcome=\"needs quoting=\\\"yes\\\"\"",
            };
            assert!(a[1].contains(quoted), "{}", a[1]);
            let _ = std::fs::remove_file(&path);
        }
    }

    #[test]
    fn a_line_longer_than_a_batch_buffer_is_written_whole() {
        let path = temp_path("long-line.log");
        let _ = std::fs::remove_file(&path);
        let cfg = config(&path, AccessLogFormat::Json, 100);
        let log = AccessLog::start(&cfg, open(&cfg).unwrap()).unwrap();
        let service = log.for_service("s", "p", &[], true).unwrap();
        let who = service.who(&Who {
            client: Peer::Ip("127.0.0.1:4000".parse().unwrap()),
            proxy: None,
            identity: None,
        });
        let value = "v".repeat(MAX_VALUE_BYTES);
        let fields = BATCH_CAPACITY / MAX_VALUE_BYTES + 10;
        for _ in 0..3 {
            service.request(&who, "ok", Duration::ZERO, |f| {
                for _ in 0..fields {
                    f.str("v", &value);
                }
            });
        }
        flush_thread();
        log.stop(Duration::from_secs(5));
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 3);
        for l in text.lines() {
            assert!(l.len() > BATCH_CAPACITY, "{}", l.len());
            serde_json::from_str::<serde_json::Value>(l).unwrap();
        }
        let _ = std::fs::remove_file(&path);
    }

    fn config(path: &Path, format: AccessLogFormat, buffer_lines: usize) -> AccessLogConfig {
        AccessLogConfig {
            path: path.to_path_buf(),
            format,
            buffer_lines,
        }
    }

    fn temp_path(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("wharf-access-{}-{name}", std::process::id()))
    }

    #[test]
    fn lines_reach_the_file_whole_across_a_reopen() {
        let path = temp_path("reopen.log");
        let rotated = path.with_extension("log.1");
        let _ = std::fs::remove_file(&path);
        let _ = std::fs::remove_file(&rotated);
        let cfg = config(&path, AccessLogFormat::Json, 1000);
        let log = AccessLog::start(&cfg, open(&cfg).unwrap()).unwrap();
        let service = log
            .for_service("web", "http-hello", &["ok", "2xx"], true)
            .unwrap();
        let who = Who {
            client: Peer::Ip("127.0.0.1:4000".parse().unwrap()),
            proxy: Some(Peer::Ip("10.0.0.1:5000".parse().unwrap())),
            identity: Some("alice"),
        };
        let who = service.who(&who);
        for i in 0..10 {
            service.request(&who, "2xx", Duration::from_micros(5), |f| f.u64("i", i));
        }
        flush_thread();
        std::thread::sleep(Duration::from_millis(100));
        std::fs::rename(&path, &rotated).unwrap();
        log.reopen();
        service.connection(&who, ConnOutcome::Closed, Duration::from_millis(2), 10, 20);
        log.stop(Duration::from_secs(5));
        let old = std::fs::read_to_string(&rotated).unwrap();
        let new = std::fs::read_to_string(&path).unwrap();
        assert_eq!(old.lines().count(), 10, "{old}");
        assert_eq!(new.lines().count(), 1, "{new}");
        for l in old.lines().chain(new.lines()) {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            assert_eq!(v["service"], "web");
            assert_eq!(v["client"], "127.0.0.1:4000");
            assert_eq!(v["proxy"], "10.0.0.1:5000");
            assert_eq!(v["identity"], "alice");
        }
        let v: serde_json::Value = serde_json::from_str(new.trim()).unwrap();
        assert_eq!(v["event"], "connection");
        assert_eq!(v["bytes_in"], 10);
        assert_eq!(v["bytes_out"], 20);
        assert_eq!(v["duration_ms"], 2.0);
        let _ = std::fs::remove_file(&path);
        let _ = std::fs::remove_file(&rotated);
    }

    #[test]
    fn a_writer_that_is_behind_makes_lines_drop_never_wait() {
        // A FIFO nobody reads: the writer blocks on it at once.
        let path = temp_path("stuck.fifo");
        let _ = std::fs::remove_file(&path);
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: mkfifo(3) on a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        // A reader that never reads, so opening for writing does not wait.
        let reader = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&path)
            .unwrap();
        let cfg = config(&path, AccessLogFormat::Logfmt, 8);
        let log = AccessLog::start(&cfg, open(&cfg).unwrap()).unwrap();
        let service = log.for_service("echo", "echo", &[], true).unwrap();
        let who = Who {
            client: Peer::Ip("[::1]:4000".parse().unwrap()),
            proxy: None,
            identity: None,
        };
        let who = service.who(&who);
        let big = "x".repeat(MAX_VALUE_BYTES);
        let started = std::time::Instant::now();
        for _ in 0..2000 {
            service.request(&who, "ok", Duration::ZERO, |f| f.str("pad", &big));
        }
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(log.dropped() > 0);
        drop(reader);
        let _ = std::fs::remove_file(&path);
    }

    use std::os::unix::fs::OpenOptionsExt;
}
