//! What a run measured, as a serializable [`Report`] (the `--json` output and the rows of
//! `results.json`) and as the text a person reads.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;

use super::load::{LoadResult, LoadSpec};

/// One run's figures.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub protocol: &'static str,
    pub addr: String,
    pub connections: usize,
    pub threads: usize,
    pub pipeline: usize,
    /// `"closed"` or `"open"` loop.
    pub mode: &'static str,
    /// Open loop: the requested rate (requests per second).
    pub target_rate: Option<f64>,
    /// Whether the connections spoke TLS.
    pub tls: bool,
    /// Whether every request had a connection of its own (`--new-conn`).
    pub new_conn: bool,
    /// The PROXY protocol header each connection started with (`--send-proxy`).
    pub send_proxy: Option<super::load::SendProxy>,
    pub warmup_s: f64,
    pub duration_s: f64,
    /// Requests answered in the window (errors included).
    pub requests: u64,
    pub requests_per_sec: f64,
    /// Answered requests that were answered with an error (`http 404`, `ERR ...`, a refusal).
    pub failed: u64,
    /// Requests answered without an error, per second.
    pub ok_per_sec: f64,
    /// Connections opened in the window (with TLS: handshakes completed), and per second.
    pub connections_opened: u64,
    pub connections_per_sec: f64,
    /// Failed answers plus failed connections (refused, reset, protocol violations).
    pub errors: u64,
    pub error_kinds: BTreeMap<String, u64>,
    /// Requests unanswered at the end, sent more than a second before it.
    pub stalled: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub mb_per_sec_in: f64,
    pub mb_per_sec_out: f64,
    pub latency_us: Latency,
    /// The local server's CPU use, when its processes were found.
    pub server: Option<ServerCpu>,
    /// This client's CPU time per second of the window (1.0 = one core busy).
    pub client_cpu_cores: f64,
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

