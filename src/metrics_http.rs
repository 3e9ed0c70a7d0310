//! The Prometheus scrape endpoint, `GET /metrics` on `[metrics] listen`, and the health
//! endpoints next to it: `/healthz` (the process is alive and serving this endpoint) and
//! `/readyz` (every service is listening, every worker is alive and the server is not
//! draining; otherwise 503 with the reason in the body), for Kubernetes probes and load
//! balancers. The families of a scrape are sorted by name, so every scrape lists them in the
//! same order. The process-level series (build info, reloads) are defined in
//! [`crate::server::process_metrics`], the services' in `wharf_core`.
//!
//! metrics-exporter-prometheus renders the exposition text; this module is the small HTTP/1.1
//! responder in front of it, so the endpoint runs on our own runtime, binds before anything
//! starts (an address in use is a startup error), and can grow access rules and health checks
//! without another HTTP stack. One request per connection, bounded head size.
//!
//! The endpoint is reachable by whoever can reach the port, and a failing liveness probe
//! restarts the pod, so no client may make the health answers wait (issue 14, item 2):
//!
//! - a connection holds nothing but its descriptor until its request head has arrived, which
//!   must happen within [`HEAD_TIMEOUT`] of the accept; health answers then need no slot;
//! - one peer (an IPv4 address, an IPv6 /64) has at most [`MAX_CONNECTIONS_PER_PEER`]
//!   connections open; more are closed at accept;
//! - at most [`MAX_PENDING_HEADS`] connections wait for their head at once: a new one evicts
//!   the oldest head of the peer holding the most connections, so silent or slow clients from
//!   many addresses cannot lock out a probe, which sends its head at once;
//! - scrape slots ([`MAX_SCRAPES_IN_FLIGHT`]) go only to `/metrics` requests from peers in
//!   `allow_from`, checked before a slot is taken.
//!
//! What is turned away is counted in `wharf_metrics_endpoint_rejected_total{reason}`.
//!
//! The status page (`/`, its `/assets/`) and `/status` (JSON) are served here too, from
//! [`crate::status`], under the same rules as `/metrics`: `allow_from`, a scrape slot each.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;
use tracing::debug;
use wharf_core::net::Cidr;

use crate::status::{self, Status};

/// Histogram buckets (seconds) for network latencies: 100 us to 5 min.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0, 300.0,
];

/// Largest request head read; a longer one gets 400.
const MAX_REQUEST_HEAD: usize = 8 * 1024;
/// From the accept to the end of the request head. A probe or a scraper sends its request at
/// once; a connection that has not within this is closed (`reason="head_timeout"`).
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(2);
/// Connections waiting for their request head at once; a new one beyond this evicts one
/// (`reason="evicted"`).
pub const MAX_PENDING_HEADS: usize = 256;
/// Connections one peer (IPv4 address, IPv6 /64) may have open; more are closed at accept
/// (`reason="per_peer"`). A kubelet or a Prometheus server uses one at a time.
pub const MAX_CONNECTIONS_PER_PEER: usize = 8;
/// Scrapes rendered and written at once; a scrape beyond this gets 503 (`reason="busy"`).
pub const MAX_SCRAPES_IN_FLIGHT: usize = 64;
/// A scrape (rendering and writing the exposition) must finish within this.
pub const SCRAPE_TIMEOUT: Duration = Duration::from_secs(10);
/// Writing any other answer (a few hundred bytes) must finish within this.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(1);
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// Counter, label `reason`: connections and requests the metrics endpoint turned away.
pub const REJECTED: &str = "wharf_metrics_endpoint_rejected_total";
/// Every `reason` of [`REJECTED`]: closed at accept over [`MAX_CONNECTIONS_PER_PEER`]; evicted
/// while sending the head; closed at [`HEAD_TIMEOUT`]; a malformed or oversized head (400);
/// a scrape outside `allow_from` (403); a scrape beyond [`MAX_SCRAPES_IN_FLIGHT`] (503).
pub const REJECT_REASONS: &[&str] = &[
    "per_peer",
    "evicted",
    "head_timeout",
    "bad_request",
    "allow_from",
    "busy",
];

