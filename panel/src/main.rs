//! `panel`: the Mamba control plane.

use std::io::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use actix_web::{HttpServer, web};
use anyhow::Context as _;
use clap::{Parser, Subcommand};
use mamba_panel::audit::Actor;
use mamba_panel::config::Config;
use mamba_panel::db::Db;
use mamba_panel::events::EventBus;
use mamba_panel::http::{AppState, app};
use mamba_panel::keys::MasterKey;
use mamba_panel::metrics::Metrics;
use mamba_panel::password::PasswordHasherConfig;
use mamba_panel::ratelimit::Limiter;
use mamba_panel::request_meta::RequestMeta;
use mamba_panel::users::{self, NewUser};

#[derive(Parser)]
#[command(name = "panel", version, about = "The Mamba control plane")]
struct Cli {
    /// Configuration file (TOML). Optional: PANEL_* variables, DATABASE_URL and REDIS_URL
    /// override it or stand in for it.
    #[arg(long, short, env = "PANEL_CONFIG")]
    config: Option<PathBuf>,
    /// Log as JSON lines instead of text.
    #[arg(long, env = "PANEL_LOG_JSON")]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Apply pending migrations, then serve the API.
    Serve,
    /// Apply pending migrations and exit.
    Migrate,
    /// Run job workers only (no HTTP), to scale job throughput beyond `panel serve`'s own.
    Worker {
        /// Worker loops; default `jobs.workers` (at least one).
        #[arg(long)]
        count: Option<usize>,
    },
    /// Operator commands.
    Admin {
        #[command(subcommand)]
        command: AdminCommand,
    },
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Rewrap every tenant's data key from PANEL_MASTER_KEY to PANEL_NEW_MASTER_KEY. Safe to
    /// run again after an interruption; afterwards, run the panel with the new key.
    RotateMasterKey,
    /// Create a super-admin with a generated password and print the credentials once.
    CreateUser {
        #[arg(long)]
        email: String,
        #[arg(long, default_value = "Administrator")]
        name: String,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    if cli.log_json {
        tracing_subscriber::fmt().json().with_env_filter(filter).init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }
    let config = Config::load(cli.config.as_deref()).context("loading the configuration")?;
    // Serving without the master key would fail anyway; say so before touching the database.
    let master = match cli.command {
        Command::Serve | Command::Worker { .. } => Some(MasterKey::from_env()?),
        _ => None,
    };
    let db = Db::connect(
        &config.database.url,
        config.database.pool_size,
        Duration::from_secs(config.database.acquire_timeout_secs),
    )
    .context("connecting to the database")?;
    let applied = db.migrate_blocking().context("migrating the database")?;
    for name in &applied {
        tracing::info!(migration = %name, "applied");
    }
    match cli.command {
        Command::Migrate => {
            tracing::info!(count = applied.len(), "database is up to date");
            Ok(())
        }
        Command::Serve => match master {
            Some(master) => actix_web::rt::System::new().block_on(serve(config, db, master)),
            None => Err(anyhow::anyhow!("the master key was not loaded")),
        },
        Command::Worker { count } => match master {
            Some(master) => worker(config, db, master, count),
            None => Err(anyhow::anyhow!("the master key was not loaded")),
        },
        Command::Admin {
            command: AdminCommand::CreateUser { email, name },
        } => create_admin(&config, &db, &email, &name),
        Command::Admin {
            command: AdminCommand::RotateMasterKey,
        } => rotate_master_key(&db),
    }
}

async fn serve(config: Config, db: Db, master: MasterKey) -> anyhow::Result<()> {
    let listen = config.http.listen;
    let workers = config.http.workers;
    let redis = (config.redis.url.clone(), config.redis.key_prefix.clone());
    let mut state = AppState::new(config, db, &master)?;
    if !redis.0.is_empty() {
        state.limiter = Limiter::redis(&redis.0, &redis.1)
            .await
            .context("connecting to Redis (REDIS_URL)")?;
        tracing::info!("rate limits are kept in Redis");
        state.events = EventBus::redis(&redis.0, &redis.1)
            .await
            .context("connecting to Redis for events (REDIS_URL)")?;
        tracing::info!("panel events are shared through Redis");
    }
    state.events.spawn_logger();
    mamba_panel::revocation::spawn(&state.events, state.db.clone(), state.pki.clone());
    mamba_panel::metrics_store::spawn_maintenance(state.db.clone(), &state.config.server_metrics);
    mamba_panel::activity::spawn_pruning(state.db.clone(), &state.config.activity);
    mamba_panel::jobs::spawn_pruning(
        state.db.clone(),
        mamba_panel::jobs::Retention::from_config(&state.config.jobs),
    );
    let metrics = Metrics::new()?;
    metrics.register_events(state.events.metrics())?;
    let node_listen = state.config.node_listener.listen;
    mamba_panel::node_pki::spawn_maintenance(state.pki.clone(), state.db.clone());
    mamba_panel::telemetry::spawn_heartbeat_monitor(state.db.clone(), &state.config.heartbeats);
    mamba_panel::notify::spawn_webhook_delivery(
        state.db.clone(),
        state.config.notifications.clone(),
        state.telemetry_wake.clone(),
    );
    let (stop_jobs, jobs_stopped) = tokio::sync::watch::channel(false);
    let job_workers = start_job_workers(&state, state.config.jobs.workers, jobs_stopped);
    let state = web::Data::new(state);
    let metrics = web::Data::new(metrics);
    let node_listener = std::net::TcpListener::bind(node_listen)
        .with_context(|| format!("binding {node_listen} (node_listener)"))?;
    let nodes = mamba_panel::http::node_pki::node_server(state.clone(), node_listener)?;
    tracing::info!(%listen, %node_listen, ca = %state.pki.ca.fingerprint(), "panel listening");
    let api = HttpServer::new(move || app(state.clone(), metrics.clone()))
        .workers(workers)
        .bind(listen)
        .with_context(|| format!("binding {listen}"))?
        .run();
    // Either server stopping (a signal stops both) ends the panel; then the job workers hand
    // their running jobs back to the queue.
    let served = futures_util::future::try_join(api, nodes).await;
    let _ = stop_jobs.send(true);
    for handle in job_workers {
        let _ = handle.await;
    }
    served?;
    Ok(())
}

/// The job workers of this process, running the provisioning steps.
fn start_job_workers(
    state: &AppState,
    count: usize,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let settings = mamba_panel::jobs::Settings::from_config(&state.config.jobs);
    let handler = std::sync::Arc::new(mamba_panel::provisioning::Provisioner::from_state(state));
    if count > 0 {
        tracing::info!(count, "starting job workers");
    }
    mamba_panel::jobs::worker::spawn(
        state.db.clone(),
        settings,
        handler,
        count,
        stop,
        state.jobs_wake.clone(),
    )
}

/// `panel worker`: job workers and the node certificate upkeep, no HTTP; stops on SIGINT or
/// SIGTERM after handing running jobs back.
fn worker(config: Config, db: Db, master: MasterKey, count: Option<usize>) -> anyhow::Result<()> {
    let count = count.unwrap_or(config.jobs.workers).max(1);
    let state = AppState::new(config, db, &master)?;
    // actix's runtime, because the certificate upkeep spawns onto it (as in `serve`).
    actix_web::rt::System::new().block_on(async move {
        mamba_panel::node_pki::spawn_maintenance(state.pki.clone(), state.db.clone());
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let handles = start_job_workers(&state, count, stopped);
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("stopping job workers");
        let _ = stop.send(true);
        for handle in handles {
            let _ = handle.await;
        }
        Ok(())
    })
}

fn create_admin(config: &Config, db: &Db, email: &str, name: &str) -> anyhow::Result<()> {
    let email = users::normalise_email(email).map_err(|m| anyhow::anyhow!("--email {m}"))?;
    let name = users::check_display_name(name).map_err(|m| anyhow::anyhow!("--name {m}"))?;
    let password = mamba_panel::tokens::random_token(18)?;
    let hasher = PasswordHasherConfig::new(&config.auth)?;
    let mut conn = db.get_blocking()?;
    let user = users::create(
        &mut conn,
        NewUser {
            email: email.clone(),
            display_name: name,
            password_hash: hasher.hash(&password)?,
            email_verified: true,
            is_super_admin: true,
        },
        &Actor::System,
        &RequestMeta::system(),
    )
    .context("creating the user")?;
    // The one place the password is ever shown; it is not logged.
    let mut out = std::io::stdout().lock();
    writeln!(out, "created super-admin {}", user.id)?;
    writeln!(out, "email:    {email}")?;
    writeln!(out, "password: {password}")?;
    Ok(())
}

fn rotate_master_key(db: &Db) -> anyhow::Result<()> {
    let old = MasterKey::from_env().context("the current key")?;
    let new_text = std::env::var("PANEL_NEW_MASTER_KEY").context("PANEL_NEW_MASTER_KEY is not set")?;
    let new = MasterKey::from_base64(&new_text).context("PANEL_NEW_MASTER_KEY")?;
    let mut conn = db.get_blocking()?;
    let count = mamba_panel::secrets::rotate_master_key(&mut conn, &old, &new)?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "rewrapped {count} tenant data keys under master key {}",
        new.id()
    )?;
    writeln!(
        out,
        "now set PANEL_MASTER_KEY to the new key and restart every panel"
    )?;
    Ok(())
}
