//! The io_uring echo peer of issue 18: what the io_uring backend's ring path costs per request
//! without wharf's framework around it, measured against `tokio-echo-baseline` and wharf's
//! backends by `bench/uring.sh`. It runs on the backend's own code (`wharf_backend_uring::ring`:
//! multishot accept, multishot receive from a provided-buffer ring copied into the task's
//! buffer, `SEND`, batched submissions, SINGLE_ISSUER + DEFER_TASKRUN).
//!
//! It behaves exactly like `tokio-echo-baseline` (echo what arrives, as it arrives, one task
//! per connection) inside the ring runtime: tasks spawned with `spawn_local`, and tokio timers
//! alongside (a 1 s heartbeat, and `--idle-timeout`, which drops a pending read: the
//! cancellation path).
//!
//! Usage: `uring-echo [ADDR] [--no-defer] [--buffers N] [--idle-timeout S]`
//! Prints `listening on ADDR` when ready; on SIGTERM or SIGINT prints the driver's counters
//! as one JSON line on stderr and exits.

use std::cell::Cell;
use std::rc::Rc;
use std::time::Duration;

use clap::Parser;
use wharf_backend_uring::driver::{Driver, Features};
use wharf_backend_uring::ring::{self, Conn, Listener};
use wharf_core::backend::Listener as _;
use wharf_core::conn::Conn as _;

#[derive(Parser)]
struct Args {
    /// Address to listen on.
    #[arg(default_value = "127.0.0.1:7000")]
    addr: std::net::SocketAddr,
    /// COOP_TASKRUN + TASKRUN_FLAG instead of DEFER_TASKRUN (ring fd watched by epoll).
    #[arg(long)]
    no_defer: bool,
    /// Buffers in the provided-buffer ring (power of two).
    #[arg(long, default_value_t = 2048)]
    buffers: u16,
    /// Close a connection idle this many seconds (0: never, like the baseline).
    #[arg(long, default_value_t = 0.0)]
    idle_timeout: f64,
}

fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let features = Features {
        defer_taskrun: !args.no_defer,
        buffers: args.buffers,
        ..Features::default()
    };
    match ring::block_on(&features, serve(args)) {
        Ok(out) => out,
        Err(e) => {
            eprintln!("io_uring unavailable: {e}");
            std::process::exit(2);
        }
    }
}

async fn serve(args: Args) -> std::io::Result<()> {
    let driver = Driver::current()?;
    eprintln!("uring: {:?}", driver.settings());
    let socket = wharf_bench_peers::reuseport_listener(args.addr)?;
    let local = socket.local_addr()?.as_socket();
    let listener = Listener::tcp(socket.into())?;
    println!(
        "listening on {}",
        local.map_or_else(|| "?".into(), |a| a.to_string())
    );

    let open = Rc::new(Cell::new(0u64));
    let heartbeat = {
        let open = open.clone();
        tokio::task::spawn_local(async move {
            // A timer that keeps firing under load: tokio's time driver works next to the ring.
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                std::hint::black_box(open.get());
            }
        })
    };
    let idle = (args.idle_timeout > 0.0).then(|| Duration::from_secs_f64(args.idle_timeout));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            conn = listener.accept() => match conn {
                Ok((conn, _peer)) => {
                    open.set(open.get() + 1);
                    let open = open.clone();
                    tokio::task::spawn_local(async move {
                        echo(conn, idle).await;
                        open.set(open.get() - 1);
                    });
                }
                Err(e) => {
                    // Not transient (those the listener skips): do not spin on it.
                    eprintln!("uring-echo: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    heartbeat.abort();
    // Let the connections' tasks see their ends, so `open` counts only what leaked.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let s = driver.stats();
    let (ops, buffers) = driver.in_use();
    eprintln!(
        "{{\"enters\":{},\"sqes\":{},\"cqes\":{},\"wakeups\":{},\"enobufs\":{},\"multishot_rearms\":{},\"orphan_cqes\":{},\"stash_full\":{},\"open\":{},\"ops\":{},\"buffers_out\":{}}}",
        s.enters, s.sqes, s.cqes, s.wakeups, s.enobufs, s.multishot_rearms, s.orphan_cqes, s.stash_full, open.get(), ops, buffers
    );
    std::process::exit(0)
}

/// Echoes until end of stream, an error, or `idle` without a byte.
async fn echo(mut conn: Conn, idle: Option<Duration>) {
    let mut buf = Vec::with_capacity(4096);
    loop {
        buf.clear();
        let (r, b) = match idle {
            Some(idle) => match tokio::time::timeout(idle, conn.read(buf)).await {
                Ok(r) => r,
                // The read future is dropped here, buffer and all (the kernel never writes
                // into it: receives use the provided-buffer ring).
                Err(_) => return,
            },
            None => conn.read(buf).await,
        };
        buf = b;
        match r {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                let (r, b) = conn.write_all(buf).await;
                buf = b;
                if r.is_err() {
                    return;
                }
            }
        }
    }
}