impl Latency {
    /// The percentiles of `h` (in nanoseconds); zeros when it is empty.
    pub fn of(h: &hdrhistogram::Histogram<u64>) -> Latency {
        if h.is_empty() {
            return Latency {
                p50: 0.0,
                p90: 0.0,
                p99: 0.0,
                p999: 0.0,
                max: 0.0,
                mean: 0.0,
            };
        }
        let us = |ns: u64| ns as f64 / 1000.0;
        Latency {
            p50: us(h.value_at_quantile(0.5)),
            p90: us(h.value_at_quantile(0.9)),
            p99: us(h.value_at_quantile(0.99)),
            p999: us(h.value_at_quantile(0.999)),
            max: us(h.max()),
            mean: h.mean() / 1000.0,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ServerCpu {
    pub pids: Vec<u32>,
    /// CPU time per second of the window (1.0 = one core busy).
    pub cores: f64,
    /// CPU time per answered request.
    pub us_per_request: Option<f64>,
}

impl Report {
    pub fn new(spec: &LoadSpec, result: &LoadResult) -> Report {
        let secs = result.elapsed.as_secs_f64().max(1e-9);
        let latency = Latency::of(&result.latency_ns);
        let server = result.server_cpu.map(|cpu| ServerCpu {
            pids: spec.server_pids.clone(),
            cores: cpu.as_secs_f64() / secs,
            us_per_request: (result.requests > 0)
                .then(|| cpu.as_secs_f64() * 1e6 / result.requests as f64),
        });
        Report {
            protocol: spec.workload.protocol.as_str(),
            addr: spec.addr.to_string(),
            connections: spec.connections,
            threads: spec.client_threads(),
            pipeline: spec.pipeline,
            mode: if spec.rate.is_some() {
                "open"
            } else {
                "closed"
            },
            target_rate: spec.rate,
            tls: spec.tls.is_some(),
            new_conn: spec.new_conn,
            send_proxy: spec.send_proxy,
            warmup_s: spec.warmup.as_secs_f64(),
            duration_s: secs,
            requests: result.requests,
            requests_per_sec: result.requests as f64 / secs,
            failed: result.failed,
            ok_per_sec: (result.requests - result.failed) as f64 / secs,
            connections_opened: result.connections_opened,
            connections_per_sec: result.connections_opened as f64 / secs,
            errors: result.error_count(),
            error_kinds: result.errors.clone(),
            stalled: result.stalled,
            bytes_in: result.bytes_in,
            bytes_out: result.bytes_out,
            mb_per_sec_in: result.bytes_in as f64 / secs / 1e6,
            mb_per_sec_out: result.bytes_out as f64 / secs / 1e6,
            latency_us: latency,
            server,
            client_cpu_cores: result.client_cpu.as_secs_f64() / secs,
        }
    }

    /// The report as a person reads it.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let pacing = pacing(self.target_rate, self.pipeline);
        let proxy = match self.send_proxy {
            Some(super::load::SendProxy::V1) => ", PROXY v1 header",
            Some(super::load::SendProxy::V2) => ", PROXY v2 header",
            None => "",
        };
        let _ = writeln!(
            out,
            "wharf bench {} {}: {} connection{}, {} thread{}, {pacing}{proxy}, {} after {} warm-up",
            self.protocol,
            self.addr,
            self.connections,
            plural(self.connections),
            self.threads,
            plural(self.threads),
            seconds(self.duration_s),
            seconds(self.warmup_s),
        );
        let failed = if self.failed > 0 {
            format!(" ({} ok/s)", grouped(self.ok_per_sec))
        } else {
            String::new()
        };
        let _ = writeln!(
            out,
            "  requests    {:>12}   {} req/s{failed}",
            grouped(self.requests as f64),
            grouped(self.requests_per_sec)
        );
        if self.new_conn || self.tls {
            let what = match (self.tls, self.new_conn) {
                (true, true) => "TLS handshakes, one request each",
                (true, false) => "TLS handshakes",
                (false, _) => "one request each",
            };
            let _ = writeln!(
                out,
                "  connections {:>12}   {}/s ({what})",
                grouped(self.connections_opened as f64),
                grouped(self.connections_per_sec)
            );
        }
        let _ = writeln!(
            out,
            "  throughput  {:>9.1} MB/s in   {:.1} MB/s out",
            self.mb_per_sec_in, self.mb_per_sec_out
        );
        let l = &self.latency_us;
        let _ = writeln!(
            out,
            "  latency     p50 {}   p90 {}   p99 {}   p99.9 {}   max {}",
            micros(l.p50),
            micros(l.p90),
            micros(l.p99),
            micros(l.p999),
            micros(l.max)
        );
        if self.errors == 0 {
            let _ = writeln!(out, "  errors      0");
        } else {
            // Failed connections are errors without a request: a share only makes sense
            // when every error was an answered request.
            let share = if self.errors <= self.requests {
                format!(
                    " ({:.2}% of requests)",
                    100.0 * self.errors as f64 / self.requests as f64
                )
            } else {
                String::new()
            };
            let _ = writeln!(out, "  errors      {}{share}", grouped(self.errors as f64));
            for (kind, n) in &self.error_kinds {
                let _ = writeln!(out, "    {:>10}  {kind}", grouped(*n as f64));
            }
        }
        if self.stalled > 0 {
            let _ = writeln!(
                out,
                "  stalled     {} request{} unanswered for over {:?} when the run ended",
                self.stalled,
                plural(self.stalled as usize),
                super::load::STALLED_AFTER
            );
        }
        match &self.server {
            Some(s) => {
                let per_request = s
                    .us_per_request
                    .map(|us| format!(", {} CPU per request", micros(us)))
                    .unwrap_or_default();
                let pids: Vec<String> = s.pids.iter().map(|p| p.to_string()).collect();
                let _ = writeln!(
                    out,
                    "  server      {:.2} cores busy{per_request} (pid {})",
                    s.cores,
                    pids.join(", ")
                );
            }
            None => {
                let _ = writeln!(
                    out,
                    "  server      CPU not measured (no process listening on {} found here, or it \
                     exited)",
                    self.addr
                );
            }
        }
        let _ = writeln!(out, "  client      {:.2} cores busy", self.client_cpu_cores);
        out
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// `1234567.8` -> `1 234 568`: digits grouped by thousands, rounded to an integer.
pub fn grouped(v: f64) -> String {
    let digits = format!("{:.0}", v.abs());
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(' ');
        }
        out.push(c);
    }
    if v < 0.0 && digits != "0" {
        out.insert(0, '-');
    }
    out
}

/// A latency in microseconds, in the unit that reads best.
pub fn micros(us: f64) -> String {
    if us < 10.0 {
        format!("{us:.2} µs")
    } else if us < 1000.0 {
        format!("{us:.0} µs")
    } else if us < 1_000_000.0 {
        format!("{:.2} ms", us / 1000.0)
    } else {
        format!("{:.2} s", us / 1e6)
    }
}

fn seconds(s: f64) -> String {
    humantime::format_duration(Duration::from_millis((s * 1000.0).round() as u64)).to_string()
}

/// How a load is paced, as the reports say it: "closed loop" or "open loop at N req/s", plus
/// ", pipeline K" when requests are pipelined.
pub fn pacing(target_rate: Option<f64>, pipeline: usize) -> String {
    let mut out = match target_rate {
        Some(rate) => format!("open loop at {} req/s", grouped(rate)),
        None => "closed loop".to_string(),
    };
    if pipeline > 1 {
        let _ = write!(out, ", pipeline {pipeline}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_read_well() {
        assert_eq!(grouped(0.0), "0");
        assert_eq!(grouped(999.4), "999");
        assert_eq!(grouped(1000.0), "1 000");
        assert_eq!(grouped(233_180.2), "233 180");
        assert_eq!(grouped(1_234_567.0), "1 234 567");
        assert_eq!(grouped(-1500.0), "-1 500");
        assert_eq!(micros(4.214), "4.21 µs");
        assert_eq!(micros(431.0), "431 µs");
        assert_eq!(micros(3104.0), "3.10 ms");
        assert_eq!(micros(2_500_000.0), "2.50 s");
    }
}
