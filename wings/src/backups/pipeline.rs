//! The two streaming pipelines, free of records and servers so the benchmark runs exactly
//! what wings runs:
//!
//! - backup: walk (blocking thread) → tar → zstd → [seal] → SHA-256 → parts → bounded
//!   channel → uploader (part uploads in parallel) → complete → size check against the store;
//! - restore: download → SHA-256 [+ tags] (verify pass) → read the verified file again, or
//!   download the same version again and re-hash it → [open] → zstd → tar → extract through
//!   the jail (with the server stopped, by the caller).

use std::time::Duration;

use bytes::Bytes;
use mamba_shared::wings_api::BackupAdapter;
use object_store::path::Path as ObjectPath;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::crypto::BackupKey;
use super::format::{ArchiveCheck, Digest, IgnoreList, Recheck, WriteOptions};
use super::store::{ArchiveSource, PartWriter, Stores, Upload};
use super::tree::{self, Extracted, Progress};
use crate::files::ServerFs;

/// What a finished backup reports.
#[derive(Debug, Clone)]
pub struct Archived {
    pub digest: Digest,
    pub files: u64,
    pub content_bytes: u64,
}

pub struct BackupJob {
    pub adapter: BackupAdapter,
    pub path: ObjectPath,
    pub fs: ServerFs,
    pub ignore: IgnoreList,
    pub options: WriteOptions,
    pub progress_interval: Duration,
}

/// Streams the server root into the store. `started` runs once the upload exists (with the
/// S3 upload id) and before any byte is sent; if it fails the upload is aborted. On any
/// failure or cancellation the upload is aborted, so nothing stays in the store.
pub async fn backup(
    stores: &Stores,
    job: BackupJob,
    started: impl FnOnce(Option<&str>) -> Result<(), String>,
    progress: impl FnMut(u64, u64) + Send + 'static,
    cancel: &CancellationToken,
) -> Result<Archived, String> {
    let mut upload = stores
        .begin(job.adapter, &job.path)
        .await
        .map_err(|e| e.to_string())?;
    if let Err(e) = started(upload.s3_id()) {
        abort(&mut upload).await;
        return Err(e);
    }
    let (tx, rx) = mpsc::channel::<Bytes>(1);
    let part_size = stores.part_size();
    let producer = {
        let cancel = cancel.clone();
        let BackupJob {
            fs,
            ignore,
            options,
            progress_interval,
            ..
        } = job;
        tokio::task::spawn_blocking(move || {
            let mut progress = Progress::new(progress_interval, progress);
            let sink = PartWriter::new(tx, part_size);
            let written = tree::write_archive(&fs, &ignore, &options, sink, &cancel, &mut progress)?;
            written.sink.finish()?;
            Ok::<_, std::io::Error>(Archived {
                digest: written.digest,
                files: written.files,
                content_bytes: written.content_bytes,
            })
        })
    };
    let sent = upload.send_parts(rx, cancel).await;
    let produced = producer
        .await
        .map_err(|e| format!("archive task: {e}"))
        .and_then(|r| r.map_err(|e| format!("archiving: {e}")));
    let archived = match (sent, produced) {
        (Ok(parts), Ok(archived)) => {
            if let Err(e) = upload.complete(parts).await {
                abort(&mut upload).await;
                return Err(e.to_string());
            }
            archived
        }
        (sent, produced) => {
            abort(&mut upload).await;
            // The producer's error says why the parts stopped, unless it only saw the
            // uploader go away.
            return Err(if cancel.is_cancelled() {
                "cancelled".into()
            } else {
                match (produced, sent) {
                    (Err(e), Ok(_)) => e,
                    (_, Err(e)) => e.to_string(),
                    (Ok(_), Ok(_)) => "the upload stopped".into(),
                }
            });
        }
    };
    // Complete only once the store itself reports the object with the size written.
    let checked = match stores.size(job.adapter, &job.path).await {
        Ok(size) if size == archived.digest.size => return Ok(archived),
        Ok(size) => format!(
            "the store holds {size} bytes, {} were written",
            archived.digest.size
        ),
        Err(e) => format!("cannot check the uploaded object: {e}"),
    };
    let _ = stores.delete(job.adapter, &job.path).await;
    Err(checked)
}

