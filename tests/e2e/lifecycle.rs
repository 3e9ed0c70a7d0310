//! Startup and shutdown: SIGTERM/SIGINT drain, grace expiry, exit codes.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::harness::*;
#[test]
fn sigterm_stops_accepting_at_once_and_lets_open_connections_finish() {
    for backend in backends() {
        // A grace far longer than any stall of a loaded machine: exiting before it proves the
        // drain ended because the client did.
        let config = echo_config("").replace("shutdown_grace = \"5s\"", "shutdown_grace = \"60s\"");
        let mut server = Server::start(&config, backend);
        let addr = server.addr("echo");
        let mut open = connect(addr);
        assert_eq!(echo_once(&mut open, b"before"), b"BEFORE");

        server.signal(libc::SIGTERM);
        assert!(
            refused_within(addr, Duration::from_secs(10)),
            "still accepting after SIGTERM"
        );
        // The open connection is still served during the drain...
        assert_eq!(echo_once(&mut open, b"during drain"), b"DURING DRAIN");
        assert!(
            server.wait(Duration::from_millis(300)).is_none(),
            "exited before its client finished"
        );
        // ...and once it finishes, the process exits 0 well before the 60 s grace.
        let closed_at = Instant::now();
        drop(open);
        let status = server
            .wait(Duration::from_secs(30))
            .expect("did not exit after drain");
        assert!(status.success(), "{status}\n{}", server.log());
        assert!(closed_at.elapsed() < Duration::from_secs(30));
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
            closed_within(&mut idle, Duration::from_secs(10)),
            "straggler not closed"
        );
        let status = server.wait(Duration::from_secs(10)).expect("did not exit");
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
        let status = server.wait(Duration::from_secs(10)).expect("did not exit");
        assert!(status.success());
    }
}

#[test]
fn idle_keep_alive_and_command_connections_do_not_hold_the_drain() {
    for backend in backends() {
        let dir = TempDir::new();
        let config = format!(
            "[server]\nworkers = 1\nshutdown_grace = \"60s\"\n\
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
            .wait(Duration::from_secs(30))
            .expect("drain waited for idle connections");
        assert!(status.success());
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "took {:?}",
            start.elapsed()
        );
        assert!(closed_within(&mut web, Duration::from_secs(10)));
        assert!(closed_within(&mut files, Duration::from_secs(10)));
    }
}

/// Starts `wharf serve` under `systemd-socket-activate`, which binds `listen` and passes the
/// sockets (named `fdnames`, colon-separated, when given).
fn start_socket_activated(
    config: &str,
    listen: &[SocketAddr],
    fdnames: Option<&str>,
    args: &[&str],
) -> Result<Server, String> {
    let mut wrapper: Vec<String> = vec!["systemd-socket-activate".into()];
    wrapper.extend(listen.iter().map(|a| format!("--listen={a}")));
    wrapper.extend(fdnames.map(|n| format!("--fdname={n}")));
    wrapper.extend(["-E".into(), "WHARF_LOG".into()]);
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    Server::start_wrapped(config, &wrapper, args, &[], |_| {})
}

/// systemd-socket-activate starts wharf on the first connection: in the background, connects
/// to `addr` as soon as something listens there, and returns the connection.
fn first_connection(addr: SocketAddr) -> std::thread::JoinHandle<TcpStream> {
    std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(s) = TcpStream::connect(addr) {
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                return s;
            }
            assert!(Instant::now() < deadline, "nothing listens on {addr}");
            std::thread::sleep(Duration::from_millis(20));
        }
    })
}

#[test]
fn systemd_socket_activation_serves_the_passed_sockets_without_binding() {
    if !have_tool("systemd-socket-activate", "--version") {
        return;
    }
    for backend in backends() {
        // The config's own addresses are held by us: had wharf bound them, it would fail.
        let held_echo = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let held_metrics = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let config = format!(
            "[server]\nworkers = 2\n[metrics]\nlisten = \"{}\"\n\
             [services.echo]\nplugin = \"echo\"\nlisten = \"{}\"\n\
             [services.echo.options]\ntransform = \"upper\"\n",
            held_metrics.local_addr().unwrap(),
            held_echo.local_addr().unwrap()
        );
        // The addresses systemd would bind from the .socket unit.
        let (echo, metrics) = (free_addr(), free_addr());
        let first = first_connection(echo);
        let mut server = start_socket_activated(
            &config,
            &[echo, metrics],
            Some("echo:metrics"),
            &["--backend", backend],
        )
        .unwrap_or_else(|e| panic!("{backend}: {e}"));
        // The connection that started wharf waited in the socket's backlog and is served.
        assert_eq!(echo_once(&mut first.join().unwrap(), b"first"), b"FIRST");
        assert_eq!(server.addr("echo"), echo, "{}", server.log());
        assert_eq!(server.metrics, Some(metrics));
        let mut s = connect(echo);
        assert_eq!(echo_once(&mut s, b"activated"), b"ACTIVATED");
        assert_eq!(http_get(metrics, "/readyz").0, 200);
        // A reload that changes the service keeps the socket systemd passed.
        server.rewrite_config(&config.replace("\"upper\"", "\"none\""));
        let outcome = server.reload();
        assert!(outcome.contains("changed=echo"), "{outcome}");
        assert_eq!(echo_once(&mut connect(echo), b"after"), b"after");
        assert_eq!(echo_once(&mut s, b"open"), b"OPEN");
        // Removing it cannot close systemd's copy of the socket: refused, nothing changes.
        let other = "[services.other]\nplugin = \"echo\"\nlisten = \"127.0.0.1:0\"\n";
        let without = config.split("[services.echo]").next().unwrap().to_string() + other;
        server.rewrite_config(&without);
        let outcome = server.reload();
        assert!(
            outcome.contains("reload failed") && outcome.contains("socket activation"),
            "{outcome}"
        );
        assert_eq!(echo_once(&mut connect(echo), b"kept"), b"kept");
        drop((held_echo, held_metrics));
    }
}