fn count_rejected(reason: &'static str) {
    metrics::counter!(REJECTED, "reason" => reason).increment(1);
}

/// Installs the global Prometheus recorder (histograms with [`LATENCY_BUCKETS`]).
pub fn install_recorder() -> Result<PrometheusHandle, String> {
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
        .and_then(|b| b.install_recorder())
        .map_err(|e| format!("cannot install the metrics recorder: {e}"))
}

/// Whether the server is ready for traffic, as `/readyz` reports it.
#[derive(Clone, Default)]
pub struct Readiness(Arc<Mutex<ReadyState>>);

#[derive(Default)]
enum ReadyState {
    #[default]
    Starting,
    Ready,
    Draining,
    /// Something the server cannot recover from (a worker died); stays until the process ends.
    Failed(String),
}

impl Readiness {
    /// Every service is listening.
    pub fn set_ready(&self) {
        self.set(ReadyState::Ready);
    }

    /// Draining: stop sending new traffic here.
    pub fn set_draining(&self) {
        self.set(ReadyState::Draining);
    }

    /// Not serving everything any more, for `reason` (shown in `/readyz`'s body).
    pub fn set_failed(&self, reason: String) {
        self.set(ReadyState::Failed(reason));
    }

    /// A failure is never overwritten: a failed server stays not ready.
    fn set(&self, next: ReadyState) {
        let mut state = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if !matches!(*state, ReadyState::Failed(_)) {
            *state = next;
        }
    }

    /// `starting`, `ready`, `draining` or `failed`, with the reason of a failure.
    pub fn state(&self) -> (&'static str, Option<String>) {
        match &*self.0.lock().unwrap_or_else(|p| p.into_inner()) {
            ReadyState::Starting => ("starting", None),
            ReadyState::Ready => ("ready", None),
            ReadyState::Draining => ("draining", None),
            ReadyState::Failed(reason) => ("failed", Some(reason.clone())),
        }
    }

    /// `Ok` when ready, else why not.
    fn check(&self) -> Result<(), String> {
        match &*self.0.lock().unwrap_or_else(|p| p.into_inner()) {
            ReadyState::Ready => Ok(()),
            ReadyState::Starting | ReadyState::Draining => Err("starting or draining".into()),
            ReadyState::Failed(reason) => Err(reason.clone()),
        }
    }
}

/// What one request is answered from, shared by every connection.
struct Endpoint {
    handle: PrometheusHandle,
    allow_from: tokio::sync::watch::Receiver<Vec<Cidr>>,
    readiness: Readiness,
    scrapes: Arc<tokio::sync::Semaphore>,
    /// The `process_*` series (open and maximum descriptors, resident memory, threads, CPU
    /// seconds), read from /proc at each scrape: how an operator sees the process-wide bounds.
    process: metrics_process::Collector,
    /// What `/` and `/status` show.
    status: Arc<Status>,
}

/// Serves scrapes, the status page and health checks until the task is dropped, and samples
/// the registry for the status ([`crate::status::run_sampler`]). Call inside a tokio runtime.
/// Peers outside a non-empty `allow_from` get 403 for everything but the health endpoints,
/// which reveal nothing and answer everyone (a kubelet probes from the node's address).
/// `allow_from` is read when a request arrives, so a config reload changes it for the next.
pub async fn serve(
    listener: std::net::TcpListener,
    handle: PrometheusHandle,
    allow_from: tokio::sync::watch::Receiver<Vec<Cidr>>,
    readiness: Readiness,
    status: Arc<Status>,
) -> io::Result<()> {
    metrics::describe_counter!(
        REJECTED,
        "Connections and requests the metrics endpoint turned away, by reason."
    );
    for reason in REJECT_REASONS {
        metrics::counter!(REJECTED, "reason" => *reason).increment(0);
    }
    let listener = TcpListener::from_std(listener)?;
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(UPKEEP_EVERY);
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
        }
    });
    tokio::spawn(crate::status::run_sampler(
        Arc::clone(&status),
        handle.clone(),
    ));
    let endpoint = Arc::new(Endpoint {
        handle,
        allow_from,
        readiness,
        scrapes: Arc::new(tokio::sync::Semaphore::new(MAX_SCRAPES_IN_FLIGHT)),
        process: metrics_process::Collector::default(),
        status,
    });
    endpoint.process.describe();
    let tracker = Arc::new(Tracker::default());
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                debug!(error = %e, "metrics accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(ticket) = tracker.admit(PeerKey::of(peer.ip())) else {
            count_rejected("per_peer");
            continue;
        };
        let id = ticket.id;
        let endpoint = Arc::clone(&endpoint);
        let task = tokio::spawn(async move { connection(stream, peer, ticket, &endpoint).await });
        tracker.set_abort(id, task.abort_handle());
    }
}

