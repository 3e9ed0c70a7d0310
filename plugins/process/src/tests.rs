//! Sessions through `wharf_core::testing` (an in-memory client), with real child processes.

use super::*;
use wharf_core::testing::{self, Client};

fn service(argv: &[&str], tweak: impl FnOnce(&mut ProcessOptions)) -> Process {
    let mut o = ProcessOptions {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        timeout: Duration::from_secs(20),
        ..Default::default()
    };
    tweak(&mut o);
    Process::build(o).unwrap()
}

fn build_error(tweak: impl FnOnce(&mut ProcessOptions)) -> PluginError {
    let mut o = ProcessOptions {
        argv: vec!["cat".into()],
        ..Default::default()
    };
    tweak(&mut o);
    match Process::build(o) {
        Ok(_) => panic!("built"),
        Err(e) => e,
    }
}

/// Serves one in-memory connection with `svc` and runs `talk` as its client; returns the
/// outcomes the session recorded.
fn session(svc: Process, talk: impl AsyncFnOnce(&Client)) -> Vec<&'static str> {
    testing::block_on(async {
        let (conn, client) = testing::pipe();
        let served = testing::spawn(svc, conn);
        talk(&client).await;
        tokio::time::timeout(Duration::from_secs(30), served)
            .await
            .expect("the session ends")
            .unwrap()
            .unwrap();
        client.recorded_requests()
    })
}

/// Whether the group has a process now (it must: the session is running).
fn group_alive_now(pgid: i32) -> bool {
    // SAFETY: signal 0 only checks for existence.
    unsafe { libc::kill(-pgid, 0) == 0 }
}

