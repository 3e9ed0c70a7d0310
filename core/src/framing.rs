//! Reading a [`Conn`] in frames: lines, length-prefixed frames, exact byte counts.
//!
//! The owned-buffer counterpart of tokio-util's `LinesCodec` and `LengthDelimitedCodec`: a
//! plugin reads `while let Some(line) = lines.next().await? { .. }` instead of managing
//! buffers. Each reader owns the connection (reach it with `conn()` to write answers) and
//! keeps bytes that arrived after the current frame for the next one.
//!
//! Drain-aware by construction: when nothing of a frame is buffered, the next read is the
//! context's idle read ([`Context::read_idle`]), so a server stop ends an idle connection at
//! once, as if the client had closed (`next` returns `Ok(None)`); once part of a frame has
//! arrived, reads are plain and the frame is finished first.
//!
//! Errors: a frame over its maximum length is an [`io::ErrorKind::InvalidData`] error carrying
//! [`FrameTooLong`]; a connection that ends inside a frame is
//! [`io::ErrorKind::UnexpectedEof`]. After either, the input is out of step: answer if the
//! protocol says so, then end the connection.

use std::fmt;
use std::io;

use crate::buffer;
use crate::conn::Conn;
use crate::context::Context;

/// [`Lines`]' default maximum line length, in bytes (without the line ending).
pub const DEFAULT_MAX_LINE: usize = 8 * 1024;
/// [`Frames`]' default maximum frame length, in bytes (without the length prefix).
pub const DEFAULT_MAX_FRAME: usize = 8 * 1024 * 1024;

/// The error inside the [`io::ErrorKind::InvalidData`] error for a frame over its maximum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameTooLong {
    /// The maximum in force, in bytes.
    pub max: usize,
}

impl fmt::Display for FrameTooLong {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "frame longer than {} bytes", self.max)
    }
}

impl std::error::Error for FrameTooLong {}

impl FrameTooLong {
    /// Whether `e` is this error (an over-long frame), as opposed to a transport error.
    pub fn is(e: &io::Error) -> bool {
        e.get_ref().is_some_and(|inner| inner.is::<FrameTooLong>())
    }

    fn error(max: usize) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, FrameTooLong { max })
    }
}

fn ended_mid_frame() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "the connection ended in the middle of a frame",
    )
}

/// One read appended to `buf` (which must have spare capacity). `between_frames`: nothing of
/// a frame has arrived, so the read is [`Context::read_idle`] and a stop ends it. Shared by
/// every reader here and by [`crate::command`].
pub(crate) async fn read_into<C: Conn>(
    conn: &mut C,
    cx: &Context,
    buf: &mut Vec<u8>,
    between_frames: bool,
) -> io::Result<usize> {
    let taken = std::mem::take(buf);
    let (res, back) = if between_frames {
        cx.read_idle(conn, taken).await
    } else {
        conn.read(taken).await
    };
    *buf = back;
    res
}

/// Takes the first `\n`-terminated line out of `buf`, without its `\n` and without one `\r`
/// right before it; `None` if `buf` holds no `\n`. The one line splitter of wharf-core.
pub(crate) fn take_line(buf: &mut Vec<u8>) -> Option<Vec<u8>> {
    let end = buf.iter().position(|&b| b == b'\n')?;
    let mut line: Vec<u8> = buf.drain(..=end).collect();
    line.pop();
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    Some(line)
}

/// A connection read in frames of format `F`, with the input received and not consumed yet.
/// Use it through [`Lines`] and [`Frames`].
pub struct Framed<'cx, C, F> {
    conn: C,
    cx: &'cx Context,
    buf: Vec<u8>,
    /// The longest accepted frame, in bytes.
    max_len: usize,
    _format: std::marker::PhantomData<F>,
}

/// A frame format: its default maximum length.
pub trait Format {
    /// The maximum frame length unless [`Framed::max_len`] says otherwise.
    const DEFAULT_MAX: usize;
}

/// `\n`-terminated lines: see [`Lines`].
pub struct LineFormat;
impl Format for LineFormat {
    const DEFAULT_MAX: usize = DEFAULT_MAX_LINE;
}

/// Frames after a big-endian `u32` length: see [`Frames`].
pub struct LengthPrefixed;
impl Format for LengthPrefixed {
    const DEFAULT_MAX: usize = DEFAULT_MAX_FRAME;
}

