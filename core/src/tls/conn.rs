//! [`TlsConn`]: a TLS session over any [`Conn`], itself a [`Conn`].
//!
//! rustls is a state machine that does no IO: ciphertext goes in with `read_tls`, plaintext
//! comes out of its `reader()`, plaintext goes in through its `writer()`, records come out with
//! `write_tls`. This type moves bytes between that machine and the inner connection's owned
//! buffers, so one implementation serves every backend (epoll, io_uring) and the in-memory pipe
//! of [`crate::testing`], on the server side ([`rustls::ServerConnection`]) and the client side
//! ([`rustls::ClientConnection`], what tests talk through).
//!
//! Where bytes wait, and what each method does about them:
//! - ciphertext read from the socket that rustls has not taken yet (`incoming`): rustls takes
//!   input only while its plaintext buffer is empty, so a fast sender cannot make it buffer
//!   more than one record's worth (backpressure reaches the socket, as for plaintext);
//! - plaintext decrypted and not yet read by the plugin (inside rustls): [`Conn::read`] and
//!   [`Conn::try_read`] hand it out before touching the socket;
//! - records to send (alerts, session tickets, key updates, encrypted writes): written out by
//!   every [`Conn::write`] and [`Conn::read`] before they wait, and by [`Conn::shutdown`],
//!   which sends `close_notify` and then the TCP FIN.
//!
//! End of stream: a `close_notify`, or a TCP FIN without one (many clients close that way; the
//! protocols frame their messages, so a truncation shows as an incomplete message), reads as
//! `Ok(0)`. A write abandoned half-way (its future dropped) may have sent part of a record; the
//! session is then unusable, and later operations fail instead of sending garbage.
//!
//! Future: where the kernel offers kTLS, the session keys rustls exports after the handshake
//! (`dangerous_extract_secrets`) can be installed on the socket and this layer replaced by the
//! plain backend connection (and its zero-copy `send_file`); nothing above this type changes.

use std::io::{self, Read, Write};
use std::ops::DerefMut;

use rustls::{ConnectionCommon, SideData};

use crate::backend::sys::no_spare_capacity;
use crate::conn::{BufResult, Conn};

/// Ciphertext read from the inner connection at once while the peer streams (its last read
/// filled the room it had): a full record (16 KiB of plaintext plus overhead) and then some,
/// so bulk transfers take few reads.
const READ_SIZE: usize = 32 * 1024;

/// Room for a read of ciphertext while the peer does not stream: a request-sized record, so a
/// quiet connection waiting for its next request holds little (the rule of [`crate::buffer`]).
const IDLE_READ_SIZE: usize = 2 * 1024;

/// Largest outgoing buffer kept between writes; a bigger one (after a big write) is released.
const KEEP_OUTGOING: usize = 256 * 1024;

/// Largest outgoing buffer kept while the connection waits to read (between requests).
const KEEP_OUTGOING_IDLE: usize = 16 * 1024;

/// Why a TLS operation failed: the peer broke the protocol (with rustls's reason, which the
/// handshake metrics classify), or the connection under it failed.
#[derive(Debug)]
pub enum TlsError {
    /// A TLS protocol error: malformed input, a certificate that did not verify, an alert.
    Tls(rustls::Error),
    /// An IO error of the inner connection (`UnexpectedEof`: it closed mid-handshake).
    Io(io::Error),
}

impl From<TlsError> for io::Error {
    fn from(e: TlsError) -> io::Error {
        match e {
            TlsError::Tls(e) => io::Error::new(io::ErrorKind::InvalidData, e),
            TlsError::Io(e) => e,
        }
    }
}

impl std::fmt::Display for TlsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TlsError::Tls(e) => write!(f, "TLS: {e}"),
            TlsError::Io(e) => e.fmt(f),
        }
    }
}

/// A TLS session (`S`: a rustls server or client connection) over the connection `C`.
pub struct TlsConn<C, S> {
    inner: C,
    session: S,
    /// Ciphertext from `inner`; `incoming[taken..]` is what rustls has not taken yet.
    incoming: Vec<u8>,
    taken: usize,
    /// Reused for records on their way to `inner`.
    outgoing: Vec<u8>,
    /// Decrypted bytes rustls holds for the reader.
    plaintext: usize,
    /// `inner` reached end of stream.
    eof: bool,
    /// The peer sent `close_notify`.
    close_notify: bool,
    /// A write to `inner` was abandoned half-way: the record stream is cut.
    broken: bool,
    /// The last read of ciphertext filled its room: the peer streams, read big.
    streaming: bool,
}

