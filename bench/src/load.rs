//! The load engine: connections spread over client threads, each thread a current-thread tokio
//! runtime, each connection a task that sends a request (or `--pipeline` requests back to
//! back) and reads the answers through the protocol's [`Exchange`](super::protocol::Exchange).
//!
//! Closed loop by default: a connection sends its next request when the previous answer is in.
//! With a target rate it is open loop, the way wrk2 does it: every request has an *intended*
//! send time on a fixed schedule, and its latency is measured from that time, not from when the
//! connection got round to sending it. A server that stalls for a second therefore shows a
//! second of latency on every request that was due meanwhile, instead of hiding it
//! (coordinated omission).
//!
//! With `--tls` each connection is TLS (tokio-rustls, [`crate::tls`]); the exchanges are the
//! same code, generic over the stream's halves, so plain TCP pays nothing for it. With
//! `--new-conn` a connection carries one request (or one `--pipeline` batch) and is closed;
//! the latency then includes connecting (and the TLS handshake), and the connections opened
//! per second are the handshake rate. With `--send-proxy v1|v2` each connection starts with a
//! PROXY protocol header naming its own addresses, as HAProxy's `send-proxy` does, so a
//! service with `proxy_protocol` on can be loaded directly (and its cost measured).
//!
//! Only what completes inside the measurement window counts; the warm-up before it lets
//! connections open and caches fill. At the end of the window the tasks are dropped mid-flight,
//! and requests still waiting for an answer are reported as "in flight", so a stuck server is
//! visible rather than silently absent.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::target::{Stream, Target};

use super::pacer::Pacer;
use super::procstat::{self, CpuClock};
use super::protocol::{Step, Workload, ACK};
use super::tls::ClientTls;

/// How long a request must have waited at the end of the run to count as stalled.
pub const STALLED_AFTER: Duration = Duration::from_secs(1);
/// Distinct error descriptions kept; more are counted under [`OTHER_ERRORS`].
const MAX_ERROR_KINDS: usize = 32;
const OTHER_ERRORS: &str = "other errors";
/// Read buffer per connection.
const READ_BUFFER: usize = 64 * 1024;
/// Pause before reconnecting after a failure, doubled per consecutive failure up to the max.
const RECONNECT_BACKOFF: Duration = Duration::from_millis(10);
const RECONNECT_BACKOFF_MAX: Duration = Duration::from_millis(200);
/// A connection attempt without an answer for this long counts as failed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// One load run.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    pub addr: Target,
    pub workload: Arc<Workload>,
    pub connections: usize,
    /// Client threads (each with its own runtime); connections are spread evenly.
    pub threads: usize,
    /// CPUs the client threads are pinned to, round robin (empty: not pinned).
    pub client_cpus: Vec<usize>,
    pub warmup: Duration,
    pub duration: Duration,
    /// Requests sent back to back per connection before reading the answers.
    pub pipeline: usize,
    /// Open loop at this many requests per second in total; `None` = closed loop.
    pub rate: Option<f64>,
    /// Processes whose CPU time is measured over the window (the local server).
    pub server_pids: Vec<u32>,
    /// Speak TLS (`--tls`).
    pub tls: Option<ClientTls>,
    /// One request (batch) per connection (`--new-conn`): closed loop only.
    pub new_conn: bool,
    /// Start every connection with this PROXY protocol header (`--send-proxy`).
    pub send_proxy: Option<SendProxy>,
}

/// `--send-proxy`: which PROXY protocol header a connection starts with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SendProxy {
    /// The text header, `PROXY TCP4 <client> <server> <ports>\r\n` (HAProxy `send-proxy`).
    V1,
    /// The binary header (HAProxy `send-proxy-v2`).
    V2,
}

