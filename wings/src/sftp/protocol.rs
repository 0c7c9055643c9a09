//! The `sftp` subsystem of one session: SFTP version 3 requests, decoded and encoded with
//! russh-sftp's wire types, answered against the server's jailed filesystem.
//!
//! Pipelining: clients keep many reads or writes in flight (OpenSSH's sftp keeps 64), so reads
//! and writes run concurrently, up to `sftp.requests_in_flight`, and their replies go out as
//! they complete (replies carry request ids; clients match them). Every other request is a
//! barrier: it waits for the reads and writes before it, runs alone, and only then are later
//! requests started. So CLOSE, RENAME, STAT and the like see every write sent before them.
//!
//! Activity: removes, renames and new folders are one entry each; the many WRITEs to an open
//! file are one `sftp.write` (or `sftp.create` for a new file) entry, recorded when the handle
//! is let go of (CLOSE, or the session's end).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use mamba_shared::activity::events;
use russh::Channel;
use russh::server::Msg;
use russh_sftp::extensions::{FsyncExtension, HardlinkExtension, LimitsExtension, Statvfs, StatvfsExtension};
use russh_sftp::protocol::{
    Attrs, Data, ExtendedReply, File, FileAttributes, Handle, Name, OpenFlags, Packet, Status, StatusCode,
    Version,
};
use tokio::io::AsyncReadExt as _;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use super::SftpContext;
use super::auth::{FILE_CREATE, FILE_DELETE, FILE_READ, FILE_READ_CONTENT, FILE_UPDATE, Grant};
use crate::activity::{self, Actor, shown_path};
use crate::files::{EntryKind, FsError, FsFile, Metadata, OpenOptions, ServerFs};
use crate::server::Server;

/// Largest SFTP packet a client may send, and the largest read or write it may ask for
/// (announced with `limits@openssh.com`, as OpenSSH's sftp-server does).
const MAX_PACKET_BYTES: u32 = 256 * 1024;
const MAX_IO_BYTES: u32 = MAX_PACKET_BYTES - 1024;
/// Reply bytes one session may have queued for a client that is slow to read them: more than
/// the 64 outstanding 255 KiB reads OpenSSH's client keeps.
const REPLY_BUDGET_BYTES: u32 = 32 * 1024 * 1024;
/// What a reply other than DATA is reserved as (a page of folder entries fits).
const SMALL_REPLY_BYTES: u32 = 64 * 1024;
/// Handles one session may hold open.
const MAX_HANDLES: usize = 256;
/// Folder entries returned per READDIR.
const READDIR_PAGE: usize = 256;

/// The session's state shared by concurrent requests.
pub(super) struct Sftp {
    grant: Arc<Grant>,
    fs: ServerFs,
    activity: Arc<ActivityLog>,
    handles: Mutex<Handles>,
    cancel: CancellationToken,
}

#[derive(Default)]
struct Handles {
    next: u64,
    open: HashMap<String, OpenHandle>,
}

#[derive(Clone)]
enum OpenHandle {
    File(Arc<FileHandle>),
    Dir(Arc<Mutex<DirCursor>>),
}

struct FileHandle {
    file: FsFile,
    readable: bool,
    /// Writes to one file run one at a time: each counts the file's growth against the quota
    /// from its current size, which concurrent writes would count twice.
    write_lock: tokio::sync::Mutex<()>,
    /// `sftp.create` for a file this open made, else `sftp.write`.
    event: &'static str,
    /// Bytes written through this handle; an entry is recorded on drop if any were.
    written: AtomicU64,
    writes: AtomicU64,
    activity: Arc<ActivityLog>,
}

impl Drop for FileHandle {
    fn drop(&mut self) {
        let writes = *self.writes.get_mut();
        if writes > 0 {
            self.activity.record(
                self.event,
                serde_json::json!({
                    "file": shown_path(self.file.path()),
                    "bytes_written": *self.written.get_mut(),
                    "writes": writes,
                }),
            );
        }
    }
}

/// Records this session's actions for its user and server.
struct ActivityLog {
    server: Arc<Server>,
    actor: Actor,
}

impl ActivityLog {
    fn record(&self, event: &str, properties: serde_json::Value) {
        activity::record(
            self.server.context(),
            &self.server.id,
            event,
            &self.actor,
            properties,
        );
    }
}

