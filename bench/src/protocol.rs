//! The four protocols as the load generator speaks them: what one request is, and how to tell
//! that its response is complete and correct.
//!
//! Each response is read by an [`Exchange`], a state machine fed with whatever bytes have
//! arrived. It never blocks and never touches a socket, so the load loop stays the same for
//! every protocol and every parser here is unit-tested with byte slices split at every point.
//!
//! Two kinds of "wrong" are kept apart, because a user reads them differently:
//! - a [`Violation`]: the bytes do not follow the protocol (a server bug, or the wrong server
//!   at that address). The connection cannot be trusted any more and is closed.
//! - a failure ([`Done::failure`]): a well-formed answer that says no (HTTP 404, `ERR no such
//!   file`, a refused or failing command). Counted as an error, the connection is reused.

use wharf_core::md5::{hex, Md5};

/// Which protocol a workload speaks (the `wharf bench <protocol>` word).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// The echo plugin: send `--size` bytes, expect them back (as sent, or uppercased).
    Echo,
    /// HTTP/1.1 keep-alive GET of `--path`.
    Http,
    /// The exec plugin: run `--command`, read its result.
    Exec,
    /// The file-get plugin: download `--path` (size, ack, bytes, MD5 trailer).
    Get,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Echo => "echo",
            Protocol::Http => "http",
            Protocol::Exec => "exec",
            Protocol::Get => "get",
        }
    }

    /// Whether requests can be sent back to back before their answers (echo and HTTP). The
    /// command protocols wait for the client's acknowledgement in the middle of each answer.
    pub fn pipelines(self) -> bool {
        matches!(self, Protocol::Echo | Protocol::Http)
    }
}

/// Largest HTTP response head accepted (less than the load engine's read buffer).
pub const MAX_HTTP_HEAD: usize = 32 * 1024;
/// Bytes kept from the start of an exec result (a refusal is one short line)...
const RESULT_HEAD: usize = 256;
/// ...and from its end (where the `[exit status N]` line is, after any cut note).
const RESULT_TAIL: usize = 512;
/// Largest `ERR ...` line accepted from file-get.
const MAX_ERR_LINE: usize = 4096;
/// What file-get sends in the digest slot when the file changed during the transfer.
const FILE_CHANGED: &[u8] = wharf_plugin_file_get::CHANGED.as_bytes();

/// What a benchmark sends, prepared once and shared by every connection.
#[derive(Debug, Clone)]
pub struct Workload {
    pub protocol: Protocol,
    /// The bytes of one request.
    request: Vec<u8>,
    /// Echo: the request uppercased (the `upper` transform answers that).
    upper: Vec<u8>,
    /// Get: check the MD5 of every body (costs about one core per 500 MB/s).
    verify: bool,
}

impl Workload {
    /// `size` bytes of lowercase text (so `transform = "upper"` changes every byte).
    pub fn echo(size: usize) -> Workload {
        let request: Vec<u8> = (0..size)
            .map(|i| b"abcdefghijklmnopqrstuvwxyz0123456789"[i % 36])
            .collect();
        let upper = request.to_ascii_uppercase();
        Workload {
            protocol: Protocol::Echo,
            request,
            upper,
            verify: false,
        }
    }

    /// A keep-alive `GET path` with `Host: host`.
    pub fn http(host: &str, path: &str) -> Workload {
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: wharf-bench\r\n\r\n");
        Workload::with_request(Protocol::Http, request.into_bytes())
    }

    /// One exec command line.
    pub fn exec(command: &str) -> Workload {
        Workload::with_request(Protocol::Exec, format!("{command}\n").into_bytes())
    }

    /// A download of `path`; with `verify`, every body is checked against its MD5 trailer.
    pub fn get(path: &str, verify: bool) -> Workload {
        let mut w = Workload::with_request(Protocol::Get, format!("get {path}\n").into_bytes());
        w.verify = verify;
        w
    }