/// Whose connections count together: an IPv4 address, an IPv6 /64.
type PeerKey = wharf_core::net::Source;

/// The endpoint's open connections: how many each peer has, and which still send their head.
#[derive(Default)]
struct Tracker(Mutex<Connections>);

#[derive(Default)]
struct Connections {
    open: HashMap<PeerKey, usize>,
    /// Connections still sending their request head, oldest first.
    heads: Vec<PendingHead>,
    next_id: u64,
}

struct PendingHead {
    id: u64,
    peer: PeerKey,
    /// Ends the connection's task; set right after it is spawned.
    abort: Option<AbortHandle>,
}

/// One admitted connection; dropping it (the connection ended or was evicted) frees its place.
struct Ticket {
    tracker: Arc<Tracker>,
    id: u64,
    peer: PeerKey,
}

impl Tracker {
    fn lock(&self) -> std::sync::MutexGuard<'_, Connections> {
        // Nothing panics while holding it; if something did, the counts are still usable.
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Admits a connection from `peer`, evicting a pending head if [`MAX_PENDING_HEADS`] are
    /// waiting; `None` if `peer` already has [`MAX_CONNECTIONS_PER_PEER`] open.
    fn admit(self: &Arc<Self>, peer: PeerKey) -> Option<Ticket> {
        let mut c = self.lock();
        let open = c.open.entry(peer).or_default();
        if *open >= MAX_CONNECTIONS_PER_PEER {
            return None;
        }
        *open += 1;
        let evicted = if c.heads.len() >= MAX_PENDING_HEADS {
            c.evict()
        } else {
            None
        };
        let id = c.next_id;
        c.next_id += 1;
        c.heads.push(PendingHead {
            id,
            peer,
            abort: None,
        });
        drop(c);
        if let Some(victim) = evicted {
            count_rejected("evicted");
            if let Some(abort) = victim.abort {
                abort.abort();
            }
        }
        Some(Ticket {
            tracker: Arc::clone(self),
            id,
            peer,
        })
    }

    fn set_abort(&self, id: u64, abort: AbortHandle) {
        let mut c = self.lock();
        if let Some(head) = c.heads.iter_mut().find(|h| h.id == id) {
            head.abort = Some(abort);
        }
    }
}

impl Connections {
    /// Takes out the oldest pending head of the peer with the most connections open: a probe,
    /// which has one connection and sends its head at once, is the last to go.
    fn evict(&mut self) -> Option<PendingHead> {
        let mut victim: Option<(usize, usize)> = None;
        for (i, head) in self.heads.iter().enumerate() {
            let open = self.open.get(&head.peer).copied().unwrap_or(0);
            if victim.is_none_or(|(most, _)| open > most) {
                victim = Some((open, i));
            }
        }
        victim.map(|(_, i)| self.heads.remove(i))
    }

    fn head_done(&mut self, id: u64) {
        if let Some(i) = self.heads.iter().position(|h| h.id == id) {
            self.heads.remove(i);
        }
    }
}

