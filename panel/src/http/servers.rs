//! Servers through the panel: the tenant routes under `/api/v1/tenants/{tenant}/servers`,
//! the tenant's quota, and the operators' suspend, unsuspend and quota routes.
//!
//! Changes are written with their job in one transaction (`servers`), and answered 202 with
//! the job; the jobs worker carries them out on the node. Only console commands call the node
//! directly (they are not worth keeping if the node is away), and the console route signs a
//! token the browser takes to the node itself.

use std::collections::BTreeMap;

use actix_web::{HttpRequest, HttpResponse, web};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::AppState;
use super::extract::{Authenticated, SuperAdmin};
use super::tenants::scoped;
use crate::allocation::Allocation;
use crate::audit::Actor;
use crate::blueprints;
use crate::console_token::{self, CONSOLE_PERMISSIONS, ConsoleClaims, WEBSOCKET_SCOPE};
use crate::error::ApiError;
use crate::ids::{JobId, TenantId};
use crate::metrics_store::{self, Point, Range};
use crate::nodes;
use crate::pagination::PageQuery;
use crate::servers::{
    self, NewServer, Power, QuotaOverrides, Server, ServerChanges, ServerFilter, ServerRow,
};
use crate::wings_client::{WingsClient, WingsError};

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::scope("/tenants/{tenant}/servers")
            .route("", web::post().to(create_server))
            .route("", web::get().to(list_servers))
            .route("/{server}", web::get().to(get_server))
            .route("/{server}", web::patch().to(update_server))
            .route("/{server}", web::delete().to(delete_server))
            .route("/{server}/power", web::post().to(power_server))
            .route("/{server}/commands", web::post().to(send_commands))
            .route("/{server}/reinstall", web::post().to(reinstall_server))
            .route("/{server}/console", web::get().to(console))
            .route("/{server}/metrics", web::get().to(server_metrics))
            .route("/{server}/events", web::get().to(super::node_api::server_events))
            .route(
                "/{server}/activity",
                web::get().to(super::node_api::server_activity),
            )
            .configure(super::backups::configure),
    )
    .route("/tenants/{tenant}/quota", web::get().to(tenant_quota))
    .route("/admin/tenants/{tenant}/quota", web::put().to(admin_set_quota))
    .route("/admin/servers/{server}/suspend", web::post().to(suspend_server))
    .route(
        "/admin/servers/{server}/unsuspend",
        web::post().to(unsuspend_server),
    );
}

