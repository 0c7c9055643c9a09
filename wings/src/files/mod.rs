//! Every file wings touches inside a server's folder goes through this module: the HTTP file
//! manager, SFTP, archives, backups and blueprint config edits.
//!
//! Architecture invariant: a path from a request, a blueprint or an archive is never joined to
//! the root as a string and then opened. It is resolved by the kernel beneath an open handle
//! of the root (`openat2` with `RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS`), so `..`, absolute
//! paths and symlinks that point outside fail with `EXDEV` whatever races the container runs.
//! Operations on a last component (remove, rename, chmod, set times, readlink) work on a
//! handle of its parent folder with `*at` calls that never follow that component.
//!
//! Quota: every byte a [`ServerFs`] adds or frees moves one counter, so a write is refused the
//! moment it would pass the limit without walking the tree. A periodic walk
//! ([`ServerFs::recount`]) corrects the counter for what the container wrote from inside.

pub mod archive;
mod jail;
pub mod pull;
pub mod stream;
mod tree_writer;
mod walk;

use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use rustix::fs::{AtFlags, Mode, OFlags};

pub use self::tree_writer::TreeWriter;
pub use self::walk::{WalkEntry, Walker};

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("path {0:?} is not allowed")]
    BadPath(String),
    #[error("path {0:?} leaves the server root")]
    Escape(String),
    #[error("{0:?} is a symbolic link")]
    Symlink(String),
    #[error("{0:?} does not exist")]
    NotFound(String),
    #[error("{0:?} already exists")]
    Exists(String),
    #[error("{0:?} is not a regular file")]
    NotAFile(String),
    #[error("{0:?} is not a folder")]
    NotADirectory(String),
    #[error("{0:?} is a folder")]
    IsADirectory(String),
    #[error("{0:?} is a folder that is not empty")]
    NotEmpty(String),
    #[error("{0:?} is protected by the blueprint's file denylist")]
    Denied(String),
    #[error("{path:?} is larger than {limit} bytes")]
    TooLarge { path: String, limit: u64 },
    #[error("the disk quota of {limit} bytes would be exceeded ({used} bytes used)")]
    QuotaExceeded { limit: u64, used: u64 },
    #[error("{path:?}: {source}")]
    Io { path: String, source: io::Error },
}

impl FsError {
    fn from_errno(path: &str, e: rustix::io::Errno) -> FsError {
        use rustix::io::Errno;
        let path = path.to_string();
        match e {
            Errno::XDEV => FsError::Escape(path),
            Errno::LOOP => FsError::Symlink(path),
            Errno::NOENT => FsError::NotFound(path),
            Errno::EXIST => FsError::Exists(path),
            Errno::NOTDIR => FsError::NotADirectory(path),
            Errno::ISDIR => FsError::IsADirectory(path),
            Errno::NOTEMPTY => FsError::NotEmpty(path),
            Errno::NAMETOOLONG | Errno::INVAL => FsError::BadPath(path),
            e => FsError::Io {
                path,
                source: e.into(),
            },
        }
    }

    fn from_io(path: &str, e: io::Error) -> FsError {
        match e.raw_os_error() {
            Some(raw) => FsError::from_errno(path, rustix::io::Errno::from_raw_os_error(raw)),
            None => FsError::Io {
                path: path.into(),
                source: e,
            },
        }
    }
}

impl From<FsError> for io::Error {
    fn from(e: FsError) -> io::Error {
        let kind = match &e {
            FsError::BadPath(_) | FsError::Escape(_) | FsError::Symlink(_) => io::ErrorKind::InvalidInput,
            FsError::NotFound(_) => io::ErrorKind::NotFound,
            FsError::Exists(_) => io::ErrorKind::AlreadyExists,
            FsError::NotAFile(_) => io::ErrorKind::InvalidInput,
            FsError::NotADirectory(_) => io::ErrorKind::NotADirectory,
            FsError::IsADirectory(_) => io::ErrorKind::IsADirectory,
            FsError::NotEmpty(_) => io::ErrorKind::DirectoryNotEmpty,
            FsError::Denied(_) => io::ErrorKind::PermissionDenied,
            FsError::TooLarge { .. } => io::ErrorKind::FileTooLarge,
            FsError::QuotaExceeded { .. } => io::ErrorKind::QuotaExceeded,
            FsError::Io { source, .. } => source.kind(),
        };
        io::Error::new(kind, e)
    }
}

pub type FsResult<T> = Result<T, FsError>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryKind {
    File,
    Directory,
    Symlink,
    Other,
}

impl EntryKind {
    fn from_mode(mode: u32) -> EntryKind {
        match rustix::fs::FileType::from_raw_mode(mode) {
            rustix::fs::FileType::RegularFile => EntryKind::File,
            rustix::fs::FileType::Directory => EntryKind::Directory,
            rustix::fs::FileType::Symlink => EntryKind::Symlink,
            _ => EntryKind::Other,
        }
    }
}

/// Allocated blocks beyond a file's size up to this much are filesystem rounding, not
/// hidden usage.
const PREALLOCATION_SLACK: u64 = 1024 * 1024;

/// What `stat` says about one file, folder or link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metadata {
    pub kind: EntryKind,
    pub size: u64,
    /// Permission bits (`0o644`).
    pub mode: u32,
    /// Unix seconds.
    pub modified: i64,
    pub accessed: i64,
    pub uid: u32,
    pub gid: u32,
    pub(crate) nlink: u64,
    pub(crate) dev: u64,
    pub(crate) ino: u64,
    /// Bytes this entry counts for the quota: a file's size (so a sparse file counts in
    /// full), or its allocated blocks when those are far larger (space preallocated beyond
    /// the end with `fallocate --keep-size`). Folders and links count nothing: writes through
    /// wings count bytes, and the walk must agree with them.
    pub(crate) usage: u64,
}

