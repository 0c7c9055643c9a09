//! Operators' blueprint routes under `/api/v1/admin/blueprints`: the registry (files and
//! imports), export as JSON or YAML, import of eggs and native blueprints with a report,
//! and removal of imports. Super admins only; imports and removals are audited.

use actix_web::{HttpRequest, HttpResponse, web};
use serde::Deserialize;
use serde_json::json;

use super::AppState;
use super::extract::SuperAdmin;
use crate::audit::Actor;
use crate::blueprints::{self, ImportOptions};
use crate::error::ApiError;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/admin/blueprints", web::get().to(list_blueprints))
        .service(
            web::resource("/admin/blueprints/import")
                // Eggs carry icons and long scripts: more than a JSON body is allowed.
                .app_data(web::PayloadConfig::new(blueprints_limit()))
                .route(web::post().to(import_blueprint)),
        )
        .route("/admin/blueprints/{slug}", web::get().to(export_blueprint))
        .route("/admin/blueprints/{slug}", web::delete().to(delete_blueprint));
}

/// The route's own limit; the configured `blueprints.max_import_bytes` is checked in the
/// handler, so this is only the ceiling.
fn blueprints_limit() -> usize {
    crate::eggs::MAX_EGG_BYTES
}

#[utoipa::path(get, path = "/api/v1/admin/blueprints", tag = "admin",
    responses((status = 200, description = "Every blueprint: files and imports", body = [crate::blueprints::Summary]),
        (status = 401, description = "Not logged in", body = crate::openapi::ErrorResponse),
        (status = 403, description = "Operators only", body = crate::openapi::ErrorResponse)),
    security(("bearer" = []), ("session" = [])))]
pub(crate) async fn list_blueprints(
    state: web::Data<AppState>,
    _admin: SuperAdmin,
) -> Result<HttpResponse, ApiError> {
    let registry = state.blueprints.clone();
    let list = state
        .db
        .run(move |conn| blueprints::list(conn, &registry).map_err(ApiError::from))
        .await?;
    Ok(HttpResponse::Ok().json(list))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct ExportQuery {
    /// `json` (default: the document with its source and import report) or `yaml` (the
    /// document alone, as a blueprint file).
    format: Option<String>,
}

#[utoipa::path(get, path = "/api/v1/admin/blueprints/{slug}", tag = "admin",
    params(("slug" = String, Path, description = "Blueprint slug"), ExportQuery),
    responses((status = 200, description = "The blueprint (JSON with source and report, or a YAML file)", body = Object),
        (status = 400, description = "Malformed request", body = crate::openapi::ErrorResponse),
        (status = 401, description = "Not logged in", body = crate::openapi::ErrorResponse),
        (status = 403, description = "Operators only", body = crate::openapi::ErrorResponse),
        (status = 404, description = "No such blueprint", body = crate::openapi::ErrorResponse),
        (status = 422, description = "Invalid field", body = crate::openapi::ErrorResponse)),
    security(("bearer" = []), ("session" = [])))]
pub(crate) async fn export_blueprint(
    state: web::Data<AppState>,
    _admin: SuperAdmin,
    path: web::Path<String>,
    query: web::Query<ExportQuery>,
) -> Result<HttpResponse, ApiError> {
    let format = query.into_inner().format.unwrap_or_else(|| "json".into());
    if format != "json" && format != "yaml" {
        return Err(ApiError::invalid("format", "must be json or yaml"));
    }
    let slug = path.into_inner();
    let registry = state.blueprints.clone();
    let found = state
        .db
        .run(move |conn| blueprints::find(conn, &registry, &slug).map_err(ApiError::from))
        .await?
        .ok_or_else(|| ApiError::not_found("blueprint"))?;
    if format == "yaml" {
        let text =
            serde_norway::to_string(&found.blueprint).map_err(|e| ApiError::internal(e.to_string()))?;
        return Ok(HttpResponse::Ok().content_type("application/yaml").body(text));
    }
    Ok(HttpResponse::Ok().json(json!({
        "blueprint": found.blueprint,
        "source": found.source,
        "report": found.report,
    })))
}

/// Imports a Pterodactyl egg (PTDL_v1, PTDL_v2; JSON), a Pelican egg (PLCN_v1 to v3; JSON
/// or YAML) or a native blueprint (YAML or JSON), sent as the raw request body. The answer
/// reports, field by field, what did not map one to one.
#[utoipa::path(post, path = "/api/v1/admin/blueprints/import", tag = "admin",
    request_body(content = String, content_type = "text/plain", description = "The egg or blueprint file"),
    params(ImportOptions),
    responses((status = 200, description = "Dry run: converted, not stored", body = crate::blueprints::ImportResult),
        (status = 201, description = "Imported", body = crate::blueprints::ImportResult),
        (status = 400, description = "Malformed request", body = crate::openapi::ErrorResponse),
        (status = 401, description = "Not logged in", body = crate::openapi::ErrorResponse),
        (status = 403, description = "Operators only", body = crate::openapi::ErrorResponse),
        (status = 409, description = "The slug is taken", body = crate::openapi::ErrorResponse),
        (status = 413, description = "Too large", body = crate::openapi::ErrorResponse),
        (status = 422, description = "Not an egg or blueprint, or it converts to an invalid blueprint", body = crate::openapi::ErrorResponse)),
    security(("bearer" = []), ("session" = [])))]
pub(crate) async fn import_blueprint(
    state: web::Data<AppState>,
    req: HttpRequest,
    admin: SuperAdmin,
    query: web::Query<ImportOptions>,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    if body.len() > state.config.blueprints.max_import_bytes {
        return Err(ApiError::new(
            actix_web::http::StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!(
                "larger than blueprints.max_import_bytes ({} bytes)",
                state.config.blueprints.max_import_bytes
            ),
        ));
    }
    let text =
        String::from_utf8(body.to_vec()).map_err(|_| ApiError::invalid("body", "must be UTF-8 text"))?;
    let options = query.into_inner();
    let meta = state.meta(&req);
    let actor = Actor::User(admin.0.user_id());
    let registry = state.blueprints.clone();
    let result = state
        .db
        .run(move |conn| blueprints::import(conn, &registry, &text, &options, &actor, &meta))
        .await?;
    Ok(if result.stored {
        HttpResponse::Created().json(result)
    } else {
        HttpResponse::Ok().json(result)
    })
}

#[utoipa::path(delete, path = "/api/v1/admin/blueprints/{slug}", tag = "admin",
    params(("slug" = String, Path, description = "Blueprint slug")),
    responses((status = 204, description = "Removed"),
        (status = 401, description = "Not logged in", body = crate::openapi::ErrorResponse),
        (status = 403, description = "Operators only", body = crate::openapi::ErrorResponse),
        (status = 404, description = "No such imported blueprint", body = crate::openapi::ErrorResponse),
        (status = 409, description = "A blueprint file, not an import", body = crate::openapi::ErrorResponse)),
    security(("bearer" = []), ("session" = [])))]
pub(crate) async fn delete_blueprint(
    state: web::Data<AppState>,
    req: HttpRequest,
    admin: SuperAdmin,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let slug = path.into_inner();
    let meta = state.meta(&req);
    let actor = Actor::User(admin.0.user_id());
    let registry = state.blueprints.clone();
    state
        .db
        .run(move |conn| blueprints::delete(conn, &registry, &slug, &actor, &meta))
        .await?;
    Ok(HttpResponse::NoContent().finish())
}
