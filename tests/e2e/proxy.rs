//! PROXY protocol end to end: a real HAProxy (Debian's `haproxy`, `mode tcp`, `send-proxy` and
//! `send-proxy-v2`) in front of the real binary. Clients bind their sockets to other loopback
//! addresses (127.0.0.5, 127.0.0.6) so the address a header names differs from the TCP peer
//! (HAProxy, 127.0.0.1), and the tests show which one wharf used: `allow_from`, exec's log
//! line, the refusal counters. Also: headers from where they may not come, malformed and
//! truncated headers in bulk beside a client that must stay served, HAProxy's health checks
//! (v2 `LOCAL`), and PROXY in front of TLS.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use socket2::{Domain, Socket, Type};

use crate::harness::*;
use crate::pki::Pki;

/// Where the "real" clients connect from.
const CLIENT: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 5);
/// Another client, outside `allow_from`.
const OTHER_CLIENT: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);
/// A peer that is not a trusted proxy.
const UNTRUSTED: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);

/// HAProxy's two ways of sending the header, and the `proxy_protocol` value that takes it.
const SEND: [(&str, &str); 2] = [("send-proxy", "v1"), ("send-proxy-v2", "v2")];

/// A running `haproxy -db` in front of one wharf address, killed on drop.
struct Haproxy {
    child: Child,
    /// Where clients connect.
    addr: SocketAddr,
    /// The admin socket (`show stat`).
    stats: PathBuf,
    _dir: TempDir,
}

impl Haproxy {
    /// Starts HAProxy in TCP mode with `servers` (the `server` lines of its one backend), or
    /// `None` (skipped, or failed under CI) when haproxy is not installed.
    fn start(servers: &str) -> Option<Haproxy> {
        if !have_tool("haproxy", "-v") {
            return None;
        }
        let dir = TempDir::new();
        let addr = free_addr();
        let stats = dir.0.join("stats.sock");
        let config = format!(
            "global\n  stats socket {} mode 600 level admin\n\
             defaults\n  mode tcp\n  timeout connect 2s\n  timeout client 30s\n  \
             timeout server 30s\n\
             frontend fe\n  bind {addr}\n  default_backend be\n\
             backend be\n{servers}\n",
            stats.display()
        );
        let path = dir.write("haproxy.cfg", &config);
        let mut child = Command::new("haproxy")
            .arg("-f")
            .arg(&path)
            .arg("-db")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawning haproxy");
        // Ready when its admin socket answers (listeners are bound before): a probe through
        // the frontend would reach wharf and be counted.
        let deadline = Instant::now() + Duration::from_secs(10);
        while UnixStream::connect(&stats).is_err() {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("haproxy exited ({status}) with config:\n{config}");
            }
            assert!(Instant::now() < deadline, "haproxy not listening on {addr}");
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(Haproxy {
            child,
            addr,
            stats,
            _dir: dir,
        })
    }

    /// One `server` line (a backend for `wharf`) that sends the header its `send` option
    /// names on every connection.
    fn server_line(name: &str, wharf: SocketAddr, send: &str) -> String {
        format!("  server {name} {wharf} {send}\n")
    }

    /// The status HAProxy gives `server` (`UP`, `DOWN`, ...) in `show stat`.
    fn status(&self, server: &str) -> String {
        let mut s = UnixStream::connect(&self.stats).unwrap();
        s.write_all(b"show stat\n").unwrap();
        let mut csv = String::new();
        s.read_to_string(&mut csv).unwrap();
        let header: Vec<&str> = csv.lines().next().unwrap().split(',').collect();
        let column = header.iter().position(|h| *h == "status").unwrap();
        csv.lines()
            .map(|l| l.split(',').collect::<Vec<_>>())
            .find(|f| f[0] == "be" && f[1] == server)
            .map(|f| f[column].to_string())
            .unwrap_or_else(|| panic!("no server {server} in:\n{csv}"))
    }

