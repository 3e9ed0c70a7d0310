//! The bounded history behind the charts and rates: one sample a second of each service's
//! cumulative counters, at most `capacity` samples (older ones fall off), plus a latency
//! snapshot every [`LATENCY_SNAPSHOT_EVERY`] samples for p50/p99 over about the last minute.
//! Memory is bounded by the number of services times `capacity` small records; a service that
//! has had no series for a whole window is forgotten.

use std::collections::{BTreeMap, VecDeque};

use super::series::Counters;

/// Samples between two latency snapshots.
pub const LATENCY_SNAPSHOT_EVERY: u64 = 10;
/// Latency snapshots kept: quantiles cover the last 60 to 70 seconds.
const LATENCY_SNAPSHOTS: usize = 7;

/// What a chart needs of one sample.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Point {
    pub received: u64,
    pub sent: u64,
    pub active: u64,
    pub accepted: u64,
    pub requests: u64,
}

/// One service's part of the ring; `points` is aligned with [`History::times`] (`None` where
/// the service had no series yet).
#[derive(Default)]
struct ServiceHistory {
    points: VecDeque<Option<Point>>,
    latency: VecDeque<Vec<(f64, u64)>>,
}

/// The ring.
pub struct History {
    capacity: usize,
    /// When each sample was taken, Unix seconds, oldest first.
    times: VecDeque<f64>,
    services: BTreeMap<String, ServiceHistory>,
    /// The full counters of the newest sample.
    latest: BTreeMap<String, Counters>,
    /// Samples until the next latency snapshot.
    until_snapshot: u64,
}

/// Per-second rates between consecutive samples, for one service, aligned with
/// [`History::rate_times`]; `None` where a sample is missing or a counter went back.
#[derive(Debug, Default, PartialEq)]
pub struct Rates {
    pub received: Vec<Option<f64>>,
    pub sent: Vec<Option<f64>>,
    pub accepted: Vec<Option<f64>>,
    pub requests: Vec<Option<f64>>,
    /// Active connections at each sample (a gauge, not a rate).
    pub active: Vec<Option<u64>>,
}

impl History {
    pub fn new(capacity: usize) -> Self {
        History {
            capacity: capacity.max(2),
            times: VecDeque::new(),
            services: BTreeMap::new(),
            latest: BTreeMap::new(),
            until_snapshot: 0,
        }
    }

    /// Adds the sample taken at `unix` seconds.
    pub fn push(&mut self, unix: f64, counters: BTreeMap<String, Counters>) {
        let full = self.times.len() == self.capacity;
        if full {
            self.times.pop_front();
        }
        self.times.push_back(unix);
        // Every LATENCY_SNAPSHOT_EVERY samples, from the first.
        let snapshot = self.until_snapshot == 0;
        self.until_snapshot = match self.until_snapshot {
            0 => LATENCY_SNAPSHOT_EVERY - 1,
            n => n - 1,
        };
        let len = self.times.len();
        for (name, c) in &counters {
            let h = self.services.entry(name.clone()).or_insert_with(|| {
                let mut h = ServiceHistory::default();
                h.points.resize(len.saturating_sub(1), None);
                h
            });
            h.points.push_back(Some(Point {
                received: c.received,
                sent: c.sent,
                active: c.active,
                accepted: c.accepted,
                requests: c.requests_total(),
            }));
            if snapshot && !c.latency.is_empty() {
                if h.latency.len() == LATENCY_SNAPSHOTS {
                    h.latency.pop_front();
                }
                h.latency.push_back(c.latency.clone());
            }
        }
        for (name, h) in self.services.iter_mut() {
            if !counters.contains_key(name) {
                h.points.push_back(None);
            }
            while h.points.len() > len {
                h.points.pop_front();
            }
        }
        self.services
            .retain(|_, h| h.points.iter().any(Option::is_some));
        self.latest = counters;
    }

    /// When the newest sample was taken.
    pub fn sampled_at(&self) -> Option<f64> {
        self.times.back().copied()
    }

    /// The newest counters of `service`.
    pub fn latest(&self, service: &str) -> Option<&Counters> {
        self.latest.get(service)
    }

    /// The times the rates are for: each sample but the oldest.
    pub fn rate_times(&self) -> Vec<f64> {
        self.times.iter().skip(1).copied().collect()
    }

