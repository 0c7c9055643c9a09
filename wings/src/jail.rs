//! The server-root jail: every file wings touches inside a server's folder goes through here.
//!
//! Architecture invariant: a path from a request, a blueprint or an archive is never joined to
//! the root as a string and then opened. It is resolved by the kernel beneath an open handle
//! of the root (`openat2` with `RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS`), so `..`, absolute
//! paths and symlinks that point outside fail with `EXDEV` whatever races the container runs.

use std::ffi::{CStr, CString};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use rustix::fs::{Mode, OFlags, ResolveFlags};

#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("path {0:?} is not allowed")]
    BadPath(String),
    #[error("path {0:?} leaves the server root")]
    Escape(String),
    #[error("{0:?} does not exist")]
    NotFound(String),
    #[error("{0:?} already exists")]
    Exists(String),
    #[error("{path:?} is larger than {limit} bytes")]
    TooLarge { path: String, limit: u64 },
    #[error("{path:?}: {source}")]
    Io { path: String, source: io::Error },
}

/// An open handle to one server's root folder.
#[derive(Debug)]
pub struct ServerRoot {
    dir: OwnedFd,
    uid: u32,
    gid: u32,
}

const RESOLVE: ResolveFlags = ResolveFlags::BENEATH.union(ResolveFlags::NO_MAGICLINKS);

impl ServerRoot {
    /// Opens `root`, which wings itself created; `uid`/`gid` own new files.
    pub fn open(root: &Path, uid: u32, gid: u32) -> io::Result<ServerRoot> {
        let dir = rustix::fs::open(
            root,
            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(ServerRoot { dir, uid, gid })
    }

    fn open_beneath(&self, rel: &str, flags: OFlags, mode: Mode) -> Result<OwnedFd, JailError> {
        check(rel)?;
        rustix::fs::openat2(self.dir.as_fd(), rel, flags | OFlags::CLOEXEC, mode, RESOLVE).map_err(
            |e| match e {
                rustix::io::Errno::XDEV | rustix::io::Errno::LOOP => JailError::Escape(rel.into()),
                rustix::io::Errno::NOENT => JailError::NotFound(rel.into()),
                e => JailError::Io {
                    path: rel.into(),
                    source: e.into(),
                },
            },
        )
    }

    /// Reads a whole regular file, refusing anything larger than `limit` bytes.
    pub fn read_file(&self, rel: &str, limit: u64) -> Result<Vec<u8>, JailError> {
        let fd = self.open_beneath(
            rel,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK,
            Mode::empty(),
        )?;
        let io_err = |source: io::Error| JailError::Io {
            path: rel.into(),
            source,
        };
        let stat = rustix::fs::fstat(&fd).map_err(|e| io_err(e.into()))?;
        if rustix::fs::FileType::from_raw_mode(stat.st_mode) != rustix::fs::FileType::RegularFile {
            return Err(JailError::BadPath(rel.into()));
        }
        if u64::try_from(stat.st_size).unwrap_or(u64::MAX) > limit {
            return Err(JailError::TooLarge {
                path: rel.into(),
                limit,
            });
        }
        let mut data = Vec::new();
        File::from(fd)
            .take(limit + 1)
            .read_to_end(&mut data)
            .map_err(io_err)?;
        if data.len() as u64 > limit {
            return Err(JailError::TooLarge {
                path: rel.into(),
                limit,
            });
        }
        Ok(data)
    }

    /// Replaces (or creates) a file atomically: a temporary file in the same folder, fsynced,
    /// then renamed over the target. The target's parent must already exist.
    pub fn write_file_atomic(&self, rel: &str, data: &[u8]) -> Result<(), JailError> {
        let (parent_fd, name) = self.parent_of(rel)?;
        let io_err = |source: io::Error| JailError::Io {
            path: rel.into(),
            source,
        };
        let tmp = format!(".{name}.mamba-tmp");
        // The parent was resolved beneath the root; the leaf names below are single components,
        // so O_NOFOLLOW on them is enough.
        let _ = rustix::fs::unlinkat(&parent_fd, tmp.as_str(), rustix::fs::AtFlags::empty());
        let fd = rustix::fs::openat(
            &parent_fd,
            tmp.as_str(),
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o644),
        )
        .map_err(|e| io_err(e.into()))?;
        rustix::fs::fchown(&fd, Some(uid(self.uid)), Some(gid(self.gid))).map_err(|e| io_err(e.into()))?;
        let mut file = File::from(fd);
        file.write_all(data)
            .and_then(|()| file.sync_all())
            .map_err(io_err)?;
        rustix::fs::renameat(&parent_fd, tmp.as_str(), &parent_fd, name).map_err(|e| io_err(e.into()))?;
        rustix::fs::fsync(&parent_fd).map_err(|e| io_err(e.into()))?;
        Ok(())
    }
}

