//! Compressing files into zip, tar.gz or tar.zst, and unpacking zip, tar, tar.gz and tar.zst,
//! all through [`ServerFs`].
//!
//! Unpacking reads the archive twice. The first pass looks only at the entries' headers and
//! refuses the whole archive before anything is created if any entry is unsafe: a name that
//! is absolute, holds `..`, a backslash or NUL; a hard link, device or FIFO; a symlink whose
//! target is absolute or climbs out of the root; an entry that would be written through a
//! symlink of the same archive; or one path that is both a symlink and something else. The
//! second pass writes, counting the bytes actually written (never the sizes the headers
//! claim) against the quota and a ratio to the archive's size; when a limit is hit, what the
//! pass created is removed again.

use std::collections::{HashMap, HashSet};
use std::io::{self, Read, Seek, Write};

use mamba_shared::files_api::ArchiveFormat;

use super::{EntryKind, FsError, FsFile, FsResult, OpenOptions, ServerFs, clean_path, join};

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error(transparent)]
    Files(#[from] FsError),
    #[error("unsafe archive entry {name:?}: {reason}")]
    Unsafe { name: String, reason: String },
    #[error("the archive expands beyond {0}")]
    Bomb(String),
    #[error("unsupported archive: {0}")]
    Unsupported(String),
    #[error("corrupt archive: {0}")]
    Corrupt(String),
}

fn corrupt(e: impl std::fmt::Display) -> ArchiveError {
    ArchiveError::Corrupt(e.to_string())
}

/// Limits for unpacking.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_ratio: u64,
    pub max_entries: u64,
}

/// Below this, the ratio limit does not apply: small archives of very compressible text are
/// normal, and a few MiB cannot hurt.
const RATIO_FLOOR: u64 = 16 * 1024 * 1024;

// ---- compress ----------------------------------------------------------------------------

/// Packs `files` (relative to `root`) into the new archive `root/name`. Folders are packed
/// with everything in them; symlinks are stored as links, never followed. Returns the
/// archive's path and size. A failed archive is removed.
pub fn compress(
    fs: &ServerFs,
    root: &str,
    files: &[String],
    format: ArchiveFormat,
    name: &str,
) -> Result<(String, u64), ArchiveError> {
    let root = clean_path(root)?.to_string();
    if name.is_empty() || name.contains(['/', '\\', '\0']) || name == "." || name == ".." {
        return Err(FsError::BadPath(name.into()).into());
    }
    let target = join(&root, name);
    let mut sources = Vec::with_capacity(files.len());
    for f in files {
        let rel = clean_path(f)?;
        if rel == "." {
            return Err(FsError::BadPath(f.clone()).into());
        }
        let path = join(&root, rel);
        fs.lstat(&path)?;
        sources.push((rel.to_string(), path));
    }
    if sources.is_empty() {
        return Err(FsError::BadPath("no files to compress".into()).into());
    }
    let out = fs.open(
        &target,
        &OpenOptions {
            write: true,
            create: true,
            exclusive: true,
            ..OpenOptions::default()
        },
    )?;
    let result = match format {
        ArchiveFormat::Zip => write_zip(fs, &sources, &target, out),
        ArchiveFormat::TarGz => {
            let encoder = flate2::write::GzEncoder::new(out, flate2::Compression::default());
            write_tar(fs, &sources, &target, encoder).and_then(|enc| enc.finish().map_err(io_error(&target)))
        }
        ArchiveFormat::TarZst => zstd::stream::write::Encoder::new(out, 3)
            .map_err(io_error(&target))
            .and_then(|mut enc| {
                let _ = enc.multithread(2);
                write_tar(fs, &sources, &target, enc)
            })
            .and_then(|enc| enc.finish().map_err(io_error(&target))),
    };
    match result {
        Ok(file) => {
            file.sync_all()?;
            let size = file.metadata()?.size;
            Ok((target, size))
        }
        Err(e) => {
            let _ = fs.remove_file(&target);
            Err(e)
        }
    }
}

fn io_error(path: &str) -> impl Fn(io::Error) -> ArchiveError + '_ {
    move |e| match e.downcast::<FsError>() {
        Ok(fs) => ArchiveError::Files(fs),
        Err(e) => ArchiveError::Files(FsError::Io {
            path: path.into(),
            source: e,
        }),
    }
}

