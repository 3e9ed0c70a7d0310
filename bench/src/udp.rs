//! `wharf bench udp-echo ADDR`: load a UDP echo service and count what never comes back.
//!
//! UDP has no connection to measure and no retransmission to hide loss, so the engine is its
//! own: `--senders` threads, each with a connected UDP socket. Every datagram carries a
//! sequence number and its send time (16 bytes, padded to `--size`), so replies are matched
//! without state per datagram and the latency is measured from the datagram itself.
//!
//! - Closed loop (default): each sender keeps `--window` datagrams in flight and sends the
//!   next when a reply comes. A datagram unanswered within `--timeout` counts as lost, and the
//!   sender starts a new window (late replies to the old one are counted as late, not
//!   answered).
//! - Open loop (`--rate`): the senders share the rate, each on a fixed schedule; latency is
//!   from when a datagram was due, and loss is what was sent in the window and not answered
//!   within `--timeout` after it.
//!
//! Only datagrams sent inside the measurement window (after `--warmup`) count.

use std::net::{SocketAddr, ToSocketAddrs, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use hdrhistogram::Histogram;
use serde::Serialize;

use crate::procstat;
use crate::report::{Latency, ServerCpu};

/// Bytes of the sequence number and send time at the start of every datagram.
const HEADER: usize = 16;

/// `wharf bench udp-echo ADDR ...`
#[derive(Args)]
pub struct UdpArgs {
    /// Server address, e.g. 127.0.0.1:6969.
    addr: String,
    /// Sending threads, each with its own socket (so its own source port).
    #[arg(long, short = 's', default_value_t = 4)]
    senders: usize,
    /// Bytes per datagram (at least 16: sequence number and send time).
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Closed loop: datagrams in flight per sender.
    #[arg(long, default_value_t = 1)]
    window: usize,
    /// Open loop: datagrams per second in total, on a fixed schedule.
    #[arg(long)]
    rate: Option<f64>,
    /// Milliseconds after which an unanswered datagram counts as lost.
    #[arg(long, default_value_t = 200)]
    timeout: u64,
    /// Seconds measured (after the warm-up).
    #[arg(long, short = 'd', default_value_t = 10.0)]
    duration: f64,
    /// Seconds of load before measuring.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Print the report as one JSON object.
    #[arg(long)]
    json: bool,
    /// Measure the CPU time of these server processes (default: the local processes holding
    /// a socket bound to ADDR).
    #[arg(long, value_delimiter = ',')]
    server_pid: Vec<u32>,
}

/// One run's figures.
#[derive(Debug, Clone, Serialize)]
pub struct UdpReport {
    pub protocol: &'static str,
    pub addr: String,
    pub senders: usize,
    pub size: usize,
    /// `"closed"` or `"open"` loop.
    pub mode: &'static str,
    pub window: usize,
    pub target_rate: Option<f64>,
    pub timeout_ms: u64,
    pub warmup_s: f64,
    pub duration_s: f64,
    /// Datagrams sent in the window.
    pub sent: u64,
    /// Of those, answered within the timeout.
    pub answered: u64,
    /// Of those, unanswered within the timeout.
    pub lost: u64,
    pub loss_ratio: f64,
    /// Replies that came after their datagram was counted lost.
    pub late: u64,
    /// Answered datagrams per second.
    pub datagrams_per_sec: f64,
    pub latency_us: Latency,
    /// The local server's CPU use, when its processes were found (`us_per_request`: per
    /// answered datagram).
    pub server: Option<ServerCpu>,
    pub client_cpu_cores: f64,
}

/// What one sender counted.
struct Tally {
    sent: u64,
    answered: u64,
    lost: u64,
    late: u64,
    latency_ns: Histogram<u64>,
}

impl Tally {
    fn new() -> Tally {
        Tally {
            sent: 0,
            answered: 0,
            lost: 0,
            late: 0,
            latency_ns: Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("bounds"),
        }
    }

    fn add(&mut self, other: Tally) {
        self.sent += other.sent;
        self.answered += other.answered;
        self.lost += other.lost;
        self.late += other.late;
        let _ = self.latency_ns.add(&other.latency_ns);
    }
}

/// The run's shared clock: nanoseconds since it started, and its window.
#[derive(Clone, Copy)]
struct Clock {
    start: Instant,
    window_from: u64,
    window_to: u64,
}

impl Clock {
    fn now(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    fn in_window(&self, t: u64) -> bool {
        (self.window_from..self.window_to).contains(&t)
    }
}

/// Runs `wharf bench udp-echo`; exit code as [`crate::run`]'s.
pub fn main(args: UdpArgs) -> i32 {
    let usage = |m: &str| {
        eprintln!("wharf: error: {m}");
        2
    };
    let addr = match args.addr.to_socket_addrs().map(|mut a| a.next()) {
        Ok(Some(a)) => a,
        Ok(None) => return usage(&format!("{}: no address", args.addr)),
        Err(e) => return usage(&format!("{}: {e}", args.addr)),
    };
    if args.size < HEADER || args.size > 65_507 {
        return usage("--size must be 16 to 65507 bytes");
    }
    if args.senders == 0 || args.window == 0 {
        return usage("--senders and --window must be at least 1");
    }
    if args.rate.is_some_and(|r| !(r.is_finite() && r > 0.0)) {
        return usage("--rate must be a positive number of datagrams per second");
    }
    let duration_ok = args.duration.is_finite() && args.duration > 0.0 && args.duration <= 86_400.0;
    let warmup_ok = args.warmup.is_finite() && (0.0..=86_400.0).contains(&args.warmup);
    if !duration_ok || !warmup_ok || args.timeout == 0 {
        return usage(
            "--duration (more than 0), --warmup and --timeout (ms, at least 1) are out of range",
        );
    }
    let server_pids = if args.server_pid.is_empty() {
        procstat::listening_pids(addr)
    } else {
        args.server_pid.clone()
    };
    let report = run(&args, addr, &server_pids);
    crate::print_report(args.json, &report, || report.to_text());
    if report.answered > 0 {
        0
    } else {
        eprintln!("wharf: no datagram was answered");
        1
    }
}

fn run(args: &UdpArgs, addr: SocketAddr, server_pids: &[u32]) -> UdpReport {
    let warmup = Duration::from_secs_f64(args.warmup);
    let duration = Duration::from_secs_f64(args.duration);
    let timeout = Duration::from_millis(args.timeout);
    let start = Instant::now();
    let clock = Clock {
        start,
        window_from: warmup.as_nanos() as u64,
        window_to: (warmup + duration).as_nanos() as u64,
    };
    let stop = Arc::new(AtomicBool::new(false));
    let interval = args
        .rate
        .map(|r| Duration::from_secs_f64(args.senders as f64 / r));
    let threads: Vec<_> = (0..args.senders)
        .map(|_| {
            let stop = Arc::clone(&stop);
            let (size, window) = (args.size, args.window);
            std::thread::spawn(move || {
                let socket = UdpSocket::bind(match addr {
                    SocketAddr::V4(_) => "0.0.0.0:0",
                    SocketAddr::V6(_) => "[::]:0",
                })?;
                socket.connect(addr)?;
                let sender = Sender {
                    socket,
                    datagram: vec![b'x'; size],
                    reply: vec![0u8; size.max(2048)],
                    timeout,
                    clock,
                };
                Ok::<_, std::io::Error>(match interval {
                    None => sender.closed_loop(window, &stop),
                    Some(every) => sender.open_loop(every, &stop),
                })
            })
        })
        .collect();
    std::thread::sleep(warmup);
    let cpu = procstat::CpuClock::new(server_pids);
    let (server_before, client_before) = (cpu.server(), procstat::own_cpu());
    std::thread::sleep(duration);
    let (server_after, client_after) = (cpu.server(), procstat::own_cpu());
    stop.store(true, Ordering::Relaxed);
    let mut total = Tally::new();
    for t in threads {
        match t.join() {
            Ok(Ok(tally)) => total.add(tally),
            Ok(Err(e)) => eprintln!("wharf: a sender failed: {e}"),
            Err(_) => eprintln!("wharf: a sender panicked"),
        }
    }
    let secs = duration.as_secs_f64();
    let server_cpu = server_before
        .zip(server_after)
        .map(|(b, a)| a.saturating_sub(b));
    UdpReport {
        protocol: "udp-echo",
        addr: addr.to_string(),
        senders: args.senders,
        size: args.size,
        mode: if args.rate.is_some() {
            "open"
        } else {
            "closed"
        },
        window: args.window,
        target_rate: args.rate,
        timeout_ms: args.timeout,
        warmup_s: args.warmup,
        duration_s: secs,
        sent: total.sent,
        answered: total.answered,
        lost: total.lost,
        loss_ratio: total.lost as f64 / (total.sent.max(1)) as f64,
        late: total.late,
        datagrams_per_sec: total.answered as f64 / secs,
        latency_us: Latency::of(&total.latency_ns),
        server: server_cpu.map(|cpu| ServerCpu {
            pids: server_pids.to_vec(),
            cores: cpu.as_secs_f64() / secs,
            us_per_request: (total.answered > 0)
                .then(|| cpu.as_secs_f64() * 1e6 / total.answered as f64),
        }),
        client_cpu_cores: client_after.saturating_sub(client_before).as_secs_f64() / secs,
    }
}

/// Writes sequence number `seq` and time `at` into the header of `datagram`.
fn stamp(datagram: &mut [u8], seq: u64, at: u64) {
    datagram[..8].copy_from_slice(&seq.to_le_bytes());
    datagram[8..16].copy_from_slice(&at.to_le_bytes());
}

/// The sequence number and time of a reply's header.
fn read_stamp(reply: &[u8]) -> Option<(u64, u64)> {
    let seq = u64::from_le_bytes(reply.get(..8)?.try_into().ok()?);
    let at = u64::from_le_bytes(reply.get(8..16)?.try_into().ok()?);
    Some((seq, at))
}

/// One sending thread's socket, buffers and settings.
struct Sender {
    socket: UdpSocket,
    datagram: Vec<u8>,
    reply: Vec<u8>,
    timeout: Duration,
    clock: Clock,
}

impl Sender {
    fn closed_loop(self, window: usize, stop: &AtomicBool) -> Tally {
        let Sender {
            socket,
            mut datagram,
            mut reply,
            timeout,
            clock,
        } = self;
        let mut tally = Tally::new();
        let _ = socket.set_read_timeout(Some(timeout));
        let mut next_seq = 0u64;
        // Sequence numbers below this belong to a window already counted lost.
        let mut current_from = 0u64;
        // (send time) of the datagrams in flight, for the loss count.
        let mut in_flight: Vec<u64> = Vec::with_capacity(window);
        let send = |seq: u64, datagram: &mut [u8], tally: &mut Tally| {
            let now = clock.now();
            stamp(datagram, seq, now);
            if socket.send(datagram).is_ok() && clock.in_window(now) {
                tally.sent += 1;
            }
            now
        };
        while !stop.load(Ordering::Relaxed) {
            if in_flight.is_empty() {
                current_from = next_seq;
                for _ in 0..window {
                    in_flight.push(send(next_seq, &mut datagram, &mut tally));
                    next_seq += 1;
                }
            }
            match socket.recv(&mut reply) {
                Ok(n) => {
                    let Some((seq, at)) = read_stamp(&reply[..n]) else {
                        continue;
                    };
                    if seq < current_from {
                        if clock.in_window(at) {
                            tally.late += 1;
                        }
                        continue;
                    }
                    if let Some(i) = in_flight.iter().position(|&t| t == at) {
                        in_flight.swap_remove(i);
                    }
                    if clock.in_window(at) {
                        tally.answered += 1;
                        let _ = tally
                            .latency_ns
                            .record(clock.now().saturating_sub(at).max(1));
                    }
                    in_flight.push(send(next_seq, &mut datagram, &mut tally));
                    next_seq += 1;
                }
                Err(_) => {
                    // Nothing for a whole timeout: what is in flight is lost.
                    tally.lost += in_flight.iter().filter(|&&t| clock.in_window(t)).count() as u64;
                    in_flight.clear();
                }
            }
        }
        tally
    }

    fn open_loop(self, every: Duration, stop: &AtomicBool) -> Tally {
        let Sender {
            socket,
            mut datagram,
            mut reply,
            timeout,
            clock,
        } = self;
        let mut tally = Tally::new();
        let _ = socket.set_nonblocking(true);
        let every = every.as_nanos().max(1) as u64;
        let timeout_ns = timeout.as_nanos() as u64;
        let mut due = clock.now();
        let mut seq = 0u64;
        let mut answered_in_window = 0u64;
        let mut stopped_at = None;
        loop {
            let now = clock.now();
            match stopped_at {
                None if stop.load(Ordering::Relaxed) => stopped_at = Some(now),
                // After the stop, wait one timeout for the last replies.
                Some(t) if now > t + timeout_ns => break,
                _ => {}
            }
            while stopped_at.is_none() && due <= now {
                stamp(&mut datagram, seq, due);
                if socket.send(&datagram).is_ok() && clock.in_window(due) {
                    tally.sent += 1;
                }
                seq += 1;
                due += every;
            }
            while let Ok(n) = socket.recv(&mut reply) {
                if let Some((_, at)) = read_stamp(&reply[..n]) {
                    let late = clock.now().saturating_sub(at);
                    if !clock.in_window(at) {
                        continue;
                    }
                    if late > timeout_ns {
                        tally.late += 1;
                    } else {
                        answered_in_window += 1;
                        let _ = tally.latency_ns.record(late.max(1));
                    }
                }
            }
            let wait = due.saturating_sub(clock.now()).min(200_000);
            if wait > 0 {
                std::thread::sleep(Duration::from_nanos(wait));
            }
        }
        tally.answered = answered_in_window;
        tally.lost = tally.sent.saturating_sub(answered_in_window);
        tally
    }
}

impl UdpReport {
    /// The report as a person reads it.
    pub fn to_text(&self) -> String {
        let pacing = match self.target_rate {
            Some(rate) => format!("open loop at {rate} datagrams/s"),
            None => format!("closed loop, {} in flight per sender", self.window),
        };
        let mut out = format!(
            "wharf bench udp-echo {}: {} senders, {} bytes, {pacing}, {}s after {}s warm-up\n",
            self.addr, self.senders, self.size, self.duration_s, self.warmup_s
        );
        out += &format!(
            "  answered    {:>12}   {:.0} datagrams/s\n  lost        {:>12}   {:.3}% (no reply within {} ms; {} late)\n",
            self.answered,
            self.datagrams_per_sec,
            self.lost,
            self.loss_ratio * 100.0,
            self.timeout_ms,
            self.late
        );
        let l = &self.latency_us;
        out += &format!(
            "  latency     p50 {:.0}us   p99 {:.0}us   max {:.0}us\n",
            l.p50, l.p99, l.max
        );
        if let Some(s) = &self.server {
            out += &format!(
                "  server CPU  {:.2} cores, {:.2}us per datagram (pids {:?})\n",
                s.cores,
                s.us_per_request.unwrap_or(0.0),
                s.pids
            );
        }
        out += &format!("  client CPU  {:.2} cores\n", self.client_cpu_cores);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_round_trip_and_short_replies_have_none() {
        let mut d = vec![0u8; 64];
        stamp(&mut d, 42, 7_000_000_001);
        assert_eq!(read_stamp(&d), Some((42, 7_000_000_001)));
        assert_eq!(read_stamp(&d[..15]), None);
    }
}