impl SendProxy {
    /// The header a proxy would send for a client at `client` that connected to `server`
    /// (written with `ppp`, the crate the server parses with; the server's tests check it
    /// against HAProxy's own headers).
    pub fn header(self, client: SocketAddr, server: SocketAddr) -> std::io::Result<Vec<u8>> {
        match self {
            SendProxy::V1 => Ok(ppp::v1::Addresses::from((client, server))
                .to_string()
                .into_bytes()),
            SendProxy::V2 => ppp::v2::Builder::with_addresses(
                ppp::v2::Version::Two | ppp::v2::Command::Proxy,
                ppp::v2::Protocol::Stream,
                (client, server),
            )
            .build(),
        }
    }
}

impl LoadSpec {
    /// Client threads actually started: at least one, and never more than connections.
    pub fn client_threads(&self) -> usize {
        self.threads.clamp(1, self.connections.max(1))
    }
}

/// What one run measured.
pub struct LoadResult {
    /// Requests answered inside the window (errors included).
    pub requests: u64,
    /// Connections opened inside the window (with `--tls`: TLS handshakes completed).
    pub connections_opened: u64,
    /// Of those, the ones answered with an error (`http 404`, `ERR ...`, a refusal).
    pub failed: u64,
    /// Latency of every answered request, in nanoseconds.
    pub latency_ns: Histogram<u64>,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Error description -> count, inside the window.
    pub errors: BTreeMap<String, u64>,
    /// Requests still unanswered at the end of the window, sent more than [`STALLED_AFTER`]
    /// before it (a closed loop always ends with one request per connection in flight; only
    /// old ones say the server stalled).
    pub stalled: u64,
    /// Length of the measurement window.
    pub elapsed: Duration,
    /// The server's CPU time over the window, when its processes are known.
    pub server_cpu: Option<Duration>,
    /// This process's CPU time over the window (is the client the bottleneck?).
    pub client_cpu: Duration,
}

impl LoadResult {
    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    fn empty() -> LoadResult {
        LoadResult {
            requests: 0,
            connections_opened: 0,
            failed: 0,
            latency_ns: new_histogram(),
            bytes_in: 0,
            bytes_out: 0,
            errors: BTreeMap::new(),
            stalled: 0,
            elapsed: Duration::ZERO,
            server_cpu: None,
            client_cpu: Duration::ZERO,
        }
    }

    fn merge(&mut self, other: LoadResult) {
        self.requests += other.requests;
        self.connections_opened += other.connections_opened;
        self.failed += other.failed;
        // Both histograms auto-resize, so adding cannot fail.
        let _ = self.latency_ns.add(&other.latency_ns);
        self.bytes_in += other.bytes_in;
        self.bytes_out += other.bytes_out;
        self.stalled += other.stalled;
        for (kind, n) in other.errors {
            add_error(&mut self.errors, kind, n);
        }
    }
}

fn new_histogram() -> Histogram<u64> {
    // 3 significant digits, auto-resizing: any latency fits.
    Histogram::new(3).expect("3 significant digits is a valid histogram precision")
}

fn add_error(errors: &mut BTreeMap<String, u64>, kind: String, n: u64) {
    if errors.len() >= MAX_ERROR_KINDS && !errors.contains_key(&kind) {
        *errors.entry(OTHER_ERRORS.to_string()).or_default() += n;
    } else {
        *errors.entry(kind).or_default() += n;
    }
}

/// The measurement window, shared by every thread.
#[derive(Clone, Copy)]
struct Window {
    begin: Instant,
    from: Instant,
    to: Instant,
}

impl Window {
    fn contains(&self, t: Instant) -> bool {
        t >= self.from && t < self.to
    }
}

