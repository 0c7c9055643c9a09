//! The two ends that touch a server's files, both through the jailed filesystem
//! ([`crate::files::ServerFs`]): walking the root into an archive, and extracting an archive
//! into the root.

use std::collections::HashSet;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::time::{Duration, Instant, SystemTime};

use tokio_util::sync::CancellationToken;

use super::crypto::BackupKey;
use super::format::{ArchiveReader, ArchiveWriter, Digest, EntryKind, IgnoreList, WriteOptions};
use crate::files::{EntryKind as FsKind, FsError, OpenOptions, ServerFs};

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
            FsKind::File => match fs.open_read(&entry.path) {
                Ok((file, meta)) => {
                    let reader = BufReader::with_capacity(FILE_BUFFER, file);
                    archive.add_file(&entry.path, meta.mode, meta.modified, meta.size, reader)?;
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
                let want = mode & 0o777;
                ensure_parent(&mut dirs)?;
                if !fresh {
                    clear_for_file(fs, path)?;
                }
                let file = fs
                    .open(
                        path,
                        &OpenOptions {
                            write: true,
                            create: true,
                            exclusive: true,
                            mode: want | 0o200,
                            ..OpenOptions::default()
                        },
                    )
                    .map_err(io::Error::from)?;
                let mut out = BufWriter::with_capacity(FILE_BUFFER, file);
                let mut left = size;
                while left > 0 {
                    let n = data.read(
                        &mut buffer[..usize::try_from(left.min(FILE_BUFFER as u64)).unwrap_or(FILE_BUFFER)],
                    )?;
                    if n == 0 {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "archive entry ends early",
                        ));
                    }
                    out.write_all(&buffer[..n])?;
                    left -= n as u64;
                }
                let file = out.into_inner().map_err(|e| e.into_error())?;
                // Bits the umask took, or an owner without write permission (created writable
                // so the content could be written).
                if want & 0o022 != 0 || want & 0o200 == 0 {
                    file.set_permissions(want).map_err(io::Error::from)?;
                }
                drop(file);
                let modified =
                    SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(mtime).unwrap_or(0));
                let _ = fs.set_times(path, None, Some(modified));
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
