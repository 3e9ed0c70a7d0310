//! Request heads: what one parsed request means for the connection.
//!
//! httparse does the parsing straight from the read buffer (no copies); this module applies
//! HTTP/1.1 message rules on top: persistence (RFC 9112 §9.3), body framing (§6.3: chunked
//! wins, `Transfer-Encoding` with `Content-Length` is refused, conflicting lengths are refused),
//! `Host` required in HTTP/1.1 and valid (§3.2), the request-target's form (§3.2: `*` only for
//! OPTIONS), and the size limit of the head. Where RFC 9112 leaves a choice, the answer is
//! nginx's: 501 for a transfer coding other than chunked, 405 for CONNECT and TRACE (this is
//! neither a proxy nor a server that can reflect a request). A request line over the head limit
//! is 414 (RFC 9112 §3), an unknown minor version of HTTP/1 is processed as HTTP/1.1 (RFC 9110
//! §2.5), and any other major version is 505, as nginx does.

/// Largest request head accepted (request line plus headers); larger is 431, or 414 when the
/// request line alone is.
pub const MAX_HEAD: usize = 8 * 1024;
/// Most header fields accepted; more is 431.
const MAX_HEADERS: usize = 64;

/// How the request's body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    /// No body.
    None,
    /// `Content-Length: n`.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

/// A complete request head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    /// Bytes the head occupies in the buffer.
    pub len: usize,
    /// Whether the connection stays open after the response.
    pub keep_alive: bool,
    /// HTTP/1.0 request (a kept-alive one must be told so).
    pub http10: bool,
    /// `HEAD`: headers only.
    pub head_only: bool,
    /// Body framing.
    pub body: Body,
    /// `Expect: 100-continue`.
    pub expect_continue: bool,
    /// Where the method is in the buffer parsed, `(start, end)` (for the access log).
    pub method: (usize, usize),
    /// Where the request-target is in the buffer parsed, `(start, end)` (for the access log).
    pub target: (usize, usize),
}

/// Error statuses a head can earn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// 400: malformed request line or headers.
    BadRequest,
    /// 408: the head did not arrive in time.
    RequestTimeout,
    /// 413: body over the limit.
    PayloadTooLarge,
    /// 431: head over [`MAX_HEAD`] or too many header fields.
    HeaderFieldsTooLarge,
    /// 414: the request line alone is over [`MAX_HEAD`].
    UriTooLong,
    /// 405: CONNECT or TRACE, which this server does not do.
    MethodNotAllowed,
    /// 501: a transfer coding other than chunked.
    NotImplemented,
    /// 505: an HTTP major version other than 1.
    VersionNotSupported,
}

impl Status {
    /// The status code.
    pub fn code(self) -> u16 {
        self.line()[..3].parse().unwrap_or(500)
    }

    /// Status line reason.
    pub fn line(self) -> &'static str {
        match self {
            Status::BadRequest => "400 Bad Request",
            Status::RequestTimeout => "408 Request Timeout",
            Status::PayloadTooLarge => "413 Content Too Large",
            Status::HeaderFieldsTooLarge => "431 Request Header Fields Too Large",
            Status::MethodNotAllowed => "405 Method Not Allowed",
            Status::NotImplemented => "501 Not Implemented",
            Status::UriTooLong => "414 URI Too Long",
            Status::VersionNotSupported => "505 HTTP Version Not Supported",
        }
    }

    /// Whether the server, not the client, is the cause (a `5xx`).
    pub fn is_server_error(self) -> bool {
        matches!(self, Status::NotImplemented | Status::VersionNotSupported)
    }
}

/// The `Allow` value of a 405: what this server answers (every method but CONNECT and TRACE;
/// these are the registered ones it knows of).
pub const ALLOW: &str = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS";

/// Parses the request head at the start of `buf`: `Ok(None)` if it is not complete yet.
pub fn parse(buf: &[u8]) -> Result<Option<Head>, Status> {
    match parse_head(buf) {
        Err(Status::BadRequest) => match version(buf) {
            // httparse knows only 1.0 and 1.1: parse a copy of the head that says 1.1.
            Some((b'1', at)) => {
                let mut copy = buf[..buf.len().min(MAX_HEAD + 1)].to_vec();
                copy[at] = b'1';
                parse_head(&copy)
            }
            Some(_) => Err(Status::VersionNotSupported),
            None => Err(Status::BadRequest),
        },
        other => other,
    }
}

