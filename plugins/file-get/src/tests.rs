//! file-get through `wharf_core::testing` with real files: confinement, resume, digests,
//! changes mid-transfer, listings.

use super::*;
use md5::{Digest, Md5};
use std::io::Write;
use std::os::unix::fs::symlink;
use std::path::Path;
use wharf_core::testing::{self, Client};

struct Tree(PathBuf);

impl Tree {
    fn new(tag: &str) -> Tree {
        let base = std::env::temp_dir().join(format!("wharf-fg-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let root = base.join("root");
        std::fs::create_dir_all(root.join("sub/deeper")).unwrap();
        std::fs::write(base.join("secret.txt"), b"outside the root").unwrap();
        std::fs::write(root.join("a.txt"), b"hello file-get\n").unwrap();
        std::fs::write(
            root.join("sub/b.bin"),
            (0..=255u8).cycle().take(300_000).collect::<Vec<_>>(),
        )
        .unwrap();
        std::fs::write(root.join("empty"), b"").unwrap();
        symlink(base.join("secret.txt"), root.join("escape-link")).unwrap();
        symlink(&base, root.join("escape-dir")).unwrap();
        symlink("/etc/passwd", root.join("absolute-link")).unwrap();
        symlink("a.txt", root.join("inside-link")).unwrap();
        let fifo = std::ffi::CString::new(root.join("fifo").to_str().unwrap()).unwrap();
        // SAFETY: valid C string.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
        Tree(base)
    }

    /// Digests of files changed in the last RACY_WINDOW are not cached: tests about caching
    /// wait that long after writing their files.
    fn age(&self) {
        std::thread::sleep(RACY_WINDOW + std::time::Duration::from_millis(100));
    }

    fn root(&self) -> PathBuf {
        self.0.join("root")
    }

    fn service(&self) -> FileGet {
        FileGet::build(FileGetOptions {
            root: Some(self.root()),
            ..Default::default()
        })
        .unwrap()
    }
}

impl Drop for Tree {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A download as the tutorial's client sees it.
#[derive(Debug, PartialEq)]
enum Got {
    File { data: Vec<u8>, trailer: String },
    Err(String),
}

async fn reply(client: &Client) -> Vec<u8> {
    let mut head = client.read(64).await;
    // An ERR line ends with a newline; a size is all digits.
    while head.first() == Some(&b'E') && head.last() != Some(&b'\n') {
        head.extend(client.read(256).await);
    }
    head
}

async fn get(client: &Client, command: &str) -> Got {
    client
        .write_all(format!("{command}\n").as_bytes())
        .await
        .unwrap();
    let head = reply(client).await;
    let text = String::from_utf8(head).unwrap();
    let Ok(size) = text.parse::<usize>() else {
        return Got::Err(text.trim_end().to_string());
    };
    client.write_all(b"ack").await.unwrap();
    let data = client.read_exact(size).await.unwrap();
    let mut trailer = client.read(32).await;
    while trailer.len() < 32 && !trailer.starts_with(b"ERR") {
        trailer.extend(client.read(32 - trailer.len()).await);
    }
    Got::File {
        data,
        trailer: String::from_utf8(trailer).unwrap(),
    }
}

/// Serves one connection with a service the test keeps a handle on (to look at its cache).
fn serve_shared(svc: &Arc<FileGet>, conn: testing::MemConn) -> testing::JoinHandle<io::Result<()>> {
    testing::spawn(Arc::clone(svc), conn)
}

fn md5_hex(data: &[u8]) -> String {
    hex(&Md5::digest(data).into())
}

#[test]
fn every_traversal_form_is_refused_and_the_connection_stays_usable() {
    let tree = Tree::new("traversal");
    testing::block_on(async {
        let (conn, client) = testing::pipe();
        let server = testing::spawn(tree.service(), conn);
        let long = "n".repeat(300);
        let cases = [
            ("get ../secret.txt", "ERR path outside root"),
            ("get sub/../../secret.txt", "ERR path outside root"),
            (
                "get sub/deeper/../../../secret.txt",
                "ERR path outside root",
            ),
            ("get /etc/passwd", "ERR path outside root"),
            ("get escape-link", "ERR path outside root"),
            ("get escape-dir/secret.txt", "ERR path outside root"),
            ("get absolute-link", "ERR path outside root"),
            ("get a.txt\0.png", "ERR bad path: NUL byte"),
            (&format!("get {long}"), "ERR bad path: name too long"),
            ("get fifo", "ERR not a regular file"),
            ("get sub", "ERR is a directory"),
            ("get missing.txt", "ERR no such file"),
            ("get a.txt/x", "ERR no such file"),
            ("list ../", "ERR path outside root"),
            ("list escape-dir", "ERR path outside root"),
            ("list a.txt", "ERR not a directory"),
            (
                "get",
                "ERR bad request: use `get <path> [<offset>]` or `list [<dir>]`",
            ),
            (
                "rm a.txt",
                "ERR bad request: use `get <path> [<offset>]` or `list [<dir>]`",
            ),
        ];
        for (command, expected) in cases {
            assert_eq!(
                get(&client, command).await,
                Got::Err(expected.into()),
                "{command:?}"
            );
        }
        // Still usable, and a symlink or a `..` that stays inside the root is fine.
        for inside in [
            "get inside-link",
            "get sub/../a.txt",
            "get sub/deeper/../../a.txt",
        ] {
            assert_eq!(
                get(&client, inside).await,
                Got::File {
                    data: b"hello file-get\n".to_vec(),
                    trailer: md5_hex(b"hello file-get\n")
                },
                "{inside}"
            );
        }
        client.close_write();
        server.await.unwrap().unwrap();
        let recorded = client.recorded_requests();
        assert_eq!(
            recorded.iter().filter(|o| **o == "refused").count(),
            16,
            "{recorded:?}"
        );
        assert_eq!(
            recorded.iter().filter(|o| **o == "not_found").count(),
            2,
            "{recorded:?}"
        );
    });
}

#[test]
fn device_files_are_never_opened() {
    let tree = Tree::new("device");
    let node = std::ffi::CString::new(tree.root().join("null").to_str().unwrap()).unwrap();
    // SAFETY: valid C string. Needs CAP_MKNOD; skip where the test runs unprivileged.
    if unsafe { libc::mknod(node.as_ptr(), libc::S_IFCHR | 0o666, libc::makedev(1, 3)) } != 0 {
        eprintln!("SKIP device file case: mknod not permitted here");
        return;
    }
    testing::block_on(async {
        let (conn, client) = testing::pipe();
        let server = testing::spawn(tree.service(), conn);
        assert_eq!(
            get(&client, "get null").await,
            Got::Err("ERR not a regular file".into())
        );
        client.close_write();
        server.await.unwrap().unwrap();
    });
}

#[test]
fn resume_at_start_middle_and_end_with_whole_file_digests() {
    let tree = Tree::new("resume");
    tree.age();
    let whole = std::fs::read(tree.root().join("sub/b.bin")).unwrap();
    let digest = md5_hex(&whole);
    testing::block_on(async {
        let (conn, client) = testing::pipe();
        let svc = Arc::new(tree.service());
        let server = serve_shared(&svc, conn);
        // Cold (hashing while sending) at a middle offset, then cached at 0 and at the end.
        for offset in [123_457usize, 0, whole.len(), 1] {
            let got = get(&client, &format!("get sub/b.bin {offset}")).await;
            let expected = Got::File {
                data: whole[offset..].to_vec(),
                trailer: digest.clone(),
            };
            assert!(got == expected, "offset {offset}");
        }
        assert_eq!(
            svc.digests_computed(),
            1,
            "the digest was computed more than once"
        );
        let past = get(&client, &format!("get sub/b.bin {}", whole.len() + 1)).await;
        assert_eq!(
            past,
            Got::Err("ERR bad offset: beyond the end of the file".into())
        );
        assert_eq!(
            get(&client, "get sub/b.bin -5").await,
            Got::Err("ERR bad offset".into())
        );
        // A 0-byte file.
        let empty = get(&client, "get empty").await;
        assert_eq!(
            empty,
            Got::File {
                data: vec![],
                trailer: md5_hex(b"")
            }
        );
        client.close_write();
        server.await.unwrap().unwrap();
    });
}

#[test]
fn cache_is_invalidated_by_any_change() {
    let tree = Tree::new("cache");
    tree.age();
    let path = tree.root().join("a.txt");
    testing::block_on(async {
        let (conn, client) = testing::pipe();
        let svc = Arc::new(tree.service());
        let server = serve_shared(&svc, conn);
        let first = get(&client, "get a.txt").await;
        assert_eq!(
            first,
            Got::File {
                data: b"hello file-get\n".to_vec(),
                trailer: md5_hex(b"hello file-get\n")
            }
        );
        // Same size, different bytes: the key changes with mtime/ctime.
        std::thread::sleep(std::time::Duration::from_millis(5));
        std::fs::write(&path, b"HELLO FILE-GET\n").unwrap();
        // Just modified: served right, but not cached (racy timestamps).
        let racy = get(&client, "get a.txt").await;
        assert_eq!(
            racy,
            Got::File {
                data: b"HELLO FILE-GET\n".to_vec(),
                trailer: md5_hex(b"HELLO FILE-GET\n")
            }
        );
        assert_eq!(svc.cache().len(), 1);
        std::thread::sleep(RACY_WINDOW + std::time::Duration::from_millis(100));
        let second = get(&client, "get a.txt").await;
        assert_eq!(
            second,
            Got::File {
                data: b"HELLO FILE-GET\n".to_vec(),
                trailer: md5_hex(b"HELLO FILE-GET\n")
            }
        );
        let third = get(&client, "get a.txt").await;
        assert_eq!(third, second);
        assert_eq!(svc.digests_computed(), 3);
        assert_eq!(svc.cache().len(), 2);
        client.close_write();
        server.await.unwrap().unwrap();
    });
}

/// Starts a download of `name`, reads a little, changes the file, reads the rest.
async fn change_mid_transfer(svc: Arc<FileGet>, root: &Path, name: &str) -> (usize, String) {
    let (conn, client) = testing::pipe_with_capacity(16 * 1024);
    let server = serve_shared(&svc, conn);
    client
        .write_all(format!("get {name}\n").as_bytes())
        .await
        .unwrap();
    let size: usize = String::from_utf8(reply(&client).await)
        .unwrap()
        .parse()
        .unwrap();
    client.write_all(b"ack").await.unwrap();
    let first = client.read_exact(32 * 1024).await.unwrap();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(root.join(name))
        .unwrap();
    f.write_all(b"CHANGED").unwrap();
    drop(f);
    let rest = client.read_exact(size - first.len()).await.unwrap();
    let trailer = String::from_utf8(client.read(32).await).unwrap();
    client.close_write();
    server.await.unwrap().unwrap();
    (first.len() + rest.len(), trailer)
}

#[test]
fn a_file_changed_mid_transfer_gets_err_file_changed() {
    let tree = Tree::new("changed");
    let big: Vec<u8> = (0..4_000_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(tree.root().join("big.bin"), &big).unwrap();
    std::fs::write(tree.root().join("big2.bin"), &big).unwrap();
    tree.age();
    testing::block_on(async {
        let svc = Arc::new(tree.service());
        // Cold: hashing while sending.
        let (n, trailer) = change_mid_transfer(Arc::clone(&svc), &tree.root(), "big.bin").await;
        assert_eq!((n, trailer.as_str()), (big.len(), CHANGED));
        // Cached digest: download big2 once, then change it mid-transfer.
        let (conn, client) = testing::pipe_with_capacity(8 * 1024 * 1024);
        let server = serve_shared(&svc, conn);
        assert!(matches!(
            get(&client, "get big2.bin").await,
            Got::File { .. }
        ));
        client.close_write();
        server.await.unwrap().unwrap();
        let (n, trailer) = change_mid_transfer(Arc::clone(&svc), &tree.root(), "big2.bin").await;
        assert_eq!((n, trailer.as_str()), (big.len(), CHANGED));
    });
}

#[test]
fn a_client_leaving_mid_file_ends_the_session() {
    let tree = Tree::new("leave");
    std::fs::write(tree.root().join("big.bin"), vec![7u8; 3_000_000]).unwrap();
    testing::block_on(async {
        let (conn, client) = testing::pipe_with_capacity(16 * 1024);
        let server = testing::spawn(tree.service(), conn);
        client.write_all(b"get big.bin\n").await.unwrap();
        let _size = reply(&client).await;
        client.write_all(b"ack").await.unwrap();
        let _ = client.read_exact(20_000).await.unwrap();
        drop(client);
        let ended = tokio::time::timeout(std::time::Duration::from_secs(5), server).await;
        assert!(ended.expect("server kept going").unwrap().is_err());
    });
}

#[test]
fn a_half_closed_client_still_gets_its_file_and_listing() {
    let tree = Tree::new("halfclose");
    let expected = std::fs::read(tree.root().join("sub/b.bin")).unwrap();
    testing::block_on(async {
        // Half-closed right after the command: no ack can come, the answer still does.
        let (conn, client) = testing::pipe();
        let server = testing::spawn(tree.service(), conn);
        client.write_all(b"get sub/b.bin\n").await.unwrap();
        client.close_write();
        let all = client.read_to_end().await;
        let size = expected.len().to_string();
        assert!(all.starts_with(size.as_bytes()), "{:?}", &all[..16]);
        let body = &all[size.len()..];
        assert_eq!(&body[..expected.len()], &expected[..]);
        assert_eq!(&body[expected.len()..], md5_hex(&expected).as_bytes());
        server.await.unwrap().unwrap();
        assert_eq!(client.recorded_requests(), ["ok"]);

        let (conn, client) = testing::pipe();
        let server = testing::spawn(tree.service(), conn);
        client.write_all(b"list\n").await.unwrap();
        client.close_write();
        let all = String::from_utf8(client.read_to_end().await).unwrap();
        assert!(all.contains("a.txt"), "{all}");
        server.await.unwrap().unwrap();
    });
}

#[test]
fn offsets_and_sizes_beyond_4_gib() {
    let tree = Tree::new("huge");
    let path = tree.root().join("sparse");
    let size = 5u64 << 30;
    std::fs::File::create(&path).unwrap().set_len(size).unwrap();
    let svc = tree.service();
    // Pre-seed the cache so this unit test does not hash 5 GiB in a debug build; the
    // end-to-end test hashes a 5 GiB file for real.
    let file = std::fs::File::open(&path).unwrap();
    let key = FileKey::of(&fstat(file.as_raw_fd()).unwrap());
    svc.cache().insert(key, [0x5a; 16]);
    testing::block_on(async {
        let (conn, client) = testing::pipe();
        let server = testing::spawn(svc, conn);
        let offset = size - 1000;
        let got = get(&client, &format!("get sparse {offset}")).await;
        assert_eq!(
            got,
            Got::File {
                data: vec![0; 1000],
                trailer: "5a".repeat(16)
            }
        );
        client.write_all(b"list\n").await.unwrap();
        let n: usize = String::from_utf8(reply(&client).await)
            .unwrap()
            .parse()
            .unwrap();
        client.write_all(b"ack").await.unwrap();
        let listing = String::from_utf8(client.read_exact(n).await.unwrap()).unwrap();
        assert!(
            listing.contains(&format!("\n{size}\tsparse\n")),
            "{listing}"
        );
        client.close_write();
        server.await.unwrap().unwrap();
    });
}

#[test]
fn listings_show_files_and_directories_only() {
    let tree = Tree::new("list");
    testing::block_on(async {
        let (conn, client) = testing::pipe();
        let server = testing::spawn(tree.service(), conn);
        let list = |cmd: &'static str| {
            let client = &client;
            async move {
                client.write_all(cmd.as_bytes()).await.unwrap();
                let n: usize = String::from_utf8(reply(client).await)
                    .unwrap()
                    .parse()
                    .unwrap();
                client.write_all(b"ack").await.unwrap();
                String::from_utf8(client.read_exact(n).await.unwrap()).unwrap()
            }
        };
        assert_eq!(list("list\n").await, "15\ta.txt\n0\tempty\n-\tsub/\n");
        assert_eq!(list("list sub\n").await, "300000\tb.bin\n-\tdeeper/\n");
        client.close_write();
        server.await.unwrap().unwrap();
    });
}

#[test]
fn root_is_required_and_must_exist() {
    let err = FileGet::build(FileGetOptions::default()).err().unwrap();
    assert_eq!(err.option.as_deref(), Some("root"));
    let err = FileGet::build(FileGetOptions {
        root: Some("/nonexistent/dir".into()),
        ..Default::default()
    })
    .err()
    .unwrap();
    assert!(err.message.contains("not an existing directory"));
}

/// A `roots` entry's directory beside the tree's root: `ops.txt` in `<base>/ops`.
fn ops_root(tree: &Tree) -> PathBuf {
    let dir = tree.0.join("ops");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("ops.txt"), b"for ops only\n").unwrap();
    dir
}

/// A connection from a client with `identity` (`None`: no client certificate).
fn pipe_as(identity: Option<&str>) -> (testing::MemConn, Client) {
    let (conn, client) = testing::pipe();
    match identity {
        Some(id) => (conn.with_identity(id), client),
        None => (conn, client),
    }
}

#[test]
fn an_identity_with_its_own_root_is_served_that_root_only() {
    let tree = Tree::new("roots");
    let svc = Arc::new(
        FileGet::build(FileGetOptions {
            root: Some(tree.root()),
            roots: [("ops".to_string(), ops_root(&tree))].into(),
            ..Default::default()
        })
        .unwrap(),
    );
    let file = |data: &[u8]| Got::File {
        data: data.to_vec(),
        trailer: md5_hex(data),
    };
    let missing = || Got::Err("ERR no such file".into());
    testing::block_on(async {
        let (conn, client) = pipe_as(Some("ops"));
        let server = serve_shared(&svc, conn);
        assert_eq!(get(&client, "get ops.txt").await, file(b"for ops only\n"));
        // Not the shared root, and no way out of its own.
        assert_eq!(get(&client, "get a.txt").await, missing());
        assert_eq!(
            get(&client, "get ../root/a.txt").await,
            Got::Err("ERR path outside root".into())
        );
        client.close_write();
        server.await.unwrap().unwrap();
        // Other identities, and clients without one, get `root`.
        for identity in [Some("dev"), Some("Ops"), None] {
            let (conn, client) = pipe_as(identity);
            let server = serve_shared(&svc, conn);
            assert_eq!(get(&client, "get a.txt").await, file(b"hello file-get\n"));
            assert_eq!(get(&client, "get ops.txt").await, missing(), "{identity:?}");
            client.close_write();
            server.await.unwrap().unwrap();
        }
    });
}

#[test]
fn without_root_clients_lacking_a_root_of_their_own_are_refused() {
    let tree = Tree::new("roots-only");
    let svc = Arc::new(
        FileGet::build(FileGetOptions {
            roots: [("ops".to_string(), ops_root(&tree))].into(),
            ..Default::default()
        })
        .unwrap(),
    );
    testing::block_on(async {
        for identity in [Some("dev"), None] {
            let (conn, client) = pipe_as(identity);
            let server = serve_shared(&svc, conn);
            for request in ["get ops.txt", "get a.txt", "list"] {
                assert_eq!(
                    get(&client, request).await,
                    Got::Err("ERR not allowed for this client".into()),
                    "{identity:?} {request}"
                );
            }
            // Refusals, and the connection stays usable like after any `ERR`.
            assert_eq!(client.recorded_requests(), ["refused"; 3]);
            client.close_write();
            server.await.unwrap().unwrap();
        }
        let (conn, client) = pipe_as(Some("ops"));
        let server = serve_shared(&svc, conn);
        assert!(matches!(
            get(&client, "get ops.txt").await,
            Got::File { .. }
        ));
        client.close_write();
        server.await.unwrap().unwrap();
    });
}

#[test]
fn roots_are_checked_by_key() {
    let tree = Tree::new("roots-options");
    let err = |roots: &[(&str, PathBuf)]| {
        FileGet::build(FileGetOptions {
            root: Some(tree.root()),
            roots: roots
                .iter()
                .map(|(id, dir)| (id.to_string(), dir.clone()))
                .collect(),
            ..Default::default()
        })
        .err()
        .unwrap()
    };
    let e = err(&[("ops", tree.0.join("missing"))]);
    assert_eq!(e.option.as_deref(), Some("roots.ops"));
    assert!(
        e.message.contains("not an existing directory"),
        "{}",
        e.message
    );
    let e = err(&[("", tree.root())]);
    assert_eq!(e.option.as_deref(), Some("roots."));
    let e = err(&[("o\tps", tree.root())]);
    assert_eq!(e.option.as_deref(), Some("roots.o\tps"));
    // `roots` alone is enough: `root` is then optional.
    let only_roots = FileGetOptions {
        roots: [("ops".to_string(), tree.root())].into(),
        ..Default::default()
    };
    assert!(FileGet::build(only_roots).is_ok());
}

#[test]
fn resumes_that_leave_continue_one_hash_instead_of_starting_over() {
    let tree = Tree::new("resume-leave");
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
    std::fs::write(tree.root().join("big.bin"), &big).unwrap();
    tree.age();
    let svc = Arc::new(tree.service());
    let size = big.len() as u64;
    testing::block_on(async {
        // Each client asks for the last byte, takes it and leaves while the hash runs.
        for _ in 0..20 {
            let (conn, client) = testing::pipe_with_capacity(16 * 1024);
            let server = serve_shared(&svc, conn);
            client
                .write_all(format!("get big.bin {}\n", size - 1).as_bytes())
                .await
                .unwrap();
            assert_eq!(reply(&client).await, b"1");
            client.write_all(b"ack").await.unwrap();
            assert_eq!(client.read_exact(1).await.unwrap(), [big[big.len() - 1]]);
            drop(client);
            let _ = server.await.unwrap();
        }
        // Old code: a whole-file hash per request (20 x 3 MB). Now the work of each departed
        // client is kept and continued: the file is hashed once in all.
        let hashed = svc.bytes_hashed();
        assert!(
            hashed <= size + CHUNK as u64,
            "hashed {hashed} bytes for a {size}-byte file"
        );
        assert!(
            hashed >= size,
            "the resumes made no progress: {hashed} bytes"
        );
        assert_eq!(svc.digests_computed(), 1);
        let (conn, client) = testing::pipe();
        let server = serve_shared(&svc, conn);
        let got = get(&client, &format!("get big.bin {}", size - 3)).await;
        assert_eq!(
            got,
            Got::File {
                data: big[big.len() - 3..].to_vec(),
                trailer: md5_hex(&big),
            }
        );
        assert_eq!(svc.bytes_hashed(), hashed, "the digest came from the cache");
        drop(client);
        let _ = server.await;
    });
}

#[test]
fn a_listing_never_exceeds_32_kib_and_says_when_entries_are_left_out() {
    let tree = Tree::new("list-cap");
    let big = tree.root().join("big");
    std::fs::create_dir(&big).unwrap();
    // 2 000 names of 246 bytes: about 500 KB of listing before the cap.
    for i in 0..2_000 {
        let name = format!("{i:06}{}", "n".repeat(240));
        std::fs::write(big.join(name), b"").unwrap();
    }
    testing::block_on(async {
        // A client that never acknowledges: what the server holds for it is the announced size.
        let (conn, client) = testing::pipe();
        let server = testing::spawn(tree.service(), conn);
        client.write_all(b"list big\n").await.unwrap();
        let n: usize = String::from_utf8(reply(&client).await)
            .unwrap()
            .parse()
            .unwrap();
        assert!(n <= MAX_LISTING_BYTES, "a listing of {n} bytes");
        assert!(n > MAX_LISTING_BYTES - 300, "the cap left room: {n} bytes");
        client.write_all(b"ack").await.unwrap();
        let listing = String::from_utf8(client.read_exact(n).await.unwrap()).unwrap();
        let lines: Vec<&str> = listing.lines().collect();
        assert_eq!(lines.last(), Some(&"[more entries not shown]"));
        assert!(lines.len() > 100, "{} lines", lines.len());
        for line in &lines[..lines.len() - 1] {
            assert!(line.starts_with("0\t") && line.len() == 248, "{line:?}");
        }
        client.close_write();
        server.await.unwrap().unwrap();
    });
}

#[test]
fn a_resume_at_the_end_by_a_client_that_closed_costs_no_hash() {
    let tree = Tree::new("resume-end-closed");
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(tree.root().join("big.bin"), &big).unwrap();
    let svc = Arc::new(tree.service());
    let size = big.len();
    testing::block_on(async {
        // Asks for nothing (`offset == size`), acknowledges and closes: nothing is ever sent
        // to it, so no reset comes back, and before it cost a whole-file hash for nobody.
        for _ in 0..4 {
            let (conn, client) = testing::pipe();
            let server = serve_shared(&svc, conn);
            client
                .write_all(format!("get big.bin {size}\n").as_bytes())
                .await
                .unwrap();
            assert_eq!(reply(&client).await, b"0");
            client.write_all(b"ack").await.unwrap();
            client.close_write();
            let _ = client.read_to_end().await;
            let _ = server.await.unwrap();
        }
        assert_eq!(svc.digests_computed(), 0);
        let hashed = svc.bytes_hashed();
        assert!(hashed <= CHUNK as u64, "hashed {hashed} bytes for nobody");

        // A client still talking gets the trailer of the same request.
        let (conn, client) = testing::pipe();
        let server = serve_shared(&svc, conn);
        let got = get(&client, &format!("get big.bin {size}")).await;
        assert_eq!(
            got,
            Got::File {
                data: Vec::new(),
                trailer: md5_hex(&big),
            }
        );
        client.close_write();
        server.await.unwrap().unwrap();
    });
}

#[test]
fn a_request_from_a_client_that_already_reset_runs_no_blocking_job() {
    let tree = Tree::new("reset-before");
    testing::block_on(async {
        for command in ["get a.txt\n", "list\n", "list sub\n"] {
            let (conn, client) = testing::pipe();
            client.write_all(command.as_bytes()).await.unwrap();
            drop(client); // asked and reset before the server read the request
            let err = testing::spawn(tree.service(), conn)
                .await
                .unwrap()
                .unwrap_err();
            // Before: the open (and listing) jobs ran, and the first write met a broken pipe.
            assert_eq!(
                err.kind(),
                io::ErrorKind::ConnectionReset,
                "{command}: {err}"
            );
        }
    });
}
