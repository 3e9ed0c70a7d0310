//! Per-source limits through the real binary: `max_connections_per_source`,
//! `max_connection_rate_per_source`, `max_connection_rate` and `source_prefix_v6`, with client
//! sockets bound to distinct 127.x sources, the rejections read from `/metrics`, and the
//! server's memory read from `/proc/<pid>/status` while many distinct sources flood it.
//!
//! IPv6 sources other than `::1` cannot be bound here, so the IPv6 tests reach wharf through
//! PROXY protocol v1 headers the test writes (`proxy_tcp6_*`): they need the PROXY parser of
//! `core/src/proxy.rs` and fail against its stub.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use socket2::{Domain, Socket, Type};

use crate::harness::*;

/// Growth of the server's resident memory allowed while flooded by distinct sources. The
/// per-source table itself is allocated at start and never grows (`core/src/sources.rs` unit
/// tests check that exactly); this bounds everything else a flood might grow.
const FLOOD_RSS_GROWTH_LIMIT_KB: u64 = 16 * 1024;

/// Connections of a distinct-source flood, and how long it may take at most (it stops early,
/// and says so, on a slow machine).
const FLOOD_CONNECTIONS: u32 = 10_000;
const FLOOD_TIME_LIMIT: Duration = Duration::from_secs(60);

/// How long a normal client from a fresh source may wait to be served during a flood. It is
/// usually served in milliseconds, but a flood that outruns accept on this shared 2-core
/// machine fills the listen backlog now and then (`TcpExtListenOverflows`), and a dropped SYN
/// is retried after 1 s, then 2 s more: the bound allows two such retries. The per-source
/// table adds nothing to it.
const PROBE_LATENCY_LIMIT: Duration = Duration::from_secs(5);

fn labels(backend: &str) -> Vec<(&str, &str)> {
    vec![
        ("service", "echo"),
        ("plugin", "echo"),
        ("backend", backend),
    ]
}

fn rejected<'a>(backend: &'a str, reason: &'a str) -> Vec<(&'a str, &'a str)> {
    let mut l = labels(backend);
    l.push(("reason", reason));
    l
}

/// Connects to `addr` from `source` (any free port), with a read timeout.
fn connect_from(source: IpAddr, addr: SocketAddr) -> TcpStream {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None).unwrap();
    socket
        .bind(&SocketAddr::new(source, 0).into())
        .unwrap_or_else(|e| panic!("binding a client socket to {source}: {e}"));
    socket
        .connect(&addr.into())
        .unwrap_or_else(|e| panic!("connecting from {source} to {addr}: {e}"));
    let stream = TcpStream::from(socket);
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
}

fn v4(a: u8, b: u8, c: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, a, b, c))
}

/// Whether the connection is served: one echo exchange works. A refused connection is closed
/// by the server at admission, so this sees EOF or a reset.
fn is_served(s: &mut TcpStream) -> bool {
    if s.write_all(b"ping").is_err() {
        return false;
    }
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).is_ok() && &buf == b"PING"
}

fn served_from(source: IpAddr, addr: SocketAddr) -> Option<TcpStream> {
    let mut s = connect_from(source, addr);
    is_served(&mut s).then_some(s)
}

/// The server's resident memory, in kB.
fn rss_kb(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS in /proc/<pid>/status")
}

#[test]
fn per_source_limit_turns_away_the_excess_while_other_sources_are_served() {
    for backend in backends() {
        let server = Server::start(&echo_config("max_connections_per_source = 4"), backend);
        let addr = server.addr("echo");
        let (six, seven) = (v4(0, 0, 6), v4(0, 0, 7));
        let mut held: Vec<TcpStream> = (0..4)
            .map(|i| served_from(six, addr).unwrap_or_else(|| panic!("connection {i} refused")))
            .collect();
        let mut fifth = connect_from(six, addr);
        assert!(
            closed_within(&mut fifth, Duration::from_secs(15)),
            "the fifth connection from {six} was kept"
        );
        server.wait_metric(
            "wharf_connections_rejected_total",
            &rejected(backend, "max_connections_per_source"),
            1.0,
        );
        // Another source is served meanwhile, and so are the four.
        let mut other = served_from(seven, addr).expect("127.0.0.7 refused");
        assert!(held.iter_mut().all(is_served));

        // Closing one lets 127.0.0.6 in again (once the server has seen the close).
        drop(held.pop());
        server.wait_metric("wharf_connections_active", &labels(backend), 4.0);
        let back = served_from(six, addr).expect("127.0.0.6 refused after closing one");
        held.push(back);
        let mut sixth = connect_from(six, addr);
        assert!(closed_within(&mut sixth, Duration::from_secs(15)));
        server.wait_metric(
            "wharf_connections_rejected_total",
            &rejected(backend, "max_connections_per_source"),
            2.0,
        );
        assert!(is_served(&mut other));
    }
}