/// A server with what its page shows.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ServerDetail {
    #[serde(flatten)]
    pub server: Server,
    /// The blueprint's display name (absent if the blueprint was removed since).
    pub blueprint_name: Option<String>,
    /// Values of the user-viewable variables; only with `startup.read`.
    pub variables: Option<BTreeMap<String, String>>,
    /// The server's addresses, primary first.
    pub allocations: Vec<Allocation>,
    /// The server's latest jobs, newest first.
    #[schema(value_type = Vec<Object>)]
    pub jobs: Vec<serde_json::Value>,
    /// The latest resource sample of the last hour, if any.
    pub metrics: Option<Point>,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ConsoleAccess {
    /// The token to send in the socket's `auth` event; it names this server and user.
    pub token: String,
    /// Unix seconds.
    pub expires_at: u64,
    /// The node's console socket for this server.
    pub socket: String,
    /// What the token allows on the socket.
    pub permissions: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PowerBody {
    pub action: Power,
}

#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CommandsBody {
    /// 1 to 100 lines, each at most 4096 bytes, without line breaks.
    pub commands: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct MetricsQuery {
    /// `1h` (raw samples, the default), `24h`, `7d` or `30d` (hourly rows).
    pub range: Option<String>,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct SuspendAnswer {
    pub server: Server,
    /// The stop a suspension queued.
    #[schema(value_type = Option<String>)]
    pub job: Option<JobId>,
    /// Whether the node confirmed closing the members' console sockets and SFTP sessions
    /// (false when it could not be reached; new console tokens are refused either way).
    pub sockets_closed: bool,
}

/// The longest console line accepted, as wings accepts it.
const MAX_COMMAND_BYTES: usize = 4096;

fn server_id(raw: &str) -> Result<crate::ids::ServerId, ApiError> {
    servers::parse_id(raw)
}

/// A node's refusal or absence, as the panel's answer.
fn node_error(e: WingsError) -> ApiError {
    use actix_web::http::StatusCode;
    if e.is_conflict() {
        return ApiError::conflict("not_running", "the server is not running on its node");
    }
    if e.is_not_found() {
        return ApiError::conflict("not_on_node", "the node does not have this server (yet)");
    }
    if e.is_retryable() {
        tracing::warn!(error = %e, "node call failed");
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "node_unavailable",
            "the server's node cannot be reached now; try again later",
        );
    }
    tracing::warn!(error = %e, "node refused");
    ApiError::new(StatusCode::BAD_GATEWAY, "node_error", e.to_string())
}

#[utoipa::path(post, path = "/api/v1/tenants/{tenant}/servers", tag = "servers", request_body = NewServer,
    params(("tenant" = String, Path, description = "Tenant id")),
    responses((status = 202, description = "Created and placed; the install job is queued", body = crate::servers::Created),
        (status = 400, description = "Malformed request", body = crate::openapi::ErrorResponse),
        (status = 401, description = "Not logged in", body = crate::openapi::ErrorResponse),
        (status = 403, description = "Missing permission (server.create)", body = crate::openapi::ErrorResponse),
        (status = 404, description = "Not found, or not yours", body = crate::openapi::ErrorResponse),
        (status = 409, description = "Quota exceeded, or no node can take it", body = crate::openapi::ErrorResponse),
        (status = 422, description = "Invalid field", body = crate::openapi::ErrorResponse),
        (status = 429, description = "Rate limited", body = crate::openapi::ErrorResponse)),
    security(("bearer" = []), ("session" = [])))]
pub(crate) async fn create_server(
    state: web::Data<AppState>,
    req: HttpRequest,
    auth: Authenticated,
    path: web::Path<String>,
    body: web::Json<NewServer>,
) -> Result<HttpResponse, ApiError> {
    let scope = scoped(&state, &auth, path.into_inner()).await?;
    scope.require("server.create")?;
    let new = body.into_inner();
    let meta = state.meta(&req);
    let registry = state.blueprints.clone();
    let quotas = state.config.quotas.clone();
    let created = state
        .db
        .run(move |conn| {
            let found = blueprints::find(conn, &registry, &new.blueprint)?
                .ok_or_else(|| ApiError::invalid("blueprint", "no such blueprint"))?;
            servers::create_and_install(conn, &scope, &found.blueprint, &new, &quotas, &meta)
        })
        .await?;
    state.wake_workers();
    Ok(HttpResponse::Accepted().json(created))
}

#[utoipa::path(get, path = "/api/v1/tenants/{tenant}/servers", tag = "servers",
    params(("tenant" = String, Path, description = "Tenant id"), ServerFilter),
    responses((status = 200, description = "The tenant's servers, oldest first", body = crate::pagination::Page<Server>),
        (status = 400, description = "Malformed request", body = crate::openapi::ErrorResponse),
        (status = 401, description = "Not logged in", body = crate::openapi::ErrorResponse),
        (status = 403, description = "Missing permission (server.read)", body = crate::openapi::ErrorResponse),
        (status = 404, description = "Not found, or not yours", body = crate::openapi::ErrorResponse),
        (status = 422, description = "Invalid field", body = crate::openapi::ErrorResponse),
        (status = 429, description = "Rate limited", body = crate::openapi::ErrorResponse)),
    security(("bearer" = []), ("session" = [])))]
