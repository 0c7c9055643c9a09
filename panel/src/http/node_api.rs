//! What nodes report (ADR 0011), on the mutual-TLS node listener: heartbeats, metrics
//! batches, server events and activity, each from the node its certificate names ([`NodePeer`]). Also
//! the operator's utilisation view and the tenant's lists of a server's events and activity
//! on the public API.
//!
//! The node routes are in the OpenAPI document under the `node` tag for reference; they are
//! served only on the node listener and need a node certificate.
//!
//! Invariant: the node id is the certificate's, never a field of the request; a report on
//! a server of another node is refused whole with 403 (SECURITY-CHECKLIST 26).

use actix_web::{HttpRequest, HttpResponse, web};
use mamba_shared::activity::{ACTIVITY_PATH, ActivityBatch};
use mamba_shared::metrics::MetricsBatch;
use mamba_shared::node_api::{
    EVENTS_PATH, EventsBatch, HEARTBEAT_PATH, Heartbeat, HeartbeatAck, METRICS_PATH,
};

use super::AppState;
use super::extract::{Authenticated, SuperAdmin};
use super::node_pki::NodePeer;
use crate::activity as activity_log;
use crate::error::ApiError;
use crate::ids::{NodeId, ServerId};
use crate::metrics_store::{self, Retention};
use crate::pagination::PageQuery;
use crate::telemetry;

/// Routes of the node listener.
pub(crate) fn configure_node(cfg: &mut web::ServiceConfig) {
    cfg.route(HEARTBEAT_PATH, web::post().to(heartbeat))
        .route(METRICS_PATH, web::post().to(metrics))
        .route(EVENTS_PATH, web::post().to(events))
        .route(ACTIVITY_PATH, web::post().to(activity));
}

/// Routes of the public API, under `/api/v1`. [`server_events`] is registered with the other
/// tenant server routes, in `http::servers`.
pub(crate) fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/admin/nodes/{node}/utilisation", web::get().to(node_utilisation));
}

fn peer_node(peer: &NodePeer) -> Result<NodeId, ApiError> {
    NodeId::parse(&peer.node_id).ok_or_else(|| ApiError::unauthorized("this certificate names no node"))
}

/// A node is alive: its version, uptime, resources and servers' states. Node listener only
/// (mutual TLS with a node certificate).
#[utoipa::path(post, path = "/api/node/v1/heartbeat", tag = "node",
    request_body = crate::openapi::NodeHeartbeatDoc,
    responses((status = 200, description = "Recorded", body = crate::openapi::HeartbeatAckDoc),
        (status = 400, description = "Malformed heartbeat", body = crate::openapi::ErrorResponse),
        (status = 401, description = "No admitted node certificate", body = crate::openapi::ErrorResponse)),
    security(("node_mtls" = [])))]
pub(crate) async fn heartbeat(
    state: web::Data<AppState>,
    req: HttpRequest,
    peer: NodePeer,
    body: web::Json<Heartbeat>,
) -> Result<HttpResponse, ApiError> {
    let node = peer_node(&peer)?;
    let hb = body.into_inner();
    telemetry::check_heartbeat(&hb)?;
    let meta = state.meta(&req);
    let now = crate::db::now_ms();
    let id = node.clone();
    state
        .db
        .run(move |conn| telemetry::record_heartbeat(conn, &id, &hb, &meta, now))
        .await?;
    Ok(HttpResponse::Ok().json(HeartbeatAck {
        node_id: node.to_string(),
        received_at_ms: now,
    }))
}

/// A batch of resource samples of the node's servers; idempotent by (server, time). Node
/// listener only.
#[utoipa::path(post, path = "/api/node/v1/metrics", tag = "node",
    request_body = crate::openapi::MetricsBatchDoc,
    responses((status = 200, description = "What was stored, what was a duplicate, what was refused", body = crate::openapi::NodeIngestReportDoc),
        (status = 400, description = "Malformed batch", body = crate::openapi::ErrorResponse),
        (status = 401, description = "No admitted node certificate", body = crate::openapi::ErrorResponse),
        (status = 403, description = "A server in the batch is on another node; nothing stored", body = crate::openapi::ErrorResponse)),
    security(("node_mtls" = [])))]
