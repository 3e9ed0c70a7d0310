//! The http-hello plugin: a real HTTP/1.1 server that answers every request with one body.
//!
//! Built for speed the way hyper and may-minihttp are: requests are parsed in place from the
//! read buffer with httparse, the complete requests of one read are answered into one output
//! buffer and written with one write (pipelining costs one syscall per batch), responses are
//! prebuilt except for `Date`, which is rendered once per second per worker.
//!
//! The output buffer is bounded: a batch stops once it holds [`OUT_BATCH`] bytes (at least one
//! response), the rest of the input waits for the next pass after the write, and the buffer
//! shrinks back to [`OUT_IDLE`] bytes once the client stops streaming. 16 KiB of pipelined
//! requests would otherwise become ~80 KiB of responses held per connection (much more with a
//! larger body), kept for as long as the connection stays open.
//!
//! Protocol rules (docs/protocols.md, http-hello): keep-alive by default in HTTP/1.1,
//! `Connection: close` honoured, HTTP/1.0 closes unless it asks for keep-alive, HEAD gets
//! headers only, bodies (Content-Length or chunked) are read and discarded up to `max_body`
//! (413 above), malformed requests get 400 (an invalid `Host` or request-target included), heads
//! over 8 KiB get 431 (414 if the request line alone is), HTTP/1.x with an unknown minor
//! version is answered as HTTP/1.1, other major versions get 505, CONNECT and TRACE get 405, a
//! transfer coding other than chunked gets 501,
//! and a head that does not arrive within `header_timeout` of its first byte gets 408; each
//! error closes the connection. A client that half-closes (shuts down its sending side) after
//! its requests is still answered: only the end of its input is seen, not a disconnect.
//!
//! With the access log on, each answered request's line carries `method`, `target` (its path:
//! the query string is never logged, it often holds secrets) and `status`. The lines of a
//! batch are written once its responses are, from where the method and path are in the input,
//! which is consumed only then (`RequestLog`): nothing is copied per request.

mod body;
mod request;
mod response;

use std::io;
use std::ops::Range;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use wharf_core::{buffer, Conn, Context, Elapsed, OptionDoc, Plugin, PluginError, Service};

use body::Discard;
use request::{Body, Status};
use response::{push_error, with_date, Persistence, Responses};

/// After a response that closes the connection, how long unread input is drained so the
/// client receives the response instead of a reset.
const LINGER: Duration = Duration::from_secs(2);

/// Bytes of responses one batch stops at (more only if a single response is larger).
pub const OUT_BATCH: usize = 16 * 1024;
/// Capacity of the output buffer while the client is not streaming.
pub const OUT_IDLE: usize = 4096;

/// `[services.<name>.options]` of an http-hello service.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpHelloOptions {
    /// Response body.
    pub body: String,
    /// `Content-Type` of the response.
    pub content_type: String,
    /// Largest request body read (and discarded); larger is 413.
    pub max_body: u64,
    /// Time from a request head's first byte to its end before 408.
    #[serde(with = "humantime_serde")]
    pub header_timeout: Duration,
}

impl Default for HttpHelloOptions {
    fn default() -> Self {
        HttpHelloOptions {
            body: "Hello, World".into(),
            content_type: "text/plain".into(),
            max_body: 1024 * 1024,
            header_timeout: Duration::from_secs(10),
        }
    }
}

/// An http-hello service.
pub struct HttpHello {
    responses: Responses,
    max_body: u64,
    header_timeout: Duration,
}

/// `outcome` label values, by status class.
const OK: &str = "2xx";
const CLIENT_ERROR: &str = "4xx";
const SERVER_ERROR: &str = "5xx";

/// The `outcome` label of an error response.
fn outcome(status: Status) -> &'static str {
    if status.is_server_error() {
        SERVER_ERROR
    } else {
        CLIENT_ERROR
    }
}

impl HttpHello {
    /// A service answering with `options.body`.
    pub fn new(options: &HttpHelloOptions) -> Self {
        HttpHello {
            responses: Responses::new(&options.body, &options.content_type),
            max_body: options.max_body,
            header_timeout: options.header_timeout,
        }
    }
}

/// What one connection is in the middle of.
struct Session {
    /// The body being discarded, and the response owed once it is consumed.
    body: Option<(Discard, Pending)>,
    /// When the first byte of the current incomplete head arrived.
    head_started: Option<Instant>,
    /// The access log's notes, when the service writes one.
    log: Option<RequestLog>,
}