    fn with_request(protocol: Protocol, request: Vec<u8>) -> Workload {
        Workload {
            protocol,
            request,
            upper: Vec::new(),
            verify: false,
        }
    }

    /// The bytes of one request.
    pub fn request(&self) -> &[u8] {
        &self.request
    }

    /// A reader for the next response.
    pub fn exchange(&self) -> Exchange {
        Exchange {
            state: match self.protocol {
                Protocol::Echo => State::Echo { matched: 0 },
                Protocol::Http => State::HttpHead,
                Protocol::Exec | Protocol::Get => State::Size,
            },
            hasher: None,
        }
    }
}

/// The bytes broke the protocol; the connection is closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation(pub String);

/// What feeding bytes to an [`Exchange`] led to.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// The response goes on: read more.
    NeedMore,
    /// The server announced a size and waits: send [`ACK`], then read more.
    SendAck,
    /// The response is complete.
    Done(Done),
}

/// The acknowledgement the command protocols expect between the size and the body.
pub const ACK: &[u8] = b"ok\n";

/// A complete response.
#[derive(Debug, PartialEq, Eq)]
pub struct Done {
    /// Why the answer counts as an error, when it does (`http 404`, `ERR no such file`...).
    pub failure: Option<String>,
    /// The server will close the connection after this response (HTTP `Connection: close`).
    pub close: bool,
}

impl Done {
    fn ok() -> Step {
        Step::Done(Done {
            failure: None,
            close: false,
        })
    }

    fn failed(why: String) -> Step {
        Step::Done(Done {
            failure: Some(why),
            close: false,
        })
    }
}

/// Reads one response; [`Workload::exchange`] makes one per request.
pub struct Exchange {
    state: State,
    /// Get with `verify`: the MD5 of the body so far.
    hasher: Option<Md5>,
}

enum State {
    /// Echo: how many bytes of the answer have come back.
    Echo { matched: usize },
    /// HTTP: waiting for the whole head.
    HttpHead,
    /// HTTP: inside the body.
    HttpBody {
        remaining: u64,
        status: u16,
        close: bool,
    },
    /// Exec / get: waiting for the size (or `ERR ...`).
    Size,
    /// Exec: inside the result; its first and last bytes are kept to classify it.
    Result {
        remaining: u64,
        total: u64,
        head: Vec<u8>,
        tail: Vec<u8>,
    },
    /// Get: inside the file's bytes.
    FileBody { remaining: u64 },
    /// Get: reading the 32-digit MD5 slot.
    Digest { got: Vec<u8> },
}

