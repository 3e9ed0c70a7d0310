//! Startup and shutdown: SIGTERM/SIGINT drain, grace expiry, exit codes.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::harness::*;

fn echo_once(s: &mut TcpStream, msg: &[u8]) -> Vec<u8> {
    s.write_all(msg).unwrap();
    let mut buf = vec![0; msg.len()];
    s.read_exact(&mut buf).unwrap();
    buf
}

/// Polls until connecting to `addr` is refused (the listener is closed).
fn refused_within(addr: std::net::SocketAddr, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        match TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => return true,
            _ => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    false
}

#[test]
fn sigterm_stops_accepting_at_once_and_lets_open_connections_finish() {
    for backend in backends() {
        let mut server = Server::start(&echo_config(""), backend);
        let addr = server.addr("echo");
        let mut open = connect(addr);
        assert_eq!(echo_once(&mut open, b"before"), b"BEFORE");

        server.signal(libc::SIGTERM);
        assert!(
            refused_within(addr, Duration::from_secs(2)),
            "still accepting after SIGTERM"
        );
        // The open connection is still served during the drain...
        assert_eq!(echo_once(&mut open, b"during drain"), b"DURING DRAIN");
        assert!(
            server.wait(Duration::from_millis(300)).is_none(),
            "exited before its client finished"
        );
        // ...and once it finishes, the process exits 0 well before the 5 s grace.
        let closed_at = Instant::now();
        drop(open);
        let status = server
            .wait(Duration::from_secs(4))
            .expect("did not exit after drain");
        assert!(status.success(), "{status}\n{}", server.log());
        assert!(closed_at.elapsed() < Duration::from_secs(3));
        assert!(server.log().contains("SIGTERM"));
    }
}

#[test]
fn grace_period_expiry_closes_stragglers_and_still_exits_zero() {
    for backend in backends() {
        let config =
            echo_config("").replace("shutdown_grace = \"5s\"", "shutdown_grace = \"400ms\"");
        let mut server = Server::start(&config, backend);
        let mut idle = connect(server.addr("echo"));
        assert_eq!(echo_once(&mut idle, b"x"), b"X");
        let start = Instant::now();
        server.signal(libc::SIGINT);
        assert!(
            closed_within(&mut idle, Duration::from_secs(3)),
            "straggler not closed"
        );
        let status = server.wait(Duration::from_secs(3)).expect("did not exit");
        assert!(status.success(), "{status}");
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(350),
            "closed before the grace period: {took:?}"
        );
        assert!(server.log().contains("SIGINT"));
        assert!(
            server.log().contains("grace period over"),
            "{}",
            server.log()
        );
    }
}

#[test]
fn idle_server_exits_immediately_on_sigterm() {
    for backend in backends() {
        let mut server = Server::start(&echo_config(""), backend);
        server.signal(libc::SIGTERM);
        let status = server.wait(Duration::from_secs(2)).expect("did not exit");
        assert!(status.success());
    }
}

#[test]
fn idle_keep_alive_and_command_connections_do_not_hold_the_drain() {
    for backend in backends() {
        let dir = TempDir::new();
        let config = format!(
            "[server]\nworkers = 1\nshutdown_grace = \"10s\"\n\
             [services.web]\nplugin = \"http-hello\"\nlisten = \"127.0.0.1:0\"\n\
             [services.files]\nplugin = \"file-get\"\nlisten = \"127.0.0.1:0\"\n\
             [services.files.options]\nroot = \"{}\"\n",
            dir.0.display()
        );
        let mut server = Server::start(&config, backend);
        // A keep-alive HTTP connection after one request, and an idle file-get connection.
        let mut web = connect(server.addr("web"));
        web.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut buf = [0u8; 512];
        assert!(web.read(&mut buf).unwrap() > 0);
        let mut files = connect(server.addr("files"));
        files.write_all(b"list\n").unwrap();
        let n = files.read(&mut buf).unwrap();
        files.write_all(b"ok").unwrap();
        let size: usize = std::str::from_utf8(&buf[..n]).unwrap().parse().unwrap();
        let mut listing = vec![0u8; size];
        files.read_exact(&mut listing).unwrap();

        let start = Instant::now();
        server.signal(libc::SIGTERM);
        let status = server
            .wait(Duration::from_secs(5))
            .expect("drain waited for idle connections");
        assert!(status.success());
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "took {:?}",
            start.elapsed()
        );
        assert!(closed_within(&mut web, Duration::from_secs(1)));
        assert!(closed_within(&mut files, Duration::from_secs(1)));
    }
}
