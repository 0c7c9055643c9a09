//! Wings' HTTP API (actix-web). The panel is its only client for everything but console
//! sockets and signed URLs. The panel's routes are served on a mutual-TLS listener that
//! admits only the panel's certificate, and refused on the public listener.
//!
//! API boundary: handlers parse and check input, then hand the work to the server actors on
//! the main runtime. They never talk to Docker themselves.

pub mod backup_download;
pub mod backups;
pub mod error;
pub mod files;

use std::future::Future;
use std::sync::Arc;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::StatusCode;
use actix_web::middleware::{Next, from_fn};
use actix_web::{HttpRequest, HttpResponse, web};
use mamba_shared::ids::ServerId;
use mamba_shared::wings_api::{
    CommandsRequest, CreateServerRequest, DeauthorizeRequest, DenyTokensRequest, LogsResponse, PowerAccepted,
    PowerRequest, ServerUpdated,
};
use serde::Deserialize;

use self::error::ApiError;
use crate::server::Server;
use crate::server::manager::Manager;
use crate::system::SystemProbe;
use crate::tokens::TokenVerifier;
use crate::websocket::{self, SessionSettings};

pub struct AppState {
    pub manager: Arc<Manager>,
    /// The main runtime, where server actors and Docker connections live.
    pub runtime: tokio::runtime::Handle,
    pub system: SystemProbe,
    pub tokens: Arc<TokenVerifier>,
    pub websocket: Arc<SessionSettings>,
    /// The HTTP client for `files/pull`, which only ever connects to allowed addresses.
    pub pull_client: reqwest::Client,
}

impl AppState {
    /// Runs `fut` on the main runtime: actix workers have runtimes of their own.
    pub(crate) async fn on_main<T: Send + 'static>(
        &self,
        fut: impl Future<Output = T> + Send + 'static,
    ) -> Result<T, ApiError> {
        self.runtime
            .spawn(fut)
            .await
            .map_err(|e| ApiError::internal(format!("task failed: {e}")))
    }

    pub(crate) fn server(&self, id: &str) -> Result<Arc<Server>, ApiError> {
        let id = ServerId::new(id).map_err(|_| ApiError::not_found("server"))?;
        self.manager.get(&id).ok_or_else(|| ApiError::not_found("server"))
    }
}

pub fn configure(cfg: &mut web::ServiceConfig, max_json_bytes: usize) {
    cfg.app_data(
        web::JsonConfig::default()
            .limit(max_json_bytes)
            .error_handler(|err, _| ApiError::bad_request(format!("invalid JSON body: {err}")).into()),
    )
    .app_data(
        web::QueryConfig::default().error_handler(|err, _| ApiError::bad_request(err.to_string()).into()),
    )
    .app_data(
        web::PathConfig::default().error_handler(|err, _| ApiError::bad_request(err.to_string()).into()),
    )
    .route(
        "/healthz",
        web::get().to(|| async { HttpResponse::Ok().json(serde_json::json!({"status": "ok"})) }),
    )
    // Console sockets authenticate in-band with the panel's signed token.
    .route("/api/servers/{id}/ws", web::get().to(websocket::connect))
    // Signed URLs carry a single-use token from the panel in `?token=`.
    .configure(files::signed_routes)
    .service(
        web::scope("/api")
            .wrap(from_fn(require_panel))
            .route("/tokens/deny", web::post().to(deny_tokens))
            .route("/servers/{id}/deauthorize", web::post().to(deauthorize))
            .route("/servers/{id}/resources", web::get().to(resources))
            .route("/system", web::get().to(system))
            .route("/servers", web::get().to(list_servers))
            .route("/servers", web::post().to(create_server))
            .route("/servers/{id}", web::get().to(get_server))
            .route("/servers/{id}", web::put().to(update_server))
            .route("/servers/{id}", web::delete().to(delete_server))
            .route("/servers/{id}/power", web::post().to(power))
            .route("/servers/{id}/commands", web::post().to(commands))
            .route("/servers/{id}/logs", web::get().to(logs))
            .route("/servers/{id}/reinstall", web::post().to(reinstall))
            .route("/servers/{id}/install-logs", web::get().to(install_logs))
            .configure(backups::routes)
            .configure(files::routes),
    )
    .default_service(web::to(|req: HttpRequest| async move {
        Err::<HttpResponse, _>(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no route for {} {}", req.method(), req.path()),
        ))
    }));
}

