//! The file-get plugin: downloads confined to a root, resumable, verified by a whole-file MD5.
//!
//! Wire contract (PROTOCOLS.md, file-get): `get <path> [<offset>]` is answered with the number
//! of bytes that follow (from `offset` to the end), the client acknowledges, the bytes come,
//! then 32 lowercase hex digits: the MD5 of the *whole* file, or `ERR file changed` if the
//! file changed while it was being sent. `list [<dir>]` is answered like an exec result (size,
//! ack, text): `<size>\t<name>` per file, `-\t<name>/` per directory. A refused request gets
//! `ERR <reason>` instead of a size, and the connection stays usable. Paths are split on
//! whitespace: they cannot contain spaces.
//!
//! How it stays safe and fast:
//!
//! - [`resolve`]: every path is resolved by the kernel beneath the root directory handle;
//!   only regular files are ever opened for reading.
//! - [`digest`]: each file version's MD5 is computed at most once (sequentially; two
//!   concurrent cold downloads of one file may both hash it) and cached under a key that any
//!   change invalidates.
//! - A download whose digest is cached goes out with `Conn::send_file` (zero-copy `sendfile`
//!   on both socket backends, on the blocking pool). A cold download reads and hashes on the
//!   blocking pool while the worker sends the chunks it produces, so the digest costs no extra
//!   pass and file reads never block a worker.

pub mod digest;
pub mod resolve;

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use md5::{Digest, Md5};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use wharf_core::command::{send_framed, CommandReader, Frame};
use wharf_core::{Conn, OptionDoc, Plugin, PluginError, Service};

use digest::{hex, DigestCache, FileKey};
use resolve::{fstat, Denied, Listed, Root, Want};

/// Bytes read and hashed per step of a cold download.
const CHUNK: usize = 256 * 1024;
/// Chunks in flight between the hashing thread and the worker.
const CHUNKS_IN_FLIGHT: usize = 2;
/// Most entries a listing shows.
const MAX_LISTED: usize = 10_000;
/// Files modified more recently than this are not cached (timestamps have coarse ticks).
const RACY_WINDOW: std::time::Duration = std::time::Duration::from_secs(2);
/// What the digest slot carries when the file changed during the transfer.
pub const CHANGED: &str = "ERR file changed";

/// `[services.<name>.options]` of a file-get service.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileGetOptions {
    /// The directory served (required; must exist at startup).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub root: Option<PathBuf>,
    /// Most digests remembered.
    pub cache_entries: usize,
}

impl Default for FileGetOptions {
    fn default() -> Self {
        FileGetOptions {
            root: None,
            cache_entries: 4096,
        }
    }
}

/// A file-get service.
pub struct FileGet {
    root: Arc<Root>,
    cache: Arc<DigestCache>,
    /// Whole-file digests computed so far (the cache's misses), for tests and diagnostics.
    hashed: AtomicU64,
}

/// `outcome` label values.
mod outcome {
    pub const OK: &str = "ok";
    pub const NOT_FOUND: &str = "not_found";
    pub const REFUSED: &str = "refused";
    pub const CHANGED: &str = "changed";
    pub const ERROR: &str = "error";
}

impl FileGet {
    /// Serves `root` (an existing directory).
    pub fn new(root: &std::path::Path, cache_entries: usize) -> io::Result<Self> {
        Ok(FileGet {
            root: Arc::new(Root::open(root)?),
            cache: Arc::new(DigestCache::new(cache_entries)),
            hashed: AtomicU64::new(0),
        })
    }

    /// How many whole-file digests this service has computed.
    pub fn digests_computed(&self) -> u64 {
        self.hashed.load(Ordering::Relaxed)
    }

    /// The digest cache (shared by all workers).
    pub fn cache(&self) -> &DigestCache {
        &self.cache
    }
}

