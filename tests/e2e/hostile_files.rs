//! Hostile file-get clients (issue 14, items 1, 3, 11 and 14d), on both backends: crowds of
//! downloads that are never read, resumes that ask for the last byte and leave, a SIGTERM while
//! a checksum runs for a client that has gone, and `..` that stays inside the root. Each attack
//! runs against the real binary while a normal client measures that it is still served.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::harness::*;

/// A file-get service `files` over `root` and an exec service `exec`, one worker, so every
/// client shares one worker's blocking pool (the old failure).
fn config(root: &std::path::Path, grace: &str) -> String {
    format!(
        "[server]\nworkers = 1\nshutdown_grace = \"{grace}\"\n\
         [metrics]\nlisten = \"127.0.0.1:0\"\n\
         [services.files]\nplugin = \"file-get\"\nlisten = \"127.0.0.1:0\"\n\
         [services.files.options]\nroot = \"{}\"\n\
         [services.exec]\nplugin = \"exec\"\nlisten = \"127.0.0.1:0\"\n\
         [services.exec.options]\ncwd = \"{}\"\ntimeout = \"5s\"\n\
         [services.exec.options.commands]\n\
         echo = {{ argv = [\"echo\"], allow_args = true }}\n",
        root.display(),
        root.display()
    )
}

/// A sparse file of `len` bytes (zeros read at memory speed, no disk space), aged past
/// file-get's racy window so its digest and progress may be cached.
fn sparse(dir: &TempDir, name: &str, len: u64) {
    let f = std::fs::File::create(dir.0.join(name)).unwrap();
    f.set_len(len).unwrap();
    // Write one byte at the end so two such files differ from an all-zero one of any size.
    use std::os::unix::fs::FileExt;
    f.write_at(name.as_bytes(), len - name.len() as u64)
        .unwrap();
    let old = std::time::SystemTime::now() - Duration::from_secs(60);
    f.set_modified(old).unwrap();
}

/// The hex MD5 of the file [`sparse`] makes.
fn sparse_md5(len: u64, name: &str) -> String {
    use md5::Digest;
    let mut md5 = md5::Md5::new();
    let zeros = vec![0u8; 1 << 20];
    let mut left = len - name.len() as u64;
    while left > 0 {
        let n = left.min(zeros.len() as u64) as usize;
        md5.update(&zeros[..n]);
        left -= n as u64;
    }
    md5.update(name.as_bytes());
    format!("{:x}", md5.finalize())
}

/// `/proc/<pid>/status` field `name` (Threads, VmRSS in kB).
fn status_field(pid: i32, name: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
}

/// CPU time (user + system) the process has used.
fn cpu_time(pid: i32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after the name.
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_millis(ticks * 1000 / hz)
}

/// Polls until the process's CPU time stops growing (no work left running), at most `limit`.
fn cpu_settled(pid: i32, limit: Duration) -> Duration {
    let deadline = Instant::now() + limit;
    let mut last = cpu_time(pid);
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let now = cpu_time(pid);
        if now.saturating_sub(last) <= Duration::from_millis(20) || Instant::now() > deadline {
            return now;
        }
        last = now;
    }
}

/// Sends `get <path> [<offset>]` and the ack; returns the announced size (None: an ERR line).
fn ask(s: &mut TcpStream, path: &str, offset: Option<u64>) -> Result<u64, String> {
    let line = match offset {
        Some(o) => format!("get {path} {o}\n"),
        None => format!("get {path}\n"),
    };
    s.write_all(line.as_bytes()).unwrap();
    let mut head = [0u8; 256];
    let n = s.read(&mut head).unwrap();
    let text = String::from_utf8_lossy(&head[..n]).to_string();
    let size = text.trim().parse::<u64>().map_err(|_| text.clone())?;
    s.write_all(b"ack").unwrap();
    Ok(size)
}

/// A whole small download (size, ack, bytes, digest); returns the data and the digest slot.
fn fetch(addr: SocketAddr, path: &str, offset: Option<u64>) -> (Vec<u8>, String) {
    let mut s = connect(addr);
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let size = ask(&mut s, path, offset).unwrap_or_else(|e| panic!("get {path}: {e}"));
    let mut data = vec![0u8; size as usize];
    s.read_exact(&mut data).unwrap();
    let mut slot = [0u8; 32];
    s.read_exact(&mut slot).unwrap();
    (data, String::from_utf8_lossy(&slot).to_string())
}

