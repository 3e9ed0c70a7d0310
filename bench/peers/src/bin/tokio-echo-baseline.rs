//! The peer for the echo target: a minimal hand-written tokio echo server, exactly as the
//! issue describes it (current-thread runtime, SO_REUSEPORT listener, 4 KiB buffer). wharf's
//! epoll backend must reach 0.95x of its round trips per second.
//!
//! Usage: tokio-echo-baseline 127.0.0.1:7000

use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn main() -> std::io::Result<()> {
    let addr: std::net::SocketAddr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:7000".into())
        .parse()
        .expect("address");
    let socket = wharf_bench_peers::reuseport_listener(addr)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(socket.into())?;
        loop {
            let (mut stream, _) = listener.accept().await?;
            stream.set_nodelay(true)?;
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                loop {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if stream.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    })
}
