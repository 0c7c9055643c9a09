//! API keys on both backends: scopes, tenant binding, expiry, the address allow-list, the
//! per-user maximum, and per-plan rate limits with their headers, in-process and in Redis
//! (SECURITY-CHECKLIST 18, 19).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use actix_web::http::{Method, StatusCode};
use actix_web::test;
use common::{Answer, TestDb, send};
use diesel::RunQueryDsl;
use mamba_panel::http::app;
use serde_json::{Value, json};

both_backends!(
    keys_act_within_their_scopes_and_tenant,
    expired_keys_and_foreign_addresses_are_refused,
    a_user_holds_at_most_the_maximum_of_keys,
    plan_limits_in_process,
    plan_limits_in_redis_are_shared_by_replicas,
    a_suspended_tenant_is_closed_to_its_members,
);

const IP: &str = "198.51.100.40";
const PASSWORD: &str = "api key test passphrase";

async fn call<S, B>(svc: &S, method: Method, uri: &str, auth: &str, body: Value, ip: &str) -> Answer
where
    S: common::TestApp<B>,
    B: actix_web::body::MessageBody,
{
    let mut req = test::TestRequest::default()
        .method(method.clone())
        .uri(uri)
        .peer_addr(common::peer(ip))
        .insert_header(("authorization", auth.to_string()));
    if method != Method::GET && method != Method::DELETE {
        req = req.set_json(body);
    }
    send(svc, req.to_request()).await
}

fn make_user(t: &TestDb, email: &str, super_admin: bool) {
    let hash = t.state().hasher.hash(PASSWORD).unwrap();
    let mut conn = t.db.get_blocking().unwrap();
    mamba_panel::users::create(
        &mut conn,
        mamba_panel::users::NewUser {
            email: email.into(),
            display_name: "Key user".into(),
            password_hash: hash,
            email_verified: true,
            is_super_admin: super_admin,
        },
        &mamba_panel::audit::Actor::System,
        &mamba_panel::request_meta::RequestMeta::system(),
    )
    .unwrap();
}

