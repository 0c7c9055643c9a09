//! Tenants, members, invitations, roles and the audit log under `/api/v1/tenants`, the
//! permission catalogue, and the operators' tenant list.
//!
//! Every route on a tenant starts with [`scoped`], which authorises the caller and yields
//! the `TenantScope` the data layer requires.

use std::collections::BTreeSet;

use actix_web::{HttpRequest, HttpResponse, web};
use serde::Deserialize;
use serde_json::json;

use super::AppState;
use super::extract::{AuthVia, Authenticated, SuperAdmin};
use crate::api_keys::{self, NewApiKey};
use crate::audit::{self, Actor, AuditFilter};
use crate::authz::{self, TenantScope};
use crate::error::ApiError;
use crate::events::{PanelEvent, RevokeReason};
use crate::ids::{InvitationId, MembershipId, RoleId};
use crate::mail::Mail;
use crate::pagination::PageQuery;
use crate::permissions::{self, CATALOGUE};
use crate::tenants::{self, TenantChanges};
use crate::users;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/permissions", web::get().to(catalogue))
        .route("/tenants", web::post().to(create_tenant))
        .route("/tenants", web::get().to(my_tenants))
        .route("/invitations/accept", web::post().to(accept_invitation))
        .route("/admin/tenants", web::get().to(admin_tenants))
        .service(
            web::scope("/tenants/{tenant}")
                .route("", web::get().to(get_tenant))
                .route("", web::patch().to(update_tenant))
                .route("/members", web::get().to(list_members))
                .route("/members/{member}", web::get().to(get_member))
                .route("/members/{member}", web::patch().to(update_member))
                .route("/members/{member}", web::delete().to(remove_member))
                .route("/invitations", web::get().to(list_invitations))
                .route("/invitations", web::post().to(invite))
                .route("/invitations/{invitation}", web::delete().to(revoke_invitation))
                .route("/roles", web::get().to(list_roles))
                .route("/roles", web::post().to(create_role))
                .route("/roles/{role}", web::delete().to(delete_role))
                .route("/audit", web::get().to(list_audit))
                .route("/api-keys", web::get().to(list_keys))
                .route("/api-keys", web::post().to(create_key))
                .route("/api-keys/{key}", web::delete().to(revoke_key)),
        )
        .route("/admin/tenants/{tenant}", web::patch().to(admin_update_tenant));
}

/// Authorises the caller for the tenant in the path.
pub(crate) async fn scoped(
    state: &AppState,
    auth: &Authenticated,
    tenant: String,
) -> Result<TenantScope, ApiError> {
    let user = auth.user.clone();
    let via = auth.via.clone();
    let actor = match &via {
        AuthVia::ApiKey { key_id, .. } => Actor::ApiKey {
            key_id: key_id.clone(),
            user: auth.user_id(),
        },
        _ => Actor::User(auth.user_id()),
    };
    state
        .db
        .run(move |conn| {
            let key = match &via {
                AuthVia::ApiKey {
                    tenant, permissions, ..
                } => Some((tenant, permissions)),
                _ => None,
            };
            authz::authorize(conn, &user, actor, &tenant, key)
        })
        .await
}