pub(crate) async fn list_servers(
    state: web::Data<AppState>,
    auth: Authenticated,
    path: web::Path<String>,
    query: web::Query<ServerFilter>,
) -> Result<HttpResponse, ApiError> {
    let scope = scoped(&state, &auth, path.into_inner()).await?;
    let filter = query.into_inner();
    let page = PageQuery {
        limit: filter.limit,
        cursor: filter.cursor.clone(),
    }
    .check()?;
    let list = state
        .db
        .run(move |conn| servers::list(conn, &scope, &filter, &page))
        .await?;
    Ok(HttpResponse::Ok().json(list))
}

#[utoipa::path(get, path = "/api/v1/tenants/{tenant}/servers/{server}", tag = "servers",
    params(("tenant" = String, Path, description = "Tenant id"), ("server" = String, Path, description = "Server id")),
    responses((status = 200, description = "The server, its ports, latest jobs and metrics", body = ServerDetail),
        (status = 401, description = "Not logged in", body = crate::openapi::ErrorResponse),
        (status = 403, description = "Missing permission (server.read)", body = crate::openapi::ErrorResponse),
        (status = 404, description = "Not found, or not yours", body = crate::openapi::ErrorResponse),
        (status = 429, description = "Rate limited", body = crate::openapi::ErrorResponse)),
    security(("bearer" = []), ("session" = [])))]
pub(crate) async fn get_server(
    state: web::Data<AppState>,
    auth: Authenticated,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let (tenant, server) = path.into_inner();
    let scope = scoped(&state, &auth, tenant).await?;
    scope.require("server.read")?;
    let id = server_id(&server)?;
    let registry = state.blueprints.clone();
    let detail = state
        .db
        .run(move |conn| {
            let row = servers::row(conn, &scope, &id)?;
            let blueprint = blueprints::find(conn, &registry, &row.blueprint)?.map(|f| f.blueprint);
            let variables = if scope.has("startup.read") {
                let values = row.variables();
                Some(match &blueprint {
                    Some(b) => values
                        .into_iter()
                        .filter(|(k, _)| b.variables.iter().any(|v| &v.env == k && v.user_viewable))
                        .collect(),
                    None => BTreeMap::new(),
                })
            } else {
                None
            };
            let allocations = crate::allocation::server_allocations(conn, &id)?;
            let jobs = crate::jobs::for_server(conn, &scope, &id, 10)?
                .into_iter()
                .filter_map(|j| serde_json::to_value(j).ok())
                .collect();
            let metrics = metrics_store::series(conn, &scope, &id, Range::Hour, crate::db::now_ms())?
                .points
                .pop();
            Ok::<_, ApiError>(ServerDetail {
                server: Server::from(row),
                blueprint_name: blueprint.map(|b| b.name),
                variables,
                allocations,
                jobs,
                metrics,
            })
        })
        .await?;
    Ok(HttpResponse::Ok().json(detail))
}

#[utoipa::path(patch, path = "/api/v1/tenants/{tenant}/servers/{server}", tag = "servers", request_body = ServerChanges,
    params(("tenant" = String, Path, description = "Tenant id"), ("server" = String, Path, description = "Server id")),
    responses((status = 202, description = "Changed; the update job pushes it to the node", body = crate::servers::Queued),
        (status = 400, description = "Malformed request", body = crate::openapi::ErrorResponse),
        (status = 401, description = "Not logged in", body = crate::openapi::ErrorResponse),
        (status = 403, description = "Missing permission (settings.rename, server.update, startup.update)", body = crate::openapi::ErrorResponse),
        (status = 404, description = "Not found, or not yours", body = crate::openapi::ErrorResponse),
        (status = 409, description = "Quota or node capacity exceeded, or being deleted", body = crate::openapi::ErrorResponse),
        (status = 422, description = "Invalid field", body = crate::openapi::ErrorResponse),
        (status = 429, description = "Rate limited", body = crate::openapi::ErrorResponse)),
    security(("bearer" = []), ("session" = [])))]