impl Metadata {
    fn from_stat(st: &rustix::fs::Stat) -> Metadata {
        let kind = EntryKind::from_mode(st.st_mode);
        let size = u64::try_from(st.st_size).unwrap_or(0);
        let blocks = u64::try_from(st.st_blocks).unwrap_or(0).saturating_mul(512);
        Metadata {
            kind,
            size,
            mode: st.st_mode & 0o7777,
            modified: st.st_mtime,
            accessed: st.st_atime,
            uid: st.st_uid,
            gid: st.st_gid,
            #[allow(clippy::useless_conversion, reason = "nlink is u32 on some targets")]
            nlink: u64::from(st.st_nlink),
            dev: st.st_dev,
            ino: st.st_ino,
            usage: match kind {
                EntryKind::File if blocks > size.saturating_add(PREALLOCATION_SLACK) => blocks,
                EntryKind::File => size,
                _ => 0,
            },
        }
    }

    pub fn is_dir(&self) -> bool {
        self.kind == EntryKind::Directory
    }

    pub fn is_file(&self) -> bool {
        self.kind == EntryKind::File
    }
}

/// One entry of a folder, as the file manager shows it. Symlinks are reported, never followed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    pub kind: EntryKind,
    pub size: u64,
    pub mode: u32,
    pub modified: i64,
    pub symlink_target: Option<String>,
}

/// One page of a folder listing: directories first, then by name.
#[derive(Debug, Clone)]
pub struct ListPage {
    pub entries: Vec<Entry>,
    /// Entries in the whole folder.
    pub total: usize,
}

/// How [`ServerFs::open`] opens a file. `create` without `exclusive` opens an existing file.
#[derive(Debug, Clone, Copy, Default)]
pub struct OpenOptions {
    pub read: bool,
    pub write: bool,
    pub append: bool,
    pub create: bool,
    pub truncate: bool,
    pub exclusive: bool,
    /// Permission bits of a created file; 0 means 0o644.
    pub mode: u32,
}

impl OpenOptions {
    pub fn read() -> OpenOptions {
        OpenOptions {
            read: true,
            ..OpenOptions::default()
        }
    }

    /// Write, creating or truncating: what "save this file" means.
    pub fn replace() -> OpenOptions {
        OpenOptions {
            write: true,
            create: true,
            truncate: true,
            ..OpenOptions::default()
        }
    }
}

/// Size and free space of a server's disk, in bytes, with the filesystem's inode counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpace {
    pub size: u64,
    pub free: u64,
    pub inodes: u64,
    pub inodes_free: u64,
    pub fs_id: u64,
    pub name_max: u64,
}

/// The disk quota of one server: a limit and a running count of the bytes used.
#[derive(Debug)]
pub struct Quota {
    limit: AtomicU64,
    used: AtomicU64,
    /// Set once the first walk has counted what was already there.
    counted: AtomicBool,
}

impl Quota {
    fn new(limit: u64) -> Quota {
        Quota {
            limit: AtomicU64::new(limit),
            used: AtomicU64::new(0),
            counted: AtomicBool::new(false),
        }
    }

    /// Takes `bytes` from what is left, or refuses without taking anything.
    fn reserve(&self, bytes: u64) -> FsResult<()> {
        if bytes == 0 {
            return Ok(());
        }
        let limit = self.limit.load(Ordering::SeqCst);
        self.used
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |used| {
                used.checked_add(bytes).filter(|total| *total <= limit)
            })
            .map(|_| ())
            .map_err(|used| FsError::QuotaExceeded { limit, used })
    }

    fn release(&self, bytes: u64) {
        if bytes == 0 {
            return;
        }
        let _ = self
            .used
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |used| {
                Some(used.saturating_sub(bytes))
            });
    }
}

struct Inner {
    dir: OwnedFd,
    /// The root's canonical path, to turn `/proc/self/fd` links back into server paths.
    root_path: PathBuf,
    uid: u32,
    gid: u32,
    quota: Quota,
    denylist: RwLock<Denylist>,
}

/// One server's files: every operation resolves beneath the root handle, counts against the
/// quota and checks the blueprint's denylist on the path it actually reached.
///
/// All methods block; call them from `spawn_blocking` (or a blocking thread) in async code.
/// Paths are relative to the server root, `/`-separated; `""` and `"."` are the root itself.
/// Cloning is cheap and shares the handle, the quota and the denylist.
#[derive(Clone)]
pub struct ServerFs {
    inner: Arc<Inner>,
    enforce_denylist: bool,
}

impl std::fmt::Debug for ServerFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerFs")
            .field("root", &self.inner.root_path)
            .field("enforce_denylist", &self.enforce_denylist)
            .finish()
    }
}

/// The blueprint's file denylist as globs over resolved server paths. A pattern also covers
/// everything below it.
#[derive(Debug, Default)]
struct Denylist {
    set: globset::GlobSet,
    /// Literal leading folders of each pattern, to refuse removing or moving a folder that
    /// holds a denied path.
    prefixes: Vec<String>,
}

