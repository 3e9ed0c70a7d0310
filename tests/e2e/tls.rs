//! TLS services end to end: real TLS peers (openssl s_client, curl, Python's ssl, rustls)
//! against the real binary on both backends, client certificates and `allow_identities`,
//! plaintext at a TLS port, a handshake flood beside an established session, and certificate
//! rotation under traffic.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use crate::harness::*;
use crate::pki::{CertFiles, Names, Pki};

/// `[services.<name>.tls]` lines for `server`, plus `extra` lines in that table.
pub(crate) fn tls_table(name: &str, server: &CertFiles, extra: &str) -> String {
    format!(
        "[services.{name}.tls]\ncert = \"{}\"\nkey = \"{}\"\n{extra}\n",
        server.cert.display(),
        server.key.display()
    )
}

/// One echo service (uppercasing) over TLS, one worker, with `service_keys` and `tls_keys`.
fn tls_echo_config(server: &CertFiles, service_keys: &str, tls_keys: &str) -> String {
    format!(
        "[server]\nworkers = 1\nshutdown_grace = \"5s\"\n\
         [metrics]\nlisten = \"127.0.0.1:0\"\n\
         [services.echo]\nplugin = \"echo\"\nlisten = \"127.0.0.1:0\"\n{service_keys}\n\
         [services.echo.options]\ntransform = \"upper\"\n{}",
        tls_table("echo", server, tls_keys)
    )
}

fn labels<'a>(backend: &'a str, extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut l = vec![
        ("service", "echo"),
        ("plugin", "echo"),
        ("backend", backend),
    ];
    l.extend_from_slice(extra);
    l
}

/// A socket that counts the bytes through it, to compare with the server's byte counters.
pub(crate) struct Counted {
    stream: TcpStream,
    read: u64,
    written: u64,
}

impl Read for Counted {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.stream.read(buf)?;
        self.read += n as u64;
        Ok(n)
    }
}

impl Write for Counted {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.stream.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.stream.flush()
    }
}

pub(crate) type Session = rustls::StreamOwned<rustls::ClientConnection, Counted>;

pub(crate) fn client_config(ca: &Path, cert: Option<&CertFiles>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
    Arc::new(match cert {
        Some(files) => {
            let chain = CertificateDer::pem_file_iter(&files.cert)
                .unwrap()
                .collect::<Result<Vec<_>, _>>()
                .unwrap();
            let key = PrivateKeyDer::from_pem_file(&files.key).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
        None => builder.with_no_client_auth(),
    })
}

/// A TLS session to `addr` (server name `localhost`), handshaken.
pub(crate) fn tls_connect(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<Session> {
    let stream = connect(addr);
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let name = ServerName::try_from("localhost").unwrap();
    let session = rustls::ClientConnection::new(config, name).unwrap();
    let mut tls = rustls::StreamOwned::new(
        session,
        Counted {
            stream,
            read: 0,
            written: 0,
        },
    );
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock)?;
    }
    Ok(tls)
}

/// Sends `msg` and reads exactly as many bytes back.
fn roundtrip(tls: &mut Session, msg: &[u8]) -> std::io::Result<Vec<u8>> {
    tls.write_all(msg)?;
    let mut back = vec![0; msg.len()];
    tls.read_exact(&mut back)?;
    Ok(back)
}

pub(crate) fn pki() -> (TempDir, Pki, CertFiles) {
    let dir = TempDir::new();
    let pki = Pki::new(&dir.0, "main");
    let server = pki.server("server");
    (dir, pki, server)
}

