//! The two ends that touch a server's files, both through the jailed filesystem
//! ([`crate::files::ServerFs`]): walking the root into an archive, and extracting an archive
//! into the root.

use std::hash::{Hash, Hasher};
use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

use tokio_util::sync::CancellationToken;

use super::format::{
    ArchiveCheck, ArchiveReader, ArchiveWriter, Digest, EntryKind, IgnoreList, WriteOptions,
};
use crate::files::{EntryKind as FsKind, FsError, FsFile, ServerFs, TreeWriter};

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
pub fn write_archive<W: Write + Send + 'static>(
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

/// What the decoder hands to a writer: an entry, then (for a file) its content in pieces of
/// at most [`PIECE`] bytes.
enum Piece {
    Entry {
        path: String,
        kind: EntryKind,
        mode: u32,
        mtime: i64,
    },
    Data(Vec<u8>),
}

/// File content is handed over in pieces of at most this size, and pieces are sent in
/// batches of about this much (many small files in one hand-over, so the threads do not wake
/// each other for every file). With the batches that may wait per writer, this bounds the
/// memory a restore holds between the threads to a few MiB per writer.
const PIECE: usize = 256 * 1024;
const BATCHES_QUEUED: usize = 8;
const BATCH_ENTRIES: usize = 256;

/// Writer threads for a restore into an emptied root. Each fills the folders it is given
/// (by a hash of the folder's path), so no two wait on the same folder's lock, and file
/// creation, which bounds a restore, runs in several folders at once.
const WRITERS: usize = 3;

/// A writer's side of its channel: the pieces of the batch at hand, then the next batches.
struct Pieces {
    rx: mpsc::Receiver<Vec<Piece>>,
    batch: std::vec::IntoIter<Piece>,
}

impl Pieces {
    fn next(&mut self) -> Option<Piece> {
        loop {
            if let Some(piece) = self.batch.next() {
                return Some(piece);
            }
            self.batch = self.rx.recv().ok()?.into_iter();
        }
    }
}

/// Reads one file's content out of the pieces that follow its entry.
struct PieceReader<'a> {
    pieces: &'a mut Pieces,
    current: Vec<u8>,
    at: usize,
}

impl Read for PieceReader<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.at == self.current.len() {
            match self.pieces.next() {
                Some(Piece::Data(data)) => {
                    self.current = data;
                    self.at = 0;
                }
                // The decoder stopped (its error is reported) or sent the next entry early.
                Some(Piece::Entry { .. }) | None => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "archive entry ends early",
                    ));
                }
            }
        }
        let n = out.len().min(self.current.len() - self.at);
        out[..n].copy_from_slice(&self.current[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// The decoder's side of one writer's channel: pieces gathered into a batch until it is big
/// enough to send.
struct Lane {
    tx: mpsc::SyncSender<Vec<Piece>>,
    batch: Vec<Piece>,
    bytes: usize,
}

impl Lane {
    fn push(&mut self, piece: Piece) -> io::Result<()> {
        if let Piece::Data(data) = &piece {
            self.bytes += data.len();
        }
        self.batch.push(piece);
        if self.bytes >= PIECE || self.batch.len() >= BATCH_ENTRIES {
            self.send()?;
        }
        Ok(())
    }

    fn send(&mut self) -> io::Result<()> {
        if self.batch.is_empty() {
            return Ok(());
        }
        self.bytes = 0;
        self.tx
            .send(std::mem::take(&mut self.batch))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the restore stopped"))
    }
}

/// Files and bytes written so far, by all writers.
#[derive(Default)]
struct Counts {
    files: AtomicU64,
    bytes: AtomicU64,
}

/// What one writer leaves to do or report once every writer is done.
#[derive(Default)]
struct WriterDone {
    refused: Vec<String>,
    dir_modes: Vec<(String, u32)>,
}

/// One writer: creates the entries sent to it, in the order they come, through the jail.
fn write_entries(
    mut tree: TreeWriter,
    mut pieces: Pieces,
    cancel: &CancellationToken,
    counts: &Counts,
) -> io::Result<WriterDone> {
    let mut written = WriterDone::default();
    let mut buffer = vec![0u8; FILE_BUFFER];
    while let Some(piece) = pieces.next() {
        if cancel.is_cancelled() {
            return Err(cancelled());
        }
        let Piece::Entry {
            path,
            kind,
            mode,
            mtime,
        } = piece
        else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "content without an entry",
            ));
        };
        match kind {
            EntryKind::Dir => {
                tree.create_dir(&path).map_err(io::Error::from)?;
                written.dir_modes.push((path, mode & 0o777));
            }
            EntryKind::File { size } => {
                let mut data = PieceReader {
                    pieces: &mut pieces,
                    current: Vec::new(),
                    at: 0,
                };
                let file = tree
                    .create_file(&path, mode, size, &mut data, &mut buffer)
                    .map_err(io::Error::from)?;
                finish_file(&file, mode, mtime)?;
                counts.files.fetch_add(1, Ordering::Relaxed);
                counts.bytes.fetch_add(size, Ordering::Relaxed);
            }
            EntryKind::Symlink { target } => match tree.symlink(&target, &path) {
                Ok(()) => {}
                Err(FsError::Escape(_) | FsError::BadPath(_)) => {
                    refuse(
                        &mut written.refused,
                        &path,
                        "symlink pointing outside the server root",
                    );
                }
                Err(e) => return Err(e.into()),
            },
            EntryKind::Refused(why) => refuse(&mut written.refused, &path, why),
        }
    }
    Ok(written)
}

