//! Operators' node routes under `/api/v1/admin/nodes`. Every route needs a super admin
//! (`SuperAdmin`: a login, never an API key) and every change writes its audit entry.

use actix_web::{HttpRequest, HttpResponse, web};

use super::AppState;
use super::extract::SuperAdmin;
use crate::allocation::{self, NewPools};
use crate::audit::Actor;
use crate::error::ApiError;
use crate::ids::{NodeId, PoolId};
use crate::nodes::{self, NewNode, NodeChanges, NodeFilter};
use crate::pagination::PageQuery;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/admin/nodes", web::post().to(create_node))
        .route("/admin/nodes", web::get().to(list_nodes))
        .route("/admin/nodes/{node}", web::get().to(get_node))
        .route("/admin/nodes/{node}", web::patch().to(update_node))
        .route("/admin/nodes/{node}", web::delete().to(delete_node))
        .route(
            "/admin/nodes/{node}/decommission",
            web::post().to(decommission_node),
        )
        .route("/admin/nodes/{node}/pools", web::get().to(list_pools))
        .route("/admin/nodes/{node}/pools", web::post().to(add_pools))
        .route("/admin/nodes/{node}/pools/{pool}", web::delete().to(delete_pool))
        .route("/admin/nodes/{node}/allocations", web::get().to(list_allocations))
        .route("/admin/allocations/leaks", web::post().to(scan_leaks));
}

/// A node id from the path; anything that is not an id is a node that does not exist.
pub(crate) fn node_id(raw: &str) -> Result<NodeId, ApiError> {
    NodeId::parse(raw).ok_or_else(|| ApiError::not_found("node"))
}

fn actor(admin: &SuperAdmin) -> Actor {
    Actor::User(admin.0.user_id())
}

#[utoipa::path(post, path = "/api/v1/admin/nodes", tag = "admin", request_body = NewNode,
    responses((status = 201, description = "Registered", body = crate::nodes::Node),
        (status = 400, description = "Malformed request", body = crate::openapi::ErrorResponse),
        (status = 401, description = "Not logged in", body = crate::openapi::ErrorResponse),
        (status = 403, description = "Operators only", body = crate::openapi::ErrorResponse),
        (status = 409, description = "The name is taken", body = crate::openapi::ErrorResponse),
        (status = 422, description = "Invalid field", body = crate::openapi::ErrorResponse)),
    security(("bearer" = []), ("session" = [])))]
pub(crate) async fn create_node(
    state: web::Data<AppState>,
    req: HttpRequest,
    admin: SuperAdmin,
    body: web::Json<NewNode>,
) -> Result<HttpResponse, ApiError> {
    let new = nodes::check_new(&body.into_inner())?;
    let meta = state.meta(&req);
    let actor = actor(&admin);
    let node = state
        .db
        .run(move |conn| nodes::create(conn, &new, &actor, &meta))
        .await?;
    Ok(HttpResponse::Created().json(node))
}

#[utoipa::path(get, path = "/api/v1/admin/nodes", tag = "admin", params(NodeFilter),
    responses((status = 200, description = "Every node, oldest first", body = crate::pagination::Page<crate::nodes::Node>),
        (status = 400, description = "Malformed request", body = crate::openapi::ErrorResponse),
        (status = 401, description = "Not logged in", body = crate::openapi::ErrorResponse),
        (status = 403, description = "Operators only", body = crate::openapi::ErrorResponse),
        (status = 422, description = "Invalid field", body = crate::openapi::ErrorResponse)),
    security(("bearer" = []), ("session" = [])))]
pub(crate) async fn list_nodes(
    state: web::Data<AppState>,
    _admin: SuperAdmin,
    query: web::Query<NodeFilter>,
) -> Result<HttpResponse, ApiError> {
    let filter = query.into_inner();
    let page = PageQuery {
        limit: filter.limit,
        cursor: filter.cursor.clone(),
    }
    .check()?;
    let list = state
        .db
        .run(move |conn| nodes::list(conn, &filter, &page).map_err(ApiError::from))
        .await?;
    Ok(HttpResponse::Ok().json(list))
}

#[utoipa::path(get, path = "/api/v1/admin/nodes/{node}", tag = "admin",
    params(("node" = String, Path, description = "Node id")),
    responses((status = 200, description = "The node with its usage", body = crate::nodes::NodeDetail),
        (status = 400, description = "Malformed request", body = crate::openapi::ErrorResponse),
        (status = 401, description = "Not logged in", body = crate::openapi::ErrorResponse),
        (status = 403, description = "Operators only", body = crate::openapi::ErrorResponse),
        (status = 404, description = "No such node", body = crate::openapi::ErrorResponse)),
    security(("bearer" = []), ("session" = [])))]
pub(crate) async fn get_node(
    state: web::Data<AppState>,
    _admin: SuperAdmin,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = node_id(&path.into_inner())?;
    let node = state
        .db
        .run(move |conn| nodes::detail(conn, &id).map_err(ApiError::from))
        .await?
        .ok_or_else(|| ApiError::not_found("node"))?;
    Ok(HttpResponse::Ok().json(node))
}