impl Ticket {
    /// The head arrived (or will not): the connection can no longer be evicted.
    fn head_done(&self) {
        self.tracker.lock().head_done(self.id);
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut c = self.tracker.lock();
        c.head_done(self.id);
        if let Some(open) = c.open.get_mut(&self.peer) {
            *open -= 1;
            if *open == 0 {
                c.open.remove(&self.peer);
            }
        }
    }
}

/// Serves one connection: its head within [`HEAD_TIMEOUT`], then one answer.
async fn connection(mut stream: TcpStream, peer: SocketAddr, ticket: Ticket, endpoint: &Endpoint) {
    let head = tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut stream)).await;
    ticket.head_done();
    let head = match head {
        // Connected and closed without a word (a TCP check): nothing to answer.
        Ok(Ok(head)) if head.bytes.is_empty() => return,
        Ok(Ok(head)) => head,
        Ok(Err(e)) => {
            debug!(%peer, error = %e, "metrics request failed");
            return;
        }
        Err(_) => {
            count_rejected("head_timeout");
            debug!(%peer, "metrics request head timed out");
            return;
        }
    };
    let (answer, limit) = match answer(&head, peer, endpoint) {
        Answer::Fixed(response) => (response, ANSWER_TIMEOUT),
        Answer::Slotted(permit, page, head_only) => {
            let response = page.render(endpoint, head_only);
            let write = write_answer(&mut stream, &response);
            match tokio::time::timeout(SCRAPE_TIMEOUT, write).await {
                Ok(Err(e)) => debug!(%peer, error = %e, "metrics scrape failed"),
                Err(_) => debug!(%peer, "metrics scrape timed out"),
                Ok(Ok(())) => {}
            }
            drop(permit);
            return;
        }
    };
    match tokio::time::timeout(limit, write_answer(&mut stream, &answer)).await {
        Ok(Err(e)) => debug!(%peer, error = %e, "metrics answer failed"),
        Err(_) => debug!(%peer, "metrics answer timed out"),
        Ok(Ok(())) => {}
    }
}

/// A request head as read: incomplete when the peer closed before its end or it outgrew
/// [`MAX_REQUEST_HEAD`].
struct Head {
    bytes: Vec<u8>,
    complete: bool,
}

async fn read_head(stream: &mut TcpStream) -> io::Result<Head> {
    let mut bytes = Vec::with_capacity(1024);
    loop {
        if bytes.windows(4).any(|w| w == b"\r\n\r\n") || bytes.windows(2).any(|w| w == b"\n\n") {
            return Ok(Head {
                bytes,
                complete: true,
            });
        }
        if bytes.len() >= MAX_REQUEST_HEAD || stream.read_buf(&mut bytes).await? == 0 {
            return Ok(Head {
                bytes,
                complete: false,
            });
        }
    }
}

const METRICS_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

enum Answer {
    /// A small answer, written as is.
    Fixed(Vec<u8>),
    /// A page holding a scrape slot while it is rendered and written; `true` for `HEAD`
    /// (headers only).
    Slotted(tokio::sync::OwnedSemaphorePermit, Page, bool),
}

/// What an allowed request beyond the health checks gets.
enum Page {
    /// `/metrics`: the exposition.
    Metrics,
    /// `/status`: the status document as JSON.
    StatusJson,
    /// `/`: the status page.
    StatusHtml,
    /// `/assets/...`: a file of the status page.
    Asset(status::page::Asset),
}