/// How a request ended, for the connection loop.
enum Done {
    /// Answered; count it under this outcome.
    Answered(&'static str),
    /// The client went away (or the file shrank under a transfer): close.
    Close,
}

#[wharf_core::async_trait(?Send)]
impl Service for FileGet {
    async fn serve<C: Conn + 'static>(&self, mut conn: C) -> io::Result<()> {
        let mut reader = CommandReader::default();
        loop {
            let line = match reader.next(&mut conn).await? {
                Frame::Closed => return Ok(()),
                Frame::Command(line) => line,
                Frame::TooLong => {
                    reply_err(&mut conn, "command too long").await?;
                    conn.record_request(outcome::REFUSED, std::time::Duration::ZERO);
                    return conn.shutdown().await;
                }
                Frame::NotUtf8 => {
                    reply_err(&mut conn, "bad request: not UTF-8").await?;
                    conn.record_request(outcome::REFUSED, std::time::Duration::ZERO);
                    continue;
                }
            };
            let started = Instant::now();
            let words: Vec<&str> = line.split_ascii_whitespace().collect();
            let done = match words.as_slice() {
                ["get", path] => self.get(&mut conn, &mut reader, path, "0").await?,
                ["get", path, offset] => self.get(&mut conn, &mut reader, path, offset).await?,
                ["list"] => self.list(&mut conn, &mut reader, "").await?,
                ["list", dir] => self.list(&mut conn, &mut reader, dir).await?,
                _ => {
                    reply_err(
                        &mut conn,
                        "bad request: use `get <path> [<offset>]` or `list [<dir>]`",
                    )
                    .await?;
                    Done::Answered(outcome::REFUSED)
                }
            };
            match done {
                Done::Answered(label) => conn.record_request(label, started.elapsed()),
                Done::Close => return Ok(()),
            }
        }
    }
}

impl FileGet {
    /// Resolves and opens a path on the blocking pool: lookups can wait on a disk or a
    /// network filesystem, and a worker must not.
    async fn open(&self, path: &str, want: Want) -> io::Result<Result<File, Denied>> {
        let root = Arc::clone(&self.root);
        let path = path.to_string();
        tokio::task::spawn_blocking(move || root.open_beneath(&path, want))
            .await
            .map_err(io::Error::other)
    }

    async fn get<C: Conn>(
        &self,
        conn: &mut C,
        reader: &mut CommandReader,
        path: &str,
        offset: &str,
    ) -> io::Result<Done> {
        let file = match self.open(path, Want::File).await? {
            Ok(file) => file,
            Err(denied) => return refuse(conn, &denied).await,
        };
        let key = FileKey::of(&fstat(file.as_raw_fd())?);
        let size = key.size();
        let offset = match offset.parse::<u64>() {
            Ok(o) if offset.bytes().all(|b| b.is_ascii_digit()) && o <= size => o,
            Ok(_) if offset.bytes().all(|b| b.is_ascii_digit()) => {
                reply_err(conn, "bad offset: beyond the end of the file").await?;
                return Ok(Done::Answered(outcome::REFUSED));
            }
            _ => {
                reply_err(conn, "bad offset").await?;
                return Ok(Done::Answered(outcome::REFUSED));
            }
        };
        let len = size - offset;
        let (res, _) = conn.write_all(len.to_string().into_bytes()).await;
        res?;
        if !reader.ack(conn).await? {
            return Ok(Done::Close);
        }

        let digest = match self.cache.get(&key) {
            Some(digest) => {
                if conn.send_file(&file, offset, len).await? < len {
                    return Ok(Done::Close); // the file shrank: the promised size cannot be met
                }
                Some(digest).filter(|_| unchanged(&file, &key))
            }
            None => match send_hashing(conn, &file, key, offset).await? {
                Hashed::Complete(digest) => {
                    self.hashed.fetch_add(1, Ordering::Relaxed);
                    // A file modified within the last seconds may change again within the same
                    // timestamp tick, unseen by the key: such digests are not remembered (git's
                    // "racy" rule).
                    if !key.modified_within(RACY_WINDOW) {
                        self.cache.insert(key, digest);
                    }
                    Some(digest)
                }
                Hashed::Changed => None,
                Hashed::Short => return Ok(Done::Close),
            },
        };
        let (trailer, label) = match digest {
            Some(d) => (hex(&d), outcome::OK),
            None => (CHANGED.to_string(), outcome::CHANGED),
        };
        let (res, _) = conn.write_all(trailer.into_bytes()).await;
        res?;
        Ok(Done::Answered(label))
    }

    async fn list<C: Conn>(
        &self,
        conn: &mut C,
        reader: &mut CommandReader,
        dir: &str,
    ) -> io::Result<Done> {
        let handle = match self.open(dir, Want::Directory).await? {
            Ok(handle) => handle,
            Err(denied) => return refuse(conn, &denied).await,
        };
        // Directories can be huge: read them off the worker.
        let (entries, left_out) =
            tokio::task::spawn_blocking(move || resolve::list(&handle, MAX_LISTED))
                .await
                .map_err(io::Error::other)??;
        let mut text = String::new();
        for entry in &entries {
            match entry {
                Listed::File(name, size) => text.push_str(&format!("{size}\t{name}\n")),
                Listed::Dir(name) => text.push_str(&format!("-\t{name}/\n")),
            }
        }
        if left_out > 0 {
            text.push_str(&format!("[{left_out} more entries not shown]\n"));
        }
        if !send_framed(conn, reader, text.into_bytes()).await? {
            return Ok(Done::Close);
        }
        Ok(Done::Answered(outcome::OK))
    }
}

