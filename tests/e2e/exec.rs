//! exec through real sockets on both backends: the tutorial-style Python client, our own
//! `wharf client exec`, auth, refusals, and a client that vanishes mid-command.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::harness::*;

fn exec_config(dir: &TempDir, token: Option<&str>) -> String {
    let token = token
        .map(|t| format!("token = \"{t}\"\n"))
        .unwrap_or_default();
    format!(
        "[server]\nworkers = 2\nshutdown_grace = \"2s\"\n\
         [metrics]\nlisten = \"127.0.0.1:0\"\n\
         [services.exec]\nplugin = \"exec\"\nlisten = \"127.0.0.1:0\"\n\
         [services.exec.options]\ncwd = \"{}\"\ntimeout = \"3s\"\n{token}\
         [services.exec.options.commands]\n\
         echo = {{ argv = [\"echo\"], allow_args = true }}\n\
         false = {{ argv = [\"false\"] }}\n\
         sleep = {{ argv = [\"sleep\"], allow_args = true }}\n\
         uname = {{ argv = [\"uname\"], allow_args = true }}\n\
         ls = {{ argv = [\"ls\"], allow_args = true }}\n",
        dir.0.display()
    )
}

/// The labels of one `wharf_requests_total` series of the exec service.
fn outcome<'a>(backend: &'a str, outcome: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("service", "exec"),
        ("plugin", "exec"),
        ("backend", backend),
        ("outcome", outcome),
    ]
}

/// The tutorial's client, as written there: send, recv the size, send an ack, recv until size.
const TUTORIAL_EXEC_CLIENT: &str = r#"
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
client.connect((host, port))
for cmd in sys.argv[3:]:
    client.send(cmd.encode())
    size = int(client.recv(1024).decode())
    client.send(b"ok")
    data = b""
    while len(data) < size:
        data += client.recv(1024)
    print(repr(data.decode()))
client.close()
"#;

#[test]
fn tutorial_python_client_runs_commands_unmodified() {
    for backend in backends() {
        let dir = TempDir::new();
        let server = Server::start(&exec_config(&dir, None), backend);
        let addr = server.addr("exec");
        let Some(out) = python_client(
            TUTORIAL_EXEC_CLIENT,
            addr,
            &[
                "echo hello tutorial",
                "uname -s",
                "false",
                "rm -rf /",
                "echo a; touch X",
                "echo $(touch Y) `touch Z` | tee W",
            ],
        ) else {
            return;
        };
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            lines,
            [
                r"'hello tutorial\n'",
                r"'Linux\n'",
                r"'[exit status 1]\n'",
                "'command not allowed: rm'",
                r"'a; touch X\n'",
                r"'$(touch Y) `touch Z` | tee W\n'",
            ],
            "{out}"
        );
        assert_eq!(
            std::fs::read_dir(&dir.0).unwrap().count(),
            0,
            "a file was created"
        );
        server.wait_metric("wharf_requests_total", &outcome(backend, "ok"), 4.0);
        server.wait_metric(
            "wharf_requests_total",
            &outcome(backend, "nonzero_exit"),
            1.0,
        );
        server.wait_metric("wharf_requests_total", &outcome(backend, "refused"), 1.0);
    }
}

#[test]
fn wharf_client_exec_exit_statuses_and_auth() {
    for backend in backends() {
        let dir = TempDir::new();
        let server = Server::start(&exec_config(&dir, Some("s3cret")), backend);
        let addr = server.addr("exec").to_string();
        let ok = wharf_client(
            Path::new("."),
            &[
                "exec", &addr, "--token", "s3cret", "--", "echo", "hi", "there",
            ],
        );
        assert_eq!(ok, (0, "hi there\n".into(), String::new()));
        let (code, out, _) = wharf_client(
            Path::new("."),
            &["exec", &addr, "--token", "s3cret", "--", "false"],
        );
        assert_eq!((code, out.as_str()), (1, "[exit status 1]\n"));
        let (code, out, _) = wharf_client(
            Path::new("."),
            &["exec", &addr, "--token", "s3cret", "--", "rm", "x"],
        );
        assert_eq!((code, out.as_str()), (126, "command not allowed: rm\n"));
        let (code, _, err) = wharf_client(
            Path::new("."),
            &["exec", &addr, "--token", "wrong", "--", "echo", "hi"],
        );
        assert_eq!(code, 1);
        assert!(err.contains("authentication refused: auth failed"), "{err}");
        let (code, out, _) = wharf_client(Path::new("."), &["exec", &addr, "--", "echo", "hi"]);
        assert_eq!((code, out.as_str()), (126, "auth required\n"));

        // Interactive mode: one command per stdin line.
        let out = run_with_stdin(
            Command::new(WHARF).args(["client", "exec", &addr, "--token", "s3cret"]),
            b"echo one\n\necho two\n",
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout), "one\ntwo\n");
        assert!(out.status.success());
        server.wait_metric(
            "wharf_requests_total",
            &outcome(backend, "auth_failed"),
            2.0,
        );
    }
}

#[test]
fn program_errors_name_the_program_as_configured_not_its_resolved_path() {
    let dir = TempDir::new();
    let server = Server::start(&exec_config(&dir, None), "epoll");
    let addr = server.addr("exec").to_string();
    let (code, out, _) = wharf_client(
        Path::new("."),
        &["exec", &addr, "--", "ls", "/nonexistent-wharf-path"],
    );
    assert_eq!(code, 2, "{out}");
    // `ls` found in env.PATH runs as /usr/bin/ls (or /bin/ls); its message names it `ls`.
    assert!(out.starts_with("ls: "), "{out}");
    assert!(!out.contains("/bin/ls"), "{out}");
}

/// Processes whose command line contains `marker`.
fn processes_with(marker: &str) -> usize {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| std::fs::read(e.ok()?.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(marker))
        .count()
}

#[test]
fn a_client_resetting_mid_command_kills_it() {
    for (i, backend) in backends().into_iter().enumerate() {
        let dir = TempDir::new();
        // A command timeout (and a sleep) far beyond the wait below: the child going within
        // it is the client's leaving, not the timeout.
        let config = exec_config(&dir, None).replace("timeout = \"3s\"", "timeout = \"60s\"");
        assert!(config.contains("timeout = \"60s\""), "{config}");
        let server = Server::start(&config, backend);
        let marker = format!("sleep 29.{i}{}", std::process::id() % 1000);
        let mut s = connect(server.addr("exec"));
        use std::io::Write;
        s.write_all(format!("{marker}\n").as_bytes()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(15);
        while processes_with(&marker) == 0 {
            assert!(Instant::now() < deadline, "command never started");
            std::thread::sleep(Duration::from_millis(10));
        }
        // A reset (SO_LINGER 0): a client that only half-closed would still be reading.
        crate::hostile_exec::reset(s);
        let deadline = Instant::now() + Duration::from_secs(15);
        while processes_with(&marker) > 0 {
            assert!(
                Instant::now() < deadline,
                "{backend}: child outlived its client"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
