//! `POST /api/node/v1/sftp/auth` on the node listener: a node asks whether an SFTP login may
//! proceed (see [`crate::sftp_auth`]). The node is the one its certificate names; the body
//! only says what the SFTP client presented and from where.
//!
//! Password checks count against the same limits as the API's login, under the same keys
//! (per client address, and per account and address), so guessing over SFTP and over the API
//! draws from one allowance. Keys are not counted here: clients offer every key they hold,
//! and a key cannot be guessed; the node limits failed signatures itself.

use std::time::Duration;

use actix_web::{HttpResponse, web};
use mamba_shared::node_sftp::{
    MAX_SFTP_PASSWORD_BYTES, MAX_SFTP_USER_BYTES, SftpAuthRequest, SftpCredential,
};

use super::AppState;
use super::auth::enforce;
use super::node_pki::NodePeer;
use crate::error::ApiError;
use crate::sftp_auth::{self, Outcome, Proof};

fn bad_credential() -> ApiError {
    ApiError::unauthorized("the login or credential is wrong").with_code("invalid_credentials")
}

/// Checks an SFTP login a node received (the password, or the public key the node verified
/// possession of) and answers the grant. Node listener only (mutual TLS).
#[utoipa::path(post, path = "/api/node/v1/sftp/auth", tag = "node",
    request_body = crate::openapi::SftpAuthRequestDoc,
    responses((status = 200, description = "The grant: user, server and file permissions", body = crate::openapi::SftpAuthGrantDoc),
        (status = 400, description = "Malformed request", body = crate::openapi::ErrorResponse),
        (status = 401, description = "Wrong login or credential, or no admitted node certificate", body = crate::openapi::ErrorResponse),
        (status = 403, description = "No access to that server on this node", body = crate::openapi::ErrorResponse),
        (status = 429, description = "Too many failed logins from the address or for the account", body = crate::openapi::ErrorResponse)),
    security(("node_mtls" = [])))]
pub(crate) async fn sftp_auth(
    state: web::Data<AppState>,
    node: NodePeer,
    body: web::Json<SftpAuthRequest>,
) -> Result<HttpResponse, ApiError> {
    let body = body.into_inner();
    if body.user.is_empty()
        || body.user.len() > MAX_SFTP_USER_BYTES
        || body.user.chars().any(char::is_control)
    {
        return Err(ApiError::invalid("user", "must be an email address or a user id"));
    }
    if body.server_short.len() > 64 {
        return Err(ApiError::invalid("server_short", "must be a server's short id"));
    }
    let proof = match body.credential {
        SftpCredential::Password { password } => {
            if password.len() > MAX_SFTP_PASSWORD_BYTES {
                return Err(bad_credential());
            }
            let limits = &state.config.rate_limits;
            let ip = body.client_ip.to_string();
            let account = body.user.trim().to_lowercase();
            enforce(
                state
                    .limiter
                    .hit(
                        &format!("login-ip:{ip}"),
                        limits.login_per_ip_per_minute,
                        Duration::from_secs(60),
                    )
                    .await,
            )?;
            enforce(
                state
                    .limiter
                    .hit(
                        &format!("login-account:{ip}:{account}"),
                        limits.login_per_account_per_15min,
                        Duration::from_secs(900),
                    )
                    .await,
            )?;
            Proof::Password(password)
        }
        SftpCredential::PublicKey { public_key } => match crate::ssh_keys::parse(&public_key) {
            Ok(key) => Proof::Key(key),
            // Not a key we would ever have stored: the same answer as an unknown key.
            Err(_) => return Err(bad_credential()),
        },
    };
    let hasher = state.hasher.clone();
    let dummy = state.dummy_hash.clone();
    let outcome = state
        .db
        .run(move |conn| -> Result<Outcome, ApiError> {
            Ok(sftp_auth::check(
                conn,
                &hasher,
                &dummy,
                &node.node_id,
                &body.user,
                &body.server_short,
                &proof,
            )?)
        })
        .await?;
    match outcome {
        Outcome::Granted(grant) => Ok(HttpResponse::Ok().json(grant)),
        Outcome::BadCredential => Err(bad_credential()),
        Outcome::Refused(code, message) => Err(ApiError::forbidden(message).with_code(code)),
    }
}
