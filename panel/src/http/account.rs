//! The caller's own account (`/api/v1/users/me`, two-factor setup) and the operators' user
//! list (`/api/v1/admin/users`).

use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, web};
use serde::Deserialize;
use serde_json::json;

use super::AppState;
use super::extract::{Authenticated, SuperAdmin};
use crate::audit::{self, Actor, Event};
use crate::error::ApiError;
use crate::identity;
use crate::pagination::PageQuery;
use crate::users::{self, User};

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/users/me", web::get().to(me))
        .route("/users/me/two-factor/setup", web::post().to(two_factor_setup))
        .route("/users/me/two-factor/enable", web::post().to(two_factor_enable))
        .route("/users/me/two-factor/disable", web::post().to(two_factor_disable))
        .route("/admin/users", web::get().to(admin_list_users));
}

#[utoipa::path(get, path = "/api/v1/users/me", tag = "account", responses((status = 200, description = "The caller", body = crate::users::User), (status = 401, description = "Not logged in", body = crate::openapi::ErrorResponse), (status = 403, description = "Missing permission", body = crate::openapi::ErrorResponse), (status = 429, description = "Rate limited", body = crate::openapi::ErrorResponse)), security(("bearer" = []), ("session" = [])))]
pub(crate) async fn me(auth: Authenticated) -> HttpResponse {
    HttpResponse::Ok().json(User::from(auth.user))
}

