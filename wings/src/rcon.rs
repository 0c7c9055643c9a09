//! A Source RCON client (the protocol Minecraft also speaks), for games whose blueprint says
//! their console is reached over RCON.
//!
//! The game is untrusted, so everything it sends is bounded: one packet's size, a whole
//! response's size, and the time to answer. (The `rcon` crate trusts the length field and
//! would allocate whatever the server claims; see docs/adr/0003-console-sockets-and-rcon.md.)

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const TYPE_AUTH: i32 = 3;
const TYPE_AUTH_RESPONSE: i32 = 2;
const TYPE_EXEC: i32 = 2;
const TYPE_RESPONSE: i32 = 0;

/// The protocol's own packet limit is 4096 bytes of body; allow generous slack for games
/// that stretch it, but never trust the length field beyond this.
const MAX_PACKET_BYTES: usize = 64 * 1024;
/// A multi-packet answer is cut off here.
pub const MAX_RESPONSE_BYTES: usize = 1024 * 1024;
/// Longest command we send (Minecraft refuses more than 1446 bytes).
pub const MAX_COMMAND_BYTES: usize = 1400;

#[derive(Debug, thiserror::Error)]
pub enum RconError {
    #[error("the game is not accepting RCON connections yet ({0})")]
    Unavailable(String),
    #[error("the game refused the RCON password")]
    AuthFailed,
    #[error("the game did not answer over RCON within {0:?}")]
    Timeout(Duration),
    #[error("RCON connection lost: {0}")]
    Io(#[from] std::io::Error),
    #[error("RCON protocol error: {0}")]
    Protocol(String),
    #[error("the command is longer than {MAX_COMMAND_BYTES} bytes, the most RCON games accept")]
    CommandTooLong,
}

#[derive(Debug)]
pub struct RconClient {
    stream: BufReader<TcpStream>,
    next_id: i32,
    timeout: Duration,
}

#[derive(Debug)]
struct Packet {
    id: i32,
    kind: i32,
    body: Vec<u8>,
}

impl RconClient {
    /// Connects and authenticates.
    pub async fn connect(
        addr: SocketAddr,
        password: &str,
        timeout: Duration,
    ) -> Result<RconClient, RconError> {
        let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| RconError::Unavailable(format!("no answer from {addr}")))?
            .map_err(|e| RconError::Unavailable(e.to_string()))?;
        stream.set_nodelay(true)?;
        let mut client = RconClient {
            stream: BufReader::new(stream),
            next_id: 1,
            timeout,
        };
        client.authenticate(password).await?;
        Ok(client)
    }

    async fn authenticate(&mut self, password: &str) -> Result<(), RconError> {
        let id = self.send(TYPE_AUTH, password.as_bytes()).await?;
        let timeout = self.timeout;
        bounded(timeout, async {
            loop {
                // Source servers send an empty response before the auth response.
                let packet = self.read_packet().await?;
                if packet.kind != TYPE_AUTH_RESPONSE {
                    continue;
                }
                return if packet.id == -1 {
                    Err(RconError::AuthFailed)
                } else if packet.id == id {
                    Ok(())
                } else {
                    Err(RconError::Protocol(format!(
                        "auth answered with id {}",
                        packet.id
                    )))
                };
            }
        })
        .await
    }

    /// Runs a command and returns its whole answer, however many packets it spans.
    pub async fn exec(&mut self, command: &str) -> Result<String, RconError> {
        if command.len() > MAX_COMMAND_BYTES {
            return Err(RconError::CommandTooLong);
        }
        let id = self.send(TYPE_EXEC, command.as_bytes()).await?;
        // The server answers in order, so the answer to an empty marker request ends the
        // command's answer.
        let marker = self.send(TYPE_RESPONSE, b"").await?;
        let timeout = self.timeout;
        bounded(timeout, async {
            let mut answer = Vec::new();
            loop {
                let packet = self.read_packet().await?;
                if packet.id == marker {
                    return Ok(String::from_utf8_lossy(&answer).into_owned());
                }
                if packet.id != id {
                    return Err(RconError::Protocol(format!(
                        "answer for request {} while waiting for {id}",
                        packet.id
                    )));
                }
                if answer.len() + packet.body.len() > MAX_RESPONSE_BYTES {
                    return Err(RconError::Protocol(format!(
                        "the answer is larger than {MAX_RESPONSE_BYTES} bytes"
                    )));
                }
                answer.extend_from_slice(&packet.body);
            }
        })
        .await
    }

