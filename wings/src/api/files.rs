//! The file manager routes (`/api/servers/{id}/files/...`, node token) and the signed-URL
//! routes (`/download/file`, `/upload/file`, `/download/backup`, `?token=`).
//!
//! Every file operation goes through the server's `ServerFs` on actix's blocking pool;
//! bodies are streamed in both directions, never held whole in memory.
//!
//! Every change is recorded in the activity log (`crate::activity`) once it succeeded, with
//! the user the panel names in `x-mamba-user` (these routes answer only the panel's
//! certificate, so the header is the panel's word) or, for a signed URL, the token's user.

use std::net::IpAddr;
use std::sync::Arc;

use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderValue};
use actix_web::{HttpRequest, HttpResponse, web};
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use mamba_shared::activity::{USER_HEADER, USER_IP_HEADER, events};
use mamba_shared::blueprint::FieldError;
use mamba_shared::files_api::{
    ChmodRequest, CompressRequest, CopyRequest, CreateDirectoryRequest, CreatedResponse, DecompressRequest,
    DecompressResponse, DeleteRequest, DeleteResponse, FileEntry, FileKind, ListResponse, PullRequest,
    RenameRequest, SCOPE_BACKUP_DOWNLOAD, SCOPE_FILE_DOWNLOAD, SCOPE_FILE_UPLOAD, SearchHit, SearchResponse,
};
use mamba_shared::ids::ServerId;
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use super::AppState;
use super::error::ApiError;
use crate::activity::{self, Actor, shown_path, shown_paths};
use crate::files::stream::{commit_temp, joined, spawn_writer, temp_sibling};
use crate::files::{EntryKind, FsError, FsResult, OpenOptions, ServerFs, archive, clean_path, pull};
use crate::server::Server;

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/servers/{id}/files/list", web::get().to(list))
        .route("/servers/{id}/files/contents", web::get().to(contents))
        .route("/servers/{id}/files/write", web::post().to(write))
        .route("/servers/{id}/files/rename", web::post().to(rename))
        .route("/servers/{id}/files/copy", web::post().to(copy))
        .route("/servers/{id}/files/delete", web::post().to(delete))
        .route(
            "/servers/{id}/files/create-directory",
            web::post().to(create_directory),
        )
        .route("/servers/{id}/files/chmod", web::post().to(chmod))
        .route("/servers/{id}/files/compress", web::post().to(compress))
        .route("/servers/{id}/files/decompress", web::post().to(decompress))
        .route("/servers/{id}/files/pull", web::get().to(list_pulls))
        .route("/servers/{id}/files/pull", web::post().to(start_pull))
        .route("/servers/{id}/files/pull/{pull}", web::delete().to(cancel_pull))
        .route("/servers/{id}/files/search", web::get().to(search));
}

/// The signed-URL routes: authorised by the token in `?token=`, not the node token.
pub fn signed_routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/download/file", web::get().to(download_file))
        .route("/upload/file", web::post().to(upload_file))
        .route("/download/backup", web::get().to(download_backup));
}

/// Runs filesystem work on the blocking pool.
async fn blocking<T: Send + 'static, E: Into<ApiError> + Send + 'static>(
    f: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, ApiError> {
    web::block(f)
        .await
        .map_err(|e| ApiError::internal(format!("blocking task failed: {e}")))?
        .map_err(Into::into)
}

/// Who a file manager request acts for (see the module's note).
fn actor(req: &HttpRequest) -> Actor {
    let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok());
    let ip = header(USER_IP_HEADER).and_then(|v| v.trim().parse::<IpAddr>().ok());
    match header(USER_HEADER) {
        Some(user) => Actor::user(user.trim(), ip),
        None => Actor { ip, ..Actor::panel() },
    }
}

fn log(state: &AppState, server: &Server, event: &str, actor: &Actor, properties: serde_json::Value) {
    activity::record(state.manager.context(), &server.id, event, actor, properties);
}