/// The outcome of a paced burst of connection attempts.
struct Burst {
    attempts: usize,
    served: usize,
    /// From the first attempt's start to the last one's verdict: the server admitted all of
    /// them inside this window.
    window: Duration,
}

impl Burst {
    /// What a token bucket of `rate` per second with a burst of one second's worth lets
    /// through in the window: the burst, then the rate.
    fn expected(&self, rate: f64) -> f64 {
        rate + rate * self.window.as_secs_f64()
    }

    /// Tolerance: no more than the bucket allows plus 2 (rounding at both ends), and no less
    /// than 90 % of it minus 2 (pacing stalls on a busy machine; attempts are far denser than
    /// the rate, so a stall only defers tokens, it loses none unless it lasts a full second).
    fn assert_cut_to(&self, rate: f64, what: &str) {
        let expected = self.expected(rate);
        let served = self.served as f64;
        eprintln!(
            "{what}: {} of {} attempts served in {:?} (bucket allows {expected:.1})",
            self.served, self.attempts, self.window
        );
        assert!(
            served <= expected + 2.0 && served >= 0.9 * expected - 2.0,
            "{what}: {} of {} attempts served in {:?}; a bucket of {rate}/s allows {expected:.0}",
            self.served,
            self.attempts,
            self.window
        );
    }
}

/// About `attempts_per_second` connection attempts per second for `length`, each from
/// `source(i)`, each judged (served or closed) and closed before the next; `between(i)` runs
/// after each.
fn paced_burst(
    addr: SocketAddr,
    attempts_per_second: u32,
    length: Duration,
    source: impl Fn(usize) -> IpAddr,
    mut between: impl FnMut(usize),
) -> Burst {
    let step = Duration::from_secs(1) / attempts_per_second;
    let start = Instant::now();
    let (mut attempts, mut served) = (0, 0);
    while start.elapsed() < length {
        let due = start + step * attempts as u32;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let mut s = connect_from(source(attempts), addr);
        served += usize::from(is_served(&mut s));
        drop(s);
        between(attempts);
        attempts += 1;
    }
    Burst {
        attempts,
        served,
        window: start.elapsed(),
    }
}

#[test]
fn per_source_rate_cuts_a_burst_to_the_bucket_while_other_sources_are_served() {
    for backend in backends() {
        let server = Server::start(&echo_config("max_connection_rate_per_source = 50"), backend);
        let addr = server.addr("echo");
        let mut others_served = 0;
        // ~300 attempts in ~1 s from 127.0.0.8; every 25th, a connection from 127.0.0.9.
        let burst = paced_burst(
            addr,
            300,
            Duration::from_secs(1),
            |_| v4(0, 0, 8),
            |i| {
                if i % 25 == 0 {
                    let s = served_from(v4(0, 0, 9), addr);
                    assert!(s.is_some(), "127.0.0.9 refused during 127.0.0.8's burst");
                    others_served += 1;
                }
            },
        );
        assert!(burst.attempts >= 150, "only {} attempts", burst.attempts);
        burst.assert_cut_to(50.0, "max_connection_rate_per_source = 50");
        server.wait_metric(
            "wharf_connections_rejected_total",
            &rejected(backend, "max_connection_rate_per_source"),
            (burst.attempts - burst.served) as f64,
        );
        server.wait_metric(
            "wharf_connections_accepted_total",
            &labels(backend),
            (burst.served + others_served) as f64,
        );
    }
}

#[test]
fn service_rate_cuts_a_burst_from_many_sources_to_the_bucket() {
    for backend in backends() {
        let server = Server::start(&echo_config("max_connection_rate = 50"), backend);
        let addr = server.addr("echo");
        let burst = paced_burst(
            addr,
            300,
            Duration::from_secs(1),
            |i| v4(0, 1, (i % 200) as u8 + 1),
            |_| {},
        );
        assert!(burst.attempts >= 150, "only {} attempts", burst.attempts);
        burst.assert_cut_to(50.0, "max_connection_rate = 50");
        server.wait_metric(
            "wharf_connections_rejected_total",
            &rejected(backend, "max_connection_rate"),
            (burst.attempts - burst.served) as f64,
        );
    }
}

