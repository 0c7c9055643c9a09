//! The OpenAPI 3 document, generated from the handlers' annotations (utoipa), served at
//! `/api/v1/openapi.json`, and a docs page at `/api/v1/docs` that renders it with no
//! network access (the page's script is inline).

use utoipa::openapi::security::{
    ApiKey as ApiKeyScheme, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme,
};
use utoipa::{Modify, OpenApi, ToSchema};

use crate::api_keys::{ApiKey, NewApiKey};
use crate::audit::AuditEntry;
use crate::identity::{LoginClient, TokenPair};
use crate::pagination::Page;
use crate::tenants::{Invitation, Member, Role, Tenant, TenantChanges};
use crate::users::User;

/// The error envelope every failure answers with.
#[derive(ToSchema)]
pub struct ErrorResponse {
    pub error: ErrorBodyDoc,
}

#[derive(ToSchema)]
pub struct ErrorBodyDoc {
    /// Stable, machine-readable, snake_case.
    pub code: String,
    pub message: String,
    /// The fields at fault, for validation errors.
    pub details: Option<Vec<FieldErrorDoc>>,
}

#[derive(ToSchema)]
pub struct FieldErrorDoc {
    pub field: String,
    pub message: String,
}

#[derive(ToSchema)]
pub struct Message {
    pub message: String,
}

/// `status` is `ok` (with a session's `csrf_token` or an API client's `tokens`) or
/// `two_factor_required` (with the `challenge` to answer at `/auth/login/two-factor`).
#[derive(ToSchema)]
pub struct LoginAnswer {
    pub status: String,
    pub csrf_token: Option<String>,
    pub user: Option<User>,
    pub tokens: Option<TokenPair>,
    pub challenge: Option<String>,
}

#[derive(ToSchema)]
pub struct TokensAnswer {
    pub tokens: TokenPair,
}

#[derive(ToSchema)]
pub struct TwoFactorSetup {
    pub secret: String,
    pub otpauth_uri: String,
}

#[derive(ToSchema)]
pub struct RecoveryCodes {
    pub recovery_codes: Vec<String>,
}

#[derive(ToSchema)]
pub struct InvitationCreated {
    pub invitation: Invitation,
    /// Shown once; also sent by email.
    pub token: String,
}

#[derive(ToSchema)]
pub struct ApiKeyCreated {
    pub api_key: ApiKey,
    /// The key itself, shown once.
    pub key: String,
}

#[derive(ToSchema)]
pub struct RoleList {
    pub items: Vec<Role>,
}

#[derive(ToSchema)]
pub struct PermissionDoc {
    pub key: String,
    pub group: String,
    pub description: String,
}

#[derive(ToSchema)]
pub struct BuiltInRoleDoc {
    pub name: String,
    pub permissions: Vec<String>,
}

#[derive(ToSchema)]
pub struct Catalogue {
    pub permissions: Vec<PermissionDoc>,
    pub built_in_roles: Vec<BuiltInRoleDoc>,
}

#[derive(ToSchema)]
pub struct Health {
    pub status: String,
    pub database: Option<String>,
    pub redis: Option<String>,
}

/// `POST /api/node/v1/heartbeat` (`mamba_shared::node_api::Heartbeat`).
#[derive(ToSchema)]
pub struct NodeHeartbeatDoc {
    pub version: String,
    pub uptime_s: u64,
    /// `cpu_cores`, `load_1m_milli`, `memory_total_mb`, `memory_available_mb`,
    /// `disk_total_mb`, `disk_free_mb`.
    #[schema(value_type = Object)]
    pub resources: serde_json::Value,
    /// `{server_id, state}` of every server the node knows.
    #[schema(value_type = Vec<Object>)]
    pub servers: Vec<serde_json::Value>,
}

#[derive(ToSchema)]
pub struct HeartbeatAckDoc {
    pub node_id: String,
    pub received_at_ms: i64,
}

/// `POST /api/node/v1/metrics` (`mamba_shared::metrics::MetricsBatch`).
#[derive(ToSchema)]
pub struct MetricsBatchDoc {
    /// `{server_id, sampled_at_ms, cpu_millicores, memory_mb, egress_bytes, disk_bytes, uptime_s}`.
    #[schema(value_type = Vec<Object>)]
    pub samples: Vec<serde_json::Value>,
}

/// `POST /api/node/v1/events` (`mamba_shared::node_api::EventsBatch`).
#[derive(ToSchema)]
pub struct EventsBatchDoc {
    /// `{id, server_id, kind, at_ms, message, data}`.
    #[schema(value_type = Vec<Object>)]
    pub events: Vec<serde_json::Value>,
}

