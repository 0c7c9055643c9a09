//! `GET /download/backup?token=`: the token has been checked and used by the time
//! [`serve_backup_download`] runs (scope `backup-download`, one server, one backup).
//!
//! The stored object is streamed as it is (`.tar.zst`, or the sealed format when encrypted),
//! from the local folder or the bucket, never buffered whole.

use actix_web::http::header::{ContentDisposition, DispositionParam, DispositionType};
use actix_web::{HttpRequest, HttpResponse, web};
use futures_util::StreamExt;

use super::AppState;
use super::error::ApiError;
use crate::server::Server;

/// Streams backup `backup` of `server` to the browser.
pub async fn serve_backup_download(
    _req: &HttpRequest,
    state: &web::Data<AppState>,
    server: &Server,
    backup: &str,
) -> Result<HttpResponse, ApiError> {
    let backups = state.manager.backups().clone();
    let (id, name) = (server.id.clone(), backup.to_string());
    // The store's stream lives on the main runtime; a bounded channel carries it to this
    // worker, so a slow browser holds back the download instead of filling memory.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<bytes::Bytes, std::io::Error>>(4);
    let size = state
        .on_main(async move {
            let (size, mut stream) = backups.download(&id, &name).await?;
            tokio::spawn(async move {
                while let Some(chunk) = stream.next().await {
                    let chunk = chunk.map_err(std::io::Error::other);
                    let failed = chunk.is_err();
                    if tx.send(chunk).await.is_err() || failed {
                        break;
                    }
                }
            });
            Ok::<_, crate::backups::service::BackupError>(size)
        })
        .await??;
    let body = tokio_stream::wrappers::ReceiverStream::new(rx);
    Ok(HttpResponse::Ok()
        .content_type("application/octet-stream")
        .insert_header(ContentDisposition {
            disposition: DispositionType::Attachment,
            parameters: vec![DispositionParam::Filename(format!("{backup}.tar.zst"))],
        })
        .no_chunking(size)
        .streaming(body))
}
