//! `wharf bench`: a load generator that speaks the four protocols, and `wharf bench swap`,
//! which runs the same load against the same service under each backend to compare them.
//!
//! A library so that the `wharf` command (`src/cli.rs`) can offer it as a subcommand: the CLI
//! parses a [`BenchCommand`] and calls [`run`]. It must be called from the `wharf` binary
//! itself, because `bench swap` starts its servers as `<this program> serve`.
//!
//! - [`protocol`]: one request and the parser of its answer, per protocol (no sockets).
//! - [`load`]: the engine (client threads, closed and open loop, the measurement window).
//! - [`pacer`]: microsecond-precise send times for the open loop.
//! - [`report`]: figures of one run, as text and JSON.
//! - [`udp`]: `bench udp-echo`, its own engine (datagrams, loss, no connections).
//! - [`swap`]: starts `wharf serve` under each backend and interleaves the runs.
//! - [`chart`]: the SVG chart of a swap.
//! - [`tls`]: client-side TLS (`--tls`), shared with `wharf client`.
//! - [`procstat`]: CPU time, memory, CPU pinning and "which process listens there" from
//!   /proc; also used by the peers.
//!
//! What the figures are compared with lives next door: `bench/peers/` (crate
//! `wharf-bench-peers`) holds the minimal tokio echo server and the hand-written load
//! generators, and `bench/*.sh` the scripts that run them; BENCHMARKS.md has every command and
//! result.

pub mod chart;
pub mod load;
pub mod pacer;
pub mod procstat;
pub mod protocol;
pub mod report;
pub mod swap;
pub mod target;
pub mod tls;
pub mod udp;

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Subcommand};

use load::LoadSpec;
use protocol::{Protocol, Workload};
use report::Report;
use target::Target;

/// Longest `--duration` or `--warmup` (a day).
const MAX_SECONDS: f64 = 86_400.0;

/// Bytes per echo message unless `--size` says otherwise.
const DEFAULT_ECHO_SIZE: usize = 128;

/// `wharf bench ...`
#[derive(Subcommand)]
pub enum BenchCommand {
    /// Load an echo service: send `--size` bytes, wait for them to come back.
    Echo(TargetArgs),
    /// Load an HTTP server with keep-alive GETs of `--path`.
    Http(TargetArgs),
    /// Load an exec service: run `--command` and read its result.
    Exec(TargetArgs),
    /// Load a file-get service: download `--path` (with `--verify`, check every MD5).
    Get(TargetArgs),
    /// Load a UDP echo service: datagrams of `--size` bytes from `--senders` sockets, loss
    /// counted (no reply within `--timeout`).
    UdpEcho(udp::UdpArgs),
    /// Compare backends: start the service under each backend in turn and run the same loads
    /// against each, interleaved; prints a table, writes results.json and an SVG chart.
    Swap(swap::SwapArgs),
}

/// `wharf bench <protocol> ADDR ...`
#[derive(Args)]
pub struct TargetArgs {
    /// Server address, e.g. 127.0.0.1:6969, or unix:/path/to.sock (unix:@name: abstract).
    addr: String,
    /// Concurrent connections.
    #[arg(long, short = 'c', default_value_t = 64)]
    connections: usize,
    /// Seconds measured (after the warm-up).
    #[arg(long, short = 'd', default_value_t = 10.0)]
    duration: f64,
    #[command(flatten)]
    work: WorkloadArgs,
    /// Print the report as one JSON object.
    #[arg(long)]
    json: bool,
    /// Measure the CPU time of these server processes (default: the local processes found
    /// listening on ADDR).
    #[arg(long, value_delimiter = ',')]
    server_pid: Vec<u32>,
    /// Open a new connection for every request (every `--pipeline` batch) and close it after
    /// the answer: measures connection setup (with --tls, handshakes per second); the latency
    /// includes connecting. Closed loop only.
    #[arg(long, conflicts_with = "rate")]
    new_conn: bool,
    /// Start every connection with a PROXY protocol header (v1 text, v2 binary) naming the
    /// client socket's own addresses, as HAProxy's send-proxy does: loads a service with
    /// `proxy_protocol` directly (its `trusted_proxies` must hold this client's address).
    #[arg(long, value_name = "VERSION")]
    send_proxy: Option<load::SendProxy>,
    #[command(flatten)]
    tls: tls::TlsArgs,
}

