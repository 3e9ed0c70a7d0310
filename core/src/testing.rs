//! Test support: drive a plugin through an in-memory connection, no sockets needed.
//!
//! [`pipe`] returns the server side ([`MemConn`], a real [`Conn`]) and the [`Client`] side;
//! [`spawn`] serves the server side with a detached [`Context`] on a local task, and the client
//! then plays its part: write, read, close, stop the server ([`Client::stop_server`]), and check
//! what the service recorded ([`Client::recorded_requests`]).
//!
//! ```
//! use std::io;
//! use wharf_core::{testing, Conn, Context, Service};
//!
//! /// Answers `hi` to whatever arrives first, then ends.
//! struct Greeter;
//!
//! #[wharf_core::async_trait(?Send)]
//! impl Service for Greeter {
//!     async fn serve<C: Conn + 'static>(&self, mut conn: C, cx: &Context) -> io::Result<()> {
//!         let (res, _) = cx.read_idle(&mut conn, Vec::with_capacity(64)).await;
//!         if res? > 0 {
//!             let (res, _) = conn.write_all(b"hi\n".to_vec()).await;
//!             res?;
//!             cx.record_request("ok", std::time::Duration::ZERO);
//!         }
//!         conn.shutdown().await
//!     }
//! }
//!
//! testing::block_on(async {
//!     let (conn, client) = testing::pipe();
//!     let server = testing::spawn(Greeter, conn);
//!     client.write_all(b"hello").await.unwrap();
//!     assert_eq!(client.read_to_end().await, b"hi\n");
//!     server.await.unwrap().unwrap();
//!     assert_eq!(client.recorded_requests(), ["ok"]);
//!
//!     // A server stopping (SIGTERM) while the client is idle ends the connection at once.
//!     let (conn, client) = testing::pipe();
//!     let server = testing::spawn(Greeter, conn);
//!     client.stop_server();
//!     assert_eq!(client.read_to_end().await, b"");
//!     server.await.unwrap().unwrap();
//! });
//! ```
//!
//! Datagram services ([`crate::datagram`]) are tested with [`answer_datagram`]: one datagram
//! in, the replies out, through the framework's own reply buffers and limits.
//!
//! Each direction holds at most `capacity` bytes, so backpressure is observable: a service that
//! stops reading while its output is not consumed leaves the client's writes pending.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};

use crate::backend::sys::no_spare_capacity;
use crate::conn::{BufResult, Conn};
use crate::context::{Context, Detached};
use crate::service::Service;
use crate::tls::{Tls, TlsConn, TlsError, TlsSettings};

pub use tokio::task::{yield_now, JoinHandle};

/// Default bytes buffered per direction.
pub const DEFAULT_CAPACITY: usize = 64 * 1024;

/// Runs `fut` on a fresh single-threaded runtime with a `LocalSet` (so `spawn_local` and
/// `tokio::time` work), the same shape as a wharf worker.
pub fn block_on<F: Future>(fut: F) -> F::Output {
    // IO too: plugins that watch pipes or child processes register them with the reactor.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("building a current-thread tokio runtime");
    tokio::task::LocalSet::new().block_on(&rt, fut)
}

/// Serves `conn` with `service` on a local task, with the pipe's detached context
/// ([`MemConn::context`]); call inside [`block_on`].
pub fn spawn<S: Service>(service: S, conn: MemConn) -> JoinHandle<io::Result<()>> {
    tokio::task::spawn_local(async move {
        let cx = conn.context();
        service.serve(conn, &cx).await
    })
}

/// Serves `conn` with `service` behind the framework's TLS layer ([`Tls`]: handshake, client
/// identity, `allow_identities`), with the pipe's detached context; call inside [`block_on`]
/// and talk to it through [`tls_connect`].
pub fn spawn_tls<S: Service>(
    service: S,
    conn: MemConn,
    settings: TlsSettings,
) -> JoinHandle<io::Result<()>> {
    spawn(Tls::new(service, settings), conn)
}

