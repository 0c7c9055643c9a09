//! Nodes through the operators' API on both backends: who may manage them, validation that
//! names every bad field, unique names, usage, decommissioning and deletion, and one audit
//! entry per change.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use actix_web::http::{Method, StatusCode};
use actix_web::test;
use common::{Answer, TestDb, send};
use diesel::prelude::*;
use mamba_panel::http::app;
use serde_json::{Value, json};

both_backends!(operators_manage_nodes);

const IP: &str = "198.51.100.60";
const PASSWORD: &str = "node test passphrase";

pub async fn call<S, B>(svc: &S, method: Method, uri: &str, bearer: Option<&str>, body: Value) -> Answer
where
    S: common::TestApp<B>,
    B: actix_web::body::MessageBody,
{
    let mut req = test::TestRequest::default()
        .method(method.clone())
        .uri(uri)
        .peer_addr(common::peer(IP));
    if let Some(b) = bearer {
        req = req.insert_header(("authorization", b.to_string()));
    }
    if method != Method::GET && method != Method::DELETE {
        req = req.set_json(body);
    }
    send(svc, req.to_request()).await
}

fn audit_count(t: &TestDb, action: &str) -> i64 {
    use mamba_panel::db::schema::audit_log;
    let mut conn = t.db.get_blocking().unwrap();
    audit_log::table
        .filter(audit_log::action.eq(action))
        .count()
        .get_result(&mut *conn)
        .unwrap()
}