    /// `service`'s rates over the ring.
    pub fn rates(&self, service: &str) -> Rates {
        let mut r = Rates::default();
        let Some(h) = self.services.get(service) else {
            let n = self.times.len().saturating_sub(1);
            r.received = vec![None; n];
            r.sent = vec![None; n];
            r.accepted = vec![None; n];
            r.requests = vec![None; n];
            r.active = vec![None; n];
            return r;
        };
        let steps = self.times.iter().zip(self.times.iter().skip(1));
        let pairs = h.points.iter().zip(h.points.iter().skip(1));
        for ((t0, t1), (p0, p1)) in steps.zip(pairs) {
            let dt = t1 - t0;
            let rate = |f: fn(&Point) -> u64| match (p0, p1) {
                (Some(a), Some(b)) if dt > 0.0 && f(b) >= f(a) => Some((f(b) - f(a)) as f64 / dt),
                _ => None,
            };
            r.received.push(rate(|p| p.received));
            r.sent.push(rate(|p| p.sent));
            r.accepted.push(rate(|p| p.accepted));
            r.requests.push(rate(|p| p.requests));
            r.active.push(p1.map(|p| p.active));
        }
        r
    }

    /// The `q` quantile (0..1) of `service`'s request latency, in seconds, over the requests
    /// since the oldest latency snapshot (about the last minute; since the start while the
    /// process is younger). `None` without requests in that window.
    pub fn latency_quantile(&self, service: &str, q: f64) -> Option<f64> {
        let now = &self.latest.get(service)?.latency;
        let base = self.services.get(service).and_then(|h| h.latency.front());
        let window: Vec<(f64, u64)> = now
            .iter()
            .map(|&(le, n)| {
                let before = base
                    .and_then(|b| b.iter().find(|(ble, _)| *ble == le))
                    .map_or(0, |(_, n)| *n);
                (le, n.saturating_sub(before))
            })
            .collect();
        quantile(&window, q)
    }
}

/// `histogram_quantile` as Prometheus computes it: linear interpolation inside the bucket the
/// rank falls in; the highest finite bound when it falls in `+Inf`.
pub fn quantile(buckets: &[(f64, u64)], q: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    if total == 0 {
        return None;
    }
    let rank = q.clamp(0.0, 1.0) * total as f64;
    let mut lower = (0.0, 0u64);
    for &(le, count) in buckets {
        if count as f64 >= rank {
            if le.is_infinite() {
                return Some(lower.0);
            }
            let inside = (count - lower.1) as f64;
            let into = rank - lower.1 as f64;
            let fraction = if inside > 0.0 { into / inside } else { 1.0 };
            return Some(lower.0 + (le - lower.0) * fraction);
        }
        lower = (le, count);
    }
    Some(lower.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counters(sent: u64, latency: Vec<(f64, u64)>) -> BTreeMap<String, Counters> {
        let c = Counters {
            sent,
            latency,
            ..Counters::default()
        };
        BTreeMap::from([("echo".to_string(), c)])
    }

    #[test]
    fn the_ring_is_bounded_and_rates_follow_the_counters() {
        let mut h = History::new(3);
        for (t, sent) in [(0.0, 0), (1.0, 100), (2.0, 300), (4.0, 500)] {
            h.push(t, counters(sent, vec![]));
        }
        assert_eq!(h.rate_times(), vec![2.0, 4.0]);
        let r = h.rates("echo");
        assert_eq!(r.sent, vec![Some(200.0), Some(100.0)]);
        // A service that appears later has no rate before its first sample, and one that goes
        // away is forgotten once the window has none of its samples.
        for t in [5.0, 6.0] {
            let mut both = counters(600, vec![]);
            both.insert("web".into(), Counters::default());
            h.push(t, both);
        }
        assert_eq!(h.rates("web").sent, vec![None, Some(0.0)]);
        for t in 7..10 {
            h.push(t as f64, counters(600, vec![]));
        }
        assert!(!h.services.contains_key("web"));
        assert_eq!(h.rates("web").sent, vec![None, None]);
    }

    #[test]
    fn quantiles_interpolate_like_prometheus() {
        let b = [(0.1, 50), (0.2, 100), (f64::INFINITY, 100)];
        assert_eq!(quantile(&b, 0.5), Some(0.1));
        assert!((quantile(&b, 0.75).unwrap() - 0.15).abs() < 1e-9);
        assert_eq!(quantile(&[(0.1, 0), (f64::INFINITY, 2)], 0.5), Some(0.1));
        assert_eq!(quantile(&[(f64::INFINITY, 0)], 0.5), None);
        assert_eq!(quantile(&[], 0.5), None);
    }

    #[test]
    fn latency_covers_the_window_since_the_oldest_snapshot() {
        let mut h = History::new(300);
        // Snapshot at sample 0: 10 fast requests. Later, 10 slow ones: the window is those.
        h.push(
            0.0,
            counters(0, vec![(0.01, 10), (1.0, 10), (f64::INFINITY, 10)]),
        );
        h.push(
            1.0,
            counters(0, vec![(0.01, 10), (1.0, 20), (f64::INFINITY, 20)]),
        );
        let p50 = h.latency_quantile("echo", 0.5).unwrap();
        assert!(p50 > 0.01 && p50 <= 1.0, "{p50}");
        assert_eq!(h.latency_quantile("nobody", 0.5), None);
    }
}
