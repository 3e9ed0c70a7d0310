//! The access log through the real binary on both backends: every field of each plugin's lines
//! in both formats (JSON parsed with serde_json, logfmt with a strict parser below), the TLS
//! identity, refusals, secrets that never appear, rotation by SIGUSR1 while clients run (and by
//! the real logrotate with the shipped snippet), overload counted instead of blocking, and the
//! config errors and reload warnings.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::harness::*;
use crate::pki::{Names, Pki};

/// One line, every value as text (JSON numbers as they print).
type Line = BTreeMap<String, String>;

const FORMATS: [&str; 2] = ["json", "logfmt"];

/// Parses one line of `format`; panics on anything malformed (a torn line included).
fn parse(format: &str, text: &str) -> Line {
    match format {
        "json" => {
            let value: serde_json::Value =
                serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text:?}"));
            let object = value.as_object().unwrap_or_else(|| panic!("{text}"));
            object
                .iter()
                .map(|(k, v)| {
                    let v = match v {
                        serde_json::Value::String(s) => s.clone(),
                        serde_json::Value::Number(n) => n.to_string(),
                        other => panic!("unexpected value {other} in {text}"),
                    };
                    (k.clone(), v)
                })
                .collect()
        }
        _ => parse_logfmt(text),
    }
}

/// A strict logfmt parser: `key=value` pairs separated by one space; keys are lowercase words;
/// a value is bare (printable ASCII without `"`, `=`, `\`) or quoted with `\"`, `\\`, `\n`,
/// `\r`, `\t` and `\uXXXX` escapes.
fn parse_logfmt(text: &str) -> Line {
    let mut line = Line::new();
    let mut rest = text;
    let bad = |why: &str| -> ! { panic!("bad logfmt ({why}): {text:?}") };
    while !rest.is_empty() {
        let (key, after) = rest.split_once('=').unwrap_or_else(|| bad("no ="));
        if key.is_empty()
            || !key
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        {
            bad("key");
        }
        let (value, after) = if let Some(quoted) = after.strip_prefix('"') {
            let mut value = String::new();
            let mut chars = quoted.char_indices();
            let end = loop {
                let Some((i, c)) = chars.next() else {
                    bad("unterminated quote")
                };
                match c {
                    '"' => break i + 1,
                    '\\' => match chars.next().map(|(_, c)| c) {
                        Some('"') => value.push('"'),
                        Some('\\') => value.push('\\'),
                        Some('n') => value.push('\n'),
                        Some('r') => value.push('\r'),
                        Some('t') => value.push('\t'),
                        Some('u') => {
                            let hex: String = (0..4)
                                .filter_map(|_| chars.next())
                                .map(|(_, c)| c)
                                .collect();
                            let code = u32::from_str_radix(&hex, 16).unwrap_or_else(|_| bad("\\u"));
                            value.push(char::from_u32(code).unwrap_or_else(|| bad("\\u")));
                        }
                        _ => bad("escape"),
                    },
                    c if c.is_control() => bad("raw control character"),
                    c => value.push(c),
                }
            };
            (value, &quoted[end..])
        } else {
            let end = after.find(' ').unwrap_or(after.len());
            let value = &after[..end];
            if value.is_empty()
                || !value
                    .bytes()
                    .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'=' && b != b'\\')
            {
                bad("bare value");
            }
            (value.to_string(), &after[end..])
        };
        if line.insert(key.to_string(), value).is_some() {
            bad("key twice");
        }
        rest = match after.strip_prefix(' ') {
            Some(r) if !r.is_empty() => r,
            Some(_) => bad("trailing space"),
            None if after.is_empty() => "",
            None => bad("no space between pairs"),
        };
    }
    line
}

/// Every line of the file at `path` (none if it does not exist), parsed.
fn read_lines(format: &str, path: &Path) -> Vec<Line> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        text.is_empty() || text.ends_with('\n'),
        "torn last line: {text:?}"
    );
    text.lines().map(|l| parse(format, l)).collect()
}