pub(crate) async fn update_server(
    state: web::Data<AppState>,
    req: HttpRequest,
    auth: Authenticated,
    path: web::Path<(String, String)>,
    body: web::Json<ServerChanges>,
) -> Result<HttpResponse, ApiError> {
    let (tenant, server) = path.into_inner();
    let scope = scoped(&state, &auth, tenant).await?;
    let id = server_id(&server)?;
    let changes = body.into_inner();
    let meta = state.meta(&req);
    let registry = state.blueprints.clone();
    let quotas = state.config.quotas.clone();
    let queued = state
        .db
        .run(move |conn| {
            scope.require("server.read")?;
            let row = servers::row(conn, &scope, &id)?;
            let blueprint = blueprints::find(conn, &registry, &row.blueprint)?.ok_or_else(|| {
                ApiError::conflict("blueprint_missing", "the server's blueprint no longer exists")
            })?;
            servers::update(conn, &scope, &id, &blueprint.blueprint, &changes, &quotas, &meta)
        })
        .await?;
    state.wake_workers();
    Ok(HttpResponse::Accepted().json(queued))
}

#[utoipa::path(delete, path = "/api/v1/tenants/{tenant}/servers/{server}", tag = "servers",
    params(("tenant" = String, Path, description = "Tenant id"), ("server" = String, Path, description = "Server id")),
    responses((status = 202, description = "Marked deleting; the delete job removes it", body = crate::servers::Queued),
        (status = 401, description = "Not logged in", body = crate::openapi::ErrorResponse),
        (status = 403, description = "Missing permission (server.delete)", body = crate::openapi::ErrorResponse),
        (status = 404, description = "Not found, or not yours", body = crate::openapi::ErrorResponse),
        (status = 409, description = "Already being deleted", body = crate::openapi::ErrorResponse),
        (status = 429, description = "Rate limited", body = crate::openapi::ErrorResponse)),
    security(("bearer" = []), ("session" = [])))]
pub(crate) async fn delete_server(
    state: web::Data<AppState>,
    req: HttpRequest,
    auth: Authenticated,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let (tenant, server) = path.into_inner();
    let scope = scoped(&state, &auth, tenant).await?;
    let id = server_id(&server)?;
    let meta = state.meta(&req);
    let queued = state
        .db
        .run(move |conn| servers::request_delete(conn, &scope, &id, &meta))
        .await?;
    state.wake_workers();
    Ok(HttpResponse::Accepted().json(queued))
}

#[utoipa::path(post, path = "/api/v1/tenants/{tenant}/servers/{server}/power", tag = "servers", request_body = PowerBody,
    params(("tenant" = String, Path, description = "Tenant id"), ("server" = String, Path, description = "Server id")),
    responses((status = 202, description = "The power job is queued", body = crate::servers::Queued),
        (status = 400, description = "Malformed request", body = crate::openapi::ErrorResponse),
        (status = 401, description = "Not logged in", body = crate::openapi::ErrorResponse),
        (status = 403, description = "Missing permission (control.start, control.stop, control.restart)", body = crate::openapi::ErrorResponse),
        (status = 404, description = "Not found, or not yours", body = crate::openapi::ErrorResponse),
        (status = 409, description = "Suspended, not installed, or being deleted", body = crate::openapi::ErrorResponse),
        (status = 429, description = "Rate limited", body = crate::openapi::ErrorResponse)),
    security(("bearer" = []), ("session" = [])))]
pub(crate) async fn power_server(
    state: web::Data<AppState>,
    req: HttpRequest,
    auth: Authenticated,
    path: web::Path<(String, String)>,
    body: web::Json<PowerBody>,
) -> Result<HttpResponse, ApiError> {
    let (tenant, server) = path.into_inner();
    let scope = scoped(&state, &auth, tenant).await?;
    let id = server_id(&server)?;
    let action = body.into_inner().action;
    let meta = state.meta(&req);
    let queued = state
        .db
        .run(move |conn| servers::power(conn, &scope, &id, action, &meta))
        .await?;
    state.wake_workers();
    Ok(HttpResponse::Accepted().json(queued))
}