impl Exchange {
    /// Feeds the bytes that have arrived (a response may start with bytes left over from the
    /// previous one). Returns how many were consumed, and what to do next. Unconsumed bytes
    /// must be offered again, with more after them.
    pub fn feed(&mut self, work: &Workload, input: &[u8]) -> Result<(usize, Step), Violation> {
        match &mut self.state {
            State::Echo { matched } => {
                let n = input.len().min(work.request.len() - *matched);
                let got = &input[..n];
                let range = *matched..*matched + n;
                if got != &work.request[range.clone()] && got != &work.upper[range] {
                    let at = got
                        .iter()
                        .zip(&work.request[*matched..])
                        .zip(&work.upper[*matched..])
                        .position(|((g, a), b)| g != a && g != b)
                        .unwrap_or(0);
                    return Err(Violation(format!(
                        "echo answered {:?} at byte {} of {}, expected {:?}",
                        got[at] as char,
                        *matched + at,
                        work.request.len(),
                        work.request[*matched + at] as char
                    )));
                }
                *matched += n;
                let step = if *matched == work.request.len() {
                    Done::ok()
                } else {
                    Step::NeedMore
                };
                Ok((n, step))
            }
            State::HttpHead => self.http_head(input),
            State::HttpBody {
                remaining,
                status,
                close,
            } => {
                let n = (input.len() as u64).min(*remaining);
                *remaining -= n;
                let step = if *remaining == 0 {
                    http_done(*status, *close)
                } else {
                    Step::NeedMore
                };
                Ok((n as usize, step))
            }
            State::Size => self.size(work, input),
            State::Result {
                remaining,
                total,
                head,
                tail,
            } => {
                let n = (input.len() as u64).min(*remaining);
                let bytes = &input[..n as usize];
                let room = RESULT_HEAD.saturating_sub(head.len()).min(bytes.len());
                head.extend_from_slice(&bytes[..room]);
                tail.extend_from_slice(bytes);
                if tail.len() > 2 * RESULT_TAIL {
                    tail.drain(..tail.len() - RESULT_TAIL);
                }
                *remaining -= n;
                if *remaining > 0 {
                    return Ok((n as usize, Step::NeedMore));
                }
                let step = match result_failure(head, tail, *total) {
                    None => Done::ok(),
                    Some(why) => Done::failed(why),
                };
                Ok((n as usize, step))
            }
            State::FileBody { remaining } => {
                let n = (input.len() as u64).min(*remaining);
                if let Some(h) = &mut self.hasher {
                    h.update(&input[..n as usize]);
                }
                *remaining -= n;
                if *remaining == 0 {
                    self.state = State::Digest {
                        got: Vec::with_capacity(32),
                    };
                }
                Ok((n as usize, Step::NeedMore))
            }
            State::Digest { got } => {
                // Lowercase hex never starts with 'E': an 'E' starts `ERR file changed`.
                let first = got.first().or(input.first());
                let want = if first == Some(&b'E') {
                    FILE_CHANGED.len()
                } else {
                    32
                };
                let n = input.len().min(want - got.len());
                got.extend_from_slice(&input[..n]);
                if got.len() < want {
                    return Ok((n, Step::NeedMore));
                }
                if got.starts_with(b"ERR") {
                    if got[..] != *FILE_CHANGED {
                        return Err(Violation(format!(
                            "digest slot holds {:?}",
                            String::from_utf8_lossy(got)
                        )));
                    }
                    return Ok((n, Done::failed("file changed during the transfer".into())));
                }
                if !got.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
                    return Err(Violation(format!(
                        "digest slot holds {:?}, not 32 lowercase hex digits",
                        String::from_utf8_lossy(got)
                    )));
                }
                if let Some(h) = self.hasher.take() {
                    let digest = hex(&h.digest());
                    if digest.as_bytes() != &got[..] {
                        return Err(Violation(format!(
                            "MD5 mismatch: the server sent {}, the bytes hash to {digest}",
                            String::from_utf8_lossy(got)
                        )));
                    }
                }
                Ok((n, Done::ok()))
            }
        }
    }

    fn http_head(&mut self, input: &[u8]) -> Result<(usize, Step), Violation> {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut response = httparse::Response::new(&mut headers);
        let head_len = match response.parse(input) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) if input.len() > MAX_HTTP_HEAD => {
                return Err(Violation(format!(
                    "HTTP response head longer than {MAX_HTTP_HEAD} bytes"
                )))
            }
            Ok(httparse::Status::Partial) => return Ok((0, Step::NeedMore)),
            Err(e) => return Err(Violation(format!("malformed HTTP response: {e}"))),
        };
        let status = response.code.unwrap_or(0);
        if (100..=199).contains(&status) && status != 101 {
            // An interim response (100 Continue...): the final one follows.
            return Ok((head_len, Step::NeedMore));
        }
        let mut length = None;
        let mut close = response.version == Some(0);
        for h in response.headers.iter() {
            if h.name.eq_ignore_ascii_case("content-length") {
                let value = std::str::from_utf8(h.value)
                    .ok()
                    .and_then(|v| v.trim().parse::<u64>().ok());
                match value {
                    Some(v) => length = Some(v),
                    None => return Err(Violation("unparseable Content-Length".into())),
                }
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                return Err(Violation(
                    "chunked HTTP responses are not supported: the server must send Content-Length"
                        .into(),
                ));
            } else if h.name.eq_ignore_ascii_case("connection") {
                let v = h.value.to_ascii_lowercase();
                if v.windows(5).any(|w| w == b"close") {
                    close = true;
                } else if v.windows(10).any(|w| w == b"keep-alive") {
                    close = false;
                }
            }
        }
        // 101, 204 and 304 have no body; anything else must say how long it is.
        let length = match (status, length) {
            (101 | 204 | 304, _) => 0,
            (_, Some(len)) => len,
            (_, None) => {
                return Err(Violation(format!(
                    "HTTP {status} response without Content-Length"
                )))
            }
        };
        if length == 0 {
            return Ok((head_len, http_done(status, close)));
        }
        self.state = State::HttpBody {
            remaining: length,
            status,
            close,
        };
        Ok((head_len, Step::NeedMore))
    }

    fn size(&mut self, work: &Workload, input: &[u8]) -> Result<(usize, Step), Violation> {
        if input.is_empty() {
            return Ok((0, Step::NeedMore));
        }
        if input.starts_with(b"ERR") || (input.len() < 3 && b"ERR".starts_with(input)) {
            // file-get's error line: read it whole.
            return match input.iter().position(|&b| b == b'\n') {
                Some(end) => {
                    let text = String::from_utf8_lossy(&input[..end])
                        .trim_end()
                        .to_string();
                    Ok((end + 1, Done::failed(text)))
                }
                None if input.len() > MAX_ERR_LINE => {
                    Err(Violation("ERR line without an end".into()))
                }
                None => Ok((0, Step::NeedMore)),
            };
        }
        // A size has no terminator, and the server then waits for the acknowledgement: the
        // digits that have arrived are the size (as for the tutorial's clients).
        let digits = input.iter().take_while(|b| b.is_ascii_digit()).count();
        if digits != input.len() || digits > 20 {
            return Err(Violation(format!(
                "expected a size, got {:?}",
                String::from_utf8_lossy(&input[..input.len().min(64)])
            )));
        }
        let size: u64 = std::str::from_utf8(input)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| {
                Violation(format!(
                    "size out of range: {}",
                    String::from_utf8_lossy(input)
                ))
            })?;
        self.state = match work.protocol {
            Protocol::Get => {
                if work.verify {
                    self.hasher = Some(Md5::new());
                }
                if size == 0 {
                    State::Digest {
                        got: Vec::with_capacity(32),
                    }
                } else {
                    State::FileBody { remaining: size }
                }
            }
            _ => State::Result {
                remaining: size,
                total: size,
                head: Vec::new(),
                tail: Vec::new(),
            },
        };
        Ok((input.len(), Step::SendAck))
    }

    /// Exec results of zero bytes are complete once acknowledged (never produced by wharf,
    /// which always says something, but a valid frame).
    pub fn complete_without_bytes(&mut self) -> Option<Step> {
        match &self.state {
            State::Result { remaining: 0, .. } => Some(Done::ok()),
            _ => None,
        }
    }
}

