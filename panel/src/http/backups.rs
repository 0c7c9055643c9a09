//! Backups through the panel: the tenant routes under
//! `/api/v1/tenants/{tenant}/servers/{server}/backups`. Creating, restoring and deleting are
//! written with their job in one transaction (`backups`) and answered 202; the jobs worker
//! does the work on the node. A download is a short-lived single-use URL on the node's public
//! listener, signed with the panel's token key like console tokens.

use actix_web::{HttpRequest, HttpResponse, web};
use mamba_shared::files_api::{SCOPE_BACKUP_DOWNLOAD, SignedUrlClaims};
use serde::Serialize;

use super::AppState;
use super::extract::Authenticated;
use super::tenants::scoped;
use crate::backups::{self, NewBackup, RestoreBody};
use crate::error::ApiError;
use crate::pagination::PageQuery;
use crate::servers;

/// Registered inside the `/tenants/{tenant}/servers` scope.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/{server}/backups", web::post().to(create_backup))
        .route("/{server}/backups", web::get().to(list_backups))
        .route("/{server}/backups/{backup}", web::get().to(get_backup))
        .route("/{server}/backups/{backup}", web::delete().to(delete_backup))
        .route(
            "/{server}/backups/{backup}/restore",
            web::post().to(restore_backup),
        )
        .route(
            "/{server}/backups/{backup}/download",
            web::get().to(download_backup),
        );
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct BackupDownload {
    /// A single-use URL on the server's node; the body is the stored archive exactly
    /// (`.tar.zst`, or the encrypted format for encrypted backups).
    pub url: String,
    /// Unix seconds.
    pub expires_at: u64,
}

fn ids(server: &str, backup: &str) -> Result<(crate::ids::ServerId, crate::ids::BackupId), ApiError> {
    Ok((servers::parse_id(server)?, backups::parse_id(backup)?))
}

#[utoipa::path(post, path = "/api/v1/tenants/{tenant}/servers/{server}/backups", tag = "backups", request_body = NewBackup,
    params(("tenant" = String, Path, description = "Tenant id"), ("server" = String, Path, description = "Server id")),
    responses((status = 202, description = "Recorded as pending; the backup job makes it on the node", body = crate::backups::BackupQueued),
        (status = 400, description = "Malformed request", body = crate::openapi::ErrorResponse),
        (status = 401, description = "Not logged in", body = crate::openapi::ErrorResponse),
        (status = 403, description = "Missing permission (backup.create)", body = crate::openapi::ErrorResponse),
        (status = 404, description = "Not found, or not yours", body = crate::openapi::ErrorResponse),
        (status = 409, description = "The server's backup limit is reached, or it is installing or being deleted", body = crate::openapi::ErrorResponse),
        (status = 422, description = "Invalid field", body = crate::openapi::ErrorResponse),
        (status = 429, description = "Rate limited", body = crate::openapi::ErrorResponse)),
    security(("bearer" = []), ("session" = [])))]
pub(crate) async fn create_backup(
    state: web::Data<AppState>,
    req: HttpRequest,
    auth: Authenticated,
    path: web::Path<(String, String)>,
    body: web::Json<NewBackup>,
) -> Result<HttpResponse, ApiError> {
    let (tenant, server) = path.into_inner();
    let scope = scoped(&state, &auth, tenant).await?;
    scope.require("backup.create")?;
    let server = servers::parse_id(&server)?;
    let new = body.into_inner();
    let meta = state.meta(&req);
    let (config, quotas, secrets) = (
        state.config.backups.clone(),
        state.config.quotas.clone(),
        state.secrets.clone(),
    );
    let queued = state
        .db
        .run(move |conn| backups::create(conn, &scope, &server, &new, &config, &quotas, &secrets, &meta))
        .await?;
    Ok(HttpResponse::Accepted().json(queued))
}

