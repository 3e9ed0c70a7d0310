//! `wharf client ... --tls` and `wharf bench ... --tls` against a real TLS peer, OpenSSL's
//! `s_server` (so these tests need no TLS in wharf's own server): a verified conversation, and
//! each way verification can fail reported as one line saying what failed.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use crate::harness::*;
use crate::pki::{CertFiles, Names, Pki};

/// A running `openssl s_server`, killed when dropped.
struct SServer {
    child: Child,
    addr: SocketAddr,
}

impl SServer {
    /// `openssl s_server` on a free loopback port with `cert`, in `mode` (`-rev`, `-HTTP`) plus
    /// `extra` arguments, in the certificate's directory (where `-HTTP` finds its files);
    /// returns once it accepts connections.
    fn start(cert: &CertFiles, mode: &str, extra: &[&str]) -> SServer {
        let addr = free_addr();
        let mut child = Command::new("openssl")
            .args(["s_server", "-accept", &addr.to_string(), "-cert"])
            .arg(&cert.cert)
            .arg("-key")
            .arg(&cert.key)
            .args([mode, "-naccept", "1000"])
            .args(extra)
            .current_dir(cert.cert.parent().unwrap())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting openssl s_server");
        // It prints ACCEPT once listening; keep draining its output so it never blocks.
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        for line in lines.by_ref() {
            if line.unwrap_or_default().starts_with("ACCEPT") {
                break;
            }
        }
        std::thread::spawn(move || lines.for_each(drop));
        SServer { child, addr }
    }
}

impl Drop for SServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A scratch directory with a CA `main` and an unrelated CA `other`, when openssl is here.
fn two_cas() -> Option<(TempDir, Pki, Pki)> {
    if !have_tool("openssl", "version") {
        return None;
    }
    let dir = TempDir::new();
    let (pki, other) = (Pki::new(&dir.0, "main"), Pki::new(&dir.0, "other"));
    Some((dir, pki, other))
}

/// `wharf client echo --tls <tls args> ADDR hello`: (exit code, stdout, stderr).
fn echo(dir: &Path, addr: SocketAddr, tls: &[&str]) -> (i32, String, String) {
    let addr = addr.to_string();
    let mut args = vec!["echo", "--tls"];
    args.extend_from_slice(tls);
    args.extend([addr.as_str(), "hello"]);
    wharf_client(dir, &args)
}

