//! The server-root jail: every file wings touches inside a server's folder goes through here.
//!
//! Architecture invariant: a path from a request, a blueprint or an archive is never joined to
//! the root as a string and then opened. It is resolved by the kernel beneath an open handle
//! of the root (`openat2` with `RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS`), so `..`, absolute
//! paths and symlinks that point outside fail with `EXDEV` whatever races the container runs.

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
        check(rel)?;
        let (parent, name) = match rel.rsplit_once('/') {
            Some((p, n)) => (p, n),
            None => (".", rel),
        };
        let parent_fd = if parent == "." {
            self.open_beneath(".", OFlags::DIRECTORY | OFlags::RDONLY, Mode::empty())?
        } else {
            self.open_beneath(parent, OFlags::DIRECTORY | OFlags::RDONLY, Mode::empty())?
        };
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
}
