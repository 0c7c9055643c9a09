//! One console socket, as two tasks:
//! - the reader takes the client's messages one at a time, in order: authentication, rate
//!   limits, permission checks, then commands and power actions;
//! - the writer sends everything else: replies, console lines, status and stats.
//!
//! The writer reads the server's console broadcast at its own pace. When the client is slow,
//! the broadcast drops the oldest lines for this client alone and reports how many, which
//! the writer passes on as `throttled`; the game, wings and other clients never wait.

use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use mamba_shared::wings_api::PowerAction;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{broadcast, mpsc, watch};
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_util::sync::CancellationToken;

use super::SocketSlot;
use super::protocol::{Inbound, close, encode, inbound, outbound, permission};
use crate::config::WebsocketConfig;
use crate::server::console::{ConsoleEvent, DAEMON_PREFIX};
use crate::server::{Server, ServerError};
use crate::tokens::{Claims, Revocation, TokenError, TokenVerifier, now_secs};

/// What every socket on this node shares.
#[derive(Debug)]
pub struct SessionSettings {
    pub config: WebsocketConfig,
    pub replay_lines: usize,
    pub tokens: Arc<TokenVerifier>,
}

/// Longest command line accepted, as on the HTTP route.
const MAX_COMMAND_BYTES: usize = 4096;
/// `token expiring` is sent this long before the token expires.
const EXPIRY_WARNING: Duration = Duration::from_secs(60);
/// A client silent this long (pings included) is gone.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
const PING_INTERVAL: Duration = Duration::from_secs(30);
/// Time allowed for the close frame once the session decided to close.
const CLOSE_GRACE: Duration = Duration::from_millis(800);
/// Console events written in one batch before a flush.
const BATCH_EVENTS: usize = 256;
/// Dropped messages in a row, over the rate limit, before the client is closed.
const FLOOD_TOLERANCE: u32 = 50;

type Sink<S> = SplitSink<WebSocketStream<S>, Message>;
type Source<S> = SplitStream<WebSocketStream<S>>;

enum Control {
    Send(String),
    /// Subscribe to the console and replay its history (after auth, and on `send logs`).
    Replay,
    Stats,
    Close(u16, &'static str),
}

fn close_frame(code: u16, reason: &'static str) -> Message {
    Message::Close(Some(CloseFrame {
        code: CloseCode::from(code),
        reason: reason.into(),
    }))
}

pub async fn run<S>(
    socket: WebSocketStream<S>,
    server: Arc<Server>,
    slot: Option<SocketSlot>,
    settings: Arc<SessionSettings>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sink, source) = socket.split();
    let Some(_slot) = slot else {
        let _ = tokio::time::timeout(
            CLOSE_GRACE,
            sink.send(close_frame(
                close::TRY_AGAIN_LATER,
                "too many sockets on this server",
            )),
        )
        .await;
        return;
    };
    let (control_tx, control_rx) = mpsc::channel(64);
    let (auth_tx, auth_rx) = watch::channel(None);
    let done = CancellationToken::new();
    let mut writer = tokio::spawn(
        Writer {
            sink,
            control: control_rx,
            auth: auth_rx,
            server: server.clone(),
            settings: settings.clone(),
            done: done.clone(),
        }
        .run(),
    );
    let mut reader = Reader {
        source,
        control: control_tx,
        auth: auth_tx,
        claims: None,
        server,
        settings,
        done: done.clone(),
        limiter: RateLimiter::default(),
    };
    let outcome = reader.run().await;
    if let Some((code, reason)) = outcome
        && reader.control.try_send(Control::Close(code, reason)).is_err()
    {
        done.cancel();
    }
    drop(reader);
    if tokio::time::timeout(CLOSE_GRACE * 2, &mut writer).await.is_err() {
        done.cancel();
        let _ = writer.await;
    }
}

