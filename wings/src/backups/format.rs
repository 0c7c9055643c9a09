//! The backup format: a tar stream, compressed with multi-threaded zstd, optionally encrypted
//! in authenticated chunks ([`super::crypto`]). The SHA-256 and size recorded are those of
//! the stored object, so a downloaded file can be checked with `sha256sum`.
//!
//! Writing and reading here are plain synchronous `Write`/`Read` stacks: the caller runs them
//! on a blocking thread and connects them to the object store with bounded channels.

use std::io::{self, Read, Write};
use std::path::{Component, Path};
use std::sync::mpsc;

use super::crypto::{BackupKey, OpenReader, SealWriter};

/// Counts and (unless only counting) hashes every byte that passes through.
struct Digesting<T> {
    inner: T,
    hash: Option<ring::digest::Context>,
    bytes: u64,
}

impl<T> Digesting<T> {
    fn new(inner: T) -> Self {
        Digesting {
            inner,
            hash: Some(ring::digest::Context::new(&ring::digest::SHA256)),
            bytes: 0,
        }
    }

    fn counting(inner: T) -> Self {
        Digesting {
            inner,
            hash: None,
            bytes: 0,
        }
    }

    /// The size, and the SHA-256 when hashing (empty when only counting).
    fn summary(self) -> (T, Digest) {
        (
            self.inner,
            Digest {
                size: self.bytes,
                sha256: self
                    .hash
                    .map(|h| hex::encode(h.finish().as_ref()))
                    .unwrap_or_default(),
            },
        )
    }

    fn update(&mut self, data: &[u8]) {
        if let Some(hash) = &mut self.hash {
            hash.update(data);
        }
        self.bytes += data.len() as u64;
    }
}

impl<W: Write> Write for Digesting<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(data)?;
        self.update(&data[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl<R: Read> Read for Digesting<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(out)?;
        self.update(&out[..n]);
        Ok(n)
    }
}

/// Size and SHA-256 (hex) of a stored archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Digest {
    pub size: u64,
    pub sha256: String,
}

enum Sealing<W: Write> {
    Plain(W),
    Sealed(Box<SealWriter<W>>),
}

impl<W: Write> Write for Sealing<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        match self {
            Sealing::Plain(w) => w.write(data),
            Sealing::Sealed(w) => w.write(data),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Sealing::Plain(w) => w.flush(),
            Sealing::Sealed(w) => w.flush(),
        }
    }
}