#[utoipa::path(patch, path = "/api/v1/admin/nodes/{node}", tag = "admin", request_body = NodeChanges,
    params(("node" = String, Path, description = "Node id")),
    responses((status = 200, description = "Updated", body = crate::nodes::Node),
        (status = 400, description = "Malformed request", body = crate::openapi::ErrorResponse),
        (status = 401, description = "Not logged in", body = crate::openapi::ErrorResponse),
        (status = 403, description = "Operators only", body = crate::openapi::ErrorResponse),
        (status = 404, description = "No such node", body = crate::openapi::ErrorResponse),
        (status = 409, description = "The name is taken, or the node is decommissioned", body = crate::openapi::ErrorResponse),
        (status = 422, description = "Invalid field", body = crate::openapi::ErrorResponse)),
    security(("bearer" = []), ("session" = [])))]
pub(crate) async fn update_node(
    state: web::Data<AppState>,
    req: HttpRequest,
    admin: SuperAdmin,
    path: web::Path<String>,
    body: web::Json<NodeChanges>,
) -> Result<HttpResponse, ApiError> {
    let id = node_id(&path.into_inner())?;
    let changes = nodes::check_changes(&body.into_inner())?;
    let meta = state.meta(&req);
    let actor = actor(&admin);
    let node = state
        .db
        .run(move |conn| nodes::update(conn, &id, &changes, &actor, &meta))
        .await?;
    Ok(HttpResponse::Ok().json(node))
}

#[utoipa::path(post, path = "/api/v1/admin/nodes/{node}/decommission", tag = "admin",
    params(("node" = String, Path, description = "Node id")),
    responses((status = 200, description = "Decommissioned; its allocations and pools are released", body = crate::nodes::Decommissioned),
        (status = 400, description = "Malformed request", body = crate::openapi::ErrorResponse),
        (status = 401, description = "Not logged in", body = crate::openapi::ErrorResponse),
        (status = 403, description = "Operators only", body = crate::openapi::ErrorResponse),
        (status = 404, description = "No such node", body = crate::openapi::ErrorResponse)),
    security(("bearer" = []), ("session" = [])))]
pub(crate) async fn decommission_node(
    state: web::Data<AppState>,
    req: HttpRequest,
    admin: SuperAdmin,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = node_id(&path.into_inner())?;
    let meta = state.meta(&req);
    let actor = actor(&admin);
    let done = state
        .db
        .run(move |conn| nodes::decommission(conn, &id, &actor, &meta))
        .await?;
    Ok(HttpResponse::Ok().json(done))
}

#[utoipa::path(delete, path = "/api/v1/admin/nodes/{node}", tag = "admin",
    params(("node" = String, Path, description = "Node id")),
    responses((status = 204, description = "Deleted"),
        (status = 400, description = "Malformed request", body = crate::openapi::ErrorResponse),
        (status = 401, description = "Not logged in", body = crate::openapi::ErrorResponse),
        (status = 403, description = "Operators only", body = crate::openapi::ErrorResponse),
        (status = 404, description = "No such node", body = crate::openapi::ErrorResponse),
        (status = 409, description = "Not decommissioned, or servers remain on it", body = crate::openapi::ErrorResponse)),
    security(("bearer" = []), ("session" = [])))]
pub(crate) async fn delete_node(
    state: web::Data<AppState>,
    req: HttpRequest,
    admin: SuperAdmin,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = node_id(&path.into_inner())?;
    let meta = state.meta(&req);
    let actor = actor(&admin);
    state
        .db
        .run(move |conn| nodes::delete(conn, &id, &actor, &meta))
        .await?;
    Ok(HttpResponse::NoContent().finish())
}

#[utoipa::path(get, path = "/api/v1/admin/nodes/{node}/pools", tag = "admin",
    params(("node" = String, Path, description = "Node id")),
    responses((status = 200, description = "The node's address pools", body = [crate::allocation::Pool]),
        (status = 400, description = "Malformed request", body = crate::openapi::ErrorResponse),
        (status = 401, description = "Not logged in", body = crate::openapi::ErrorResponse),
        (status = 403, description = "Operators only", body = crate::openapi::ErrorResponse),
        (status = 404, description = "No such node", body = crate::openapi::ErrorResponse)),
    security(("bearer" = []), ("session" = [])))]
pub(crate) async fn list_pools(
    state: web::Data<AppState>,
    _admin: SuperAdmin,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = node_id(&path.into_inner())?;
    let pools = state
        .db
        .run(move |conn| allocation::list_pools(conn, &id))
        .await?;
    Ok(HttpResponse::Ok().json(pools))
}