/// Waits until the file holds at least `count` lines matching `want`; returns those.
fn wait_lines(format: &str, path: &Path, count: usize, want: impl Fn(&Line) -> bool) -> Vec<Line> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let found: Vec<Line> = read_lines(format, path).into_iter().filter(&want).collect();
        if found.len() >= count {
            return found;
        }
        if Instant::now() > deadline {
            panic!(
                "{count} matching line(s) wanted, {} found in:\n{}",
                found.len(),
                std::fs::read_to_string(path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn is(line: &Line, key: &str, value: &str) -> bool {
    line.get(key).map(String::as_str) == Some(value)
}

/// Checks the fields every line has: a UTC time to the millisecond, the service and plugin,
/// a client address.
fn common(line: &Line, service: &str, plugin: &str) {
    let time = &line["time"];
    assert!(
        time.len() == 24 && time.ends_with('Z') && time.as_bytes()[10] == b'T',
        "time: {line:?}"
    );
    assert!(
        is(line, "service", service) && is(line, "plugin", plugin),
        "{line:?}"
    );
    assert!(line["client"].starts_with("127.0.0.1:"), "{line:?}");
}

fn duration_ms(line: &Line) -> f64 {
    let d: f64 = line["duration_ms"].parse().unwrap();
    assert!((0.0..60_000.0).contains(&d), "{line:?}");
    d
}

fn access_log_table(path: &Path, format: &str, extra: &str) -> String {
    format!(
        "\n[access_log]\npath = \"{}\"\nformat = \"{format}\"\n{extra}\n",
        path.display()
    )
}

const TOKEN: &str = "tok-3f9a1c77e2";
const SECRET_ARG: &str = "arg-5be01d4493";
const SECRET_QUERY: &str = "query-9c2e7a01f4";

#[test]
fn every_plugin_logs_its_fields_in_both_formats_and_no_secret() {
    let root = TempDir::new();
    root.write("hello.txt", "hello, file\n");
    for format in FORMATS {
        for backend in backends() {
            let dir = TempDir::new();
            let log = dir.0.join("access.log");
            let exec = format!(
                "[services.exec.options]\ntoken = \"{TOKEN}\"\ncwd = \"{}\"\n\
                 [services.exec.options.commands]\n\
                 echo = {{ argv = [\"echo\"], allow_args = true }}\n\
                 false = {{ argv = [\"false\"] }}\n{}",
                dir.0.display(),
                access_log_table(&log, format, "")
            );
            let server = Server::start(&all_plugins_config(&root.0, &exec), backend);

            // echo: a connection line only, with the exact byte counts.
            let mut s = connect(server.addr("echo"));
            let me = s.local_addr().unwrap().to_string();
            assert_eq!(echo_once(&mut s, b"hello\n"), b"HELLO\n");
            drop(s);
            let lines = wait_lines(format, &log, 1, |l| is(l, "service", "echo"));
            let l = &lines[0];
            common(l, "echo", "echo");
            assert!(
                is(l, "event", "connection") && is(l, "client", &me),
                "{l:?}"
            );
            assert!(is(l, "outcome", "closed"), "{l:?}");
            assert!(is(l, "bytes_in", "6") && is(l, "bytes_out", "6"), "{l:?}");
            assert!(
                !l.contains_key("proxy") && !l.contains_key("identity"),
                "{l:?}"
            );
            duration_ms(l);

            // http-hello: two requests (one with a body) on one connection, then the close.
            let mut s = connect(server.addr("web"));
            let me = s.local_addr().unwrap().to_string();
            write!(
                s,
                "GET /a/b?token={SECRET_QUERY} HTTP/1.1\r\nHost: t\r\n\r\n\
                 POST /up HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"
            )
            .unwrap();
            let mut answer = String::new();
            s.read_to_string(&mut answer).unwrap();
            assert_eq!(answer.matches("200 OK").count(), 2, "{answer}");
            let requests = wait_lines(format, &log, 2, |l| {
                is(l, "service", "web") && is(l, "event", "request")
            });
            for (l, (method, target)) in requests.iter().zip([("GET", "/a/b"), ("POST", "/up")]) {
                common(l, "web", "http-hello");
                assert!(is(l, "client", &me), "{l:?}");
                assert!(is(l, "method", method) && is(l, "target", target), "{l:?}");
                assert!(is(l, "status", "200") && is(l, "outcome", "2xx"), "{l:?}");
                duration_ms(l);
            }
            let conn = wait_lines(format, &log, 1, |l| {
                is(l, "service", "web") && is(l, "event", "connection")
            });
            assert!(is(&conn[0], "outcome", "closed"), "{:?}", conn[0]);
            assert!(
                conn[0]["bytes_in"].parse::<u64>().unwrap() > 100,
                "{:?}",
                conn[0]
            );

            // exec: the command word and how it ended; never the token or the arguments.
            let addr = server.addr("exec").to_string();
            let (code, out, err) = wharf_client(
                &dir.0,
                &["exec", &addr, "--token", TOKEN, "--", "echo", SECRET_ARG],
            );
            assert_eq!((code, out.trim()), (0, SECRET_ARG), "{err}");
            let (code, _, err) =
                wharf_client(&dir.0, &["exec", &addr, "--token", TOKEN, "--", "false"]);
            assert_eq!(code, 1, "{err}");
            let (code, _, _) = wharf_client(
                &dir.0,
                &["exec", &addr, "--token", "wrong-token", "--", "false"],
            );
            assert_ne!(code, 0);
            let requests = wait_lines(format, &log, 3, |l| {
                is(l, "service", "exec") && is(l, "event", "request")
            });
            common(&requests[0], "exec", "exec");
            let ran = |word: &str| requests.iter().find(|l| is(l, "command", word)).unwrap();
            assert!(is(ran("echo"), "exit", "0") && is(ran("echo"), "outcome", "ok"));
            assert!(is(ran("false"), "exit", "1") && is(ran("false"), "outcome", "nonzero_exit"));
            assert!(is(ran("auth"), "outcome", "auth_failed"), "{requests:?}");
            assert!(!ran("auth").contains_key("exit"), "{requests:?}");

            // file-get: path, offset, bytes and outcome; a refusal too.
            let (size, digest) = download(server.addr("files"), "hello.txt", None);
            assert_eq!((size, digest), (12, Some(md5_hex(b"hello, file\n"))));
            let mut s = connect(server.addr("files"));
            s.write_all(b"get missing.txt\n").unwrap();
            let mut buf = [0u8; 64];
            let n = s.read(&mut buf).unwrap();
            assert!(buf[..n].starts_with(b"ERR"));
            drop(s);
            let requests = wait_lines(format, &log, 2, |l| {
                is(l, "service", "files") && is(l, "event", "request")
            });
            let ok = &requests[0];
            common(ok, "files", "file-get");
            assert!(is(ok, "op", "get") && is(ok, "path", "hello.txt"), "{ok:?}");
            assert!(is(ok, "offset", "0") && is(ok, "bytes", "12"), "{ok:?}");
            assert!(is(ok, "outcome", "ok"), "{ok:?}");
            let missing = &requests[1];
            assert!(is(missing, "path", "missing.txt") && is(missing, "outcome", "not_found"));
            assert!(is(missing, "bytes", "0"), "{missing:?}");

            let text = std::fs::read_to_string(&log).unwrap();
            for secret in [TOKEN, SECRET_ARG, SECRET_QUERY, "wrong-token"] {
                assert!(
                    !text.contains(secret),
                    "{secret} in the access log:\n{text}"
                );
            }
        }
    }
}

#[test]
fn the_tls_identity_is_on_the_lines() {
    let dir = TempDir::new();
    let pki = Pki::new(&dir.0, "main");
    let cert = pki.server("server");
    let ops = pki.client("ops", Names::Dns("ops"));
    let log = dir.0.join("access.log");
    for backend in backends() {
        let _ = std::fs::remove_file(&log);
        let config = format!(
            "[server]\nworkers = 1\n\
             [services.echo]\nplugin = \"echo\"\nlisten = \"127.0.0.1:0\"\n\
             [services.echo.tls]\ncert = \"{}\"\nkey = \"{}\"\nclient_ca = \"{}\"\n{}",
            cert.cert.display(),
            cert.key.display(),
            pki.ca_file().display(),
            access_log_table(&log, "json", "")
        );
        let server = Server::start(&config, backend);
        let addr = server.addr("echo").to_string();
        let ca = pki.ca_file().to_str().unwrap();
        let (cert, key) = (ops.cert.to_str().unwrap(), ops.key.to_str().unwrap());
        let args = [
            "echo", &addr, "--tls", "--ca", ca, "--cert", cert, "--key", key, "hi",
        ];
        let (code, out, err) = wharf_client(&dir.0, &args);
        assert_eq!((code, out.trim()), (0, "hi"), "{err}");
        let lines = wait_lines("json", &log, 1, |l| is(l, "event", "connection"));
        let l = &lines[0];
        common(l, "echo", "echo");
        assert!(
            is(l, "identity", "ops") && is(l, "outcome", "closed"),
            "{l:?}"
        );
        // The ciphertext: far more than the three bytes of text each way.
        assert!(l["bytes_out"].parse::<u64>().unwrap() > 100, "{l:?}");
    }
}

#[test]
fn refusals_idle_timeouts_and_services_that_opt_out() {
    for backend in backends() {
        let dir = TempDir::new();
        let log = dir.0.join("access.log");
        let config = format!(
            "[server]\nworkers = 1\n[metrics]\nlisten = \"127.0.0.1:0\"\n\
             [services.echo]\nplugin = \"echo\"\nlisten = \"127.0.0.1:0\"\n\
             max_connections = 1\nidle_timeout = \"1s\"\n\
             [services.quiet]\nplugin = \"echo\"\nlisten = \"127.0.0.1:0\"\naccess_log = false\n{}",
            access_log_table(&log, "logfmt", "")
        );
        let server = Server::start(&config, backend);
        let mut quiet = connect(server.addr("quiet"));
        assert_eq!(echo_once(&mut quiet, b"x"), b"x");
        drop(quiet);

        let held = connect(server.addr("echo"));
        server.wait_metric(
            "wharf_connections_active",
            &[
                ("service", "echo"),
                ("plugin", "echo"),
                ("backend", backend),
            ],
            1.0,
        );
        let mut turned_away = connect(server.addr("echo"));
        let me = turned_away.local_addr().unwrap().to_string();
        assert!(closed_within(&mut turned_away, Duration::from_secs(10)));
        let refused = wait_lines("logfmt", &log, 1, |l| is(l, "outcome", "refused"));
        let l = &refused[0];
        common(l, "echo", "echo");
        assert!(
            is(l, "client", &me) && is(l, "reason", "max_connections"),
            "{l:?}"
        );

        // The held connection idles out.
        let timed_out = wait_lines("logfmt", &log, 1, |l| is(l, "outcome", "timeout"));
        assert!(is(&timed_out[0], "bytes_in", "0"), "{:?}", timed_out[0]);
        assert!(duration_ms(&timed_out[0]) >= 900.0, "{:?}", timed_out[0]);
        drop(held);

        let all = read_lines("logfmt", &log);
        assert!(all.iter().all(|l| !is(l, "service", "quiet")), "{all:?}");
    }
}

/// Keep-alive HTTP clients, each sending `/c<client>/<n>` for n = 0.. until `stop`; returns
/// how many requests each had answered.
fn run_http_clients(
    addr: std::net::SocketAddr,
    clients: usize,
    stop: &std::sync::atomic::AtomicBool,
    bound: Duration,
) -> Vec<usize> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..clients)
            .map(|c| {
                scope.spawn(move || {
                    let mut s = connect(addr);
                    let mut n = 0;
                    let mut buf = vec![0u8; 4096];
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let started = Instant::now();
                        write!(s, "GET /c{c}/{n} HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
                        let mut got = Vec::new();
                        while !got.ends_with(b"Hello, World") {
                            let k = s.read(&mut buf).unwrap();
                            assert!(k > 0, "closed");
                            got.extend_from_slice(&buf[..k]);
                        }
                        let took = started.elapsed();
                        assert!(took < bound, "a request took {took:?}");
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// Every `/c<client>/<n>` request answered appears exactly once across `files`.
fn each_request_once(format: &str, files: &[PathBuf], answered: &[usize]) {
    let mut seen = BTreeMap::new();
    for file in files {
        for l in read_lines(format, file) {
            if is(&l, "event", "request") {
                *seen.entry(l["target"].clone()).or_insert(0) += 1;
            }
        }
    }
    let mut want = 0;
    for (c, &n) in answered.iter().enumerate() {
        for i in 0..n {
            let target = format!("/c{c}/{i}");
            assert_eq!(seen.get(&target), Some(&1), "{target} once");
        }
        want += n;
    }
    assert_eq!(seen.len(), want, "no other request lines");
}

fn web_config(log: &Path, format: &str, extra: &str) -> String {
    format!(
        "[server]\nworkers = 2\n[metrics]\nlisten = \"127.0.0.1:0\"\n\
         [services.web]\nplugin = \"http-hello\"\nlisten = \"127.0.0.1:0\"\n{}",
        access_log_table(log, format, extra)
    )
}

/// Waits until the server's log file holds `want` request lines in all.
fn wait_total(format: &str, files: &[PathBuf], want: usize) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let n: usize = files
            .iter()
            .map(|f| {
                read_lines(format, f)
                    .iter()
                    .filter(|l| is(l, "event", "request"))
                    .count()
            })
            .sum();
        if n >= want || Instant::now() > deadline {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sigusr1_reopens_the_file_while_clients_run_without_losing_or_tearing_a_line() {
    for format in FORMATS {
        for backend in backends() {
            let dir = TempDir::new();
            let log = dir.0.join("access.log");
            let rotated = dir.0.join("access.log.1");
            let server = Server::start(&web_config(&log, format, ""), backend);
            let stop = std::sync::atomic::AtomicBool::new(false);
            let answered = std::thread::scope(|scope| {
                let clients = scope.spawn(|| {
                    run_http_clients(server.addr("web"), 4, &stop, Duration::from_secs(5))
                });
                std::thread::sleep(Duration::from_millis(400));
                std::fs::rename(&log, &rotated).unwrap();
                server.signal(libc::SIGUSR1);
                std::thread::sleep(Duration::from_millis(400));
                stop.store(true, std::sync::atomic::Ordering::Relaxed);
                clients.join().unwrap()
            });
            let total: usize = answered.iter().sum();
            assert!(total > 20, "{answered:?}");
            let files = [rotated.clone(), log.clone()];
            wait_total(format, &files, total);
            each_request_once(format, &files, &answered);
            assert!(!read_lines(format, &rotated).is_empty());
            assert!(
                !read_lines(format, &log).is_empty(),
                "the new file was written"
            );
            server.wait_log("access log reopened", 1, Duration::from_secs(10));
        }
    }
}

#[test]
fn logrotate_with_the_shipped_snippet_rotates_a_live_server() {
    if !have_tool("logrotate", "--version") {
        return;
    }
    let snippet = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/logrotate/wharf"),
    )
    .unwrap();
    let directives: Vec<&str> = snippet
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .collect();
    assert!(
        directives.contains(&"nocreate") && !directives.contains(&"copytruncate"),
        "rename and SIGUSR1, not copytruncate: {directives:?}"
    );
    let backend = backends()[0];
    let dir = TempDir::new();
    let log = dir.0.join("access.log");
    let server = Server::start(&web_config(&log, "json", ""), backend);
    // The snippet as shipped, pointed at this test's file and process.
    let conf = snippet
        .replace(
            "/var/log/wharf/*.log",
            &format!("{}/*.log", dir.0.display()),
        )
        .lines()
        .map(|l| {
            if l.contains("systemctl kill") {
                format!("        /bin/kill -USR1 {}", server.pid())
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    let conf_path = dir.write("logrotate.conf", &format!("{conf}\n"));
    let state = dir.0.join("logrotate.state");
    let stop = std::sync::atomic::AtomicBool::new(false);
    let answered = std::thread::scope(|scope| {
        let clients =
            scope.spawn(|| run_http_clients(server.addr("web"), 2, &stop, Duration::from_secs(5)));
        std::thread::sleep(Duration::from_millis(300));
        let out = Command::new("logrotate")
            .arg("--force")
            .arg("--state")
            .arg(&state)
            .arg(&conf_path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "logrotate: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        clients.join().unwrap()
    });
    let rotated = dir.0.join("access.log.1");
    let files = [rotated.clone(), log.clone()];
    wait_total("json", &files, answered.iter().sum());
    each_request_once("json", &files, &answered);
    assert!(
        !read_lines("json", &rotated).is_empty(),
        "delaycompress keeps .1 as text"
    );
    assert!(
        !read_lines("json", &log).is_empty(),
        "wharf created the new file"
    );
}

#[test]
fn a_writer_that_cannot_keep_up_drops_and_counts_lines_and_never_slows_clients() {
    for backend in backends() {
        let dir = TempDir::new();
        // A FIFO with a reader that never reads: the writer blocks once the pipe is full.
        let fifo = dir.0.join("access.fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: mkfifo(3) on a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let _reader = {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&fifo)
                .unwrap()
        };
        let server = Server::start(&web_config(&fifo, "json", "buffer_lines = 4"), backend);
        let stop = std::sync::atomic::AtomicBool::new(false);
        // Far more than a pipe holds (64 KiB of ~200-byte lines); each request within 2 s.
        let answered = std::thread::scope(|scope| {
            let clients = scope
                .spawn(|| run_http_clients(server.addr("web"), 8, &stop, Duration::from_secs(2)));
            let deadline = Instant::now() + Duration::from_secs(20);
            while server
                .metric("wharf_access_log_dropped_total", &[])
                .unwrap_or(0.0)
                < 1000.0
                && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(100));
            }
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            clients.join().unwrap()
        });
        let dropped = server
            .metric("wharf_access_log_dropped_total", &[])
            .unwrap();
        let total: usize = answered.iter().sum();
        assert!(dropped >= 1000.0, "dropped {dropped} of {total}");
        // Still serving, at once.
        let (status, body) = http_get(server.addr("web"), "/after");
        assert_eq!((status, body.as_str()), (200, "Hello, World"));
    }
}

#[test]
fn an_unopenable_path_is_a_config_error_naming_the_file_and_key() {
    let dir = TempDir::new();
    let config = format!(
        "[services.echo]\nplugin = \"echo\"\nlisten = \"127.0.0.1:0\"\n{}",
        access_log_table(&dir.0.join("no/such/dir/access.log"), "json", "")
    );
    let path = dir.write("wharf.toml", &config);
    for command in ["check", "serve"] {
        let out = Command::new(WHARF)
            .args([command, "--config"])
            .arg(&path)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{command}: {err}");
        assert!(
            err.contains("wharf.toml") && err.contains("access_log.path"),
            "{err}"
        );
        assert!(!err.contains("listening"), "{err}");
    }
}

#[test]
fn a_reload_that_changes_the_access_log_says_it_needs_a_restart() {
    let dir = TempDir::new();
    let log = dir.0.join("access.log");
    let backend = backends()[0];
    let mut server = Server::start(&web_config(&log, "json", ""), backend);
    server.rewrite_config(&web_config(&log, "logfmt", ""));
    server.expect_reload("configuration reloaded");
    server.wait_log(
        "only take effect after a restart",
        1,
        Duration::from_secs(10),
    );
    assert_eq!(server.log_count("access_log ("), 1, "{}", server.log());
    // Still JSON, as started.
    http_get(server.addr("web"), "/x");
    wait_lines("json", &log, 1, |l| is(l, "target", "/x"));
}

#[test]
fn a_connection_still_open_at_the_end_of_the_grace_is_logged_as_cut() {
    for backend in backends() {
        let dir = TempDir::new();
        let log = dir.0.join("access.log");
        let config = format!(
            "[server]\nworkers = 1\nshutdown_grace = \"1s\"\n\
             [services.echo]\nplugin = \"echo\"\nlisten = \"127.0.0.1:0\"\n{}",
            access_log_table(&log, "json", "")
        );
        let mut server = Server::start(&config, backend);
        // An echo stream is served until its client closes: the drain has to cut it.
        let mut s = connect(server.addr("echo"));
        let me = s.local_addr().unwrap().to_string();
        assert_eq!(echo_once(&mut s, b"still here"), b"still here");
        server.signal(libc::SIGTERM);
        let status = server
            .wait(Duration::from_secs(20))
            .expect("exits after the grace");
        assert!(status.success(), "{}", server.log());
        let lines = read_lines("json", &log);
        assert_eq!(lines.len(), 1, "{lines:?}");
        let l = &lines[0];
        assert!(is(l, "client", &me) && is(l, "outcome", "cut"), "{l:?}");
        assert!(is(l, "bytes_in", "10") && is(l, "bytes_out", "10"), "{l:?}");
        assert!(duration_ms(l) >= 900.0, "{l:?}");
    }
}

/// A connection from the local address `from` (another 127.x source).
fn connect_from(from: &str, to: std::net::SocketAddr) -> std::net::TcpStream {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let local: std::net::SocketAddr = format!("{from}:0").parse().unwrap();
    s.bind(&local.into()).unwrap();
    s.connect(&to.into()).unwrap();
    let s: std::net::TcpStream = s.into();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

#[test]
fn a_flood_of_refused_connections_gets_a_line_each_while_a_normal_client_is_served() {
    for backend in backends() {
        let dir = TempDir::new();
        let log = dir.0.join("access.log");
        let config = format!(
            "[server]\nworkers = 2\n[metrics]\nlisten = \"127.0.0.1:0\"\n\
             [services.echo]\nplugin = \"echo\"\nlisten = \"127.0.0.1:0\"\n\
             allow_from = [\"127.0.0.2/32\"]\n{}",
            access_log_table(&log, "json", "")
        );
        let server = Server::start(&config, backend);
        let addr = server.addr("echo");
        let stop = std::sync::atomic::AtomicBool::new(false);
        let (flooded, served) = std::thread::scope(|scope| {
            // 4 clients from 127.0.0.1, outside allow_from, at most 2 000 connections each.
            let floods: Vec<_> = (0..4)
                .map(|_| {
                    scope.spawn(|| {
                        let mut n = 0;
                        while n < 2000 && !stop.load(std::sync::atomic::Ordering::Relaxed) {
                            let mut s = connect(addr);
                            assert!(closed_within(&mut s, Duration::from_secs(10)));
                            n += 1;
                        }
                        n
                    })
                })
                .collect();
            // Meanwhile the allowed client is served, each exchange within 2 s.
            let mut served = 0;
            for _ in 0..20 {
                let started = Instant::now();
                let mut s = connect_from("127.0.0.2", addr);
                assert_eq!(echo_once(&mut s, b"hi"), b"hi");
                drop(s);
                assert!(
                    started.elapsed() < Duration::from_secs(2),
                    "{:?}",
                    started.elapsed()
                );
                served += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            let flooded: usize = floods.into_iter().map(|f| f.join().unwrap()).sum();
            (flooded, served)
        });
        let labels = [
            ("service", "echo"),
            ("plugin", "echo"),
            ("backend", backend),
            ("reason", "allow_from"),
        ];
        server.wait_metric("wharf_connections_rejected_total", &labels, flooded as f64);
        // Every refusal is a line, or a counted drop.
        let dropped = server
            .metric("wharf_access_log_dropped_total", &[])
            .unwrap() as usize;
        let refused = wait_lines("json", &log, flooded - dropped, |l| {
            is(l, "outcome", "refused") && is(l, "reason", "allow_from")
        });
        assert_eq!(refused.len() + dropped, flooded);
        assert!(refused
            .iter()
            .all(|l| l["client"].starts_with("127.0.0.1:")));
        let closed = wait_lines("json", &log, served, |l| is(l, "outcome", "closed"));
        assert!(closed.iter().all(|l| l["client"].starts_with("127.0.0.2:")));
        assert!(closed.iter().all(|l| is(l, "bytes_in", "2")));
    }
}