/// One exec command, the tutorial's way: returns the output.
fn exec(addr: SocketAddr, line: &str) -> String {
    let mut s = connect(addr);
    s.write_all(format!("{line}\n").as_bytes()).unwrap();
    let mut head = [0u8; 64];
    let n = s.read(&mut head).unwrap();
    let size: usize = String::from_utf8_lossy(&head[..n]).trim().parse().unwrap();
    s.write_all(b"ack").unwrap();
    let mut out = vec![0u8; size];
    s.read_exact(&mut out).unwrap();
    String::from_utf8_lossy(&out).to_string()
}

/// Item 1: 520 clients (more than tokio's 512 blocking threads) ask for a big file, ack, and
/// never read. Before the fix each held a blocking thread (io_uring: every sendfile; epoll:
/// the cold download's producer), so the thread count and RSS grew with the crowd (300
/// clients: 304 threads, 316 MiB on epoll) and past 512 a small `get` and exec commands waited
/// for a thread (3-13 s). Now a stalled client holds its socket and file and no buffer of ours
/// (chunks go out with sendfile): the normal client is served within 2 s, threads stay under
/// 40, RSS under 64 MiB (measured: 11 threads, 13 MiB).
#[test]
fn clients_that_never_read_hold_no_threads_and_others_are_served() {
    const CROWD: usize = 520;
    for backend in backends() {
        let dir = TempDir::new();
        sparse(&dir, "big.bin", 256 << 20);
        std::fs::write(dir.0.join("small.txt"), b"small and quick\n").unwrap();
        let server = Server::start(&config(&dir.0, "1s"), backend);
        let (files, exec_addr, pid) = (server.addr("files"), server.addr("exec"), server.pid());
        let threads_before = status_field(pid, "Threads");
        // All at once, so none completes and fills the cache: every one is a cold download.
        let crowd: Vec<TcpStream> = (0..CROWD)
            .map(|_| {
                let mut s = connect(files);
                s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                ask(&mut s, "big.bin", None).unwrap();
                s
            })
            .collect();
        // Let the crowd's transfers fill their socket buffers and stall.
        std::thread::sleep(Duration::from_secs(2));

        let started = Instant::now();
        let (data, _) = fetch(files, "small.txt", None);
        let small = started.elapsed();
        assert_eq!(data, b"small and quick\n");
        let started = Instant::now();
        assert_eq!(exec(exec_addr, "echo still served"), "still served\n");
        let command = started.elapsed();
        let threads = status_field(pid, "Threads");
        let rss_mib = status_field(pid, "VmRSS") / 1024;
        eprintln!(
            "{backend}: {CROWD} stalled downloads: small get {small:?}, exec {command:?}, \
             threads {threads_before} -> {threads}, RSS {rss_mib} MiB"
        );
        assert!(
            small < Duration::from_secs(2),
            "{backend}: small get took {small:?}"
        );
        assert!(
            command < Duration::from_secs(2),
            "{backend}: exec took {command:?}"
        );
        assert!(
            threads < 40,
            "{backend}: {threads} threads with {CROWD} stalled clients"
        );
        assert!(
            rss_mib < 200,
            "{backend}: RSS {rss_mib} MiB with {CROWD} stalled clients"
        );
        drop(crowd);
    }
}

/// Item 3: `get <big> <size-1>` + ack + close, 30 times. Before the fix each request cost a
/// whole-file MD5 after its client had left and never filled the cache (20 hashes); now the
/// work stops when the client leaves and the next request continues it, so all of them
/// together cost under 2 hashes of the file (measured against one honest hash of a file of the
/// same size on the same server).
#[test]
fn resumes_that_leave_cost_about_one_hash_in_total() {
    const ATTEMPTS: usize = 20;
    for backend in backends() {
        let (one_hash, attack) = resume_costs(backend, 1, ATTEMPTS);
        eprintln!("{backend}: one hash {one_hash:?}, {ATTEMPTS} resumes that left {attack:?}");
        assert!(
            attack < one_hash * 2,
            "{backend}: {ATTEMPTS} resumes cost {attack:?}, one hash costs {one_hash:?}"
        );
    }
}

