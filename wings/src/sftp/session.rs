//! One SSH connection: logins, the `sftp` subsystem, and the watch that ends the connection
//! when the login deadline passes, access is revoked, the server is deleted or wings stops.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use russh::server::{Auth, ChannelOpenHandle, Msg, PublicKeyOffer, Session, VerifiedPublicKey};
use russh::{Channel, ChannelId, Disconnect};
use tokio::net::TcpStream;
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

use super::auth::{Credential, Grant, LoginName};
use super::{ServerSessionSlot, SftpContext};
use crate::tokens::{Revocation, now_secs};

/// Session channels one connection may open (sshfs and sftp use one).
const MAX_CHANNELS: usize = 4;

/// Told (on the channel's stderr) to a login over its server's session limit.
const SERVER_FULL: &str = "too many SFTP sessions are open for this server";

/// What an accepted login leads to.
#[derive(Clone)]
enum Login {
    Granted(Arc<Grant>),
    /// The credentials were good, but the server already has as many sessions as it may.
    ServerFull(Arc<Grant>),
}

impl Login {
    fn granted(login: &Option<Login>) -> Option<Arc<Grant>> {
        match login {
            Some(Login::Granted(grant)) => Some(grant.clone()),
            _ => None,
        }
    }
}

/// Runs one connection to its end.
pub(super) async fn run(
    ctx: Arc<SftpContext>,
    ssh: Arc<russh::server::Config>,
    socket: TcpStream,
    peer: SocketAddr,
    shutdown: CancellationToken,
) {
    let ip = super::canonical_ip(peer.ip());
    // Subscribed before any login, so a revocation that races the login is still seen.
    let mut revocations = ctx.tokens.subscribe();
    let started = now_secs();
    let (login_tx, mut login_rx) = watch::channel(None::<Login>);
    let cancel = CancellationToken::new();
    let _cancel_on_exit = cancel.clone().drop_guard();
    let handler = SshHandler {
        ctx: ctx.clone(),
        ip,
        peer,
        login_tx,
        pending: None,
        server_slot: None,
        channels: HashMap::new(),
        cancel: cancel.clone(),
    };
    let login_deadline = tokio::time::Instant::now() + Duration::from_secs(ctx.config.login_timeout_secs);
    // The version exchange is bounded by the login deadline too, so a silent client cannot
    // hold a connection slot for the idle timeout.
    let session = match tokio::time::timeout_at(
        login_deadline,
        russh::server::run_stream(ssh, socket, handler),
    )
    .await
    {
        Ok(Ok(session)) => session,
        Ok(Err(e)) => {
            tracing::debug!(%peer, "SFTP handshake failed: {e}");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "SFTP client sent no version before the login deadline");
            return;
        }
    };
    let handle = session.handle();
    let mut session = std::pin::pin!(session);
    let mut grant: Option<Arc<Grant>> = None;
    let mut deleted = CancellationToken::new();
    let reason = loop {
        tokio::select! {
            result = &mut session => {
                if let Err(e) = result {
                    tracing::debug!(%peer, "SFTP connection ended: {e}");
                }
                return;
            }
            () = tokio::time::sleep_until(login_deadline), if grant.is_none() => {
                let server_full = matches!(*login_rx.borrow(), Some(Login::ServerFull(_)));
                break if server_full { SERVER_FULL } else { "no login before the deadline" };
            }
            changed = login_rx.changed(), if grant.is_none() => {
                if changed.is_err() {
                    continue;
                }
                let login = login_rx.borrow_and_update().clone();
                if let Some(Login::ServerFull(g)) = login {
                    // The subsystem request is answered with the reason; the client hangs up
                    // itself (closing first here could lose the reason to a TCP reset).
                    tracing::info!(%peer, user = %g.user_id, server.id = %g.server, "SFTP login refused: the server's session limit is reached");
                    continue;
                }
                grant = Login::granted(&login);
                if let Some(g) = &grant {
                    match ctx.manager.get(&g.server) {
                        Some(server) => deleted = server.deleted.clone(),
                        None => break "the server no longer exists",
                    }
                    tracing::info!(%peer, user = %g.user_id, server.id = %g.server, "SFTP login");
                    crate::activity::record(
                        ctx.manager.context(),
                        &g.server,
                        mamba_shared::activity::events::SFTP_LOGIN,
                        &crate::activity::Actor::user(&g.user_id, Some(ip)),
                        serde_json::json!({}),
                    );
                }
            }
            () = deleted.cancelled(), if grant.is_some() => break "the server was deleted",
            revocation = revocations.recv(), if grant.is_some() => {
                if let Some(g) = &grant
                    && revoked(&ctx, g, started, revocation)
                {
                    break "access was revoked";
                }
            }
            () = shutdown.cancelled() => break "wings is shutting down",
        }
    };
    if let Some(g) = &grant {
        tracing::info!(%peer, user = %g.user_id, server.id = %g.server, "closing SFTP session: {reason}");
    } else {
        tracing::debug!(%peer, "closing SFTP connection: {reason}");
    }
    // Stop the subsystem first, so nothing more is done for this login, then hang up.
    cancel.cancel();
    let _ = handle
        .disconnect(Disconnect::ByApplication, reason.into(), "en".into())
        .await;
    let _ = tokio::time::timeout(Duration::from_secs(5), session).await;
}