#[test]
fn openssl_s_client_is_answered_and_the_byte_counters_count_the_ciphertext_exactly() {
    if !have_tool("openssl", "version") {
        return;
    }
    let (_dir, pki, cert) = pki();
    for backend in backends() {
        let server = Server::start(&tls_echo_config(&cert, "", ""), backend);
        let addr = server.addr("echo");
        assert!(server.log().contains("tls=true"), "{}", server.log());

        // A rustls client counting its socket's bytes: the counters are the wire's, exactly.
        let mut tls = tls_connect(addr, client_config(pki.ca_file(), None)).unwrap();
        let data = payload(300_000, 5);
        assert!(roundtrip(&mut tls, &data).unwrap() == data.to_ascii_uppercase());
        tls.conn.send_close_notify();
        tls.flush().unwrap();
        let mut rest = Vec::new();
        tls.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
        let l = labels(backend, &[]);
        server.wait_metric("wharf_connections_active", &l, 0.0);
        server.wait_metric("wharf_received_bytes_total", &l, tls.sock.written as f64);
        server.wait_metric("wharf_sent_bytes_total", &l, tls.sock.read as f64);
        assert!(
            tls.sock.written > data.len() as u64,
            "plaintext counted, not the wire"
        );
        let ok = labels(backend, &[("result", "ok")]);
        server.wait_metric("wharf_tls_handshakes_total", &ok, 1.0);
        server.wait_metric("wharf_tls_handshake_duration_seconds_count", &l, 1.0);

        // openssl's own client, verifying the chain and the name.
        let mut child = Command::new("openssl")
            .args(["s_client", "-quiet", "-verify_return_error", "-servername"])
            .args(["localhost", "-verify_hostname", "localhost", "-CAfile"])
            .arg(pki.ca_file())
            .args(["-connect", &addr.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .as_mut()
            .unwrap()
            .write_all(b"hello tls\n")
            .unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let mut line = [0u8; 10];
        stdout.read_exact(&mut line).unwrap();
        assert_eq!(&line, b"HELLO TLS\n");
        child.kill().unwrap();
        child.wait().unwrap();
        server.wait_metric("wharf_tls_handshakes_total", &ok, 2.0);
    }
}

#[test]
fn curl_gets_hello_over_https_reusing_the_connection() {
    if !have_tool("curl", "--version") {
        return;
    }
    let (_dir, pki, cert) = pki();
    for backend in backends() {
        let config = format!(
            "[server]\nworkers = 1\n[services.web]\nplugin = \"http-hello\"\n\
             listen = \"127.0.0.1:0\"\n{}",
            tls_table("web", &cert, "")
        );
        let server = Server::start(&config, backend);
        let url = format!("https://127.0.0.1:{}/", server.addr("web").port());
        let out = Command::new("curl")
            .args(["-sv", "--http1.1", "--cacert"])
            .arg(pki.ca_file())
            .args([&url, &url])
            .output()
            .unwrap();
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert!(out.status.success(), "{stderr}");
        assert_eq!(stdout, "Hello, WorldHello, World", "{stderr}");
        assert!(stderr.contains("Re-using existing connection"), "{stderr}");
        // http-hello offers http/1.1 by ALPN by default.
        assert!(
            stderr.contains("ALPN: server accepted http/1.1"),
            "{stderr}"
        );
    }
}

/// The tutorial's exec and download clients, their framing unchanged, inside Python's ssl.
const PYTHON_TLS_CLIENTS: &str = r#"
import socket, ssl, sys, hashlib
host, port, ca, kind = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
ctx = ssl.create_default_context(cafile=ca)
client = ctx.wrap_socket(socket.create_connection((host, port)), server_hostname="localhost")
for arg in sys.argv[5:]:
    client.send((arg if kind == "exec" else "get " + arg).encode())
    size = int(client.recv(1024).decode())
    client.send(b"ok")
    data = b""
    while len(data) < size:
        chunk = client.recv(65536)
        if not chunk:
            raise SystemExit("connection closed early")
        data += chunk
    if kind == "exec":
        print(repr(data.decode()))
    else:
        digest = b""
        while len(digest) < 32:
            digest += client.recv(32 - len(digest))
        ok = digest.decode() == hashlib.md5(data).hexdigest()
        print(arg, size, "match" if ok else "MISMATCH")
client.close()
"#;

#[test]
fn python_ssl_clients_speak_the_tutorial_framing_to_exec_and_file_get() {
    let (_dir, pki, cert) = pki();
    let files = TempDir::new();
    std::fs::write(files.0.join("small.txt"), b"hello\n").unwrap();
    std::fs::write(files.0.join("big.bin"), payload(2_000_000, 9)).unwrap();
    for backend in backends() {
        let exec = format!(
            "[services.exec.options]\ncwd = \"{}\"\n\
             [services.exec.options.commands]\necho = {{ argv = [\"echo\"], allow_args = true }}\n\
             {}{}",
            files.0.display(),
            tls_table("exec", &cert, ""),
            tls_table("files", &cert, "")
        );
        let server = Server::start(&all_plugins_config(&files.0, &exec), backend);
        let ca = pki.ca_file().to_str().unwrap();
        let Some(out) = python_client(
            PYTHON_TLS_CLIENTS,
            server.addr("exec"),
            &[ca, "exec", "echo hello over tls", "echo again"],
        ) else {
            return;
        };
        assert_eq!(out, "'hello over tls\\n'\n'again\\n'\n");
        let out = python_client(
            PYTHON_TLS_CLIENTS,
            server.addr("files"),
            &[ca, "get", "small.txt", "big.bin", "big.bin"],
        )
        .unwrap();
        assert_eq!(
            out,
            "small.txt 6 match\nbig.bin 2000000 match\nbig.bin 2000000 match\n"
        );
    }
}

#[test]
fn client_certificates_name_identities_and_allow_identities_refuses_the_rest() {
    let (dir, pki, cert) = pki();
    let other = Pki::new(&dir.0, "other");
    let ops = pki.client("ops", Names::Dns("ops"));
    let dev = pki.client("dev", Names::Uri("spiffe://example.org/dev"));
    let foreign = other.client("foreign", Names::Dns("ops"));
    for backend in backends() {
        let config = tls_echo_config(
            &cert,
            "allow_identities = [\"ops\"]",
            &format!("client_ca = \"{}\"", pki.ca_file().display()),
        );
        let server = Server::start(&config, backend);
        let addr = server.addr("echo");

        let mut tls = tls_connect(addr, client_config(pki.ca_file(), Some(&ops))).unwrap();
        assert_eq!(roundtrip(&mut tls, b"served").unwrap(), b"SERVED");

        // A verified certificate naming another identity: closed after the handshake.
        let mut tls = tls_connect(addr, client_config(pki.ca_file(), Some(&dev))).unwrap();
        let refused = roundtrip(&mut tls, b"refused?");
        assert!(refused.is_err(), "{refused:?}");
        let rejected = labels(backend, &[("reason", "identity")]);
        server.wait_metric("wharf_connections_rejected_total", &rejected, 1.0);
        server.wait_log(
            "identity=\"spiffe://example.org/dev\"",
            1,
            Duration::from_secs(10),
        );

        // No certificate, or one from another CA: the handshake fails.
        for (config, result) in [
            (client_config(pki.ca_file(), None), "no_certificate"),
            (
                client_config(pki.ca_file(), Some(&foreign)),
                "bad_certificate",
            ),
        ] {
            let outcome = tls_connect(addr, config).and_then(|mut tls| roundtrip(&mut tls, b"x"));
            assert!(outcome.is_err(), "served: {outcome:?}");
            let l = labels(backend, &[("result", result)]);
            server.wait_metric("wharf_tls_handshakes_total", &l, 1.0);
        }
        server.wait_metric(
            "wharf_tls_handshakes_total",
            &labels(backend, &[("result", "ok")]),
            2.0,
        );
    }
}

#[test]
fn plaintext_at_a_tls_port_gets_an_alert_and_a_clean_close_and_is_counted() {
    let (_dir, _pki, cert) = pki();
    for backend in backends() {
        let server = Server::start(&tls_echo_config(&cert, "", ""), backend);
        let mut s = connect(server.addr("echo"));
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"hello, anyone?\n").unwrap();
        let mut answer = Vec::new();
        // A FIN (read_to_end returns), not a reset or a hang.
        s.read_to_end(&mut answer).unwrap();
        assert_eq!(answer.first(), Some(&21), "not a TLS alert: {answer:?}");
        assert!(!answer.windows(5).any(|w| w == b"HELLO"));
        let l = labels(backend, &[("result", "protocol")]);
        server.wait_metric("wharf_tls_handshakes_total", &l, 1.0);
    }
}

/// A ClientHello as a real client sends it, to replay on sockets that then stall.
fn client_hello(config: Arc<rustls::ClientConfig>) -> Vec<u8> {
    let name = ServerName::try_from("localhost").unwrap();
    let mut session = rustls::ClientConnection::new(config, name).unwrap();
    let mut hello = Vec::new();
    session.write_tls(&mut hello).unwrap();
    hello
}

#[test]
fn a_handshake_flood_leaves_an_established_session_served_then_times_out_counted() {
    let (_dir, pki, cert) = pki();
    const SILENT: usize = 200;
    const STALLED: usize = 200;
    // Generous for a loaded CI machine, far below the handshake timeout.
    const BOUND: Duration = Duration::from_millis(1500);
    for backend in backends() {
        let config = tls_echo_config(&cert, "", "handshake_timeout = \"4s\"\nmax_handshakes = 16");
        let server = Server::start(&config, backend);
        let addr = server.addr("echo");
        let client = client_config(pki.ca_file(), None);
        let mut established = tls_connect(addr, Arc::clone(&client)).unwrap();
        assert_eq!(roundtrip(&mut established, b"before").unwrap(), b"BEFORE");

        let hello = client_hello(Arc::clone(&client));
        let flood_started = Instant::now();
        let mut flood = Vec::new();
        for i in 0..SILENT + STALLED {
            let mut s = connect(addr);
            if i >= SILENT {
                s.write_all(&hello).unwrap();
            }
            flood.push(s);
            // The established session keeps being answered while the flood builds up.
            if i % 20 == 0 {
                let asked = Instant::now();
                let msg = format!("ping {i}");
                let back = roundtrip(&mut established, msg.as_bytes()).unwrap();
                assert_eq!(back, msg.to_uppercase().as_bytes());
                assert!(asked.elapsed() < BOUND, "answer took {:?}", asked.elapsed());
            }
        }
        // And while it waits out its timeout.
        let accepted = labels(backend, &[]);
        server.wait_metric(
            "wharf_connections_accepted_total",
            &accepted,
            (SILENT + STALLED + 1) as f64,
        );
        while flood_started.elapsed() < Duration::from_secs(2) {
            let asked = Instant::now();
            assert_eq!(roundtrip(&mut established, b"during").unwrap(), b"DURING");
            assert!(asked.elapsed() < BOUND, "answer took {:?}", asked.elapsed());
            std::thread::sleep(Duration::from_millis(50));
        }
        let timeouts = labels(backend, &[("result", "timeout")]);
        server.wait_metric(
            "wharf_tls_handshakes_total",
            &timeouts,
            (SILENT + STALLED) as f64,
        );
        // Every flood socket was closed by the server.
        for mut s in flood {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut sink = Vec::new();
            let _ = s.read_to_end(&mut sink);
        }
        assert_eq!(roundtrip(&mut established, b"after").unwrap(), b"AFTER");
        let mut fresh = tls_connect(addr, client).unwrap();
        assert_eq!(roundtrip(&mut fresh, b"new").unwrap(), b"NEW");
    }
}

#[test]
fn rotated_certificate_files_serve_new_connections_while_open_ones_continue() {
    let (dir, pki, cert) = pki();
    let next = Pki::new(&dir.0, "next");
    // Both CAs trusted by the client, so it can talk to either certificate.
    let both = dir.write(
        "both.pem",
        &(std::fs::read_to_string(pki.ca_file()).unwrap()
            + &std::fs::read_to_string(next.ca_file()).unwrap()),
    );
    for backend in backends() {
        let live = CertFiles {
            cert: dir.0.join(format!("live-{backend}.pem")),
            key: dir.0.join(format!("live-{backend}.key")),
        };
        std::fs::copy(&cert.cert, &live.cert).unwrap();
        std::fs::copy(&cert.key, &live.key).unwrap();
        let mut server = Server::start(&tls_echo_config(&live, "", ""), backend);
        let addr = server.addr("echo");
        let client = client_config(&both, None);
        let mut old = tls_connect(addr, Arc::clone(&client)).unwrap();
        assert_eq!(roundtrip(&mut old, b"one").unwrap(), b"ONE");
        let issuer = |tls: &Session| {
            let der = tls.conn.peer_certificates().unwrap()[0].to_vec();
            String::from_utf8_lossy(&der).contains("wharf test CA next")
        };
        assert!(!issuer(&old));

        // What certbot or cert-manager do: new files in place, then a reload.
        let renewed = next.server(&format!("renewed-{backend}"));
        std::fs::copy(&renewed.cert, &live.cert).unwrap();
        std::fs::copy(&renewed.key, &live.key).unwrap();
        server.expect_reload("configuration reloaded");

        let mut new = tls_connect(addr, Arc::clone(&client)).unwrap();
        assert!(
            issuer(&new),
            "a new connection still got the old certificate"
        );
        assert_eq!(roundtrip(&mut new, b"two").unwrap(), b"TWO");
        // The open session goes on with the certificate it started with.
        assert_eq!(roundtrip(&mut old, b"three").unwrap(), b"THREE");
    }
}

/// The issue's end-to-end authorization story with wharf's own client: over mutual TLS, an
/// identity a command names runs it, another identity is refused with an answer (the
/// unknown-command refusal, exit 126), and a client without a certificate fails the handshake.
#[test]
fn wharf_client_runs_a_command_only_as_an_identity_the_command_names() {
    let (dir, pki, cert) = pki();
    let ops = pki.client("ops", Names::Dns("ops"));
    let dev = pki.client("dev", Names::Dns("dev"));
    for backend in backends() {
        let config = format!(
            "[server]\nworkers = 1\n[metrics]\nlisten = \"127.0.0.1:0\"\n\
             [services.exec]\nplugin = \"exec\"\nlisten = \"127.0.0.1:0\"\n\
             [services.exec.options.commands]\n\
             whoami = {{ argv = [\"echo\", \"ops only\"], identities = [\"ops\"] }}\n\
             hello = {{ argv = [\"echo\", \"anyone\"] }}\n{}",
            tls_table(
                "exec",
                &cert,
                &format!("client_ca = \"{}\"", pki.ca_file().display())
            )
        );
        let server = Server::start(&config, backend);
        let addr = server.addr("exec").to_string();
        let ca = pki.ca_file().to_str().unwrap();
        let as_client = |who: Option<&CertFiles>, command: &str| {
            let mut args = vec!["exec", &addr, "--tls", "--ca", ca];
            if let Some(files) = who {
                args.extend(["--cert", files.cert.to_str().unwrap()]);
                args.extend(["--key", files.key.to_str().unwrap()]);
            }
            args.extend(["--", command]);
            wharf_client(&dir.0, &args)
        };

        let (code, out, err) = as_client(Some(&ops), "whoami");
        assert_eq!((code, out.as_str()), (0, "ops only\n"), "{err}");
        let (code, out, err) = as_client(Some(&dev), "hello");
        assert_eq!((code, out.as_str()), (0, "anyone\n"), "{err}");

        let (code, out, err) = as_client(Some(&dev), "whoami");
        assert_eq!(code, 126, "refused with an answer: {out} {err}");
        assert!(out.contains("command not allowed: whoami"), "{out} {err}");
        assert!(!out.contains("ops only"), "{out}");

        let (code, _, err) = as_client(None, "hello");
        assert_ne!(code, 0);
        assert!(err.contains("requires a client certificate"), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    }
}