/// The client side of a pipe as a TLS client of `server_name` (the name its certificate must
/// carry), handshaken: read and write plaintext through the returned connection's
/// [`Conn`] methods, reach the [`Client`] with [`TlsConn::get_ref`].
pub async fn tls_connect(
    client: Client,
    config: Arc<rustls::ClientConfig>,
    server_name: &str,
) -> Result<TlsConn<Client, rustls::ClientConnection>, TlsError> {
    let name = rustls::pki_types::ServerName::try_from(server_name.to_string())
        .map_err(|e| TlsError::Io(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
    let session = rustls::ClientConnection::new(config, name).map_err(TlsError::Tls)?;
    let mut tls = TlsConn::new(client, session);
    tls.handshake().await?;
    Ok(tls)
}

/// A connected pair with [`DEFAULT_CAPACITY`] per direction.
pub fn pipe() -> (MemConn, Client) {
    pipe_with_capacity(DEFAULT_CAPACITY)
}

/// A connected pair buffering at most `capacity` bytes per direction.
pub fn pipe_with_capacity(capacity: usize) -> (MemConn, Client) {
    assert!(capacity > 0, "a pipe needs room for at least one byte");
    let shared = Rc::new(RefCell::new(Shared {
        to_server: Direction::new(capacity),
        to_client: Direction::new(capacity),
        writes: 0,
    }));
    let detached = Detached::new();
    (
        MemConn {
            shared: Rc::clone(&shared),
            peer: SocketAddr::from(([127, 0, 0, 1], 40000)),
            identity: None,
            detached: detached.clone(),
        },
        Client { shared, detached },
    )
}

struct Shared {
    to_server: Direction,
    to_client: Direction,
    /// Write operations the service completed.
    writes: usize,
}

struct Direction {
    data: VecDeque<u8>,
    capacity: usize,
    /// The writer will send nothing more (FIN or drop).
    writer_closed: bool,
    /// The reader is gone; writes fail like writes to a reset socket.
    reader_gone: bool,
    reader: Option<Waker>,
    writer: Option<Waker>,
}

impl Direction {
    fn new(capacity: usize) -> Self {
        Direction {
            data: VecDeque::new(),
            capacity,
            writer_closed: false,
            reader_gone: false,
            reader: None,
            writer: None,
        }
    }

    fn poll_read(&mut self, waker: &Waker, out: &mut Vec<u8>, max: usize) -> Poll<usize> {
        if !self.data.is_empty() {
            let n = max.min(self.data.len());
            out.extend(self.data.drain(..n));
            if let Some(w) = self.writer.take() {
                w.wake();
            }
            Poll::Ready(n)
        } else if self.writer_closed {
            Poll::Ready(0)
        } else {
            self.reader = Some(waker.clone());
            Poll::Pending
        }
    }

    fn poll_write(&mut self, waker: &Waker, data: &[u8]) -> Poll<io::Result<usize>> {
        if self.reader_gone {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        if self.writer_closed {
            return Poll::Ready(Err(io::Error::other("write after shutdown")));
        }
        let room = self.capacity - self.data.len();
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if room == 0 {
            self.writer = Some(waker.clone());
            return Poll::Pending;
        }
        let n = room.min(data.len());
        self.data.extend(&data[..n]);
        if let Some(w) = self.reader.take() {
            w.wake();
        }
        Poll::Ready(Ok(n))
    }

    fn close_writer(&mut self) {
        self.writer_closed = true;
        if let Some(w) = self.reader.take() {
            w.wake();
        }
    }

    fn close_reader(&mut self) {
        self.reader_gone = true;
        if let Some(w) = self.writer.take() {
            w.wake();
        }
    }
}

/// The server side of an in-memory pipe: hand it to a service's `serve`.
pub struct MemConn {
    shared: Rc<RefCell<Shared>>,
    peer: SocketAddr,
    /// What the context says [`Context::identity`] is.
    identity: Option<Box<str>>,
    /// Shared with the [`Client`], which stops it and reads its records.
    detached: Detached,
}

impl MemConn {
    /// Pretends the client connects from `peer` (what the context's
    /// [`Context::peer`] says).
    pub fn with_peer(mut self, peer: SocketAddr) -> Self {
        self.peer = peer;
        self
    }

    /// Pretends the client authenticated as `identity` (what the context's
    /// [`Context::identity`] says), as a verified TLS client certificate would.
    pub fn with_identity(mut self, identity: &str) -> Self {
        self.identity = Some(identity.into());
        self
    }

    /// A detached context for this connection: its peer and identity, stopped by
    /// [`Client::stop_server`], recording into [`Client::recorded_requests`].
    pub fn context(&self) -> Context {
        let cx = self.detached.context(self.peer);
        if let Some(identity) = &self.identity {
            cx.set_identity(identity.clone());
        }
        cx
    }
}

/// One read from `direction` of the pipe into the spare capacity of `buf`.
async fn read_from(
    shared: &RefCell<Shared>,
    direction: fn(&mut Shared) -> &mut Direction,
    mut buf: Vec<u8>,
) -> BufResult<usize> {
    let spare = buf.capacity() - buf.len();
    if spare == 0 {
        return (Err(no_spare_capacity()), buf);
    }
    let n = std::future::poll_fn(|cx| {
        direction(&mut shared.borrow_mut()).poll_read(cx.waker(), &mut buf, spare)
    })
    .await;
    (Ok(n), buf)
}

/// One write of `buf[from..]` into `direction` of the pipe.
async fn write_to(
    shared: &RefCell<Shared>,
    direction: fn(&mut Shared) -> &mut Direction,
    buf: Vec<u8>,
    from: usize,
) -> BufResult<usize> {
    let res = std::future::poll_fn(|cx| {
        direction(&mut shared.borrow_mut()).poll_write(cx.waker(), &buf[from..])
    })
    .await;
    (res, buf)
}

/// What has already arrived in `direction` of the pipe, without waiting (see
/// [`Conn::try_read`]).
fn try_read_from(
    shared: &RefCell<Shared>,
    direction: fn(&mut Shared) -> &mut Direction,
    buf: &mut Vec<u8>,
) -> io::Result<Option<usize>> {
    let spare = buf.capacity() - buf.len();
    if spare == 0 {
        return Err(no_spare_capacity());
    }
    let mut shared = shared.borrow_mut();
    let input = direction(&mut shared);
    if input.data.is_empty() && !input.writer_closed {
        return Ok(None);
    }
    match input.poll_read(Waker::noop(), buf, spare) {
        Poll::Ready(n) => Ok(Some(n)),
        Poll::Pending => Ok(None),
    }
}

impl Conn for MemConn {
    async fn read(&mut self, buf: Vec<u8>) -> BufResult<usize> {
        read_from(&self.shared, |s| &mut s.to_server, buf).await
    }

    async fn write(&mut self, buf: Vec<u8>, from: usize) -> BufResult<usize> {
        let done = write_to(&self.shared, |s| &mut s.to_client, buf, from).await;
        self.shared.borrow_mut().writes += 1;
        done
    }

    fn try_read(&mut self, buf: &mut Vec<u8>) -> io::Result<Option<usize>> {
        try_read_from(&self.shared, |s| &mut s.to_server, buf)
    }

    async fn readable(&mut self) -> io::Result<()> {
        std::future::poll_fn(|cx| {
            let mut shared = self.shared.borrow_mut();
            let input = &mut shared.to_server;
            if !input.data.is_empty() || input.writer_closed {
                Poll::Ready(Ok(()))
            } else {
                input.reader = Some(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }

    fn peer_closed(&self) -> bool {
        let s = self.shared.borrow();
        s.to_client.reader_gone
    }

    /// After the client's [`Client::close_write`] (or drop), unread bytes or not, like a
    /// socket's `POLLRDHUP`.
    fn peer_finished_sending(&self) -> bool {
        let s = self.shared.borrow();
        s.to_server.writer_closed || s.to_client.reader_gone
    }

    async fn shutdown(&mut self) -> io::Result<()> {
        self.shared.borrow_mut().to_client.close_writer();
        Ok(())
    }
}

impl Drop for MemConn {
    fn drop(&mut self) {
        let mut s = self.shared.borrow_mut();
        s.to_client.close_writer();
        s.to_server.close_reader();
    }
}

/// The client side of an in-memory pipe: what a test script uses to talk to the service.
pub struct Client {
    shared: Rc<RefCell<Shared>>,
    detached: Detached,
}

impl Client {
    /// Writes what fits now (up to the pipe's capacity) and returns how much that was, without
    /// waiting. `Ok(0)` for non-empty `data` means the service is not reading: backpressure.
    pub fn try_write(&self, data: &[u8]) -> io::Result<usize> {
        let waker = Waker::noop();
        match self.shared.borrow_mut().to_server.poll_write(waker, data) {
            Poll::Ready(res) => res,
            Poll::Pending => Ok(0),
        }
    }

    /// Writes all of `data`, waiting while the pipe is full.
    pub async fn write_all(&self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let n = std::future::poll_fn(|cx| {
                self.shared
                    .borrow_mut()
                    .to_server
                    .poll_write(cx.waker(), data)
            })
            .await?;
            data = &data[n..];
        }
        Ok(())
    }

    /// Waits for some bytes (at most `max`) from the service; empty means it closed.
    pub async fn read(&self, max: usize) -> Vec<u8> {
        let mut out = Vec::new();
        std::future::poll_fn(|cx| {
            self.shared
                .borrow_mut()
                .to_client
                .poll_read(cx.waker(), &mut out, max)
        })
        .await;
        out
    }

    /// Reads exactly `n` bytes; `UnexpectedEof` if the service closes first.
    pub async fn read_exact(&self, n: usize) -> io::Result<Vec<u8>> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let chunk = self.read(n - out.len()).await;
            if chunk.is_empty() {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            out.extend(chunk);
        }
        Ok(out)
    }

    /// Reads until the service closes its side.
    pub async fn read_to_end(&self) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let chunk = self.read(usize::MAX).await;
            if chunk.is_empty() {
                return out;
            }
            out.extend(chunk);
        }
    }

    /// Sends end-of-stream to the service (like `shutdown(SHUT_WR)`).
    pub fn close_write(&self) {
        self.shared.borrow_mut().to_server.close_writer();
    }

    /// The outcomes the service recorded with [`Context::record_request`], in order.
    pub fn recorded_requests(&self) -> Vec<&'static str> {
        self.detached.recorded_requests()
    }

    /// Stops the server as SIGTERM would: the service's context reports
    /// [`Context::is_stopping`], and its idle reads end at once.
    pub fn stop_server(&self) {
        self.detached.stop();
    }

    /// How many write operations the service has completed (e.g. to check that pipelined
    /// responses go out together).
    pub fn writes_by_service(&self) -> usize {
        self.shared.borrow().writes
    }

    /// Bytes the client has written that the service has not read yet.
    pub fn unread_by_service(&self) -> usize {
        self.shared.borrow().to_server.data.len()
    }

    /// Bytes the service has written that the client has not read yet.
    pub fn unread_by_client(&self) -> usize {
        self.shared.borrow().to_client.data.len()
    }
}

/// The client side as a connection, so a client protocol (a TLS client, see [`tls_connect`])
/// can run over it.
impl Conn for Client {
    async fn read(&mut self, buf: Vec<u8>) -> BufResult<usize> {
        read_from(&self.shared, |s| &mut s.to_client, buf).await
    }

    async fn write(&mut self, buf: Vec<u8>, from: usize) -> BufResult<usize> {
        write_to(&self.shared, |s| &mut s.to_server, buf, from).await
    }

    fn try_read(&mut self, buf: &mut Vec<u8>) -> io::Result<Option<usize>> {
        try_read_from(&self.shared, |s| &mut s.to_client, buf)
    }

    fn peer_closed(&self) -> bool {
        self.shared.borrow().to_server.reader_gone
    }

    fn peer_finished_sending(&self) -> bool {
        let s = self.shared.borrow();
        s.to_client.writer_closed || s.to_server.reader_gone
    }

    async fn shutdown(&mut self) -> io::Result<()> {
        self.close_write();
        Ok(())
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let mut s = self.shared.borrow_mut();
        s.to_server.close_writer();
        s.to_client.close_reader();
    }
}

/// Has `service` answer one datagram of `payload` from `peer`, as the framework's datagram
/// loop does (same reply buffers and limits: replies beyond the datagram's size are refused);
/// returns the replies and their destinations.
pub fn answer_datagram<S: crate::datagram::DatagramService>(
    service: &S,
    payload: &[u8],
    peer: SocketAddr,
) -> Vec<(Vec<u8>, SocketAddr)> {
    use crate::datagram::{AnswerBatch, Packet, Packets, MAX_REPLIES};
    let incoming = [Packet {
        buf: payload.to_vec(),
        peer,
    }];
    let mut outgoing = Packets::new(MAX_REPLIES, payload.len());
    let mut batch = AnswerBatch {
        incoming: &incoming,
        admitted: &[true],
        outgoing: &mut outgoing,
        refused: 0,
    };
    service.answer_batch(&mut batch);
    outgoing
        .filled()
        .iter()
        .map(|p| (p.buf.clone(), p.peer))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_flow_both_ways_and_eof_is_seen() {
        block_on(async {
            let (mut conn, client) = pipe_with_capacity(4);
            client.write_all(b"ab").await.unwrap();
            client.close_write();
            let (n, buf) = conn.read(Vec::with_capacity(8)).await;
            assert_eq!((n.unwrap(), &buf[..]), (2, &b"ab"[..]));
            let (n, _) = conn.read(Vec::with_capacity(8)).await;
            assert_eq!(n.unwrap(), 0);
            let writer = tokio::task::spawn_local(async move {
                let (res, _) = conn.write_all(b"0123456789".to_vec()).await;
                res
            });
            assert_eq!(client.read_exact(10).await.unwrap(), b"0123456789");
            writer.await.unwrap().unwrap();
            assert_eq!(client.read_to_end().await, b"");
        });
    }

    #[test]
    fn full_pipe_pushes_back_and_read_needs_spare_capacity() {
        block_on(async {
            let (mut conn, client) = pipe_with_capacity(3);
            assert_eq!(client.try_write(b"abcdef").unwrap(), 3);
            assert_eq!(client.try_write(b"def").unwrap(), 0);
            let (res, _) = conn.read(Vec::new()).await;
            assert_eq!(res.unwrap_err().kind(), io::ErrorKind::InvalidInput);
            drop(conn);
            assert_eq!(
                client.try_write(b"x").unwrap_err().kind(),
                io::ErrorKind::BrokenPipe
            );
        });
    }
}
