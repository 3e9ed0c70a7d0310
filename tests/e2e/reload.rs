//! Config reload (SIGHUP, `--watch-config`) on a real server with real clients, on both
//! backends: clients connected across a reload see no error, a client connecting in a tight
//! loop sees no refusal, changed services serve new connections with the new settings while
//! open ones keep the old, removed services drain, and an invalid or unbindable config changes
//! nothing.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::harness::*;

/// What a client thread saw.
#[derive(Debug, Default)]
struct Seen {
    exchanges: usize,
    /// Replies in upper case (the service's `transform = "upper"`).
    upper: usize,
    /// Replies as sent (`transform = "none"`).
    verbatim: usize,
    errors: Vec<String>,
}

/// One echo exchange of a lower-case message; which transform answered, or what went wrong.
fn exchange(s: &mut TcpStream, n: usize, seen: &mut Seen) {
    let msg = format!("msg-{n:08}\n");
    let mut back = vec![0; msg.len()];
    match s
        .write_all(msg.as_bytes())
        .and_then(|_| s.read_exact(&mut back))
    {
        Ok(()) if back == msg.as_bytes() => seen.verbatim += 1,
        Ok(()) if back == msg.to_uppercase().as_bytes() => seen.upper += 1,
        Ok(()) => seen
            .errors
            .push(format!("garbled: {:?}", String::from_utf8_lossy(&back))),
        Err(e) => seen.errors.push(format!("exchange {n}: {e}")),
    }
    seen.exchanges += 1;
}

/// A client thread, and how many exchanges it has made so far.
struct Client {
    progress: Arc<AtomicUsize>,
    thread: JoinHandle<Seen>,
}

impl Client {
    /// Runs `step` (exchange number, what was seen) until `stop` or the first error.
    fn spawn(
        stop: Arc<AtomicBool>,
        mut step: impl FnMut(usize, &mut Seen) + Send + 'static,
    ) -> Self {
        let progress = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&progress);
        let thread = std::thread::spawn(move || {
            let mut seen = Seen::default();
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) && seen.errors.is_empty() {
                step(n, &mut seen);
                n += 1;
                counter.store(n, Ordering::Relaxed);
            }
            seen
        });
        Client { progress, thread }
    }

    fn join(self) -> Seen {
        self.thread.join().unwrap()
    }
}

/// One connection kept open, exchanging until `stop`.
fn steady_client(addr: SocketAddr, stop: Arc<AtomicBool>) -> Client {
    let mut s = connect(addr);
    Client::spawn(stop, move |n, seen| {
        exchange(&mut s, n, seen);
        std::thread::sleep(Duration::from_millis(2));
    })
}

/// A new connection per exchange, as fast as it goes, until `stop`.
fn connecting_client(addr: SocketAddr, stop: Arc<AtomicBool>) -> Client {
    Client::spawn(stop, move |n, seen| match TcpStream::connect(addr) {
        Ok(mut s) => {
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            exchange(&mut s, n, seen);
        }
        Err(e) => seen.errors.push(format!("connect {n}: {e}")),
    })
}

