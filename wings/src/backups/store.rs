//! Where archives go: object_store's `LocalFileSystem` for the "local" adapter and `AmazonS3`
//! for "s3", behind one small interface that streams parts in and out.
//!
//! S3 uploads use the low-level multipart API (`MultipartStore`), so the upload id can be
//! saved in the backup's record before the first part is sent; after a crash, wings aborts
//! that upload by id and no parts are left behind. Local uploads go to a staging file
//! (`<name>#<n>`, named as object_store names its own) that is renamed into place on
//! completion; a crash leaves only that file, which the startup sweep removes. Wings writes
//! local parts itself rather than through `LocalFileSystem::put_multipart`, so that each part
//! reaches the disk while later ones are still being compressed: object_store writes parts
//! into the page cache and flushes the whole archive at completion.

use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::StreamExt;
use mamba_shared::wings_api::BackupAdapter;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::local::LocalFileSystem;
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::{BackupsConfig, S3Config};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the s3 adapter is not configured on this node (backups.s3.bucket is empty)")]
    NotConfigured,
    #[error("object store: {0}")]
    Store(#[from] object_store::Error),
    #[error("{0}")]
    Other(String),
}

#[derive(Debug)]
pub struct Stores {
    local: Arc<LocalFileSystem>,
    local_dir: PathBuf,
    s3: Option<Arc<AmazonS3>>,
    s3_prefix: String,
    part_size: usize,
    upload_concurrency: usize,
}

/// An upload in progress. It must end with [`Upload::complete`] or [`Upload::abort`].
pub struct Upload {
    target: Target,
    concurrency: usize,
    aborted: bool,
}

enum Target {
    Local(LocalUpload),
    S3 {
        store: Arc<AmazonS3>,
        path: ObjectPath,
        id: String,
    },
}

impl Upload {
    pub fn s3_id(&self) -> Option<&str> {
        match &self.target {
            Target::S3 { id, .. } => Some(id),
            Target::Local(_) => None,
        }
    }

    /// Uploads the parts arriving on `parts` until the sender is dropped, `concurrency` at a
    /// time, and answers their ids in order. Returning (also with an error) drops the
    /// receiver, which stops the producer at its next part.
    pub async fn send_parts(
        &mut self,
        mut parts: mpsc::Receiver<Bytes>,
        cancel: &CancellationToken,
    ) -> Result<Vec<PartId>, StoreError> {
        let mut in_flight: JoinSet<(usize, Result<Option<PartId>, object_store::Error>)> = JoinSet::new();
        let mut done: Vec<Option<PartId>> = Vec::new();
        let mut next = 0usize;
        let mut open = true;
        loop {
            if !open && in_flight.is_empty() {
                break;
            }
            tokio::select! {
                () = cancel.cancelled() => return Err(StoreError::Other("cancelled".into())),
                joined = in_flight.join_next(), if !in_flight.is_empty() => {
                    let (idx, result) = joined
                        .ok_or_else(|| StoreError::Other("no part in flight".into()))?
                        .map_err(|e| StoreError::Other(format!("part upload task: {e}")))?;
                    done[idx] = result?;
                }
                part = parts.recv(), if open && in_flight.len() < self.concurrency => match part {
                    None => open = false,
                    Some(bytes) => {
                        let idx = next;
                        next += 1;
                        done.push(None);
                        match &mut self.target {
                            Target::Local(u) => {
                                let write = u.put_part(bytes);
                                in_flight.spawn(async move { (idx, write.await.map(|()| None)) });
                            }
                            Target::S3 { store, path, id } => {
                                let (store, path, id) = (store.clone(), path.clone(), id.clone());
                                let payload = PutPayload::from(bytes);
                                in_flight.spawn(async move {
                                    (idx, store.put_part(&path, &id, idx, payload).await.map(Some))
                                });
                            }
                        }
                    }
                },
            }
        }
        Ok(done.into_iter().flatten().collect())
    }

    pub async fn complete(&mut self, parts: Vec<PartId>) -> Result<(), StoreError> {
        match &mut self.target {
            Target::Local(u) => u.complete().await?,
            Target::S3 { store, path, id } => store.complete_multipart(path, id, parts).await.map(|_| ())?,
        }
        Ok(())
    }

    /// Aborts the upload so that no part stays in the store.
    pub async fn abort(&mut self) -> Result<(), StoreError> {
        if std::mem::replace(&mut self.aborted, true) {
            return Ok(());
        }
        match &mut self.target {
            Target::Local(u) => u.abort().await,
            Target::S3 { store, path, id } => store.abort_multipart(path, id).await?,
        }
        Ok(())
    }
}

