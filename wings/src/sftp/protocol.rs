//! The `sftp` subsystem of one session: SFTP version 3 requests, decoded and encoded with
//! russh-sftp's wire types, answered against the server's jailed filesystem.
//!
//! Pipelining: clients keep many reads or writes in flight (OpenSSH's sftp keeps 64), so reads
//! and writes run concurrently, up to `sftp.requests_in_flight`, and their replies go out as
//! they complete (replies carry request ids; clients match them). Every other request is a
//! barrier: it waits for the reads and writes before it, runs alone, and only then are later
//! requests started. So CLOSE, RENAME, STAT and the like see every write sent before them.

use std::sync::Arc;

use bytes::Bytes;
use russh::Channel;
use russh::server::Msg;
use russh_sftp::protocol::{Packet, StatusCode, Version};
use tokio::io::AsyncReadExt as _;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use super::SftpContext;
use super::auth::Grant;
use crate::server::Server;

/// Largest SFTP packet a client may send: a 256 KiB write plus its header.
const MAX_PACKET_BYTES: u32 = 256 * 1024 + 1024;

/// The session's state shared by concurrent requests.
#[expect(dead_code, reason = "the file operations arrive with the jailed filesystem")]
pub(super) struct Sftp {
    pub(super) ctx: Arc<SftpContext>,
    pub(super) grant: Arc<Grant>,
    pub(super) server: Arc<Server>,
}

/// Serves SFTP on `channel` until the client closes it or `cancel` fires.
pub(super) async fn serve(
    ctx: Arc<SftpContext>,
    grant: Arc<Grant>,
    server: Arc<Server>,
    channel: Channel<Msg>,
    cancel: CancellationToken,
) {
    let in_flight = ctx.config.requests_in_flight;
    let sftp = Arc::new(Sftp { ctx, grant, server });
    let (mut read_half, write_half) = channel.split();
    let (reply_tx, mut reply_rx) = mpsc::channel::<Bytes>(in_flight.saturating_mul(2));
    let writer_cancel = cancel.clone();
    let writer = tokio::spawn(async move {
        loop {
            let reply = tokio::select! {
                () = writer_cancel.cancelled() => break,
                reply = reply_rx.recv() => reply,
            };
            let Some(reply) = reply else { break };
            if write_half.data_bytes(reply).await.is_err() {
                break;
            }
        }
        let _ = write_half.eof().await;
        let _ = write_half.close().await;
    });
    let permits = Arc::new(Semaphore::new(in_flight));
    let all = u32::try_from(in_flight).unwrap_or(u32::MAX);
    let mut reader = read_half.make_reader();
    loop {
        let packet = tokio::select! {
            () = cancel.cancelled() => break,
            packet = read_packet(&mut reader) => packet,
        };
        let mut bytes = match packet {
            Ok(Some(bytes)) => bytes,
            Ok(None) => break,
            Err(e) => {
                tracing::debug!(server.id = %sftp.grant.server, "SFTP session ended: {e}");
                break;
            }
        };
        let request = match Packet::try_from(&mut bytes) {
            Ok(request) => request,
            Err(e) => {
                // The length framing is intact, so the stream stays in step: answer and go on.
                tracing::debug!("undecodable SFTP request: {e}");
                if send(&reply_tx, Packet::error(0, StatusCode::BadMessage))
                    .await
                    .is_err()
                {
                    break;
                }
                continue;
            }
        };
        if matches!(request, Packet::Read(_) | Packet::Write(_)) {
            let Ok(permit) = permits.clone().acquire_owned().await else {
                break;
            };
            let (sftp, reply_tx) = (sftp.clone(), reply_tx.clone());
            tokio::spawn(async move {
                let reply = sftp.handle(request).await;
                let _ = send(&reply_tx, reply).await;
                drop(permit);
            });
        } else {
            let Ok(barrier) = permits.acquire_many(all).await else {
                break;
            };
            let reply = sftp.handle(request).await;
            drop(barrier);
            if send(&reply_tx, reply).await.is_err() {
                break;
            }
        }
    }
    // Let requests still running finish and answer, then close the channel.
    let _ = permits.acquire_many(all).await;
    drop(reply_tx);
    let _ = writer.await;
}

async fn send(tx: &mpsc::Sender<Bytes>, packet: Packet) -> Result<(), ()> {
    let bytes = Bytes::try_from(packet).map_err(|e| tracing::warn!("cannot encode an SFTP reply: {e}"))?;
    tx.send(bytes).await.map_err(|_| ())
}

/// One length-prefixed packet; `None` at a clean end of stream.
async fn read_packet(reader: &mut (impl tokio::io::AsyncRead + Unpin)) -> std::io::Result<Option<Bytes>> {
    let len = match reader.read_u32().await {
        Ok(len) => len,
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    };
    if len == 0 || len > MAX_PACKET_BYTES {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("SFTP packet of {len} bytes"),
        ));
    }
    let mut buf = vec![0; len as usize];
    reader.read_exact(&mut buf).await?;
    Ok(Some(Bytes::from(buf)))
}

impl Sftp {
    async fn handle(&self, request: Packet) -> Packet {
        let id = request.get_request_id();
        match request {
            Packet::Init(_) => Packet::Version(Version::new()),
            _ => Packet::error(id, StatusCode::OpUnsupported),
        }
    }
}