impl Page {
    /// The whole response, rendered now.
    fn render(self, endpoint: &Endpoint, head_only: bool) -> Vec<u8> {
        match self {
            Page::Metrics => {
                endpoint.process.collect();
                let body = by_family_name(&endpoint.handle.render());
                response("200 OK", METRICS_TYPE, &body, head_only)
            }
            Page::StatusJson => {
                let body = endpoint.status.document().to_json();
                let headers = "Cache-Control: no-store\r\n";
                response_with("200 OK", JSON_TYPE, headers, &body, head_only)
            }
            Page::StatusHtml => {
                let body = status::page::html(&endpoint.status.document());
                let headers = format!(
                    "Cache-Control: no-store\r\nContent-Security-Policy: {}\r\n\
                     X-Content-Type-Options: nosniff\r\nReferrer-Policy: no-referrer\r\n",
                    status::page::CONTENT_SECURITY_POLICY
                );
                response_with("200 OK", HTML_TYPE, &headers, &body, head_only)
            }
            Page::Asset(asset) => {
                let headers = "Cache-Control: max-age=300\r\nX-Content-Type-Options: nosniff\r\n";
                response_with("200 OK", asset.content_type, headers, asset.body, head_only)
            }
        }
    }
}

/// What `head` gets. Only an allowed request for a page takes a scrape slot.
fn answer(head: &Head, peer: SocketAddr, endpoint: &Endpoint) -> Answer {
    let line = head.bytes.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let head_only = method == "HEAD";
    let fixed = |status, body: &str| Answer::Fixed(response(status, "text/plain", body, head_only));

    if !head.complete {
        count_rejected("bad_request");
        return fixed("400 Bad Request", "bad request\n");
    }
    if method != "GET" && method != "HEAD" {
        return fixed("405 Method Not Allowed", "only GET and HEAD\n");
    }
    // Health answers need no slot and answer everyone.
    let page = match path {
        "/healthz" => return fixed("200 OK", "ok\n"),
        "/readyz" => {
            return match endpoint.readiness.check() {
                Ok(()) => fixed("200 OK", "ready\n"),
                Err(why) => fixed("503 Service Unavailable", &format!("not ready: {why}\n")),
            }
        }
        "/metrics" => Page::Metrics,
        "/status" => Page::StatusJson,
        "/" => Page::StatusHtml,
        _ => match status::page::asset(path) {
            Some(asset) => Page::Asset(asset),
            None => {
                return fixed(
                    "404 Not Found",
                    "not found; try /, /status, /metrics, /healthz or /readyz\n",
                )
            }
        },
    };
    let allowed = {
        let allow_from = endpoint.allow_from.borrow();
        allow_from.is_empty() || allow_from.iter().any(|n| n.contains(peer.ip()))
    };
    if !allowed {
        count_rejected("allow_from");
        return fixed("403 Forbidden", "forbidden: not in metrics.allow_from\n");
    }
    match Arc::clone(&endpoint.scrapes).try_acquire_owned() {
        Ok(permit) => Answer::Slotted(permit, page, head_only),
        Err(_) => {
            count_rejected("busy");
            fixed(
                "503 Service Unavailable",
                "busy: too many scrapes in flight\n",
            )
        }
    }
}

/// The exposition text with its metric families sorted by name, so every scrape lists them in
/// the same order (the recorder renders them in hash-map order). A family's block (HELP, TYPE,
/// then its series, histogram buckets in order) stays as rendered; blocks end in a blank line.
fn by_family_name(text: &str) -> String {
    let family = |block: &str| {
        let first = block.lines().next().unwrap_or_default();
        match first.strip_prefix("# ") {
            // `# HELP name ...` or `# TYPE name ...`
            Some(comment) => comment.split_whitespace().nth(1).unwrap_or_default(),
            None => first.split(['{', ' ']).next().unwrap_or_default(),
        }
        .to_string()
    };
    let mut blocks: Vec<(String, &str)> = text
        .split("\n\n")
        .map(|b| b.trim_matches('\n'))
        .filter(|b| !b.is_empty())
        .map(|b| (family(b), b))
        .collect();
    blocks.sort_by(|a, b| a.0.cmp(&b.0));
    let mut sorted = String::with_capacity(text.len());
    for (_, block) in blocks {
        sorted.push_str(block);
        sorted.push_str("\n\n");
    }
    sorted
}

const JSON_TYPE: &str = "application/json";
const HTML_TYPE: &str = "text/html; charset=utf-8";

fn response(status: &str, content_type: &str, body: &str, head_only: bool) -> Vec<u8> {
    response_with(status, content_type, "", body, head_only)
}