/// One entry of `POST /api/node/v1/activity` (`mamba_shared::activity::ActivityEntry`).
#[derive(ToSchema)]
pub struct ActivityEntryDoc {
    /// A UUID chosen by the node; a re-sent entry is stored once.
    pub id: String,
    pub server_id: String,
    pub event: String,
    /// The panel's user id, or `panel`.
    pub actor: String,
    pub ip: Option<String>,
    #[schema(value_type = Object)]
    pub properties: serde_json::Value,
    pub at_ms: i64,
}

#[derive(ToSchema)]
pub struct ActivityBatchDoc {
    pub entries: Vec<ActivityEntryDoc>,
}

/// The answer to a metrics, events or activity batch.
#[derive(ToSchema)]
pub struct NodeIngestReportDoc {
    pub stored: u64,
    /// Items the panel already had (a re-delivery).
    pub duplicates: u64,
    /// `{index, reason, ...}` of each item refused for good.
    #[schema(value_type = Vec<Object>)]
    pub refused: Vec<serde_json::Value>,
}

/// `POST /api/node/v1/sftp/auth` (`mamba_shared::node_sftp::SftpAuthRequest`).
#[derive(ToSchema)]
pub struct SftpAuthRequestDoc {
    pub user: String,
    pub server_short: String,
    pub client_ip: String,
    /// `{type: "password", password}` or `{type: "public_key", public_key}`.
    #[schema(value_type = Object)]
    pub credential: serde_json::Value,
}

#[derive(ToSchema)]
pub struct SftpAuthGrantDoc {
    pub user_id: String,
    pub server_id: String,
    pub permissions: Vec<String>,
}

struct Security;