async fn operators_manage_nodes(t: TestDb) {
    let svc = test::init_service(app(t.state(), common::metrics())).await;
    let admin = common::login_new_user(&svc, &t, "root@example.com", PASSWORD, true, IP).await;
    let user = common::login_new_user(&svc, &t, "user@example.com", PASSWORD, false, IP).await;
    let body = json!({
        "name": "node-1", "fqdn": "Node1.Example.com", "location": "eu-west",
        "cpu_percent": 400, "memory_mb": 8192, "disk_mb": 102400, "overallocation_percent": 25
    });

    // Only operators, and only logged in.
    let a = call(
        &svc,
        Method::POST,
        "/api/v1/admin/nodes",
        Some(&user),
        body.clone(),
    )
    .await;
    assert_eq!(a.status, StatusCode::FORBIDDEN, "{a:?}");
    let a = call(&svc, Method::GET, "/api/v1/admin/nodes", None, Value::Null).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED, "{a:?}");

    // Every bad field is named at once.
    let bad = json!({
        "name": "", "fqdn": "not a host", "location": "EU West",
        "cpu_percent": 0, "memory_mb": -1, "disk_mb": 10, "overallocation_percent": 5000
    });
    let a = call(&svc, Method::POST, "/api/v1/admin/nodes", Some(&admin), bad).await;
    assert_eq!(a.status, StatusCode::UNPROCESSABLE_ENTITY, "{a:?}");
    let fields: Vec<&str> = a.body["error"]["details"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["field"].as_str().unwrap())
        .collect();
    assert_eq!(
        fields,
        [
            "name",
            "fqdn",
            "location",
            "cpu_percent",
            "memory_mb",
            "overallocation_percent"
        ]
    );

    let a = call(
        &svc,
        Method::POST,
        "/api/v1/admin/nodes",
        Some(&admin),
        body.clone(),
    )
    .await;
    assert_eq!(a.status, StatusCode::CREATED, "{a:?}");
    let id = a.body["id"].as_str().unwrap().to_string();
    assert_eq!(a.body["fqdn"], "node1.example.com");
    assert_eq!(a.body["is_public"], true);
    assert_eq!(a.body["maintenance"], false);
    assert_eq!(a.body["status"], "active");

    let a = call(
        &svc,
        Method::POST,
        "/api/v1/admin/nodes",
        Some(&admin),
        body.clone(),
    )
    .await;
    assert_eq!(a.status, StatusCode::CONFLICT, "{a:?}");
    assert_eq!(a.body["error"]["code"], "name_taken");

    let mut other = body.clone();
    other["name"] = json!("node-2");
    other["location"] = json!("us-east");
    let a = call(&svc, Method::POST, "/api/v1/admin/nodes", Some(&admin), other).await;
    assert_eq!(a.status, StatusCode::CREATED, "{a:?}");
    let id2 = a.body["id"].as_str().unwrap().to_string();

    // Detail: limits include the overallocation; nothing is reserved yet.
    let a = call(
        &svc,
        Method::GET,
        &format!("/api/v1/admin/nodes/{id}"),
        Some(&admin),
        Value::Null,
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{a:?}");
    assert_eq!(a.body["limits"]["memory_mb"], 10240);
    assert_eq!(a.body["limits"]["cpu_percent"], 500);
    assert_eq!(a.body["reserved"]["memory_mb"], 0);
    assert_eq!(a.body["name"], "node-1");

    // Lists filter and page.
    let a = call(
        &svc,
        Method::GET,
        "/api/v1/admin/nodes?location=us-east",
        Some(&admin),
        Value::Null,
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{a:?}");
    assert_eq!(a.body["items"].as_array().unwrap().len(), 1);
    assert_eq!(a.body["items"][0]["id"], id2.as_str());
    let a = call(
        &svc,
        Method::GET,
        "/api/v1/admin/nodes?limit=1",
        Some(&admin),
        Value::Null,
    )
    .await;
    assert_eq!(a.body["items"][0]["id"], id.as_str());
    let cursor = a.body["next_cursor"].as_str().unwrap().to_string();
    let a = call(
        &svc,
        Method::GET,
        &format!("/api/v1/admin/nodes?limit=1&cursor={cursor}"),
        Some(&admin),
        Value::Null,
    )
    .await;
    assert_eq!(a.body["items"][0]["id"], id2.as_str());
    assert!(a.body["next_cursor"].is_null());

    // Unknown and malformed ids are the same 404.
    for bad in ["00000000-0000-7000-8000-000000000000", "nope"] {
        let a = call(
            &svc,
            Method::GET,
            &format!("/api/v1/admin/nodes/{bad}"),
            Some(&admin),
            Value::Null,
        )
        .await;
        assert_eq!(a.status, StatusCode::NOT_FOUND, "{a:?}");
    }

    let a = call(
        &svc,
        Method::PATCH,
        &format!("/api/v1/admin/nodes/{id}"),
        Some(&admin),
        json!({"maintenance": true, "memory_mb": 4096}),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{a:?}");
    assert_eq!(a.body["maintenance"], true);
    assert_eq!(a.body["memory_mb"], 4096);
    assert_eq!(a.body["name"], "node-1");
    let a = call(
        &svc,
        Method::PATCH,
        &format!("/api/v1/admin/nodes/{id}"),
        Some(&admin),
        json!({"name": "node-2"}),
    )
    .await;
    assert_eq!(a.status, StatusCode::CONFLICT, "{a:?}");

    // An active node cannot be deleted; a decommissioned one can, and stays frozen meanwhile.
    let a = call(
        &svc,
        Method::DELETE,
        &format!("/api/v1/admin/nodes/{id}"),
        Some(&admin),
        Value::Null,
    )
    .await;
    assert_eq!(a.status, StatusCode::CONFLICT, "{a:?}");
    let a = call(
        &svc,
        Method::POST,
        &format!("/api/v1/admin/nodes/{id}/decommission"),
        Some(&admin),
        Value::Null,
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{a:?}");
    assert_eq!(a.body["node"]["status"], "decommissioned");
    assert_eq!(a.body["node"]["is_public"], false);
    let a = call(
        &svc,
        Method::PATCH,
        &format!("/api/v1/admin/nodes/{id}"),
        Some(&admin),
        json!({"maintenance": false}),
    )
    .await;
    assert_eq!(a.status, StatusCode::CONFLICT, "{a:?}");
    let a = call(
        &svc,
        Method::DELETE,
        &format!("/api/v1/admin/nodes/{id}"),
        Some(&admin),
        Value::Null,
    )
    .await;
    assert_eq!(a.status, StatusCode::NO_CONTENT, "{a:?}");
    let a = call(
        &svc,
        Method::GET,
        &format!("/api/v1/admin/nodes/{id}"),
        Some(&admin),
        Value::Null,
    )
    .await;
    assert_eq!(a.status, StatusCode::NOT_FOUND, "{a:?}");

    for (action, n) in [
        ("node.create", 2),
        ("node.update", 1),
        ("node.decommission", 1),
        ("node.delete", 1),
    ] {
        assert_eq!(audit_count(&t, action), n, "{action}");
    }
}
