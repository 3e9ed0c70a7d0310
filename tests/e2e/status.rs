//! The status page and `/status` (issue 20): the JSON checked field by field against known
//! traffic on both backends, reloads and the drain as it reports them, its access rules, the
//! page without JavaScript, and the live page in headless Chromium driven over the DevTools
//! protocol (a small client over WebSocket below), which also saves a screenshot.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::harness::*;

const TOKEN: &str = "tok-9f2c7d1e-never-shown";

/// echo, a fenced echo nobody may reach, http-hello and an exec with a token, metrics on.
fn config(metrics_allow: &str, fenced: bool) -> String {
    let fenced = if fenced {
        "[services.fenced]\nplugin = \"echo\"\nlisten = \"127.0.0.1:0\"\n\
         allow_from = [\"10.0.0.0/8\"]\n"
    } else {
        ""
    };
    format!(
        "[server]\nworkers = 2\nshutdown_grace = \"7s\"\n\
         [metrics]\nlisten = \"127.0.0.1:0\"\nallow_from = [{metrics_allow}]\n\
         [services.echo]\nplugin = \"echo\"\nlisten = \"127.0.0.1:0\"\n\
         {fenced}\
         [services.web]\nplugin = \"http-hello\"\nlisten = \"127.0.0.1:0\"\n\
         [services.exec]\nplugin = \"exec\"\nlisten = \"127.0.0.1:0\"\n\
         [services.exec.options]\ntoken = \"{TOKEN}\"\n\
         [services.exec.options.commands]\nhi = {{ argv = [\"/bin/echo\", \"hi\"] }}\n"
    )
}

/// `GET path` on the metrics listener: status, headers and body.
fn get(server: &Server, path: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(server.metrics.expect("metrics on")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, head.to_string(), body.to_string())
}