/// `\n`-terminated lines from a connection, at most a maximum length each.
///
/// A line ends at `\n`; the `\n` and one `\r` right before it are removed, so `\r\n` clients
/// work unchanged. Lines are bytes (`Vec<u8>`), not necessarily UTF-8. A line longer than the
/// maximum ([`DEFAULT_MAX_LINE`] unless [`Framed::max_len`] says otherwise) is a
/// [`FrameTooLong`] error, found as soon as that many bytes have arrived without a `\n`. A
/// connection that ends after part of a line is an `UnexpectedEof` error (the partial line is
/// not returned).
///
/// ```
/// # use std::io;
/// # use wharf_core::{framing::Lines, Conn, Context};
/// async fn serve<C: Conn>(conn: C, cx: &Context) -> io::Result<()> {
///     let mut lines = Lines::new(conn, cx).max_len(1024);
///     while let Some(mut line) = lines.next().await? {
///         line.push(b'\n');
///         let (res, _) = lines.conn().write_all(line).await;
///         res?;
///     }
///     lines.conn().shutdown().await
/// }
/// ```
pub type Lines<'cx, C> = Framed<'cx, C, LineFormat>;

/// Frames prefixed with their length (a big-endian `u32`) from a connection, and
/// [`Frames::send`] to answer in kind: tokio-util's `LengthDelimitedCodec` default layout.
///
/// A frame longer than the maximum ([`DEFAULT_MAX_FRAME`] unless [`Framed::max_len`] says
/// otherwise) is a [`FrameTooLong`] error, found from its prefix before its bytes are read.
pub type Frames<'cx, C> = Framed<'cx, C, LengthPrefixed>;

impl<'cx, C: Conn, F: Format> Framed<'cx, C, F> {
    /// Frames from `conn`, whose idle reads go through `cx`.
    pub fn new(conn: C, cx: &'cx Context) -> Self {
        Framed {
            conn,
            cx,
            buf: Vec::new(),
            max_len: F::DEFAULT_MAX,
            _format: std::marker::PhantomData,
        }
    }

    /// Sets the longest accepted frame (line), in bytes, without its terminator or prefix.
    pub fn max_len(mut self, max_len: usize) -> Self {
        self.max_len = max_len;
        self
    }

    /// Exactly `n` bytes (a payload a frame announced), the buffered ones first.
    /// Mid-request: a server stop does not end it. `UnexpectedEof` if the connection ends
    /// first.
    pub async fn read_exact(&mut self, n: usize) -> io::Result<Vec<u8>> {
        self.fill_to(n, false).await?;
        Ok(self.take(n))
    }

    /// The connection, to write answers.
    pub fn conn(&mut self) -> &mut C {
        &mut self.conn
    }

    /// The connection back, and the bytes received but not consumed yet.
    pub fn into_parts(self) -> (C, Vec<u8>) {
        (self.conn, self.buf)
    }

    /// Reads more input, with room for at least `want` bytes (at least [`buffer::IDLE`]).
    /// Returns 0 at end of stream (or, between frames, when the server stops).
    async fn read_more(&mut self, want: usize, between_frames: bool) -> io::Result<usize> {
        let want = want.max(buffer::IDLE);
        if self.buf.capacity() - self.buf.len() < want {
            self.buf.reserve(want);
        }
        let between = between_frames && self.buf.is_empty();
        read_into(&mut self.conn, self.cx, &mut self.buf, between).await
    }

    /// Reads until `n` bytes are buffered. `Ok(false)` if the stream ended (or the server
    /// stopped) before any byte came, when `between_frames`; an end after some bytes, or any
    /// end when not between frames, is an `UnexpectedEof` error.
    async fn fill_to(&mut self, n: usize, between_frames: bool) -> io::Result<bool> {
        while self.buf.len() < n {
            let missing = n - self.buf.len();
            if self.read_more(missing, between_frames).await? == 0 {
                return if between_frames && self.buf.is_empty() {
                    Ok(false)
                } else {
                    Err(ended_mid_frame())
                };
            }
        }
        Ok(true)
    }

    /// The first `n` buffered bytes (there are at least `n`).
    fn take(&mut self, n: usize) -> Vec<u8> {
        if n == self.buf.len() {
            return std::mem::take(&mut self.buf);
        }
        let rest = self.buf.split_off(n);
        std::mem::replace(&mut self.buf, rest)
    }
}

