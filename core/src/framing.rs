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

/// One read appended to `buf` (which must have spare capacity). `idle`: the context, when
/// nothing of a frame has arrived, so the read is its [`Context::read_idle`] and a stop ends
/// it; `None` for a plain read mid-frame. Shared by every reader here and by
/// [`crate::command`].
pub(crate) async fn read_into<C: Conn>(
    conn: &mut C,
    idle: Option<&Context>,
    buf: &mut Vec<u8>,
) -> io::Result<usize> {
    let taken = std::mem::take(buf);
    let (res, back) = match idle {
        Some(cx) => cx.read_idle(conn, taken).await,
        None => conn.read(taken).await,
    };
    *buf = back;
    res
}

/// The line in `bytes`, which end right before its `\n`: without one `\r` at the end. The
/// one line-ending rule of wharf-core.
pub(crate) fn line_before_newline(bytes: &[u8]) -> &[u8] {
    bytes.strip_suffix(b"\r").unwrap_or(bytes)
}

/// A connection read in frames of format `F`, with the input received and not consumed yet.
/// Use it through [`Lines`] and [`Frames`].
///
/// Costs: one allocation per frame (the returned `Vec`, of exactly its length); consumed
/// bytes are skipped, not moved, and the unconsumed rest (part of one frame) is moved to the
/// front only before a read. Memory follows what arrived, not what was announced: a read gets
/// room for at most [`buffer::ACTIVE`] more bytes, and between frames an emptied buffer drops
/// back to [`buffer::IDLE`] by [`buffer::size_for_next_read`]'s rule.
pub struct Framed<'cx, C, F> {
    conn: C,
    cx: &'cx Context,
    /// Received bytes; `buf[start..]` are the ones not consumed yet.
    buf: Vec<u8>,
    start: usize,
    /// For lines: how many unconsumed bytes are known to hold no `\n` (so each byte is
    /// searched once, like tokio-util's `LinesCodec::next_index`).
    scanned: usize,
    /// The last read: bytes it returned and room it had (none yet: `None`).
    last_read: Option<(usize, usize)>,
    /// The longest accepted frame, in bytes.
    max_len: usize,
    _format: std::marker::PhantomData<F>,
}

mod sealed {
    /// Keeps [`super::Format`] implemented by this module's formats only: reading a format
    /// (`next`) is defined for each of them here.
    pub trait Sealed {}
}

/// A frame format: its default maximum length. Sealed: the formats are [`LineFormat`] and
/// [`LengthPrefixed`].
pub trait Format: sealed::Sealed {
    /// The maximum frame length unless [`Framed::max_len`] says otherwise.
    const DEFAULT_MAX: usize;
}

/// `\n`-terminated lines: see [`Lines`].
pub struct LineFormat;
impl sealed::Sealed for LineFormat {}
impl Format for LineFormat {
    const DEFAULT_MAX: usize = DEFAULT_MAX_LINE;
}

/// Frames after a big-endian `u32` length: see [`Frames`].
pub struct LengthPrefixed;
impl sealed::Sealed for LengthPrefixed {}
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
/// A prefix within the maximum reserves nothing by itself: the buffer grows as the frame's
/// bytes arrive.
pub type Frames<'cx, C> = Framed<'cx, C, LengthPrefixed>;