fn revoked(
    ctx: &SftpContext,
    grant: &Grant,
    started: u64,
    revocation: Result<Revocation, broadcast::error::RecvError>,
) -> bool {
    match revocation {
        Ok(Revocation::User { server, user }) => server == grant.server && user == grant.user_id,
        Ok(Revocation::Token { .. }) => false,
        // Missed some: ask the list itself whether this user was deauthorized since we began.
        Err(broadcast::error::RecvError::Lagged(_)) => ctx
            .tokens
            .deauthorized_at(&grant.server, &grant.user_id)
            .is_some_and(|at| at >= started),
        Err(broadcast::error::RecvError::Closed) => false,
    }
}

struct SshHandler {
    ctx: Arc<SftpContext>,
    ip: IpAddr,
    peer: SocketAddr,
    login_tx: watch::Sender<Option<Login>>,
    /// The login being accepted, published once russh confirms it.
    pending: Option<Login>,
    /// This session's place in its server's session limit, held until the connection ends.
    server_slot: Option<ServerSessionSlot>,
    channels: HashMap<ChannelId, Channel<Msg>>,
    cancel: CancellationToken,
}

impl SshHandler {
    fn refuse(&self) -> Auth {
        Auth::reject()
    }

    /// Counts a failed login against the address and, when the name parses, the user name.
    fn failed(&self, login: &str) {
        self.ctx.ip_failures.fail(&self.ip);
        if let Some(name) = LoginName::parse(login) {
            self.ctx.user_failures.fail(&name.user);
        }
        tracing::info!(peer = %self.peer, login = %login.escape_debug(), "SFTP login failed");
    }

    /// Accepts good credentials. A server already at its session limit still gets
    /// `Accept`, so the client can be told why on its channel, but never a subsystem.
    fn admit(&mut self, grant: Arc<Grant>) -> Auth {
        self.server_slot = self.ctx.take_server_slot(&grant.server);
        self.pending = Some(match self.server_slot {
            Some(_) => Login::Granted(grant),
            None => Login::ServerFull(grant),
        });
        Auth::Accept
    }

    /// Asks the auth source, and checks that the granted server lives on this node.
    async fn check(&mut self, login: &LoginName, credential: Credential<'_>) -> Option<Arc<Grant>> {
        match self.ctx.auth.authenticate(login, credential, self.ip).await {
            Ok(Some(grant)) if self.ctx.manager.get(&grant.server).is_some() => Some(Arc::new(grant)),
            Ok(_) => None,
            Err(e) => {
                tracing::warn!(peer = %self.peer, "SFTP login not checked: {e}");
                None
            }
        }
    }
}

impl russh::server::Handler for SshHandler {
    type Error = russh::Error;

