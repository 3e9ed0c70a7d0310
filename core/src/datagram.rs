//! The seam between the server machinery and a datagram protocol: [`DatagramService`].
//!
//! A UDP service has no connections: each datagram is a request of its own. A plugin that
//! serves datagrams answers one at a time, synchronously: one datagram in, zero or more replies
//! out, written into buffers the framework owns ([`Replies`]). No future, no allocation and no
//! IO per datagram, so the worker's datagram loop ([`crate::udp`]) can receive a batch,
//! answer it and send the replies in a batch.
//!
//! Dispatch follows [`crate::service`]: the framework holds an `Arc<dyn DatagramService>`
//! and makes one dynamic call per *batch* ([`DatagramService::answer_batch`], a provided
//! method), inside which [`DatagramService::answer`] is called statically for each datagram.
//!
//! Replies are bounded by the framework, not by the plugin's good manners: an open UDP service
//! is a reflection tool (the source address of a datagram is not authenticated), so the replies
//! to one datagram may hold at most as many bytes as the datagram itself ([`Replies::push`]
//! refuses more and the refusal is counted), and at most [`MAX_REPLIES`] of them.

use std::net::SocketAddr;
use std::sync::Arc;

/// Replies one datagram may get, at most.
pub const MAX_REPLIES: usize = 4;

/// One received datagram, as a plugin sees it.
#[derive(Debug, Clone, Copy)]
pub struct Datagram<'a> {
    /// Its payload (at most the service's `max_datagram_size` bytes: larger ones are dropped
    /// before a plugin sees them).
    pub payload: &'a [u8],
    /// Who sent it (as the IP header says: not authenticated).
    pub peer: SocketAddr,
}

/// A protocol spoken in datagrams.
///
/// One value serves every datagram of a service on every worker, so it is `Send + Sync`.
pub trait DatagramService: Send + Sync + 'static {
    /// Answers one datagram: zero or more replies to its sender, through `replies`.
    fn answer(&self, datagram: Datagram<'_>, replies: &mut Replies<'_>);

    /// Answers each admitted datagram of a batch, in order. The framework calls this (one
    /// dynamic call per batch); the provided implementation calls [`DatagramService::answer`]
    /// statically. Not meant to be overridden.
    fn answer_batch(&self, batch: &mut AnswerBatch<'_>) {
        for i in 0..batch.incoming.len() {
            let packet = &batch.incoming[i];
            if !batch.admitted[i] {
                continue;
            }
            let datagram = Datagram {
                payload: &packet.buf,
                peer: packet.peer,
            };
            let mut replies = Replies {
                out: &mut *batch.outgoing,
                peer: packet.peer,
                budget: packet.buf.len(),
                count: 0,
                refused: 0,
            };
            self.answer(datagram, &mut replies);
            batch.refused += replies.refused;
        }
    }
}

/// A shared service answers like the service itself.
impl<S: DatagramService> DatagramService for Arc<S> {
    fn answer(&self, datagram: Datagram<'_>, replies: &mut Replies<'_>) {
        S::answer(self, datagram, replies)
    }
}

/// How a plugin's instance becomes the framework's datagram service
/// ([`Plugin::DATAGRAMS`](crate::Plugin::DATAGRAMS)): [`erase`].
pub type Erase<P> = fn(Arc<P>) -> Arc<dyn DatagramService>;

/// `service` as the framework holds it: what [`Plugin::DATAGRAMS`](crate::Plugin::DATAGRAMS)
/// names for a plugin that answers datagrams.
pub fn erase<S: DatagramService>(service: Arc<S>) -> Arc<dyn DatagramService> {
    service
}

/// A datagram buffer and its address (sender of a received one, destination of a reply).
#[derive(Debug)]
pub struct Packet {
    /// The payload: `len()` bytes, in a buffer whose capacity is fixed for the loop's life.
    pub buf: Vec<u8>,
    /// The sender or destination.
    pub peer: SocketAddr,
}

/// A fixed set of datagram buffers, allocated once per socket: what a backend receives into
/// and sends from. The first [`Packets::len`] are filled.
#[derive(Debug)]
pub struct Packets {
    packets: Vec<Packet>,
    filled: usize,
    /// Every buffer's capacity.
    size: usize,
}

impl Packets {
    /// `count` buffers of `size` bytes each.
    pub fn new(count: usize, size: usize) -> Self {
        let unspecified = SocketAddr::from(([0, 0, 0, 0], 0));
        Packets {
            packets: (0..count.max(1))
                .map(|_| Packet {
                    buf: Vec::with_capacity(size),
                    peer: unspecified,
                })
                .collect(),
            filled: 0,
            size,
        }
    }

    /// Bytes each buffer holds.
    pub fn buffer_size(&self) -> usize {
        self.size
    }

    /// The filled packets.
    pub fn filled(&self) -> &[Packet] {
        &self.packets[..self.filled]
    }

    /// The filled packets, to lend their buffers out and put them back (a backend's send).
    pub fn filled_mut(&mut self) -> &mut [Packet] {
        &mut self.packets[..self.filled]
    }

    /// How many are filled.
    pub fn len(&self) -> usize {
        self.filled
    }

    /// Whether none is filled.
    pub fn is_empty(&self) -> bool {
        self.filled == 0
    }

    /// Whether every buffer is filled.
    pub fn is_full(&self) -> bool {
        self.filled == self.packets.len()
    }

    /// Buffers in all.
    pub fn capacity(&self) -> usize {
        self.packets.len()
    }

    /// Empties every buffer (capacity stays).
    pub fn clear(&mut self) {
        for p in &mut self.packets[..self.filled] {
            p.buf.clear();
        }
        self.filled = 0;
    }