/// One entry of a folder, as the file manager shows it. Symlinks are reported, never followed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    pub kind: EntryKind,
    pub size: u64,
    /// Permission bits (`0o644`).
    pub mode: u32,
    /// Unix seconds.
    pub modified: i64,
    pub symlink_target: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    File,
    Directory,
    Symlink,
    Other,
}

impl ServerRoot {
    /// The folder holding `rel`'s last component, resolved beneath the root, and that
    /// component. The component is a single name, so later `*at` calls with `NOFOLLOW` on it
    /// cannot be redirected.
    fn parent_of<'a>(&self, rel: &'a str) -> Result<(OwnedFd, &'a str), JailError> {
        check(rel)?;
        let (parent, name) = rel.rsplit_once('/').unwrap_or((".", rel));
        if name.is_empty() || name == "." || name == ".." {
            return Err(JailError::BadPath(rel.into()));
        }
        let parent = if parent.is_empty() { "." } else { parent };
        let fd = self.open_beneath(parent, OFlags::DIRECTORY | OFlags::RDONLY, Mode::empty())?;
        Ok((fd, name))
    }

    fn io_error(rel: &str, e: impl Into<io::Error>) -> JailError {
        let source = e.into();
        match source.kind() {
            io::ErrorKind::NotFound => JailError::NotFound(rel.into()),
            _ => JailError::Io {
                path: rel.into(),
                source,
            },
        }
    }

    /// The entries of a folder (`"."` is the root), sorted by name.
    pub fn list(&self, rel: &str) -> Result<Vec<Entry>, JailError> {
        let dir = self.open_beneath(rel, OFlags::DIRECTORY | OFlags::RDONLY, Mode::empty())?;
        let err = |e: rustix::io::Errno| Self::io_error(rel, e);
        let mut entries = Vec::new();
        for item in rustix::fs::Dir::read_from(&dir).map_err(err)? {
            let item = item.map_err(err)?;
            let name = item.file_name().to_string_lossy().into_owned();
            if name == "." || name == ".." {
                continue;
            }
            let stat = match rustix::fs::statat(&dir, item.file_name(), rustix::fs::AtFlags::SYMLINK_NOFOLLOW)
            {
                Ok(stat) => stat,
                // Removed between the listing and the stat.
                Err(rustix::io::Errno::NOENT) => continue,
                Err(e) => return Err(err(e)),
            };
            let kind = match rustix::fs::FileType::from_raw_mode(stat.st_mode) {
                rustix::fs::FileType::RegularFile => EntryKind::File,
                rustix::fs::FileType::Directory => EntryKind::Directory,
                rustix::fs::FileType::Symlink => EntryKind::Symlink,
                _ => EntryKind::Other,
            };
            let symlink_target = (kind == EntryKind::Symlink)
                .then(|| rustix::fs::readlinkat(&dir, item.file_name(), Vec::new()).ok())
                .flatten()
                .map(|t| t.to_string_lossy().into_owned());
            entries.push(Entry {
                name,
                kind,
                size: u64::try_from(stat.st_size).unwrap_or(0),
                mode: stat.st_mode & 0o7777,
                modified: stat.st_mtime,
                symlink_target,
            });
        }
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(entries)
    }

    /// Makes a folder (its parent must exist), owned by the container user.
    pub fn make_dir(&self, rel: &str) -> Result<(), JailError> {
        let (parent, name) = self.parent_of(rel)?;
        let err = |e: rustix::io::Errno| Self::io_error(rel, e);
        rustix::fs::mkdirat(&parent, name, Mode::from_raw_mode(0o755)).map_err(err)?;
        rustix::fs::chownat(
            &parent,
            name,
            Some(uid(self.uid)),
            Some(gid(self.gid)),
            rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(err)
    }

    /// Removes a file, a symlink (never its target) or a whole folder.
    pub fn remove(&self, rel: &str) -> Result<(), JailError> {
        let (parent, name) = self.parent_of(rel)?;
        let name = CString::new(name).map_err(|_| JailError::BadPath(rel.into()))?;
        remove_at(&parent, &name).map_err(|e| Self::io_error(rel, e))
    }

    /// Renames within the server root; an existing target is never replaced.
    pub fn rename(&self, from: &str, to: &str) -> Result<(), JailError> {
        let (from_parent, from_name) = self.parent_of(from)?;
        let (to_parent, to_name) = self.parent_of(to)?;
        rustix::fs::renameat_with(
            &from_parent,
            from_name,
            &to_parent,
            to_name,
            rustix::fs::RenameFlags::NOREPLACE,
        )
        .map_err(|e| match e {
            rustix::io::Errno::EXIST => JailError::Exists(to.into()),
            e => Self::io_error(from, e),
        })
    }

    /// Sets permission bits (no setuid, setgid or sticky) of a file or folder, never through
    /// a symlink.
    pub fn chmod(&self, rel: &str, mode: u32) -> Result<(), JailError> {
        if mode > 0o777 {
            return Err(JailError::BadPath(format!("{rel} (mode {mode:o})")));
        }
        let fd = self.open_beneath(
            rel,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK,
            Mode::empty(),
        )?;
        rustix::fs::fchmod(&fd, Mode::from_raw_mode(mode)).map_err(|e| Self::io_error(rel, e))
    }
}

