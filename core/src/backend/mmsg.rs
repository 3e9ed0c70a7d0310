//! Batched UDP system calls for backends: a whole batch of datagrams received with one
//! `recvmmsg(2)` and the replies sent with one `sendmmsg(2)`, instead of a `recvfrom`/`sendto`
//! per datagram.
//!
//! It exists because a UDP service's cost is system calls: an echo answering 64-byte datagrams
//! spends most of its CPU entering and leaving the kernel, once per datagram each way. With
//! these, a batch of up to [`crate::udp::BATCH`] datagrams costs two calls (plus the readiness
//! wait). Both calls are non-blocking (`MSG_DONTWAIT`): a backend waits for readiness its own
//! way (tokio's `try_io` + `readable`/`writable`, or an io_uring receive for the first datagram
//! of a batch).
//!
//! [`MultiMsg`] holds the kernel-facing arrays (message headers, one `iovec` and one address
//! per datagram), allocated once per socket; their pointers into the caller's [`Packets`] are
//! set on every call and never outlive it.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::SocketAddr;
use std::os::fd::RawFd;

use crate::datagram::{Packet, Packets};

/// Scratch for [`MultiMsg::recv`] and [`MultiMsg::send`]: headers, `iovec`s and addresses for
/// up to `capacity` datagrams.
pub struct MultiMsg {
    headers: Vec<libc::mmsghdr>,
    iovecs: Vec<libc::iovec>,
    addrs: Vec<libc::sockaddr_storage>,
}

impl MultiMsg {
    /// Scratch for batches of up to `capacity` datagrams (at least one).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        // SAFETY: all-zero bytes are valid values of these plain C structs (null pointers,
        // zero lengths, AF_UNSPEC).
        let (header, iovec, addr) = unsafe { (zeroed(), zeroed(), zeroed()) };
        MultiMsg {
            headers: vec![header; capacity],
            iovecs: vec![iovec; capacity],
            addrs: vec![addr; capacity],
        }
    }

    /// Receives what is queued on `fd`, without waiting, into the free buffers of `into` (up
    /// to this scratch's capacity), with one `recvmmsg`. Returns how many datagrams came in,
    /// at least one; nothing queued is a `WouldBlock` error (so tokio's `try_io` clears the
    /// socket's readiness). A datagram larger than its buffer is truncated to the buffer's
    /// size, as [`crate::udp::DatagramSocket::recv_batch`] specifies.
    pub fn recv(&mut self, fd: RawFd, into: &mut Packets) -> io::Result<usize> {
        let free = into.free_mut();
        let count = free.len().min(self.headers.len());
        if count == 0 {
            return Ok(0);
        }
        for (i, packet) in free[..count].iter_mut().enumerate() {
            let spare = packet.buf.spare_capacity_mut();
            self.iovecs[i] = libc::iovec {
                iov_base: spare.as_mut_ptr().cast(),
                iov_len: spare.len(),
            };
            self.set_header(i, size_of::<libc::sockaddr_storage>() as libc::socklen_t);
        }
        // SAFETY: the first `count` headers point at `count` iovecs (each the spare capacity
        // of a distinct buffer of `into`, which recvmmsg only writes) and at `count` address
        // slots with their sizes; all of them outlive the call.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                self.headers.as_mut_ptr(),
                count as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        if n == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        for (i, packet) in free[..n].iter_mut().enumerate() {
            let header = &self.headers[i];
            let len = (header.msg_len as usize).min(packet.buf.capacity());
            // SAFETY: the kernel wrote `msg_len` bytes (at most the iovec's length, which is the
            // spare capacity of this empty buffer).
            unsafe { packet.buf.set_len(len) };
            packet.peer = socket_addr(&self.addrs[i], header.msg_hdr.msg_namelen)
                .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
        }
        into.commit_many(n);
        Ok(n)
    }

    /// Sends `packets` (each to its `peer`) without waiting, with one `sendmmsg`, up to this
    /// scratch's capacity. Returns how many were sent, at least one, and their bytes. When the
    /// first one cannot go, the error says why: `WouldBlock` (the send buffer is full: wait for
    /// writability) or the reason the socket refused that datagram (skip it).
    pub fn send(&mut self, fd: RawFd, packets: &[Packet]) -> io::Result<(usize, u64)> {
        let count = packets.len().min(self.headers.len());
        if count == 0 {
            return Ok((0, 0));
        }
        for (i, packet) in packets[..count].iter().enumerate() {
            self.iovecs[i] = libc::iovec {
                iov_base: packet.buf.as_ptr().cast_mut().cast(),
                iov_len: packet.buf.len(),
            };
            let addr = socket2::SockAddr::from(packet.peer);
            let len = addr.len();
            // SAFETY: `addr` holds `len <= size_of::<sockaddr_storage>()` bytes of address,
            // copied into our slot of that size.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    addr.as_ptr().cast::<u8>(),
                    (&raw mut self.addrs[i]).cast::<u8>(),
                    len as usize,
                );
            }
            self.set_header(i, len);
        }
        // SAFETY: the first `count` headers point at `count` iovecs over the packets' bytes
        // (which sendmmsg only reads) and at `count` addresses; all outlive the call.
        let n = unsafe {
            libc::sendmmsg(
                fd,
                self.headers.as_mut_ptr(),
                count as libc::c_uint,
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        let bytes = self.headers[..n].iter().map(|h| u64::from(h.msg_len)).sum();
        Ok((n, bytes))
    }

    /// Points header `i` at iovec `i` and address slot `i` (of `addr_len` bytes).
    fn set_header(&mut self, i: usize, addr_len: libc::socklen_t) {
        let header = &mut self.headers[i];
        header.msg_hdr.msg_name = (&raw mut self.addrs[i]).cast();
        header.msg_hdr.msg_namelen = addr_len;
        header.msg_hdr.msg_iov = &raw mut self.iovecs[i];
        header.msg_hdr.msg_iovlen = 1;
        header.msg_hdr.msg_control = std::ptr::null_mut();
        header.msg_hdr.msg_controllen = 0;
        header.msg_hdr.msg_flags = 0;
        header.msg_len = 0;
    }
}