impl<C: Conn> Framed<'_, C, LineFormat> {
    /// The next line; `None` when the client closed between lines, or the server is stopping
    /// and no line had begun.
    pub async fn next(&mut self) -> io::Result<Option<Vec<u8>>> {
        loop {
            if let Some(line) = take_line(&mut self.buf) {
                if line.len() > self.max_len {
                    return Err(FrameTooLong::error(self.max_len));
                }
                return Ok(Some(line));
            }
            // Room for the line and its `\r`, and no `\n` yet: too long already.
            if self.buf.len() > self.max_len.saturating_add(1) {
                return Err(FrameTooLong::error(self.max_len));
            }
            if self.read_more(0, true).await? == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(ended_mid_frame())
                };
            }
        }
    }
}

/// Bytes of the length prefix.
const PREFIX: usize = 4;

impl<C: Conn> Framed<'_, C, LengthPrefixed> {
    /// The next frame's bytes; `None` when the client closed between frames, or the server is
    /// stopping and no frame had begun.
    pub async fn next(&mut self) -> io::Result<Option<Vec<u8>>> {
        if !self.fill_to(PREFIX, true).await? {
            return Ok(None);
        }
        let mut prefix = [0u8; PREFIX];
        prefix.copy_from_slice(&self.buf[..PREFIX]);
        let len = u32::from_be_bytes(prefix) as usize;
        if len > self.max_len {
            return Err(FrameTooLong::error(self.max_len));
        }
        self.fill_to(PREFIX + len, false).await?;
        self.buf.drain(..PREFIX);
        Ok(Some(self.take(len)))
    }

    /// Sends `payload` as one frame (prefix and bytes in one write).
    pub async fn send(&mut self, payload: &[u8]) -> io::Result<()> {
        let len = u32::try_from(payload.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "frame over 4 GiB"))?;
        let mut out = Vec::with_capacity(PREFIX + payload.len());
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(payload);
        let (res, _) = self.conn.write_all(out).await;
        res
    }
}