/// Logs in over the API; returns the bearer header.
async fn login<S, B>(svc: &S, email: &str) -> String
where
    S: common::TestApp<B>,
    B: actix_web::body::MessageBody,
{
    let a = send(
        svc,
        common::post(
            "/api/v1/auth/login",
            json!({"email": email, "password": PASSWORD, "client": "api"}),
            IP,
        )
        .to_request(),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{a:?}");
    format!("Bearer {}", a.body["tokens"]["access_token"].as_str().unwrap())
}

async fn new_tenant<S, B>(svc: &S, bearer: &str, slug: &str) -> String
where
    S: common::TestApp<B>,
    B: actix_web::body::MessageBody,
{
    let a = call(
        svc,
        Method::POST,
        "/api/v1/tenants",
        bearer,
        json!({"slug": slug, "name": slug}),
        IP,
    )
    .await;
    assert_eq!(a.status, StatusCode::CREATED, "{a:?}");
    a.body["id"].as_str().unwrap().to_string()
}

async fn new_key<S, B>(svc: &S, bearer: &str, tenant: &str, body: Value) -> Answer
where
    S: common::TestApp<B>,
    B: actix_web::body::MessageBody,
{
    call(
        svc,
        Method::POST,
        &format!("/api/v1/tenants/{tenant}/api-keys"),
        bearer,
        body,
        IP,
    )
    .await
}

async fn keys_act_within_their_scopes_and_tenant(t: TestDb) {
    make_user(&t, "owner@k.test", false);
    let svc = test::init_service(app(t.state(), common::metrics())).await;
    let owner = login(&svc, "owner@k.test").await;
    let ta = new_tenant(&svc, &owner, "keys-a").await;
    let tb = new_tenant(&svc, &owner, "keys-b").await;
    let a = new_key(
        &svc,
        &owner,
        &ta,
        json!({"memo": "<script>ci</script>", "scopes": ["member.read", "read:servers"]}),
    )
    .await;
    assert_eq!(a.status, StatusCode::CREATED, "{a:?}");
    let secret = a.body["key"].as_str().unwrap().to_string();
    let prefix = a.body["api_key"]["prefix"].as_str().unwrap().to_string();
    assert!(
        secret.starts_with(&prefix) && prefix.starts_with("mak_"),
        "{secret} / {prefix}"
    );
    assert_eq!(
        a.body["api_key"]["memo"], "<script>ci</script>",
        "stored verbatim, served as JSON data"
    );
    let key = format!("Bearer {secret}");

    // Shown once: listings carry the prefix, never the key.
    let list = call(
        &svc,
        Method::GET,
        &format!("/api/v1/tenants/{ta}/api-keys"),
        &owner,
        json!(null),
        IP,
    )
    .await;
    assert_eq!(list.body["items"][0]["prefix"], prefix.as_str());
    assert!(!list.body.to_string().contains(&secret));
    let mut conn = t.db.get_blocking().unwrap();
    #[derive(diesel::QueryableByName)]
    struct Stored {
        #[diesel(sql_type = diesel::sql_types::Text)]
        secret_hash: String,
    }
    let stored: Vec<Stored> = diesel::sql_query("SELECT secret_hash FROM api_keys")
        .load(&mut *conn)
        .unwrap();
    assert!(
        !stored[0].secret_hash.contains(&secret[prefix.len()..]),
        "only a digest is stored"
    );
    drop(conn);

    // In scope: yes. Out of scope, even though the owner could: 403.
    let a = call(
        &svc,
        Method::GET,
        &format!("/api/v1/tenants/{ta}/members"),
        &key,
        json!(null),
        IP,
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{a:?}");
    let a = call(
        &svc,
        Method::GET,
        &format!("/api/v1/tenants/{ta}/audit"),
        &key,
        json!(null),
        IP,
    )
    .await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    let a = call(
        &svc,
        Method::PATCH,
        &format!("/api/v1/tenants/{ta}"),
        &key,
        json!({"name": "x"}),
        IP,
    )
    .await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    // Another tenant of the same user: 404, as for any foreign tenant.
    let a = call(
        &svc,
        Method::GET,
        &format!("/api/v1/tenants/{tb}/members"),
        &key,
        json!(null),
        IP,
    )
    .await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    // Account routes and tenant creation need a login, not a key.
    let a = call(
        &svc,
        Method::POST,
        "/api/v1/tenants",
        &key,
        json!({"slug": "by-key", "name": "x"}),
        IP,
    )
    .await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    let a = call(
        &svc,
        Method::POST,
        "/api/v1/users/me/two-factor/setup",
        &key,
        json!({}),
        IP,
    )
    .await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    let a = call(&svc, Method::GET, "/api/v1/users/me", &key, json!(null), IP).await;
    assert_eq!(a.status, StatusCode::OK);
    // A wrong secret with a real prefix is just unknown.
    let a = call(
        &svc,
        Method::GET,
        &format!("/api/v1/tenants/{ta}/members"),
        &format!("Bearer {prefix}_wrong"),
        json!(null),
        IP,
    )
    .await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);

    // Changes made with a key are audited as the key.
    let a = new_key(
        &svc,
        &owner,
        &ta,
        json!({"memo": "inviter", "scopes": ["admin:all"]}),
    )
    .await;
    let inviter = format!("Bearer {}", a.body["key"].as_str().unwrap());
    let inviter_id = a.body["api_key"]["id"].as_str().unwrap().to_string();
    let a = call(
        &svc,
        Method::POST,
        &format!("/api/v1/tenants/{ta}/invitations"),
        &inviter,
        json!({"email": "new@k.test", "role": "MEMBER"}),
        IP,
    )
    .await;
    assert_eq!(a.status, StatusCode::CREATED, "{a:?}");
    let log = call(
        &svc,
        Method::GET,
        &format!("/api/v1/tenants/{ta}/audit?action=invitation.create"),
        &owner,
        json!(null),
        IP,
    )
    .await;
    assert_eq!(log.body["items"][0]["actor_type"], "api_key");
    assert_eq!(log.body["items"][0]["actor_id"], inviter_id.as_str());

    // No escalation through scopes: a MEMBER cannot mint admin:all.
    make_user(&t, "member@k.test", false);
    let member = login(&svc, "member@k.test").await;
    let a = call(
        &svc,
        Method::POST,
        &format!("/api/v1/tenants/{ta}/invitations"),
        &owner,
        json!({"email": "member@k.test", "role": "MEMBER"}),
        IP,
    )
    .await;
    let token = a.body["token"].as_str().unwrap().to_string();
    call(
        &svc,
        Method::POST,
        "/api/v1/invitations/accept",
        &member,
        json!({"token": token}),
        IP,
    )
    .await;
    let a = new_key(&svc, &member, &ta, json!({"memo": "", "scopes": ["admin:all"]})).await;
    assert_eq!(
        (a.status, a.body["error"]["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("escalation_refused"))
    );
    let a = new_key(&svc, &member, &ta, json!({"memo": "", "scopes": ["root"]})).await;
    assert_eq!(a.body["error"]["details"][0]["field"], "scopes");

    // Revoked keys stop working at once.
    let id = list.body["items"][0]["id"].as_str().unwrap().to_string();
    let a = call(
        &svc,
        Method::DELETE,
        &format!("/api/v1/tenants/{ta}/api-keys/{id}"),
        &owner,
        json!(null),
        IP,
    )
    .await;
    assert_eq!(a.status, StatusCode::NO_CONTENT);
    let a = call(
        &svc,
        Method::GET,
        &format!("/api/v1/tenants/{ta}/members"),
        &key,
        json!(null),
        IP,
    )
    .await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
}

async fn expired_keys_and_foreign_addresses_are_refused(t: TestDb) {
    make_user(&t, "owner@e.test", false);
    let svc = test::init_service(app(t.state(), common::metrics())).await;
    let owner = login(&svc, "owner@e.test").await;
    let tid = new_tenant(&svc, &owner, "expiry").await;
    let a = new_key(
        &svc,
        &owner,
        &tid,
        json!({"memo": "", "scopes": ["member.read"], "expires_at": 1}),
    )
    .await;
    assert_eq!(a.body["error"]["details"][0]["field"], "expires_at");
    let soon = mamba_panel::db::now_ms() + 60_000;
    let a = new_key(
        &svc,
        &owner,
        &tid,
        json!({"memo": "", "scopes": ["member.read"], "expires_at": soon}),
    )
    .await;
    let key = format!("Bearer {}", a.body["key"].as_str().unwrap());
    let id = a.body["api_key"]["id"].as_str().unwrap().to_string();
    let members = format!("/api/v1/tenants/{tid}/members");
    assert_eq!(
        call(&svc, Method::GET, &members, &key, json!(null), IP)
            .await
            .status,
        StatusCode::OK
    );
    // Time passes (moved in the database rather than waited for).
    let mut conn = t.db.get_blocking().unwrap();
    diesel::sql_query(format!(
        "UPDATE api_keys SET expires_at = {} WHERE id = '{id}'",
        mamba_panel::db::now_ms() - 1
    ))
    .execute(&mut *conn)
    .unwrap();
    drop(conn);
    let a = call(&svc, Method::GET, &members, &key, json!(null), IP).await;
    assert_eq!(
        (a.status, a.body["error"]["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("api_key_expired"))
    );

    let a = new_key(
        &svc,
        &owner,
        &tid,
        json!({"memo": "", "scopes": ["member.read"], "allowed_ips": ["not-an-ip"]}),
    )
    .await;
    assert_eq!(a.body["error"]["details"][0]["field"], "allowed_ips");
    let a = new_key(&svc, &owner, &tid, json!({"memo": "office", "scopes": ["member.read"], "allowed_ips": ["203.0.113.0/24", "2001:db8::/32"]})).await;
    let key = format!("Bearer {}", a.body["key"].as_str().unwrap());
    assert_eq!(
        call(&svc, Method::GET, &members, &key, json!(null), "203.0.113.9")
            .await
            .status,
        StatusCode::OK
    );
    let a = call(&svc, Method::GET, &members, &key, json!(null), "198.51.100.9").await;
    assert_eq!(
        (a.status, a.body["error"]["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("address_not_allowed"))
    );
    // A forged forwarding header from an untrusted peer does not help.
    let req = test::TestRequest::get()
        .uri(&members)
        .peer_addr(common::peer("198.51.100.9"))
        .insert_header(("authorization", key.clone()))
        .insert_header(("x-forwarded-for", "203.0.113.9"));
    assert_eq!(send(&svc, req.to_request()).await.status, StatusCode::FORBIDDEN);
}

async fn a_user_holds_at_most_the_maximum_of_keys(t: TestDb) {
    make_user(&t, "owner@m.test", false);
    let mut config = t.config();
    config.api_keys.max_per_user = 3;
    let svc = test::init_service(app(t.state_with(config), common::metrics())).await;
    let owner = login(&svc, "owner@m.test").await;
    let tid = new_tenant(&svc, &owner, "maximum").await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        let a = new_key(&svc, &owner, &tid, json!({"memo": "", "scopes": ["member.read"]})).await;
        assert_eq!(a.status, StatusCode::CREATED);
        ids.push(a.body["api_key"]["id"].as_str().unwrap().to_string());
    }
    let a = new_key(&svc, &owner, &tid, json!({"memo": "", "scopes": ["member.read"]})).await;
    assert_eq!(
        (a.status, a.body["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("api_key_limit"))
    );
    // Revoking one makes room for one.
    call(
        &svc,
        Method::DELETE,
        &format!("/api/v1/tenants/{tid}/api-keys/{}", ids[0]),
        &owner,
        json!(null),
        IP,
    )
    .await;
    let a = new_key(&svc, &owner, &tid, json!({"memo": "", "scopes": ["member.read"]})).await;
    assert_eq!(a.status, StatusCode::CREATED);
}

/// Runs the plan-limit checks against two apps sharing one limiter store (or not).
async fn plan_limits<S1, S2, B1, B2>(t: &TestDb, first: &S1, second: &S2, shared: bool)
where
    S1: common::TestApp<B1>,
    B1: actix_web::body::MessageBody,
    S2: common::TestApp<B2>,
    B2: actix_web::body::MessageBody,
{
    make_user(t, "owner@p.test", false);
    make_user(t, "ops@p.test", true);
    let owner = login(first, "owner@p.test").await;
    let tid = new_tenant(first, &owner, "limited").await;
    let a = new_key(
        first,
        &owner,
        &tid,
        json!({"memo": "", "scopes": ["member.read"]}),
    )
    .await;
    let key = format!("Bearer {}", a.body["key"].as_str().unwrap());
    let uri = format!("/api/v1/tenants/{tid}/members");
    // The free plan allows 3 an hour here; every answer carries the counters.
    for remaining in (0..3).rev() {
        let a = call(first, Method::GET, &uri, &key, json!(null), IP).await;
        assert_eq!(a.status, StatusCode::OK);
        assert_eq!(a.header("x-ratelimit-limit").as_deref(), Some("3"));
        assert_eq!(a.header("x-ratelimit-remaining"), Some(remaining.to_string()));
        let reset: u64 = a.header("x-ratelimit-reset").unwrap().parse().unwrap();
        assert!((1..=3600).contains(&reset), "{reset}");
    }
    // Over the limit, on the other replica when they share a store.
    let a = if shared {
        call(second, Method::GET, &uri, &key, json!(null), IP).await
    } else {
        call(first, Method::GET, &uri, &key, json!(null), IP).await
    };
    assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS, "{a:?}");
    assert_eq!(a.body["error"]["code"], "rate_limited");
    let retry: u64 = a.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=3600).contains(&retry));
    assert_eq!(a.header("x-ratelimit-remaining").as_deref(), Some("0"));
    // Other errors carry the counters too.
    let a = call(
        first,
        Method::GET,
        &format!("/api/v1/tenants/{tid}/audit"),
        &key,
        json!(null),
        IP,
    )
    .await;
    assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS);

    // Enterprise: unlimited, so no counters.
    let ops = login(first, "ops@p.test").await;
    let a = call(
        first,
        Method::PATCH,
        &format!("/api/v1/admin/tenants/{tid}"),
        &ops,
        json!({"plan": "enterprise"}),
        IP,
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{a:?}");
    assert_eq!(a.body["plan"], "enterprise");
    let a = call(
        first,
        Method::PATCH,
        &format!("/api/v1/admin/tenants/{tid}"),
        &owner,
        json!({"plan": "free"}),
        IP,
    )
    .await;
    assert_eq!(a.status, StatusCode::FORBIDDEN, "operators only");
    for _ in 0..5 {
        let a = call(first, Method::GET, &uri, &key, json!(null), IP).await;
        assert_eq!(a.status, StatusCode::OK);
        assert!(a.header("x-ratelimit-limit").is_none());
    }
}

fn limited_config(t: &TestDb) -> mamba_panel::config::Config {
    let mut config = t.config();
    config.plans.free_per_hour = 3;
    config
}

async fn plan_limits_in_process(t: TestDb) {
    let svc = test::init_service(app(t.state_with(limited_config(&t)), common::metrics())).await;
    plan_limits(&t, &svc, &svc, false).await;
}

async fn plan_limits_in_redis_are_shared_by_replicas(t: TestDb) {
    let Some(url) = common::redis_url() else { return };
    let one = test::init_service(app(
        t.redis_state_with(limited_config(&t), &url).await,
        common::metrics(),
    ))
    .await;
    let two = test::init_service(app(
        t.redis_state_with(limited_config(&t), &url).await,
        common::metrics(),
    ))
    .await;
    let ready = send(&one, common::get("/readyz", IP).to_request()).await;
    assert_eq!(ready.body["redis"], "ok");
    plan_limits(&t, &one, &two, true).await;
}

async fn a_suspended_tenant_is_closed_to_its_members(t: TestDb) {
    make_user(&t, "owner@susp.test", false);
    make_user(&t, "ops@susp.test", true);
    let svc = test::init_service(app(t.state(), common::metrics())).await;
    let owner = login(&svc, "owner@susp.test").await;
    let ops = login(&svc, "ops@susp.test").await;
    let tid = new_tenant(&svc, &owner, "suspended").await;
    let uri = format!("/api/v1/tenants/{tid}");
    assert_eq!(
        call(&svc, Method::GET, &uri, &owner, json!(null), IP)
            .await
            .status,
        StatusCode::OK
    );
    let admin_uri = format!("/api/v1/admin/tenants/{tid}");
    let a = call(
        &svc,
        Method::PATCH,
        &admin_uri,
        &ops,
        json!({"status": "frozen"}),
        IP,
    )
    .await;
    assert_eq!(a.body["error"]["details"][0]["field"], "status");
    let a = call(
        &svc,
        Method::PATCH,
        &admin_uri,
        &ops,
        json!({"status": "suspended"}),
        IP,
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{a:?}");
    let a = call(&svc, Method::GET, &uri, &owner, json!(null), IP).await;
    assert_eq!(
        (a.status, a.body["error"]["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("tenant_suspended"))
    );
    call(
        &svc,
        Method::PATCH,
        &admin_uri,
        &ops,
        json!({"status": "active"}),
        IP,
    )
    .await;
    assert_eq!(
        call(&svc, Method::GET, &uri, &owner, json!(null), IP)
            .await
            .status,
        StatusCode::OK
    );
    let log = call(
        &svc,
        Method::GET,
        &format!("{uri}/audit?action=tenant.admin_update"),
        &owner,
        json!(null),
        IP,
    )
    .await;
    assert_eq!(
        log.body["items"].as_array().unwrap().len(),
        2,
        "operators' changes are audited in the tenant's log"
    );
}