/// A local upload: parts written at their offsets into a staging file beside the object.
/// Whole parts go straight to the disk (`O_DIRECT`), skipping the page cache: nothing is
/// left to flush at completion, a disk slower than compression holds the backup back
/// (through the bounded parts in flight) instead of filling the host's memory, and the
/// archive does not push the game's own files out of the cache. The last, short part, and
/// every part on a filesystem without `O_DIRECT`, are written through the cache and flushed
/// (`fdatasync`) by their own task as soon as written.
struct LocalUpload {
    file: Arc<std::fs::File>,
    direct: Option<Arc<std::fs::File>>,
    staging: PathBuf,
    dest: PathBuf,
    offset: u64,
    finished: bool,
}

impl LocalUpload {
    fn create(dest: PathBuf) -> Result<LocalUpload, StoreError> {
        let failed = |e: io::Error| StoreError::Other(format!("{}: {e}", dest.display()));
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent).map_err(failed)?;
        }
        for n in 1u32.. {
            let mut staging = dest.clone().into_os_string();
            staging.push(format!("#{n}"));
            let staging = PathBuf::from(staging);
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&staging)
            {
                Ok(file) => {
                    use rustix::fs::{Mode, OFlags};
                    let direct = rustix::fs::open(
                        &staging,
                        OFlags::WRONLY | OFlags::DIRECT | OFlags::CLOEXEC,
                        Mode::empty(),
                    )
                    .ok()
                    .map(|fd| Arc::new(std::fs::File::from(fd)));
                    return Ok(LocalUpload {
                        file: Arc::new(file),
                        direct,
                        staging,
                        dest,
                        offset: 0,
                        finished: false,
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(failed(e)),
            }
        }
        Err(StoreError::Other(format!(
            "{}: no free staging name",
            dest.display()
        )))
    }

    fn put_part(&mut self, bytes: Bytes) -> impl Future<Output = Result<(), object_store::Error>> + use<> {
        let offset = self.offset;
        self.offset += bytes.len() as u64;
        let aligned = bytes.as_ptr().align_offset(PART_ALIGN) == 0
            && bytes.len().is_multiple_of(PART_ALIGN)
            && offset.is_multiple_of(PART_ALIGN as u64);
        let direct = self.direct.clone().filter(|_| aligned);
        let file = self.file.clone();
        let write = tokio::task::spawn_blocking(move || {
            if let Some(direct) = direct {
                match direct.write_all_at(&bytes, offset) {
                    // Some filesystems open with O_DIRECT but refuse the write itself.
                    Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => {}
                    written => return written,
                }
            }
            file.write_all_at(&bytes, offset)?;
            file.sync_data()
        });
        async move {
            write
                .await
                .map_err(io::Error::other)
                .and_then(|written| written)
                .map_err(|source| object_store::Error::Generic {
                    store: "local",
                    source: Box::new(source),
                })
        }
    }

    async fn complete(&mut self) -> Result<(), StoreError> {
        self.finished = true;
        let (file, staging, dest) = (self.file.clone(), self.staging.clone(), self.dest.clone());
        tokio::task::spawn_blocking(move || {
            file.sync_all()?;
            std::fs::rename(&staging, &dest)?;
            match dest.parent() {
                Some(parent) => std::fs::File::open(parent)?.sync_all(),
                None => Ok(()),
            }
        })
        .await
        .map_err(|e| StoreError::Other(format!("completing task: {e}")))?
        .map_err(|e| StoreError::Other(format!("{}: {e}", self.dest.display())))
    }

    async fn abort(&mut self) {
        self.finished = true;
        let staging = self.staging.clone();
        let removed = tokio::task::spawn_blocking(move || std::fs::remove_file(staging)).await;
        if let Ok(Err(e)) = removed
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(staging = %self.staging.display(), "cannot remove the staging file: {e}");
        }
    }
}

impl Drop for LocalUpload {
    fn drop(&mut self) {
        if !self.finished {
            let _ = std::fs::remove_file(&self.staging);
        }
    }
}

impl Stores {
    pub fn new(config: &BackupsConfig, data_dir: &std::path::Path) -> Result<Stores, StoreError> {
        let dir = config.local_dir(data_dir);
        std::fs::create_dir_all(&dir).map_err(|e| StoreError::Other(format!("{}: {e}", dir.display())))?;
        let local = LocalFileSystem::new_with_prefix(&dir)?.with_fsync(true);
        let s3 = if config.s3.bucket.is_empty() {
            None
        } else {
            Some(Arc::new(s3_client(&config.s3)?))
        };
        Ok(Stores {
            local: Arc::new(local),
            local_dir: dir,
            s3,
            s3_prefix: config.s3.prefix.clone(),
            part_size: usize::try_from(config.part_size_mb).unwrap_or(16) << 20,
            upload_concurrency: config.upload_concurrency,
        })
    }

