//! Framework-level limits that apply to every plugin: max_connections, allow_from,
//! idle_timeout; each checked through the real binary with its metrics.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use crate::harness::*;

fn labels<'a>(service: &'a str, backend: &'a str) -> [(&'a str, &'a str); 3] {
    [
        ("service", service),
        ("plugin", "echo"),
        ("backend", backend),
    ]
}

fn is_served(s: &mut std::net::TcpStream) -> bool {
    if s.write_all(b"ping").is_err() {
        return false;
    }
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).is_ok() && &buf == b"PING"
}

#[test]
fn max_connections_closes_the_excess_and_counts_it() {
    for backend in backends() {
        let server = Server::start(&echo_config("max_connections = 2"), backend);
        let addr = server.addr("echo");
        let mut a = connect(addr);
        let mut b = connect(addr);
        assert!(is_served(&mut a) && is_served(&mut b));
        let mut c = connect(addr);
        assert!(
            closed_within(&mut c, Duration::from_secs(15)),
            "third connection was kept"
        );
        let mut l: Vec<(&str, &str)> = labels("echo", backend).to_vec();
        l.push(("reason", "max_connections"));
        server.wait_metric("wharf_connections_rejected_total", &l, 1.0);
        server.wait_metric("wharf_connections_active", &labels("echo", backend), 2.0);

        // A slot freed is a slot reusable.
        drop(a);
        server.wait_metric("wharf_connections_active", &labels("echo", backend), 1.0);
        let mut d = connect(addr);
        assert!(is_served(&mut d));
        assert!(is_served(&mut b));
    }
}

#[test]
fn allow_from_closes_unlisted_peers_at_accept() {
    for backend in backends() {
        let config = format!(
            "{}\n[services.private]\nplugin = \"echo\"\nlisten = \"127.0.0.1:0\"\n\
             allow_from = [\"10.0.0.0/8\", \"::1\"]\n\
             [services.private.options]\ntransform = \"upper\"\n",
            echo_config("allow_from = [\"127.0.0.0/8\"]")
        );
        let server = Server::start(&config, backend);
        let mut allowed = connect(server.addr("echo"));
        assert!(is_served(&mut allowed));
        let mut denied = connect(server.addr("private"));
        assert!(closed_within(&mut denied, Duration::from_secs(15)));

        let mut l: Vec<(&str, &str)> = labels("private", backend).to_vec();
        l.push(("reason", "allow_from"));
        server.wait_metric("wharf_connections_rejected_total", &l, 1.0);
        server.wait_metric(
            "wharf_connections_accepted_total",
            &labels("private", backend),
            0.0,
        );
        server.wait_metric(
            "wharf_connections_accepted_total",
            &labels("echo", backend),
            1.0,
        );
    }
}

#[test]
fn idle_timeout_closes_silent_clients_but_not_talkative_ones() {
    for backend in backends() {
        // The talker pauses 100 ms between pings: a stall of up to ~900 ms still keeps it
        // inside the 1 s timeout.
        let server = Server::start(&echo_config("idle_timeout = \"1s\""), backend);
        let addr = server.addr("echo");
        let mut talker = connect(addr);
        let start = Instant::now();
        let mut silent = connect(addr);
        // Keep one connection busy well past the timeout (~2.5 s), noting when the silent
        // one was seen closed.
        let mut silent_closed_at = None;
        for _ in 0..25 {
            assert!(is_served(&mut talker), "an active connection was closed");
            if silent_closed_at.is_none() && closed_within(&mut silent, Duration::from_millis(1)) {
                silent_closed_at = Some(start.elapsed());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let silent_closed_at = silent_closed_at.unwrap_or_else(|| {
            assert!(
                closed_within(&mut silent, Duration::from_secs(10)),
                "silent client kept"
            );
            start.elapsed()
        });
        // Timers never fire early: not closed before its timeout.
        assert!(
            silent_closed_at >= Duration::from_millis(900),
            "silent client closed after {silent_closed_at:?}, before its 1 s timeout"
        );
        assert!(is_served(&mut talker));
        server.wait_metric("wharf_connections_active", &labels("echo", backend), 1.0);
    }
}

#[test]
fn ipv6_loopback_services_work_and_match_v6_rules() {
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        return skip_or_fail("no IPv6 loopback on this machine");
    }
    for backend in backends() {
        let config = echo_config("allow_from = [\"::1\"]").replace(
            "listen = \"127.0.0.1:0\"\nallow",
            "listen = \"[::1]:0\"\nallow",
        );
        let server = Server::start(&config, backend);
        let addr = server.addr("echo");
        assert!(addr.is_ipv6(), "{addr}");
        let mut s = connect(addr);
        assert!(is_served(&mut s));
    }
}

#[test]
fn running_out_of_file_descriptors_backs_off_and_recovers() {
    use std::os::unix::process::CommandExt;
    for backend in backends() {
        let config =
            "[server]\nworkers = 1\n[services.echo]\nplugin = \"echo\"\nlisten = \"127.0.0.1:0\"\n\
                      [services.echo.options]\ntransform = \"upper\"\n";
        let server = Server::start_custom(config, &["--backend", backend], &[], |cmd| {
            // SAFETY: only setrlimit (async-signal-safe) between fork and exec.
            unsafe {
                cmd.pre_exec(|| {
                    let limit = libc::rlimit {
                        rlim_cur: 64,
                        rlim_max: 64,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                })
            };
        })
        .unwrap();
        let addr = server.addr("echo");
        // Far more connections than the server has descriptors: the kernel completes the
        // handshakes, the server's accepts fail with EMFILE.
        let mut flood: Vec<_> = (0..120)
            .filter_map(|_| std::net::TcpStream::connect(addr).ok())
            .collect();
        let deadline = Instant::now() + Duration::from_secs(15);
        while !server.log().contains("accept failed; backing off") {
            assert!(
                Instant::now() < deadline,
                "no EMFILE seen:\n{}",
                server.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        flood.clear();
        // Once descriptors are free again, service resumes.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut s = connect(addr);
            s.set_read_timeout(Some(Duration::from_millis(500)))
                .unwrap();
            if is_served(&mut s) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{backend}: never recovered from EMFILE"
            );
        }
    }
}
