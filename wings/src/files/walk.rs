//! Depth-first walks by handle, for archives, backups and the quota count.

use std::collections::HashSet;
use std::ffi::CString;
use std::os::fd::OwnedFd;

use rustix::fs::{AtFlags, Mode, OFlags};

use super::{EntryKind, FsError, FsResult, Metadata, ServerFs, join};

/// One entry met by a [`Walker`]. `path` is relative to the server root.
#[derive(Debug, Clone)]
pub struct WalkEntry {
    pub path: String,
    pub meta: Metadata,
    pub symlink_target: Option<String>,
}

struct Frame {
    dir: OwnedFd,
    path: String,
    names: std::vec::IntoIter<CString>,
}

/// Yields every entry below a folder, a folder before its contents, names sorted within each
/// folder. Symlinks are reported and never followed; each folder is opened by handle from
/// its parent with `O_NOFOLLOW`, so a folder swapped for a link mid-walk is skipped, not
/// entered. Entries whose names are not UTF-8, or that vanish mid-walk, are skipped.
pub struct Walker {
    fs: ServerFs,
    stack: Vec<Frame>,
}

impl std::fmt::Debug for Walker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Walker")
            .field("depth", &self.stack.len())
            .finish()
    }
}

impl Walker {
    pub(super) fn new(fs: ServerFs, rel: &str, dir: OwnedFd) -> FsResult<Walker> {
        let mut walker = Walker {
            fs,
            stack: Vec::new(),
        };
        walker.push(rel.to_string(), dir)?;
        Ok(walker)
    }

    fn push(&mut self, path: String, dir: OwnedFd) -> FsResult<()> {
        let mut names: Vec<CString> = self
            .fs
            .read_names(&path, &dir)?
            .into_iter()
            .map(|(name, _)| name)
            .collect();
        names.sort_unstable();
        self.stack.push(Frame {
            dir,
            path,
            names: names.into_iter(),
        });
        Ok(())
    }

    /// Skips the contents of the folder last returned.
    pub fn skip_current_dir(&mut self) {
        self.stack.pop();
    }

    /// Opens the regular file `entry` (the entry last returned) for reading, by name from the
    /// folder handle the walk already holds: no path resolution from the root per file, and
    /// `O_NOFOLLOW`, so a file swapped for a symlink since the walk saw it is not followed.
    pub fn open_file(&self, entry: &WalkEntry) -> FsResult<(std::fs::File, Metadata)> {
        let frame = self
            .stack
            .last()
            .ok_or_else(|| FsError::NotFound(entry.path.clone()))?;
        let name = entry
            .path
            .rsplit_once('/')
            .map_or(entry.path.as_str(), |(_, name)| name);
        if entry.meta.kind != EntryKind::File || join(&frame.path, name) != entry.path {
            return Err(FsError::NotAFile(entry.path.clone()));
        }
        self.fs.check_denied(&entry.path, None, false)?;
        let fd = rustix::fs::openat(
            &frame.dir,
            name,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| FsError::from_errno(&entry.path, e))?;
        let st = rustix::fs::fstat(&fd).map_err(|e| FsError::from_errno(&entry.path, e))?;
        let meta = Metadata::from_stat(&st);
        if meta.kind != EntryKind::File {
            return Err(FsError::NotAFile(entry.path.clone()));
        }
        Ok((std::fs::File::from(fd), meta))
    }
}

impl Iterator for Walker {
    type Item = FsResult<WalkEntry>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let frame = self.stack.last_mut()?;
            let Some(name) = frame.names.next() else {
                self.stack.pop();
                continue;
            };
            let Ok(name_str) = name.to_str() else {
                continue;
            };
            let path = join(&frame.path, name_str);
            let st = match rustix::fs::statat(&frame.dir, &name, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) => st,
                Err(rustix::io::Errno::NOENT) => continue,
                Err(e) => return Some(Err(FsError::from_errno(&path, e))),
            };
            let meta = Metadata::from_stat(&st);
            let symlink_target = (meta.kind == EntryKind::Symlink)
                .then(|| rustix::fs::readlinkat(&frame.dir, &name, Vec::new()).ok())
                .flatten()
                .map(|t| t.to_string_lossy().into_owned());
            if meta.kind == EntryKind::Directory {
                match rustix::fs::openat(
                    &frame.dir,
                    &name,
                    OFlags::DIRECTORY | OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                ) {
                    Ok(dir) => {
                        if let Err(e) = self.push(path.clone(), dir) {
                            return Some(Err(e));
                        }
                    }
                    // Swapped for a link or removed since the stat: not entered.
                    Err(rustix::io::Errno::NOENT | rustix::io::Errno::LOOP | rustix::io::Errno::NOTDIR) => {
                        continue;
                    }
                    Err(e) => return Some(Err(FsError::from_errno(&path, e))),
                }
            }
            return Some(Ok(WalkEntry {
                path,
                meta,
                symlink_target,
            }));
        }
    }
}

/// The bytes the whole tree holds for the quota, hard links counted once.
pub(super) fn usage(fs: &ServerFs) -> FsResult<u64> {
    let mut total = 0u64;
    let mut linked: HashSet<(u64, u64)> = HashSet::new();
    let root = fs.open_beneath(".", OFlags::DIRECTORY | OFlags::RDONLY, Mode::empty())?;
    for entry in Walker::new(fs.clone(), ".", root)? {
        let meta = match entry {
            Ok(entry) => entry.meta,
            // A folder we cannot read (the container made it 000): what is in it stays
            // uncounted rather than stopping the count.
            Err(FsError::Io { .. }) => continue,
            Err(e) => return Err(e),
        };
        if meta.kind != EntryKind::Directory && meta.nlink > 1 && !linked.insert((meta.dev, meta.ino)) {
            continue;
        }
        total = total.saturating_add(meta.usage);
    }
    Ok(total)
}
