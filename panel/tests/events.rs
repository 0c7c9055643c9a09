//! The panel event bus: in-process delivery, delivery between replicas through one real
//! Redis, and revocations through the HTTP API publishing `AccessRevoked`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::test;
use common::{TestDb, post, send};
use mamba_panel::events::{EventBus, PanelEvent, RevokeReason};
use mamba_panel::http::app;
use mamba_panel::ids::UserId;
use serde_json::json;
use tokio::sync::broadcast;

both_backends!(
    refresh_token_reuse_publishes_access_revoked,
    a_revocation_on_one_replica_reaches_the_other_through_redis,
);

const IP: &str = "198.51.100.60";
const PASSWORD: &str = "event test passphrase";
const WAIT: Duration = Duration::from_secs(10);

/// An event for the n-th made-up user (ids are checked when events are decoded).
fn revoked(n: u8) -> PanelEvent {
    PanelEvent::AccessRevoked {
        user: UserId::from_db(format!("00000000-0000-7000-8000-{n:012}")),
        tenant: None,
        reason: RevokeReason::PasswordReset,
    }
}

/// The next event, failing the test if none comes within `WAIT`.
async fn next(rx: &mut broadcast::Receiver<PanelEvent>) -> PanelEvent {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("no event arrived in time")
        .unwrap()
}

#[actix_web::test]
async fn the_local_bus_delivers_within_one_instance() {
    let bus = EventBus::local();
    assert!(!bus.is_redis());
    assert!(bus.ready(WAIT).await);
    let mut a = bus.subscribe();
    let mut b = bus.subscribe();
    bus.publish(revoked(1));
    assert_eq!(next(&mut a).await, revoked(1));
    assert_eq!(next(&mut b).await, revoked(1));
    // Without subscribers publishing is still fine.
    drop((a, b));
    bus.publish(revoked(2));
}

#[actix_web::test]
async fn two_buses_sharing_redis_hear_each_other() {
    let Some(url) = common::redis_url() else { return };
    let prefix = format!("mamba-test:{}", uuid::Uuid::new_v4());
    let a = EventBus::redis(&url, &prefix).await.unwrap();
    let b = EventBus::redis(&url, &prefix).await.unwrap();
    let other = EventBus::redis(&url, &format!("{prefix}-other")).await.unwrap();
    assert!(a.is_redis());
    // Redis drops messages nobody is subscribed to yet: wait for the subscriptions.
    for bus in [&a, &b, &other] {
        assert!(bus.ready(WAIT).await, "the redis subscription never came up");
    }
    let mut on_a = a.subscribe();
    let mut on_b = b.subscribe();
    let mut on_other = other.subscribe();

    a.publish(revoked(1));
    assert_eq!(next(&mut on_b).await, revoked(1));
    assert_eq!(next(&mut on_a).await, revoked(1));
    b.publish(revoked(2));
    assert_eq!(next(&mut on_a).await, revoked(2), "A saw u1 once, then u2");
    assert_eq!(next(&mut on_b).await, revoked(2), "B saw u1 once, then u2");

    let from_peers = |bus: &EventBus| {
        bus.metrics()
            .received_from_peers
            .with_label_values(&["access_revoked"])
            .get()
    };
    assert_eq!((from_peers(&a), from_peers(&b)), (1, 1));
    assert_eq!(a.metrics().publish_failures.get(), 0);

    // A different prefix is a different channel: `other` heard nothing, only its own.
    other.publish(revoked(3));
    assert_eq!(next(&mut on_other).await, revoked(3));
    assert_eq!(from_peers(&other), 0);
}

/// A private redis-server on a free port, for a test that stops and restarts it.
struct OwnRedis {
    child: std::process::Child,
    port: u16,
}