/// A response with `extra_headers` (each line ending in CRLF).
fn response_with(
    status: &str,
    content_type: &str,
    extra_headers: &str,
    body: &str,
    head_only: bool,
) -> Vec<u8> {
    let mut response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         {extra_headers}Connection: close\r\nServer: wharf\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !head_only {
        response.extend_from_slice(body.as_bytes());
    }
    response
}

async fn write_answer(stream: &mut TcpStream, response: &[u8]) -> io::Result<()> {
    stream.write_all(response).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(last: u8) -> PeerKey {
        PeerKey::of(std::net::IpAddr::from([127, 0, 0, last]))
    }

    #[test]
    fn families_are_sorted_by_name_with_their_lines_kept_together() {
        let text = "# HELP b_total B.\n# TYPE b_total counter\nb_total{x=\"1\"} 1\nb_total{x=\"2\"} 2\n\n\
                    # TYPE a_seconds histogram\na_seconds_bucket{le=\"1\"} 0\na_seconds_bucket{le=\"+Inf\"} 0\n\n\
                    c 3\n\n";
        assert_eq!(
            by_family_name(text),
            "# TYPE a_seconds histogram\na_seconds_bucket{le=\"1\"} 0\na_seconds_bucket{le=\"+Inf\"} 0\n\n\
             # HELP b_total B.\n# TYPE b_total counter\nb_total{x=\"1\"} 1\nb_total{x=\"2\"} 2\n\n\
             c 3\n\n"
        );
    }

    #[test]
    fn readyz_gives_the_reason_and_a_failure_stays() {
        let readiness = Readiness::default();
        assert_eq!(readiness.check(), Err("starting or draining".into()));
        readiness.set_ready();
        assert_eq!(readiness.check(), Ok(()));
        readiness.set_failed("worker 1 ended: it panicked: boom".into());
        readiness.set_draining();
        readiness.set_ready();
        assert_eq!(
            readiness.check(),
            Err("worker 1 ended: it panicked: boom".into())
        );
    }

    #[test]
    fn one_peer_has_at_most_its_cap_open() {
        let tracker = Arc::new(Tracker::default());
        let held: Vec<Ticket> = (0..MAX_CONNECTIONS_PER_PEER)
            .map(|_| tracker.admit(v4(2)).unwrap())
            .collect();
        assert!(tracker.admit(v4(2)).is_none());
        // Others are not affected, and a closed connection frees its place.
        assert!(tracker.admit(v4(3)).is_some());
        drop(held.into_iter().next());
        assert!(tracker.admit(v4(2)).is_some());
    }

    #[test]
    fn a_full_table_evicts_the_oldest_head_of_the_busiest_peer() {
        let tracker = Arc::new(Tracker::default());
        // Peers 10.. with 1 connection each, then peer 2 with 4 (its first one is the oldest
        // head of the busiest peer, not the oldest overall).
        let mut held: Vec<Ticket> = (0..MAX_PENDING_HEADS - 4)
            .map(|i| tracker.admit(PeerKey::V4(10 + i as u32)).unwrap())
            .collect();
        held.extend((0..4).map(|_| tracker.admit(v4(2)).unwrap()));
        let busiest_oldest = held[MAX_PENDING_HEADS - 4].id;
        let probe = tracker.admit(v4(1)).unwrap();
        let c = tracker.lock();
        assert_eq!(c.heads.len(), MAX_PENDING_HEADS);
        assert!(c.heads.iter().all(|h| h.id != busiest_oldest));
        assert!(c.heads.iter().any(|h| h.id == probe.id));
        drop(c);
        // A head that arrived cannot be evicted any more, and ending frees the peer's place.
        probe.head_done();
        assert_eq!(tracker.lock().heads.len(), MAX_PENDING_HEADS - 1);
        drop(probe);
        drop(held);
        let c = tracker.lock();
        assert!(c.heads.is_empty() && c.open.is_empty());
    }
}