    pub fn part_size(&self) -> usize {
        self.part_size
    }

    /// The object name of a backup in its store.
    pub fn object_path(&self, adapter: BackupAdapter, server: &str, backup: &str) -> ObjectPath {
        let name = format!("{server}/{backup}.tar.zst");
        match adapter {
            BackupAdapter::Local => ObjectPath::from(name),
            BackupAdapter::S3 => ObjectPath::from(format!("{}{name}", self.s3_prefix)),
        }
    }

    pub fn check_adapter(&self, adapter: BackupAdapter) -> Result<(), StoreError> {
        match (adapter, &self.s3) {
            (BackupAdapter::S3, None) => Err(StoreError::NotConfigured),
            _ => Ok(()),
        }
    }

    fn store(&self, adapter: BackupAdapter) -> Result<Arc<dyn ObjectStore>, StoreError> {
        Ok(match adapter {
            BackupAdapter::Local => self.local.clone(),
            BackupAdapter::S3 => self.s3.clone().ok_or(StoreError::NotConfigured)?,
        })
    }

    /// Starts an upload to `path`. For S3 the upload id exists from here on
    /// ([`Upload::s3_id`]), so the caller can record it before sending anything.
    pub async fn begin(&self, adapter: BackupAdapter, path: &ObjectPath) -> Result<Upload, StoreError> {
        let target = match adapter {
            BackupAdapter::Local => {
                let dest = self.local_dir.join(path.as_ref());
                Target::Local(
                    tokio::task::spawn_blocking(move || LocalUpload::create(dest))
                        .await
                        .map_err(|e| StoreError::Other(format!("staging task: {e}")))??,
                )
            }
            BackupAdapter::S3 => {
                let store = self.s3.clone().ok_or(StoreError::NotConfigured)?;
                let id = store.create_multipart(path).await?;
                Target::S3 {
                    store,
                    path: path.clone(),
                    id,
                }
            }
        };
        Ok(Upload {
            target,
            concurrency: self.upload_concurrency,
            aborted: false,
        })
    }

    /// The size of a stored object, as the store reports it.
    pub async fn size(&self, adapter: BackupAdapter, path: &ObjectPath) -> Result<u64, StoreError> {
        Ok(self.store(adapter)?.head(path).await?.size)
    }

    /// Aborts an S3 upload left by a crash (by the id saved in the record).
    pub async fn abort_s3_upload(&self, path: &ObjectPath, id: &str) -> Result<(), StoreError> {
        let store = self.s3.clone().ok_or(StoreError::NotConfigured)?;
        Ok(store.abort_multipart(path, &id.to_string()).await?)
    }

