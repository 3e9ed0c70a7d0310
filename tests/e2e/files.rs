//! file-get through real sockets on both backends: the tutorial-style Python client (cold and
//! cached digests), `wharf client get/list` with resume, a client leaving mid-file (no fd
//! leak), and a 5 GiB sparse file.

use std::io::{Read, Write};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::harness::*;

fn files_config(root: &std::path::Path) -> String {
    format!(
        "[server]\nworkers = 2\nshutdown_grace = \"2s\"\n\
         [metrics]\nlisten = \"127.0.0.1:0\"\n\
         [services.files]\nplugin = \"file-get\"\nlisten = \"127.0.0.1:0\"\n\
         [services.files.options]\nroot = \"{}\"\n",
        root.display()
    )
}

/// The tutorial's download client: send `get`, recv the size, send an ack, recv exactly size
/// bytes in bounded chunks, recv the digest, compare with hashlib.
const TUTORIAL_GET_CLIENT: &str = r#"
import socket, sys, hashlib
host, port = sys.argv[1], int(sys.argv[2])
client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
client.connect((host, port))
for name in sys.argv[3:]:
    client.send(("get " + name).encode())
    size = int(client.recv(1024).decode())
    client.send(b"ok")
    h = hashlib.md5()
    remaining = size
    while remaining > 0:
        chunk = client.recv(min(65536, remaining))
        if not chunk:
            raise SystemExit("connection closed early")
        h.update(chunk)
        remaining -= len(chunk)
    digest = b""
    while len(digest) < 32:
        part = client.recv(32 - len(digest))
        if not part:
            break
        digest += part
    print(name, size, "match" if digest.decode() == h.hexdigest() else "MISMATCH " + digest.decode())
client.close()
"#;

fn tutorial_get(addr: std::net::SocketAddr, names: &[&str]) -> Option<String> {
    python_client(TUTORIAL_GET_CLIENT, addr, names)
}

#[test]
fn tutorial_python_client_downloads_and_verifies_cold_and_cached() {
    for backend in backends() {
        let dir = TempDir::new();
        std::fs::write(dir.0.join("small.txt"), b"hello\n").unwrap();
        std::fs::write(dir.0.join("big.bin"), payload(3_000_000, 7)).unwrap();
        std::fs::write(dir.0.join("empty"), b"").unwrap();
        let server = Server::start(&files_config(&dir.0), backend);
        let addr = server.addr("files");
        // First pass hashes while sending; the second is served from the digest cache.
        let Some(out) = tutorial_get(
            addr,
            &["small.txt", "big.bin", "empty", "big.bin", "small.txt"],
        ) else {
            return;
        };
        assert_eq!(
            out,
            "small.txt 6 match\nbig.bin 3000000 match\nempty 0 match\nbig.bin 3000000 match\nsmall.txt 6 match\n"
        );
        let labels = [
            ("service", "files"),
            ("plugin", "file-get"),
            ("backend", backend),
        ];
        // Every byte sent counts, zero-copy or not: data, then size replies ("6" and
        // "3000000" twice each, "0" once), then five digests.
        let data = 2 * 6 + 2 * 3_000_000;
        let sizes = 2 * "6".len() + 2 * "3000000".len() + "0".len();
        let sent = data + sizes + 5 * 32;
        server.wait_metric("wharf_sent_bytes_total", &labels, sent as f64);
        let mut ok = labels.to_vec();
        ok.push(("outcome", "ok"));
        server.wait_metric("wharf_requests_total", &ok, 5.0);
    }
}

