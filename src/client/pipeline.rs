//! The data phase of `wharf client get`: receiving, writing and hashing a download at once.
//!
//! The whole-file MD5 is the protocol's speed limit: it is one sequential computation, at most
//! one core's worth. So the hash runs alone on its own thread and must never wait: receiving
//! and writing share the calling thread (each buffer is written as soon as it arrives, while
//! its bytes are still in this core's cache, then handed to the hasher), and they cost far
//! less than hashing. A fixed set of large buffers circulates between the two threads: few
//! hand-overs per second (so few wake-ups that could move a thread onto the hasher's core),
//! no allocation per chunk, and a bounded amount of memory however fast the server sends.

use std::fs::File;
use std::io::{self, Write};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};

use wharf_core::md5::Md5;

use super::transport::Transport;

/// Bytes per buffer: one read (a plain socket's waits until the buffer is full), one write,
/// one hand-over to the hasher. Measured against 1 MiB x 4 (BENCHMARKS.md): smaller buffers
/// reach the hasher sooner after a stall of the sender.
const CHUNK: usize = 256 * 1024;
/// Buffers circulating (4 MiB): enough for the receiving thread to run ahead of the hasher
/// while it waits for the network or the disk.
const BUFFERS: usize = 16;

/// How the data phase ended.
pub struct Received {
    /// Bytes received (and written).
    pub bytes: u64,
    /// The MD5 state after them.
    pub md5: Md5,
    /// Why receiving stopped before `size` bytes: the server closed, or a read failed.
    pub lost: Option<String>,
    /// The first bytes received, to quote if no digest follows them.
    pub head: Vec<u8>,
}

/// Why the data phase failed (a lost connection is no failure here: see [`Received::lost`]).
pub enum Failed {
    /// Writing the file failed: what was written is not the download.
    Write(io::Error),
    /// The hashing thread could not start, or panicked.
    Hasher(String),
}

/// Receives `size` bytes from `stream`, writes them to `file` and hashes them into `md5`,
/// calling `progress` with each chunk's length; keeps the first `head_len` bytes. A write
/// error ends it at once; a lost connection ends it with what arrived written and hashed.
pub fn receive(
    stream: &mut Transport,
    size: u64,
    file: &mut File,
    md5: Md5,
    head_len: usize,
    progress: impl Fn(u64),
) -> Result<Received, Failed> {
    // Full buffers to the hasher, and back empty. Neither send can block: at most
    // `BUFFERS` buffers exist.
    let (to_hash, hashing) = sync_channel::<(Vec<u8>, usize)>(BUFFERS);
    let (hashed, free) = sync_channel::<Vec<u8>>(BUFFERS);
    let hasher = std::thread::Builder::new()
        .name("md5".into())
        .spawn(move || hash(md5, hashing, hashed))
        .map_err(|e| Failed::Hasher(format!("cannot start the hashing thread: {e}")))?;
    let mut buffers = Buffers {
        free,
        made: 0,
        most: BUFFERS,
        size: CHUNK,
    };
    let mut received = 0u64;
    let mut lost = None;
    let mut head = Vec::new();
    let mut failed_write = None;
    while received < size {
        let Some(mut buf) = buffers.next() else {
            break; // the hasher is gone (it panicked): reported below
        };
        let want = (size - received).min(buf.len() as u64) as usize;
        let (n, ended) = fill(stream, &mut buf[..want]);
        if n > 0 {
            head.extend_from_slice(&buf[..n.min(head_len.saturating_sub(head.len()))]);
            if let Err(e) = file.write_all(&buf[..n]) {
                failed_write = Some(e);
                break;
            }
            received += n as u64;
            progress(n as u64);
            if to_hash.send((buf, n)).is_err() {
                break;
            }
        }
        if let Some(why) = ended {
            lost = Some(why);
            break;
        }
    }
    drop(to_hash);
    let md5 = hasher
        .join()
        .map_err(|_| Failed::Hasher("the hashing thread panicked".into()))?;
    if let Some(e) = failed_write {
        return Err(Failed::Write(e));
    }
    Ok(Received {
        bytes: received,
        md5,
        lost,
        head,
    })
}

/// The hashing thread: hashes each full buffer in order and sends it back for reuse.
fn hash(mut md5: Md5, full: Receiver<(Vec<u8>, usize)>, empty: SyncSender<Vec<u8>>) -> Md5 {
    for (buf, len) in full {
        md5.update(&buf[..len]);
        // The receiver may have stopped: then the buffer is simply dropped.
        let _ = empty.send(buf);
    }
    md5
}

/// The receiving side's buffers: made on demand up to `most`, then only those coming back.
struct Buffers {
    free: Receiver<Vec<u8>>,
    made: usize,
    most: usize,
    size: usize,
}

impl Buffers {
    /// A buffer to fill, waiting for the hasher to return one when all are in flight; `None`
    /// if it never will (it is gone).
    fn next(&mut self) -> Option<Vec<u8>> {
        if let Ok(buf) = self.free.try_recv() {
            return Some(buf);
        }
        if self.made < self.most {
            self.made += 1;
            // Zeroed once; buffers keep their full length between uses.
            return Some(vec![0u8; self.size]);
        }
        self.free.recv().ok()
    }
}

/// Reads into all of `buf` unless the stream ends or fails first: returns the bytes read and,
/// when it stopped short, why.
fn fill(stream: &mut Transport, buf: &mut [u8]) -> (usize, Option<String>) {
    let mut filled = 0;
    while filled < buf.len() {
        match stream.read_waiting(&mut buf[filled..]) {
            Ok(0) => return (filled, Some("the server closed the connection".into())),
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return (filled, Some(e.to_string())),
        }
    }
    (filled, None)
}