    /// Removes staging files a crashed local upload left next to `path`.
    pub fn remove_local_staging(&self, local_dir: &std::path::Path, path: &ObjectPath) {
        let target = local_dir.join(path.as_ref());
        let (Some(dir), Some(name)) = (target.parent(), target.file_name().and_then(|n| n.to_str())) else {
            return;
        };
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        let staging = format!("{name}#");
        for entry in entries.flatten() {
            if entry.file_name().to_str().is_some_and(|n| {
                n.strip_prefix(&staging)
                    .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
            }) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }

    /// Deletes an object; one that is already gone is fine.
    pub async fn delete(&self, adapter: BackupAdapter, path: &ObjectPath) -> Result<(), StoreError> {
        match self.store(adapter)?.delete(path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Streams an object: its size, its ETag (to read the same version again) and its bytes.
    pub async fn get(
        &self,
        adapter: BackupAdapter,
        path: &ObjectPath,
        if_match: Option<String>,
    ) -> Result<
        (
            u64,
            Option<String>,
            futures_util::stream::BoxStream<'static, Result<Bytes, object_store::Error>>,
        ),
        StoreError,
    > {
        let options = object_store::GetOptions {
            if_match,
            ..Default::default()
        };
        let result = self.store(adapter)?.get_opts(path, options).await?;
        let size = result.meta.size;
        let etag = result.meta.e_tag.clone();
        Ok((size, etag, result.into_stream()))
    }
}

impl Stores {
    /// Opens an object for reading on a blocking thread: its ETag (to read the same version
    /// again) and a reader. A local object is read straight from its file in large pieces;
    /// object_store's stream of it would hand over 8 KiB chunks, each through a blocking task.
    /// Must be called within the runtime (an S3 object is pumped by a task).
    pub async fn reader(
        &self,
        adapter: BackupAdapter,
        path: &ObjectPath,
        if_match: Option<String>,
    ) -> Result<(Option<String>, ArchiveSource), StoreError> {
        let options = object_store::GetOptions {
            if_match,
            ..Default::default()
        };
        let result = self.store(adapter)?.get_opts(path, options).await?;
        let etag = result.meta.e_tag.clone();
        let source = match result.payload {
            object_store::GetResultPayload::File(file, _) => ArchiveSource::File(file),
            object_store::GetResultPayload::Stream(stream) => {
                ArchiveSource::Stream(ChannelReader::spawn(stream))
            }
        };
        Ok((etag, source))
    }
}

/// A stored archive being read on a blocking thread.
pub enum ArchiveSource {
    File(std::fs::File),
    Stream(ChannelReader),
}

impl Read for ArchiveSource {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        match self {
            ArchiveSource::File(f) => f.read(out),
            ArchiveSource::Stream(r) => r.read(out),
        }
    }
}

fn s3_client(config: &S3Config) -> Result<AmazonS3, StoreError> {
    let mut builder = AmazonS3Builder::new()
        .with_bucket_name(&config.bucket)
        .with_region(&config.region)
        .with_allow_http(config.allow_http)
        .with_virtual_hosted_style_request(config.virtual_hosted_style);
    if !config.endpoint.is_empty() {
        builder = builder.with_endpoint(&config.endpoint);
    }
    if !config.access_key_id.is_empty() {
        builder = builder
            .with_access_key_id(&config.access_key_id)
            .with_secret_access_key(&config.secret_access_key);
    }
    Ok(builder.build()?)
}

/// Part buffers start on this boundary (and parts are multiples of it), so a local upload
/// can write them straight to the disk with `O_DIRECT`.
const PART_ALIGN: usize = 4096;

/// The blocking side of an upload: collects the archive's bytes into parts of `part_size`
/// and hands each to the uploader, waiting while `upload_concurrency` parts are in flight
/// and one more is queued. Memory stays at a few parts whatever the archive's size.
pub struct PartWriter {
    tx: mpsc::Sender<Bytes>,
    /// Padding up to `start`, then the part's bytes.
    buf: Vec<u8>,
    start: usize,
    part_size: usize,
}

/// An empty part buffer whose bytes (from the answered offset) start on [`PART_ALIGN`]
/// when the allocator's address allows it.
fn part_buffer(part_size: usize) -> (Vec<u8>, usize) {
    let mut buf: Vec<u8> = Vec::with_capacity(part_size + PART_ALIGN);
    let start = buf.as_ptr().align_offset(PART_ALIGN);
    let start = if start < PART_ALIGN { start } else { 0 };
    buf.resize(start, 0);
    (buf, start)
}

impl PartWriter {
    pub fn new(tx: mpsc::Sender<Bytes>, part_size: usize) -> PartWriter {
        let (buf, start) = part_buffer(part_size);
        PartWriter {
            tx,
            buf,
            start,
            part_size,
        }
    }

    fn filled(&self) -> usize {
        self.buf.len() - self.start
    }

    fn send(&mut self) -> io::Result<()> {
        let (next, next_start) = part_buffer(self.part_size);
        let full = std::mem::replace(&mut self.buf, next);
        let start = std::mem::replace(&mut self.start, next_start);
        self.tx
            .blocking_send(Bytes::from(full).slice(start..))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the upload stopped"))
    }

    /// Sends the last (possibly short) part.
    pub fn finish(mut self) -> io::Result<()> {
        if self.filled() > 0 {
            self.send()?;
        }
        Ok(())
    }
}

impl Write for PartWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.filled() == self.part_size {
            self.send()?;
        }
        let n = data.len().min(self.part_size - self.filled());
        self.buf.extend_from_slice(&data[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The blocking side of a download: reads the chunks an async task pumps from the store.
pub struct ChannelReader {
    rx: mpsc::Receiver<io::Result<Bytes>>,
    current: Bytes,
}

impl ChannelReader {
    /// Starts pumping `stream` on the current runtime into a reader for a blocking thread.
    pub fn spawn(
        mut stream: futures_util::stream::BoxStream<'static, Result<Bytes, object_store::Error>>,
    ) -> ChannelReader {
        let (tx, rx) = mpsc::channel(8);
        tokio::spawn(async move {
            while let Some(item) = stream.next().await {
                let item = item.map_err(io::Error::other);
                let failed = item.is_err();
                if tx.send(item).await.is_err() || failed {
                    break;
                }
            }
        });
        ChannelReader {
            rx,
            current: Bytes::new(),
        }
    }
}

impl Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                None => return Ok(0),
                Some(Err(e)) => return Err(e),
                Some(Ok(bytes)) => self.current = bytes,
            }
        }
        let n = out.len().min(self.current.len());
        out[..n].copy_from_slice(&self.current[..n]);
        let _ = self.current.split_to(n);
        Ok(n)
    }
}