impl Denylist {
    fn build(patterns: &[String]) -> Denylist {
        let mut builder = globset::GlobSetBuilder::new();
        let mut prefixes = Vec::new();
        for pattern in patterns {
            let pattern = pattern.trim_matches('/');
            if pattern.is_empty() {
                continue;
            }
            for glob in [pattern.to_string(), format!("{pattern}/**")] {
                match globset::GlobBuilder::new(&glob).literal_separator(true).build() {
                    Ok(g) => {
                        builder.add(g);
                    }
                    Err(e) => tracing::warn!("file_denylist pattern {pattern:?} ignored: {e}"),
                }
            }
            let literal: Vec<&str> = pattern
                .split('/')
                .take_while(|c| !c.contains(['*', '?', '[', '{']))
                .collect();
            prefixes.push(literal.join("/"));
        }
        Denylist {
            set: builder.build().unwrap_or_default(),
            prefixes,
        }
    }

    fn is_empty(&self) -> bool {
        self.set.is_empty()
    }

    fn denies(&self, rel: &str) -> bool {
        !self.is_empty() && self.set.is_match(rel)
    }

    /// Whether `rel` is denied or is a folder that holds a denied path.
    fn denies_within(&self, rel: &str) -> bool {
        if self.denies(rel) {
            return true;
        }
        self.prefixes
            .iter()
            .any(|p| rel == "." || p.is_empty() || p.starts_with(&format!("{rel}/")))
    }
}

/// Checks a server path and returns it in the form handed to the kernel. Refuses absolute
/// paths, `..` components, backslashes, NUL bytes and over-long names up front; the kernel's
/// resolution beneath the root is what makes the rest safe.
pub fn clean_path(rel: &str) -> FsResult<&str> {
    let bad = || Err(FsError::BadPath(rel.into()));
    let trimmed = rel.trim_end_matches('/');
    if trimmed.is_empty() || trimmed == "." {
        return if rel.starts_with('/') { bad() } else { Ok(".") };
    }
    if trimmed.starts_with('/') || trimmed.contains(['\0', '\\']) || trimmed.len() > 4096 {
        return bad();
    }
    if trimmed.split('/').any(|c| c == ".." || c.len() > 255) {
        return bad();
    }
    Ok(trimmed)
}

/// Splits a cleaned path into its parent folder and last component.
fn split_parent(rel: &str) -> FsResult<(&str, &str)> {
    let (parent, name) = rel.rsplit_once('/').unwrap_or((".", rel));
    if name.is_empty() || name == "." || name == ".." {
        return Err(FsError::BadPath(rel.into()));
    }
    Ok((if parent.is_empty() { "." } else { parent }, name))
}

fn join(parent: &str, name: &str) -> String {
    if parent == "." || parent.is_empty() {
        name.to_string()
    } else {
        format!("{parent}/{name}")
    }
}

impl ServerFs {
    /// Opens the server root `root`, which wings itself created. `uid`/`gid` own new files;
    /// `limit_bytes` is the disk quota.
    pub fn open_root(
        root: &Path,
        uid: u32,
        gid: u32,
        limit_bytes: u64,
        denylist: &[String],
    ) -> io::Result<ServerFs> {
        let dir = rustix::fs::open(
            root,
            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let root_path = std::fs::canonicalize(root)?;
        Ok(ServerFs {
            inner: Arc::new(Inner {
                dir,
                root_path,
                uid,
                gid,
                quota: Quota::new(limit_bytes),
                denylist: RwLock::new(Denylist::build(denylist)),
            }),
            enforce_denylist: true,
        })
    }

    /// The same files without the blueprint's denylist, for wings' own work (config edits,
    /// backups and restores), never for what a user asks.
    pub fn trusted(&self) -> ServerFs {
        ServerFs {
            inner: self.inner.clone(),
            enforce_denylist: false,
        }
    }

    pub fn root_path(&self) -> &Path {
        &self.inner.root_path
    }

    pub fn set_denylist(&self, patterns: &[String]) {
        *self.inner.denylist.write().unwrap_or_else(|p| p.into_inner()) = Denylist::build(patterns);
    }

    pub fn set_limit(&self, limit_bytes: u64) {
        self.inner.quota.limit.store(limit_bytes, Ordering::SeqCst);
    }

    pub fn limit_bytes(&self) -> u64 {
        self.inner.quota.limit.load(Ordering::SeqCst)
    }

    /// Bytes used as last counted (incrementally, corrected by every [`ServerFs::recount`]).
    pub fn used_bytes(&self) -> u64 {
        self.inner.quota.used.load(Ordering::SeqCst)
    }

    pub fn over_quota(&self) -> bool {
        self.used_bytes() > self.limit_bytes()
    }

    /// The server's disk as `df` should show it: the quota as the size (the filesystem's
    /// size when that is smaller), and what is left of the quota (or of the filesystem, when
    /// it has less left).
    pub fn disk_space(&self) -> FsResult<DiskSpace> {
        let st = rustix::fs::fstatvfs(self.dir()).map_err(|e| FsError::from_errno(".", e))?;
        let fs_size = st.f_blocks.saturating_mul(st.f_frsize);
        let fs_free = st.f_bavail.saturating_mul(st.f_frsize);
        let limit = self.limit_bytes();
        Ok(DiskSpace {
            size: limit.min(fs_size),
            free: limit.saturating_sub(self.used_bytes()).min(fs_free),
            inodes: st.f_files,
            inodes_free: st.f_favail,
            fs_id: st.f_fsid,
            name_max: st.f_namemax,
        })
    }

    /// Walks the whole tree and sets the counter to what is really there, counting hard
    /// links once. Returns the bytes used.
    pub fn recount(&self) -> FsResult<u64> {
        let total = walk::usage(self)?;
        self.inner.quota.used.store(total, Ordering::SeqCst);
        self.inner.quota.counted.store(true, Ordering::SeqCst);
        Ok(total)
    }

    fn reserve(&self, bytes: u64) -> FsResult<()> {
        if bytes > 0 && !self.inner.quota.counted.load(Ordering::SeqCst) {
            self.recount()?;
        }
        self.inner.quota.reserve(bytes)
    }

    fn release(&self, bytes: u64) {
        self.inner.quota.release(bytes);
    }

    fn dir(&self) -> &OwnedFd {
        &self.inner.dir
    }

    /// Whether the denylist covers `rel` (as given; resolved paths are checked by each
    /// operation).
    pub fn is_denied(&self, rel: &str) -> bool {
        self.enforce_denylist && self.denylist().denies(rel)
    }

    fn denylist(&self) -> std::sync::RwLockReadGuard<'_, Denylist> {
        self.inner.denylist.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Refuses `rel` if the denylist covers it (or, with `within`, anything below it), both as
    /// requested and as resolved through `fd` (the object itself or its parent folder).
    fn check_denied(
        &self,
        rel: &str,
        resolved: Option<(&OwnedFd, Option<&str>)>,
        within: bool,
    ) -> FsResult<()> {
        if !self.enforce_denylist {
            return Ok(());
        }
        let list = self.denylist();
        if list.is_empty() {
            return Ok(());
        }
        let test = |p: &str| {
            if within {
                list.denies_within(p)
            } else {
                list.denies(p)
            }
        };
        if test(rel) {
            return Err(FsError::Denied(rel.into()));
        }
        if let Some((fd, name)) = resolved {
            let path = self
                .resolved_path(fd)
                .ok_or_else(|| FsError::Denied(rel.into()))?;
            let path = match name {
                Some(name) => join(&path, name),
                None => path,
            };
            if test(&path) {
                return Err(FsError::Denied(rel.into()));
            }
        }
        Ok(())
    }

    /// A missing file in a denied folder reached through a link is "denied", not "not found",
    /// so the denylist answers the same whether the file exists or not.
    fn denied_or(&self, rel: &str, e: FsError) -> FsError {
        if !matches!(e, FsError::NotFound(_)) || !self.enforce_denylist || self.denylist().is_empty() {
            return e;
        }
        match self.parent_of(rel) {
            Ok((parent, name)) => match self.check_denied(rel, Some((&parent, Some(name))), false) {
                Err(denied) => denied,
                Ok(()) => e,
            },
            Err(_) => e,
        }
    }

    /// The server path an open handle really refers to.
    fn resolved_path(&self, fd: &OwnedFd) -> Option<String> {
        use std::os::fd::AsRawFd;
        let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).ok()?;
        let rel = link.strip_prefix(&self.inner.root_path).ok()?;
        let rel = rel.to_str()?;
        Some(if rel.is_empty() { ".".into() } else { rel.into() })
    }

