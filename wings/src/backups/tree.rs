//! The two ends that touch a server's files, both through the jailed filesystem
//! ([`crate::files::ServerFs`]): walking the root into an archive, and extracting an archive
//! into the root.

use std::collections::HashSet;
use std::io::{self, Read, Write};
use std::time::{Duration, Instant, SystemTime};

use tokio_util::sync::CancellationToken;

use super::crypto::BackupKey;
use super::format::{ArchiveReader, ArchiveWriter, Digest, EntryKind, IgnoreList, WriteOptions};
use crate::files::{EntryKind as FsKind, FsError, FsFile, OpenOptions, ServerFs};

/// Buffer for reading a file into the archive and writing one out of it.
const FILE_BUFFER: usize = 256 * 1024;

/// Calls `report(files, bytes)` at most once per interval, and once at the end.
pub struct Progress<F: FnMut(u64, u64)> {
    report: F,
    interval: Duration,
    last: Instant,
}

impl<F: FnMut(u64, u64)> Progress<F> {
    pub fn new(interval: Duration, report: F) -> Self {
        Progress {
            report,
            interval,
            last: Instant::now(),
        }
    }

    fn tick(&mut self, files: u64, bytes: u64) {
        if self.last.elapsed() >= self.interval {
            self.last = Instant::now();
            (self.report)(files, bytes);
        }
    }

    fn done(&mut self, files: u64, bytes: u64) {
        (self.report)(files, bytes);
    }
}

fn cancelled() -> io::Error {
    io::Error::new(io::ErrorKind::Interrupted, "cancelled")
}

pub struct Written<W> {
    pub sink: W,
    pub digest: Digest,
    pub files: u64,
    pub content_bytes: u64,
}

/// Archives the whole server root into `sink`, skipping what `ignore` matches. Symlinks are
/// stored as links, never followed; sockets, fifos and devices are left out. Files that
/// vanish while the walk runs are skipped.
pub fn write_archive<W: Write>(
    fs: &ServerFs,
    ignore: &IgnoreList,
    options: &WriteOptions,
    sink: W,
    cancel: &CancellationToken,
    progress: &mut Progress<impl FnMut(u64, u64)>,
) -> io::Result<Written<W>> {
    let mut archive = ArchiveWriter::new(sink, options)?;
    let mut walker = fs.walk(".").map_err(io::Error::from)?;
    while let Some(entry) = walker.next() {
        if cancel.is_cancelled() {
            return Err(cancelled());
        }
        let entry = entry.map_err(io::Error::from)?;
        let is_dir = entry.meta.is_dir();
        if ignore.is_ignored(&entry.path, is_dir) {
            if is_dir {
                walker.skip_current_dir();
            }
            continue;
        }
        let meta = &entry.meta;
        match meta.kind {
            FsKind::Directory => archive.add_dir(&entry.path, meta.mode, meta.modified)?,
            FsKind::Symlink => {
                if let Some(target) = &entry.symlink_target {
                    archive.add_symlink(&entry.path, target, meta.modified)?;
                }
            }
            FsKind::File => match walker.open_file(&entry) {
                Ok((file, meta)) => {
                    archive.add_file(&entry.path, meta.mode, meta.modified, meta.size, file)?;
                }
                // Removed, or swapped for something else, since the walk saw it.
                Err(
                    FsError::NotFound(_) | FsError::NotAFile(_) | FsError::Symlink(_) | FsError::Escape(_),
                ) => {}
                Err(e) => return Err(e.into()),
            },
            FsKind::Other => {}
        }
        progress.tick(archive.files, archive.content_bytes);
    }
    let (files, content_bytes) = (archive.files, archive.content_bytes);
    progress.done(files, content_bytes);
    let (sink, digest) = archive.finish()?;
    Ok(Written {
        sink,
        digest,
        files,
        content_bytes,
    })
}

#[derive(Debug, Default)]
pub struct Extracted {
    pub files: u64,
    pub content_bytes: u64,
    /// Entries not created (path escapes, hard links, devices, symlinks out of the root).
    pub refused: Vec<String>,
}

