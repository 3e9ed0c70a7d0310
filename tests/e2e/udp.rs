//! UDP services (`listen = "udp:..."`): the echo plugin answering datagrams on both backends,
//! to Python's `SOCK_DGRAM` `sendto`/`recvfrom` (as the tutorial documents them) and to
//! `socat`; the reflection and rate limits under a flood; `allow_from`; oversized datagrams;
//! reload (kept, changed, removed) and shutdown; the metrics of all of it.

use std::net::{SocketAddr, UdpSocket};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::harness::*;

/// One UDP echo service named `udp` (uppercasing) plus metrics, with `extra` service keys.
fn udp_config(extra: &str) -> String {
    format!(
        "[server]\nworkers = 2\nshutdown_grace = \"5s\"\n\
         [metrics]\nlisten = \"127.0.0.1:0\"\n\
         [services.udp]\nplugin = \"echo\"\nlisten = \"udp:127.0.0.1:0\"\n{extra}\n\
         [services.udp.options]\ntransform = \"upper\"\n"
    )
}

fn labels<'a>(server: &'a Server, extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut l = vec![
        ("service", "udp"),
        ("plugin", "echo"),
        ("backend", server.backend.as_str()),
    ];
    l.extend_from_slice(extra);
    l
}

fn dropped(server: &Server, reason: &str) -> f64 {
    let l = labels(server, &[("reason", reason)]);
    server
        .metric("wharf_datagrams_dropped_total", &l)
        .unwrap_or_else(|| panic!("no dropped series for {reason}:\n{}", server.scrape()))
}

/// A client socket on `ip`, answering within `wait`.
fn client_on(ip: &str, wait: Duration) -> UdpSocket {
    let socket = UdpSocket::bind((ip, 0)).unwrap();
    socket.set_read_timeout(Some(wait)).unwrap();
    socket
}

/// Sends `payload` to `to` and returns the reply, or `None` if none came within the socket's
/// read timeout.
fn exchange(socket: &UdpSocket, to: SocketAddr, payload: &[u8]) -> Option<Vec<u8>> {
    socket.send_to(payload, to).unwrap();
    let mut buf = vec![0u8; 70_000];
    match socket.recv_from(&mut buf) {
        Ok((n, from)) => {
            assert_eq!(from, to, "the reply comes from the service's address");
            Some(buf[..n].to_vec())
        }
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            None
        }
        Err(e) => panic!("recv_from: {e}"),
    }
}

/// The tutorial's way: `socket.socket(AF_INET, SOCK_DGRAM)`, `sendto`, `recvfrom`.
const PYTHON_UDP_CLIENT: &str = r#"
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(5)
for word in sys.argv[3:]:
    s.sendto(word.encode(), (host, port))
    data, server = s.recvfrom(1024)
    assert server == (host, port), server
    print(data.decode())
s.close()
"#;

#[test]
fn python_sendto_recvfrom_gets_each_datagram_back_transformed_on_both_backends() {
    if !have_tool("python3", "--version") {
        return;
    }
    for backend in backends() {
        let server = Server::start(&udp_config(""), backend);
        let addr = server.addr("udp");
        let out = Command::new("python3")
            .args(["-c", PYTHON_UDP_CLIENT])
            .args([addr.ip().to_string(), addr.port().to_string()])
            .args(["hello", "wharf over udp", "é ok"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{backend}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            server.log()
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "HELLO\nWHARF OVER UDP\né OK\n",
            "{backend}"
        );
        // 3 datagrams of 5 + 14 + 5 bytes each way.
        server.wait_metric("wharf_datagrams_received_total", &labels(&server, &[]), 3.0);
        server.wait_metric("wharf_datagrams_sent_total", &labels(&server, &[]), 3.0);
        server.wait_metric("wharf_received_bytes_total", &labels(&server, &[]), 24.0);
        server.wait_metric("wharf_sent_bytes_total", &labels(&server, &[]), 24.0);
        for reason in [
            "allow_from",
            "max_datagram_rate_per_source",
            "amplification",
        ] {
            assert_eq!(dropped(&server, reason), 0.0, "{backend} {reason}");
        }
    }
}

#[test]
fn socat_gets_its_datagram_back() {
    if !have_tool("socat", "-V") {
        return;
    }
    for backend in backends() {
        let server = Server::start(&udp_config(""), backend);
        let addr = server.addr("udp");
        let out = run_with_stdin(
            Command::new("socat").args(["-t", "2", "-", &format!("UDP:{addr}")]),
            b"from socat\n",
        );
        assert!(out.status.success(), "{backend}: {out:?}");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "FROM SOCAT\n",
            "{backend}"
        );
    }
}

#[test]
fn allow_from_drops_silently_and_counts() {
    for backend in backends() {
        let server = Server::start(&udp_config("allow_from = [\"10.0.0.0/8\"]"), backend);
        let client = client_on("127.0.0.1", Duration::from_millis(500));
        assert_eq!(exchange(&client, server.addr("udp"), b"let me in"), None);
        server.wait_metric(
            "wharf_datagrams_dropped_total",
            &labels(&server, &[("reason", "allow_from")]),
            1.0,
        );
        assert_eq!(
            server.metric("wharf_datagrams_sent_total", &labels(&server, &[])),
            Some(0.0)
        );
    }
}