/// The writer for an entry: the one filling its folder (a folder's own entry goes to the
/// writer that fills it, so it exists before its contents arrive there).
fn lane(path: &str, kind: &EntryKind, lanes: usize) -> usize {
    if lanes == 1 {
        return 0;
    }
    let folder = match kind {
        EntryKind::Dir => path,
        _ => path.rsplit_once('/').map_or("", |(parent, _)| parent),
    };
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    folder.hash(&mut hasher);
    usize::try_from(hasher.finish() % lanes as u64).unwrap_or(0)
}

/// The decoding half of a restore: opens, decompresses and parses the archive, sending each
/// entry to its writer, then checks the whole stream as `check` says.
fn decode(
    source: impl Read,
    check: ArchiveCheck<'_>,
    lanes: &mut [Lane],
    cancel: &CancellationToken,
    mut tick: impl FnMut(),
) -> io::Result<()> {
    let mut reader = ArchiveReader::new(source, check.key, check.recheck)?;
    let count = lanes.len();
    reader.for_each(|path, kind, mode, mtime, data| {
        if cancel.is_cancelled() {
            return Err(cancelled());
        }
        let size = match kind {
            EntryKind::File { size } => size,
            _ => 0,
        };
        let to = &mut lanes[lane(path, &kind, count)];
        to.push(Piece::Entry {
            path: path.to_string(),
            kind,
            mode,
            mtime,
        })?;
        let mut left = size;
        while left > 0 {
            let want = usize::try_from(left).unwrap_or(PIECE).min(PIECE);
            let mut piece = Vec::with_capacity(want);
            let read = Read::take(&mut *data, want as u64).read_to_end(&mut piece)?;
            if read == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "archive entry ends early",
                ));
            }
            left -= read as u64;
            to.push(Piece::Data(piece))?;
        }
        tick();
        Ok(())
    })?;
    for lane in lanes.iter_mut() {
        lane.send()?;
    }
    reader.finish(check.expected)
}

/// Extracts an archive into the server root through the jail. `fresh` says the root was
/// just emptied, so nothing needs clearing first. Bytes written count against the quota;
/// an entry that would escape the root, or is a hard link or device, is refused and listed.
/// The stream is checked at the end as `check` says (the verify pass already checked it once).
///
/// The archive is decoded on this thread while writer threads create the files. Into an
/// emptied root, [`WRITERS`] threads fill different folders at once; otherwise one writer
/// keeps the archive's order, which replacing what is in the way relies on.
pub fn extract(
    fs: &ServerFs,
    source: impl Read,
    check: ArchiveCheck<'_>,
    fresh: bool,
    cancel: &CancellationToken,
    progress: &mut Progress<impl FnMut(u64, u64)>,
) -> io::Result<Extracted> {
    let writers = if fresh { WRITERS } else { 1 };
    let trees = (0..writers)
        .map(|_| fs.tree_writer(!fresh))
        .collect::<Result<Vec<_>, _>>()
        .map_err(io::Error::from)?;
    let counts = Counts::default();
    let (decoded, written) = std::thread::scope(|scope| {
        let mut lanes = Vec::new();
        let mut handles = Vec::new();
        for tree in trees {
            let (tx, rx) = mpsc::sync_channel(BATCHES_QUEUED);
            let counts = &counts;
            let pieces = Pieces {
                rx,
                batch: Vec::new().into_iter(),
            };
            // A writer that fails drops its receiver, which stops the decoder at its next
            // batch for it; the decoder's end closes every writer's channel.
            handles.push(scope.spawn(move || write_entries(tree, pieces, cancel, counts)));
            lanes.push(Lane {
                tx,
                batch: Vec::new(),
                bytes: 0,
            });
        }
        let decoded = decode(source, check, &mut lanes, cancel, || {
            progress.tick(
                counts.files.load(Ordering::Relaxed),
                counts.bytes.load(Ordering::Relaxed),
            );
        });
        drop(lanes);
        let written: Vec<io::Result<WriterDone>> = handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(io::Error::other("a restore writer panicked")))
            })
            .collect();
        (decoded, written)
    });
    // A writer's own error says what went wrong, unless it only saw the decoder stop early.
    let mut done = Extracted::default();
    let mut dir_modes = Vec::new();
    let mut writer_error = None;
    for result in written {
        match result {
            Ok(w) => {
                for why in w.refused {
                    if done.refused.len() < 100 {
                        done.refused.push(why);
                    }
                }
                dir_modes.extend(w.dir_modes);
            }
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                writer_error.get_or_insert(e);
            }
            Err(e) => return Err(e),
        }
    }
    decoded?;
    if let Some(e) = writer_error {
        return Err(e);
    }
    // Folder modes last, deepest first, so a read-only folder does not stop its own contents
    // being written.
    dir_modes.sort_unstable_by(|a, b| b.0.cmp(&a.0));
    for (path, mode) in &dir_modes {
        if *mode != 0o755 {
            let _ = fs.set_permissions(path, *mode);
        }
    }
    done.files = counts.files.load(Ordering::Relaxed);
    done.content_bytes = counts.bytes.load(Ordering::Relaxed);
    progress.done(done.files, done.content_bytes);
    Ok(done)
}

fn refuse(refused: &mut Vec<String>, path: &str, why: &str) {
    tracing::warn!(path, "restore refused an entry: {why}");
    if refused.len() < 100 {
        refused.push(format!("{path}: {why}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backups::format::{Recheck, WriteOptions};

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
            ArchiveCheck {
                key: None,
                expected: &digest_of(&bytes),
                recheck: Recheck::Sha256,
            },
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
            ArchiveCheck {
                key: None,
                expected: &written.digest,
                recheck: Recheck::Sha256,
            },
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
            ArchiveCheck {
                key: None,
                expected: &written.digest,
                recheck: Recheck::Sha256,
            },
            true,
            &CancellationToken::new(),
            &mut quiet(),
        )
        .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::QuotaExceeded, "{err}");
    }
}