/// Why an exec result counts as an error, from the status line wharf appends to it (the last
/// line) or from a refusal (the whole result is one line with a refusal prefix).
fn result_failure(head: &[u8], tail: &[u8], total: u64) -> Option<String> {
    let tail = String::from_utf8_lossy(tail);
    let last = tail.trim_end().lines().last().unwrap_or("");
    if let Some(n) = last
        .strip_prefix("[exit status ")
        .and_then(|r| r.strip_suffix(']'))
    {
        return Some(format!("command exit status {n}"));
    }
    if let Some(n) = last
        .strip_prefix("[killed by signal ")
        .and_then(|r| r.strip_suffix(']'))
    {
        return Some(format!("command killed by signal {n}"));
    }
    if last.starts_with("[timed out after ") {
        return Some("command timed out".into());
    }
    let whole = String::from_utf8_lossy(head);
    if total == head.len() as u64 && whole.trim_end().lines().count() == 1 {
        if let Some(r) = wharf_plugin_exec::refusals::ALL
            .iter()
            .find(|r| whole.starts_with(**r))
        {
            return Some(format!("refused: {}", r.trim_end_matches([' ', ':'])));
        }
    }
    None
}

fn http_done(status: u16, close: bool) -> Step {
    Step::Done(Done {
        failure: (!(200..400).contains(&status)).then(|| format!("http {status}")),
        close,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `parts` in order, the way a connection would (each part is what one read
    /// returns; unconsumed bytes are offered again with the next part). Returns the completed
    /// responses and the number of acknowledgements sent.
    fn run(work: &Workload, parts: &[&[u8]]) -> Result<(Vec<Done>, usize), Violation> {
        let mut ex = work.exchange();
        let mut pending: Vec<u8> = Vec::new();
        let mut done = Vec::new();
        let mut acks = 0;
        for part in parts {
            pending.extend_from_slice(part);
            loop {
                let (n, step) = ex.feed(work, &pending)?;
                pending.drain(..n);
                match step {
                    Step::NeedMore if n == 0 || pending.is_empty() => break,
                    Step::NeedMore => {}
                    Step::SendAck => {
                        acks += 1;
                        if let Some(Step::Done(d)) = ex.complete_without_bytes() {
                            done.push(d);
                            ex = work.exchange();
                        }
                    }
                    Step::Done(d) => {
                        done.push(d);
                        ex = work.exchange();
                        if pending.is_empty() {
                            break;
                        }
                    }
                }
            }
        }
        Ok((done, acks))
    }

    /// `head` arrives alone (a size: the server then waits for the acknowledgement), then
    /// `rest` split at every point; every split must give the same result.
    fn every_split(work: &Workload, head: &[u8], rest: &[u8]) -> (Vec<Done>, usize) {
        let first = run(work, &[head, rest]).unwrap();
        for split in 0..=rest.len() {
            let got = run(work, &[head, &rest[..split], &rest[split..]]).unwrap();
            assert_eq!(got, first, "split at {split}");
        }
        first
    }

    fn ok() -> Done {
        Done {
            failure: None,
            close: false,
        }
    }

    fn failed(why: &str) -> Done {
        Done {
            failure: Some(why.into()),
            close: false,
        }
    }

    #[test]
    fn echo_accepts_the_payload_as_sent_or_uppercased_and_pipelined() {
        let work = Workload::echo(40);
        assert_eq!(work.request().len(), 40);
        let mut answers = work.request().to_vec();
        answers.extend_from_slice(&work.request().to_ascii_uppercase());
        assert_eq!(every_split(&work, b"", &answers), (vec![ok(), ok()], 0));
    }

    #[test]
    fn echo_names_the_first_wrong_byte() {
        let work = Workload::echo(10);
        let mut answer = work.request().to_vec();
        answer[7] = b'!';
        let err = run(&work, &[&answer]).unwrap_err();
        assert!(err.0.contains("at byte 7 of 10"), "{}", err.0);
    }

    #[test]
    fn http_reads_pipelined_responses_and_classifies_status_and_close() {
        let work = Workload::http("127.0.0.1:8080", "/");
        assert!(work
            .request()
            .starts_with(b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"));
        let responses = b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\nHello, World\
HTTP/1.1 404 Not Found\r\ncontent-length: 3\r\n\r\nno!\
HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n\
HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
        let (done, acks) = every_split(&work, b"", responses);
        assert_eq!(acks, 0);
        assert_eq!(
            done,
            vec![
                ok(),
                failed("http 404"),
                ok(),
                Done {
                    failure: None,
                    close: true
                }
            ]
        );
        let http10 = b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n";
        assert!(run(&work, &[http10]).unwrap().0[0].close);
    }

    #[test]
    fn http_violations_are_named() {
        let work = Workload::http("h", "/");
        for (response, expect) in [
            (&b"SSH-2.0-OpenSSH\r\n\r\n"[..], "malformed HTTP response"),
            (b"HTTP/1.1 200 OK\r\n\r\n", "without Content-Length"),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                "chunked",
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
                "Content-Length",
            ),
        ] {
            let err = run(&work, &[response]).unwrap_err();
            assert!(err.0.contains(expect), "{} does not say {expect}", err.0);
        }
        let endless = vec![b'a'; MAX_HTTP_HEAD + 10];
        let mut head = b"HTTP/1.1 200 OK\r\nX: ".to_vec();
        head.extend_from_slice(&endless);
        assert!(run(&work, &[&head]).unwrap_err().0.contains("longer than"));
    }

    #[test]
    fn exec_acks_the_size_and_classifies_the_result() {
        let work = Workload::exec("date");
        assert_eq!(work.request(), b"date\n");
        assert_eq!(every_split(&work, b"5", b"hello"), (vec![ok()], 1));
        let failing = b"oops\n[exit status 3]\n";
        assert_eq!(
            every_split(&work, b"21", failing),
            (vec![failed("command exit status 3")], 1)
        );
        let refusal = b"command not allowed: rm";
        assert_eq!(
            run(&work, &[b"23", refusal]).unwrap().0,
            vec![failed("refused: command not allowed")]
        );
        // The status line comes last, after output longer than what is kept of it.
        let mut long = vec![b'y'; 3 * 1024 * 1024];
        long.extend_from_slice(b"\n[output cut at 1048576 bytes]\n[timed out after 10s]\n");
        let size = long.len().to_string();
        assert_eq!(
            run(&work, &[size.as_bytes(), &long]).unwrap().0,
            vec![failed("command timed out")]
        );
        // A command's own exit status 124 is not a timeout, nor 126 a refusal.
        for status in ["124", "126", "130"] {
            let result = format!("out\n[exit status {status}]\n");
            let size = result.len().to_string();
            assert_eq!(
                run(&work, &[size.as_bytes(), result.as_bytes()]).unwrap().0,
                vec![failed(&format!("command exit status {status}"))]
            );
        }
        let signal = b"[killed by signal 9]\n";
        assert_eq!(
            run(&work, &[b"21", signal]).unwrap().0,
            vec![failed("command killed by signal 9")]
        );
        assert_eq!(run(&work, &[b"0"]).unwrap(), (vec![ok()], 1));
        assert!(run(&work, &[b"12x"])
            .unwrap_err()
            .0
            .contains("expected a size"));
    }

    #[test]
    fn get_reads_body_and_digest_and_verifies_when_asked() {
        let body = b"hello world\n";
        let digest = hex(&Md5::of(body));
        let size = body.len().to_string();
        let mut rest = body.to_vec();
        rest.extend_from_slice(digest.as_bytes());
        for verify in [false, true] {
            let work = Workload::get("a.txt", verify);
            assert_eq!(work.request(), b"get a.txt\n");
            assert_eq!(every_split(&work, size.as_bytes(), &rest), (vec![ok()], 1));
        }
        let mut torn = rest.clone();
        torn[0] ^= 1;
        let verified = run(&Workload::get("a.txt", true), &[size.as_bytes(), &torn]);
        assert!(verified.unwrap_err().0.contains("MD5 mismatch"));
        let unverified = run(&Workload::get("a.txt", false), &[size.as_bytes(), &torn]);
        assert_eq!(unverified.unwrap().0, vec![ok()]);

        let work = Workload::get("a.txt", false);
        assert_eq!(
            every_split(&work, b"", b"ERR no such file\n"),
            (vec![failed("ERR no such file")], 0)
        );
        let mut changed = b"abc".to_vec();
        changed.extend_from_slice(FILE_CHANGED);
        assert_eq!(
            every_split(&work, b"3", &changed),
            (vec![failed("file changed during the transfer")], 1)
        );
        let empty = hex(&Md5::of(b""));
        assert_eq!(every_split(&work, b"0", empty.as_bytes()), (vec![ok()], 1));
        let bad_digest = b"xZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZ";
        assert!(run(&work, &[b"1", bad_digest])
            .unwrap_err()
            .0
            .contains("hex"));
    }
}
