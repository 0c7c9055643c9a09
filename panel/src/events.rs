//! The panel's event bus: typed events that every replica hears. In-process by default (one
//! panel); with `REDIS_URL` events also travel over Redis pub/sub to the other replicas.
//!
//! Publishing is fire-and-forget and never fails or blocks a request: local delivery is a
//! bounded broadcast (a slow subscriber loses its oldest events), and the Redis side goes
//! through a bounded outbox drained by one task. What cannot be sent is logged and counted.

use std::time::Duration;

use futures_util::StreamExt;
use prometheus::{IntCounter, IntCounterVec, Opts};
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc, watch};

use crate::ids::{TenantId, UserId};

/// Events queued per subscriber before the oldest are dropped.
const SUBSCRIBER_CAPACITY: usize = 1024;
/// Events waiting to be published to Redis before new ones are dropped.
const OUTBOX_CAPACITY: usize = 4096;
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// Something every replica may need to act on. The JSON form (tagged by `type`) is the wire
/// format between replicas, so variants and fields only ever get added.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum PanelEvent {
    /// A user's logins were revoked (everywhere, or in one tenant). Holders of live sockets
    /// or node credentials for this user must drop them.
    AccessRevoked {
        user: UserId,
        /// Set when only this tenant's access went away.
        tenant: Option<TenantId>,
        reason: RevokeReason,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RevokeReason {
    PasswordReset,
    RefreshTokenReuse,
    MemberRemoved,
}

impl PanelEvent {
    /// A short name for logs and metric labels.
    pub fn kind(&self) -> &'static str {
        match self {
            PanelEvent::AccessRevoked { .. } => "access_revoked",
        }
    }
}

/// What goes over Redis: the event and the replica that sent it, so a replica does not
/// deliver its own events twice.
#[derive(Debug, Serialize, Deserialize)]
struct Envelope {
    origin: String,
    event: PanelEvent,
}

#[derive(Debug, thiserror::Error)]
pub enum EventsError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
}

/// Counters, registered into the panel's registry by [`crate::metrics::Metrics::register_events`].
#[derive(Debug, Clone)]
pub struct EventMetrics {
    pub published: IntCounterVec,
    pub publish_failures: IntCounter,
    pub received_from_peers: IntCounterVec,
    pub handled: IntCounterVec,
}

impl EventMetrics {
    fn new() -> EventMetrics {
        // The names and labels are constants, so these cannot fail.
        let vec = |name: &str, help: &str| {
            IntCounterVec::new(Opts::new(name, help), &["kind"]).unwrap_or_else(|_| unreachable!())
        };
        EventMetrics {
            published: vec("events_published_total", "Panel events published, by kind"),
            publish_failures: IntCounter::new(
                "events_publish_failures_total",
                "Panel events that could not be sent to Redis",
            )
            .unwrap_or_else(|_| unreachable!()),
            received_from_peers: vec(
                "events_received_total",
                "Panel events received from other replicas, by kind",
            ),
            handled: vec(
                "events_handled_total",
                "Panel events seen by this replica's consumers, by kind",
            ),
        }
    }

    pub fn collectors(&self) -> Vec<Box<dyn prometheus::core::Collector>> {
        vec![
            Box::new(self.published.clone()),
            Box::new(self.publish_failures.clone()),
            Box::new(self.received_from_peers.clone()),
            Box::new(self.handled.clone()),
        ]
    }
}

/// Publishes and delivers [`PanelEvent`]s. Cheap to share; all methods take `&self`.
pub struct EventBus {
    local: broadcast::Sender<PanelEvent>,
    origin: String,
    redis: Option<RedisSide>,
    metrics: EventMetrics,
}

struct RedisSide {
    outbox: mpsc::Sender<String>,
    /// True while the subscription to the channel is live. Dropping it stops the reader.
    subscribed: watch::Receiver<bool>,
}

impl std::fmt::Debug for EventBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.redis {
            None => f.write_str("EventBus::Local"),
            Some(_) => f.write_str("EventBus::Redis"),
        }
    }
}

impl Default for EventBus {
    fn default() -> Self {
        EventBus::local()
    }
}

impl EventBus {
    /// One process only.
    pub fn local() -> EventBus {
        let (local, _) = broadcast::channel(SUBSCRIBER_CAPACITY);
        EventBus {
            local,
            origin: uuid::Uuid::now_v7().to_string(),
            redis: None,
            metrics: EventMetrics::new(),
        }
    }

    /// Shared with every replica on the channel `<prefix>:events`. Spawns the publisher and
    /// the subscriber on the current tokio runtime; both stop when the bus is dropped.
    pub async fn redis(url: &str, prefix: &str) -> Result<EventBus, EventsError> {
        let client = redis::Client::open(url)?;
        let conn = ConnectionManager::new(client.clone()).await?;
        let channel = format!("{prefix}:events");
        let mut bus = EventBus::local();
        let (outbox, outbox_rx) = mpsc::channel(OUTBOX_CAPACITY);
        let (subscribed_tx, subscribed) = watch::channel(false);
        tokio::spawn(publisher(conn, channel.clone(), outbox_rx, bus.metrics.clone()));
        tokio::spawn(subscriber(
            client,
            channel,
            bus.origin.clone(),
            bus.local.clone(),
            subscribed_tx,
            bus.metrics.clone(),
        ));
        bus.redis = Some(RedisSide { outbox, subscribed });
        Ok(bus)
    }

    pub fn is_redis(&self) -> bool {
        self.redis.is_some()
    }

    pub fn metrics(&self) -> &EventMetrics {
        &self.metrics
    }