/// Runs the load and returns what was measured. Never panics on anything the server does.
pub fn run(spec: &LoadSpec) -> LoadResult {
    let begin = Instant::now();
    let window = Window {
        begin,
        from: begin + spec.warmup,
        to: begin + spec.warmup + spec.duration,
    };
    let threads = spec.client_threads();
    let mut result = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                // Connections t, t + threads, t + 2 * threads... run on thread t.
                let ids: Vec<usize> = (t..spec.connections).step_by(threads).collect();
                let cpu = (!spec.client_cpus.is_empty())
                    .then(|| spec.client_cpus[t % spec.client_cpus.len()]);
                scope.spawn(move || client_thread(spec, window, ids, cpu))
            })
            .collect();
        let clock = CpuClock::new(&spec.server_pids);
        sleep_until(window.from);
        let (server0, client0) = (clock.server(), procstat::own_cpu());
        sleep_until(window.to);
        let (server1, client1) = (clock.server(), procstat::own_cpu());
        let mut total = LoadResult::empty();
        for h in handles {
            match h.join() {
                Ok(r) => total.merge(r),
                Err(_) => add_error(&mut total.errors, "client thread panicked".into(), 1),
            }
        }
        total.server_cpu = server0.zip(server1).map(|(a, b)| b.saturating_sub(a));
        total.client_cpu = client1.saturating_sub(client0);
        total
    });
    result.elapsed = spec.duration;
    result
}

fn sleep_until(t: Instant) {
    let now = Instant::now();
    if t > now {
        std::thread::sleep(t - now);
    }
}

/// Per-thread tallies, shared by the thread's connection tasks.
struct Tally {
    result: LoadResult,
    window: Window,
    /// Per connection of the thread: when its oldest unanswered request was sent (open loop:
    /// was due), and how many are unanswered.
    waiting: Vec<Option<(Instant, u64)>>,
    /// Open loop, per connection: when its next batch, not sent yet, is due.
    next_due: Vec<Option<Instant>>,
}

impl Tally {
    fn error(&mut self, kind: String) {
        if self.window.contains(Instant::now()) {
            add_error(&mut self.result.errors, kind, 1);
        }
    }
}

fn client_thread(
    spec: &LoadSpec,
    window: Window,
    ids: Vec<usize>,
    cpu: Option<usize>,
) -> LoadResult {
    if let Some(cpu) = cpu {
        procstat::pin_current_thread(cpu);
    }
    let tally = Rc::new(RefCell::new(Tally {
        result: LoadResult::empty(),
        window,
        waiting: vec![None; ids.len()],
        next_due: vec![None; ids.len()],
    }));
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let mut r = LoadResult::empty();
            add_error(&mut r.errors, format!("client runtime: {e}"), 1);
            return r;
        }
    };
    let spec = Rc::new(spec.clone());
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async {
        let pacer = match spec.rate {
            None => None,
            Some(_) => match Pacer::new(ids.len()) {
                Ok(p) => {
                    let driver = p.clone();
                    tokio::task::spawn_local(async move { driver.run().await });
                    Some(p)
                }
                Err(e) => {
                    let r = &mut tally.borrow_mut().result;
                    add_error(&mut r.errors, format!("client timer: {e}"), 1);
                    return;
                }
            },
        };
        for (slot, id) in ids.into_iter().enumerate() {
            let conn = Connection {
                slot,
                schedule: spec
                    .rate
                    .zip(pacer.clone())
                    .map(|(rate, pacer)| Schedule::new(rate, &spec, id, window, pacer)),
                spec: spec.clone(),
                window,
                tally: tally.clone(),
                progress: false,
            };
            tokio::task::spawn_local(conn.run());
        }
        tokio::time::sleep_until(window.to.into()).await;
    });
    // Dropping the tasks mid-flight is the end of the run.
    drop(local);
    let mut tally = tally.borrow_mut();
    tally.result.stalled = stalled(&tally, &spec, window.to);
    std::mem::replace(&mut tally.result, LoadResult::empty())
}

/// Requests that were due over [`STALLED_AFTER`] before `end` and are not answered: sent and
/// waiting for an answer, or (open loop) not even sent because the connection was stuck. The
/// latter is what coordinated omission would otherwise hide at the end of a run.
fn stalled(tally: &Tally, spec: &LoadSpec, end: Instant) -> u64 {
    let Some(cutoff) = end.checked_sub(STALLED_AFTER) else {
        return 0;
    };
    let waiting: u64 = tally
        .waiting
        .iter()
        .flatten()
        .filter(|(since, _)| *since < cutoff)
        .map(|(_, n)| n)
        .sum();
    let pipeline = spec.pipeline.max(1) as u64;
    let unsent: u64 = match spec.rate {
        None => 0,
        Some(rate) => {
            let batch_interval = spec.connections as f64 / rate * pipeline as f64;
            tally
                .next_due
                .iter()
                .flatten()
                .filter(|due| **due < cutoff)
                .map(|due| {
                    let batches = (cutoff - *due).as_secs_f64() / batch_interval;
                    (batches.floor() as u64 + 1) * pipeline
                })
                .sum()
        }
    };
    waiting + unsent
}