/// On a server over two sparse files of 256 MiB: the CPU one honest `get` of the last `tail`
/// bytes of one costs, and what `attempts` clients asking for the last `tail` bytes of the
/// other, acknowledging and closing cost (waiting for any work left behind). Then checks that
/// an honest resume of the attacked file still gets the right digest.
fn resume_costs(backend: &str, tail: u64, attempts: usize) -> (Duration, Duration) {
    const LEN: u64 = 256 << 20;
    let dir = TempDir::new();
    sparse(&dir, "big.bin", LEN);
    sparse(&dir, "calibrate.bin", LEN);
    let server = Server::start(&config(&dir.0, "1s"), backend);
    let (files, pid) = (server.addr("files"), server.pid());

    let before = cpu_settled(pid, Duration::from_secs(10));
    let (data, digest) = fetch(files, "calibrate.bin", Some(LEN - tail));
    assert_eq!((data.len() as u64, digest.len()), (tail, 32), "{backend}");
    let one_hash = cpu_settled(pid, Duration::from_secs(60)) - before;

    let before = cpu_settled(pid, Duration::from_secs(10));
    for _ in 0..attempts {
        let mut s = connect(files);
        assert_eq!(ask(&mut s, "big.bin", Some(LEN - tail)), Ok(tail));
        drop(s);
    }
    // Old code: every request's hash still runs after its client left; wait for it all.
    let attack = cpu_settled(pid, Duration::from_secs(120)) - before;
    // And the work was not lost: the next honest resume gets the right digest.
    let (_, digest) = fetch(files, "big.bin", Some(LEN - tail));
    assert_eq!(digest, sparse_md5(LEN, "big.bin"), "{backend}");
    (one_hash, attack)
}

/// Item 11: a SIGTERM while a checksum runs for a client that has gone (the client asked for
/// the last byte of a 2 GiB file and left). Before the fix the drain waited for the hash
/// (3.7 s with a 1.5 s grace); now the server exits within the grace plus a margin.
#[test]
fn sigterm_during_a_checksum_nobody_waits_for_exits_within_the_grace() {
    const LEN: u64 = 2 << 30;
    for backend in backends() {
        let dir = TempDir::new();
        sparse(&dir, "huge.bin", LEN);
        let mut server = Server::start(&config(&dir.0, "1500ms"), backend);
        let files = server.addr("files");
        let mut s = connect(files);
        assert_eq!(ask(&mut s, "huge.bin", Some(LEN - 1)), Ok(1));
        drop(s);
        // The request has reached the server and its work started.
        std::thread::sleep(Duration::from_millis(300));
        let started = Instant::now();
        server.signal(libc::SIGTERM);
        let status = server.wait(Duration::from_secs(30));
        let took = started.elapsed();
        eprintln!("{backend}: exit {took:?} after SIGTERM");
        assert!(status.is_some_and(|s| s.success()), "{backend}: {status:?}");
        assert!(
            took < Duration::from_millis(2000),
            "{backend}: exit took {took:?} with a 1.5 s grace"
        );
    }
}

/// Item 14d: `..` that stays inside the root is served; climbing out stays refused.
#[test]
fn dot_dot_inside_the_root_is_served_and_escapes_are_refused() {
    for backend in backends() {
        let dir = TempDir::new();
        let root = dir.0.join("root");
        std::fs::create_dir_all(root.join("sub/deeper")).unwrap();
        std::fs::write(root.join("x.txt"), b"inside\n").unwrap();
        std::fs::write(dir.0.join("secret.txt"), b"outside\n").unwrap();
        let server = Server::start(&config(&root, "1s"), backend);
        let files = server.addr("files");
        for inside in ["sub/../x.txt", "sub/deeper/../../x.txt", "./sub/./../x.txt"] {
            let (data, digest) = fetch(files, inside, None);
            assert_eq!(data, b"inside\n", "{backend}: {inside}");
            assert_eq!(digest, md5_hex(b"inside\n"), "{backend}: {inside}");
        }
        for outside in [
            "../secret.txt",
            "sub/../../secret.txt",
            "sub/deeper/../../../secret.txt",
        ] {
            let mut s = connect(files);
            let got = ask(&mut s, outside, None);
            assert_eq!(
                got,
                Err("ERR path outside root\n".to_string()),
                "{backend}: {outside}"
            );
        }
        let abs = dir.0.join("secret.txt");
        let mut s = connect(files);
        let got = ask(&mut s, abs.to_str().unwrap(), None);
        assert_eq!(got, Err("ERR path outside root\n".to_string()), "{backend}");
    }
}