    /// Delivers `event` to this replica's subscribers now and queues it for the others.
    /// Never fails and never waits: whatever cannot be sent is logged and counted.
    pub fn publish(&self, event: PanelEvent) {
        let kind = event.kind();
        self.metrics.published.with_label_values(&[kind]).inc();
        if let Some(redis) = &self.redis {
            let envelope = Envelope {
                origin: self.origin.clone(),
                event: event.clone(),
            };
            match serde_json::to_string(&envelope) {
                Ok(payload) => {
                    if let Err(e) = redis.outbox.try_send(payload) {
                        self.metrics.publish_failures.inc();
                        tracing::warn!(kind, error = %e, "event not sent to other replicas");
                    }
                }
                Err(e) => {
                    self.metrics.publish_failures.inc();
                    tracing::warn!(kind, error = %e, "event could not be encoded");
                }
            }
        }
        // An error only means nobody is subscribed here.
        let _ = self.local.send(event);
    }

    /// Every event published from now on, here or (with Redis) on another replica. A
    /// receiver that falls more than its capacity behind gets `Lagged` and skips ahead.
    pub fn subscribe(&self) -> broadcast::Receiver<PanelEvent> {
        self.local.subscribe()
    }

    /// Waits until events from other replicas can arrive (at once without Redis), or
    /// `timeout` passes; says whether it is so. Redis drops messages nobody listens to.
    pub async fn ready(&self, timeout: Duration) -> bool {
        let Some(redis) = &self.redis else {
            return true;
        };
        let mut subscribed = redis.subscribed.clone();
        matches!(
            tokio::time::timeout(timeout, subscribed.wait_for(|live| *live)).await,
            Ok(Ok(_))
        )
    }

    /// The consumer every panel runs today: logs each event at debug and counts it. Later
    /// consumers (socket and node deauthorisation, webhooks) subscribe the same way.
    pub fn spawn_logger(&self) {
        let mut events = self.subscribe();
        let handled = self.metrics.handled.clone();
        tokio::spawn(async move {
            loop {
                match events.recv().await {
                    Ok(event) => {
                        tracing::debug!(?event, "panel event");
                        handled.with_label_values(&[event.kind()]).inc();
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(missed = n, "event logger fell behind");
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
    }
}

/// Drains the outbox into Redis. The connection manager reconnects on its own; an event
/// that fails meanwhile is counted and dropped rather than held, so memory stays bounded.
async fn publisher(
    mut conn: ConnectionManager,
    channel: String,
    mut outbox: mpsc::Receiver<String>,
    metrics: EventMetrics,
) {
    while let Some(payload) = outbox.recv().await {
        let sent: Result<i64, _> = redis::cmd("PUBLISH")
            .arg(&channel)
            .arg(payload)
            .query_async(&mut conn)
            .await;
        if let Err(e) = sent {
            metrics.publish_failures.inc();
            tracing::warn!(error = %e, "redis unreachable; event not sent to other replicas");
        }
    }
}

/// Holds a dedicated pub/sub connection, reconnecting with backoff, and hands other
/// replicas' events to this replica's subscribers. Stops when the bus is dropped.
async fn subscriber(
    client: redis::Client,
    channel: String,
    origin: String,
    local: broadcast::Sender<PanelEvent>,
    subscribed: watch::Sender<bool>,
    metrics: EventMetrics,
) {
    let run = async {
        let mut backoff = BACKOFF_MIN;
        loop {
            match listen(&client, &channel, &origin, &local, &subscribed, &metrics).await {
                // It was live, so the next failure starts the backoff afresh.
                Ok(()) => backoff = BACKOFF_MIN,
                Err(e) => tracing::warn!(error = %e, "redis event subscription failed"),
            }
            subscribed.send_replace(false);
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    };
    tokio::select! {
        () = run => {}
        () = subscribed.closed() => {}
    }
}

/// One subscription, until its connection ends.
async fn listen(
    client: &redis::Client,
    channel: &str,
    origin: &str,
    local: &broadcast::Sender<PanelEvent>,
    subscribed: &watch::Sender<bool>,
    metrics: &EventMetrics,
) -> Result<(), redis::RedisError> {
    // Split, and the sink kept alive: dropping it ends the connection's driver.
    let (mut sink, mut messages) = client.get_async_pubsub().await?.split();
    sink.subscribe(channel).await?;
    subscribed.send_replace(true);
    while let Some(msg) = messages.next().await {
        let payload: String = match msg.get_payload() {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "unreadable event from redis");
                continue;
            }
        };
        match serde_json::from_str::<Envelope>(&payload) {
            // Already delivered here when it was published.
            Ok(envelope) if envelope.origin == origin => {}
            Ok(envelope) => {
                metrics
                    .received_from_peers
                    .with_label_values(&[envelope.event.kind()])
                    .inc();
                let _ = local.send(envelope.event);
            }
            // A newer replica may send events this one does not know yet.
            Err(e) => tracing::debug!(error = %e, "unknown event from redis ignored"),
        }
    }
    tracing::warn!("redis event subscription closed; reconnecting");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_tagged_json() {
        let event = PanelEvent::AccessRevoked {
            user: UserId::from_db("01890a5d-ac96-774b-bcce-b302099a8057".into()),
            tenant: None,
            reason: RevokeReason::PasswordReset,
        };
        let json = serde_json::to_value(&event).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "type": "access_revoked",
                "user": "01890a5d-ac96-774b-bcce-b302099a8057",
                "tenant": null,
                "reason": "password_reset",
            })
        );
        assert_eq!(serde_json::from_value::<PanelEvent>(json).unwrap(), event);
    }
}