pub(crate) async fn metrics(
    state: web::Data<AppState>,
    peer: NodePeer,
    body: web::Json<MetricsBatch>,
) -> Result<HttpResponse, ApiError> {
    let node = peer_node(&peer)?;
    let batch = body.into_inner();
    let retention = Retention::from(&state.config.server_metrics);
    let report = state
        .db
        .run(move |conn| {
            telemetry::refuse_foreign_servers(
                conn,
                &node,
                batch.samples.iter().map(|s| s.server_id.as_str()),
            )?;
            metrics_store::ingest_batch(conn, &node, &batch.samples, retention, crate::db::now_ms())
        })
        .await?;
    Ok(HttpResponse::Ok().json(report))
}

/// A batch of server events (crashes, restarts, installs, OOM kills, backups); idempotent by
/// (node, event id). Node listener only.
#[utoipa::path(post, path = "/api/node/v1/events", tag = "node",
    request_body = crate::openapi::EventsBatchDoc,
    responses((status = 200, description = "What was stored, what was a duplicate, what was refused", body = crate::openapi::NodeIngestReportDoc),
        (status = 400, description = "Malformed batch", body = crate::openapi::ErrorResponse),
        (status = 401, description = "No admitted node certificate", body = crate::openapi::ErrorResponse),
        (status = 403, description = "A server in the batch is on another node; nothing stored", body = crate::openapi::ErrorResponse)),
    security(("node_mtls" = [])))]
pub(crate) async fn events(
    state: web::Data<AppState>,
    peer: NodePeer,
    body: web::Json<EventsBatch>,
) -> Result<HttpResponse, ApiError> {
    let node = peer_node(&peer)?;
    let batch = body.into_inner();
    let notify = !state.config.notifications.webhook_url.is_empty();
    let report = state
        .db
        .run(move |conn| telemetry::ingest_events(conn, &node, &batch.events, notify, crate::db::now_ms()))
        .await?;
    if notify && report.stored > 0 {
        state.telemetry_wake.notify_one();
    }
    Ok(HttpResponse::Ok().json(report))
}

/// A batch of activity entries (file manager and SFTP actions, with their actor);
/// idempotent by (node, entry id). Node listener only.
#[utoipa::path(post, path = "/api/node/v1/activity", tag = "node",
    request_body = crate::openapi::ActivityBatchDoc,
    responses((status = 200, description = "What was stored, what was a duplicate, what was refused", body = crate::openapi::NodeIngestReportDoc),
        (status = 400, description = "Malformed batch", body = crate::openapi::ErrorResponse),
        (status = 401, description = "No admitted node certificate", body = crate::openapi::ErrorResponse),
        (status = 403, description = "A server in the batch is on another node; nothing stored", body = crate::openapi::ErrorResponse)),
    security(("node_mtls" = [])))]
pub(crate) async fn activity(
    state: web::Data<AppState>,
    peer: NodePeer,
    body: web::Json<ActivityBatch>,
) -> Result<HttpResponse, ApiError> {
    let node = peer_node(&peer)?;
    let batch = body.into_inner();
    let report = state
        .db
        .run(move |conn| activity_log::ingest(conn, &node, &batch.entries, crate::db::now_ms()))
        .await?;
    Ok(HttpResponse::Ok().json(report))
}

/// Capacity, what its servers reserve, and live use from the node's last heartbeat and its
/// servers' latest samples.
#[utoipa::path(get, path = "/api/v1/admin/nodes/{node}/utilisation", tag = "admin",
    params(("node" = String, Path, description = "Node id")),
    responses((status = 200, description = "The node's utilisation", body = crate::telemetry::Utilisation),
        (status = 400, description = "Malformed request", body = crate::openapi::ErrorResponse),
        (status = 401, description = "Not logged in", body = crate::openapi::ErrorResponse),
        (status = 403, description = "Operators only", body = crate::openapi::ErrorResponse),
        (status = 404, description = "No such node", body = crate::openapi::ErrorResponse)),
    security(("bearer" = []), ("session" = [])))]
pub(crate) async fn node_utilisation(
    state: web::Data<AppState>,
    _admin: SuperAdmin,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = super::nodes::node_id(&path.into_inner())?;
    let found = state
        .db
        .run(move |conn| telemetry::utilisation(conn, &id, crate::db::now_ms()).map_err(ApiError::from))
        .await?
        .ok_or_else(|| ApiError::not_found("node"))?;
    Ok(HttpResponse::Ok().json(found))
}