/// Opens and closes `count` connections, each from `source(i)` through `open(i)`, on two
/// threads, for at most [`FLOOD_TIME_LIMIT`]; returns how many were made.
fn flood(count: u32, open: impl Fn(u32) -> TcpStream + Sync) -> u32 {
    let start = Instant::now();
    let made = std::sync::atomic::AtomicU32::new(0);
    std::thread::scope(|scope| {
        for half in 0..2 {
            let (open, made) = (&open, &made);
            scope.spawn(move || {
                for i in (half..count).step_by(2) {
                    if start.elapsed() > FLOOD_TIME_LIMIT {
                        break;
                    }
                    drop(open(i));
                    made.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    });
    let made = made.into_inner();
    if made < count {
        eprintln!("flood stopped after {made} of {count} connections ({FLOOD_TIME_LIMIT:?})");
    }
    made
}

/// Floods `server` with `FLOOD_CONNECTIONS` connections from distinct sources (`open`), after
/// a warm-up of 2 000 more that settles the allocator, while a normal client from yet other
/// sources (`fresh`) connects every 100 ms and must be served within [`PROBE_LATENCY_LIMIT`].
/// Asserts every connection was admitted (nothing refused by the per-source limits) and the
/// RSS grew less than [`FLOOD_RSS_GROWTH_LIMIT_KB`]; returns the number of connections made.
fn flood_keeps_memory_bounded(
    server: &Server,
    backend: &str,
    open: impl Fn(u32) -> TcpStream + Sync,
    fresh: impl Fn(u32) -> TcpStream + Sync,
) -> u32 {
    let warm = flood(2_000, |i| open(FLOOD_CONNECTIONS + i));
    server.wait_metric(
        "wharf_connections_accepted_total",
        &labels(backend),
        f64::from(warm),
    );
    let before = rss_kb(server.pid());
    let flooding = AtomicBool::new(true);
    let (made, (probes, slowest)) = std::thread::scope(|scope| {
        let prober = scope.spawn(|| {
            let (mut probes, mut slowest) = (0u32, Duration::ZERO);
            while flooding.load(Ordering::Relaxed) {
                let start = Instant::now();
                let mut s = fresh(probes);
                assert!(is_served(&mut s), "a fresh source refused during the flood");
                slowest = slowest.max(start.elapsed());
                probes += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
            (probes, slowest)
        });
        let made = flood(FLOOD_CONNECTIONS, &open);
        flooding.store(false, Ordering::Relaxed);
        (made, prober.join().unwrap())
    });
    eprintln!(
        "{backend}: {probes} fresh clients during the flood, the slowest served in {slowest:?}"
    );
    assert!(
        slowest < PROBE_LATENCY_LIMIT,
        "a fresh client took {slowest:?} to be served during the flood"
    );
    let made = made + probes;
    server.wait_metric(
        "wharf_connections_accepted_total",
        &labels(backend),
        f64::from(warm + made),
    );
    let after = rss_kb(server.pid());
    eprintln!("{backend}: {made} distinct sources: RSS {before} kB -> {after} kB");
    assert!(
        after.saturating_sub(before) < FLOOD_RSS_GROWTH_LIMIT_KB,
        "RSS grew from {before} kB to {after} kB under a flood of {made} distinct sources"
    );
    for reason in [
        "max_connections_per_source",
        "max_connection_rate_per_source",
    ] {
        assert_eq!(
            server.metric(
                "wharf_connections_rejected_total",
                &rejected(backend, reason)
            ),
            Some(0.0),
            "{reason}: a flood of distinct sources refused some of them"
        );
    }
    warm + made
}

#[test]
fn distinct_ipv4_source_flood_keeps_memory_bounded_and_fresh_sources_served() {
    for backend in backends() {
        let server = Server::start(
            &echo_config("max_connections_per_source = 4\nmax_connection_rate_per_source = 50"),
            backend,
        );
        let addr = server.addr("echo");
        // 127.a.b.c, a from 2: clear of the other tests' 127.0.x sources.
        let source = |i: u32| {
            let [_, a, b, c] = (i + 2 * 65_536).to_be_bytes();
            IpAddr::V4(Ipv4Addr::new(127, a, b, c))
        };
        let made = flood_keeps_memory_bounded(
            &server,
            backend,
            |i| connect_from(source(i), addr),
            |k| connect_from(v4(251, (k >> 8) as u8, k as u8), addr),
        );
        let fresh = v4(250, 0, 1);
        let mut s = served_from(fresh, addr).expect("a fresh source refused after the flood");
        let mut again = served_from(fresh, addr).expect("a fresh source's second connection");
        assert!(is_served(&mut s) && is_served(&mut again));
        server.wait_metric(
            "wharf_connections_accepted_total",
            &labels(backend),
            f64::from(made + 2),
        );
    }
}

/// A connection from the trusted proxy 127.0.0.1 that names `client` in a PROXY v1 header.
fn via_proxy(addr: SocketAddr, client: &str) -> TcpStream {
    let mut s = connect(addr);
    // A refusal (the server closed at once) shows in the echo that follows, not here.
    let _ = write!(s, "PROXY TCP6 {client} ::1 40000 {}\r\n", addr.port());
    s
}

fn proxied_config(limits: &str) -> String {
    echo_config(&format!(
        "proxy_protocol = \"v1\"\ntrusted_proxies = [\"127.0.0.1/32\"]\n{limits}"
    ))
}

/// Needs the PROXY parser (`core/src/proxy.rs`, helper "proxy"): fails against its stub.
#[test]
fn proxy_tcp6_sources_share_a_limit_within_a_64_and_not_across() {
    for backend in backends() {
        let server = Server::start(&proxied_config("max_connections_per_source = 2"), backend);
        let addr = server.addr("echo");
        let mut a = via_proxy(addr, "2001:db8:1:2::1");
        let mut b = via_proxy(addr, "2001:db8:1:2:ffff::2");
        assert!(
            is_served(&mut a) && is_served(&mut b),
            "PROXY-protocol clients refused (is core/src/proxy.rs still the stub?)"
        );
        // A third address in the same /64: over the limit of 2.
        let mut c = via_proxy(addr, "2001:db8:1:2::3");
        assert!(
            closed_within(&mut c, Duration::from_secs(15)),
            "a third connection from one /64 was kept"
        );
        server.wait_metric(
            "wharf_connections_rejected_total",
            &rejected(backend, "max_connections_per_source"),
            1.0,
        );
        // The next /64 has its own limit.
        let mut d = via_proxy(addr, "2001:db8:1:3::1");
        let mut e = via_proxy(addr, "2001:db8:1:3::2");
        assert!(is_served(&mut d) && is_served(&mut e));
        assert!(is_served(&mut a) && is_served(&mut b));
    }
}

/// Needs the PROXY parser (`core/src/proxy.rs`, helper "proxy"): fails against its stub.
#[test]
fn proxy_tcp6_distinct_64_flood_keeps_memory_bounded_and_fresh_sources_served() {
    for backend in backends() {
        let server = Server::start(
            &proxied_config("max_connections_per_source = 4\nmax_connection_rate_per_source = 50"),
            backend,
        );
        let addr = server.addr("echo");
        let client = |i: u32| format!("2001:db8:{:x}:{:x}::1", i >> 16, i & 0xffff);
        // Each flood connection is judged: served (its echo works) or not.
        let made = flood_keeps_memory_bounded(
            &server,
            backend,
            |i| {
                let mut s = via_proxy(addr, &client(i));
                assert!(
                    is_served(&mut s),
                    "{} refused (is core/src/proxy.rs still the stub?)",
                    client(i)
                );
                s
            },
            |k| via_proxy(addr, &format!("2001:db8:f00d:{k:x}::1")),
        );
        let mut fresh = via_proxy(addr, "2001:db8:ffff:ffff::1");
        assert!(is_served(&mut fresh), "a fresh /64 refused after the flood");
        server.wait_metric(
            "wharf_connections_accepted_total",
            &labels(backend),
            f64::from(made + 1),
        );
    }
}

/// A reload that lowers the limit applies it to new connections at once, counting the
/// connections the old generation holds; when those close, their source is free again exactly
/// (not before, and not never: a count lost or released twice would show here).
#[test]
fn reload_applies_new_limits_while_old_connections_keep_counting() {
    for backend in backends() {
        let mut server = Server::start(&echo_config("max_connections_per_source = 4"), backend);
        let addr = server.addr("echo");
        let source = v4(0, 0, 20);
        let mut old: Vec<TcpStream> = (0..4)
            .map(|_| served_from(source, addr).expect("refused under the limit"))
            .collect();
        server.rewrite_config(&echo_config("max_connections_per_source = 2"));
        server.expect_reload("changed=echo");
        let mut refused = 0.0;
        let mut expect_refused = |server: &Server| {
            let mut s = connect_from(source, addr);
            assert!(closed_within(&mut s, Duration::from_secs(15)));
            refused += 1.0;
            server.wait_metric(
                "wharf_connections_rejected_total",
                &rejected(backend, "max_connections_per_source"),
                refused,
            );
        };
        // Four open from the old generation: over the new limit of 2.
        expect_refused(&server);
        // The old connections are still served, under their old settings.
        assert!(old.iter_mut().all(is_served));
        old.truncate(1);
        server.wait_metric("wharf_connections_active", &labels(backend), 1.0);
        let new = served_from(source, addr).expect("refused with 1 open of 2");
        expect_refused(&server);
        drop((old, new));
        server.wait_metric("wharf_connections_active", &labels(backend), 0.0);
        let both: Vec<_> = (0..2)
            .map(|_| served_from(source, addr).expect("refused with the source's count back at 0"))
            .collect();
        expect_refused(&server);
        drop(both);
    }
}
