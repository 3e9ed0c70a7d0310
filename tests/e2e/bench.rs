//! `wharf bench` against live servers: sane figures for every protocol, errors counted and
//! reported (refused connections, a server speaking another protocol), parseable JSON, and a
//! short `wharf bench swap` that writes its table, results.json and chart.

use std::process::{Command, Output};

use crate::harness::*;

/// One service per plugin on free ports; exec allowlists `true` and `false`.
fn config(root: &std::path::Path) -> String {
    all_plugins_config(
        root,
        "[services.exec.options.commands]\n\
         true = { argv = [\"true\"] }\nfalse = { argv = [\"false\"] }\n",
    )
}

/// Runs `wharf bench <args> --json` briefly; returns the parsed report and the output.
fn bench(args: &[&str]) -> (serde_json::Value, Output) {
    bench_for("0.5", args)
}

/// [`bench`] measuring for `duration` seconds.
fn bench_for(duration: &str, args: &[&str]) -> (serde_json::Value, Output) {
    let out = Command::new(WHARF)
        .arg("bench")
        .args(args)
        .args(["--duration", duration, "--warmup", "0.2", "--json"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    let report = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "--json output does not parse ({e}): {}\n{stderr}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    (report, out)
}

/// [`bench`] against `server`, with the CPU seconds the server used while the command ran, read
/// from /proc here (independently of the report): the report's window lies inside it.
fn bench_on(server: &Server, args: &[&str]) -> (serde_json::Value, Output, f64) {
    bench_on_for(server, "0.5", args)
}

/// [`bench_on`] measuring for `duration` seconds.
fn bench_on_for(
    server: &Server,
    duration: &str,
    args: &[&str],
) -> (serde_json::Value, Output, f64) {
    let before = cpu_seconds(server.pid());
    let (report, out) = bench_for(duration, args);
    (report, out, cpu_seconds(server.pid()) - before)
}

/// utime + stime + cutime + cstime of a process, in seconds (stat(5) fields 14 to 17).
fn cpu_seconds(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<u64> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .skip(11)
        .take(4)
        .map(|f| f.parse().unwrap())
        .collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    fields.iter().sum::<u64>() as f64 / hz
}

fn num(report: &serde_json::Value, key: &str) -> f64 {
    report[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} missing in {report}"))
}

/// The figures of a clean run are consistent with each other and with the server, which used
/// `server_cpu` seconds of CPU while the command ran.
fn assert_sane(report: &serde_json::Value, server: &Server, out: &Output, server_cpu: f64) {
    assert!(out.status.success(), "{report}");
    let requests = num(report, "requests");
    assert!(requests > 0.0, "{report}");
    assert_eq!(num(report, "errors"), 0.0, "{report}");
    assert!((num(report, "requests_per_sec") - requests / num(report, "duration_s")).abs() < 1.0);
    let l = &report["latency_us"];
    let (p50, p99, max) = (num(l, "p50"), num(l, "p99"), num(l, "max"));
    assert!(0.0 < p50 && p50 <= p99 && p99 <= max && max < 5e6, "{l}");
    assert!(num(report, "bytes_in") > 0.0 && num(report, "bytes_out") > 0.0);
    // The server was found by its listening socket, and its CPU time measured.
    let pids = report["server"]["pids"].as_array().expect("server found");
    assert!(
        pids.iter().any(|p| p.as_i64() == Some(server.pid() as i64)),
        "{report}"
    );
    // It worked during the window, and no more than /proc saw it work during the whole command
    // (one clock tick of slack at each end).
    let window_cpu = num(&report["server"], "cores") * num(report, "duration_s");
    assert!(window_cpu > 0.0, "the server was busy: {report}");
    assert!(
        window_cpu <= server_cpu + 0.02,
        "{window_cpu} s measured in the window, {server_cpu} s in the whole run: {report}"
    );
    // CPU per request is that time over the requests answered.
    let per_request = num(&report["server"], "us_per_request");
    assert!(
        (per_request * requests - window_cpu * 1e6).abs() <= 1e-6 * window_cpu * 1e6 + 1.0,
        "{per_request} µs per request x {requests} requests != {window_cpu} s: {report}"
    );
}

#[test]
fn bench_reports_sane_figures_for_every_protocol_on_both_backends() {
    for backend in backends() {
        let dir = TempDir::new();
        dir.write("a.txt", &"x".repeat(10_000));
        let server = Server::start(&config(&dir.0), backend);
        let addr = |s: &str| server.addr(s).to_string();

        let (report, out, cpu) = bench_on(
            &server,
            &["echo", &addr("echo"), "-c", "8", "--size", "100"],
        );
        assert_sane(&report, &server, &out, cpu);
        // Every byte sent came back (uppercased: the parser accepts that, and checks it).
        let requests = num(&report, "requests");
        assert!(
            num(&report, "bytes_in") >= requests * 100.0 - 8.0 * 100.0,
            "{report}"
        );

        let (report, out, cpu) = bench_on(
            &server,
            &["http", &addr("web"), "-c", "4", "--pipeline", "4"],
        );
        assert_sane(&report, &server, &out, cpu);
        assert_eq!(report["pipeline"], 4);

        let (report, out, cpu) = bench_on(
            &server,
            &["exec", &addr("exec"), "-c", "2", "--command", "true"],
        );
        assert_sane(&report, &server, &out, cpu);

        let (report, out, cpu) = bench_on(
            &server,
            &[
                "get",
                &addr("files"),
                "-c",
                "2",
                "--path",
                "a.txt",
                "--verify",
            ],
        );
        assert_sane(&report, &server, &out, cpu);
        // Bytes count when they arrive inside the measured window, requests when they end
        // in it: a request per connection (2) can straddle the window's start.
        let whole = (num(&report, "requests") - 2.0) * 10_032.0;
        assert!(
            num(&report, "bytes_in") >= whole,
            "{} bytes for {} requests of 10 032",
            num(&report, "bytes_in"),
            num(&report, "requests")
        );

        // Batches far larger than the socket buffers: sending and reading overlap, or the
        // echo server (which stops reading while its answer is not read) would deadlock.
        let (report, out, cpu) = bench_on(
            &server,
            &[
                "echo",
                &addr("echo"),
                "-c",
                "2",
                "--size",
                "1000000",
                "--pipeline",
                "4",
            ],
        );
        assert_sane(&report, &server, &out, cpu);

        // Open loop: the rate asked for is the rate sent (within the run's granularity). Over
        // 2 s, so that a stall of this busy machine costs a few percent, not the band.
        let (report, out, cpu) = bench_on_for(
            &server,
            "2",
            &["echo", &addr("echo"), "-c", "4", "--rate", "2000"],
        );
        assert_sane(&report, &server, &out, cpu);
        assert_eq!(report["mode"], "open");
        let rps = num(&report, "requests_per_sec");
        assert!(
            (1500.0..=2500.0).contains(&rps),
            "{rps} req/s for 2000 asked"
        );
    }
}

/// The error descriptions of a report.
fn error_kinds(report: &serde_json::Value) -> Vec<String> {
    report["error_kinds"]
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default()
}

#[test]
fn failures_the_server_answers_are_counted_by_kind() {
    let dir = TempDir::new();
    let server = Server::start(&config(&dir.0), "epoll");
    let files = server.addr("files").to_string();
    let (report, out) = bench(&["get", &files, "-c", "2", "--path", "missing.txt"]);
    assert_eq!(out.status.code(), Some(1), "nothing succeeded: {report}");
    let requests = num(&report, "requests");
    assert!(requests > 0.0);
    assert_eq!(
        report["error_kinds"]["ERR no such file"].as_f64(),
        Some(requests)
    );

    let exec = server.addr("exec").to_string();
    for (command, kind) in [
        ("false", "command exit status 1"),
        ("rm -rf /", "refused: command not allowed"),
    ] {
        let (report, _) = bench(&["exec", &exec, "-c", "1", "--command", command]);
        assert_eq!(num(&report, "errors"), num(&report, "requests"), "{report}");
        assert_eq!(error_kinds(&report), [kind], "{report}");
    }

    let web = server.addr("web").to_string();
    let (report, _) = bench(&["http", &web, "-c", "1", "--path", "/x"]);
    assert_eq!(
        num(&report, "errors"),
        0.0,
        "http-hello answers every path: {report}"
    );
}

#[test]
fn turned_away_connections_are_errors_but_the_served_ones_count() {
    let server = Server::start(&echo_config("max_connections = 2"), "epoll");
    let (report, out) = bench(&["echo", &server.addr("echo").to_string(), "-c", "6"]);
    // Four connections are closed at once, again and again: many errors...
    assert!(num(&report, "errors") > num(&report, "failed"), "{report}");
    // ...but the two admitted ones are served, and that is a successful run.
    assert!(num(&report, "ok_per_sec") > 0.0, "{report}");
    assert_eq!(out.status.code(), Some(0), "{report}");
}

#[test]
fn a_server_that_stops_answering_shows_as_stalled_requests_in_the_open_loop() {
    // Accepts, then never reads nor answers.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming().flatten() {
            held.push(stream);
        }
    });
    let out = Command::new(WHARF)
        .args(["bench", "echo", &addr, "-c", "2", "--rate", "100", "--json"])
        .args(["--duration", "2", "--warmup", "0.2"])
        .output()
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(num(&report, "requests"), 0.0, "{report}");
    // Due more than 1 s before the end (2.2 s in all): ~120 requests at 100/s, of which only
    // the first of each connection was ever sent. All of them count, not just those two.
    let stalled = num(&report, "stalled");
    assert!((100.0..=130.0).contains(&stalled), "{report}");
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn refused_connections_are_counted_not_panics() {
    // A port nobody listens on: bound but not listening, so connecting is refused, and held
    // for the whole test so that nothing else can take the port in the meantime.
    let unlistened =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    unlistened
        .bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    let addr = unlistened
        .local_addr()
        .unwrap()
        .as_socket()
        .unwrap()
        .to_string();
    let (report, out) = bench(&["echo", &addr, "-c", "3"]);
    assert_eq!(out.status.code(), Some(1), "{report}");
    assert_eq!(num(&report, "requests"), 0.0);
    let refused = error_kinds(&report)
        .into_iter()
        .find(|k| k.starts_with("connect:") && k.contains("refused"))
        .unwrap_or_else(|| panic!("no refused connection in {report}"));
    assert!(num(&report["error_kinds"], &refused) >= 3.0, "{report}");
    assert!(report["server"].is_null(), "no local server: {report}");

    // The text report says so too.
    let out = Command::new(WHARF)
        .args(["bench", "echo", &addr, "-c", "1"])
        .args(["--duration", "0.3", "--warmup", "0"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("errors") && text.contains("refused"),
        "{text}"
    );
    assert!(text.contains("CPU not measured"), "{text}");
}

#[test]
fn a_server_speaking_another_protocol_is_a_counted_violation() {
    let dir = TempDir::new();
    let server = Server::start(&config(&dir.0), "epoll");
    // echo load against an exec server: it answers a size and waits, not the bytes sent.
    let (report, out) = bench(&["echo", &server.addr("exec").to_string(), "-c", "2"]);
    assert_eq!(out.status.code(), Some(1), "{report}");
    let kinds = error_kinds(&report);
    assert!(
        kinds
            .iter()
            .any(|k| k.starts_with("protocol: echo answered")),
        "{report}"
    );
    // HTTP load against an echo server: the request comes back instead of a response.
    let (report, _) = bench(&["http", &server.addr("echo").to_string(), "-c", "2"]);
    let kinds = error_kinds(&report);
    assert!(
        kinds.iter().any(|k| k.contains("malformed HTTP response")),
        "{report}"
    );
    // get against HTTP: "HTTP/1.1 400 ..." where the size should be.
    let (report, _) = bench(&[
        "get",
        &server.addr("web").to_string(),
        "-c",
        "1",
        "--path",
        "a",
    ]);
    let kinds = error_kinds(&report);
    assert!(
        kinds
            .iter()
            .any(|k| k.contains("expected a size, got \"HTTP/1.1 400")),
        "{report}"
    );
    // The server is still fine.
    assert_eq!(echo_roundtrip(server.addr("echo"), b"abc", 1), b"ABC");
}

#[test]
fn usage_errors_exit_2_with_a_message() {
    for (args, says) in [
        (
            &["exec", "127.0.0.1:1", "--pipeline", "2"][..],
            "cannot be pipelined",
        ),
        (&["get", "127.0.0.1:1"], "--path is required"),
        (&["echo", "127.0.0.1:1", "--rate", "0"], "--rate"),
        (&["echo", "127.0.0.1:1", "-c", "0"], "--connections"),
        (&["echo", "no-such-host.invalid:1"], "no-such-host.invalid"),
        (
            &["swap", "echo", "--backends", "epoll,epoll"],
            "listed twice",
        ),
    ] {
        let out = Command::new(WHARF)
            .arg("bench")
            .args(args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(says), "{args:?}: {stderr}");
        // `bench swap` reports every failure, usage included, with status 1.
        let status = if args[0] == "swap" { 1 } else { 2 };
        assert_eq!(out.status.code(), Some(status), "{args:?}: {stderr}");
    }
}

#[test]
fn swap_runs_every_point_interleaved_and_writes_results_and_chart() {
    let backends = backends().join(",");
    let dir = TempDir::new();
    let out = Command::new(WHARF)
        .args([
            "bench",
            "swap",
            "echo",
            "--backends",
            &backends,
            "--connections",
            "1,4",
        ])
        .args([
            "--duration",
            "0.3",
            "--warmup",
            "0.1",
            "--repeat",
            "2",
            "--out",
        ])
        .arg(&dir.0)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let names: Vec<&str> = backends.split(',').collect();
    // The table: one row per backend and connection count, ratios to the first backend.
    for name in &names {
        for conns in ["1", "4"] {
            let row = stdout
                .lines()
                .find(|l| l.split_whitespace().take(2).eq([*name, conns]))
                .unwrap_or_else(|| panic!("no row for {name} at {conns}:\n{stdout}"));
            assert!(row.ends_with('x'), "{row}");
        }
    }
    let results: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.0.join("results.json")).unwrap()).unwrap();
    let runs = results["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2 * 2 * names.len());
    // Interleaved: the backends alternate run by run.
    for (i, run) in runs.iter().enumerate() {
        assert_eq!(run["backend"], names[i % names.len()], "run {i}");
        assert!(num(&run["report"], "requests") > 0.0, "{run}");
        assert_eq!(num(&run["report"], "errors"), 0.0, "{run}");
    }
    for point in results["summary"].as_array().unwrap() {
        assert_eq!(point["runs"], 2);
        assert!(num(point, "median_requests_per_sec") > 0.0);
        if point["backend"] == names[0] {
            assert_eq!(num(point, "ratio_to_first"), 1.0);
        }
    }
    // The chart: a panel per metric, each with every backend.
    let svg = std::fs::read_to_string(dir.0.join("chart.svg")).unwrap();
    assert!(svg.starts_with("<svg"), "{svg}");
    let texts: Vec<&str> = svg
        .split("<text")
        .skip(1)
        .filter_map(|t| Some(t.split_once('>')?.1.split_once('<')?.0.trim()))
        .collect();
    for text in [
        "requests per second",
        "server CPU per request",
        "p99 latency",
    ] {
        assert!(texts.contains(&text), "{text} missing: {texts:?}");
    }
    for name in &names {
        let legends = texts.iter().filter(|t| *t == name).count();
        assert_eq!(legends, 3, "{name}: {texts:?}");
    }
    // The servers were stopped (and reaped), and did not panic.
    let pids: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("started "))
        .filter_map(|l| l.rsplit_once(", pid ")?.1.split([',', ' ']).next())
        .collect();
    assert_eq!(pids.len(), names.len(), "{stderr}");
    for pid in pids {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "server {pid} still runs"
        );
    }
    for name in &names {
        let log = std::fs::read_to_string(dir.0.join(format!("server-{name}.log"))).unwrap();
        assert!(!log.contains("panicked"), "{log}");
    }
}
