//! The notification hook: every stored server event is POSTed as JSON to
//! `notifications.webhook_url`, signed, from a background task.
//!
//! Delivery is at least once. The event's row is the queue (`server_events.notified_at` is
//! NULL until a 2xx answer), so nothing is lost across panel restarts, ingest never waits for
//! the receiver, and a failed attempt is retried with exponential backoff. Receivers dedupe on
//! the event's `id`.
//!
//! Signature: header `X-Mamba-Signature: t=<unix seconds>,v1=<hex>` where the hex is
//! HMAC-SHA256 under `notifications.webhook_secret` of `"<t>.<raw body>"`.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

use crate::config::NotificationsConfig;
use crate::db::Db;
use crate::telemetry::{self, WebhookEvent};

pub const SIGNATURE_HEADER: &str = "x-mamba-signature";

/// Events handled per database round trip.
const BATCH: i64 = 100;
/// How often the task looks for due retries when nothing wakes it.
const POLL: Duration = Duration::from_secs(5);

/// The `X-Mamba-Signature` value for `body` at `timestamp` (unix seconds).
pub fn sign(secret: &str, timestamp: i64, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let mut ctx = ring::hmac::Context::with_key(&key);
    ctx.update(timestamp.to_string().as_bytes());
    ctx.update(b".");
    ctx.update(body);
    format!("t={timestamp},v1={}", hex::encode(ctx.sign().as_ref()))
}

/// Checks a signature header made by [`sign`] (for receivers and tests), in constant time.
pub fn verify(secret: &str, header: &str, body: &[u8]) -> bool {
    let mut t = None;
    let mut v1 = None;
    for part in header.split(',') {
        match part.split_once('=') {
            Some(("t", v)) => t = v.parse::<i64>().ok(),
            Some(("v1", v)) => v1 = hex::decode(v).ok(),
            _ => {}
        }
    }
    let (Some(t), Some(v1)) = (t, v1) else {
        return false;
    };
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let mut msg = t.to_string().into_bytes();
    msg.push(b'.');
    msg.extend_from_slice(body);
    ring::hmac::verify(&key, &msg, &v1).is_ok()
}

/// Delay before attempt `attempts + 1`: 1 s doubling, capped at `max_backoff_secs`.
fn backoff(attempts: i64, max_backoff_secs: u64) -> Duration {
    let exp = u32::try_from(attempts.clamp(0, 20)).unwrap_or(20);
    Duration::from_secs(2u64.saturating_pow(exp).min(max_backoff_secs.max(1)))
}

fn client(config: &NotificationsConfig) -> Result<reqwest::Client, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .timeout(Duration::from_secs(config.timeout_secs.max(1)))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| e.to_string())
}

async fn deliver(client: &reqwest::Client, config: &NotificationsConfig, event: &WebhookEvent) -> bool {
    let Ok(body) = serde_json::to_vec(event) else {
        return false;
    };
    let signature = sign(&config.webhook_secret, crate::db::now_ms() / 1000, &body);
    let sent = client
        .post(&config.webhook_url)
        .header("content-type", "application/json")
        .header(SIGNATURE_HEADER, signature)
        .header("x-mamba-event-id", event.event.id.as_str())
        .body(body)
        .send()
        .await;
    match sent {
        Ok(r) if r.status().is_success() => true,
        Ok(r) => {
            tracing::warn!(event.id = %event.event.id, status = r.status().as_u16(), "webhook refused an event; will retry");
            false
        }
        Err(e) => {
            tracing::warn!(event.id = %event.event.id, error = %e, "webhook unreachable; will retry");
            false
        }
    }
}

/// Starts the delivery task when a webhook is configured. `wake` is notified after each
/// ingest that stored events.
pub fn spawn_webhook_delivery(db: Db, config: NotificationsConfig, wake: Arc<Notify>) {
    if config.webhook_url.is_empty() {
        return;
    }
    let client = match client(&config) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot build the webhook client; events are stored but not sent");
            return;
        }
    };
    tokio::spawn(async move {
        loop {
            let now = crate::db::now_ms();
            let due = db
                .run(move |conn| telemetry::due_notifications(conn, now, BATCH))
                .await;
            let due = match due {
                Ok(due) => due,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read pending webhook events");
                    Vec::new()
                }
            };
            let full = i64::try_from(due.len()).unwrap_or(0) >= BATCH;
            for event in due {
                let delivered = deliver(&client, &config, &event).await;
                let id = event.event.id.clone();
                let max = config.max_backoff_secs;
                let marked = db
                    .run(move |conn| {
                        let attempts = telemetry::notify_attempts(conn, &id)?;
                        let now = crate::db::now_ms();
                        let delay = i64::try_from(backoff(attempts, max).as_millis()).unwrap_or(i64::MAX);
                        telemetry::mark_notification(conn, &id, delivered, now.saturating_add(delay), now)
                    })
                    .await;
                if let Err(e) = marked {
                    // Not marked: it is sent again later, which at-least-once allows.
                    tracing::warn!(error = %e, "cannot record a webhook delivery");
                }
            }
            if !full {
                tokio::select! {
                    () = wake.notified() => {}
                    () = tokio::time::sleep(POLL) => {}
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_verify_and_any_change_breaks_them() {
        let sig = sign("s3cret", 1_700_000_000, b"{\"a\":1}");
        assert!(verify("s3cret", &sig, b"{\"a\":1}"));
        assert!(!verify("s3cret", &sig, b"{\"a\":2}"));
        assert!(!verify("other", &sig, b"{\"a\":1}"));
        assert!(!verify("s3cret", "t=1,v1=00", b"{\"a\":1}"));
        assert!(!verify("s3cret", "garbage", b""));
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        assert_eq!(backoff(0, 600), Duration::from_secs(1));
        assert_eq!(backoff(3, 600), Duration::from_secs(8));
        assert_eq!(backoff(40, 600), Duration::from_secs(600));
    }
}