/// Open-loop send times of one connection.
struct Schedule {
    next: Instant,
    interval: Duration,
    /// Wakes the connection at its send times (microsecond precision).
    pacer: Rc<Pacer>,
}

impl Schedule {
    fn new(rate: f64, spec: &LoadSpec, id: usize, window: Window, pacer: Rc<Pacer>) -> Schedule {
        // Each connection sends `rate / connections` requests per second, `pipeline` at a
        // time; connections are staggered across one batch interval so the total rate is
        // smooth.
        let interval = Duration::from_secs_f64(spec.connections as f64 / rate.max(1e-9));
        let batch_interval = interval.mul_f64(spec.pipeline.max(1) as f64);
        let offset = batch_interval.mul_f64(id as f64 / spec.connections as f64);
        Schedule {
            next: window.begin + offset,
            interval,
            pacer,
        }
    }
}

/// Why a connection has to be dropped.
enum ConnError {
    /// Reconnect (after a pause): reset, closed, refused, protocol violation...
    Retry(String),
    /// The server ended the connection properly (`Connection: close`): reconnect at once.
    Closed,
}

/// Received bytes not consumed yet: `buf[start..end]`.
struct Received {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

struct Connection {
    /// This connection's index in the thread's [`Tally::waiting`].
    slot: usize,
    spec: Rc<LoadSpec>,
    window: Window,
    tally: Rc<RefCell<Tally>>,
    schedule: Option<Schedule>,
    /// An answer came in since the last failure (resets the reconnect backoff).
    progress: bool,
}

impl Connection {
    async fn run(mut self) {
        let mut backoff = RECONNECT_BACKOFF;
        let batch: Vec<u8> = self
            .spec
            .workload
            .request()
            .repeat(self.spec.pipeline.max(1));
        let mut received = Received {
            buf: vec![0u8; READ_BUFFER],
            start: 0,
            end: 0,
        };
        let spec = self.spec.clone();
        let connector = spec
            .tls
            .as_ref()
            .map(|tls| tokio_rustls::TlsConnector::from(tls.config.clone()));
        loop {
            let opened_at = Instant::now();
            let connect = tokio::time::timeout(CONNECT_TIMEOUT, self.spec.addr.connect());
            let failure = match connect.await {
                Ok(Ok(stream)) => {
                    (received.start, received.end) = (0, 0);
                    let ended = match stream {
                        Stream::Tcp(stream) => {
                            let tls = connector.as_ref().zip(spec.tls.as_ref());
                            self.over_tcp(stream, tls, opened_at, &batch, &mut received)
                                .await
                        }
                        Stream::Unix(mut stream) => {
                            self.opened();
                            let (rd, wr) = stream.split();
                            self.exchanges(rd, wr, opened_at, &batch, &mut received)
                                .await
                        }
                    };
                    self.tally.borrow_mut().waiting[self.slot] = None;
                    match ended {
                        ConnError::Closed => None,
                        ConnError::Retry(why) => Some(why),
                    }
                }
                Ok(Err(e)) => Some(format!("connect: {e}")),
                Err(_) => Some(format!("connect: no answer within {CONNECT_TIMEOUT:?}")),
            };
            if std::mem::take(&mut self.progress) {
                backoff = RECONNECT_BACKOFF;
            }
            if let Some(why) = failure {
                self.tally.borrow_mut().error(why);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(RECONNECT_BACKOFF_MAX);
            }
        }
    }

