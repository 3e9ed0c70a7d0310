//! `wharf bench swap`: the same service, the same config and the same load under each backend.
//!
//! One `wharf serve` per backend is started (from this very binary, so both run the same
//! code), each with a generated config that differs only in its port. The loads then run
//! interleaved, backend A then B at each point of every repetition (A B A B ...), so drift on a
//! shared machine hits every backend alike; the table reports medians over the repetitions and
//! ratios of medians. Servers and the client are pinned to disjoint CPUs when there are enough,
//! so the client does not steal the server's CPU.

use std::io::Read as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;
use wharf_core::config::BackendKind;
use wharf_core::exit_status;

use super::load;
use super::procstat;
use super::protocol::Protocol;
use super::report::{grouped, micros, Report};
use super::{chart, WorkloadArgs};

/// Size of the file a get swap downloads, unless `--size` says otherwise.
const DEFAULT_FILE_SIZE: usize = 1024 * 1024;
/// How long a server may take to start listening.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);
/// Ports tried per server: another process can take a free port before the server binds it.
const PORT_ATTEMPTS: usize = 3;

/// `wharf bench swap <plugin> ...`
#[derive(Args)]
pub struct SwapArgs {
    /// The service to compare the backends on.
    plugin: Protocol,
    /// Backends, in order; ratios are to the first.
    #[arg(long, value_delimiter = ',', default_values_t = BackendKind::ALL,
          value_parser = |name: &str| name.parse::<BackendKind>())]
    backends: Vec<BackendKind>,
    /// Connection counts to measure at.
    #[arg(long, short = 'c', value_delimiter = ',', default_value = "1,64,512")]
    connections: Vec<usize>,
    /// Server workers (threads), the same for every backend.
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Seconds measured per run (after the warm-up).
    #[arg(long, short = 'd', default_value_t = 5.0)]
    duration: f64,
    /// Runs per backend and connection count.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Where results.json, summary.txt, chart.svg, the configs and the server logs go (default:
    /// bench-results/swap-PLUGIN-TIME).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Do not pin the servers and the client to separate CPUs.
    #[arg(long)]
    no_pin: bool,
    #[command(flatten)]
    work: WorkloadArgs,
}

/// One run of the matrix.
#[derive(Serialize)]
struct Run {
    repetition: usize,
    backend: &'static str,
    report: Report,
}

/// Medians of one backend at one connection count.
#[derive(Serialize, Clone)]
struct Point {
    backend: &'static str,
    connections: usize,
    runs: usize,
    median_requests_per_sec: f64,
    min_requests_per_sec: f64,
    max_requests_per_sec: f64,
    median_p99_us: f64,
    min_p99_us: f64,
    max_p99_us: f64,
    median_server_us_per_request: Option<f64>,
    min_server_us_per_request: Option<f64>,
    max_server_us_per_request: Option<f64>,
    median_server_cores: Option<f64>,
    median_client_cores: f64,
    errors: u64,
    /// Median req/s over the first backend's at the same connection count.
    ratio_to_first: f64,
}

#[derive(Serialize)]
struct Results<'a> {
    plugin: &'static str,
    backends: Vec<&'static str>,
    connections: &'a [usize],
    workers: usize,
    duration_s: f64,
    warmup_s: f64,
    repeat: usize,
    machine: Machine,
    /// The generated config (the port differs per backend).
    config: String,
    summary: &'a [Point],
    runs: &'a [Run],
}

#[derive(Serialize)]
struct Machine {
    cpus: usize,
    kernel: String,
    server_cpus: Vec<usize>,
    client_cpus: Vec<usize>,
}

/// Runs the swap; returns the exit code.
pub fn main(args: SwapArgs) -> i32 {
    match run(args) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("wharf: error: {e}");
            1
        }
    }
}

