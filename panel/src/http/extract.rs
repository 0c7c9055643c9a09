//! Who is calling: the `Authenticated` extractor.
//!
//! A browser presents the session cookie, and on every state-changing request also the
//! CSRF token it was given at login in `X-CSRF-Token` (a page on another site can make the
//! browser send the cookie, but cannot read the token). A program presents
//! `Authorization: Bearer <access token>` and needs no CSRF token: nothing sends it
//! implicitly.

use actix_web::http::Method;
use actix_web::{FromRequest, HttpRequest, dev::Payload, web};
use futures_util::future::LocalBoxFuture;
use subtle::ConstantTimeEq;

use super::AppState;
use crate::error::ApiError;
use crate::identity;
use crate::ids::UserId;
use crate::tokens::digest;
use crate::users::UserRow;

pub const SESSION_COOKIE: &str = "__Host-mamba_session";
pub const CSRF_COOKIE: &str = "mamba_csrf";
pub const CSRF_HEADER: &str = "x-csrf-token";

#[derive(Debug, Clone)]
pub enum AuthVia {
    Session { token: String },
    AccessToken { family: String },
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
        Box::pin(async move {
            let state = state.ok_or_else(|| ApiError::internal("application state missing"))?;
            let unauthorized = || ApiError::unauthorized("a valid session or access token is required");
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
            if !auth.user.is_super_admin {
                return Err(ApiError::forbidden("operators only"));
            }
            Ok(SuperAdmin(auth))
        })
    }
}
