//! Starting and talking to a real `wharf serve` process.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

pub const WHARF: &str = env!("CARGO_BIN_EXE_wharf");

/// The backends every end-to-end test runs on. io_uring is skipped (with a printed reason)
/// when this machine refuses rings, unless CI=true, where that is a failure.
pub fn backends() -> Vec<&'static str> {
    static IO_URING: OnceLock<Result<(), String>> = OnceLock::new();
    let mut list = vec!["epoll"];
    match IO_URING.get_or_init(io_uring_available) {
        Ok(()) => list.push("io_uring"),
        Err(why) => skip_or_fail(&format!("io_uring backend: {why}")),
    }
    list
}

/// A test that cannot run here: a failure under CI=true, a printed skip otherwise.
pub fn skip_or_fail(why: &str) {
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("CI=true and a required tool is unavailable: {why}");
    }
    eprintln!("SKIP {why}");
}

fn io_uring_available() -> Result<(), String> {
    Server::start_with(&echo_config(""), &["--backend", "io_uring"], &[]).map(drop)
}

/// Whether `tool` runs (`tool version_arg`); if not, the test skips (or fails under CI).
pub fn have_tool(tool: &str, version_arg: &str) -> bool {
    let ok = Command::new(tool).arg(version_arg).output().is_ok();
    if !ok {
        skip_or_fail(&format!(
            "{tool} not found (its Debian package: see .ci/run)"
        ));
    }
    ok
}

/// Sends `data` in uneven chunks while a second thread reads the echo; returns what came back.
pub fn echo_roundtrip(addr: std::net::SocketAddr, data: &[u8], seed: u64) -> Vec<u8> {
    let mut stream = connect(addr);
    let mut reader = stream.try_clone().unwrap();
    let expected = data.len();
    let read = std::thread::spawn(move || {
        let mut out = Vec::with_capacity(expected);
        reader.read_to_end(&mut out).unwrap();
        out
    });
    let mut rest = data;
    let mut step = seed as usize;
    while !rest.is_empty() {
        step = (step * 7 + 13) % 9000 + 1;
        let n = step.min(rest.len());
        stream.write_all(&rest[..n]).unwrap();
        rest = &rest[n..];
    }
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    read.join().unwrap()
}

/// `wharf client <args>`, run in `cwd` (where `get` saves files): (exit code, stdout, stderr).
pub fn wharf_client(cwd: &std::path::Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(WHARF)
        .arg("client")
        .args(args)
        .current_dir(cwd)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs a Python client script (`python3 -c script HOST PORT args...`) against `addr`;
/// returns its stdout, failing the test with its stderr if it fails. `None` when python3 is
/// missing: the caller skips its Python check (and under CI=true the test has already failed,
/// see [`have_tool`]).
pub fn python_client(script: &str, addr: SocketAddr, args: &[&str]) -> Option<String> {
    if !have_tool("python3", "--version") {
        return None;
    }
    let out = Command::new("python3")
        .args([
            "-c",
            script,
            &addr.ip().to_string(),
            &addr.port().to_string(),
        ])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(String::from_utf8(out.stdout).unwrap())
}

/// Runs `cmd` with `input` on its stdin and returns its output.
pub fn run_with_stdin(cmd: &mut Command, input: &[u8]) -> std::process::Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().unwrap()
}