async fn abort(upload: &mut Upload) {
    if let Err(e) = upload.abort().await {
        tracing::warn!("cannot abort the upload: {e}");
    }
}

/// What the verify pass read, for the extract pass to read again.
#[derive(Debug)]
pub struct Verified {
    /// The version read, so a download for the extract pass can insist on it.
    etag: Option<String>,
    /// A local archive's file, kept open: the extract pass reads these very bytes again
    /// rather than opening the path, which could since name another file.
    pinned: Option<std::fs::File>,
}

/// The verify pass: reads the whole stored object, checking its size, SHA-256 and (when
/// encrypted) every chunk's tag.
pub async fn verify(
    stores: &Stores,
    adapter: BackupAdapter,
    path: &ObjectPath,
    key: Option<BackupKey>,
    expected: &Digest,
) -> Result<Verified, String> {
    let (etag, reader) = stores
        .reader(adapter, path, None)
        .await
        .map_err(|e| e.to_string())?;
    let pinned = match &reader {
        ArchiveSource::File(file) => Some(
            file.try_clone()
                .map_err(|e| format!("cannot keep the archive open: {e}"))?,
        ),
        ArchiveSource::Stream(_) => None,
    };
    let expected = expected.clone();
    tokio::task::spawn_blocking(move || super::format::verify(reader, key.as_ref(), &expected))
        .await
        .map_err(|e| format!("verify task: {e}"))?
        .map_err(|e| format!("the archive failed verification: {e}"))?;
    Ok(Verified { etag, pinned })
}

pub struct ExtractJob {
    pub adapter: BackupAdapter,
    pub path: ObjectPath,
    /// What the verify pass read.
    pub verified: Verified,
    pub fs: ServerFs,
    pub key: Option<BackupKey>,
    pub expected: Digest,
    pub truncate: bool,
    pub progress_interval: Duration,
}

