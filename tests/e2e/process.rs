//! The process plugin end to end: the real `wharf` binary running real programs (Python, sh)
//! per connection, on both backends, and /proc checked after each session for anything left
//! behind.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use super::echo::TUTORIAL_ECHO_CLIENT;
use super::harness::{
    backends, closed_within, connect, echo_once, echo_roundtrip, have_tool, metric_value, payload,
    python_client, skip_or_fail, Server, WHARF,
};

/// The example program (examples/upper_echo.py).
fn example_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/upper_echo.py")
}

/// One process service per `(name, options, extra service keys)`, two workers, metrics.
fn config(services: &[(&str, &str, &str)]) -> String {
    let mut text = String::from(
        "[server]\nworkers = 2\nshutdown_grace = \"5s\"\n\
         [metrics]\nlisten = \"127.0.0.1:0\"\n",
    );
    for (name, options, extra) in services {
        text.push_str(&format!(
            "[services.{name}]\nplugin = \"process\"\nlisten = \"127.0.0.1:0\"\n{extra}\n\
             [services.{name}.options]\n{options}\n"
        ));
    }
    text
}

/// A TOML array of strings.
fn argv(words: &[&str]) -> String {
    let quoted: Vec<String> = words.iter().map(|w| format!("{w:?}")).collect();
    format!("argv = [{}]", quoted.join(", "))
}

fn labels<'a>(service: &'a str, backend: &'a str, outcome: &'a str) -> [(&'a str, &'a str); 4] {
    [
        ("service", service),
        ("plugin", "process"),
        ("backend", backend),
        ("outcome", outcome),
    ]
}

/// One process as /proc describes it.
#[derive(Debug)]
struct Proc {
    pid: i32,
    state: String,
    ppid: i32,
    pgrp: i32,
}

fn processes() -> Vec<Proc> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid pgrp ...: comm may hold spaces, so split after the last ')'.
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        if f.len() > 2 {
            out.push(Proc {
                pid,
                state: f[0].to_string(),
                ppid: f[1].parse().unwrap_or(0),
                pgrp: f[2].parse().unwrap_or(0),
            });
        }
    }
    out
}

/// What is left of wharf's sessions: the children of `wharf` (zombies included: a zombie child
/// is a child wharf failed to reap) and the live members of the process groups `groups`.
fn leftovers(wharf: i32, groups: &[i32]) -> Vec<Proc> {
    processes()
        .into_iter()
        .filter(|p| p.ppid == wharf || (groups.contains(&p.pgrp) && p.state != "Z"))
        .collect()
}

