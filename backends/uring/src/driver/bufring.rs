//! The provided-buffer ring (`IORING_REGISTER_PBUF_RING`, Linux 5.19+): a ring of buffer
//! descriptors shared with the kernel, from which a receive picks a buffer itself when data
//! arrives, so no connection holds a buffer while it waits.
//!
//! Ownership of a buffer moves in a circle: it starts in the ring; the kernel takes it and
//! names it (its buffer id) in a completion; user space copies the bytes out and gives it back
//! by writing a descriptor at the ring's tail and publishing the new tail. [`RingBook`] is the
//! part of that with logic of its own (which slot the next returned buffer goes to as the
//! 16-bit tail wraps, and which buffers are out, so that a double return or a stray buffer id
//! is refused instead of handing the kernel one buffer twice); it is plain data and unit
//! tested. [`BufRing`] owns the memory and does the unsafe writes.

use std::io;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::types::BufRingEntry;

/// What can go wrong in the bookkeeping (never a panic: the caller logs and goes on).
#[derive(Debug, PartialEq, Eq)]
pub enum BookError {
    /// A buffer id outside the ring.
    UnknownBuffer(u16),
    /// The kernel handed out a buffer user space believes it already has.
    AlreadyOut(u16),
    /// A buffer given back that was not out (a double return).
    NotOut(u16),
}

/// Which buffers are out and where the next returned one goes. Buffer ids are `0..entries`;
/// all start in the ring (slots `0..entries` hold ids `0..entries`, tail = entries).
#[derive(Debug)]
pub struct RingBook {
    mask: u16,
    tail: u16,
    out: Vec<bool>,
    outstanding: usize,
}

impl RingBook {
    /// `entries` must be a power of two between 1 and 32768 (the kernel's limit).
    pub fn new(entries: u16) -> io::Result<RingBook> {
        if entries == 0 || !entries.is_power_of_two() || entries > 32768 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("buffer ring entries must be a power of two <= 32768, not {entries}"),
            ));
        }
        Ok(RingBook {
            mask: entries - 1,
            // All `entries` descriptors are written before the ring is registered. For 32768
            // the tail wraps to 32768 exactly, which u16 holds.
            tail: entries,
            out: vec![false; usize::from(entries)],
            outstanding: 0,
        })
    }

    /// The tail to publish to the kernel.
    pub fn tail(&self) -> u16 {
        self.tail
    }

    /// Buffers the kernel has handed out and user space has not given back.
    pub fn outstanding(&self) -> usize {
        self.outstanding
    }

    /// A completion named buffer `bid`: it is user space's now.
    pub fn taken(&mut self, bid: u16) -> Result<(), BookError> {
        let out = self
            .out
            .get_mut(usize::from(bid))
            .ok_or(BookError::UnknownBuffer(bid))?;
        if *out {
            return Err(BookError::AlreadyOut(bid));
        }
        *out = true;
        self.outstanding += 1;
        Ok(())
    }

    /// Gives `bid` back: returns the ring slot its descriptor must be written to, and advances
    /// the tail past it (publish [`RingBook::tail`] after writing the slot).
    pub fn give_back(&mut self, bid: u16) -> Result<usize, BookError> {
        let out = self
            .out
            .get_mut(usize::from(bid))
            .ok_or(BookError::UnknownBuffer(bid))?;
        if !*out {
            return Err(BookError::NotOut(bid));
        }
        *out = false;
        self.outstanding -= 1;
        let slot = usize::from(self.tail & self.mask);
        self.tail = self.tail.wrapping_add(1);
        Ok(slot)
    }
}

/// A registered buffer ring: `entries` buffers of `buf_size` bytes in one allocation, and the
/// page-aligned descriptor ring the kernel reads. Must be unregistered (or its io_uring
/// closed) before it is dropped: the owner drops the ring first.
pub struct BufRing {
    ring: *mut BufRingEntry,
    ring_bytes: usize,
    bufs: Box<[u8]>,
    buf_size: usize,
    bgid: u16,
    book: RingBook,
}