/// The request line at the start of `buf` (after the empty lines a server ignores, RFC 9112
/// §2.2), without its line end; all of `buf` if it has no line end yet.
fn request_line(buf: &[u8]) -> &[u8] {
    let start = buf
        .iter()
        .position(|&b| b != b'\r' && b != b'\n')
        .unwrap_or(buf.len());
    let line = &buf[start..];
    let end = line.iter().position(|&b| b == b'\n').unwrap_or(line.len());
    let line = &line[..end];
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// The major version digit of a complete request line ending in `HTTP/<digit>.<digit>`, with
/// the offset of its minor digit in `buf`; `None` for any other line.
fn version(buf: &[u8]) -> Option<(u8, usize)> {
    let line = request_line(buf);
    let offset = line.as_ptr() as usize - buf.as_ptr() as usize;
    let complete = buf
        .get(offset + line.len())
        .is_some_and(|&b| b == b'\r' || b == b'\n');
    match line.split(|&b| b == b' ').next_back()? {
        [b'H', b'T', b'T', b'P', b'/', major, b'.', minor]
            if complete && major.is_ascii_digit() && minor.is_ascii_digit() =>
        {
            Some((*major, offset + line.len() - 1))
        }
        _ => None,
    }
}

/// The status of a head over [`MAX_HEAD`]: 414 if its request line alone is.
fn too_large(buf: &[u8]) -> Status {
    if request_line(buf).len() > MAX_HEAD {
        Status::UriTooLong
    } else {
        Status::HeaderFieldsTooLarge
    }
}

/// [`parse`] for the versions httparse knows.
fn parse_head(buf: &[u8]) -> Result<Option<Head>, Status> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) if len <= MAX_HEAD => len,
        Ok(httparse::Status::Complete(_)) => return Err(too_large(buf)),
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => return Err(too_large(buf)),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(Status::HeaderFieldsTooLarge),
        Err(_) => return Err(Status::BadRequest),
    };
    let http10 = req.version == Some(0);
    let head_only = req.method == Some("HEAD");

    let mut close = false;
    let mut keep_alive_token = false;
    let mut length: Option<u64> = None;
    let mut codings = Codings::default();
    let mut has_host = false;
    let mut expect_continue = false;
    for h in req.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("connection") {
            for token in h.value.split(|&b| b == b',') {
                let token = token.trim_ascii();
                close |= token.eq_ignore_ascii_case(b"close");
                keep_alive_token |= token.eq_ignore_ascii_case(b"keep-alive");
            }
        } else if name.eq_ignore_ascii_case("content-length") {
            let n = parse_length(h.value).ok_or(Status::BadRequest)?;
            if length.is_some_and(|prev| prev != n) {
                return Err(Status::BadRequest);
            }
            length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            codings.add(h.value);
        } else if name.eq_ignore_ascii_case("host") {
            // RFC 9112 §3.2: exactly one Host, with a valid value.
            if has_host || !valid_host(h.value) {
                return Err(Status::BadRequest);
            }
            has_host = true;
        } else if name.eq_ignore_ascii_case("expect") {
            expect_continue = h.value.trim_ascii().eq_ignore_ascii_case(b"100-continue");
        }
    }
    if !http10 && !has_host {
        return Err(Status::BadRequest);
    }
    let chunked = codings.present;
    if codings.present {
        // Ambiguous framing is how requests get smuggled: refuse it (RFC 9112 §6.3: the final
        // coding must be chunked, applied once, and never next to Content-Length).
        if length.is_some() || http10 || !codings.last_chunked || codings.chunked > 1 {
            return Err(Status::BadRequest);
        }
        // RFC 9112 §6.1: a coding we do not implement is 501 (so is it for nginx).
        if codings.other {
            return Err(Status::NotImplemented);
        }
    }
    let method = req.method.unwrap_or_default();
    if method == "CONNECT" || method == "TRACE" {
        return Err(Status::MethodNotAllowed);
    }
    if !valid_target(method, req.path.unwrap_or_default()) {
        return Err(Status::BadRequest);
    }
    // Both point into `buf` (httparse parses in place).
    let at = |s: &str| match (s.as_ptr() as usize).checked_sub(buf.as_ptr() as usize) {
        Some(start) if start + s.len() <= buf.len() => (start, start + s.len()),
        _ => (0, 0),
    };
    let (method, target) = (at(method), at(req.path.unwrap_or_default()));
    let body = match (chunked, length) {
        (true, _) => Body::Chunked,
        (false, Some(n)) if n > 0 => Body::Length(n),
        _ => Body::None,
    };
    Ok(Some(Head {
        len,
        method,
        target,
        keep_alive: if http10 {
            keep_alive_token && !close
        } else {
            !close
        },
        http10,
        head_only,
        body,
        expect_continue: expect_continue && !http10 && body != Body::None,
    }))
}