#[test]
fn a_flooding_source_is_rate_limited_while_another_source_is_answered() {
    for backend in backends() {
        let server = Server::start(&udp_config("max_datagram_rate_per_source = 20"), backend);
        let addr = server.addr("udp");
        let flooder = client_on("127.0.0.1", Duration::from_millis(300));
        flooder.set_nonblocking(true).unwrap();
        // Another source (127.0.0.2 is loopback too) sends a probe now and then during the
        // flood. The kernel may drop some when the server's queue is full (that is UDP), but
        // the flooder's rate limit must not keep it from being answered.
        let other = client_on("127.0.0.2", Duration::from_secs(1));
        let started = Instant::now();
        let flood = 2000;
        let mut answered = 0;
        let mut buf = [0u8; 64];
        for i in 0..flood {
            let _ = flooder.send_to(format!("flood {i}").as_bytes(), addr);
            if i % 100 == 50 {
                other.send_to(b"still there?", addr).unwrap();
            }
            if i % 50 == 0 {
                // Paced (about 25 000 per second) so that the server's queue, not the
                // kernel, decides: the flooder's own rate limit is what is tested.
                std::thread::sleep(Duration::from_millis(2));
            }
            while flooder.recv_from(&mut buf).is_ok() {
                answered += 1;
            }
        }
        let mut probes_answered = 0;
        while let Ok((n, _)) = other.recv_from(&mut buf) {
            assert_eq!(&buf[..n], b"STILL THERE?", "{backend}");
            probes_answered += 1;
        }
        assert!(
            probes_answered > 0,
            "{backend}: no probe of the other source answered"
        );
        flooder.set_nonblocking(false).unwrap();
        while flooder.recv_from(&mut buf).is_ok() {
            answered += 1;
        }
        let elapsed = started.elapsed().as_secs_f64();
        // A burst of 20, then 20 per second: the bound, whatever the flood's speed.
        let bound = 20.0 + 20.0 * (elapsed + 1.0);
        assert!(answered > 0, "{backend}: the flooder got nothing at all");
        assert!(
            (answered as f64) <= bound,
            "{backend}: {answered} replies to the flooder in {elapsed:.2}s (bound {bound})"
        );
        let limited = dropped(&server, "max_datagram_rate_per_source");
        let received = server
            .metric("wharf_datagrams_received_total", &labels(&server, &[]))
            .unwrap();
        let sent = server
            .metric("wharf_datagrams_sent_total", &labels(&server, &[]))
            .unwrap();
        assert_eq!(sent as usize, answered + probes_answered, "{backend}");
        // Datagrams the kernel dropped (socket buffer full) never reached the counters.
        assert_eq!(received, sent + limited, "{backend}");
        assert!(limited > 0.0, "{backend}");
    }
}

#[test]
fn datagrams_from_well_known_ports_are_never_answered() {
    // Binding a port below 1024 needs privileges; as an ordinary user the rule is covered by
    // the unit test of `reflection_risk` only.
    let Ok(chargen) = UdpSocket::bind("127.0.0.1:19") else {
        eprintln!("SKIP binding UDP port 19 needs CAP_NET_BIND_SERVICE");
        return;
    };
    chargen
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    for backend in backends() {
        let server = Server::start(&udp_config(""), backend);
        // A spoofed datagram "from chargen" would start an echo-chargen loop.
        assert_eq!(exchange(&chargen, server.addr("udp"), b"loop?"), None);
        server.wait_metric(
            "wharf_datagrams_dropped_total",
            &labels(&server, &[("reason", "reflection")]),
            1.0,
        );
    }
}

#[test]
fn oversized_datagrams_are_dropped_not_truncated() {
    for backend in backends() {
        let server = Server::start(&udp_config("max_datagram_size = 100"), backend);
        let addr = server.addr("udp");
        let client = client_on("127.0.0.1", Duration::from_millis(500));
        assert_eq!(exchange(&client, addr, &[b'a'; 101]), None, "{backend}");
        assert_eq!(exchange(&client, addr, &[b'a'; 5000]), None, "{backend}");
        assert_eq!(
            exchange(&client, addr, &[b'a'; 100]),
            Some(vec![b'A'; 100]),
            "{backend}"
        );
        assert_eq!(exchange(&client, addr, b""), Some(Vec::new()), "{backend}");
        server.wait_metric(
            "wharf_datagrams_dropped_total",
            &labels(&server, &[("reason", "max_datagram_size")]),
            2.0,
        );
    }
}

