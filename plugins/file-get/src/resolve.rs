//! Confinement: turning a client's path into an open file that is certainly inside `root`.
//!
//! Paths are resolved by the kernel relative to the root *directory handle* opened at startup,
//! with `openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)`: a `..` that would climb above the
//! root, absolute symlinks and any symlink (or symlinked parent) leading outside the root fail
//! inside the kernel, atomically, whatever happens to the tree meanwhile; a `..` that stays
//! inside (`sub/../x`) is allowed. Where `openat2` is unavailable (Linux < 5.6, some seccomp
//! profiles) each component is opened with `O_NOFOLLOW` instead, which refuses every symlink;
//! with no symlink on the way, `..` can be applied to the path as text first, refusing any that
//! would climb above the root. Cheap string checks run first for clear messages: NUL bytes,
//! absolute paths, overlong names.
//!
//! Only regular files are served: the path is opened with `O_PATH` and inspected before it is
//! opened for reading, so FIFOs (which would hang a reader) and device files are never opened
//! for IO at all.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

/// Longest path accepted, in bytes.
pub const MAX_PATH: usize = 1024;
/// Longest path component accepted, in bytes.
const MAX_NAME: usize = 255;

/// Why a path is refused; the text after `ERR `.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    /// Nothing there.
    NotFound,
    /// Outside the root: `..`, absolute paths, escaping symlinks.
    OutsideRoot,
    /// A directory where a file is needed (or the reverse).
    IsDirectory,
    /// Not a directory where one is needed.
    NotDirectory,
    /// A FIFO, socket or device.
    NotRegular,
    /// NUL bytes, empty, or overlong.
    BadPath(&'static str),
    /// The server may not read it.
    PermissionDenied,
    /// Anything else, with the OS error.
    Io(String),
    /// The client may read nothing: no root for its identity and no `root` for all.
    NotForClient,
}

impl Denied {
    /// The reason sent after `ERR `.
    pub fn reason(&self) -> String {
        match self {
            Denied::NotFound => "no such file".into(),
            Denied::OutsideRoot => "path outside root".into(),
            Denied::IsDirectory => "is a directory".into(),
            Denied::NotDirectory => "not a directory".into(),
            Denied::NotRegular => "not a regular file".into(),
            Denied::BadPath(why) => format!("bad path: {why}"),
            Denied::PermissionDenied => "permission denied".into(),
            Denied::Io(e) => format!("cannot open: {e}"),
            Denied::NotForClient => "not allowed for this client".into(),
        }
    }

    fn from_os(e: io::Error) -> Self {
        match e.raw_os_error() {
            Some(libc::ENOENT) => Denied::NotFound,
            Some(libc::EXDEV) | Some(libc::ELOOP) => Denied::OutsideRoot,
            Some(libc::ENOTDIR) => Denied::NotFound,
            Some(libc::EACCES) | Some(libc::EPERM) => Denied::PermissionDenied,
            Some(libc::ENAMETOOLONG) => Denied::BadPath("name too long"),
            _ => Denied::Io(e.to_string()),
        }
    }
}

/// The service's root directory, held open.
#[derive(Debug)]
pub struct Root {
    dir: OwnedFd,
}

/// What to open.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// A regular file, for reading.
    File,
    /// A directory, for listing.
    Directory,
}

impl Root {
    /// Opens `path` as the root; it must be an existing directory.
    pub fn open(path: &Path) -> io::Result<Root> {
        let c = CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))?;
        // SAFETY: a valid C string; the returned descriptor is new and ours.
        let fd = unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: just opened.
        Ok(Root {
            dir: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Opens `path` (relative to the root) for reading, as a regular file or a directory.
    pub fn open_beneath(&self, path: &str, want: Want) -> Result<File, Denied> {
        let path = check(path, want)?;
        let handle = self.resolve(&path, libc::O_PATH)?;
        let st = fstat(handle.as_raw_fd()).map_err(|e| Denied::Io(e.to_string()))?;
        let kind = st.st_mode & libc::S_IFMT;
        match (want, kind) {
            (Want::File, libc::S_IFREG) | (Want::Directory, libc::S_IFDIR) => {}
            (Want::File, libc::S_IFDIR) => return Err(Denied::IsDirectory),
            (Want::Directory, libc::S_IFREG) => return Err(Denied::NotDirectory),
            _ => return Err(Denied::NotRegular),
        }
        // Now open that very inode for reading, through /proc/self/fd (no second lookup, so
        // no swap race). Without /proc, resolve the path again: O_NONBLOCK keeps a swapped-in
        // FIFO from hanging the open, and the identity check below rejects the swap.
        let mut flags = libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC;
        if want == Want::Directory {
            flags |= libc::O_DIRECTORY;
        }
        let fd = match reopen(&handle, flags) {
            Ok(fd) => fd,
            Err(_) => self.resolve(&path, flags)?,
        };
        let again = fstat(fd.as_raw_fd()).map_err(|e| Denied::Io(e.to_string()))?;
        if (again.st_dev, again.st_ino) != (st.st_dev, st.st_ino) {
            return Err(Denied::Io("the file changed while opening".into()));
        }
        if want == Want::File {
            clear_nonblocking(fd.as_raw_fd());
        }
        Ok(File::from(fd))
    }

    fn resolve(&self, path: &CString, flags: i32) -> Result<OwnedFd, Denied> {
        match openat2_beneath(self.dir.as_raw_fd(), path, flags) {
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOSYS) | Some(libc::EPERM)) => {
                walk_nofollow(self.dir.as_raw_fd(), path, flags).map_err(Denied::from_os)
            }
            other => other.map_err(Denied::from_os),
        }
    }
}