struct Reader<S> {
    source: Source<S>,
    control: mpsc::Sender<Control>,
    auth: watch::Sender<Option<Arc<Claims>>>,
    claims: Option<Arc<Claims>>,
    server: Arc<Server>,
    settings: Arc<SessionSettings>,
    done: CancellationToken,
    limiter: RateLimiter,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Reader<S> {
    /// Reads until the client leaves or must be closed; returns the close code to send.
    async fn run(&mut self) -> Option<(u16, &'static str)> {
        let auth_timeout = Duration::from_secs(self.settings.config.auth_timeout_secs);
        let mut auth_deadline = Some(Instant::now() + auth_timeout);
        let mut expiring_at: Option<Instant> = None;
        let mut expired_at: Option<Instant> = None;
        let mut revocations = self.settings.tokens.subscribe();
        let mut last_heard = Instant::now();
        let far = || Instant::now() + Duration::from_secs(86_400);
        loop {
            let message = tokio::select! {
                () = self.done.cancelled() => return None,
                () = tokio::time::sleep_until(auth_deadline.unwrap_or_else(far)), if auth_deadline.is_some() => {
                    return Some((close::AUTHENTICATION_FAILED, "authentication timed out"));
                }
                () = tokio::time::sleep_until(expiring_at.unwrap_or_else(far)), if expiring_at.is_some() => {
                    expiring_at = None;
                    self.send(outbound::TOKEN_EXPIRING, vec![]);
                    continue;
                }
                () = tokio::time::sleep_until(expired_at.unwrap_or_else(far)), if expired_at.is_some() => {
                    expired_at = None;
                    self.set_claims(None);
                    self.send(outbound::TOKEN_EXPIRED, vec![]);
                    auth_deadline = Some(Instant::now() + auth_timeout);
                    continue;
                }
                () = tokio::time::sleep_until(last_heard + IDLE_TIMEOUT) => {
                    return Some((close::GOING_AWAY, "no answer to pings"));
                }
                revocation = revocations.recv() => {
                    if self.revoked(revocation) {
                        return Some((close::ACCESS_REVOKED, "access revoked"));
                    }
                    continue;
                }
                message = self.source.next() => message,
            };
            last_heard = Instant::now();
            let text = match message {
                None | Some(Err(WsError::ConnectionClosed | WsError::AlreadyClosed)) => return None,
                Some(Err(WsError::Capacity(_))) => return Some((close::MESSAGE_TOO_BIG, "message too big")),
                Some(Err(e)) => {
                    tracing::debug!(server.id = %self.server.id, "console socket error: {e}");
                    return None;
                }
                Some(Ok(Message::Close(_))) => return None,
                Some(Ok(Message::Binary(_))) => {
                    return Some((close::UNSUPPORTED_DATA, "binary frames are not supported"));
                }
                Some(Ok(Message::Text(text))) => text,
                Some(Ok(_)) => continue, // ping, pong: tungstenite answers pings itself
            };
            if text.len() > self.settings.config.max_message_bytes {
                return Some((close::MESSAGE_TOO_BIG, "message too big"));
            }
            match self.limiter.check(&self.settings.config, Instant::now()) {
                Rate::Allowed => {}
                Rate::Dropped { first } => {
                    if first {
                        self.send(
                            outbound::DAEMON_ERROR,
                            vec!["too many messages: slow down; extra messages are ignored".into()],
                        );
                    }
                    continue;
                }
                Rate::Abusive => return Some((close::POLICY_VIOLATION, "message rate limit exceeded")),
            }
            let Ok(message) = serde_json::from_str::<Inbound>(&text) else {
                self.send(
                    outbound::DAEMON_ERROR,
                    vec!["messages are JSON: {\"event\", \"args\"}".into()],
                );
                continue;
            };
            if message.event == inbound::AUTH {
                if let Some(claims) = self.authenticate(&message).await {
                    auth_deadline = None;
                    let now = Instant::now();
                    let left = Duration::from_secs(claims.exp.saturating_sub(now_secs()));
                    expired_at = Some(now + left);
                    // A token with less than a minute left is already expiring.
                    expiring_at = Some(now + left.saturating_sub(EXPIRY_WARNING));
                }
                continue;
            }
            self.handle(message).await;
        }
    }

    fn revoked(&self, revocation: Result<Revocation, broadcast::error::RecvError>) -> bool {
        let Some(claims) = &self.claims else {
            return false;
        };
        match revocation {
            Ok(Revocation::User { server, user }) => server == self.server.id && user == claims.sub,
            Ok(Revocation::Token { jti }) => jti == claims.jti,
            // Missed some: check the list itself.
            Err(broadcast::error::RecvError::Lagged(_)) => self.settings.tokens.is_revoked(claims),
            Err(broadcast::error::RecvError::Closed) => false,
        }
    }

    fn set_claims(&mut self, claims: Option<Arc<Claims>>) {
        self.claims = claims.clone();
        self.auth.send_replace(claims);
    }

    async fn authenticate(&mut self, message: &Inbound) -> Option<Arc<Claims>> {
        let token = message.text_arg().unwrap_or_default();
        let claims = match self.settings.tokens.verify(token, &self.server.id) {
            Ok(claims) => claims,
            Err(TokenError::Expired) => {
                self.send(outbound::TOKEN_EXPIRED, vec![]);
                return None;
            }
            Err(e) => {
                self.send(outbound::JWT_ERROR, vec![e.to_string().into()]);
                return None;
            }
        };
        if !claims.can(permission::CONNECT) {
            self.send(
                outbound::JWT_ERROR,
                vec![format!("permission {} is required", permission::CONNECT).into()],
            );
            return None;
        }
        let first = self.claims.is_none();
        let claims = Arc::new(claims);
        self.set_claims(Some(claims.clone()));
        self.send(outbound::AUTH_SUCCESS, vec![]);
        if first {
            self.reply(Control::Replay);
        }
        Some(claims)
    }

    async fn handle(&mut self, message: Inbound) {
        let Some(claims) = self.claims.clone() else {
            self.send(outbound::JWT_ERROR, vec!["authenticate first".into()]);
            return;
        };
        let required = match message.event.as_str() {
            inbound::SEND_COMMAND => Some(permission::CONSOLE),
            inbound::SET_STATE => match message.text_arg() {
                Some("start") => Some(permission::START),
                Some("stop" | "kill") => Some(permission::STOP),
                Some("restart") => Some(permission::RESTART),
                _ => {
                    self.send(
                        outbound::DAEMON_ERROR,
                        vec!["set state takes start, stop, restart or kill".into()],
                    );
                    return;
                }
            },
            inbound::SEND_LOGS | inbound::SEND_STATS => None,
            other => {
                let other: String = other.chars().take(64).collect();
                self.send(
                    outbound::DAEMON_ERROR,
                    vec![format!("unknown event {other:?}").into()],
                );
                return;
            }
        };
        if let Some(required) = required
            && !claims.can(required)
        {
            self.send(
                outbound::DAEMON_ERROR,
                vec![format!("permission denied: {required} is required").into()],
            );
            return;
        }
        match message.event.as_str() {
            inbound::SEND_COMMAND => self.send_command(&message, &claims).await,
            inbound::SET_STATE => self.set_state(&message, &claims).await,
            inbound::SEND_LOGS => {
                self.reply(Control::Replay);
            }
            _ => {
                self.reply(Control::Stats);
            }
        }
    }

    async fn send_command(&mut self, message: &Inbound, claims: &Claims) {
        let Some(line) = message.text_arg() else {
            self.send(
                outbound::DAEMON_ERROR,
                vec!["send command takes one string".into()],
            );
            return;
        };
        if line.len() > MAX_COMMAND_BYTES || line.contains(['\n', '\r', '\0']) {
            self.send(
                outbound::DAEMON_ERROR,
                vec![format!("a command is one line of at most {MAX_COMMAND_BYTES} bytes").into()],
            );
            return;
        }
        // Awaited here, before the next message is read: one socket's commands stay in order.
        if let Err(e) = self.server.send_commands(&[line.to_string()]).await {
            self.report(e, claims).await;
        }
    }

    async fn set_state(&mut self, message: &Inbound, claims: &Claims) {
        let action = match message.text_arg() {
            Some("start") => PowerAction::Start,
            Some("stop") => PowerAction::Stop,
            Some("restart") => PowerAction::Restart,
            _ => PowerAction::Kill,
        };
        if let Err(e) = self.server.power(action) {
            self.report(e, claims).await;
        }
    }

    /// Errors the user caused are shown as they are; internal ones only to those allowed to
    /// see details.
    async fn report(&mut self, error: ServerError, claims: &Claims) {
        tracing::warn!(server.id = %self.server.id, "console request failed: {error}");
        self.send(outbound::DAEMON_ERROR, vec![error_message(&error, claims).into()]);
    }

    fn send(&self, event: &str, args: Vec<Value>) {
        self.reply(Control::Send(encode(event, args)));
    }

    /// Never waits: when the writer is this far behind, the client is not reading, and the
    /// reader must stay free to act on revocations and deadlines.
    fn reply(&self, control: Control) {
        if self.control.try_send(control).is_err() {
            tracing::debug!(server.id = %self.server.id, "console socket reply dropped: the client is not reading");
        }
    }
}

/// What a `daemon error` says: errors the user caused as they are, internal ones (Docker,
/// I/O) only to those allowed to see details.
fn error_message(error: &ServerError, claims: &Claims) -> String {
    let user_facing = matches!(
        error,
        ServerError::NotRunning | ServerError::Conflict(_) | ServerError::Rcon(_)
    );
    if user_facing || claims.can(permission::ERROR_DETAILS) {
        error.to_string()
    } else {
        GENERIC_ERROR.to_string()
    }
}

const GENERIC_ERROR: &str = "an unexpected error occurred; the node's log has the details";

enum Rate {
    Allowed,
    Dropped { first: bool },
    Abusive,
}

/// A fixed window: `messages_per_window` per `message_window_ms`.
struct RateLimiter {
    window_start: Instant,
    in_window: u32,
    dropped_in_row: u32,
}

impl Default for RateLimiter {
    fn default() -> Self {
        RateLimiter {
            window_start: Instant::now(),
            in_window: 0,
            dropped_in_row: 0,
        }
    }
}

impl RateLimiter {
    fn check(&mut self, config: &WebsocketConfig, now: Instant) -> Rate {
        if now.duration_since(self.window_start) >= Duration::from_millis(config.message_window_ms) {
            self.window_start = now;
            self.in_window = 0;
        }
        self.in_window += 1;
        if self.in_window <= config.messages_per_window {
            self.dropped_in_row = 0;
            return Rate::Allowed;
        }
        self.dropped_in_row += 1;
        if self.dropped_in_row >= FLOOD_TOLERANCE {
            Rate::Abusive
        } else {
            Rate::Dropped {
                first: self.in_window == config.messages_per_window + 1,
            }
        }
    }
}

struct Writer<S> {
    sink: Sink<S>,
    control: mpsc::Receiver<Control>,
    auth: watch::Receiver<Option<Arc<Claims>>>,
    server: Arc<Server>,
    settings: Arc<SessionSettings>,
    done: CancellationToken,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Writer<S> {
    async fn run(mut self) {
        self.serve().await;
        self.done.cancel();
    }

    async fn serve(&mut self) {
        let mut console: Option<broadcast::Receiver<ConsoleEvent>> = None;
        let mut state = self.server.subscribe_state();
        let mut stats: Option<watch::Receiver<_>> = None;
        let mut claims: Option<Arc<Claims>> = None;
        let mut ping = tokio::time::interval_at(Instant::now() + PING_INTERVAL, PING_INTERVAL);
        loop {
            let authed = claims.is_some();
            let message = tokio::select! {
                biased;
                () = self.done.cancelled() => return,
                () = self.server.deleted.cancelled() => {
                    self.close(close::SERVER_DELETED, "the server was deleted").await;
                    return;
                }
                control = self.control.recv() => match control {
                    None => return,
                    Some(Control::Send(text)) => Message::text(text),
                    Some(Control::Close(code, reason)) => {
                        self.close(code, reason).await;
                        return;
                    }
                    Some(Control::Replay) => {
                        let (receiver, history) =
                            self.server.console.subscribe_with_history(self.settings.replay_lines);
                        console = Some(receiver);
                        let status = status_frame(*state.borrow_and_update());
                        if !self.send(Message::text(status)).await {
                            return;
                        }
                        for line in history {
                            if !self.send(Message::text(encode(outbound::CONSOLE_OUTPUT, vec![(*line).into()]))).await {
                                return;
                            }
                        }
                        continue;
                    }
                    Some(Control::Stats) => match stats.as_mut().and_then(|s| s.borrow_and_update().clone()) {
                        Some(s) => Message::text(stats_frame(&s)),
                        None => continue,
                    },
                },
                changed = self.auth.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    claims = self.auth.borrow_and_update().clone();
                    if claims.is_none() {
                        console = None;
                        stats = None;
                    } else if stats.is_none() {
                        stats = Some(self.server.watch_stats());
                    }
                    continue;
                }
                event = next_event(&mut console), if authed && console.is_some() => {
                    // A burst is written as one batch and flushed once: one write for many
                    // lines instead of one each.
                    let mut event = Some(event);
                    for _ in 0..BATCH_EVENTS {
                        let Some(next) = event.take().or_else(|| try_next_event(&mut console)) else {
                            break;
                        };
                        match self.event_frame(next, claims.as_deref()) {
                            EventFrame::Send(text) => {
                                if !self.feed(Message::text(text)).await {
                                    return;
                                }
                            }
                            EventFrame::Skip => {}
                            EventFrame::Closed => {
                                self.close(close::SERVER_DELETED, "the server was deleted").await;
                                return;
                            }
                        }
                    }
                    if !self.flush().await {
                        return;
                    }
                    continue;
                }
                changed = state.changed(), if authed => {
                    if changed.is_err() {
                        return;
                    }
                    Message::text(status_frame(*state.borrow_and_update()))
                }
                changed = next_stats(&mut stats), if authed && stats.is_some() => match changed {
                    Some(s) => Message::text(stats_frame(&s)),
                    None => continue,
                },
                _ = ping.tick() => Message::Ping(Default::default()),
            };
            if !self.send(message).await {
                return;
            }
        }
    }