fn files_of(state: &AppState, id: &str) -> Result<(Arc<Server>, ServerFs), ApiError> {
    let server = state.server(id)?;
    let fs = server.files().clone();
    Ok((server, fs))
}

/// `name` inside `root`, both relative to the server root; `name` may not be the root.
fn under(root: &str, name: &str) -> FsResult<String> {
    let root = clean_path(root)?;
    let name = clean_path(name)?;
    if name == "." {
        return Err(FsError::BadPath(name.into()));
    }
    Ok(if root == "." {
        name.to_string()
    } else {
        format!("{root}/{name}")
    })
}

fn kind(k: EntryKind) -> FileKind {
    match k {
        EntryKind::File => FileKind::File,
        EntryKind::Directory => FileKind::Directory,
        EntryKind::Symlink => FileKind::Symlink,
        EntryKind::Other => FileKind::Other,
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    #[serde(default)]
    directory: String,
    page: Option<usize>,
    per_page: Option<usize>,
}

const DEFAULT_PER_PAGE: usize = 1000;

async fn list(
    state: web::Data<AppState>,
    id: web::Path<String>,
    query: web::Query<ListQuery>,
) -> Result<HttpResponse, ApiError> {
    let (_, fs) = files_of(&state, &id)?;
    let max = state.manager.context().config.files.list_max_per_page;
    let per_page = query.per_page.unwrap_or(DEFAULT_PER_PAGE);
    if per_page == 0 || per_page > max {
        return Err(ApiError::bad_request(format!("per_page: give 1 to {max}")));
    }
    let page = query.page.unwrap_or(1).max(1);
    let directory = query.directory.clone();
    let dir = directory.clone();
    let listed = blocking(move || fs.list(&dir, (page - 1).saturating_mul(per_page), per_page)).await?;
    let entries = listed
        .entries
        .into_iter()
        .map(|e| FileEntry {
            name: e.name,
            kind: kind(e.kind),
            size: e.size,
            mode: e.mode,
            mode_octal: format!("{:o}", e.mode),
            modified: e.modified,
            symlink_target: e.symlink_target,
        })
        .collect();
    Ok(HttpResponse::Ok().json(ListResponse {
        directory,
        total: listed.total,
        page,
        per_page,
        entries,
    }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileQuery {
    file: String,
    /// Set `Content-Disposition: attachment`.
    #[serde(default)]
    download: bool,
}

/// A single byte range from a `Range` header: `Ok(None)` serves the whole file (no header,
/// several ranges or one we do not understand), `Err` answers 416.
fn parse_range(header: Option<&HeaderValue>, size: u64) -> Result<Option<(u64, u64)>, ()> {
    let Some(spec) = header
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("bytes="))
    else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let Some((start, end)) = spec.trim().split_once('-') else {
        return Ok(None);
    };
    let (start, end) = match (start.parse::<u64>(), end.parse::<u64>()) {
        (Ok(s), Ok(e)) if s <= e => (s, e.min(size.saturating_sub(1))),
        (Ok(s), Err(_)) if end.is_empty() => (s, size.saturating_sub(1)),
        (Err(_), Ok(n)) if start.is_empty() && n > 0 => (size.saturating_sub(n), size.saturating_sub(1)),
        _ => return Ok(None),
    };
    if size == 0 || start >= size {
        return Err(());
    }
    Ok(Some((start, end)))
}

/// Streams a regular file, honouring a single `Range`.
async fn serve_file(
    req: &HttpRequest,
    fs: ServerFs,
    path: String,
    attachment: bool,
) -> Result<HttpResponse, ApiError> {
    let open_path = path.clone();
    let (file, meta) = blocking(move || fs.open_read(&open_path)).await?;
    let size = meta.size;
    let range = parse_range(req.headers().get(header::RANGE), size);
    let mut response = match range {
        Err(()) => {
            return Ok(HttpResponse::build(StatusCode::RANGE_NOT_SATISFIABLE)
                .insert_header((header::CONTENT_RANGE, format!("bytes */{size}")))
                .json(serde_json::json!({"error": {"code": "range_not_satisfiable", "message": format!("the file has {size} bytes")}})));
        }
        Ok(Some(_)) => HttpResponse::build(StatusCode::PARTIAL_CONTENT),
        Ok(None) => HttpResponse::Ok(),
    };
    let (start, len) = match range {
        Ok(Some((s, e))) => {
            response.insert_header((header::CONTENT_RANGE, format!("bytes {s}-{e}/{size}")));
            (s, e - s + 1)
        }
        _ => (0, size),
    };
    response
        .insert_header((header::ACCEPT_RANGES, "bytes"))
        .insert_header((header::CONTENT_TYPE, "application/octet-stream"))
        .insert_header(("X-Content-Type-Options", "nosniff"));
    if attachment {
        let name = path.rsplit('/').next().unwrap_or("download");
        let safe: String = name
            .chars()
            .map(|c| {
                if c.is_ascii_graphic() && c != '"' && c != '\\' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        response.insert_header((
            header::CONTENT_DISPOSITION,
            format!("attachment; filename=\"{safe}\""),
        ));
    }
    let mut file = tokio::fs::File::from_std(file);
    file.seek(std::io::SeekFrom::Start(start))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let stream = tokio_util::io::ReaderStream::with_capacity(file.take(len), 256 * 1024);
    Ok(response.no_chunking(len).streaming(stream))
}

async fn contents(
    req: HttpRequest,
    state: web::Data<AppState>,
    id: web::Path<String>,
    query: web::Query<FileQuery>,
) -> Result<HttpResponse, ApiError> {
    let (_, fs) = files_of(&state, &id)?;
    let path = clean_path(&query.file)?.to_string();
    serve_file(&req, fs, path, query.download).await
}

/// Streams `body` into `path`: into a hidden temporary file next to it, moved over the
/// target only once complete, so a failed upload leaves the old file as it was.
async fn receive<S, E>(fs: ServerFs, path: String, mut body: S) -> Result<CreatedResponse, ApiError>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    let path = clean_path(&path)?.to_string();
    if path == "." {
        return Err(FsError::BadPath(path).into());
    }
    let (fs2, target) = (fs.clone(), path.clone());
    let (tmp, file) = blocking(move || -> FsResult<_> {
        if fs2.is_denied(&target) {
            return Err(FsError::Denied(target));
        }
        if let Some((parent, _)) = target.rsplit_once('/') {
            fs2.create_dir_all(parent)?;
        }
        if fs2.lstat(&target).is_ok_and(|m| m.is_dir()) {
            return Err(FsError::IsADirectory(target));
        }
        let tmp = temp_sibling(&target, "upload")?;
        let file = fs2.open(
            &tmp,
            &OpenOptions {
                write: true,
                create: true,
                exclusive: true,
                ..OpenOptions::default()
            },
        )?;
        Ok((tmp, file))
    })
    .await?;
    let (tx, writer) = spawn_writer(file);
    let mut failure: Option<ApiError> = None;
    while let Some(chunk) = body.next().await {
        match chunk {
            Ok(chunk) => {
                if tx.send(chunk).await.is_err() {
                    break;
                }
            }
            Err(e) => {
                failure = Some(ApiError::bad_request(format!("the upload broke off: {e}")));
                break;
            }
        }
    }
    drop(tx);
    let written = joined(writer.await, &tmp);
    let (fs2, tmp2) = (fs.clone(), tmp.clone());
    let outcome = match (failure, written) {
        (Some(e), _) => Err(e),
        (None, Err(e)) => Err(ApiError::from(e)),
        (None, Ok(n)) => Ok(n),
    };
    match outcome {
        Ok(size) => {
            let target = path.clone();
            blocking(move || commit_temp(&fs2, &tmp2, &target, true)).await?;
            Ok(CreatedResponse { file: path, size })
        }
        Err(e) => {
            let _ = web::block(move || fs2.remove_file(&tmp2)).await;
            Err(e)
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WriteQuery {
    file: String,
}

async fn write(
    req: HttpRequest,
    state: web::Data<AppState>,
    id: web::Path<String>,
    query: web::Query<WriteQuery>,
    body: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let (server, fs) = files_of(&state, &id)?;
    let created = receive(fs, query.into_inner().file, body).await?;
    log(
        &state,
        &server,
        events::FILE_WRITE,
        &actor(&req),
        serde_json::json!({ "file": shown_path(&created.file), "size": created.size }),
    );
    Ok(HttpResponse::Ok().json(created))
}

fn check_count(field: &str, n: usize) -> Result<(), ApiError> {
    if n == 0 || n > 10_000 {
        return Err(ApiError::bad_request(format!("{field}: give 1 to 10000 items")));
    }
    Ok(())
}

/// An error for item `index` of a list, saying how many before it were done.
fn item_error(field: &str, index: usize, e: FsError) -> ApiError {
    let mut error = ApiError::from(e);
    error.details = vec![FieldError {
        field: format!("{field}[{index}]"),
        message: error.message.clone(),
    }];
    error.message = format!(
        "{field}[{index}]: {} ({index} before it were done)",
        error.message
    );
    error
}

async fn rename(
    req: HttpRequest,
    state: web::Data<AppState>,
    id: web::Path<String>,
    body: web::Json<RenameRequest>,
) -> Result<HttpResponse, ApiError> {
    let (server, fs) = files_of(&state, &id)?;
    let body = body.into_inner();
    check_count("files", body.files.len())?;
    let properties = serde_json::json!({
        "root": shown_path(&body.root),
        "files": body.files.iter().take(activity::MAX_LISTED_PATHS)
            .map(|p| serde_json::json!({ "from": shown_path(&p.from), "to": shown_path(&p.to) }))
            .collect::<Vec<_>>(),
        "count": body.files.len(),
    });
    web::block(move || -> Result<(), ApiError> {
        for (i, pair) in body.files.iter().enumerate() {
            let done = under(&body.root, &pair.from)
                .and_then(|from| Ok((from, under(&body.root, &pair.to)?)))
                .and_then(|(from, to)| fs.rename(&from, &to, false));
            done.map_err(|e| item_error("files", i, e))?;
        }
        Ok(())
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))??;
    log(&state, &server, events::FILE_RENAME, &actor(&req), properties);
    Ok(HttpResponse::NoContent().finish())
}

/// "name copy.ext", then "name copy 2.ext", … next to `file`.
fn copy_name(file: &str, n: usize) -> String {
    let (dir, name) = file.rsplit_once('/').map_or(("", file), |(d, n)| (d, n));
    let (stem, ext) = match name.rsplit_once('.') {
        Some((s, e)) if !s.is_empty() => (s, format!(".{e}")),
        _ => (name, String::new()),
    };
    let suffix = if n == 1 {
        " copy".to_string()
    } else {
        format!(" copy {n}")
    };
    let new = format!("{stem}{suffix}{ext}");
    if dir.is_empty() {
        new
    } else {
        format!("{dir}/{new}")
    }
}

async fn copy(
    req: HttpRequest,
    state: web::Data<AppState>,
    id: web::Path<String>,
    body: web::Json<CopyRequest>,
) -> Result<HttpResponse, ApiError> {
    let (server, fs) = files_of(&state, &id)?;
    let body = body.into_inner();
    let from = shown_path(&body.file);
    let created = blocking(move || -> FsResult<CreatedResponse> {
        let from = clean_path(&body.file)?.to_string();
        let size = fs.stat(&from)?.size;
        if let Some(to) = body.to {
            let to = clean_path(&to)?.to_string();
            fs.copy(&from, &to)?;
            return Ok(CreatedResponse { file: to, size });
        }
        for n in 1..=50 {
            let to = copy_name(&from, n);
            match fs.copy(&from, &to) {
                Ok(()) => return Ok(CreatedResponse { file: to, size }),
                Err(FsError::Exists(_)) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(FsError::Exists(copy_name(&from, 50)))
    })
    .await?;
    log(
        &state,
        &server,
        events::FILE_COPY,
        &actor(&req),
        serde_json::json!({ "from": from, "to": shown_path(&created.file) }),
    );
    Ok(HttpResponse::Ok().json(created))
}

async fn delete(
    req: HttpRequest,
    state: web::Data<AppState>,
    id: web::Path<String>,
    body: web::Json<DeleteRequest>,
) -> Result<HttpResponse, ApiError> {
    let (server, fs) = files_of(&state, &id)?;
    let body = body.into_inner();
    check_count("files", body.files.len())?;
    let listed = serde_json::json!({
        "root": shown_path(&body.root),
        "files": shown_paths(body.files.iter().map(String::as_str)),
        "count": body.files.len(),
    });
    let response = web::block(move || -> Result<DeleteResponse, ApiError> {
        let mut freed_bytes = 0;
        for (i, f) in body.files.iter().enumerate() {
            let freed = under(&body.root, f)
                .and_then(|p| fs.remove(&p))
                .map_err(|e| item_error("files", i, e))?;
            freed_bytes += freed;
        }
        Ok(DeleteResponse {
            deleted: body.files.len(),
            freed_bytes,
        })
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))??;
    let mut properties = listed;
    properties["freed_bytes"] = response.freed_bytes.into();
    log(&state, &server, events::FILE_DELETE, &actor(&req), properties);
    Ok(HttpResponse::Ok().json(response))
}

async fn create_directory(
    req: HttpRequest,
    state: web::Data<AppState>,
    id: web::Path<String>,
    body: web::Json<CreateDirectoryRequest>,
) -> Result<HttpResponse, ApiError> {
    let (server, fs) = files_of(&state, &id)?;
    let body = body.into_inner();
    let path = blocking(move || -> FsResult<String> {
        let path = under(&body.root, &body.name)?;
        if let Some((parent, _)) = path.rsplit_once('/') {
            fs.create_dir_all(parent)?;
        }
        fs.create_dir(&path)?;
        Ok(path)
    })
    .await?;
    log(
        &state,
        &server,
        events::FILE_CREATE_DIRECTORY,
        &actor(&req),
        serde_json::json!({ "directory": shown_path(&path) }),
    );
    Ok(HttpResponse::NoContent().finish())
}

async fn chmod(
    req: HttpRequest,
    state: web::Data<AppState>,
    id: web::Path<String>,
    body: web::Json<ChmodRequest>,
) -> Result<HttpResponse, ApiError> {
    let (server, fs) = files_of(&state, &id)?;
    let body = body.into_inner();
    check_count("files", body.files.len())?;
    let properties = serde_json::json!({
        "root": shown_path(&body.root),
        "files": body.files.iter().take(activity::MAX_LISTED_PATHS)
            .map(|f| serde_json::json!({ "file": shown_path(&f.file), "mode": shown_path(&f.mode) }))
            .collect::<Vec<_>>(),
        "count": body.files.len(),
    });
    let mut modes = Vec::with_capacity(body.files.len());
    for (i, f) in body.files.iter().enumerate() {
        match u32::from_str_radix(f.mode.trim_start_matches("0o"), 8) {
            Ok(m) if m <= 0o777 && !f.mode.is_empty() => modes.push(m),
            _ => {
                return Err(ApiError::bad_request(format!(
                    "files[{i}].mode: give octal permission bits, at most 777"
                )));
            }
        }
    }
    web::block(move || -> Result<(), ApiError> {
        for (i, (f, mode)) in body.files.iter().zip(modes).enumerate() {
            under(&body.root, &f.file)
                .and_then(|p| fs.set_permissions(&p, mode))
                .map_err(|e| item_error("files", i, e))?;
        }
        Ok(())
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))??;
    log(&state, &server, events::FILE_CHMOD, &actor(&req), properties);
    Ok(HttpResponse::NoContent().finish())
}

async fn compress(
    req: HttpRequest,
    state: web::Data<AppState>,
    id: web::Path<String>,
    body: web::Json<CompressRequest>,
) -> Result<HttpResponse, ApiError> {
    let (server, fs) = files_of(&state, &id)?;
    let body = body.into_inner();
    check_count("files", body.files.len())?;
    let mut properties = serde_json::json!({
        "root": shown_path(&body.root),
        "files": shown_paths(body.files.iter().map(String::as_str)),
        "count": body.files.len(),
    });
    let name = body.name.clone().unwrap_or_else(|| {
        format!(
            "archive-{}.{}",
            crate::tokens::now_secs(),
            body.format.extension()
        )
    });
    let (file, size) =
        blocking(move || archive::compress(&fs, &body.root, &body.files, body.format, &name)).await?;
    properties["archive"] = shown_path(&file).into();
    properties["size"] = size.into();
    log(&state, &server, events::FILE_COMPRESS, &actor(&req), properties);
    Ok(HttpResponse::Ok().json(CreatedResponse { file, size }))
}

async fn decompress(
    req: HttpRequest,
    state: web::Data<AppState>,
    id: web::Path<String>,
    body: web::Json<DecompressRequest>,
) -> Result<HttpResponse, ApiError> {
    let (server, fs) = files_of(&state, &id)?;
    let config = &state.manager.context().config.files;
    let limits = archive::Limits {
        max_ratio: config.decompress_max_ratio,
        max_entries: config.decompress_max_entries,
    };
    let body = body.into_inner();
    let archive_file = shown_path(&body.file);
    let root = shown_path(&body.root);
    let (entries, bytes_written) =
        blocking(move || archive::decompress(&fs, &body.root, &body.file, limits)).await?;
    log(
        &state,
        &server,
        events::FILE_DECOMPRESS,
        &actor(&req),
        serde_json::json!({ "root": root, "file": archive_file, "entries": entries, "bytes_written": bytes_written }),
    );
    Ok(HttpResponse::Ok().json(DecompressResponse {
        entries,
        bytes_written,
    }))
}

async fn list_pulls(state: web::Data<AppState>, id: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let server = state.server(&id)?;
    Ok(HttpResponse::Ok().json(server.pulls.list()))
}

async fn start_pull(
    req: HttpRequest,
    state: web::Data<AppState>,
    id: web::Path<String>,
    body: web::Json<PullRequest>,
) -> Result<HttpResponse, ApiError> {
    let (server, fs) = files_of(&state, &id)?;
    let body = body.into_inner();
    // The host only: a URL's path and query may carry the user's credentials.
    let source = reqwest::Url::parse(&body.url)
        .ok()
        .and_then(|u| u.host_str().map(str::to_string))
        .unwrap_or_default();
    let config = state.manager.context().config.files.clone();
    let client = state.pull_client.clone();
    let pulls = server.pulls.clone();
    let job = blocking(move || {
        pull::prepare(
            &pulls,
            &fs,
            &config,
            client,
            &body.url,
            &body.directory,
            body.file_name.as_deref(),
        )
        .map(|job| (job, body.foreground))
    })
    .await?;
    let (job, foreground) = job;
    let (id, file) = (job.id.clone(), job.target.clone());
    log(
        &state,
        &server,
        events::FILE_PULL,
        &actor(&req),
        serde_json::json!({ "host": shown_path(&source), "file": shown_path(&file) }),
    );
    let task = state.runtime.spawn(job.run());
    if foreground {
        let (file, size) = task
            .await
            .map_err(|e| ApiError::internal(format!("pull task failed: {e}")))??;
        return Ok(HttpResponse::Ok().json(CreatedResponse { file, size }));
    }
    let server_id = server.id.clone();
    state.runtime.spawn(async move {
        match task.await {
            Ok(Ok((file, size))) => tracing::info!(server.id = %server_id, file, size, "pull finished"),
            Ok(Err(e)) => tracing::info!(server.id = %server_id, "pull failed: {e}"),
            Err(e) => tracing::warn!(server.id = %server_id, "pull task failed: {e}"),
        }
    });
    Ok(HttpResponse::Accepted().json(serde_json::json!({ "id": id, "file": file })))
}

async fn cancel_pull(
    state: web::Data<AppState>,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let (id, pull_id) = path.into_inner();
    let server = state.server(&id)?;
    if server.pulls.cancel(&pull_id) {
        Ok(HttpResponse::NoContent().finish())
    } else {
        Err(ApiError::not_found("pull"))
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SearchQuery {
    pattern: String,
    #[serde(default)]
    directory: String,
}

async fn search(
    state: web::Data<AppState>,
    id: web::Path<String>,
    query: web::Query<SearchQuery>,
) -> Result<HttpResponse, ApiError> {
    let (_, fs) = files_of(&state, &id)?;
    let config = &state.manager.context().config.files;
    let (max_results, max_entries) = (config.search_max_results, config.search_max_entries);
    let query = query.into_inner();
    if query.pattern.is_empty() || query.pattern.len() > 256 {
        return Err(ApiError::bad_request("pattern: give 1 to 256 characters"));
    }
    // A pattern with glob characters matches whole names; plain text matches a part of one.
    let glob = if query.pattern.contains(['*', '?', '[', '{']) {
        Some(
            globset::GlobBuilder::new(&query.pattern)
                .case_insensitive(true)
                .literal_separator(true)
                .build()
                .map_err(|e| ApiError::bad_request(format!("pattern: {e}")))?
                .compile_matcher(),
        )
    } else {
        None
    };
    let needle = query.pattern.to_lowercase();
    let response = blocking(move || -> FsResult<SearchResponse> {
        let mut hits = Vec::new();
        let mut truncated = false;
        for (seen, entry) in fs.walk(&query.directory)?.enumerate() {
            if seen >= max_entries || hits.len() >= max_results {
                truncated = true;
                break;
            }
            let Ok(entry) = entry else { continue };
            let name = entry.path.rsplit('/').next().unwrap_or(&entry.path);
            let found = match &glob {
                Some(g) => g.is_match(name),
                None => name.to_lowercase().contains(&needle),
            };
            if found {
                hits.push(SearchHit {
                    path: entry.path.clone(),
                    kind: kind(entry.meta.kind),
                    size: entry.meta.size,
                    modified: entry.meta.modified,
                });
            }
        }
        Ok(SearchResponse { hits, truncated })
    })
    .await?;
    Ok(HttpResponse::Ok().json(response))
}

// ---- signed URLs -------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
struct TokenQuery {
    token: String,
}

/// Checks and burns a signed-URL token off the worker thread (it saves the used-token list).
async fn redeem(
    state: &web::Data<AppState>,
    token: String,
    scope: &'static str,
) -> Result<(Arc<Server>, mamba_shared::files_api::SignedUrlClaims), ApiError> {
    let tokens = state.tokens.clone();
    let claims = blocking(move || tokens.redeem_signed_url(&token, scope)).await?;
    let id = ServerId::new(&claims.server).map_err(|_| ApiError::not_found("server"))?;
    let server = state
        .manager
        .get(&id)
        .ok_or_else(|| ApiError::not_found("server"))?;
    Ok((server, claims))
}

async fn download_file(
    req: HttpRequest,
    state: web::Data<AppState>,
    query: web::Query<TokenQuery>,
) -> Result<HttpResponse, ApiError> {
    let (server, claims) = redeem(&state, query.into_inner().token, SCOPE_FILE_DOWNLOAD).await?;
    let file = claims
        .file
        .ok_or_else(|| ApiError::new(StatusCode::FORBIDDEN, "token_rejected", "the token names no file"))?;
    let path = clean_path(&file)?.to_string();
    serve_file(&req, server.files().clone(), path, true).await
}

async fn upload_file(
    req: HttpRequest,
    state: web::Data<AppState>,
    query: web::Query<TokenQuery>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let (server, claims) = redeem(&state, query.into_inner().token, SCOPE_FILE_UPLOAD).await?;
    let file = claims
        .file
        .ok_or_else(|| ApiError::new(StatusCode::FORBIDDEN, "token_rejected", "the token names no file"))?;
    let fs = server.files().clone();
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let uploader = Actor::user(
        &claims.sub,
        req.peer_addr().map(|a| crate::sftp::canonical_ip(a.ip())),
    );
    let created = if content_type.starts_with("multipart/form-data") {
        let boundary = multer::parse_boundary(&content_type)
            .map_err(|e| ApiError::bad_request(format!("multipart: {e}")))?;
        // multer wants a `Send` stream and actix's payload is not: a channel carries it over.
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(8);
        let pump = async move {
            let mut payload = payload;
            while let Some(chunk) = payload.next().await {
                let chunk = chunk.map_err(|e| std::io::Error::other(e.to_string()));
                if tx.send(chunk).await.is_err() {
                    break;
                }
            }
        };
        let stream =
            futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|c| (c, rx)) });
        let parse = async move {
            let mut multipart = multer::Multipart::new(stream, boundary);
            let mut created = None;
            while let Some(field) = multipart
                .next_field()
                .await
                .map_err(|e| ApiError::bad_request(format!("multipart: {e}")))?
            {
                if field.file_name().is_none() {
                    continue;
                }
                if created.is_some() {
                    return Err(ApiError::bad_request("multipart: one file per upload token"));
                }
                created = Some(receive(fs.clone(), file.clone(), field).await?);
            }
            Ok(created)
        };
        let ((), created) = futures_util::future::join(pump, parse).await;
        let created = created?;
        created.ok_or_else(|| ApiError::bad_request("multipart: no file part"))?
    } else {
        receive(fs, file, payload).await?
    };
    log(
        &state,
        &server,
        events::FILE_UPLOAD,
        &uploader,
        serde_json::json!({ "file": shown_path(&created.file), "size": created.size }),
    );
    Ok(HttpResponse::Ok().json(created))
}

async fn download_backup(
    req: HttpRequest,
    state: web::Data<AppState>,
    query: web::Query<TokenQuery>,
) -> Result<HttpResponse, ApiError> {
    let (server, claims) = redeem(&state, query.into_inner().token, SCOPE_BACKUP_DOWNLOAD).await?;
    let backup = claims.backup.ok_or_else(|| {
        ApiError::new(
            StatusCode::FORBIDDEN,
            "token_rejected",
            "the token names no backup",
        )
    })?;
    super::backup_download::serve_backup_download(&req, &state, &server, &backup).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        let h = |s: &str| HeaderValue::from_str(s).ok();
        assert_eq!(parse_range(None, 10), Ok(None));
        assert_eq!(parse_range(h("bytes=0-3").as_ref(), 10), Ok(Some((0, 3))));
        assert_eq!(parse_range(h("bytes=5-").as_ref(), 10), Ok(Some((5, 9))));
        assert_eq!(parse_range(h("bytes=-4").as_ref(), 10), Ok(Some((6, 9))));
        assert_eq!(parse_range(h("bytes=8-100").as_ref(), 10), Ok(Some((8, 9))));
        assert_eq!(parse_range(h("bytes=10-").as_ref(), 10), Err(()));
        assert_eq!(parse_range(h("bytes=0-1,4-5").as_ref(), 10), Ok(None));
        assert_eq!(parse_range(h("items=0-1").as_ref(), 10), Ok(None));
        assert_eq!(parse_range(h("bytes=5-2").as_ref(), 10), Ok(None));
    }

    #[test]
    fn copy_names() {
        assert_eq!(copy_name("a/b.txt", 1), "a/b copy.txt");
        assert_eq!(copy_name("b.tar.gz", 2), "b.tar copy 2.gz");
        assert_eq!(copy_name(".env", 1), ".env copy");
        assert_eq!(copy_name("Makefile", 3), "Makefile copy 3");
    }
}
