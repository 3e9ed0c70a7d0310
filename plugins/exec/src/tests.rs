//! The exec protocol end to end through `wharf_core::testing`, with real child processes.

use super::*;
use std::path::Path;
use std::time::Duration;
use wharf_core::testing::{self, Client};

/// A scratch directory, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("wharf-exec-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn entry(argv: &[&str], allow_args: bool) -> CommandOptions {
    CommandOptions {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        allow_args,
        timeout: None,
        max_output: None,
        identities: None,
    }
}

/// `entry` that only clients with one of `identities` may run.
fn entry_for(argv: &[&str], identities: &[&str]) -> CommandOptions {
    CommandOptions {
        identities: Some(identities.iter().map(|id| id.to_string()).collect()),
        ..entry(argv, false)
    }
}

fn service(cwd: &Path, tweak: impl FnOnce(&mut ExecOptions)) -> Exec {
    let mut o = ExecOptions {
        cwd: cwd.to_path_buf(),
        timeout: Duration::from_secs(5),
        ..Default::default()
    };
    o.commands = [
        ("echo", entry(&["echo"], true)),
        ("true", entry(&["true"], false)),
        ("false", entry(&["false"], false)),
        ("sleep", entry(&["sleep"], true)),
        ("env", entry(&["env"], false)),
        ("ls", entry(&["ls", "-1"], true)),
        (
            "zeros",
            entry(&["head", "-c", "52428800", "/dev/zero"], false),
        ),
        (
            "stderr-flood",
            entry(
                &["sh", "-c", "head -c 3000000 /dev/zero >&2; echo done"],
                false,
            ),
        ),
        (
            "group",
            entry(&["sh", "-c", "sleep 31.5 & sleep 31.6"], false),
        ),
        ("suicide", entry(&["sh", "-c", "kill -9 $$"], false)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    o.env.insert("WHARF_TEST".into(), "1".into());
    tweak(&mut o);
    Exec::build(o).unwrap()
}

/// One tutorial-style exchange: send the command, read the size, ack, read the result.
async fn run_cmd(client: &Client, command: &[u8]) -> Vec<u8> {
    client.write_all(command).await.unwrap();
    let mut size: Vec<u8> = Vec::new();
    while size.is_empty() || size.iter().any(|b| !b.is_ascii_digit()) {
        let chunk = client.read(64).await;
        assert!(
            !chunk.is_empty(),
            "server closed before the size; got {size:?}"
        );
        size.extend(chunk);
    }
    let size: usize = std::str::from_utf8(&size).unwrap().parse().unwrap();
    client.write_all(b"ack").await.unwrap();
    client.read_exact(size).await.unwrap()
}

fn text(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes).unwrap()
}

/// Processes whose command line contains `marker`.
fn processes_with(marker: &str) -> usize {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| std::fs::read(e.ok()?.path().join("cmdline")).ok())
        // Arguments are NUL-separated in /proc/<pid>/cmdline.
        .map(|cmd| String::from_utf8_lossy(&cmd).replace('\0', " "))
        .filter(|cmd| cmd.contains(marker))
        .count()
}

#[test]
fn framing_terminated_and_unterminated_and_results() {
    let dir = Scratch::new("framing");
    testing::block_on(async {
        let (conn, client) = testing::pipe();
        let server = testing::spawn(service(&dir.0, |_| {}), conn);
        // The tutorial's client: no newline at all.
        assert_eq!(
            text(run_cmd(&client, b"echo hello there").await),
            "hello there\n"
        );
        // Ours: newline (and CRLF) terminated.
        assert_eq!(text(run_cmd(&client, b"echo two\n").await), "two\n");
        assert_eq!(text(run_cmd(&client, b"echo three\r\n").await), "three\n");
        assert_eq!(text(run_cmd(&client, b"true").await), NO_OUTPUT);
        assert_eq!(text(run_cmd(&client, b"false").await), "[exit status 1]\n");
        assert_eq!(
            text(run_cmd(&client, b"suicide").await),
            "[killed by signal 9]\n"
        );
        let env = text(run_cmd(&client, b"env").await);
        let mut vars: Vec<&str> = env.lines().collect();
        vars.sort();
        assert_eq!(
            vars,
            ["PATH=/usr/local/bin:/usr/bin:/bin", "WHARF_TEST=1"],
            "environment is cleared"
        );
        client.close_write();
        server.await.unwrap().unwrap();
        assert_eq!(
            client.recorded_requests(),
            ["ok", "ok", "ok", "ok", "nonzero_exit", "nonzero_exit", "ok"]
        );
    });
}

