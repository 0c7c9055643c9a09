//! The blueprint registry through the operators' API on both backends: files from the
//! blueprints folder, export as JSON and YAML, import of eggs and native blueprints with
//! their report, conflicts, replacement and removal.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use actix_web::http::{Method, StatusCode};
use actix_web::test;
use common::{Answer, TestDb, send};
use mamba_panel::http::app;
use serde_json::Value;

both_backends!(operators_import_export_and_remove_blueprints);

const IP: &str = "198.51.100.61";
const PASSWORD: &str = "blueprint test passphrase";
const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/eggs");

async fn call<S, B>(svc: &S, method: Method, uri: &str, bearer: &str, body: Option<String>) -> Answer
where
    S: common::TestApp<B>,
    B: actix_web::body::MessageBody,
{
    let mut req = test::TestRequest::default()
        .method(method)
        .uri(uri)
        .peer_addr(common::peer(IP))
        .insert_header(("authorization", bearer.to_string()));
    if let Some(body) = body {
        req = req
            .insert_header(("content-type", "text/plain"))
            .set_payload(body);
    }
    send(svc, req.to_request()).await
}

fn fixture(name: &str) -> String {
    std::fs::read_to_string(format!("{FIXTURES}/{name}")).unwrap()
}

async fn operators_import_export_and_remove_blueprints(t: TestDb) {
    let mut config = t.config();
    config.blueprints.dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../blueprints").into();
    let svc = test::init_service(app(t.state_with(config), common::metrics())).await;
    let admin = common::login_new_user(&svc, &t, "root@example.com", PASSWORD, true, IP).await;
    let user = common::login_new_user(&svc, &t, "user@example.com", PASSWORD, false, IP).await;

    let a = call(&svc, Method::GET, "/api/v1/admin/blueprints", &user, None).await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    let a = call(&svc, Method::GET, "/api/v1/admin/blueprints", &admin, None).await;
    assert_eq!(a.status, StatusCode::OK, "{a:?}");
    let files = a.body.as_array().unwrap().len();
    assert!(files >= 17, "the blueprint files are listed: {files}");
    assert!(
        a.body
            .as_array()
            .unwrap()
            .iter()
            .any(|b| b["slug"] == "freeciv" && b["source"] == "file")
    );

    // Export: JSON with its source; YAML that reads back as the same blueprint.
    let a = call(
        &svc,
        Method::GET,
        "/api/v1/admin/blueprints/freeciv",
        &admin,
        None,
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{a:?}");
    assert_eq!(a.body["source"], "file");
    let a = call(
        &svc,
        Method::GET,
        "/api/v1/admin/blueprints/freeciv?format=yaml",
        &admin,
        None,
    )
    .await;
    let yaml = a.body.as_str().unwrap().to_string();
    let again = mamba_shared::blueprint::Blueprint::from_yaml("export", &yaml).unwrap();
    assert_eq!(again.slug, "freeciv");
    let a = call(&svc, Method::GET, "/api/v1/admin/blueprints/nope", &admin, None).await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);

    // A file's slug cannot be imported over; a native blueprint imports under another slug.
    let a = call(
        &svc,
        Method::POST,
        "/api/v1/admin/blueprints/import",
        &admin,
        Some(yaml.clone()),
    )
    .await;
    assert_eq!(a.status, StatusCode::CONFLICT, "{a:?}");
    let a = call(
        &svc,
        Method::POST,
        "/api/v1/admin/blueprints/import?slug=freeciv-copy",
        &admin,
        Some(yaml),
    )
    .await;
    assert_eq!(a.status, StatusCode::CREATED, "{a:?}");
    assert_eq!(a.body["report"]["source_format"], "native");

    // An egg: a dry run stores nothing; the import reports what did not map.
    let egg = fixture("pterodactyl-panel/egg-paper.json");
    let a = call(
        &svc,
        Method::POST,
        "/api/v1/admin/blueprints/import?dry_run=true",
        &admin,
        Some(egg.clone()),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{a:?}");
    assert_eq!(a.body["stored"], false);
    let slug = a.body["blueprint"]["slug"].as_str().unwrap().to_string();
    let a = call(
        &svc,
        Method::GET,
        &format!("/api/v1/admin/blueprints/{slug}"),
        &admin,
        None,
    )
    .await;
    assert_eq!(a.status, StatusCode::NOT_FOUND, "a dry run stores nothing");
    let a = call(
        &svc,
        Method::POST,
        "/api/v1/admin/blueprints/import",
        &admin,
        Some(egg.clone()),
    )
    .await;
    assert_eq!(a.status, StatusCode::CREATED, "{a:?}");
    assert_eq!(a.body["report"]["source_format"], "PTDL_v1");
    assert!(!a.body["report"]["items"].as_array().unwrap().is_empty());
    let a = call(
        &svc,
        Method::POST,
        "/api/v1/admin/blueprints/import",
        &admin,
        Some(egg.clone()),
    )
    .await;
    assert_eq!(a.status, StatusCode::CONFLICT, "{a:?}");
    let a = call(
        &svc,
        Method::POST,
        "/api/v1/admin/blueprints/import?replace=true",
        &admin,
        Some(egg),
    )
    .await;
    assert_eq!(a.status, StatusCode::CREATED, "{a:?}");
    let a = call(
        &svc,
        Method::GET,
        &format!("/api/v1/admin/blueprints/{slug}"),
        &admin,
        None,
    )
    .await;
    assert_eq!(a.body["source"], "imported");
    assert_eq!(a.body["report"]["source_format"], "PTDL_v1", "the report is kept");
    let a = call(&svc, Method::GET, "/api/v1/admin/blueprints", &admin, None).await;
    assert_eq!(a.body.as_array().unwrap().len(), files + 2);

    // Junk is refused, naming the body.
    let a = call(
        &svc,
        Method::POST,
        "/api/v1/admin/blueprints/import",
        &admin,
        Some("hello".into()),
    )
    .await;
    assert_eq!(a.status, StatusCode::UNPROCESSABLE_ENTITY, "{a:?}");
    assert_eq!(a.body["error"]["code"], "not_an_egg");

    // Imports can be removed; files cannot.
    let a = call(
        &svc,
        Method::DELETE,
        "/api/v1/admin/blueprints/freeciv",
        &admin,
        None,
    )
    .await;
    assert_eq!(a.status, StatusCode::CONFLICT);
    let a = call(
        &svc,
        Method::DELETE,
        &format!("/api/v1/admin/blueprints/{slug}"),
        &admin,
        None,
    )
    .await;
    assert_eq!(a.status, StatusCode::NO_CONTENT);
    let a = call(
        &svc,
        Method::DELETE,
        &format!("/api/v1/admin/blueprints/{slug}"),
        &admin,
        None,
    )
    .await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    let audit: Vec<Value> = {
        use diesel::prelude::*;
        use mamba_panel::db::schema::audit_log;
        let mut conn = t.db.get_blocking().unwrap();
        audit_log::table
            .filter(audit_log::resource_type.eq("blueprint"))
            .select(audit_log::action)
            .load::<String>(&mut *conn)
            .unwrap()
            .into_iter()
            .map(Value::from)
            .collect()
    };
    assert_eq!(
        audit,
        [
            "blueprint.import",
            "blueprint.import",
            "blueprint.import",
            "blueprint.delete"
        ]
    );
}
