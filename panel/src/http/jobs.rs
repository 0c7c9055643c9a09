//! Operators' job routes under `/api/v1/admin/jobs`: the list (with the dead-letter list as
//! `?status=dead`) and retry. Super admins only; a retry is audited.

use actix_web::{HttpRequest, HttpResponse, web};

use super::AppState;
use super::extract::SuperAdmin;
use crate::audit::Actor;
use crate::error::ApiError;
use crate::ids::JobId;
use crate::jobs::{self, JobFilter};
use crate::pagination::PageQuery;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/admin/jobs", web::get().to(list_jobs))
        .route("/admin/jobs/{job}/retry", web::post().to(retry_job));
}

#[utoipa::path(get, path = "/api/v1/admin/jobs", tag = "admin", params(JobFilter),
    responses((status = 200, description = "Jobs, oldest first", body = crate::pagination::Page<crate::jobs::Job>),
        (status = 400, description = "Malformed request", body = crate::openapi::ErrorResponse),
        (status = 401, description = "Not logged in", body = crate::openapi::ErrorResponse),
        (status = 403, description = "Operators only", body = crate::openapi::ErrorResponse),
        (status = 422, description = "Invalid field", body = crate::openapi::ErrorResponse)),
    security(("bearer" = []), ("session" = [])))]
pub(crate) async fn list_jobs(
    state: web::Data<AppState>,
    _admin: SuperAdmin,
    query: web::Query<JobFilter>,
) -> Result<HttpResponse, ApiError> {
    let filter = query.into_inner();
    let page = PageQuery {
        limit: filter.limit,
        cursor: filter.cursor.clone(),
    }
    .check()?;
    let list = state
        .db
        .run(move |conn| jobs::list(conn, &filter, &page).map_err(ApiError::from))
        .await?;
    Ok(HttpResponse::Ok().json(list))
}

/// Puts a dead or failed job back in the queue with fresh attempts; an install that gave up
/// reserves its server's capacity and ports again first (409 when no node has room).
#[utoipa::path(post, path = "/api/v1/admin/jobs/{job}/retry", tag = "admin",
    params(("job" = String, Path, description = "Job id")),
    responses((status = 200, description = "Queued again", body = crate::jobs::Job),
        (status = 400, description = "Malformed request", body = crate::openapi::ErrorResponse),
        (status = 401, description = "Not logged in", body = crate::openapi::ErrorResponse),
        (status = 403, description = "Operators only", body = crate::openapi::ErrorResponse),
        (status = 404, description = "No such job", body = crate::openapi::ErrorResponse),
        (status = 409, description = "The job is not dead or failed, or its server finds no room again", body = crate::openapi::ErrorResponse)),
    security(("bearer" = []), ("session" = [])))]
pub(crate) async fn retry_job(
    state: web::Data<AppState>,
    req: HttpRequest,
    admin: SuperAdmin,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = JobId::parse(&path.into_inner()).ok_or_else(|| ApiError::not_found("job"))?;
    let meta = state.meta(&req);
    let actor = Actor::User(admin.0.user_id());
    let registry = state.blueprints.clone();
    let job = state
        .db
        .run(move |conn| crate::servers::retry_job(conn, &registry, &id, &actor, &meta))
        .await?;
    state.wake_workers();
    Ok(HttpResponse::Ok().json(job))
}