#[utoipa::path(get, path = "/api/v1/tenants/{tenant}/servers/{server}/backups", tag = "backups",
    params(("tenant" = String, Path, description = "Tenant id"), ("server" = String, Path, description = "Server id"), PageQuery),
    responses((status = 200, description = "The server's backups, oldest first", body = crate::pagination::Page<crate::backups::Backup>),
        (status = 400, description = "Malformed request", body = crate::openapi::ErrorResponse),
        (status = 401, description = "Not logged in", body = crate::openapi::ErrorResponse),
        (status = 403, description = "Missing permission (backup.read)", body = crate::openapi::ErrorResponse),
        (status = 404, description = "Not found, or not yours", body = crate::openapi::ErrorResponse),
        (status = 422, description = "Invalid field", body = crate::openapi::ErrorResponse),
        (status = 429, description = "Rate limited", body = crate::openapi::ErrorResponse)),
    security(("bearer" = []), ("session" = [])))]
pub(crate) async fn list_backups(
    state: web::Data<AppState>,
    auth: Authenticated,
    path: web::Path<(String, String)>,
    query: web::Query<PageQuery>,
) -> Result<HttpResponse, ApiError> {
    let (tenant, server) = path.into_inner();
    let scope = scoped(&state, &auth, tenant).await?;
    scope.require("backup.read")?;
    let server = servers::parse_id(&server)?;
    let page = query.into_inner().check()?;
    let list = state
        .db
        .run(move |conn| backups::list(conn, &scope, &server, &page))
        .await?;
    Ok(HttpResponse::Ok().json(list))
}

#[utoipa::path(get, path = "/api/v1/tenants/{tenant}/servers/{server}/backups/{backup}", tag = "backups",
    params(("tenant" = String, Path, description = "Tenant id"), ("server" = String, Path, description = "Server id"),
        ("backup" = String, Path, description = "Backup id")),
    responses((status = 200, description = "The backup", body = crate::backups::Backup),
        (status = 401, description = "Not logged in", body = crate::openapi::ErrorResponse),
        (status = 403, description = "Missing permission (backup.read)", body = crate::openapi::ErrorResponse),
        (status = 404, description = "Not found, or not yours", body = crate::openapi::ErrorResponse),
        (status = 429, description = "Rate limited", body = crate::openapi::ErrorResponse)),
    security(("bearer" = []), ("session" = [])))]
pub(crate) async fn get_backup(
    state: web::Data<AppState>,
    auth: Authenticated,
    path: web::Path<(String, String, String)>,
) -> Result<HttpResponse, ApiError> {
    let (tenant, server, backup) = path.into_inner();
    let scope = scoped(&state, &auth, tenant).await?;
    scope.require("backup.read")?;
    let (server, backup) = ids(&server, &backup)?;
    let found = state
        .db
        .run(move |conn| backups::get(conn, &scope, &server, &backup))
        .await?;
    Ok(HttpResponse::Ok().json(found))
}

#[utoipa::path(delete, path = "/api/v1/tenants/{tenant}/servers/{server}/backups/{backup}", tag = "backups",
    params(("tenant" = String, Path, description = "Tenant id"), ("server" = String, Path, description = "Server id"),
        ("backup" = String, Path, description = "Backup id")),
    responses((status = 202, description = "Marked deleting; the delete job removes the archive on the node, then the backup", body = crate::backups::BackupQueued),
        (status = 401, description = "Not logged in", body = crate::openapi::ErrorResponse),
        (status = 403, description = "Missing permission (backup.delete)", body = crate::openapi::ErrorResponse),
        (status = 404, description = "Not found, or not yours", body = crate::openapi::ErrorResponse),
        (status = 409, description = "Being restored, or already being deleted", body = crate::openapi::ErrorResponse),
        (status = 429, description = "Rate limited", body = crate::openapi::ErrorResponse)),
    security(("bearer" = []), ("session" = [])))]
pub(crate) async fn delete_backup(
    state: web::Data<AppState>,
    req: HttpRequest,
    auth: Authenticated,
    path: web::Path<(String, String, String)>,
) -> Result<HttpResponse, ApiError> {
    let (tenant, server, backup) = path.into_inner();
    let scope = scoped(&state, &auth, tenant).await?;
    scope.require("backup.delete")?;
    let (server, backup) = ids(&server, &backup)?;
    let meta = state.meta(&req);
    let queued = state
        .db
        .run(move |conn| backups::request_delete(conn, &scope, &server, &backup, &meta))
        .await?;
    Ok(HttpResponse::Accepted().json(queued))
}

