//! The peer for the UDP echo target: a minimal hand-written tokio UDP echo server, what an
//! experienced developer would write first (current-thread runtime, one `SO_REUSEPORT` socket
//! per thread, `recv_from` then `send_to`, a 64 KiB buffer). wharf's UDP echo must reach 0.95x
//! of its datagrams per second per worker (BENCHMARKS.md, "UDP echo").
//!
//! Usage: `tokio-udp-echo-baseline 127.0.0.1:6970 [THREADS]`

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let addr: std::net::SocketAddr = args
        .next()
        .unwrap_or_else(|| "127.0.0.1:6970".into())
        .parse()
        .expect("address");
    let threads: usize = args.next().map_or(1, |n| n.parse().expect("threads"));
    let workers: Vec<_> = (0..threads.max(1))
        .map(|_| {
            let socket = socket2::Socket::new(
                socket2::Domain::for_address(addr),
                socket2::Type::DGRAM,
                None,
            )?;
            socket.set_reuse_port(true)?;
            socket.bind(&addr.into())?;
            socket.set_nonblocking(true)?;
            Ok(std::thread::spawn(move || serve(socket.into())))
        })
        .collect::<std::io::Result<_>>()?;
    for w in workers {
        w.join().expect("worker")?;
    }
    Ok(())
}

fn serve(socket: std::net::UdpSocket) -> std::io::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let socket = tokio::net::UdpSocket::from_std(socket)?;
        let mut buf = vec![0u8; 65_536];
        loop {
            let (n, peer) = socket.recv_from(&mut buf).await?;
            // A reply the kernel refuses is lost, as UDP is.
            let _ = socket.send_to(&buf[..n], peer).await;
        }
    })
}
