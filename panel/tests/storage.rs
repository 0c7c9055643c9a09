//! Storage and the API's plumbing, on both backends: migrations, the append-only audit log,
//! users and pagination, health, readiness, metrics and the error envelope.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use actix_web::http::StatusCode;
use actix_web::test;
use common::{Kind, TestDb};
use diesel::RunQueryDsl;
use mamba_panel::audit::{self, Actor, Event};
use mamba_panel::db::DbConnection;
use mamba_panel::http::app;
use mamba_panel::pagination::PageQuery;
use mamba_panel::request_meta::RequestMeta;
use mamba_panel::users::{self, CreateUserError, NewUser};
use serde_json::Value;

both_backends!(
    migrations_are_idempotent_and_pick_the_backend,
    audit_log_refuses_update_and_delete,
    users_are_unique_by_email_and_page_by_cursor,
    health_readiness_and_metrics,
    errors_use_the_envelope,
);

fn new_user(email: &str) -> NewUser {
    NewUser {
        email: email.into(),
        display_name: "Someone".into(),
        password_hash: "not-a-real-hash".into(),
        email_verified: false,
        is_super_admin: false,
    }
}

async fn migrations_are_idempotent_and_pick_the_backend(t: TestDb) {
    // TestDb already migrated; a second run finds nothing to do.
    assert!(t.db.migrate().await.unwrap().is_empty());
    let conn = t.db.get_blocking().unwrap();
    let is_sqlite = matches!(&*conn, DbConnection::Sqlite(_));
    assert_eq!(is_sqlite, t.kind == Kind::Sqlite);
}

async fn audit_log_refuses_update_and_delete(t: TestDb) {
    let mut conn = t.db.get_blocking().unwrap();
    audit::record(
        &mut conn,
        &Actor::System,
        &RequestMeta::system(),
        Event {
            tenant: None,
            action: "test.event",
            resource_type: "test",
            resource_id: None,
            metadata: serde_json::json!({}),
        },
    )
    .unwrap();
    let update = diesel::sql_query("UPDATE audit_log SET action = 'forged'").execute(&mut *conn);
    let err = update.expect_err("UPDATE must be refused").to_string();
    assert!(err.contains("append-only"), "{err}");
    let delete = diesel::sql_query("DELETE FROM audit_log").execute(&mut *conn);
    let err = delete.expect_err("DELETE must be refused").to_string();
    assert!(err.contains("append-only"), "{err}");
    if t.kind == Kind::Postgres {
        let truncate = diesel::sql_query("TRUNCATE audit_log").execute(&mut *conn);
        assert!(truncate.is_err(), "TRUNCATE must be refused");
    }
    // Inserting still works, and the first entry is untouched.
    let count: Vec<Count> =
        diesel::sql_query("SELECT COUNT(*) AS n FROM audit_log WHERE action = 'test.event'")
            .load(&mut *conn)
            .unwrap();
    assert_eq!(count[0].n, 1);
}

#[derive(diesel::QueryableByName)]
struct Count {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    n: i64,
}

