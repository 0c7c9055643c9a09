//! Identity: the data layer for browser sessions, API token families, 2FA login challenges,
//! TOTP and recovery codes. Handlers in `http::auth` decide; this module stores.
//!
//! Every secret handed out is random (32 bytes) with a readable prefix, and stored only as
//! its SHA-256 digest.

use diesel::prelude::*;
use serde::Serialize;
use totp_rs::{Builder, Secret, Totp};

use crate::audit::{self, Actor, Event};
use crate::db::schema::{access_tokens, login_challenges, recovery_codes, refresh_tokens, sessions, users};
use crate::db::{DbConnection, now_ms};
use crate::ids::UserId;
use crate::request_meta::RequestMeta;
use crate::tokens::{RandomError, digest, random_token};
use crate::users::UserRow;

/// Access tokens live 15 minutes; refresh tokens renew them.
pub const ACCESS_TOKEN_TTL_MS: i64 = 15 * 60 * 1000;
/// A 2FA challenge must be answered within 5 minutes, in at most 5 tries.
pub const CHALLENGE_TTL_MS: i64 = 5 * 60 * 1000;
pub const CHALLENGE_MAX_ATTEMPTS: i32 = 5;
pub const RECOVERY_CODES: usize = 10;

pub const SESSION_PREFIX: &str = "mss_";
pub const ACCESS_PREFIX: &str = "mat_";
pub const REFRESH_PREFIX: &str = "mrt_";
pub const CHALLENGE_PREFIX: &str = "mch_";

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error(transparent)]
    Db(#[from] diesel::result::Error),
    #[error(transparent)]
    Random(#[from] RandomError),
    #[error("totp: {0}")]
    Totp(String),
}

fn secret(prefix: &str) -> Result<String, RandomError> {
    Ok(format!("{prefix}{}", random_token(32)?))
}

fn sql_time(ms: u64) -> i64 {
    i64::try_from(ms).unwrap_or(i64::MAX)
}

// ---------------------------------------------------------------- browser sessions

#[derive(Debug, Clone)]
pub struct NewSession {
    pub token: String,
    pub csrf_token: String,
    pub expires_at: i64,
}

pub fn create_session(
    conn: &mut DbConnection,
    user: &UserId,
    meta: &RequestMeta,
    ttl_ms: u64,
) -> Result<NewSession, IdentityError> {
    let token = secret(SESSION_PREFIX)?;
    let csrf_token = random_token(32)?;
    let now = now_ms();
    let expires_at = now.saturating_add(sql_time(ttl_ms));
    diesel::insert_into(sessions::table)
        .values((
            sessions::id.eq(uuid::Uuid::now_v7().to_string()),
            sessions::token_hash.eq(digest(&token)),
            sessions::csrf_hash.eq(digest(&csrf_token)),
            sessions::user_id.eq(user.as_str()),
            sessions::created_at.eq(now),
            sessions::expires_at.eq(expires_at),
            sessions::ip.eq(meta.ip.map(|i| i.to_string())),
            sessions::user_agent.eq(meta.user_agent.clone()),
        ))
        .execute(conn)?;
    Ok(NewSession {
        token,
        csrf_token,
        expires_at,
    })
}

/// The live session for a cookie value, with its user and CSRF digest.
pub fn find_session(conn: &mut DbConnection, token: &str) -> QueryResult<Option<(UserRow, String)>> {
    sessions::table
        .inner_join(users::table)
        .filter(sessions::token_hash.eq(digest(token)))
        .filter(sessions::expires_at.gt(now_ms()))
        .select((UserRow::as_select(), sessions::csrf_hash))
        .first(conn)
        .optional()
}

pub fn delete_session(conn: &mut DbConnection, token: &str) -> QueryResult<usize> {
    diesel::delete(sessions::table.filter(sessions::token_hash.eq(digest(token)))).execute(conn)
}

// ---------------------------------------------------------------- API token families

#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, utoipa::ToSchema)]
pub struct TokenPair {
    pub access_token: String,
    pub refresh_token: String,
    pub token_type: String,
    /// Seconds the access token stays valid.
    pub expires_in: i64,
}

/// Issues an access token and a refresh token, in a new family unless one is given.
pub fn issue_tokens(
    conn: &mut DbConnection,
    user: &UserId,
    family: Option<String>,
    refresh_ttl_ms: u64,
) -> Result<TokenPair, IdentityError> {
    let family = family.unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
    let access_token = secret(ACCESS_PREFIX)?;
    let refresh_token = secret(REFRESH_PREFIX)?;
    let now = now_ms();
    diesel::insert_into(access_tokens::table)
        .values((
            access_tokens::token_hash.eq(digest(&access_token)),
            access_tokens::family_id.eq(&family),
            access_tokens::user_id.eq(user.as_str()),
            access_tokens::expires_at.eq(now + ACCESS_TOKEN_TTL_MS),
        ))
        .execute(conn)?;
    diesel::insert_into(refresh_tokens::table)
        .values((
            refresh_tokens::id.eq(uuid::Uuid::now_v7().to_string()),
            refresh_tokens::token_hash.eq(digest(&refresh_token)),
            refresh_tokens::family_id.eq(&family),
            refresh_tokens::user_id.eq(user.as_str()),
            refresh_tokens::created_at.eq(now),
            refresh_tokens::expires_at.eq(now.saturating_add(sql_time(refresh_ttl_ms))),
        ))
        .execute(conn)?;
    Ok(TokenPair {
        access_token,
        refresh_token,
        token_type: "Bearer".into(),
        expires_in: ACCESS_TOKEN_TTL_MS / 1000,
    })
}

#[derive(Debug)]
pub enum Refreshed {
    Ok(TokenPair, UserId),
    /// Unknown, expired or revoked.
    Invalid,
    /// Already spent: someone holds a copy. The whole family is now revoked.
    Reused(UserId),
}

/// Rotates a refresh token. The spent token is marked with a conditional update, so two
/// concurrent uses cannot both succeed: the loser counts as reuse.
pub fn refresh(
    conn: &mut DbConnection,
    token: &str,
    refresh_ttl_ms: u64,
    meta: &RequestMeta,
) -> Result<Refreshed, IdentityError> {
    crate::db::transaction(conn, |conn| {
        let now = now_ms();
        let row: Option<(String, String, String, i64, Option<i64>)> = refresh_tokens::table
            .filter(refresh_tokens::token_hash.eq(digest(token)))
            .select((
                refresh_tokens::id,
                refresh_tokens::family_id,
                refresh_tokens::user_id,
                refresh_tokens::expires_at,
                refresh_tokens::revoked_at,
            ))
            .first(conn)
            .optional()?;
        let Some((id, family, user, expires_at, revoked_at)) = row else {
            return Ok(Refreshed::Invalid);
        };
        if revoked_at.is_some() || expires_at <= now {
            return Ok(Refreshed::Invalid);
        }
        let user = UserId::from_db(user);
        let spent = diesel::update(
            refresh_tokens::table
                .filter(refresh_tokens::id.eq(&id))
                .filter(refresh_tokens::used_at.is_null()),
        )
        .set(refresh_tokens::used_at.eq(now))
        .execute(conn)?;
        if spent == 0 {
            revoke_family(conn, &family)?;
            audit::record(
                conn,
                &Actor::System,
                &RequestMeta::system(),
                Event::on_user(
                    "auth.refresh_reuse",
                    &user,
                    serde_json::json!({ "family": family }),
                ),
            )?;
            return Ok(Refreshed::Reused(user));
        }
        // The family keeps its original end: rotation never extends a login.
        let family_end: i64 = refresh_tokens::table
            .filter(refresh_tokens::family_id.eq(&family))
            .select(diesel::dsl::min(refresh_tokens::expires_at))
            .first::<Option<i64>>(conn)?
            .unwrap_or(now);
        let remaining = u64::try_from(family_end.saturating_sub(now))
            .unwrap_or(0)
            .min(refresh_ttl_ms);
        let pair = issue_tokens(conn, &user, Some(family.clone()), remaining)?;
        audit::record(
            conn,
            &Actor::User(user.clone()),
            meta,
            Event::on_user("auth.refresh", &user, serde_json::json!({ "family": family })),
        )?;
        Ok(Refreshed::Ok(pair, user))
    })
}

pub fn revoke_family(conn: &mut DbConnection, family: &str) -> QueryResult<()> {
    diesel::update(
        refresh_tokens::table
            .filter(refresh_tokens::family_id.eq(family))
            .filter(refresh_tokens::revoked_at.is_null()),
    )
    .set(refresh_tokens::revoked_at.eq(now_ms()))
    .execute(conn)?;
    diesel::delete(access_tokens::table.filter(access_tokens::family_id.eq(family))).execute(conn)?;
    Ok(())
}

/// The user and token family behind a live access token.
pub fn find_access_token(conn: &mut DbConnection, token: &str) -> QueryResult<Option<(UserRow, String)>> {
    access_tokens::table
        .inner_join(users::table)
        .filter(access_tokens::token_hash.eq(digest(token)))
        .filter(access_tokens::expires_at.gt(now_ms()))
        .select((UserRow::as_select(), access_tokens::family_id))
        .first(conn)
        .optional()
}

/// Ends every login of a user: sessions and token families (after a password change).
pub fn revoke_all_logins(conn: &mut DbConnection, user: &UserId) -> QueryResult<()> {
    diesel::delete(sessions::table.filter(sessions::user_id.eq(user.as_str()))).execute(conn)?;
    diesel::delete(access_tokens::table.filter(access_tokens::user_id.eq(user.as_str()))).execute(conn)?;
    diesel::update(
        refresh_tokens::table
            .filter(refresh_tokens::user_id.eq(user.as_str()))
            .filter(refresh_tokens::revoked_at.is_null()),
    )
    .set(refresh_tokens::revoked_at.eq(now_ms()))
    .execute(conn)?;
    diesel::delete(login_challenges::table.filter(login_challenges::user_id.eq(user.as_str())))
        .execute(conn)?;
    Ok(())
}

// ---------------------------------------------------------------- 2FA challenges

/// Which kind of login a challenge finishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum LoginClient {
    /// A cookie session with a CSRF token.
    Browser,
    /// An access and refresh token pair.
    Api,
}

