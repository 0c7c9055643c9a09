//! The caller's SSH public keys for SFTP: `/api/v1/users/me/ssh-keys`.
//!
//! A key is a credential for every server the user can reach, so API keys (bound to one
//! tenant) cannot list, add or remove them: only a login session or access token can.

use actix_web::{HttpRequest, HttpResponse, web};
use serde::{Deserialize, Serialize};

use super::AppState;
use super::extract::{AuthVia, Authenticated};
use crate::audit::Actor;
use crate::error::ApiError;
use crate::ssh_keys::{self, SshKey};

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/users/me/ssh-keys", web::get().to(list_ssh_keys))
        .route("/users/me/ssh-keys", web::post().to(add_ssh_key))
        .route("/users/me/ssh-keys/{key}", web::delete().to(delete_ssh_key));
}

fn not_with_api_key(auth: &Authenticated) -> Result<(), ApiError> {
    if matches!(auth.via, AuthVia::ApiKey { .. }) {
        return Err(ApiError::forbidden("API keys cannot manage SSH keys").with_code("api_key_not_allowed"));
    }
    Ok(())
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct SshKeyList {
    data: Vec<SshKey>,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct NewSshKey {
    /// One OpenSSH public key line: `ssh-ed25519 AAAA... comment`.
    public_key: String,
    /// A label; the key's comment when absent.
    #[serde(default)]
    name: Option<String>,
}

#[utoipa::path(get, path = "/api/v1/users/me/ssh-keys", tag = "account", responses((status = 200, description = "The caller's SSH keys, oldest first", body = SshKeyList), (status = 401, description = "Not logged in", body = crate::openapi::ErrorResponse), (status = 403, description = "API keys cannot manage SSH keys", body = crate::openapi::ErrorResponse)), security(("bearer" = []), ("session" = [])))]
pub(crate) async fn list_ssh_keys(
    state: web::Data<AppState>,
    auth: Authenticated,
) -> Result<HttpResponse, ApiError> {
    not_with_api_key(&auth)?;
    let id = auth.user_id();
    let data = state
        .db
        .run(move |conn| -> Result<Vec<SshKey>, ApiError> { Ok(ssh_keys::list(conn, &id)?) })
        .await?;
    Ok(HttpResponse::Ok().json(SshKeyList { data }))
}

#[utoipa::path(post, path = "/api/v1/users/me/ssh-keys", tag = "account", request_body = NewSshKey, responses((status = 201, description = "Added", body = crate::ssh_keys::SshKey), (status = 400, description = "Malformed request", body = crate::openapi::ErrorResponse), (status = 401, description = "Not logged in", body = crate::openapi::ErrorResponse), (status = 403, description = "API keys cannot manage SSH keys", body = crate::openapi::ErrorResponse), (status = 409, description = "The key is already on the account", body = crate::openapi::ErrorResponse), (status = 422, description = "Invalid field", body = crate::openapi::ErrorResponse)), security(("bearer" = []), ("session" = [])))]
pub(crate) async fn add_ssh_key(
    state: web::Data<AppState>,
    req: HttpRequest,
    auth: Authenticated,
    body: web::Json<NewSshKey>,
) -> Result<HttpResponse, ApiError> {
    not_with_api_key(&auth)?;
    let body = body.into_inner();
    let key = ssh_keys::parse(&body.public_key).map_err(|m| ApiError::invalid("public_key", m))?;
    let name = match body.name.as_deref() {
        Some(name) => name,
        None if key.comment.trim().is_empty() => key.algorithm.as_str(),
        None => key.comment.as_str(),
    };
    let name = ssh_keys::check_name(name).map_err(|m| ApiError::invalid("name", m))?;
    let meta = state.meta(&req);
    let id = auth.user_id();
    let actor = Actor::User(id.clone());
    let added = state
        .db
        .run(move |conn| ssh_keys::add(conn, &id, &name, &key, &actor, &meta))
        .await?;
    Ok(HttpResponse::Created().json(added))
}

#[utoipa::path(delete, path = "/api/v1/users/me/ssh-keys/{key}", tag = "account", params(("key" = String, Path, description = "Key id")), responses((status = 204, description = "Deleted"), (status = 401, description = "Not logged in", body = crate::openapi::ErrorResponse), (status = 403, description = "API keys cannot manage SSH keys", body = crate::openapi::ErrorResponse), (status = 404, description = "No such key on the account", body = crate::openapi::ErrorResponse)), security(("bearer" = []), ("session" = [])))]
pub(crate) async fn delete_ssh_key(
    state: web::Data<AppState>,
    req: HttpRequest,
    auth: Authenticated,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    not_with_api_key(&auth)?;
    let key = uuid::Uuid::parse_str(&path.into_inner())
        .map(|u| u.to_string())
        .map_err(|_| ApiError::not_found("ssh key"))?;
    let meta = state.meta(&req);
    let id = auth.user_id();
    let actor = Actor::User(id.clone());
    let deleted = state
        .db
        .run(move |conn| -> Result<bool, ApiError> { Ok(ssh_keys::delete(conn, &id, &key, &actor, &meta)?) })
        .await?;
    if !deleted {
        return Err(ApiError::not_found("ssh key"));
    }
    Ok(HttpResponse::NoContent().finish())
}