/// Opens the inode an `O_PATH` descriptor refers to, via its /proc/self/fd magic link.
fn reopen(handle: &OwnedFd, flags: i32) -> io::Result<OwnedFd> {
    let link =
        CString::new(format!("/proc/self/fd/{}", handle.as_raw_fd())).map_err(io::Error::other)?;
    // SAFETY: a valid C string; the returned descriptor is new and ours.
    let fd = unsafe { libc::open(link.as_ptr(), flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: just opened.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// String-level checks, for clear errors before the kernel's own.
fn check(path: &str, want: Want) -> Result<CString, Denied> {
    let trimmed = if want == Want::Directory && path.is_empty() {
        "."
    } else {
        path
    };
    if trimmed.is_empty() {
        return Err(Denied::BadPath("missing path"));
    }
    if trimmed.len() > MAX_PATH {
        return Err(Denied::BadPath("path too long"));
    }
    if trimmed.starts_with('/') {
        return Err(Denied::OutsideRoot);
    }
    for component in trimmed.split('/') {
        if component.len() > MAX_NAME {
            return Err(Denied::BadPath("name too long"));
        }
    }
    CString::new(trimmed).map_err(|_| Denied::BadPath("NUL byte"))
}

fn openat2_beneath(dir: RawFd, path: &CString, flags: i32) -> io::Result<OwnedFd> {
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (flags | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: valid descriptor, C string and open_how of the size we pass.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir,
            path.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// `path`'s components with `.` and empty ones dropped and each `..` applied to the one before
/// it; `None` if a `..` would climb above the start. Sound only for a walk that follows no
/// symlink (a symlinked directory's `..` is not the directory before it in the text).
fn normalize(path: &str) -> Option<Vec<&str>> {
    let mut parts = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            name => parts.push(name),
        }
    }
    Some(parts)
}

/// The fallback: one component at a time, never following a symlink.
fn walk_nofollow(dir: RawFd, path: &CString, flags: i32) -> io::Result<OwnedFd> {
    let text = path.to_str().map_err(io::Error::other)?;
    // EXDEV, like openat2's RESOLVE_BENEATH: "outside the root".
    let parts = normalize(text).ok_or_else(|| io::Error::from_raw_os_error(libc::EXDEV))?;
    let mut current: Option<OwnedFd> = None;
    let at = |cur: &Option<OwnedFd>| cur.as_ref().map_or(dir, |f| f.as_raw_fd());
    for (i, part) in parts.iter().enumerate() {
        let last = i + 1 == parts.len();
        let f = if last {
            flags | libc::O_NOFOLLOW | libc::O_CLOEXEC
        } else {
            libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC
        };
        let name = CString::new(*part).map_err(io::Error::other)?;
        // SAFETY: valid descriptor and C string.
        let fd = unsafe { libc::openat(at(&current), name.as_ptr(), f) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: new descriptor.
        current = Some(unsafe { OwnedFd::from_raw_fd(fd) });
    }
    match current {
        Some(fd) => Ok(fd),
        // "." : the root itself.
        None => {
            let dot = CString::new(".").unwrap_or_default();
            // SAFETY: valid descriptor and C string.
            let fd = unsafe { libc::openat(dir, dot.as_ptr(), flags | libc::O_CLOEXEC) };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: new descriptor.
            Ok(unsafe { OwnedFd::from_raw_fd(fd) })
        }
    }
}

/// `fstat(2)`.
pub fn fstat(fd: RawFd) -> io::Result<libc::stat> {
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid descriptor and a stat buffer.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st)
}

fn clear_nonblocking(fd: RawFd) {
    // SAFETY: fcntl on our own descriptor.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK);
    }
}

/// One entry of a directory listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listed {
    /// A regular file and its size.
    File(String, u64),
    /// A subdirectory.
    Dir(String),
}

impl Listed {
    fn name(&self) -> &str {
        match self {
            Listed::File(n, _) | Listed::Dir(n) => n,
        }
    }

    /// The entry's line in a listing: `<size>\t<name>\n`, or `-\t<name>/\n` for a directory.
    pub fn line(&self) -> String {
        match self {
            Listed::File(name, size) => format!("{size}\t{name}\n"),
            Listed::Dir(name) => format!("-\t{name}/\n"),
        }
    }
}

/// What [`list`] may show: at most `entries` entries whose [`Listed::line`]s take at most
/// `bytes` bytes together.
#[derive(Debug, Clone, Copy)]
pub struct ListCap {
    /// Most entries.
    pub entries: usize,
    /// Most bytes of their lines.
    pub bytes: usize,
}

/// Lists regular files and directories of an open directory (symlinks and special files are
/// left out: following them could leave the root; so are names with control characters, which
/// could forge lines of the listing), sorted by name. The second value says whether entries
/// were left out.
///
/// The work is bounded by `cap`, whatever the directory holds: reading stops at the first
/// entry that does not fit (it is not counted, nor are the ones after it: counting would cost
/// a `readdir` and a `stat` each), only entries whose type `readdir` reports as file,
/// directory or unknown are `stat`ed, and at most `2 * cap.entries` names are read in all
/// (after that, the rest is reported as left out, even if all of it would have been skipped).
pub fn list(dir: &File, cap: ListCap) -> io::Result<(Vec<Listed>, bool)> {
    // fdopendir takes ownership of the descriptor it is given: give it a duplicate.
    let dup = dir.try_clone()?;
    let fd = std::os::fd::IntoRawFd::into_raw_fd(dup);
    // SAFETY: `fd` is a directory descriptor we own; fdopendir takes it over.
    let stream = unsafe { libc::fdopendir(fd) };
    if stream.is_null() {
        let e = io::Error::last_os_error();
        // SAFETY: fdopendir failed, so the descriptor is still ours to close.
        unsafe { libc::close(fd) };
        return Err(e);
    }
    // The duplicate shares its position with `dir`: start from the first entry even if `dir`
    // was listed before.
    // SAFETY: a valid DIR*.
    unsafe { libc::rewinddir(stream) };
    let mut out = Vec::new();
    let (mut bytes, mut read) = (0usize, 0usize);
    let mut more = false;
    loop {
        // SAFETY: `stream` is a valid DIR* until closedir below.
        let entry = unsafe { libc::readdir64(stream) };
        if entry.is_null() {
            break;
        }
        read += 1;
        // SAFETY: readdir returned a valid entry with a NUL-terminated name.
        let (name, d_type) = unsafe {
            (
                std::ffi::CStr::from_ptr((*entry).d_name.as_ptr()),
                (*entry).d_type,
            )
        };
        let bytes_of_name = name.to_bytes();
        if bytes_of_name == b"."
            || bytes_of_name == b".."
            || bytes_of_name.iter().any(u8::is_ascii_control)
            || !matches!(d_type, libc::DT_REG | libc::DT_DIR | libc::DT_UNKNOWN)
        {
            continue;
        }
        if out.len() >= cap.entries || read > cap.entries.saturating_mul(2) {
            more = true;
            break;
        }
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: valid directory descriptor, name and stat buffer.
        let ok = unsafe {
            libc::fstatat(
                dir.as_raw_fd(),
                name.as_ptr(),
                &mut st,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        } == 0;
        if !ok {
            continue;
        }
        let kind = st.st_mode & libc::S_IFMT;
        let name = String::from_utf8_lossy(bytes_of_name).into_owned();
        let listed = match kind {
            libc::S_IFREG => Listed::File(name, st.st_size as u64),
            libc::S_IFDIR => Listed::Dir(name),
            _ => continue,
        };
        let len = listed.line().len();
        if bytes + len > cap.bytes {
            more = true;
            break;
        }
        bytes += len;
        out.push(listed);
    }
    // SAFETY: closes the stream and the descriptor it owns.
    unsafe { libc::closedir(stream) };
    out.sort_by(|a, b| a.name().cmp(b.name()));
    Ok((out, more))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `<base>/root/{x, sub/y}` and `<base>/secret`, removed on drop.
    struct Tree(std::path::PathBuf);

    impl Tree {
        fn new(tag: &str) -> Tree {
            let base =
                std::env::temp_dir().join(format!("wharf-resolve-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&base);
            std::fs::create_dir_all(base.join("root/sub")).unwrap();
            std::fs::write(base.join("root/x"), b"x").unwrap();
            std::fs::write(base.join("root/sub/y"), b"y").unwrap();
            std::fs::write(base.join("secret"), b"secret").unwrap();
            Tree(base)
        }

        fn root(&self) -> OwnedFd {
            Root::open(&self.0.join("root")).unwrap().dir
        }
    }

    impl Drop for Tree {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn read(fd: OwnedFd) -> String {
        std::io::read_to_string(File::from(fd)).unwrap()
    }

    /// Runs `resolver` over the cases every resolver must agree on.
    fn inside_allowed_outside_refused(
        resolver: impl Fn(RawFd, &CString, i32) -> io::Result<OwnedFd>,
        dir: RawFd,
    ) {
        let open = |p: &str| resolver(dir, &CString::new(p).unwrap(), libc::O_RDONLY);
        for inside in ["sub/../x", "./sub/./../sub/../x", "sub//..//x"] {
            assert_eq!(read(open(inside).unwrap()), "x", "{inside}");
        }
        assert_eq!(read(open("sub/../sub/y").unwrap()), "y");
        for outside in ["../secret", "sub/../../secret", "sub/../../root/x", ".."] {
            let err = open(outside).unwrap_err();
            assert_eq!(
                Denied::from_os(err),
                Denied::OutsideRoot,
                "{outside} must stay refused"
            );
        }
    }

    #[test]
    fn the_fallback_walk_applies_dot_dot_without_leaving_the_root() {
        let tree = Tree::new("walk");
        let root = tree.root();
        inside_allowed_outside_refused(walk_nofollow, root.as_raw_fd());
    }

    #[test]
    fn openat2_allows_dot_dot_that_stays_inside() {
        let tree = Tree::new("openat2");
        let root = tree.root();
        let probe = openat2_beneath(root.as_raw_fd(), &CString::new("x").unwrap(), 0);
        if matches!(
            probe.as_ref().map_err(|e| e.raw_os_error()),
            Err(Some(libc::ENOSYS | libc::EPERM))
        ) {
            eprintln!("SKIP openat2 is unavailable here; the fallback is tested on its own");
            return;
        }
        inside_allowed_outside_refused(openat2_beneath, root.as_raw_fd());
    }

    #[test]
    fn a_listing_stops_reading_at_its_cap() {
        let tree = Tree::new("cap");
        let many = tree.0.join("root/many");
        std::fs::create_dir(&many).unwrap();
        for i in 0..20_000 {
            std::fs::write(many.join(format!("f{i}")), b"").unwrap();
        }
        let dir = File::open(&many).unwrap();
        let all = ListCap {
            entries: usize::MAX / 4,
            bytes: usize::MAX,
        };
        let few = ListCap {
            entries: 10,
            bytes: usize::MAX,
        };
        let (listed, more) = list(&dir, all).unwrap();
        assert_eq!((listed.len(), more), (20_000, false));
        let (listed, more) = list(&dir, few).unwrap();
        assert_eq!((listed.len(), more), (10, true));
        let (listed, more) = list(
            &dir,
            ListCap {
                entries: 100,
                bytes: 50,
            },
        )
        .unwrap();
        let bytes: usize = listed.iter().map(|l| l.line().len()).sum();
        assert!(more && bytes <= 50 && bytes > 40, "{bytes} bytes");
        // Reading on past the cap (to count what is left out) costs a readdir and a stat per
        // entry: a capped listing of 20 000 entries then costs as much as the whole listing.
        let fastest = |cap: ListCap| {
            (0..3)
                .map(|_| {
                    let t = std::time::Instant::now();
                    list(&dir, cap).unwrap();
                    t.elapsed()
                })
                .min()
                .unwrap()
        };
        let (whole, capped) = (fastest(all), fastest(few));
        eprintln!("20 000 entries: whole listing {whole:?}, capped at 10 {capped:?}");
        assert!(
            capped * 10 < whole,
            "a capped listing took {capped:?}, the whole one {whole:?}"
        );
    }

    #[test]
    fn absolute_paths_are_refused_before_any_lookup() {
        let tree = Tree::new("abs");
        let root = Root::open(&tree.0.join("root")).unwrap();
        let path = tree.0.join("secret");
        let denied = root.open_beneath(path.to_str().unwrap(), Want::File);
        assert_eq!(denied.unwrap_err(), Denied::OutsideRoot);
        assert_eq!(
            root.open_beneath("sub/../x", Want::File)
                .map(|f| f.metadata().unwrap().len()),
            Ok(1)
        );
        assert_eq!(
            root.open_beneath("sub/../../secret", Want::File)
                .unwrap_err(),
            Denied::OutsideRoot
        );
    }
}