struct DirCursor {
    path: String,
    offset: usize,
}

/// An SFTP error answer.
struct Refusal {
    code: StatusCode,
    message: String,
}

impl Refusal {
    fn new(code: StatusCode, message: impl Into<String>) -> Refusal {
        Refusal {
            code,
            message: message.into(),
        }
    }
}

impl From<FsError> for Refusal {
    fn from(e: FsError) -> Refusal {
        let code = match &e {
            FsError::NotFound(_) => StatusCode::NoSuchFile,
            FsError::BadPath(_) | FsError::Escape(_) | FsError::Symlink(_) | FsError::Denied(_) => {
                StatusCode::PermissionDenied
            }
            _ => StatusCode::Failure,
        };
        Refusal::new(code, e.to_string())
    }
}

type Reply<T> = Result<T, Refusal>;

/// Serves SFTP on `channel` until the client closes it or `cancel` fires.
pub(super) async fn serve(
    ctx: Arc<SftpContext>,
    grant: Arc<Grant>,
    server: Arc<Server>,
    client_ip: IpAddr,
    channel: Channel<Msg>,
    cancel: CancellationToken,
) {
    let in_flight = ctx.config.requests_in_flight;
    let activity = Arc::new(ActivityLog {
        actor: Actor::user(&grant.user_id, Some(client_ip)),
        server: server.clone(),
    });
    let sftp = Arc::new(Sftp {
        grant,
        activity,
        fs: server.files().clone(),
        handles: Mutex::new(Handles::default()),
        cancel: cancel.clone(),
    });
    let (mut read_half, write_half) = channel.split();
    // Replies never wait for the channel: a request holding an in-flight slot must be able to
    // answer and let go of it even while the client's window is shut, or the reader would stop
    // taking requests, russh would stop reading the connection, and the client's window
    // adjustment would never arrive (a deadlock seen with `requests_in_flight = 1`). Memory
    // stays bounded by a budget of queued reply bytes that the reader takes before it starts a
    // request, which only a client that stops reading its replies can exhaust.
    let (reply_tx, mut reply_rx) = mpsc::unbounded_channel::<(Bytes, OwnedSemaphorePermit)>();
    let budget = Arc::new(Semaphore::new(REPLY_BUDGET_BYTES as usize));
    let writer_cancel = cancel.clone();
    let writer = tokio::spawn(async move {
        loop {
            let reply = tokio::select! {
                () = writer_cancel.cancelled() => break,
                reply = reply_rx.recv() => reply,
            };
            let Some((reply, _budget)) = reply else { break };
            if write_half.data_bytes(reply).await.is_err() {
                break;
            }
        }
        let _ = write_half.eof().await;
        let _ = write_half.close().await;
    });
    let permits = Arc::new(Semaphore::new(in_flight));
    let all = u32::try_from(in_flight).unwrap_or(u32::MAX);
    let mut reader = read_half.make_reader();
    loop {
        let packet = tokio::select! {
            () = cancel.cancelled() => break,
            packet = read_packet(&mut reader) => packet,
        };
        let mut bytes = match packet {
            Ok(Some(bytes)) => bytes,
            Ok(None) => break,
            Err(e) => {
                tracing::debug!(server.id = %sftp.grant.server, "SFTP session ended: {e}");
                break;
            }
        };
        let request = match Packet::try_from(&mut bytes) {
            Ok(request) => request,
            Err(e) => {
                // The length framing is intact, so the stream stays in step: answer and go on.
                tracing::debug!("undecodable SFTP request: {e}");
                let Ok(reserved) = budget.clone().acquire_many_owned(SMALL_REPLY_BYTES).await else {
                    break;
                };
                if send(&reply_tx, Packet::error(0, StatusCode::BadMessage), reserved).is_err() {
                    break;
                }
                continue;
            }
        };
        let reply_bytes = match &request {
            Packet::Read(r) => r.len.min(MAX_IO_BYTES) + 1024,
            _ => SMALL_REPLY_BYTES,
        };
        let Ok(reserved) = budget.clone().acquire_many_owned(reply_bytes).await else {
            break;
        };
        if matches!(request, Packet::Read(_) | Packet::Write(_)) {
            let Ok(permit) = permits.clone().acquire_owned().await else {
                break;
            };
            let (sftp, reply_tx) = (sftp.clone(), reply_tx.clone());
            tokio::spawn(async move {
                // A request that waited past a revocation is not run.
                if !sftp.cancel.is_cancelled() {
                    let reply = sftp.handle(request).await;
                    let _ = send(&reply_tx, reply, reserved);
                }
                drop(permit);
            });
        } else {
            let Ok(barrier) = permits.acquire_many(all).await else {
                break;
            };
            let reply = sftp.handle(request).await;
            drop(barrier);
            if send(&reply_tx, reply, reserved).is_err() {
                break;
            }
        }
    }
    // Let requests still running finish and answer, then close the channel.
    let _ = permits.acquire_many(all).await;
    drop(reply_tx);
    let _ = writer.await;
}