/// Empties the server root (for a restore with `truncate`).
pub fn empty_root(fs: &ServerFs) -> io::Result<()> {
    loop {
        let page = fs.list(".", 0, 1024).map_err(io::Error::from)?;
        if page.entries.is_empty() {
            return Ok(());
        }
        for entry in page.entries {
            match fs.remove(&entry.name) {
                Ok(_) | Err(FsError::NotFound(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// Removes whatever is at `path` unless it is a folder, so a file or link can be created
/// there without writing through an existing symlink. A folder where a file must go is
/// removed too.
fn clear_for_file(fs: &ServerFs, path: &str) -> io::Result<()> {
    match fs.lstat(path) {
        Ok(_) => match fs.remove(path) {
            Ok(_) | Err(FsError::NotFound(_)) => Ok(()),
            Err(e) => Err(e.into()),
        },
        Err(FsError::NotFound(_)) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Creates a file that must not exist yet, writable by its owner while it is filled.
fn create_file(fs: &ServerFs, path: &str, mode: u32) -> io::Result<FsFile> {
    fs.open(
        path,
        &OpenOptions {
            write: true,
            create: true,
            exclusive: true,
            mode: (mode & 0o777) | 0o200,
            ..OpenOptions::default()
        },
    )
    .map_err(io::Error::from)
}

/// Mode and modification time of a written file, set through its handle.
fn finish_file(file: &FsFile, mode: u32, mtime: i64) -> io::Result<()> {
    let want = mode & 0o777;
    // Bits the umask took, or an owner without write permission (created writable so the
    // content could be written).
    if want & 0o022 != 0 || want & 0o200 == 0 {
        file.set_permissions(want).map_err(io::Error::from)?;
    }
    let modified = SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(mtime).unwrap_or(0));
    let _ = file.set_modified(modified);
    Ok(())
}

/// Extracts an archive into the server root through the jail. `fresh` says the root was
/// just emptied, so nothing needs clearing first. Bytes written count against the quota;
/// an entry that would escape the root, or is a hard link or device, is refused and listed.
/// The stream's checksum is checked at the end (the verify pass already checked it once).
pub fn extract(
    fs: &ServerFs,
    source: impl Read,
    key: Option<&BackupKey>,
    expected: &Digest,
    fresh: bool,
    cancel: &CancellationToken,
    progress: &mut Progress<impl FnMut(u64, u64)>,
) -> io::Result<Extracted> {
    let mut reader = ArchiveReader::new(source, key)?;
    let mut done = Extracted::default();
    let mut dirs: HashSet<String> = HashSet::new();
    let mut dir_modes: Vec<(String, u32)> = Vec::new();
    let mut buffer = vec![0u8; FILE_BUFFER];
    reader.for_each(|path, kind, mode, mtime, data| {
        if cancel.is_cancelled() {
            return Err(cancelled());
        }
        let ensure_parent = |dirs: &mut HashSet<String>| -> io::Result<()> {
            if let Some((parent, _)) = path.rsplit_once('/')
                && !dirs.contains(parent)
            {
                fs.create_dir_all(parent).map_err(io::Error::from)?;
                dirs.insert(parent.to_string());
            }
            Ok(())
        };
        match kind {
            EntryKind::Dir => {
                if !fresh && fs.lstat(path).is_ok_and(|m| m.kind != FsKind::Directory) {
                    clear_for_file(fs, path)?;
                }
                fs.create_dir_all(path).map_err(io::Error::from)?;
                dirs.insert(path.to_string());
                dir_modes.push((path.to_string(), mode & 0o777));
            }
            EntryKind::File { size } => {
                ensure_parent(&mut dirs)?;
                if !fresh {
                    clear_for_file(fs, path)?;
                }
                let file = create_file(fs, path, mode)?;
                // Positional writes: no seek and no size query around each one.
                let mut written = 0u64;
                while written < size {
                    let want =
                        usize::try_from((size - written).min(FILE_BUFFER as u64)).unwrap_or(FILE_BUFFER);
                    let n = data.read(&mut buffer[..want])?;
                    if n == 0 {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "archive entry ends early",
                        ));
                    }
                    file.write_all_at(&buffer[..n], written)
                        .map_err(io::Error::from)?;
                    written += n as u64;
                }
                finish_file(&file, mode, mtime)?;
                done.files += 1;
                done.content_bytes += size;
            }
            EntryKind::Symlink { target } => {
                ensure_parent(&mut dirs)?;
                if !fresh {
                    clear_for_file(fs, path)?;
                }
                match fs.symlink(&target, path) {
                    Ok(()) => {}
                    Err(FsError::Escape(_) | FsError::BadPath(_)) => {
                        refuse(&mut done, path, "symlink pointing outside the server root");
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            EntryKind::Refused(why) => refuse(&mut done, path, why),
        }
        progress.tick(done.files, done.content_bytes);
        Ok(())
    })?;
    reader.finish(expected)?;
    // Folder modes last, so a read-only folder does not stop its own contents being written.
    for (path, mode) in dir_modes.iter().rev() {
        if *mode != 0o755 {
            let _ = fs.set_permissions(path, *mode);
        }
    }
    progress.done(done.files, done.content_bytes);
    Ok(done)
}

fn refuse(done: &mut Extracted, path: &str, why: &str) {
    tracing::warn!(path, "restore refused an entry: {why}");
    if done.refused.len() < 100 {
        done.refused.push(format!("{path}: {why}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backups::format::WriteOptions;

    fn digest_of(bytes: &[u8]) -> Digest {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(bytes);
        Digest {
            size: bytes.len() as u64,
            sha256: hex::encode(ctx.finish().as_ref()),
        }
    }

    fn server_fs(dir: &std::path::Path, limit: u64) -> ServerFs {
        let uid = rustix::process::getuid().as_raw();
        let gid = rustix::process::getgid().as_raw();
        ServerFs::open_root(dir, uid, gid, limit, &[]).unwrap()
    }

    fn quiet() -> Progress<impl FnMut(u64, u64)> {
        Progress::new(Duration::from_secs(3600), |_, _| {})
    }

    /// A hand-made archive with every trick: nothing lands outside, the rest is created.
    #[test]
    fn extraction_refuses_escapes_links_and_devices() {
        let mut tar = tar::Builder::new(Vec::new());
        let mut add = |kind: tar::EntryType, path: &[u8], link: Option<&str>, data: &[u8]| {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(kind);
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.as_old_mut().name[..path.len()].copy_from_slice(path);
            if let Some(link) = link {
                h.set_link_name(link).unwrap();
            }
            h.set_cksum();
            tar.append(&h, data).unwrap();
        };
        add(tar::EntryType::Regular, b"/tmp/mamba-evil-abs", None, b"x");
        add(tar::EntryType::Regular, b"a/../../mamba-evil-dotdot", None, b"x");
        add(tar::EntryType::Link, b"hard", Some("/etc/passwd"), b"");
        add(tar::EntryType::Block, b"disk", None, b"");
        add(tar::EntryType::Symlink, b"out", Some("../../outside"), b"");
        add(tar::EntryType::Symlink, b"abs", Some("/etc"), b"");
        add(tar::EntryType::Directory, b"ok", None, b"");
        add(tar::EntryType::Regular, b"ok/file.txt", None, b"fine");
        add(tar::EntryType::Symlink, b"ok/link", Some("file.txt"), b"");
        let raw = tar.into_inner().unwrap();
        let bytes = zstd::encode_all(&raw[..], 3).unwrap();
        let parent = tempfile::tempdir().unwrap();
        let root = parent.path().join("root");
        std::fs::create_dir(&root).unwrap();
        let fs = server_fs(&root, u64::MAX);
        let done = extract(
            &fs,
            &bytes[..],
            None,
            &digest_of(&bytes),
            true,
            &CancellationToken::new(),
            &mut quiet(),
        )
        .unwrap();
        assert_eq!(done.refused.len(), 6, "{:?}", done.refused);
        assert_eq!(std::fs::read(root.join("ok/file.txt")).unwrap(), b"fine");
        assert_eq!(
            std::fs::read_link(root.join("ok/link")).unwrap(),
            std::path::Path::new("file.txt")
        );
        for gone in ["hard", "disk", "out", "abs"] {
            assert!(std::fs::symlink_metadata(root.join(gone)).is_err(), "{gone}");
        }
        assert!(!parent.path().join("mamba-evil-dotdot").exists());
        assert!(!std::path::Path::new("/tmp/mamba-evil-abs").exists());
    }

    /// A round trip through the jail, then the same restore into a root with a smaller quota.
    #[test]
    fn round_trip_keeps_content_modes_and_links_and_counts_the_quota() {
        let src = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(src.path().join("world/region")).unwrap();
        std::fs::write(src.path().join("world/region/r.0.0.mca"), vec![7u8; 300_000]).unwrap();
        std::fs::write(src.path().join("run.sh"), b"#!/bin/sh\n").unwrap();
        std::fs::set_permissions(
            src.path().join("run.sh"),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        std::fs::write(src.path().join("skip.log"), b"x").unwrap();
        std::os::unix::fs::symlink("world", src.path().join("w")).unwrap();
        let options = WriteOptions {
            level: 3,
            threads: 0,
            key: None,
        };
        let ignore = IgnoreList::new(&["*.log".into()]).unwrap();
        let written = write_archive(
            &server_fs(src.path(), u64::MAX),
            &ignore,
            &options,
            Vec::new(),
            &CancellationToken::new(),
            &mut quiet(),
        )
        .unwrap();
        assert_eq!(written.files, 2);
        let dest = tempfile::tempdir().unwrap();
        std::fs::write(dest.path().join("run.sh"), b"old").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", dest.path().join("w")).unwrap();
        let fs = server_fs(dest.path(), u64::MAX);
        extract(
            &fs,
            &written.sink[..],
            None,
            &written.digest,
            false,
            &CancellationToken::new(),
            &mut quiet(),
        )
        .unwrap();
        assert_eq!(std::fs::read(dest.path().join("run.sh")).unwrap(), b"#!/bin/sh\n");
        let mode = std::fs::metadata(dest.path().join("run.sh"))
            .unwrap()
            .permissions();
        assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777, 0o755);
        assert_eq!(
            std::fs::read_link(dest.path().join("w")).unwrap(),
            std::path::Path::new("world")
        );
        assert_eq!(
            std::fs::read(dest.path().join("world/region/r.0.0.mca"))
                .unwrap()
                .len(),
            300_000
        );
        assert!(!dest.path().join("skip.log").exists());

        let small = tempfile::tempdir().unwrap();
        let fs = server_fs(small.path(), 100_000);
        let err = extract(
            &fs,
            &written.sink[..],
            None,
            &written.digest,
            true,
            &CancellationToken::new(),
            &mut quiet(),
        )
        .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::QuotaExceeded, "{err}");
    }
}