/// A server's events (crashes, restarts, installs, OOM kills, backups), newest first.
/// Needs `activity.read`.
#[utoipa::path(get, path = "/api/v1/tenants/{tenant}/servers/{server}/events", tag = "servers",
    params(("tenant" = String, Path, description = "Tenant id"), ("server" = String, Path, description = "Server id"), PageQuery),
    responses((status = 200, description = "A page of events, newest first", body = crate::pagination::Page<crate::telemetry::ServerEvent>),
        (status = 400, description = "Malformed request", body = crate::openapi::ErrorResponse),
        (status = 401, description = "Not logged in", body = crate::openapi::ErrorResponse),
        (status = 403, description = "Missing permission", body = crate::openapi::ErrorResponse),
        (status = 404, description = "No such tenant or server", body = crate::openapi::ErrorResponse),
        (status = 422, description = "Invalid field", body = crate::openapi::ErrorResponse)),
    security(("bearer" = []), ("session" = [])))]
pub(crate) async fn server_events(
    state: web::Data<AppState>,
    auth: Authenticated,
    path: web::Path<(String, String)>,
    query: web::Query<PageQuery>,
) -> Result<HttpResponse, ApiError> {
    let (tenant, server) = path.into_inner();
    let page = query.into_inner().check()?;
    let scope = super::tenants::scoped(&state, &auth, tenant).await?;
    scope.require("activity.read")?;
    let server = ServerId::parse(&server).ok_or_else(|| ApiError::not_found("server"))?;
    let events = state
        .db
        .run(move |conn| telemetry::events_of_server(conn, &scope, &server, &page))
        .await?;
    Ok(HttpResponse::Ok().json(events))
}

/// `?limit=&cursor=&event=`: a page of activity, optionally only events starting with `event`.
#[derive(Debug, Clone, Default, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct ActivityQuery {
    pub limit: Option<i64>,
    pub cursor: Option<String>,
    /// An event-name prefix, such as `sftp.` or `file.write`.
    pub event: Option<String>,
}

/// Who did what to a server's files (file manager, signed-URL uploads, SFTP), as its node
/// reported it, newest first. Actions through the panel (power, commands, reinstall,
/// backups) are in the tenant's audit log instead. Needs `activity.read`.
#[utoipa::path(get, path = "/api/v1/tenants/{tenant}/servers/{server}/activity", tag = "servers",
    params(("tenant" = String, Path, description = "Tenant id"), ("server" = String, Path, description = "Server id"), ActivityQuery),
    responses((status = 200, description = "A page of activity, newest first", body = crate::pagination::Page<crate::activity::Activity>),
        (status = 400, description = "Malformed request", body = crate::openapi::ErrorResponse),
        (status = 401, description = "Not logged in", body = crate::openapi::ErrorResponse),
        (status = 403, description = "Missing permission", body = crate::openapi::ErrorResponse),
        (status = 404, description = "No such tenant or server", body = crate::openapi::ErrorResponse),
        (status = 422, description = "Invalid field", body = crate::openapi::ErrorResponse)),
    security(("bearer" = []), ("session" = [])))]
pub(crate) async fn server_activity(
    state: web::Data<AppState>,
    auth: Authenticated,
    path: web::Path<(String, String)>,
    query: web::Query<ActivityQuery>,
) -> Result<HttpResponse, ApiError> {
    let (tenant, server) = path.into_inner();
    let query = query.into_inner();
    let page = PageQuery {
        limit: query.limit,
        cursor: query.cursor,
    }
    .check()?;
    if let Some(prefix) = &query.event {
        activity_log::check_prefix(prefix)?;
    }
    let scope = super::tenants::scoped(&state, &auth, tenant).await?;
    scope.require("activity.read")?;
    let server = ServerId::parse(&server).ok_or_else(|| ApiError::not_found("server"))?;
    let found = state
        .db
        .run(move |conn| activity_log::of_server(conn, &scope, &server, query.event.as_deref(), &page))
        .await?;
    Ok(HttpResponse::Ok().json(found))
}