fn run(args: SwapArgs) -> Result<(), String> {
    validate(&args)?;
    let mut work = args.work.clone();
    if args.plugin == Protocol::Get {
        work.path = Some(BENCH_FILE.to_string());
    }
    // Workload mistakes (--pipeline with exec...) are reported before any server starts.
    work.spec(
        args.plugin,
        crate::target::Target::Tcp(SocketAddr::from(([127, 0, 0, 1], 1))),
        1,
        args.duration,
    )?;
    let out = args.out.clone().unwrap_or_else(|| {
        let stamp = humantime::format_rfc3339_seconds(std::time::SystemTime::now())
            .to_string()
            .replace(':', "-");
        PathBuf::from(format!(
            "bench-results/swap-{}-{stamp}",
            args.plugin.as_str()
        ))
    });
    std::fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    let max_conns = args.connections.iter().copied().max().unwrap_or(1);
    procstat::raise_fd_limit(2 * max_conns as u64 + 256);

    // Pinning: servers on the first `workers` CPUs, the client on the rest.
    let cpus = procstat::allowed_cpus();
    let (server_cpus, client_cpus) = if !args.no_pin && cpus.len() > args.workers {
        (cpus[..args.workers].to_vec(), cpus[args.workers..].to_vec())
    } else {
        if !args.no_pin {
            eprintln!(
                "note: {} CPU(s) for {} worker(s): server and client are not pinned apart",
                cpus.len(),
                args.workers
            );
        }
        (Vec::new(), Vec::new())
    };

    let file_path = match args.plugin {
        Protocol::Get => Some(make_file(
            &out,
            args.work.size.unwrap_or(DEFAULT_FILE_SIZE),
        )?),
        _ => None,
    };
    let threads = work.threads.unwrap_or(if client_cpus.is_empty() {
        cpus.len()
    } else {
        client_cpus.len()
    });
    work.threads = Some(threads);

    // The servers run this very program (`wharf`), so both backends run the same code.
    let wharf = std::env::current_exe().map_err(|e| format!("cannot find this program: {e}"))?;
    let mut servers = Vec::new();
    let mut config_text = String::new();
    for &backend in &args.backends {
        let launch = Launch {
            wharf: &wharf,
            args: &args,
            out: &out,
            cpus: &server_cpus,
            files: file_path.as_deref(),
        };
        let server = Server::start(&launch, backend)?;
        config_text = server.config.clone();
        eprintln!(
            "started {} ({} worker{}) on {}, pid {}{}",
            backend.as_str(),
            args.workers,
            if args.workers == 1 { "" } else { "s" },
            server.addr,
            server.child.id(),
            pinned_note(&server_cpus)
        );
        servers.push(server);
    }

    let total = args.repeat * args.connections.len() * servers.len();
    let mut runs = Vec::with_capacity(total);
    for repetition in 1..=args.repeat {
        for &connections in &args.connections {
            for server in servers.iter_mut() {
                let mut spec = work.spec(
                    args.plugin,
                    crate::target::Target::Tcp(server.addr),
                    connections,
                    args.duration,
                )?;
                spec.client_cpus = client_cpus.clone();
                spec.server_pids = vec![server.child.id()];
                let result = load::run(&spec);
                server.check_alive()?;
                let report = Report::new(&spec, &result);
                eprintln!(
                    "[{:>3}/{total}] {:<8} {:>5} conns  {:>10} req/s  p99 {:>9}  {} error{}",
                    runs.len() + 1,
                    server.backend.as_str(),
                    connections,
                    grouped(report.requests_per_sec),
                    micros(report.latency_us.p99),
                    report.errors,
                    if report.errors == 1 { "" } else { "s" }
                );
                runs.push(Run {
                    repetition,
                    backend: server.backend.as_str(),
                    report,
                });
            }
        }
    }
    drop(servers);

    let summary = summarize(&args, &runs);
    let table = table(&args, &work, &summary, &server_cpus, &client_cpus);
    print!("{table}");
    let results = Results {
        plugin: args.plugin.as_str(),
        backends: args.backends.iter().map(|b| b.as_str()).collect(),
        connections: &args.connections,
        workers: args.workers,
        duration_s: args.duration,
        warmup_s: work.warmup,
        repeat: args.repeat,
        machine: Machine {
            cpus: cpus.len(),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_string(),
            server_cpus,
            client_cpus,
        },
        config: config_text,
        summary: &summary,
        runs: &runs,
    };
    let json = serde_json::to_string_pretty(&results).map_err(|e| e.to_string())?;
    write(&out.join("results.json"), json.as_bytes())?;
    write(&out.join("summary.txt"), table.as_bytes())?;
    let title = format!(
        "wharf {} · {} · {} worker{} · median and range of {}",
        args.plugin.as_str(),
        match work.rate {
            Some(r) => format!("open loop at {} req/s", grouped(r)),
            None => "closed loop".into(),
        },
        args.workers,
        if args.workers == 1 { "" } else { "s" },
        args.repeat
    );
    chart::draw(
        &out.join(CHART_FILE),
        &title,
        &chart_panels(&results.backends, &summary),
    )?;
    println!(
        "\nwrote {}/results.json, summary.txt and {CHART_FILE}",
        out.display()
    );
    if runs.iter().all(|r| r.report.ok_per_sec == 0.0) {
        return Err("no run got a single successful answer (errors are in results.json)".into());
    }
    Ok(())
}