#[test]
fn injection_attempts_run_nothing_unlisted_and_create_nothing() {
    let dir = Scratch::new("inject");
    testing::block_on(async {
        let (conn, client) = testing::pipe();
        let server = testing::spawn(service(&dir.0, |_| {}), conn);
        let literal = [
            ("echo a; touch X", "a; touch X\n"),
            ("echo $(touch X)", "$(touch X)\n"),
            ("echo `touch X`", "`touch X`\n"),
            ("echo a | tee X", "a | tee X\n"),
            ("echo a && touch X", "a && touch X\n"),
            ("echo a > X", "a > X\n"),
            ("echo *", "*\n"),
        ];
        for (cmd, out) in literal {
            assert_eq!(
                text(run_cmd(&client, format!("{cmd}\n").as_bytes()).await),
                out,
                "{cmd}"
            );
        }
        // A newline ends a command: the second line is a command of its own, and refused.
        assert_eq!(text(run_cmd(&client, b"echo a\n").await), "a\n");
        assert_eq!(
            text(run_cmd(&client, b"touch X\n").await),
            "command not allowed: touch"
        );
        for cmd in [
            "sh -c 'touch X'",
            "/bin/sh",
            "bash",
            "ls;touch X",
            "rm -rf /",
        ] {
            let out = text(run_cmd(&client, format!("{cmd}\n").as_bytes()).await);
            assert!(out.starts_with(refusals::NOT_ALLOWED), "{cmd}: {out}");
        }
        assert_eq!(
            text(run_cmd(&client, b"ls \0touch X\n").await),
            refusals::CONTROL
        );
        assert_eq!(
            text(run_cmd(&client, b"true now\n").await),
            "command does not take arguments: true"
        );
        // ls with arguments runs ls, and shows that nothing was created.
        assert_eq!(text(run_cmd(&client, b"ls -a\n").await), ".\n..\n");
        client.close_write();
        server.await.unwrap().unwrap();
    });
    assert_eq!(
        std::fs::read_dir(&dir.0).unwrap().count(),
        0,
        "a file was created"
    );
}

