//! The Prometheus scrape endpoint, `GET /metrics` on `[metrics] listen`, and the health
//! endpoints next to it: `/healthz` (the process is alive and serving this endpoint) and
//! `/readyz` (every service is listening and the server is not draining), for Kubernetes
//! probes and load balancers.
//!
//! metrics-exporter-prometheus renders the exposition text; this module is the small HTTP/1.1
//! responder in front of it, so the endpoint runs on our own runtime, binds before anything
//! starts (an address in use is a startup error), and can grow access rules and health checks
//! without another HTTP stack. One request per connection, bounded head size, read timeout.

use std::io;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::debug;
use wharf_core::net::Cidr;

/// Histogram buckets (seconds) for network latencies: 100 us to 5 min.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0, 300.0,
];

const MAX_REQUEST_HEAD: usize = 8 * 1024;
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// A whole request, reading and writing, must finish within this.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Scrape connections served at once; more go to the reserve.
const MAX_SCRAPES_IN_FLIGHT: usize = 64;
/// Connections beyond those, served only for health checks and within [`RESERVE_TIMEOUT`]: a
/// peer holding every scrape slot must not make liveness probes fail. More are closed at accept.
const RESERVE_SLOTS: usize = 16;
const RESERVE_TIMEOUT: Duration = Duration::from_secs(1);
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// Installs the global Prometheus recorder (histograms with [`LATENCY_BUCKETS`]).
pub fn install_recorder() -> Result<PrometheusHandle, String> {
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
        .and_then(|b| b.install_recorder())
        .map_err(|e| format!("cannot install the metrics recorder: {e}"))
}

/// Whether the server is ready for traffic, as `/readyz` reports it.
#[derive(Clone, Default)]
pub struct Readiness(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Readiness {
    /// Every service is listening.
    pub fn set_ready(&self) {
        self.0.store(true, std::sync::atomic::Ordering::Release);
    }

    /// Draining: stop sending new traffic here.
    pub fn set_draining(&self) {
        self.0.store(false, std::sync::atomic::Ordering::Release);
    }

    fn is_ready(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Acquire)
    }
}

/// Serves scrapes and health checks until the task is dropped. Call inside a tokio runtime.
/// Peers outside a non-empty `allow_from` get 403 for `/metrics`; the health endpoints reveal
/// nothing and answer everyone (a kubelet probes from the node's address). `allow_from` is
/// read at each connection, so a config reload changes it for the next scrape.
pub async fn serve(
    listener: std::net::TcpListener,
    handle: PrometheusHandle,
    allow_from: tokio::sync::watch::Receiver<Vec<Cidr>>,
    readiness: Readiness,
) -> io::Result<()> {
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_SCRAPES_IN_FLIGHT));
    let reserve = std::sync::Arc::new(tokio::sync::Semaphore::new(RESERVE_SLOTS));
    let listener = TcpListener::from_std(listener)?;
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(UPKEEP_EVERY);
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
        }
    });
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                debug!(error = %e, "metrics accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let handle = handle.clone();
        let readiness = readiness.clone();
        let allowed = {
            let allow_from = allow_from.borrow();
            allow_from.is_empty() || allow_from.iter().any(|n| n.contains(peer.ip()))
        };
        // Bounded: a peer that never reads cannot pile up tasks and descriptors.
        let (permit, health_only, limit) = match std::sync::Arc::clone(&slots).try_acquire_owned() {
            Ok(p) => (p, false, REQUEST_TIMEOUT),
            Err(_) => match std::sync::Arc::clone(&reserve).try_acquire_owned() {
                Ok(p) => (p, true, RESERVE_TIMEOUT),
                Err(_) => {
                    drop(stream);
                    continue;
                }
            },
        };
        tokio::spawn(async move {
            let _permit = permit;
            let answer = respond(stream, &handle, allowed, health_only, &readiness);
            match tokio::time::timeout(limit, answer).await {
                Ok(Err(e)) => debug!(%peer, error = %e, "metrics request failed"),
                Err(_) => debug!(%peer, "metrics request timed out"),
                Ok(Ok(())) => {}
            }
        });
    }
}

/// Answers one request; `health_only` (every scrape slot taken) serves health checks only.
async fn respond(
    mut stream: TcpStream,
    handle: &PrometheusHandle,
    allowed: bool,
    health_only: bool,
    readiness: &Readiness,
) -> io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let complete = tokio::time::timeout(READ_TIMEOUT, async {
        loop {
            if head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n") {
                return Ok::<bool, io::Error>(true);
            }
            if head.len() >= MAX_REQUEST_HEAD {
                return Ok(false);
            }
            if stream.read_buf(&mut head).await? == 0 {
                return Ok(false);
            }
        }
    })
    .await
    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "request head timeout"))??;

    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");

    let (status, content_type, body) = if !complete {
        ("400 Bad Request", "text/plain", "bad request\n".to_string())
    } else if method != "GET" && method != "HEAD" {
        (
            "405 Method Not Allowed",
            "text/plain",
            "only GET and HEAD\n".to_string(),
        )
    } else if path == "/healthz" {
        ("200 OK", "text/plain", "ok\n".to_string())
    } else if path == "/readyz" && readiness.is_ready() {
        ("200 OK", "text/plain", "ready\n".to_string())
    } else if path == "/readyz" {
        (
            "503 Service Unavailable",
            "text/plain",
            "not ready: starting or draining\n".to_string(),
        )
    } else if health_only {
        (
            "503 Service Unavailable",
            "text/plain",
            "busy: too many scrapes in flight\n".to_string(),
        )
    } else if !allowed {
        (
            "403 Forbidden",
            "text/plain",
            "forbidden: not in metrics.allow_from\n".to_string(),
        )
    } else if path == "/metrics" {
        (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            handle.render(),
        )
    } else {
        (
            "404 Not Found",
            "text/plain",
            "not found; try /metrics, /healthz or /readyz\n".to_string(),
        )
    };
    let mut response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\nServer: wharf\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if method != "HEAD" {
        response.extend_from_slice(body.as_bytes());
    }
    stream.write_all(&response).await?;
    stream.shutdown().await
}