/// Queues a reply with the budget reserved for it, which the writer gives back once it is sent.
fn send(
    tx: &mpsc::UnboundedSender<(Bytes, OwnedSemaphorePermit)>,
    packet: Packet,
    reserved: OwnedSemaphorePermit,
) -> Result<(), ()> {
    let bytes = Bytes::try_from(packet).map_err(|e| tracing::warn!("cannot encode an SFTP reply: {e}"))?;
    tx.send((bytes, reserved)).map_err(|_| ())
}

/// One length-prefixed packet; `None` at a clean end of stream.
async fn read_packet(reader: &mut (impl tokio::io::AsyncRead + Unpin)) -> std::io::Result<Option<Bytes>> {
    let len = match reader.read_u32().await {
        Ok(len) => len,
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    };
    if len == 0 || len > MAX_PACKET_BYTES {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("SFTP packet of {len} bytes"),
        ));
    }
    let mut buf = vec![0; len as usize];
    reader.read_exact(&mut buf).await?;
    Ok(Some(Bytes::from(buf)))
}

/// A path as the client wrote it, made relative to the server root: `.` and `..` are applied
/// lexically and `..` stops at the root, as in a chroot. The result is resolved beneath the
/// root by `ServerFs`, which is what keeps it inside.
fn server_path(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    if parts.is_empty() {
        ".".into()
    } else {
        parts.join("/")
    }
}

fn secs(t: i64) -> u32 {
    u32::try_from(t.max(0)).unwrap_or(u32::MAX)
}

fn type_bits(kind: EntryKind) -> u32 {
    match kind {
        EntryKind::File => 0o100_000,
        EntryKind::Directory => 0o040_000,
        EntryKind::Symlink => 0o120_000,
        EntryKind::Other => 0,
    }
}

fn attributes(m: &Metadata) -> FileAttributes {
    FileAttributes {
        size: Some(m.size),
        uid: Some(m.uid),
        gid: Some(m.gid),
        permissions: Some(m.mode | type_bits(m.kind)),
        atime: Some(secs(m.accessed)),
        mtime: Some(secs(m.modified)),
        ..FileAttributes::default()
    }
}

fn ok(id: u32) -> Packet {
    Packet::Status(Status {
        id,
        status_code: StatusCode::Ok,
        error_message: "Ok".into(),
        language_tag: "en".into(),
    })
}

/// Runs blocking filesystem work off the async workers.
async fn blocking<T: Send + 'static>(work: impl FnOnce() -> Reply<T> + Send + 'static) -> Reply<T> {
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|e| Err(Refusal::new(StatusCode::Failure, format!("internal error: {e}"))))
}

impl Sftp {
    async fn handle(&self, request: Packet) -> Packet {
        let id = request.get_request_id();
        match self.answer(request).await {
            Ok(packet) => packet,
            Err(refusal) => Packet::Status(Status {
                id,
                status_code: refusal.code,
                error_message: refusal.message,
                language_tag: "en".into(),
            }),
        }
    }

    fn need(&self, permission: &str) -> Reply<()> {
        if self.grant.can(permission) {
            Ok(())
        } else {
            Err(Refusal::new(
                StatusCode::PermissionDenied,
                format!("permission denied: this needs {permission}"),
            ))
        }
    }