/// The chart `bench swap` writes next to results.json.
const CHART_FILE: &str = "chart.svg";

/// The chart's panels: req/s, server CPU per request and p99, each with its spread over the
/// runs, one series per backend.
fn chart_panels(backends: &[&str], summary: &[Point]) -> Vec<chart::Panel> {
    type Pick = fn(&Point) -> Option<(f64, f64, f64)>;
    let metrics: [(&str, chart::Unit, Pick); 3] = [
        ("requests per second", chart::Unit::PerSecond, |p| {
            Some((
                p.median_requests_per_sec,
                p.min_requests_per_sec,
                p.max_requests_per_sec,
            ))
        }),
        ("server CPU per request", chart::Unit::Microseconds, |p| {
            Some((
                p.median_server_us_per_request?,
                p.min_server_us_per_request?,
                p.max_server_us_per_request?,
            ))
        }),
        ("p99 latency", chart::Unit::Microseconds, |p| {
            Some((p.median_p99_us, p.min_p99_us, p.max_p99_us))
        }),
    ];
    metrics
        .into_iter()
        .map(|(metric, unit, pick)| chart::Panel {
            metric: metric.into(),
            unit,
            series: backends
                .iter()
                .map(|&b| chart::Series {
                    name: b.to_string(),
                    points: summary
                        .iter()
                        .filter(|p| p.backend == b)
                        .filter_map(|p| {
                            let (median, min, max) = pick(p)?;
                            Some(chart::Figure {
                                connections: p.connections,
                                median,
                                min,
                                max,
                            })
                        })
                        .collect(),
                })
                .collect(),
        })
        .collect()
}

fn validate(args: &SwapArgs) -> Result<(), String> {
    if args.backends.is_empty() {
        return Err("--backends: name at least one backend".into());
    }
    let mut seen = Vec::new();
    for b in &args.backends {
        if seen.contains(b) {
            return Err(format!("--backends: {} is listed twice", b.as_str()));
        }
        seen.push(*b);
    }
    if args.connections.is_empty() || args.connections.contains(&0) {
        return Err("--connections: give one or more counts, each at least 1".into());
    }
    if args.workers == 0 {
        return Err("--workers must be at least 1".into());
    }
    if args.repeat == 0 {
        return Err("--repeat must be at least 1".into());
    }
    if args.plugin == Protocol::Get && args.work.path.is_some() {
        return Err("--path: a get swap serves its own file; set its size with --size".into());
    }
    Ok(())
}

fn pinned_note(cpus: &[usize]) -> String {
    if cpus.is_empty() {
        String::new()
    } else {
        format!(", pinned to CPU {}", join(cpus))
    }
}