impl<'cx, C: Conn, F: Format> Framed<'cx, C, F> {
    /// Frames from `conn`, whose idle reads go through `cx`.
    pub fn new(conn: C, cx: &'cx Context) -> Self {
        Framed {
            conn,
            cx,
            buf: Vec::new(),
            start: 0,
            scanned: 0,
            last_read: None,
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
    pub fn into_parts(mut self) -> (C, Vec<u8>) {
        self.compact();
        (self.conn, self.buf)
    }

    /// The bytes received and not consumed yet.
    fn pending(&self) -> &[u8] {
        &self.buf[self.start..]
    }

    /// Marks the first `n` pending bytes consumed.
    fn consume(&mut self, n: usize) {
        self.start += n;
        self.scanned = 0;
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
    }

    /// The first `n` pending bytes (there are at least `n`), consumed.
    fn take(&mut self, n: usize) -> Vec<u8> {
        let frame = self.pending()[..n].to_vec();
        self.consume(n);
        frame
    }

    /// Moves the pending bytes to the front of the buffer.
    fn compact(&mut self) {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
    }

    /// Reads more input; `want`: how many more bytes the current frame is known to need (0 if
    /// unknown). The read gets room for `want` bytes, but at least [`buffer::IDLE`] and at
    /// most [`buffer::ACTIVE`], so an announced length costs memory only as its bytes come.
    /// Returns 0 at end of stream (or, between frames, when the server stops).
    async fn read_more(&mut self, want: usize, between_frames: bool) -> io::Result<usize> {
        self.compact();
        if let Some((last, room)) = self.last_read {
            // Shrinks an emptied buffer after a short read; grows one a read filled.
            buffer::size_for_next_read(&mut self.buf, last, room);
        }
        let want = want.clamp(buffer::IDLE, buffer::ACTIVE);
        if self.buf.capacity() - self.buf.len() < want {
            self.buf.reserve(want);
        }
        let room = self.buf.capacity() - self.buf.len();
        let idle = (between_frames && self.buf.is_empty()).then_some(self.cx);
        let n = read_into(&mut self.conn, idle, &mut self.buf).await?;
        self.last_read = Some((n, room));
        Ok(n)
    }

    /// Reads until `n` bytes are pending. `Ok(false)` if the stream ended (or the server
    /// stopped) before any byte came, when `between_frames`; an end after some bytes, or any
    /// end when not between frames, is an `UnexpectedEof` error.
    async fn fill_to(&mut self, n: usize, between_frames: bool) -> io::Result<bool> {
        while self.pending().len() < n {
            let missing = n - self.pending().len();
            if self.read_more(missing, between_frames).await? == 0 {
                return if between_frames && self.pending().is_empty() {
                    Ok(false)
                } else {
                    Err(ended_mid_frame())
                };
            }
        }
        Ok(true)
    }
}

impl<C: Conn> Framed<'_, C, LineFormat> {
    /// The next line; `None` when the client closed between lines, or the server is stopping
    /// and no line had begun.
    pub async fn next(&mut self) -> io::Result<Option<Vec<u8>>> {
        loop {
            let pending = self.pending();
            if let Some(at) = pending[self.scanned..].iter().position(|&b| b == b'\n') {
                let newline = self.scanned + at;
                let len = line_before_newline(&pending[..newline]).len();
                if len > self.max_len {
                    self.consume(newline + 1);
                    return Err(FrameTooLong::error(self.max_len));
                }
                let line = pending[..len].to_vec();
                self.consume(newline + 1);
                return Ok(Some(line));
            }
            let searched = pending.len();
            self.scanned = searched;
            // Room for the line and its `\r`, and no `\n` yet: too long already.
            if searched > self.max_len.saturating_add(1) {
                return Err(FrameTooLong::error(self.max_len));
            }
            if self.read_more(0, true).await? == 0 {
                return if self.pending().is_empty() {
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
        prefix.copy_from_slice(&self.pending()[..PREFIX]);
        let len = u32::from_be_bytes(prefix) as usize;
        if len > self.max_len {
            return Err(FrameTooLong::error(self.max_len));
        }
        self.fill_to(PREFIX + len, false).await?;
        self.consume(PREFIX);
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

    #[test]
    fn an_announced_length_reserves_memory_only_as_its_bytes_arrive() {
        testing::block_on(async {
            let (conn, client, cx) = pair();
            let mut frames = Frames::new(conn, &cx);
            // A prefix announcing 8 MiB (within the default maximum), then 10 bytes, then
            // the client goes away: the reader must not have reserved the 8 MiB.
            client
                .write_all(&(DEFAULT_MAX_FRAME as u32).to_be_bytes())
                .await
                .unwrap();
            client.write_all(b"0123456789").await.unwrap();
            client.close_write();
            let err = frames.next().await.unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
            let (_, buf) = frames.into_parts();
            assert!(
                buf.capacity() <= 2 * buffer::ACTIVE,
                "{} bytes reserved for 14 received",
                buf.capacity()
            );
        });
    }

    #[test]
    fn the_buffer_drops_back_to_idle_size_between_frames() {
        testing::block_on(async {
            let (conn, client, cx) = pair();
            let mut lines = Lines::new(conn, &cx).max_len(64 * 1024);
            let mut long = vec![b'x'; 3 * buffer::ACTIVE];
            long.push(b'\n');
            client.write_all(&long).await.unwrap();
            assert_eq!(
                lines.next().await.unwrap().unwrap().len(),
                3 * buffer::ACTIVE
            );
            client.write_all(b"short\n").await.unwrap();
            assert_eq!(lines.next().await.unwrap().unwrap(), b"short");
            client.write_all(b"quiet\n").await.unwrap();
            assert_eq!(lines.next().await.unwrap().unwrap(), b"quiet");
            // After a short read emptied it (the client no longer streams), the buffer waited
            // for "quiet" at its idle size (buffer::size_for_next_read's rule).
            let (_, buf) = lines.into_parts();
            assert!(buf.is_empty());
            assert_eq!(buf.capacity(), buffer::IDLE);
        });
    }
}