    async fn send(&mut self, kind: i32, body: &[u8]) -> Result<i32, RconError> {
        let id = self.next_id;
        self.next_id = self.next_id.checked_add(1).unwrap_or(1);
        let length = i32::try_from(body.len() + 10).map_err(|_| RconError::CommandTooLong)?;
        let mut packet = Vec::with_capacity(body.len() + 14);
        packet.extend_from_slice(&length.to_le_bytes());
        packet.extend_from_slice(&id.to_le_bytes());
        packet.extend_from_slice(&kind.to_le_bytes());
        packet.extend_from_slice(body);
        packet.extend_from_slice(&[0, 0]);
        let stream = self.stream.get_mut();
        tokio::time::timeout(self.timeout, stream.write_all(&packet))
            .await
            .map_err(|_| RconError::Timeout(self.timeout))??;
        Ok(id)
    }

    async fn read_packet(&mut self) -> Result<Packet, RconError> {
        Self::read_packet_from(&mut self.stream).await
    }

    async fn read_packet_from(stream: &mut (impl tokio::io::AsyncRead + Unpin)) -> Result<Packet, RconError> {
        let length = stream.read_i32_le().await?;
        let length = usize::try_from(length)
            .ok()
            .filter(|l| (10..=MAX_PACKET_BYTES).contains(l))
            .ok_or_else(|| RconError::Protocol(format!("bad packet length {length}")))?;
        let id = stream.read_i32_le().await?;
        let kind = stream.read_i32_le().await?;
        let mut rest = vec![0; length - 8];
        stream.read_exact(&mut rest).await?;
        // The body ends with two NULs; some games send only one.
        while rest.last() == Some(&0) {
            rest.pop();
        }
        Ok(Packet { id, kind, body: rest })
    }
}

async fn bounded<T>(
    timeout: Duration,
    work: impl Future<Output = Result<T, RconError>>,
) -> Result<T, RconError> {
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| RconError::Timeout(timeout))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    async fn serve_once(reply: Vec<u8>) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut buf = [0; 64];
            let _ = socket.read(&mut buf).await;
            socket.write_all(&reply).await.unwrap();
            let _ = socket.read(&mut buf).await;
        });
        addr
    }

    fn packet(id: i32, kind: i32, body: &[u8]) -> Vec<u8> {
        let mut p = Vec::new();
        p.extend_from_slice(&(body.len() as i32 + 10).to_le_bytes());
        p.extend_from_slice(&id.to_le_bytes());
        p.extend_from_slice(&kind.to_le_bytes());
        p.extend_from_slice(body);
        p.extend_from_slice(&[0, 0]);
        p
    }

    /// Source-style: an empty response before the auth response, and an answer in two
    /// packets ended by the mirrored marker.
    #[tokio::test]
    async fn source_style_auth_and_multi_packet_answers() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (socket, _) = listener.accept().await.unwrap();
            let mut socket = BufReader::new(socket);
            let auth = RconClient::read_packet_from(&mut socket).await.unwrap();
            let mut reply = packet(auth.id, TYPE_RESPONSE, b"");
            reply.extend(packet(auth.id, TYPE_AUTH_RESPONSE, b""));
            socket.get_mut().write_all(&reply).await.unwrap();
            let command = RconClient::read_packet_from(&mut socket).await.unwrap();
            let marker = RconClient::read_packet_from(&mut socket).await.unwrap();
            let mut reply = packet(command.id, TYPE_RESPONSE, b"first half, ");
            reply.extend(packet(command.id, TYPE_RESPONSE, b"second half"));
            reply.extend(packet(marker.id, TYPE_RESPONSE, b""));
            socket.get_mut().write_all(&reply).await.unwrap();
            let _ = socket.read(&mut [0; 16]).await;
        });
        let mut client = RconClient::connect(addr, "pw", Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(client.exec("status").await.unwrap(), "first half, second half");
    }

    /// A huge or negative length field is refused without allocating what it claims.
    #[tokio::test]
    async fn lying_lengths_are_refused() {
        for length in [i32::MAX, -5] {
            let mut reply = Vec::new();
            reply.extend_from_slice(&length.to_le_bytes());
            reply.extend_from_slice(&[0; 8]);
            let addr = serve_once(reply).await;
            let err = RconClient::connect(addr, "pw", Duration::from_secs(5))
                .await
                .unwrap_err();
            assert!(matches!(err, RconError::Protocol(_)), "{length}: {err}");
        }
    }

    #[tokio::test]
    async fn a_silent_server_times_out() {
        let addr = serve_once(Vec::new()).await;
        let err = RconClient::connect(addr, "pw", Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(matches!(err, RconError::Timeout(_) | RconError::Io(_)), "{err}");
    }
}