fn status_json(server: &Server) -> Value {
    let (code, head, body) = get(server, "/status");
    assert_eq!(code, 200, "{head}\n{body}");
    assert!(head.contains("Content-Type: application/json"), "{head}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

/// Polls `/status` until `ready` holds (the sampler reads the counters once a second).
fn status_when(server: &Server, what: &str, ready: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let doc = status_json(server);
        if ready(&doc) {
            return doc;
        }
        assert!(
            Instant::now() < deadline,
            "status never showed {what}: {doc:#}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn service<'a>(doc: &'a Value, name: &str) -> &'a Value {
    doc["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no service {name} in {doc:#}"))
}

/// One HTTP request on its own connection; (bytes sent, bytes received).
fn http_exchange(addr: SocketAddr) -> (u64, u64) {
    let request = b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n";
    let mut s = connect(addr);
    s.write_all(request).unwrap();
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).unwrap();
    assert!(answer.starts_with(b"HTTP/1.1 200"));
    (request.len() as u64, answer.len() as u64)
}

#[test]
fn status_json_counts_known_traffic_exactly_on_both_backends() {
    for backend in backends() {
        let mut server = Server::start(&config("", true), backend);
        // echo: three connections of known sizes, each closed once its echo is back.
        let sizes = [1usize, 4096, 100_000];
        for (i, n) in sizes.iter().enumerate() {
            assert_eq!(
                echo_roundtrip(server.addr("echo"), &payload(*n, i as u64), 3).len(),
                *n
            );
        }
        let echoed: u64 = sizes.iter().map(|&n| n as u64).sum();
        // fenced: two connections closed at accept.
        for _ in 0..2 {
            let mut s = connect(server.addr("fenced"));
            assert!(closed_within(&mut s, Duration::from_secs(5)));
        }
        // web: four requests.
        let (mut up, mut down) = (0, 0);
        for _ in 0..4 {
            let (sent, received) = http_exchange(server.addr("web"));
            up += sent;
            down += received;
        }

        let doc = status_when(&server, "the traffic", |d| {
            let (e, w, f) = (service(d, "echo"), service(d, "web"), service(d, "fenced"));
            e["bytes"]["sent"] == echoed
                && e["connections"]["active"] == 0
                && w["bytes"]["sent"] == down
                && w["connections"]["active"] == 0
                && f["connections"]["rejected"]["allow_from"] == 2
        });
        assert_eq!(doc["version"], 1);
        assert_eq!(doc["wharf_version"], env!("CARGO_PKG_VERSION"));
        assert_eq!(doc["state"], "ready");
        assert_eq!(doc["state_reason"], Value::Null);
        assert_eq!(doc["drain"], Value::Null);
        assert_eq!(
            doc["backend"],
            json!({"name": backend, "why": "configured"})
        );
        assert_eq!(doc["workers"], 2);
        assert_eq!(
            doc["config"],
            json!({"healthy": true, "reloads": {"success": 0, "invalid": 0, "failed": 0},
                   "last_reload": null})
        );
        assert!(doc["uptime_seconds"].as_f64().unwrap() > 0.0);
        let names: Vec<&str> = doc["services"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["name"].as_str().unwrap())
            .collect();
        assert_eq!(names.len(), 4, "{names:?}");

        // Every admission reason is registered (and shown) for every service.
        let rejections = |allow_from: u64| {
            json!({"allow_from": allow_from, "max_connections": 0, "proxy_protocol": 0,
                   "max_connections_per_source": 0, "max_connection_rate": 0,
                   "max_connection_rate_per_source": 0, "allow_uids": 0})
        };
        let no_rejections = rejections(0);
        let echo = service(&doc, "echo");
        assert_eq!(echo["plugin"], "echo");
        assert_eq!(echo["listen"], json!([server.addr("echo").to_string()]));
        assert_eq!(
            echo["connections"],
            json!({"active": 0, "accepted": 3, "rejected": no_rejections})
        );
        assert_eq!(echo["bytes"], json!({"received": echoed, "sent": echoed}));
        assert_eq!(echo["requests"], Value::Null);

        let fenced = service(&doc, "fenced");
        assert_eq!(
            fenced["connections"],
            json!({"active": 0, "accepted": 0, "rejected": rejections(2)})
        );
        assert_eq!(fenced["bytes"], json!({"received": 0, "sent": 0}));

        let web = service(&doc, "web");
        assert_eq!(web["plugin"], "http-hello");
        assert_eq!(web["connections"]["accepted"], 4);
        assert_eq!(web["bytes"], json!({"received": up, "sent": down}));
        let requests = &web["requests"];
        assert_eq!(requests["total"], 4);
        assert_eq!(
            requests["by_outcome"],
            json!({"2xx": 4, "4xx": 0, "5xx": 0})
        );
        let p50 = requests["p50_seconds"].as_f64().expect("p50 of 4 requests");
        let p99 = requests["p99_seconds"].as_f64().expect("p99 of 4 requests");
        assert!(p50 > 0.0 && p50 <= p99 && p99 < 1.0, "{requests}");

        // The history: aligned arrays, at most 5 minutes, the echo's bytes in them.
        let times = doc["history"]["unix"].as_array().unwrap().len();
        assert_eq!(doc["history"]["interval_seconds"], 1.0);
        assert!((1..=300).contains(&times), "{times}");
        for s in doc["services"].as_array().unwrap() {
            for series in [
                "received_bytes_per_second",
                "sent_bytes_per_second",
                "active",
            ] {
                assert_eq!(s["history"][series].as_array().unwrap().len(), times);
            }
        }
        // Rate times interval, over the intervals the axis spans, adds up to no more bytes
        // than were sent.
        let axis: Vec<f64> = doc["history"]["unix"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_f64().unwrap())
            .collect();
        let rates = echo["history"]["sent_bytes_per_second"].as_array().unwrap();
        let charted: f64 = (1..axis.len())
            .filter_map(|i| Some(rates[i].as_f64()? * (axis[i] - axis[i - 1])))
            .sum();
        assert!(charted <= echoed as f64 + 1.0, "{charted} > {echoed}");

        // Nothing secret, on the JSON or the page.
        let (_, _, page) = get(&server, "/");
        let (_, _, raw) = get(&server, "/status");
        for text in [&raw, &page] {
            assert!(!text.contains(TOKEN));
        }

        // A reload that removes a service: the last reload says so and the list follows.
        server.rewrite_config(&config("", false));
        server.expect_reload("configuration reloaded");
        let doc = status_when(&server, "the reload", |d| {
            d["config"]["last_reload"] != Value::Null
        });
        let reload = &doc["config"]["last_reload"];
        assert_eq!(reload["trigger"], "SIGHUP");
        assert_eq!(reload["result"], "success");
        assert!(
            reload["detail"]
                .as_str()
                .unwrap()
                .contains("removed=fenced"),
            "{reload}"
        );
        assert_eq!(doc["config"]["healthy"], true);
        assert_eq!(doc["services"].as_array().unwrap().len(), 3);
        // An invalid one: unhealthy, and nothing of the bad value is shown.
        server.rewrite_config(&config("", false).replace("workers = 2", "workers = \"tons\""));
        server.expect_reload("reload rejected");
        let doc = status_json(&server);
        assert_eq!(doc["config"]["healthy"], false);
        assert_eq!(
            doc["config"]["reloads"],
            json!({"success": 1, "invalid": 1, "failed": 0})
        );
        assert_eq!(doc["config"]["last_reload"]["result"], "invalid");
        assert!(!doc.to_string().contains("tons"));
    }
}

#[test]
fn status_shows_the_drain_while_connections_finish() {
    let mut server = Server::start(&config("", false), "epoll");
    let mut open = connect(server.addr("echo"));
    assert_eq!(echo_once(&mut open, b"hold\n"), b"hold\n");
    status_when(&server, "the open connection", |d| {
        service(d, "echo")["connections"]["active"] == 1
    });
    server.signal(libc::SIGTERM);
    let doc = status_when(&server, "the drain", |d| d["state"] == "draining");
    assert_eq!(doc["drain"]["grace_seconds"], 7.0);
    assert!(doc["drain"]["elapsed_seconds"].as_f64().unwrap() < 7.0);
    drop(open);
    assert!(server
        .wait(Duration::from_secs(10))
        .is_some_and(|s| s.success()));
}

#[test]
fn the_status_page_and_json_obey_metrics_allow_from() {
    let mut server = Server::start(&config("\"10.0.0.0/8\"", false), "epoll");
    for path in ["/", "/status", "/assets/status.js", "/metrics"] {
        let (code, _, body) = get(&server, path);
        assert_eq!(code, 403, "{path}: {body}");
    }
    assert_eq!(get(&server, "/healthz").0, 200);
    // Opened by a reload, the endpoint shows each refusal counted like a refused scrape.
    server.rewrite_config(&config("", false));
    server.expect_reload("configuration reloaded");
    assert_eq!(
        server.metric(
            "wharf_metrics_endpoint_rejected_total",
            &[("reason", "allow_from")]
        ),
        Some(4.0)
    );
    assert_eq!(get(&server, "/").0, 200);
}

#[test]
fn the_page_works_without_javascript_and_loads_nothing_from_elsewhere() {
    let server = Server::start(&config("", true), "epoll");
    assert_eq!(echo_roundtrip(server.addr("echo"), b"ping", 1).len(), 4);
    status_when(&server, "the echo", |d| {
        service(d, "echo")["connections"]["accepted"] == 1
    });
    let (code, head, page) = get(&server, "/");
    assert_eq!(code, 200);
    assert!(
        head.contains("Content-Type: text/html; charset=utf-8"),
        "{head}"
    );
    assert!(
        head.contains("Content-Security-Policy: default-src 'none'"),
        "{head}"
    );
    // The static snapshot: one row per service with its numbers, the server facts.
    for name in ["echo", "fenced", "web", "exec"] {
        assert!(
            page.contains(&format!("<tr data-service=\"{name}\">")),
            "{name}:\n{page}"
        );
    }
    let echo_row = page
        .split("<tr data-service=\"echo\">")
        .nth(1)
        .and_then(|r| r.split("</tr>").next())
        .unwrap();
    assert!(
        echo_row.contains("data-field=\"accepted\">1</td>"),
        "{echo_row}"
    );
    assert!(page.contains("data-field=\"backend\">epoll (configured)</dd>"));
    // Every script and stylesheet is served here, and nothing points elsewhere.
    let mut assets = 0;
    for attr in ["src=\"", "href=\""] {
        for part in page.split(attr).skip(1) {
            let target = part.split('"').next().unwrap();
            assert!(
                target.starts_with('/') || target.starts_with('#'),
                "{target}"
            );
            if target.starts_with("/assets/") {
                let (code, _, body) = get(&server, target);
                assert_eq!(code, 200, "{target}");
                assert!(!body.is_empty());
                assets += 1;
            }
        }
    }
    assert_eq!(assets, 4, "uPlot's script and style, the page's own");
    assert_eq!(get(&server, "/assets/nope.js").0, 404);
}

// ---------------------------------------------------------------------------------------
// Headless Chromium over the DevTools protocol.

/// A headless Chromium, killed (with its whole process group) on drop.
struct Chromium {
    child: Child,
    _profile: TempDir,
}

impl Chromium {
    /// Starts it and returns it with its browser-level DevTools WebSocket URL.
    fn start() -> (Chromium, String) {
        let profile = TempDir::new();
        let mut cmd = Command::new("chromium");
        cmd.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            "--remote-debugging-address=127.0.0.1",
            "--remote-debugging-port=0",
        ])
        .arg(format!("--user-data-dir={}", profile.0.display()))
        .arg("about:blank")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let mut child = cmd.spawn().expect("chromium starts");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        // Reads its stderr to the end (so it never blocks on a full pipe), handing over the
        // DevTools URL and keeping the rest for an error message.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let found = line
                    .split_once("DevTools listening on ")
                    .map(|(_, url)| url.trim().to_string());
                let _ = tx.send((found, line));
            }
        });
        let browser = Chromium {
            child,
            _profile: profile,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut said = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok((Some(url), _)) => return (browser, url),
                Ok((None, line)) => said.push(line),
                Err(_) => panic!("chromium gave no DevTools URL:\n{}", said.join("\n")),
            }
        }
    }
}

