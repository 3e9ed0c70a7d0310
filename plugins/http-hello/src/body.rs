//! Discarding request bodies without buffering them.
//!
//! Bodies are read and thrown away as they arrive (`Content-Length` or chunked), counting
//! toward `max_body`. The chunked decoder is an incremental state machine, so a body split
//! across any number of reads, at any byte, decodes the same.

use crate::request::Status;

/// Longest chunk-size line accepted (hex digits plus extensions).
const MAX_SIZE_LINE: usize = 1024;
/// Largest trailer section accepted.
const MAX_TRAILERS: usize = 8 * 1024;

/// Consumes one request body.
#[derive(Debug)]
pub struct Discard {
    state: State,
    /// Body bytes still allowed before 413.
    budget: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// `remaining` bytes of a Content-Length body.
    Length(u64),
    /// Reading the hex size of the next chunk (`digits` read, `line` bytes of the line so far).
    Size {
        size: u64,
        digits: u8,
        ext: bool,
        line: usize,
    },
    /// Saw the CR ending a size line.
    SizeLf {
        size: u64,
    },
    /// Inside a chunk's data.
    Data(u64),
    /// Expecting CR LF after chunk data.
    DataCr,
    DataLf,
    /// At the start of a trailer line (`seen` trailer bytes so far).
    TrailerStart {
        seen: usize,
    },
    /// Inside a trailer line.
    Trailer {
        seen: usize,
    },
    /// Saw CR on an empty trailer line.
    EndLf,
    Done,
}

impl Discard {
    /// A `Content-Length: len` body.
    pub fn length(len: u64, max_body: u64) -> Result<Self, Status> {
        if len > max_body {
            return Err(Status::PayloadTooLarge);
        }
        Ok(Discard {
            state: if len == 0 {
                State::Done
            } else {
                State::Length(len)
            },
            budget: max_body,
        })
    }

    /// A chunked body.
    pub fn chunked(max_body: u64) -> Self {
        Discard {
            state: State::Size {
                size: 0,
                digits: 0,
                ext: false,
                line: 0,
            },
            budget: max_body,
        }
    }

    /// Whether the whole body has been consumed.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Consumes body bytes from the start of `data`; returns how many belonged to the body.
    pub fn feed(&mut self, data: &[u8]) -> Result<usize, Status> {
        let mut i = 0;
        while i < data.len() && self.state != State::Done {
            match self.state {
                State::Length(remaining) | State::Data(remaining) => {
                    let n = remaining.min((data.len() - i) as u64);
                    i += n as usize;
                    let left = remaining - n;
                    self.state = match self.state {
                        State::Length(_) if left == 0 => State::Done,
                        State::Length(_) => State::Length(left),
                        _ if left == 0 => State::DataCr,
                        _ => State::Data(left),
                    };
                }
                State::Size {
                    size,
                    digits,
                    ext,
                    line,
                } => {
                    let b = data[i];
                    i += 1;
                    if line + 1 > MAX_SIZE_LINE {
                        return Err(Status::BadRequest);
                    }
                    let line = line + 1;
                    self.state = match b {
                        b'\r' if digits > 0 => State::SizeLf { size },
                        b'\n' if digits > 0 => self.start_chunk(size)?,
                        _ if ext => State::Size {
                            size,
                            digits,
                            ext,
                            line,
                        },
                        b';' | b' ' | b'\t' if digits > 0 => State::Size {
                            size,
                            digits,
                            ext: true,
                            line,
                        },
                        _ => {
                            let d = (b as char).to_digit(16).ok_or(Status::BadRequest)?;
                            if digits >= 15 {
                                return Err(Status::BadRequest);
                            }
                            State::Size {
                                size: size * 16 + u64::from(d),
                                digits: digits + 1,
                                ext,
                                line,
                            }
                        }
                    };
                }
                State::SizeLf { size } => {
                    if data[i] != b'\n' {
                        return Err(Status::BadRequest);
                    }
                    i += 1;
                    self.state = self.start_chunk(size)?;
                }
                State::DataCr => {
                    self.state = match data[i] {
                        b'\r' => State::DataLf,
                        b'\n' => Self::next_size(),
                        _ => return Err(Status::BadRequest),
                    };
                    i += 1;
                }
                State::DataLf => {
                    if data[i] != b'\n' {
                        return Err(Status::BadRequest);
                    }
                    i += 1;
                    self.state = Self::next_size();
                }
                State::TrailerStart { seen } => {
                    self.state = match data[i] {
                        b'\r' => State::EndLf,
                        b'\n' => State::Done,
                        _ => State::Trailer { seen: seen + 1 },
                    };
                    i += 1;
                }
                State::Trailer { seen } => {
                    if seen > MAX_TRAILERS {
                        return Err(Status::HeaderFieldsTooLarge);
                    }
                    self.state = match data[i] {
                        b'\n' => State::TrailerStart { seen: seen + 1 },
                        _ => State::Trailer { seen: seen + 1 },
                    };
                    i += 1;
                }
                State::EndLf => {
                    if data[i] != b'\n' {
                        return Err(Status::BadRequest);
                    }
                    i += 1;
                    self.state = State::Done;
                }
                State::Done => unreachable!("loop condition"),
            }
        }
        Ok(i)
    }

