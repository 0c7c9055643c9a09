//! Registration, email verification, login (with the 2FA step), token refresh, logout and
//! password reset under `/api/v1/auth`.
//!
//! Answers never reveal whether an account exists: registration and reset requests always
//! answer 202, and a wrong email costs the same password hash as a wrong password.

use std::time::Duration;

use actix_web::cookie::{Cookie, SameSite};
use actix_web::http::StatusCode;
use actix_web::http::header::{HeaderName, HeaderValue, RETRY_AFTER};
use actix_web::{HttpRequest, HttpResponse, web};
use mamba_shared::blueprint::FieldError;
use serde::Deserialize;
use serde_json::json;

use super::AppState;
use super::extract::{AuthVia, Authenticated, CSRF_COOKIE, SESSION_COOKIE};
use crate::audit::{self, Actor, Event};
use crate::db::now_ms;
use crate::error::ApiError;
use crate::events::{PanelEvent, RevokeReason};
use crate::identity::{self, LoginClient, Refreshed};
use crate::ids::UserId;
use crate::keys::{LinkClaims, LinkPurpose};
use crate::mail::Mail;
use crate::password::check_strength;
use crate::ratelimit::Decision;
use crate::request_meta::RequestMeta;
use crate::tokens::digest;
use crate::users::{self, CreateUserError, NewUser, User, UserRow};

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::scope("/auth")
            .route("/register", web::post().to(register))
            .route("/verify-email", web::post().to(verify_email))
            .route("/login", web::post().to(login))
            .route("/login/two-factor", web::post().to(login_two_factor))
            .route("/token", web::post().to(refresh_token))
            .route("/logout", web::post().to(logout))
            .route("/password-reset", web::post().to(request_password_reset))
            .route("/password-reset/confirm", web::post().to(confirm_password_reset))
            .route(
                "/confirm-email-change",
                web::post().to(super::account::confirm_email_change),
            ),
    );
}

/// 429 with `Retry-After` when a limiter said no.
pub fn enforce(decision: Decision) -> Result<(), ApiError> {
    if decision.allowed {
        return Ok(());
    }
    let retry = HeaderValue::from(decision.reset_after);
    Err(ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limited",
        "too many attempts; try again later",
    )
    .with_header(RETRY_AFTER, retry.clone())
    .with_header(
        HeaderName::from_static("x-ratelimit-limit"),
        HeaderValue::from(decision.limit),
    )
    .with_header(
        HeaderName::from_static("x-ratelimit-remaining"),
        HeaderValue::from(0u32),
    )
    .with_header(HeaderName::from_static("x-ratelimit-reset"), retry))
}

fn ip_key(meta: &RequestMeta) -> String {
    meta.ip.map(|i| i.to_string()).unwrap_or_else(|| "unknown".into())
}

fn field(field: &str, message: &str) -> FieldError {
    FieldError {
        field: field.into(),
        message: message.into(),
    }
}

// ---------------------------------------------------------------- registration

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RegisterBody {
    email: String,
    password: String,
    display_name: String,
}

const CHECK_INBOX: &str = "if this address can register, a verification email is on its way";

