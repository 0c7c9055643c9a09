//! The two streaming pipelines, free of records and servers so the benchmark runs exactly
//! what wings runs:
//!
//! - backup: walk (blocking thread) → tar → zstd → [seal] → SHA-256 → parts → bounded
//!   channel → uploader (part uploads in parallel) → complete → size check against the store;
//! - restore: download → SHA-256 [+ tags] (verify pass) → download the same version again →
//!   [open] → zstd → tar → extract through the jail (with the server stopped, by the caller).

use std::time::Duration;

use bytes::Bytes;
use mamba_shared::wings_api::BackupAdapter;
use object_store::path::Path as ObjectPath;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::crypto::BackupKey;
use super::format::{Digest, IgnoreList, WriteOptions};
use super::store::{PartWriter, Stores, Upload};
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

/// The verify pass: reads the whole stored object, checking its size, SHA-256 and (when
/// encrypted) every chunk's tag. Answers the ETag it read, so the extract pass can insist on
/// the same version.
pub async fn verify(
    stores: &Stores,
    adapter: BackupAdapter,
    path: &ObjectPath,
    key: Option<BackupKey>,
    expected: &Digest,
) -> Result<Option<String>, String> {
    let (etag, reader) = stores
        .reader(adapter, path, None)
        .await
        .map_err(|e| e.to_string())?;
    let expected = expected.clone();
    tokio::task::spawn_blocking(move || super::format::verify(reader, key.as_ref(), &expected))
        .await
        .map_err(|e| format!("verify task: {e}"))?
        .map_err(|e| format!("the archive failed verification: {e}"))?;
    Ok(etag)
}

pub struct ExtractJob {
    pub adapter: BackupAdapter,
    pub path: ObjectPath,
    /// The version the verify pass read.
    pub etag: Option<String>,
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
    let (_, reader) = stores
        .reader(job.adapter, &job.path, job.etag)
        .await
        .map_err(|e| format!("the archive changed since it was verified: {e}"))?;
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
            key.as_ref(),
            &expected,
            truncate,
            &cancel,
            &mut progress,
        )
    })
    .await
    .map_err(|e| format!("restore task: {e}"))?
    .map_err(|e| e.to_string())
}
