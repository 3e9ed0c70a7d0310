//! The few series the status shows, read from the registry's exposition text and summed per
//! service (a reload that changes a service's plugin starts new series under the same service
//! name; the sums stay monotonic). Names come from [`wharf_core::metrics::names`], so a renamed
//! metric breaks the build, not the page. Any line it does not understand is skipped.

use std::collections::BTreeMap;

use wharf_core::metrics::names;

/// One service's counters, cumulative since the start (`active` is a gauge).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Counters {
    pub received: u64,
    pub sent: u64,
    pub accepted: u64,
    pub active: u64,
    /// By `reason`.
    pub rejected: BTreeMap<String, u64>,
    /// By `outcome`; empty for plugins without requests.
    pub requests: BTreeMap<String, u64>,
    /// Request latency: cumulative counts by upper bound (seconds, `+Inf` last), ascending.
    pub latency: Vec<(f64, u64)>,
}

impl Counters {
    /// Every request finished so far.
    pub fn requests_total(&self) -> u64 {
        self.requests.values().sum()
    }
}

/// The wharf service series of `exposition`, by service name.
pub fn per_service(exposition: &str) -> BTreeMap<String, Counters> {
    let latency_bucket = format!("{}_bucket", names::REQUEST_DURATION);
    let mut out: BTreeMap<String, Counters> = BTreeMap::new();
    for line in exposition.lines() {
        let Some(Line {
            name,
            labels,
            value,
        }) = parse_line(line)
        else {
            continue;
        };
        let Some(service) = label(&labels, "service") else {
            continue;
        };
        let c = out.entry(service.to_string()).or_default();
        // Counters are whole numbers; the float is exact below 2^53.
        let n = if value.is_finite() && value > 0.0 {
            value as u64
        } else {
            0
        };
        match name {
            names::RECEIVED_BYTES => c.received += n,
            names::SENT_BYTES => c.sent += n,
            names::ACCEPTED => c.accepted += n,
            names::ACTIVE => c.active += n,
            names::REJECTED => {
                let reason = label(&labels, "reason").unwrap_or("other");
                *c.rejected.entry(reason.to_string()).or_default() += n;
            }
            names::REQUESTS => {
                let outcome = label(&labels, "outcome").unwrap_or("other");
                *c.requests.entry(outcome.to_string()).or_default() += n;
            }
            _ if name == latency_bucket => {
                let le = match label(&labels, "le") {
                    Some("+Inf") => f64::INFINITY,
                    Some(le) => match le.parse() {
                        Ok(le) => le,
                        Err(_) => continue,
                    },
                    None => continue,
                };
                add_bucket(&mut c.latency, le, n);
            }
            _ => {}
        }
    }
    out
}

/// Adds `n` to the bucket `le`, keeping the buckets sorted by bound.
fn add_bucket(buckets: &mut Vec<(f64, u64)>, le: f64, n: u64) {
    match buckets.binary_search_by(|(b, _)| b.total_cmp(&le)) {
        Ok(i) => buckets[i].1 += n,
        Err(i) => buckets.insert(i, (le, n)),
    }
}

/// One sample line of the exposition.
struct Line<'a> {
    name: &'a str,
    /// Label names and (unescaped) values.
    labels: Vec<(&'a str, String)>,
    value: f64,
}

/// `name{a="x",b="y"} value` (labels optional, a timestamp after the value allowed) as its
/// parts; `None` for comments, blank lines and anything malformed.
fn parse_line(line: &str) -> Option<Line<'_>> {
    if line.starts_with('#') || line.trim().is_empty() {
        return None;
    }
    let name_end = line.find(['{', ' '])?;
    let (name, mut rest) = line.split_at(name_end);
    let mut labels = Vec::new();
    if let Some(after_brace) = rest.strip_prefix('{') {
        rest = after_brace;
        loop {
            rest = rest.trim_start_matches(',');
            if let Some(after) = rest.strip_prefix('}') {
                rest = after;
                break;
            }
            let (key, after_key) = rest.split_once("=\"")?;
            let (value, after_value) = quoted(after_key)?;
            labels.push((key.trim(), value));
            rest = after_value;
        }
    }
    let value = rest.split_whitespace().next()?.parse().ok()?;
    Some(Line {
        name,
        labels,
        value,
    })
}

/// The text up to the closing quote, unescaped (`\"`, `\\`, `\n`), and what follows the quote.
fn quoted(s: &str) -> Option<(String, &str)> {
    let mut out = String::new();
    let mut chars = s.char_indices();
    while let Some((i, ch)) = chars.next() {
        match ch {
            '"' => return Some((out, &s[i + 1..])),
            '\\' => match chars.next()?.1 {
                'n' => out.push('\n'),
                other => out.push(other),
            },
            other => out.push(other),
        }
    }
    None
}

fn label<'a>(labels: &'a [(&str, String)], key: &str) -> Option<&'a str> {
    labels
        .iter()
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_each_service_across_its_series_and_keeps_buckets_in_order() {
        let text = "# HELP wharf_sent_bytes_total Bytes.\n\
            wharf_sent_bytes_total{service=\"echo\",plugin=\"echo\",backend=\"epoll\"} 10\n\
            wharf_sent_bytes_total{service=\"echo\",plugin=\"old\",backend=\"epoll\"} 5\n\
            wharf_received_bytes_total{service=\"web\",plugin=\"http-hello\",backend=\"epoll\"} 7\n\
            wharf_connections_rejected_total{service=\"echo\",reason=\"allow_from\"} 2\n\
            wharf_requests_total{service=\"web\",outcome=\"2xx\"} 3\n\
            wharf_request_duration_seconds_bucket{service=\"web\",le=\"+Inf\"} 3\n\
            wharf_request_duration_seconds_bucket{service=\"web\",le=\"0.001\"} 2\n\
            wharf_connections_active{service=\"echo\"} 1\n\
            process_threads 4\n";
        let s = per_service(text);
        assert_eq!(s["echo"].sent, 15);
        assert_eq!(s["echo"].active, 1);
        assert_eq!(s["echo"].rejected["allow_from"], 2);
        assert_eq!(s["web"].received, 7);
        assert_eq!(s["web"].requests_total(), 3);
        assert_eq!(s["web"].latency, vec![(0.001, 2), (f64::INFINITY, 3)]);
        assert_eq!(s.len(), 2);
    }

    #[test]
    fn malformed_lines_are_skipped_without_panicking() {
        for line in [
            "wharf_sent_bytes_total{service=\"echo\" 1",
            "wharf_sent_bytes_total{service=\"ec\\",
            "wharf_sent_bytes_total{service=\"echo\"} x",
            "wharf_sent_bytes_total{service=\"echo\"}",
            "{",
            "wharf_sent_bytes_total{service=\"echo\"} -5",
            "wharf_sent_bytes_total{service=\"echo\"} NaN",
            "\u{e9}{\u{e9}=\"\u{e9}\"} 1",
        ] {
            let s = per_service(line);
            assert!(s.values().all(|c| c.sent == 0), "{line}");
        }
        assert_eq!(
            parse_line("a{b=\"q\\\"x\\\\\"} 2 1700000000")
                .map(|l| (l.labels[0].1.clone(), l.value)),
            Some(("q\"x\\".to_string(), 2.0))
        );
    }
}