#[utoipa::path(post, path = "/api/v1/auth/register", tag = "auth", request_body = RegisterBody, responses((status = 202, description = "Accepted (whether or not the address has an account)", body = crate::openapi::Message), (status = 400, description = "Malformed request", body = crate::openapi::ErrorResponse), (status = 422, description = "Invalid field", body = crate::openapi::ErrorResponse), (status = 429, description = "Rate limited", body = crate::openapi::ErrorResponse)))]
pub(crate) async fn register(
    state: web::Data<AppState>,
    req: HttpRequest,
    body: web::Json<RegisterBody>,
) -> Result<HttpResponse, ApiError> {
    let meta = state.meta(&req);
    let body = body.into_inner();
    let mut errors = Vec::new();
    let email = users::normalise_email(&body.email).map_err(|m| errors.push(field("email", m)));
    let name =
        users::check_display_name(&body.display_name).map_err(|m| errors.push(field("display_name", m)));
    if let Err(m) = check_strength(&body.password) {
        errors.push(field("password", m));
    }
    let (Ok(email), Ok(name)) = (email, name) else {
        return Err(ApiError::validation(errors));
    };
    if !errors.is_empty() {
        return Err(ApiError::validation(errors));
    }
    let limits = &state.config.rate_limits;
    enforce(
        state
            .limiter
            .hit(
                &format!("email-req:{}", ip_key(&meta)),
                limits.email_requests_per_ip_per_hour,
                Duration::from_secs(3600),
            )
            .await,
    )?;

    let hasher = state.hasher.clone();
    let new_email = email.clone();
    let audit_meta = meta.clone();
    // The hash is computed whether or not the address is taken, so both take as long.
    let outcome = state
        .db
        .run(move |conn| -> Result<Option<UserRow>, ApiError> {
            let hash = hasher
                .hash(&body.password)
                .map_err(|e| ApiError::internal(e.to_string()))?;
            let created = users::create(
                conn,
                NewUser {
                    email: new_email.clone(),
                    display_name: name,
                    password_hash: hash,
                    email_verified: false,
                    is_super_admin: false,
                },
                &Actor::System,
                &audit_meta,
            );
            match created {
                Ok(user) => Ok(users::find(conn, &user.id)?),
                Err(CreateUserError::EmailTaken) => Ok(None),
                Err(CreateUserError::Db(e)) => Err(e.into()),
            }
        })
        .await?;
    let mail = match outcome {
        Some(user) => verification_mail(&state, &user),
        None => Mail {
            to: email,
            subject: "Someone tried to register with your address".into(),
            body: format!(
                "Someone (perhaps you) tried to create a Mamba account with this address, which \
                 already has one. If it was you, log in or reset your password at {}.\n",
                state.config.http.public_url
            ),
        },
    };
    send_quietly(&state, mail).await;
    Ok(HttpResponse::Accepted().json(json!({ "message": CHECK_INBOX })))
}

fn verification_mail(state: &AppState, user: &UserRow) -> Mail {
    let token = state.links.sign(&LinkClaims {
        purpose: LinkPurpose::VerifyEmail,
        user: user.id.clone(),
        binding: user.email.clone(),
        expires_at: link_expiry(state),
    });
    Mail {
        to: user.email.clone(),
        subject: "Verify your email address".into(),
        body: format!(
            "Welcome to Mamba. Confirm your address by opening this link:\n\n{}/verify-email?token={token}\n\n\
             It expires in {} hours.\n",
            state.config.http.public_url, state.config.auth.link_hours
        ),
    }
}

fn link_expiry(state: &AppState) -> i64 {
    let hours = i64::try_from(state.config.auth.link_hours).unwrap_or(24);
    now_ms().saturating_add(hours.saturating_mul(3_600_000))
}