/// What each request is and how requests are paced: shared by `bench` and `bench swap`.
#[derive(Args, Clone)]
pub struct WorkloadArgs {
    /// echo: bytes per message (default 128). get, swap only: size of the file served
    /// (default 1 MiB).
    #[arg(long)]
    size: Option<usize>,
    /// http: the path requested. get: the file downloaded.
    #[arg(long)]
    path: Option<String>,
    /// exec: the command line run.
    #[arg(long, default_value = "true")]
    command: String,
    /// echo and http: requests sent back to back on a connection before reading the answers.
    #[arg(long, default_value_t = 1)]
    pipeline: usize,
    /// Open loop: send this many requests per second in total, on a fixed schedule, and
    /// measure latency from when each was due (no coordinated omission). Default: closed
    /// loop, each connection sends when its previous answer is in.
    #[arg(long)]
    rate: Option<f64>,
    /// get: check every download against its MD5 trailer (costs client CPU).
    #[arg(long)]
    verify: bool,
    /// Seconds of load before measuring (connections open, caches warm).
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Client threads (default: one per CPU this process may use).
    #[arg(long)]
    threads: Option<usize>,
}

impl WorkloadArgs {
    /// The workload against `addr`, or a usage error.
    fn workload(&self, protocol: Protocol, addr: &Target) -> Result<Workload, String> {
        if self.pipeline == 0 {
            return Err("--pipeline must be at least 1".into());
        }
        if self.pipeline > 1 && !protocol.pipelines() {
            return Err(format!(
                "--pipeline: {} waits for an acknowledgement inside every answer, so requests \
                 cannot be pipelined",
                protocol.as_str()
            ));
        }
        if let Some(rate) = self.rate {
            if !(rate.is_finite() && rate > 0.0) {
                return Err("--rate must be a positive number of requests per second".into());
            }
        }
        if !(self.warmup.is_finite() && (0.0..=MAX_SECONDS).contains(&self.warmup)) {
            return Err(format!("--warmup must be 0 to {MAX_SECONDS} seconds"));
        }
        Ok(match protocol {
            Protocol::Echo => match self.size.unwrap_or(DEFAULT_ECHO_SIZE) {
                0 => return Err("--size must be at least 1 byte for echo".into()),
                size => Workload::echo(size),
            },
            Protocol::Http => {
                let host = addr
                    .tcp()
                    .map_or_else(|| "localhost".into(), |a| a.to_string());
                Workload::http(&host, self.path.as_deref().unwrap_or("/"))
            }
            Protocol::Exec => {
                if self.command.trim().is_empty() || self.command.contains('\n') {
                    return Err("--command must be one non-empty line".into());
                }
                Workload::exec(&self.command)
            }
            Protocol::Get => match &self.path {
                Some(path) if !path.contains(char::is_whitespace) => {
                    Workload::get(path, self.verify)
                }
                Some(_) => return Err("--path: file-get paths cannot contain whitespace".into()),
                None => {
                    return Err(
                        "--path is required for get (a file under the service's root)".into(),
                    )
                }
            },
        })
    }