#[test]
fn wharf_client_get_resumes_verifies_and_reports_errors() {
    for backend in backends() {
        let root = TempDir::new();
        let work = TempDir::new();
        let data = payload(2_500_000, 7);
        std::fs::create_dir(root.0.join("sub")).unwrap();
        std::fs::write(root.0.join("sub/data.bin"), &data).unwrap();
        let server = Server::start(&files_config(&root.0), backend);
        let addr = server.addr("files").to_string();

        let (code, _, err) = wharf_client(&work.0, &["get", &addr, "sub/data.bin"]);
        assert_eq!(code, 0, "{err}");
        assert!(std::fs::read(work.0.join("data.bin")).unwrap() == data);
        assert!(!work.0.join("data.bin.part").exists());

        // Resume from the middle and from the very end of a partial file.
        for cut in [1_000_000usize, data.len()] {
            std::fs::write(work.0.join("resumed.bin.part"), &data[..cut]).unwrap();
            let (code, _, err) = wharf_client(
                &work.0,
                &[
                    "get",
                    &addr,
                    "sub/data.bin",
                    "-o",
                    "resumed.bin",
                    "--resume",
                ],
            );
            assert_eq!(code, 0, "{err}");
            assert!(
                std::fs::read(work.0.join("resumed.bin")).unwrap() == data,
                "cut {cut}"
            );
        }
        // A corrupted partial file is caught by the whole-file MD5 and removed.
        std::fs::write(work.0.join("bad.bin.part"), vec![0u8; 1000]).unwrap();
        let (code, _, err) = wharf_client(
            &work.0,
            &["get", &addr, "sub/data.bin", "-o", "bad.bin", "--resume"],
        );
        assert_eq!(code, 1);
        assert!(err.contains("MD5 mismatch"), "{err}");
        assert!(!work.0.join("bad.bin").exists() && !work.0.join("bad.bin.part").exists());

        let (code, _, err) = wharf_client(&work.0, &["get", &addr, "../etc/passwd"]);
        assert_eq!(code, 1);
        assert!(
            err.contains("server refused: ERR path outside root"),
            "{err}"
        );
        let (code, _, err) = wharf_client(&work.0, &["get", &addr, "nope.txt"]);
        assert_eq!(
            (code, err.trim()),
            (1, "wharf: error: server refused: ERR no such file")
        );

        let out = Command::new(WHARF)
            .args(["client", "list", &addr])
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "-\tsub/\n");
        let out = Command::new(WHARF)
            .args(["client", "list", &addr, "sub"])
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "2500000\tdata.bin\n");
    }
}

#[test]
fn a_client_leaving_mid_file_leaks_nothing() {
    for backend in backends() {
        let dir = TempDir::new();
        std::fs::write(dir.0.join("big.bin"), payload(40_000_000, 7)).unwrap();
        let server = Server::start(&files_config(&dir.0), backend);
        let addr = server.addr("files");
        let baseline = open_fds(server.pid());
        for round in 0..6 {
            // Odd rounds leave during a cached (zero-copy) transfer.
            let mut s = connect(addr);
            s.write_all(b"get big.bin\n").unwrap();
            let mut size = [0u8; 16];
            let _ = s.read(&mut size).unwrap();
            s.write_all(b"ok").unwrap();
            let mut some = vec![0u8; 100_000];
            s.read_exact(&mut some).unwrap();
            if round == 0 {
                // Let one complete so the digest gets cached for the next rounds.
                let mut rest = Vec::new();
                s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                let mut buf = vec![0u8; 1 << 20];
                while rest.len() < 40_000_000 - 100_000 + 32 {
                    let n = s.read(&mut buf).unwrap();
                    assert!(n > 0);
                    rest.extend_from_slice(&buf[..n]);
                }
            }
            drop(s);
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let now = open_fds(server.pid());
            if now <= baseline {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{backend}: fds {baseline} -> {now}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        // Still serving.
        if let Some(out) = tutorial_get(addr, &["big.bin"]) {
            assert_eq!(out, "big.bin 40000000 match\n");
        }
    }
}

#[test]
fn a_5_gib_sparse_file_downloads_and_verifies() {
    let dir = TempDir::new();
    let size = 5u64 << 30;
    std::fs::File::create(dir.0.join("sparse.img"))
        .unwrap()
        .set_len(size)
        .unwrap();
    let server = Server::start(&files_config(&dir.0), "epoll");
    let Some(out) = tutorial_get(server.addr("files"), &["sparse.img"]) else {
        return;
    };
    assert_eq!(out, format!("sparse.img {size} match\n"));
}