#[utoipa::path(post, path = "/api/v1/tenants/{tenant}/servers/{server}/reinstall", tag = "servers",
    params(("tenant" = String, Path, description = "Tenant id"), ("server" = String, Path, description = "Server id")),
    responses((status = 202, description = "The reinstall job is queued", body = crate::servers::Queued),
        (status = 401, description = "Not logged in", body = crate::openapi::ErrorResponse),
        (status = 403, description = "Missing permission (settings.reinstall)", body = crate::openapi::ErrorResponse),
        (status = 404, description = "Not found, or not yours", body = crate::openapi::ErrorResponse),
        (status = 409, description = "Suspended or being deleted", body = crate::openapi::ErrorResponse),
        (status = 429, description = "Rate limited", body = crate::openapi::ErrorResponse)),
    security(("bearer" = []), ("session" = [])))]
pub(crate) async fn reinstall_server(
    state: web::Data<AppState>,
    req: HttpRequest,
    auth: Authenticated,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let (tenant, server) = path.into_inner();
    let scope = scoped(&state, &auth, tenant).await?;
    let id = server_id(&server)?;
    let meta = state.meta(&req);
    let queued = state
        .db
        .run(move |conn| servers::reinstall(conn, &scope, &id, &meta))
        .await?;
    state.wake_workers();
    Ok(HttpResponse::Accepted().json(queued))
}

/// The server's row and its node, for the routes that reach the node.
fn with_node(
    conn: &mut crate::db::DbConnection,
    scope: &crate::authz::TenantScope,
    id: &crate::ids::ServerId,
) -> Result<(ServerRow, nodes::Node), ApiError> {
    let row = servers::row(conn, scope, id)?;
    let node = nodes::get(conn, &crate::ids::NodeId::from_db(row.node_id.clone()))?
        .ok_or_else(|| ApiError::conflict("node_missing", "the server's node no longer exists"))?;
    Ok((row, node))
}

fn check_commands(commands: &[String]) -> Result<(), ApiError> {
    if commands.is_empty() || commands.len() > 100 {
        return Err(ApiError::invalid("commands", "give between 1 and 100 commands"));
    }
    if let Some(i) = commands
        .iter()
        .position(|c| c.is_empty() || c.len() > MAX_COMMAND_BYTES || c.contains(['\n', '\r', '\0']))
    {
        return Err(ApiError::invalid(
            &format!("commands[{i}]"),
            format!("a command is one line of 1 to {MAX_COMMAND_BYTES} bytes"),
        ));
    }
    Ok(())
}

#[utoipa::path(post, path = "/api/v1/tenants/{tenant}/servers/{server}/commands", tag = "servers", request_body = CommandsBody,
    params(("tenant" = String, Path, description = "Tenant id"), ("server" = String, Path, description = "Server id")),
    responses((status = 204, description = "Sent to the game's console"),
        (status = 400, description = "Malformed request", body = crate::openapi::ErrorResponse),
        (status = 401, description = "Not logged in", body = crate::openapi::ErrorResponse),
        (status = 403, description = "Missing permission (control.console)", body = crate::openapi::ErrorResponse),
        (status = 404, description = "Not found, or not yours", body = crate::openapi::ErrorResponse),
        (status = 409, description = "The server is not running", body = crate::openapi::ErrorResponse),
        (status = 422, description = "Invalid field", body = crate::openapi::ErrorResponse),
        (status = 429, description = "Rate limited", body = crate::openapi::ErrorResponse),
        (status = 502, description = "The node refused", body = crate::openapi::ErrorResponse),
        (status = 503, description = "The node cannot be reached", body = crate::openapi::ErrorResponse)),
    security(("bearer" = []), ("session" = [])))]