impl<W: Write> Sealing<W> {
    fn finish(self) -> io::Result<W> {
        match self {
            Sealing::Plain(mut w) => {
                w.flush()?;
                Ok(w)
            }
            Sealing::Sealed(w) => w.finish(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct WriteOptions {
    /// zstd level (1 to 19; 3 is zstd's default).
    pub level: i32,
    /// zstd worker threads; 0 compresses on the calling thread.
    pub threads: u32,
    pub key: Option<BackupKey>,
}

type Compressor<W> = zstd::stream::write::Encoder<'static, Sealing<Digesting<W>>>;

/// Bytes gathered before each call into zstd: tar headers and small files arrive in pieces of
/// a few hundred bytes, and each zstd call has a fixed cost.
const BATCH: usize = 1 << 20;

/// Full batches waiting for the compressing thread: the walk and file reads run this far
/// ahead of compression, hashing and part building.
const BATCHES_QUEUED: usize = 4;

/// Where full batches go: into the compressor on this thread, or to a thread running it, so
/// reading files overlaps with feeding zstd, sealing, hashing and building parts.
enum Compress<W: Write> {
    Here(Box<Compressor<W>>),
    Thread {
        full: Option<mpsc::SyncSender<(Vec<u8>, usize)>>,
        empty: mpsc::Receiver<Vec<u8>>,
        worker: Option<std::thread::JoinHandle<io::Result<Compressor<W>>>>,
    },
}

impl<W: Write + Send + 'static> Compress<W> {
    fn new(compressor: Compressor<W>, threaded: bool) -> io::Result<Compress<W>> {
        if !threaded {
            return Ok(Compress::Here(Box::new(compressor)));
        }
        let (full, batches) = mpsc::sync_channel::<(Vec<u8>, usize)>(BATCHES_QUEUED);
        let (recycle, empty) = mpsc::channel();
        let worker = std::thread::Builder::new()
            .name("backup-zstd".into())
            .spawn(move || {
                let mut compressor = compressor;
                for (batch, len) in batches {
                    compressor.write_all(&batch[..len])?;
                    // The producer may have finished; then the buffer is simply freed.
                    let _ = recycle.send(batch);
                }
                Ok(compressor)
            })?;
        Ok(Compress::Thread {
            full: Some(full),
            empty,
            worker: Some(worker),
        })
    }

    /// The compressing thread's own error, once it has stopped.
    fn stopped(worker: &mut Option<std::thread::JoinHandle<io::Result<Compressor<W>>>>) -> io::Error {
        match worker.take().map(std::thread::JoinHandle::join) {
            Some(Ok(Err(e))) => e,
            Some(Err(_)) => io::Error::other("the compressing thread panicked"),
            _ => io::Error::new(io::ErrorKind::BrokenPipe, "the compressing thread stopped"),
        }
    }

    /// Compresses the first `len` bytes of `batch`; answers an empty buffer to fill next.
    fn take(&mut self, batch: Vec<u8>, len: usize) -> io::Result<Vec<u8>> {
        match self {
            Compress::Here(compressor) => {
                compressor.write_all(&batch[..len])?;
                Ok(batch)
            }
            Compress::Thread { full, empty, worker } => {
                let sent = full.as_ref().map(|full| full.send((batch, len)));
                if !matches!(sent, Some(Ok(()))) {
                    return Err(Self::stopped(worker));
                }
                Ok(empty.try_recv().unwrap_or_else(|_| vec![0u8; BATCH]))
            }
        }
    }

    fn finish(self) -> io::Result<Compressor<W>> {
        match self {
            Compress::Here(compressor) => Ok(*compressor),
            Compress::Thread {
                mut full, mut worker, ..
            } => {
                // Closing the channel ends the thread's loop once it has compressed the rest.
                full.take();
                match worker.take().map(std::thread::JoinHandle::join) {
                    Some(Ok(result)) => result,
                    Some(Err(_)) => Err(io::Error::other("the compressing thread panicked")),
                    None => Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "the compressing thread stopped",
                    )),
                }
            }
        }
    }
}

/// Gathers writes into one large buffer for the compressor, and reads file content straight
/// into it (one copy from the page cache, none through intermediate buffers).
struct Batch<W: Write> {
    out: Compress<W>,
    buf: Vec<u8>,
    filled: usize,
}

impl<W: Write + Send + 'static> Batch<W> {
    fn new(out: Compress<W>) -> Batch<W> {
        Batch {
            out,
            buf: vec![0u8; BATCH],
            filled: 0,
        }
    }

    fn drain(&mut self) -> io::Result<()> {
        if self.filled > 0 {
            let full = std::mem::take(&mut self.buf);
            self.buf = self.out.take(full, self.filled)?;
            self.filled = 0;
        }
        Ok(())
    }

    /// Copies up to `len` bytes from `source`; answers how many there were before its end.
    fn read_from(&mut self, source: &mut impl Read, len: u64) -> io::Result<u64> {
        let mut copied = 0u64;
        while copied < len {
            if self.filled == self.buf.len() {
                self.drain()?;
            }
            let room =
                (self.buf.len() - self.filled).min(usize::try_from(len - copied).unwrap_or(usize::MAX));
            let n = match source.read(&mut self.buf[self.filled..self.filled + room]) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            self.filled += n;
            copied += n as u64;
        }
        Ok(copied)
    }

    fn zeros(&mut self, mut len: u64) -> io::Result<()> {
        const ZEROS: [u8; 4096] = [0; 4096];
        while len > 0 {
            let n = usize::try_from(len).unwrap_or(usize::MAX).min(ZEROS.len());
            self.write_all(&ZEROS[..n])?;
            len -= n as u64;
        }
        Ok(())
    }

    fn into_inner(mut self) -> io::Result<Compressor<W>> {
        self.drain()?;
        self.out.finish()
    }
}

impl<W: Write + Send + 'static> Write for Batch<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.filled == self.buf.len() {
            self.drain()?;
        }
        let n = data.len().min(self.buf.len() - self.filled);
        self.buf[self.filled..self.filled + n].copy_from_slice(&data[..n]);
        self.filled += n;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.drain()
    }
}

/// Builds an archive into `W`, one entry at a time.
pub struct ArchiveWriter<W: Write + Send + 'static> {
    tar: tar::Builder<Batch<W>>,
    pub files: u64,
    /// Bytes of file content added (before compression).
    pub content_bytes: u64,
}