fn join(items: &[usize]) -> String {
    items
        .iter()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

fn write(path: &Path, bytes: &[u8]) -> Result<(), String> {
    std::fs::write(path, bytes).map_err(|e| format!("{}: {e}", path.display()))
}

/// The file a get swap downloads, under `<out>/files`.
const BENCH_FILE: &str = "bench.bin";

/// Writes `<out>/files/bench.bin` of `size` pseudo-random bytes; returns the root.
fn make_file(out: &Path, size: usize) -> Result<PathBuf, String> {
    let root = out.join("files");
    std::fs::create_dir_all(&root).map_err(|e| format!("{}: {e}", root.display()))?;
    let path = root.join(BENCH_FILE);
    let fail = |e: std::io::Error| format!("{}: {e}", path.display());
    let mut file = std::io::BufWriter::new(std::fs::File::create(&path).map_err(fail)?);
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..size {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        std::io::Write::write_all(&mut file, &[state as u8]).map_err(fail)?;
    }
    std::io::Write::flush(&mut file).map_err(fail)?;
    root.canonicalize()
        .map_err(|e| format!("{}: {e}", root.display()))
}

/// The config every backend runs: one service, the plugin under test.
fn service_config(args: &SwapArgs, port: u16, files: Option<&Path>) -> Result<String, String> {
    let max_conns = args.connections.iter().copied().max().unwrap_or(1);
    let mut options = toml::Table::new();
    match args.plugin {
        Protocol::Echo => {
            options.insert("transform".into(), "none".into());
        }
        Protocol::Http => {}
        Protocol::Exec => {
            let word = args
                .work
                .command
                .split_whitespace()
                .next()
                .ok_or("--command is empty")?;
            let program = find_program(word)?;
            let mut entry = toml::Table::new();
            entry.insert(
                "argv".into(),
                toml::Value::Array(vec![program.display().to_string().into()]),
            );
            entry.insert("allow_args".into(), true.into());
            let mut commands = toml::Table::new();
            commands.insert(word.to_string(), entry.into());
            options.insert("commands".into(), commands.into());
            options.insert("max_concurrent".into(), (max_conns as i64).into());
        }
        Protocol::Get => {
            let root = files.ok_or("no file root")?;
            options.insert("root".into(), root.display().to_string().into());
        }
    }
    let mut service = toml::Table::new();
    service.insert("plugin".into(), plugin_name(args.plugin).into());
    service.insert("listen".into(), format!("127.0.0.1:{port}").into());
    service.insert("max_connections".into(), (2 * max_conns as i64 + 16).into());
    service.insert("options".into(), options.into());
    let mut services = toml::Table::new();
    services.insert("bench".into(), service.into());
    let mut server = toml::Table::new();
    server.insert("workers".into(), (args.workers as i64).into());
    server.insert("shutdown_grace".into(), "2s".into());
    let mut metrics = toml::Table::new();
    metrics.insert("listen".into(), "127.0.0.1:0".into());
    let mut config = toml::Table::new();
    config.insert("server".into(), server.into());
    config.insert("metrics".into(), metrics.into());
    config.insert("services".into(), services.into());
    toml::to_string(&config).map_err(|e| e.to_string())
}

fn plugin_name(p: Protocol) -> &'static str {
    match p {
        Protocol::Echo => "echo",
        Protocol::Http => "http-hello",
        Protocol::Exec => "exec",
        Protocol::Get => "file-get",
    }
}

/// `word` as an absolute program path (searched in PATH when it has no slash).
fn find_program(word: &str) -> Result<PathBuf, String> {
    if word.contains('/') {
        return Ok(PathBuf::from(word));
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(word))
        .find(|p| p.is_file())
        .ok_or_else(|| format!("--command: {word} is not found in PATH"))
}

/// What every server of a swap is started with.
struct Launch<'a> {
    /// The `wharf` program.
    wharf: &'a Path,
    args: &'a SwapArgs,
    /// Where configs and logs go.
    out: &'a Path,
    /// CPUs to pin the server to (none: not pinned).
    cpus: &'a [usize],
    /// The file-get root, for a get swap.
    files: Option<&'a Path>,
}

/// A `wharf serve` started for one backend; stopped (SIGTERM, then SIGKILL) when dropped.
struct Server {
    backend: BackendKind,
    addr: SocketAddr,
    child: Child,
    log: PathBuf,
    config: String,
}