#[utoipa::path(get, path = "/api/v1/permissions", tag = "tenants", responses((status = 200, description = "Permission keys and built-in roles", body = crate::openapi::Catalogue)))]
pub(crate) async fn catalogue() -> HttpResponse {
    let roles: Vec<_> = permissions::BUILT_IN
        .into_iter()
        .map(|r| json!({ "name": r.name(), "permissions": r.permissions() }))
        .collect();
    HttpResponse::Ok().json(json!({ "permissions": CATALOGUE, "built_in_roles": roles }))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateTenantBody {
    slug: String,
    name: String,
}

fn check_name(name: &str, field: &str) -> Result<String, ApiError> {
    users::check_display_name(name).map_err(|m| ApiError::invalid(field, m))
}

#[utoipa::path(post, path = "/api/v1/tenants", tag = "tenants", request_body = CreateTenantBody, responses((status = 201, description = "Created; the caller is its owner", body = crate::tenants::Tenant), (status = 400, description = "Malformed request", body = crate::openapi::ErrorResponse), (status = 401, description = "Not logged in", body = crate::openapi::ErrorResponse), (status = 403, description = "Missing permission", body = crate::openapi::ErrorResponse), (status = 409, description = "Conflict", body = crate::openapi::ErrorResponse), (status = 422, description = "Invalid field", body = crate::openapi::ErrorResponse)), security(("bearer" = []), ("session" = [])))]
pub(crate) async fn create_tenant(
    state: web::Data<AppState>,
    req: HttpRequest,
    auth: Authenticated,
    body: web::Json<CreateTenantBody>,
) -> Result<HttpResponse, ApiError> {
    let meta = state.meta(&req);
    let body = body.into_inner();
    tenants::check_slug(&body.slug).map_err(|m| ApiError::invalid("slug", m))?;
    let name = check_name(&body.name, "name")?;
    let owner = auth.user_id();
    let tenant = state
        .db
        .run(move |conn| tenants::create(conn, &owner, &body.slug, &name, &meta))
        .await?;
    Ok(HttpResponse::Created().json(tenant))
}

#[utoipa::path(get, path = "/api/v1/tenants", tag = "tenants", params(crate::pagination::PageQuery), responses((status = 200, description = "The caller's tenants", body = crate::pagination::Page<crate::tenants::Tenant>), (status = 400, description = "Malformed request", body = crate::openapi::ErrorResponse), (status = 401, description = "Not logged in", body = crate::openapi::ErrorResponse), (status = 403, description = "Missing permission", body = crate::openapi::ErrorResponse), (status = 422, description = "Invalid field", body = crate::openapi::ErrorResponse)), security(("bearer" = []), ("session" = [])))]
pub(crate) async fn my_tenants(
    state: web::Data<AppState>,
    auth: Authenticated,
    query: web::Query<PageQuery>,
) -> Result<HttpResponse, ApiError> {
    let page = query.check()?;
    let user = auth.user_id();
    let list = state
        .db
        .run(move |conn| tenants::list_for_user(conn, &user, &page).map_err(ApiError::from))
        .await?;
    Ok(HttpResponse::Ok().json(list))
}

#[utoipa::path(get, path = "/api/v1/admin/tenants", tag = "admin", params(crate::pagination::PageQuery), responses((status = 200, description = "Every tenant", body = crate::pagination::Page<crate::tenants::Tenant>), (status = 400, description = "Malformed request", body = crate::openapi::ErrorResponse), (status = 401, description = "Not logged in", body = crate::openapi::ErrorResponse), (status = 403, description = "Missing permission", body = crate::openapi::ErrorResponse), (status = 422, description = "Invalid field", body = crate::openapi::ErrorResponse)), security(("bearer" = []), ("session" = [])))]
pub(crate) async fn admin_tenants(
    state: web::Data<AppState>,
    _admin: SuperAdmin,
    query: web::Query<PageQuery>,
) -> Result<HttpResponse, ApiError> {
    let page = query.check()?;
    let list = state
        .db
        .run(move |conn| tenants::list_all(conn, &page).map_err(ApiError::from))
        .await?;
    Ok(HttpResponse::Ok().json(list))
}

#[utoipa::path(get, path = "/api/v1/tenants/{tenant}", tag = "tenants", params(("tenant" = String, Path, description = "Tenant id")), responses((status = 200, description = "The tenant", body = crate::tenants::Tenant), (status = 401, description = "Not logged in", body = crate::openapi::ErrorResponse), (status = 403, description = "Missing permission", body = crate::openapi::ErrorResponse), (status = 404, description = "Not found, or not yours", body = crate::openapi::ErrorResponse), (status = 429, description = "Rate limited", body = crate::openapi::ErrorResponse)), security(("bearer" = []), ("session" = [])))]
pub(crate) async fn get_tenant(
    state: web::Data<AppState>,
    auth: Authenticated,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let scope = scoped(&state, &auth, path.into_inner()).await?;
    let tenant = state
        .db
        .run(move |conn| tenants::get(conn, &scope).map_err(ApiError::from))
        .await?;
    Ok(HttpResponse::Ok().json(tenant))
}

#[utoipa::path(patch, path = "/api/v1/tenants/{tenant}", tag = "tenants", request_body = crate::tenants::TenantChanges, params(("tenant" = String, Path, description = "Tenant id")), responses((status = 200, description = "Updated", body = crate::tenants::Tenant), (status = 400, description = "Malformed request", body = crate::openapi::ErrorResponse), (status = 401, description = "Not logged in", body = crate::openapi::ErrorResponse), (status = 403, description = "Missing permission", body = crate::openapi::ErrorResponse), (status = 404, description = "Not found, or not yours", body = crate::openapi::ErrorResponse), (status = 422, description = "Invalid field", body = crate::openapi::ErrorResponse), (status = 429, description = "Rate limited", body = crate::openapi::ErrorResponse)), security(("bearer" = []), ("session" = [])))]
pub(crate) async fn update_tenant(
    state: web::Data<AppState>,
    req: HttpRequest,
    auth: Authenticated,
    path: web::Path<String>,
    body: web::Json<TenantChanges>,
) -> Result<HttpResponse, ApiError> {
    let scope = scoped(&state, &auth, path.into_inner()).await?;
    scope.require("tenant.update")?;
    let mut changes = body.into_inner();
    if let Some(name) = &changes.name {
        changes.name = Some(check_name(name, "name")?);
    }
    let meta = state.meta(&req);
    let tenant = state
        .db
        .run(move |conn| tenants::update(conn, &scope, &changes, &meta))
        .await?;
    Ok(HttpResponse::Ok().json(tenant))
}

#[utoipa::path(get, path = "/api/v1/tenants/{tenant}/members", tag = "members", params(("tenant" = String, Path, description = "Tenant id"), crate::pagination::PageQuery), responses((status = 200, description = "Members", body = crate::pagination::Page<crate::tenants::Member>), (status = 400, description = "Malformed request", body = crate::openapi::ErrorResponse), (status = 401, description = "Not logged in", body = crate::openapi::ErrorResponse), (status = 403, description = "Missing permission", body = crate::openapi::ErrorResponse), (status = 404, description = "Not found, or not yours", body = crate::openapi::ErrorResponse), (status = 422, description = "Invalid field", body = crate::openapi::ErrorResponse), (status = 429, description = "Rate limited", body = crate::openapi::ErrorResponse)), security(("bearer" = []), ("session" = [])))]
pub(crate) async fn list_members(
    state: web::Data<AppState>,
    auth: Authenticated,
    path: web::Path<String>,
    query: web::Query<PageQuery>,
) -> Result<HttpResponse, ApiError> {
    let scope = scoped(&state, &auth, path.into_inner()).await?;
    scope.require("member.read")?;
    let page = query.check()?;
    let list = state
        .db
        .run(move |conn| tenants::list_members(conn, &scope, &page).map_err(ApiError::from))
        .await?;
    Ok(HttpResponse::Ok().json(list))
}

fn member_id(raw: &str) -> Result<MembershipId, ApiError> {
    MembershipId::parse(raw).ok_or_else(|| ApiError::not_found("member"))
}

#[utoipa::path(get, path = "/api/v1/tenants/{tenant}/members/{member}", tag = "members", params(("tenant" = String, Path, description = "Tenant id"), ("member" = String, Path)), responses((status = 200, description = "The member", body = crate::tenants::Member), (status = 401, description = "Not logged in", body = crate::openapi::ErrorResponse), (status = 403, description = "Missing permission", body = crate::openapi::ErrorResponse), (status = 404, description = "Not found, or not yours", body = crate::openapi::ErrorResponse), (status = 429, description = "Rate limited", body = crate::openapi::ErrorResponse)), security(("bearer" = []), ("session" = [])))]
pub(crate) async fn get_member(
    state: web::Data<AppState>,
    auth: Authenticated,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let (tenant, member) = path.into_inner();
    let scope = scoped(&state, &auth, tenant).await?;
    scope.require("member.read")?;
    let id = member_id(&member)?;
    let found = state
        .db
        .run(move |conn| tenants::find_member(conn, &scope, &id).map_err(ApiError::from))
        .await?
        .ok_or_else(|| ApiError::not_found("member"))?;
    Ok(HttpResponse::Ok().json(found))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RoleBody {
    role: String,
}

#[utoipa::path(patch, path = "/api/v1/tenants/{tenant}/members/{member}", tag = "members", request_body = RoleBody, params(("tenant" = String, Path, description = "Tenant id"), ("member" = String, Path)), responses((status = 200, description = "Updated", body = crate::tenants::Member), (status = 400, description = "Malformed request", body = crate::openapi::ErrorResponse), (status = 401, description = "Not logged in", body = crate::openapi::ErrorResponse), (status = 403, description = "Missing permission", body = crate::openapi::ErrorResponse), (status = 404, description = "Not found, or not yours", body = crate::openapi::ErrorResponse), (status = 409, description = "Conflict", body = crate::openapi::ErrorResponse), (status = 422, description = "Invalid field", body = crate::openapi::ErrorResponse), (status = 429, description = "Rate limited", body = crate::openapi::ErrorResponse)), security(("bearer" = []), ("session" = [])))]
pub(crate) async fn update_member(
    state: web::Data<AppState>,
    req: HttpRequest,
    auth: Authenticated,
    path: web::Path<(String, String)>,
    body: web::Json<RoleBody>,
) -> Result<HttpResponse, ApiError> {
    let (tenant, member) = path.into_inner();
    let scope = scoped(&state, &auth, tenant).await?;
    scope.require("member.update")?;
    let id = member_id(&member)?;
    let meta = state.meta(&req);
    let updated = state
        .db
        .run(move |conn| tenants::set_member_role(conn, &scope, &id, &body.role, &meta))
        .await?;
    Ok(HttpResponse::Ok().json(updated))
}

#[utoipa::path(delete, path = "/api/v1/tenants/{tenant}/members/{member}", tag = "members", params(("tenant" = String, Path, description = "Tenant id"), ("member" = String, Path)), responses((status = 204, description = "Removed"), (status = 401, description = "Not logged in", body = crate::openapi::ErrorResponse), (status = 403, description = "Missing permission", body = crate::openapi::ErrorResponse), (status = 404, description = "Not found, or not yours", body = crate::openapi::ErrorResponse), (status = 409, description = "Conflict", body = crate::openapi::ErrorResponse), (status = 429, description = "Rate limited", body = crate::openapi::ErrorResponse)), security(("bearer" = []), ("session" = [])))]
pub(crate) async fn remove_member(
    state: web::Data<AppState>,
    req: HttpRequest,
    auth: Authenticated,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let (tenant, member) = path.into_inner();
    let scope = scoped(&state, &auth, tenant).await?;
    let id = member_id(&member)?;
    let meta = state.meta(&req);
    let tenant = scope.tenant().clone();
    let user = state
        .db
        .run(move |conn| tenants::remove_member(conn, &scope, &id, &meta))
        .await?;
    state.events.publish(PanelEvent::AccessRevoked {
        user,
        tenant: Some(tenant),
        reason: RevokeReason::MemberRemoved,
    });
    Ok(HttpResponse::NoContent().finish())
}

#[utoipa::path(get, path = "/api/v1/tenants/{tenant}/invitations", tag = "members", params(("tenant" = String, Path, description = "Tenant id"), crate::pagination::PageQuery), responses((status = 200, description = "Pending invitations", body = crate::pagination::Page<crate::tenants::Invitation>), (status = 400, description = "Malformed request", body = crate::openapi::ErrorResponse), (status = 401, description = "Not logged in", body = crate::openapi::ErrorResponse), (status = 403, description = "Missing permission", body = crate::openapi::ErrorResponse), (status = 404, description = "Not found, or not yours", body = crate::openapi::ErrorResponse), (status = 422, description = "Invalid field", body = crate::openapi::ErrorResponse), (status = 429, description = "Rate limited", body = crate::openapi::ErrorResponse)), security(("bearer" = []), ("session" = [])))]
pub(crate) async fn list_invitations(
    state: web::Data<AppState>,
    auth: Authenticated,
    path: web::Path<String>,
    query: web::Query<PageQuery>,
) -> Result<HttpResponse, ApiError> {
    let scope = scoped(&state, &auth, path.into_inner()).await?;
    scope.require("member.read")?;
    let page = query.check()?;
    let list = state
        .db
        .run(move |conn| tenants::list_invitations(conn, &scope, &page).map_err(ApiError::from))
        .await?;
    Ok(HttpResponse::Ok().json(list))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct InviteBody {
    email: String,
    role: String,
}

#[utoipa::path(post, path = "/api/v1/tenants/{tenant}/invitations", tag = "members", request_body = InviteBody, params(("tenant" = String, Path, description = "Tenant id")), responses((status = 201, description = "Invited", body = crate::openapi::InvitationCreated), (status = 400, description = "Malformed request", body = crate::openapi::ErrorResponse), (status = 401, description = "Not logged in", body = crate::openapi::ErrorResponse), (status = 403, description = "Missing permission", body = crate::openapi::ErrorResponse), (status = 404, description = "Not found, or not yours", body = crate::openapi::ErrorResponse), (status = 409, description = "Conflict", body = crate::openapi::ErrorResponse), (status = 422, description = "Invalid field", body = crate::openapi::ErrorResponse), (status = 429, description = "Rate limited", body = crate::openapi::ErrorResponse)), security(("bearer" = []), ("session" = [])))]
pub(crate) async fn invite(
    state: web::Data<AppState>,
    req: HttpRequest,
    auth: Authenticated,
    path: web::Path<String>,
    body: web::Json<InviteBody>,
) -> Result<HttpResponse, ApiError> {
    let scope = scoped(&state, &auth, path.into_inner()).await?;
    scope.require("member.invite")?;
    let body = body.into_inner();
    let email = users::normalise_email(&body.email).map_err(|m| ApiError::invalid("email", m))?;
    let meta = state.meta(&req);
    let to = email.clone();
    let (invitation, token) = state
        .db
        .run(move |conn| tenants::invite(conn, &scope, &to, &body.role, &meta))
        .await?;
    let mail = Mail {
        to: email,
        subject: "You are invited to a Mamba team".into(),
        body: format!(
            "{} invited you to join their team on Mamba. Log in (or register with this address) and \
             accept at:\n\n{}/invitations/accept?token={token}\n\nThe invitation expires in 7 days.\n",
            auth.user.display_name, state.config.http.public_url
        ),
    };
    if let Err(e) = state.mailer.send(mail).await {
        tracing::error!(error = %e, "invitation email not sent");
    }
    // The token is also returned, so an inviter can pass it on by other means; only the
    // invited, verified address can accept it.
    Ok(HttpResponse::Created().json(json!({ "invitation": invitation, "token": token })))
}

#[utoipa::path(delete, path = "/api/v1/tenants/{tenant}/invitations/{invitation}", tag = "members", params(("tenant" = String, Path, description = "Tenant id"), ("invitation" = String, Path)), responses((status = 204, description = "Withdrawn"), (status = 401, description = "Not logged in", body = crate::openapi::ErrorResponse), (status = 403, description = "Missing permission", body = crate::openapi::ErrorResponse), (status = 404, description = "Not found, or not yours", body = crate::openapi::ErrorResponse), (status = 429, description = "Rate limited", body = crate::openapi::ErrorResponse)), security(("bearer" = []), ("session" = [])))]
pub(crate) async fn revoke_invitation(
    state: web::Data<AppState>,
    req: HttpRequest,
    auth: Authenticated,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let (tenant, invitation) = path.into_inner();
    let scope = scoped(&state, &auth, tenant).await?;
    scope.require("member.invite")?;
    let id = InvitationId::parse(&invitation).ok_or_else(|| ApiError::not_found("invitation"))?;
    let meta = state.meta(&req);
    state
        .db
        .run(move |conn| tenants::revoke_invitation(conn, &scope, &id, &meta))
        .await?;
    Ok(HttpResponse::NoContent().finish())
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct AcceptBody {
    token: String,
}

#[utoipa::path(post, path = "/api/v1/invitations/accept", tag = "members", request_body = AcceptBody, responses((status = 200, description = "Joined", body = crate::tenants::Tenant), (status = 400, description = "Malformed request", body = crate::openapi::ErrorResponse), (status = 401, description = "Not logged in", body = crate::openapi::ErrorResponse), (status = 403, description = "Missing permission", body = crate::openapi::ErrorResponse), (status = 404, description = "Not found, or not yours", body = crate::openapi::ErrorResponse), (status = 409, description = "Conflict", body = crate::openapi::ErrorResponse)), security(("bearer" = []), ("session" = [])))]
pub(crate) async fn accept_invitation(
    state: web::Data<AppState>,
    req: HttpRequest,
    auth: Authenticated,
    body: web::Json<AcceptBody>,
) -> Result<HttpResponse, ApiError> {
    let meta = state.meta(&req);
    let user = auth.user.clone();
    let tenant = state
        .db
        .run(move |conn| tenants::accept_invitation(conn, &user, &body.token, &meta))
        .await?;
    Ok(HttpResponse::Ok().json(tenant))
}

#[utoipa::path(get, path = "/api/v1/tenants/{tenant}/roles", tag = "roles", params(("tenant" = String, Path, description = "Tenant id")), responses((status = 200, description = "Built-in and custom roles", body = crate::openapi::RoleList), (status = 401, description = "Not logged in", body = crate::openapi::ErrorResponse), (status = 403, description = "Missing permission", body = crate::openapi::ErrorResponse), (status = 404, description = "Not found, or not yours", body = crate::openapi::ErrorResponse), (status = 429, description = "Rate limited", body = crate::openapi::ErrorResponse)), security(("bearer" = []), ("session" = [])))]
pub(crate) async fn list_roles(
    state: web::Data<AppState>,
    auth: Authenticated,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let scope = scoped(&state, &auth, path.into_inner()).await?;
    scope.require("role.read")?;
    let roles = state
        .db
        .run(move |conn| tenants::list_roles(conn, &scope).map_err(ApiError::from))
        .await?;
    Ok(HttpResponse::Ok().json(json!({ "items": roles })))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateRoleBody {
    name: String,
    permissions: BTreeSet<String>,
}

#[utoipa::path(post, path = "/api/v1/tenants/{tenant}/roles", tag = "roles", request_body = CreateRoleBody, params(("tenant" = String, Path, description = "Tenant id")), responses((status = 201, description = "Created", body = crate::tenants::Role), (status = 400, description = "Malformed request", body = crate::openapi::ErrorResponse), (status = 401, description = "Not logged in", body = crate::openapi::ErrorResponse), (status = 403, description = "Missing permission", body = crate::openapi::ErrorResponse), (status = 404, description = "Not found, or not yours", body = crate::openapi::ErrorResponse), (status = 409, description = "Conflict", body = crate::openapi::ErrorResponse), (status = 422, description = "Invalid field", body = crate::openapi::ErrorResponse), (status = 429, description = "Rate limited", body = crate::openapi::ErrorResponse)), security(("bearer" = []), ("session" = [])))]
pub(crate) async fn create_role(
    state: web::Data<AppState>,
    req: HttpRequest,
    auth: Authenticated,
    path: web::Path<String>,
    body: web::Json<CreateRoleBody>,
) -> Result<HttpResponse, ApiError> {
    let scope = scoped(&state, &auth, path.into_inner()).await?;
    scope.require("role.manage")?;
    let body = body.into_inner();
    let name = check_name(&body.name, "name")?;
    if permissions::BuiltInRole::parse(&name.to_uppercase()).is_some() {
        return Err(ApiError::invalid("name", "is the name of a built-in role"));
    }
    if let Some(unknown) = body.permissions.iter().find(|k| !permissions::is_known(k)) {
        return Err(ApiError::invalid(
            "permissions",
            format!("{unknown:?} is not a permission key"),
        ));
    }
    let meta = state.meta(&req);
    let role = state
        .db
        .run(move |conn| tenants::create_role(conn, &scope, &name, &body.permissions, &meta))
        .await?;
    Ok(HttpResponse::Created().json(role))
}

#[utoipa::path(delete, path = "/api/v1/tenants/{tenant}/roles/{role}", tag = "roles", params(("tenant" = String, Path, description = "Tenant id"), ("role" = String, Path)), responses((status = 204, description = "Deleted"), (status = 401, description = "Not logged in", body = crate::openapi::ErrorResponse), (status = 403, description = "Missing permission", body = crate::openapi::ErrorResponse), (status = 404, description = "Not found, or not yours", body = crate::openapi::ErrorResponse), (status = 409, description = "Conflict", body = crate::openapi::ErrorResponse), (status = 429, description = "Rate limited", body = crate::openapi::ErrorResponse)), security(("bearer" = []), ("session" = [])))]
pub(crate) async fn delete_role(
    state: web::Data<AppState>,
    req: HttpRequest,
    auth: Authenticated,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let (tenant, role) = path.into_inner();
    let scope = scoped(&state, &auth, tenant).await?;
    scope.require("role.manage")?;
    let id = RoleId::parse(&role).ok_or_else(|| ApiError::not_found("role"))?;
    let meta = state.meta(&req);
    state
        .db
        .run(move |conn| tenants::delete_role(conn, &scope, &id, &meta))
        .await?;
    Ok(HttpResponse::NoContent().finish())
}

#[utoipa::path(get, path = "/api/v1/tenants/{tenant}/audit", tag = "audit", params(("tenant" = String, Path, description = "Tenant id"), crate::audit::AuditFilter), responses((status = 200, description = "Entries, oldest first", body = crate::pagination::Page<crate::audit::AuditEntry>), (status = 400, description = "Malformed request", body = crate::openapi::ErrorResponse), (status = 401, description = "Not logged in", body = crate::openapi::ErrorResponse), (status = 403, description = "Missing permission", body = crate::openapi::ErrorResponse), (status = 404, description = "Not found, or not yours", body = crate::openapi::ErrorResponse), (status = 422, description = "Invalid field", body = crate::openapi::ErrorResponse), (status = 429, description = "Rate limited", body = crate::openapi::ErrorResponse)), security(("bearer" = []), ("session" = [])))]
pub(crate) async fn list_audit(
    state: web::Data<AppState>,
    auth: Authenticated,
    path: web::Path<String>,
    query: web::Query<AuditFilter>,
) -> Result<HttpResponse, ApiError> {
    let scope = scoped(&state, &auth, path.into_inner()).await?;
    scope.require("audit.read")?;
    let filter = query.into_inner();
    let page = PageQuery {
        limit: filter.limit,
        cursor: filter.cursor.clone(),
    }
    .check()?;
    let entries = state
        .db
        .run(move |conn| audit::list(conn, &scope, &filter, &page).map_err(ApiError::from))
        .await?;
    Ok(HttpResponse::Ok().json(entries))
}

#[utoipa::path(get, path = "/api/v1/tenants/{tenant}/api-keys", tag = "api_keys", params(("tenant" = String, Path, description = "Tenant id"), crate::pagination::PageQuery), responses((status = 200, description = "Live keys", body = crate::pagination::Page<crate::api_keys::ApiKey>), (status = 400, description = "Malformed request", body = crate::openapi::ErrorResponse), (status = 401, description = "Not logged in", body = crate::openapi::ErrorResponse), (status = 403, description = "Missing permission", body = crate::openapi::ErrorResponse), (status = 404, description = "Not found, or not yours", body = crate::openapi::ErrorResponse), (status = 422, description = "Invalid field", body = crate::openapi::ErrorResponse), (status = 429, description = "Rate limited", body = crate::openapi::ErrorResponse)), security(("bearer" = []), ("session" = [])))]
pub(crate) async fn list_keys(
    state: web::Data<AppState>,
    auth: Authenticated,
    path: web::Path<String>,
    query: web::Query<PageQuery>,
) -> Result<HttpResponse, ApiError> {
    let scope = scoped(&state, &auth, path.into_inner()).await?;
    if !(scope.has("apikey.read") || scope.has("apikey.manage")) {
        scope.require("apikey.read")?;
    }
    let page = query.check()?;
    let keys = state
        .db
        .run(move |conn| api_keys::list(conn, &scope, &page).map_err(ApiError::from))
        .await?;
    Ok(HttpResponse::Ok().json(keys))
}

#[utoipa::path(post, path = "/api/v1/tenants/{tenant}/api-keys", tag = "api_keys", request_body = NewApiKey, params(("tenant" = String, Path, description = "Tenant id")), responses((status = 201, description = "Created; the key is shown once", body = crate::openapi::ApiKeyCreated), (status = 400, description = "Malformed request", body = crate::openapi::ErrorResponse), (status = 401, description = "Not logged in", body = crate::openapi::ErrorResponse), (status = 403, description = "Missing permission", body = crate::openapi::ErrorResponse), (status = 404, description = "Not found, or not yours", body = crate::openapi::ErrorResponse), (status = 409, description = "Conflict", body = crate::openapi::ErrorResponse), (status = 422, description = "Invalid field", body = crate::openapi::ErrorResponse), (status = 429, description = "Rate limited", body = crate::openapi::ErrorResponse)), security(("bearer" = []), ("session" = [])))]
pub(crate) async fn create_key(
    state: web::Data<AppState>,
    req: HttpRequest,
    auth: Authenticated,
    path: web::Path<String>,
    body: web::Json<NewApiKey>,
) -> Result<HttpResponse, ApiError> {
    let scope = scoped(&state, &auth, path.into_inner()).await?;
    scope.require("apikey.manage")?;
    let new = body.into_inner();
    new.check()?;
    let max = state.config.api_keys.max_per_user;
    let meta = state.meta(&req);
    let (key, secret) = state
        .db
        .run(move |conn| api_keys::create(conn, &scope, &new, max, &meta))
        .await?;
    Ok(HttpResponse::Created().json(json!({ "api_key": key, "key": secret })))
}

#[utoipa::path(delete, path = "/api/v1/tenants/{tenant}/api-keys/{key}", tag = "api_keys", params(("tenant" = String, Path, description = "Tenant id"), ("key" = String, Path)), responses((status = 204, description = "Revoked"), (status = 401, description = "Not logged in", body = crate::openapi::ErrorResponse), (status = 403, description = "Missing permission", body = crate::openapi::ErrorResponse), (status = 404, description = "Not found, or not yours", body = crate::openapi::ErrorResponse), (status = 429, description = "Rate limited", body = crate::openapi::ErrorResponse)), security(("bearer" = []), ("session" = [])))]
pub(crate) async fn revoke_key(
    state: web::Data<AppState>,
    req: HttpRequest,
    auth: Authenticated,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let (tenant, key) = path.into_inner();
    let scope = scoped(&state, &auth, tenant).await?;
    let meta = state.meta(&req);
    state
        .db
        .run(move |conn| api_keys::revoke(conn, &scope, &key, &meta))
        .await?;
    Ok(HttpResponse::NoContent().finish())
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct AdminTenantChanges {
    plan: Option<String>,
    status: Option<String>,
}

/// Operators set a tenant's plan (free, premium, enterprise) and status (active, suspended).
#[utoipa::path(patch, path = "/api/v1/admin/tenants/{tenant}", tag = "admin", request_body = AdminTenantChanges, params(("tenant" = String, Path, description = "Tenant id")), responses((status = 200, description = "Updated", body = crate::tenants::Tenant), (status = 400, description = "Malformed request", body = crate::openapi::ErrorResponse), (status = 401, description = "Not logged in", body = crate::openapi::ErrorResponse), (status = 403, description = "Missing permission", body = crate::openapi::ErrorResponse), (status = 404, description = "Not found, or not yours", body = crate::openapi::ErrorResponse), (status = 422, description = "Invalid field", body = crate::openapi::ErrorResponse)), security(("bearer" = []), ("session" = [])))]
pub(crate) async fn admin_update_tenant(
    state: web::Data<AppState>,
    req: HttpRequest,
    admin: SuperAdmin,
    path: web::Path<String>,
    body: web::Json<AdminTenantChanges>,
) -> Result<HttpResponse, ApiError> {
    let body = body.into_inner();
    if body
        .plan
        .as_deref()
        .is_some_and(|p| !["free", "premium", "enterprise"].contains(&p))
    {
        return Err(ApiError::invalid("plan", "must be free, premium or enterprise"));
    }
    if body
        .status
        .as_deref()
        .is_some_and(|s| !["active", "suspended"].contains(&s))
    {
        return Err(ApiError::invalid("status", "must be active or suspended"));
    }
    let tenant =
        crate::ids::TenantId::parse(&path.into_inner()).ok_or_else(|| ApiError::not_found("tenant"))?;
    let meta = state.meta(&req);
    let actor = Actor::User(admin.0.user_id());
    let updated = state
        .db
        .run(move |conn| {
            tenants::admin_update(
                conn,
                &tenant,
                body.plan.as_deref(),
                body.status.as_deref(),
                &actor,
                &meta,
            )
        })
        .await?;
    Ok(HttpResponse::Ok().json(updated))
}