/// The requests of one batch as the access log will tell them, once their responses are
/// written: where their method and path are in the input (still unconsumed until the batch's
/// lines are written, so nothing is copied), and their statuses.
#[derive(Default)]
struct RequestLog {
    notes: Vec<Note>,
    /// Methods and paths of requests whose head came in an earlier read (answered once their
    /// body was consumed): the input they were read in is gone by then.
    held_text: Vec<u8>,
    /// Method and path of the request whose body is being discarded, split at
    /// `held_method`.
    held: Vec<u8>,
    held_method: usize,
}

/// One answered request: where its method and path are (empty when the request could not be
/// parsed), and its status.
struct Note {
    method: Range<u32>,
    target: Range<u32>,
    /// In [`RequestLog::held_text`] rather than in the batch's input.
    held: bool,
    status: u16,
}

/// `start..end` as a compact range (inputs are bounded far below 4 GiB: see
/// `wharf_core::buffer`).
fn range(start: usize, end: usize) -> Range<u32> {
    let narrow = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
    narrow(start)..narrow(end)
}

/// What of a request target the access log keeps: the path alone. The query string and
/// `;` path parameters often carry secrets (tokens, session ids), and an absolute-form target
/// (`http://user:password@host/path`) names credentials and a host: only its path is kept.
fn loggable_path(target: &[u8]) -> &[u8] {
    match loggable_range(target) {
        Some((start, end)) => &target[start..end],
        None => b"/",
    }
}

/// Where [`loggable_path`] is in `target`; `None` for an absolute-form target without a path
/// (whose path is `/`).
fn loggable_range(target: &[u8]) -> Option<(usize, usize)> {
    let absolute = (target.first() != Some(&b'/'))
        .then(|| target.windows(3).position(|w| w == b"://"))
        .flatten();
    let start = match absolute {
        Some(scheme_end) => {
            let rest = scheme_end + 3;
            match target[rest..].iter().position(|&b| b == b'/') {
                Some(slash) => rest + slash,
                None => return None,
            }
        }
        None => 0,
    };
    let end = target[start..]
        .iter()
        .position(|&b| matches!(b, b'?' | b';' | b'#'))
        .map_or(target.len(), |n| start + n);
    Some((start, end))
}

impl RequestLog {
    /// Notes a request answered with `status` whose head, parsed at `at` in `input`, is
    /// `head`: where its method and path are, no copy.
    fn note(&mut self, input: &[u8], at: usize, head: &request::Head, status: u16) {
        let target = &input[at + head.target.0..at + head.target.1];
        let Some((start, end)) = loggable_range(target) else {
            // The path is a `/` the input does not hold.
            let method = &input[at + head.method.0..at + head.method.1];
            return self.note_text(method, b"/", status);
        };
        let target = at + head.target.0;
        self.notes.push(Note {
            method: range(at + head.method.0, at + head.method.1),
            target: range(target + start, target + end),
            held: false,
            status,
        });
    }

    /// Notes a request that could not be parsed, answered with `status`.
    fn note_unparsed(&mut self, status: u16) {
        self.notes.push(Note {
            method: 0..0,
            target: 0..0,
            held: false,
            status,
        });
    }

    /// Notes a request whose method and path are copied into [`RequestLog::held_text`].
    fn note_text(&mut self, method: &[u8], path: &[u8], status: u16) {
        let start = self.held_text.len();
        self.held_text.extend_from_slice(method);
        let middle = self.held_text.len();
        self.held_text.extend_from_slice(path);
        self.notes.push(Note {
            method: range(start, middle),
            target: range(middle, self.held_text.len()),
            held: true,
            status,
        });
    }

    /// Keeps the method and path of a request whose response waits for its body (its input
    /// is consumed before the body ends).
    fn hold(&mut self, input: &[u8], at: usize, head: &request::Head) {
        let target = &input[at + head.target.0..at + head.target.1];
        self.held.clear();
        self.held
            .extend_from_slice(&input[at + head.method.0..at + head.method.1]);
        self.held_method = self.held.len();
        self.held.extend_from_slice(loggable_path(target));
    }

    /// Notes the held request, answered with `status`.
    fn note_held(&mut self, status: u16) {
        let held = std::mem::take(&mut self.held);
        let (method, path) = held.split_at(self.held_method);
        self.note_text(method, path, status);
        self.held = held;
    }

    /// Records every noted request (its metrics and its line), then forgets them. `input`
    /// is what the batch was answered from.
    fn record(&mut self, cx: &Context, input: &[u8], elapsed: Elapsed) {
        let held_text = &self.held_text;
        let text = |held: bool, r: &Range<u32>| {
            let source = if held { &held_text[..] } else { input };
            source
                .get(r.start as usize..r.end as usize)
                .unwrap_or_default()
        };
        for note in self.notes.drain(..) {
            let outcome = match note.status {
                200..=399 => OK,
                500.. => SERVER_ERROR,
                _ => CLIENT_ERROR,
            };
            cx.record_request_with(outcome, elapsed, |f| {
                if !note.method.is_empty() {
                    // Not UTF-8 (the parser lets obs-text through in a target): logged as `?`.
                    f.bytes("method", text(note.held, &note.method));
                    f.bytes("target", text(note.held, &note.target));
                }
                f.u64("status", note.status.into());
            });
        }
        self.held_text.clear();
    }
}