impl Drop for Chromium {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the process group of our own child.
        unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

/// A DevTools protocol client on one page: commands go out with ids, answers are matched by
/// id, events are skipped.
struct DevTools {
    socket: tungstenite::WebSocket<tungstenite::stream::MaybeTlsStream<TcpStream>>,
    session: String,
    next_id: u64,
}

impl DevTools {
    /// Connects to the browser at `url` and opens a page on `page_url`.
    fn open(url: &str, page_url: &str) -> DevTools {
        let (socket, _) = tungstenite::connect(url).expect("DevTools WebSocket");
        if let tungstenite::stream::MaybeTlsStream::Plain(s) = socket.get_ref() {
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        }
        let mut cdp = DevTools {
            socket,
            session: String::new(),
            next_id: 0,
        };
        let target = cdp.call("Target.createTarget", json!({"url": "about:blank"}));
        let target = target["targetId"].as_str().unwrap().to_string();
        let attached = cdp.call(
            "Target.attachToTarget",
            json!({"targetId": target, "flatten": true}),
        );
        cdp.session = attached["sessionId"].as_str().unwrap().to_string();
        cdp.call("Page.enable", json!({}));
        cdp.viewport(1280, 900, false);
        cdp.call("Page.navigate", json!({"url": page_url}));
        cdp
    }

