//! The byte stream under every `wharf client`: a TCP or Unix-domain socket ([`Socket`]:
//! `host:port`, `unix:/path`, `unix:@name`), plain or with TLS over it (`--tls`).
//!
//! TLS here is rustls on a blocking socket. Not `rustls::StreamOwned`: `client echo` reads on
//! one thread while another sends (so a long stdin never waits for the answer to be read), and
//! a `StreamOwned` cannot be shared by two threads. Instead both ends share the rustls
//! connection behind a mutex, and each does its socket IO outside that lock: the receiver
//! reads the socket and feeds the records in, the sender encrypts under the lock and writes
//! after releasing it. So neither can block the other (an echo server that stops reading
//! until its answers are read cannot deadlock the pair), and TLS records reach the socket in
//! order because only one sender writes at a time.
//!
//! The flags, the rustls configuration and the wording of TLS failures live in
//! `wharf_bench::tls`, shared with `wharf bench --tls`.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rustls::ClientConnection;
use wharf_bench::tls::ClientTls;

/// Bytes of the server's first answer kept to quote when it is not TLS.
const HEAD: usize = 64;
/// Ciphertext read from the socket at once: at most one TLS record's worth, so the plaintext
/// it decrypts to always fits rustls's receive buffer.
const RECORD: usize = 16 * 1024 + 256;

/// A connected stream socket: TCP, or Unix-domain.
pub enum Socket {
    Tcp(TcpStream),
    Unix(UnixStream),
}

/// Runs the same expression on either kind of socket.
macro_rules! on_socket {
    ($socket:expr, $s:ident => $body:expr) => {
        match $socket {
            Socket::Tcp($s) => $body,
            Socket::Unix($s) => $body,
        }
    };
}

impl Socket {
    /// Connects to `addr`: `host:port`, or a Unix socket as `wharf serve`'s `listen` writes
    /// it (`unix:/run/wharf/x.sock`, `unix:@name`).
    pub fn connect(addr: &str) -> io::Result<Socket> {
        if addr.starts_with("unix:") {
            let listen: wharf_core::listen::Listen = addr
                .parse()
                .map_err(|e: String| io::Error::new(io::ErrorKind::InvalidInput, e))?;
            let wharf_core::listen::Listen::Unix(name) = listen else {
                unreachable!("a unix: address parses as a Unix name")
            };
            return Ok(Socket::Unix(match name {
                wharf_core::listen::UnixName::Path(path) => UnixStream::connect(path)?,
                wharf_core::listen::UnixName::Abstract(name) => {
                    use std::os::linux::net::SocketAddrExt;
                    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
                    UnixStream::connect_addr(&addr)?
                }
            }));
        }
        let addrs: Vec<_> = addr.to_socket_addrs()?.collect();
        let stream = TcpStream::connect(&addrs[..])?;
        stream.set_nodelay(true)?;
        Ok(Socket::Tcp(stream))
    }

    fn try_clone(&self) -> io::Result<Socket> {
        Ok(match self {
            Socket::Tcp(s) => Socket::Tcp(s.try_clone()?),
            Socket::Unix(s) => Socket::Unix(s.try_clone()?),
        })
    }

    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        on_socket!(self, s => s.set_read_timeout(timeout))
    }

    fn set_nonblocking(&self, nonblocking: bool) -> io::Result<()> {
        on_socket!(self, s => s.set_nonblocking(nonblocking))
    }

    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        on_socket!(self, s => s.shutdown(how))
    }

    /// `recv(MSG_WAITALL)`: waits in the kernel until `buf` is full, and returns fewer bytes
    /// only at the end of the stream, on an error or timeout after some data, or on a signal.
    fn recv_waitall(&self, buf: &mut [u8]) -> io::Result<usize> {
        let fd = on_socket!(self, s => s.as_raw_fd());
        // SAFETY: `fd` is this socket's, open while `self` lives; `buf` is valid for writes
        // of `buf.len()` bytes.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_WAITALL) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

impl Read for &Socket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        on_socket!(*self, s => (&*s).read(buf))
    }
}

impl Write for &Socket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        on_socket!(*self, s => (&*s).write(buf))
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A connection to a service, plain or TLS; clones share it (one may read while another
/// writes).
pub enum Transport {
    Plain(Socket),
    Tls(TlsStream),
}

impl Transport {
    /// Wraps a connected socket: as it is, or after a completed TLS handshake (a failed one
    /// is one line saying what failed).
    pub fn new(tcp: Socket, tls: Option<&ClientTls>) -> io::Result<Transport> {
        Ok(match tls {
            None => Transport::Plain(tcp),
            Some(tls) => Transport::Tls(TlsStream::handshake(tcp, tls)?),
        })
    }

    /// A second handle on the same connection.
    pub fn try_clone(&self) -> io::Result<Transport> {
        Ok(match self {
            Transport::Plain(tcp) => Transport::Plain(tcp.try_clone()?),
            Transport::Tls(tls) => Transport::Tls(TlsStream {
                shared: tls.shared.clone(),
                tcp: tls.tcp.try_clone()?,
                raw: Vec::new(),
            }),
        })
    }

    fn tcp(&self) -> &Socket {
        match self {
            Transport::Plain(tcp) => tcp,
            Transport::Tls(tls) => &tls.tcp,
        }
    }

    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.tcp().set_read_timeout(timeout)
    }

    /// Non-blocking reads answer what has arrived, or `WouldBlock`.
    pub fn set_nonblocking(&self, nonblocking: bool) -> io::Result<()> {
        self.tcp().set_nonblocking(nonblocking)
    }

    /// Reads into `buf` for bulk data: on a plain socket, one call waits until `buf` is full
    /// (fewer, larger reads); through TLS, as `read`. Fewer bytes come at the end of the
    /// stream, on a timeout after some data, or on a signal.
    pub fn read_waiting(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Transport::Plain(socket) => socket.recv_waitall(buf),
            Transport::Tls(tls) => tls.read(buf),
        }
    }

    /// Says "nothing more from me" and keeps reading: a TCP half-close, after TLS's
    /// close_notify.
    pub fn shutdown_write(&self) -> io::Result<()> {
        if let Transport::Tls(tls) = self {
            tls.close_notify()?;
        }
        self.tcp().shutdown(Shutdown::Write)
    }
}

