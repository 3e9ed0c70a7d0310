//! Holding up under load: many idle connections, slow clients, floods. Memory is measured on
//! the real server process (VmRSS), connections are real sockets.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::harness::*;

/// The server's resident memory, in KiB.
fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/<pid>/status")
}

/// Raises this process's open-file limit to `n` (its hard limit allows it here, as root).
fn raise_fd_limit(n: u64) -> bool {
    // SAFETY: getrlimit/setrlimit on a local struct.
    unsafe {
        let mut limit: libc::rlimit = std::mem::zeroed();
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        if limit.rlim_cur >= n {
            return true; // never lower it under a test running alongside
        }
        limit.rlim_max = limit.rlim_max.max(n);
        limit.rlim_cur = n;
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0
    }
}

/// One exchange with an uppercasing echo service, checked.
fn echoed(s: &mut TcpStream, msg: &[u8]) {
    assert_eq!(echo_once(s, msg), msg.to_ascii_uppercase());
}

#[test]
fn ten_thousand_idle_echo_connections_on_one_worker_cost_under_10_kib_each() {
    const CONNECTIONS: usize = 10_000;
    if !raise_fd_limit(CONNECTIONS as u64 + 1024) {
        skip_or_fail("cannot raise RLIMIT_NOFILE for 10 000 connections");
        return;
    }
    for backend in backends() {
        // The server inherits the raised limit.
        let server = Server::start(
            "[server]\nworkers = 1\n[services.echo]\nplugin = \"echo\"\n\
             listen = \"127.0.0.1:0\"\nmax_connections = 20000\n\
             [services.echo.options]\ntransform = \"upper\"\n",
            backend,
        );
        let addr = server.addr("echo");
        // Warm up what every connection shares (allocator arenas, the runtime), then measure.
        let mut warm: Vec<TcpStream> = (0..100).map(|_| connect(addr)).collect();
        for s in &mut warm {
            echoed(s, b"warm");
        }
        drop(warm);
        std::thread::sleep(Duration::from_millis(200));
        let before = rss_kib(server.pid());

        let mut conns = Vec::with_capacity(CONNECTIONS);
        for i in 0..CONNECTIONS {
            let mut s = connect(addr);
            // Every connection is served once, then stays open and silent.
            echoed(&mut s, format!("hello {i}").as_bytes());
            conns.push(s);
        }
        std::thread::sleep(Duration::from_millis(300));
        let after = rss_kib(server.pid());
        let per_conn = (after.saturating_sub(before)) as f64 * 1024.0 / CONNECTIONS as f64;
        eprintln!(
            "{backend}: {CONNECTIONS} idle connections: RSS {before} -> {after} KiB, {per_conn:.0} bytes per connection"
        );
        // A new client is still answered at once, and so is the oldest idle one.
        let mut fresh = connect(addr);
        echoed(&mut fresh, b"still here");
        echoed(&mut conns[0], b"and me");
        assert!(
            per_conn <= 10.0 * 1024.0,
            "{backend}: {per_conn:.0} bytes per idle connection (limit 10 KiB)"
        );
    }
}

/// Latency of one echo round trip on a fresh connection.
fn round_trip(addr: SocketAddr) -> Duration {
    let mut s = connect(addr);
    let start = Instant::now();
    echoed(&mut s, b"ping");
    start.elapsed()
}