    fn add_handle(&self, handle: OpenHandle) -> Reply<String> {
        let mut handles = self.handles.lock().unwrap_or_else(|p| p.into_inner());
        if handles.open.len() >= MAX_HANDLES {
            return Err(Refusal::new(StatusCode::Failure, "too many open handles"));
        }
        handles.next += 1;
        let name = handles.next.to_string();
        handles.open.insert(name.clone(), handle);
        Ok(name)
    }

    fn get_handle(&self, name: &str) -> Reply<OpenHandle> {
        let handles = self.handles.lock().unwrap_or_else(|p| p.into_inner());
        handles
            .open
            .get(name)
            .cloned()
            .ok_or_else(|| Refusal::new(StatusCode::Failure, "no such handle"))
    }

    fn file_handle(&self, name: &str) -> Reply<Arc<FileHandle>> {
        match self.get_handle(name)? {
            OpenHandle::File(f) => Ok(f),
            OpenHandle::Dir(_) => Err(Refusal::new(StatusCode::Failure, "the handle is a folder")),
        }
    }

    async fn answer(&self, request: Packet) -> Reply<Packet> {
        let fs = self.fs.clone();
        match request {
            Packet::Init(_) => {
                let mut version = Version::new();
                for extension in [
                    "posix-rename@openssh.com",
                    "fsync@openssh.com",
                    "limits@openssh.com",
                ] {
                    version.extensions.insert(extension.into(), "1".into());
                }
                // Version 2 is the one OpenSSH and russh-sftp clients look for.
                version
                    .extensions
                    .insert("statvfs@openssh.com".into(), "2".into());
                Ok(Packet::Version(version))
            }
            Packet::RealPath(r) => {
                let path = server_path(&r.path);
                let shown = if path == "." {
                    "/".to_string()
                } else {
                    format!("/{path}")
                };
                Ok(Packet::Name(Name {
                    id: r.id,
                    files: vec![File::dummy(shown)],
                }))
            }
            Packet::Open(o) => self.open(o.id, &o.filename, o.pflags, &o.attrs).await,
            Packet::Close(c) => {
                let removed = self
                    .handles
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .open
                    .remove(&c.handle);
                match removed {
                    // The file closes when its last in-flight request lets go of it.
                    Some(_) => Ok(ok(c.id)),
                    None => Err(Refusal::new(StatusCode::Failure, "no such handle")),
                }
            }
            Packet::Read(r) => {
                let handle = self.file_handle(&r.handle)?;
                if !handle.readable {
                    return Err(Refusal::new(
                        StatusCode::PermissionDenied,
                        "the file is not open for reading",
                    ));
                }
                let len = r.len.min(MAX_IO_BYTES) as usize;
                let data = blocking(move || {
                    let mut buf = vec![0; len];
                    let n = handle.file.read_at(&mut buf, r.offset)?;
                    buf.truncate(n);
                    Ok(buf)
                })
                .await?;
                if data.is_empty() {
                    return Err(Refusal::new(StatusCode::Eof, "end of file"));
                }
                Ok(Packet::Data(Data { id: r.id, data }))
            }
            Packet::Write(w) => {
                let handle = self.file_handle(&w.handle)?;
                let _turn = handle.write_lock.lock().await;
                let writer = handle.clone();
                let len = w.data.len() as u64;
                blocking(move || Ok(writer.file.write_all_at(&w.data, w.offset)?)).await?;
                handle.written.fetch_add(len, Ordering::Relaxed);
                handle.writes.fetch_add(1, Ordering::Relaxed);
                Ok(ok(w.id))
            }
            Packet::Lstat(l) => {
                self.need(FILE_READ)?;
                let path = server_path(&l.path);
                let meta = blocking(move || Ok(fs.lstat(&path)?)).await?;
                Ok(Packet::Attrs(Attrs {
                    id: l.id,
                    attrs: attributes(&meta),
                }))
            }
            Packet::Stat(s) => {
                self.need(FILE_READ)?;
                let path = server_path(&s.path);
                let meta = blocking(move || Ok(fs.stat(&path)?)).await?;
                Ok(Packet::Attrs(Attrs {
                    id: s.id,
                    attrs: attributes(&meta),
                }))
            }
            Packet::Fstat(f) => {
                let handle = self.file_handle(&f.handle)?;
                let meta = blocking(move || Ok(handle.file.metadata()?)).await?;
                Ok(Packet::Attrs(Attrs {
                    id: f.id,
                    attrs: attributes(&meta),
                }))
            }
            Packet::SetStat(s) => {
                self.need(FILE_UPDATE)?;
                let path = server_path(&s.path);
                let attrs = s.attrs;
                blocking(move || {
                    if let Some(size) = attrs.size {
                        fs.truncate(&path, size)?;
                    }
                    set_mode_and_times(&fs, &path, &attrs)
                })
                .await?;
                Ok(ok(s.id))
            }
            Packet::FSetStat(s) => {
                self.need(FILE_UPDATE)?;
                let handle = self.file_handle(&s.handle)?;
                let attrs = s.attrs;
                blocking(move || {
                    if let Some(size) = attrs.size {
                        handle.file.set_len(size)?;
                    }
                    if let Some(mode) = attrs.permissions {
                        handle.file.set_permissions(mode & 0o777)?;
                    }
                    let path = handle.file.path().to_string();
                    let times = FileAttributes {
                        permissions: None,
                        ..attrs
                    };
                    set_mode_and_times(&fs, &path, &times)
                })
                .await?;
                Ok(ok(s.id))
            }
            Packet::OpenDir(o) => {
                self.need(FILE_READ)?;
                let path = server_path(&o.path);
                let checked = path.clone();
                let meta = blocking(move || Ok(fs.stat(&checked)?)).await?;
                if !meta.is_dir() {
                    return Err(Refusal::new(StatusCode::Failure, "not a folder"));
                }
                let handle = self.add_handle(OpenHandle::Dir(Arc::new(Mutex::new(DirCursor {
                    path,
                    offset: 0,
                }))))?;
                Ok(Packet::Handle(Handle { id: o.id, handle }))
            }
            Packet::ReadDir(r) => {
                let OpenHandle::Dir(cursor) = self.get_handle(&r.handle)? else {
                    return Err(Refusal::new(StatusCode::Failure, "the handle is a file"));
                };
                let (path, offset) = {
                    let c = cursor.lock().unwrap_or_else(|p| p.into_inner());
                    (c.path.clone(), c.offset)
                };
                let page = blocking(move || Ok(fs.list(&path, offset, READDIR_PAGE)?)).await?;
                if page.entries.is_empty() {
                    return Err(Refusal::new(StatusCode::Eof, "no more entries"));
                }
                cursor.lock().unwrap_or_else(|p| p.into_inner()).offset = offset + page.entries.len();
                let files = page
                    .entries
                    .into_iter()
                    .map(|e| {
                        let attrs = FileAttributes {
                            size: Some(e.size),
                            permissions: Some(e.mode | type_bits(e.kind)),
                            atime: Some(secs(e.modified)),
                            mtime: Some(secs(e.modified)),
                            ..FileAttributes::default()
                        };
                        File::new(e.name, attrs)
                    })
                    .collect();
                Ok(Packet::Name(Name { id: r.id, files }))
            }
            Packet::Remove(r) => {
                self.need(FILE_DELETE)?;
                let path = server_path(&r.filename);
                let shown = shown_path(&path);
                blocking(move || Ok(fs.remove_file(&path)?)).await?;
                self.activity
                    .record(events::SFTP_DELETE, serde_json::json!({ "file": shown }));
                Ok(ok(r.id))
            }
            Packet::MkDir(m) => {
                self.need(FILE_CREATE)?;
                let path = server_path(&m.path);
                let shown = shown_path(&path);
                blocking(move || Ok(fs.create_dir(&path)?)).await?;
                self.activity.record(
                    events::SFTP_CREATE_DIRECTORY,
                    serde_json::json!({ "directory": shown }),
                );
                Ok(ok(m.id))
            }
            Packet::RmDir(r) => {
                self.need(FILE_DELETE)?;
                let path = server_path(&r.path);
                let shown = shown_path(&path);
                blocking(move || Ok(fs.remove_dir(&path)?)).await?;
                self.activity
                    .record(events::SFTP_DELETE, serde_json::json!({ "directory": shown }));
                Ok(ok(r.id))
            }
            Packet::Rename(r) => {
                self.rename(&r.oldpath, &r.newpath, false).await?;
                Ok(ok(r.id))
            }
            Packet::ReadLink(r) => {
                self.need(FILE_READ)?;
                let path = server_path(&r.path);
                let target = blocking(move || Ok(fs.read_link(&path)?)).await?;
                Ok(Packet::Name(Name {
                    id: r.id,
                    files: vec![File::dummy(target)],
                }))
            }
            Packet::Symlink(s) => {
                self.need(FILE_CREATE)?;
                // OpenSSH's client and server (and paramiko) send the target first and the
                // link second, the reverse of the draft; every client in use follows them.
                let (target, link) = (s.linkpath, server_path(&s.targetpath));
                if target.starts_with('/') {
                    return Err(Refusal::new(
                        StatusCode::PermissionDenied,
                        "symlink targets must be relative and stay inside the server's folder",
                    ));
                }
                blocking(move || Ok(fs.symlink(&target, &link)?)).await?;
                Ok(ok(s.id))
            }
            Packet::Extended(e) => self.extended(e.id, &e.request, e.data).await,
            other => Err(Refusal::new(
                StatusCode::OpUnsupported,
                format!("unsupported request {}", packet_name(&other)),
            )),
        }
    }