/// Waits (up to 10 s: kills and reaps are asynchronous) until nothing of the sessions is left.
fn assert_nothing_left(wharf: i32, groups: &[i32]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = leftovers(wharf, groups);
        if left.is_empty() {
            return;
        }
        if Instant::now() > deadline {
            let pids: Vec<i32> = left.iter().map(|p| p.pid).collect();
            panic!("left behind by wharf {wharf} (groups {groups:?}): pids {pids:?}: {left:?}");
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// Reads one line (the programs below print their pid, which is their group id, first).
fn read_pid(s: &mut TcpStream) -> i32 {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while s.read(&mut byte).unwrap() == 1 && byte[0] != b'\n' {
        line.push(byte[0]);
    }
    String::from_utf8(line).unwrap().trim().parse().unwrap()
}

fn python_or_skip() -> bool {
    if have_tool("python3", "--version") {
        return true;
    }
    skip_or_fail("python3 is not installed");
    false
}

#[test]
fn the_tutorial_client_against_the_python_example_on_both_backends() {
    if !python_or_skip() {
        return;
    }
    let script = example_script();
    let options = argv(&["python3", script.to_str().unwrap()]);
    for backend in backends() {
        let server = Server::start(&config(&[("upper", &options, "")]), backend);
        let addr = server.addr("upper");
        let out = python_client(TUTORIAL_ECHO_CLIENT, addr, &[]).unwrap();
        assert_eq!(out.trim(), "HELLO FROM THE TUTORIAL", "{backend}");
        // A larger stream both ways, in uneven pieces, through the program's pipes.
        let data = payload(300_000, 7);
        let back = echo_roundtrip(addr, &data, 5);
        assert!(
            back == data.to_ascii_uppercase(),
            "{backend}: stream mangled"
        );
        // The program's stderr reached the log (and not the client, above).
        server.wait_log("process stderr", 2, Duration::from_secs(10));
        assert!(
            server.log().contains("client 127.0.0.1:"),
            "{}",
            server.log()
        );
        assert_nothing_left(server.pid(), &[]);
        let ok = metric_value(
            &server.scrape(),
            "wharf_requests_total",
            &labels("upper", backend, "ok"),
        );
        assert_eq!(ok, Some(2.0), "{backend}");
    }
}

#[test]
fn the_program_sees_ucspi_variables_and_nothing_else() {
    if !python_or_skip() {
        return;
    }
    let print_env = "import os\nfor k in sorted(os.environ): print(k + '=' + os.environ[k])";
    let options = format!(
        "{}\nenv = {{ PATH = \"/usr/bin:/bin\", GREETING = \"hi\" }}",
        argv(&["python3", "-c", print_env])
    );
    for backend in backends() {
        let server = Server::start(&config(&[("env", &options, "")]), backend);
        let addr = server.addr("env");
        // From another loopback address, so the remote and local addresses differ.
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        socket
            .bind(&SocketAddr::from(([127, 0, 0, 2], 0)).into())
            .unwrap();
        socket.connect(&addr.into()).unwrap();
        let mut s: TcpStream = socket.into();
        let client = s.local_addr().unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        let vars: Vec<&str> = out
            .lines()
            // Python itself may coerce a C locale to UTF-8 by setting LC_CTYPE (PEP 538).
            .filter(|l| !l.starts_with("LC_CTYPE="))
            .collect();
        assert_eq!(
            vars,
            [
                "GREETING=hi".to_string(),
                "PATH=/usr/bin:/bin".to_string(),
                "PROTO=TCP".to_string(),
                "TCPLOCALIP=127.0.0.1".to_string(),
                format!("TCPLOCALPORT={}", addr.port()),
                "TCPREMOTEIP=127.0.0.2".to_string(),
                format!("TCPREMOTEPORT={}", client.port()),
            ],
            "{backend}"
        );
        assert_nothing_left(server.pid(), &[]);
    }
}

#[test]
fn hostile_programs_leave_nothing_behind() {
    let services = [
        // Ignores SIGTERM and leaves a grandchild behind: killed at its timeout.
        (
            "stubborn",
            format!(
                "{}\ntimeout = \"1s\"",
                argv(&["sh", "-c", "trap '' TERM; echo $$; sleep 300 & wait"])
            ),
        ),
        // Floods stderr with lines (and one very long one), then answers.
        (
            "flood",
            argv(&[
                "sh",
                "-c",
                "head -c 300000 /dev/zero | tr '\\0' x >&2; echo >&2; \
                 yes flood-line | head -n 100000 >&2; echo done",
            ]),
        ),
        // Exits at once without reading what the client sends.
        ("early", argv(&["sh", "-c", "echo bye"])),
        // Echoes with cat and forks a grandchild that would outlive it.
        (
            "forker",
            argv(&["sh", "-c", "echo $$; sleep 300 & exec cat"]),
        ),
    ];
    let services: Vec<(&str, &str, &str)> =
        services.iter().map(|(n, o)| (*n, o.as_str(), "")).collect();
    for backend in backends() {
        let server = Server::start(&config(&services), backend);
        let wharf = server.pid();
        let mut groups = Vec::new();

        // stubborn: the client waits; the session times out, SIGTERM is ignored, SIGKILL wins.
        let mut s = connect(server.addr("stubborn"));
        let pgid = read_pid(&mut s);
        groups.push(pgid);
        let started = Instant::now();
        assert!(closed_within(&mut s, Duration::from_secs(10)), "{backend}");
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(900), "{backend}: {took:?}");
        assert_nothing_left(wharf, &groups);

        // flood: the client gets stdout only; the log gets bounded lines.
        let mut s = connect(server.addr("flood"));
        let mut out = Vec::new();
        s.read_to_end(&mut out).unwrap();
        assert_eq!(
            out, b"done\n",
            "{backend}: stderr must not reach the client"
        );
        server.wait_log("lines dropped", 1, Duration::from_secs(10));
        server.wait_log("line cut at 1024 bytes", 1, Duration::from_secs(10));
        let logged = server.log_count("flood-line");
        assert!(
            logged <= 1000,
            "{backend}: {logged} stderr lines logged: not rate-limited"
        );
        assert_nothing_left(wharf, &groups);

        // early: the program is gone before the client has sent its megabyte.
        let mut s = connect(server.addr("early"));
        let _ = s.write_all(&payload(1_000_000, 3));
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        assert!(out.is_empty() || out == b"bye\n", "{backend}: {out:?}");
        assert_nothing_left(wharf, &groups);

        // forker, client done: cat sees end of input and exits; the grandchild is killed.
        let mut s = connect(server.addr("forker"));
        groups.push(read_pid(&mut s));
        s.write_all(b"ping\n").unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).unwrap();
        assert_eq!(out, b"ping\n", "{backend}");
        assert_nothing_left(wharf, &groups);

        // forker, client leaves mid-session (a reset): the whole group is killed.
        let s = connect(server.addr("forker"));
        let mut reader = s.try_clone().unwrap();
        groups.push(read_pid(&mut reader));
        (&s).write_all(b"half a conversa").unwrap();
        socket2::SockRef::from(&s)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop((s, reader));
        assert_nothing_left(wharf, &groups);

        let scrape = server.scrape();
        let count = |service, outcome| {
            metric_value(
                &scrape,
                "wharf_requests_total",
                &labels(service, backend, outcome),
            )
        };
        assert_eq!(count("stubborn", "timeout"), Some(1.0), "{backend}");
        assert_eq!(count("flood", "ok"), Some(1.0), "{backend}");
        assert_eq!(count("forker", "ok"), Some(1.0), "{backend}");
        assert_eq!(count("forker", "client_left"), Some(1.0), "{backend}");
        let running = [("service", "forker")];
        assert_eq!(
            metric_value(&scrape, "wharf_process_running", &running),
            Some(0.0)
        );
    }
}

