//! The status page, `GET /`: server-rendered HTML of the [`Document`], complete without
//! JavaScript (a static snapshot: the server table, the services table, the last reload), and
//! the embedded assets under `/assets/` that make it live: `status.js` polls `/status` every
//! second, updates the numbers and draws each service's bytes in/out per second with uPlot
//! 1.6.32 (vendored from npm, see `assets/README.md`). Every asset is compiled into the
//! binary; the page's Content-Security-Policy allows nothing from elsewhere.
//!
//! The formatting rules (units, rounding) are the same here and in `status.js`, so a number
//! does not change form when the script takes over.

use std::fmt::Write;

use super::json::{Document, Service};

/// The Content-Security-Policy of the page: its own scripts, styles and `/status`, nothing
/// else (no inline script, no other origin).
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

/// An embedded file served under `/assets/`.
pub struct Asset {
    pub content_type: &'static str,
    pub body: &'static str,
}

/// The asset at `path` (`/assets/<name>`), if there is one.
pub fn asset(path: &str) -> Option<Asset> {
    const JS: &str = "text/javascript; charset=utf-8";
    const CSS: &str = "text/css; charset=utf-8";
    let (content_type, body) = match path.strip_prefix("/assets/")? {
        "status.js" => (JS, include_str!("assets/status.js")),
        "status.css" => (CSS, include_str!("assets/status.css")),
        "uPlot.iife.min.js" => (JS, include_str!("assets/uPlot.iife.min.js")),
        "uPlot.min.css" => (CSS, include_str!("assets/uPlot.min.css")),
        _ => return None,
    };
    Some(Asset { content_type, body })
}

/// `text` with HTML's special characters escaped.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for ch in text.chars() {
        match ch {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            other => out.push(other),
        }
    }
    out
}

/// `1536` -> `1.5 KiB`, like `status.js`'s `bytes()`.
pub fn bytes(n: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n.max(0.0);
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{value:.0} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// A rate in bytes per second, `-` when unknown.
fn byte_rate(rate: Option<f64>) -> String {
    rate.map_or_else(|| "-".into(), |r| format!("{}/s", bytes(r)))
}

/// Seconds as `850 µs`, `12.3 ms` or `1.50 s`, `-` when unknown, like `status.js`'s `secs()`.
fn secs(s: Option<f64>) -> String {
    match s {
        None => "-".into(),
        Some(s) if s < 0.001 => format!("{:.0} µs", s * 1e6),
        Some(s) if s < 1.0 => format!("{:.1} ms", s * 1e3),
        Some(s) => format!("{s:.2} s"),
    }
}

/// `3725` -> `1h 2m 5s`, like `status.js`'s `uptime()`.
fn uptime(seconds: f64) -> String {
    let s = seconds.max(0.0) as u64;
    let (d, h, m, s) = (s / 86400, s / 3600 % 24, s / 60 % 60, s % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s}s"),
        (0, _, _) => format!("{h}h {m}m {s}s"),
        _ => format!("{d}d {h}h {m}m"),
    }
}

/// The non-zero counts, `allow_from 2, max_connections 1`; `0` when there are none.
fn by_key(counts: &std::collections::BTreeMap<String, u64>) -> String {
    let said: Vec<String> = counts
        .iter()
        .filter(|(_, v)| **v > 0)
        .map(|(k, v)| format!("{k} {v}"))
        .collect();
    if said.is_empty() {
        "0".into()
    } else {
        said.join(", ")
    }
}

/// What the server row says about the config.
fn config_text(doc: &Document) -> String {
    let health = if doc.config.healthy {
        "healthy"
    } else {
        "last reload not applied"
    };
    match &doc.config.last_reload {
        None => format!("{health}; no reload since the start"),
        Some(r) => format!(
            "{health}; last reload ({}, {}): {} – {}",
            r.trigger,
            ago(doc.now_unix - r.at_unix),
            r.result,
            r.detail
        ),
    }
}

fn ago(seconds: f64) -> String {
    format!("{} ago", uptime(seconds))
}

/// The drain, or `-`.
fn drain_text(doc: &Document) -> String {
    doc.drain.as_ref().map_or_else(
        || "-".into(),
        |d| {
            format!(
                "draining for {:.0} s of a {:.0} s grace",
                d.elapsed_seconds, d.grace_seconds
            )
        },
    )
}

/// The columns of the services table: header, field name (for `status.js` and the phone
/// layout's labels) and value.
fn columns(s: &Service) -> [(&'static str, &'static str, String); 10] {
    let (requests, p50, p99) = match &s.requests {
        Some(r) => (
            match r.total {
                0 => "0".to_string(),
                total => format!("{total} ({})", by_key(&r.by_outcome)),
            },
            secs(r.p50_seconds),
            secs(r.p99_seconds),
        ),
        None => ("-".into(), "-".into(), "-".into()),
    };
    [
        ("Plugin", "plugin", s.plugin.clone()),
        ("Listen", "listen", s.listen.join(" ")),
        ("Active", "active", s.connections.active.to_string()),
        ("Accepted", "accepted", s.connections.accepted.to_string()),
        ("Rejected", "rejected", by_key(&s.connections.rejected)),
        ("In", "in", byte_rate(s.rates.received_bytes_per_second)),
        ("Out", "out", byte_rate(s.rates.sent_bytes_per_second)),
        ("Requests", "requests", requests),
        ("p50", "p50", p50),
        ("p99", "p99", p99),
    ]
}

