//! Issue 14, item 2: hostile clients against the metrics listener. One peer, or many peers
//! (any 127.x address works on loopback), hold hundreds of connections to the metrics port
//! that send nothing or a head they never finish, reopening each one the server closes, while a normal client checks that `/healthz`,
//! `/readyz` and an allowed `/metrics` scrape are still answered, each within [`BOUND`].
//! Before the fix, 64 + 16 silent connections took every slot and the probes were dropped at
//! accept.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::harness::{backends, echo_config, open_fds, settled_open_fds, Server};

/// How long a probe may take under attack. The kubelet's default probe timeout is 1 s; this
/// allows for a slow, loaded CI machine. Before the fix a probe got no answer at all.
const BOUND: Duration = Duration::from_secs(2);
/// How long the probes keep going during an attack: longer than the server's 2 s head timeout,
/// so the attack's connections are closed and reopened at least once meanwhile.
const ATTACK_FOR: Duration = Duration::from_secs(3);
/// The probing period (a kubelet probes every few seconds; faster here to sample more).
const PROBE_EVERY: Duration = Duration::from_millis(100);
/// The attacker reopens at most this many connections per 10 ms poll: up to 1000 connects/s,
/// a bounded load for a shared test machine.
const REOPEN_PER_ROUND: usize = 10;

/// A TCP connection to `target` from `source` (port 0).
pub fn connect_from(source: IpAddr, target: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    socket.bind(&SocketAddr::new(source, 0).into())?;
    socket.connect_timeout(&target.into(), Duration::from_secs(1))?;
    Ok(socket.into())
}