#[test]
fn reload_keeps_changes_and_removes_a_udp_address_and_stop_ends_the_loop() {
    for backend in backends() {
        let mut server = Server::start(&udp_config(""), backend);
        let addr = server.addr("udp");
        let client = client_on("127.0.0.1", Duration::from_secs(2));
        assert_eq!(
            exchange(&client, addr, b"one").as_deref(),
            Some(&b"ONE"[..])
        );
        let fixed = udp_config("").replace("udp:127.0.0.1:0", &format!("udp:{addr}"));

        // Kept: same settings, same socket.
        server.rewrite_config(&fixed);
        server.expect_reload("configuration reloaded");
        assert_eq!(
            exchange(&client, addr, b"two").as_deref(),
            Some(&b"TWO"[..])
        );

        // Changed: the new transform answers the next datagram, on the same socket.
        server.rewrite_config(&fixed.replace("transform = \"upper\"", "transform = \"none\""));
        server.expect_reload("configuration reloaded");
        assert_eq!(
            exchange(&client, addr, b"three").as_deref(),
            Some(&b"three"[..])
        );

        // Removed: nothing answers, and the port is free (every worker's socket closed,
        // an io_uring receive in flight included).
        let tcp_only = echo_config("");
        server.rewrite_config(&tcp_only);
        server.expect_reload("configuration reloaded");
        let deadline = Instant::now() + Duration::from_secs(5);
        let rebound = loop {
            match UdpSocket::bind(addr) {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => {
                    panic!(
                        "{backend}: {addr} still bound after removal: {e}\n{}",
                        server.log()
                    )
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        drop(rebound);

        // Added back at the same address, then a clean stop.
        server.rewrite_config(&fixed);
        server.expect_reload("configuration reloaded");
        assert_eq!(
            exchange(&client, addr, b"four").as_deref(),
            Some(&b"FOUR"[..])
        );
        server.signal(libc::SIGTERM);
        let status = server.wait(Duration::from_secs(10));
        assert!(
            status.is_some_and(|s| s.success()),
            "{backend}: {status:?}\n{}",
            server.log()
        );
    }
}

#[test]
fn check_refuses_udp_for_stream_only_plugins_and_stream_only_settings() {
    let dir = TempDir::new();
    let config = dir.write(
        "w.toml",
        "[services.web]\nplugin = \"http-hello\"\nlisten = \"udp:127.0.0.1:0\"\n\
         [services.e]\nplugin = \"echo\"\nlisten = \"udp:127.0.0.1:0\"\n\
         proxy_protocol = \"v1\"\ntrusted_proxies = [\"127.0.0.1\"]\nmax_datagram_size = 70000\n",
    );
    let out = Command::new(WHARF)
        .args(["check", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("services.web.listen = \"udp:127.0.0.1:0\": plugin `http-hello` serves stream connections only"),
        "{err}"
    );
    assert!(err.contains("services.e.proxy_protocol"), "{err}");
    assert!(
        err.contains("services.e.max_datagram_size = 70000: must be 1..=65507"),
        "{err}"
    );

    let ok = dir.write(
        "ok.toml",
        "[services.e]\nplugin = \"echo\"\nlisten = \"udp:127.0.0.1:0\"\n",
    );
    let out = Command::new(WHARF)
        .args(["check", "--config"])
        .arg(&ok)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("listen = udp:127.0.0.1:0"), "{text}");

    let out = Command::new(WHARF).arg("plugins").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    let line_after = |plugin: &str| {
        let at = lines
            .iter()
            .position(|l| l.starts_with(&format!("{plugin}:")));
        at.and_then(|i| lines.get(i + 1))
            .copied()
            .unwrap_or_default()
    };
    assert!(
        line_after("echo").contains("answers datagrams too"),
        "{text}"
    );
    assert!(!line_after("http-hello").contains("datagrams"), "{text}");
}

#[test]
fn bench_udp_echo_counts_answers_and_the_losses_a_rate_limit_causes() {
    let json = |server: &Server, extra: &[&str]| {
        let addr = server.addr("udp").to_string();
        let out = Command::new(WHARF)
            .args(["bench", "udp-echo", &addr, "--senders", "2", "-d", "1"])
            .args(["--warmup", "0.2", "--json"])
            .args(extra)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let value: serde_json::Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{e}: {text}\n{}", String::from_utf8_lossy(&out.stderr)));
        let n = |k: &str| value[k].as_f64().unwrap_or_else(|| panic!("{k} in {text}"));
        (n("sent"), n("answered"), n("lost"))
    };
    let open = Server::start(&udp_config("max_datagram_rate_per_source = 0"), "epoll");
    let (sent, answered, lost) = json(&open, &["--timeout", "2000"]);
    assert!(answered > 0.0 && lost == 0.0, "{sent} {answered} {lost}");
    assert!(sent - answered <= 2.0, "{sent} {answered}");

    // 20 per second from this one source: the rest is lost, and counted so.
    let limited = Server::start(&udp_config("max_datagram_rate_per_source = 20"), "epoll");
    let (sent, answered, lost) = json(&limited, &["--timeout", "100"]);
    assert!(
        answered > 0.0 && answered <= 20.0 + 20.0 * 1.5,
        "{answered}"
    );
    assert!(lost > 0.0, "{sent} {answered} {lost}");
}