impl<W: Write + Send + 'static> ArchiveWriter<W> {
    pub fn new(sink: W, options: &WriteOptions) -> io::Result<ArchiveWriter<W>> {
        let digesting = Digesting::new(sink);
        let sealing = match &options.key {
            Some(key) => Sealing::Sealed(Box::new(SealWriter::new(digesting, key)?)),
            None => Sealing::Plain(digesting),
        };
        let mut zstd = zstd::stream::write::Encoder::new(sealing, options.level)?;
        if options.threads > 0 {
            zstd.multithread(options.threads)?;
        }
        // zstd's own frame checksum catches corruption even in unencrypted archives that are
        // restored without their record.
        zstd.include_checksum(true)?;
        let mut tar = tar::Builder::new(Batch::new(Compress::new(zstd, options.threads > 0)?));
        tar.mode(tar::HeaderMode::Complete);
        Ok(ArchiveWriter {
            tar,
            files: 0,
            content_bytes: 0,
        })
    }

    fn header(kind: tar::EntryType, mode: u32, mtime: i64, size: u64) -> tar::Header {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(kind);
        header.set_mode(mode & 0o7777);
        header.set_mtime(u64::try_from(mtime).unwrap_or(0));
        header.set_size(size);
        header.set_uid(0);
        header.set_gid(0);
        header
    }

    pub fn add_dir(&mut self, path: &str, mode: u32, mtime: i64) -> io::Result<()> {
        let mut header = Self::header(tar::EntryType::Directory, mode, mtime, 0);
        self.tar.append_data(&mut header, path, io::empty())
    }

    /// Adds a regular file of `size` bytes. A file that grows or shrinks while it is read (a
    /// game writing its log) is cut or zero-padded to `size`, so the archive stays valid.
    pub fn add_file(
        &mut self,
        path: &str,
        mode: u32,
        mtime: i64,
        size: u64,
        mut data: impl Read,
    ) -> io::Result<()> {
        let mut header = Self::header(tar::EntryType::Regular, mode, mtime, size);
        // The header (and a GNU long-name entry before it when needed) alone: with no data
        // the tar crate writes no padding either, so the content and its padding follow here.
        self.tar.append_data(&mut header, path, io::empty())?;
        let out = self.tar.get_mut();
        let read = out.read_from(&mut data, size)?;
        let padding = (512 - size % 512) % 512;
        out.zeros(size - read + padding)?;
        self.files += 1;
        self.content_bytes += size;
        Ok(())
    }

    pub fn add_symlink(&mut self, path: &str, target: &str, mtime: i64) -> io::Result<()> {
        let mut header = Self::header(tar::EntryType::Symlink, 0o777, mtime, 0);
        self.tar.append_link(&mut header, path, target)
    }

    /// Ends the tar stream, the zstd frame and the last encrypted chunk; answers the sink and
    /// the stored size and checksum.
    pub fn finish(self) -> io::Result<(W, Digest)> {
        let zstd = self.tar.into_inner()?.into_inner()?;
        let sealing = zstd.finish()?;
        let digesting = sealing.finish()?;
        let (mut sink, digest) = digesting.summary();
        sink.flush()?;
        Ok((sink, digest))
    }
}

/// Reads the whole stored stream, checking its size and SHA-256 and, when encrypted, every
/// chunk's tag. Nothing is decompressed or written: this is the pass that runs before a
/// restore touches any file.
pub fn verify(source: impl Read, key: Option<&BackupKey>, expected: &Digest) -> io::Result<()> {
    let mut digesting = Digesting::new(source);
    match key {
        Some(key) => {
            drain(&mut OpenReader::new(&mut digesting, key)?)?;
            // The reader stops after the last chunk; anything beyond it is counted too.
            drain(&mut digesting)?;
        }
        None => {
            drain(&mut digesting)?;
        }
    }
    let (_, digest) = digesting.summary();
    check_digest(&digest, expected, Recheck::Sha256)
}