    async fn open(&self, id: u32, filename: &str, flags: OpenFlags, attrs: &FileAttributes) -> Reply<Packet> {
        let path = server_path(filename);
        let reads = flags.contains(OpenFlags::READ);
        let writes =
            flags.intersects(OpenFlags::WRITE | OpenFlags::APPEND | OpenFlags::TRUNCATE | OpenFlags::CREATE);
        let mut created = false;
        if reads || !writes {
            self.need(FILE_READ_CONTENT)?;
        }
        if writes {
            // Changing a file that exists is an update; making one is a create.
            let fs = self.fs.clone();
            let checked = path.clone();
            let exists = blocking(move || match fs.stat(&checked) {
                Ok(_) => Ok(true),
                Err(FsError::NotFound(_)) => Ok(false),
                Err(e) => Err(e.into()),
            })
            .await?;
            created = !exists;
            if exists {
                self.need(FILE_UPDATE)?;
            } else if flags.contains(OpenFlags::CREATE) {
                self.need(FILE_CREATE)?;
            } else {
                return Err(Refusal::new(
                    StatusCode::NoSuchFile,
                    format!("{filename:?} does not exist"),
                ));
            }
        }
        let options = OpenOptions {
            read: reads || !writes,
            write: flags.contains(OpenFlags::WRITE) || (writes && !flags.contains(OpenFlags::APPEND)),
            append: flags.contains(OpenFlags::APPEND),
            create: flags.contains(OpenFlags::CREATE),
            truncate: flags.contains(OpenFlags::TRUNCATE),
            exclusive: flags.contains(OpenFlags::EXCLUDE),
            mode: attrs.permissions.map_or(0, |m| m & 0o777),
        };
        let fs = self.fs.clone();
        let file = blocking(move || Ok(fs.open(&path, &options)?)).await?;
        let handle = self.add_handle(OpenHandle::File(Arc::new(FileHandle {
            file,
            readable: options.read,
            write_lock: tokio::sync::Mutex::new(()),
            event: if created {
                events::SFTP_CREATE
            } else {
                events::SFTP_WRITE
            },
            written: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            activity: self.activity.clone(),
        })))?;
        Ok(Packet::Handle(Handle { id, handle }))
    }