impl BufRing {
    /// Allocates the buffers and the descriptor ring, fills the ring, and registers it with
    /// `submitter` as buffer group `bgid`.
    pub fn register(
        submitter: &io_uring::Submitter<'_>,
        entries: u16,
        buf_size: usize,
        bgid: u16,
    ) -> io::Result<BufRing> {
        let book = RingBook::new(entries)?;
        if buf_size == 0 || buf_size > u32::MAX as usize {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "bad buffer size",
            ));
        }
        let ring_bytes = usize::from(entries) * std::mem::size_of::<BufRingEntry>();
        // SAFETY: anonymous private mapping, checked for failure; page-aligned as the kernel
        // requires.
        let ring = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                ring_bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if ring == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let mut this = BufRing {
            ring: ring.cast(),
            ring_bytes,
            bufs: vec![0u8; usize::from(entries) * buf_size].into_boxed_slice(),
            buf_size,
            bgid,
            book,
        };
        for bid in 0..entries {
            this.write_slot(usize::from(bid), bid);
        }
        this.publish_tail();
        // SAFETY: the ring memory lives as long as `this`, and the owner drops the io_uring
        // (which releases the registration) before it drops `this`.
        unsafe { submitter.register_buf_ring(this.ring as u64, entries, bgid)? };
        Ok(this)
    }

    /// The buffer group id receives name to pick from this ring.
    pub fn group(&self) -> u16 {
        self.bgid
    }

    /// Size of each buffer (the most one completion can carry).
    pub fn buf_size(&self) -> usize {
        self.buf_size
    }

    /// Buffers out of the ring right now.
    pub fn outstanding(&self) -> usize {
        self.book.outstanding()
    }

    /// A completion carried `len` bytes in buffer `bid`: `consume` sees them, then the buffer
    /// goes straight back to the ring. Returns what `consume` returned, or the bookkeeping
    /// error (the bytes are then not read).
    pub fn consume<R>(
        &mut self,
        bid: u16,
        len: usize,
        consume: impl FnOnce(&[u8]) -> R,
    ) -> Result<R, BookError> {
        self.book.taken(bid)?;
        let start = usize::from(bid) * self.buf_size;
        let result = consume(&self.bufs[start..start + len.min(self.buf_size)]);
        self.give_back(bid)?;
        Ok(result)
    }

    /// Gives back a buffer whose bytes nobody wants (the completion of a cancelled receive).
    pub fn discard(&mut self, bid: u16) -> Result<(), BookError> {
        self.book.taken(bid)?;
        self.give_back(bid)
    }

    fn give_back(&mut self, bid: u16) -> Result<(), BookError> {
        let slot = self.book.give_back(bid)?;
        self.write_slot(slot, bid);
        self.publish_tail();
        Ok(())
    }

    fn write_slot(&mut self, slot: usize, bid: u16) {
        let addr = self.bufs.as_ptr() as u64 + (usize::from(bid) * self.buf_size) as u64;
        // SAFETY: `slot` < entries (masked by the book), inside the mapping.
        let entry = unsafe { &mut *self.ring.add(slot) };
        entry.set_addr(addr);
        entry.set_len(self.buf_size as u32);
        entry.set_bid(bid);
    }

    fn publish_tail(&self) {
        // SAFETY: the tail is the `resv` field of the first descriptor, a u16 inside the
        // mapping, naturally aligned; the kernel reads it with an acquire load.
        unsafe {
            let tail = BufRingEntry::tail(self.ring) as *const AtomicU16;
            (*tail).store(self.book.tail(), Ordering::Release);
        }
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `register`, not used after this.
        unsafe { libc::munmap(self.ring.cast(), self.ring_bytes) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_that_are_not_a_power_of_two_are_refused() {
        assert!(RingBook::new(0).is_err());
        assert!(RingBook::new(3).is_err());
        assert!(RingBook::new(40000).is_err());
        assert_eq!(RingBook::new(32768).unwrap().tail(), 32768);
    }

    #[test]
    fn returned_buffers_fill_slots_in_return_order_across_the_tail_wrap() {
        let mut book = RingBook::new(4).unwrap();
        // A model of the ring: the kernel takes ids from the front in slot order, user space
        // returns them out of order. For longer than the 16-bit tail takes to wrap, each
        // return must land in the slot after the previous return, modulo 4.
        let mut ring: std::collections::VecDeque<u16> = (0..4).collect();
        let mut held: Vec<u16> = Vec::new();
        for step in 0..70_000usize {
            while held.len() < 3 {
                let bid = ring.pop_front().unwrap();
                book.taken(bid).unwrap();
                held.push(bid);
            }
            let bid = held.remove(if step % 2 == 0 { 1 } else { 0 });
            let slot = book.give_back(bid).unwrap();
            assert_eq!(slot, step % 4, "step {step}");
            ring.push_back(bid);
        }
        assert_eq!(
            book.tail(),
            (4u32 + 70_000) as u16,
            "the tail wrapped past 65535"
        );
        assert_eq!(book.outstanding(), held.len());
    }

    #[test]
    fn double_returns_and_stray_ids_are_refused_without_moving_the_tail() {
        let mut book = RingBook::new(8).unwrap();
        assert_eq!(book.give_back(2), Err(BookError::NotOut(2)));
        book.taken(2).unwrap();
        assert_eq!(book.taken(2), Err(BookError::AlreadyOut(2)));
        assert_eq!(book.taken(8), Err(BookError::UnknownBuffer(8)));
        let tail = book.tail();
        assert_eq!(book.give_back(2), Ok(usize::from(tail & 7)));
        assert_eq!(book.give_back(2), Err(BookError::NotOut(2)));
        assert_eq!(book.tail(), tail.wrapping_add(1));
        assert_eq!(book.outstanding(), 0);
    }

    #[test]
    fn every_buffer_can_be_out_at_once_and_all_come_back() {
        let mut book = RingBook::new(16).unwrap();
        for bid in 0..16 {
            book.taken(bid).unwrap();
        }
        assert_eq!(book.outstanding(), 16);
        let slots: Vec<usize> = (0..16)
            .rev()
            .map(|bid| book.give_back(bid).unwrap())
            .collect();
        assert_eq!(
            slots,
            (0..16).collect::<Vec<_>>(),
            "slots follow return order, not ids"
        );
        assert_eq!(book.outstanding(), 0);
    }
}