/// A client holding connections that never complete a request head, `per_source` from each
/// of `sources`, reopening each one the server closes, until dropped.
struct Attack {
    stop: Arc<AtomicBool>,
    opened: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

impl Attack {
    fn start(target: SocketAddr, sources: Vec<IpAddr>, per_source: usize) -> Attack {
        let stop = Arc::new(AtomicBool::new(false));
        let opened = Arc::new(AtomicUsize::new(0));
        let (stop2, opened2) = (Arc::clone(&stop), Arc::clone(&opened));
        let thread = std::thread::spawn(move || {
            let total = sources.len() * per_source;
            let mut held: Vec<Option<TcpStream>> = (0..total).map(|_| None).collect();
            // The first fill opens every connection at once; later rounds reopen a few.
            let mut budget = total;
            while !stop2.load(Ordering::Relaxed) {
                for (i, slot) in held.iter_mut().enumerate() {
                    if slot.is_none() && budget > 0 {
                        budget -= 1;
                        if let Ok(mut s) = connect_from(sources[i % sources.len()], target) {
                            // Half of them start a head they never finish (a slow head).
                            if i % 2 == 1 {
                                let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n");
                            }
                            *slot = Some(s);
                            opened2.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                budget = REOPEN_PER_ROUND;
                // Wait (10 ms at most) for the server to close some: EOF or reset.
                let mut fds: Vec<libc::pollfd> = held
                    .iter()
                    .flatten()
                    .map(|s| libc::pollfd {
                        fd: s.as_raw_fd(),
                        events: libc::POLLIN | libc::POLLRDHUP,
                        revents: 0,
                    })
                    .collect();
                // SAFETY: `fds` is a valid array of `fds.len()` pollfd structures.
                unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 10) };
                let closed: Vec<i32> = fds
                    .iter()
                    .filter(|p| p.revents != 0)
                    .map(|p| p.fd)
                    .collect();
                for slot in held.iter_mut() {
                    if slot
                        .as_ref()
                        .is_some_and(|s| closed.contains(&s.as_raw_fd()))
                    {
                        *slot = None;
                    }
                }
            }
        });
        Attack {
            stop,
            opened,
            thread: Some(thread),
        }
    }

    /// Waits until the attacker has opened `n` connections.
    fn wait_opened(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.opened.load(Ordering::Relaxed) < n {
            assert!(Instant::now() < deadline, "the attack could not connect");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Attack {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

/// One request from 127.0.0.1: the status and body, or what went wrong.
fn probe(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    let mut s = TcpStream::connect_timeout(&addr, BOUND).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("write: {e}"))?;
    let mut response = String::new();
    s.read_to_string(&mut response)
        .map_err(|e| format!("read: {e} after {response:?}"))?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no status line in {response:?}"))?;
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_string());
    Ok((status, body.unwrap_or_default()))
}

/// A config whose metrics endpoint lets only 127.0.0.1 scrape (the attackers use other 127.x).
fn config() -> String {
    echo_config("").replace(
        "[metrics]\nlisten = \"127.0.0.1:0\"\n",
        "[metrics]\nlisten = \"127.0.0.1:0\"\nallow_from = [\"127.0.0.1\"]\n",
    )
}

/// The endpoint's rejections for `reason`.
fn rejected(server: &Server, reason: &str) -> f64 {
    server
        .metric(
            "wharf_metrics_endpoint_rejected_total",
            &[("reason", reason)],
        )
        .unwrap_or(0.0)
}

/// Runs the attack from `sources`, probing all along; returns the slowest probe.
fn probes_pass_under(server: &Server, sources: Vec<IpAddr>, per_source: usize) -> Duration {
    let metrics = server.metrics.unwrap();
    let idle_fds = settled_open_fds(server.pid());
    let attack = Attack::start(metrics, sources.clone(), per_source);
    attack.wait_opened(sources.len() * per_source);
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    let mut probes = 0;
    while started.elapsed() < ATTACK_FOR {
        for (path, want) in [
            ("/healthz", "ok\n"),
            ("/readyz", "ready\n"),
            ("/metrics", ""),
        ] {
            let sent = Instant::now();
            let got = probe(metrics, path);
            let took = sent.elapsed();
            let answered = match &got {
                Ok((200, body)) if path == "/metrics" => body.contains("wharf_build_info"),
                Ok((200, body)) => body == want,
                _ => false,
            };
            assert!(
                answered,
                "{}: {path} under attack (probe {probes}): {got:?} after {took:?}",
                server.backend
            );
            assert!(
                took < BOUND,
                "{}: {path} under attack took {took:?}",
                server.backend
            );
            slowest = slowest.max(took);
            probes += 1;
        }
        std::thread::sleep(PROBE_EVERY);
    }
    // Descriptors stay bounded: 256 pending heads plus a few being answered.
    let fds = open_fds(server.pid());
    assert!(
        fds < idle_fds + 256 + 64,
        "{}: {fds} descriptors open under attack ({idle_fds} idle)",
        server.backend
    );
    drop(attack);
    eprintln!(
        "{}: {probes} probes under attack from {} address(es), slowest {slowest:?}",
        server.backend,
        sources.len()
    );
    slowest
}

#[test]
fn health_and_scrapes_are_answered_while_one_peer_holds_hundreds_of_connections() {
    for backend in backends() {
        let server = Server::start(&config(), backend);
        probes_pass_under(&server, vec![IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2))], 300);
        // The attacker got 8 at a time, closed at the head timeout (the attack outlasts it);
        // the rest were closed at accept. Both counted.
        assert!(rejected(&server, "per_peer") > 0.0, "{}", server.scrape());
        assert!(
            rejected(&server, "head_timeout") > 0.0,
            "{}",
            server.scrape()
        );
    }
}

#[test]
fn health_and_scrapes_are_answered_while_many_peers_hold_hundreds_of_connections() {
    for backend in backends() {
        let server = Server::start(&config(), backend);
        // 100 addresses x 4: under the per-peer cap, over the 256 pending heads.
        let sources = (1..=100)
            .map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 1, i)))
            .collect();
        probes_pass_under(&server, sources, 4);
        // The table turned over: connections evicted long before their head timeout.
        assert!(rejected(&server, "evicted") > 0.0, "{}", server.scrape());
    }
}

#[test]
fn scrapes_from_outside_allow_from_are_refused_without_a_slot() {
    let server = Server::start(&config(), "epoll");
    let metrics = server.metrics.unwrap();
    // From 127.0.0.3: health answers, a scrape is refused and counted.
    let ask = |path: &str| {
        let mut s = connect_from(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3)), metrics).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut response = String::new();
        s.read_to_string(&mut response).unwrap();
        response
    };
    assert!(ask("/healthz").starts_with("HTTP/1.1 200 OK"));
    assert!(ask("/metrics").starts_with("HTTP/1.1 403 Forbidden"));
    assert_eq!(rejected(&server, "allow_from"), 1.0);
}