impl<C, S, D> TlsConn<C, S>
where
    C: Conn,
    S: DerefMut<Target = ConnectionCommon<D>>,
    D: SideData,
{
    /// Wraps `inner` in `session`, which has not handshaken yet: call
    /// [`TlsConn::handshake`] next (reads and writes would also drive it, without a timeout
    /// of their own).
    pub fn new(inner: C, session: S) -> Self {
        TlsConn {
            inner,
            session,
            incoming: Vec::new(),
            taken: 0,
            outgoing: Vec::new(),
            plaintext: 0,
            eof: false,
            close_notify: false,
            broken: false,
            streaming: false,
        }
    }

    /// The connection under the session.
    pub fn get_ref(&self) -> &C {
        &self.inner
    }

    /// The rustls session: negotiated version and ALPN, the peer's certificates.
    pub fn session(&self) -> &S {
        &self.session
    }

    /// Runs the handshake to its end and sends the last flight (and session tickets). A
    /// protocol error is answered with rustls's alert before it is returned.
    pub async fn handshake(&mut self) -> Result<(), TlsError> {
        while self.session.is_handshaking() {
            self.flush().await.map_err(TlsError::Io)?;
            if self.taken < self.incoming.len() && self.session.wants_read() {
                self.feed_or_alert().await?;
                continue;
            }
            if self.eof || self.close_notify {
                let closed = io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the peer closed the connection during the TLS handshake",
                );
                return Err(TlsError::Io(closed));
            }
            self.fill().await.map_err(TlsError::Io)?;
        }
        self.flush().await.map_err(TlsError::Io)
    }

    /// Hands decrypted bytes to `buf`'s spare capacity, if rustls holds any.
    fn take_plaintext(&mut self, buf: &mut Vec<u8>) -> io::Result<Option<usize>> {
        let len = buf.len();
        let want = (buf.capacity() - len).min(self.plaintext);
        if want == 0 {
            return Ok(None);
        }
        buf.resize(len + want, 0);
        let res = self.session.reader().read(&mut buf[len..]);
        let n = *res.as_ref().unwrap_or(&0);
        buf.truncate(len + n);
        self.plaintext -= n.min(self.plaintext);
        match res {
            Ok(0) => Ok(None),
            Ok(n) => Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Gives rustls the ciphertext it will take now and processes it; at least one byte is
    /// taken (call only when [`ConnectionCommon::wants_read`] and input is waiting).
    fn feed(&mut self) -> Result<(), TlsError> {
        while self.taken < self.incoming.len() && self.session.wants_read() {
            let mut input = &self.incoming[self.taken..];
            let n = self.session.read_tls(&mut input).map_err(TlsError::Io)?;
            if n == 0 {
                let full = io::Error::new(io::ErrorKind::InvalidData, "TLS input buffer full");
                return Err(TlsError::Io(full));
            }
            self.taken += n;
            let state = self.session.process_new_packets().map_err(TlsError::Tls)?;
            self.plaintext = state.plaintext_bytes_to_read();
            self.close_notify |= state.peer_has_closed();
        }
        if self.taken == self.incoming.len() {
            self.incoming.clear();
            self.taken = 0;
        }
        Ok(())
    }

    /// [`Self::feed`], sending rustls's alert if the input broke the protocol.
    async fn feed_or_alert(&mut self) -> Result<(), TlsError> {
        let res = self.feed();
        if let Err(TlsError::Tls(_)) = &res {
            // Best effort: the connection ends with this error anyway.
            let _ = self.flush().await;
        }
        res
    }

    /// Reads more ciphertext from `inner` (keeping what rustls has not taken yet).
    async fn fill(&mut self) -> io::Result<()> {
        let mut buf = std::mem::take(&mut self.incoming);
        buf.drain(..self.taken);
        self.taken = 0;
        if self.streaming {
            buf.reserve(READ_SIZE);
        } else if buf.is_empty() && buf.capacity() > IDLE_READ_SIZE {
            // Quiet again after a burst: wait with a small buffer, not the burst's.
            buf = Vec::with_capacity(IDLE_READ_SIZE);
        } else {
            buf.reserve(IDLE_READ_SIZE);
        }
        let room = buf.capacity() - buf.len();
        let (res, buf) = self.inner.read(buf).await;
        self.incoming = buf;
        let n = res?;
        self.streaming = n == room;
        if n == 0 {
            self.eof = true;
            // Tells rustls the stream ended (it then knows a missing close_notify).
            let _ = self.session.read_tls(&mut io::empty());
        }
        Ok(())
    }

    /// Writes every record rustls has queued to `inner`.
    async fn flush(&mut self) -> io::Result<()> {
        while self.session.wants_write() {
            if self.broken {
                return Err(broken());
            }
            let mut out = std::mem::take(&mut self.outgoing);
            out.clear();
            while self.session.wants_write() {
                self.session.write_tls(&mut out as &mut dyn Write)?;
            }
            self.broken = true;
            let (res, mut out) = self.inner.write_all(out).await;
            res?;
            self.broken = false;
            if out.capacity() > KEEP_OUTGOING {
                out = Vec::new();
            }
            self.outgoing = out;
        }
        Ok(())
    }
}

fn broken() -> io::Error {
    io::Error::new(
        io::ErrorKind::BrokenPipe,
        "TLS session unusable: an earlier write was abandoned half-way",
    )
}

impl<C, S, D> Conn for TlsConn<C, S>
where
    C: Conn,
    S: DerefMut<Target = ConnectionCommon<D>>,
    D: SideData,
{
    async fn read(&mut self, mut buf: Vec<u8>) -> BufResult<usize> {
        if buf.len() == buf.capacity() {
            return (Err(no_spare_capacity()), buf);
        }
        loop {
            match self.take_plaintext(&mut buf) {
                Ok(Some(n)) => return (Ok(n), buf),
                Ok(None) => {}
                Err(e) => return (Err(e), buf),
            }
            if self.taken < self.incoming.len() && self.session.wants_read() {
                if let Err(e) = self.feed_or_alert().await {
                    return (Err(e.into()), buf);
                }
                continue;
            }
            if self.eof || self.close_notify {
                return (Ok(0), buf);
            }
            // Answers the peer may be waiting for (a key update) go out before we wait.
            if let Err(e) = self.flush().await {
                return (Err(e), buf);
            }
            // Waiting for the peer (often between requests): no big buffer held meanwhile.
            if self.outgoing.capacity() > KEEP_OUTGOING_IDLE {
                self.outgoing = Vec::new();
            }
            if let Err(e) = self.fill().await {
                return (Err(e), buf);
            }
        }
    }

    async fn write(&mut self, buf: Vec<u8>, from: usize) -> BufResult<usize> {
        // Whatever is queued (a previous write's records that failed to go out) goes first.
        if let Err(e) = self.flush().await {
            return (Err(e), buf);
        }
        let n = match self.session.writer().write(&buf[from..]) {
            Ok(n) => n,
            Err(e) => return (Err(e), buf),
        };
        match self.flush().await {
            Ok(()) => (Ok(n), buf),
            Err(e) => (Err(e), buf),
        }
    }

    fn try_read(&mut self, buf: &mut Vec<u8>) -> io::Result<Option<usize>> {
        if buf.len() == buf.capacity() {
            return Err(no_spare_capacity());
        }
        loop {
            if let Some(n) = self.take_plaintext(buf)? {
                return Ok(Some(n));
            }
            if self.taken < self.incoming.len() && self.session.wants_read() {
                // An alert rustls queued here goes out with the next write, if any: the
                // connection ends with this error anyway.
                self.feed()?;
                continue;
            }
            if self.eof || self.close_notify {
                return Ok(Some(0));
            }
            self.incoming.drain(..self.taken);
            self.taken = 0;
            self.incoming.reserve(if self.streaming {
                READ_SIZE
            } else {
                IDLE_READ_SIZE
            });
            match self.inner.try_read(&mut self.incoming)? {
                None => return Ok(None),
                Some(0) => {
                    self.eof = true;
                    let _ = self.session.read_tls(&mut io::empty());
                }
                Some(_) => {}
            }
        }
    }

    /// Ready at once while decrypted bytes or ciphertext rustls would take wait, or the stream
    /// has ended; otherwise when the
    /// connection below has ciphertext (which may not complete a record: `try_read` then says
    /// `None` and the caller waits again).
    async fn readable(&mut self) -> io::Result<()> {
        let unfed = self.taken < self.incoming.len() && self.session.wants_read();
        if self.plaintext > 0 || unfed || self.eof || self.close_notify {
            return Ok(());
        }
        self.inner.readable().await
    }

    fn local_addr(&self) -> Option<std::net::SocketAddr> {
        self.inner.local_addr()
    }

    fn peer_closed(&self) -> bool {
        self.inner.peer_closed()
    }

    fn peer_finished_sending(&self) -> bool {
        self.close_notify || self.inner.peer_finished_sending()
    }

    async fn shutdown(&mut self) -> io::Result<()> {
        self.session.send_close_notify();
        match self.flush().await {
            // A peer that is gone needs no notice: the end is what it already has.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
                ) => {}
            other => other?,
        }
        self.inner.shutdown().await
    }
}