    /// The next buffer to fill, empty with its full capacity, or `None` when all are filled.
    /// Call [`Packets::commit`] once it holds a datagram. (A buffer a backend lost to a
    /// cancelled operation is made again here.)
    pub fn next_free(&mut self) -> Option<&mut Packet> {
        let size = self.size;
        let packet = self.packets.get_mut(self.filled)?;
        packet.buf.clear();
        if packet.buf.capacity() < size {
            packet.buf = Vec::with_capacity(size);
        }
        Some(packet)
    }

    /// Counts the buffer [`Packets::next_free`] returned as filled.
    pub fn commit(&mut self) {
        debug_assert!(self.filled < self.packets.len());
        self.filled = (self.filled + 1).min(self.packets.len());
    }

    /// Every buffer not yet filled, each empty with its full capacity, for a backend that
    /// fills several at once ([`crate::backend::mmsg`]); then [`Packets::commit_many`].
    pub fn free_mut(&mut self) -> &mut [Packet] {
        let size = self.size;
        let free = &mut self.packets[self.filled..];
        for packet in free.iter_mut() {
            packet.buf.clear();
            if packet.buf.capacity() < size {
                packet.buf = Vec::with_capacity(size);
            }
        }
        free
    }

    /// Counts the first `n` buffers [`Packets::free_mut`] returned as filled.
    pub fn commit_many(&mut self, n: usize) {
        debug_assert!(self.filled + n <= self.packets.len());
        self.filled = (self.filled + n).min(self.packets.len());
    }
}

/// One batch being answered: the received datagrams, which of them were admitted, and the
/// replies so far. Made by the framework's datagram loop (or [`crate::testing`]).
pub struct AnswerBatch<'a> {
    /// The received datagrams.
    pub incoming: &'a [Packet],
    /// `admitted[i]`: whether `incoming[i]` passed admission.
    pub admitted: &'a [bool],
    /// Where replies go.
    pub outgoing: &'a mut Packets,
    /// Replies refused (over a datagram's byte budget or count, or no buffer left).
    pub refused: u64,
}

/// Where a [`DatagramService`] writes its replies to one datagram.
pub struct Replies<'a> {
    out: &'a mut Packets,
    peer: SocketAddr,
    /// Bytes the replies to this datagram may still hold.
    budget: usize,
    count: usize,
    refused: u64,
}

/// Why a reply was not queued (it is counted as dropped).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReplyRefused {
    /// The replies to one datagram may not hold more bytes than the datagram (reflection
    /// amplification), nor be more than [`MAX_REPLIES`].
    #[error("replies to a datagram may not be larger than the datagram")]
    Amplification,
    /// Every reply buffer of the batch is in use.
    #[error("no reply buffer left in this batch")]
    Full,
}

impl Replies<'_> {
    /// Queues `payload` as a reply to the datagram's sender and returns the queued copy, which
    /// the caller may change in place (same length). Refused (and counted) when the replies to
    /// this datagram would hold more bytes than it did, or be more than [`MAX_REPLIES`].
    pub fn push(&mut self, payload: &[u8]) -> Result<&mut [u8], ReplyRefused> {
        if payload.len() > self.budget || self.count >= MAX_REPLIES {
            self.refused += 1;
            return Err(ReplyRefused::Amplification);
        }
        let peer = self.peer;
        let Some(packet) = self.out.next_free() else {
            self.refused += 1;
            return Err(ReplyRefused::Full);
        };
        packet.buf.extend_from_slice(payload);
        packet.peer = peer;
        self.out.commit();
        self.budget -= payload.len();
        self.count += 1;
        let last = self.out.len() - 1;
        Ok(&mut self.out.packets[last].buf[..])
    }

    /// Bytes the replies to this datagram may still hold.
    pub fn budget(&self) -> usize {
        self.budget
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Twice;
    impl DatagramService for Twice {
        fn answer(&self, datagram: Datagram<'_>, replies: &mut Replies<'_>) {
            let half = datagram.payload.len() / 2;
            let _ = replies.push(&datagram.payload[..half]);
            let _ = replies.push(&datagram.payload[half..]);
            // Over the budget: refused.
            assert_eq!(replies.push(b"x"), Err(ReplyRefused::Amplification));
        }
    }

    #[test]
    fn replies_never_exceed_the_datagram_and_skip_refused_ones() {
        let peer: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        let incoming = [
            Packet {
                buf: b"abcd".to_vec(),
                peer,
            },
            Packet {
                buf: b"dropped".to_vec(),
                peer,
            },
        ];
        let mut outgoing = Packets::new(8, 16);
        let mut batch = AnswerBatch {
            incoming: &incoming,
            admitted: &[true, false],
            outgoing: &mut outgoing,
            refused: 0,
        };
        Twice.answer_batch(&mut batch);
        assert_eq!(batch.refused, 1);
        let out: Vec<&[u8]> = outgoing.filled().iter().map(|p| &p.buf[..]).collect();
        assert_eq!(out, [&b"ab"[..], b"cd"]);
        assert!(outgoing.filled().iter().all(|p| p.peer == peer));
        outgoing.clear();
        assert!(outgoing.is_empty() && outgoing.next_free().unwrap().buf.capacity() >= 16);
    }

    #[test]
    fn a_full_batch_refuses_more_replies() {
        let peer: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        let mut out = Packets::new(1, 8);
        let mut replies = Replies {
            out: &mut out,
            peer,
            budget: 100,
            count: 0,
            refused: 0,
        };
        replies.push(b"one").unwrap().make_ascii_uppercase();
        assert_eq!(replies.push(b"two"), Err(ReplyRefused::Full));
        assert_eq!(replies.refused, 1);
        assert_eq!(out.filled()[0].buf, b"ONE");
    }
}