/// Waits until every client has made `n` more exchanges (rather than sleeping a fixed time,
/// which a loaded machine may spend without scheduling them at all).
fn wait_progress<'a>(clients: impl IntoIterator<Item = &'a Client>, n: usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    for c in clients {
        let target = c.progress.load(Ordering::Relaxed) + n;
        while c.progress.load(Ordering::Relaxed) < target && !c.thread.is_finished() {
            assert!(
                std::time::Instant::now() < deadline,
                "a client made no progress"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

fn echo_service(name: &str, listen: &str, transform: &str, extra: &str) -> String {
    format!(
        "[services.{name}]\nplugin = \"echo\"\nlisten = \"{listen}\"\n{extra}\
         [services.{name}.options]\ntransform = \"{transform}\"\n"
    )
}

fn header(grace: &str) -> String {
    format!(
        "[server]\nworkers = 2\nshutdown_grace = \"{grace}\"\n\
         [metrics]\nlisten = \"127.0.0.1:0\"\n"
    )
}

fn reloads(server: &Server, result: &str) -> f64 {
    server
        .metric("wharf_config_reloads_total", &[("result", result)])
        .unwrap_or(-1.0)
}

#[test]
fn a_reload_keeps_clients_and_listeners_and_applies_changes_on_both_backends() {
    for backend in backends() {
        let root = TempDir::new();
        let file = payload(8 << 20, 3);
        std::fs::write(root.0.join("big.bin"), &file).unwrap();
        let fixed = free_addr().to_string();
        let files = format!(
            "[services.gone]\nplugin = \"file-get\"\nlisten = \"127.0.0.1:0\"\n\
             [services.gone.options]\nroot = \"{}\"\n",
            root.0.display()
        );
        let v1 = format!(
            "{}{}{}{files}",
            header("20s"),
            echo_service("keep", "127.0.0.1:0", "upper", ""),
            echo_service("change", &fixed, "upper", "")
        );
        let v2 = format!(
            "{}{}{}{}",
            header("20s"),
            echo_service("keep", "127.0.0.1:0", "upper", ""),
            echo_service("change", &fixed, "none", ""),
            echo_service("added", "127.0.0.1:0", "upper", "")
        );
        let mut server = Server::start(&v1, backend);
        let (keep, change, gone) = (
            server.addr("keep"),
            server.addr("change"),
            server.addr("gone"),
        );

        let stop = Arc::new(AtomicBool::new(false));
        let clients = [
            ("steady on keep", steady_client(keep, stop.clone())),
            ("steady on change", steady_client(change, stop.clone())),
            ("connecting to keep", connecting_client(keep, stop.clone())),
            (
                "connecting to change",
                connecting_client(change, stop.clone()),
            ),
        ];
        // A download from the service being removed, running across the reload.
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let download = std::thread::spawn(move || {
            download_with(gone, "big.bin", Some(64 << 10), move || {
                let _ = started_tx.send(());
            })
        });
        started_rx.recv_timeout(Duration::from_secs(10)).unwrap();
        wait_progress(clients.iter().map(|(_, c)| c), 25);

        server.rewrite_config(&v2);
        let outcome = server.reload();
        assert!(outcome.contains("configuration reloaded"), "{outcome}");
        assert!(
            outcome.contains("unchanged=1")
                && outcome.contains("changed=change")
                && outcome.contains("added=added")
                && outcome.contains("removed=gone"),
            "{outcome}"
        );
        // Every connection accepted after the outcome line gets the new settings.
        wait_progress(clients.iter().map(|(_, c)| c), 25);
        stop.store(true, Ordering::Relaxed);

        let seen: Vec<(&str, Seen)> = clients
            .into_iter()
            .map(|(name, c)| (name, c.join()))
            .collect();
        println!("{backend}: {seen:?}");
        for (name, s) in &seen {
            assert!(s.errors.is_empty(), "{backend}: {name}: {:?}", s.errors);
            assert!(s.exchanges >= 50, "{backend}: {name}: {s:?}");
        }
        // Unchanged service: always upper. The open connection to the changed service keeps
        // the settings it was accepted with; new connections get the new ones.
        assert_eq!(seen[0].1.verbatim, 0, "{backend}");
        assert_eq!(
            seen[1].1.verbatim, 0,
            "{backend}: old connection, old settings"
        );
        assert_eq!(seen[2].1.verbatim, 0, "{backend}");
        assert!(
            seen[3].1.upper > 0 && seen[3].1.verbatim > 0,
            "{backend}: new connections switch to the new settings: {:?}",
            seen[3].1
        );

        // The removed service finished its download, then refuses; the added one serves.
        let (size, digest) = download.join().unwrap();
        assert_eq!(size, file.len() as u64);
        assert_eq!(
            digest.as_deref(),
            Some(md5_hex(&file).as_str()),
            "{backend}"
        );
        assert!(
            refused_within(gone, Duration::from_secs(10)),
            "{backend}: a removed service stops listening"
        );
        let mut added = connect(server.addr("added"));
        assert_eq!(echo_once(&mut added, b"new\n"), b"NEW\n");
        assert_eq!(reloads(&server, "success"), 1.0);
        assert_eq!(
            server.metric("wharf_config_last_reload_successful", &[]),
            Some(1.0)
        );

        // An invalid config: every error logged, nothing changes.
        server.rewrite_config(&format!(
            "{v2}[services.bad]\nplugin = \"ech\"\nlisten = \"127.0.0.1:0\"\n\
             [services.keep.options.extra]\nx = 1\n"
        ));
        let outcome = server.reload();
        assert!(outcome.contains("reload rejected"), "{outcome}");
        let path = server.config_path().display().to_string();
        let log = server.log();
        assert!(
            log.contains(&format!(
                "{path}: services.bad.plugin = \"ech\": unknown plugin `ech`"
            )),
            "{log}"
        );
        assert_eq!(reloads(&server, "invalid"), 1.0);
        assert_eq!(
            server.metric("wharf_config_last_reload_successful", &[]),
            Some(0.0)
        );

        // A valid config that cannot be applied (an address in use): nothing changes either,
        // not even the other service it edits.
        let busy = TcpListener::bind("127.0.0.1:0").unwrap();
        let busy_addr = busy.local_addr().unwrap().to_string();
        server.rewrite_config(&format!(
            "{}{}{}{}{}",
            header("20s"),
            echo_service("keep", "127.0.0.1:0", "none", ""),
            echo_service("change", &fixed, "none", ""),
            echo_service("added", "127.0.0.1:0", "upper", ""),
            echo_service("blocked", &busy_addr, "upper", "")
        ));
        let outcome = server.reload();
        assert!(outcome.contains("reload failed"), "{outcome}");
        assert!(
            outcome.contains(&format!(
                "{path}: services.blocked.listen: cannot listen on"
            )),
            "{outcome}"
        );
        assert_eq!(reloads(&server, "failed"), 1.0);
        let mut k = connect(keep);
        assert_eq!(echo_once(&mut k, b"still\n"), b"STILL\n", "{backend}");
        for s in [keep, change, server.addr("added")] {
            assert!(TcpStream::connect(s).is_ok(), "{backend}: {s} still serves");
        }

        // A valid config again, and the drain at exit still covers every generation.
        server.rewrite_config(&v2);
        server.expect_reload("configuration reloaded");
        assert_eq!(
            server.metric("wharf_config_last_reload_successful", &[]),
            Some(1.0)
        );
        drop(k);
        drop(added);
        server.signal(libc::SIGTERM);
        let status = server.wait(Duration::from_secs(10));
        assert_eq!(status.and_then(|s| s.code()), Some(0), "{}", server.log());
    }
}

#[test]
fn a_renamed_service_keeps_its_socket_and_max_connections_spans_generations() {
    for backend in backends() {
        let fixed = free_addr().to_string();
        let limit = "max_connections = 2\n";
        let mut server = Server::start(
            &format!(
                "{}{}",
                header("20s"),
                echo_service("a", &fixed, "upper", limit)
            ),
            backend,
        );
        let addr = server.addr("a");

        // Two connections of the first generation fill the service.
        let mut old: Vec<TcpStream> = (0..2).map(|_| connect(addr)).collect();
        for s in &mut old {
            assert_eq!(echo_once(s, b"x\n"), b"X\n");
        }
        server.rewrite_config(&format!(
            "{}{}",
            header("20s"),
            echo_service("a", &fixed, "none", limit)
        ));
        server.expect_reload("changed=a");
        // The series is shared by both generations: the old connections still count.
        let active = [("service", "a"), ("plugin", "echo"), ("backend", backend)];
        assert_eq!(
            server.metric("wharf_connections_active", &active),
            Some(2.0)
        );
        let mut third = connect(addr);
        assert!(
            closed_within(&mut third, Duration::from_secs(10)),
            "{backend}: the old generation's connections still count"
        );
        server.wait_metric(
            "wharf_connections_rejected_total",
            &[
                ("service", "a"),
                ("plugin", "echo"),
                ("backend", backend),
                ("reason", "max_connections"),
            ],
            1.0,
        );
        // A slot frees once the server has seen the close (the gauge falls after the count).
        drop(old.pop());
        server.wait_metric("wharf_connections_active", &active, 1.0);
        let mut fresh = connect(addr);
        assert_eq!(
            echo_once(&mut fresh, b"y\n"),
            b"y\n",
            "{backend}: new settings"
        );
        assert_eq!(
            echo_once(&mut old[0], b"z\n"),
            b"Z\n",
            "{backend}: old settings"
        );
        drop(fresh);
        drop(old);
        // No limit for what follows: a client connecting in a loop may have a few
        // connections still closing on the server side.
        server.rewrite_config(&format!(
            "{}{}",
            header("20s"),
            echo_service("a", &fixed, "upper", "")
        ));
        server.expect_reload("changed=a");

        // Renamed: the new name inherits the socket; a connecting client never sees a refusal.
        let stop = Arc::new(AtomicBool::new(false));
        let client = connecting_client(addr, stop.clone());
        wait_progress([&client], 25);
        server.rewrite_config(&format!(
            "{}{}",
            header("20s"),
            echo_service("b", &fixed, "none", "")
        ));
        let outcome = server.reload();
        assert!(outcome.contains("changed=b (was a)"), "{outcome}");
        wait_progress([&client], 25);
        stop.store(true, Ordering::Relaxed);
        let seen = client.join();
        assert!(seen.errors.is_empty(), "{backend}: {:?}", seen.errors);
        assert!(seen.verbatim > 0 && seen.upper > 0, "{backend}: {seen:?}");
        let accepted = server.metric(
            "wharf_connections_accepted_total",
            &[("service", "b"), ("plugin", "echo"), ("backend", backend)],
        );
        assert!(accepted.unwrap_or(0.0) > 0.0, "{backend}: {accepted:?}");

        // Reloads that add and remove a service leave no descriptor behind.
        let base = format!("{}{}", header("20s"), echo_service("b", &fixed, "none", ""));
        let with_extra = format!("{base}{}", echo_service("x", "127.0.0.1:0", "upper", ""));
        for service in ["a", "b"] {
            server.wait_metric(
                "wharf_connections_active",
                &[
                    ("service", service),
                    ("plugin", "echo"),
                    ("backend", backend),
                ],
                0.0,
            );
        }
        let before = settled_open_fds(server.pid());
        for _ in 0..10 {
            server.rewrite_config(&with_extra);
            server.expect_reload("added=x");
            let mut x = connect(server.addr("x"));
            assert_eq!(echo_once(&mut x, b"x\n"), b"X\n");
            server.rewrite_config(&base);
            server.expect_reload("removed=x");
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while open_fds(server.pid()) > before && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            open_fds(server.pid()) <= before,
            "{backend}: descriptors after 20 reloads: {} (before: {before})",
            open_fds(server.pid())
        );
        assert_eq!(reloads(&server, "success"), 23.0);
    }
}

#[test]
fn a_replaced_generation_finishes_its_connections_and_shutdown_still_bounds_them() {
    for backend in backends() {
        let web = |body: &str| {
            format!(
                "[services.web]\nplugin = \"http-hello\"\nlisten = \"127.0.0.1:0\"\n\
                 [services.web.options]\nbody = \"{body}\"\n"
            )
        };
        let mut server = Server::start(
            &format!(
                "{}{}{}",
                header("20s"),
                web("one"),
                echo_service("e", "127.0.0.1:0", "upper", "")
            ),
            backend,
        );
        let mut http = connect(server.addr("web"));
        http.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut head = [0u8; 512];
        let n = http.read(&mut head).unwrap();
        assert!(String::from_utf8_lossy(&head[..n]).ends_with("one"));
        let mut echo = connect(server.addr("e"));
        assert_eq!(echo_once(&mut echo, b"a\n"), b"A\n");

        server.rewrite_config(&format!(
            "{}{}{}",
            header("1s"),
            web("two"),
            echo_service("e", "127.0.0.1:0", "none", "")
        ));
        server.expect_reload("configuration reloaded");
        // The idle keep-alive connection of the old generation goes on with the old settings
        // (a reload ends no established connection); new connections get the new body.
        http.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let n = http.read(&mut head).unwrap();
        assert!(
            String::from_utf8_lossy(&head[..n]).ends_with("one"),
            "{backend}"
        );
        let (status, body) = http_get(server.addr("web"), "/");
        assert_eq!((status, body.as_str()), (200, "two"));
        // The old echo stream goes on with its old settings, well past the new grace period:
        // a reload sets no deadline.
        std::thread::sleep(Duration::from_millis(1500));
        assert_eq!(echo_once(&mut echo, b"b\n"), b"B\n", "{backend}");
        let mut fresh = connect(server.addr("e"));
        assert_eq!(echo_once(&mut fresh, b"c\n"), b"c\n");
        server.wait_metric(
            "wharf_connections_active",
            &[("service", "e"), ("plugin", "echo"), ("backend", backend)],
            2.0,
        );

        // A shutdown bounds every generation by the grace period (1 s now), and ends the old
        // generation's idle keep-alive connection at once.
        server.signal(libc::SIGTERM);
        assert!(
            closed_within(&mut http, Duration::from_secs(10)),
            "{backend}"
        );
        assert!(
            closed_within(&mut echo, Duration::from_secs(10)),
            "{backend}"
        );
        let status = server.wait(Duration::from_secs(10));
        assert_eq!(status.and_then(|s| s.code()), Some(0), "{}", server.log());
        assert!(
            server.log().contains("grace period over"),
            "{}",
            server.log()
        );
    }
}

#[test]
fn watch_config_reloads_when_the_file_changes() {
    let v1 = format!(
        "{}{}",
        header("5s"),
        echo_service("one", "127.0.0.1:0", "upper", "")
    );
    let mut server = Server::start_with(&v1, &["--watch-config"], &[]).unwrap();
    assert!(server.log().contains("watching the config file"));
    server.rewrite_config(&format!(
        "{v1}{}",
        echo_service("two", "127.0.0.1:0", "upper", "")
    ));
    server.wait_log("configuration reloaded", 1, Duration::from_secs(10));
    server.refresh_services();
    let mut two = connect(server.addr("two"));
    assert_eq!(echo_once(&mut two, b"hi\n"), b"HI\n");

    // A broken file is rejected once (not at every poll) and the services keep running.
    server.rewrite_config("[services.one\n");
    server.wait_log("reload rejected", 1, Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(server.log_count("reload rejected"), 1, "{}", server.log());
    assert_eq!(echo_once(&mut two, b"still\n"), b"STILL\n");

    // Fixed again: reloaded, and SIGHUP still works beside the watcher.
    server.rewrite_config(&v1);
    server.wait_log("configuration reloaded", 2, Duration::from_secs(10));
    // `two` is gone: no new connections; the open one finishes on its own.
    assert!(refused_within(server.addr("two"), Duration::from_secs(10)));
    assert_eq!(echo_once(&mut two, b"last\n"), b"LAST\n");
    server.expect_reload("configuration reloaded");
    assert_eq!(reloads(&server, "success"), 3.0);
    assert_eq!(reloads(&server, "invalid"), 1.0);
}

#[test]
fn watch_config_needs_a_config_file() {
    let out = std::process::Command::new(WHARF)
        .args(["serve", "--watch-config"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--config"));
}

/// Whether process `pid` has a handler installed for `signal` (`SigCgt` in /proc).
fn catches(pid: u32, signal: i32) -> bool {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("SigCgt:"))
        .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
        .is_some_and(|mask| mask & (1 << (signal - 1)) != 0)
}

#[test]
fn sighup_while_starting_is_remembered_not_fatal() {
    use std::io::BufRead;
    let dir = TempDir::new();
    let config = dir.write(
        "wharf.toml",
        &format!(
            "{}{}",
            header("5s"),
            echo_service("e", "127.0.0.1:0", "upper", "")
        ),
    );
    let mut child = std::process::Command::new(WHARF)
        .args(["serve", "--config"])
        .arg(&config)
        .env("WHARF_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    // From the moment wharf catches SIGHUP (its first act), send it every millisecond until
    // it is ready: the signal must never find the default action (terminate) in place.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !catches(pid, libc::SIGHUP) {
        assert!(
            std::time::Instant::now() < deadline,
            "wharf never caught SIGHUP"
        );
        assert!(child.try_wait().unwrap().is_none(), "wharf exited");
    }
    let mut log = Vec::new();
    let mut sent = 0;
    while !log.iter().any(|l: &String| l.contains("wharf ready")) {
        assert!(std::time::Instant::now() < deadline, "not ready: {log:#?}");
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(pid as i32, libc::SIGHUP) };
        sent += 1;
        std::thread::sleep(Duration::from_millis(1));
        log.extend(rx.try_iter());
    }
    assert!(sent > 0);
    // At least one reload follows (the early ones are coalesced), and the server serves.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !log.iter().any(|l| l.contains("configuration reloaded")) {
        assert!(
            std::time::Instant::now() < deadline,
            "no reload after {sent} SIGHUPs: {log:#?}"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "wharf exited: {log:#?}"
        );
        log.extend(rx.recv_timeout(Duration::from_millis(100)));
    }
    // SAFETY: as above.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success(), "{log:#?}");
}

#[test]
fn systemd_hears_ready_reloading_and_stopping() {
    use std::os::unix::net::UnixDatagram;
    let dir = TempDir::new();
    let path = dir.0.join("notify.sock");
    let systemd = UnixDatagram::bind(&path).unwrap();
    systemd
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let next = || {
        let mut buf = [0u8; 256];
        let n = systemd.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).to_string()
    };
    let config = format!(
        "{}{}",
        header("5s"),
        echo_service("e", "127.0.0.1:0", "upper", "")
    );
    let mut server =
        Server::start_with(&config, &[], &[("NOTIFY_SOCKET", path.to_str().unwrap())]).unwrap();
    assert_eq!(next(), "READY=1");
    server.reload();
    let reloading = next();
    assert!(
        reloading.starts_with("RELOADING=1\nMONOTONIC_USEC="),
        "{reloading}"
    );
    assert_eq!(next(), "READY=1");
    server.signal(libc::SIGTERM);
    assert_eq!(next(), "STOPPING=1");
    assert!(server
        .wait(Duration::from_secs(5))
        .is_some_and(|s| s.success()));
}

/// A stop signal wins over a reload in progress: SIGHUP and SIGTERM queued together (sent
/// while wharf is stopped) reach it at once; when the SIGHUP is taken first, the SIGTERM
/// arrives while the reload runs, and wharf abandons the reload and drains. Which of the two
/// wharf takes first is up to it, so this repeats until the reload case has been seen.
#[test]
fn a_stop_signal_during_a_reload_abandons_it_and_drains() {
    let v1 = format!(
        "{}{}",
        header("5s"),
        echo_service("one", "127.0.0.1:0", "upper", "")
    );
    let v2 = format!("{v1}{}", echo_service("two", "127.0.0.1:0", "upper", ""));
    let mut outcomes = Vec::new();
    for _ in 0..16 {
        let mut server = Server::start_with(&v1, &[], &[]).unwrap();
        let mut open = connect(server.addr("one"));
        assert_eq!(echo_once(&mut open, b"a\n"), b"A\n");
        server.rewrite_config(&v2);
        server.signal(libc::SIGSTOP);
        server.signal(libc::SIGHUP);
        server.signal(libc::SIGTERM);
        server.signal(libc::SIGCONT);
        // The drain waits for the open connection, which is still served...
        assert!(refused_within(server.addr("one"), Duration::from_secs(10)));
        assert_eq!(echo_once(&mut open, b"b\n"), b"B\n");
        drop(open);
        // ...and once it ends, wharf exits 0 without having applied the new config.
        let status = server.wait(Duration::from_secs(20));
        let log = server.log();
        assert_eq!(status.and_then(|s| s.code()), Some(0), "{log}");
        assert!(log.contains("stopped"), "{log}");
        assert!(!log.contains("configuration reloaded"), "{log}");
        let abandoned = log.contains("stop signal during a reload: abandoning the reload");
        outcomes.push(abandoned);
        if abandoned {
            assert!(log.contains("signal=\"SIGTERM\""), "{log}");
            println!("reload abandoned at attempt {}", outcomes.len());
            return;
        }
    }
    panic!("the SIGTERM never arrived during the reload in {outcomes:?}");
}

/// The reload line names only what changed (no empty `changed= added= removed=`), and says
/// "no changes" when nothing did.
#[test]
fn the_reload_line_names_only_what_changed() {
    let base = format!(
        "{}{}",
        header("5s"),
        echo_service("a", "127.0.0.1:0", "none", "")
    );
    let mut server = Server::start(&base, "epoll");

    let same = server.expect_reload("configuration reloaded");
    assert!(same.contains("no changes"), "{same}");
    // (`unchanged=N` is said when there are unchanged services.)
    for empty in ["changed=", "added=", "removed=", "settings="] {
        assert!(!same.replace("unchanged=", "").contains(empty), "{same}");
    }

    server.rewrite_config(&format!(
        "{base}{}",
        echo_service("x", "127.0.0.1:0", "upper", "")
    ));
    let added = server.expect_reload("added=x");
    assert!(added.contains("unchanged=1"), "{added}");
    for absent in ["changed=", "removed=", "no changes"] {
        assert!(!added.replace("unchanged=", "").contains(absent), "{added}");
    }

    server.rewrite_config(&base.replace("\"5s\"", "\"7s\""));
    let removed = server.expect_reload("removed=x");
    assert!(
        removed.contains("settings=server.shutdown_grace"),
        "{removed}"
    );
    assert!(!removed.contains("added="), "{removed}");
}
