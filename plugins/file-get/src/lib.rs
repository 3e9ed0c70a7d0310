//! The file-get plugin: downloads confined to a root, resumable, verified by a whole-file MD5.
//!
//! Wire contract (docs/protocols.md, file-get): `get <path> [<offset>]` is answered with the number
//! of bytes that follow (from `offset` to the end), the client acknowledges, the bytes come,
//! then 32 lowercase hex digits: the MD5 of the *whole* file, or `ERR file changed` if the
//! file changed while it was being sent. `list [<dir>]` is answered like an exec result (size,
//! ack, text): `<size>\t<name>` per file, `-\t<name>/` per directory. A refused request gets
//! `ERR <reason>` instead of a size, and the connection stays usable. Paths are split on
//! whitespace: they cannot contain spaces.
//!
//! Which root: a client whose identity (from a verified TLS client certificate,
//! [`Context::identity`]) has an entry in `roots` is served that directory and nothing else;
//! every other client, one without an identity included, is served `root`, or, without
//! `root`, refused every request (`ERR not allowed for this client`). The choice is made once
//! per connection: an identity never changes on a connection.
//!
//! How it stays safe and fast:
//!
//! - [`resolve`]: every path is resolved by the kernel beneath the chosen root's directory
//!   handle; only regular files are ever opened for reading.
//! - [`digest`]: each file version's MD5 is computed about once and cached under a key that
//!   any change invalidates; a hash stopped because its client left is kept as progress that
//!   the next download of that version continues (two concurrent cold downloads of one file
//!   may both hash it).
//! - Blocking work (opening, listing, reading and hashing) runs through
//!   [`Context::blocking`](wharf_core::Context::blocking), within the service's `max_blocking` budget, in short jobs: a client
//!   that does not read never holds a thread or a budget slot.
//! - A download whose digest is cached goes out with `Conn::send_file` (zero-copy `sendfile`
//!   on the worker, waiting for the socket through the reactor on both backends). A cold
//!   download reads and hashes one chunk per job (the MD5 state moves from job to job) and the
//!   worker then sends that chunk with `send_file` from the page cache, so a stalled client
//!   holds no buffer and no thread. Between chunks it checks that the client is still there,
//!   and stops (keeping the progress) when it is not.

pub mod digest;
pub mod resolve;

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use wharf_core::command::{send_framed, CommandReader, Frame};
use wharf_core::{Conn, Context, OptionDoc, Plugin, PluginError, Service};

use digest::{hex, DigestCache, FileKey, Progress};
use resolve::{fstat, Denied, ListCap, Root, Want};

/// Bytes read and hashed per blocking job of a cold download.
const CHUNK: usize = 256 * 1024;

thread_local! {
    /// The read buffer of a blocking thread's hashing jobs: buffers stay with the few threads
    /// of the budget, never with the (many, possibly stalled) connections.
    static CHUNK_BUFFER: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}
/// Most entries a listing shows.
const MAX_LISTED: usize = 10_000;
/// Most bytes of a listing's text, the last line included: what one connection that never
/// acknowledges a listing holds.
const MAX_LISTING_BYTES: usize = 32 * 1024;
/// The last line of a listing that left entries out (how many is not counted: see
/// [`resolve::list`]).
const MORE_ENTRIES: &str = "[more entries not shown]\n";
/// Files modified more recently than this are not cached (timestamps have coarse ticks).
const RACY_WINDOW: std::time::Duration = std::time::Duration::from_secs(2);
/// What the digest slot carries when the file changed during the transfer.
pub const CHANGED: &str = "ERR file changed";

/// `[services.<name>.options]` of a file-get service.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileGetOptions {
    /// The directory served to clients without a root of their own in `roots` (must exist at
    /// startup); required unless `roots` is set, and without it those clients are refused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub root: Option<PathBuf>,
    /// Per client identity (from verified TLS client certificates), the directory served to
    /// that client instead of `root`.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub roots: BTreeMap<String, PathBuf>,
    /// Most digests remembered.
    pub cache_entries: usize,
}

impl Default for FileGetOptions {
    fn default() -> Self {
        FileGetOptions {
            root: None,
            roots: BTreeMap::new(),
            cache_entries: 4096,
        }
    }
}

/// A file-get service.
pub struct FileGet {
    /// `root`: what clients without a root in `roots` are served; `None` refuses them.
    root: Option<Arc<Root>>,
    /// `roots`: each identity's own root.
    roots: BTreeMap<String, Arc<Root>>,
    cache: Arc<DigestCache>,
    /// Whole-file digests computed so far (the cache's misses), for tests and diagnostics.
    hashed: AtomicU64,
    /// Bytes hashed so far, all downloads together (the CPU spent on digests).
    hashed_bytes: AtomicU64,
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
    /// Serves `root` (an existing directory) to every client.
    pub fn new(root: &std::path::Path, cache_entries: usize) -> io::Result<Self> {
        Ok(FileGet {
            root: Some(Arc::new(Root::open(root)?)),
            roots: BTreeMap::new(),
            cache: Arc::new(DigestCache::new(cache_entries)),
            hashed: AtomicU64::new(0),
            hashed_bytes: AtomicU64::new(0),
        })
    }

