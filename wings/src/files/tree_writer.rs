//! Creating many entries in archive order (restores) through the jail.
//!
//! An archive lists a folder before its contents and keeps a folder's entries together, so
//! the writer holds the open handles of the folder chain it is filling, from the root down.
//! Each entry is created by name from its folder's handle: no resolution of the whole path
//! beneath the root per file. Every handle in the chain was opened from the one above it
//! with `O_NOFOLLOW | O_DIRECTORY`, starting at the root handle, so the chain is as strict
//! as [`ServerFs::create_dir_all`] and never leaves the root.

use std::ffi::CString;
use std::fs::File;
use std::io::Read;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;

use rustix::fs::{AtFlags, Mode, OFlags};

use super::{
    EntryKind, FsError, FsFile, FsResult, ServerFs, check_link_target, clean_path, jail, split_parent,
};

struct Folder {
    name: String,
    dir: OwnedFd,
    /// Entries created here need a chown to the server's user: wings runs as another user,
    /// or the folder's setgid bit hands them another group.
    chown: bool,
}

/// Creates folders, files and links beneath the root, keeping the folder chain open. With
/// `replace`, whatever is in the way of a new entry is removed first (its bytes freed from
/// the quota), so a file is never written through an existing link.
pub struct TreeWriter {
    fs: ServerFs,
    replace: bool,
    euid: u32,
    egid: u32,
    /// The root first, then each folder below the one before.
    chain: Vec<Folder>,
}

impl std::fmt::Debug for TreeWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TreeWriter")
            .field("depth", &self.chain.len())
            .finish()
    }
}

impl ServerFs {
    /// A writer that creates entries beneath the root (see [`TreeWriter`]).
    pub fn tree_writer(&self, replace: bool) -> FsResult<TreeWriter> {
        let root = self.open_beneath(".", OFlags::DIRECTORY | OFlags::RDONLY, Mode::empty())?;
        let mut writer = TreeWriter {
            fs: self.clone(),
            replace,
            euid: rustix::process::geteuid().as_raw(),
            egid: rustix::process::getegid().as_raw(),
            chain: Vec::new(),
        };
        let chown = writer.needs_chown(&root, ".")?;
        writer.chain.push(Folder {
            name: String::new(),
            dir: root,
            chown,
        });
        Ok(writer)
    }
}

impl TreeWriter {
    fn needs_chown(&self, dir: &OwnedFd, rel: &str) -> FsResult<bool> {
        let st = rustix::fs::fstat(dir).map_err(|e| FsError::from_errno(rel, e))?;
        let group = if st.st_mode & 0o2000 != 0 {
            st.st_gid
        } else {
            self.egid
        };
        Ok(self.euid != self.fs.inner.uid || group != self.fs.inner.gid)
    }

    fn chown_at(&self, folder: &Folder, name: &str) -> rustix::io::Result<()> {
        if folder.chown {
            self.fs.chown_at(&folder.dir, name)?;
        }
        Ok(())
    }

    /// Removes whatever is at `name` in the current folder, descending by handle.
    fn clear(&self, name: &str, rel: &str) -> FsResult<()> {
        let Some(folder) = self.chain.last() else {
            return Err(FsError::NotFound(rel.into()));
        };
        let name = CString::new(name).map_err(|_| FsError::BadPath(rel.into()))?;
        let mut freed = 0;
        let result = jail::remove_at(&folder.dir, &name, &mut freed);
        self.fs.release(freed);
        match result {
            Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
            Err(e) => Err(FsError::from_errno(rel, e)),
        }
    }

    /// Moves the chain to the folder `rel` (a cleaned path), creating what is missing. A
    /// symlink or file on the way is refused, except that with `replace_last` (and the
    /// writer's `replace`) a non-folder at `rel` itself is replaced by a folder.
    fn enter(&mut self, rel: &str, replace_last: bool) -> FsResult<()> {
        let components: Vec<&str> = rel.split('/').filter(|c| !c.is_empty() && *c != ".").collect();
        let kept = self
            .chain
            .iter()
            .skip(1)
            .zip(&components)
            .take_while(|(folder, component)| folder.name == **component)
            .count();
        self.chain.truncate(kept + 1);
        let err = |e| FsError::from_errno(rel, e);
        for (i, component) in components.iter().enumerate().skip(kept) {
            let last = i + 1 == components.len();
            let Some(parent) = self.chain.last() else {
                return Err(FsError::NotFound(rel.into()));
            };
            match rustix::fs::mkdirat(&parent.dir, *component, Mode::from_raw_mode(0o755)) {
                Ok(()) => self.chown_at(parent, component).map_err(err)?,
                Err(rustix::io::Errno::EXIST) => {}
                Err(e) => return Err(err(e)),
            }
            let open = |parent: &Folder| {
                rustix::fs::openat(
                    &parent.dir,
                    *component,
                    OFlags::DIRECTORY | OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )
            };
            let dir = match open(parent) {
                Ok(dir) => dir,
                // O_DIRECTORY | O_NOFOLLOW on a symlink or a file fails with ENOTDIR.
                Err(rustix::io::Errno::NOTDIR | rustix::io::Errno::LOOP)
                    if last && replace_last && self.replace =>
                {
                    self.clear(component, rel)?;
                    let Some(parent) = self.chain.last() else {
                        return Err(FsError::NotFound(rel.into()));
                    };
                    rustix::fs::mkdirat(&parent.dir, *component, Mode::from_raw_mode(0o755)).map_err(err)?;
                    self.chown_at(parent, component).map_err(err)?;
                    open(parent).map_err(err)?
                }
                Err(e) => {
                    let link = rustix::fs::statat(&parent.dir, *component, AtFlags::SYMLINK_NOFOLLOW)
                        .is_ok_and(|st| EntryKind::from_mode(st.st_mode) == EntryKind::Symlink);
                    return Err(if link {
                        FsError::Symlink(rel.into())
                    } else {
                        err(e)
                    });
                }
            };
            let chown = self.needs_chown(&dir, rel)?;
            self.chain.push(Folder {
                name: (*component).to_string(),
                dir,
                chown,
            });
        }
        Ok(())
    }