pub(crate) async fn send_commands(
    state: web::Data<AppState>,
    req: HttpRequest,
    auth: Authenticated,
    path: web::Path<(String, String)>,
    body: web::Json<CommandsBody>,
) -> Result<HttpResponse, ApiError> {
    let (tenant, server) = path.into_inner();
    let scope = scoped(&state, &auth, tenant).await?;
    scope.require("control.console")?;
    let id = server_id(&server)?;
    let commands = body.into_inner().commands;
    let (s, i) = (scope.clone(), id.clone());
    let (row, node) = state.db.run(move |conn| with_node(conn, &s, &i)).await?;
    check_commands(&commands)?;
    if row.is_suspended() {
        return Err(ApiError::conflict("server_suspended", "the server is suspended"));
    }
    if row.status != servers::STATUS_RUNNING && row.status != servers::STATUS_STARTING {
        return Err(ApiError::conflict(
            "not_running",
            format!("the server is {}", row.status),
        ));
    }
    let client = WingsClient::new(&state.pki, &node).map_err(node_error)?;
    client.commands(&id, commands.clone()).await.map_err(node_error)?;
    let meta = state.meta(&req);
    // Lines are kept short in the log: they are for following what happened, and a game's
    // console lines can carry anything.
    let logged: Vec<String> = commands.iter().map(|c| c.chars().take(200).collect()).collect();
    state
        .db
        .run(move |conn| {
            servers::record_action(
                conn,
                &scope,
                &id,
                "server.command",
                json!({ "commands": logged }),
                &meta,
            )
        })
        .await?;
    Ok(HttpResponse::NoContent().finish())
}

#[utoipa::path(get, path = "/api/v1/tenants/{tenant}/servers/{server}/console", tag = "servers",
    params(("tenant" = String, Path, description = "Tenant id"), ("server" = String, Path, description = "Server id")),
    responses((status = 200, description = "A short-lived console token and the node's socket", body = ConsoleAccess),
        (status = 401, description = "Not logged in", body = crate::openapi::ErrorResponse),
        (status = 403, description = "Missing permission (websocket.connect)", body = crate::openapi::ErrorResponse),
        (status = 404, description = "Not found, or not yours", body = crate::openapi::ErrorResponse),
        (status = 409, description = "Suspended or being deleted", body = crate::openapi::ErrorResponse),
        (status = 429, description = "Rate limited", body = crate::openapi::ErrorResponse)),
    security(("bearer" = []), ("session" = [])))]
pub(crate) async fn console(
    state: web::Data<AppState>,
    req: HttpRequest,
    auth: Authenticated,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let (tenant, server) = path.into_inner();
    let scope = scoped(&state, &auth, tenant).await?;
    scope.require("websocket.connect")?;
    let id = server_id(&server)?;
    let (s, i) = (scope.clone(), id.clone());
    let (row, node) = state.db.run(move |conn| with_node(conn, &s, &i)).await?;
    if row.is_suspended() {
        return Err(ApiError::conflict("server_suspended", "the server is suspended"));
    }
    if row.status == servers::STATUS_DELETING {
        return Err(ApiError::conflict(
            "server_deleting",
            "the server is being deleted",
        ));
    }
    let permissions: Vec<String> = CONSOLE_PERMISSIONS
        .iter()
        .filter(|p| scope.has(p))
        .map(|p| (*p).to_string())
        .collect();
    let iat = u64::try_from(crate::db::now_ms() / 1000).unwrap_or(0);
    let exp = iat + state.config.servers.console_token_secs;
    let claims = ConsoleClaims {
        sub: scope.user().to_string(),
        server: id.to_string(),
        permissions: permissions.clone(),
        scope: WEBSOCKET_SCOPE.into(),
        iat,
        exp,
        jti: uuid::Uuid::now_v7().to_string(),
    };
    let token = console_token::sign(state.pki.token_signing_pkcs8(), &claims)
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let meta = state.meta(&req);
    let jti = claims.jti.clone();
    state
        .db
        .run(move |conn| {
            servers::record_action(
                conn,
                &scope,
                &id,
                "server.console_token",
                json!({ "jti": jti, "expires_at": exp }),
                &meta,
            )
        })
        .await?;
    Ok(HttpResponse::Ok().json(ConsoleAccess {
        token,
        expires_at: exp,
        socket: console_token::socket_url(&node.public_url, &claims.server),
        permissions,
    }))
}