/// Deterministic pseudo-random bytes (a small xorshift; no extra crate).
pub fn payload(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A minimal config: one echo service named `echo` plus metrics, on free ports.
pub fn echo_config(extra_service_keys: &str) -> String {
    format!(
        "[server]\nworkers = 2\nshutdown_grace = \"5s\"\n\
         [metrics]\nlisten = \"127.0.0.1:0\"\n\
         [services.echo]\nplugin = \"echo\"\nlisten = \"127.0.0.1:0\"\n{extra_service_keys}\n\
         [services.echo.options]\ntransform = \"upper\"\n"
    )
}

/// One service per built-in plugin on free ports, one worker, a 20 s drain: `echo` (upper),
/// `web`, `exec` (configured by the `exec_tables` TOML lines) and `files` serving `root`.
pub fn all_plugins_config(root: &std::path::Path, exec_tables: &str) -> String {
    format!(
        "[server]\nworkers = 1\nshutdown_grace = \"20s\"\n\
         [services.echo]\nplugin = \"echo\"\nlisten = \"127.0.0.1:0\"\n\
         [services.echo.options]\ntransform = \"upper\"\n\
         [services.web]\nplugin = \"http-hello\"\nlisten = \"127.0.0.1:0\"\n\
         [services.files]\nplugin = \"file-get\"\nlisten = \"127.0.0.1:0\"\n\
         [services.files.options]\nroot = \"{}\"\n\
         [services.exec]\nplugin = \"exec\"\nlisten = \"127.0.0.1:0\"\n{exec_tables}",
        root.display()
    )
}

/// A scratch directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "wharf-e2e-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn write(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, contents).unwrap();
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Waits (briefly) for the log reader to reach the end of an exited wharf's stderr: the
/// process can exit before the reader has taken its last lines from the pipe.
fn wait_for_log_end(complete: &AtomicBool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !complete.load(Ordering::Acquire) {
        if Instant::now() > deadline {
            // Something else holds wharf's stderr open (a child it spawned?): say so, as the
            // log may then lack its last lines.
            eprintln!("wharf exited but its stderr did not reach its end within 30 s");
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A running `wharf serve`, killed on drop.
pub struct Server {
    child: Child,
    pub services: HashMap<String, SocketAddr>,
    pub metrics: Option<SocketAddr>,
    pub backend: String,
    log: Arc<Mutex<Vec<String>>>,
    /// Set by the log reader at the end of wharf's stderr: after that the log is complete.
    log_complete: Arc<AtomicBool>,
    config: PathBuf,
    _dir: TempDir,
}

/// Services (by name, the latest `listening` line wins), the metrics address and the backend,
/// from a server's log.
fn parse_startup(lines: &[String]) -> (HashMap<String, SocketAddr>, Option<SocketAddr>, String) {
    let mut services = HashMap::new();
    let mut metrics = None;
    let mut backend = String::new();
    for line in lines {
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{name}=")))
                .map(|v| v.trim_matches('"').to_string())
        };
        if line.contains("listening service=") {
            if let (Some(name), Some(addr)) = (field("service"), field("listen")) {
                // A UDP service's address is its IP address and port too; Unix-domain
                // services have none: tests know their paths.
                if let Ok(addr) = addr.trim_start_matches("udp:").parse() {
                    services.insert(name, addr);
                }
                backend = field("backend").unwrap_or_default();
            }
        }
        if line.contains("metrics endpoint listening") {
            metrics = field("listen").map(|a| a.parse().unwrap());
        }
    }
    (services, metrics, backend)
}

impl Server {
    /// Starts `wharf serve --config <config> --backend <backend>` and waits until it is ready.
    pub fn start(config: &str, backend: &str) -> Server {
        Self::start_with(config, &["--backend", backend], &[]).unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn start_with(config: &str, args: &[&str], env: &[(&str, &str)]) -> Result<Server, String> {
        Self::start_custom(config, args, env, |_| {})
    }

    /// Like [`Server::start_with`], with a last chance to adjust the command (limits...).
    pub fn start_custom(
        config: &str,
        args: &[&str],
        env: &[(&str, &str)],
        adjust: impl FnOnce(&mut Command),
    ) -> Result<Server, String> {
        Self::start_wrapped(config, &[], args, env, adjust)
    }

    /// Like [`Server::start_custom`], with `wharf serve ...` run by a wrapper command
    /// (`wrapper[0]` with `wrapper[1..]`, then wharf and its arguments), such as
    /// `systemd-socket-activate`.
    pub fn start_wrapped(
        config: &str,
        wrapper: &[&str],
        args: &[&str],
        env: &[(&str, &str)],
        adjust: impl FnOnce(&mut Command),
    ) -> Result<Server, String> {
        let dir = TempDir::new();
        let path = dir.write("wharf.toml", config);
        let mut cmd = match wrapper.split_first() {
            Some((program, before)) => {
                let mut cmd = Command::new(program);
                cmd.args(before).arg(WHARF);
                cmd
            }
            None => Command::new(WHARF),
        };
        cmd.arg("serve").arg("--config").arg(&path).args(args);
        // Config overrides come from the test, never from the environment the tests run in
        // (WHARF_SOAK_SECS, a developer's WHARF_* settings).
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("WHARF_") {
                cmd.env_remove(key);
            }
        }
        cmd.env("WHARF_LOG", "info");
        for (k, v) in env {
            cmd.env(k, v);
        }
        adjust(&mut cmd);
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("spawning {WHARF}: {e}"))?;
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let log_complete = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel();
        {
            let log = Arc::clone(&log);
            let log_complete = Arc::clone(&log_complete);
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    let ready = line.contains("wharf ready");
                    // Logged before it is announced, so the log read at "ready" holds it.
                    log.lock().unwrap().push(line);
                    if ready {
                        let _ = ready_tx.send(());
                    }
                }
                log_complete.store(true, Ordering::Release);
            });
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if ready_rx.recv_timeout(Duration::from_millis(20)).is_ok() {
                break;
            }
            if let Some(status) = child.try_wait().unwrap() {
                wait_for_log_end(&log_complete);
                return Err(format!(
                    "wharf exited early ({status}):\n{}",
                    log.lock().unwrap().join("\n")
                ));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return Err(format!(
                    "wharf not ready in time:\n{}",
                    log.lock().unwrap().join("\n")
                ));
            }
        }
        let (services, metrics, backend) = parse_startup(&log.lock().unwrap());
        Ok(Server {
            child,
            services,
            metrics,
            backend,
            log,
            log_complete,
            config: path,
            _dir: dir,
        })
    }

    /// The config file the server was started with (tests rewrite it to reload).
    pub fn config_path(&self) -> &std::path::Path {
        &self.config
    }

    /// Replaces the config file the way an operator's tooling should: a new file renamed
    /// over the old one, so a reader never sees half of it.
    pub fn rewrite_config(&self, text: &str) {
        let tmp = self.config.with_extension("toml.new");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &self.config).unwrap();
    }

    /// Lines of the log containing `needle`.
    pub fn log_count(&self, needle: &str) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// Waits until `needle` has appeared in `count` lines of the log.
    pub fn wait_log(&self, needle: &str, count: usize, limit: Duration) {
        let deadline = Instant::now() + limit;
        while self.log_count(needle) < count {
            if Instant::now() > deadline {
                panic!("`{needle}` not logged {count} time(s):\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends SIGHUP and waits for the outcome line: `configuration reloaded`, `reload
    /// rejected` or `reload failed`. Returns that line.
    pub fn reload(&mut self) -> String {
        const OUTCOMES: [&str; 3] = ["configuration reloaded", "reload rejected", "reload failed"];
        let seen = |s: &Server| OUTCOMES.iter().map(|o| s.log_count(o)).sum::<usize>();
        let before = seen(self);
        self.signal(libc::SIGHUP);
        let deadline = Instant::now() + Duration::from_secs(10);
        while seen(self) == before {
            if Instant::now() > deadline {
                panic!("no reload outcome logged:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.refresh_services();
        // The outcome of this reload: the first one after those already seen.
        let log = self.log.lock().unwrap();
        log.iter()
            .filter(|l| OUTCOMES.iter().any(|o| l.contains(o)))
            .nth(before)
            .cloned()
            .unwrap()
    }

    /// [`Server::reload`], asserting that the outcome line contains `want`.
    pub fn expect_reload(&mut self, want: &str) -> String {
        let outcome = self.reload();
        assert!(outcome.contains(want), "want `{want}`, got: {outcome}");
        outcome
    }

    /// Re-reads the services' addresses from the log (a reload may have added some).
    pub fn refresh_services(&mut self) {
        let (services, _, _) = parse_startup(&self.log.lock().unwrap());
        self.services = services;
    }

    pub fn addr(&self, service: &str) -> SocketAddr {
        self.services[service]
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(unsafe { libc::kill(self.pid(), sig) }, 0);
    }

    /// Waits for the process to exit, at most `limit`; once it has, the log is complete.
    pub fn wait(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                wait_for_log_end(&self.log_complete);
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// The raw `/metrics` text.
    pub fn scrape(&self) -> String {
        let addr = self.metrics.expect("metrics are configured");
        let (status, body) = http_get(addr, "/metrics");
        assert_eq!(status, 200, "{body}");
        body
    }

    /// The value of one series (`name{labels}` must match exactly the labels given, in any
    /// order), or `None` if absent.
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        metric_value(&self.scrape(), name, labels)
    }

    /// Polls `metric` until it equals `want` (servers settle counters after the client sees
    /// the close), failing with the last value after a few seconds.
    pub fn wait_metric(&self, name: &str, labels: &[(&str, &str)], want: f64) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let got = self.metric(name, labels);
            if got == Some(want) {
                return;
            }
            if Instant::now() > deadline {
                panic!("{name}{labels:?} = {got:?}, want {want}\n{}", self.scrape());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        wait_for_log_end(&self.log_complete);
        let log = self.log();
        if log.contains("panicked") {
            // A panic anywhere in the server is a bug even if the test passed.
            eprintln!("{log}");
            if !std::thread::panicking() {
                panic!("the server panicked");
            }
        }
    }
}

/// Parses one sample from Prometheus text.
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let (label_part, value) = match rest.strip_prefix('{') {
            Some(r) => match r.split_once("} ") {
                Some((l, v)) => (l, v),
                None => continue,
            },
            None => match rest.strip_prefix(' ') {
                Some(v) => ("", v),
                None => continue,
            },
        };
        let mut found: Vec<(String, String)> = label_part
            .split("\",")
            .filter(|s| !s.is_empty())
            .filter_map(|kv| kv.split_once("=\""))
            .map(|(k, v)| (k.to_string(), v.trim_end_matches('"').to_string()))
            .collect();
        let mut want: Vec<(String, String)> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        found.sort();
        want.sort();
        if found == want {
            return value.trim().parse().ok();
        }
    }
    None
}

/// A one-shot HTTP/1.1 GET with std sockets.
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).unwrap();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// Sends `msg` on an open connection and reads as many bytes back (one echo exchange).
pub fn echo_once(s: &mut TcpStream, msg: &[u8]) -> Vec<u8> {
    s.write_all(msg).unwrap();
    let mut back = vec![0; msg.len()];
    s.read_exact(&mut back).unwrap();
    back
}

/// A loopback address nothing listens on now, for a config that needs a fixed port.
///
/// The port comes from below the kernel's ephemeral range: a port the kernel handed out (bind
/// to port 0) could be taken again, before wharf binds it, as the local port of one of the
/// thousands of client connections other tests make. Each call in this process gets another
/// port.
pub fn free_addr() -> SocketAddr {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    const FIRST: usize = 10_000;
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<usize>().ok())
        .unwrap_or(32_768);
    if ephemeral_low > FIRST + 1_000 {
        let span = ephemeral_low - FIRST;
        let start = std::process::id() as usize * 7_919;
        for _ in 0..span {
            let port = FIRST + (start + NEXT.fetch_add(1, Ordering::Relaxed)) % span;
            if let Ok(l) = TcpListener::bind(("127.0.0.1", port as u16)) {
                return l.local_addr().unwrap();
            }
        }
    }
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
}

/// The fewest descriptors `pid` has open over half a second: a baseline that a socket still
/// closing (its close not yet run by a busy worker) does not inflate.
pub fn settled_open_fds(pid: i32) -> usize {
    (0..10)
        .map(|_| {
            std::thread::sleep(Duration::from_millis(50));
            open_fds(pid)
        })
        .min()
        .unwrap()
}

/// How many file descriptors process `pid` has open.
pub fn open_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// Connects with a read timeout so a broken server fails the test instead of hanging it.
pub fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// Polls until connecting to `addr` is refused (the listener is closed).
pub fn refused_within(addr: SocketAddr, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        match TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return true,
            _ => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    false
}

/// Whether the peer closed (EOF or reset) within `limit`.
pub fn closed_within(s: &mut TcpStream, limit: Duration) -> bool {
    s.set_read_timeout(Some(limit)).unwrap();
    let mut buf = [0u8; 64];
    match s.read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => matches!(
            e.kind(),
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::ConnectionAborted
        ),
    }
}

/// The hex MD5 of `data`, as file-get sends it.
pub fn md5_hex(data: &[u8]) -> String {
    use md5::Digest;
    format!("{:x}", md5::Md5::digest(data))
}

/// The tutorial's download, reading at most `rate` bytes per 10 ms when given; returns the
/// announced size and the digest slot (None if the connection ended before it). Callers
/// compare the slot with the MD5 of the file as it was.
pub fn download(addr: SocketAddr, path: &str, rate: Option<usize>) -> (u64, Option<String>) {
    download_with(addr, path, rate, || {})
}

/// [`download`], calling `started` once the first bytes of the file have arrived.
pub fn download_with(
    addr: SocketAddr,
    path: &str,
    rate: Option<usize>,
    started: impl FnOnce(),
) -> (u64, Option<String>) {
    let mut s = connect(addr);
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(format!("get {path}\n").as_bytes()).unwrap();
    let mut size = [0u8; 32];
    let n = s.read(&mut size).unwrap();
    let size: u64 = std::str::from_utf8(&size[..n]).unwrap().parse().unwrap();
    s.write_all(b"ok").unwrap();
    let mut started = Some(started);
    let mut left = size;
    let mut buf = vec![0u8; rate.unwrap_or(1 << 20)];
    while left > 0 {
        let want = buf.len().min(left as usize);
        match s.read(&mut buf[..want]) {
            Ok(0) | Err(_) => return (size, None),
            Ok(n) => left -= n as u64,
        }
        // The transfer is running: the first bytes of the file are in.
        if let Some(started) = started.take() {
            started();
        }
        if rate.is_some() {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let mut slot = Vec::new();
    while slot.len() < 32 {
        let mut b = [0u8; 32];
        match s.read(&mut b[..32 - slot.len()]) {
            Ok(0) | Err(_) => break,
            Ok(n) => slot.extend_from_slice(&b[..n]),
        }
        if slot.starts_with(b"ERR file changed") {
            break;
        }
    }
    (size, Some(String::from_utf8_lossy(&slot).to_string()))
}