#[test]
fn timeouts_kill_the_whole_process_group() {
    let dir = Scratch::new("timeout");
    testing::block_on(async {
        let (conn, client) = testing::pipe();
        let svc = service(&dir.0, |o| o.timeout = Duration::from_millis(300));
        let server = testing::spawn(svc, conn);
        let started = std::time::Instant::now();
        let out = text(run_cmd(&client, b"group").await);
        assert_eq!(out, "[timed out after 0.3s]\n");
        // Far sooner than the 31 s sleeps would end.
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
        // The group was SIGKILLed; the background child, reparented, dies and is reaped on
        // its own schedule: polled.
        for (marker, what) in [
            ("sleep 31.5", "background child survived"),
            ("sleep 31.6", "leader survived"),
        ] {
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while processes_with(marker) > 0 {
                assert!(std::time::Instant::now() < deadline, "{what}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        client.close_write();
        server.await.unwrap().unwrap();
        assert_eq!(client.recorded_requests(), ["timeout"]);
    });
}

#[test]
fn huge_output_is_capped_and_stderr_floods_do_not_deadlock() {
    let dir = Scratch::new("output");
    testing::block_on(async {
        let (conn, client) = testing::pipe_with_capacity(4 * 1024 * 1024);
        let server = testing::spawn(service(&dir.0, |_| {}), conn);
        let out = run_cmd(&client, b"zeros").await;
        let note = b"\n[output cut at 1048576 bytes: 51380224 more dropped]\n";
        assert_eq!(out.len(), 1024 * 1024 + note.len());
        assert!(out.ends_with(note));
        let flood = run_cmd(&client, b"stderr-flood").await;
        assert!(flood.starts_with(b"done\n"), "stdout first");
        assert!(flood.ends_with(b"[output cut at 1048576 bytes: 1951429 more dropped]\n"));
        client.close_write();
        server.await.unwrap().unwrap();
    });
}

#[test]
fn a_client_that_disconnects_mid_command_has_it_killed() {
    let dir = Scratch::new("disconnect");
    testing::block_on(async {
        let (conn, client) = testing::pipe();
        // A command timeout far beyond the wait below: the server returning within it means
        // it saw the client leave, not the timeout.
        let server = testing::spawn(
            service(&dir.0, |o| o.timeout = Duration::from_secs(60)),
            conn,
        );
        client.write_all(b"sleep 30.77\n").await.unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while processes_with("sleep 30.77") == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "command never started"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        drop(client);
        let result = tokio::time::timeout(Duration::from_secs(10), server).await;
        assert!(result.is_ok(), "server kept waiting for the command");
        assert_eq!(
            processes_with("sleep 30.77"),
            0,
            "child survived its client"
        );
    });
}

#[test]
fn max_concurrent_queues_then_refuses() {
    let dir = Scratch::new("concurrent");
    testing::block_on(async {
        let svc = Arc::new(service(&dir.0, |o| {
            o.max_concurrent = 1;
            // Also how long a command waits for a slot: far beyond the sleeps below.
            o.timeout = Duration::from_secs(10);
            let mut quick = entry(&["true"], false);
            quick.timeout = Some(Duration::from_millis(100));
            o.commands.insert("quick".into(), quick);
        }));
        let serve = |conn| testing::spawn(Arc::clone(&svc), conn);
        let (a_conn, a) = testing::pipe();
        let (b_conn, b) = testing::pipe();
        let (c_conn, c) = testing::pipe();
        let servers = [serve(a_conn), serve(b_conn), serve(c_conn)];
        // Long sleeps: the slot they hold must outlast the others' 50 ms head start plus any
        // stall of this busy machine.
        let slow = run_cmd(&a, b"sleep 1\n");
        let queued = async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let t = std::time::Instant::now();
            (run_cmd(&b, b"echo queued\n").await, t.elapsed())
        };
        let (slow_out, (queued_out, waited)) = tokio::join!(slow, queued);
        assert_eq!(text(slow_out), NO_OUTPUT);
        assert_eq!(text(queued_out), "queued\n");
        assert!(
            waited >= Duration::from_millis(150),
            "did not wait for a slot: {waited:?}"
        );
        // A slot that stays busy past the command's timeout is a refusal: `quick` waits at
        // most 100 ms for one while `sleep 2` holds it.
        let hog = run_cmd(&a, b"sleep 2\n");
        let refused = async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            run_cmd(&c, b"quick\n").await
        };
        let (_, refused) = tokio::join!(hog, refused);
        assert_eq!(text(refused), refusals::BUSY);
        drop((a, b, c));
        for s in servers {
            let _ = s.await.unwrap();
        }
    });
}

#[test]
fn token_auth() {
    let dir = Scratch::new("auth");
    testing::block_on(async {
        let make = || service(&dir.0, |o| o.token = Some("s3cret".into()));
        for (first, reply) in [
            ("echo hi", refusals::AUTH_REQUIRED),
            ("auth nope", refusals::AUTH_FAILED),
        ] {
            let (conn, client) = testing::pipe();
            let server = testing::spawn(make(), conn);
            assert_eq!(text(run_cmd(&client, first.as_bytes()).await), reply);
            assert!(
                client.read_to_end().await.is_empty(),
                "connection must close"
            );
            server.await.unwrap().unwrap();
            assert_eq!(client.recorded_requests(), ["auth_failed"]);
        }
        let (conn, client) = testing::pipe();
        let server = testing::spawn(make(), conn);
        assert_eq!(text(run_cmd(&client, b"auth s3cret\n").await), "ok");
        assert_eq!(text(run_cmd(&client, b"echo hi\n").await), "hi\n");
        client.close_write();
        server.await.unwrap().unwrap();
    });
}

#[test]
fn identities_decide_who_may_run_a_command() {
    let dir = Scratch::new("identities");
    testing::block_on(async {
        let make = |token: Option<&str>| {
            service(&dir.0, |o| {
                o.token = token.map(str::to_string);
                o.commands.insert(
                    "deploy".into(),
                    entry_for(&["echo", "deploying"], &["ops", "ci"]),
                );
            })
        };
        let refused = format!("{}deploy", refusals::NOT_ALLOWED);
        for (identity, answer) in [
            (Some("ops"), "deploying\n"),
            (Some("ci"), "deploying\n"),
            (Some("dev"), refused.as_str()),
            // Names compare exactly.
            (Some("OPS"), refused.as_str()),
            (None, refused.as_str()),
        ] {
            let (conn, client) = testing::pipe();
            let conn = match identity {
                Some(id) => conn.with_identity(id),
                None => conn,
            };
            let server = testing::spawn(make(None), conn);
            assert_eq!(
                text(run_cmd(&client, b"deploy").await),
                answer,
                "{identity:?}"
            );
            // A refusal leaves the session usable, and unrestricted commands are for everyone.
            assert_eq!(
                text(run_cmd(&client, b"echo still here").await),
                "still here\n"
            );
            client.close_write();
            server.await.unwrap().unwrap();
            let first = if answer == refused { "refused" } else { "ok" };
            assert_eq!(client.recorded_requests(), [first, "ok"], "{identity:?}");
        }
        // The token still applies on top of the identity.
        let (conn, client) = testing::pipe();
        let server = testing::spawn(make(Some("s3cret")), conn.with_identity("ops"));
        assert_eq!(
            text(run_cmd(&client, b"deploy").await),
            refusals::AUTH_REQUIRED
        );
        server.await.unwrap().unwrap();
        let (conn, client) = testing::pipe();
        let server = testing::spawn(make(Some("s3cret")), conn.with_identity("ops"));
        assert_eq!(text(run_cmd(&client, b"auth s3cret").await), "ok");
        assert_eq!(text(run_cmd(&client, b"deploy").await), "deploying\n");
        client.close_write();
        server.await.unwrap().unwrap();
    });
}

/// What `f` logs on this thread, every level, as text.
fn logs_of(f: impl FnOnce()) -> String {
    #[derive(Clone, Default)]
    struct Sink(Arc<std::sync::Mutex<Vec<u8>>>);
    impl io::Write for Sink {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let sink = Sink::default();
    let writer = sink.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    tracing::subscriber::with_default(subscriber, f);
    let text = sink.0.lock().unwrap().clone();
    String::from_utf8(text).unwrap()
}

#[test]
fn commands_are_logged_with_the_clients_address_and_identity_and_tokens_never() {
    let dir = Scratch::new("audit");
    let logs = logs_of(|| {
        testing::block_on(async {
            let make = || {
                service(&dir.0, |o| {
                    o.token = Some("s3cret".into());
                    o.commands
                        .insert("deploy".into(), entry_for(&["echo", "deploying"], &["ops"]));
                })
            };
            let (conn, client) = testing::pipe();
            let conn = conn
                .with_identity("ops")
                .with_peer("192.0.2.7:4000".parse().unwrap());
            let server = testing::spawn(make(), conn);
            assert_eq!(text(run_cmd(&client, b"auth s3cret").await), "ok");
            assert_eq!(
                text(run_cmd(&client, b"echo audited  words").await),
                "audited words\n"
            );
            // Not a command once authenticated: refused, and its token must not be logged.
            run_cmd(&client, b"auth s3cret").await;
            client.close_write();
            server.await.unwrap().unwrap();

            let (conn, client) = testing::pipe();
            let server = testing::spawn(make(), conn.with_identity("dev"));
            assert_eq!(text(run_cmd(&client, b"auth s3cret").await), "ok");
            run_cmd(&client, b"deploy now").await;
            client.close_write();
            server.await.unwrap().unwrap();
        })
    });
    let line_with = |needle: &str| {
        logs.lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no log line with {needle:?} in:\n{logs}"))
    };
    let ran = line_with("echo audited  words");
    for field in [
        "INFO",
        "exec: command",
        "192.0.2.7:4000",
        "identity=\"ops\"",
        "outcome=\"ok\"",
    ] {
        assert!(ran.contains(field), "{field:?} missing from {ran:?}");
    }
    let refused = line_with("not allowed for this identity");
    for field in ["INFO", "identity=\"dev\"", "deploy", "outcome=\"refused\""] {
        assert!(
            refused.contains(field),
            "{field:?} missing from {refused:?}"
        );
    }
    assert!(
        !refused.contains("now"),
        "only the command word of a refusal: {refused:?}"
    );
    assert!(!logs.contains("s3cret"), "a token was logged:\n{logs}");
}

#[test]
fn bad_options_are_reported_by_key() {
    let err = |tweak: fn(&mut ExecOptions)| {
        let mut o = ExecOptions::default();
        tweak(&mut o);
        Exec::build(o).err().unwrap().option.unwrap()
    };
    assert_eq!(err(|o| o.max_concurrent = 0), "max_concurrent");
    assert_eq!(err(|o| o.cwd = "/nonexistent".into()), "cwd");
    assert_eq!(
        err(|o| {
            o.commands
                .insert("x".into(), entry(&["no-such-program-anywhere"], false));
        }),
        "commands.x.argv"
    );
    assert_eq!(
        err(|o| {
            o.commands
                .insert("x".into(), entry(&["bin/relative"], false));
        }),
        "commands.x.argv"
    );
    assert_eq!(
        err(|o| {
            o.commands
                .insert("two words".into(), entry(&["true"], false));
        }),
        "commands.two words"
    );
    // `identities` that no client could ever satisfy.
    for identities in [&[][..], &[""], &["ops", ""], &["o\nps"]] {
        let mut o = ExecOptions::default();
        o.commands
            .insert("x".into(), entry_for(&["true"], identities));
        let e = Exec::build(o).err().unwrap();
        assert_eq!(
            e.option.as_deref(),
            Some("commands.x.identities"),
            "{identities:?}"
        );
    }
}