/// Reads `source` to its end in large pieces (`io::copy` would read 8 KiB at a time).
fn drain(source: &mut impl Read) -> io::Result<()> {
    let mut buf = vec![0u8; READ_BUFFER];
    loop {
        match source.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// What extraction checks of the stored stream, besides zstd's frame checksum and (when
/// encrypted) every chunk's tag, which are always checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recheck {
    /// Size and SHA-256 against the record: for bytes fetched again from the store.
    Sha256,
    /// Size only: for the very file the verify pass read, still open, so its bytes are the
    /// ones whose SHA-256 was just checked.
    SizeOnly,
}

/// What reading a stored archive needs and checks: its key when encrypted, the size and
/// SHA-256 recorded, and how much of that to check again.
#[derive(Clone, Copy)]
pub struct ArchiveCheck<'a> {
    pub key: Option<&'a BackupKey>,
    pub expected: &'a Digest,
    pub recheck: Recheck,
}

fn check_digest(actual: &Digest, expected: &Digest, recheck: Recheck) -> io::Result<()> {
    if actual.size != expected.size {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "the archive is {} bytes, the record says {}",
                actual.size, expected.size
            ),
        ));
    }
    if recheck == Recheck::Sha256 && actual.sha256 != expected.sha256 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "the archive's SHA-256 does not match the record",
        ));
    }
    Ok(())
}

enum Opening<R: Read> {
    Plain(R),
    Opened(Box<OpenReader<R>>),
}

impl<R: Read> Read for Opening<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        match self {
            Opening::Plain(r) => r.read(out),
            Opening::Opened(r) => r.read(out),
        }
    }
}

type Decompressor<R> =
    io::BufReader<zstd::stream::read::Decoder<'static, io::BufReader<Opening<Digesting<R>>>>>;

/// Pieces for draining a stream to its end.
const READ_BUFFER: usize = 1 << 20;

/// Decompressed bytes buffered for the tar reader: its 512-byte header reads and small files
/// are served from here instead of one zstd call each; larger reads bypass it.
const TAR_READ_BUFFER: usize = 64 * 1024;

/// Reads an archive's entries; [`ArchiveReader::finish`] reads whatever is left and checks the
/// whole stream's size and, with [`Recheck::Sha256`], its SHA-256.
pub struct ArchiveReader<R: Read> {
    tar: tar::Archive<Decompressor<R>>,
    recheck: Recheck,
}

/// One entry, as extraction sees it: a checked relative path and what to make there.
#[derive(Debug, PartialEq, Eq)]
pub enum EntryKind {
    Dir,
    File {
        size: u64,
    },
    Symlink {
        target: String,
    },
    /// Hard links, devices, fifos and anything else: never created.
    Refused(&'static str),
}

impl<R: Read> ArchiveReader<R> {
    pub fn new(source: R, key: Option<&BackupKey>, recheck: Recheck) -> io::Result<ArchiveReader<R>> {
        let digesting = match recheck {
            Recheck::Sha256 => Digesting::new(source),
            Recheck::SizeOnly => Digesting::counting(source),
        };
        let opening = match key {
            Some(key) => Opening::Opened(Box::new(OpenReader::new(digesting, key)?)),
            None => Opening::Plain(digesting),
        };
        let zstd = zstd::stream::read::Decoder::new(opening)?;
        Ok(ArchiveReader {
            tar: tar::Archive::new(io::BufReader::with_capacity(TAR_READ_BUFFER, zstd)),
            recheck,
        })
    }

    /// Calls `each` with every entry's checked path, kind, mode, mtime and content reader.
    /// Entries whose path is absolute, contains `..` or is not UTF-8 come with
    /// `EntryKind::Refused`.
    pub fn for_each(
        &mut self,
        mut each: impl FnMut(&str, EntryKind, u32, i64, &mut dyn Read) -> io::Result<()>,
    ) -> io::Result<()> {
        for entry in self.tar.entries()? {
            let mut entry = entry?;
            let header = entry.header();
            let mode = header.mode().unwrap_or(0o644);
            let mtime = header.mtime().map_or(0, |t| i64::try_from(t).unwrap_or(0));
            let raw_path = entry.path()?.into_owned();
            let kind = match header.entry_type() {
                tar::EntryType::Regular | tar::EntryType::Continuous => {
                    EntryKind::File { size: entry.size() }
                }
                tar::EntryType::Directory => EntryKind::Dir,
                tar::EntryType::Symlink => match entry.link_name()?.as_deref().and_then(Path::to_str) {
                    Some(target) => EntryKind::Symlink {
                        target: target.to_string(),
                    },
                    None => EntryKind::Refused("symlink without a UTF-8 target"),
                },
                tar::EntryType::Link => EntryKind::Refused("hard link"),
                tar::EntryType::Char | tar::EntryType::Block => EntryKind::Refused("device file"),
                tar::EntryType::Fifo => EntryKind::Refused("fifo"),
                _ => EntryKind::Refused("unsupported entry type"),
            };
            let (path, kind) = match relative_path(&raw_path) {
                Some(path) => (path, kind),
                None => (
                    raw_path.to_string_lossy().into_owned(),
                    EntryKind::Refused("absolute path, '..' or not UTF-8"),
                ),
            };
            each(&path, kind, mode, mtime, &mut entry)?;
        }
        Ok(())
    }