    fn open_beneath(&self, rel: &str, flags: OFlags, mode: Mode) -> FsResult<OwnedFd> {
        jail::open_beneath(self.dir(), rel, flags, mode).map_err(|e| FsError::from_errno(rel, e))
    }

    /// The folder holding `rel`'s last component, resolved beneath the root, and that
    /// component. The component is a single name, so `*at` calls with `NOFOLLOW` on it
    /// cannot be redirected.
    fn parent_of<'a>(&self, rel: &'a str) -> FsResult<(OwnedFd, &'a str)> {
        let (parent, name) = split_parent(rel)?;
        let fd = self.open_beneath(parent, OFlags::DIRECTORY | OFlags::RDONLY, Mode::empty())?;
        Ok((fd, name))
    }

    fn chown_at(&self, parent: &OwnedFd, name: &str) -> rustix::io::Result<()> {
        rustix::fs::chownat(
            parent,
            name,
            Some(rustix::fs::Uid::from_raw(self.inner.uid)),
            Some(rustix::fs::Gid::from_raw(self.inner.gid)),
            AtFlags::SYMLINK_NOFOLLOW,
        )
    }

    // ---- reading ----------------------------------------------------------------------

    /// Metadata of `rel` itself (a symlink is described, not followed).
    pub fn lstat(&self, rel: &str) -> FsResult<Metadata> {
        let rel = clean_path(rel)?;
        if rel == "." {
            return self.stat(rel);
        }
        let (parent, name) = self.parent_of(rel)?;
        let st = rustix::fs::statat(&parent, name, AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| FsError::from_errno(rel, e))?;
        Ok(Metadata::from_stat(&st))
    }

    /// Metadata of what `rel` leads to, following symlinks that stay inside the root.
    pub fn stat(&self, rel: &str) -> FsResult<Metadata> {
        let rel = clean_path(rel)?;
        let fd = self.open_beneath(rel, OFlags::PATH, Mode::empty())?;
        let st = rustix::fs::fstat(&fd).map_err(|e| FsError::from_errno(rel, e))?;
        Ok(Metadata::from_stat(&st))
    }

    /// Opens a regular file for reading (symlinks inside the root are followed).
    pub fn open_read(&self, rel: &str) -> FsResult<(File, Metadata)> {
        let rel = clean_path(rel)?;
        self.check_denied(rel, None, false)?;
        let fd = self
            .open_beneath(rel, OFlags::RDONLY | OFlags::NONBLOCK, Mode::empty())
            .map_err(|e| self.denied_or(rel, e))?;
        self.check_denied(rel, Some((&fd, None)), false)?;
        let st = rustix::fs::fstat(&fd).map_err(|e| FsError::from_errno(rel, e))?;
        let meta = Metadata::from_stat(&st);
        if meta.kind != EntryKind::File {
            return Err(FsError::NotAFile(rel.into()));
        }
        Ok((File::from(fd), meta))
    }

    /// Reads a whole regular file, refusing anything larger than `limit` bytes.
    pub fn read_file(&self, rel: &str, limit: u64) -> FsResult<Vec<u8>> {
        let (file, meta) = self.open_read(rel)?;
        let too_large = || FsError::TooLarge {
            path: rel.into(),
            limit,
        };
        if meta.size > limit {
            return Err(too_large());
        }
        let mut data = Vec::new();
        file.take(limit + 1)
            .read_to_end(&mut data)
            .map_err(|e| FsError::from_io(rel, e))?;
        if data.len() as u64 > limit {
            return Err(too_large());
        }
        Ok(data)
    }

    /// Where the symlink `rel` points, as written in the link.
    pub fn read_link(&self, rel: &str) -> FsResult<String> {
        let rel = clean_path(rel)?;
        let (parent, name) = self.parent_of(rel)?;
        let target = rustix::fs::readlinkat(&parent, name, Vec::new()).map_err(|e| match e {
            rustix::io::Errno::INVAL => FsError::BadPath(format!("{rel} is not a symbolic link")),
            e => FsError::from_errno(rel, e),
        })?;
        Ok(target.to_string_lossy().into_owned())
    }

    /// Every entry name of a folder with its type from the directory itself (no stat).
    fn read_names(&self, rel: &str, dir: &OwnedFd) -> FsResult<Vec<(CString, EntryKind)>> {
        let err = |e| FsError::from_errno(rel, e);
        let mut names = Vec::new();
        for item in rustix::fs::Dir::read_from(dir).map_err(err)? {
            let item = item.map_err(err)?;
            let name = item.file_name();
            if name == c"." || name == c".." {
                continue;
            }
            let kind = match item.file_type() {
                rustix::fs::FileType::Unknown => rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)
                    .map(|st| EntryKind::from_mode(st.st_mode))
                    .unwrap_or(EntryKind::Other),
                t => EntryKind::from_mode(t.as_raw_mode()),
            };
            names.push((name.to_owned(), kind));
        }
        Ok(names)
    }

    /// One page of a folder: folders first, then by name; `offset` entries are skipped and at
    /// most `limit` returned. Only the returned entries are stat'ed, so large folders are
    /// cheap to page through.
    pub fn list(&self, rel: &str, offset: usize, limit: usize) -> FsResult<ListPage> {
        let rel = clean_path(rel)?;
        let dir = self.open_beneath(rel, OFlags::DIRECTORY | OFlags::RDONLY, Mode::empty())?;
        let mut names = self.read_names(rel, &dir)?;
        names.sort_unstable_by(|(a, ak), (b, bk)| {
            (*ak != EntryKind::Directory)
                .cmp(&(*bk != EntryKind::Directory))
                .then_with(|| a.cmp(b))
        });
        let total = names.len();
        let mut entries = Vec::with_capacity(limit.min(total.saturating_sub(offset)));
        for (name, _) in names.into_iter().skip(offset).take(limit) {
            let st = match rustix::fs::statat(&dir, &name, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) => st,
                Err(rustix::io::Errno::NOENT) => continue,
                Err(e) => return Err(FsError::from_errno(rel, e)),
            };
            let meta = Metadata::from_stat(&st);
            let symlink_target = (meta.kind == EntryKind::Symlink)
                .then(|| rustix::fs::readlinkat(&dir, &name, Vec::new()).ok())
                .flatten()
                .map(|t| t.to_string_lossy().into_owned());
            entries.push(Entry {
                name: name.to_string_lossy().into_owned(),
                kind: meta.kind,
                size: meta.size,
                mode: meta.mode,
                modified: meta.modified,
                symlink_target,
            });
        }
        Ok(ListPage { entries, total })
    }

    /// Walks `rel` depth-first (a folder before its contents), never following symlinks.
    pub fn walk(&self, rel: &str) -> FsResult<Walker> {
        let rel = clean_path(rel)?;
        let dir = self.open_beneath(rel, OFlags::DIRECTORY | OFlags::RDONLY, Mode::empty())?;
        Walker::new(self.clone(), rel, dir)
    }

    // ---- writing ----------------------------------------------------------------------

    /// Opens (and with `create`, makes) a file. Symlinks inside the root are followed; the
    /// denylist is checked on the file reached. Only regular files are opened.
    pub fn open(&self, rel: &str, opts: &OpenOptions) -> FsResult<FsFile> {
        let rel = clean_path(rel)?;
        let writes = opts.write || opts.append || opts.truncate;
        self.check_denied(rel, None, false)?;
        let mut flags = match (opts.read, writes) {
            (true, true) => OFlags::RDWR,
            (false, true) => OFlags::WRONLY,
            _ => OFlags::RDONLY,
        } | OFlags::NONBLOCK;
        if opts.append {
            flags |= OFlags::APPEND;
        }
        let mode = Mode::from_raw_mode(if opts.mode == 0 { 0o644 } else { opts.mode & 0o777 });
        let mut created = false;
        let fd = if opts.create || opts.exclusive {
            let (parent, name) = self.parent_of(rel)?;
            self.check_denied(rel, Some((&parent, Some(name))), false)?;
            match self.open_beneath(rel, flags | OFlags::CREATE | OFlags::EXCL, mode) {
                Ok(fd) => {
                    created = true;
                    let _ = rustix::fs::fchown(
                        &fd,
                        Some(rustix::fs::Uid::from_raw(self.inner.uid)),
                        Some(rustix::fs::Gid::from_raw(self.inner.gid)),
                    );
                    fd
                }
                Err(FsError::Exists(_)) if !opts.exclusive => self.open_beneath(rel, flags, Mode::empty())?,
                Err(e) => return Err(e),
            }
        } else {
            self.open_beneath(rel, flags, Mode::empty())?
        };
        if !created {
            self.check_denied(rel, Some((&fd, None)), false)?;
        }
        let st = rustix::fs::fstat(&fd).map_err(|e| FsError::from_errno(rel, e))?;
        if EntryKind::from_mode(st.st_mode) != EntryKind::File {
            return Err(FsError::NotAFile(rel.into()));
        }
        let file = FsFile {
            file: File::from(fd),
            fs: self.clone(),
            path: rel.to_string(),
            append: opts.append,
            writable: writes,
            resize: std::sync::Mutex::new(()),
        };
        if opts.truncate && st.st_size > 0 {
            file.set_len(0)?;
        }
        Ok(file)
    }

    /// Replaces (or creates) a file atomically: a temporary file in the same folder, fsynced,
    /// then renamed over the target. The target's parent must already exist.
    pub fn write_file_atomic(&self, rel: &str, data: &[u8]) -> FsResult<()> {
        let rel = clean_path(rel)?;
        let (parent, name) = self.parent_of(rel)?;
        self.check_denied(rel, Some((&parent, Some(name))), false)?;
        let old = rustix::fs::statat(&parent, name, AtFlags::SYMLINK_NOFOLLOW)
            .ok()
            .map(|st| Metadata::from_stat(&st))
            .filter(|m| m.kind == EntryKind::File && m.nlink == 1)
            .map_or(0, |m| m.usage);
        let len = data.len() as u64;
        self.reserve(len)?;
        let io_err = |e: io::Error| FsError::from_io(rel, e);
        let tmp = format!(".{name}.mamba-tmp");
        let _ = rustix::fs::unlinkat(&parent, tmp.as_str(), AtFlags::empty());
        let written = (|| -> FsResult<()> {
            // The parent was resolved beneath the root; the leaf names are single
            // components, so O_NOFOLLOW on them is enough.
            let fd = rustix::fs::openat(
                &parent,
                tmp.as_str(),
                OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o644),
            )
            .map_err(|e| FsError::from_errno(rel, e))?;
            self.chown_at(&parent, &tmp)
                .map_err(|e| FsError::from_errno(rel, e))?;
            let mut file = File::from(fd);
            file.write_all(data)
                .and_then(|()| file.sync_all())
                .map_err(io_err)?;
            rustix::fs::renameat(&parent, tmp.as_str(), &parent, name)
                .map_err(|e| FsError::from_errno(rel, e))?;
            rustix::fs::fsync(&parent).map_err(|e| FsError::from_errno(rel, e))
        })();
        match written {
            Ok(()) => {
                self.release(old);
                Ok(())
            }
            Err(e) => {
                let _ = rustix::fs::unlinkat(&parent, tmp.as_str(), AtFlags::empty());
                self.release(len);
                Err(e)
            }
        }
    }

    /// Makes a folder; its parent must exist.
    pub fn create_dir(&self, rel: &str) -> FsResult<()> {
        let rel = clean_path(rel)?;
        let (parent, name) = self.parent_of(rel)?;
        self.check_denied(rel, Some((&parent, Some(name))), false)?;
        let err = |e| FsError::from_errno(rel, e);
        rustix::fs::mkdirat(&parent, name, Mode::from_raw_mode(0o755)).map_err(err)?;
        self.chown_at(&parent, name).map_err(err)
    }

    /// Makes a folder and any missing parents, component by component by handle; an existing
    /// folder is fine, a symlink on the way is refused.
    pub fn create_dir_all(&self, rel: &str) -> FsResult<()> {
        let rel = clean_path(rel)?;
        if rel == "." {
            return Ok(());
        }
        self.check_denied(rel, None, false)?;
        let err = |e| FsError::from_errno(rel, e);
        let mut dir = rustix::fs::openat(
            self.dir(),
            ".",
            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(err)?;
        for component in rel.split('/').filter(|c| !c.is_empty() && *c != ".") {
            match rustix::fs::mkdirat(&dir, component, Mode::from_raw_mode(0o755)) {
                Ok(()) => self.chown_at(&dir, component).map_err(err)?,
                Err(rustix::io::Errno::EXIST) => {}
                Err(e) => return Err(err(e)),
            }
            dir = rustix::fs::openat(
                &dir,
                component,
                OFlags::DIRECTORY | OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| {
                // O_DIRECTORY | O_NOFOLLOW on a symlink fails with ENOTDIR: say what it is.
                let link = rustix::fs::statat(&dir, component, AtFlags::SYMLINK_NOFOLLOW)
                    .is_ok_and(|st| EntryKind::from_mode(st.st_mode) == EntryKind::Symlink);
                if link {
                    FsError::Symlink(rel.into())
                } else {
                    err(e)
                }
            })?;
        }
        Ok(())
    }

    /// Removes a file, a symlink (never its target) or a whole folder, descending by handle.
    /// Returns the bytes freed.
    pub fn remove(&self, rel: &str) -> FsResult<u64> {
        let rel = clean_path(rel)?;
        let (parent, name) = self.parent_of(rel)?;
        self.check_denied(rel, Some((&parent, Some(name))), true)?;
        let name = CString::new(name).map_err(|_| FsError::BadPath(rel.into()))?;
        let mut freed = 0;
        let result = jail::remove_at(&parent, &name, &mut freed);
        self.release(freed);
        result.map_err(|e| FsError::from_errno(rel, e))?;
        Ok(freed)
    }

    /// Removes a file or symlink, never a folder (SFTP `remove`).
    pub fn remove_file(&self, rel: &str) -> FsResult<()> {
        let rel = clean_path(rel)?;
        let (parent, name) = self.parent_of(rel)?;
        self.check_denied(rel, Some((&parent, Some(name))), false)?;
        let freed = jail::usage_at(&parent, name);
        rustix::fs::unlinkat(&parent, name, AtFlags::empty()).map_err(|e| FsError::from_errno(rel, e))?;
        self.release(freed);
        Ok(())
    }

    /// Removes an empty folder (SFTP `rmdir`).
    pub fn remove_dir(&self, rel: &str) -> FsResult<()> {
        let rel = clean_path(rel)?;
        let (parent, name) = self.parent_of(rel)?;
        self.check_denied(rel, Some((&parent, Some(name))), false)?;
        let freed = jail::usage_at(&parent, name);
        rustix::fs::unlinkat(&parent, name, AtFlags::REMOVEDIR).map_err(|e| FsError::from_errno(rel, e))?;
        self.release(freed);
        Ok(())
    }

    /// Renames within the server root. With `replace` an existing file (or empty folder) at
    /// `to` is replaced; without it, an existing target is refused.
    pub fn rename(&self, from: &str, to: &str, replace: bool) -> FsResult<()> {
        let from = clean_path(from)?;
        let to = clean_path(to)?;
        let (from_parent, from_name) = self.parent_of(from)?;
        let (to_parent, to_name) = self.parent_of(to)?;
        self.check_denied(from, Some((&from_parent, Some(from_name))), true)?;
        self.check_denied(to, Some((&to_parent, Some(to_name))), true)?;
        let flags = if replace {
            rustix::fs::RenameFlags::empty()
        } else {
            rustix::fs::RenameFlags::NOREPLACE
        };
        let replaced = if replace {
            rustix::fs::statat(&to_parent, to_name, AtFlags::SYMLINK_NOFOLLOW)
                .ok()
                .map(|st| Metadata::from_stat(&st))
                .filter(|m| m.kind != EntryKind::Directory && m.nlink == 1)
                .map_or(0, |m| m.usage)
        } else {
            0
        };
        rustix::fs::renameat_with(&from_parent, from_name, &to_parent, to_name, flags).map_err(
            |e| match e {
                rustix::io::Errno::EXIST => FsError::Exists(to.into()),
                e => FsError::from_errno(from, e),
            },
        )?;
        self.release(replaced);
        Ok(())
    }

    /// Copies a regular file to `to`, which must not exist. The copy's size is reserved
    /// against the quota before a byte is written.
    pub fn copy(&self, from: &str, to: &str) -> FsResult<()> {
        let (mut src, meta) = self.open_read(from)?;
        let mut dst = self.open(
            to,
            &OpenOptions {
                write: true,
                create: true,
                exclusive: true,
                mode: meta.mode,
                ..OpenOptions::default()
            },
        )?;
        let copied = (|| -> FsResult<()> {
            self.reserve(meta.size)?;
            let copied =
                io::copy(&mut (&mut src).take(meta.size), &mut dst.file).map_err(|e| FsError::from_io(to, e));
            let written = *copied.as_ref().unwrap_or(&0);
            self.release(meta.size.saturating_sub(written));
            copied.map(|_| ())
        })();
        if let Err(e) = copied {
            let _ = self.remove_file(&dst.path);
            dst.writable = false;
            return Err(e);
        }
        Ok(())
    }

    /// Sets permission bits (no setuid, setgid or sticky), never through a symlink.
    pub fn set_permissions(&self, rel: &str, mode: u32) -> FsResult<()> {
        let rel = clean_path(rel)?;
        if mode > 0o777 {
            return Err(FsError::BadPath(format!("{rel} (mode {mode:o})")));
        }
        // O_NOFOLLOW on the last component: a symlink there fails to open (ELOOP), so its
        // target is never changed; earlier components resolve beneath the root.
        let fd = self.open_beneath(
            rel,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK,
            Mode::empty(),
        )?;
        self.check_denied(rel, Some((&fd, None)), false)?;
        rustix::fs::fchmod(&fd, Mode::from_raw_mode(mode)).map_err(|e| FsError::from_errno(rel, e))
    }

    /// Sets access and modification times of `rel` itself (never a symlink's target).
    pub fn set_times(
        &self,
        rel: &str,
        accessed: Option<SystemTime>,
        modified: Option<SystemTime>,
    ) -> FsResult<()> {
        let rel = clean_path(rel)?;
        let (parent, name) = self.parent_of(rel)?;
        self.check_denied(rel, Some((&parent, Some(name))), false)?;
        let spec = |t: Option<SystemTime>| match t {
            None => rustix::fs::Timespec {
                tv_sec: 0,
                tv_nsec: rustix::fs::UTIME_OMIT,
            },
            Some(t) => {
                let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
                rustix::fs::Timespec {
                    tv_sec: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
                    tv_nsec: d.subsec_nanos().into(),
                }
            }
        };
        let times = rustix::fs::Timestamps {
            last_access: spec(accessed),
            last_modification: spec(modified),
        };
        rustix::fs::utimensat(&parent, name, &times, AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| FsError::from_errno(rel, e))
    }

    /// Sets the length of a regular file; growth counts against the quota.
    pub fn truncate(&self, rel: &str, len: u64) -> FsResult<()> {
        let file = self.open(
            rel,
            &OpenOptions {
                write: true,
                ..OpenOptions::default()
            },
        )?;
        file.set_len(len)
    }

    /// Makes a symlink at `link` pointing to `target`, which must be relative and, read from
    /// the link's folder, stay inside the root.
    pub fn symlink(&self, target: &str, link: &str) -> FsResult<()> {
        let link = clean_path(link)?;
        let (parent_rel, name) = split_parent(link)?;
        check_link_target(target, parent_rel)?;
        let (parent, _) = self.parent_of(link)?;
        self.check_denied(link, Some((&parent, Some(name))), false)?;
        let err = |e| FsError::from_errno(link, e);
        rustix::fs::symlinkat(target, &parent, name).map_err(err)?;
        self.chown_at(&parent, name).map_err(err)
    }
}