    /// Sends `method` and returns its result; panics on a protocol error.
    fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut message = json!({"id": id, "method": method, "params": params});
        if !self.session.is_empty() {
            message["sessionId"] = json!(self.session);
        }
        self.socket
            .send(tungstenite::Message::text(message.to_string()))
            .unwrap();
        loop {
            let frame = self.socket.read().expect("DevTools answer");
            let tungstenite::Message::Text(text) = frame else {
                continue;
            };
            let answer: Value = serde_json::from_str(text.as_str()).unwrap();
            if answer["id"] != id {
                continue;
            }
            if let Some(error) = answer.get("error") {
                panic!("{method}: {error}");
            }
            return answer["result"].clone();
        }
    }

    /// Evaluates `expression` in the page and returns its value.
    fn eval(&mut self, expression: &str) -> Value {
        let result = self.call(
            "Runtime.evaluate",
            json!({"expression": expression, "returnByValue": true}),
        );
        if let Some(exception) = result.get("exceptionDetails") {
            panic!("{expression}: {exception}");
        }
        result["result"]["value"].clone()
    }

    /// Polls `expression` until it is `true`.
    fn wait_for(&mut self, what: &str, expression: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.eval(expression) != Value::Bool(true) {
            let state = self.eval("JSON.stringify({updates: window.wharfStatus && wharfStatus.updates, error: window.wharfStatus && wharfStatus.error, body: document.body && document.body.innerText.slice(0, 2000)})");
            assert!(Instant::now() < deadline, "{what} never happened: {state}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn viewport(&mut self, width: u32, height: u32, mobile: bool) {
        self.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile}),
        );
    }

    /// A PNG of the page as it is.
    fn screenshot(&mut self) -> Vec<u8> {
        let shot = self.call(
            "Page.captureScreenshot",
            json!({"format": "png", "captureBeyondViewport": true}),
        );
        use base64::Engine;
        base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().unwrap())
            .unwrap()
    }
}