/// Set on connections whose client presented the panel's certificate (the mutual-TLS
/// listener of an enrolled node verified chain and role in the handshake).
#[derive(Debug, Clone, Copy)]
pub struct PanelPeer;

/// For `HttpServer::on_connect` on the mutual-TLS listener.
pub fn on_connect(conn: &dyn std::any::Any, ext: &mut actix_web::dev::Extensions) {
    type Tls = actix_tls::accept::rustls_0_23::TlsStream<actix_web::rt::net::TcpStream>;
    if let Some(tls) = conn.downcast_ref::<Tls>() {
        let (_, session) = tls.get_ref();
        let is_panel = mamba_shared::pki::peer_identity(session.peer_certificates())
            .is_some_and(|p| p.identity == mamba_shared::pki::Identity::Panel);
        if is_panel {
            ext.insert(PanelPeer);
        }
    }
}

/// The panel's routes: only over the mutual-TLS listener, whose handshake verified the
/// panel's certificate. Anything else (the public listener) gets 401, whatever it carries.
async fn require_panel(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    if req.conn_data::<PanelPeer>().is_none() {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "the panel's routes are served only over mutual TLS to the panel's certificate",
        )
        .into());
    }
    next.call(req).await
}

async fn system(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let st = state.clone();
    let docker = state
        .on_main(async move { st.manager.context().docker.info().await })
        .await?;
    let docker = docker.map_err(|e| ApiError::new(StatusCode::BAD_GATEWAY, "docker", e.to_string()))?;
    let info = state.system.snapshot(
        &state.manager.context().config.system.data_dir,
        docker,
        state.manager.count(),
    );
    Ok(HttpResponse::Ok().json(info))
}

async fn list_servers(state: web::Data<AppState>) -> HttpResponse {
    let views: Vec<_> = state.manager.list().iter().map(|s| s.view()).collect();
    HttpResponse::Ok().json(views)
}

async fn create_server(
    state: web::Data<AppState>,
    body: web::Json<CreateServerRequest>,
) -> Result<HttpResponse, ApiError> {
    let manager = state.manager.clone();
    let server = state
        .on_main(async move { manager.create(body.into_inner()).await })
        .await??;
    Ok(HttpResponse::Accepted().json(server.view()))
}

async fn update_server(
    state: web::Data<AppState>,
    id: web::Path<String>,
    body: web::Json<CreateServerRequest>,
) -> Result<HttpResponse, ApiError> {
    let id = state.server(&id)?.id.clone();
    let manager = state.manager.clone();
    let (server, restart_required) = state
        .on_main(async move { manager.update(&id, body.into_inner()).await })
        .await??;
    Ok(HttpResponse::Ok().json(ServerUpdated {
        server: server.view(),
        restart_required,
    }))
}

async fn get_server(state: web::Data<AppState>, id: web::Path<String>) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(state.server(&id)?.view()))
}

async fn delete_server(state: web::Data<AppState>, id: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let server = state.server(&id)?;
    let manager = state.manager.clone();
    let id = server.id.clone();
    match state.on_main(async move { manager.delete(&id).await }).await? {
        None => Err(ApiError::not_found("server")),
        Some(Ok(())) => {
            let tokens = state.tokens.clone();
            let _ = web::block(move || tokens.forget_server(&server.id)).await;
            Ok(HttpResponse::NoContent().finish())
        }
        Some(Err(e)) => Err(ApiError::internal(format!("delete failed: {e}"))),
    }
}

async fn power(
    state: web::Data<AppState>,
    id: web::Path<String>,
    body: web::Json<PowerRequest>,
) -> Result<HttpResponse, ApiError> {
    let server = state.server(&id)?;
    let action = body.action;
    let ahead = state.on_main(async move { server.power(action) }).await??;
    Ok(HttpResponse::Accepted().json(PowerAccepted {
        action,
        queued_behind: ahead,
    }))
}