#[test]
fn beyond_max_concurrent_clients_are_refused_quickly_and_counted() {
    // Hostile clients hold every program slot (a program that waits for input forever);
    // others are closed at once rather than queued, and come back to a served slot once the
    // hostile ones leave.
    let options = format!("{}\nmax_concurrent = 3", argv(&["cat"]));
    for backend in backends() {
        let server = Server::start(&config(&[("cat", &options, "")]), backend);
        let addr = server.addr("cat");
        let hostile: Vec<TcpStream> = (0..10).map(|_| connect(addr)).collect();
        server.wait_metric("wharf_process_running", &[("service", "cat")], 3.0);
        // A normal client now: refused (closed without an answer) well within 3 s.
        let started = Instant::now();
        let mut s = connect(addr);
        let _ = s.write_all(b"hello\n");
        assert!(closed_within(&mut s, Duration::from_secs(3)), "{backend}");
        assert!(started.elapsed() < Duration::from_secs(3));
        let busy = metric_value(
            &server.scrape(),
            "wharf_requests_total",
            &labels("cat", backend, "busy"),
        );
        assert!(busy.unwrap_or(0.0) >= 8.0, "{backend}: busy = {busy:?}");
        drop(hostile);
        server.wait_metric("wharf_process_running", &[("service", "cat")], 0.0);
        // Served again within 5 s.
        let started = Instant::now();
        let mut s = connect(addr);
        s.write_all(b"hello\n").unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).unwrap();
        assert_eq!(out, b"hello\n", "{backend}");
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_nothing_left(server.pid(), &[]);
    }
}