    fn next_size() -> State {
        State::Size {
            size: 0,
            digits: 0,
            ext: false,
            line: 0,
        }
    }

    fn start_chunk(&mut self, size: u64) -> Result<State, Status> {
        if size == 0 {
            return Ok(State::TrailerStart { seen: 0 });
        }
        if size > self.budget {
            return Err(Status::PayloadTooLarge);
        }
        self.budget -= size;
        Ok(State::Data(size))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `input` split at every position and in single bytes; returns (consumed, done).
    fn run(mut d: impl FnMut() -> Discard, input: &[u8]) -> Result<(usize, bool), Status> {
        let mut whole = d();
        let n = whole.feed(input)?;
        let expected = (n, whole.is_done());
        for split in 0..=input.len() {
            let mut dd = d();
            let a = dd.feed(&input[..split])?;
            let b = if a == split {
                dd.feed(&input[split..])?
            } else {
                0
            };
            assert_eq!((a + b, dd.is_done()), expected, "split at {split}");
        }
        let mut dd = d();
        let mut total = 0;
        for byte in input.chunks(1) {
            if dd.is_done() {
                break;
            }
            total += dd.feed(byte)?;
        }
        assert_eq!((total, dd.is_done()), expected, "byte by byte");
        Ok(expected)
    }

    #[test]
    fn chunked_bodies_decode_across_any_split() {
        let body = b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nTrailer: x\r\n\r\nGET /next";
        let (n, done) = run(|| Discard::chunked(100), body).unwrap();
        assert!(done);
        assert_eq!(&body[n..], b"GET /next");
        let bare_lf = b"3\nabc\n0\n\n";
        assert_eq!(
            run(|| Discard::chunked(100), bare_lf).unwrap(),
            (bare_lf.len(), true)
        );
    }

    #[test]
    fn length_bodies_stop_at_their_end() {
        let (n, done) = run(|| Discard::length(4, 10).unwrap(), b"abcdGET").unwrap();
        assert_eq!((n, done), (4, true));
        assert!(Discard::length(0, 10).unwrap().is_done());
        assert_eq!(
            Discard::length(11, 10).unwrap_err(),
            Status::PayloadTooLarge
        );
    }

    #[test]
    fn limits_and_garbage() {
        assert_eq!(
            Discard::chunked(10).feed(b"b\r\nhello world\r\n0\r\n\r\n"),
            Err(Status::PayloadTooLarge)
        );
        assert_eq!(
            Discard::chunked(10).feed(b"zz\r\n"),
            Err(Status::BadRequest)
        );
        assert_eq!(Discard::chunked(10).feed(b"\r\n"), Err(Status::BadRequest));
        assert_eq!(
            Discard::chunked(10).feed(b"3\r\nabcX"),
            Err(Status::BadRequest)
        );
        assert_eq!(
            Discard::chunked(u64::MAX).feed(b"ffffffffffffffff\r\n"),
            Err(Status::BadRequest)
        );
        let long_ext = format!("1;{}\r\n", "e".repeat(2000));
        assert_eq!(
            Discard::chunked(10).feed(long_ext.as_bytes()),
            Err(Status::BadRequest)
        );
    }
}