/// `get big.bin <size>` + ack + close, 16 times: nothing of the file is sent, so no reset
/// comes back. Before the fix each request still hashed the whole file for its trailer (16
/// hashes of 256 MiB, 8 s of CPU); now the hash stops once the client has stopped sending, so
/// all of them together cost less than one honest hash of a file of the same size.
#[test]
fn files_resumes_at_the_end_that_leave_cost_no_hash() {
    const ATTEMPTS: usize = 16;
    for backend in backends() {
        let (one_hash, attack) = resume_costs(backend, 0, ATTEMPTS);
        eprintln!("{backend}: one hash {one_hash:?}, {ATTEMPTS} resumes at the end {attack:?}");
        assert!(
            attack < one_hash,
            "{backend}: {ATTEMPTS} resumes at the end cost {attack:?}, one hash {one_hash:?}"
        );
    }
}

/// Sends `list <dir>` and returns the announced size, without acknowledging.
fn ask_listing(s: &mut TcpStream, dir: &str) -> u64 {
    s.write_all(format!("list {dir}\n").as_bytes()).unwrap();
    let mut head = [0u8; 64];
    let n = s.read(&mut head).unwrap();
    let text = String::from_utf8_lossy(&head[..n]).to_string();
    text.trim()
        .parse()
        .unwrap_or_else(|_| panic!("list {dir}: {text}"))
}

/// 100 clients list a directory of 10 000 files with 246-byte names and never acknowledge.
/// Before the fix each held its whole listing (2.5 MB) while waiting for the ack: RSS grew
/// from 6 to 219 MiB. Now a listing is at most 32 KiB (then `[more entries not shown]`), so
/// the crowd holds about 3 MiB; bound: RSS grows by under 40 MiB, and a normal client is
/// served within 2 s.
#[test]
fn files_listings_never_acknowledged_hold_at_most_32_kib_each() {
    const CROWD: usize = 100;
    for backend in backends() {
        let dir = TempDir::new();
        let big = dir.0.join("big");
        std::fs::create_dir(&big).unwrap();
        for i in 0..10_000 {
            std::fs::write(big.join(format!("{i:06}{}", "n".repeat(240))), b"").unwrap();
        }
        std::fs::write(dir.0.join("small.txt"), b"small and quick\n").unwrap();
        let server = Server::start(&config(&dir.0, "1s"), backend);
        let (files, pid) = (server.addr("files"), server.pid());
        let rss_before = status_field(pid, "VmRSS") / 1024;
        let crowd: Vec<TcpStream> = (0..CROWD)
            .map(|_| {
                let mut s = connect(files);
                s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                let size = ask_listing(&mut s, "big");
                assert!(size <= 32 * 1024, "{backend}: a listing of {size} bytes");
                s
            })
            .collect();
        let started = Instant::now();
        let (data, _) = fetch(files, "small.txt", None);
        let small = started.elapsed();
        assert_eq!(data, b"small and quick\n");
        let rss = status_field(pid, "VmRSS") / 1024;
        eprintln!("{backend}: {CROWD} unacknowledged listings: RSS {rss_before} -> {rss} MiB, small get {small:?}");
        assert!(
            rss < rss_before + 40,
            "{backend}: RSS {rss_before} -> {rss} MiB with {CROWD} unacknowledged listings"
        );
        assert!(
            small < Duration::from_secs(2),
            "{backend}: small get took {small:?}"
        );
        drop(crowd);
    }
}

/// 80 clients list a directory of 100 000 entries and leave at once. Before the fix each
/// listing read and stat'ed every entry (about 1 s of a blocking thread each) and a normal
/// `get` waited 39 s behind them; now a listing stops at its cap, so the `get` is served
/// within 3 s.
#[test]
fn files_listings_of_huge_directories_are_bounded_in_time() {
    const CROWD: usize = 80;
    let dir = TempDir::new();
    let huge = dir.0.join("huge");
    std::fs::create_dir(&huge).unwrap();
    for i in 0..100_000 {
        std::fs::File::create(huge.join(format!("f{i}"))).unwrap();
    }
    std::fs::write(dir.0.join("small.txt"), b"small and quick\n").unwrap();
    for backend in backends() {
        let server = Server::start(&config(&dir.0, "1s"), backend);
        let files = server.addr("files");
        for _ in 0..CROWD {
            let mut s = connect(files);
            s.write_all(b"list huge\n").unwrap();
            drop(s);
        }
        let started = Instant::now();
        let (data, _) = fetch(files, "small.txt", None);
        let small = started.elapsed();
        eprintln!("{backend}: {CROWD} listings of 100 000 entries that left: small get {small:?}");
        assert_eq!(data, b"small and quick\n");
        assert!(
            small < Duration::from_secs(3),
            "{backend}: small get took {small:?}"
        );
    }
}