/// A response owed for a request whose body is still arriving.
#[derive(Clone, Copy)]
struct Pending {
    persistence: Persistence,
    head_only: bool,
}

/// The result of answering everything answerable in the buffer.
struct Batch {
    /// Bytes of input consumed.
    consumed: usize,
    /// 2xx responses appended.
    ok: usize,
    /// The error response appended, if any; the connection then closes.
    error: Option<Status>,
    /// A response that closes the connection was appended.
    close: bool,
    /// Stopped at [`OUT_BATCH`]: complete requests may remain in the input.
    full: bool,
}

impl HttpHello {
    /// Answers every complete request at the start of `input`, appending responses to `out`.
    fn answer(&self, session: &mut Session, input: &[u8], out: &mut Vec<u8>, date: &[u8]) -> Batch {
        let mut batch = Batch {
            consumed: 0,
            ok: 0,
            error: None,
            close: false,
            full: false,
        };
        let fail = |batch: &mut Batch, out: &mut Vec<u8>, log: &mut Option<RequestLog>, status| {
            push_error(out, date, status);
            batch.error = Some(status);
            batch.close = true;
            if let Some(log) = log {
                log.note_unparsed(Status::code(status));
            }
        };
        loop {
            if let Some((discard, pending)) = &mut session.body {
                match discard.feed(&input[batch.consumed..]) {
                    Ok(n) => batch.consumed += n,
                    Err(status) => {
                        fail(&mut batch, out, &mut session.log, status);
                        return batch;
                    }
                }
                if !discard.is_done() {
                    return batch;
                }
                let pending = *pending;
                session.body = None;
                self.responses
                    .push_ok(out, date, pending.persistence, pending.head_only);
                batch.ok += 1;
                if let Some(log) = &mut session.log {
                    log.note_held(200);
                }
                if pending.persistence == Persistence::Close {
                    batch.close = true;
                    return batch;
                }
            }
            let rest = &input[batch.consumed..];
            if rest.is_empty() {
                return batch;
            }
            if !out.is_empty() && out.len() + self.responses.max_len() > OUT_BATCH {
                batch.full = true;
                return batch;
            }
            let head = match request::parse(rest) {
                Ok(Some(head)) => head,
                Ok(None) => {
                    session.head_started.get_or_insert_with(Instant::now);
                    return batch;
                }
                Err(status) => {
                    fail(&mut batch, out, &mut session.log, status);
                    return batch;
                }
            };
            session.head_started = None;
            let at = batch.consumed;
            batch.consumed += head.len;
            let persistence = match (head.keep_alive, head.http10) {
                (false, _) => Persistence::Close,
                (true, true) => Persistence::KeepAlive,
                (true, false) => Persistence::Default,
            };
            let pending = Pending {
                persistence,
                head_only: head.head_only,
            };
            let discard = match head.body {
                Body::None => None,
                Body::Length(n) => match Discard::length(n, self.max_body) {
                    Ok(d) => Some(d),
                    Err(status) => {
                        fail(&mut batch, out, &mut session.log, status);
                        return batch;
                    }
                },
                Body::Chunked => Some(Discard::chunked(self.max_body)),
            };
            match discard {
                Some(discard) => {
                    if head.expect_continue && batch.consumed == input.len() {
                        out.extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
                    }
                    session.body = Some((discard, pending));
                    if let Some(log) = &mut session.log {
                        log.hold(input, at, &head);
                    }
                }
                None => {
                    self.responses
                        .push_ok(out, date, persistence, head.head_only);
                    batch.ok += 1;
                    if let Some(log) = &mut session.log {
                        log.note(input, at, &head, 200);
                    }
                    if persistence == Persistence::Close {
                        batch.close = true;
                        return batch;
                    }
                }
            }
        }
    }
}