/// The transfer codings of every `Transfer-Encoding` line, in order (RFC 9110 §5.3: the lines
/// form one list).
#[derive(Default)]
struct Codings {
    present: bool,
    /// How many times `chunked` appears.
    chunked: usize,
    /// Whether the final coding is `chunked`.
    last_chunked: bool,
    /// Whether any other coding appears (`identity`, `gzip`, ...).
    other: bool,
}

impl Codings {
    fn add(&mut self, value: &[u8]) {
        self.present = true;
        for coding in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
            if coding.is_empty() {
                continue; // empty list elements do not count (RFC 9110 §5.6.1)
            }
            self.last_chunked = coding.eq_ignore_ascii_case(b"chunked");
            if self.last_chunked {
                self.chunked += 1;
            } else {
                self.other = true;
            }
        }
    }
}

/// RFC 9112 §3.2: `Host = uri-host [ ":" port ]` (RFC 3986 §3.2.2), or empty when the target
/// has no authority. Spaces, `/`, `@`, a second `:` outside brackets are all invalid.
fn valid_host(value: &[u8]) -> bool {
    let value = value.trim_ascii();
    let port = if let Some(literal) = value.strip_prefix(b"[") {
        let Some(end) = literal.iter().position(|&b| b == b']') else {
            return false;
        };
        if !valid_ip_literal(&literal[..end]) {
            return false;
        }
        &literal[end + 1..]
    } else {
        let end = value.iter().position(|&b| b == b':').unwrap_or(value.len());
        if !valid_reg_name(&value[..end]) {
            return false;
        }
        &value[end..]
    };
    match port.split_first() {
        None => true,
        Some((b':', digits)) => digits.iter().all(u8::is_ascii_digit),
        Some(_) => false,
    }
}

/// `unreserved / sub-delims` of RFC 3986.
fn host_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=".contains(&b)
}

/// `reg-name = *( unreserved / pct-encoded / sub-delims )`; an IPv4 address is one too.
fn valid_reg_name(name: &[u8]) -> bool {
    let mut i = 0;
    while i < name.len() {
        if name[i] == b'%' {
            if !name
                .get(i + 1..i + 3)
                .is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit))
            {
                return false;
            }
            i += 3;
        } else if host_char(name[i]) {
            i += 1;
        } else {
            return false;
        }
    }
    true
}

/// Inside `[...]`: an IPv6 address or `IPvFuture = "v" 1*HEXDIG "." 1*( unreserved /
/// sub-delims / ":" )`.
fn valid_ip_literal(literal: &[u8]) -> bool {
    if let Some(future) = literal.strip_prefix(b"v").or(literal.strip_prefix(b"V")) {
        let Some(dot) = future.iter().position(|&b| b == b'.') else {
            return false;
        };
        let (version, rest) = (&future[..dot], &future[dot + 1..]);
        return !version.is_empty()
            && version.iter().all(u8::is_ascii_hexdigit)
            && !rest.is_empty()
            && rest.iter().all(|&b| host_char(b) || b == b':');
    }
    std::str::from_utf8(literal).is_ok_and(|s| s.parse::<std::net::Ipv6Addr>().is_ok())
}

