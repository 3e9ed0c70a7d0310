//! Closed-loop echo load: N connections, each sends `size` bytes and waits for all of them to
//! come back before sending again. Prints one JSON line: round trips per second, latency
//! percentiles (HdrHistogram) and, with `--server-pid`, the server's CPU time per round trip
//! (from /proc, so it is independent of how fast this client is).

use std::time::{Duration, Instant};

use clap::Parser;
use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wharf_bench::procstat;

#[derive(Parser)]
struct Args {
    /// Server address.
    addr: std::net::SocketAddr,
    #[arg(long, default_value_t = 64)]
    connections: usize,
    #[arg(long, default_value_t = 128)]
    size: usize,
    /// Seconds of measurement (after a 1 s warm-up).
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Client threads (connections are spread over them).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// The server's pid: report the CPU time it used per round trip.
    #[arg(long)]
    server_pid: Option<u32>,
    /// A label copied into the JSON output.
    #[arg(long, default_value = "")]
    label: String,
}

/// CPU seconds the server has used so far; `None` once it has exited (no figure is reported).
fn cpu_seconds(pid: u32) -> Option<f64> {
    procstat::process_cpu(pid).map(|t| t.as_secs_f64())
}

fn main() {
    let args = Args::parse();
    let warmup = Duration::from_secs(1);
    let measure = Duration::from_secs_f64(args.duration);
    let start = Instant::now() + Duration::from_millis(200);
    let measure_from = start + warmup;
    let measure_to = measure_from + measure;

    let per_thread: Vec<usize> = (0..args.threads)
        .map(|t| args.connections / args.threads + usize::from(t < args.connections % args.threads))
        .collect();
    let cpu_before = std::sync::Mutex::new(None);
    let threads: Vec<_> = per_thread
        .into_iter()
        .map(|conns| {
            let (addr, size) = (args.addr, args.size);
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                let local = tokio::task::LocalSet::new();
                local.block_on(&rt, async move {
                    let tasks: Vec<_> = (0..conns)
                        .map(|_| {
                            tokio::task::spawn_local(connection(
                                addr,
                                size,
                                measure_from,
                                measure_to,
                            ))
                        })
                        .collect();
                    let mut hist = Histogram::<u64>::new(3).unwrap();
                    let mut errors = 0u64;
                    for t in tasks {
                        match t.await.unwrap() {
                            Ok(h) => hist.add(h).unwrap(),
                            Err(_) => errors += 1,
                        }
                    }
                    (hist, errors)
                })
            })
        })
        .collect();
    if let Some(pid) = args.server_pid {
        std::thread::sleep(measure_from.saturating_duration_since(Instant::now()));
        *cpu_before.lock().unwrap() = cpu_seconds(pid);
        std::thread::sleep(measure_to.saturating_duration_since(Instant::now()));
    }
    let cpu_after = args.server_pid.and_then(cpu_seconds);
    let mut hist = Histogram::<u64>::new(3).unwrap();
    let mut errors = 0;
    for t in threads {
        let (h, e) = t.join().unwrap();
        hist.add(h).unwrap();
        errors += e;
    }
    let rps = hist.len() as f64 / measure.as_secs_f64();
    let cpu_per_rt_us = match (*cpu_before.lock().unwrap(), cpu_after) {
        (Some(b), Some(a)) if !hist.is_empty() => {
            format!("{:.3}", (a - b) * 1e6 / hist.len() as f64)
        }
        _ => "null".into(),
    };
    println!(
        "{{\"label\":\"{}\",\"connections\":{},\"size\":{},\"rps\":{:.0},\"p50_us\":{:.1},\"p99_us\":{:.1},\"p999_us\":{:.1},\"errors\":{},\"server_cpu_us_per_rt\":{}}}",
        args.label,
        args.connections,
        args.size,
        rps,
        hist.value_at_quantile(0.5) as f64 / 1000.0,
        hist.value_at_quantile(0.99) as f64 / 1000.0,
        hist.value_at_quantile(0.999) as f64 / 1000.0,
        errors,
        cpu_per_rt_us
    );
}

/// One connection's closed loop; returns the latencies (ns) of round trips completed inside
/// the measurement window.
async fn connection(
    addr: std::net::SocketAddr,
    size: usize,
    from: Instant,
    to: Instant,
) -> std::io::Result<Histogram<u64>> {
    tokio::time::sleep_until(
        from.checked_sub(Duration::from_secs(1))
            .unwrap_or(from)
            .into(),
    )
    .await;
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let msg = vec![b'a'; size];
    let mut back = vec![0u8; size];
    let mut hist = Histogram::<u64>::new(3).unwrap();
    loop {
        let sent = Instant::now();
        if sent >= to {
            return Ok(hist);
        }
        stream.write_all(&msg).await?;
        stream.read_exact(&mut back).await?;
        if sent >= from {
            hist.record(sent.elapsed().as_nanos() as u64).unwrap();
        }
    }
}