/// Adds one pool per listed address (or block) and port (or range).
#[utoipa::path(post, path = "/api/v1/admin/nodes/{node}/pools", tag = "admin", request_body = NewPools,
    params(("node" = String, Path, description = "Node id")),
    responses((status = 201, description = "The pools added", body = [crate::allocation::Pool]),
        (status = 400, description = "Malformed request", body = crate::openapi::ErrorResponse),
        (status = 401, description = "Not logged in", body = crate::openapi::ErrorResponse),
        (status = 403, description = "Operators only", body = crate::openapi::ErrorResponse),
        (status = 404, description = "No such node", body = crate::openapi::ErrorResponse),
        (status = 409, description = "Overlaps a pool of the node", body = crate::openapi::ErrorResponse),
        (status = 422, description = "Invalid field", body = crate::openapi::ErrorResponse)),
    security(("bearer" = []), ("session" = [])))]
pub(crate) async fn add_pools(
    state: web::Data<AppState>,
    req: HttpRequest,
    admin: SuperAdmin,
    path: web::Path<String>,
    body: web::Json<NewPools>,
) -> Result<HttpResponse, ApiError> {
    let id = node_id(&path.into_inner())?;
    let new = body.into_inner();
    let meta = state.meta(&req);
    let actor = actor(&admin);
    let pools = state
        .db
        .run(move |conn| allocation::add_pools(conn, &id, &new, &actor, &meta))
        .await?;
    Ok(HttpResponse::Created().json(pools))
}

#[utoipa::path(delete, path = "/api/v1/admin/nodes/{node}/pools/{pool}", tag = "admin",
    params(("node" = String, Path, description = "Node id"), ("pool" = String, Path, description = "Pool id")),
    responses((status = 204, description = "Removed"),
        (status = 400, description = "Malformed request", body = crate::openapi::ErrorResponse),
        (status = 401, description = "Not logged in", body = crate::openapi::ErrorResponse),
        (status = 403, description = "Operators only", body = crate::openapi::ErrorResponse),
        (status = 404, description = "No such node or pool", body = crate::openapi::ErrorResponse),
        (status = 409, description = "Allocations still use the pool", body = crate::openapi::ErrorResponse)),
    security(("bearer" = []), ("session" = [])))]
pub(crate) async fn delete_pool(
    state: web::Data<AppState>,
    req: HttpRequest,
    admin: SuperAdmin,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let (node, pool) = path.into_inner();
    let id = node_id(&node)?;
    let pool = PoolId::parse(&pool).ok_or_else(|| ApiError::not_found("pool"))?;
    let meta = state.meta(&req);
    let actor = actor(&admin);
    state
        .db
        .run(move |conn| allocation::delete_pool(conn, &id, &pool, &actor, &meta))
        .await?;
    Ok(HttpResponse::NoContent().finish())
}

#[utoipa::path(get, path = "/api/v1/admin/nodes/{node}/allocations", tag = "admin",
    params(("node" = String, Path, description = "Node id"), crate::pagination::PageQuery),
    responses((status = 200, description = "The node's allocations", body = crate::pagination::Page<crate::allocation::Allocation>),
        (status = 400, description = "Malformed request", body = crate::openapi::ErrorResponse),
        (status = 401, description = "Not logged in", body = crate::openapi::ErrorResponse),
        (status = 403, description = "Operators only", body = crate::openapi::ErrorResponse),
        (status = 404, description = "No such node", body = crate::openapi::ErrorResponse),
        (status = 422, description = "Invalid field", body = crate::openapi::ErrorResponse)),
    security(("bearer" = []), ("session" = [])))]
pub(crate) async fn list_allocations(
    state: web::Data<AppState>,
    _admin: SuperAdmin,
    path: web::Path<String>,
    query: web::Query<PageQuery>,
) -> Result<HttpResponse, ApiError> {
    let id = node_id(&path.into_inner())?;
    let page = query.check()?;
    let list = state
        .db
        .run(move |conn| allocation::list_allocations(conn, &id, &page))
        .await?;
    Ok(HttpResponse::Ok().json(list))
}

#[derive(Debug, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct LeakScan {
    /// Release what is found (default: only report).
    #[serde(default)]
    release: bool,
}

/// Finds allocations whose server no longer exists; with `release`, frees them.
#[utoipa::path(post, path = "/api/v1/admin/allocations/leaks", tag = "admin", request_body = LeakScan,
    responses((status = 200, description = "What was found, and released", body = crate::allocation::LeakReport),
        (status = 400, description = "Malformed request", body = crate::openapi::ErrorResponse),
        (status = 401, description = "Not logged in", body = crate::openapi::ErrorResponse),
        (status = 403, description = "Operators only", body = crate::openapi::ErrorResponse)),
    security(("bearer" = []), ("session" = [])))]
pub(crate) async fn scan_leaks(
    state: web::Data<AppState>,
    req: HttpRequest,
    admin: SuperAdmin,
    body: web::Json<LeakScan>,
) -> Result<HttpResponse, ApiError> {
    let release = body.into_inner().release;
    let meta = state.meta(&req);
    let actor = actor(&admin);
    let report = state
        .db
        .run(move |conn| allocation::scan_leaks(conn, release, &actor, &meta))
        .await?;
    Ok(HttpResponse::Ok().json(report))
}
