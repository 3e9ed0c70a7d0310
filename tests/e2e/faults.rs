//! Faults: clients resetting mid-request, mid-file and mid-command; files deleted or truncated
//! while they are sent; a child that ignores SIGTERM; a full disk under `wharf client get`;
//! SIGTERM during 50 downloads. After each, the server must serve normally with no descriptor
//! leaked, no zombie and no panic in its log.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::harness::*;

/// Every plugin, with a file root and an allowlist including a SIGTERM-ignoring child.
fn config(root: &std::path::Path) -> String {
    all_plugins_config(
        root,
        "[services.exec.options]\ntimeout = \"1s\"\n\
         [services.exec.options.commands]\n\
         sleep = { argv = [\"sleep\"], allow_args = true }\n\
         stubborn = { argv = [\"/bin/sh\", \"-c\", \"trap '' TERM; sleep 30; echo survived\"] }\n",
    )
}

/// The server's descriptor count once it has settled after serving every service once (the
/// smallest seen over half a second: a lingering connection or a blocking-pool file closes
/// just after its answer).
fn settled_fds(server: &Server, root: &std::path::Path) -> usize {
    assert_healthy(server, usize::MAX, root);
    settled_open_fds(server.pid())
}

/// Closes `s` with a reset (SO_LINGER 0) instead of a FIN.
fn reset(s: TcpStream) {
    let s = socket2::Socket::from(s);
    s.set_linger(Some(Duration::ZERO)).unwrap();
    drop(s);
}

/// Zombie children of `pid`.
fn zombies_of(pid: i32) -> Vec<String> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("stat")).ok())
        .filter(|stat| {
            let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
            let f: Vec<&str> = rest.split_whitespace().collect();
            f.first() == Some(&"Z") && f.get(1) == Some(&pid.to_string().as_str())
        })
        .collect()
}

/// The server is clean and serving: back to `fds` descriptors (within 15 s), no zombie
/// child, no panic logged, and every service answers.
fn assert_healthy(server: &Server, fds: usize, root: &std::path::Path) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while open_fds(server.pid()) > fds && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let now = open_fds(server.pid());
    assert!(
        now <= fds,
        "descriptors leaked: {now} open, {fds} before\n{}",
        server.log()
    );
    assert_eq!(
        zombies_of(server.pid()),
        Vec::<String>::new(),
        "zombie children"
    );
    assert!(!server.log().contains("panicked"), "{}", server.log());
    assert_eq!(echo_roundtrip(server.addr("echo"), b"abc", 1), b"ABC");
    assert_eq!(
        http_get(server.addr("web"), "/"),
        (200, "Hello, World".to_string())
    );
    let (size, digest) = download(server.addr("files"), "small.txt", None);
    let small = std::fs::read(root.join("small.txt")).unwrap();
    assert_eq!((size, digest), (small.len() as u64, Some(md5_hex(&small))));
}

#[test]
fn resets_mid_request_mid_file_and_mid_command_leave_the_server_clean() {
    for backend in backends() {
        let dir = TempDir::new();
        std::fs::write(dir.0.join("big.bin"), payload(30_000_000, 3)).unwrap();
        std::fs::write(dir.0.join("small.txt"), b"small\n").unwrap();
        let server = Server::start(&config(&dir.0), backend);
        // Warm up every service once, then count descriptors.
        let fds = settled_fds(&server, &dir.0);

        for _ in 0..3 {
            // Mid-request: half an HTTP head, then a reset.
            let mut s = connect(server.addr("web"));
            s.write_all(b"GET / HTTP/1.1\r\nHo").unwrap();
            reset(s);
            // Mid-echo: data in flight both ways.
            let mut s = connect(server.addr("echo"));
            s.write_all(&payload(200_000, 1)).unwrap();
            reset(s);
            // Mid-file: 30 MB announced, a little read.
            let mut s = connect(server.addr("files"));
            s.write_all(b"get big.bin\n").unwrap();
            let mut b = [0u8; 4096];
            let _ = s.read(&mut b).unwrap();
            s.write_all(b"ok").unwrap();
            let _ = s.read(&mut b).unwrap();
            reset(s);
            // Mid-command: a command running, then a reset (the child must be killed).
            let mut s = connect(server.addr("exec"));
            s.write_all(b"sleep 20\n").unwrap();
            std::thread::sleep(Duration::from_millis(100));
            reset(s);
        }
        assert_healthy(&server, fds, &dir.0);
    }
}

#[test]
fn a_child_ignoring_sigterm_is_killed_at_the_timeout_and_reaped() {
    for backend in backends() {
        let dir = TempDir::new();
        std::fs::write(dir.0.join("small.txt"), b"small\n").unwrap();
        let server = Server::start(&config(&dir.0), backend);
        let fds = settled_fds(&server, &dir.0);
        let mut s = connect(server.addr("exec"));
        let started = Instant::now();
        s.write_all(b"stubborn\n").unwrap();
        let mut size = [0u8; 16];
        let n = s.read(&mut size).unwrap();
        let size: usize = std::str::from_utf8(&size[..n]).unwrap().parse().unwrap();
        s.write_all(b"ok").unwrap();
        let mut result = vec![0u8; size];
        s.read_exact(&mut result).unwrap();
        let result = String::from_utf8_lossy(&result);
        assert!(result.contains("[timed out after 1s]"), "{result}");
        assert!(!result.contains("survived"), "{result}");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
        drop(s);
        assert_healthy(&server, fds, &dir.0);
    }
}