    /// The root a client with `identity` is served; `None`: it may read nothing.
    fn root_for(&self, identity: Option<&str>) -> Option<&Arc<Root>> {
        identity
            .and_then(|id| self.roots.get(id))
            .or(self.root.as_ref())
    }

    /// How many bytes this service has hashed, all downloads together.
    pub fn bytes_hashed(&self) -> u64 {
        self.hashed_bytes.load(Ordering::Relaxed)
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
    async fn serve<C: Conn + 'static>(&self, mut conn: C, cx: &Context) -> io::Result<()> {
        let mut reader = CommandReader::default();
        let root = self.root_for(cx.identity());
        loop {
            let line = match reader.next(&mut conn, cx).await? {
                Frame::Closed => return Ok(()),
                Frame::Command(line) => line,
                Frame::TooLong => {
                    reply_err(&mut conn, "command too long").await?;
                    cx.record_request(outcome::REFUSED, std::time::Duration::ZERO);
                    return conn.shutdown().await;
                }
                Frame::NotUtf8 => {
                    reply_err(&mut conn, "bad request: not UTF-8").await?;
                    cx.record_request(outcome::REFUSED, std::time::Duration::ZERO);
                    continue;
                }
            };
            let started = Instant::now();
            let words: Vec<&str> = line.split_ascii_whitespace().collect();
            let mut sent = Sent::default();
            let done = match words.as_slice() {
                ["get", path] => {
                    self.get(&mut conn, cx, &mut reader, root, path, "0", &mut sent)
                        .await?
                }
                ["get", path, offset] => {
                    self.get(&mut conn, cx, &mut reader, root, path, offset, &mut sent)
                        .await?
                }
                ["list"] => self.list(&mut conn, cx, &mut reader, root, "").await?,
                ["list", dir] => self.list(&mut conn, cx, &mut reader, root, dir).await?,
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
                Done::Answered(label) => {
                    // At debug: requests are many and small (`WHARF_LOG=debug` shows them).
                    // The line is client input, bounded by the framing, escaped by `{:?}`.
                    tracing::debug!(
                        service = cx.service(),
                        peer = %cx.peer(),
                        identity = cx.identity().unwrap_or("-"),
                        request = ?line,
                        outcome = label,
                        "file-get: request"
                    );
                    cx.record_request_with(label, started.elapsed(), |f| {
                        log_fields(f, &words, &sent)
                    });
                }
                Done::Close => return Ok(()),
            }
        }
    }
}

impl FileGet {
    /// Resolves and opens a path beneath the client's `root` (`None`: it may read nothing) in
    /// a blocking job: lookups can wait on a disk or a network filesystem, and a worker must
    /// not.
    async fn open<C: Conn>(
        conn: &C,
        cx: &Context,
        root: Option<&Arc<Root>>,
        path: &str,
        want: Want,
    ) -> io::Result<Result<File, Denied>> {
        let Some(root) = root else {
            return Ok(Err(Denied::NotForClient));
        };
        let root = Arc::clone(root);
        let path = path.to_string();
        cx.blocking(conn, move || root.open_beneath(&path, want))
            .await
    }