/// The extract pass: empties the root with `truncate`, then extracts through the jail.
pub async fn extract(
    stores: &Stores,
    job: ExtractJob,
    progress: impl FnMut(u64, u64) + Send + 'static,
    cancel: &CancellationToken,
) -> Result<Extracted, String> {
    // The file the verify pass hashed is read again from its start through the same open
    // handle, so hashing it again would only re-check bytes already checked; size, zstd's
    // frame checksum and the tags are still checked. A download is hashed again.
    let (reader, recheck) = match job.verified.pinned {
        Some(mut file) => {
            std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(0))
                .map_err(|e| format!("cannot read the archive again: {e}"))?;
            (ArchiveSource::File(file), Recheck::SizeOnly)
        }
        None => {
            let (_, reader) = stores
                .reader(job.adapter, &job.path, job.verified.etag)
                .await
                .map_err(|e| format!("the archive changed since it was verified: {e}"))?;
            (reader, Recheck::Sha256)
        }
    };
    let cancel = cancel.clone();
    let ExtractJob {
        fs,
        key,
        expected,
        truncate,
        progress_interval,
        ..
    } = job;
    tokio::task::spawn_blocking(move || {
        if truncate {
            tree::empty_root(&fs)?;
        }
        let mut progress = Progress::new(progress_interval, progress);
        tree::extract(
            &fs,
            reader,
            ArchiveCheck {
                key: key.as_ref(),
                expected: &expected,
                recheck,
            },
            truncate,
            &cancel,
            &mut progress,
        )
    })
    .await
    .map_err(|e| format!("restore task: {e}"))?
    .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BackupsConfig;

    fn server_fs(dir: &std::path::Path) -> ServerFs {
        let uid = rustix::process::getuid().as_raw();
        let gid = rustix::process::getgid().as_raw();
        ServerFs::open_root(dir, uid, gid, u64::MAX, &[]).unwrap()
    }

    /// A store whose local folder is `<data>/store`, with parts of `part_size_mb`.
    fn local_stores(data: &std::path::Path, part_size_mb: u64) -> Stores {
        let config = BackupsConfig {
            local_dir: data.join("store").display().to_string(),
            part_size_mb,
            ..BackupsConfig::default()
        };
        Stores::new(&config, data).unwrap()
    }

    /// Extracts what `verified` read into a new folder `dest`, emptying nothing else.
    async fn restore_into(
        stores: &Stores,
        path: ObjectPath,
        verified: Verified,
        digest: Digest,
        dest: &std::path::Path,
    ) -> Extracted {
        std::fs::create_dir(dest).unwrap();
        let job = ExtractJob {
            adapter: BackupAdapter::Local,
            path,
            verified,
            fs: server_fs(dest),
            key: None,
            expected: digest,
            truncate: true,
            progress_interval: Duration::from_secs(3600),
        };
        extract(stores, job, |_, _| {}, &CancellationToken::new())
            .await
            .unwrap()
    }

    async fn back_up(stores: &Stores, root: &std::path::Path, id: &str) -> (ObjectPath, Digest) {
        let path = stores.object_path(BackupAdapter::Local, "s", id);
        let job = BackupJob {
            adapter: BackupAdapter::Local,
            path: path.clone(),
            fs: server_fs(root),
            ignore: IgnoreList::default(),
            options: WriteOptions {
                level: 3,
                threads: 0,
                key: None,
            },
            progress_interval: Duration::from_secs(3600),
        };
        let archived = backup(stores, job, |_| Ok(()), |_, _| {}, &CancellationToken::new())
            .await
            .unwrap();
        (path, archived.digest)
    }

    /// Parts written straight to the disk and a short last part through the page cache make
    /// one archive whose bytes hash to the recorded SHA-256 and restore whole.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_local_archive_of_many_parts_is_whole() {
        let data = tempfile::tempdir().unwrap();
        let stores = local_stores(data.path(), 1);
        let src = data.path().join("src");
        std::fs::create_dir(&src).unwrap();
        // Incompressible, so the archive spans several 1 MiB parts and ends part-way.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let noise: Vec<u8> = (0..3_500_000)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state.to_le_bytes()[0]
            })
            .collect();
        std::fs::write(src.join("region.mca"), &noise).unwrap();
        let (path, digest) = back_up(&stores, &src, "parts").await;
        assert!(digest.size > 3 << 20, "{}", digest.size);

        let stored = std::fs::read(data.path().join("store").join(path.as_ref())).unwrap();
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(&stored);
        assert_eq!(stored.len() as u64, digest.size);
        assert_eq!(hex::encode(ctx.finish().as_ref()), digest.sha256);
        let left: Vec<_> = std::fs::read_dir(data.path().join("store/s"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left.len(), 1, "only the archive, no staging file: {left:?}");

        let verified = verify(&stores, BackupAdapter::Local, &path, None, &digest)
            .await
            .unwrap();
        let dest = data.path().join("dest");
        restore_into(&stores, path, verified, digest, &dest).await;
        assert!(std::fs::read(dest.join("region.mca")).unwrap() == noise);
    }

    /// Once verified, a local archive is read again through the handle the verify pass
    /// opened: an archive put in its place afterwards is not what gets extracted.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn extraction_reads_the_very_file_that_was_verified() {
        let data = tempfile::tempdir().unwrap();
        let stores = local_stores(data.path(), BackupsConfig::default().part_size_mb);
        let (genuine, other) = (data.path().join("genuine"), data.path().join("other"));
        for (dir, content) in [(&genuine, "genuine"), (&other, "swapped in")] {
            std::fs::create_dir(dir).unwrap();
            std::fs::write(dir.join("server.properties"), content).unwrap();
        }
        let (path, digest) = back_up(&stores, &genuine, "a").await;
        let (other_path, _) = back_up(&stores, &other, "b").await;

        let verified = verify(&stores, BackupAdapter::Local, &path, None, &digest)
            .await
            .unwrap();
        let store_dir = data.path().join("store");
        std::fs::rename(store_dir.join(other_path.as_ref()), store_dir.join(path.as_ref())).unwrap();

        let dest = data.path().join("dest");
        let done = restore_into(&stores, path, verified, digest, &dest).await;
        assert_eq!(done.files, 1);
        assert_eq!(
            std::fs::read_to_string(dest.join("server.properties")).unwrap(),
            "genuine"
        );
    }
}