#[test]
fn slow_and_silent_clients_do_not_slow_the_others_and_are_closed_by_the_timeouts() {
    const SLOW: usize = 1000;
    if !raise_fd_limit(4 * SLOW as u64 + 1024) {
        skip_or_fail("cannot raise RLIMIT_NOFILE");
        return;
    }
    for backend in backends() {
        let server = Server::start(
            "[server]\nworkers = 1\n\
             [services.echo]\nplugin = \"echo\"\nlisten = \"127.0.0.1:0\"\nidle_timeout = \"2s\"\n\
             [services.echo.options]\ntransform = \"upper\"\n\
             [services.web]\nplugin = \"http-hello\"\nlisten = \"127.0.0.1:0\"\n\
             [services.web.options]\nheader_timeout = \"2s\"\n",
            backend,
        );
        let (echo, web) = (server.addr("echo"), server.addr("web"));
        let http_round_trip = || {
            let start = Instant::now();
            let (status, body) = http_get(web, "/");
            assert_eq!(status, 200, "{body}");
            start.elapsed()
        };
        let idle = median(|| round_trip(echo));
        let idle_http = median(http_round_trip);

        // 1000 silent echo connections, 1000 slowloris HTTP heads trickling a byte at a time.
        let mut silent: Vec<TcpStream> = (0..SLOW).map(|_| connect(echo)).collect();
        let mut loris: Vec<TcpStream> = (0..SLOW).map(|_| connect(web)).collect();
        // Every slow client sends one byte per second, evenly spread: one of them every
        // millisecond, from another thread.
        let trickle = std::thread::spawn(move || {
            let head = b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ";
            let started = Instant::now();
            let mut i = 0;
            // Until every one has started its head (a loaded machine sleeps longer than asked).
            while started.elapsed() < Duration::from_millis(1600) || i < SLOW {
                let byte = head[(i / SLOW) % head.len()];
                let _ = loris[i % SLOW].write_all(&[byte]);
                i += 1;
                std::thread::sleep(Duration::from_millis(1));
            }
            loris
        });
        let started = Instant::now();
        let (mut loaded, mut loaded_http) = (Vec::new(), Vec::new());
        while started.elapsed() < Duration::from_millis(1500) {
            loaded.push(round_trip(echo));
            loaded_http.push(http_round_trip());
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut loris = trickle.join().unwrap();
        // The property the issue asks for (not slowed by the slow clients), with slack for a
        // shared CI machine whose load differs between the two phases: a head-of-line block
        // behind slow clients costs hundreds of milliseconds, far above it. The figures
        // themselves are printed and quoted in BENCHMARKS.md.
        for (what, idle, mut loaded) in [("echo", idle, loaded), ("http", idle_http, loaded_http)] {
            loaded.sort();
            let loaded = loaded[loaded.len() / 2];
            eprintln!(
                "{backend}: {what} round trip idle {idle:?}, beside 2000 slow clients {loaded:?}"
            );
            assert!(
                loaded <= idle * 3 + Duration::from_millis(10),
                "{backend}: {what} {loaded:?} beside slow clients vs {idle:?} idle"
            );
        }

        // The timeouts close them: the silent ones by idle_timeout, the trickling ones by the
        // header timeout (with a 408), within seconds.
        let deadline = Instant::now() + Duration::from_secs(15);
        for s in &mut silent {
            assert_eq!(
                ends_within(s, deadline),
                Some(Vec::new()),
                "{backend}: silent client"
            );
        }
        for s in &mut loris {
            let answer = ends_within(s, deadline).expect("slowloris client never closed");
            assert!(
                answer.starts_with(b"HTTP/1.1 408 "),
                "{backend}: {answer:?}"
            );
        }
    }
}

/// What the server sent until it closed the connection, or `None` if it was still open at
/// `deadline`.
fn ends_within(s: &mut TcpStream, deadline: Instant) -> Option<Vec<u8>> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        s.set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        match s.read(&mut buf) {
            Ok(0) => return Some(got),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Some(got),
            Err(_) => return None,
        }
    }
}

/// Median of 21 measurements.
fn median(mut f: impl FnMut() -> Duration) -> Duration {
    let mut v: Vec<Duration> = (0..21).map(|_| f()).collect();
    v.sort();
    v[10]
}

#[test]
fn connection_floods_are_turned_away_counted_and_never_exhaust_descriptors() {
    const FLOOD: usize = 2000;
    if !raise_fd_limit(4096) {
        skip_or_fail("cannot raise RLIMIT_NOFILE");
        return;
    }
    for backend in backends() {
        let server = Server::start(
            "[server]\nworkers = 1\n[metrics]\nlisten = \"127.0.0.1:0\"\n\
             [services.echo]\nplugin = \"echo\"\nlisten = \"127.0.0.1:0\"\nmax_connections = 20\n\
             [services.echo.options]\ntransform = \"upper\"\n\
             [services.private]\nplugin = \"echo\"\nlisten = \"127.0.0.1:0\"\n\
             allow_from = [\"10.0.0.0/8\"]\n",
            backend,
        );
        let (echo, private) = (server.addr("echo"), server.addr("private"));
        // Fill every slot, then flood both services from four threads at once.
        let mut held: Vec<TcpStream> = (0..20).map(|_| connect(echo)).collect();
        for s in &mut held {
            echoed(s, b"mine");
        }
        let baseline = open_fds(server.pid());
        let flooders: Vec<_> = [echo, private, echo, private]
            .into_iter()
            .map(|addr| {
                std::thread::spawn(move || {
                    let mut turned_away = 0;
                    for _ in 0..FLOOD / 4 {
                        let mut s = connect(addr);
                        let mut b = [0u8; 1];
                        // Turned away: closed without a byte, whatever we send.
                        let _ = s.write_all(b"x");
                        if matches!(s.read(&mut b), Ok(0) | Err(_)) {
                            turned_away += 1;
                        }
                    }
                    turned_away
                })
            })
            .collect();
        let mut peak = 0;
        while !flooders.iter().all(|f| f.is_finished()) {
            peak = peak.max(open_fds(server.pid()));
            std::thread::sleep(Duration::from_millis(5));
        }
        let turned_away: usize = flooders.into_iter().map(|f| f.join().unwrap()).sum();
        assert_eq!(
            turned_away, FLOOD,
            "{backend}: every flood connection is turned away"
        );
        // Rejected connections are closed at accept: descriptors stay near the baseline.
        assert!(
            peak <= baseline + 16,
            "{backend}: {peak} descriptors at the peak, {baseline} before"
        );
        for (service, reason) in [("echo", "max_connections"), ("private", "allow_from")] {
            let labels = [
                ("service", service),
                ("plugin", "echo"),
                ("backend", backend),
                ("reason", reason),
            ];
            server.wait_metric(
                "wharf_connections_rejected_total",
                &labels,
                (FLOOD / 2) as f64,
            );
        }
        // The 20 admitted clients never noticed.
        for s in &mut held {
            echoed(s, b"still mine");
        }
        assert!(!server.log().contains("panicked"));
    }
}