/// Refuses a symlink target that is absolute or, read from the folder `parent_rel`, leaves
/// the root.
fn check_link_target(target: &str, parent_rel: &str) -> FsResult<()> {
    if target.is_empty() || target.starts_with('/') || target.contains(['\0', '\\']) || target.len() > 4096 {
        return Err(FsError::BadPath(target.into()));
    }
    let mut depth: i64 = parent_rel
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .count() as i64;
    for component in target.split('/') {
        match component {
            "" | "." => {}
            ".." => {
                depth -= 1;
                if depth < 0 {
                    return Err(FsError::Escape(target.into()));
                }
            }
            _ => depth += 1,
        }
    }
    Ok(())
}

/// A file opened through [`ServerFs::open`]. Writes count against the server's quota and are
/// refused (with nothing written) the moment they would pass it.
pub struct FsFile {
    file: File,
    fs: ServerFs,
    path: String,
    append: bool,
    writable: bool,
    /// Held from reading the size to settling the quota, so that concurrent positional writes
    /// (SFTP pipelines them) each count only the growth they cause.
    resize: std::sync::Mutex<()>,
}

impl std::fmt::Debug for FsFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FsFile").field("path", &self.path).finish()
    }
}

impl FsFile {
    pub fn path(&self) -> &str {
        &self.path
    }

