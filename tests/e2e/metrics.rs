//! Metrics as Prometheus sees them: promtool on a live scrape, a real Prometheus server
//! scraping both backends, exact per-service counters under concurrency, access rules.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::*;

/// echo and file-get on free ports, metrics on.
fn config(root: &std::path::Path, extra: &str) -> String {
    format!(
        "[server]\nworkers = 2\nshutdown_grace = \"2s\"\n\
         [metrics]\nlisten = \"127.0.0.1:0\"\n{extra}\n\
         [services.echo]\nplugin = \"echo\"\nlisten = \"127.0.0.1:0\"\n\
         [services.web]\nplugin = \"http-hello\"\nlisten = \"127.0.0.1:0\"\n\
         [services.files]\nplugin = \"file-get\"\nlisten = \"127.0.0.1:0\"\n\
         [services.files.options]\nroot = \"{}\"\n",
        root.display()
    )
}

/// Echoes `n` bytes through `addr` and checks they all came back.
fn echo_bytes(addr: SocketAddr, n: usize) {
    assert_eq!(echo_roundtrip(addr, &vec![b'q'; n], 1).len(), n);
}

#[test]
fn promtool_accepts_a_live_scrape() {
    if !have_tool("promtool", "--version") {
        return;
    }
    for backend in backends() {
        let dir = TempDir::new();
        let server = Server::start(&config(&dir.0, ""), backend);
        echo_bytes(server.addr("echo"), 1000);
        let _ = http_get(server.addr("web"), "/");
        let scrape = server.scrape();
        let mut promtool = Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        promtool
            .stdin
            .take()
            .unwrap()
            .write_all(scrape.as_bytes())
            .unwrap();
        let out = promtool.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "promtool: {}{}\n{scrape}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        for name in [
            "wharf_build_info{version=",
            "# TYPE wharf_request_duration_seconds histogram",
            // The process-wide resources SECURITY.md's resource table points at.
            "process_open_fds ",
            "process_max_fds ",
            "process_resident_memory_bytes ",
            "process_threads ",
            "wharf_blocking_jobs_running{",
        ] {
            assert!(scrape.contains(name), "{name} missing");
        }
        // The descriptor count is this very process's: a real reading, not a placeholder.
        let open_fds: f64 = scrape
            .lines()
            .find_map(|l| l.strip_prefix("process_open_fds "))
            .and_then(|v| v.trim().parse().ok())
            .expect("process_open_fds value");
        let actual = std::fs::read_dir(format!("/proc/{}/fd", server.pid()))
            .unwrap()
            .count() as f64;
        assert!(
            (open_fds - actual).abs() <= 16.0,
            "process_open_fds {open_fds} vs /proc {actual}"
        );
    }
}

struct Prometheus {
    child: Child,
    addr: SocketAddr,
    _dir: TempDir,
}

impl Prometheus {
    /// Starts Prometheus scraping `targets` and waits until it is ready. Its port is picked
    /// before it binds it, so another process may take it in between: then it exits saying
    /// so, and it is started again on another port.
    fn start(targets: &[SocketAddr]) -> Prometheus {
        const ATTEMPTS: usize = 3;
        for attempt in 1..=ATTEMPTS {
            match Self::try_start(targets) {
                Ok(p) => return p,
                Err(log) if attempt < ATTEMPTS && log.contains("address already in use") => {
                    eprintln!("prometheus lost its port, trying another: {log}");
                }
                Err(log) => panic!("prometheus exited before it was ready:\n{log}"),
            }
        }
        unreachable!()
    }

    /// One start; `Err` with its log if it exited before it was ready.
    fn try_start(targets: &[SocketAddr]) -> Result<Prometheus, String> {
        let dir = TempDir::new();
        let targets: Vec<String> = targets.iter().map(|t| format!("\"{t}\"")).collect();
        let config = dir.write(
            "prometheus.yml",
            &format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: wharf\n    static_configs:\n      - targets: [{}]\n",
                targets.join(", ")
            ),
        );
        let addr = free_addr();
        // Its log goes to a file: a pipe nobody reads could fill and stall it.
        let log_path = dir.0.join("prometheus.log");
        let log = std::fs::File::create(&log_path).unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.0.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut p = Prometheus {
            child,
            addr,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            // A moment first: one that cannot listen exits at once, before it is asked.
            std::thread::sleep(Duration::from_millis(100));
            // Exited (its address taken, a bad flag...): fail now, with its own words.
            if let Some(status) = p.child.try_wait().unwrap() {
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                return Err(format!("{status}\n{log}"));
            }
            // Ready (another program on the port would not answer this with 200).
            if std::net::TcpStream::connect(addr).is_ok() && http_get(addr, "/-/ready").0 == 200 {
                return Ok(p);
            }
            assert!(
                Instant::now() < deadline,
                "prometheus did not become ready:\n{}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            );
        }
    }

