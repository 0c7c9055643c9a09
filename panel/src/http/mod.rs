//! The HTTP surface: `/healthz`, `/readyz`, `/metrics` and the REST API under `/api/v1`.
//!
//! API boundary: handlers parse and check input, then call the data layer through
//! [`crate::db::Db::run`]; they never hold a connection on an async thread.

pub(crate) mod account;
pub mod auth;
pub(crate) mod backups;
pub(crate) mod blueprints;
pub mod extract;
pub(crate) mod health;
pub(crate) mod jobs;
pub(crate) mod node_api;
pub mod node_pki;
pub(crate) mod node_sftp;
pub(crate) mod nodes;
pub(crate) mod servers;
pub(crate) mod ssh_keys;
pub(crate) mod tenants;

use std::sync::Arc;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceFactory, ServiceRequest, ServiceResponse};
use actix_web::middleware::from_fn;
use actix_web::{App, HttpRequest, HttpResponse, web};

use crate::config::Config;
use crate::db::Db;
use crate::error::ApiError;
use crate::keys::{LinkSigner, MasterKey};
use crate::mail::Mailer;
use crate::metrics::{self, Metrics};
use crate::password::PasswordHasherConfig;
use crate::ratelimit::Limiter;
use crate::request_meta::RequestMeta;

/// Everything a handler may need, shared by all workers.
#[derive(Debug)]
pub struct AppState {
    pub config: Arc<Config>,
    pub db: Db,
    pub hasher: PasswordHasherConfig,
    /// Verified against when a login names no account, so both cost the same.
    pub dummy_hash: String,
    pub links: LinkSigner,
    pub mailer: Mailer,
    pub limiter: Limiter,
    /// Cross-replica events; publishing never fails a request.
    pub events: crate::events::EventBus,
    /// Seals and opens tenants' stored secrets.
    pub secrets: crate::secrets::SecretBox,
    /// Seals users' TOTP seeds at rest.
    pub totp_sealer: crate::secrets::FieldSealer,
    /// The blueprint files, read at start.
    pub blueprints: Arc<crate::blueprints::Registry>,
    /// The node CA, token-signing key and the cache of live node certificates.
    pub pki: Arc<crate::node_pki::PanelPki>,
    /// Woken when server events were stored, so the webhook task sends them promptly.
    pub telemetry_wake: Arc<tokio::sync::Notify>,
    /// Woken when a request committed a job, so this process's job workers claim it at once.
    pub jobs_wake: Arc<tokio::sync::Notify>,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(transparent)]
    Hash(#[from] crate::password::HashError),
    #[error(transparent)]
    Mail(#[from] crate::mail::MailError),
    #[error(transparent)]
    Blueprints(#[from] crate::blueprints::RegistryError),
    #[error(transparent)]
    NodePki(#[from] crate::node_pki::NodePkiError),
}

impl AppState {
    /// Builds the state. Blocking (it hashes once and reads or makes the node PKI's keys):
    /// call it outside the async workers.
    pub fn new(config: Config, db: Db, master: &MasterKey) -> Result<AppState, StateError> {
        let hasher = PasswordHasherConfig::new(&config.auth)?;
        let node_cert_validity =
            std::time::Duration::from_secs(config.node_listener.certificate_days.saturating_mul(86_400));
        let pki = Arc::new(crate::node_pki::PanelPki::load_or_create(
            &db,
            master,
            node_cert_validity,
        )?);
        Ok(AppState {
            pki,
            telemetry_wake: Arc::new(tokio::sync::Notify::new()),
            jobs_wake: Arc::new(tokio::sync::Notify::new()),
            dummy_hash: hasher.dummy_hash()?,
            hasher,
            links: LinkSigner::new(master),
            secrets: crate::secrets::SecretBox::new(master),
            totp_sealer: crate::secrets::FieldSealer::totp(master),
            mailer: Mailer::from_config(&config.smtp)?,
            blueprints: Arc::new(crate::blueprints::Registry::load(std::path::Path::new(
                &config.blueprints.dir,
            ))?),
            limiter: Limiter::local(),
            events: crate::events::EventBus::local(),
            config: Arc::new(config),
            db,
        })
    }

    /// Tells this process's job workers that a job was committed. Call it only after the
    /// transaction that enqueued the job committed, or a worker may look before it exists.
    pub fn wake_workers(&self) {
        self.jobs_wake.notify_one();
    }

    pub fn meta(&self, req: &HttpRequest) -> RequestMeta {
        RequestMeta::from_request(req, &self.config.http.trusted_proxies)
    }
}

/// The application, for `HttpServer` and for tests.
pub fn app(
    state: web::Data<AppState>,
    metrics: web::Data<Metrics>,
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
        .app_data(metrics)
        .app_data(
            web::JsonConfig::default()
                .limit(max_json)
                .error_handler(|err, _| ApiError::bad_request(format!("invalid JSON body: {err}")).into()),
        )
        .app_data(
            web::QueryConfig::default().error_handler(|err, _| ApiError::bad_request(err.to_string()).into()),
        )
        .app_data(
            web::PathConfig::default().error_handler(|err, _| ApiError::bad_request(err.to_string()).into()),
        )
        .wrap(from_fn(extract::rate_limit_headers))
        .wrap(from_fn(metrics::track))
        .configure(health::configure)
        .route("/api/v1/openapi.json", web::get().to(openapi_json))
        .route("/api/v1/docs", web::get().to(docs_page))
        .service(
            web::scope("/api/v1")
                .configure(auth::configure)
                .configure(account::configure)
                // Before the tenant scope, which would otherwise take `/tenants/{tenant}/servers`.
                .configure(servers::configure)
                .configure(node_api::configure)
                .configure(ssh_keys::configure)
                .configure(tenants::configure)
                .configure(nodes::configure)
                .configure(blueprints::configure)
                .configure(jobs::configure)
                .configure(node_pki::configure),
        )
        .default_service(web::to(|req: HttpRequest| async move {
            Err::<HttpResponse, _>(ApiError::new(
                actix_web::http::StatusCode::NOT_FOUND,
                "not_found",
                format!("no route for {} {}", req.method(), req.path()),
            ))
        }))
}

async fn openapi_json() -> HttpResponse {
    HttpResponse::Ok().json(crate::openapi::document())
}

async fn docs_page() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        // The page's own inline script and style only; nothing is fetched from elsewhere.
        .insert_header((
            "content-security-policy",
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'",
        ))
        .body(crate::openapi::DOCS_PAGE)
}