#[test]
fn files_deleted_or_truncated_mid_transfer_never_verify_as_something_else() {
    for backend in backends() {
        let dir = TempDir::new();
        let data = payload(20_000_000, 9);
        std::fs::write(dir.0.join("small.txt"), b"small\n").unwrap();
        let server = Server::start(&config(&dir.0), backend);
        let fds = settled_fds(&server, &dir.0);
        for (name, change) in [("deleted.bin", "delete"), ("truncated.bin", "truncate")] {
            let path = dir.0.join(name);
            std::fs::write(&path, &data).unwrap();
            let addr = server.addr("files");
            let name2 = name.to_string();
            // A slow reader (~25 MB/s); the change lands once the transfer is running. The
            // reader waits for it: what is in flight meanwhile is bounded by the socket
            // buffers (a few MB of the 20), so the change always lands mid-transfer.
            let (running_tx, running) = std::sync::mpsc::channel();
            let (changed_tx, changed) = std::sync::mpsc::channel::<()>();
            let client = std::thread::spawn(move || {
                download_with(addr, &name2, Some(256 * 1024), move || {
                    let _ = running_tx.send(());
                    let _ = changed.recv();
                })
            });
            running
                .recv_timeout(Duration::from_secs(10))
                .expect("transfer started");
            match change {
                "delete" => std::fs::remove_file(&path).unwrap(),
                _ => std::fs::OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .unwrap()
                    .set_len(1000)
                    .unwrap(),
            }
            changed_tx.send(()).unwrap();
            let (size, slot) = client.join().unwrap();
            assert_eq!(size, data.len() as u64);
            match slot.as_deref() {
                // A deleted file's data is still whole (the open file keeps it): it may verify.
                Some(d) if d == md5_hex(&data) => assert_eq!(change, "delete", "{name}"),
                // Or the change is detected and said.
                Some("ERR file changed") | None => {}
                Some(other) => panic!("{backend} {name}: digest slot {other:?}"),
            }
        }
        assert_healthy(&server, fds, &dir.0);
    }
}

#[test]
fn a_full_disk_under_wharf_client_get_removes_the_partial_file_with_a_clear_error() {
    let dir = TempDir::new();
    std::fs::write(dir.0.join("big.bin"), payload(3_000_000, 4)).unwrap();
    std::fs::write(dir.0.join("small.txt"), b"small\n").unwrap();
    let full = TempDir::new();
    let mounted = Command::new("mount")
        .args([
            "-t",
            "tmpfs",
            "-o",
            "size=1m",
            "wharf-full",
            full.0.to_str().unwrap(),
        ])
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        skip_or_fail("cannot mount a 1 MiB tmpfs (needs root) for the full-disk test");
        return;
    }
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(full.0.clone());
    let server = Server::start(&config(&dir.0), "epoll");
    let out = Command::new(WHARF)
        .args([
            "client",
            "get",
            &server.addr("files").to_string(),
            "big.bin",
            "-o",
        ])
        .arg(full.0.join("big.bin"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("No space left on device"), "{stderr}");
    assert!(stderr.contains("partial file removed"), "{stderr}");
    let left: Vec<_> = std::fs::read_dir(&full.0).unwrap().collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    assert!(!stderr.contains("panicked"));
    let fds = settled_fds(&server, &dir.0);
    assert_healthy(&server, fds, &dir.0);
}

#[test]
fn sigterm_during_50_downloads_lets_each_finish_verified_and_refuses_new_connections() {
    const DOWNLOADS: usize = 50;
    for backend in backends() {
        let dir = TempDir::new();
        let data = payload(8_000_000, 5);
        std::fs::write(dir.0.join("f.bin"), &data).unwrap();
        std::fs::write(dir.0.join("small.txt"), b"small\n").unwrap();
        let mut server = Server::start(&config(&dir.0), backend);
        let addr = server.addr("files");
        // 50 readers at ~13 MB/s at most each (0.6 s or more per download); SIGTERM once
        // every one of them has its size, i.e. every transfer is running. The first one
        // pauses until new connections are seen refused: the drain cannot have ended by then,
        // so that refusal is the listener closing, not the server gone.
        let (started_tx, started) = std::sync::mpsc::channel();
        let (release_tx, release) = std::sync::mpsc::channel::<()>();
        let mut release = Some(release);
        let clients: Vec<_> = (0..DOWNLOADS)
            .map(|_| {
                let started_tx = started_tx.clone();
                let release = release.take();
                std::thread::spawn(move || {
                    download_with(addr, "f.bin", Some(128 * 1024), move || {
                        let _ = started_tx.send(());
                        if let Some(release) = release {
                            let _ = release.recv();
                        }
                    })
                })
            })
            .collect();
        for _ in 0..DOWNLOADS {
            started
                .recv_timeout(Duration::from_secs(30))
                .expect("every download starts");
        }
        let signalled = Instant::now();
        server.signal(libc::SIGTERM);
        // New connections are refused (polled: the signal takes a moment to land) while the
        // paused download holds the drain.
        let deadline = Instant::now() + Duration::from_secs(15);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok() {
            assert!(
                Instant::now() < deadline,
                "{backend}: still accepting after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        release_tx.send(()).unwrap();
        let want = md5_hex(&data);
        for c in clients {
            let (size, slot) = c.join().unwrap();
            assert_eq!(size, data.len() as u64);
            assert_eq!(slot.as_deref(), Some(want.as_str()), "{backend}");
        }
        let status = server
            .wait(Duration::from_secs(20))
            .expect("exited within the grace");
        assert_eq!(status.code(), Some(0), "{backend}: {}", server.log());
        assert!(signalled.elapsed() < Duration::from_secs(20));
        assert!(!server.log().contains("panicked"), "{}", server.log());
    }
}