#[test]
fn socket_activation_with_a_socket_no_service_claims_is_a_clear_startup_error() {
    if !have_tool("systemd-socket-activate", "--version") {
        return;
    }
    let addr = free_addr();
    let trigger = first_connection(addr);
    let err = start_socket_activated(&echo_config(""), &[addr], Some("ech0"), &[])
        .err()
        .expect("wharf must refuse a socket it has no service for");
    trigger.join().unwrap();
    assert!(
        err.contains(&format!("sockets ech0 ({addr}) that match no service")),
        "{err}"
    );
    assert!(err.contains("(services: echo)"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn socket_activation_matches_unnamed_sockets_by_listen_address() {
    if !have_tool("systemd-socket-activate", "--version") {
        return;
    }
    // One socket, no names (as from a single wharf.socket unit): matched by the config's address.
    let addr = free_addr();
    let config = format!(
        "[services.echo]\nplugin = \"echo\"\nlisten = \"{addr}\"\n\
         [services.echo.options]\ntransform = \"upper\"\n"
    );
    let first = first_connection(addr);
    let server = start_socket_activated(&config, &[addr], None, &[]).unwrap();
    assert_eq!(echo_once(&mut first.join().unwrap(), b"hi"), b"HI");
    assert_eq!(server.addr("echo"), addr);
}

#[test]
fn an_activated_socket_outlives_wharf_on_both_backends() {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    // This test plays systemd: it owns the listening socket, passes it as descriptor 3, and
    // must still be able to accept on it after wharf has stopped (a restart reuses it).
    for backend in backends() {
        let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = socket.local_addr().unwrap();
        let fd = socket.as_raw_fd();
        let mut server = Server::start_wrapped(
            &echo_config(""),
            &["sh", "-c", "LISTEN_PID=$$ exec \"$0\" \"$@\""],
            &["--backend", backend],
            &[("LISTEN_FDS", "1"), ("LISTEN_FDNAMES", "echo")],
            |cmd| {
                // SAFETY: only dup2 and fcntl (async-signal-safe) between fork and exec.
                unsafe {
                    cmd.pre_exec(move || {
                        // dup2 onto itself would keep close-on-exec: clear it instead.
                        let rc = if fd == 3 {
                            libc::fcntl(3, libc::F_SETFD, 0)
                        } else {
                            libc::dup2(fd, 3)
                        };
                        if rc < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                        Ok(())
                    });
                }
            },
        )
        .unwrap_or_else(|e| panic!("{backend}: {e}"));
        assert_eq!(server.addr("echo"), addr);
        let mut s = connect(addr);
        assert_eq!(echo_once(&mut s, b"x"), b"X");
        drop(s);
        server.signal(libc::SIGTERM);
        assert_eq!(
            server.wait(Duration::from_secs(10)).and_then(|s| s.code()),
            Some(0)
        );
        // Still listening: a connection completes and is accepted here.
        let _client = std::net::TcpStream::connect(addr).expect("the shared socket was closed");
        socket.set_nonblocking(false).unwrap();
        let (_conn, _) = socket
            .accept()
            .expect("the shared socket stopped listening");
    }
}

/// A taken listen address, a service's or the metrics endpoint's, ends `wharf serve` with exit
/// status 3 (`wharf_core::exit_status::ADDRESS_IN_USE`, what `wharf bench swap` retries on)
/// and the same one-line error as before.
#[test]
fn a_taken_address_exits_with_status_3() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let cases = [
        (
            format!("[services.echo]\nplugin = \"echo\"\nlisten = \"{addr}\"\n"),
            "services.echo.listen",
        ),
        (
            format!(
                "[metrics]\nlisten = \"{addr}\"\n\
                 [services.echo]\nplugin = \"echo\"\nlisten = \"127.0.0.1:0\"\n"
            ),
            "metrics.listen",
        ),
    ];
    for (config, key) in cases {
        let err = Server::start_with(&config, &["--backend", "epoll"], &[])
            .err()
            .unwrap();
        assert!(err.contains("exited early (exit status: 3)"), "{err}");
        assert!(
            err.contains(&format!(
                "{key}: cannot listen on {addr}: Address already in use (os error 98) \
                 (another process is listening there)"
            )),
            "{err}"
        );
    }
    // Anything else that keeps it from listening is still status 1.
    let config = "[services.echo]\nplugin = \"echo\"\nlisten = \"192.0.2.1:7\"\n";
    let err = Server::start_with(config, &["--backend", "epoll"], &[])
        .err()
        .unwrap();
    assert!(err.contains("exited early (exit status: 1)"), "{err}");
    assert!(err.contains("no local interface has that address"), "{err}");
}