/// Removes `name` in `parent`, descending into folders by handle, never by path, and never
/// following a symlink.
fn remove_at(parent: &OwnedFd, name: &CStr) -> rustix::io::Result<()> {
    match rustix::fs::unlinkat(parent, name, rustix::fs::AtFlags::empty()) {
        Ok(()) => return Ok(()),
        Err(rustix::io::Errno::ISDIR) => {}
        Err(e) => return Err(e),
    }
    let dir = rustix::fs::openat(
        parent,
        name,
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    loop {
        // Re-read after each pass: removing while iterating can skip entries.
        let mut names: Vec<CString> = Vec::new();
        for item in rustix::fs::Dir::read_from(&dir)? {
            let item = item?;
            let child = item.file_name();
            if child != c"." && child != c".." {
                names.push(child.to_owned());
            }
            if names.len() >= 1024 {
                break;
            }
        }
        if names.is_empty() {
            break;
        }
        for child in names {
            match remove_at(&dir, &child) {
                Ok(()) | Err(rustix::io::Errno::NOENT) => {}
                Err(e) => return Err(e),
            }
        }
    }
    rustix::fs::unlinkat(parent, name, rustix::fs::AtFlags::REMOVEDIR)
}

fn uid(raw: u32) -> rustix::fs::Uid {
    rustix::fs::Uid::from_raw(raw)
}

fn gid(raw: u32) -> rustix::fs::Gid {
    rustix::fs::Gid::from_raw(raw)
}

/// Cheap refusals before the kernel sees the path; the kernel's resolution is what makes it safe.
fn check(rel: &str) -> Result<(), JailError> {
    if rel.is_empty() || rel.starts_with('/') || rel.contains('\0') || rel.len() > 4096 {
        return Err(JailError::BadPath(rel.into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> (tempfile::TempDir, ServerRoot) {
        let dir = tempfile::tempdir().unwrap();
        let uid = rustix::process::getuid().as_raw();
        let gid = rustix::process::getgid().as_raw();
        let jail = ServerRoot::open(dir.path(), uid, gid).unwrap();
        (dir, jail)
    }

    #[test]
    fn reads_and_writes_inside() {
        let (dir, jail) = root();
        std::fs::create_dir(dir.path().join("cfg")).unwrap();
        jail.write_file_atomic("cfg/a.txt", b"hello").unwrap();
        assert_eq!(jail.read_file("cfg/a.txt", 100).unwrap(), b"hello");
        assert!(matches!(
            jail.read_file("cfg/a.txt", 2),
            Err(JailError::TooLarge { .. })
        ));
    }

    #[test]
    fn symlinks_and_dotdot_cannot_escape() {
        let (dir, jail) = root();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), "s").unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("link")).unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret"), dir.path().join("file-link")).unwrap();
        assert!(matches!(
            jail.read_file("link/secret", 100),
            Err(JailError::Escape(_))
        ));
        assert!(jail.read_file("file-link", 100).is_err());
        assert!(matches!(jail.read_file("../x", 100), Err(JailError::Escape(_))));
        assert!(matches!(
            jail.read_file("/etc/passwd", 100),
            Err(JailError::BadPath(_))
        ));
        assert!(matches!(
            jail.write_file_atomic("link/secret", b"x"),
            Err(JailError::Escape(_))
        ));
        assert_eq!(
            std::fs::read_to_string(outside.path().join("secret")).unwrap(),
            "s"
        );
    }

    #[test]
    fn lists_makes_renames_chmods_and_removes_inside() {
        let (dir, jail) = root();
        jail.make_dir("world").unwrap();
        jail.write_file_atomic("world/level.dat", b"12345").unwrap();
        std::os::unix::fs::symlink("level.dat", dir.path().join("world/latest")).unwrap();
        let entries = jail.list("world").unwrap();
        let names: Vec<_> = entries.iter().map(|e| (e.name.as_str(), e.kind)).collect();
        assert_eq!(
            names,
            vec![("latest", EntryKind::Symlink), ("level.dat", EntryKind::File)]
        );
        assert_eq!(entries[0].symlink_target.as_deref(), Some("level.dat"));
        assert_eq!(entries[1].size, 5);

        jail.rename("world/level.dat", "level.dat").unwrap();
        assert!(matches!(
            jail.rename("level.dat", "world/latest"),
            Err(JailError::Exists(_))
        ));
        jail.chmod("level.dat", 0o600).unwrap();
        assert_eq!(
            jail.list(".")
                .unwrap()
                .iter()
                .find(|e| e.name == "level.dat")
                .unwrap()
                .mode,
            0o600
        );
        assert!(jail.chmod("level.dat", 0o4755).is_err(), "setuid is never set");

        jail.remove("world").unwrap();
        assert!(!dir.path().join("world").exists());
        assert!(matches!(jail.remove("world"), Err(JailError::NotFound(_))));
        assert!(matches!(jail.remove(".."), Err(JailError::BadPath(_))));
        assert!(matches!(jail.make_dir("../x"), Err(JailError::Escape(_))));
        std::fs::create_dir(dir.path().join("a")).unwrap();
        assert!(matches!(jail.make_dir("a/../../x"), Err(JailError::Escape(_))));
    }

    #[test]
    fn no_operation_reaches_through_a_symlink() {
        let (dir, jail) = root();
        let outside = tempfile::tempdir().unwrap();
        std::fs::create_dir(outside.path().join("data")).unwrap();
        std::fs::write(outside.path().join("data/keep"), "k").unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("out")).unwrap();
        std::os::unix::fs::symlink(outside.path().join("data/keep"), dir.path().join("keep-link")).unwrap();
        std::fs::create_dir(dir.path().join("mine")).unwrap();
        std::os::unix::fs::symlink(outside.path().join("data"), dir.path().join("mine/data-link")).unwrap();

        assert!(matches!(jail.list("out"), Err(JailError::Escape(_))));
        assert!(matches!(jail.list("out/data"), Err(JailError::Escape(_))));
        assert!(matches!(jail.make_dir("out/new"), Err(JailError::Escape(_))));
        assert!(matches!(jail.remove("out/data"), Err(JailError::Escape(_))));
        assert!(matches!(
            jail.rename("out/data/keep", "stolen"),
            Err(JailError::Escape(_))
        ));
        assert!(matches!(
            jail.rename("mine", "out/mine"),
            Err(JailError::Escape(_))
        ));
        assert!(jail.chmod("keep-link", 0o777).is_err());
        assert!(jail.chmod("out/data/keep", 0o777).is_err());
        // Removing a folder holding a symlink removes the link, not what it points to.
        jail.remove("mine").unwrap();
        jail.remove("keep-link").unwrap();
        assert_eq!(
            std::fs::read_to_string(outside.path().join("data/keep")).unwrap(),
            "k"
        );
        let mode = std::fs::metadata(outside.path().join("data/keep"))
            .unwrap()
            .permissions();
        assert_ne!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777, 0o777);
    }

    /// A folder swapped for a symlink to outside, over and over, while operations run on
    /// paths through it: nothing outside is ever touched.
    #[test]
    fn a_swap_race_never_escapes() {
        let (dir, jail) = root();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("victim"), "safe").unwrap();
        let swap_dir = dir.path().join("swap");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let swapper = {
            let (stop, swap_dir, target) = (stop.clone(), swap_dir.clone(), outside.path().to_path_buf());
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let _ = std::fs::remove_file(&swap_dir);
                    let _ = std::fs::create_dir(&swap_dir);
                    let _ = std::fs::write(swap_dir.join("victim"), "inside");
                    let _ = std::fs::remove_dir_all(&swap_dir);
                    let _ = std::os::unix::fs::symlink(&target, &swap_dir);
                }
            })
        };
        for _ in 0..2000 {
            // Whatever is read comes from inside (the swapper's file, half-written, or ours).
            let _ = jail.read_file("swap/victim", 100).map(|d| assert_ne!(d, b"safe"));
            let _ = jail.write_file_atomic("swap/victim", b"overwritten");
            let _ = jail.chmod("swap/victim", 0o777);
            let _ = jail.remove("swap/victim");
            let _ = jail.rename("swap/victim", "moved");
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        swapper.join().unwrap();
        assert_eq!(
            std::fs::read_to_string(outside.path().join("victim")).unwrap(),
            "safe"
        );
        let mode = std::fs::metadata(outside.path().join("victim"))
            .unwrap()
            .permissions();
        assert_ne!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777, 0o777);
    }
}