impl Server {
    /// Starts a server on a free port and waits until it listens there. The port is chosen
    /// by the kernel, then released for the server to bind, so another process can take it
    /// in between: wharf then exits with [`exit_status::ADDRESS_IN_USE`] (its exclusive bind
    /// probe), and another port is tried.
    fn start(launch: &Launch<'_>, backend: BackendKind) -> Result<Server, String> {
        let mut attempt = 1;
        loop {
            let mut server = Self::spawn(launch, backend)?;
            match server.wait_listening() {
                Ok(()) => return Ok(server),
                Err(e) if attempt < PORT_ATTEMPTS && server.lost_its_port() => {
                    eprintln!("{e}\ntrying another port");
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Starts `wharf serve` on a port the kernel just handed out and released.
    fn spawn(launch: &Launch<'_>, backend: BackendKind) -> Result<Server, String> {
        let Launch {
            wharf,
            args,
            out,
            cpus,
            files,
        } = *launch;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("cannot pick a port: {e}"))?
            .port();
        let config = service_config(args, port, files)?;
        let config_path = out.join(format!("config-{}.toml", backend.as_str()));
        write(&config_path, config.as_bytes())?;
        let log = out.join(format!("server-{}.log", backend.as_str()));
        let log_file =
            std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        let mut cmd = Command::new(wharf);
        cmd.arg("serve")
            .arg("--config")
            .arg(&config_path)
            .arg("--backend")
            .arg(backend.as_str())
            .env("WHARF_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file);
        if !cpus.is_empty() {
            let cpus = cpus.to_vec();
            // SAFETY: the closure only makes the sched_setaffinity system call (no allocation,
            // no locks), which is allowed between fork and exec.
            unsafe {
                std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                    procstat::pin(0, &cpus);
                    Ok(())
                });
            }
        }
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start wharf serve: {e}"))?;
        Ok(Server {
            backend,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            child,
            log,
            config,
        })
    }

    /// Waits until the server listens on its address. A connect alone is not enough: it
    /// would also succeed if another process had taken the port, so the listening socket
    /// must be the server's own.
    fn wait_listening(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            self.check_alive()?;
            if std::net::TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_ok()
                && procstat::listening_pids(self.addr).contains(&self.child.id())
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "the {} server did not listen on {} within {STARTUP_TIMEOUT:?}{}",
                    self.backend.as_str(),
                    self.addr,
                    self.log_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the server exited because its port was taken before it could bind it: `wharf
    /// serve` says so with its exit status.
    fn lost_its_port(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(status)) if status.code() == Some(exit_status::ADDRESS_IN_USE))
    }

    /// An error (with the end of the server's log) when the server has exited.
    fn check_alive(&mut self) -> Result<(), String> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(format!(
                "the {} server exited ({status}){}",
                self.backend.as_str(),
                self.log_tail()
            )),
            Err(e) => Err(format!(
                "cannot check the {} server: {e}",
                self.backend.as_str()
            )),
        }
    }

    fn log_tail(&self) -> String {
        let mut text = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut text);
        }
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(5)..].join("\n  ");
        if tail.is_empty() {
            String::new()
        } else {
            format!("; its log ({}) ends with:\n  {tail}", self.log.display())
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if !matches!(self.child.try_wait(), Ok(None)) {
            return; // Exited and reaped already: its pid may belong to someone else now.
        }
        // SAFETY: kill(2) on our own child, which has not been reaped (checked just above).
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let mid = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    })
}

fn min(v: &[f64]) -> Option<f64> {
    v.iter().copied().reduce(f64::min)
}

fn max(v: &[f64]) -> Option<f64> {
    v.iter().copied().reduce(f64::max)
}

fn summarize(args: &SwapArgs, runs: &[Run]) -> Vec<Point> {
    let mut points = Vec::new();
    for &connections in &args.connections {
        let mut first_rps = None;
        for &backend in &args.backends {
            let reports: Vec<&Report> = runs
                .iter()
                .filter(|r| r.backend == backend.as_str() && r.report.connections == connections)
                .map(|r| &r.report)
                .collect();
            // Successful answers only: a backend answering errors fast must not look faster.
            let rps: Vec<f64> = reports.iter().map(|r| r.ok_per_sec).collect();
            let med = median(rps.clone()).unwrap_or(0.0);
            let first = *first_rps.get_or_insert(med);
            let p99: Vec<f64> = reports.iter().map(|r| r.latency_us.p99).collect();
            let cpu: Vec<f64> = reports
                .iter()
                .filter_map(|r| r.server.as_ref()?.us_per_request)
                .collect();
            points.push(Point {
                backend: backend.as_str(),
                connections,
                runs: reports.len(),
                median_requests_per_sec: med,
                min_requests_per_sec: min(&rps).unwrap_or(0.0),
                max_requests_per_sec: max(&rps).unwrap_or(0.0),
                median_p99_us: median(p99.clone()).unwrap_or(0.0),
                min_p99_us: min(&p99).unwrap_or(0.0),
                max_p99_us: max(&p99).unwrap_or(0.0),
                median_server_us_per_request: median(cpu.clone()),
                min_server_us_per_request: min(&cpu),
                max_server_us_per_request: max(&cpu),
                median_server_cores: median(
                    reports
                        .iter()
                        .filter_map(|r| Some(r.server.as_ref()?.cores))
                        .collect(),
                ),
                median_client_cores: median(reports.iter().map(|r| r.client_cpu_cores).collect())
                    .unwrap_or(0.0),
                errors: reports.iter().map(|r| r.errors).sum(),
                ratio_to_first: if first > 0.0 { med / first } else { 0.0 },
            });
        }
    }
    points
}