impl OwnRedis {
    fn start(port: u16) -> OwnRedis {
        let child = std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        common::wait_until(WAIT, "redis-server accepts connections", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        OwnRedis { child, port }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

#[actix_web::test]
async fn publishing_survives_redis_going_away_and_the_bus_reconnects() {
    // Same gate as the shared Redis: under CI this must run, not skip.
    if common::redis_url().is_none() {
        return;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut redis = OwnRedis::start(port);
    let a = EventBus::redis(&redis.url(), "mamba-test").await.unwrap();
    let b = EventBus::redis(&redis.url(), "mamba-test").await.unwrap();
    assert!(a.ready(WAIT).await && b.ready(WAIT).await);
    let mut on_a = a.subscribe();
    let mut on_b = b.subscribe();

    redis.stop();
    // Publishing neither fails nor waits, and this replica still hears its own event.
    a.publish(revoked(1));
    assert_eq!(next(&mut on_a).await, revoked(1));
    tokio::time::timeout(WAIT, async {
        while a.metrics().publish_failures.get() == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the failed publish was never counted");

    let _redis = OwnRedis::start(port);
    // Each round publishes a fresh event until one crosses: that needs A's connection
    // and B's subscription both back.
    let crossed = tokio::time::timeout(Duration::from_secs(30), async {
        for n in 2.. {
            a.publish(revoked(n));
            if let Ok(Ok(event)) = tokio::time::timeout(Duration::from_millis(200), on_b.recv()).await {
                return event;
            }
        }
        unreachable!()
    })
    .await
    .expect("the buses never reconnected");
    assert!(matches!(crossed, PanelEvent::AccessRevoked { .. }));
}

/// Makes a verified user in the database and logs it in as an API client; returns its id
/// and refresh token.
async fn api_login<S, B>(t: &TestDb, svc: &S, email: &str) -> (String, String)
where
    S: common::TestApp<B>,
    B: actix_web::body::MessageBody,
{
    let hash = t.state().hasher.hash(PASSWORD).unwrap();
    let mut conn = t.db.get_blocking().unwrap();
    let user = mamba_panel::users::create(
        &mut conn,
        mamba_panel::users::NewUser {
            email: email.into(),
            display_name: "events".into(),
            password_hash: hash,
            email_verified: true,
            is_super_admin: false,
        },
        &mamba_panel::audit::Actor::System,
        &mamba_panel::request_meta::RequestMeta::system(),
    )
    .unwrap();
    drop(conn);
    let a = send(
        svc,
        post(
            "/api/v1/auth/login",
            json!({"email": email, "password": PASSWORD, "client": "api"}),
            IP,
        )
        .to_request(),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{a:?}");
    let refresh = a.body["tokens"]["refresh_token"].as_str().unwrap().to_string();
    (user.id.to_string(), refresh)
}

/// Spends `refresh` once, then presents it again: the reuse revokes the login.
async fn reuse<S, B>(svc: &S, refresh: &str)
where
    S: common::TestApp<B>,
    B: actix_web::body::MessageBody,
{
    let body = json!({"refresh_token": refresh});
    let a = send(svc, post("/api/v1/auth/token", body.clone(), IP).to_request()).await;
    assert_eq!(a.status, StatusCode::OK, "{a:?}");
    let a = send(svc, post("/api/v1/auth/token", body, IP).to_request()).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED, "{a:?}");
}

fn reuse_event(user: &str) -> PanelEvent {
    PanelEvent::AccessRevoked {
        user: UserId::from_db(user.into()),
        tenant: None,
        reason: RevokeReason::RefreshTokenReuse,
    }
}

async fn refresh_token_reuse_publishes_access_revoked(t: TestDb) {
    let state = t.state();
    let mut events = state.events.subscribe();
    let svc = test::init_service(app(state, common::metrics())).await;
    let (user, refresh) = api_login(&t, &svc, "reuse@events.test").await;
    reuse(&svc, &refresh).await;
    // Published before the answer was sent; a normal rotation published nothing.
    assert_eq!(events.try_recv().unwrap(), reuse_event(&user));
    assert!(events.try_recv().is_err());
}

async fn a_revocation_on_one_replica_reaches_the_other_through_redis(t: TestDb) {
    let Some(url) = common::redis_url() else { return };
    let config = t.config();
    let a = t.redis_state_with(config.clone(), &url).await;
    let b = t.redis_state_with(config, &url).await;
    assert!(b.events.ready(WAIT).await, "the redis subscription never came up");
    let mut on_b = b.events.subscribe();
    let svc_a = test::init_service(app(a, common::metrics())).await;
    let (user, refresh) = api_login(&t, &svc_a, "replicas@events.test").await;
    reuse(&svc_a, &refresh).await;
    assert_eq!(next(&mut on_b).await, reuse_event(&user));
}