/// Every entry to pack: `(name in the archive, server path, metadata, link target)`.
fn entries(
    fs: &ServerFs,
    sources: &[(String, String)],
    skip: &str,
) -> impl Iterator<Item = FsResult<(String, String, super::Metadata, Option<String>)>> {
    let fs = fs.clone();
    let skip = skip.to_string();
    sources.iter().cloned().flat_map(move |(name, path)| {
        let first = fs.lstat(&path).map(|meta| {
            let target = (meta.kind == EntryKind::Symlink)
                .then(|| fs.read_link(&path).ok())
                .flatten();
            (name.clone(), path.clone(), meta, target)
        });
        let is_dir = first.as_ref().is_ok_and(|(_, _, m, _)| m.is_dir());
        let below: Box<dyn Iterator<Item = FsResult<_>>> = if is_dir {
            match fs.walk(&path) {
                Ok(walker) => {
                    let (name, path, skip) = (name.clone(), path.clone(), skip.clone());
                    Box::new(walker.filter_map(move |e| {
                        let e = match e {
                            Ok(e) => e,
                            Err(e) => return Some(Err(e)),
                        };
                        if e.path == skip {
                            return None;
                        }
                        let inner = e
                            .path
                            .strip_prefix(&path)
                            .unwrap_or(&e.path)
                            .trim_start_matches('/');
                        Some(Ok((join(&name, inner), e.path.clone(), e.meta, e.symlink_target)))
                    }))
                }
                Err(e) => Box::new(std::iter::once(Err(e))),
            }
        } else {
            Box::new(std::iter::empty())
        };
        std::iter::once(first).chain(below)
    })
}

fn write_tar<W: Write>(
    fs: &ServerFs,
    sources: &[(String, String)],
    target: &str,
    out: W,
) -> Result<W, ArchiveError> {
    let mut builder = tar::Builder::new(out);
    builder.follow_symlinks(false);
    for entry in entries(fs, sources, target) {
        let (name, path, meta, link) = entry?;
        let mut header = tar::Header::new_gnu();
        header.set_mode(meta.mode);
        header.set_mtime(u64::try_from(meta.modified).unwrap_or(0));
        header.set_uid(0);
        header.set_gid(0);
        match meta.kind {
            EntryKind::Directory => {
                header.set_entry_type(tar::EntryType::Directory);
                header.set_size(0);
                builder
                    .append_data(&mut header, format!("{name}/"), io::empty())
                    .map_err(io_error(&path))?;
            }
            EntryKind::Symlink => {
                header.set_entry_type(tar::EntryType::Symlink);
                header.set_size(0);
                builder
                    .append_link(&mut header, &name, link.unwrap_or_default())
                    .map_err(io_error(&path))?;
            }
            EntryKind::File => {
                let (file, meta) = fs.open_read(&path)?;
                header.set_entry_type(tar::EntryType::Regular);
                header.set_size(meta.size);
                // The game may be writing the file: exactly the size the header states is
                // packed, padded with zeros if it shrank meanwhile.
                let reader = file.take(meta.size).chain(io::repeat(0)).take(meta.size);
                builder
                    .append_data(&mut header, &name, reader)
                    .map_err(io_error(&path))?;
            }
            EntryKind::Other => {}
        }
    }
    builder.into_inner().map_err(io_error(target))
}

fn write_zip(
    fs: &ServerFs,
    sources: &[(String, String)],
    target: &str,
    out: FsFile,
) -> Result<FsFile, ArchiveError> {
    let mut zip = zip::ZipWriter::new(out);
    let zip_error = |e: zip::result::ZipError| match e {
        zip::result::ZipError::Io(e) => io_error(target)(e),
        e => ArchiveError::Corrupt(e.to_string()),
    };
    for entry in entries(fs, sources, target) {
        let (name, path, meta, link) = entry?;
        let options = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated)
            .unix_permissions(meta.mode)
            .large_file(meta.size >= u64::from(u32::MAX));
        match meta.kind {
            EntryKind::Directory => zip
                .add_directory(format!("{name}/"), options)
                .map_err(zip_error)?,
            EntryKind::Symlink => zip
                .add_symlink(name, link.unwrap_or_default(), options)
                .map_err(zip_error)?,
            EntryKind::File => {
                let (file, meta) = fs.open_read(&path)?;
                zip.start_file(name, options).map_err(zip_error)?;
                io::copy(&mut file.take(meta.size), &mut zip).map_err(io_error(&path))?;
            }
            EntryKind::Other => {}
        }
    }
    zip.finish().map_err(zip_error)
}

