//! Code shared by the benchmark peers in `src/bin/`: the listening socket every echo peer
//! uses. (The io_uring driver the `uring-echo` peer runs on is wharf's own, in
//! `wharf-backend-uring`.)

/// The listening socket every echo peer uses, as the issue describes it: SO_REUSEADDR +
/// SO_REUSEPORT, backlog 1024, non-blocking.
pub fn reuseport_listener(addr: std::net::SocketAddr) -> std::io::Result<socket2::Socket> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    socket.set_nonblocking(true)?;
    Ok(socket)
}
