//! `wings`: the Mamba node daemon.

use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use actix_web::{App, HttpServer, web};
use anyhow::Context as _;
use clap::{Parser, Subcommand};
use mamba_wings::api::{self, AppState};
use mamba_wings::config::{Config, SftpAuthMode};
use mamba_wings::node_identity::NodeIdentity;
use mamba_wings::server::manager::Manager;
use mamba_wings::sftp::auth::{AuthSource, StaticCredentials, hash_password};
use mamba_wings::sftp::panel_auth::PanelAuthSource;
use mamba_wings::sftp::{SftpContext, SftpServer, host_key_path};
use mamba_wings::system::SystemProbe;
use mamba_wings::tokens::TokenVerifier;
use mamba_wings::websocket::SessionSettings;

#[derive(Parser)]
#[command(
    name = "wings",
    version,
    about = "The Mamba node daemon: runs game servers in Docker"
)]
struct Cli {
    /// Configuration file (TOML). WINGS_* environment variables override it.
    #[arg(long, short, env = "WINGS_CONFIG", default_value = "/etc/mamba/wings.toml")]
    config: PathBuf,
    /// Log as JSON lines instead of text.
    #[arg(long, env = "WINGS_LOG_JSON")]
    log_json: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon (the default).
    Serve,
    /// Check the configuration and print it with defaults filled in (secrets are hidden).
    CheckConfig,
    /// Enroll this node with the panel: trade a one-time token for a certificate, stored under
    /// `<system.data_dir>/pki/`.
    Enroll {
        /// The panel's node listener, e.g. https://panel.example:8443
        #[arg(long)]
        panel: String,
        /// The enrollment token the panel gave for this node (valid once, for 15 minutes).
        // Tokens are base64url, so about one in 64 begins with '-'.
        #[arg(
            long,
            env = "WINGS_ENROLL_TOKEN",
            hide_env_values = true,
            allow_hyphen_values = true
        )]
        token: String,
    },
    /// Hash a password read from standard input for the SFTP credential file (argon2id).
    HashPassword,
}

fn main() -> anyhow::Result<()> {
    // ring is the process-wide TLS provider; reqwest (S3 backups) relies on it being set.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    if cli.log_json {
        tracing_subscriber::fmt().json().with_env_filter(filter).init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }
    if let Some(Command::HashPassword) = cli.command {
        let mut password = String::new();
        std::io::stdin().read_line(&mut password)?;
        let password = password.trim_end_matches(['\r', '\n']);
        anyhow::ensure!(!password.is_empty(), "give the password on standard input");
        let hash = hash_password(password).map_err(anyhow::Error::msg)?;
        // The hash is the command's output, for the credential file.
        writeln!(std::io::stdout(), "{hash}")?;
        return Ok(());
    }
    let config = Config::load(&cli.config).with_context(|| format!("config {}", cli.config.display()))?;
    match cli.command.unwrap_or(Command::Serve) {
        Command::HashPassword => Ok(()),
        Command::CheckConfig => {
            let mut shown = config.clone();
            if !shown.backups.s3.secret_access_key.is_empty() {
                shown.backups.s3.secret_access_key = "<hidden>".into();
            }
            eprint!("{}", toml::to_string_pretty(&shown)?);
            Ok(())
        }
        Command::Serve => serve(config),
        Command::Enroll { panel, token } => enroll(&config, &panel, &token),
    }
}

fn enroll(config: &Config, panel: &str, token: &str) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let identity = runtime.block_on(NodeIdentity::enroll(&config.system.data_dir, panel, token))?;
    eprintln!(
        "enrolled as node {}; certificate and keys are in {}",
        identity.record.node_id,
        mamba_wings::node_identity::pki_dir(&config.system.data_dir).display()
    );
    Ok(())
}

