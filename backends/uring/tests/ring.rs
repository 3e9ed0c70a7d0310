//! The io_uring backend's ring path over real sockets, in this process: bytes stay in order
//! through dropped reads, `try_read`, `readable` and a paused receive; and a dropped accept,
//! read, write or connection leaks no descriptor (counted in /proc/self/fd), no operation and
//! no provided buffer (the driver's own counts). Skips with a reason where the kernel lacks
//! what the ring path needs (a failure under `CI=true`).
//!
//! The tests count this process's descriptors, so they take turns (one lock).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Mutex;
use std::time::Duration;

use wharf_backend_uring::driver::{self, Driver, Features};
use wharf_backend_uring::ring::{self, Conn, Listener};
use wharf_core::backend::Listener as _;
use wharf_core::conn::Conn as _;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn supported() -> bool {
    match driver::supported() {
        Ok(()) => true,
        Err(why) if std::env::var("CI").as_deref() != Ok("true") => {
            eprintln!("SKIP the ring path cannot run here: {why}");
            false
        }
        Err(why) => panic!("CI=true and the ring path cannot run: {why}"),
    }
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// A ring-path listener on a free port, and its address.
fn listen() -> (Listener, SocketAddr) {
    let std = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = std.local_addr().unwrap();
    (Listener::tcp(std).unwrap(), addr)
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
}

/// Reads until `want` bytes arrived, in reads of at most `chunk` bytes.
async fn read_exactly(conn: &mut Conn, want: usize, chunk: usize) -> Vec<u8> {
    let mut got = Vec::new();
    while got.len() < want {
        let (res, buf) = conn.read(Vec::with_capacity(chunk)).await;
        let n = res.unwrap();
        assert!(n > 0, "end of stream after {} of {want} bytes", got.len());
        got.extend_from_slice(&buf);
    }
    got
}

#[test]
fn bytes_stay_in_order_through_dropped_reads_try_read_and_a_paused_receive() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    if !supported() {
        return;
    }
    let sent = pattern(3 << 20);
    let expected = sent.clone();
    ring::block_on(&Features::default(), async move {
        let (listener, addr) = listen();
        let client = std::thread::spawn(move || {
            let mut s = TcpStream::connect(addr).unwrap();
            std::thread::sleep(Duration::from_millis(100));
            s.write_all(b"hello").unwrap();
            std::thread::sleep(Duration::from_millis(100));
            // More than the stash holds: the receive pauses while the server does not read.
            s.write_all(&sent).unwrap();
            s.shutdown(std::net::Shutdown::Write).unwrap();
            let mut rest = Vec::new();
            s.read_to_end(&mut rest).unwrap();
            rest
        });
        let (mut conn, _) = listener.accept().await.unwrap();

        // Reads dropped while nothing has arrived.
        for _ in 0..5 {
            let read = conn.read(Vec::with_capacity(64));
            assert!(tokio::time::timeout(Duration::from_millis(10), read)
                .await
                .is_err());
        }
        let mut buf = Vec::with_capacity(64);
        assert_eq!(conn.try_read(&mut buf).unwrap(), None, "nothing sent yet");
        conn.readable().await.unwrap();
        let mut got = Vec::new();
        while got.len() < 5 {
            match conn.try_read(&mut buf).unwrap() {
                Some(n) => assert!(n > 0),
                None => conn.readable().await.unwrap(),
            }
            got.append(&mut buf);
        }
        assert_eq!(got, b"hello");

        // Let the big write fill the stash and the socket; then read it all, mixing reads
        // with small and large buffers, try_read and reads dropped half-way.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut got = Vec::new();
        let mut step = 0usize;
        while got.len() < expected.len() {
            step += 1;
            match step % 4 {
                0 => {
                    let mut b = Vec::with_capacity(1 + step % 9000);
                    if conn.try_read(&mut b).unwrap().is_none() {
                        conn.readable().await.unwrap();
                    }
                    got.append(&mut b);
                }
                1 => {
                    let read = conn.read(Vec::with_capacity(3));
                    // Polled once: done if bytes are there, else dropped.
                    if let Ok((res, b)) = tokio::time::timeout(Duration::ZERO, read).await {
                        assert!(res.unwrap() > 0);
                        got.extend_from_slice(&b);
                    }
                }
                _ => got.extend(read_exactly(&mut conn, 1, 1 + step % 70_000).await),
            }
        }
        assert!(got == expected, "the bytes came out of order or changed");
        let (res, _) = conn.read(Vec::with_capacity(8)).await;
        assert_eq!(res.unwrap(), 0, "end of stream after the last byte");
        let stats = Driver::current().unwrap().stats();
        assert!(
            stats.stash_full > 0,
            "the receive never paused, that path was not tested: {stats:?}"
        );

        let (res, _) = conn.write_all(b"bye".to_vec()).await;
        res.unwrap();
        drop(conn);
        assert_eq!(client.join().unwrap(), b"bye");
    })
    .unwrap();
}