    /// Waits until HAProxy says `server` is `want` (`UP`/`DOWN`), at most `limit`.
    fn wait_status(&self, server: &str, want: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let got = self.status(server);
            if got == want {
                return;
            }
            if Instant::now() > deadline {
                let mut s = UnixStream::connect(&self.stats).unwrap();
                s.write_all(b"show stat\n").unwrap();
                let mut csv = String::new();
                s.read_to_string(&mut csv).unwrap();
                panic!("{server} is {got}, want {want}:\n{csv}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP connection to `to` from the loopback address `from` (bound first), with a read
/// timeout so a broken server fails the test instead of hanging it.
fn connect_from(from: Ipv4Addr, to: SocketAddr) -> TcpStream {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    socket
        .bind(&SocketAddr::new(IpAddr::V4(from), 0).into())
        .unwrap();
    socket
        .connect_timeout(&to.into(), Duration::from_secs(5))
        .unwrap();
    let stream: TcpStream = socket.into();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
}

/// One exec exchange as the tutorial's client does it: the command, its size, `ok`, the
/// output. `None` if the connection is closed first (a refusal).
fn exec(stream: &mut TcpStream, command: &str) -> Option<String> {
    stream.write_all(command.as_bytes()).ok()?;
    stream.write_all(b"\n").ok()?;
    let mut size = [0u8; 32];
    let n = stream.read(&mut size).ok().filter(|&n| n > 0)?;
    let size: usize = std::str::from_utf8(&size[..n])
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    stream.write_all(b"ok").ok()?;
    let mut out = vec![0u8; size];
    stream.read_exact(&mut out).ok()?;
    Some(String::from_utf8(out).unwrap())
}

fn rejected<'a>(
    service: &'a str,
    plugin: &'a str,
    backend: &'a str,
    reason: &'a str,
) -> Vec<(&'a str, &'a str)> {
    vec![
        ("service", service),
        ("plugin", plugin),
        ("backend", backend),
        ("reason", reason),
    ]
}

/// An exec service that takes `proxy_protocol = versions` from HAProxy (127.0.0.1) and serves
/// only clients from 127.0.0.5.
fn exec_behind_proxy(dir: &TempDir, versions: &str) -> String {
    format!(
        "[server]\nworkers = 2\nshutdown_grace = \"2s\"\n\
         [metrics]\nlisten = \"127.0.0.1:0\"\n\
         [access_log]\npath = \"{}/access.log\"\nformat = \"logfmt\"\n\
         [services.exec]\nplugin = \"exec\"\nlisten = \"127.0.0.1:0\"\n\
         proxy_protocol = \"{versions}\"\ntrusted_proxies = [\"127.0.0.1/32\"]\n\
         allow_from = [\"{CLIENT}/32\"]\n\
         [services.exec.options]\ncwd = \"{}\"\ntimeout = \"3s\"\n\
         [services.exec.options.commands]\n\
         echo = {{ argv = [\"echo\"], allow_args = true }}\n",
        dir.0.display(),
        dir.0.display()
    )
}

#[test]
fn a_client_through_haproxy_is_seen_as_itself() {
    for backend in backends() {
        for (send, versions) in SEND {
            let dir = TempDir::new();
            let server = Server::start(&exec_behind_proxy(&dir, versions), backend);
            let wharf = server.addr("exec");
            let Some(haproxy) = Haproxy::start(&Haproxy::server_line("s1", wharf, send)) else {
                return;
            };
            // 127.0.0.5 is inside allow_from: served, and logged as itself.
            let mut client = connect_from(CLIENT, haproxy.addr);
            let local = client.local_addr().unwrap();
            let out = exec(&mut client, "echo through haproxy");
            assert_eq!(
                out.as_deref(),
                Some("through haproxy\n"),
                "{backend} {send}"
            );
            server.wait_log(&format!("peer={local}"), 1, Duration::from_secs(10));
            let line = server
                .log()
                .lines()
                .find(|l| l.contains("exec: command"))
                .unwrap()
                .to_string();
            assert!(line.contains(&format!("peer={local}")), "{line}");
            drop(client);
            // The access log names the client, and HAProxy as the proxy, on the request line
            // and on the connection line.
            let access = dir.0.join("access.log");
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            let named = |text: &str| {
                text.lines()
                    .filter(|l| {
                        l.contains(&format!("client={local}")) && l.contains("proxy=127.0.0.1:")
                    })
                    .count()
            };
            let mut text = String::new();
            while named(&text) < 2 && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
                text = std::fs::read_to_string(&access).unwrap_or_default();
            }
            assert!(
                named(&text) >= 2 && text.contains("command=echo"),
                "{backend} {send}: {text}"
            );

            // 127.0.0.6, through the same HAProxy (same TCP peer), is not.
            let mut other = connect_from(OTHER_CLIENT, haproxy.addr);
            assert_eq!(exec(&mut other, "echo should not run"), None);
            let labels = rejected("exec", "exec", backend, "allow_from");
            server.wait_metric("wharf_connections_rejected_total", &labels, 1.0);
            let labels = rejected("exec", "exec", backend, "proxy_protocol");
            let refused = server.metric("wharf_connections_rejected_total", &labels);
            assert_eq!(refused.unwrap_or(0.0), 0.0, "{backend} {send}");
            assert_eq!(server.log_count("should not run"), 0);
        }
    }
}

#[test]
fn haproxy_in_front_of_a_unix_socket_names_the_tcp_client() {
    for backend in backends() {
        let dir = TempDir::new();
        let path = dir.0.join("exec.sock");
        // The exec service on a Unix socket: who may send a header is who may connect (the
        // file's mode), and the header's client is an IP client like any other.
        let config = exec_behind_proxy(&dir, "v2")
            .replace(
                "plugin = \"exec\"\nlisten = \"127.0.0.1:0\"\n",
                &format!("plugin = \"exec\"\nlisten = \"unix:{}\"\n", path.display()),
            )
            .replace("trusted_proxies = [\"127.0.0.1/32\"]\n", "");
        let server = Server::start(&config, backend);
        let line = format!("  server s1 unix@{} send-proxy-v2\n", path.display());
        let Some(haproxy) = Haproxy::start(&line) else {
            return;
        };
        let mut client = connect_from(CLIENT, haproxy.addr);
        let local = client.local_addr().unwrap();
        let out = exec(&mut client, "echo over unix");
        assert_eq!(out.as_deref(), Some("over unix\n"), "{backend}");
        server.wait_log(&format!("peer={local}"), 1, Duration::from_secs(10));
        drop(client);

        // Outside allow_from, through the same HAProxy: refused by the header's address.
        let mut other = connect_from(OTHER_CLIENT, haproxy.addr);
        assert_eq!(exec(&mut other, "echo should not run"), None, "{backend}");
        let labels = rejected("exec", "exec", backend, "allow_from");
        server.wait_metric("wharf_connections_rejected_total", &labels, 1.0);

        // Straight to the socket without a header: refused as a PROXY protocol failure.
        let mut direct = UnixStream::connect(&path).unwrap();
        direct
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let _ = direct.write_all(b"echo no header\n");
        let mut buf = [0u8; 64];
        assert!(matches!(direct.read(&mut buf), Ok(0) | Err(_)), "{backend}");
        let labels = rejected("exec", "exec", backend, "proxy_protocol");
        server.wait_metric("wharf_connections_rejected_total", &labels, 1.0);
        assert_eq!(server.log_count("should not run"), 0);
        assert_eq!(server.log_count("no header"), 0);
    }
}

/// An echo service (uppercasing) behind a proxy at 127.0.0.1, with `extra` service keys.
fn echo_behind_proxy(versions: &str, extra: &str) -> String {
    echo_config(&format!(
        "proxy_protocol = \"{versions}\"\ntrusted_proxies = [\"127.0.0.1/32\"]\n{extra}"
    ))
}

#[test]
fn no_header_or_a_header_from_an_untrusted_peer_is_refused() {
    for backend in backends() {
        let server = Server::start(&echo_behind_proxy("any", ""), backend);
        let wharf = server.addr("echo");
        let labels = rejected("echo", "echo", backend, "proxy_protocol");

        // From the trusted proxy's address, a valid header: served, and its bytes counted as
        // received (they are on the wire).
        let header = format!("PROXY TCP4 {CLIENT} 127.0.0.1 40000 {}\r\n", wharf.port());
        let mut s = connect_from(Ipv4Addr::LOCALHOST, wharf);
        s.write_all(header.as_bytes()).unwrap();
        assert_eq!(echo_once(&mut s, b"hello\n"), b"HELLO\n");
        drop(s);
        let received = [
            ("service", "echo"),
            ("plugin", "echo"),
            ("backend", backend),
        ];
        let want = (header.len() + 6) as f64;
        server.wait_metric("wharf_received_bytes_total", &received, want);

        // No header: the first bytes are not one, so it is closed at once.
        let mut s = connect_from(Ipv4Addr::LOCALHOST, wharf);
        s.write_all(b"hello\n").unwrap();
        assert!(closed_within(&mut s, Duration::from_secs(5)));
        server.wait_metric("wharf_connections_rejected_total", &labels, 1.0);

        // A valid header from a peer outside trusted_proxies: closed at accept.
        let mut s = connect_from(UNTRUSTED, wharf);
        let _ = s.write_all(header.as_bytes());
        let _ = s.write_all(b"hello\n");
        assert!(closed_within(&mut s, Duration::from_secs(5)));
        server.wait_metric("wharf_connections_rejected_total", &labels, 2.0);
        let accepted = [
            ("service", "echo"),
            ("plugin", "echo"),
            ("backend", backend),
        ];
        server.wait_metric("wharf_connections_accepted_total", &accepted, 1.0);
    }
}

/// Hostile headers a trusted peer could send (a compromised or misconfigured proxy, or a
/// client where trusted_proxies is too wide): each must be refused.
fn hostile_headers() -> Vec<Vec<u8>> {
    let sig = b"\r\n\r\n\0\r\nQUIT\n";
    let v2 = |ver_cmd: u8, fam: u8, len: u16, body: &[u8]| {
        let mut h = sig.to_vec();
        h.extend_from_slice(&[ver_cmd, fam]);
        h.extend_from_slice(&len.to_be_bytes());
        h.extend_from_slice(body);
        h
    };
    vec![
        b"GET / HTTP/1.0\r\n\r\n".to_vec(),
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n".to_vec(),
        b"PROXY TCP9 1.2.3.4 5.6.7.8 1 2\r\n".to_vec(),
        b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 2\r\n".to_vec(),
        [b"PROXY TCP4 ".as_slice(), [b'9'; 200].as_slice()].concat(),
        b"PROXY TCP4 1.2.3.4".to_vec(), // truncated: then silence
        v2(0x31, 0x11, 12, &[0; 12]),   // version 3
        v2(0x21, 0x12, 12, &[0; 12]),   // UDP
        v2(0x21, 0x11, 60000, &[]),     // oversized
        v2(0x21, 0x21, 12, &[0; 12]),   // IPv6 in 12 bytes
        v2(0x21, 0x11, 12, &[0; 5]),    // truncated: then silence
        sig[..7].to_vec(),              // truncated signature: then silence
    ]
}

#[test]
fn hostile_headers_in_bulk_leave_a_client_through_haproxy_served() {
    const HOSTILE_THREADS: usize = 6;
    const RUN: Duration = Duration::from_secs(4);
    /// Each exchange of the normal client, through HAProxy, must finish within this.
    const BOUND: Duration = Duration::from_secs(2);
    for backend in backends() {
        let extra = "proxy_header_timeout = \"1s\"\nmax_connections = 512\n";
        let server = Server::start(&echo_behind_proxy("any", extra), backend);
        let wharf = server.addr("echo");
        let Some(haproxy) = Haproxy::start(&Haproxy::server_line("s1", wharf, "send-proxy-v2"))
        else {
            return;
        };
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicUsize::new(0));
        let hostile: Vec<_> = (0..HOSTILE_THREADS)
            .map(|t| {
                let (stop, sent) = (Arc::clone(&stop), Arc::clone(&sent));
                std::thread::spawn(move || {
                    let headers = hostile_headers();
                    let mut i = t;
                    while !stop.load(Ordering::Relaxed) {
                        let mut s = connect_from(Ipv4Addr::LOCALHOST, wharf);
                        let _ = s.write_all(&headers[i % headers.len()]);
                        sent.fetch_add(1, Ordering::Relaxed);
                        // Refused at once, or (truncated) at proxy_header_timeout.
                        assert!(
                            closed_within(&mut s, Duration::from_secs(5)),
                            "header {} not refused",
                            i % headers.len()
                        );
                        i += 1;
                    }
                })
            })
            .collect();
        let started = Instant::now();
        let mut exchanges = 0;
        let mut slowest = Duration::ZERO;
        while started.elapsed() < RUN {
            let t = Instant::now();
            let mut s = connect_from(CLIENT, haproxy.addr);
            let msg = format!("ping {exchanges}\n");
            assert_eq!(
                echo_once(&mut s, msg.as_bytes()),
                msg.to_uppercase().as_bytes()
            );
            slowest = slowest.max(t.elapsed());
            exchanges += 1;
            std::thread::sleep(Duration::from_millis(50));
        }
        stop.store(true, Ordering::Relaxed);
        for h in hostile {
            h.join().unwrap();
        }
        assert!(slowest < BOUND, "{backend}: slowest exchange {slowest:?}");
        assert!(exchanges >= 10, "{backend}: only {exchanges} exchanges");
        // Every hostile connection was refused and counted; every normal one admitted.
        let refused = sent.load(Ordering::Relaxed) as f64;
        assert!(
            refused >= 12.0,
            "{backend}: only {refused} hostile connections"
        );
        let labels = rejected("echo", "echo", backend, "proxy_protocol");
        server.wait_metric("wharf_connections_rejected_total", &labels, refused);
        let accepted = [
            ("service", "echo"),
            ("plugin", "echo"),
            ("backend", backend),
        ];
        server.wait_metric(
            "wharf_connections_accepted_total",
            &accepted,
            exchanges as f64,
        );
    }
}

#[test]
fn haproxy_health_checks_with_a_header_mark_the_server_up() {
    let backend = "epoll";
    for (send, versions) in SEND {
        let server = Server::start(&echo_behind_proxy(versions, ""), backend);
        let wharf = server.addr("echo");
        // Both servers are this wharf, checked with a real exchange (echo answers uppercase):
        // `up` sends the header on its checks (v2: LOCAL; HAProxy's `check-send-proxy`),
        // `plain` sends none, so wharf refuses its checks.
        let check = "check inter 200ms fall 1 rise 1";
        let servers = format!(
            "  option tcp-check\n  tcp-check send ping\\n\n  tcp-check expect string PING\n\
             {}  server plain {wharf} {check}\n",
            Haproxy::server_line("up", wharf, &format!("{send} {check} check-send-proxy")),
        );
        let Some(haproxy) = Haproxy::start(&servers) else {
            return;
        };
        haproxy.wait_status("up", "UP", Duration::from_secs(10));
        haproxy.wait_status("plain", "DOWN", Duration::from_secs(10));
        // A few more checks: `up` stays up.
        std::thread::sleep(Duration::from_millis(600));
        assert_eq!(haproxy.status("up"), "UP", "{send}");
        let labels = rejected("echo", "echo", backend, "proxy_protocol");
        assert!(
            server
                .metric("wharf_connections_rejected_total", &labels)
                .unwrap()
                >= 1.0
        );
    }
}

#[test]
fn proxy_v2_in_front_of_tls_names_the_tls_client() {
    for backend in backends() {
        let dir = TempDir::new();
        let pki = Pki::new(&dir.0, "proxy");
        let cert = pki.server("server");
        let config = format!(
            "[server]\nworkers = 1\nshutdown_grace = \"5s\"\n\
             [metrics]\nlisten = \"127.0.0.1:0\"\n\
             [services.echo]\nplugin = \"echo\"\nlisten = \"127.0.0.1:0\"\n\
             proxy_protocol = \"v2\"\ntrusted_proxies = [\"127.0.0.1/32\"]\n\
             allow_from = [\"{CLIENT}/32\"]\n\
             [services.echo.options]\ntransform = \"upper\"\n\
             [services.echo.tls]\ncert = \"{}\"\nkey = \"{}\"\n",
            cert.cert.display(),
            cert.key.display()
        );
        let server = Server::start(&config, backend);
        let wharf = server.addr("echo");
        let Some(haproxy) = Haproxy::start(&Haproxy::server_line("s1", wharf, "send-proxy-v2"))
        else {
            return;
        };
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(pki.ca_file()).unwrap() {
            roots.add(c.unwrap()).unwrap();
        }
        let tls = Arc::new(
            rustls::ClientConfig::builder()
                .with_root_certificates(roots)
                .with_no_client_auth(),
        );
        let session = |from: Ipv4Addr| {
            let name = ServerName::try_from("localhost").unwrap();
            let conn = rustls::ClientConnection::new(Arc::clone(&tls), name).unwrap();
            rustls::StreamOwned::new(conn, connect_from(from, haproxy.addr))
        };
        // From 127.0.0.5 (allowed): a whole TLS session through HAProxy.
        let mut s = session(CLIENT);
        s.write_all(b"secret hello\n").unwrap();
        let mut back = [0u8; 13];
        s.read_exact(&mut back).unwrap();
        assert_eq!(&back, b"SECRET HELLO\n", "{backend}");
        // From 127.0.0.6 (same proxy, not allowed): refused before the handshake.
        let mut s = session(OTHER_CLIENT);
        match s.write_all(b"x\n").and_then(|()| s.read(&mut back)) {
            Ok(0) | Err(_) => {}
            Ok(n) => panic!("{backend}: a refused client read {n} bytes"),
        }
        let labels = rejected("echo", "echo", backend, "allow_from");
        server.wait_metric("wharf_connections_rejected_total", &labels, 1.0);
    }
}

#[test]
fn bench_send_proxy_loads_a_service_behind_proxy_protocol() {
    let backend = "epoll";
    for (version, proxy_protocol) in [("v1", "v1"), ("v2", "v2")] {
        // The bench client connects from 127.0.0.1 and its header names the same address.
        let extra = "allow_from = [\"127.0.0.1/32\"]\n";
        let server = Server::start(&echo_behind_proxy(proxy_protocol, extra), backend);
        let addr = server.addr("echo").to_string();
        let run = |more: &[&str]| {
            let out = Command::new(WHARF)
                .args([
                    "bench",
                    "echo",
                    &addr,
                    "-c",
                    "4",
                    "--threads",
                    "1",
                    "--json",
                ])
                .args(["--duration", "0.5", "--warmup", "0.1"])
                .args(more)
                .output()
                .unwrap();
            let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            report
        };
        let report = run(&["--send-proxy", version]);
        assert!(report["requests"].as_u64().unwrap() > 100, "{report}");
        assert_eq!(report["errors"].as_u64(), Some(0), "{report}");
        assert_eq!(report["send_proxy"].as_str(), Some(version));
        let labels = rejected("echo", "echo", backend, "proxy_protocol");
        // Only the probe `wharf bench` makes to pick an address (it sends nothing) is refused.
        let refused = server.metric("wharf_connections_rejected_total", &labels);
        assert!(refused.unwrap_or(0.0) <= 1.0, "{version}: {refused:?}");
        // Without the header every connection is refused.
        let report = run(&[]);
        assert_eq!(report["requests"].as_u64(), Some(0), "{report}");
        let refused_after = server.metric("wharf_connections_rejected_total", &labels);
        assert!(
            refused_after.unwrap() >= refused.unwrap_or(0.0) + 4.0,
            "{version}"
        );
    }
}