    pub fn metadata(&self) -> FsResult<Metadata> {
        let st = rustix::fs::fstat(&self.file).map_err(|e| FsError::from_errno(&self.path, e))?;
        Ok(Metadata::from_stat(&st))
    }

    fn size(&self) -> FsResult<u64> {
        Ok(self.metadata()?.size)
    }

    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> FsResult<usize> {
        self.file
            .read_at(buf, offset)
            .map_err(|e| FsError::from_io(&self.path, e))
    }

    /// Writes at `offset` (at the end for a file opened with `append`).
    pub fn write_at(&self, buf: &[u8], offset: u64) -> FsResult<usize> {
        if !self.writable {
            return Err(FsError::BadPath(format!("{} is not open for writing", self.path)));
        }
        let _resizing = self
            .resize
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let size = self.size()?;
        let start = if self.append { size } else { offset };
        let end = start.saturating_add(buf.len() as u64);
        let growth = end.saturating_sub(size);
        self.fs.reserve(growth)?;
        let result = self.file.write_at(buf, start);
        let written = *result.as_ref().unwrap_or(&0) as u64;
        let grew = (start + written).saturating_sub(size);
        self.fs.release(growth.saturating_sub(grew));
        result.map_err(|e| FsError::from_io(&self.path, e))
    }