    async fn auth_password(&mut self, user: &str, password: &str) -> Result<Auth, Self::Error> {
        if self.ctx.ip_failures.is_blocked(&self.ip) {
            return Ok(self.refuse());
        }
        let Some(login) = LoginName::parse(user) else {
            self.failed(user);
            return Ok(self.refuse());
        };
        if self.ctx.user_failures.is_blocked(&login.user) {
            // Still counted against the address, so guessing across names is limited too.
            self.ctx.ip_failures.fail(&self.ip);
            tracing::info!(peer = %self.peer, user = %login.user.escape_debug(), "SFTP password login refused: too many failures");
            return Ok(self.refuse());
        }
        match self.check(&login, Credential::Password(password)).await {
            Some(grant) => Ok(self.admit(grant)),
            None => {
                self.failed(user);
                Ok(self.refuse())
            }
        }
    }

    async fn auth_publickey_offered(
        &mut self,
        user: &str,
        offer: PublicKeyOffer<'_>,
    ) -> Result<Auth, Self::Error> {
        if self.ctx.ip_failures.is_blocked(&self.ip) {
            return Ok(self.refuse());
        }
        // Clients offer every key they hold; an unknown one is not a failed login.
        let Some(login) = LoginName::parse(user) else {
            return Ok(self.refuse());
        };
        match self.check(&login, Credential::PublicKey(offer.public_key)).await {
            Some(_) => Ok(Auth::Accept),
            None => Ok(self.refuse()),
        }
    }

    async fn auth_publickey(&mut self, user: &str, key: VerifiedPublicKey<'_>) -> Result<Auth, Self::Error> {
        if self.ctx.ip_failures.is_blocked(&self.ip) {
            return Ok(self.refuse());
        }
        let Some(login) = LoginName::parse(user) else {
            self.failed(user);
            return Ok(self.refuse());
        };
        match self.check(&login, Credential::PublicKey(key.public_key)).await {
            Some(grant) => Ok(self.admit(grant)),
            None => {
                self.failed(user);
                Ok(self.refuse())
            }
        }
    }

    async fn auth_succeeded(&mut self, _session: &mut Session) -> Result<(), Self::Error> {
        let _ = self.login_tx.send(self.pending.take());
        Ok(())
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if self.login_tx.borrow().is_none() || self.channels.len() >= MAX_CHANNELS {
            drop(reply); // rejects
            return Ok(());
        }
        self.channels.insert(channel.id(), channel);
        reply.accept().await;
        Ok(())
    }

    async fn subsystem_request(
        &mut self,
        channel_id: ChannelId,
        name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let login = self.login_tx.borrow().clone();
        if let Some(Login::ServerFull(_)) = login
            && self.channels.remove(&channel_id).is_some()
        {
            // As sshd does with a forced command: the reason on stderr, then a clean close.
            session.channel_success(channel_id)?;
            session.extended_data(channel_id, 1, format!("{SERVER_FULL}\r\n"))?;
            session.exit_status_request(channel_id, 1)?;
            session.eof(channel_id)?;
            session.close(channel_id)?;
            return Ok(());
        }
        let grant = Login::granted(&login);
        let server = grant.as_ref().and_then(|g| self.ctx.manager.get(&g.server));
        match (name, grant, server, self.channels.remove(&channel_id)) {
            ("sftp", Some(grant), Some(server), Some(channel)) => {
                session.channel_success(channel_id)?;
                let ctx = self.ctx.clone();
                let cancel = self.cancel.child_token();
                tokio::spawn(super::protocol::serve(
                    ctx, grant, server, self.ip, channel, cancel,
                ));
            }
            _ => session.channel_failure(channel_id)?,
        }
        Ok(())
    }

    async fn shell_request(&mut self, channel: ChannelId, session: &mut Session) -> Result<(), Self::Error> {
        session.channel_failure(channel)?;
        Ok(())
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        _data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_failure(channel)?;
        Ok(())
    }

    async fn channel_eof(&mut self, channel: ChannelId, session: &mut Session) -> Result<(), Self::Error> {
        // A channel still here never started the subsystem; the subsystem closes its own
        // channel once its last reply is out.
        if self.channels.remove(&channel).is_some() {
            session.close(channel)?;
        }
        Ok(())
    }

    async fn channel_close(&mut self, channel: ChannelId, _session: &mut Session) -> Result<(), Self::Error> {
        self.channels.remove(&channel);
        Ok(())
    }
}