    #[allow(
        clippy::too_many_arguments,
        reason = "the request's parts, and where its transfer is noted"
    )]
    async fn get<C: Conn>(
        &self,
        conn: &mut C,
        cx: &Context,
        reader: &mut CommandReader,
        root: Option<&Arc<Root>>,
        path: &str,
        offset: &str,
        sent: &mut Sent,
    ) -> io::Result<Done> {
        let file = match Self::open(conn, cx, root, path, Want::File).await? {
            Ok(file) => Arc::new(file),
            Err(denied) => return refuse(conn, &denied).await,
        };
        let key = FileKey::of(&fstat(file.as_raw_fd())?);
        advise_sequential(&file);
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
        sent.offset = offset;
        let (res, _) = conn.write_all(len.to_string().into_bytes()).await;
        res?;
        // A client that half-closed instead of acknowledging is still reading: it gets the
        // file, and the session ends at its end of stream (the next command read). A client
        // that is really gone shows itself by a reset at the first write.
        reader.ack(conn).await?;

        let digest = match self.cache.get(&key) {
            Some(digest) => {
                if !send_exactly(conn, &file, offset, len).await? {
                    return Ok(Done::Close);
                }
                Some(digest).filter(|_| unchanged(&file, &key))
            }
            None => match self.send_hashing(conn, cx, &file, key, offset).await? {
                Hashed::Complete(digest) => Some(digest),
                Hashed::Changed => None,
                Hashed::Short => return Ok(Done::Close),
            },
        };
        sent.bytes = len;
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
        cx: &Context,
        reader: &mut CommandReader,
        root: Option<&Arc<Root>>,
        dir: &str,
    ) -> io::Result<Done> {
        let handle = match Self::open(conn, cx, root, dir, Want::Directory).await? {
            Ok(handle) => handle,
            Err(denied) => return refuse(conn, &denied).await,
        };
        // Directories can be huge: read them off the worker, and only as much as is shown.
        let cap = ListCap {
            entries: MAX_LISTED,
            bytes: MAX_LISTING_BYTES - MORE_ENTRIES.len(),
        };
        let (entries, more) = cx
            .blocking(conn, move || resolve::list(&handle, cap))
            .await??;
        let mut text = String::with_capacity(MAX_LISTING_BYTES);
        for entry in &entries {
            text.push_str(&entry.line());
        }
        if more {
            text.push_str(MORE_ENTRIES);
        }
        // Sent even to a client that half-closed instead of acknowledging (see `get`).
        send_framed(conn, reader, text.into_bytes()).await?;
        Ok(Done::Answered(outcome::OK))
    }
}

/// What a `get` sent, for its access log line.
#[derive(Default)]
struct Sent {
    /// Where in the file the transfer started.
    offset: u64,
    /// Bytes of the file sent (all that was asked, or none).
    bytes: u64,
}

/// A request's access log fields: `op` (`get` or `list`), `path`, and for `get` the `offset`
/// and the file's `bytes` sent. Nothing of a request that is neither.
fn log_fields(f: &mut wharf_core::access_log::Fields<'_>, words: &[&str], sent: &Sent) {
    match words {
        ["get", path, ..] => {
            f.str("op", "get");
            f.str("path", path);
            f.u64("offset", sent.offset);
            f.u64("bytes", sent.bytes);
        }
        ["list", rest @ ..] => {
            f.str("op", "list");
            f.str("path", rest.first().copied().unwrap_or(""));
        }
        _ => {}
    }
}

/// Sends `len` bytes of `file` from `from`; `false` if the file ended first (it shrank: the
/// promised size cannot be met, so the connection must end).
async fn send_exactly<C: Conn>(conn: &mut C, file: &File, from: u64, len: u64) -> io::Result<bool> {
    Ok(conn.send_file(file, from, len).await? == len)
}

/// Tells the kernel that `file` will be read from start to end (a download, by `sendfile` or
/// by the hashing jobs): it reads ahead twice as far, so a file that is not in the page cache
/// comes from the disk in fewer, larger requests. Only advice: a failure changes nothing.
fn advise_sequential(file: &File) {
    // SAFETY: the descriptor is open while `file` lives; fadvise reads no memory of ours.
    unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_SEQUENTIAL) };
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

impl FileGet {
    /// Sends `file[offset..]` and hashes the whole file, continuing from the progress the
    /// cache holds for this version; remembers the digest, or the progress made if it stops
    /// first (unless the file is too fresh to trust its key: the racy rule below).
    async fn send_hashing<C: Conn>(
        &self,
        conn: &mut C,
        cx: &Context,
        file: &Arc<File>,
        key: FileKey,
        offset: u64,
    ) -> io::Result<Hashed> {
        let mut progress = self.cache.progress(&key);
        let start = progress.hashed;
        let res = hash_and_send(conn, cx, file, &key, offset, &mut progress).await;
        self.hashed_bytes
            .fetch_add(progress.hashed.saturating_sub(start), Ordering::Relaxed);
        // A file modified within the last seconds may change again within the same timestamp
        // tick, unseen by the key: its digest and progress are not remembered (git's "racy"
        // rule), so until it is RACY_WINDOW old each download of it hashes it again.
        let trusted = !key.modified_within(RACY_WINDOW) && unchanged(file, &key);
        match res {
            Ok(Hashed::Complete(digest)) => {
                self.hashed.fetch_add(1, Ordering::Relaxed);
                if trusted {
                    self.cache.insert(key, digest);
                }
                Ok(Hashed::Complete(digest))
            }
            other => {
                if trusted && progress.hashed > start {
                    self.cache.save_progress(key, progress);
                }
                other
            }
        }
    }
}

