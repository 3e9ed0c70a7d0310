//! The io_uring echo peer of issue 18: what a backend that does fewer operations (multishot
//! accept, multishot receive from a provided-buffer ring, direct descriptors, SEND, batched
//! submissions, SINGLE_ISSUER + DEFER_TASKRUN) costs per request, measured against
//! `tokio-echo-baseline` and wharf's two backends by `bench/uring.sh`.
//!
//! It behaves exactly like `tokio-echo-baseline` (echo what arrives, as it arrives, one task
//! per connection) and runs the way wharf would need it: inside a tokio current-thread
//! runtime, tasks spawned with `spawn_local`, the ring driven by the driver task of
//! `wharf_bench_peers::uring`, and tokio timers alongside (a 1 s heartbeat, and
//! `--idle-timeout`, which drops a pending receive: the cancellation path).
//!
//! Usage: `uring-echo [ADDR] [--no-multishot] [--no-direct] [--no-bufring] [--no-defer]`
//! Prints `listening on ADDR` when ready; on SIGTERM or SIGINT prints the driver's counters
//! as one JSON line on stderr and exits.

use std::cell::Cell;
use std::rc::Rc;
use std::time::Duration;

use clap::Parser;
use wharf_bench_peers::uring::net::{Conn, Listener};
use wharf_bench_peers::uring::{Driver, Features};

#[derive(Parser)]
struct Args {
    /// Address to listen on.
    #[arg(default_value = "127.0.0.1:7000")]
    addr: std::net::SocketAddr,
    /// One-shot accept and receive instead of multishot.
    #[arg(long)]
    no_multishot: bool,
    /// Plain fds instead of direct descriptors.
    #[arg(long)]
    no_direct: bool,
    /// One owned buffer per receive instead of the provided-buffer ring (implies one-shot
    /// receive: multishot receive needs the ring).
    #[arg(long)]
    no_bufring: bool,
    /// COOP_TASKRUN + TASKRUN_FLAG instead of DEFER_TASKRUN (ring fd watched by epoll).
    #[arg(long)]
    no_defer: bool,
    /// Buffers in the provided-buffer ring (power of two).
    #[arg(long, default_value_t = 2048)]
    buffers: u16,
    /// Direct descriptor slots: the most connections open at once with direct descriptors.
    #[arg(long, default_value_t = 16384)]
    direct_slots: u32,
    /// Close a connection idle this many seconds (0: never, like the baseline).
    #[arg(long, default_value_t = 0.0)]
    idle_timeout: f64,
}

fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let features = Features {
        multishot: !args.no_multishot,
        direct: !args.no_direct,
        buffer_ring: !args.no_bufring,
        defer_taskrun: !args.no_defer,
        buffers: args.buffers,
        direct_slots: args.direct_slots,
        ..Features::default()
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, serve(args, features))
}

async fn serve(args: Args, features: Features) -> std::io::Result<()> {
    let driver = match Driver::new(&features) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("io_uring unavailable: {e}");
            std::process::exit(2);
        }
    };
    eprintln!("uring: {:?}", driver.settings());
    let mut driver_task = tokio::task::spawn_local(driver.clone().run());
    let mut listener = Listener::bind(&driver, args.addr)?;
    println!("listening on {}", listener.local_addr());

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
                Ok(conn) => {
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
            r = &mut driver_task => {
                eprintln!("uring-echo: the driver stopped: {r:?}");
                break;
            }
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    heartbeat.abort();
    let s = driver.stats();
    eprintln!(
        "{{\"enters\":{},\"sqes\":{},\"cqes\":{},\"wakeups\":{},\"enobufs\":{},\"multishot_rearms\":{},\"orphan_cqes\":{},\"open\":{}}}",
        s.enters, s.sqes, s.cqes, s.wakeups, s.enobufs, s.multishot_rearms, s.orphan_cqes, open.get()
    );
    std::process::exit(0)
}

/// Echoes until end of stream, an error, or `idle` without a byte.
async fn echo(mut conn: Conn, idle: Option<Duration>) {
    let mut buf = Vec::with_capacity(4096);
    loop {
        buf.clear();
        let (r, b) = match idle {
            Some(idle) => match tokio::time::timeout(idle, conn.recv(buf)).await {
                Ok(r) => r,
                // The receive future is dropped here, buffer and all: the driver keeps what
                // the kernel may still write until the cancellation completes.
                Err(_) => return,
            },
            None => conn.recv(buf).await,
        };
        buf = b;
        match r {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                let (r, b) = conn.send_all(buf).await;
                buf = b;
                if r.is_err() {
                    return;
                }
            }
        }
    }
}