#[utoipa::path(get, path = "/api/v1/tenants/{tenant}/servers/{server}/metrics", tag = "servers",
    params(("tenant" = String, Path, description = "Tenant id"), ("server" = String, Path, description = "Server id"), MetricsQuery),
    responses((status = 200, description = "The server's resource series", body = crate::metrics_store::Series),
        (status = 400, description = "Malformed request", body = crate::openapi::ErrorResponse),
        (status = 401, description = "Not logged in", body = crate::openapi::ErrorResponse),
        (status = 403, description = "Missing permission (server.read)", body = crate::openapi::ErrorResponse),
        (status = 404, description = "Not found, or not yours", body = crate::openapi::ErrorResponse),
        (status = 422, description = "Invalid field", body = crate::openapi::ErrorResponse),
        (status = 429, description = "Rate limited", body = crate::openapi::ErrorResponse)),
    security(("bearer" = []), ("session" = [])))]
pub(crate) async fn server_metrics(
    state: web::Data<AppState>,
    auth: Authenticated,
    path: web::Path<(String, String)>,
    query: web::Query<MetricsQuery>,
) -> Result<HttpResponse, ApiError> {
    let (tenant, server) = path.into_inner();
    let scope = scoped(&state, &auth, tenant).await?;
    scope.require("server.read")?;
    let id = server_id(&server)?;
    let range = match query.into_inner().range {
        None => Range::Hour,
        Some(r) => {
            Range::parse(&r).ok_or_else(|| ApiError::invalid("range", "must be 1h, 24h, 7d or 30d"))?
        }
    };
    let series = state
        .db
        .run(move |conn| metrics_store::series(conn, &scope, &id, range, crate::db::now_ms()))
        .await?;
    Ok(HttpResponse::Ok().json(series))
}

#[utoipa::path(get, path = "/api/v1/tenants/{tenant}/quota", tag = "servers",
    params(("tenant" = String, Path, description = "Tenant id")),
    responses((status = 200, description = "The tenant's quota and what its servers hold", body = crate::servers::QuotaUsage),
        (status = 401, description = "Not logged in", body = crate::openapi::ErrorResponse),
        (status = 403, description = "Missing permission", body = crate::openapi::ErrorResponse),
        (status = 404, description = "Not found, or not yours", body = crate::openapi::ErrorResponse),
        (status = 429, description = "Rate limited", body = crate::openapi::ErrorResponse)),
    security(("bearer" = []), ("session" = [])))]
pub(crate) async fn tenant_quota(
    state: web::Data<AppState>,
    auth: Authenticated,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let scope = scoped(&state, &auth, path.into_inner()).await?;
    let quotas = state.config.quotas.clone();
    let usage = state
        .db
        .run(move |conn| servers::quota_usage(conn, &scope, &quotas))
        .await?;
    Ok(HttpResponse::Ok().json(usage))
}

#[utoipa::path(put, path = "/api/v1/admin/tenants/{tenant}/quota", tag = "admin", request_body = QuotaOverrides,
    params(("tenant" = String, Path, description = "Tenant id")),
    responses((status = 200, description = "The tenant's quota, as now in force", body = crate::servers::QuotaUsage),
        (status = 400, description = "Malformed request", body = crate::openapi::ErrorResponse),
        (status = 401, description = "Not logged in", body = crate::openapi::ErrorResponse),
        (status = 403, description = "Operators only", body = crate::openapi::ErrorResponse),
        (status = 404, description = "No such tenant", body = crate::openapi::ErrorResponse),
        (status = 422, description = "Invalid field", body = crate::openapi::ErrorResponse)),
    security(("bearer" = []), ("session" = [])))]
