//! The MD5 cache: a file version is hashed about once, however its downloads go.
//!
//! Entries are keyed by the file's identity *and* version: device, inode, size, and the
//! modification and status-change times to the nanosecond. Any write, truncation, rename over
//! or replacement produces a different key, so a changed file can never hit a stale digest.
//!
//! An entry is either the whole file's digest or, for a hash that stopped before the end (its
//! client left), the [`Progress`] made: bytes hashed so far and the MD5 state after them. The
//! next download of that version continues from there, so clients that ask for a file and leave
//! cannot make the server hash it again and again (a resume at the last byte used to cost a
//! whole-file hash per request). The cache is bounded; when full, the oldest entry goes.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

pub use wharf_core::md5::hex;
use wharf_core::md5::Md5;

/// A file's identity and version, from `fstat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileKey {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileKey {
    /// The key of the file `st` describes.
    pub fn of(st: &libc::stat) -> Self {
        FileKey {
            dev: st.st_dev,
            ino: st.st_ino,
            size: st.st_size as u64,
            mtime: (st.st_mtime, st.st_mtime_nsec),
            ctime: (st.st_ctime, st.st_ctime_nsec),
        }
    }

    /// The file's size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether the file's content or status changed less than `window` ago (or in the future).
    pub fn modified_within(&self, window: std::time::Duration) -> bool {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let newest = self.mtime.max(self.ctime);
        let newest = std::time::Duration::new(
            newest.0.max(0) as u64,
            newest.1.clamp(0, 999_999_999) as u32,
        );
        newest + window > now
    }
}

/// How far the hash of a file version has got: the first `hashed` bytes are in `state`.
#[derive(Clone, Default)]
pub struct Progress {
    /// Bytes hashed, from the start of the file.
    pub hashed: u64,
    /// The MD5 state after them.
    pub state: Md5,
}

impl Progress {
    /// Hashes `bytes`, the next ones of the file.
    pub fn update(&mut self, bytes: &[u8]) {
        self.state.update(bytes);
        self.hashed += bytes.len() as u64;
    }

    /// The digest of the bytes hashed so far.
    pub fn digest(&self) -> [u8; 16] {
        self.state.digest()
    }
}

#[derive(Clone)]
enum Known {
    Digest([u8; 16]),
    Partial(Progress),
}

/// A bounded map from file versions to their MD5 (or the progress of its computation),
/// shared by all workers of a service.
pub struct DigestCache {
    inner: Mutex<Entries>,
    capacity: usize,
}

#[derive(Default)]
struct Entries {
    map: HashMap<FileKey, Known>,
    order: VecDeque<FileKey>,
}

impl Entries {
    fn put(&mut self, key: FileKey, known: Known, capacity: usize) {
        if self.map.insert(key, known).is_none() {
            self.order.push_back(key);
        }
        while self.map.len() > capacity {
            match self.order.pop_front() {
                Some(old) => {
                    self.map.remove(&old);
                }
                None => break,
            }
        }
    }
}

impl DigestCache {
    /// A cache of at most `capacity` digests.
    pub fn new(capacity: usize) -> Self {
        DigestCache {
            inner: Mutex::new(Entries::default()),
            capacity: capacity.max(1),
        }
    }

    /// The digest of this exact file version, if known.
    pub fn get(&self, key: &FileKey) -> Option<[u8; 16]> {
        match self.lock().map.get(key) {
            Some(Known::Digest(d)) => Some(*d),
            _ => None,
        }
    }

    /// Where hashing this file version should start: the progress saved by a download that
    /// stopped, or the beginning.
    pub fn progress(&self, key: &FileKey) -> Progress {
        match self.lock().map.get(key) {
            Some(Known::Partial(p)) => p.clone(),
            _ => Progress::default(),
        }
    }

    /// Remembers a digest (it replaces any progress), evicting the oldest entry when full.
    pub fn insert(&self, key: FileKey, digest: [u8; 16]) {
        self.lock().put(key, Known::Digest(digest), self.capacity);
    }

    /// Remembers how far a stopped hash got, unless the digest or further progress is known.
    pub fn save_progress(&self, key: FileKey, progress: Progress) {
        let mut e = self.lock();
        let further = match e.map.get(&key) {
            Some(Known::Digest(_)) => false,
            Some(Known::Partial(p)) => progress.hashed > p.hashed,
            None => progress.hashed > 0,
        };
        if further {
            e.put(key, Known::Partial(progress), self.capacity);
        }
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.lock().map.len()
    }

    /// Whether no digest is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        // A panic while holding the lock cannot leave the map inconsistent: keep using it.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(ino: u64, size: u64) -> FileKey {
        FileKey {
            dev: 1,
            ino,
            size,
            mtime: (0, 0),
            ctime: (0, 0),
        }
    }

    #[test]
    fn versions_do_not_collide_and_the_cache_is_bounded() {
        let cache = DigestCache::new(2);
        cache.insert(key(1, 10), [1; 16]);
        assert_eq!(cache.get(&key(1, 10)), Some([1; 16]));
        assert_eq!(cache.get(&key(1, 11)), None, "same inode, other size");
        cache.insert(key(2, 10), [2; 16]);
        cache.insert(key(3, 10), [3; 16]);
        assert_eq!(cache.len(), 2);
        assert_eq!(cache.get(&key(1, 10)), None, "oldest evicted");
        assert_eq!(hex(&[0xab; 16]), "ab".repeat(16));
    }

    #[test]
    fn progress_only_moves_forward_and_a_digest_replaces_it() {
        let cache = DigestCache::new(4);
        let k = key(1, 100);
        assert_eq!(cache.progress(&k).hashed, 0);
        let mut p = Progress::default();
        p.update(&[7; 40]);
        cache.save_progress(k, p.clone());
        assert_eq!(cache.progress(&k).hashed, 40);
        assert_eq!(cache.get(&k), None, "progress is not a digest");
        cache.save_progress(k, Progress::default());
        assert_eq!(cache.progress(&k).hashed, 40, "no step back");
        // Continuing from the saved state gives the digest of the whole.
        let mut resumed = cache.progress(&k);
        resumed.update(&[7; 60]);
        assert_eq!(resumed.digest(), Md5::of(&[7u8; 100]));
        cache.insert(k, [9; 16]);
        cache.save_progress(k, p);
        assert_eq!(
            cache.get(&k),
            Some([9; 16]),
            "a digest is never replaced by progress"
        );
        assert_eq!(cache.progress(&k).hashed, 0);
    }
}
