//! Node enrollment and certificates over HTTP: the operator's routes on the public API
//! (`/api/v1/admin/nodes/{id}/enrollment-token`, `.../revoke`) and the node listener, a
//! separate mutual-TLS server that only wings talks to (`/api/node/v1/...`).
//!
//! Invariant: on the node listener, every route but enrollment requires a node certificate
//! from our CA that the certificate cache admits at the time of the request; the handshake
//! checks the same, so a revoked node fails at whichever comes first.

use std::any::Any;

use actix_web::body::MessageBody;
use actix_web::dev::{Extensions, Payload, ServiceFactory, ServiceRequest, ServiceResponse};
use actix_web::{App, FromRequest, HttpRequest, HttpResponse, web};
use futures_util::future::{Ready, ready};
use mamba_shared::node_api::{
    ENROLL_PATH, EnrollRequest, IDENTITY_PATH, NodeIdentityResponse, RENEW_PATH, RenewRequest,
};
use mamba_shared::pki::{self, CertInfo};
use serde::Serialize;

use super::AppState;
use super::extract::SuperAdmin;
use crate::audit::Actor;
use crate::error::ApiError;
use crate::node_pki;

pub(crate) fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route(
        "/admin/nodes/{node}/enrollment-token",
        web::post().to(create_enrollment_token),
    )
    .route("/admin/nodes/{node}/revoke", web::post().to(revoke_node));
}

/// A one-time enrollment token for a node, shown once.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct EnrollmentTokenCreated {
    pub node_id: String,
    /// `<secret>.<CA fingerprint>`, valid once, until `expires_at`.
    pub token: String,
    /// Unix milliseconds.
    pub expires_at: i64,
    /// The node listener's address, for `wings enroll --panel`.
    pub panel_url: String,
    /// The command to run on the node.
    pub command: String,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct NodeRevoked {
    pub node_id: String,
    /// Certificates revoked by this call.
    pub certificates_revoked: usize,
}

fn parse_node(raw: String) -> Result<String, ApiError> {
    uuid::Uuid::parse_str(&raw)
        .map(|u| u.to_string())
        .map_err(|_| ApiError::not_found("node"))
}

/// The node's status (`active`, `decommissioned`), or `None` when there is no such node.
fn node_status(conn: &mut crate::db::DbConnection, node: &str) -> Result<Option<String>, crate::db::DbError> {
    use diesel::prelude::*;

    use crate::db::schema::nodes;
    Ok(nodes::table
        .find(node)
        .select(nodes::status)
        .first::<String>(conn)
        .optional()?)
}

/// Makes a one-time enrollment token for the node (replacing any unused one). It works once,
/// for 15 minutes.
#[utoipa::path(post, path = "/api/v1/admin/nodes/{node}/enrollment-token", tag = "admin", params(("node" = String, Path, description = "Node id")), responses((status = 201, description = "Created; the token is shown once", body = EnrollmentTokenCreated), (status = 400, description = "Malformed request", body = crate::openapi::ErrorResponse), (status = 401, description = "Not logged in", body = crate::openapi::ErrorResponse), (status = 403, description = "Missing permission", body = crate::openapi::ErrorResponse), (status = 404, description = "No such node", body = crate::openapi::ErrorResponse), (status = 409, description = "The node is decommissioned", body = crate::openapi::ErrorResponse)), security(("bearer" = []), ("session" = [])))]
pub(crate) async fn create_enrollment_token(
    state: web::Data<AppState>,
    req: HttpRequest,
    admin: SuperAdmin,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let node = parse_node(path.into_inner())?;
    let meta = state.meta(&req);
    let actor = Actor::User(admin.0.user_id());
    let pki = state.pki.clone();
    let node_id = node.clone();
    let created = state
        .db
        .run(move |conn| {
            match node_status(conn, &node_id)?.as_deref() {
                None => return Ok(None),
                Some("decommissioned") => {
                    return Err(ApiError::conflict(
                        "node_decommissioned",
                        "a decommissioned node cannot enroll",
                    ));
                }
                Some(_) => {}
            }
            node_pki::create_enrollment_token(conn, &pki, &node_id, &actor, &meta)
                .map(Some)
                .map_err(ApiError::from)
        })
        .await?;
    let Some((token, expires_at)) = created else {
        return Err(ApiError::not_found("node"));
    };
    let panel_url = state.config.node_listener.public_url.clone();
    Ok(HttpResponse::Created().json(EnrollmentTokenCreated {
        command: format!("wings enroll --panel {panel_url} --token {token}"),
        node_id: node,
        token: token.to_string(),
        expires_at,
        panel_url,
    }))
}

/// Revokes every certificate of the node and its unused enrollment token: its next
/// handshake or request fails. A new enrollment token re-admits it.
#[utoipa::path(post, path = "/api/v1/admin/nodes/{node}/revoke", tag = "admin", params(("node" = String, Path, description = "Node id")), responses((status = 200, description = "Revoked", body = NodeRevoked), (status = 400, description = "Malformed request", body = crate::openapi::ErrorResponse), (status = 401, description = "Not logged in", body = crate::openapi::ErrorResponse), (status = 403, description = "Missing permission", body = crate::openapi::ErrorResponse), (status = 404, description = "No such node", body = crate::openapi::ErrorResponse)), security(("bearer" = []), ("session" = [])))]
pub(crate) async fn revoke_node(
    state: web::Data<AppState>,
    req: HttpRequest,
    admin: SuperAdmin,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let node = parse_node(path.into_inner())?;
    let meta = state.meta(&req);
    let actor = Actor::User(admin.0.user_id());
    let pki = state.pki.clone();
    let node_id = node.clone();
    let revoked = state
        .db
        .run(move |conn| {
            if node_status(conn, &node_id)?.is_none() {
                return Ok(None);
            }
            node_pki::revoke(conn, &pki, &node_id, &actor, &meta)
                .map(Some)
                .map_err(ApiError::from)
        })
        .await?;
    let Some(certificates_revoked) = revoked else {
        return Err(ApiError::not_found("node"));
    };
    Ok(HttpResponse::Ok().json(NodeRevoked {
        node_id: node,
        certificates_revoked,
    }))
}