    /// Makes the folder `rel` and any missing parents; an existing folder is fine.
    pub fn create_dir(&mut self, rel: &str) -> FsResult<()> {
        let rel = clean_path(rel)?;
        self.fs.check_denied(rel, None, false)?;
        self.enter(rel, true)
    }

    /// Creates the file `rel` (its folders as needed) with `len` bytes from `data`, using
    /// `buffer` for the copy. The whole length is reserved against the quota before the first
    /// byte is written. The file is created writable by its owner; the caller sets its final
    /// mode and time through the handle returned.
    pub fn create_file(
        &mut self,
        rel: &str,
        mode: u32,
        len: u64,
        data: &mut dyn Read,
        buffer: &mut [u8],
    ) -> FsResult<FsFile> {
        let rel = clean_path(rel)?;
        let (parent, name) = split_parent(rel)?;
        self.fs.check_denied(rel, None, false)?;
        self.enter(parent, false)?;
        let mode = Mode::from_raw_mode((mode & 0o777) | 0o200);
        let create = |folder: &Folder| {
            rustix::fs::openat(
                &folder.dir,
                name,
                OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                mode,
            )
        };
        let err = |e| FsError::from_errno(rel, e);
        let Some(folder) = self.chain.last() else {
            return Err(FsError::NotFound(rel.into()));
        };
        // The file will be new and empty: its growth is exactly `len`, reserved before it
        // exists so that nothing is created past the quota.
        self.fs.reserve(len)?;
        let created = match create(folder) {
            Err(rustix::io::Errno::EXIST) if self.replace => self.clear(name, rel).and_then(|()| {
                let folder = self.chain.last().ok_or_else(|| FsError::NotFound(rel.into()))?;
                create(folder).map_err(err)
            }),
            other => other.map_err(err),
        };
        let fd = match created {
            Ok(fd) => fd,
            Err(e) => {
                self.fs.release(len);
                return Err(e);
            }
        };
        let Some(folder) = self.chain.last() else {
            self.fs.release(len);
            return Err(FsError::NotFound(rel.into()));
        };
        if folder.chown {
            let _ = rustix::fs::fchown(
                &fd,
                Some(rustix::fs::Uid::from_raw(self.fs.inner.uid)),
                Some(rustix::fs::Gid::from_raw(self.fs.inner.gid)),
            );
        }
        let file = File::from(fd);
        let mut written = 0u64;
        let copied = (|| -> FsResult<()> {
            while written < len {
                let want = usize::try_from(len - written)
                    .unwrap_or(usize::MAX)
                    .min(buffer.len());
                let n = match data.read(&mut buffer[..want]) {
                    Ok(0) => {
                        return Err(FsError::from_io(
                            rel,
                            std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the content ends early"),
                        ));
                    }
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(FsError::from_io(rel, e)),
                };
                file.write_all_at(&buffer[..n], written)
                    .map_err(|e| FsError::from_io(rel, e))?;
                written += n as u64;
            }
            Ok(())
        })();
        if let Err(e) = copied {
            self.fs.release(len - written);
            return Err(e);
        }
        Ok(FsFile {
            file,
            fs: self.fs.clone(),
            path: rel.to_string(),
            append: false,
            writable: true,
            resize: std::sync::Mutex::new(()),
        })
    }

    /// Makes a symlink at `rel` pointing to `target`, which must be relative and, read from
    /// the link's folder, stay inside the root.
    pub fn symlink(&mut self, target: &str, rel: &str) -> FsResult<()> {
        let rel = clean_path(rel)?;
        let (parent, name) = split_parent(rel)?;
        check_link_target(target, parent)?;
        self.fs.check_denied(rel, None, false)?;
        self.enter(parent, false)?;
        let err = |e| FsError::from_errno(rel, e);
        let Some(folder) = self.chain.last() else {
            return Err(FsError::NotFound(rel.into()));
        };
        match rustix::fs::symlinkat(target, &folder.dir, name) {
            Ok(()) => {}
            Err(rustix::io::Errno::EXIST) if self.replace => {
                self.clear(name, rel)?;
                let Some(folder) = self.chain.last() else {
                    return Err(FsError::NotFound(rel.into()));
                };
                rustix::fs::symlinkat(target, &folder.dir, name).map_err(err)?;
            }
            Err(e) => return Err(err(e)),
        }
        let Some(folder) = self.chain.last() else {
            return Err(FsError::NotFound(rel.into()));
        };
        self.chown_at(folder, name).map_err(err)
    }
}