/// The loop of [`FileGet::send_hashing`]: hashes from `progress` to the end of the file one
/// chunk per blocking job, and sends `offset..` as it goes, each chunk with `send_file` right
/// after it was hashed. `progress` is left where hashing stopped.
///
/// Bytes the progress already covers are sent first with `send_file`. When hashing must first
/// catch up to `offset` (a resume), a first piece of the requested range is sent before it
/// starts: a client that asked and left then answers with a reset, which the check between
/// chunks sees, instead of costing a whole-file hash. That piece is read once more when the
/// hash reaches it.
async fn hash_and_send<C: Conn>(
    conn: &mut C,
    cx: &Context,
    file: &Arc<File>,
    key: &FileKey,
    offset: u64,
    progress: &mut Progress,
) -> io::Result<Hashed> {
    let size = key.size();
    let first = if progress.hashed > offset {
        progress.hashed.min(size)
    } else if progress.hashed < offset {
        offset.saturating_add(CHUNK as u64).min(size)
    } else {
        offset
    };
    // Bytes before `sent` (from `offset`) have been sent.
    let mut sent = offset;
    if first > offset {
        if !send_exactly(conn, file, offset, first - offset).await? {
            return Ok(Hashed::Short);
        }
        sent = first;
    }
    while progress.hashed < size {
        let pos = progress.hashed;
        // Before any byte went out, hashing below `offset` is for the trailer alone (a resume
        // at the end of the file): a client that has stopped sending is taken as gone, since
        // one that sent nothing never answers with the reset `peer_closed` waits for.
        let unsent = sent == offset && pos < offset;
        if conn.peer_closed() || (unsent && conn.peer_finished_sending()) {
            return Ok(Hashed::Short);
        }
        let want = (size - pos).min(CHUNK as u64) as usize;
        let (reading, mut step) = (Arc::clone(file), std::mem::take(progress));
        let job = move || {
            let res = CHUNK_BUFFER.with_borrow_mut(|buf| {
                buf.resize(want, 0);
                let n = reading.read_at(buf, pos)?;
                step.update(&buf[..n]);
                Ok(n)
            });
            (res, step)
        };
        let (res, step): (io::Result<usize>, Progress) = cx.blocking(conn, job).await?;
        *progress = step;
        if res? == 0 {
            return Ok(Hashed::Short);
        }
        // The chunk just read is in the page cache: send it from there (no copy, and no buffer
        // of ours held while a slow client reads it). A change in between shows in the key.
        let end = progress.hashed;
        if end > sent {
            if !send_exactly(conn, file, sent, end - sent).await? {
                return Ok(Hashed::Short);
            }
            sent = end;
        }
    }
    if !unchanged(file, key) {
        return Ok(Hashed::Changed);
    }
    Ok(Hashed::Complete(progress.digest()))
}

impl Plugin for FileGet {
    const NAME: &'static str = "file-get";
    const DESCRIPTION: &'static str =
        "file downloads confined to a root, resumable, with a whole-file MD5 trailer";
    const OPTIONS: &'static [OptionDoc] = &[
        OptionDoc {
            name: "root",
            kind: "path (required unless `roots` is set)",
            help: "the directory served (to clients without a root in `roots`); nothing \
                   outside it is ever read",
        },
        OptionDoc {
            name: "roots",
            kind: "table: <identity> = path",
            help: "per TLS client identity, the directory served to that client instead of \
                   `root`; without `root`, other clients are refused",
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
        if o.root.is_none() && o.roots.is_empty() {
            return Err(PluginError::option(
                "root",
                "is required: the directory to serve (or `roots`, one per client identity)",
            ));
        }
        let root = o
            .root
            .as_deref()
            .map(|dir| open_root("root", dir))
            .transpose()?;
        let mut roots = BTreeMap::new();
        for (identity, dir) in &o.roots {
            let key = format!("roots.{identity}");
            // What the TLS layer never gives as an identity (such names count as absent).
            if identity.is_empty() || identity.chars().any(char::is_control) {
                return Err(PluginError::option(
                    key,
                    "an identity cannot be empty or hold control characters",
                ));
            }
            roots.insert(identity.clone(), open_root(&key, dir)?);
        }
        Ok(FileGet {
            root,
            roots,
            cache: Arc::new(DigestCache::new(o.cache_entries)),
            hashed: AtomicU64::new(0),
            hashed_bytes: AtomicU64::new(0),
        })
    }
}

/// Opens the directory of option `key` as a root.
fn open_root(key: &str, dir: &std::path::Path) -> Result<Arc<Root>, PluginError> {
    if !dir.is_dir() {
        return Err(PluginError::option(
            key,
            format!("`{}` is not an existing directory", dir.display()),
        ));
    }
    Root::open(dir)
        .map(Arc::new)
        .map_err(|e| PluginError::option(key, format!("cannot open `{}`: {e}", dir.display())))
}

#[cfg(test)]
mod tests;