// ---- decompress --------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Zip,
    Tar,
    TarGz,
    TarZst,
}

fn detect(head: &[u8]) -> Option<Kind> {
    if head.starts_with(b"PK\x03\x04") || head.starts_with(b"PK\x05\x06") {
        Some(Kind::Zip)
    } else if head.starts_with(&[0x1f, 0x8b]) {
        Some(Kind::TarGz)
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Some(Kind::TarZst)
    } else if head.len() >= 512 && (&head[257..262] == b"ustar" || tar_checksum_ok(&head[..512])) {
        Some(Kind::Tar)
    } else {
        None
    }
}

/// Whether a 512-byte block is a tar header by its checksum (old tars have no magic).
fn tar_checksum_ok(block: &[u8]) -> bool {
    let field = String::from_utf8_lossy(&block[148..156]);
    let Ok(stated) = u32::from_str_radix(field.trim_matches(|c: char| c == '\0' || c == ' '), 8) else {
        return false;
    };
    let sum: u32 = block
        .iter()
        .enumerate()
        .map(|(i, b)| {
            if (148..156).contains(&i) {
                32
            } else {
                u32::from(*b)
            }
        })
        .sum();
    sum == stated && block.iter().any(|b| *b != 0)
}

/// What an entry is, as far as unpacking goes.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Planned {
    Dir,
    File,
    Symlink(String),
}

/// Checks an entry's name and returns it cleaned (without a trailing `/`).
fn entry_name(raw: &[u8]) -> Result<String, ArchiveError> {
    let unsafe_name = |reason: &str| ArchiveError::Unsafe {
        name: String::from_utf8_lossy(raw).into_owned(),
        reason: reason.into(),
    };
    let name = std::str::from_utf8(raw).map_err(|_| unsafe_name("not UTF-8"))?;
    let name = name.strip_prefix("./").unwrap_or(name);
    if name.starts_with('/') {
        return Err(unsafe_name("absolute path"));
    }
    if name.contains('\\') || name.contains('\0') {
        return Err(unsafe_name("backslash or NUL in the name"));
    }
    if name.split('/').any(|c| c == "..") {
        return Err(unsafe_name("'..' in the path"));
    }
    match clean_path(name) {
        Ok(".") => Err(unsafe_name("empty name")),
        Ok(clean) => Ok(clean.to_string()),
        Err(_) => Err(unsafe_name("invalid path")),
    }
}

/// A symlink `target` at `link` (relative to the unpack folder `base`) must be relative and
/// stay inside the server root.
fn check_link(base: &str, link: &str, target: &str) -> Result<(), ArchiveError> {
    let bad = |reason: &str| ArchiveError::Unsafe {
        name: link.into(),
        reason: format!("symlink to {target:?}: {reason}"),
    };
    if target.is_empty() || target.starts_with('/') || target.contains(['\\', '\0']) {
        return Err(bad("absolute or invalid target"));
    }
    let full = join(base, link);
    let mut depth: i64 = full.split('/').filter(|c| !c.is_empty() && *c != ".").count() as i64 - 1;
    for c in target.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                depth -= 1;
                if depth < 0 {
                    return Err(bad("leaves the server folder"));
                }
            }
            _ => depth += 1,
        }
    }
    Ok(())
}

/// Pass one: the whole plan, or a refusal.
fn validate(base: &str, plan: &[(String, Planned)], limits: Limits) -> Result<(), ArchiveError> {
    if plan.len() as u64 > limits.max_entries {
        return Err(ArchiveError::Bomb(format!("{} entries", limits.max_entries)));
    }
    let mut kinds: HashMap<&str, &Planned> = HashMap::new();
    let mut links: HashSet<&str> = HashSet::new();
    for (name, planned) in plan {
        if let Planned::Symlink(target) = planned {
            check_link(base, name, target)?;
            links.insert(name);
        }
        if let Some(previous) = kinds.insert(name, planned) {
            let same = matches!(
                (previous, planned),
                (Planned::Dir, Planned::Dir) | (Planned::File, Planned::File)
            );
            if !same {
                return Err(ArchiveError::Unsafe {
                    name: name.clone(),
                    reason: "the archive holds this path twice, as different kinds".into(),
                });
            }
        }
    }
    for (name, _) in plan {
        let mut prefix = String::new();
        let components: Vec<&str> = name.split('/').collect();
        for c in &components[..components.len().saturating_sub(1)] {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(c);
            if links.contains(prefix.as_str()) {
                return Err(ArchiveError::Unsafe {
                    name: name.clone(),
                    reason: format!("written through the archive's own symlink {prefix:?}"),
                });
            }
        }
    }
    Ok(())
}

