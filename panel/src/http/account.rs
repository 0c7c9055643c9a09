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
        .route("/users/me/email", web::post().to(request_email_change))
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
            crate::db::transaction(conn, |conn| {
                identity::begin_totp(conn, &sealer, &id, &stored).map_err(map_identity)?;
                audit::record(
                    conn,
                    &Actor::User(id.clone()),
                    &meta,
                    Event::on_user("user.two_factor_setup", &id, json!({})),
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
            crate::db::transaction(conn, |conn| {
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
            crate::db::transaction(conn, |conn| {
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

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct EmailChangeBody {
    new_email: String,
    password: String,
}

const EMAIL_CHANGE_SENT: &str = "if the address can be used, a confirmation link is on its way to it";

/// Asks to change the caller's address. The answer is the same whether or not the new
/// address is taken; the confirmation link goes to the new address.
#[utoipa::path(post, path = "/api/v1/users/me/email", tag = "account", request_body = EmailChangeBody,
    responses((status = 202, description = "Accepted, whether or not the address is free", body = crate::openapi::Message),
        (status = 400, description = "Malformed request", body = crate::openapi::ErrorResponse),
        (status = 401, description = "Not logged in, or wrong password", body = crate::openapi::ErrorResponse),
        (status = 403, description = "Not allowed", body = crate::openapi::ErrorResponse),
        (status = 422, description = "Invalid field", body = crate::openapi::ErrorResponse),
        (status = 429, description = "Rate limited", body = crate::openapi::ErrorResponse)),
    security(("bearer" = []), ("session" = [])))]
pub(crate) async fn request_email_change(
    state: web::Data<AppState>,
    req: HttpRequest,
    auth: Authenticated,
    body: web::Json<EmailChangeBody>,
) -> Result<HttpResponse, ApiError> {
    let meta = state.meta(&req);
    let body = body.into_inner();
    let new_email = users::normalise_email(&body.new_email).map_err(|m| ApiError::invalid("new_email", m))?;
    super::auth::enforce(
        state
            .limiter
            .hit(
                &format!("email-req:{}", meta.ip.map(|i| i.to_string()).unwrap_or_default()),
                state.config.rate_limits.email_requests_per_ip_per_hour,
                std::time::Duration::from_secs(3600),
            )
            .await,
    )?;
    let hasher = state.hasher.clone();
    let stored = auth.user.password_hash.clone();
    let password_ok = web::block(move || hasher.verify(&body.password, &stored))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?;
    if !password_ok {
        return Err(ApiError::unauthorized("the password is wrong").with_code("invalid_credentials"));
    }
    let lookup = new_email.clone();
    let taken = state
        .db
        .run(move |conn| users::find_by_email(conn, &lookup).map_err(ApiError::from))
        .await?
        .is_some();
    if !taken && new_email != auth.user.email {
        let hours = i64::try_from(state.config.auth.link_hours).unwrap_or(24);
        let token = state.links.sign(&crate::keys::LinkClaims {
            purpose: crate::keys::LinkPurpose::ChangeEmail,
            user: auth.user.id.clone(),
            binding: format!("{} -> {new_email}", auth.user.email),
            expires_at: crate::db::now_ms().saturating_add(hours.saturating_mul(3_600_000)),
        });
        let mail = crate::mail::Mail {
            to: new_email,
            subject: "Confirm your new email address".into(),
            body: format!(
                "Someone (perhaps you) asked to move a Mamba account to this address. To confirm, open:\n\n\
                 {}/confirm-email?token={token}\n\nIf it was not you, ignore this email.\n",
                state.config.http.public_url
            ),
        };
        if let Err(e) = state.mailer.send(mail).await {
            tracing::error!(error = %e, "email-change confirmation not sent");
        }
    }
    Ok(HttpResponse::Accepted().json(json!({ "message": EMAIL_CHANGE_SENT })))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ConfirmEmailBody {
    token: String,
}

#[utoipa::path(post, path = "/api/v1/auth/confirm-email-change", tag = "account", request_body = ConfirmEmailBody,
    responses((status = 200, description = "The address changed", body = crate::openapi::Message),
        (status = 400, description = "The link is not valid", body = crate::openapi::ErrorResponse),
        (status = 409, description = "The address was taken meanwhile", body = crate::openapi::ErrorResponse)))]
pub(crate) async fn confirm_email_change(
    state: web::Data<AppState>,
    req: HttpRequest,
    body: web::Json<ConfirmEmailBody>,
) -> Result<HttpResponse, ApiError> {
    let meta = state.meta(&req);
    let claims = state
        .links
        .verify(&body.token, crate::keys::LinkPurpose::ChangeEmail)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_token", e.to_string()))?;
    state
        .db
        .run(move |conn| -> Result<(), ApiError> {
            use diesel::prelude::*;

            use crate::db::schema::users as u;
            let invalid = || ApiError::new(StatusCode::BAD_REQUEST, "invalid_token", "the link is not valid");
            let (old, new) = claims.binding.split_once(" -> ").ok_or_else(invalid)?;
            crate::db::transaction(conn, |conn| {
                let id = crate::ids::UserId::from_db(claims.user.clone());
                // Bound to the old address: once used (or after another change) it is dead.
                users::find(conn, &id)?
                    .filter(|row| row.email == old)
                    .ok_or_else(invalid)?;
                let changed = diesel::update(u::table.find(id.as_str()))
                    .set((
                        u::email.eq(new),
                        u::email_verified_at.eq(crate::db::now_ms()),
                        u::updated_at.eq(crate::db::now_ms()),
                    ))
                    .execute(conn);
                match changed {
                    Err(diesel::result::Error::DatabaseError(
                        diesel::result::DatabaseErrorKind::UniqueViolation,
                        _,
                    )) => {
                        return Err(ApiError::conflict(
                            "email_taken",
                            "this address was taken meanwhile",
                        ));
                    }
                    other => other?,
                };
                audit::record(
                    conn,
                    &Actor::User(id.clone()),
                    &meta,
                    Event::on_user("user.email_change", &id, json!({})),
                )?;
                Ok(())
            })
        })
        .await?;
    Ok(HttpResponse::Ok().json(json!({ "message": "email address changed" })))
}
