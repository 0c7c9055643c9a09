//! The console socket: `GET /api/servers/{id}/ws`.
//!
//! actix-web answers the HTTP upgrade; from then on the connection's raw bytes are handed to
//! tokio-tungstenite, which speaks the WebSocket protocol, and the session runs on the main
//! runtime beside the server's actor. The bridge is two bounded byte channels, so a client
//! that stops reading holds at most a few chunks in wings, never an unbounded backlog.

pub mod protocol;
mod session;

use std::convert::Infallible;
use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use actix_web::http::{StatusCode, header};
use actix_web::{HttpRequest, HttpResponse, web};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_util::io::{CopyToBytes, SinkWriter, StreamReader};
use tokio_util::sync::PollSender;

use crate::api::AppState;
use crate::api::error::ApiError;
use crate::server::Server;

pub use self::session::SessionSettings;

/// Chunks buffered each way between actix and the WebSocket protocol.
const BRIDGE_CHUNKS: usize = 8;

/// Holds one of a server's socket places; gives it back when dropped.
pub struct SocketSlot(Arc<Server>);

impl SocketSlot {
    fn acquire(server: &Arc<Server>, max: usize) -> Option<SocketSlot> {
        let before = server.sockets.fetch_add(1, Ordering::SeqCst);
        let slot = SocketSlot(server.clone());
        (before < max).then_some(slot)
    }
}

impl Drop for SocketSlot {
    fn drop(&mut self) {
        self.0.sockets.fetch_sub(1, Ordering::SeqCst);
    }
}

pub async fn connect(
    req: HttpRequest,
    payload: web::Payload,
    id: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let key = check_upgrade(&req, &state.websocket.config.allowed_origins)?;
    let server = state.server(&id)?;
    let slot = SocketSlot::acquire(&server, state.websocket.config.max_sockets_per_server);

    let (inbound_tx, inbound_rx) = mpsc::channel::<io::Result<Bytes>>(BRIDGE_CHUNKS);
    let (outbound_tx, outbound_rx) = mpsc::channel::<Bytes>(BRIDGE_CHUNKS);
    // The request payload is tied to this actix worker, so it is pumped from here.
    actix_web::rt::spawn(async move {
        let mut payload = payload;
        while let Some(chunk) = payload.next().await {
            let chunk = chunk.map_err(|e| io::Error::new(io::ErrorKind::ConnectionAborted, e.to_string()));
            let failed = chunk.is_err();
            if inbound_tx.send(chunk).await.is_err() || failed {
                break;
            }
        }
    });
    let writer = SinkWriter::new(CopyToBytes::new(
        PollSender::new(outbound_tx).sink_map_err(|_| io::Error::from(io::ErrorKind::BrokenPipe)),
    ));
    let io = tokio::io::join(StreamReader::new(ReceiverStream::new(inbound_rx)), writer);
    let settings = state.websocket.clone();
    state.runtime.spawn(async move {
        let frame_limit = settings.config.max_message_bytes * 4;
        let config = WebSocketConfig::default()
            .max_message_size(Some(frame_limit))
            .max_frame_size(Some(frame_limit))
            .write_buffer_size(16 * 1024)
            .max_write_buffer_size(256 * 1024);
        let socket = WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await;
        session::run(socket, server, slot, settings).await;
    });

    Ok(HttpResponse::SwitchingProtocols()
        .upgrade("websocket")
        .insert_header((header::SEC_WEBSOCKET_ACCEPT, derive_accept_key(key.as_bytes())))
        .streaming(ReceiverStream::new(outbound_rx).map(Ok::<Bytes, Infallible>)))
}

/// Checks the upgrade request and returns its `Sec-WebSocket-Key`.
fn check_upgrade(req: &HttpRequest, allowed_origins: &[String]) -> Result<String, ApiError> {
    let headers = req.headers();
    let has = |name: header::HeaderName, token: &str| {
        headers.get_all(name).any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    if !has(header::UPGRADE, "websocket") || !has(header::CONNECTION, "upgrade") {
        return Err(ApiError::new(
            StatusCode::UPGRADE_REQUIRED,
            "upgrade_required",
            "this route speaks WebSocket only",
        ));
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .and_then(|v| v.to_str().ok())
        != Some("13")
    {
        return Err(ApiError::new(
            StatusCode::UPGRADE_REQUIRED,
            "upgrade_required",
            "only WebSocket version 13 is supported",
        ));
    }
    if let Some(origin) = headers.get(header::ORIGIN)
        && !allowed_origins.is_empty()
        && !allowed_origins.iter().any(|o| origin.as_bytes() == o.as_bytes())
    {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "origin_not_allowed",
            "this origin may not open console sockets",
        ));
    }
    headers
        .get(header::SEC_WEBSOCKET_KEY)
        .and_then(|v| v.to_str().ok())
        .filter(|k| !k.is_empty() && k.len() <= 64)
        .map(str::to_string)
        .ok_or_else(|| ApiError::bad_request("missing Sec-WebSocket-Key"))
}
