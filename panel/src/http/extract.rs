//! Who is calling: the `Authenticated` extractor.
//!
//! A browser presents the session cookie, and on every state-changing request also the
//! CSRF token it was given at login in `X-CSRF-Token` (a page on another site can make the
//! browser send the cookie, but cannot read the token). A program presents
//! `Authorization: Bearer <access token>` and needs no CSRF token: nothing sends it
//! implicitly.

use std::time::Duration;

use actix_web::body::MessageBody;
use actix_web::dev::{Payload, ServiceRequest, ServiceResponse};
use actix_web::http::Method;
use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::middleware::Next;
use actix_web::{FromRequest, HttpMessage, HttpRequest, web};
use futures_util::future::LocalBoxFuture;
use subtle::ConstantTimeEq;

use super::AppState;
use crate::api_keys;
use crate::error::ApiError;
use crate::identity;
use crate::ids::UserId;
use crate::ratelimit::Decision;
use crate::tokens::digest;
use crate::users::UserRow;

pub const SESSION_COOKIE: &str = "__Host-mamba_session";
pub const CSRF_COOKIE: &str = "mamba_csrf";
pub const CSRF_HEADER: &str = "x-csrf-token";

#[derive(Debug, Clone)]
pub enum AuthVia {
    Session {
        token: String,
    },
    AccessToken {
        family: String,
    },
    /// An API key: bound to one tenant and narrowed to its scopes' permissions.
    ApiKey {
        key_id: String,
        tenant: crate::ids::TenantId,
        permissions: std::collections::BTreeSet<String>,
    },
}

#[derive(Debug, Clone)]
pub struct Authenticated {
    pub user: UserRow,
    pub via: AuthVia,
}

impl Authenticated {
    pub fn user_id(&self) -> UserId {
        UserId::from_db(self.user.id.clone())
    }
}

fn bearer(req: &HttpRequest) -> Option<String> {
    req.headers()
        .get(actix_web::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|v| v.trim().to_string())
}

impl FromRequest for Authenticated {
    type Error = ApiError;
    type Future = LocalBoxFuture<'static, Result<Authenticated, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let state = req.app_data::<web::Data<AppState>>().cloned();
        let bearer = bearer(req);
        let cookie = req.cookie(SESSION_COOKIE).map(|c| c.value().to_string());
        let csrf = req
            .headers()
            .get(CSRF_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let needs_csrf = !matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
        let req = req.clone();
        Box::pin(async move {
            let state = state.ok_or_else(|| ApiError::internal("application state missing"))?;
            let unauthorized = || ApiError::unauthorized("a valid session or access token is required");
            if let Some(key) = bearer.as_deref().filter(|b| b.starts_with(api_keys::KEY_PREFIX)) {
                return api_key(&state, &req, key.to_string()).await;
            }
            if let Some(token) = bearer {
                if !token.starts_with(identity::ACCESS_PREFIX) {
                    return Err(unauthorized());
                }
                let found = state
                    .db
                    .run(move |conn| identity::find_access_token(conn, &token).map_err(ApiError::from))
                    .await?;
                let (user, family) = found.ok_or_else(unauthorized)?;
                return Ok(Authenticated {
                    user,
                    via: AuthVia::AccessToken { family },
                });
            }
            let token = cookie.ok_or_else(unauthorized)?;
            let lookup = token.clone();
            let found = state
                .db
                .run(move |conn| identity::find_session(conn, &lookup).map_err(ApiError::from))
                .await?;
            let (user, csrf_hash) = found.ok_or_else(unauthorized)?;
            if needs_csrf {
                let presented = csrf.map(|c| digest(&c)).unwrap_or_default();
                if !bool::from(presented.as_bytes().ct_eq(csrf_hash.as_bytes())) {
                    return Err(ApiError::forbidden(
                        "this request needs the X-CSRF-Token header given at login",
                    )
                    .with_code("csrf_failed"));
                }
            }
            Ok(Authenticated {
                user,
                via: AuthVia::Session { token },
            })
        })
    }
}

/// Checks an API key: known, live, from an allowed address, within its plan's rate limit,
/// and used on a tenant route. The rate-limit decision is left in the request's extensions
/// for [`rate_limit_headers`] to put on the answer.
async fn api_key(state: &AppState, req: &HttpRequest, key: String) -> Result<Authenticated, ApiError> {
    let client = state.meta(req).ip;
    let checked = state
        .db
        .run(move |conn| api_keys::authenticate(conn, &key, client).map_err(ApiError::from))
        .await?;
    let auth = match checked {
        Ok(auth) => auth,
        Err(api_keys::KeyRefusal::Unknown) => return Err(ApiError::unauthorized("the API key is not valid")),
        Err(api_keys::KeyRefusal::Expired) => {
            return Err(ApiError::unauthorized("the API key has expired").with_code("api_key_expired"));
        }
        Err(api_keys::KeyRefusal::AddressNotAllowed) => {
            return Err(
                ApiError::forbidden("the API key may not be used from this address")
                    .with_code("address_not_allowed"),
            );
        }
    };
    if let Some(limit) = state.config.plans.hourly_limit(&auth.plan) {
        let decision = state
            .limiter
            .hit(
                &format!("api-key:{}", auth.key_id),
                limit,
                Duration::from_secs(3600),
            )
            .await;
        req.extensions_mut().insert(decision);
        super::auth::enforce(decision)?;
    }
    // Keys act within their tenant only; account and tenant-creation routes need a login.
    let path = req.path();
    if !(path.starts_with("/api/v1/tenants/") || (path == "/api/v1/users/me" && req.method() == Method::GET))
    {
        return Err(ApiError::forbidden("API keys work on tenant routes only"));
    }
    Ok(Authenticated {
        user: auth.user,
        via: AuthVia::ApiKey {
            key_id: auth.key_id,
            tenant: auth.tenant,
            permissions: auth.permissions,
        },
    })
}

/// Middleware: puts `X-RateLimit-*` on every answer to a rate-limited request.
pub async fn rate_limit_headers(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let mut res = next.call(req).await?;
    let decision = res.request().extensions().get::<Decision>().copied();
    if let Some(d) = decision {
        let headers = res.headers_mut();
        headers.insert(
            HeaderName::from_static("x-ratelimit-limit"),
            HeaderValue::from(d.limit),
        );
        headers.insert(
            HeaderName::from_static("x-ratelimit-remaining"),
            HeaderValue::from(d.remaining),
        );
        headers.insert(
            HeaderName::from_static("x-ratelimit-reset"),
            HeaderValue::from(d.reset_after),
        );
    }
    Ok(res)
}

/// An operator (`is_super_admin`).
#[derive(Debug, Clone)]
pub struct SuperAdmin(pub Authenticated);

impl FromRequest for SuperAdmin {
    type Error = ApiError;
    type Future = LocalBoxFuture<'static, Result<SuperAdmin, ApiError>>;

    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        let auth = Authenticated::from_request(req, payload);
        Box::pin(async move {
            let auth = auth.await?;
            if !auth.user.is_super_admin || matches!(auth.via, AuthVia::ApiKey { .. }) {
                return Err(ApiError::forbidden("operators only"));
            }
            Ok(SuperAdmin(auth))
        })
    }
}