/// Whether the open file still is the version `key` describes.
fn unchanged(file: &File, key: &FileKey) -> bool {
    fstat(file.as_raw_fd()).is_ok_and(|st| FileKey::of(&st) == *key)
}

async fn reply_err<C: Conn>(conn: &mut C, reason: &str) -> io::Result<()> {
    let (res, _) = conn.write_all(format!("ERR {reason}\n").into_bytes()).await;
    res
}

async fn refuse<C: Conn>(conn: &mut C, denied: &Denied) -> io::Result<Done> {
    reply_err(conn, &denied.reason()).await?;
    Ok(Done::Answered(match denied {
        Denied::NotFound => outcome::NOT_FOUND,
        Denied::Io(_) => outcome::ERROR,
        _ => outcome::REFUSED,
    }))
}

/// How a cold download's hashing ended.
enum Hashed {
    /// The whole file was hashed and is unchanged.
    Complete([u8; 16]),
    /// The file changed while it was read.
    Changed,
    /// The file ended before the promised size, or the client left.
    Short,
}

/// Sends `file[offset..]` while a blocking thread reads and hashes the whole file.
async fn send_hashing<C: Conn>(
    conn: &mut C,
    file: &File,
    key: FileKey,
    offset: u64,
) -> io::Result<Hashed> {
    let size = key.size();
    let (chunks, mut incoming) = tokio::sync::mpsc::channel::<Vec<u8>>(CHUNKS_IN_FLIGHT);
    let (recycle, reuse) = std::sync::mpsc::channel::<Vec<u8>>();
    let reading = file.try_clone()?;
    let producer = tokio::task::spawn_blocking(move || -> io::Result<Hashed> {
        let mut md5 = Md5::new();
        let mut pos = 0u64;
        while pos < size {
            let mut buf = reuse
                .try_recv()
                .unwrap_or_else(|_| Vec::with_capacity(CHUNK));
            buf.resize((size - pos).min(CHUNK as u64) as usize, 0);
            let n = reading.read_at(&mut buf, pos)?;
            if n == 0 {
                return Ok(Hashed::Short);
            }
            buf.truncate(n);
            md5.update(&buf);
            let end = pos + n as u64;
            if end > offset {
                let skip = offset.saturating_sub(pos) as usize;
                buf.drain(..skip);
                if chunks.blocking_send(buf).is_err() {
                    return Ok(Hashed::Short); // the worker stopped: client gone
                }
            }
            pos = end;
        }
        if !unchanged(&reading, &key) {
            return Ok(Hashed::Changed);
        }
        Ok(Hashed::Complete(md5.finalize().into()))
    });
    let mut sent = 0u64;
    while let Some(chunk) = incoming.recv().await {
        let n = chunk.len() as u64;
        let (res, chunk) = conn.write_all(chunk).await;
        res?;
        sent += n;
        let _ = recycle.send(chunk);
    }
    let hashed = producer.await.map_err(io::Error::other)??;
    if sent < size - offset {
        return Ok(Hashed::Short);
    }
    Ok(hashed)
}

impl Plugin for FileGet {
    const NAME: &'static str = "file-get";
    const DESCRIPTION: &'static str =
        "file downloads confined to a root, resumable, with a whole-file MD5 trailer";
    const OPTIONS: &'static [OptionDoc] = &[
        OptionDoc {
            name: "root",
            kind: "path (required)",
            help: "the directory served; nothing outside it is ever read",
        },
        OptionDoc {
            name: "cache_entries",
            kind: "integer",
            help: "most MD5 digests remembered (one per file version)",
        },
    ];
    const OUTCOMES: &'static [&'static str] = &[
        outcome::OK,
        outcome::NOT_FOUND,
        outcome::REFUSED,
        outcome::CHANGED,
        outcome::ERROR,
    ];
    type Options = FileGetOptions;

    fn build(o: FileGetOptions) -> Result<Self, PluginError> {
        let Some(root) = o.root else {
            return Err(PluginError::option(
                "root",
                "is required: the directory to serve",
            ));
        };
        if !root.is_dir() {
            return Err(PluginError::option(
                "root",
                format!("`{}` is not an existing directory", root.display()),
            ));
        }
        FileGet::new(&root, o.cache_entries).map_err(|e| {
            PluginError::option("root", format!("cannot open `{}`: {e}", root.display()))
        })
    }
}

#[cfg(test)]
mod tests;
