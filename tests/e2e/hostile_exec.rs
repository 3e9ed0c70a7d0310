//! Hostile clients of exec (and of sessions across reloads), issue 14 items 4, 5, 9, 10, 14a:
//! results nobody acknowledges, children that would outlive wharf, sessions a reload would
//! cut, half-closed clients taken for gone ones, and token guessing. Each attack runs on both
//! backends while a normal client measures that it is still served.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::harness::*;

/// An exec service `exec` (extra option lines `options`) with `commands` (TOML lines).
fn exec_config(dir: &TempDir, grace: &str, options: &str, commands: &str) -> String {
    format!(
        "[server]\nworkers = 2\nshutdown_grace = \"{grace}\"\n\
         [metrics]\nlisten = \"127.0.0.1:0\"\n\
         [services.exec]\nplugin = \"exec\"\nlisten = \"127.0.0.1:0\"\n\
         [services.exec.options]\ncwd = \"{}\"\n{options}\n\
         [services.exec.options.commands]\n{commands}\n",
        dir.0.display()
    )
}

/// Reads the size line of a framed answer (sent alone, before the ack).
fn read_size(s: &mut TcpStream) -> usize {
    let mut buf = [0u8; 32];
    let n = s.read(&mut buf).unwrap();
    std::str::from_utf8(&buf[..n])
        .unwrap()
        .parse()
        .unwrap_or_else(|_| panic!("not a size: {:?}", &buf[..n]))
}

/// One framed exchange on an open connection: send `line`, ack, read the result.
fn exchange(s: &mut TcpStream, line: &str) -> String {
    s.write_all(format!("{line}\n").as_bytes()).unwrap();
    let size = read_size(s);
    s.write_all(b"ok").unwrap();
    let mut text = vec![0u8; size];
    s.read_exact(&mut text).unwrap();
    String::from_utf8(text).unwrap()
}

/// A connection from the local address `from` (another 127.x source).
fn connect_from(from: &str, to: SocketAddr) -> TcpStream {
    let SocketAddr::V4(to) = to else {
        panic!("IPv4 only")
    };
    let from: std::net::Ipv4Addr = from.parse().unwrap();
    let sockaddr = |ip: std::net::Ipv4Addr, port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: a new socket, bound and connected with valid sockaddr_in values, then owned by
    // the TcpStream.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0);
        let local = sockaddr(from, 0);
        assert_eq!(
            libc::bind(fd, (&local as *const libc::sockaddr_in).cast(), len),
            0
        );
        let remote = sockaddr(*to.ip(), to.port());
        let rc = libc::connect(fd, (&remote as *const libc::sockaddr_in).cast(), len);
        assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
        let s = TcpStream::from_raw_fd(fd);
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    }
}

/// Closes `s` with a reset (SO_LINGER 0), as a crashed or aborting client does.
pub fn reset(s: TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on an open socket with a valid linger struct.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0);
    drop(s);
}

/// Resident memory of `pid`, in KiB.
fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

/// Live (not zombie) processes whose command line contains `marker`.
fn processes_with(marker: &str) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| {
            let e = e.ok()?;
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            cmdline.contains(marker).then_some(pid)
        })
        .collect()
}

