//! file-get benchmarks (issue 5):
//!
//! - `raw ADDR PATH [CONNECTIONS] [SERVER_PID]`: CONNECTIONS concurrent downloads of PATH with
//!   the tutorial's protocol, data read and discarded (no hashing: measures the server),
//!   digest checked for shape; prints aggregate MB/s and, with SERVER_PID, the server's peak
//!   RSS sampled every 20 ms.
//! - `md5 FILE`: MD5 speed over FILE's bytes already in memory, one core: wharf's
//!   (`wharf_core::md5`: the `md-5` crate with its assembly backend), by the CPU time of the
//!   hashing thread (less disturbed by other work on the machine than the wall time).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use wharf_bench::procstat;

fn download(addr: &str, path: &str) -> u64 {
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(format!("get {path}\n").as_bytes()).unwrap();
    let mut head = [0u8; 64];
    let n = s.read(&mut head).unwrap();
    let size: u64 = std::str::from_utf8(&head[..n]).unwrap().parse().unwrap();
    s.write_all(b"ok").unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size + 32;
    while left > 0 {
        let want = left.min(buf.len() as u64) as usize;
        let n = s.read(&mut buf[..want]).unwrap();
        assert!(n > 0, "closed early");
        left -= n as u64;
    }
    size
}

/// CPU time of the calling thread so far.
fn thread_cpu_seconds() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("raw") => {
            let (addr, path) = (args[2].clone(), args[3].clone());
            let n: usize = args.get(4).map_or(1, |c| c.parse().unwrap());
            let pid: Option<u32> = args.get(5).map(|p| p.parse().unwrap());
            let stop = Arc::new(AtomicBool::new(false));
            let sampler = pid.map(|pid| {
                let stop = Arc::clone(&stop);
                std::thread::spawn(move || {
                    let mut peak = 0;
                    while !stop.load(Ordering::Relaxed) {
                        peak = peak.max(procstat::resident_kib(pid).unwrap_or(0));
                        std::thread::sleep(std::time::Duration::from_millis(20));
                    }
                    peak
                })
            });
            let t = Instant::now();
            let total: u64 = (0..n)
                .map(|_| {
                    let (a, p) = (addr.clone(), path.clone());
                    std::thread::spawn(move || download(&a, &p))
                })
                .collect::<Vec<_>>()
                .into_iter()
                .map(|h| h.join().unwrap())
                .sum();
            let secs = t.elapsed().as_secs_f64();
            stop.store(true, Ordering::Relaxed);
            let peak = sampler.map(|s| s.join().unwrap());
            println!(
                "{{\"bench\":\"fileget-raw\",\"connections\":{n},\"bytes\":{total},\"seconds\":{secs:.3},\"mb_per_s\":{:.0},\"server_peak_rss_kib\":{}}}",
                total as f64 / secs / 1e6,
                peak.map_or("null".into(), |p| p.to_string())
            );
        }
        Some("md5") => {
            let data = std::fs::read(&args[2]).unwrap();
            let t = thread_cpu_seconds();
            let ours = wharf_core::md5::Md5::of(&data);
            let secs = thread_cpu_seconds() - t;
            println!(
                "{{\"bench\":\"md5-in-memory\",\"bytes\":{},\"seconds\":{secs:.3},\"mb_per_s\":{:.0},\"md5\":\"{}\"}}",
                data.len(),
                data.len() as f64 / secs / 1e6,
                wharf_core::md5::hex(&ours)
            );
        }
        _ => eprintln!("usage: fileget-bench raw ADDR PATH [CONNECTIONS] [SERVER_PID] | md5 FILE"),
    }
}