pub(crate) async fn admin_set_quota(
    state: web::Data<AppState>,
    req: HttpRequest,
    admin: SuperAdmin,
    path: web::Path<String>,
    body: web::Json<QuotaOverrides>,
) -> Result<HttpResponse, ApiError> {
    let tenant = TenantId::parse(&path.into_inner()).ok_or_else(|| ApiError::not_found("tenant"))?;
    let quota = body.into_inner();
    let quotas = state.config.quotas.clone();
    let meta = state.meta(&req);
    let actor = Actor::User(admin.0.user_id());
    let usage = state
        .db
        .run(move |conn| servers::set_quota(conn, &tenant, &quota, &quotas, &actor, &meta))
        .await?;
    Ok(HttpResponse::Ok().json(usage))
}

async fn set_suspended(
    state: web::Data<AppState>,
    req: HttpRequest,
    admin: SuperAdmin,
    server: String,
    suspend: bool,
) -> Result<HttpResponse, ApiError> {
    let id = server_id(&server)?;
    let meta = state.meta(&req);
    let actor = Actor::User(admin.0.user_id());
    let i = id.clone();
    let (suspension, node) = state
        .db
        .run(move |conn| {
            let suspension = servers::set_suspended(conn, &i, suspend, &actor, &meta)?;
            let node = nodes::get(conn, &suspension.server.node_id)?;
            Ok::<_, ApiError>((suspension, node))
        })
        .await?;
    if suspension.job.is_some() {
        state.wake_workers();
    }
    let mut sockets_closed = false;
    if suspend && let Some(node) = node {
        // Closes live sockets and refuses every token issued so far; new ones are refused by
        // the console route while the server is suspended.
        sockets_closed = true;
        match WingsClient::new(&state.pki, &node) {
            Ok(client) => {
                for member in &suspension.members {
                    if let Err(e) = client.deauthorize(&id, member).await
                        && !e.is_not_found()
                    {
                        tracing::warn!(server.id = %id, error = %e, "closing sockets of a suspended server failed");
                        sockets_closed = false;
                    }
                }
            }
            Err(e) => {
                tracing::warn!(server.id = %id, error = %e, "no client for the suspended server's node");
                sockets_closed = false;
            }
        }
    }
    Ok(HttpResponse::Ok().json(SuspendAnswer {
        server: suspension.server,
        job: suspension.job,
        sockets_closed,
    }))
}

#[utoipa::path(post, path = "/api/v1/admin/servers/{server}/suspend", tag = "admin",
    params(("server" = String, Path, description = "Server id")),
    responses((status = 200, description = "Suspended: stopped, its sockets closed, and it cannot be started", body = SuspendAnswer),
        (status = 401, description = "Not logged in", body = crate::openapi::ErrorResponse),
        (status = 403, description = "Operators only", body = crate::openapi::ErrorResponse),
        (status = 404, description = "No such server", body = crate::openapi::ErrorResponse)),
    security(("bearer" = []), ("session" = [])))]
pub(crate) async fn suspend_server(
    state: web::Data<AppState>,
    req: HttpRequest,
    admin: SuperAdmin,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    set_suspended(state, req, admin, path.into_inner(), true).await
}

#[utoipa::path(post, path = "/api/v1/admin/servers/{server}/unsuspend", tag = "admin",
    params(("server" = String, Path, description = "Server id")),
    responses((status = 200, description = "No longer suspended; it stays stopped until started", body = SuspendAnswer),
        (status = 401, description = "Not logged in", body = crate::openapi::ErrorResponse),
        (status = 403, description = "Operators only", body = crate::openapi::ErrorResponse),
        (status = 404, description = "No such server", body = crate::openapi::ErrorResponse)),
    security(("bearer" = []), ("session" = [])))]
pub(crate) async fn unsuspend_server(
    state: web::Data<AppState>,
    req: HttpRequest,
    admin: SuperAdmin,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    set_suspended(state, req, admin, path.into_inner(), false).await
}