impl LoginClient {
    fn as_str(self) -> &'static str {
        match self {
            LoginClient::Browser => "browser",
            LoginClient::Api => "api",
        }
    }
}

pub fn create_challenge(
    conn: &mut DbConnection,
    user: &UserId,
    client: LoginClient,
) -> Result<String, IdentityError> {
    let token = secret(CHALLENGE_PREFIX)?;
    diesel::insert_into(login_challenges::table)
        .values((
            login_challenges::id.eq(uuid::Uuid::now_v7().to_string()),
            login_challenges::token_hash.eq(digest(&token)),
            login_challenges::user_id.eq(user.as_str()),
            login_challenges::client.eq(client.as_str()),
            login_challenges::expires_at.eq(now_ms() + CHALLENGE_TTL_MS),
        ))
        .execute(conn)?;
    Ok(token)
}

#[derive(Debug, Clone)]
pub struct OpenChallenge {
    pub id: String,
    pub user: UserRow,
    pub client: LoginClient,
}

/// Counts one attempt on a live challenge and returns it, or `None` when the challenge is
/// unknown, spent, expired or out of attempts.
pub fn attempt_challenge(conn: &mut DbConnection, token: &str) -> QueryResult<Option<OpenChallenge>> {
    crate::db::transaction(conn, |conn| {
        let row: Option<(String, String, String)> = login_challenges::table
            .filter(login_challenges::token_hash.eq(digest(token)))
            .filter(login_challenges::used_at.is_null())
            .filter(login_challenges::expires_at.gt(now_ms()))
            .filter(login_challenges::attempts.lt(CHALLENGE_MAX_ATTEMPTS))
            .select((
                login_challenges::id,
                login_challenges::user_id,
                login_challenges::client,
            ))
            .first(conn)
            .optional()?;
        let Some((id, user_id, client)) = row else {
            return Ok(None);
        };
        diesel::update(login_challenges::table.find(&id))
            .set(login_challenges::attempts.eq(login_challenges::attempts + 1))
            .execute(conn)?;
        let user = users::table
            .find(&user_id)
            .select(UserRow::as_select())
            .first(conn)?;
        let client = if client == "api" {
            LoginClient::Api
        } else {
            LoginClient::Browser
        };
        Ok(Some(OpenChallenge { id, user, client }))
    })
}

