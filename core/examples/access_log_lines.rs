//! Writes access log lines the way a worker does, for counting what one line costs:
//!
//! ```sh
//! cargo build --release -p wharf-core --example access_log_lines
//! valgrind --tool=callgrind target/release/examples/access_log_lines json 100000
//! valgrind --tool=callgrind target/release/examples/access_log_lines json 200000
//! ```
//!
//! The difference between the two totals over 100 000 is the instructions of one request line
//! (the fields http-hello adds) on the worker plus its share of the writer thread, without the
//! plugin's own bookkeeping. Lines go to `/dev/null`; `logfmt` as the first argument for
//! that format.

use std::time::Duration;

use wharf_core::access_log::{self, AccessLog, Who};
use wharf_core::config::{AccessLogConfig, AccessLogFormat};

fn main() {
    let mut args = std::env::args().skip(1);
    let format = match args.next().as_deref() {
        Some("logfmt") => AccessLogFormat::Logfmt,
        _ => AccessLogFormat::Json,
    };
    let lines: u64 = args.next().and_then(|n| n.parse().ok()).unwrap_or(100_000);
    let config = AccessLogConfig {
        path: "/dev/null".into(),
        format,
        buffer_lines: 65_536,
    };
    let log = AccessLog::start(&config, access_log::open(&config).unwrap()).unwrap();
    let service = log.for_service("s", "http-hello", &["ok"], true).unwrap();
    let who = service.who(&Who {
        client: wharf_core::Peer::Ip("127.0.0.1:45678".parse().unwrap()),
        proxy: None,
        identity: None,
    });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async {
        let flusher = tokio::task::spawn_local(access_log::flush_batches());
        tokio::task::yield_now().await;
        for i in 0..lines {
            // Values the compiler cannot see through, as a plugin's are.
            let (method, target) = std::hint::black_box((&b"GET"[..], &b"/index.html"[..]));
            service.request(&who, "ok", Duration::from_micros(12 + i % 7), |f| {
                f.bytes("method", method);
                f.bytes("target", target);
                f.u64("status", std::hint::black_box(200));
            });
            if i % 64 == 63 {
                // Let the flusher run now and then, as a worker's other tasks would.
                tokio::task::yield_now().await;
            }
        }
        flusher.abort();
    });
    log.stop(Duration::from_secs(10));
}