    /// Reads to the end of the stored stream (also past the tar end marker) and checks it
    /// against `expected`.
    pub fn finish(self, expected: &Digest) -> io::Result<()> {
        let recheck = self.recheck;
        let mut buffered = self.tar.into_inner();
        drain(&mut buffered)?;
        let zstd = buffered.into_inner();
        let mut opening = zstd.finish().into_inner();
        drain(&mut opening)?;
        let mut digesting = match opening {
            Opening::Plain(r) => r,
            Opening::Opened(r) => (*r).into_inner(),
        };
        drain(&mut digesting)?;
        let (_, digest) = digesting.summary();
        check_digest(&digest, expected, recheck)
    }
}

/// A tar path as a clean relative path: only normal components (and `.`), UTF-8, not empty.
pub fn relative_path(path: &Path) -> Option<String> {
    let mut parts = Vec::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => parts.push(part.to_str()?),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    (!parts.is_empty()).then(|| parts.join("/"))
}

/// Gitignore-style patterns, matched against paths relative to the server root.
///
/// Supported: `#` comments, `!` negation (the last matching pattern wins), a trailing `/` for
/// folders only, a `/` anywhere but the end anchoring the pattern to the root (otherwise it
/// matches at any depth), `*`, `?`, `[...]` and `**`. An ignored folder is not descended
/// into, so (as in git) a negation cannot bring back a file inside it.
#[derive(Debug, Clone, Default)]
pub struct IgnoreList {
    set: globset::GlobSet,
    rules: Vec<Rule>,
}

#[derive(Debug, Clone)]
struct Rule {
    negated: bool,
    dirs_only: bool,
}

pub const MAX_IGNORE_PATTERNS: usize = 1000;
const MAX_PATTERN_BYTES: usize = 1024;

impl IgnoreList {
    pub fn new(patterns: &[String]) -> Result<IgnoreList, String> {
        if patterns.len() > MAX_IGNORE_PATTERNS {
            return Err(format!("give at most {MAX_IGNORE_PATTERNS} patterns"));
        }
        let mut builder = globset::GlobSetBuilder::new();
        let mut rules = Vec::new();
        for (i, raw) in patterns.iter().enumerate() {
            if raw.len() > MAX_PATTERN_BYTES || raw.contains(['\0', '\n', '\r']) {
                return Err(format!(
                    "[{i}]: a pattern is one line of at most {MAX_PATTERN_BYTES} bytes"
                ));
            }
            let mut pattern = raw.trim_end();
            if pattern.is_empty() || pattern.starts_with('#') {
                continue;
            }
            let negated = pattern.starts_with('!');
            if negated {
                pattern = &pattern[1..];
            } else if let Some(rest) = pattern.strip_prefix('\\') {
                pattern = rest;
            }
            let dirs_only = pattern.ends_with('/');
            let pattern = pattern.trim_end_matches('/');
            if pattern.is_empty() {
                continue;
            }
            let glob = match pattern.strip_prefix('/') {
                Some(anchored) => anchored.to_string(),
                None if pattern.contains('/') => pattern.to_string(),
                None => format!("**/{pattern}"),
            };
            let glob = globset::GlobBuilder::new(&glob)
                .literal_separator(true)
                .backslash_escape(true)
                .build()
                .map_err(|e| format!("[{i}] {raw:?}: {e}"))?;
            builder.add(glob);
            rules.push(Rule { negated, dirs_only });
        }
        let set = builder.build().map_err(|e| e.to_string())?;
        Ok(IgnoreList { set, rules })
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    pub fn is_ignored(&self, path: &str, is_dir: bool) -> bool {
        if self.rules.is_empty() {
            return false;
        }
        let matches = self.set.matches(path);
        matches
            .iter()
            .rev()
            .map(|&i| &self.rules[i])
            .find(|rule| is_dir || !rule.dirs_only)
            .is_some_and(|rule| !rule.negated)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(key: Option<BackupKey>) -> WriteOptions {
        WriteOptions {
            level: 3,
            threads: 2,
            key,
        }
    }

    fn key() -> BackupKey {
        BackupKey::from_bytes(&[9; 32]).unwrap()
    }

    fn build(key: Option<BackupKey>) -> (Vec<u8>, Digest) {
        let mut w = ArchiveWriter::new(Vec::new(), &options(key)).unwrap();
        w.add_dir("world", 0o755, 1_700_000_000).unwrap();
        let big: Vec<u8> = (0..300_000u32).map(|i| (i % 7) as u8).collect();
        w.add_file(
            "world/level.dat",
            0o644,
            1_700_000_001,
            big.len() as u64,
            &big[..],
        )
        .unwrap();
        // Grew while being read: cut to the size stat saw.
        w.add_file("server.log", 0o600, 0, 5, &b"hello, and more"[..])
            .unwrap();
        // Shrank while being read: zero-padded.
        w.add_file("shrunk", 0o644, 0, 4, &b"ab"[..]).unwrap();
        w.add_symlink("latest", "world/level.dat", 0).unwrap();
        let long = format!("{}/file", "d".repeat(150));
        w.add_file(&long, 0o644, 0, 1, &b"x"[..]).unwrap();
        assert_eq!(w.files, 4);
        w.finish().unwrap()
    }

    fn read_all(
        bytes: &[u8],
        key: Option<&BackupKey>,
        digest: &Digest,
    ) -> io::Result<Vec<(String, EntryKind, Vec<u8>)>> {
        read_checked(bytes, key, digest, Recheck::Sha256)
    }

    fn read_checked(
        bytes: &[u8],
        key: Option<&BackupKey>,
        digest: &Digest,
        recheck: Recheck,
    ) -> io::Result<Vec<(String, EntryKind, Vec<u8>)>> {
        let mut reader = ArchiveReader::new(bytes, key, recheck)?;
        let mut seen = Vec::new();
        reader.for_each(|path, kind, _mode, _mtime, data| {
            let mut content = Vec::new();
            data.read_to_end(&mut content)?;
            seen.push((path.to_string(), kind, content));
            Ok(())
        })?;
        reader.finish(digest)?;
        Ok(seen)
    }

    #[test]
    fn round_trips_plain_and_encrypted() {
        for key in [None, Some(key())] {
            let (bytes, digest) = build(key.clone());
            assert_eq!(digest.size, bytes.len() as u64);
            let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
            ctx.update(&bytes);
            assert_eq!(digest.sha256, hex::encode(ctx.finish().as_ref()));
            verify(&bytes[..], key.as_ref(), &digest).unwrap();
            let seen = read_all(&bytes, key.as_ref(), &digest).unwrap();
            let paths: Vec<_> = seen.iter().map(|(p, _, _)| p.as_str()).collect();
            assert_eq!(
                paths[..5],
                ["world", "world/level.dat", "server.log", "shrunk", "latest"]
            );
            assert!(paths[5].ends_with("dddd/file") && paths[5].len() == 155);
            assert_eq!(seen[1].2.len(), 300_000);
            assert_eq!(seen[2].2, b"hello");
            assert_eq!(seen[3].2, b"ab\0\0");
            assert_eq!(
                seen[4].1,
                EntryKind::Symlink {
                    target: "world/level.dat".into()
                }
            );
            assert_eq!(key.is_some(), OpenReader::<&[u8]>::is_encrypted(&bytes));
        }
    }

    #[test]
    fn tampering_is_caught_by_verify_and_by_the_reader() {
        for key in [None, Some(key())] {
            let (bytes, digest) = build(key.clone());
            let mut bad = bytes.clone();
            let at = bad.len() / 2;
            bad[at] ^= 0x40;
            assert!(verify(&bad[..], key.as_ref(), &digest).is_err());
            assert!(read_all(&bad, key.as_ref(), &digest).is_err());
            let cut = &bytes[..bytes.len() - 1];
            assert!(verify(cut, key.as_ref(), &digest).is_err());
            assert!(read_all(cut, key.as_ref(), &digest).is_err());
            let mut longer = bytes.clone();
            longer.push(0);
            assert!(verify(&longer[..], key.as_ref(), &digest).is_err());
            assert!(read_all(&longer, key.as_ref(), &digest).is_err());
            // Reading the verified file again checks no SHA-256, but a changed byte still
            // fails zstd's frame checksum or the chunk's tag, and a changed length the size.
            for changed in [&bad[..], cut, &longer[..]] {
                let read = read_checked(changed, key.as_ref(), &digest, Recheck::SizeOnly);
                assert!(read.is_err(), "encrypted: {}", key.is_some());
            }
        }
        // The right archive with the wrong key, or no key, is refused.
        let (bytes, digest) = build(Some(key()));
        let other = BackupKey::from_bytes(&[1; 32]).unwrap();
        assert!(verify(&bytes[..], Some(&other), &digest).is_err());
        assert!(read_all(&bytes, None, &digest).is_err());
    }

    #[test]
    fn hostile_entries_are_refused_not_created() {
        let mut tar = tar::Builder::new(Vec::new());
        let mut add = |kind: tar::EntryType, path: &[u8], link: Option<&str>| {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(kind);
            h.set_size(0);
            // Written raw: the tar crate refuses to build some of these itself.
            h.as_old_mut().name[..path.len()].copy_from_slice(path);
            if let Some(link) = link {
                h.set_link_name(link).unwrap();
            }
            h.set_cksum();
            tar.append(&h, io::empty()).unwrap();
        };
        add(tar::EntryType::Regular, b"/etc/evil", None);
        add(tar::EntryType::Regular, b"a/../../evil", None);
        add(tar::EntryType::Link, b"hard", Some("/etc/shadow"));
        add(tar::EntryType::Char, b"dev", None);
        add(tar::EntryType::Fifo, b"fifo", None);
        add(tar::EntryType::Symlink, b"ok-link", Some("../outside"));
        let raw = tar.into_inner().unwrap();
        let mut zstd = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
        zstd.write_all(&raw).unwrap();
        let bytes = zstd.finish().unwrap();
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(&bytes);
        let digest = Digest {
            size: bytes.len() as u64,
            sha256: hex::encode(ctx.finish().as_ref()),
        };
        let seen = read_all(&bytes, None, &digest).unwrap();
        let kinds: Vec<_> = seen.into_iter().map(|(_, k, _)| k).collect();
        assert!(matches!(kinds[0], EntryKind::Refused(_)));
        assert!(matches!(kinds[1], EntryKind::Refused(_)));
        assert_eq!(kinds[2], EntryKind::Refused("hard link"));
        assert_eq!(kinds[3], EntryKind::Refused("device file"));
        assert_eq!(kinds[4], EntryKind::Refused("fifo"));
        // A symlink's target is judged where it is created (the jail refuses escapes).
        assert!(matches!(kinds[5], EntryKind::Symlink { .. }));
    }

    #[test]
    fn relative_paths_are_clean() {
        assert_eq!(relative_path(Path::new("./a/b")).as_deref(), Some("a/b"));
        assert_eq!(relative_path(Path::new("a//b/")).as_deref(), Some("a/b"));
        assert_eq!(relative_path(Path::new("a/../b")), None);
        assert_eq!(relative_path(Path::new("/a")), None);
        assert_eq!(relative_path(Path::new(".")), None);
    }

    #[test]
    fn ignore_list_follows_gitignore_rules() {
        let list = IgnoreList::new(&[
            "# a comment".into(),
            "*.log".into(),
            "!keep.log".into(),
            "cache/".into(),
            "/top.txt".into(),
            "world/region/*.tmp".into(),
            "**/dynmap/**".into(),
            "".into(),
        ])
        .unwrap();
        assert!(list.is_ignored("server.log", false));
        assert!(list.is_ignored("logs/deep/x.log", false));
        assert!(!list.is_ignored("logs/keep.log", false));
        assert!(list.is_ignored("cache", true));
        assert!(list.is_ignored("plugins/cache", true));
        assert!(!list.is_ignored("cache", false), "cache/ means folders only");
        assert!(list.is_ignored("top.txt", false));
        assert!(!list.is_ignored("sub/top.txt", false), "a leading / anchors");
        assert!(list.is_ignored("world/region/r.tmp", false));
        assert!(!list.is_ignored("other/world/region/r.tmp", false));
        assert!(list.is_ignored("plugins/dynmap/tiles/a.png", false));
        assert!(!list.is_ignored("world/level.dat", false));
        assert!(IgnoreList::new(&["a[".into()]).is_err());
        assert!(IgnoreList::new(&["a\nb".into()]).is_err());
        assert!(IgnoreList::new(&[]).unwrap().is_empty());
    }
}