/// Whether any process of group `pgid` is alive (running or sleeping: a zombie waiting for
/// init to reap it is dead), from /proc; waits up to 5 s for the kill to land.
fn group_alive(pgid: i32) -> bool {
    let live = || {
        std::fs::read_dir("/proc").unwrap().flatten().any(|entry| {
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                return false;
            };
            // pid (comm) state ppid pgrp ...: comm may hold spaces, so split after ')'.
            let Some((_, rest)) = stat.rsplit_once(')') else {
                return false;
            };
            let fields: Vec<&str> = rest.split_whitespace().collect();
            fields.len() > 2 && fields[2] == pgid.to_string() && fields[0] != "Z"
        })
    };
    let until = std::time::Instant::now() + Duration::from_secs(5);
    while live() {
        if std::time::Instant::now() > until {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

#[test]
fn the_connection_is_the_program_s_stdin_and_stdout() {
    let recorded = session(service(&["tr", "a-z", "A-Z"], |_| {}), async |client| {
        client
            .write_all(b"hello from the tutorial\n")
            .await
            .unwrap();
        client.close_write();
        assert_eq!(client.read_to_end().await, b"HELLO FROM THE TUTORIAL\n");
    });
    assert_eq!(recorded, [outcome::OK]);
}

#[test]
fn the_program_gets_ucspi_variables_and_a_cleared_environment() {
    let svc = service(&["env"], |o| {
        o.env.insert("GREETING".into(), "hi".into());
    });
    let peer: SocketAddr = "[::ffff:192.0.2.7]:4242".parse().unwrap();
    testing::block_on(async {
        let (conn, client) = testing::pipe();
        let conn = conn.with_peer(peer).with_identity("alice");
        let served = testing::spawn(svc, conn);
        let out = String::from_utf8(client.read_to_end().await).unwrap();
        served.await.unwrap().unwrap();
        let mut vars: Vec<&str> = out.lines().collect();
        vars.sort();
        assert_eq!(
            vars,
            [
                "GREETING=hi",
                "PATH=/usr/local/bin:/usr/bin:/bin",
                "PROTO=TCP",
                "TCPREMOTEIP=192.0.2.7",
                "TCPREMOTEPORT=4242",
                "TLS_IDENTITY=alice",
            ],
            "nothing of wharf's environment is inherited"
        );
    });
}

#[test]
fn stderr_goes_to_the_log_never_to_the_client() {
    let svc = service(
        &[
            "sh",
            "-c",
            "echo secret-diagnostics >&2; head -c 2000000 /dev/zero >&2; echo out",
        ],
        |_| {},
    );
    let recorded = session(svc, async |client| {
        assert_eq!(client.read_to_end().await, b"out\n");
    });
    assert_eq!(recorded, [outcome::OK]);
}

#[test]
fn a_nonzero_exit_is_counted_and_the_output_delivered() {
    let svc = service(&["sh", "-c", "echo partial; exit 3"], |_| {});
    let recorded = session(svc, async |client| {
        assert_eq!(client.read_to_end().await, b"partial\n");
    });
    assert_eq!(recorded, [outcome::NONZERO_EXIT]);
}

#[test]
fn the_session_times_out_and_its_whole_group_is_killed() {
    let svc = service(
        &["sh", "-c", "trap '' TERM; sleep 30 & echo $$; wait"],
        |o| o.timeout = Duration::from_millis(500),
    );
    let mut pgid = 0;
    let recorded = session(svc, async |client| {
        let out = client.read(64).await;
        pgid = String::from_utf8(out).unwrap().trim().parse().unwrap();
        assert!(group_alive_now(pgid));
        client.read_to_end().await;
    });
    assert_eq!(recorded, [outcome::TIMEOUT]);
    assert!(!group_alive(pgid), "SIGTERM ignored: SIGKILL followed");
}

#[test]
fn a_grandchild_dies_with_the_session_when_the_program_exits() {
    let svc = service(&["sh", "-c", "sleep 30 & echo $$"], |_| {});
    let mut pgid = 0;
    let recorded = session(svc, async |client| {
        let out = client.read_to_end().await;
        pgid = String::from_utf8(out).unwrap().trim().parse().unwrap();
    });
    assert_eq!(recorded, [outcome::OK]);
    assert!(!group_alive(pgid));
}

#[test]
fn a_client_that_leaves_ends_the_session() {
    let svc = service(&["sh", "-c", "echo $$; exec sleep 30"], |_| {});
    testing::block_on(async {
        let (conn, client) = testing::pipe();
        let detached = wharf_core::context::Detached::new();
        let cx = detached.context("127.0.0.1:1".parse::<std::net::SocketAddr>().unwrap());
        let served = tokio::task::spawn_local(async move { svc.serve(conn, &cx).await });
        let out = client.read(64).await;
        let pgid: i32 = String::from_utf8(out).unwrap().trim().parse().unwrap();
        assert!(group_alive_now(pgid));
        // In memory, a client resets by going away: its reader is gone.
        drop(client);
        tokio::time::timeout(Duration::from_secs(10), served)
            .await
            .expect("the session ends")
            .unwrap()
            .unwrap();
        assert_eq!(detached.recorded_requests(), [outcome::CLIENT_LEFT]);
        assert!(!group_alive(pgid));
    });
}

#[test]
fn beyond_max_concurrent_connections_are_refused_at_once() {
    let svc = Arc::new(service(&["sleep", "30"], |o| o.max_concurrent = 1));
    testing::block_on(async {
        let (first, first_client) = testing::pipe();
        let busy = testing::spawn(Arc::clone(&svc), first);
        // Let it take the slot.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (second, second_client) = testing::pipe();
        let refused = testing::spawn(Arc::clone(&svc), second);
        let ended = tokio::time::timeout(Duration::from_secs(5), refused).await;
        ended.expect("refused at once").unwrap().unwrap();
        assert_eq!(second_client.recorded_requests(), [outcome::BUSY]);
        assert!(second_client.read_to_end().await.is_empty());
        busy.abort();
        let _ = busy.await;
        drop(first_client);
    });
}

#[test]
fn a_stop_asks_the_program_to_finish_and_its_last_words_arrive() {
    let svc = service(
        &[
            "sh",
            "-c",
            "trap 'echo bye; exit 0' TERM; echo ready; while :; do sleep 0.05; done",
        ],
        |_| {},
    );
    let recorded = session(svc, async |client| {
        assert_eq!(client.read(64).await, b"ready\n");
        client.stop_server();
        assert_eq!(client.read_to_end().await, b"bye\n");
    });
    assert_eq!(recorded, [outcome::STOPPED]);
}

#[test]
fn options_are_checked_with_the_key_at_fault() {
    let e = build_error(|o| o.argv.clear());
    assert_eq!(e.option.as_deref(), Some("argv"));
    let e = build_error(|o| o.argv = vec!["./relative".into()]);
    assert_eq!(e.option.as_deref(), Some("argv"));
    let e = build_error(|o| o.argv = vec!["no-such-program-anywhere".into()]);
    assert_eq!(e.option.as_deref(), Some("argv"));
    let e = build_error(|o| o.max_concurrent = 0);
    assert_eq!(e.option.as_deref(), Some("max_concurrent"));
    let e = build_error(|o| o.timeout = Duration::ZERO);
    assert_eq!(e.option.as_deref(), Some("timeout"));
    let e = build_error(|o| o.nice = 20);
    assert_eq!(e.option.as_deref(), Some("nice"));
    let e = build_error(|o| o.cwd = "/no/such/dir".into());
    assert_eq!(e.option.as_deref(), Some("cwd"));
    let e = build_error(|o| {
        o.env.insert("TCPREMOTEIP".into(), "1.2.3.4".into());
    });
    assert_eq!(e.option.as_deref(), Some("env.TCPREMOTEIP"));
    let e = build_error(|o| o.group = Some("root".into()));
    assert_eq!(e.option.as_deref(), Some("group"));
    if !program::running_as_root() {
        let e = build_error(|o| o.user = Some("root".into()));
        assert_eq!(e.option.as_deref(), Some("user"));
        assert!(e.message.contains("not running as root"), "{}", e.message);
    } else {
        // Root: programs run as nobody unless `user` says otherwise.
        let svc = service(&["cat"], |_| {});
        let nobody = program::credentials("nobody", None).unwrap();
        assert_eq!(svc.launch.credentials, Some(nobody));
        let svc = service(&["cat"], |o| o.user = Some("root".into()));
        assert_eq!(svc.launch.credentials, Some(Credentials { uid: 0, gid: 0 }));
    }
    let e = build_error(|o| o.user = Some("no-such-user-anywhere".into()));
    assert_eq!(e.option.as_deref(), Some("user"));
}

#[test]
fn a_program_started_for_a_connection_already_gone_is_killed() {
    let svc = service(&["sleep", "30"], |_| {});
    let spawned = session::spawn(&svc.launch).unwrap();
    let pgid = spawned.pid().unwrap();
    assert!(group_alive_now(pgid));
    drop(spawned);
    assert!(!group_alive(pgid));
}