/// The page for `doc`.
pub fn html(doc: &Document) -> String {
    let mut h = String::with_capacity(8192);
    let _ = write!(
        h,
        "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>wharf status</title>\n\
         <link rel=\"stylesheet\" href=\"/assets/uPlot.min.css\">\n\
         <link rel=\"stylesheet\" href=\"/assets/status.css\">\n</head>\n<body>\n\
         <a class=\"skip\" href=\"#services\">Skip to the services</a>\n\
         <header>\n<h1>wharf <span data-field=\"wharf_version\">{version}</span></h1>\n\
         <p class=\"state state-{state}\" data-field=\"state\" role=\"status\">{state}</p>\n\
         </header>\n<main>\n\
         <section aria-labelledby=\"server-heading\">\n<h2 id=\"server-heading\">Server</h2>\n\
         <dl class=\"facts\">\n\
         <div><dt>Uptime</dt><dd data-field=\"uptime\">{uptime}</dd></div>\n\
         <div><dt>Backend</dt><dd data-field=\"backend\">{backend} ({why})</dd></div>\n\
         <div><dt>Workers</dt><dd data-field=\"workers\">{workers}</dd></div>\n\
         <div><dt>Config</dt><dd data-field=\"config\">{config}</dd></div>\n\
         <div><dt>Drain</dt><dd data-field=\"drain\">{drain}</dd></div>\n\
         </dl>\n</section>\n",
        version = escape(doc.wharf_version),
        state = doc.state,
        uptime = uptime(doc.uptime_seconds),
        backend = doc.backend.name,
        why = escape(&doc.backend.why),
        workers = doc.workers,
        config = escape(&config_text(doc)),
        drain = drain_text(doc),
    );
    h.push_str(
        "<section id=\"services\" aria-labelledby=\"services-heading\">\n\
         <h2 id=\"services-heading\">Services</h2>\n\
         <div class=\"table-wrap\" role=\"region\" aria-labelledby=\"services-heading\" tabindex=\"0\">\n\
         <table>\n<caption>Rates over the last second; p50 and p99 of request latency over \
         about the last minute.</caption>\n<thead><tr><th scope=\"col\">Service</th>",
    );
    let header = doc.services.first().map(columns);
    for (title, _, _) in header.iter().flatten() {
        let _ = write!(h, "<th scope=\"col\">{title}</th>");
    }
    h.push_str("</tr></thead>\n<tbody data-field=\"services\">\n");
    for s in &doc.services {
        let name = escape(&s.name);
        let _ = write!(
            h,
            "<tr data-service=\"{name}\"><th scope=\"row\">{name}</th>"
        );
        for (title, field, value) in columns(s) {
            let _ = write!(
                h,
                "<td data-label=\"{title}\" data-field=\"{field}\">{}</td>",
                escape(&value)
            );
        }
        h.push_str("</tr>\n");
    }
    if doc.services.is_empty() {
        h.push_str("<tr><td>no services are running</td></tr>\n");
    }
    h.push_str("</tbody>\n</table>\n</div>\n<div class=\"charts\" data-field=\"charts\">\n");
    for s in &doc.services {
        let name = escape(&s.name);
        let _ = write!(
            h,
            "<figure class=\"chart\" data-chart=\"{name}\">\n<figcaption>{name}: bytes per \
             second in and out, last 5 minutes</figcaption>\n<div class=\"plot\" role=\"img\" \
             aria-label=\"{name}: in {} and out {} now\"></div>\n</figure>\n",
            byte_rate(s.rates.received_bytes_per_second),
            byte_rate(s.rates.sent_bytes_per_second),
        );
    }
    h.push_str(
        "</div>\n</section>\n</main>\n<footer>\n\
         <p data-field=\"live\">A snapshot: reload the page for new numbers, or turn JavaScript \
         on for live ones.</p>\n\
         <p>Machine-readable: <a href=\"/status\">/status</a> (JSON) and \
         <a href=\"/metrics\">/metrics</a> (Prometheus).</p>\n</footer>\n\
         <script src=\"/assets/uPlot.iife.min.js\"></script>\n\
         <script src=\"/assets/status.js\"></script>\n</body>\n</html>\n",
    );
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_read_like_the_script_shows_them() {
        assert_eq!(bytes(0.0), "0 B");
        assert_eq!(bytes(1536.0), "1.5 KiB");
        assert_eq!(bytes(3.0 * 1024.0 * 1024.0), "3.0 MiB");
        assert_eq!(secs(Some(0.000_25)), "250 µs");
        assert_eq!(secs(Some(0.0123)), "12.3 ms");
        assert_eq!(secs(Some(1.5)), "1.50 s");
        assert_eq!(uptime(3725.0), "1h 2m 5s");
        assert_eq!(uptime(42.0), "42s");
    }

    #[test]
    fn text_is_escaped() {
        assert_eq!(
            escape("<a href=\"x\">'&'</a>"),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
    }

    #[test]
    fn every_asset_the_page_names_is_embedded() {
        let page = html(&Document::build(
            &super::super::Board::new("epoll", "configured".into(), 1).lock(),
            &crate::metrics_http::Readiness::default(),
            &super::super::history::History::new(3),
            0.0,
        ));
        for part in page.split("=\"/assets/").skip(1) {
            let name = part.split('"').next().unwrap_or_default();
            assert!(asset(&format!("/assets/{name}")).is_some(), "{name}");
        }
        assert!(!page.contains("http://") && !page.contains("https://"));
    }
}
