//! Backup routes: `/api/servers/{id}/backups...`. The work runs in [`crate::backups`]; these
//! handlers check input and map errors to the envelope.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, web};
use mamba_shared::wings_api::{CreateBackupRequest, RestoreBackupRequest};

use super::AppState;
use super::error::ApiError;
use crate::backups::service::BackupError;
use crate::backups::store::StoreError;

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/servers/{id}/backups", web::get().to(list))
        .route("/servers/{id}/backups", web::post().to(create))
        .route("/servers/{id}/backups/{backup}", web::get().to(get))
        .route("/servers/{id}/backups/{backup}", web::delete().to(delete))
        .route("/servers/{id}/backups/{backup}/restore", web::post().to(restore));
}

impl From<BackupError> for ApiError {
    fn from(e: BackupError) -> ApiError {
        let message = e.to_string();
        match e {
            BackupError::Invalid(m) => ApiError::bad_request(m),
            BackupError::NotFound(_) => ApiError::new(StatusCode::NOT_FOUND, "not_found", message),
            BackupError::Conflict(m) => ApiError::new(StatusCode::CONFLICT, "conflict", m),
            BackupError::Busy(_) => ApiError::new(StatusCode::TOO_MANY_REQUESTS, "too_many_backups", message),
            BackupError::Store(StoreError::NotConfigured) => ApiError::bad_request(message),
            BackupError::Store(_) => ApiError::new(StatusCode::BAD_GATEWAY, "backup_store", message),
            BackupError::Internal(m) => ApiError::internal(m),
        }
    }
}

async fn list(state: web::Data<AppState>, id: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let server = state.server(&id)?;
    let backups = state.manager.backups().clone();
    let views = web::block(move || backups.list(&server.id))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))??;
    Ok(HttpResponse::Ok().json(views))
}

async fn get(
    state: web::Data<AppState>,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let (id, backup) = path.into_inner();
    let server = state.server(&id)?;
    Ok(HttpResponse::Ok().json(state.manager.backups().get(&server.id, &backup)?.view()))
}

async fn create(
    state: web::Data<AppState>,
    id: web::Path<String>,
    body: web::Json<CreateBackupRequest>,
) -> Result<HttpResponse, ApiError> {
    let server = state.server(&id)?;
    // Wings' own work: the blueprint's denylist applies to users, not to backups.
    let fs = server.files().trusted();
    let backups = state.manager.backups().clone();
    let view = state
        .on_main(async move { backups.start(server, fs, body.into_inner()) })
        .await??;
    Ok(HttpResponse::Accepted().json(view))
}

async fn restore(
    state: web::Data<AppState>,
    path: web::Path<(String, String)>,
    body: web::Json<RestoreBackupRequest>,
) -> Result<HttpResponse, ApiError> {
    let (id, backup) = path.into_inner();
    let server = state.server(&id)?;
    // Wings' own work: the blueprint's denylist applies to users, not to backups.
    let fs = server.files().trusted();
    let backups = state.manager.backups().clone();
    let view = state
        .on_main(async move { backups.restore(server, fs, &backup, body.into_inner()) })
        .await??;
    Ok(HttpResponse::Accepted().json(view))
}

async fn delete(
    state: web::Data<AppState>,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let (id, backup) = path.into_inner();
    let server = state.server(&id)?;
    let backups = state.manager.backups().clone();
    state
        .on_main(async move { backups.delete(&server.id, &backup).await })
        .await??;
    Ok(HttpResponse::NoContent().finish())
}