#[test]
fn dropped_accepts_reads_writes_and_connections_leak_nothing() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    if !supported() {
        return;
    }
    let before = open_fds();
    ring::block_on(&Features::default(), async {
        let driver = Driver::current().unwrap();
        let (listener, addr) = listen();

        // Accepts dropped before any client came.
        for _ in 0..50 {
            let accept = listener.accept();
            assert!(tokio::time::timeout(Duration::from_millis(1), accept)
                .await
                .is_err());
        }

        let clients: Vec<_> = (0..20)
            .map(|i| {
                std::thread::spawn(move || {
                    let mut s = TcpStream::connect(addr).unwrap();
                    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                    if i % 2 == 0 {
                        s.write_all(&[i as u8; 10_000]).unwrap();
                    }
                    // Even clients never read what the server sends; all wait for the end.
                    if i % 4 == 0 {
                        std::thread::sleep(Duration::from_millis(500));
                        return;
                    }
                    let mut sink = Vec::new();
                    let _ = s.read_to_end(&mut sink);
                })
            })
            .collect();
        let mut conns = Vec::new();
        for _ in 0..20 {
            conns.push(listener.accept().await.unwrap().0);
        }
        for (i, conn) in conns.iter_mut().enumerate() {
            // A read dropped with (or without) bytes waiting.
            let read = conn.read(Vec::with_capacity(100));
            let _ = tokio::time::timeout(Duration::from_millis(5), read).await;
            // A write of more than the socket takes, dropped while the kernel holds it.
            if i % 4 == 0 {
                let write = conn.write_all(vec![1u8; 16 << 20]);
                let _ = tokio::time::timeout(Duration::from_millis(50), write).await;
            }
        }
        drop(conns);
        for c in clients {
            c.join().unwrap();
        }
        // The kernel reports the cancelled operations on the driver's next turns.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            driver.in_use(),
            (1, 0),
            "only the listener's accept is left, and no provided buffer is out"
        );
        drop(listener);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(driver.in_use(), (0, 0), "the accept was cancelled");
    })
    .unwrap();
    // The runtime, the ring and every socket are closed.
    assert_eq!(open_fds(), before, "descriptors leaked");
}

#[test]
fn a_connection_accepted_by_the_kernel_is_not_lost_when_the_listener_drains_at_once() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    if !supported() {
        return;
    }
    ring::block_on(&Features::default(), async {
        let (listener, addr) = listen();
        let mut s = TcpStream::connect(addr).unwrap();
        // What a worker does when a reload stops its listener: take what is already
        // accepted, without waiting.
        let accept = tokio::time::timeout(Duration::ZERO, listener.accept()).await;
        let (mut conn, _) = accept.expect("not waited for").unwrap();
        s.write_all(b"x").unwrap();
        let (res, buf) = conn.read(Vec::with_capacity(4)).await;
        assert_eq!((res.unwrap(), &buf[..]), (1, &b"x"[..]));
    })
    .unwrap();
}
