//! Liveness, readiness and metrics.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, web};
use serde_json::json;

use super::AppState;
use crate::error::ApiError;
use crate::metrics::Metrics;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/healthz", web::get().to(healthz))
        .route("/readyz", web::get().to(readyz))
        .route("/metrics", web::get().to(metrics));
}

/// Alive: the process answers. Says nothing about its dependencies.
#[utoipa::path(get, path = "/healthz", tag = "health", responses((status = 200, description = "Alive", body = crate::openapi::Health)))]
pub(crate) async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

/// Ready: the database (and Redis, when configured) answer.
#[utoipa::path(get, path = "/readyz", tag = "health", responses((status = 200, description = "Ready", body = crate::openapi::Health), (status = 503, description = "Not ready", body = crate::openapi::ErrorResponse)))]
pub(crate) async fn readyz(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    state.db.ping().await.map_err(|e| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            format!("database unreachable: {e}"),
        )
    })?;
    state.limiter.ping().await.map_err(|e| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            format!("redis unreachable: {e}"),
        )
    })?;
    let redis = if state.limiter.is_redis() {
        "ok"
    } else {
        "not configured"
    };
    Ok(HttpResponse::Ok().json(json!({"status": "ready", "database": "ok", "redis": redis})))
}

async fn metrics(metrics: web::Data<Metrics>) -> Result<HttpResponse, ApiError> {
    let text = metrics
        .render()
        .map_err(|e| ApiError::internal(format!("metrics: {e}")))?;
    Ok(HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(text))
}