    async fn rename(&self, from: &str, to: &str, replace: bool) -> Reply<()> {
        self.need(FILE_UPDATE)?;
        let (from, to) = (server_path(from), server_path(to));
        let properties = serde_json::json!({ "from": shown_path(&from), "to": shown_path(&to) });
        let fs = self.fs.clone();
        blocking(move || Ok(fs.rename(&from, &to, replace)?)).await?;
        self.activity.record(events::SFTP_RENAME, properties);
        Ok(())
    }

    async fn extended(&self, id: u32, request: &str, data: Vec<u8>) -> Reply<Packet> {
        let mut data = Bytes::from(data);
        match request {
            "posix-rename@openssh.com" => {
                let paths: HardlinkExtension = russh_sftp::de::from_bytes(&mut data)
                    .map_err(|e| Refusal::new(StatusCode::BadMessage, e.to_string()))?;
                self.rename(&paths.oldpath, &paths.newpath, true).await?;
                Ok(ok(id))
            }
            "fsync@openssh.com" => {
                let fsync: FsyncExtension = russh_sftp::de::from_bytes(&mut data)
                    .map_err(|e| Refusal::new(StatusCode::BadMessage, e.to_string()))?;
                let handle = self.file_handle(&fsync.handle)?;
                blocking(move || Ok(handle.file.sync_all()?)).await?;
                Ok(ok(id))
            }
            "limits@openssh.com" => {
                let limits = LimitsExtension {
                    max_packet_len: u64::from(MAX_PACKET_BYTES),
                    max_read_len: u64::from(MAX_IO_BYTES),
                    max_write_len: u64::from(MAX_IO_BYTES),
                    max_open_handles: MAX_HANDLES as u64,
                };
                let data = russh_sftp::ser::to_bytes(&limits)
                    .map_err(|e| Refusal::new(StatusCode::Failure, e.to_string()))?
                    .to_vec();
                Ok(Packet::ExtendedReply(ExtendedReply { id, data }))
            }
            "statvfs@openssh.com" => {
                // The server's quota is its disk: `df` shows the quota and what is left of it.
                self.need(FILE_READ)?;
                let request: StatvfsExtension = russh_sftp::de::from_bytes(&mut data)
                    .map_err(|e| Refusal::new(StatusCode::BadMessage, e.to_string()))?;
                let path = server_path(&request.path);
                let fs = self.fs.clone();
                let space = blocking(move || {
                    fs.stat(&path)?;
                    Ok(fs.disk_space()?)
                })
                .await?;
                const BLOCK: u64 = 4096;
                let reply = Statvfs {
                    block_size: BLOCK,
                    fragment_size: BLOCK,
                    blocks: space.size / BLOCK,
                    blocks_free: space.free / BLOCK,
                    blocks_avail: space.free / BLOCK,
                    inodes: space.inodes,
                    inodes_free: space.inodes_free,
                    inodes_avail: space.inodes_free,
                    fs_id: space.fs_id,
                    // ST_NOSUID: the server's files never run setuid.
                    flags: 2,
                    name_max: space.name_max,
                };
                let data = russh_sftp::ser::to_bytes(&reply)
                    .map_err(|e| Refusal::new(StatusCode::Failure, e.to_string()))?
                    .to_vec();
                Ok(Packet::ExtendedReply(ExtendedReply { id, data }))
            }
            other => Err(Refusal::new(
                StatusCode::OpUnsupported,
                format!("unsupported extension {other:?}"),
            )),
        }
    }
}