async fn users_are_unique_by_email_and_page_by_cursor(t: TestDb) {
    let mut conn = t.db.get_blocking().unwrap();
    let meta = RequestMeta::system();
    let mut created = Vec::new();
    for i in 0..5 {
        let u = users::create(
            &mut conn,
            new_user(&format!("u{i}@example.test")),
            &Actor::System,
            &meta,
        )
        .unwrap();
        created.push(u.id);
    }
    let dup = users::create(&mut conn, new_user("u0@example.test"), &Actor::System, &meta);
    assert!(matches!(dup, Err(CreateUserError::EmailTaken)), "{dup:?}");

    let mut seen = Vec::new();
    let mut cursor = None;
    loop {
        let request = PageQuery {
            limit: Some(2),
            cursor: cursor.clone(),
        }
        .check()
        .unwrap();
        let page = users::list(&mut conn, &request).unwrap();
        assert!(page.items.len() <= 2);
        seen.extend(page.items.into_iter().map(|u| u.id));
        match page.next_cursor {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    assert_eq!(seen, created, "every user once, in creation order");
    // One audit entry per created user, none for the refused duplicate.
    let count: Vec<Count> =
        diesel::sql_query("SELECT COUNT(*) AS n FROM audit_log WHERE action = 'user.create'")
            .load(&mut *conn)
            .unwrap();
    assert_eq!(count[0].n, 5);
}

async fn health_readiness_and_metrics(t: TestDb) {
    let svc = test::init_service(app(t.state(), common::metrics())).await;
    let res = test::call_service(&svc, test::TestRequest::get().uri("/healthz").to_request()).await;
    assert_eq!(res.status(), StatusCode::OK);
    let res = test::call_service(&svc, test::TestRequest::get().uri("/readyz").to_request()).await;
    assert_eq!(res.status(), StatusCode::OK);
    let res = test::call_service(&svc, test::TestRequest::get().uri("/nope/123").to_request()).await;
    assert_eq!(res.status(), StatusCode::NOT_FOUND);
    let res = test::call_service(&svc, test::TestRequest::get().uri("/metrics").to_request()).await;
    assert_eq!(res.status(), StatusCode::OK);
    let body = String::from_utf8(test::read_body(res).await.to_vec()).unwrap();
    assert!(
        body.contains(r#"mamba_panel_http_requests_total{method="GET",route="/readyz",status="200"} 1"#),
        "{body}"
    );
    assert!(
        body.contains(r#"route="unmatched",status="404"} 1"#),
        "raw paths never become labels: {body}"
    );
    assert!(
        body.contains("mamba_panel_http_request_duration_seconds_bucket"),
        "{body}"
    );
}

async fn errors_use_the_envelope(t: TestDb) {
    let svc = test::init_service(app(t.state(), common::metrics())).await;
    let res = test::call_service(&svc, test::TestRequest::get().uri("/api/v1/nothing").to_request()).await;
    assert_eq!(res.status(), StatusCode::NOT_FOUND);
    let body: Value = test::read_body_json(res).await;
    assert_eq!(body["error"]["code"], "not_found");
    assert!(body["error"]["message"].is_string());
}

/// Readiness follows the database: once it is gone, `/readyz` answers 503 with the envelope
/// while `/healthz` still answers. (PostgreSQL only: a database can be dropped under a live
/// pool there.)
#[actix_web::test]
async fn readyz_fails_when_the_database_goes_away() {
    let Some(t) = TestDb::new(Kind::Postgres) else {
        return;
    };
    let db = mamba_panel::db::Db::connect(&t.url, 1, std::time::Duration::from_secs(1)).unwrap();
    let config = t.config();
    let master = mamba_panel::keys::MasterKey::from_bytes([1; 32]);
    let state = actix_web::web::Data::new(mamba_panel::http::AppState::new(config, db, &master).unwrap());
    let svc = test::init_service(app(state, common::metrics())).await;
    let res = test::call_service(&svc, test::TestRequest::get().uri("/readyz").to_request()).await;
    assert_eq!(res.status(), StatusCode::OK);
    t.drop_database();
    let res = test::call_service(&svc, test::TestRequest::get().uri("/readyz").to_request()).await;
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = test::read_body_json(res).await;
    assert_eq!(body["error"]["code"], "not_ready");
    let res = test::call_service(&svc, test::TestRequest::get().uri("/healthz").to_request()).await;
    assert_eq!(res.status(), StatusCode::OK);
}

/// Every operation in the OpenAPI document is routed, and the docs page loads nothing from
/// elsewhere (it must work offline).
#[actix_web::test]
async fn the_openapi_document_matches_the_routes_and_the_docs_work_offline() {
    let t = TestDb::new(Kind::Sqlite).unwrap();
    let svc = test::init_service(app(t.state(), common::metrics())).await;
    let res = test::call_service(
        &svc,
        test::TestRequest::get().uri("/api/v1/openapi.json").to_request(),
    )
    .await;
    assert_eq!(res.status(), StatusCode::OK);
    let doc: Value = test::read_body_json(res).await;
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let paths = doc["paths"].as_object().unwrap();
    assert!(paths.len() >= 30, "{}", paths.len());
    let any_id = uuid::Uuid::now_v7().to_string();
    let mut node_paths = Vec::new();
    for (path, ops) in paths {
        let concrete: String = path
            .split('/')
            .map(|seg| {
                if seg.starts_with('{') {
                    any_id.as_str()
                } else {
                    seg
                }
            })
            .collect::<Vec<_>>()
            .join("/");
        for (method, op) in ops.as_object().unwrap() {
            let m = actix_web::http::Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let req = test::TestRequest::default().method(m).uri(&concrete).to_request();
            let res = test::call_service(&svc, req).await;
            let body = test::read_body(res).await;
            let text = String::from_utf8_lossy(&body);
            // The node listener's routes are documented for reference, tagged `node`, and
            // served only on that listener, never on the public API.
            let node_route = path.starts_with("/api/node/");
            assert_eq!(
                op["tags"][0] == "node",
                node_route,
                "{method} {path}: tags {}",
                op["tags"]
            );
            if node_route {
                assert!(op["security"][0].get("node_mtls").is_some(), "{method} {path}");
                node_paths.push(path.clone());
                assert!(
                    text.contains("no route for"),
                    "{method} {path} is served on the public API"
                );
            } else {
                assert!(
                    !text.contains("no route for"),
                    "{method} {path} is documented but not routed"
                );
            }
        }
    }
    node_paths.sort();
    let mut expected = vec![
        mamba_shared::activity::ACTIVITY_PATH,
        mamba_shared::node_api::EVENTS_PATH,
        mamba_shared::node_api::HEARTBEAT_PATH,
        mamba_shared::node_api::METRICS_PATH,
        mamba_shared::node_sftp::SFTP_AUTH_PATH,
    ];
    expected.sort();
    assert_eq!(node_paths, expected);
    let res = test::call_service(&svc, test::TestRequest::get().uri("/api/v1/docs").to_request()).await;
    assert_eq!(res.status(), StatusCode::OK);
    let csp = res
        .headers()
        .get("content-security-policy")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    assert!(csp.contains("default-src 'none'"), "{csp}");
    let page = String::from_utf8(test::read_body(res).await.to_vec()).unwrap();
    assert!(page.contains("openapi.json"));
    for external in ["http://", "https://", "src=", "<link"] {
        assert!(!page.contains(external), "the docs page must not load {external}");
    }
}

/// Connections PostgreSQL drops are discarded, not handed out again: after a burst of
/// failures bounded by the pool's size, requests succeed again.
#[actix_web::test]
async fn the_pool_recovers_when_postgres_drops_its_connections() {
    let Some(t) = TestDb::new(Kind::Postgres) else {
        return;
    };
    let svc = test::init_service(app(t.state(), common::metrics())).await;
    macro_rules! ready {
        () => {
            test::call_service(&svc, test::TestRequest::get().uri("/readyz").to_request())
                .await
                .status()
        };
    }
    assert_eq!(ready!(), StatusCode::OK);
    t.terminate_connections();
    let mut failures = 0;
    loop {
        if ready!() == StatusCode::OK {
            break;
        }
        failures += 1;
        assert!(failures <= 8, "the pool keeps handing out dead connections");
    }
    for _ in 0..10 {
        assert_eq!(ready!(), StatusCode::OK);
    }
}
