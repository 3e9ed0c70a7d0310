//! The MD5 cache: a digest is computed at most once per unchanged file.
//!
//! Entries are keyed by the file's identity *and* version: device, inode, size, and the
//! modification and status-change times to the nanosecond. Any write, truncation, rename over
//! or replacement produces a different key, so a changed file can never hit a stale digest.
//! The cache is bounded; when full, the oldest entry goes.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

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

/// A bounded map from file versions to their MD5, shared by all workers of a service.
pub struct DigestCache {
    inner: Mutex<Entries>,
    capacity: usize,
}

#[derive(Default)]
struct Entries {
    map: HashMap<FileKey, [u8; 16]>,
    order: VecDeque<FileKey>,
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
        self.lock().map.get(key).copied()
    }

    /// Remembers a digest, evicting the oldest entry when full.
    pub fn insert(&self, key: FileKey, digest: [u8; 16]) {
        let mut e = self.lock();
        if e.map.insert(key, digest).is_none() {
            e.order.push_back(key);
        }
        while e.map.len() > self.capacity {
            match e.order.pop_front() {
                Some(old) => {
                    e.map.remove(&old);
                }
                None => break,
            }
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

/// Lowercase hex of a digest.
pub fn hex(digest: &[u8; 16]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
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
}