/// The verified certificate of the node at the other end of this connection.
#[derive(Debug, Clone)]
pub struct PeerCert(pub CertInfo);

/// For `HttpServer::on_connect` on the node listener: remembers the peer's certificate (the
/// handshake already verified chain, role and liveness).
pub fn on_connect(conn: &dyn Any, ext: &mut Extensions) {
    type Tls = actix_tls::accept::rustls_0_23::TlsStream<actix_web::rt::net::TcpStream>;
    if let Some(tls) = conn.downcast_ref::<Tls>() {
        let (_, session) = tls.get_ref();
        if let Some(info) = pki::peer_identity(session.peer_certificates()) {
            ext.insert(PeerCert(info));
        }
    }
}

/// A node authenticated by its certificate, still admitted now (not revoked since the
/// connection was made).
#[derive(Debug, Clone)]
pub struct NodePeer {
    pub node_id: String,
    pub cert: CertInfo,
}

impl FromRequest for NodePeer {
    type Error = ApiError;
    type Future = Ready<Result<NodePeer, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let state = req.app_data::<web::Data<AppState>>();
        let peer = req.conn_data::<PeerCert>();
        let result = match (state, peer) {
            (Some(state), Some(PeerCert(cert))) => match cert.identity.node_id() {
                Some(node) if state.pki.cache.admits(node, &cert.fingerprint) => Ok(NodePeer {
                    node_id: node.to_owned(),
                    cert: cert.clone(),
                }),
                _ => Err(ApiError::unauthorized("this node certificate is no longer valid")),
            },
            _ => Err(ApiError::unauthorized("a node certificate is required")),
        };
        ready(result)
    }
}

async fn enroll(
    state: web::Data<AppState>,
    req: HttpRequest,
    body: web::Json<EnrollRequest>,
) -> Result<HttpResponse, ApiError> {
    let body = body.into_inner();
    let meta = state.meta(&req);
    let pki = state.pki.clone();
    let answer = state
        .db
        .run(move |conn| {
            node_pki::enroll(conn, &pki, &body.token, &body.csr_pem, &meta).map_err(ApiError::from)
        })
        .await?;
    Ok(HttpResponse::Ok().json(answer))
}

async fn identity(node: NodePeer) -> HttpResponse {
    HttpResponse::Ok().json(NodeIdentityResponse {
        node_id: node.node_id,
        fingerprint: node.cert.fingerprint,
        not_after: node.cert.not_after,
    })
}

async fn renew(
    state: web::Data<AppState>,
    req: HttpRequest,
    node: NodePeer,
    body: web::Json<RenewRequest>,
) -> Result<HttpResponse, ApiError> {
    let meta = state.meta(&req);
    let pki = state.pki.clone();
    let answer = state
        .db
        .run(move |conn| {
            node_pki::renew(conn, &pki, &node.cert, &body.csr_pem, &meta).map_err(ApiError::from)
        })
        .await?;
    Ok(HttpResponse::Ok().json(answer))
}

/// The node listener's application. Serve it with [`on_connect`] and
/// [`crate::node_pki::PanelPki::node_listener_tls`].
pub fn node_app(
    state: web::Data<AppState>,
) -> App<
    impl ServiceFactory<
        ServiceRequest,
        Config = (),
        Response = ServiceResponse<impl MessageBody>,
        Error = actix_web::Error,
        InitError = (),
    >,
> {
    let max_json = state.config.http.max_json_bytes;
    App::new()
        .app_data(state)
        .app_data(
            web::JsonConfig::default()
                .limit(max_json)
                .error_handler(|err, _| ApiError::bad_request(format!("invalid JSON body: {err}")).into()),
        )
        .route(ENROLL_PATH, web::post().to(enroll))
        .route(RENEW_PATH, web::post().to(renew))
        .route(IDENTITY_PATH, web::get().to(identity))
        .configure(super::node_api::configure_node)
        .route(
            mamba_shared::node_sftp::SFTP_AUTH_PATH,
            web::post().to(super::node_sftp::sftp_auth),
        )
        .default_service(web::to(|req: HttpRequest| async move {
            Err::<HttpResponse, _>(ApiError::new(
                actix_web::http::StatusCode::NOT_FOUND,
                "not_found",
                format!("no route for {} {}", req.method(), req.path()),
            ))
        }))
}

/// Serves [`node_app`] on `listener` with mutual TLS.
pub fn node_server(
    state: web::Data<AppState>,
    listener: std::net::TcpListener,
) -> Result<actix_web::dev::Server, NodeListenerError> {
    let tls = state.pki.node_listener_tls()?;
    let workers = state.config.http.workers;
    let server = actix_web::HttpServer::new(move || node_app(state.clone()))
        .workers(workers)
        .on_connect(on_connect)
        .listen_rustls_0_23(listener, tls)?
        .run();
    Ok(server)
}

#[derive(Debug, thiserror::Error)]
pub enum NodeListenerError {
    #[error(transparent)]
    Pki(#[from] node_pki::NodePkiError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}