    /// An instant query; the value of the single series it returns, if any.
    fn value(&self, promql: &str) -> Option<f64> {
        let (status, body) = http_get(
            self.addr,
            &format!("/api/v1/query?query={}", encode(promql)),
        );
        assert_eq!(status, 200, "{body}");
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        let result = json["data"]["result"].as_array()?;
        assert!(result.len() <= 1, "{promql} matched several series: {body}");
        result.first()?["value"][1].as_str()?.parse().ok()
    }

    /// Polls `promql` until it equals `want`.
    fn wait_for(&self, promql: &str, want: f64) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let got = self.value(promql);
            if got == Some(want) {
                return;
            }
            assert!(Instant::now() < deadline, "{promql} = {got:?}, want {want}");
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[test]
fn a_real_prometheus_sees_exact_byte_counts_and_live_throughput() {
    if !have_tool("prometheus", "--version") {
        return;
    }
    let dir = TempDir::new();
    let size = 80_000_000usize;
    std::fs::write(dir.0.join("big.bin"), vec![b'z'; size]).unwrap();
    let servers: Vec<(&str, Server)> = backends()
        .into_iter()
        .map(|b| (b, Server::start(&config(&dir.0, ""), b)))
        .collect();
    let targets: Vec<SocketAddr> = servers.iter().map(|(_, s)| s.metrics.unwrap()).collect();
    let prom = Prometheus::start(&targets);
    // Target discovery takes a few seconds after startup: wait until every target is up.
    prom.wait_for("count(up == 1)", targets.len() as f64);

    for (backend, server) in &servers {
        let sel = |service: &str| format!("{{service=\"{service}\",backend=\"{backend}\"}}");
        // echo: a known number of bytes each way.
        echo_bytes(server.addr("echo"), 700_001);
        echo_bytes(server.addr("echo"), 299_999);

        // file-get: a reader paced at ~4 MB/s until rate() has been seen (80 MB would take
        // ~20 s), so the transfer spans many scrapes and rate() can be asked while it runs;
        // then at full speed.
        let mut s = connect(server.addr("files"));
        s.write_all(b"get big.bin\n").unwrap();
        let mut head = [0u8; 32];
        let n = s.read(&mut head).unwrap();
        assert_eq!(&head[..n], size.to_string().as_bytes());
        s.write_all(b"ok").unwrap();
        let mut buf = vec![0u8; 256 * 1024];
        let mut received = 0usize;
        let mut saw_rate = false;
        let started = Instant::now();
        let mut next_query = Duration::from_millis(2500);
        while received < size + 32 {
            let chunk = if saw_rate { buf.len() } else { 64 * 1024 };
            let want = chunk.min(size + 32 - received);
            let n = s.read(&mut buf[..want]).unwrap();
            assert!(n > 0);
            received += n;
            if !saw_rate && started.elapsed() > next_query && received < size {
                let rate = prom.value(&format!("rate(wharf_sent_bytes_total{}[5s])", sel("files")));
                saw_rate = rate.is_some_and(|r| r > 0.0);
                next_query += Duration::from_millis(500);
            }
            if !saw_rate {
                std::thread::sleep(Duration::from_millis(16));
            }
        }
        assert!(
            saw_rate,
            "{backend}: rate() stayed zero during the transfer"
        );
        drop(s);

        prom.wait_for(
            &format!("wharf_received_bytes_total{}", sel("echo")),
            1_000_000.0,
        );
        prom.wait_for(
            &format!("wharf_sent_bytes_total{}", sel("echo")),
            1_000_000.0,
        );
        let sent = size + size.to_string().len() + 32;
        prom.wait_for(
            &format!("wharf_sent_bytes_total{}", sel("files")),
            sent as f64,
        );
        prom.wait_for(
            &format!("wharf_received_bytes_total{}", sel("files")),
            ("get big.bin\n".len() + 2) as f64,
        );
    }
}

#[test]
fn counters_are_exact_per_service_under_concurrency_on_several_workers() {
    for backend in backends() {
        let services = ["a", "b", "c"];
        let mut cfg = String::from("[server]\nworkers = 2\n[metrics]\nlisten = \"127.0.0.1:0\"\n");
        for s in services {
            cfg.push_str(&format!(
                "[services.{s}]\nplugin = \"echo\"\nlisten = \"127.0.0.1:0\"\n"
            ));
        }
        let server = Server::start(&cfg, backend);
        let threads: Vec<_> = services
            .iter()
            .flat_map(|s| {
                let addr = server.addr(s);
                (0..12).map(move |i| std::thread::spawn(move || echo_bytes(addr, 10_000 + i * 777)))
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let expected: usize = (0..12).map(|i| 10_000 + i * 777).sum();
        for s in services {
            let l = [("service", s), ("plugin", "echo"), ("backend", backend)];
            server.wait_metric("wharf_received_bytes_total", &l, expected as f64);
            server.wait_metric("wharf_sent_bytes_total", &l, expected as f64);
            server.wait_metric("wharf_connections_accepted_total", &l, 12.0);
        }
    }
}

#[test]
fn metrics_allow_from_answers_403_and_no_section_means_no_endpoint() {
    let dir = TempDir::new();
    let server = Server::start(&config(&dir.0, "allow_from = [\"10.0.0.0/8\"]"), "epoll");
    let (status, body) = http_get(server.metrics.unwrap(), "/metrics");
    assert_eq!(status, 403, "{body}");
    drop(server);
    let server = Server::start(&config(&dir.0, "allow_from = [\"127.0.0.1\"]"), "epoll");
    assert_eq!(http_get(server.metrics.unwrap(), "/metrics").0, 200);
    assert_eq!(http_get(server.metrics.unwrap(), "/nope").0, 404);
    drop(server);
    let no_metrics = "[services.echo]\nplugin = \"echo\"\nlisten = \"127.0.0.1:0\"\n";
    let server = Server::start(no_metrics, "epoll");
    assert!(server.metrics.is_none());
    assert!(
        !server.log().contains("metrics endpoint"),
        "{}",
        server.log()
    );
}

#[test]
fn health_endpoints_answer_everyone_and_readyz_turns_503_while_draining() {
    for backend in backends() {
        let dir = TempDir::new();
        // Scrapes restricted to 10/8: the health endpoints still answer loopback. A grace far
        // beyond the waits below: exiting within them means the drain ended it.
        let config = config(&dir.0, "allow_from = [\"10.0.0.0/8\"]")
            .replace("shutdown_grace = \"2s\"", "shutdown_grace = \"60s\"");
        let mut server = Server::start(&config, backend);
        let metrics = server.metrics.unwrap();
        assert_eq!(http_get(metrics, "/metrics").0, 403);
        assert_eq!(http_get(metrics, "/healthz"), (200, "ok\n".to_string()));
        assert_eq!(http_get(metrics, "/readyz"), (200, "ready\n".to_string()));
        // An open echo connection holds the drain: the server is alive but not ready.
        let mut held = connect(server.addr("echo"));
        held.write_all(b"x").unwrap();
        let mut b = [0u8; 1];
        held.read_exact(&mut b).unwrap();
        server.signal(libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(15);
        while http_get(metrics, "/readyz").0 != 503 {
            assert!(
                Instant::now() < deadline,
                "{backend}: /readyz never turned 503"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(
            http_get(metrics, "/healthz").0,
            200,
            "{backend}: alive while draining"
        );
        drop(held);
        assert_eq!(
            server.wait(Duration::from_secs(20)).and_then(|s| s.code()),
            Some(0),
            "{backend}: did not exit once drained"
        );
    }
}

#[test]
fn one_peer_gets_at_most_eight_connections_and_probes_still_pass() {
    use crate::hostile_metrics::connect_from;
    let dir = TempDir::new();
    let server = Server::start(&config(&dir.0, ""), "epoll");
    let metrics = server.metrics.unwrap();
    // 20 connections from 127.0.0.4 that never send a request: 8 are kept (until the head
    // timeout), 12 are closed at accept and counted.
    let source = std::net::IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 4));
    let held: Vec<std::net::TcpStream> = (0..20)
        .map(|_| connect_from(source, metrics).unwrap())
        .collect();
    let per_peer = [("reason", "per_peer")];
    server.wait_metric("wharf_metrics_endpoint_rejected_total", &per_peer, 12.0);
    assert_eq!(http_get(metrics, "/healthz"), (200, "ok\n".to_string()));
    assert_eq!(http_get(metrics, "/readyz").0, 200);
    assert_eq!(http_get(metrics, "/metrics").0, 200);
    drop(held);
}

/// The metric families (`# TYPE` lines) come in the same order on every scrape, even when
/// traffic in between creates new series.
#[test]
fn every_scrape_lists_the_families_in_the_same_order() {
    let dir = TempDir::new();
    let server = Server::start(&config(&dir.0, ""), "epoll");
    let families = |text: &str| -> Vec<String> {
        text.lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split_whitespace().next())
            .map(str::to_string)
            .collect()
    };
    let mut first = families(&server.scrape());
    for round in 0..5 {
        echo_bytes(server.addr("echo"), 1000 + round);
        let now = families(&server.scrape());
        // Traffic may add a family (a first histogram sample); the ones seen before stay in order.
        let kept: Vec<&String> = now.iter().filter(|f| first.contains(f)).collect();
        assert_eq!(kept, first.iter().collect::<Vec<_>>(), "round {round}");
        let mut sorted = now.clone();
        sorted.sort();
        assert_eq!(now, sorted, "round {round}");
        first = now;
    }
    assert!(first.len() > 10, "{first:?}");
}
