//! Responses, prebuilt: everything but the `Date` header is rendered once per service, and the
//! `Date` value once per second per worker thread, then copied into the output buffer.

use std::cell::RefCell;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::request::{Status, ALLOW};

/// The 200 response of a service, split around the per-request parts.
pub struct Responses {
    /// Status line and fixed headers, up to (excluding) `Date`.
    ok_head: Vec<u8>,
    body: Vec<u8>,
}

/// What the response says about the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Persistence {
    /// HTTP/1.1 default: say nothing.
    Default,
    /// An HTTP/1.0 client asked for keep-alive: confirm it.
    KeepAlive,
    /// The connection closes after this response.
    Close,
}

impl Responses {
    /// Prebuilds the response for `body` with `content_type`.
    pub fn new(body: &str, content_type: &str) -> Self {
        let ok_head = format!(
            "HTTP/1.1 200 OK\r\nServer: wharf\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n",
            body.len()
        )
        .into_bytes();
        Responses {
            ok_head,
            body: body.as_bytes().to_vec(),
        }
    }

    /// The longest 200 response [`Responses::push_ok`] appends.
    pub fn max_len(&self) -> usize {
        let date = "Date: ".len() + DATE_LEN + 2;
        let persistence = "Connection: keep-alive\r\n\r\n".len();
        self.ok_head.len() + date + persistence + self.body.len()
    }

    /// Appends a 200 response.
    pub fn push_ok(
        &self,
        out: &mut Vec<u8>,
        date: &[u8],
        persistence: Persistence,
        head_only: bool,
    ) {
        out.extend_from_slice(&self.ok_head);
        push_date(out, date);
        out.extend_from_slice(match persistence {
            Persistence::Default => b"\r\n".as_slice(),
            Persistence::KeepAlive => b"Connection: keep-alive\r\n\r\n",
            Persistence::Close => b"Connection: close\r\n\r\n",
        });
        if !head_only {
            out.extend_from_slice(&self.body);
        }
    }
}

/// Appends an error response; the connection closes after it.
pub fn push_error(out: &mut Vec<u8>, date: &[u8], status: Status) {
    let line = status.line();
    let body_len = line.len() + 1;
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(line.as_bytes());
    out.extend_from_slice(b"\r\nServer: wharf\r\nContent-Type: text/plain\r\nContent-Length: ");
    out.extend_from_slice(body_len.to_string().as_bytes());
    out.extend_from_slice(b"\r\n");
    if status == Status::MethodNotAllowed {
        // RFC 9110 §15.5.6: a 405 says what is allowed.
        out.extend_from_slice(b"Allow: ");
        out.extend_from_slice(ALLOW.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    push_date(out, date);
    out.extend_from_slice(b"Connection: close\r\n\r\n");
    out.extend_from_slice(line.as_bytes());
    out.push(b'\n');
}

fn push_date(out: &mut Vec<u8>, date: &[u8]) {
    out.extend_from_slice(b"Date: ");
    out.extend_from_slice(date);
    out.extend_from_slice(b"\r\n");
}

/// An RFC 7231 IMF-fixdate is always 29 bytes.
const DATE_LEN: usize = 29;

thread_local! {
    /// (unix second it was rendered for, the rendered value), per worker thread.
    static DATE: RefCell<(u64, [u8; DATE_LEN])> = const { RefCell::new((u64::MAX, [0; DATE_LEN])) };
}

/// Runs `f` with the current `Date` value, re-rendering it only when the second changed.
pub fn with_date<R>(f: impl FnOnce(&[u8]) -> R) -> R {
    let now = SystemTime::now();
    let second = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    DATE.with(|cell| {
        let mut cached = cell.borrow_mut();
        if cached.0 != second {
            let rendered = httpdate::fmt_http_date(now);
            if rendered.len() == DATE_LEN {
                cached.1.copy_from_slice(rendered.as_bytes());
                cached.0 = second;
            }
        }
        f(&cached.1)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn date_is_rfc7231_and_cached() {
        let a = with_date(|d| d.to_vec());
        assert_eq!(a.len(), DATE_LEN);
        assert!(a.ends_with(b" GMT"));
        assert!(httpdate::parse_http_date(std::str::from_utf8(&a).unwrap()).is_ok());
    }

    #[test]
    fn responses_are_well_formed() {
        let r = Responses::new("Hello, World", "text/plain");
        let mut out = Vec::new();
        r.push_ok(
            &mut out,
            b"Thu, 01 Jan 1970 00:00:00 GMT",
            Persistence::KeepAlive,
            false,
        );
        assert_eq!(out.len(), r.max_len());
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(text.contains("Content-Length: 12\r\n"));
        assert!(text.contains("Connection: keep-alive\r\n\r\nHello, World"));
        let error = |status| {
            let mut out = Vec::new();
            push_error(&mut out, b"Thu, 01 Jan 1970 00:00:00 GMT", status);
            String::from_utf8(out).unwrap()
        };
        let text = error(Status::PayloadTooLarge);
        assert!(text.starts_with("HTTP/1.1 413 Content Too Large\r\n"));
        assert!(text.contains("Content-Length: 22\r\n"), "{text}");
        assert!(
            text.ends_with("Connection: close\r\n\r\n413 Content Too Large\n"),
            "{text}"
        );
        assert!(!text.contains("Allow:"), "{text}");
        let text = error(Status::MethodNotAllowed);
        assert!(text.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"));
        assert!(text.contains(&format!("\r\nAllow: {ALLOW}\r\n")), "{text}");
    }
}