    fn event_frame(
        &self,
        event: Result<ConsoleEvent, broadcast::error::RecvError>,
        claims: Option<&Claims>,
    ) -> EventFrame {
        let can_see_install = claims.is_some_and(|c| c.can(permission::INSTALL_OUTPUT));
        let text = match event {
            Ok(ConsoleEvent::Line {
                line, daemon: false, ..
            }) => encode(outbound::CONSOLE_OUTPUT, vec![(*line).into()]),
            Ok(ConsoleEvent::Line {
                line, daemon: true, ..
            }) => {
                let message = line.strip_prefix(DAEMON_PREFIX).unwrap_or(&line);
                encode(outbound::DAEMON_MESSAGE, vec![message.into()])
            }
            Ok(ConsoleEvent::InstallStarted) => encode(outbound::INSTALL_STARTED, vec![]),
            Ok(ConsoleEvent::InstallOutput(line)) if can_see_install => {
                encode(outbound::INSTALL_OUTPUT, vec![(*line).into()])
            }
            Ok(ConsoleEvent::InstallOutput(_)) => return EventFrame::Skip,
            Ok(ConsoleEvent::InstallCompleted { successful }) => encode(
                outbound::INSTALL_COMPLETED,
                vec![if successful { "successful" } else { "failed" }.into()],
            ),
            Ok(ConsoleEvent::Dropped(n)) | Err(broadcast::error::RecvError::Lagged(n)) => {
                encode(outbound::THROTTLED, vec![n.into()])
            }
            Ok(ConsoleEvent::Backup { event, data }) => {
                if !claims.is_some_and(|c| c.can(permission::BACKUP_READ)) {
                    return EventFrame::Skip;
                }
                encode(event, vec![(*data).clone()])
            }
            Err(broadcast::error::RecvError::Closed) => return EventFrame::Closed,
        };
        EventFrame::Send(text)
    }