/// RFC 9112 §3.2: origin-form (`/path`) or absolute-form (`scheme:...`) for every method we
/// answer; asterisk-form (`*`) only for OPTIONS. (CONNECT, the only user of authority-form, is
/// refused before.)
fn valid_target(method: &str, target: &str) -> bool {
    match target.as_bytes() {
        [b'/', ..] => true,
        b"*" => method == "OPTIONS",
        [first, rest @ ..] if first.is_ascii_alphabetic() => {
            let scheme_len = rest
                .iter()
                .position(|&b| !(b.is_ascii_alphanumeric() || b"+-.".contains(&b)));
            scheme_len.is_some_and(|n| rest[n] == b':')
        }
        _ => false,
    }
}

fn parse_length(value: &[u8]) -> Option<u64> {
    let v = value.trim_ascii();
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    v.iter().try_fold(0u64, |n, &d| {
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(s: &str) -> Result<Option<Head>, Status> {
        parse(s.as_bytes())
    }

    #[test]
    fn persistence_rules() {
        let h = head("GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap().unwrap();
        assert!(h.keep_alive && !h.http10 && h.body == Body::None);
        let h = head("GET / HTTP/1.1\r\nHost: x\r\nConnection: Close\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!h.keep_alive);
        let h = head("GET / HTTP/1.0\r\n\r\n").unwrap().unwrap();
        assert!(!h.keep_alive && h.http10);
        let h = head("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(h.keep_alive);
        let h = head("HEAD / HTTP/1.1\r\nHost: x\r\nConnection: TE, close\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(h.head_only && !h.keep_alive);
    }

    #[test]
    fn body_framing() {
        let h = head("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 12\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(h.body, Body::Length(12));
        let h = head("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: Chunked \r\n\r\n");
        assert_eq!(h.unwrap().unwrap().body, Body::Chunked);
        let h = head("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: ,chunked\r\n\r\n");
        assert_eq!(
            h.unwrap().unwrap().body,
            Body::Chunked,
            "empty list elements"
        );
        let h =
            head("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nExpect: 100-continue\r\n\r\n");
        let h = h.unwrap().unwrap();
        assert_eq!((h.body, h.expect_continue), (Body::None, false));
        for bad in [
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: \r\n\r\n",
            "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        ] {
            assert_eq!(head(bad), Err(Status::BadRequest), "{bad:?}");
        }
    }

    #[test]
    fn malformed_and_oversized_heads() {
        assert_eq!(
            head("GET / HTTP/1.1\r\n\r\n"),
            Err(Status::BadRequest),
            "no Host"
        );
        assert_eq!(
            head("GET / HTTP/1.1\r\nHost x\r\n\r\n"),
            Err(Status::BadRequest)
        );
        assert_eq!(
            head("G(T / HTTP/1.1\r\nHost: x\r\n\r\n"),
            Err(Status::BadRequest)
        );
        assert_eq!(head("GET / HTTP/1.1\r\nHost: x\r\n"), Ok(None));
        let big = format!(
            "GET / HTTP/1.1\r\nHost: x\r\nX: {}\r\n",
            "a".repeat(MAX_HEAD)
        );
        assert_eq!(head(&big), Err(Status::HeaderFieldsTooLarge));
        let many: String = (0..100).map(|i| format!("X-{i}: y\r\n")).collect();
        let many = format!("GET / HTTP/1.1\r\nHost: x\r\n{many}\r\n");
        assert_eq!(head(&many), Err(Status::HeaderFieldsTooLarge));
    }

    /// Issue 14: RFC 9112 §3 and RFC 9110 §2.5, as nginx answers.
    #[test]
    fn long_request_lines_and_unknown_versions() {
        let long = format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(8200));
        assert_eq!(head(&long), Err(Status::UriTooLong));
        assert_eq!(
            head(&long[..MAX_HEAD + 10]),
            Err(Status::UriTooLong),
            "no line end yet"
        );
        let long_header = format!("GET / HTTP/1.1\r\nHost: x\r\nX: {}\r\n", "a".repeat(8200));
        assert_eq!(head(&long_header), Err(Status::HeaderFieldsTooLarge));

        let h = head("GET / HTTP/1.2\r\nHost: x\r\n\r\n").unwrap().unwrap();
        assert!(h.keep_alive && !h.http10, "processed as HTTP/1.1");
        assert_eq!(h.len, 27);
        let h =
            head("POST / HTTP/1.9\r\nHost: x\r\nContent-Length: 3\r\nConnection: close\r\n\r\n");
        let h = h.unwrap().unwrap();
        assert_eq!((h.body, h.keep_alive), (Body::Length(3), false));
        assert_eq!(head("GET / HTTP/1.2\r\nHost: x\r\n"), Ok(None));
        assert_eq!(
            head("GET / HTTP/1.2\r\n\r\n"),
            Err(Status::BadRequest),
            "no Host"
        );
        expect_each(
            "GET / {}\r\nHost: x\r\n\r\n",
            &["HTTP/2.0", "HTTP/3.0", "HTTP/0.9", "HTTP/9.9"],
            Some(Status::VersionNotSupported),
        );
        expect_each(
            "GET / {}\r\nHost: x\r\n\r\n",
            &[
                "HTTP/1.12",
                "HTTP/1",
                "HTTP/12.0",
                "HTTP/1.x",
                "http/1.1",
                "HTTP/2.0 x",
            ],
            Some(Status::BadRequest),
        );
        assert!(Status::VersionNotSupported.is_server_error());
        assert!(!Status::UriTooLong.is_server_error());
    }

    /// Parses `template` with `{}` replaced by each case: a complete head for `want` None,
    /// else the error `want`.
    fn expect_each(template: &str, cases: &[&str], want: Option<Status>) {
        for case in cases {
            let req = template.replace("{}", case);
            match want {
                None => assert!(head(&req).is_ok_and(|h| h.is_some()), "{case:?}"),
                Some(status) => assert_eq!(head(&req), Err(status), "{case:?}"),
            }
        }
    }

    #[test]
    fn transfer_codings_other_than_chunked_are_not_implemented() {
        // nginx answers 501 to each; RFC 9112 §6.1 says SHOULD 501.
        expect_each(
            "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: {}\r\n\r\n",
            &[
                "identity, chunked",
                "gzip, chunked",
                "IDENTITY,chunked",
                "identity\r\nTransfer-Encoding: chunked",
            ],
            Some(Status::NotImplemented),
        );
    }

    #[test]
    fn host_values() {
        let template = "GET / HTTP/1.1\r\nHost: {}\r\n\r\n";
        let good = [
            "example.com",
            "example.com:8080",
            "example.com:",
            "127.0.0.1:80",
            "[::1]",
            "[::1]:8080",
            "[v1.fe80::a+en1]",
            "a,b",
            "xn--bcher-kva.example",
            "%41b",
            "",
        ];
        expect_each(template, &good, None);
        let bad = [
            "a b", "a/b@c", "a, b", "a@b", "a:b:c", "a:80x", "[::1", "[::g]", "[v.x]", "%4", "%zz",
            "a\\b", "a?b", "a#b", "[::1]x",
        ];
        expect_each(template, &bad, Some(Status::BadRequest));
    }

    #[test]
    fn request_targets_and_refused_methods() {
        let template = "{}\r\nHost: x\r\n\r\n";
        let good = [
            "GET /a?b HTTP/1.1",
            "GET http://x/a HTTP/1.1",
            "POST https://x:1/ HTTP/1.1",
            "OPTIONS * HTTP/1.1",
            "OPTIONS / HTTP/1.1",
        ];
        expect_each(template, &good, None);
        let bad = [
            "GET * HTTP/1.1",
            "HEAD * HTTP/1.1",
            "GET x HTTP/1.1",
            "GET x.y/z HTTP/1.1",
            "GET 1http://x/ HTTP/1.1",
        ];
        expect_each(template, &bad, Some(Status::BadRequest));
        let refused = [
            "CONNECT x:443 HTTP/1.1",
            "CONNECT / HTTP/1.1",
            "TRACE / HTTP/1.1",
        ];
        expect_each(template, &refused, Some(Status::MethodNotAllowed));
        assert!(Status::NotImplemented.is_server_error());
        assert!(!Status::MethodNotAllowed.is_server_error());
    }
}