    /// One TCP connection: the PROXY header and the TLS handshake when asked for, then the
    /// exchanges.
    async fn over_tcp(
        &mut self,
        mut stream: TcpStream,
        tls: Option<(&tokio_rustls::TlsConnector, &crate::tls::ClientTls)>,
        opened_at: Instant,
        batch: &[u8],
        received: &mut Received,
    ) -> ConnError {
        if let Err(e) = self.send_proxy_header(&mut stream).await {
            return e;
        }
        let Some((connector, tls)) = tls else {
            self.opened();
            let (rd, wr) = stream.split();
            return self.exchanges(rd, wr, opened_at, batch, received).await;
        };
        let handshake = connector.connect(tls.server_name.clone(), stream);
        match tokio::time::timeout(CONNECT_TIMEOUT, handshake).await {
            Ok(Ok(stream)) => {
                self.opened();
                let (rd, wr) = tokio::io::split(stream);
                self.exchanges(rd, wr, opened_at, batch, received).await
            }
            Ok(Err(e)) => ConnError::Retry(
                tls.explain(&e, true, &[])
                    .unwrap_or_else(|| io_error("TLS handshake", &e)),
            ),
            Err(_) => ConnError::Retry(format!(
                "TLS handshake: no answer within {CONNECT_TIMEOUT:?}"
            )),
        }
    }

    /// With `--send-proxy`, sends the PROXY header naming this connection's own addresses
    /// (before TLS, as a proxy does).
    async fn send_proxy_header(&self, stream: &mut TcpStream) -> Result<(), ConnError> {
        let Some(version) = self.spec.send_proxy else {
            return Ok(());
        };
        let header = stream
            .local_addr()
            .and_then(|client| version.header(client, stream.peer_addr()?))
            .map_err(|e| ConnError::Retry(io_error("PROXY header", &e)))?;
        stream
            .write_all(&header)
            .await
            .map_err(|e| ConnError::Retry(io_error("send", &e)))?;
        self.count_bytes(0, header.len());
        Ok(())
    }

    /// Counts a connection ready for requests (TCP connected, TLS handshake done).
    fn opened(&self) {
        let mut tally = self.tally.borrow_mut();
        if tally.window.contains(Instant::now()) {
            tally.result.connections_opened += 1;
        }
    }

    /// Request after request on one connection (opened at `opened_at`), until it fails or,
    /// with `--new-conn`, after the first batch.
    async fn exchanges<R, W>(
        &mut self,
        mut rd: R,
        mut wr: W,
        opened_at: Instant,
        batch: &[u8],
        received: &mut Received,
    ) -> ConnError
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let pipeline = self.spec.pipeline.max(1) as u64;
        let pipelines = self.spec.workload.protocol.pipelines();
        loop {
            let sent_at = match &mut self.schedule {
                // A connection per request: its latency includes connecting.
                None if self.spec.new_conn => opened_at,
                None => Instant::now(),
                Some(s) => {
                    let due = s.next;
                    s.next += s.interval.mul_f64(pipeline as f64);
                    self.tally.borrow_mut().next_due[self.slot] = Some(s.next);
                    s.pacer.sleep_until(self.slot, due).await;
                    due
                }
            };
            self.tally.borrow_mut().waiting[self.slot] = Some((sent_at, pipeline));
            let answered = if pipelines {
                // Read while writing: a batch larger than the socket buffers would otherwise
                // deadlock with a server that stops reading until its answers are read (echo
                // does, by design).
                let send = async {
                    wr.write_all(batch)
                        .await
                        .map_err(|e| ConnError::Retry(io_error("send", &e)))
                };
                let no_acks: Option<&mut W> = None;
                let answers = self.answers(&mut rd, no_acks, received, pipeline, sent_at);
                tokio::try_join!(send, answers).map(|_| ())
            } else {
                match wr.write_all(batch).await {
                    Ok(()) => {
                        self.answers(&mut rd, Some(&mut wr), received, pipeline, sent_at)
                            .await
                    }
                    Err(e) => Err(ConnError::Retry(io_error("send", &e))),
                }
            };
            self.count_bytes(0, batch.len());
            if let Err(e) = answered {
                return e;
            }
            if self.spec.new_conn {
                // Closed as a client should (TLS: close_notify), then the next connection.
                let _ = wr.shutdown().await;
                return ConnError::Closed;
            }
        }
    }