struct Extractor<'a> {
    fs: &'a ServerFs,
    base: String,
    max_bytes: u64,
    written: u64,
    entries: u64,
    /// Paths this unpack created, to remove if it fails.
    created: Vec<String>,
}

impl Extractor<'_> {
    fn dir(&mut self, name: &str) -> Result<(), ArchiveError> {
        let path = join(&self.base, name);
        self.make_parents(&path)?;
        match self.fs.create_dir(&path) {
            Ok(()) => self.created.push(path),
            Err(FsError::Exists(_)) if self.fs.lstat(&path)?.is_dir() => {}
            Err(e) => return Err(e.into()),
        }
        self.entries += 1;
        Ok(())
    }

    fn make_parents(&mut self, path: &str) -> Result<(), ArchiveError> {
        let Some((parent, _)) = path.rsplit_once('/') else {
            return Ok(());
        };
        let mut prefix = String::new();
        for c in parent.split('/') {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(c);
            match self.fs.create_dir(&prefix) {
                Ok(()) => self.created.push(prefix.clone()),
                Err(FsError::Exists(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    fn file(&mut self, name: &str, mode: u32, data: &mut dyn Read) -> Result<(), ArchiveError> {
        let path = join(&self.base, name);
        self.make_parents(&path)?;
        let file = match self.fs.open(
            &path,
            &OpenOptions {
                write: true,
                create: true,
                exclusive: true,
                mode: mode & 0o777,
                ..OpenOptions::default()
            },
        ) {
            Ok(f) => {
                self.created.push(path.clone());
                f
            }
            Err(FsError::Exists(_)) => self.fs.open(&path, &OpenOptions::replace())?,
            Err(e) => return Err(e.into()),
        };
        let mut buf = vec![0u8; 256 * 1024];
        let mut offset = 0u64;
        loop {
            let n = data.read(&mut buf).map_err(corrupt)?;
            if n == 0 {
                break;
            }
            self.written += n as u64;
            if self.written > self.max_bytes {
                return Err(ArchiveError::Bomb(format!(
                    "{} bytes (the ratio limit for this archive)",
                    self.max_bytes
                )));
            }
            file.write_all_at(&buf[..n], offset)?;
            offset += n as u64;
        }
        if mode & 0o777 != 0 {
            let _ = file.set_permissions(mode & 0o777);
        }
        self.entries += 1;
        Ok(())
    }

    fn symlink(&mut self, name: &str, target: &str) -> Result<(), ArchiveError> {
        let path = join(&self.base, name);
        self.make_parents(&path)?;
        self.fs.symlink(target, &path)?;
        self.created.push(path);
        self.entries += 1;
        Ok(())
    }

    fn undo(&mut self) {
        for path in self.created.drain(..).rev() {
            let _ = self.fs.remove(&path);
        }
    }
}

fn tar_plan<R: Read>(reader: R) -> Result<Vec<(String, Planned)>, ArchiveError> {
    let mut archive = tar::Archive::new(reader);
    let mut plan = Vec::new();
    for entry in archive.entries().map_err(corrupt)? {
        let entry = entry.map_err(corrupt)?;
        let name = entry_name(&entry.path_bytes())?;
        let planned = match entry.header().entry_type() {
            tar::EntryType::Regular | tar::EntryType::Continuous => Planned::File,
            tar::EntryType::Directory => Planned::Dir,
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .map(|t| String::from_utf8_lossy(&t).into_owned())
                    .unwrap_or_default();
                Planned::Symlink(target)
            }
            tar::EntryType::Link => {
                return Err(ArchiveError::Unsafe {
                    name,
                    reason: "hard links are not unpacked".into(),
                });
            }
            other => {
                return Err(ArchiveError::Unsafe {
                    name,
                    reason: format!("entry type {other:?} is not unpacked"),
                });
            }
        };
        plan.push((name, planned));
    }
    Ok(plan)
}

fn tar_extract<R: Read>(reader: R, ex: &mut Extractor<'_>) -> Result<(), ArchiveError> {
    let mut archive = tar::Archive::new(reader);
    for entry in archive.entries().map_err(corrupt)? {
        let mut entry = entry.map_err(corrupt)?;
        let name = entry_name(&entry.path_bytes())?;
        let mode = entry.header().mode().unwrap_or(0o644);
        match entry.header().entry_type() {
            tar::EntryType::Directory => ex.dir(&name)?,
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .map(|t| String::from_utf8_lossy(&t).into_owned())
                    .unwrap_or_default();
                ex.symlink(&name, &target)?;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => ex.file(&name, mode, &mut entry)?,
            _ => return Err(corrupt("the archive changed between passes")),
        }
    }
    Ok(())
}

fn open_tar(fs: &ServerFs, path: &str, kind: Kind) -> Result<Box<dyn Read>, ArchiveError> {
    let (file, _) = fs.trusted().open_read(path)?;
    let file = io::BufReader::with_capacity(256 * 1024, file);
    Ok(match kind {
        Kind::TarGz => Box::new(flate2::read::MultiGzDecoder::new(file)),
        Kind::TarZst => Box::new(zstd::stream::read::Decoder::with_buffer(file).map_err(corrupt)?),
        _ => Box::new(file),
    })
}

fn zip_plan<R: Read + Seek>(zip: &mut zip::ZipArchive<R>) -> Result<Vec<(String, Planned)>, ArchiveError> {
    let mut plan = Vec::with_capacity(zip.len());
    for i in 0..zip.len() {
        let mut entry = zip.by_index(i).map_err(corrupt)?;
        let raw = entry.name_raw().to_vec();
        let name = entry_name(&raw)?;
        let planned = if entry.is_symlink() {
            let mut target = String::new();
            (&mut entry)
                .take(4096)
                .read_to_string(&mut target)
                .map_err(corrupt)?;
            Planned::Symlink(target)
        } else if entry.is_dir() {
            Planned::Dir
        } else {
            Planned::File
        };
        plan.push((name, planned));
    }
    Ok(plan)
}

fn zip_extract<R: Read + Seek>(
    zip: &mut zip::ZipArchive<R>,
    plan: &[(String, Planned)],
    ex: &mut Extractor<'_>,
) -> Result<(), ArchiveError> {
    for (i, (name, planned)) in plan.iter().enumerate() {
        match planned {
            Planned::Dir => ex.dir(name)?,
            Planned::Symlink(target) => ex.symlink(name, target)?,
            Planned::File => {
                let mut entry = zip.by_index(i).map_err(corrupt)?;
                let mode = entry.unix_mode().unwrap_or(0o644);
                ex.file(name, mode, &mut entry)?;
            }
        }
    }
    Ok(())
}

/// Unpacks `root/file` into `root`. Returns `(entries, bytes written)`.
pub fn decompress(fs: &ServerFs, root: &str, file: &str, limits: Limits) -> Result<(u64, u64), ArchiveError> {
    let base = clean_path(root)?.to_string();
    let path = join(&base, clean_path(file)?);
    let (mut archive, meta) = fs.open_read(&path)?;
    let mut head = vec![0u8; 512];
    let mut got = 0;
    while got < head.len() {
        let n = archive.read(&mut head[got..]).map_err(corrupt)?;
        if n == 0 {
            break;
        }
        got += n;
    }
    head.truncate(got);
    let kind = detect(&head)
        .ok_or_else(|| ArchiveError::Unsupported("not a zip, tar, tar.gz or tar.zst file".into()))?;
    let mut ex = Extractor {
        fs,
        base: base.clone(),
        max_bytes: meta.size.saturating_mul(limits.max_ratio).max(RATIO_FLOOR),
        written: 0,
        entries: 0,
        created: Vec::new(),
    };
    let result = match kind {
        Kind::Zip => {
            archive.rewind().map_err(corrupt)?;
            let mut zip = zip::ZipArchive::new(io::BufReader::new(archive)).map_err(corrupt)?;
            let plan = zip_plan(&mut zip)?;
            validate(&base, &plan, limits)?;
            zip_extract(&mut zip, &plan, &mut ex)
        }
        _ => {
            let plan = tar_plan(open_tar(fs, &path, kind)?)?;
            validate(&base, &plan, limits)?;
            tar_extract(open_tar(fs, &path, kind)?, &mut ex)
        }
    };
    match result {
        Ok(()) => Ok((ex.entries, ex.written)),
        Err(e) => {
            ex.undo();
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    const LIMITS: Limits = Limits {
        max_ratio: 100,
        max_entries: 1000,
    };

    fn root(limit: u64) -> (tempfile::TempDir, ServerFs) {
        let dir = tempfile::tempdir().unwrap();
        let uid = rustix::process::getuid().as_raw();
        let gid = rustix::process::getgid().as_raw();
        let fs = ServerFs::open_root(dir.path(), uid, gid, limit, &[]).unwrap();
        (dir, fs)
    }

    /// A raw tar built by hand, so names and types can be anything.
    fn raw_tar(entries: &[(&str, tar::EntryType, &str, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        for (name, kind, link, data) in entries {
            let mut header = tar::Header::new_old();
            let bytes = header.as_old_mut();
            bytes.name[..name.len()].copy_from_slice(name.as_bytes());
            bytes.linkname[..link.len()].copy_from_slice(link.as_bytes());
            header.set_entry_type(*kind);
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_cksum();
            out.extend_from_slice(header.as_bytes());
            out.extend_from_slice(data);
            out.resize(out.len().div_ceil(512) * 512, 0);
        }
        out.resize(out.len() + 1024, 0);
        out
    }

    fn gz(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn round_trips_every_format_with_links_kept_as_links() {
        for format in [ArchiveFormat::Zip, ArchiveFormat::TarGz, ArchiveFormat::TarZst] {
            let (dir, fs) = root(u64::MAX / 2);
            fs.create_dir_all("src/world/region").unwrap();
            fs.write_file_atomic("src/world/level.dat", b"level").unwrap();
            fs.write_file_atomic("src/world/region/r.0.0", &[7u8; 100_000])
                .unwrap();
            fs.write_file_atomic("src/top.txt", b"top").unwrap();
            fs.symlink("world/level.dat", "src/latest").unwrap();
            let name = format!("a.{}", format.extension());
            let (archive, size) = compress(
                &fs,
                "src",
                &["world".into(), "top.txt".into(), "latest".into()],
                format,
                &name,
            )
            .unwrap();
            assert_eq!(archive, format!("src/{name}"));
            assert!(size > 0);
            fs.create_dir("out").unwrap();
            fs.rename(&archive, &format!("out/{name}"), false).unwrap();
            let (entries, written) = decompress(&fs, "out", &name, LIMITS).unwrap();
            assert_eq!(entries, 6, "{format:?}");
            assert_eq!(written, 100_008);
            assert_eq!(fs.read_file("out/world/level.dat", 100).unwrap(), b"level");
            assert_eq!(
                fs.read_file("out/world/region/r.0.0", 200_000).unwrap(),
                vec![7u8; 100_000]
            );
            assert_eq!(fs.read_link("out/latest").unwrap(), "world/level.dat");
            assert!(dir.path().join("out/top.txt").exists());
        }
    }

    #[test]
    fn unsafe_entries_are_refused_before_anything_is_created() {
        let cases: Vec<(&str, Vec<u8>)> = vec![
            (
                "dotdot",
                raw_tar(&[
                    ("ok.txt", tar::EntryType::Regular, "", b"x"),
                    ("../evil", tar::EntryType::Regular, "", b"x"),
                ]),
            ),
            (
                "absolute",
                raw_tar(&[
                    ("ok.txt", tar::EntryType::Regular, "", b"x"),
                    ("/etc/evil", tar::EntryType::Regular, "", b"x"),
                ]),
            ),
            (
                "nested dotdot",
                raw_tar(&[("a/../../evil", tar::EntryType::Regular, "", b"x")]),
            ),
            (
                "backslash",
                raw_tar(&[("..\\evil", tar::EntryType::Regular, "", b"x")]),
            ),
            (
                "hardlink",
                raw_tar(&[
                    ("ok.txt", tar::EntryType::Regular, "", b"x"),
                    ("h", tar::EntryType::Link, "/etc/passwd", b""),
                ]),
            ),
            (
                "symlink out",
                raw_tar(&[
                    ("ok.txt", tar::EntryType::Regular, "", b"x"),
                    ("l", tar::EntryType::Symlink, "/etc", b""),
                ]),
            ),
            (
                "symlink up",
                raw_tar(&[("l", tar::EntryType::Symlink, "../..", b"")]),
            ),
            (
                "file through own symlink",
                raw_tar(&[
                    ("l", tar::EntryType::Symlink, "sub", b""),
                    ("sub", tar::EntryType::Directory, "", b""),
                    ("l/x", tar::EntryType::Regular, "", b"x"),
                ]),
            ),
            (
                "symlink and folder with one name",
                raw_tar(&[
                    ("d", tar::EntryType::Directory, "", b""),
                    ("d", tar::EntryType::Symlink, "other", b""),
                ]),
            ),
            ("fifo", raw_tar(&[("p", tar::EntryType::Fifo, "", b"")])),
        ];
        for (what, data) in cases {
            let (dir, fs) = root(u64::MAX / 2);
            fs.create_dir("x").unwrap();
            fs.write_file_atomic("x/a.tar.gz", &gz(&data)).unwrap();
            let err = decompress(&fs, "x", "a.tar.gz", LIMITS).unwrap_err();
            assert!(matches!(err, ArchiveError::Unsafe { .. }), "{what}: {err}");
            let left: Vec<_> = std::fs::read_dir(dir.path().join("x"))
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            assert_eq!(left, vec!["a.tar.gz"], "{what}: nothing is created");
        }
    }

    #[test]
    fn zip_slip_names_are_refused() {
        let mut buf = io::Cursor::new(Vec::new());
        {
            let mut zip = zip::ZipWriter::new(&mut buf);
            let o = zip::write::SimpleFileOptions::default();
            zip.start_file("fine.txt", o).unwrap();
            zip.write_all(b"x").unwrap();
            zip.start_file("../../evil.txt", o).unwrap();
            zip.write_all(b"x").unwrap();
            zip.finish().unwrap();
        }
        let (dir, fs) = root(u64::MAX / 2);
        fs.write_file_atomic("a.zip", buf.get_ref()).unwrap();
        assert!(matches!(
            decompress(&fs, "", "a.zip", LIMITS),
            Err(ArchiveError::Unsafe { .. })
        ));
        assert!(!dir.path().join("fine.txt").exists());
    }

    #[test]
    fn bombs_stop_at_the_ratio_or_the_quota_and_leave_nothing() {
        // 64 MiB of zeros compresses to about 64 KiB: far past the ratio.
        let zeros = vec![0u8; 64 * 1024 * 1024];
        let data = gz(&raw_tar(&[("bomb", tar::EntryType::Regular, "", &zeros)]));
        let (dir, fs) = root(u64::MAX / 2);
        fs.write_file_atomic("b.tar.gz", &data).unwrap();
        assert!(matches!(
            decompress(&fs, "", "b.tar.gz", LIMITS),
            Err(ArchiveError::Bomb(_))
        ));
        assert!(!dir.path().join("bomb").exists());

        // Within the ratio but past the quota.
        let (dir, fs) = root(8 * 1024 * 1024);
        let data = gz(&raw_tar(&[(
            "big",
            tar::EntryType::Regular,
            "",
            &zeros[..10 * 1024 * 1024],
        )]));
        fs.write_file_atomic("b.tar.gz", &data).unwrap();
        let generous = Limits {
            max_ratio: 100_000,
            max_entries: 10,
        };
        assert!(matches!(
            decompress(&fs, "", "b.tar.gz", generous),
            Err(ArchiveError::Files(FsError::QuotaExceeded { .. }))
        ));
        assert!(!dir.path().join("big").exists());
        assert!(fs.used_bytes() < 1024 * 1024);

        let many: Vec<(String, tar::EntryType, &str, &[u8])> = (0..20)
            .map(|i| (format!("f{i}"), tar::EntryType::Regular, "", &b""[..]))
            .collect();
        let many: Vec<(&str, tar::EntryType, &str, &[u8])> =
            many.iter().map(|(n, k, l, d)| (n.as_str(), *k, *l, *d)).collect();
        fs.write_file_atomic("m.tar", &raw_tar(&many)).unwrap();
        let r = decompress(&fs, "", "m.tar", generous);
        assert!(matches!(r, Err(ArchiveError::Bomb(_))), "{r:?}");
    }

    #[test]
    fn a_planted_symlink_in_the_destination_leads_nowhere_outside() {
        let (dir, fs) = root(u64::MAX / 2);
        let outside = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("world")).unwrap();
        let data = raw_tar(&[("world/evil", tar::EntryType::Regular, "", b"x")]);
        fs.write_file_atomic("a.tar", &data).unwrap();
        assert!(decompress(&fs, "", "a.tar", LIMITS).is_err());
        assert!(!outside.path().join("evil").exists());
    }
}