impl Read for Transport {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Transport::Plain(tcp) => (&*tcp).read(buf),
            Transport::Tls(tls) => tls.read(buf),
        }
    }
}

impl Write for Transport {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Transport::Plain(tcp) => (&*tcp).write(buf),
            Transport::Tls(tls) => tls.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Transport::Plain(tcp) => (&*tcp).flush(),
            Transport::Tls(_) => Ok(()), // every write goes out whole
        }
    }
}

/// A TLS connection over a blocking socket; see the module doc for how its handles share it.
pub struct TlsStream {
    shared: Arc<Shared>,
    tcp: Socket,
    /// This handle's buffer for ciphertext read from the socket (allocated on first read).
    raw: Vec<u8>,
}

struct Shared {
    conn: Mutex<ClientConnection>,
    /// Held by a sender from encrypting until the records are on the socket.
    sending: Mutex<()>,
    /// For explaining failures.
    tls: ClientTls,
}

impl TlsStream {
    fn handshake(tcp: Socket, tls: &ClientTls) -> io::Result<TlsStream> {
        let mut conn = ClientConnection::new(tls.config.clone(), tls.server_name.clone())
            .map_err(io::Error::other)?;
        let mut wire = Recording {
            tcp: &tcp,
            head: Vec::new(),
        };
        while conn.is_handshaking() {
            if let Err(e) = conn.complete_io(&mut wire) {
                return Err(explained(tls, e, true, &wire.head));
            }
        }
        while conn.wants_write() {
            conn.write_tls(&mut wire)?;
        }
        Ok(TlsStream {
            shared: Arc::new(Shared {
                conn: Mutex::new(conn),
                sending: Mutex::new(()),
                tls: tls.clone(),
            }),
            tcp,
            raw: Vec::new(),
        })
    }

    fn conn(&self) -> MutexGuard<'_, ClientConnection> {
        // A panic elsewhere while holding it leaves nothing half-done that matters here.
        self.shared
            .conn
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.conn().reader().read(buf) {
                // 0: the server's close_notify; UnexpectedEof: it closed without one.
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            // Outside the lock: a sender may encrypt meanwhile. WouldBlock and timeouts pass
            // through as they would on plain TCP.
            self.raw.resize(RECORD, 0);
            let n = (&self.tcp).read(&mut self.raw)?;
            let mut conn = self.conn();
            let mut data = &self.raw[..n];
            loop {
                conn.read_tls(&mut data)?; // an empty slice records the end of the stream
                if let Err(e) = conn.process_new_packets() {
                    // Tell the server why (the alert rustls queued), then the user.
                    let _ = self.send_pending(&mut conn);
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        self.shared.tls.explain_tls(&e, &[]),
                    ));
                }
                if data.is_empty() {
                    break;
                }
            }
        }
    }

    fn write(&self, buf: &[u8]) -> io::Result<usize> {
        let _sending = self.sending();
        let (n, records) = {
            let mut conn = self.conn();
            let n = conn.writer().write(buf)?;
            (n, pending(&mut conn)?)
        };
        (&self.tcp).write_all(&records)?;
        Ok(n)
    }

    fn close_notify(&self) -> io::Result<()> {
        let _sending = self.sending();
        let records = {
            let mut conn = self.conn();
            conn.send_close_notify();
            pending(&mut conn)?
        };
        (&self.tcp).write_all(&records)
    }

    /// Sends what rustls queued (an alert) while the connection is locked: only for the end.
    fn send_pending(&self, conn: &mut ClientConnection) -> io::Result<()> {
        (&self.tcp).write_all(&pending(conn)?)
    }

    fn sending(&self) -> MutexGuard<'_, ()> {
        self.shared
            .sending
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The TLS records rustls has ready to send.
fn pending(conn: &mut ClientConnection) -> io::Result<Vec<u8>> {
    let mut records = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut records)?;
    }
    Ok(records)
}

/// `e` reworded as one line saying what failed, when it is a TLS failure.
fn explained(tls: &ClientTls, e: io::Error, handshaking: bool, answer: &[u8]) -> io::Error {
    match tls.explain(&e, handshaking, answer) {
        Some(message) => io::Error::new(e.kind(), message),
        None => e,
    }
}

/// The socket during the handshake, keeping the first bytes the server sends: quoted when
/// they turn out not to be TLS.
struct Recording<'a> {
    tcp: &'a Socket,
    head: Vec<u8>,
}

impl Read for Recording<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = { self.tcp }.read(buf)?;
        let keep = n.min(HEAD.saturating_sub(self.head.len()));
        self.head.extend_from_slice(&buf[..keep]);
        Ok(n)
    }
}

impl Write for Recording<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        { self.tcp }.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