#[test]
fn a_server_stop_asks_programs_to_finish_and_reaps_them() {
    let program = "trap 'echo bye; exit 0' TERM; echo $$; while :; do sleep 0.05; done";
    let options = argv(&["sh", "-c", program]);
    for backend in backends() {
        let mut server = Server::start(&config(&[("polite", &options, "")]), backend);
        let wharf = server.pid();
        let mut s = connect(server.addr("polite"));
        let pgid = read_pid(&mut s);
        server.signal(libc::SIGTERM);
        let mut out = Vec::new();
        s.read_to_end(&mut out).unwrap();
        assert_eq!(
            out, b"bye\n",
            "{backend}: the program's last words reach the client"
        );
        let status = server.wait(Duration::from_secs(10)).expect("wharf exits");
        assert!(status.success(), "{backend}: {status}");
        assert_nothing_left(wharf, &[pgid]);
    }
}

#[test]
fn the_example_config_checks_and_wharf_plugins_lists_process() {
    let out = Command::new(WHARF)
        .args(["check", "--config", "examples/process.toml"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(WHARF).arg("plugins").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("process: runs a program per connection"),
        "{text}"
    );
    assert!(text.contains("max_concurrent"), "{text}");
}

#[test]
fn over_tls_the_program_gets_plaintext_and_the_client_s_identity() {
    if !python_or_skip() {
        return;
    }
    use super::pki::Names;
    use super::tls::{client_config, pki, tls_connect, tls_table};
    let program = "import os\n\
                   os.write(1, (os.environ.get('TLS_IDENTITY', '-') + '\\n').encode())\n\
                   while True:\n    d = os.read(0, 65536)\n    if not d: break\n    \
                   os.write(1, d.upper())\n";
    let (_dir, pki, cert) = pki();
    let ops = pki.client("ops", Names::Dns("ops"));
    let mut text = config(&[("secure", &argv(&["python3", "-c", program]), "")]);
    let client_ca = format!("client_ca = \"{}\"", pki.ca_file().display());
    text.push_str(&tls_table("secure", &cert, &client_ca));
    for backend in backends() {
        let server = Server::start(&text, backend);
        let mut tls = tls_connect(
            server.addr("secure"),
            client_config(pki.ca_file(), Some(&ops)),
        )
        .unwrap();
        let mut first = [0u8; 4];
        tls.read_exact(&mut first).unwrap();
        assert_eq!(&first, b"ops\n", "{backend}");
        // Many records each way, answered as they arrive.
        for seed in 0..20 {
            let chunk = payload(16 * 1024 + seed as usize * 100, seed);
            tls.write_all(&chunk).unwrap();
            let mut back = vec![0; chunk.len()];
            tls.read_exact(&mut back).unwrap();
            assert!(
                back == chunk.to_ascii_uppercase(),
                "{backend}: record {seed} mangled"
            );
        }
        tls.conn.send_close_notify();
        let _ = tls.flush();
        let mut rest = Vec::new();
        let _ = tls.read_to_end(&mut rest);
        assert!(rest.is_empty(), "{backend}: {rest:?}");
        assert_nothing_left(server.pid(), &[]);
    }
}

/// One worker serving an echo service beside a process service whose programs flood stderr
/// with blank lines (about 2 s each).
fn flood_beside_echo_config() -> String {
    let flood = "import os, time\nend = time.time() + 2\nwhile time.time() < end:\n    os.write(2, b'\\n' * 65536)";
    let options = argv(&["python3", "-c", flood]);
    format!(
        "[server]\nworkers = 1\nshutdown_grace = \"5s\"\n\
         [metrics]\nlisten = \"127.0.0.1:0\"\n\
         [services.echo]\nplugin = \"echo\"\nlisten = \"127.0.0.1:0\"\n\
         [services.flood]\nplugin = \"process\"\nlisten = \"127.0.0.1:0\"\n\
         [services.flood.options]\n{options}\n"
    )
}

#[test]
fn a_program_flooding_stderr_with_blank_lines_does_not_stall_its_worker() {
    if !python_or_skip() {
        return;
    }
    for backend in backends() {
        let server = Server::start(&flood_beside_echo_config(), backend);
        let mut echo = connect(server.addr("echo"));
        assert_eq!(echo_once(&mut echo, b"warm"), b"warm");
        // Two flooding programs, on the only worker.
        let floods: Vec<TcpStream> = (0..2).map(|_| connect(server.addr("flood"))).collect();
        server.wait_metric("wharf_process_running", &[("service", "flood")], 2.0);
        let started = Instant::now();
        let mut worst = Duration::ZERO;
        let mut rounds = 0;
        while started.elapsed() < Duration::from_millis(1500) {
            let sent = Instant::now();
            assert_eq!(echo_once(&mut echo, b"ping"), b"ping", "{backend}");
            worst = worst.max(sent.elapsed());
            rounds += 1;
            std::thread::sleep(Duration::from_millis(20));
        }
        // The stall this guards against was seconds (the worker never came back while the
        // flood lasted). On io_uring, under a full parallel test run on a busy 2-core machine,
        // round trips beside the flood measured up to 764 ms; 1.5 s keeps the test about the
        // stall, not the machine's load.
        assert!(
            worst < Duration::from_millis(1500),
            "{backend}: an echo round trip took {worst:?} beside the flood ({rounds} rounds)"
        );
        drop(floods);
        // The log got the burst and the rate, not millions of lines; the drops were counted.
        server.wait_log("lines dropped", 1, Duration::from_secs(10));
        assert!(
            server.log_count("process stderr") < 2000,
            "{backend}: {} stderr lines logged",
            server.log_count("process stderr")
        );
        assert_nothing_left(server.pid(), &[]);
    }
}

#[test]
fn sessions_where_nothing_moves_end_at_idle_timeout() {
    let options = argv(&["sleep", "1000"]);
    for backend in backends() {
        let server = Server::start(
            &config(&[("sleepy", &options, "idle_timeout = \"2s\"")]),
            backend,
        );
        let addr = server.addr("sleepy");
        // One client sends 4 MB the program never reads, then stops sending (its writer
        // blocks once the pipe and socket buffers are full).
        let mut stuffer = connect(addr);
        let writer = {
            let mut s = stuffer.try_clone().unwrap();
            std::thread::spawn(move || {
                let _ = s.write_all(&payload(4 << 20, 3));
            })
        };
        // Another finishes sending at once and waits for an answer that never comes.
        let mut quiet = connect(addr);
        quiet.shutdown(std::net::Shutdown::Write).unwrap();
        server.wait_metric("wharf_process_running", &[("service", "sleepy")], 2.0);
        let started = Instant::now();
        assert!(
            closed_within(&mut quiet, Duration::from_secs(8)),
            "{backend}"
        );
        assert!(
            closed_within(&mut stuffer, Duration::from_secs(8)),
            "{backend}"
        );
        let waited = started.elapsed();
        assert!(
            waited < Duration::from_secs(6),
            "{backend}: idle sessions ended after {waited:?} (idle_timeout 2s)"
        );
        writer.join().unwrap();
        server.wait_metric("wharf_process_running", &[("service", "sleepy")], 0.0);
        server.wait_metric(
            "wharf_requests_total",
            &labels("sleepy", backend, "idle"),
            2.0,
        );
        assert_nothing_left(server.pid(), &[]);
    }
}

#[test]
fn descriptors_wharf_inherited_do_not_reach_programs() {
    let options = argv(&["ls", "/proc/self/fd"]);
    let mut fds = [0; 2];
    // SAFETY: pipe() fills the two descriptors it creates (close-on-exec: only the dup below
    // is inherited).
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    let stray = fds[0];
    let server = Server::start_custom(
        &config(&[("lister", &options, "")]),
        &["--backend", "epoll"],
        &[],
        |cmd| {
            use std::os::unix::process::CommandExt;
            // SAFETY: dup2 is async-signal-safe; it leaves fd 9 without close-on-exec, as a
            // careless parent (a shell) would.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::dup2(stray, 9) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        },
    )
    .unwrap();
    let mut listed = String::new();
    connect(server.addr("lister"))
        .read_to_string(&mut listed)
        .unwrap();
    let open: Vec<&str> = listed.split_whitespace().collect();
    // 0-2 are the connection's pipes; 3 is the directory ls is reading.
    assert_eq!(
        open,
        ["0", "1", "2", "3"],
        "the program inherited {listed:?}"
    );
    // SAFETY: closing the two descriptors pipe2 made.
    unsafe {
        libc::close(fds[0]);
        libc::close(fds[1]);
    }
}

/// Through `cat`, on both backends: megabytes both ways come back intact and are metered
/// exactly. On epoll they move with splice(2) (socket to stdin pipe, stdout pipe to socket);
/// on io_uring, and while bytes a PROXY header read past are handed back, they are copied.
#[test]
fn a_stream_through_cat_arrives_intact_and_is_metered_both_ways() {
    let cat = argv(&["cat"]);
    let proxied = "proxy_protocol = \"v1\"\ntrusted_proxies = [\"127.0.0.1/32\"]";
    for backend in backends() {
        let server = Server::start(
            &config(&[("cat", &cat, ""), ("proxied", &cat, proxied)]),
            backend,
        );
        let data = payload(8 << 20, 11);
        let back = echo_roundtrip(server.addr("cat"), &data, 3);
        assert!(
            back == data,
            "{backend}: {} of {} bytes, or mangled",
            back.len(),
            data.len()
        );
        // The header and the first bytes in one segment: those bytes are handed back to the
        // plugin first, then the rest moves as usual.
        let mut s = connect(server.addr("proxied"));
        let local = s.local_addr().unwrap();
        let header = format!("PROXY TCP4 127.0.0.9 127.0.0.1 {} 80\r\n", local.port());
        let first = payload(5000, 5);
        s.write_all(&[header.as_bytes(), &first].concat()).unwrap();
        let rest = payload(1 << 20, 6);
        s.write_all(&rest).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).unwrap();
        assert!(
            out == [first, rest].concat(),
            "{backend}: proxied stream mangled"
        );

        // Every byte counted, once, in each direction (the session lines are in once the
        // sessions ended: wait for both requests).
        let deadline = Instant::now() + Duration::from_secs(10);
        let text = loop {
            let text = server.scrape();
            let done = |svc| {
                metric_value(&text, "wharf_requests_total", &labels(svc, backend, "ok"))
                    == Some(1.0)
            };
            if (done("cat") && done("proxied")) || Instant::now() > deadline {
                break text;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let bytes = |name, svc| {
            metric_value(
                &text,
                name,
                &[
                    ("service", svc),
                    ("plugin", "process"),
                    ("backend", backend),
                ],
            )
        };
        let n = data.len() as f64;
        assert_eq!(
            bytes("wharf_received_bytes_total", "cat"),
            Some(n),
            "{backend}"
        );
        assert_eq!(bytes("wharf_sent_bytes_total", "cat"), Some(n), "{backend}");
        let proxied_n = (5000 + (1 << 20)) as f64;
        assert_eq!(
            bytes("wharf_sent_bytes_total", "proxied"),
            Some(proxied_n),
            "{backend}"
        );
        assert_nothing_left(server.pid(), &[]);
    }
}