/// Applies permission bits and times from `attrs` to `path` (never through a symlink).
/// Owners are not changed: every file belongs to the server's container user.
fn set_mode_and_times(fs: &ServerFs, path: &str, attrs: &FileAttributes) -> Reply<()> {
    if let Some(mode) = attrs.permissions {
        fs.set_permissions(path, mode & 0o777)?;
    }
    if attrs.atime.is_some() || attrs.mtime.is_some() {
        let time = |t: Option<u32>| t.map(|s| UNIX_EPOCH + Duration::from_secs(u64::from(s)));
        let (accessed, modified): (Option<SystemTime>, Option<SystemTime>) =
            (time(attrs.atime), time(attrs.mtime));
        fs.set_times(path, accessed, modified)?;
    }
    Ok(())
}

fn packet_name(packet: &Packet) -> &'static str {
    match packet {
        Packet::Version(_) => "VERSION",
        Packet::Status(_) => "STATUS",
        Packet::Handle(_) => "HANDLE",
        Packet::Data(_) => "DATA",
        Packet::Name(_) => "NAME",
        Packet::Attrs(_) => "ATTRS",
        Packet::ExtendedReply(_) => "EXTENDED_REPLY",
        _ => "request",
    }
}

#[cfg(test)]
mod tests {
    use super::server_path;

    #[test]
    fn paths_are_made_relative_and_dot_dot_stops_at_the_root() {
        for (given, want) in [
            ("/", "."),
            ("", "."),
            (".", "."),
            ("/a/b/", "a/b"),
            ("a//b/./c", "a/b/c"),
            ("/a/../b", "b"),
            ("../../../etc/passwd", "etc/passwd"),
            ("/..", "."),
        ] {
            assert_eq!(server_path(given), want, "{given:?}");
        }
    }
}
