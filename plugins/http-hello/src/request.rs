//! Request heads: what one parsed request means for the connection.
//!
//! httparse does the parsing straight from the read buffer (no copies); this module applies
//! HTTP/1.1 message rules on top: persistence (RFC 9112 §9.3), body framing (§6.3: chunked
//! wins, `Transfer-Encoding` with `Content-Length` is refused, conflicting lengths are refused),
//! `Host` required in HTTP/1.1, and the size limit of the head.

/// Largest request head accepted (request line plus headers); larger is 431.
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
}

impl Status {
    /// Status line reason.
    pub fn line(self) -> &'static str {
        match self {
            Status::BadRequest => "400 Bad Request",
            Status::RequestTimeout => "408 Request Timeout",
            Status::PayloadTooLarge => "413 Content Too Large",
            Status::HeaderFieldsTooLarge => "431 Request Header Fields Too Large",
        }
    }
}

/// Parses the request head at the start of `buf`: `Ok(None)` if it is not complete yet.
pub fn parse(buf: &[u8]) -> Result<Option<Head>, Status> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) if len <= MAX_HEAD => len,
        Ok(httparse::Status::Complete(_)) => return Err(Status::HeaderFieldsTooLarge),
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
            return Err(Status::HeaderFieldsTooLarge)
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(Status::HeaderFieldsTooLarge),
        Err(_) => return Err(Status::BadRequest),
    };
    let http10 = req.version == Some(0);
    let head_only = req.method == Some("HEAD");

    let mut close = false;
    let mut keep_alive_token = false;
    let mut length: Option<u64> = None;
    let mut chunked = false;
    let mut transfer_encoding = false;
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
            transfer_encoding = true;
            // Only the final coding decides framing; it must be chunked (RFC 9112 §6.3).
            let last = h.value.rsplit(|&b| b == b',').next().unwrap_or_default();
            chunked = last.trim_ascii().eq_ignore_ascii_case(b"chunked");
        } else if name.eq_ignore_ascii_case("host") {
            if has_host {
                return Err(Status::BadRequest); // RFC 9112 §3.2: exactly one Host
            }
            has_host = true;
        } else if name.eq_ignore_ascii_case("expect") {
            expect_continue = h.value.trim_ascii().eq_ignore_ascii_case(b"100-continue");
        }
    }
    // Ambiguous framing is how requests get smuggled: refuse it.
    if transfer_encoding && (length.is_some() || !chunked || http10) {
        return Err(Status::BadRequest);
    }
    if !http10 && !has_host {
        return Err(Status::BadRequest);
    }
    let body = match (chunked, length) {
        (true, _) => Body::Chunked,
        (false, Some(n)) if n > 0 => Body::Length(n),
        _ => Body::None,
    };
    Ok(Some(Head {
        len,
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
        let h = head("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n");
        assert_eq!(h.unwrap().unwrap().body, Body::Chunked);
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
        assert_eq!(
            head("GET / HTTP/2.0\r\nHost: x\r\n\r\n"),
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
}
