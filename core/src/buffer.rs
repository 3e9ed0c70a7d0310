//! Read buffers that cost little while a connection is idle.
//!
//! A server holding 10 000 quiet connections should not hold 10 000 large read buffers. The
//! rule every plugin applies after a read: a read that filled the buffer means the client is
//! streaming, so the next one gets [`ACTIVE`] bytes of room; a short read means it is not, so
//! an empty buffer shrinks back to [`IDLE`] bytes before the next (possibly long) wait. A
//! connection in ping-pong never fills its buffer and so never reallocates; a bulk stream keeps
//! the large one.

/// Room for a read while the client is streaming.
pub const ACTIVE: usize = 16 * 1024;
/// Room for a read while the client is not (and while it is silent).
pub const IDLE: usize = 512;

/// Resizes `buf` for the next read, given how many bytes the last read returned (`last_read`)
/// out of how many it had room for (`room`). Only an empty buffer shrinks (unconsumed input is
/// never dropped); after a read that filled its room, there is room for [`ACTIVE`] more.
pub fn size_for_next_read(buf: &mut Vec<u8>, last_read: usize, room: usize) {
    if last_read == room {
        if buf.capacity() - buf.len() < ACTIVE {
            buf.reserve(ACTIVE);
        }
    } else if buf.is_empty() && last_read < IDLE && buf.capacity() > IDLE {
        *buf = Vec::with_capacity(IDLE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_when_a_read_fills_it_and_shrinks_when_empty_after_a_short_read() {
        let mut buf = Vec::with_capacity(IDLE);
        let room = buf.capacity();
        buf.resize(room, b'x'); // a read filled it
        size_for_next_read(&mut buf, room, room);
        assert!(
            buf.capacity() - buf.len() >= ACTIVE,
            "room for a large read"
        );
        assert_eq!(buf.len(), room, "unconsumed bytes kept");

        buf.clear();
        let room = buf.capacity();
        size_for_next_read(&mut buf, 4000, room); // a long read: still streaming
        assert!(buf.capacity() >= ACTIVE);
        let room = buf.capacity();
        size_for_next_read(&mut buf, 10, room); // a short one: back to small
        assert_eq!(buf.capacity(), IDLE);
        size_for_next_read(&mut buf, 10, IDLE); // and it stays (no reallocation)
        assert_eq!(buf.capacity(), IDLE);

        let mut pending = Vec::with_capacity(ACTIVE);
        pending.extend_from_slice(b"GET / HT");
        size_for_next_read(&mut pending, 8, ACTIVE);
        assert_eq!(pending, b"GET / HT", "a buffer holding input never shrinks");
        assert!(pending.capacity() >= ACTIVE);
    }
}