/// `--ca CA --cert C --key K`
fn with_cert<'a>(ca: &'a str, client: &'a CertFiles) -> [&'a str; 6] {
    let files = [path(&client.cert), path(&client.key)];
    ["--ca", ca, "--cert", files[0], "--key", files[1]]
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The one error line of a failed client, checked to be exactly one line.
fn one_line(code: i32, out: &str, err: &str) -> String {
    assert_eq!((code, out), (1, ""), "stderr: {err}");
    assert_eq!(err.lines().count(), 1, "not one line: {err}");
    err.trim_end().to_string()
}

#[test]
fn client_echo_speaks_tls_and_verifies_the_server_by_ip_or_name() {
    if !have_tool("openssl", "version") {
        return;
    }
    let dir = TempDir::new();
    let pki = Pki::new(&dir.0, "main");
    let server = SServer::start(&pki.server("server"), "-rev", &[]);
    let ca = path(pki.ca_file());
    // The address's IP is the name checked (the certificate's IP SAN).
    let (code, out, err) = echo(&dir.0, server.addr, &["--ca", ca]);
    assert_eq!((code, out.as_str()), (0, "olleh\n"), "{err}");
    // A DNS name given explicitly.
    let (code, out, err) = echo(
        &dir.0,
        server.addr,
        &["--ca", ca, "--server-name", "localhost"],
    );
    assert_eq!((code, out.as_str()), (0, "olleh\n"), "{err}");
    // The command clients speak TLS too: a reversing server is no exec or file-get service,
    // and they say so after reading its answer through TLS.
    let addr = server.addr.to_string();
    for (client, command, answer) in [("exec", "date", "etad"), ("list", "", "tsil")] {
        let mut args = vec![client, "--tls", "--ca", ca, &addr];
        if !command.is_empty() {
            args.extend(["--", command]);
        }
        let (code, out, err) = wharf_client(&dir.0, &args);
        let line = one_line(code, &out, &err);
        assert!(line.contains(&format!("it answered `{answer}`")), "{line}");
    }
}

#[test]
fn each_verification_failure_is_one_line_saying_what_failed() {
    let Some((dir, pki, other)) = two_cas() else {
        return;
    };
    let ca = path(pki.ca_file());
    let server = SServer::start(&pki.server("server"), "-rev", &[]);

    // Unknown CA.
    let (code, out, err) = echo(&dir.0, server.addr, &["--ca", path(other.ca_file())]);
    let line = one_line(code, &out, &err);
    assert!(line.contains("signed by an unknown CA"), "{line}");
    assert!(line.contains("other-ca.pem"), "{line}");

    // Name mismatch, naming the name asked for and the ones the certificate has.
    let (code, out, err) = echo(
        &dir.0,
        server.addr,
        &["--ca", ca, "--server-name", "example.org"],
    );
    let line = one_line(code, &out, &err);
    assert!(line.contains("name mismatch"), "{line}");
    assert!(line.contains("`example.org`"), "{line}");
    assert!(line.contains("localhost"), "{line}");

    // Expired, with when.
    let expired = SServer::start(&pki.expired_server("expired"), "-rev", &[]);
    let (code, out, err) = echo(&dir.0, expired.addr, &["--ca", ca]);
    let line = one_line(code, &out, &err);
    assert!(line.contains("expired on 2020-01-01"), "{line}");
}

#[test]
fn a_server_requiring_a_client_certificate_gets_one_or_says_so() {
    let Some((dir, pki, other)) = two_cas() else {
        return;
    };
    let ca = path(pki.ca_file());
    let require = ["-Verify", "1", "-verify_return_error", "-CAfile", ca];
    let server = SServer::start(&pki.server("server"), "-rev", &require);

    // None given.
    let (code, out, err) = echo(&dir.0, server.addr, &["--ca", ca]);
    let line = one_line(code, &out, &err);
    assert!(line.contains("requires a client certificate"), "{line}");
    assert!(line.contains("--cert"), "{line}");

    // One the server does not trust.
    let stranger = other.client("stranger", Names::Dns("ops"));
    let (code, out, err) = echo(&dir.0, server.addr, &with_cert(ca, &stranger));
    let line = one_line(code, &out, &err);
    assert!(line.contains("refused our client certificate"), "{line}");

    // A trusted one.
    let ops = pki.client("ops", Names::Dns("ops"));
    let (code, out, err) = echo(&dir.0, server.addr, &with_cert(ca, &ops));
    assert_eq!((code, out.as_str()), (0, "olleh\n"), "{err}");
}

#[test]
fn a_server_that_does_not_speak_tls_is_named_as_such() {
    let dir = TempDir::new();
    let pki = Pki::new(&dir.0, "main");
    let ca = path(pki.ca_file());
    let config = "[services.web]\nplugin = \"http-hello\"\nlisten = \"127.0.0.1:0\"\n";
    let server = Server::start(config, "epoll");

    // A plaintext HTTP server answers the ClientHello with a 400.
    let (code, out, err) = echo(&dir.0, server.addr("web"), &["--ca", ca]);
    let line = one_line(code, &out, &err);
    assert!(line.contains("does not speak TLS"), "{line}");
    assert!(line.contains("HTTP/1.1 400"), "{line}");

    // A server that closes without a word.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let closer = std::thread::spawn(move || drop(listener.accept()));
    let (code, out, err) = echo(&dir.0, addr, &["--ca", ca]);
    let line = one_line(code, &out, &err);
    assert!(
        line.contains("closed the connection without answering"),
        "{line}"
    );
    closer.join().unwrap();
}

#[test]
fn bad_tls_flags_are_one_line_errors() {
    let dir = TempDir::new();
    let missing = dir.0.join("missing.pem");
    let (code, out, err) = echo(&dir.0, free_addr(), &["--ca", path(&missing)]);
    let line = one_line(code, &out, &err);
    assert!(line.contains("missing.pem"), "{line}");
    // --cert without --key is a usage error from the flag parser.
    let (code, _, err) = wharf_client(&dir.0, &["echo", "--tls", "--cert", "x", "a:1"]);
    assert_eq!(code, 2, "{err}");
}

/// `wharf bench ... --json` (after a short warm-up, for one second): the report.
fn bench_json(args: &[&str]) -> serde_json::Value {
    let out = Command::new(WHARF)
        .arg("bench")
        .args(args)
        .args(["-c", "1", "-d", "1", "--warmup", "0.2", "--json"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    serde_json::from_slice(&out.stdout).unwrap()
}

/// One connection opened per answered request, give or take one at the window's edges.
fn assert_a_connection_per_request(report: &serde_json::Value) {
    let requests = report["requests"].as_u64().unwrap();
    let opened = report["connections_opened"].as_u64().unwrap();
    assert!(requests > 0, "{report}");
    assert_eq!(report["failed"].as_u64(), Some(0), "{report}");
    assert!(opened + 1 >= requests && opened <= requests + 1, "{report}");
}

#[test]
fn bench_http_over_tls_counts_handshakes() {
    if !have_tool("openssl", "version") {
        return;
    }
    let dir = TempDir::new();
    let pki = Pki::new(&dir.0, "main");
    // -HTTP serves a file holding its own HTTP/1.0 response, then closes: a handshake per
    // request.
    std::fs::write(
        dir.0.join("hello"),
        "HTTP/1.0 200 OK\r\nContent-Length: 6\r\n\r\nhello\n",
    )
    .unwrap();
    let server = SServer::start(&pki.server("server"), "-HTTP", &[]);
    let addr = server.addr.to_string();
    let ca = path(pki.ca_file());
    let report = bench_json(&["http", &addr, "--tls", "--ca", ca, "--path", "/hello"]);
    assert_eq!(report["tls"].as_bool(), Some(true), "{report}");
    assert_a_connection_per_request(&report);
}

#[test]
fn bench_new_conn_opens_a_connection_per_request() {
    let config = "[services.web]\nplugin = \"http-hello\"\nlisten = \"127.0.0.1:0\"\n";
    let server = Server::start(config, "epoll");
    let addr = server.addr("web").to_string();
    // Keep-alive: the one connection was opened in the warm-up.
    let report = bench_json(&["http", &addr]);
    assert!(report["requests"].as_u64().unwrap() > 10, "{report}");
    assert_eq!(report["connections_opened"].as_u64(), Some(0), "{report}");
    let report = bench_json(&["http", &addr, "--new-conn"]);
    assert_eq!(report["new_conn"].as_bool(), Some(true), "{report}");
    assert_a_connection_per_request(&report);
}