/// A bounded load until dropped: echo traffic at about 1 MB/s and about 50 HTTP requests a
/// second, on two threads.
struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(echo: SocketAddr, web: SocketAddr) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let echo_stop = Arc::clone(&stop);
        let echo_thread = std::thread::spawn(move || {
            let mut s = connect(echo);
            let chunk = payload(20_000, 7);
            while !echo_stop.load(Ordering::Relaxed) {
                assert_eq!(echo_once(&mut s, &chunk).len(), chunk.len());
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        let web_stop = Arc::clone(&stop);
        let web_thread = std::thread::spawn(move || {
            while !web_stop.load(Ordering::Relaxed) {
                http_exchange(web);
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        Load {
            stop,
            threads: vec![echo_thread, web_thread],
        }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[test]
fn chromium_sees_the_page_update_live_under_load() {
    if !have_tool("chromium", "--version") {
        return;
    }
    let server = Server::start(&config("", true), "epoll");
    let load = Load::start(server.addr("echo"), server.addr("web"));
    let (_browser, url) = Chromium::start();
    let page = format!("http://{}/", server.metrics.unwrap());
    let mut cdp = DevTools::open(&url, &page);

    // The script took over, and the charts move: the echo chart's newest point advances and
    // shows bytes flowing.
    cdp.wait_for(
        "the first updates",
        "window.wharfStatus !== undefined && wharfStatus.updates >= 2",
    );
    let newest = "(function(){var u=wharfStatus.charts.echo; if(!u) return 0; \
                  var x=u.data[0]; return x.length ? x[x.length-1] : 0;})()";
    let first = cdp.eval(newest).as_f64().unwrap_or(0.0);
    cdp.wait_for(
        "the echo chart to move with non-zero rates",
        &format!(
            "(function(){{var u=wharfStatus.charts.echo; if(!u) return false; \
             var x=u.data[0], y=u.data[2]; \
             return x.length >= 3 && x[x.length-1] > {first} \
               && y.slice(-3).some(function(v){{return v > 0;}});}})()"
        ),
    );
    // The DOM: a row per service, non-zero rates where traffic flows, none where it cannot.
    let rows = cdp.eval(
        "Array.from(document.querySelectorAll('tr[data-service]')).map(function(r){ \
           var f=function(n){return r.querySelector('[data-field='+n+']').textContent;}; \
           return [r.dataset.service, f('in'), f('out'), f('requests'), f('p50')]; })",
    );
    let rows: BTreeMap<String, Vec<String>> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let cells: Vec<String> = r
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c.as_str().unwrap().to_string())
                .collect();
            (cells[0].clone(), cells[1..].to_vec())
        })
        .collect();
    assert_eq!(
        rows.keys().map(String::as_str).collect::<Vec<_>>(),
        ["echo", "exec", "fenced", "web"],
        "{rows:?}"
    );
    let flowing =
        |cell: &str| cell.ends_with("/s") && cell.chars().any(|c| ('1'..='9').contains(&c));
    for name in ["echo", "web"] {
        let cells = &rows[name];
        assert!(
            flowing(&cells[0]) && flowing(&cells[1]),
            "{name}: {cells:?}"
        );
    }
    assert_eq!(rows["fenced"][0], "0 B/s", "{rows:?}");
    assert!(rows["web"][2].contains("2xx"), "{rows:?}");
    assert!(
        rows["web"][3].ends_with("s") && rows["web"][3] != "-",
        "{rows:?}"
    );
    assert_eq!(
        cdp.eval("document.querySelectorAll('.chart canvas').length"),
        4
    );
    assert_eq!(cdp.eval("wharfStatus.error"), Value::Null);

    let shot = cdp.screenshot();
    assert!(shot.starts_with(b"\x89PNG"));
    let out = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("status.png");
    std::fs::write(&out, &shot).unwrap();
    eprintln!("screenshot: {}", out.display());

    // Keyboard: the skip link is the first stop and leads to the services; the table frame
    // takes focus so it can be scrolled without a mouse.
    cdp.call(
        "Input.dispatchKeyEvent",
        json!({"type": "keyDown", "key": "Tab", "code": "Tab", "windowsVirtualKeyCode": 9}),
    );
    cdp.call(
        "Input.dispatchKeyEvent",
        json!({"type": "keyUp", "key": "Tab", "code": "Tab", "windowsVirtualKeyCode": 9}),
    );
    assert_eq!(
        cdp.eval("document.activeElement.getAttribute('href')"),
        "#services"
    );
    assert_eq!(
        cdp.eval("document.querySelector('.table-wrap').tabIndex"),
        0
    );

    // Phone width: nothing wider than the screen, the services as cards.
    cdp.viewport(390, 844, true);
    cdp.wait_for(
        "the phone layout",
        "document.documentElement.scrollWidth <= window.innerWidth \
         && getComputedStyle(document.querySelector('td')).display === 'flex'",
    );
    let phone = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("status-phone.png");
    std::fs::write(&phone, cdp.screenshot()).unwrap();
    drop(load);
}