    pub fn write_all_at(&self, mut buf: &[u8], mut offset: u64) -> FsResult<()> {
        while !buf.is_empty() {
            let n = self.write_at(buf, offset)?;
            if n == 0 {
                return Err(FsError::from_io(&self.path, io::ErrorKind::WriteZero.into()));
            }
            buf = &buf[n..];
            offset += n as u64;
        }
        Ok(())
    }

    /// Sets the file's length; growth counts against the quota, shrinking frees it.
    pub fn set_len(&self, len: u64) -> FsResult<()> {
        if !self.writable {
            return Err(FsError::BadPath(format!("{} is not open for writing", self.path)));
        }
        let _resizing = self
            .resize
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let meta = self.metadata()?;
        if len > meta.size {
            self.fs.reserve(len - meta.size)?;
        }
        if let Err(e) = rustix::fs::ftruncate(&self.file, len) {
            if len > meta.size {
                self.fs.release(len - meta.size);
            }
            return Err(FsError::from_errno(&self.path, e));
        }
        if len < meta.size {
            self.fs.release(meta.size - len);
        }
        Ok(())
    }

    /// Sets permission bits (no setuid, setgid or sticky) on the open file.
    pub fn set_permissions(&self, mode: u32) -> FsResult<()> {
        if mode > 0o777 {
            return Err(FsError::BadPath(format!("{} (mode {mode:o})", self.path)));
        }
        rustix::fs::fchmod(&self.file, Mode::from_raw_mode(mode))
            .map_err(|e| FsError::from_errno(&self.path, e))
    }

    /// Sets the modification time through the handle (the access time is left alone).
    pub fn set_modified(&self, modified: SystemTime) -> FsResult<()> {
        let d = modified
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        let times = rustix::fs::Timestamps {
            last_access: rustix::fs::Timespec {
                tv_sec: 0,
                tv_nsec: rustix::fs::UTIME_OMIT,
            },
            last_modification: rustix::fs::Timespec {
                tv_sec: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
                tv_nsec: d.subsec_nanos().into(),
            },
        };
        rustix::fs::futimens(&self.file, &times).map_err(|e| FsError::from_errno(&self.path, e))
    }

    pub fn sync_all(&self) -> FsResult<()> {
        self.file.sync_all().map_err(|e| FsError::from_io(&self.path, e))
    }
}

impl Read for FsFile {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf)
    }
}

impl Write for FsFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let position = self.file.stream_position()?;
        let n = self.write_at(buf, position)?;
        let end = if self.append {
            self.size()?
        } else {
            position + n as u64
        };
        self.file.seek(SeekFrom::Start(end))?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Seek for FsFile {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        self.file.seek(pos)
    }
}

impl AsFd for FsFile {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.file.as_fd()
    }
}

#[cfg(test)]
mod tests;