/// The address the kernel wrote into `storage` (`len` bytes), when it is an IP one.
fn socket_addr(storage: &libc::sockaddr_storage, len: libc::socklen_t) -> Option<SocketAddr> {
    // SAFETY: the kernel wrote an address of `len` bytes into `storage`.
    unsafe { socket2::SockAddr::new(*storage, len) }.as_socket()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::os::fd::AsRawFd;

    fn pair() -> (UdpSocket, UdpSocket) {
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        (server, client)
    }

    #[test]
    fn one_call_takes_a_batch_and_the_rest_waits_for_the_next() {
        let (server, client) = pair();
        let to = server.local_addr().unwrap();
        for i in 0..40u8 {
            client.send_to(&[i; 10], to).unwrap();
        }
        let mut scratch = MultiMsg::new(32);
        let mut packets = Packets::new(32, 64);
        assert_eq!(scratch.recv(server.as_raw_fd(), &mut packets).unwrap(), 32);
        assert_eq!(packets.len(), 32);
        for (i, p) in packets.filled().iter().enumerate() {
            assert_eq!(p.buf, vec![i as u8; 10]);
            assert_eq!(p.peer, client.local_addr().unwrap());
        }
        packets.clear();
        assert_eq!(scratch.recv(server.as_raw_fd(), &mut packets).unwrap(), 8);
        assert_eq!(packets.filled()[7].buf, vec![39u8; 10]);
        packets.clear();
        let empty = scratch.recv(server.as_raw_fd(), &mut packets).unwrap_err();
        assert_eq!(empty.kind(), io::ErrorKind::WouldBlock);
        assert!(packets.is_empty());
    }

    #[test]
    fn receives_fill_only_free_buffers_and_truncate_to_their_size() {
        let (server, client) = pair();
        let to = server.local_addr().unwrap();
        client.send_to(b"first", to).unwrap();
        client.send_to(&[7u8; 100], to).unwrap();
        client.send_to(b"third", to).unwrap();
        let mut scratch = MultiMsg::new(32);
        let mut packets = Packets::new(3, 16);
        packets.next_free().unwrap().buf.extend_from_slice(b"kept");
        packets.commit();
        assert_eq!(scratch.recv(server.as_raw_fd(), &mut packets).unwrap(), 2);
        let bufs: Vec<&[u8]> = packets.filled().iter().map(|p| &p.buf[..]).collect();
        assert_eq!(bufs, [&b"kept"[..], b"first", &[7u8; 16][..]]);
        assert!(packets.is_full());
    }

    #[test]
    fn one_call_sends_to_each_packets_own_peer() {
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        let a = UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = UdpSocket::bind("[::1]:0");
        let v6 = UdpSocket::bind("[::]:0").unwrap();
        let mut packets = Packets::new(4, 64);
        for (payload, peer) in [
            (&b"to a"[..], a.local_addr().unwrap()),
            (b"to a again", a.local_addr().unwrap()),
        ] {
            let p = packets.next_free().unwrap();
            p.buf.extend_from_slice(payload);
            p.peer = peer;
            packets.commit();
        }
        let mut scratch = MultiMsg::new(32);
        let (n, bytes) = scratch.send(server.as_raw_fd(), packets.filled()).unwrap();
        assert_eq!((n, bytes), (2, 14));
        let mut buf = [0u8; 64];
        assert_eq!(a.recv(&mut buf).unwrap(), 4);
        assert_eq!(a.recv(&mut buf).unwrap(), 10);
        // An IPv6 destination from a dual-stack socket, when this machine has ::1.
        if let Ok(b) = b {
            let mut packets = Packets::new(1, 64);
            let p = packets.next_free().unwrap();
            p.buf.extend_from_slice(b"six");
            p.peer = b.local_addr().unwrap();
            packets.commit();
            assert_eq!(
                scratch.send(v6.as_raw_fd(), packets.filled()).unwrap(),
                (1, 3)
            );
            assert_eq!(b.recv(&mut buf).unwrap(), 3);
        }
    }

    #[test]
    fn a_refused_first_datagram_is_an_error_not_a_count() {
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut packets = Packets::new(1, 64);
        let p = packets.next_free().unwrap();
        p.buf.extend_from_slice(b"x");
        p.peer = "[::1]:9".parse().unwrap(); // an IPv6 destination from an IPv4 socket
        packets.commit();
        let mut scratch = MultiMsg::new(4);
        assert!(scratch.send(server.as_raw_fd(), packets.filled()).is_err());
    }
}