/// Longest command line accepted; games read lines, and this keeps one request bounded.
const MAX_COMMAND_BYTES: usize = 4096;

async fn commands(
    state: web::Data<AppState>,
    id: web::Path<String>,
    body: web::Json<CommandsRequest>,
) -> Result<HttpResponse, ApiError> {
    let server = state.server(&id)?;
    let commands = body.into_inner().commands;
    if commands.is_empty() || commands.len() > 100 {
        return Err(ApiError::bad_request("commands: give between 1 and 100 commands"));
    }
    if let Some(bad) = commands
        .iter()
        .position(|c| c.len() > MAX_COMMAND_BYTES || c.contains(['\n', '\r', '\0']))
    {
        return Err(ApiError::bad_request(format!(
            "commands[{bad}]: a command is one line of at most {MAX_COMMAND_BYTES} bytes"
        )));
    }
    state
        .on_main(async move { server.send_commands(&commands).await })
        .await??;
    Ok(HttpResponse::NoContent().finish())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LogsQuery {
    lines: Option<usize>,
}

async fn logs(
    state: web::Data<AppState>,
    id: web::Path<String>,
    query: web::Query<LogsQuery>,
) -> Result<HttpResponse, ApiError> {
    let server = state.server(&id)?;
    let lines = query
        .lines
        .unwrap_or(100)
        .min(state.manager.context().config.console.buffer_lines);
    Ok(HttpResponse::Ok().json(LogsResponse {
        lines: server.console.recent(lines),
    }))
}

async fn reinstall(state: web::Data<AppState>, id: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let server = state.server(&id)?;
    server.reinstall()?;
    Ok(HttpResponse::Accepted().json(server.view()))
}

async fn install_logs(state: web::Data<AppState>, id: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let server = state.server(&id)?;
    Ok(HttpResponse::Ok()
        .content_type("text/plain; charset=utf-8")
        .body(server.install_log()))
}

async fn resources(state: web::Data<AppState>, id: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let server = state.server(&id)?;
    let stats = state.on_main(async move { server.resources().await }).await?;
    Ok(HttpResponse::Ok().json(stats))
}

/// Longest user or token id accepted; the panel's are far shorter.
const MAX_ID_BYTES: usize = 256;

async fn deauthorize(
    state: web::Data<AppState>,
    id: web::Path<String>,
    body: web::Json<DeauthorizeRequest>,
) -> Result<HttpResponse, ApiError> {
    let server = state.server(&id)?;
    let user = body.into_inner().user;
    if user.is_empty() || user.len() > MAX_ID_BYTES {
        return Err(ApiError::bad_request(format!(
            "user: give 1 to {MAX_ID_BYTES} bytes"
        )));
    }
    let tokens = state.tokens.clone();
    save_revocations(move || tokens.deauthorize(&server.id, &user)).await
}

async fn deny_tokens(
    state: web::Data<AppState>,
    body: web::Json<DenyTokensRequest>,
) -> Result<HttpResponse, ApiError> {
    let denied = body.into_inner().tokens;
    if denied.is_empty() || denied.len() > 1000 {
        return Err(ApiError::bad_request("tokens: give between 1 and 1000 tokens"));
    }
    if let Some(bad) = denied
        .iter()
        .position(|t| t.jti.is_empty() || t.jti.len() > MAX_ID_BYTES)
    {
        return Err(ApiError::bad_request(format!(
            "tokens[{bad}].jti: give 1 to {MAX_ID_BYTES} bytes"
        )));
    }
    let tokens = state.tokens.clone();
    let denied: Vec<(String, u64)> = denied.into_iter().map(|t| (t.jti, t.expires_at)).collect();
    save_revocations(move || tokens.deny(&denied)).await
}

/// Runs a revocation (it writes and fsyncs the list) off the actix worker.
async fn save_revocations(
    change: impl FnOnce() -> std::io::Result<()> + Send + 'static,
) -> Result<HttpResponse, ApiError> {
    web::block(change)
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(|e| ApiError::internal(format!("cannot save the revocation list: {e}")))?;
    Ok(HttpResponse::NoContent().finish())
}