/// A failed delivery is logged, never shown: the answer must not depend on the account.
async fn send_quietly(state: &AppState, mail: Mail) {
    if let Err(e) = state.mailer.send(mail).await {
        tracing::error!(error = %e, "email not sent");
    }
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct TokenBody {
    token: String,
}

#[utoipa::path(post, path = "/api/v1/auth/verify-email", tag = "auth", request_body = TokenBody, responses((status = 200, description = "Verified", body = crate::openapi::Message), (status = 400, description = "Malformed request", body = crate::openapi::ErrorResponse)))]
pub(crate) async fn verify_email(
    state: web::Data<AppState>,
    req: HttpRequest,
    body: web::Json<TokenBody>,
) -> Result<HttpResponse, ApiError> {
    let meta = state.meta(&req);
    let claims = state
        .links
        .verify(&body.token, LinkPurpose::VerifyEmail)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_token", e.to_string()))?;
    state
        .db
        .run(move |conn| -> Result<(), ApiError> {
            use diesel::prelude::*;

            use crate::db::schema::users as u;
            crate::db::transaction(conn, |conn| {
                let id = UserId::from_db(claims.user.clone());
                let user = users::find(conn, &id)?
                    .filter(|u| u.email == claims.binding)
                    .ok_or_else(|| {
                        ApiError::new(StatusCode::BAD_REQUEST, "invalid_token", "the link is not valid")
                    })?;
                if user.email_verified_at.is_some() {
                    return Ok(());
                }
                diesel::update(u::table.find(&user.id))
                    .set((u::email_verified_at.eq(now_ms()), u::updated_at.eq(now_ms())))
                    .execute(conn)?;
                audit::record(
                    conn,
                    &Actor::User(id.clone()),
                    &meta,
                    Event::on_user("user.verify_email", &id, json!({})),
                )?;
                Ok(())
            })
        })
        .await?;
    Ok(HttpResponse::Ok().json(json!({ "message": "email verified" })))
}

// ---------------------------------------------------------------- login

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct LoginBody {
    email: String,
    password: String,
    /// `browser` (default): a cookie session. `api`: an access and refresh token pair.
    #[serde(default)]
    client: Option<LoginClient>,
}

fn invalid_credentials() -> ApiError {
    ApiError::unauthorized("the email or password is wrong").with_code("invalid_credentials")
}

#[utoipa::path(post, path = "/api/v1/auth/login", tag = "auth", request_body = LoginBody, responses((status = 200, description = "Logged in, or a second factor is needed", body = crate::openapi::LoginAnswer), (status = 400, description = "Malformed request", body = crate::openapi::ErrorResponse), (status = 401, description = "Wrong email or password", body = crate::openapi::ErrorResponse), (status = 403, description = "Email not verified", body = crate::openapi::ErrorResponse), (status = 429, description = "Rate limited", body = crate::openapi::ErrorResponse)))]
pub(crate) async fn login(
    state: web::Data<AppState>,
    req: HttpRequest,
    body: web::Json<LoginBody>,
) -> Result<HttpResponse, ApiError> {
    let meta = state.meta(&req);
    let body = body.into_inner();
    let client = body.client.unwrap_or(LoginClient::Browser);
    // Limits before any work: per address, and per account *and* address, so a flood from
    // one place never locks the owner out from another.
    let limits = &state.config.rate_limits;
    let email = body.email.trim().to_lowercase();
    enforce(
        state
            .limiter
            .hit(
                &format!("login-ip:{}", ip_key(&meta)),
                limits.login_per_ip_per_minute,
                Duration::from_secs(60),
            )
            .await,
    )?;
    enforce(
        state
            .limiter
            .hit(
                &format!("login-account:{}:{email}", ip_key(&meta)),
                limits.login_per_account_per_15min,
                Duration::from_secs(900),
            )
            .await,
    )?;

    let hasher = state.hasher.clone();
    let dummy = state.dummy_hash.clone();
    let user = state
        .db
        .run(move |conn| -> Result<Option<UserRow>, ApiError> {
            let found = users::find_by_email(conn, &email)?;
            let ok = match &found {
                Some(user) => hasher.verify(&body.password, &user.password_hash),
                None => {
                    hasher.verify(&body.password, &dummy);
                    false
                }
            };
            Ok(found.filter(|_| ok))
        })
        .await?
        .ok_or_else(invalid_credentials)?;
    // Only someone who knows the password learns this.
    if user.email_verified_at.is_none() {
        return Err(ApiError::forbidden("verify your email address first").with_code("email_not_verified"));
    }
    if user.totp_enabled_at.is_some() {
        let id = UserId::from_db(user.id.clone());
        let challenge = state
            .db
            .run(move |conn| identity::create_challenge(conn, &id, client).map_err(internal))
            .await?;
        return Ok(HttpResponse::Ok().json(json!({
            "status": "two_factor_required",
            "challenge": challenge,
        })));
    }
    finish_login(&state, user, client, meta, "password").await
}

fn internal(e: identity::IdentityError) -> ApiError {
    match e {
        identity::IdentityError::Db(e) => e.into(),
        other => ApiError::internal(other.to_string()),
    }
}

/// Opens the session or token family, with its audit entry in the same transaction.
async fn finish_login(
    state: &AppState,
    user: UserRow,
    client: LoginClient,
    meta: RequestMeta,
    method: &'static str,
) -> Result<HttpResponse, ApiError> {
    let id = UserId::from_db(user.id.clone());
    let session_ms = state.config.auth.session_hours.saturating_mul(3_600_000);
    let refresh_ms = state.config.auth.refresh_days.saturating_mul(86_400_000);
    let public = User::from(user);
    match client {
        LoginClient::Browser => {
            let session = state
                .db
                .run(move |conn| {
                    crate::db::transaction(conn, |conn| {
                        let session = identity::create_session(conn, &id, &meta, session_ms)?;
                        audit::record(
                            conn,
                            &Actor::User(id.clone()),
                            &meta,
                            login_event(&id, "browser", method),
                        )?;
                        Ok(session)
                    })
                    .map_err(internal)
                })
                .await?;
            let max_age =
                actix_web::cookie::time::Duration::seconds(i64::try_from(session_ms / 1000).unwrap_or(0));
            Ok(HttpResponse::Ok()
                .cookie(
                    Cookie::build(SESSION_COOKIE, session.token)
                        .path("/")
                        .secure(true)
                        .http_only(true)
                        .same_site(SameSite::Lax)
                        .max_age(max_age)
                        .finish(),
                )
                .cookie(
                    Cookie::build(CSRF_COOKIE, session.csrf_token.clone())
                        .path("/")
                        .secure(true)
                        .same_site(SameSite::Strict)
                        .max_age(max_age)
                        .finish(),
                )
                .json(json!({ "status": "ok", "csrf_token": session.csrf_token, "user": public })))
        }
        LoginClient::Api => {
            let pair = state
                .db
                .run(move |conn| {
                    crate::db::transaction(conn, |conn| {
                        let pair = identity::issue_tokens(conn, &id, None, refresh_ms)?;
                        audit::record(
                            conn,
                            &Actor::User(id.clone()),
                            &meta,
                            login_event(&id, "api", method),
                        )?;
                        Ok(pair)
                    })
                    .map_err(internal)
                })
                .await?;
            Ok(HttpResponse::Ok().json(json!({ "status": "ok", "tokens": pair, "user": public })))
        }
    }
}

fn login_event<'a>(id: &UserId, client: &str, method: &str) -> Event<'a> {
    Event::on_user(
        "auth.login",
        &id,
        json!({ "client": client, "second_factor": method }),
    )
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct TwoFactorBody {
    challenge: String,
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    recovery_code: Option<String>,
}

#[utoipa::path(post, path = "/api/v1/auth/login/two-factor", tag = "auth", request_body = TwoFactorBody, responses((status = 200, description = "Logged in", body = crate::openapi::LoginAnswer), (status = 400, description = "Malformed request", body = crate::openapi::ErrorResponse), (status = 401, description = "Wrong code or challenge", body = crate::openapi::ErrorResponse), (status = 422, description = "Invalid field", body = crate::openapi::ErrorResponse), (status = 429, description = "Rate limited", body = crate::openapi::ErrorResponse)))]
pub(crate) async fn login_two_factor(
    state: web::Data<AppState>,
    req: HttpRequest,
    body: web::Json<TwoFactorBody>,
) -> Result<HttpResponse, ApiError> {
    let meta = state.meta(&req);
    let body = body.into_inner();
    if body.code.is_none() == body.recovery_code.is_none() {
        return Err(ApiError::invalid(
            "code",
            "give exactly one of code and recovery_code",
        ));
    }
    enforce(
        state
            .limiter
            .hit(
                &format!("login-ip:{}", ip_key(&meta)),
                state.config.rate_limits.login_per_ip_per_minute,
                Duration::from_secs(60),
            )
            .await,
    )?;
    let challenge_token = body.challenge.clone();
    // The attempt is counted in its own transaction, so wrong codes use up the challenge.
    let challenge = state
        .db
        .run(move |conn| identity::attempt_challenge(conn, &challenge_token).map_err(ApiError::from))
        .await?
        .ok_or_else(|| {
            ApiError::unauthorized("the login has expired; start again").with_code("invalid_challenge")
        })?;
    let user = challenge.user.clone();
    let sealer = state.totp_sealer.clone();
    let method = if body.code.is_some() {
        "totp"
    } else {
        "recovery_code"
    };
    let accepted = state
        .db
        .run(move |conn| -> Result<bool, ApiError> {
            crate::db::transaction(conn, |conn| {
                let ok = match (&body.code, &body.recovery_code) {
                    (Some(code), _) => {
                        identity::accept_totp(conn, &sealer, &challenge.user, code).map_err(internal)?
                    }
                    (None, Some(code)) => {
                        identity::use_recovery_code(conn, &UserId::from_db(challenge.user.id.clone()), code)?
                    }
                    (None, None) => false,
                };
                Ok(ok && identity::finish_challenge(conn, &challenge.id)?)
            })
        })
        .await?;
    if !accepted {
        return Err(ApiError::unauthorized("the code is wrong or already used").with_code("invalid_code"));
    }
    finish_login(&state, user, challenge.client, meta, method).await
}

// ---------------------------------------------------------------- tokens and logout

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RefreshBody {
    refresh_token: String,
}

#[utoipa::path(post, path = "/api/v1/auth/token", tag = "auth", request_body = RefreshBody, responses((status = 200, description = "New tokens; the old refresh token is spent", body = crate::openapi::TokensAnswer), (status = 400, description = "Malformed request", body = crate::openapi::ErrorResponse), (status = 401, description = "Invalid, expired or reused", body = crate::openapi::ErrorResponse)))]
pub(crate) async fn refresh_token(
    state: web::Data<AppState>,
    req: HttpRequest,
    body: web::Json<RefreshBody>,
) -> Result<HttpResponse, ApiError> {
    let meta = state.meta(&req);
    let refresh_ms = state.config.auth.refresh_days.saturating_mul(86_400_000);
    let token = body.into_inner().refresh_token;
    let outcome = state
        .db
        .run(move |conn| identity::refresh(conn, &token, refresh_ms, &meta).map_err(internal))
        .await?;
    match outcome {
        Refreshed::Ok(pair, _) => Ok(HttpResponse::Ok().json(json!({ "tokens": pair }))),
        Refreshed::Invalid => {
            Err(ApiError::unauthorized("the refresh token is not valid").with_code("invalid_token"))
        }
        Refreshed::Reused(user) => {
            tracing::warn!(%user, "a spent refresh token was presented again; its login is revoked");
            state.events.publish(PanelEvent::AccessRevoked {
                user,
                tenant: None,
                reason: RevokeReason::RefreshTokenReuse,
            });
            Err(ApiError::unauthorized("the refresh token is not valid").with_code("invalid_token"))
        }
    }
}

#[utoipa::path(post, path = "/api/v1/auth/logout", tag = "auth", responses((status = 200, description = "Logged out", body = crate::openapi::Message), (status = 401, description = "Not logged in", body = crate::openapi::ErrorResponse), (status = 403, description = "Missing permission", body = crate::openapi::ErrorResponse)), security(("bearer" = []), ("session" = [])))]
pub(crate) async fn logout(
    state: web::Data<AppState>,
    req: HttpRequest,
    auth: Authenticated,
) -> Result<HttpResponse, ApiError> {
    let meta = state.meta(&req);
    let id = auth.user_id();
    let via = auth.via.clone();
    state
        .db
        .run(move |conn| -> Result<(), ApiError> {
            crate::db::transaction(conn, |conn| {
                match &via {
                    AuthVia::Session { token } => {
                        identity::delete_session(conn, token)?;
                    }
                    AuthVia::AccessToken { family } => identity::revoke_family(conn, family)?,
                    // Keys are revoked through their own route, never by "logging out".
                    AuthVia::ApiKey { .. } => {
                        return Err(ApiError::forbidden("revoke an API key instead of logging it out"));
                    }
                }
                audit::record(
                    conn,
                    &Actor::User(id.clone()),
                    &meta,
                    Event::on_user("auth.logout", &id, json!({})),
                )?;
                Ok(())
            })
        })
        .await?;
    let mut gone_session = Cookie::build(SESSION_COOKIE, "")
        .path("/")
        .secure(true)
        .http_only(true)
        .finish();
    gone_session.make_removal();
    let mut gone_csrf = Cookie::build(CSRF_COOKIE, "").path("/").secure(true).finish();
    gone_csrf.make_removal();
    Ok(HttpResponse::Ok()
        .cookie(gone_session)
        .cookie(gone_csrf)
        .json(json!({ "message": "logged out" })))
}

// ---------------------------------------------------------------- password reset

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ResetRequestBody {
    email: String,
}

/// A reset link is bound to the current password hash, so it dies once used.
fn password_binding(hash: &str) -> String {
    digest(hash)[..32].to_string()
}

#[utoipa::path(post, path = "/api/v1/auth/password-reset", tag = "auth", request_body = ResetRequestBody, responses((status = 202, description = "Accepted (whether or not the address has an account)", body = crate::openapi::Message), (status = 400, description = "Malformed request", body = crate::openapi::ErrorResponse), (status = 422, description = "Invalid field", body = crate::openapi::ErrorResponse), (status = 429, description = "Rate limited", body = crate::openapi::ErrorResponse)))]
pub(crate) async fn request_password_reset(
    state: web::Data<AppState>,
    req: HttpRequest,
    body: web::Json<ResetRequestBody>,
) -> Result<HttpResponse, ApiError> {
    let meta = state.meta(&req);
    let email = users::normalise_email(&body.email).map_err(|m| ApiError::invalid("email", m))?;
    enforce(
        state
            .limiter
            .hit(
                &format!("email-req:{}", ip_key(&meta)),
                state.config.rate_limits.email_requests_per_ip_per_hour,
                Duration::from_secs(3600),
            )
            .await,
    )?;
    let user = state
        .db
        .run(move |conn| users::find_by_email(conn, &email).map_err(ApiError::from))
        .await?;
    if let Some(user) = user {
        let token = state.links.sign(&LinkClaims {
            purpose: LinkPurpose::ResetPassword,
            user: user.id.clone(),
            binding: password_binding(&user.password_hash),
            expires_at: link_expiry(&state),
        });
        let mail = Mail {
            to: user.email.clone(),
            subject: "Reset your password".into(),
            body: format!(
                "Someone (perhaps you) asked to reset the password of your Mamba account. To choose a \
                 new one, open this link:\n\n{}/reset-password?token={token}\n\nIt expires in {} hours. \
                 If it was not you, ignore this email.\n",
                state.config.http.public_url, state.config.auth.link_hours
            ),
        };
        send_quietly(&state, mail).await;
    }
    Ok(HttpResponse::Accepted().json(json!({
        "message": "if this address has an account, a reset link is on its way"
    })))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ResetConfirmBody {
    token: String,
    password: String,
}

#[utoipa::path(post, path = "/api/v1/auth/password-reset/confirm", tag = "auth", request_body = ResetConfirmBody, responses((status = 200, description = "Password changed", body = crate::openapi::Message), (status = 400, description = "Malformed request", body = crate::openapi::ErrorResponse), (status = 422, description = "Invalid field", body = crate::openapi::ErrorResponse)))]
pub(crate) async fn confirm_password_reset(
    state: web::Data<AppState>,
    req: HttpRequest,
    body: web::Json<ResetConfirmBody>,
) -> Result<HttpResponse, ApiError> {
    let meta = state.meta(&req);
    let body = body.into_inner();
    check_strength(&body.password).map_err(|m| ApiError::invalid("password", m))?;
    let invalid = || ApiError::new(StatusCode::BAD_REQUEST, "invalid_token", "the link is not valid");
    let claims = state
        .links
        .verify(&body.token, LinkPurpose::ResetPassword)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_token", e.to_string()))?;
    let hasher = state.hasher.clone();
    let user = state
        .db
        .run(move |conn| -> Result<UserId, ApiError> {
            use diesel::prelude::*;

            use crate::db::schema::users as u;
            let hash = hasher
                .hash(&body.password)
                .map_err(|e| ApiError::internal(e.to_string()))?;
            crate::db::transaction(conn, |conn| {
                let id = UserId::from_db(claims.user.clone());
                let user = users::find(conn, &id)?
                    .filter(|u| password_binding(&u.password_hash) == claims.binding)
                    .ok_or_else(invalid)?;
                diesel::update(u::table.find(&user.id))
                    .set((u::password_hash.eq(&hash), u::updated_at.eq(now_ms())))
                    .execute(conn)?;
                // Whoever else was logged in is logged out.
                identity::revoke_all_logins(conn, &id)?;
                audit::record(
                    conn,
                    &Actor::User(id.clone()),
                    &meta,
                    Event::on_user("user.password_reset", &id, json!({})),
                )?;
                Ok(id)
            })
        })
        .await?;
    // After the commit, so no replica acts on a revocation that was rolled back.
    state.events.publish(PanelEvent::AccessRevoked {
        user,
        tenant: None,
        reason: RevokeReason::PasswordReset,
    });
    Ok(HttpResponse::Ok().json(json!({ "message": "password changed; log in again" })))
}