/// The table's spread column: half the range of req/s over the runs, as a share of the median.
/// One run has no spread to show (it is unknown, not zero).
fn spread(p: &Point) -> String {
    if p.runs < 2 {
        format!("n={}", p.runs)
    } else if p.median_requests_per_sec > 0.0 {
        format!(
            "±{:.1}%",
            50.0 * (p.max_requests_per_sec - p.min_requests_per_sec) / p.median_requests_per_sec
        )
    } else {
        "-".into()
    }
}

fn table(
    args: &SwapArgs,
    work: &WorkloadArgs,
    points: &[Point],
    server_cpus: &[usize],
    client_cpus: &[usize],
) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let what = match args.plugin {
        Protocol::Echo => format!(
            "{}-byte messages",
            work.size.unwrap_or(super::DEFAULT_ECHO_SIZE)
        ),
        Protocol::Http => format!("GET {}", work.path.as_deref().unwrap_or("/")),
        Protocol::Exec => format!("`{}`", work.command),
        Protocol::Get => format!(
            "{} byte file",
            grouped(work.size.unwrap_or(DEFAULT_FILE_SIZE) as f64)
        ),
    };
    let pacing = super::report::pacing(work.rate, work.pipeline);
    let pinning = if server_cpus.is_empty() {
        "not pinned".to_string()
    } else {
        format!(
            "server on CPU {}, client on CPU {}",
            join(server_cpus),
            join(client_cpus)
        )
    };
    let _ = writeln!(
        out,
        "\nwharf bench swap {}: {what}, {pacing}, {} worker{}, {} x {} s per point, interleaved; {pinning}\n",
        args.plugin.as_str(),
        args.workers,
        if args.workers == 1 { "" } else { "s" },
        args.repeat,
        args.duration,
    );
    let first = args.backends[0].as_str();
    let _ = writeln!(
        out,
        "{:<9} {:>6} {:>14} {:>8} {:>10} {:>10} {:>8} {:>8} {:>7} {:>9}",
        "backend",
        "conns",
        "req/s median",
        "spread",
        "p99",
        "CPU/req",
        "server",
        "client",
        "errors",
        format!("vs {first}")
    );
    for p in points {
        let spread = spread(p);
        let cores = |c: Option<f64>| c.map_or("-".to_string(), |c| format!("{c:.2}"));
        let _ = writeln!(
            out,
            "{:<9} {:>6} {:>14} {:>8} {:>10} {:>10} {:>8} {:>8} {:>7} {:>8.2}x",
            p.backend,
            p.connections,
            grouped(p.median_requests_per_sec),
            spread,
            micros(p.median_p99_us),
            p.median_server_us_per_request.map_or("-".into(), micros),
            cores(p.median_server_cores),
            cores(Some(p.median_client_cores)),
            p.errors,
            p.ratio_to_first
        );
    }
    let _ = writeln!(
        out,
        "\nreq/s (answers without error) and p99: medians over the runs; spread: half the min-max range \
         (n=1: a single run); CPU/req: server CPU time per request;\nserver, client: CPU cores busy (a client near its {} core(s) may be what \
         limits a point).",
        client_cpus.len().max(1)
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        swap: SwapArgs,
    }

    fn swap_args(args: &[&str]) -> SwapArgs {
        Cli::parse_from(std::iter::once("swap").chain(args.iter().copied())).swap
    }

    fn point(backend: &'static str, runs: usize, rps: &[f64]) -> Point {
        Point {
            backend,
            connections: 64,
            runs,
            median_requests_per_sec: median(rps.to_vec()).unwrap(),
            min_requests_per_sec: min(rps).unwrap(),
            max_requests_per_sec: max(rps).unwrap(),
            median_p99_us: 100.0,
            min_p99_us: 90.0,
            max_p99_us: 110.0,
            median_server_us_per_request: Some(5.0),
            min_server_us_per_request: Some(4.0),
            max_server_us_per_request: Some(6.0),
            median_server_cores: Some(1.0),
            median_client_cores: 1.0,
            errors: 0,
            ratio_to_first: 1.0,
        }
    }

    #[test]
    fn a_single_run_shows_no_spread() {
        let args = swap_args(&["echo", "--repeat", "1"]);
        let table = table(
            &args,
            &args.work,
            &[point("epoll", 1, &[1000.0]), point("io_uring", 1, &[900.0])],
            &[],
            &[],
        );
        let rows: Vec<&str> = table
            .lines()
            .filter(|l| l.starts_with("epoll") || l.starts_with("io_uring"))
            .collect();
        assert_eq!(rows.len(), 2, "{table}");
        for row in rows {
            assert!(!row.contains('±'), "{row}");
            assert!(row.split_whitespace().any(|w| w == "n=1"), "{row}");
        }
        // Several runs: half their range, as a share of the median.
        let row = table_row(&args, point("epoll", 3, &[900.0, 1000.0, 1100.0]));
        assert!(row.contains("±10.0%"), "{row}");
    }

    fn table_row(args: &SwapArgs, p: Point) -> String {
        table(args, &args.work, &[p], &[], &[])
            .lines()
            .find(|l| l.starts_with("epoll"))
            .unwrap()
            .to_string()
    }

    #[test]
    fn the_chart_has_the_three_metrics_with_their_ranges() {
        let summary = [
            point("epoll", 3, &[900.0, 1000.0, 1100.0]),
            point("io_uring", 3, &[800.0, 850.0, 990.0]),
        ];
        let panels = chart_panels(&["epoll", "io_uring"], &summary);
        let metrics: Vec<&str> = panels.iter().map(|p| p.metric.as_str()).collect();
        assert_eq!(
            metrics,
            [
                "requests per second",
                "server CPU per request",
                "p99 latency"
            ]
        );
        let figure = |panel: usize, series: usize| panels[panel].series[series].points[0];
        assert_eq!(
            figure(0, 1),
            chart::Figure {
                connections: 64,
                median: 850.0,
                min: 800.0,
                max: 990.0
            }
        );
        assert_eq!(
            (figure(1, 0).median, figure(1, 0).min, figure(1, 0).max),
            (5.0, 4.0, 6.0)
        );
        assert_eq!(
            (figure(2, 0).median, figure(2, 0).min, figure(2, 0).max),
            (100.0, 90.0, 110.0)
        );
    }

    /// A stand-in for `wharf serve` that records each start in `<dir>/starts` and exits with
    /// `status`.
    fn fake_wharf(dir: &Path, status: i32) -> PathBuf {
        let path = dir.join(format!("fake-wharf-{status}"));
        std::fs::write(
            &path,
            format!("#!/bin/sh\necho start >> \"$(dirname \"$0\")/starts\"\nexit {status}\n"),
        )
        .unwrap();
        let mut perms = std::fs::metadata(&path).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
        std::fs::set_permissions(&path, perms).unwrap();
        path
    }

    /// How many times a server was started before `Server::start` gave up.
    fn starts_until_given_up(status: i32) -> (usize, String) {
        let dir =
            std::env::temp_dir().join(format!("wharf-swap-port-{}-{status}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let wharf = fake_wharf(&dir, status);
        let args = swap_args(&["echo"]);
        let launch = Launch {
            wharf: &wharf,
            args: &args,
            out: &dir,
            cpus: &[],
            files: None,
        };
        let error = match Server::start(&launch, BackendKind::Epoll) {
            Ok(_) => panic!("a server that exits cannot be listening"),
            Err(e) => e,
        };
        let starts = std::fs::read_to_string(dir.join("starts"))
            .unwrap()
            .lines()
            .count();
        let _ = std::fs::remove_dir_all(&dir);
        (starts, error)
    }

    #[test]
    fn a_server_whose_port_was_taken_is_started_again_on_another_port() {
        // `wharf serve` exits with ADDRESS_IN_USE when its port was taken: another port is
        // tried, up to PORT_ATTEMPTS times.
        let (starts, error) = starts_until_given_up(exit_status::ADDRESS_IN_USE);
        assert_eq!(starts, PORT_ATTEMPTS, "{error}");
        assert!(error.contains("exited"), "{error}");
        // Any other failure is reported at once.
        let (starts, error) = starts_until_given_up(exit_status::FAILURE);
        assert_eq!(starts, 1, "{error}");
        assert!(error.contains("exit status: 1"), "{error}");
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(vec![]), None);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
    }
}