/// Reads exactly `n` bytes from `conn` with plain reads (mid-request: a server stop does not
/// end it). `UnexpectedEof` if the connection ends first.
pub async fn read_exact<C: Conn>(conn: &mut C, n: usize) -> io::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(n);
    while buf.len() < n {
        let (res, back) = conn.read(buf).await;
        buf = back;
        if res? == 0 {
            return Err(ended_mid_frame());
        }
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{self, Client, MemConn};

    fn pair() -> (MemConn, Client, Context) {
        let (conn, client) = testing::pipe();
        let cx = conn.context();
        (conn, client, cx)
    }

    #[test]
    fn lines_split_anywhere_strip_one_cr_and_end_at_a_clean_close() {
        testing::block_on(async {
            let (conn, client, cx) = pair();
            let mut lines = Lines::new(conn, &cx);
            let send = async {
                for piece in [&b"he"[..], b"llo\r", b"\nwo", b"rld\n\n", b"a\r\r\n"] {
                    client.write_all(piece).await.unwrap();
                    testing::yield_now().await;
                }
                client.close_write();
            };
            let read = async {
                let mut got = Vec::new();
                while let Some(line) = lines.next().await.unwrap() {
                    got.push(line);
                }
                got
            };
            let ((), got) = tokio::join!(send, read);
            let want: Vec<&[u8]> = vec![b"hello", b"world", b"", b"a\r"];
            assert_eq!(got, want);
        });
    }

    #[test]
    fn an_overlong_line_is_frame_too_long_whether_or_not_its_newline_came() {
        testing::block_on(async {
            // Without a newline: found once max + 2 bytes are in.
            let (conn, client, cx) = pair();
            let mut lines = Lines::new(conn, &cx).max_len(8);
            client.write_all(b"0123456789").await.unwrap();
            let err = lines.next().await.unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidData);
            assert!(FrameTooLong::is(&err), "{err}");

            // With it, in the same read.
            let (conn, client, cx) = pair();
            let mut lines = Lines::new(conn, &cx).max_len(8);
            client.write_all(b"12345678\r\n123456789\n").await.unwrap();
            assert_eq!(lines.next().await.unwrap().unwrap(), b"12345678");
            assert!(FrameTooLong::is(&lines.next().await.unwrap_err()));
        });
    }

    #[test]
    fn a_close_mid_line_is_unexpected_eof() {
        testing::block_on(async {
            let (conn, client, cx) = pair();
            let mut lines = Lines::new(conn, &cx);
            client.write_all(b"half a li").await.unwrap();
            client.close_write();
            let err = lines.next().await.unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        });
    }

    #[test]
    fn a_stop_ends_an_idle_wait_at_once_but_a_started_line_is_finished() {
        testing::block_on(async {
            // Idle: the stop ends the wait like a close.
            let (conn, client, cx) = pair();
            let mut lines = Lines::new(conn, &cx);
            let stop = async {
                testing::yield_now().await;
                client.stop_server();
            };
            let (next, ()) = tokio::join!(lines.next(), stop);
            assert_eq!(next.unwrap(), None);

            // Mid-line: the stop waits for the rest of the line.
            let (conn, client, cx) = pair();
            let mut lines = Lines::new(conn, &cx);
            client.write_all(b"get fi").await.unwrap();
            let talk = async {
                testing::yield_now().await;
                client.stop_server();
                testing::yield_now().await;
                client.write_all(b"le\n").await.unwrap();
            };
            let (next, ()) = tokio::join!(lines.next(), talk);
            assert_eq!(next.unwrap().unwrap(), b"get file");
            // And the next wait, idle again, ends at once.
            assert_eq!(lines.next().await.unwrap(), None);
        });
    }

    #[test]
    fn read_exact_takes_buffered_bytes_first() {
        testing::block_on(async {
            let (conn, client, cx) = pair();
            let mut lines = Lines::new(conn, &cx);
            client.write_all(b"put 10\n0123").await.unwrap();
            assert_eq!(lines.next().await.unwrap().unwrap(), b"put 10");
            let rest = async { client.write_all(b"456789tail\n").await.unwrap() };
            let (body, ()) = tokio::join!(lines.read_exact(10), rest);
            assert_eq!(body.unwrap(), b"0123456789");
            assert_eq!(lines.next().await.unwrap().unwrap(), b"tail");
            client.close_write();
            assert_eq!(
                lines.read_exact(1).await.unwrap_err().kind(),
                io::ErrorKind::UnexpectedEof
            );

            let (mut conn, client) = testing::pipe();
            client.write_all(b"abcdef").await.unwrap();
            assert_eq!(read_exact(&mut conn, 6).await.unwrap(), b"abcdef");
            client.close_write();
            let err = read_exact(&mut conn, 1).await.unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        });
    }

    #[test]
    fn length_prefixed_frames_round_trip_split_anywhere_and_are_bounded() {
        testing::block_on(async {
            let (conn, client, cx) = pair();
            let mut frames = Frames::new(conn, &cx).max_len(16);
            let mut wire = Vec::new();
            for payload in [&b"first"[..], b"", b"third frame"] {
                wire.extend_from_slice(&(payload.len() as u32).to_be_bytes());
                wire.extend_from_slice(payload);
            }
            wire.extend_from_slice(&17u32.to_be_bytes());
            let send = async {
                for piece in wire.chunks(3) {
                    client.write_all(piece).await.unwrap();
                    testing::yield_now().await;
                }
            };
            let read = async {
                let mut got = Vec::new();
                for _ in 0..3 {
                    got.push(frames.next().await.unwrap().unwrap());
                }
                (got, frames.next().await.unwrap_err())
            };
            let ((), (got, err)) = tokio::join!(send, read);
            let want: Vec<&[u8]> = vec![b"first", b"", b"third frame"];
            assert_eq!(got, want);
            assert!(FrameTooLong::is(&err));

            frames.send(b"answer").await.unwrap();
            assert_eq!(client.read_exact(10).await.unwrap(), b"\0\0\0\x06answer");

            // A clean close between frames ends; one inside a prefix is an error.
            let (conn, client, cx) = pair();
            let mut frames = Frames::new(conn, &cx);
            client.close_write();
            assert_eq!(frames.next().await.unwrap(), None);
            let (conn, client, cx) = pair();
            let mut frames = Frames::new(conn, &cx);
            client.write_all(b"\0\0").await.unwrap();
            client.close_write();
            let err = frames.next().await.unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        });
    }
}