fn wait_until(limit: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Item 4: 96 clients each run a command printing 1 MiB and never acknowledge it. Before, every
/// result stayed in memory (96 MiB and more); now all of them together hold at most
/// `max_pending_output` (8 MiB here), the excess is refused as busy, a normal client is served
/// within 2 s meanwhile, and the memory comes back when the attackers leave.
#[test]
fn unacknowledged_results_are_bounded_by_max_pending_output() {
    const ATTACKERS: usize = 96;
    for backend in backends() {
        let dir = TempDir::new();
        let config = exec_config(
            &dir,
            "5s",
            "timeout = \"2s\"\nmax_output = 1048576\nmax_pending_output = 8388608\nmax_concurrent = 4",
            "big = { argv = [\"head\", \"-c\", \"1048576\", \"/dev/zero\"] }\n\
             hi = { argv = [\"echo\", \"hi\"], max_output = 4096 }",
        );
        let server = Server::start(&config, backend);
        let addr = server.addr("exec");
        let pid = server.pid();
        // Warm up (worker runtimes, blocking threads, allocator arenas) before the baseline.
        for _ in 0..4 {
            let mut s = connect(addr);
            assert_eq!(exchange(&mut s, "big").len(), 1048576);
        }
        let baseline = rss_kib(pid);

        let mut attackers: Vec<TcpStream> = (0..ATTACKERS)
            .map(|_| {
                let mut s = connect(addr);
                s.write_all(b"big\n").unwrap();
                s
            })
            .collect();
        let mut peak = baseline;
        let mut held = 0;
        let mut busy = 0;
        for s in &mut attackers {
            match read_size(s) {
                1048576 => held += 1,
                _ => busy += 1,
            }
            peak = peak.max(rss_kib(pid));
        }
        // Every attacker has its answer (a result or a refusal): the memory is at its worst.
        let started = Instant::now();
        let mut normal = connect(addr);
        assert_eq!(exchange(&mut normal, "hi"), "hi\n", "{backend}");
        let took = started.elapsed();
        assert!(
            took < Duration::from_secs(2),
            "{backend}: normal client waited {took:?}"
        );
        peak = peak.max(rss_kib(pid));
        let grew_mib = peak.saturating_sub(baseline) / 1024;
        eprintln!(
            "{backend}: {held} results held, {busy} refused busy, RSS grew {grew_mib} MiB, \
             normal client served in {took:?}"
        );
        assert!(held <= 8, "{backend}: {held} results of 1 MiB held at once");
        assert!(busy > 0, "{backend}: nothing was refused");
        assert!(
            grew_mib < 40,
            "{backend}: RSS grew {grew_mib} MiB (budget 8 MiB)"
        );
        // The attackers leave: their reservations come back, and the refusals they never
        // acknowledged are counted as finished.
        drop(attackers);
        server.wait_metric(
            "wharf_requests_total",
            &[
                ("service", "exec"),
                ("plugin", "exec"),
                ("backend", backend),
                ("outcome", "busy"),
            ],
            busy as f64,
        );
        wait_until(Duration::from_secs(10), "budget released", || {
            let mut s = connect(addr);
            exchange(&mut s, "big").len() == 1048576
        });
    }
}

/// Item 5: a second SIGTERM during the drain exits at once; before, the running commands'
/// children were left behind (adopted by PID 1, their timeout never enforced).
#[test]
fn no_child_survives_a_second_signal_during_the_drain() {
    for (i, backend) in backends().into_iter().enumerate() {
        let dir = TempDir::new();
        let config = exec_config(
            &dir,
            "60s",
            "timeout = \"60s\"",
            "sleep = { argv = [\"sleep\"], allow_args = true }",
        );
        let mut server = Server::start(&config, backend);
        let marker = format!("sleep 47.{i}{}", std::process::id() % 1000);
        let clients: Vec<TcpStream> = (0..3)
            .map(|_| {
                let mut s = connect(server.addr("exec"));
                s.write_all(format!("{marker}\n").as_bytes()).unwrap();
                s
            })
            .collect();
        wait_until(Duration::from_secs(15), "commands started", || {
            processes_with(&marker).len() == 3
        });
        server.signal(libc::SIGTERM);
        server.wait_log("shutting down", 1, Duration::from_secs(10));
        server.signal(libc::SIGTERM);
        let status = server.wait(Duration::from_secs(10)).expect("exited");
        assert_eq!(status.code(), Some(1), "{}", server.log());
        wait_until(
            Duration::from_secs(5),
            "children gone after wharf exited",
            || processes_with(&marker).is_empty(),
        );
        drop(clients);
    }
}

/// Item 9: a reload that changes the exec and file-get services keeps their established
/// sessions (an authenticated idle exec session, an idle file-get session) and connections
/// that have not sent anything yet; before, all four were closed with no answer.
#[test]
fn a_reload_keeps_idle_sessions_of_changed_services() {
    for backend in backends() {
        let dir = TempDir::new();
        let root = TempDir::new();
        root.write("a.txt", "alpha");
        let config = |timeout: &str, cache: u32| {
            format!(
                "{}[services.files]\nplugin = \"file-get\"\nlisten = \"127.0.0.1:0\"\n\
                 [services.files.options]\nroot = \"{}\"\ncache_entries = {cache}\n",
                exec_config(
                    &dir,
                    "5s",
                    &format!("timeout = \"{timeout}\"\ntoken = \"s3cret\""),
                    "echo = { argv = [\"echo\"], allow_args = true }",
                ),
                root.0.display()
            )
        };
        let mut server = Server::start(&config("5s", 16), backend);
        let mut session = connect(server.addr("exec"));
        assert_eq!(exchange(&mut session, "auth s3cret"), "ok");
        assert_eq!(exchange(&mut session, "echo before"), "before\n");
        let mut silent = connect(server.addr("exec"));
        let mut files_session = connect(server.addr("files"));
        assert!(exchange(&mut files_session, "list").contains("a.txt"));
        let mut files_silent = connect(server.addr("files"));

        server.rewrite_config(&config("6s", 32));
        server.expect_reload("configuration reloaded");

        assert_eq!(exchange(&mut session, "echo after"), "after\n", "{backend}");
        assert_eq!(exchange(&mut silent, "auth s3cret"), "ok", "{backend}");
        assert_eq!(exchange(&mut silent, "echo late"), "late\n", "{backend}");
        assert!(
            exchange(&mut files_session, "list").contains("a.txt"),
            "{backend}"
        );
        assert!(
            exchange(&mut files_silent, "list").contains("a.txt"),
            "{backend}"
        );
    }
}

/// Reloads must not multiply exec's bounds: with `max_concurrent = 1`, a session opened before
/// a reload (which changes the service, so a new generation serves new connections) and one
/// opened after it share the one process slot. Before, each generation had its own slots, so
/// every reload added `max_concurrent` (and `max_pending_output`) for old sessions.
#[test]
fn a_reload_does_not_multiply_the_services_bounds() {
    for (i, backend) in backends().into_iter().enumerate() {
        let dir = TempDir::new();
        let config = |nice: u32| {
            exec_config(
                &dir,
                "5s",
                &format!("max_concurrent = 1\ntimeout = \"30s\"\nnice = {nice}"),
                "sleep = { argv = [\"sleep\"], allow_args = true }",
            )
        };
        let mut server = Server::start(&config(10), backend);
        let mut old_session = connect(server.addr("exec"));
        server.rewrite_config(&config(11));
        server.expect_reload("configuration reloaded");
        let mut new_session = connect(server.addr("exec"));

        let marker = format!("3.{i}{}", std::process::id() % 1000);
        let started = Instant::now();
        old_session
            .write_all(format!("sleep {marker}\n").as_bytes())
            .unwrap();
        wait_until(Duration::from_secs(15), "first command started", || {
            processes_with(&format!("sleep {marker}")).len() == 1
        });
        new_session
            .write_all(format!("sleep {marker}\n").as_bytes())
            .unwrap();
        // The second waits for the one slot: never two at once.
        let mut peak = 0;
        while started.elapsed() < Duration::from_secs(2) {
            peak = peak.max(processes_with(&format!("sleep {marker}")).len());
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(peak, 1, "{backend}: both generations ran a command at once");
        let first = read_size(&mut old_session);
        let second = read_size(&mut new_session);
        assert_eq!((first, second), (20, 20), "{backend}");
        assert!(
            started.elapsed() >= Duration::from_secs(6),
            "{backend}: the second command ran beside the first ({:?})",
            started.elapsed()
        );
    }
}

/// Item 10: `sleep 1` then SHUT_WR is a client still reading: it gets its whole answer
/// (before, the command was killed and nothing came back). A client that resets has its
/// command killed.
#[test]
fn a_half_closed_client_gets_its_answer_and_a_reset_one_is_dropped() {
    for (i, backend) in backends().into_iter().enumerate() {
        let dir = TempDir::new();
        let config = exec_config(
            &dir,
            "5s",
            "timeout = \"60s\"",
            "sleep = { argv = [\"sleep\"], allow_args = true }",
        );
        let server = Server::start(&config, backend);
        let mut s = connect(server.addr("exec"));
        s.write_all(b"sleep 1\n").unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        assert_eq!(answer, "20cmd has no output...", "{backend}");

        let marker = format!("sleep 53.{i}{}", std::process::id() % 1000);
        let mut s = connect(server.addr("exec"));
        s.write_all(format!("{marker}\n").as_bytes()).unwrap();
        wait_until(Duration::from_secs(15), "command started", || {
            !processes_with(&marker).is_empty()
        });
        reset(s);
        wait_until(
            Duration::from_secs(15),
            "reset client's command killed",
            || processes_with(&marker).is_empty(),
        );
    }
}

/// 14a: 8 connections at a time guess tokens from 127.0.0.1 for 3 s. Before, every guess was
/// checked (~900/s); now the source gets a burst of 5 and then 1 a second, the rest refused
/// unchecked; a client with the right token from 127.0.0.2 is served within 2 s throughout;
/// failures are logged, rate-limited, with the peer and without the token.
#[test]
fn token_guessing_from_one_source_is_slowed_without_delaying_others() {
    for backend in backends() {
        let dir = TempDir::new();
        let config = exec_config(
            &dir,
            "5s",
            "token = \"right-token-42\"",
            "echo = { argv = [\"echo\"], allow_args = true }",
        );
        let server = Server::start(&config, backend);
        let addr = server.addr("exec");
        let stop = Arc::new(AtomicBool::new(false));
        let checked = Arc::new(AtomicUsize::new(0));
        let throttled = Arc::new(AtomicUsize::new(0));
        let guessers: Vec<_> = (0..8)
            .map(|t| {
                let (stop, checked, throttled) = (
                    Arc::clone(&stop),
                    Arc::clone(&checked),
                    Arc::clone(&throttled),
                );
                std::thread::spawn(move || {
                    let mut n = 0;
                    while !stop.load(Ordering::Relaxed) {
                        n += 1;
                        let mut s = connect_from("127.0.0.1", addr);
                        match exchange(&mut s, &format!("auth guess-{t}-{n}")).as_str() {
                            "auth failed" => checked.fetch_add(1, Ordering::Relaxed),
                            _ => throttled.fetch_add(1, Ordering::Relaxed),
                        };
                        // Bounded load (this machine is shared): still hundreds of tries/s.
                        std::thread::sleep(Duration::from_millis(2));
                    }
                })
            })
            .collect();
        let flood = Instant::now();
        let mut worst = Duration::ZERO;
        while flood.elapsed() < Duration::from_secs(3) {
            let started = Instant::now();
            let mut s = connect_from("127.0.0.2", addr);
            assert_eq!(exchange(&mut s, "auth right-token-42"), "ok", "{backend}");
            assert_eq!(exchange(&mut s, "echo in"), "in\n", "{backend}");
            worst = worst.max(started.elapsed());
            std::thread::sleep(Duration::from_millis(100));
        }
        stop.store(true, Ordering::Relaxed);
        for g in guessers {
            g.join().unwrap();
        }
        let secs = flood.elapsed().as_secs_f64();
        let (checked, throttled) = (
            checked.load(Ordering::Relaxed),
            throttled.load(Ordering::Relaxed),
        );
        eprintln!(
            "{backend}: {checked} guesses checked, {throttled} refused unchecked in {secs:.1} s; \
             other source served in {worst:?} at worst"
        );
        assert!(throttled > 0, "{backend}");
        // Burst 5, then 1/s (60 per minute), with a second of slack.
        assert!(
            (checked as f64) <= 5.0 + secs + 1.0,
            "{backend}: {checked} guesses checked in {secs:.1} s"
        );
        assert!(
            worst < Duration::from_secs(2),
            "{backend}: other source waited {worst:?}"
        );
        let log = server.log();
        let lines = log.lines().filter(|l| l.contains("authentication failed"));
        let logged: Vec<&str> = lines.collect();
        assert!(!logged.is_empty(), "{log}");
        assert!(logged.iter().all(|l| l.contains("127.0.0.1")), "{log}");
        assert!(logged.len() as f64 <= secs + 2.0, "{} lines", logged.len());
        assert!(
            !log.contains("guess-") && !log.contains("right-token-42"),
            "{log}"
        );
    }
}
