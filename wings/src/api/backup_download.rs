//! `GET /download/backup?token=`: the token has been checked and used by the time
//! [`serve_backup_download`] runs (scope `backup-download`, one server, one backup).
//!
//! The backups module replaces the body of `serve_backup_download` with the real stream of
//! a local backup; until then every backup is "not found".

use actix_web::{HttpRequest, HttpResponse, web};

use super::AppState;
use super::error::ApiError;
use crate::server::Server;

/// Streams backup `backup` of `server` to the browser.
pub async fn serve_backup_download(
    _req: &HttpRequest,
    _state: &web::Data<AppState>,
    _server: &Server,
    backup: &str,
) -> Result<HttpResponse, ApiError> {
    Err(ApiError::not_found(&format!("backup {backup:?}")))
}