#[utoipa::path(post, path = "/api/v1/tenants/{tenant}/servers/{server}/backups/{backup}/restore", tag = "backups",
    request_body = RestoreBody,
    params(("tenant" = String, Path, description = "Tenant id"), ("server" = String, Path, description = "Server id"),
        ("backup" = String, Path, description = "Backup id")),
    responses((status = 202, description = "Marked restoring; the restore job verifies the archive, stops the server, extracts and starts it again if it was running", body = crate::backups::BackupQueued),
        (status = 400, description = "Malformed request", body = crate::openapi::ErrorResponse),
        (status = 401, description = "Not logged in", body = crate::openapi::ErrorResponse),
        (status = 403, description = "Missing permission (backup.restore)", body = crate::openapi::ErrorResponse),
        (status = 404, description = "Not found, or not yours", body = crate::openapi::ErrorResponse),
        (status = 409, description = "Not completed, another restore runs, or the server is suspended or being deleted", body = crate::openapi::ErrorResponse),
        (status = 429, description = "Rate limited", body = crate::openapi::ErrorResponse)),
    security(("bearer" = []), ("session" = [])))]
pub(crate) async fn restore_backup(
    state: web::Data<AppState>,
    req: HttpRequest,
    auth: Authenticated,
    path: web::Path<(String, String, String)>,
    body: web::Json<RestoreBody>,
) -> Result<HttpResponse, ApiError> {
    let (tenant, server, backup) = path.into_inner();
    let scope = scoped(&state, &auth, tenant).await?;
    scope.require("backup.restore")?;
    let (server, backup) = ids(&server, &backup)?;
    let body = body.into_inner();
    let meta = state.meta(&req);
    let queued = state
        .db
        .run(move |conn| backups::request_restore(conn, &scope, &server, &backup, &body, &meta))
        .await?;
    Ok(HttpResponse::Accepted().json(queued))
}

#[utoipa::path(get, path = "/api/v1/tenants/{tenant}/servers/{server}/backups/{backup}/download", tag = "backups",
    params(("tenant" = String, Path, description = "Tenant id"), ("server" = String, Path, description = "Server id"),
        ("backup" = String, Path, description = "Backup id")),
    responses((status = 200, description = "A short-lived, single-use download URL on the server's node", body = BackupDownload),
        (status = 401, description = "Not logged in", body = crate::openapi::ErrorResponse),
        (status = 403, description = "Missing permission (backup.download)", body = crate::openapi::ErrorResponse),
        (status = 404, description = "Not found, or not yours", body = crate::openapi::ErrorResponse),
        (status = 409, description = "Not completed", body = crate::openapi::ErrorResponse),
        (status = 429, description = "Rate limited", body = crate::openapi::ErrorResponse)),
    security(("bearer" = []), ("session" = [])))]
pub(crate) async fn download_backup(
    state: web::Data<AppState>,
    req: HttpRequest,
    auth: Authenticated,
    path: web::Path<(String, String, String)>,
) -> Result<HttpResponse, ApiError> {
    let (tenant, server, backup) = path.into_inner();
    let scope = scoped(&state, &auth, tenant).await?;
    scope.require("backup.download")?;
    let (server, backup) = ids(&server, &backup)?;
    let iat = u64::try_from(crate::db::now_ms() / 1000).unwrap_or(0);
    let claims = SignedUrlClaims {
        sub: scope.user().to_string(),
        server: server.to_string(),
        scope: SCOPE_BACKUP_DOWNLOAD.into(),
        file: None,
        backup: Some(backup.to_string()),
        iat,
        exp: iat + state.config.backups.download_url_secs,
        jti: uuid::Uuid::now_v7().to_string(),
    };
    let meta = state.meta(&req);
    let jti = claims.jti.clone();
    let node = state
        .db
        .run(move |conn| {
            let row = backups::for_download(conn, &scope, &server, &backup, &jti, &meta)?;
            crate::nodes::get(conn, &crate::ids::NodeId::from_db(row.node_id))?
                .ok_or_else(|| ApiError::conflict("node_missing", "the server's node no longer exists"))
        })
        .await?;
    let token = crate::console_token::sign(state.pki.token_signing_pkcs8(), &claims)
        .map_err(|e| ApiError::internal(e.to_string()))?;
    Ok(HttpResponse::Ok().json(BackupDownload {
        url: format!(
            "{}/download/backup?token={token}",
            node.public_url.trim_end_matches('/')
        ),
        expires_at: claims.exp,
    }))
}
