//! exec benchmarks (issue 4), against a running wharf with an `exec` service (and, for the
//! stall test, an `echo` service):
//!
//! - `roundtrip EXEC_ADDR`: median time of an allowlisted `true` round trip over one connection,
//!   interleaved with spawning and waiting `/bin/true` directly from Rust, same run.
//! - `stall EXEC_ADDR ECHO_ADDR`: echo latency (one connection, 128-byte ping-pong) while idle,
//!   then while 64 clients run commands in a loop.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn exec_roundtrip(s: &mut TcpStream, command: &[u8]) -> usize {
    s.write_all(command).unwrap();
    let mut size = [0u8; 32];
    let n = s.read(&mut size).unwrap();
    let size: usize = std::str::from_utf8(&size[..n]).unwrap().parse().unwrap();
    s.write_all(b"ok").unwrap();
    let mut result = vec![0; size];
    s.read_exact(&mut result).unwrap();
    size
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() as f64 - 1.0) * p) as usize]
}

fn roundtrip(addr: SocketAddr) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_nodelay(true).unwrap();
    let (mut direct, mut wharf) = (Vec::new(), Vec::new());
    for _ in 0..40 {
        for _ in 0..10 {
            let t = Instant::now();
            let status = std::process::Command::new("/bin/true").status().unwrap();
            assert!(status.success());
            direct.push(t.elapsed().as_secs_f64() * 1e6);
        }
        for _ in 0..10 {
            let t = Instant::now();
            exec_roundtrip(&mut s, b"true\n");
            wharf.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    let (d, w) = (median(&mut direct), median(&mut wharf));
    println!(
        "{{\"bench\":\"exec-roundtrip\",\"samples\":{},\"direct_spawn_median_us\":{d:.0},\"wharf_true_median_us\":{w:.0},\"ratio\":{:.2}}}",
        direct.len(),
        w / d
    );
}

fn echo_latencies(addr: SocketAddr, duration: Duration) -> Vec<f64> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_nodelay(true).unwrap();
    let msg = [b'x'; 128];
    let mut back = [0u8; 128];
    let mut lat = Vec::new();
    let end = Instant::now() + duration;
    while Instant::now() < end {
        let t = Instant::now();
        s.write_all(&msg).unwrap();
        s.read_exact(&mut back).unwrap();
        lat.push(t.elapsed().as_secs_f64() * 1e6);
        std::thread::sleep(Duration::from_millis(1));
    }
    lat
}

fn stall(exec: SocketAddr, echo: SocketAddr) {
    let mut idle = echo_latencies(echo, Duration::from_secs(3));
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let clients: Vec<_> = (0..64)
        .map(|_| {
            let (stop, done) = (Arc::clone(&stop), Arc::clone(&done));
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(exec).unwrap();
                while !stop.load(Ordering::Relaxed) {
                    exec_roundtrip(&mut s, b"busy\n");
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let before = done.load(Ordering::Relaxed);
    let t = Instant::now();
    let mut loaded = echo_latencies(echo, Duration::from_secs(3));
    let rate = (done.load(Ordering::Relaxed) - before) as f64 / t.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    let (ip50, ip99) = (percentile(&mut idle, 0.5), percentile(&mut idle, 0.99));
    let (lp50, lp99) = (percentile(&mut loaded, 0.5), percentile(&mut loaded, 0.99));
    println!(
        "{{\"bench\":\"exec-stall\",\"exec_commands_per_s\":{rate:.0},\"echo_idle_p50_us\":{ip50:.0},\"echo_idle_p99_us\":{ip99:.0},\"echo_loaded_p50_us\":{lp50:.0},\"echo_loaded_p99_us\":{lp99:.0},\"p50_ratio\":{:.2},\"p99_ratio\":{:.2}}}",
        lp50 / ip50,
        lp99 / ip99
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("roundtrip") => roundtrip(args[2].parse().unwrap()),
        Some("stall") => stall(args[2].parse().unwrap(), args[3].parse().unwrap()),
        _ => eprintln!("usage: exec-bench roundtrip EXEC_ADDR | stall EXEC_ADDR ECHO_ADDR"),
    }
}