/// Runs `wharf bench <args>` for `secs` seconds and returns its JSON report.
fn bench_json(args: Vec<String>, secs: u64) -> std::thread::JoinHandle<serde_json::Value> {
    std::thread::spawn(move || {
        let out = std::process::Command::new(WHARF)
            .arg("bench")
            .args(&args)
            .args(["--warmup", "0", "--json", "--duration", &secs.to_string()])
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{args:?}: {e}\n{}", String::from_utf8_lossy(&out.stderr)))
    })
}

#[test]
fn soak_all_four_protocols_without_errors_and_with_flat_memory_and_descriptors() {
    // A few tens of seconds in CI; longer by hand: WHARF_SOAK_SECS=600 cargo test soak
    let secs: u64 = std::env::var("WHARF_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let backend = *backends().last().unwrap();
    let dir = TempDir::new();
    std::fs::write(dir.0.join("small.txt"), b"small\n").unwrap();
    std::fs::write(dir.0.join("f.bin"), payload(200_000, 8)).unwrap();
    let config = all_plugins_config(
        &dir.0,
        "[services.exec.options.commands]\ntrue = { argv = [\"true\"] }\n",
    )
    .replace("workers = 1", "workers = 2");
    let server = Server::start(&config, backend);
    let fds_idle = open_fds(server.pid());
    let addr = |s: &str| server.addr(s).to_string();
    let loads = vec![
        bench_json(
            vec!["echo".into(), addr("echo"), "-c".into(), "16".into()],
            secs,
        ),
        bench_json(
            vec!["http".into(), addr("web"), "-c".into(), "16".into()],
            secs,
        ),
        bench_json(
            vec![
                "exec".into(),
                addr("exec"),
                "-c".into(),
                "2".into(),
                "--command".into(),
                "true".into(),
            ],
            secs,
        ),
        bench_json(
            vec![
                "get".into(),
                addr("files"),
                "-c".into(),
                "4".into(),
                "--path".into(),
                "f.bin".into(),
                "--verify".into(),
            ],
            secs,
        ),
    ];
    // Sample memory and descriptors every half second.
    let started = Instant::now();
    let mut samples = Vec::new();
    while started.elapsed() < Duration::from_secs(secs) {
        std::thread::sleep(Duration::from_millis(500));
        samples.push((rss_kib(server.pid()), open_fds(server.pid())));
    }
    for load in loads {
        let report = load.join().unwrap();
        assert!(report["requests"].as_f64().unwrap() > 0.0, "{report}");
        assert_eq!(report["errors"].as_f64(), Some(0.0), "{report}");
    }
    // After a warm-up of a quarter of the run, flat: RSS within 10% (and 4 MiB) of its
    // post-warm-up start; descriptors (which come and go with exec's pipes and the files
    // being sent) no higher in the second half than in the first...
    let steady = &samples[samples.len() / 4..];
    let (rss0, _) = steady[0];
    let rss_max = steady.iter().map(|s| s.0).max().unwrap();
    let (first, second) = steady.split_at(steady.len() / 2);
    let fds_first = first.iter().map(|s| s.1).max().unwrap();
    let fds_second = second.iter().map(|s| s.1).max().unwrap();
    eprintln!(
        "soak {secs}s on {backend}: RSS {rss0} -> max {rss_max} KiB after warm-up; descriptors \
         {fds_idle} idle, peak {fds_first} then {fds_second} under load"
    );
    assert!(
        rss_max <= rss0 + (rss0 / 10).max(4096),
        "RSS grew from {rss0} to {rss_max} KiB"
    );
    assert!(
        fds_second <= fds_first + 8,
        "descriptors {fds_first} then {fds_second}"
    );
    // ...and back to the idle count once the clients are gone.
    let deadline = Instant::now() + Duration::from_secs(15);
    while open_fds(server.pid()) > fds_idle && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(open_fds(server.pid()) <= fds_idle, "descriptors leaked");
    assert!(!server.log().contains("panicked"));
}