impl Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("An access token (mat_...) or an API key (mak_...)"))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "session",
            SecurityScheme::ApiKey(ApiKeyScheme::Cookie(ApiKeyValue::with_description(
                "__Host-mamba_session",
                "A browser session; state-changing requests also need X-CSRF-Token",
            ))),
        );
        components.add_security_scheme(
            "node_mtls",
            SecurityScheme::MutualTls {
                description: Some(
                    "A node certificate from the panel's CA, on the node listener ([node_listener]) only"
                        .into(),
                ),
                extensions: None,
            },
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Mamba panel API", description = "The control plane's REST API. Errors are `{\"error\": {\"code\", \"message\", \"details\"?}}`; lists are cursor-paginated."),
    paths(
        crate::http::health::healthz,
        crate::http::health::readyz,
        crate::http::auth::register,
        crate::http::auth::verify_email,
        crate::http::auth::login,
        crate::http::auth::login_two_factor,
        crate::http::auth::refresh_token,
        crate::http::auth::logout,
        crate::http::auth::request_password_reset,
        crate::http::auth::confirm_password_reset,
        crate::http::account::me,
        crate::http::account::two_factor_setup,
        crate::http::account::two_factor_enable,
        crate::http::account::two_factor_disable,
        crate::http::account::admin_list_users,
        crate::http::account::request_email_change,
        crate::http::account::confirm_email_change,
        crate::http::ssh_keys::list_ssh_keys,
        crate::http::ssh_keys::add_ssh_key,
        crate::http::ssh_keys::delete_ssh_key,
        crate::http::tenants::catalogue,
        crate::http::tenants::create_tenant,
        crate::http::tenants::my_tenants,
        crate::http::tenants::admin_tenants,
        crate::http::tenants::admin_update_tenant,
        crate::http::tenants::get_tenant,
        crate::http::tenants::update_tenant,
        crate::http::tenants::list_members,
        crate::http::tenants::get_member,
        crate::http::tenants::update_member,
        crate::http::tenants::remove_member,
        crate::http::tenants::list_invitations,
        crate::http::tenants::invite,
        crate::http::tenants::revoke_invitation,
        crate::http::tenants::accept_invitation,
        crate::http::tenants::list_roles,
        crate::http::tenants::create_role,
        crate::http::tenants::delete_role,
        crate::http::tenants::list_audit,
        crate::http::tenants::list_keys,
        crate::http::tenants::create_key,
        crate::http::tenants::revoke_key,
        crate::http::nodes::create_node,
        crate::http::nodes::list_nodes,
        crate::http::nodes::get_node,
        crate::http::nodes::update_node,
        crate::http::nodes::decommission_node,
        crate::http::nodes::delete_node,
        crate::http::nodes::list_pools,
        crate::http::nodes::add_pools,
        crate::http::nodes::delete_pool,
        crate::http::nodes::list_allocations,
        crate::http::nodes::scan_leaks,
        crate::http::blueprints::list_blueprints,
        crate::http::blueprints::export_blueprint,
        crate::http::blueprints::import_blueprint,
        crate::http::blueprints::delete_blueprint,
        crate::http::node_pki::create_enrollment_token,
        crate::http::node_pki::revoke_node,
        crate::http::jobs::list_jobs,
        crate::http::jobs::retry_job,
        crate::http::servers::create_server,
        crate::http::servers::list_servers,
        crate::http::servers::get_server,
        crate::http::servers::update_server,
        crate::http::servers::delete_server,
        crate::http::servers::power_server,
        crate::http::servers::send_commands,
        crate::http::servers::reinstall_server,
        crate::http::servers::console,
        crate::http::servers::server_metrics,
        crate::http::servers::tenant_quota,
        crate::http::servers::admin_set_quota,
        crate::http::servers::suspend_server,
        crate::http::servers::unsuspend_server,
        crate::http::node_api::node_utilisation,
        crate::http::node_api::server_events,
        crate::http::node_api::server_activity,
        crate::http::node_api::heartbeat,
        crate::http::node_api::metrics,
        crate::http::node_api::events,
        crate::http::node_api::activity,
        crate::http::node_sftp::sftp_auth,
        crate::http::backups::create_backup,
        crate::http::backups::list_backups,
        crate::http::backups::get_backup,
        crate::http::backups::delete_backup,
        crate::http::backups::restore_backup,
        crate::http::backups::download_backup,
    ),
    components(schemas(
        ErrorResponse, User, Tenant, Member, Invitation, Role, ApiKey, NewApiKey, AuditEntry, TokenPair,
        LoginClient, TenantChanges, Page<User>, Page<Tenant>, Page<Member>, Page<Invitation>, Page<AuditEntry>,
        Page<ApiKey>, crate::nodes::Node, crate::nodes::NodeDetail, crate::nodes::Resources,
        crate::nodes::NewNode, crate::nodes::NodeChanges, crate::nodes::Decommissioned, Page<crate::nodes::Node>,
        crate::allocation::Pool, crate::allocation::NewPools, crate::allocation::Strategy, crate::allocation::Allocation,
        crate::allocation::LeakReport, Page<crate::allocation::Allocation>,
        crate::blueprints::Summary, crate::blueprints::Source, crate::blueprints::ImportResult,
        crate::eggs::Report, crate::eggs::ReportItem, crate::eggs::Outcome, crate::http::node_pki::EnrollmentTokenCreated,
        crate::http::node_pki::NodeRevoked, crate::jobs::Job, crate::jobs::JobKind, crate::jobs::JobStatus,
        Page<crate::jobs::Job>,
        crate::servers::NewServer, crate::servers::Server, Page<crate::servers::Server>,
        crate::servers::Created, crate::servers::Queued, crate::servers::ServerChanges, crate::servers::Power,
        crate::servers::Quota, crate::servers::QuotaOverrides, crate::servers::QuotaUsage,
        crate::http::servers::ServerDetail, crate::http::servers::ConsoleAccess, crate::http::servers::PowerBody,
        crate::http::servers::CommandsBody, crate::http::servers::SuspendAnswer, crate::metrics_store::Series,
        crate::metrics_store::Point, crate::metrics_store::Range, crate::metrics_store::Resolution,
        crate::telemetry::Utilisation, crate::telemetry::LiveUsage,
        crate::telemetry::ServerEvent, Page<crate::telemetry::ServerEvent>,
        crate::ssh_keys::SshKey, crate::http::ssh_keys::SshKeyList,
        crate::http::ssh_keys::NewSshKey, crate::activity::Activity, Page<crate::activity::Activity>,
        NodeHeartbeatDoc, HeartbeatAckDoc, MetricsBatchDoc, EventsBatchDoc, ActivityEntryDoc, ActivityBatchDoc,
        NodeIngestReportDoc, SftpAuthRequestDoc, SftpAuthGrantDoc, crate::backups::Backup,
        Page<crate::backups::Backup>, crate::backups::NewBackup, crate::backups::RestoreBody, crate::backups::BackupQueued,
        crate::http::backups::BackupDownload
    )),
    modifiers(&Security),
)]
pub struct ApiDoc;

/// The document, as served.
pub fn document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// A self-contained page listing every operation, its parameters, body and answers.
pub const DOCS_PAGE: &str = include_str!("docs.html");