#[wharf_core::async_trait(?Send)]
impl Service for HttpHello {
    async fn serve<C: Conn + 'static>(&self, mut conn: C, cx: &Context) -> io::Result<()> {
        // Small while the client is quiet, large while it streams (see wharf_core::buffer).
        let mut input: Vec<u8> = Vec::with_capacity(buffer::IDLE);
        let mut out: Vec<u8> = Vec::with_capacity(OUT_IDLE);
        let mut session = Session {
            body: None,
            head_started: None,
            log: cx.logs_requests().then(RequestLog::default),
        };
        loop {
            // Read, bounded by the header timeout while a head is incomplete.
            let between_requests =
                session.body.is_none() && session.head_started.is_none() && input.is_empty();
            let room = input.capacity() - input.len();
            let (res, buf) = match session.head_started {
                // Between requests a shutdown may close the connection (keep-alive drain).
                None if between_requests => cx.read_idle(&mut conn, input).await,
                None => conn.read(input).await,
                Some(started) => {
                    let read = conn.read(input);
                    match tokio::time::timeout_at(started + self.header_timeout, read).await {
                        Ok(done) => done,
                        Err(_) => {
                            let mut out = Vec::new();
                            with_date(|date| push_error(&mut out, date, Status::RequestTimeout));
                            let (res, _) = conn.write_all(out).await;
                            cx.record_request_with(CLIENT_ERROR, self.header_timeout, |f| {
                                f.u64("status", Status::RequestTimeout.code().into());
                            });
                            res?;
                            conn.shutdown().await?;
                            return linger(&mut conn).await;
                        }
                    }
                }
            };
            input = buf;
            let n = res?;
            if n == 0 {
                // The client is done (or gave up mid-request): nothing left to answer.
                return conn.shutdown().await;
            }
            let arrived = std::time::Instant::now();

            // Answer what arrived, at most OUT_BATCH bytes of responses per write.
            loop {
                out.clear();
                let batch = with_date(|date| self.answer(&mut session, &input, &mut out, date));
                if !out.is_empty() {
                    let (res, buf) = conn.write_all(out).await;
                    out = buf;
                    res?;
                }
                // One clock read for the batch: the durations, and the lines' time.
                let elapsed = Elapsed::since(arrived);
                match &mut session.log {
                    Some(log) => log.record(cx, &input, elapsed),
                    None => {
                        for _ in 0..batch.ok {
                            cx.record_request(OK, elapsed);
                        }
                        if let Some(status) = batch.error {
                            cx.record_request(outcome(status), elapsed);
                        }
                    }
                }
                if batch.close {
                    conn.shutdown().await?;
                    return linger(&mut conn).await;
                }
                input.drain(..batch.consumed);
                if !batch.full {
                    break;
                }
            }
            // A short read: the client is not streaming, so the connection may now idle.
            if n < room && out.capacity() > OUT_IDLE {
                out = Vec::with_capacity(OUT_IDLE);
            }
            buffer::size_for_next_read(&mut input, n, room);
        }
    }
}

/// Reads and discards what the client still sends, briefly, after our final response: closing
/// a socket with unread input makes the kernel send a reset that can destroy that response.
async fn linger<C: Conn>(conn: &mut C) -> io::Result<()> {
    let deadline = Instant::now() + LINGER;
    let mut buf = Vec::with_capacity(4096);
    loop {
        buf.clear();
        match tokio::time::timeout_at(deadline, conn.read(buf)).await {
            Ok((Ok(n), b)) if n > 0 => buf = b,
            _ => return Ok(()),
        }
    }
}

impl Plugin for HttpHello {
    const NAME: &'static str = "http-hello";
    const DESCRIPTION: &'static str =
        "minimal HTTP/1.1 server (keep-alive, pipelining) answering every request with one body";
    const OPTIONS: &'static [OptionDoc] = &[
        OptionDoc {
            name: "body",
            kind: "string",
            help: "the response body",
        },
        OptionDoc {
            name: "content_type",
            kind: "string",
            help: "the Content-Type header of the response",
        },
        OptionDoc {
            name: "max_body",
            kind: "integer (bytes)",
            help: "largest request body read and discarded; larger gets 413",
        },
        OptionDoc {
            name: "header_timeout",
            kind: "duration",
            help: "time from a request head's first byte to its end before 408",
        },
    ];
    const OUTCOMES: &'static [&'static str] = &[OK, CLIENT_ERROR, SERVER_ERROR];
    const ALPN: &'static [&'static str] = &["http/1.1"];
    type Options = HttpHelloOptions;

    fn build(options: HttpHelloOptions) -> Result<Self, PluginError> {
        if options.content_type.is_empty()
            || options.content_type.bytes().any(|b| b.is_ascii_control())
        {
            return Err(PluginError::option(
                "content_type",
                "must be a non-empty header value without control characters",
            ));
        }
        if options.header_timeout.is_zero() {
            return Err(PluginError::option(
                "header_timeout",
                "must be more than 0s",
            ));
        }
        Ok(HttpHello::new(&options))
    }
}

#[cfg(test)]
mod tests;
