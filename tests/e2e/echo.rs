//! The echo service over real sockets on both backends, with exact byte accounting.

use std::io::Write;
use std::time::Duration;

use crate::harness::*;

#[test]
fn echo_uppercases_and_metrics_count_every_byte() {
    for backend in backends() {
        let server = Server::start(&echo_config(""), backend);
        assert_eq!(server.backend, backend);
        let addr = server.addr("echo");
        let clients: Vec<_> = (0..8u64)
            .map(|i| {
                std::thread::spawn(move || {
                    // Sizes from a few bytes to ~1 MiB: well past socket buffers, so
                    // backpressure and partial writes happen for real.
                    let data = payload([7, 4096, 65_537, 1 << 20][i as usize % 4] + i as usize, i);
                    let back = echo_roundtrip(addr, &data, i);
                    assert!(back == data.to_ascii_uppercase(), "client {i}: wrong echo");
                    data.len() as f64
                })
            })
            .collect();
        let total: f64 = clients.into_iter().map(|c| c.join().unwrap()).sum();

        let labels = [
            ("service", "echo"),
            ("plugin", "echo"),
            ("backend", backend),
        ];
        server.wait_metric("wharf_connections_active", &labels, 0.0);
        server.wait_metric("wharf_received_bytes_total", &labels, total);
        server.wait_metric("wharf_sent_bytes_total", &labels, total);
        server.wait_metric("wharf_connections_accepted_total", &labels, 8.0);
        // Recorded just after the active gauge is lowered: polled, not read once.
        server.wait_metric("wharf_connection_duration_seconds_count", &labels, 8.0);
        let text = server.scrape();
        assert!(
            text.contains("# TYPE wharf_connection_duration_seconds histogram"),
            "{text}"
        );
    }
}

#[test]
fn transform_none_is_plain_rfc862_and_env_overrides_options() {
    for backend in backends() {
        let server = Server::start_with(
            &echo_config(""),
            &["--backend", backend],
            &[("WHARF_SERVICES__ECHO__OPTIONS__TRANSFORM", "none")],
        )
        .unwrap();
        let data = payload(100_000, 42);
        assert!(echo_roundtrip(server.addr("echo"), &data, 3) == data);
    }
}

/// The tutorial's own client, as a user would run it: send a line, print the reply.
pub const TUTORIAL_ECHO_CLIENT: &str = r#"
import socket, sys
HOST, PORT = sys.argv[1], int(sys.argv[2])
client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
client.connect((HOST, PORT))
client.send(b"hello from the tutorial")
response = client.recv(4096)
print(response.decode())
client.close()
"#;

#[test]
fn tutorial_python_client_works_unmodified() {
    for backend in backends() {
        let server = Server::start(&echo_config(""), backend);
        let Some(out) = python_client(TUTORIAL_ECHO_CLIENT, server.addr("echo"), &[]) else {
            return;
        };
        assert_eq!(out.trim(), "HELLO FROM THE TUTORIAL");
    }
}

#[test]
fn a_vanished_client_does_not_disturb_others() {
    for backend in backends() {
        let server = Server::start(&echo_config(""), backend);
        let addr = server.addr("echo");
        // Reset mid-stream: SO_LINGER 0 makes close() send RST with unread data pending.
        for _ in 0..20 {
            let s = connect(addr);
            let sock = socket2::SockRef::from(&s);
            sock.set_linger(Some(Duration::ZERO)).unwrap();
            (&s).write_all(&payload(200_000, 9)[..]).unwrap_or(());
            drop(s);
        }
        let data = payload(10_000, 5);
        assert!(echo_roundtrip(addr, &data, 1) == data.to_ascii_uppercase());
        let labels = [
            ("service", "echo"),
            ("plugin", "echo"),
            ("backend", backend),
        ];
        server.wait_metric("wharf_connections_active", &labels, 0.0);
    }
}

/// The io_uring backend runs its ring path here (the whole suite tests it), and
/// `WHARF_URING_FALLBACK=1` switches it to the tokio-uring fallback, logged once, which serves
/// echo too.
#[test]
fn io_uring_runs_the_ring_path_and_its_tokio_uring_fallback_on_request() {
    if !backends().contains(&"io_uring") {
        return;
    }
    let ring = Server::start(&echo_config(""), "io_uring");
    assert_eq!(
        ring.log_count("io_uring: multishot accept and receive"),
        1,
        "{}",
        ring.log()
    );
    let fallback = Server::start_with(
        &echo_config(""),
        &["--backend", "io_uring"],
        &[("WHARF_URING_FALLBACK", "1")],
    )
    .unwrap();
    assert_eq!(
        fallback.log_count("running on the tokio-uring fallback because WHARF_URING_FALLBACK=1"),
        1,
        "logged once: {}",
        fallback.log()
    );
    for server in [&ring, &fallback] {
        let data = payload(300_000, 9);
        let back = echo_roundtrip(server.addr("echo"), &data, 5);
        assert!(back == data.to_ascii_uppercase(), "wrong echo");
    }
}
