//! A typed client of one node's wings API, over mutual TLS: the panel presents its own
//! certificate (role "panel", from `PanelPki::slot`, so a renewed one is used at once) and
//! accepts only the certificate of the node it means to call (`PanelPki::client_for_node`),
//! never a DNS name. The base URL is `https://{fqdn}:{api_port}`.
//!
//! Errors keep what callers decide on: a node that could not be reached (retry later), a
//! node that answered with its error envelope (status, code, message), or an answer that
//! could not be read. Jobs retry `is_retryable` errors; `is_not_found` on a delete means the
//! work is already done.

use std::time::Duration;

use mamba_shared::error::ErrorEnvelope;
use mamba_shared::ids::ServerId as WingsServerId;
use mamba_shared::wings_api::{
    BackupView, CommandsRequest, CreateBackupRequest, CreateServerRequest, DeauthorizeRequest,
    DenyTokensRequest, LogsResponse, PowerAction, PowerRequest, ResourceStats, RestoreBackupRequest,
    ServerUpdated, ServerView, SystemInfo,
};
use reqwest::{Method, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::ids::ServerId;
use crate::node_pki::PanelPki;
use crate::nodes::Node;

/// How long a connection (TCP and TLS handshake) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a whole request may take. wings answers every route quickly: long work (installs,
/// power actions) is queued on its side and answered 202.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest error body read from a node.
const MAX_ERROR_BODY: usize = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum WingsError {
    /// Could not reach the node (connect, TLS, timeout): retryable.
    #[error("node unreachable: {0}")]
    Unreachable(String),
    /// The node answered with an error envelope: status + code + message.
    #[error("node refused ({status} {code}): {message}")]
    Refused {
        status: u16,
        code: String,
        message: String,
    },
    /// The node's answer could not be read.
    #[error("unreadable answer from the node: {0}")]
    Decode(String),
}

impl WingsError {
    /// Worth trying again later: the node was unreachable, busy or failed inside.
    pub fn is_retryable(&self) -> bool {
        match self {
            WingsError::Unreachable(_) => true,
            WingsError::Refused { status, .. } => *status >= 500 || *status == 429 || *status == 408,
            WingsError::Decode(_) => false,
        }
    }

    /// The node does not know the server (or the route).
    pub fn is_not_found(&self) -> bool {
        matches!(self, WingsError::Refused { status: 404, .. })
    }

    /// The node refused because of the server's state (already exists, busy, not running).
    pub fn is_conflict(&self) -> bool {
        matches!(self, WingsError::Refused { status: 409, .. })
    }

    /// The HTTP status the node answered, if it answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            WingsError::Refused { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// A client of one node. Cheap to clone (one connection pool).
#[derive(Debug, Clone)]
pub struct WingsClient {
    http: reqwest::Client,
    base: String,
    node: String,
}

impl WingsClient {
    /// A client of `node`'s API. Fails only if the node's id cannot name a certificate or
    /// the TLS client cannot be built.
    pub fn new(pki: &PanelPki, node: &Node) -> Result<WingsClient, WingsError> {
        let host = if node.fqdn.parse::<std::net::Ipv6Addr>().is_ok() {
            format!("[{}]", node.fqdn)
        } else {
            node.fqdn.clone()
        };
        Self::with_base_url(pki, node, &format!("https://{host}:{}", node.api_port))
    }

    /// As [`WingsClient::new`], with an explicit base URL (tests, and nodes behind a
    /// forwarder); the node's certificate is still required.
    pub fn with_base_url(pki: &PanelPki, node: &Node, base: &str) -> Result<WingsClient, WingsError> {
        let tls = pki
            .client_for_node(node.id.as_str())
            .map_err(|e| WingsError::Unreachable(format!("TLS setup for node {}: {e}", node.id)))?;
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            // wings is never reached through a proxy, and never redirects.
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| WingsError::Unreachable(format!("client for node {}: {e}", node.id)))?;
        Ok(WingsClient {
            http,
            base: base.trim_end_matches('/').to_string(),
            node: node.id.to_string(),
        })
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// `POST /api/servers`: creates the server and queues its install. 409 if the id exists.
    pub async fn create_server(&self, req: &CreateServerRequest) -> Result<ServerView, WingsError> {
        self.call(Method::POST, "/api/servers", Some(req)).await
    }

    /// `PUT /api/servers/{id}`: replaces the server's spec (same body as a create, same id;
    /// allocations cannot change). Limits, variables and image apply at its next start.
    pub async fn update_server(&self, req: &CreateServerRequest) -> Result<ServerUpdated, WingsError> {
        let path = format!("/api/servers/{}", req.id);
        self.call(Method::PUT, &path, Some(req)).await
    }

    /// `GET /api/servers/{id}`.
    pub async fn server(&self, id: &ServerId) -> Result<ServerView, WingsError> {
        self.call::<(), _>(Method::GET, &format!("/api/servers/{}", wings_id(id)?), None)
            .await
    }

    /// `GET /api/servers`: every server the node runs.
    pub async fn servers(&self) -> Result<Vec<ServerView>, WingsError> {
        self.call::<(), _>(Method::GET, "/api/servers", None).await
    }

    /// `POST /api/servers/{id}/power`: queued on the node (202).
    pub async fn power(&self, id: &ServerId, action: PowerAction) -> Result<(), WingsError> {
        self.call_empty(
            Method::POST,
            &format!("/api/servers/{}/power", wings_id(id)?),
            Some(&PowerRequest { action }),
        )
        .await
    }

    /// `POST /api/servers/{id}/commands`: lines for the game's console; 409 while it is not
    /// running.
    pub async fn commands(&self, id: &ServerId, commands: Vec<String>) -> Result<(), WingsError> {
        self.call_empty(
            Method::POST,
            &format!("/api/servers/{}/commands", wings_id(id)?),
            Some(&CommandsRequest { commands }),
        )
        .await
    }

    /// `POST /api/servers/{id}/reinstall`: queued on the node.
    pub async fn reinstall(&self, id: &ServerId) -> Result<(), WingsError> {
        self.call_empty::<()>(
            Method::POST,
            &format!("/api/servers/{}/reinstall", wings_id(id)?),
            None,
        )
        .await
    }

    /// `DELETE /api/servers/{id}`: removes containers and files. A 404 means it is gone
    /// already: callers treat `is_not_found` as done.
    pub async fn delete_server(&self, id: &ServerId) -> Result<(), WingsError> {
        self.call_empty::<()>(Method::DELETE, &format!("/api/servers/{}", wings_id(id)?), None)
            .await
    }

    /// `POST /api/servers/{id}/deauthorize`: closes `user`'s console sockets and SFTP
    /// sessions on the server and refuses every token issued to them until now.
    pub async fn deauthorize(&self, id: &ServerId, user: &str) -> Result<(), WingsError> {
        self.call_empty(
            Method::POST,
            &format!("/api/servers/{}/deauthorize", wings_id(id)?),
            Some(&DeauthorizeRequest {
                user: user.to_string(),
            }),
        )
        .await
    }

    /// `POST /api/tokens/deny`: refuses these token ids until they expire.
    pub async fn deny_tokens(&self, req: &DenyTokensRequest) -> Result<(), WingsError> {
        self.call_empty(Method::POST, "/api/tokens/deny", Some(req)).await
    }

    /// `GET /api/servers/{id}/resources`: live figures.
    pub async fn resources(&self, id: &ServerId) -> Result<ResourceStats, WingsError> {
        self.call::<(), _>(
            Method::GET,
            &format!("/api/servers/{}/resources", wings_id(id)?),
            None,
        )
        .await
    }

    /// `GET /api/servers/{id}/logs?lines=n`: recent console lines.
    pub async fn logs(&self, id: &ServerId, lines: usize) -> Result<LogsResponse, WingsError> {
        self.call::<(), _>(
            Method::GET,
            &format!("/api/servers/{}/logs?lines={lines}", wings_id(id)?),
            None,
        )
        .await
    }

    /// `POST /api/servers/{id}/backups`: starts a backup (202, `running`). 409 when a backup
    /// with this id exists already (an earlier attempt started it) or a restore runs.
    pub async fn create_backup(
        &self,
        id: &ServerId,
        req: &CreateBackupRequest,
    ) -> Result<BackupView, WingsError> {
        self.call(
            Method::POST,
            &format!("/api/servers/{}/backups", wings_id(id)?),
            Some(req),
        )
        .await
    }

    /// `GET /api/servers/{id}/backups/{backup}`: its state, size and checksum, and the
    /// latest restore from it.
    pub async fn backup(&self, id: &ServerId, backup: &str) -> Result<BackupView, WingsError> {
        self.call::<(), _>(Method::GET, &backup_path(id, backup, "")?, None)
            .await
    }

    /// `POST /api/servers/{id}/backups/{backup}/restore`: verifies and then restores in the
    /// background (202); [`WingsClient::backup`] shows how it ended.
    pub async fn restore_backup(
        &self,
        id: &ServerId,
        backup: &str,
        req: &RestoreBackupRequest,
    ) -> Result<BackupView, WingsError> {
        self.call(Method::POST, &backup_path(id, backup, "/restore")?, Some(req))
            .await
    }

    /// `DELETE /api/servers/{id}/backups/{backup}`: the archive and its record (a running
    /// backup is cancelled first). 404 means it is gone already.
    pub async fn delete_backup(&self, id: &ServerId, backup: &str) -> Result<(), WingsError> {
        self.call_empty::<()>(Method::DELETE, &backup_path(id, backup, "")?, None)
            .await
    }

    /// `GET /api/system`: the node's facts.
    pub async fn system(&self) -> Result<SystemInfo, WingsError> {
        self.call::<(), _>(Method::GET, "/api/system", None).await
    }

    async fn send<B: Serialize>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<reqwest::Response, WingsError> {
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.map_err(|e| {
            if e.is_decode() {
                WingsError::Decode(e.to_string())
            } else {
                WingsError::Unreachable(format!("node {}: {}", self.node, error_chain(&e)))
            }
        })?;
        if response.status().is_success() {
            return Ok(response);
        }
        Err(refusal(response).await)
    }

    async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, WingsError> {
        let response = self.send(method, path, body).await?;
        let bytes = response
            .bytes()
            .await
            .map_err(|e| WingsError::Unreachable(format!("node {}: {}", self.node, error_chain(&e))))?;
        serde_json::from_slice(&bytes).map_err(|e| WingsError::Decode(e.to_string()))
    }

    async fn call_empty<B: Serialize>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<(), WingsError> {
        self.send(method, path, body).await.map(|_| ())
    }
}

/// Panel server ids are UUIDs, which are always valid wings ids.
fn wings_id(id: &ServerId) -> Result<WingsServerId, WingsError> {
    WingsServerId::new(id.as_str()).map_err(|e| WingsError::Decode(e.to_string()))
}

/// Backup ids are the panel's UUIDs; anything else never reaches the node.
fn backup_path(id: &ServerId, backup: &str, rest: &str) -> Result<String, WingsError> {
    if backup.is_empty() || !backup.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        return Err(WingsError::Decode(format!("{backup:?} is not a backup id")));
    }
    Ok(format!("/api/servers/{}/backups/{backup}{rest}", wings_id(id)?))
}

/// The node's error envelope, or a stand-in naming the status when the body is not one.
async fn refusal(response: reqwest::Response) -> WingsError {
    let status = response.status();
    let bytes = response.bytes().await.unwrap_or_default();
    let bytes = &bytes[..bytes.len().min(MAX_ERROR_BODY)];
    match serde_json::from_slice::<ErrorEnvelope>(bytes) {
        Ok(envelope) => WingsError::Refused {
            status: status.as_u16(),
            code: envelope.error.code,
            message: envelope.error.message,
        },
        Err(_) => WingsError::Refused {
            status: status.as_u16(),
            code: default_code(status).to_string(),
            message: String::from_utf8_lossy(bytes).chars().take(200).collect(),
        },
    }
}

fn default_code(status: StatusCode) -> &'static str {
    match status {
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::CONFLICT => "conflict",
        StatusCode::UNAUTHORIZED => "unauthorized",
        s if s.is_server_error() => "node_error",
        _ => "refused",
    }
}

/// reqwest's message with its causes, which name the TLS or connect failure.
fn error_chain(e: &reqwest::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification() {
        let refused = |status| WingsError::Refused {
            status,
            code: "x".into(),
            message: "y".into(),
        };
        assert!(WingsError::Unreachable("down".into()).is_retryable());
        assert!(refused(502).is_retryable());
        assert!(refused(429).is_retryable());
        assert!(!refused(400).is_retryable());
        assert!(refused(404).is_not_found() && !refused(404).is_retryable());
        assert!(refused(409).is_conflict());
        assert!(!WingsError::Decode("bad".into()).is_retryable());
    }
}