#[utoipa::path(post, path = "/api/v1/users/me/two-factor/setup", tag = "account", responses((status = 200, description = "A pending secret", body = crate::openapi::TwoFactorSetup), (status = 401, description = "Not logged in", body = crate::openapi::ErrorResponse), (status = 403, description = "Missing permission", body = crate::openapi::ErrorResponse), (status = 409, description = "Conflict", body = crate::openapi::ErrorResponse)), security(("bearer" = []), ("session" = [])))]
pub(crate) async fn two_factor_setup(
    state: web::Data<AppState>,
    req: HttpRequest,
    auth: Authenticated,
) -> Result<HttpResponse, ApiError> {
    if auth.user.totp_enabled_at.is_some() {
        return Err(ApiError::conflict(
            "two_factor_enabled",
            "two-factor authentication is already on",
        ));
    }
    let meta = state.meta(&req);
    let secret = identity::new_totp_secret().map_err(|e| ApiError::internal(e.to_string()))?;
    let uri = identity::totp_for(&secret, &auth.user.email)
        .and_then(|t| {
            t.to_url()
                .map_err(|e| identity::IdentityError::Totp(e.to_string()))
        })
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let id = auth.user_id();
    let stored = secret.clone();
    let sealer = state.totp_sealer.clone();
    state
        .db
        .run(move |conn| -> Result<(), ApiError> {
            use diesel::Connection;
            conn.transaction(|conn| {
                identity::begin_totp(conn, &sealer, &id, &stored).map_err(map_identity)?;
                audit::record(
                    conn,
                    &Actor::User(id.clone()),
                    &meta,
                    Event {
                        tenant: None,
                        action: "user.two_factor_setup",
                        resource_type: "user",
                        resource_id: Some(id.to_string()),
                        metadata: json!({}),
                    },
                )?;
                Ok(())
            })
        })
        .await?;
    Ok(HttpResponse::Ok().json(json!({ "secret": secret, "otpauth_uri": uri })))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CodeBody {
    code: String,
}

#[utoipa::path(post, path = "/api/v1/users/me/two-factor/enable", tag = "account", request_body = CodeBody, responses((status = 200, description = "On; the recovery codes, shown once", body = crate::openapi::RecoveryCodes), (status = 400, description = "Malformed request", body = crate::openapi::ErrorResponse), (status = 401, description = "Not logged in", body = crate::openapi::ErrorResponse), (status = 403, description = "Missing permission", body = crate::openapi::ErrorResponse), (status = 409, description = "Conflict", body = crate::openapi::ErrorResponse), (status = 422, description = "Invalid field", body = crate::openapi::ErrorResponse)), security(("bearer" = []), ("session" = [])))]
pub(crate) async fn two_factor_enable(
    state: web::Data<AppState>,
    req: HttpRequest,
    auth: Authenticated,
    body: web::Json<CodeBody>,
) -> Result<HttpResponse, ApiError> {
    if auth.user.totp_enabled_at.is_some() {
        return Err(ApiError::conflict(
            "two_factor_enabled",
            "two-factor authentication is already on",
        ));
    }
    if auth.user.totp_secret.is_none() {
        return Err(ApiError::conflict(
            "two_factor_not_set_up",
            "call two-factor/setup first",
        ));
    }
    let meta = state.meta(&req);
    let sealer = state.totp_sealer.clone();
    let codes = state
        .db
        .run(move |conn| -> Result<Option<Vec<String>>, ApiError> {
            use diesel::Connection;
            conn.transaction(|conn| {
                if !identity::accept_totp(conn, &sealer, &auth.user, &body.code).map_err(map_identity)? {
                    return Ok(None);
                }
                identity::enable_totp(conn, &auth.user_id(), &meta)
                    .map(Some)
                    .map_err(map_identity)
            })
        })
        .await?
        .ok_or_else(|| ApiError::invalid("code", "is wrong or already used"))?;
    Ok(HttpResponse::Ok().json(json!({ "recovery_codes": codes })))
}

#[utoipa::path(post, path = "/api/v1/users/me/two-factor/disable", tag = "account", request_body = CodeBody, responses((status = 200, description = "Off", body = crate::openapi::Message), (status = 400, description = "Malformed request", body = crate::openapi::ErrorResponse), (status = 401, description = "Not logged in", body = crate::openapi::ErrorResponse), (status = 403, description = "Missing permission", body = crate::openapi::ErrorResponse), (status = 409, description = "Conflict", body = crate::openapi::ErrorResponse), (status = 422, description = "Invalid field", body = crate::openapi::ErrorResponse)), security(("bearer" = []), ("session" = [])))]
pub(crate) async fn two_factor_disable(
    state: web::Data<AppState>,
    req: HttpRequest,
    auth: Authenticated,
    body: web::Json<CodeBody>,
) -> Result<HttpResponse, ApiError> {
    if auth.user.totp_enabled_at.is_none() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "two_factor_disabled",
            "two-factor authentication is off",
        ));
    }
    let meta = state.meta(&req);
    let sealer = state.totp_sealer.clone();
    let done = state
        .db
        .run(move |conn| -> Result<bool, ApiError> {
            use diesel::Connection;
            conn.transaction(|conn| {
                let id = auth.user_id();
                let ok = identity::accept_totp(conn, &sealer, &auth.user, &body.code)
                    .map_err(map_identity)?
                    || identity::use_recovery_code(conn, &id, &body.code)?;
                if ok {
                    identity::disable_totp(conn, &id, &meta)?;
                }
                Ok(ok)
            })
        })
        .await?;
    if !done {
        return Err(ApiError::invalid("code", "is wrong or already used"));
    }
    Ok(HttpResponse::Ok().json(json!({ "message": "two-factor authentication is off" })))
}

fn map_identity(e: identity::IdentityError) -> ApiError {
    match e {
        identity::IdentityError::Db(e) => e.into(),
        other => ApiError::internal(other.to_string()),
    }
}

#[utoipa::path(get, path = "/api/v1/admin/users", tag = "admin", params(crate::pagination::PageQuery), responses((status = 200, description = "Every user", body = crate::pagination::Page<crate::users::User>), (status = 400, description = "Malformed request", body = crate::openapi::ErrorResponse), (status = 401, description = "Not logged in", body = crate::openapi::ErrorResponse), (status = 403, description = "Missing permission", body = crate::openapi::ErrorResponse), (status = 422, description = "Invalid field", body = crate::openapi::ErrorResponse)), security(("bearer" = []), ("session" = [])))]
pub(crate) async fn admin_list_users(
    state: web::Data<AppState>,
    _admin: SuperAdmin,
    query: web::Query<PageQuery>,
) -> Result<HttpResponse, ApiError> {
    let page = query.check()?;
    let users = state
        .db
        .run(move |conn| users::list(conn, &page).map_err(ApiError::from))
        .await?;
    Ok(HttpResponse::Ok().json(users))
}