    /// Reads the answers to one batch; `ack` is where acknowledgements go (command protocols).
    async fn answers(
        &mut self,
        rd: &mut (impl AsyncReadExt + Unpin),
        mut ack: Option<&mut (impl AsyncWriteExt + Unpin)>,
        received: &mut Received,
        pipeline: u64,
        sent_at: Instant,
    ) -> Result<(), ConnError> {
        let spec = self.spec.clone();
        let work = &*spec.workload;
        for _ in 0..pipeline {
            let mut exchange = work.exchange();
            let done = loop {
                let r = &mut *received;
                let (consumed, step) = match exchange.feed(work, &r.buf[r.start..r.end]) {
                    Ok((n, step)) => {
                        r.start += n;
                        (n, step)
                    }
                    Err(v) => return Err(ConnError::Retry(format!("protocol: {}", v.0))),
                };
                match step {
                    Step::Done(done) => break done,
                    Step::SendAck => {
                        let Some(ack) = ack.as_mut() else {
                            return Err(ConnError::Retry("protocol: unexpected size".into()));
                        };
                        if let Err(e) = ack.write_all(ACK).await {
                            return Err(ConnError::Retry(io_error("send", &e)));
                        }
                        self.count_bytes(0, ACK.len());
                        if let Some(Step::Done(done)) = exchange.complete_without_bytes() {
                            break done;
                        }
                    }
                    // The exchange moved on and bytes are left: offer them again.
                    Step::NeedMore if consumed > 0 && r.start < r.end => {}
                    Step::NeedMore => {
                        // Keep the unconsumed tail, then read more after it.
                        if r.start == r.end {
                            (r.start, r.end) = (0, 0);
                        } else if r.end == r.buf.len() {
                            if r.start == 0 {
                                return Err(ConnError::Retry(format!(
                                    "protocol: an answer part larger than {READ_BUFFER} bytes \
                                     without an end"
                                )));
                            }
                            r.buf.copy_within(r.start..r.end, 0);
                            (r.start, r.end) = (0, r.end - r.start);
                        }
                        let n = match rd.read(&mut r.buf[r.end..]).await {
                            Ok(0) => {
                                return Err(ConnError::Retry(
                                    "server closed the connection mid-response".into(),
                                ))
                            }
                            Ok(n) => n,
                            Err(e) => return Err(ConnError::Retry(io_error("receive", &e))),
                        };
                        r.end += n;
                        self.count_bytes(n, 0);
                    }
                }
            };
            self.progress = true;
            let now = Instant::now();
            let mut tally = self.tally.borrow_mut();
            let waiting = &mut tally.waiting[self.slot];
            *waiting = waiting.and_then(|(since, n)| (n > 1).then_some((since, n - 1)));
            if self.window.contains(now) {
                let r = &mut tally.result;
                r.requests += 1;
                let _ = r.latency_ns.record((now - sent_at).as_nanos() as u64);
                if let Some(why) = done.failure {
                    r.failed += 1;
                    add_error(&mut r.errors, why, 1);
                }
            }
            if done.close {
                return Err(ConnError::Closed);
            }
        }
        Ok(())
    }

    fn count_bytes(&self, received: usize, sent: usize) {
        let mut tally = self.tally.borrow_mut();
        if tally.window.contains(Instant::now()) {
            tally.result.bytes_in += received as u64;
            tally.result.bytes_out += sent as u64;
        }
    }
}

fn io_error(what: &str, e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::ConnectionReset => format!("{what}: connection reset by the server"),
        std::io::ErrorKind::BrokenPipe => format!("{what}: the server closed the connection"),
        _ => format!("{what}: {e}"),
    }
}