    /// Sends one message, giving up as soon as the session is over.
    async fn send(&mut self, message: Message) -> bool {
        tokio::select! {
            sent = self.sink.send(message) => sent.is_ok(),
            () = self.done.cancelled() => false,
        }
    }

    /// Queues a message without flushing; tungstenite writes once its buffer fills.
    async fn feed(&mut self, message: Message) -> bool {
        tokio::select! {
            sent = self.sink.feed(message) => sent.is_ok(),
            () = self.done.cancelled() => false,
        }
    }

    async fn flush(&mut self) -> bool {
        tokio::select! {
            flushed = self.sink.flush() => flushed.is_ok(),
            () = self.done.cancelled() => false,
        }
    }

    async fn close(&mut self, code: u16, reason: &'static str) {
        let _ = tokio::time::timeout(CLOSE_GRACE, self.sink.send(close_frame(code, reason))).await;
    }
}

enum EventFrame {
    Send(String),
    Skip,
    Closed,
}

async fn next_event(
    console: &mut Option<broadcast::Receiver<ConsoleEvent>>,
) -> Result<ConsoleEvent, broadcast::error::RecvError> {
    match console {
        Some(receiver) => receiver.recv().await,
        None => std::future::pending().await,
    }
}

/// An event already waiting, if any.
fn try_next_event(
    console: &mut Option<broadcast::Receiver<ConsoleEvent>>,
) -> Option<Result<ConsoleEvent, broadcast::error::RecvError>> {
    match console.as_mut()?.try_recv() {
        Ok(event) => Some(Ok(event)),
        Err(broadcast::error::TryRecvError::Lagged(n)) => Some(Err(broadcast::error::RecvError::Lagged(n))),
        Err(broadcast::error::TryRecvError::Closed) => Some(Err(broadcast::error::RecvError::Closed)),
        Err(broadcast::error::TryRecvError::Empty) => None,
    }
}

async fn next_stats<T: Clone>(stats: &mut Option<watch::Receiver<Option<T>>>) -> Option<T> {
    match stats {
        Some(receiver) => match receiver.changed().await {
            Ok(()) => receiver.borrow_and_update().clone(),
            Err(_) => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

fn status_frame(state: mamba_shared::wings_api::ServerState) -> String {
    let state = serde_json::to_value(state).unwrap_or(Value::Null);
    encode(outbound::STATUS, vec![state])
}

fn stats_frame(stats: &mamba_shared::wings_api::ResourceStats) -> String {
    // As a JSON string inside args, the shape Pterodactyl-style front ends parse.
    let json = serde_json::to_string(stats).unwrap_or_default();
    encode(outbound::STATS, vec![json.into()])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(permissions: &[&str]) -> Claims {
        Claims {
            sub: "u".into(),
            server: "s".into(),
            permissions: permissions.iter().map(|p| p.to_string()).collect(),
            scope: "websocket".into(),
            iat: 0,
            exp: 0,
            jti: "j".into(),
        }
    }

    #[test]
    fn internal_error_details_need_their_permission() {
        let internal = ServerError::Failed("cannot write to the console: broken pipe at /var/lib".into());
        let plain = claims(&[permission::CONNECT]);
        let admin = claims(&[permission::CONNECT, permission::ERROR_DETAILS]);
        assert_eq!(error_message(&internal, &plain), GENERIC_ERROR);
        assert!(error_message(&internal, &admin).contains("broken pipe"));
        // Errors the user can act on are always shown.
        assert_eq!(
            error_message(&ServerError::NotRunning, &plain),
            "the server is not running"
        );
    }

    #[test]
    fn the_rate_limit_drops_then_closes_a_flooding_client() {
        let config = WebsocketConfig::default();
        let mut limiter = RateLimiter::default();
        let now = Instant::now();
        let outcomes: Vec<Rate> = (0..70).map(|_| limiter.check(&config, now)).collect();
        let allowed = outcomes.iter().filter(|r| matches!(r, Rate::Allowed)).count();
        let first_drop = outcomes
            .iter()
            .position(|r| matches!(r, Rate::Dropped { first: true }));
        let abusive = outcomes.iter().position(|r| matches!(r, Rate::Abusive));
        // 70 messages within one window.
        assert_eq!(allowed, 10);
        assert_eq!(first_drop, Some(10));
        assert_eq!(abusive, Some(10 + FLOOD_TOLERANCE as usize - 1));
        // The next window starts afresh.
        let later = now + Duration::from_millis(config.message_window_ms);
        assert!(matches!(limiter.check(&config, later), Rate::Allowed));
    }
}