/// Spends a challenge; `false` if someone else spent it first.
pub fn finish_challenge(conn: &mut DbConnection, id: &str) -> QueryResult<bool> {
    let n = diesel::update(
        login_challenges::table
            .filter(login_challenges::id.eq(id))
            .filter(login_challenges::used_at.is_null()),
    )
    .set(login_challenges::used_at.eq(now_ms()))
    .execute(conn)?;
    Ok(n == 1)
}

// ---------------------------------------------------------------- TOTP

pub fn totp_for(secret_b32: &str, account: &str) -> Result<Totp, IdentityError> {
    let secret = Secret::try_from_base32(secret_b32).map_err(|e| IdentityError::Totp(e.to_string()))?;
    Builder::new()
        .with_secret(secret)
        .with_issuer(Some("Mamba"))
        .with_account_name(account.replace(':', ""))
        .build()
        .map_err(|e| IdentityError::Totp(e.to_string()))
}

/// A new secret (160 bits, as RFC 4226 recommends), base32.
pub fn new_totp_secret() -> Result<String, IdentityError> {
    let bytes: [u8; 20] = crate::tokens::random_bytes()?;
    Ok(Secret::from(bytes.to_vec()).to_base32())
}

fn unix_secs() -> u64 {
    u64::try_from(now_ms() / 1000).unwrap_or(0)
}