    fn spec(
        &self,
        protocol: Protocol,
        addr: Target,
        connections: usize,
        duration: f64,
    ) -> Result<LoadSpec, String> {
        if connections == 0 {
            return Err("--connections must be at least 1".into());
        }
        if !(duration.is_finite() && duration > 0.0 && duration <= MAX_SECONDS) {
            return Err(format!(
                "--duration must be more than 0 and at most {MAX_SECONDS} seconds"
            ));
        }
        let workload = self.workload(protocol, &addr)?;
        Ok(LoadSpec {
            addr,
            workload: Arc::new(workload),
            connections,
            threads: self
                .threads
                .unwrap_or_else(|| procstat::allowed_cpus().len())
                .max(1),
            client_cpus: Vec::new(),
            warmup: Duration::from_secs_f64(self.warmup),
            duration: Duration::from_secs_f64(duration),
            pipeline: self.pipeline,
            rate: self.rate,
            server_pids: Vec::new(),
            tls: None,
            new_conn: false,
            send_proxy: None,
        })
    }
}

/// Runs `wharf bench ...`; returns the exit code: 0 when at least one request was answered
/// without error, 1 when none was (or the run could not start), 2 for usage errors.
pub fn run(command: BenchCommand) -> i32 {
    let (protocol, args) = match command {
        BenchCommand::Echo(a) => (Protocol::Echo, a),
        BenchCommand::Http(a) => (Protocol::Http, a),
        BenchCommand::Exec(a) => (Protocol::Exec, a),
        BenchCommand::Get(a) => (Protocol::Get, a),
        BenchCommand::Swap(a) => return swap::main(a),
        BenchCommand::UdpEcho(a) => return udp::main(a),
    };
    let addr = match resolve(&args.addr) {
        Ok(a) => a,
        Err(e) => return usage(&e),
    };
    let mut spec = match args
        .work
        .spec(protocol, addr, args.connections, args.duration)
    {
        Ok(s) => s,
        Err(e) => return usage(&e),
    };
    spec.tls = match args.tls.client(&args.addr) {
        Ok(tls) => tls,
        Err(e) => return usage(&e),
    };
    if matches!(spec.addr, Target::Unix(_)) && (spec.tls.is_some() || args.send_proxy.is_some()) {
        return usage("--tls and --send-proxy are for TCP addresses, not unix:");
    }
    spec.new_conn = args.new_conn;
    spec.send_proxy = args.send_proxy;
    spec.server_pids = if args.server_pid.is_empty() {
        spec.addr.listening_pids()
    } else {
        args.server_pid.clone()
    };
    procstat::raise_fd_limit(spec.connections as u64 + 64);
    let result = load::run(&spec);
    let report = Report::new(&spec, &result);
    print_report(args.json, &report, || report.to_text());
    if report.requests > report.failed {
        0
    } else {
        if !args.json {
            eprintln!("wharf: no request was answered without error");
        }
        1
    }
}

/// The address to load: a `unix:` socket as written, or the first of `addr`'s addresses that
/// accepts a connection (a name such as `localhost` may resolve to ::1 first while the server
/// listens on 127.0.0.1), else the first one, whose failures the run then reports.
fn resolve(addr: &str) -> Result<Target, String> {
    if let Some(unix) = Target::parse_unix(addr) {
        return unix;
    }
    let all: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .map_err(|e| format!("{addr}: {e}"))?
        .collect();
    let first = *all.first().ok_or_else(|| format!("{addr}: no address"))?;
    Ok(Target::Tcp(
        all.into_iter()
            .find(|a| std::net::TcpStream::connect_timeout(a, Duration::from_secs(1)).is_ok())
            .unwrap_or(first),
    ))
}

/// Prints a run's report: as one JSON object with `json`, else as `text` makes it.
fn print_report<R: serde::Serialize>(json: bool, report: &R, text: impl FnOnce() -> String) {
    if json {
        match serde_json::to_string_pretty(report) {
            Ok(json) => println!("{json}"),
            Err(e) => eprintln!("wharf: error: cannot render the report as JSON: {e}"),
        }
    } else {
        print!("{}", text());
    }
}

fn usage(message: &str) -> i32 {
    eprintln!("wharf: error: {message}");
    2
}