fn serve(config: Config) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("wings")
        .build()?;
    runtime.block_on(async move {
        let listen = config.api.listen;
        let workers = config.api.workers;
        let max_json = config.api.max_json_bytes;
        let public_listen = config.api.public_listen;
        // The panel's API is served only over mutual TLS, so there is nothing to serve
        // before the node holds a certificate from the panel's CA.
        let Some(identity) = NodeIdentity::load(&config.system.data_dir)?.map(Arc::new) else {
            anyhow::bail!(
                "this node is not enrolled: run `wings enroll --panel URL --token TOKEN` first (the panel's API is served only over mutual TLS)"
            );
        };
        if config.api.has_legacy_token() {
            tracing::warn!("api.token is ignored and can be removed: the panel authenticates with its certificate");
        }
        let mut token_config = config.tokens.clone();
        tracing::info!(node = %identity.record.node_id, "enrolled with the panel");
        // The key the panel handed over at enrollment, unless the operator names another.
        if token_config.panel_public_key_file.is_empty() {
            token_config.panel_public_key_file = identity.token_key_file().display().to_string();
        }
        identity.clone().spawn_renewal();
        let tokens = Arc::new(TokenVerifier::new(&token_config, &config.system.data_dir)?);
        let websocket = Arc::new(SessionSettings {
            config: config.websocket.clone(),
            replay_lines: config.console.replay_lines,
            tokens: tokens.clone(),
        });
        let sftp_config = config.sftp.clone();
        let host_key = host_key_path(&config.sftp, &config.system.data_dir);
        let pull_client = mamba_wings::files::pull::client(&config.files)?;
        let data_dir = config.system.data_dir.clone();
        let manager = Manager::start(config).await?;
        let shutdown = tokio_util::sync::CancellationToken::new();
        mamba_wings::reporter::spawn(identity.clone(), manager.clone(), &data_dir, shutdown.clone())?;
        tracing::info!(panel = %identity.record.panel_url, "reporting heartbeats, samples and events to the panel");
        let sftp_task = if sftp_config.enabled {
            let auth: Arc<dyn AuthSource> = match sftp_config.auth {
                SftpAuthMode::Auto | SftpAuthMode::Panel => {
                    tracing::info!("SFTP logins are checked by the panel");
                    Arc::new(PanelAuthSource::new(
                        &identity,
                        tokens.clone(),
                        Duration::from_secs(sftp_config.panel_cache_secs),
                    )?)
                }
                SftpAuthMode::File => {
                    let credentials = (!sftp_config.credentials_file.is_empty())
                        .then(|| PathBuf::from(&sftp_config.credentials_file));
                    Arc::new(StaticCredentials::open(credentials)?)
                }
            };
            let ctx = SftpContext::new(sftp_config, manager.clone(), auth, tokens.clone());
            let sftp = SftpServer::bind(ctx, host_key).await?;
            tracing::info!(listen = %sftp.local_addr()?, "SFTP is listening");
            Some(tokio::spawn(sftp.serve(shutdown.clone())))
        } else {
            None
        };
        let state = web::Data::new(AppState {
            manager: manager.clone(),
            runtime: tokio::runtime::Handle::current(),
            system: SystemProbe::default(),
            tokens,
            websocket,
            pull_client,
        });
        let app_state = state.clone();
        let make_server = move || {
            let state = app_state.clone();
            HttpServer::new(move || {
                App::new()
                    .app_data(state.clone())
                    .configure(|cfg| api::configure(cfg, max_json))
            })
            .workers(workers)
            .disable_signals()
            .shutdown_timeout(5)
        };
        let server = make_server()
            .on_connect(api::on_connect)
            .bind_rustls_0_23(listen, identity.panel_only_server_config()?)
            .with_context(|| format!("cannot listen on {listen}"))?
            .run();
        tracing::info!(%listen, version = env!("CARGO_PKG_VERSION"), "wings is listening (mutual TLS, panel only)");
        let public = make_server()
            .bind(public_listen)
            .with_context(|| format!("cannot listen on {public_listen}"))?
            .run();
        tracing::info!(listen = %public_listen, "public listener (console sockets, signed URLs) is listening");
        let handle = server.handle();
        let public_handle = public.handle();
        let server_task = tokio::spawn(server);
        let public_task = tokio::spawn(public);
        wait_for_shutdown_signal().await?;
        // Game servers keep running: their containers do not depend on this process.
        tracing::info!("shutting down; game servers keep running");
        shutdown.cancel();
        handle.stop(true).await;
        public_handle.stop(true).await;
        let _ = public_task.await;
        let _ = server_task.await;
        if let Some(task) = sftp_task {
            let _ = task.await;
        }
        drop::<Arc<Manager>>(manager);
        Ok(())
    })
}

async fn wait_for_shutdown_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_enrollment_token_may_begin_with_a_hyphen() {
        let cli = Cli::try_parse_from([
            "wings",
            "enroll",
            "--panel",
            "https://p:8091",
            "--token",
            "-Pq_x.ab",
        ])
        .map_err(|e| e.to_string());
        match cli.map(|cli| cli.command) {
            Ok(Some(Command::Enroll { token, .. })) => assert_eq!(token, "-Pq_x.ab"),
            Ok(_) => panic!("parsed as another command"),
            Err(e) => panic!("{e}"),
        }
    }
}
