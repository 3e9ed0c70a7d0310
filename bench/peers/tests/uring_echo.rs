//! The `uring-echo` peer (the io_uring backend's ring path in a process of its own) over real
//! sockets, with DEFER_TASKRUN and with COOP_TASKRUN: every byte comes back in order, an
//! exhausted buffer ring re-arms without losing data, a read dropped by the idle timer (the
//! cancellation path) and closed connections leak no descriptor, no operation and no buffer.
//! Skips with a reason where io_uring is refused (fails under `CI=true`).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Server {
    /// Starts the peer on a free port; `None` (skip) where io_uring is unavailable.
    fn start(flags: &[&str]) -> Option<Server> {
        let mut child = Command::new(env!("CARGO_BIN_EXE_uring-echo"))
            .arg("127.0.0.1:0")
            .args(flags)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn uring-echo");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let Some(addr) = line.trim().strip_prefix("listening on ") else {
            let status = child.wait().unwrap();
            let mut err = String::new();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            if status.code() == Some(2) && std::env::var_os("CI").is_none() {
                eprintln!("skipped: io_uring unavailable here: {err}");
                return None;
            }
            panic!("uring-echo {flags:?} did not start ({status}): {err}");
        };
        Some(Server {
            child,
            addr: addr.parse().unwrap(),
        })
    }

    /// Stops it with SIGTERM and returns its counters line.
    fn stop(mut self) -> String {
        // SAFETY: signals our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let out = self.child.wait_with_output_ref();
        out.lines()
            .rev()
            .find(|l| l.starts_with('{'))
            .unwrap_or_default()
            .to_string()
    }

    fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id()))
            .unwrap()
            .count()
    }
}

trait WaitOutput {
    fn wait_with_output_ref(&mut self) -> String;
}

impl WaitOutput for Child {
    fn wait_with_output_ref(&mut self) -> String {
        let mut err = String::new();
        self.stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        self.wait().unwrap();
        err
    }
}

fn counter(stats: &str, name: &str) -> u64 {
    let key = format!("\"{name}\":");
    let start = stats
        .find(&key)
        .unwrap_or_else(|| panic!("{name} in {stats}"))
        + key.len();
    stats[start..]
        .split([',', '}'])
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// Sends `messages` payloads of varying sizes on one connection and checks each comes back.
fn exchange(addr: SocketAddr, seed: usize, messages: usize, max_size: usize) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    for m in 0..messages {
        let len = 1 + (seed * 7919 + m * 104_729) % max_size;
        let payload: Vec<u8> = (0..len).map(|i| (i * 31 + seed + m) as u8).collect();
        // Write from another thread for big payloads: the server echoes while we send.
        let mut writer = s.try_clone().unwrap();
        let sent = payload.clone();
        let w = std::thread::spawn(move || writer.write_all(&sent).unwrap());
        let mut back = vec![0u8; len];
        s.read_exact(&mut back).unwrap();
        w.join().unwrap();
        assert!(
            back == payload,
            "connection {seed} message {m} ({len} bytes) came back wrong"
        );
    }
}

fn many_clients(addr: SocketAddr, clients: usize, messages: usize, max_size: usize) {
    let threads: Vec<_> = (0..clients)
        .map(|c| std::thread::spawn(move || exchange(addr, c, messages, max_size)))
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

/// No connection open, no provided buffer out, and no operation but the listener's accept.
fn assert_nothing_left(stats: &str, flags: &[&str]) {
    assert_eq!(counter(stats, "open"), 0, "{flags:?}: connections: {stats}");
    assert_eq!(
        counter(stats, "buffers_out"),
        0,
        "{flags:?}: buffers: {stats}"
    );
    assert!(counter(stats, "ops") <= 1, "{flags:?}: operations: {stats}");
}

fn wait_until(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn every_ring_setup_echoes_every_byte_in_order() {
    for flags in [&[][..], &["--no-defer"]] {
        let Some(server) = Server::start(flags) else {
            return;
        };
        many_clients(server.addr, 16, 40, 3000);
        // One big payload: many buffers per message, short sends, and a reader that falls
        // behind (the stash fills and the receive pauses).
        exchange(server.addr, 99, 2, 1 << 20);
        std::thread::sleep(Duration::from_millis(200));
        let stats = server.stop();
        assert_nothing_left(&stats, flags);
        assert!(counter(&stats, "cqes") > 0, "{stats}");
    }
}

#[test]
fn an_exhausted_buffer_ring_rearms_and_loses_nothing() {
    let Some(server) = Server::start(&["--buffers", "2"]) else {
        return;
    };
    many_clients(server.addr, 32, 4, 64 * 1024);
    let stats = server.stop();
    assert!(
        counter(&stats, "enobufs") > 0,
        "the ring never ran out, nothing was tested: {stats}"
    );
}

#[test]
fn reads_dropped_by_the_idle_timer_and_closed_connections_leak_nothing() {
    for flags in [&[][..], &["--no-defer"]] {
        let args: Vec<&str> = flags
            .iter()
            .copied()
            .chain(["--idle-timeout", "0.3"])
            .collect();
        let Some(server) = Server::start(&args) else {
            return;
        };
        let before = server.open_fds();
        // Idle connections: the timer drops each pending read, then the connection.
        let mut idle: Vec<TcpStream> = (0..50)
            .map(|_| TcpStream::connect(server.addr).unwrap())
            .collect();
        wait_until("the server holds the idle connections", || {
            server.open_fds() >= before + 50
        });
        for s in &mut idle {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut b = [0u8; 1];
            assert_eq!(
                s.read(&mut b).unwrap(),
                0,
                "{flags:?}: the idle connection was not closed"
            );
        }
        wait_until("the idle connections' fds are closed", || {
            server.open_fds() == before
        });
        // Churn: connections that close at once, and ones that close mid-exchange.
        for i in 0..300 {
            let mut s = TcpStream::connect(server.addr).unwrap();
            if i % 2 == 0 {
                s.write_all(&[1u8; 5000]).unwrap();
            }
        }
        wait_until("the churned connections' fds are closed", || {
            server.open_fds() == before
        });
        many_clients(server.addr, 4, 10, 500);
        std::thread::sleep(Duration::from_millis(200));
        let stats = server.stop();
        assert_nothing_left(&stats, flags);
    }
}