/// Checks a code and consumes its time step: a step is accepted once, and never one older
/// than the last accepted, so a code seen by someone else cannot be replayed.
pub fn accept_totp(
    conn: &mut DbConnection,
    sealer: &crate::secrets::FieldSealer,
    user: &UserRow,
    code: &str,
) -> Result<bool, IdentityError> {
    let Some(sealed) = &user.totp_secret else {
        return Ok(false);
    };
    let secret = sealer
        .open(&user.id, sealed)
        .map_err(|e| IdentityError::Totp(e.to_string()))?;
    let totp = totp_for(&secret, &user.email)?;
    let Some(step) = totp.check(code.trim(), unix_secs()) else {
        return Ok(false);
    };
    let step = i64::try_from(step).unwrap_or(i64::MAX);
    let claimed = diesel::update(
        users::table
            .filter(users::id.eq(&user.id))
            .filter(users::totp_last_step.is_null().or(users::totp_last_step.lt(step))),
    )
    .set(users::totp_last_step.eq(step))
    .execute(conn)?;
    Ok(claimed == 1)
}

/// Stores a pending secret, sealed (2FA is not on until a code confirms it).
pub fn begin_totp(
    conn: &mut DbConnection,
    sealer: &crate::secrets::FieldSealer,
    user: &UserId,
    secret_b32: &str,
) -> Result<(), IdentityError> {
    let sealed = sealer
        .seal(user.as_str(), secret_b32)
        .map_err(|e| IdentityError::Totp(e.to_string()))?;
    diesel::update(users::table.find(user.as_str()))
        .set((
            users::totp_secret.eq(sealed),
            users::totp_enabled_at.eq(None::<i64>),
            users::totp_last_step.eq(None::<i64>),
            users::updated_at.eq(now_ms()),
        ))
        .execute(conn)?;
    Ok(())
}

/// Turns 2FA on and replaces the recovery codes; returns the new codes (shown once).
pub fn enable_totp(
    conn: &mut DbConnection,
    user: &UserId,
    meta: &RequestMeta,
) -> Result<Vec<String>, IdentityError> {
    diesel::update(users::table.find(user.as_str()))
        .set((
            users::totp_enabled_at.eq(Some(now_ms())),
            users::updated_at.eq(now_ms()),
        ))
        .execute(conn)?;
    diesel::delete(recovery_codes::table.filter(recovery_codes::user_id.eq(user.as_str()))).execute(conn)?;
    let mut codes = Vec::with_capacity(RECOVERY_CODES);
    for _ in 0..RECOVERY_CODES {
        let bytes: [u8; 8] = crate::tokens::random_bytes()?;
        let code = hex::encode(bytes);
        diesel::insert_into(recovery_codes::table)
            .values((
                recovery_codes::id.eq(uuid::Uuid::now_v7().to_string()),
                recovery_codes::user_id.eq(user.as_str()),
                recovery_codes::code_hash.eq(digest(&code)),
            ))
            .execute(conn)?;
        codes.push(code);
    }
    audit::record(
        conn,
        &Actor::User(user.clone()),
        meta,
        Event::on_user("user.two_factor_enable", &user, serde_json::json!({})),
    )?;
    Ok(codes)
}

pub fn disable_totp(conn: &mut DbConnection, user: &UserId, meta: &RequestMeta) -> QueryResult<()> {
    diesel::update(users::table.find(user.as_str()))
        .set((
            users::totp_secret.eq(None::<String>),
            users::totp_enabled_at.eq(None::<i64>),
            users::updated_at.eq(now_ms()),
        ))
        .execute(conn)?;
    diesel::delete(recovery_codes::table.filter(recovery_codes::user_id.eq(user.as_str()))).execute(conn)?;
    audit::record(
        conn,
        &Actor::User(user.clone()),
        meta,
        Event::on_user("user.two_factor_disable", &user, serde_json::json!({})),
    )?;
    Ok(())
}

/// Spends a recovery code; `false` if it is unknown or spent.
pub fn use_recovery_code(conn: &mut DbConnection, user: &UserId, code: &str) -> QueryResult<bool> {
    let code = code.trim().to_lowercase();
    let n = diesel::update(
        recovery_codes::table
            .filter(recovery_codes::user_id.eq(user.as_str()))
            .filter(recovery_codes::code_hash.eq(digest(&code)))
            .filter(recovery_codes::used_at.is_null()),
    )
    .set(recovery_codes::used_at.eq(now_ms()))
    .execute(conn)?;
    Ok(n == 1)
}
