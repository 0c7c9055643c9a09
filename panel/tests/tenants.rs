//! Tenants, members and roles on both backends: the tenant-isolation matrix, every built-in
//! role against every permission-guarded route, custom roles, no escalation, the last
//! owner, the tenant's 2FA requirement, and the audit log: one entry per change, filters,
//! cursors (SECURITY-CHECKLIST 17).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;

use actix_web::http::{Method, StatusCode};
use actix_web::test;
use common::{Answer, TestDb, send};
use mamba_panel::events::{PanelEvent, RevokeReason};
use mamba_panel::http::app;
use mamba_panel::permissions::BuiltInRole;
use serde_json::{Value, json};

both_backends!(
    a_member_of_one_tenant_never_reaches_another,
    every_built_in_role_against_every_guarded_route,
    custom_roles_and_no_escalation,
    the_last_owner_stays,
    a_tenant_can_require_two_factor,
    every_change_writes_one_audit_entry_and_the_log_filters_and_pages,
);

const IP: &str = "198.51.100.30";
const PASSWORD: &str = "tenant test passphrase";

struct Ctx<S> {
    svc: S,
    t: TestDb,
}

/// A verified user made in the database, logged in over the API; returns its bearer header.
async fn user<S, B>(ctx: &Ctx<S>, email: &str) -> String
where
    S: common::TestApp<B>,
    B: actix_web::body::MessageBody,
{
    let hash = ctx.t.state().hasher.hash(PASSWORD).unwrap();
    let mut conn = ctx.t.db.get_blocking().unwrap();
    mamba_panel::users::create(
        &mut conn,
        mamba_panel::users::NewUser {
            email: email.into(),
            display_name: email.split('@').next().unwrap().into(),
            password_hash: hash,
            email_verified: true,
            is_super_admin: false,
        },
        &mamba_panel::audit::Actor::System,
        &mamba_panel::request_meta::RequestMeta::system(),
    )
    .unwrap();
    drop(conn);
    let a = call(
        ctx,
        Method::POST,
        "/api/v1/auth/login",
        None,
        json!({"email": email, "password": PASSWORD, "client": "api"}),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{a:?}");
    format!("Bearer {}", a.body["tokens"]["access_token"].as_str().unwrap())
}

async fn call<S, B>(ctx: &Ctx<S>, method: Method, uri: &str, bearer: Option<&str>, body: Value) -> Answer
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
    send(&ctx.svc, req.to_request()).await
}

async fn tenant<S, B>(ctx: &Ctx<S>, owner: &str, slug: &str) -> String
where
    S: common::TestApp<B>,
    B: actix_web::body::MessageBody,
{
    let a = call(
        ctx,
        Method::POST,
        "/api/v1/tenants",
        Some(owner),
        json!({"slug": slug, "name": slug}),
    )
    .await;
    assert_eq!(a.status, StatusCode::CREATED, "{a:?}");
    a.body["id"].as_str().unwrap().to_string()
}

/// Invites `email` with `role` and accepts as `bearer`; returns the membership id.
async fn join<S, B>(ctx: &Ctx<S>, owner: &str, tenant: &str, bearer: &str, email: &str, role: &str) -> String
where
    S: common::TestApp<B>,
    B: actix_web::body::MessageBody,
{
    let a = call(
        ctx,
        Method::POST,
        &format!("/api/v1/tenants/{tenant}/invitations"),
        Some(owner),
        json!({"email": email, "role": role}),
    )
    .await;
    assert_eq!(a.status, StatusCode::CREATED, "{a:?}");
    let token = a.body["token"].as_str().unwrap();
    let a = call(
        ctx,
        Method::POST,
        "/api/v1/invitations/accept",
        Some(bearer),
        json!({"token": token}),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{a:?}");
    let a = call(
        ctx,
        Method::GET,
        &format!("/api/v1/tenants/{tenant}/members?limit=200"),
        Some(owner),
        json!(null),
    )
    .await;
    a.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["email"] == email)
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string()
}

macro_rules! ctx {
    ($t:expr) => {{
        let t = $t;
        let svc = test::init_service(app(t.state(), common::metrics())).await;
        Ctx { svc, t }
    }};
}

async fn a_member_of_one_tenant_never_reaches_another(t: TestDb) {
    let ctx = ctx!(t);
    let alice = user(&ctx, "alice@a.test").await;
    let bob = user(&ctx, "bob@b.test").await;
    let bob_friend = user(&ctx, "friend@b.test").await;
    let ta = tenant(&ctx, &alice, "tenant-a").await;
    let tb = tenant(&ctx, &bob, "tenant-b").await;
    let member_b = join(&ctx, &bob, &tb, &bob_friend, "friend@b.test", "MEMBER").await;
    let a = call(
        &ctx,
        Method::POST,
        &format!("/api/v1/tenants/{tb}/invitations"),
        Some(&bob),
        json!({"email": "x@b.test", "role": "SUPPORT"}),
    )
    .await;
    let invitation_b = a.body["invitation"]["id"].as_str().unwrap().to_string();
    let a = call(
        &ctx,
        Method::POST,
        &format!("/api/v1/tenants/{tb}/roles"),
        Some(&bob),
        json!({"name": "b-role", "permissions": ["audit.read"]}),
    )
    .await;
    let role_b = a.body["id"].as_str().unwrap().to_string();
    let missing = uuid::Uuid::now_v7().to_string();

    // Every tenant route, addressed to tenant B (and to a tenant that does not exist).
    let routes = |t: &str| {
        vec![
            (Method::GET, format!("/api/v1/tenants/{t}"), json!(null)),
            (
                Method::PATCH,
                format!("/api/v1/tenants/{t}"),
                json!({"name": "taken over"}),
            ),
            (Method::GET, format!("/api/v1/tenants/{t}/members"), json!(null)),
            (
                Method::GET,
                format!("/api/v1/tenants/{t}/members/{member_b}"),
                json!(null),
            ),
            (
                Method::PATCH,
                format!("/api/v1/tenants/{t}/members/{member_b}"),
                json!({"role": "MEMBER"}),
            ),
            (
                Method::DELETE,
                format!("/api/v1/tenants/{t}/members/{member_b}"),
                json!(null),
            ),
            (
                Method::GET,
                format!("/api/v1/tenants/{t}/invitations"),
                json!(null),
            ),
            (
                Method::POST,
                format!("/api/v1/tenants/{t}/invitations"),
                json!({"email": "y@a.test", "role": "MEMBER"}),
            ),
            (
                Method::DELETE,
                format!("/api/v1/tenants/{t}/invitations/{invitation_b}"),
                json!(null),
            ),
            (Method::GET, format!("/api/v1/tenants/{t}/roles"), json!(null)),
            (
                Method::POST,
                format!("/api/v1/tenants/{t}/roles"),
                json!({"name": "r", "permissions": []}),
            ),
            (
                Method::DELETE,
                format!("/api/v1/tenants/{t}/roles/{role_b}"),
                json!(null),
            ),
            (Method::GET, format!("/api/v1/tenants/{t}/audit"), json!(null)),
        ]
    };
    let mut expected_body = None;
    for target in [tb.clone(), missing.clone(), "not-a-uuid".to_string()] {
        for (method, uri, body) in routes(&target) {
            let a = call(&ctx, method.clone(), &uri, Some(&alice), body).await;
            assert_eq!(a.status, StatusCode::NOT_FOUND, "{method} {uri}: {a:?}");
            // A foreign tenant answers exactly like a missing one.
            let body = a.body.clone();
            assert_eq!(expected_body.get_or_insert(body.clone()), &body, "{method} {uri}");
        }
    }
    // Tenant B's ids used inside tenant A, where Alice is the owner.
    for (method, uri, body) in routes(&ta)
        .into_iter()
        .filter(|(_, uri, _)| uri.matches('/').count() > 5)
    {
        let a = call(&ctx, method.clone(), &uri, Some(&alice), body).await;
        assert_eq!(a.status, StatusCode::NOT_FOUND, "{method} {uri}: {a:?}");
    }
    // A foreign role cannot be handed out either.
    let a = call(
        &ctx,
        Method::POST,
        &format!("/api/v1/tenants/{ta}/invitations"),
        Some(&alice),
        json!({"email": "z@a.test", "role": role_b}),
    )
    .await;
    assert_eq!(a.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(a.body["error"]["details"][0]["field"], "role");
    // Nothing of B changed.
    let a = call(
        &ctx,
        Method::GET,
        &format!("/api/v1/tenants/{tb}/members/{member_b}"),
        Some(&bob),
        json!(null),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK);
    let a = call(
        &ctx,
        Method::GET,
        &format!("/api/v1/tenants/{tb}"),
        Some(&bob),
        json!(null),
    )
    .await;
    assert_eq!(a.body["name"], "tenant-b");
}

#[derive(Clone, Copy)]
enum Target {
    None,
    Member,
    Invitation,
    Role,
}

async fn every_built_in_role_against_every_guarded_route(t: TestDb) {
    let ctx = ctx!(t);
    let owner = user(&ctx, "owner@t.test").await;
    let tid = tenant(&ctx, &owner, "matrix").await;
    // (method, path after /tenants/{t}, permission, body, what the path needs)
    let routes: Vec<(Method, &str, &str, Value, Target)> = vec![
        (
            Method::PATCH,
            "",
            "tenant.update",
            json!({"name": "Renamed"}),
            Target::None,
        ),
        (Method::GET, "/members", "member.read", json!(null), Target::None),
        (
            Method::GET,
            "/members/{id}",
            "member.read",
            json!(null),
            Target::Member,
        ),
        (
            Method::PATCH,
            "/members/{id}",
            "member.update",
            json!({"role": "SUPPORT"}),
            Target::Member,
        ),
        (
            Method::DELETE,
            "/members/{id}",
            "member.remove",
            json!(null),
            Target::Member,
        ),
        (
            Method::GET,
            "/invitations",
            "member.read",
            json!(null),
            Target::None,
        ),
        (
            Method::POST,
            "/invitations",
            "member.invite",
            json!({"email": "{email}", "role": "SUPPORT"}),
            Target::None,
        ),
        (
            Method::DELETE,
            "/invitations/{id}",
            "member.invite",
            json!(null),
            Target::Invitation,
        ),
        (Method::GET, "/roles", "role.read", json!(null), Target::None),
        (
            Method::POST,
            "/roles",
            "role.manage",
            json!({"name": "{email}", "permissions": ["audit.read"]}),
            Target::None,
        ),
        (
            Method::DELETE,
            "/roles/{id}",
            "role.manage",
            json!(null),
            Target::Role,
        ),
        (Method::GET, "/audit", "audit.read", json!(null), Target::None),
    ];
    let mut n = 0;
    for role in [
        BuiltInRole::Owner,
        BuiltInRole::Admin,
        BuiltInRole::Support,
        BuiltInRole::Member,
    ] {
        let email = format!("as-{}@t.test", role.name().to_lowercase());
        let caller = user(&ctx, &email).await;
        join(&ctx, &owner, &tid, &caller, &email, role.name()).await;
        let held = role.permissions();
        for (method, path, permission, body, target) in &routes {
            n += 1;
            // A fresh object for each call, made by the owner.
            let id = match target {
                Target::None => String::new(),
                Target::Member => {
                    let e = format!("target{n}@t.test");
                    let b = user(&ctx, &e).await;
                    join(&ctx, &owner, &tid, &b, &e, "MEMBER").await
                }
                Target::Invitation => {
                    let a = call(
                        &ctx,
                        Method::POST,
                        &format!("/api/v1/tenants/{tid}/invitations"),
                        Some(&owner),
                        json!({"email": format!("inv{n}@t.test"), "role": "MEMBER"}),
                    )
                    .await;
                    a.body["invitation"]["id"].as_str().unwrap().to_string()
                }
                Target::Role => {
                    let a = call(
                        &ctx,
                        Method::POST,
                        &format!("/api/v1/tenants/{tid}/roles"),
                        Some(&owner),
                        json!({"name": format!("role{n}"), "permissions": ["audit.read"]}),
                    )
                    .await;
                    a.body["id"].as_str().unwrap().to_string()
                }
            };
            let uri = format!("/api/v1/tenants/{tid}{}", path.replace("{id}", &id));
            let body: Value =
                serde_json::from_str(&body.to_string().replace("{email}", &format!("new{n}@t.test")))
                    .unwrap();
            let a = call(&ctx, method.clone(), &uri, Some(&caller), body).await;
            if held.contains(*permission) {
                assert!(
                    a.status.is_success(),
                    "{} may {method} {path}: {a:?}",
                    role.name()
                );
            } else {
                assert_eq!(
                    a.status,
                    StatusCode::FORBIDDEN,
                    "{} may not {method} {path}: {a:?}",
                    role.name()
                );
            }
        }
    }
    // Any member may read the tenant itself.
    let a = call(
        &ctx,
        Method::GET,
        &format!("/api/v1/tenants/{tid}"),
        Some(&owner),
        json!(null),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK);
}

async fn custom_roles_and_no_escalation(t: TestDb) {
    let ctx = ctx!(t);
    let owner = user(&ctx, "owner@c.test").await;
    let admin = user(&ctx, "admin@c.test").await;
    let auditor = user(&ctx, "auditor@c.test").await;
    let tid = tenant(&ctx, &owner, "custom").await;
    let owner_member = call(
        &ctx,
        Method::GET,
        &format!("/api/v1/tenants/{tid}/members"),
        Some(&owner),
        json!(null),
    )
    .await
    .body["items"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    join(&ctx, &owner, &tid, &admin, "admin@c.test", "ADMIN").await;

    // A custom role: exactly its keys.
    let a = call(
        &ctx,
        Method::POST,
        &format!("/api/v1/tenants/{tid}/roles"),
        Some(&owner),
        json!({"name": "Auditor", "permissions": ["audit.read", "member.read"]}),
    )
    .await;
    assert_eq!(a.status, StatusCode::CREATED, "{a:?}");
    let role = a.body["id"].as_str().unwrap().to_string();
    let auditor_member = join(&ctx, &owner, &tid, &auditor, "auditor@c.test", &role).await;
    let a = call(
        &ctx,
        Method::GET,
        &format!("/api/v1/tenants/{tid}/audit"),
        Some(&auditor),
        json!(null),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK);
    let a = call(
        &ctx,
        Method::PATCH,
        &format!("/api/v1/tenants/{tid}"),
        Some(&auditor),
        json!({"name": "x"}),
    )
    .await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    let a = call(
        &ctx,
        Method::GET,
        &format!("/api/v1/tenants/{tid}/roles"),
        Some(&auditor),
        json!(null),
    )
    .await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    // A role in use cannot be deleted.
    let a = call(
        &ctx,
        Method::DELETE,
        &format!("/api/v1/tenants/{tid}/roles/{role}"),
        Some(&owner),
        json!(null),
    )
    .await;
    assert_eq!(a.status, StatusCode::CONFLICT);

    // Unknown keys and built-in names are refused, naming the field.
    let a = call(
        &ctx,
        Method::POST,
        &format!("/api/v1/tenants/{tid}/roles"),
        Some(&owner),
        json!({"name": "x", "permissions": ["root"]}),
    )
    .await;
    assert_eq!(a.body["error"]["details"][0]["field"], "permissions");
    let a = call(
        &ctx,
        Method::POST,
        &format!("/api/v1/tenants/{tid}/roles"),
        Some(&owner),
        json!({"name": "owner", "permissions": []}),
    )
    .await;
    assert_eq!(a.body["error"]["details"][0]["field"], "name");

    // An ADMIN lacks billing.manage, so cannot grant it in any way.
    let a = call(
        &ctx,
        Method::POST,
        &format!("/api/v1/tenants/{tid}/roles"),
        Some(&admin),
        json!({"name": "Payer", "permissions": ["billing.manage"]}),
    )
    .await;
    assert_eq!(
        (a.status, a.body["error"]["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("escalation_refused"))
    );
    let a = call(
        &ctx,
        Method::POST,
        &format!("/api/v1/tenants/{tid}/invitations"),
        Some(&admin),
        json!({"email": "new@c.test", "role": "OWNER"}),
    )
    .await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    let a = call(
        &ctx,
        Method::PATCH,
        &format!("/api/v1/tenants/{tid}/members/{auditor_member}"),
        Some(&admin),
        json!({"role": "OWNER"}),
    )
    .await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    // ...nor demote or remove someone whose role holds more than theirs.
    let a = call(
        &ctx,
        Method::PATCH,
        &format!("/api/v1/tenants/{tid}/members/{owner_member}"),
        Some(&admin),
        json!({"role": "MEMBER"}),
    )
    .await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    let a = call(
        &ctx,
        Method::DELETE,
        &format!("/api/v1/tenants/{tid}/members/{owner_member}"),
        Some(&admin),
        json!(null),
    )
    .await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    // Within their own permissions an ADMIN manages freely.
    let a = call(
        &ctx,
        Method::PATCH,
        &format!("/api/v1/tenants/{tid}/members/{auditor_member}"),
        Some(&admin),
        json!({"role": "SUPPORT"}),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{a:?}");
    let roles: BTreeSet<String> = call(
        &ctx,
        Method::GET,
        &format!("/api/v1/tenants/{tid}/members"),
        Some(&owner),
        json!(null),
    )
    .await
    .body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["role"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        roles,
        ["ADMIN", "OWNER", "SUPPORT"]
            .map(String::from)
            .into_iter()
            .collect()
    );
}

async fn the_last_owner_stays(t: TestDb) {
    // Built by hand to keep a subscription to the state's event bus.
    let state = t.state();
    let mut events = state.events.subscribe();
    let svc = test::init_service(app(state, common::metrics())).await;
    let ctx = Ctx { svc, t };
    let first = user(&ctx, "first@o.test").await;
    let second = user(&ctx, "second@o.test").await;
    let tid = tenant(&ctx, &first, "owners").await;
    let me = call(
        &ctx,
        Method::GET,
        &format!("/api/v1/tenants/{tid}/members"),
        Some(&first),
        json!(null),
    )
    .await
    .body["items"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let a = call(
        &ctx,
        Method::PATCH,
        &format!("/api/v1/tenants/{tid}/members/{me}"),
        Some(&first),
        json!({"role": "ADMIN"}),
    )
    .await;
    assert_eq!(
        (a.status, a.body["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("last_owner"))
    );
    let a = call(
        &ctx,
        Method::DELETE,
        &format!("/api/v1/tenants/{tid}/members/{me}"),
        Some(&first),
        json!(null),
    )
    .await;
    assert_eq!(
        (a.status, a.body["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("last_owner"))
    );
    assert!(events.try_recv().is_err(), "a refused removal publishes nothing");
    let second_member = join(&ctx, &first, &tid, &second, "second@o.test", "OWNER").await;
    let a = call(
        &ctx,
        Method::DELETE,
        &format!("/api/v1/tenants/{tid}/members/{me}"),
        Some(&first),
        json!(null),
    )
    .await;
    assert_eq!(a.status, StatusCode::NO_CONTENT, "{a:?}");
    // Published before the answer, so it is already there.
    match events.try_recv().unwrap() {
        PanelEvent::AccessRevoked { tenant, reason, .. } => {
            assert_eq!(tenant.unwrap().as_str(), tid);
            assert_eq!(reason, RevokeReason::MemberRemoved);
        }
    }
    let a = call(
        &ctx,
        Method::GET,
        &format!("/api/v1/tenants/{tid}"),
        Some(&first),
        json!(null),
    )
    .await;
    assert_eq!(a.status, StatusCode::NOT_FOUND, "gone after leaving");
    let a = call(
        &ctx,
        Method::DELETE,
        &format!("/api/v1/tenants/{tid}/members/{second_member}"),
        Some(&second),
        json!(null),
    )
    .await;
    assert_eq!(a.status, StatusCode::CONFLICT);
}

async fn a_tenant_can_require_two_factor(t: TestDb) {
    let ctx = ctx!(t);
    let owner = user(&ctx, "owner@2fa.test").await;
    let member = user(&ctx, "member@2fa.test").await;
    let tid = tenant(&ctx, &owner, "strict").await;
    join(&ctx, &owner, &tid, &member, "member@2fa.test", "MEMBER").await;
    let a = call(
        &ctx,
        Method::GET,
        &format!("/api/v1/tenants/{tid}"),
        Some(&member),
        json!(null),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK);
    let a = call(
        &ctx,
        Method::PATCH,
        &format!("/api/v1/tenants/{tid}"),
        Some(&owner),
        json!({"require_two_factor": true}),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{a:?}");
    let a = call(
        &ctx,
        Method::GET,
        &format!("/api/v1/tenants/{tid}"),
        Some(&member),
        json!(null),
    )
    .await;
    assert_eq!(
        (a.status, a.body["error"]["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("two_factor_required"))
    );
    // After turning 2FA on, the member is let in again.
    let a = call(
        &ctx,
        Method::POST,
        "/api/v1/users/me/two-factor/setup",
        Some(&member),
        json!({}),
    )
    .await;
    let secret = a.body["secret"].as_str().unwrap().to_string();
    let code = mamba_panel::identity::totp_for(&secret, "member@2fa.test")
        .unwrap()
        .generate(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs(),
        )
        .to_string();
    let a = call(
        &ctx,
        Method::POST,
        "/api/v1/users/me/two-factor/enable",
        Some(&member),
        json!({"code": code}),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{a:?}");
    let a = call(
        &ctx,
        Method::GET,
        &format!("/api/v1/tenants/{tid}"),
        Some(&member),
        json!(null),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK);
}

async fn audit_count(ctx_t: &TestDb, tenant: &str) -> i64 {
    #[derive(diesel::QueryableByName)]
    struct Count {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    let mut conn = ctx_t.db.get_blocking().unwrap();
    let rows: Vec<Count> = diesel::RunQueryDsl::load(
        diesel::sql_query(format!(
            "SELECT COUNT(*) AS n FROM audit_log WHERE tenant_id = '{tenant}'"
        )),
        &mut *conn,
    )
    .unwrap();
    rows[0].n
}

async fn every_change_writes_one_audit_entry_and_the_log_filters_and_pages(t: TestDb) {
    let ctx = ctx!(t);
    let owner = user(&ctx, "owner@audit.test").await;
    let joiner = user(&ctx, "joiner@audit.test").await;
    let tid = tenant(&ctx, &owner, "audited").await;
    assert_eq!(audit_count(&ctx.t, &tid).await, 1, "tenant.create");

    // Each state-changing route, and the one entry it must add.
    let mut expected = 1;
    let mut step = |_: &str| {
        expected += 1;
        expected
    };
    let a = call(
        &ctx,
        Method::PATCH,
        &format!("/api/v1/tenants/{tid}"),
        Some(&owner),
        json!({"name": "Audited"}),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(audit_count(&ctx.t, &tid).await, step("tenant.update"));
    let a = call(
        &ctx,
        Method::POST,
        &format!("/api/v1/tenants/{tid}/roles"),
        Some(&owner),
        json!({"name": "Custom", "permissions": ["audit.read"]}),
    )
    .await;
    let role = a.body["id"].as_str().unwrap().to_string();
    assert_eq!(audit_count(&ctx.t, &tid).await, step("role.create"));
    let a = call(
        &ctx,
        Method::POST,
        &format!("/api/v1/tenants/{tid}/invitations"),
        Some(&owner),
        json!({"email": "joiner@audit.test", "role": "MEMBER"}),
    )
    .await;
    let token = a.body["token"].as_str().unwrap().to_string();
    assert_eq!(audit_count(&ctx.t, &tid).await, step("invitation.create"));
    let a = call(
        &ctx,
        Method::POST,
        &format!("/api/v1/tenants/{tid}/invitations"),
        Some(&owner),
        json!({"email": "other@audit.test", "role": "MEMBER"}),
    )
    .await;
    let other_invitation = a.body["invitation"]["id"].as_str().unwrap().to_string();
    assert_eq!(audit_count(&ctx.t, &tid).await, step("invitation.create"));
    let a = call(
        &ctx,
        Method::DELETE,
        &format!("/api/v1/tenants/{tid}/invitations/{other_invitation}"),
        Some(&owner),
        json!(null),
    )
    .await;
    assert_eq!(a.status, StatusCode::NO_CONTENT);
    assert_eq!(audit_count(&ctx.t, &tid).await, step("invitation.revoke"));
    let a = call(
        &ctx,
        Method::POST,
        "/api/v1/invitations/accept",
        Some(&joiner),
        json!({"token": token}),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(audit_count(&ctx.t, &tid).await, step("invitation.accept"));
    let members = call(
        &ctx,
        Method::GET,
        &format!("/api/v1/tenants/{tid}/members"),
        Some(&owner),
        json!(null),
    )
    .await;
    let joiner_member = members.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["email"] == "joiner@audit.test")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let a = call(
        &ctx,
        Method::PATCH,
        &format!("/api/v1/tenants/{tid}/members/{joiner_member}"),
        Some(&owner),
        json!({"role": role}),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(audit_count(&ctx.t, &tid).await, step("member.update"));
    let a = call(
        &ctx,
        Method::DELETE,
        &format!("/api/v1/tenants/{tid}/members/{joiner_member}"),
        Some(&owner),
        json!(null),
    )
    .await;
    assert_eq!(a.status, StatusCode::NO_CONTENT);
    assert_eq!(audit_count(&ctx.t, &tid).await, step("member.remove"));
    let a = call(
        &ctx,
        Method::DELETE,
        &format!("/api/v1/tenants/{tid}/roles/{role}"),
        Some(&owner),
        json!(null),
    )
    .await;
    assert_eq!(a.status, StatusCode::NO_CONTENT);
    assert_eq!(audit_count(&ctx.t, &tid).await, step("role.delete"));
    // Refused changes write nothing.
    let a = call(
        &ctx,
        Method::DELETE,
        &format!("/api/v1/tenants/{tid}/roles/{role}"),
        Some(&owner),
        json!(null),
    )
    .await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    assert_eq!(audit_count(&ctx.t, &tid).await, expected);

    // Reading: filters and cursors.
    let base = format!("/api/v1/tenants/{tid}/audit");
    let all = call(&ctx, Method::GET, &base, Some(&owner), json!(null)).await;
    let items = all.body["items"].as_array().unwrap();
    assert_eq!(items.len() as i64, expected);
    assert_eq!(items[0]["action"], "tenant.create");
    assert_eq!(items[0]["ip"], IP);
    let a = call(
        &ctx,
        Method::GET,
        &format!("{base}?action=invitation.create"),
        Some(&owner),
        json!(null),
    )
    .await;
    assert_eq!(a.body["items"].as_array().unwrap().len(), 2);
    let a = call(
        &ctx,
        Method::GET,
        &format!("{base}?resource_type=role&resource_id={role}"),
        Some(&owner),
        json!(null),
    )
    .await;
    assert_eq!(a.body["items"].as_array().unwrap().len(), 2);
    let joiner_id = items.iter().find(|e| e["action"] == "invitation.accept").unwrap()["actor_id"]
        .as_str()
        .unwrap()
        .to_string();
    let a = call(
        &ctx,
        Method::GET,
        &format!("{base}?actor_id={joiner_id}"),
        Some(&owner),
        json!(null),
    )
    .await;
    assert_eq!(a.body["items"].as_array().unwrap().len(), 1);
    let after_all = items.last().unwrap()["created_at"].as_i64().unwrap() + 1;
    let a = call(
        &ctx,
        Method::GET,
        &format!("{base}?since={after_all}"),
        Some(&owner),
        json!(null),
    )
    .await;
    assert!(a.body["items"].as_array().unwrap().is_empty());
    let a = call(
        &ctx,
        Method::GET,
        &format!("{base}?until={after_all}"),
        Some(&owner),
        json!(null),
    )
    .await;
    assert_eq!(a.body["items"].as_array().unwrap().len() as i64, expected);
    let mut seen = Vec::new();
    let mut uri = format!("{base}?limit=3");
    loop {
        let a = call(&ctx, Method::GET, &uri, Some(&owner), json!(null)).await;
        assert!(a.body["items"].as_array().unwrap().len() <= 3);
        seen.extend(
            a.body["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["id"].clone()),
        );
        match a.body["next_cursor"].as_str() {
            Some(c) => uri = format!("{base}?limit=3&cursor={c}"),
            None => break,
        }
    }
    assert_eq!(seen, items.iter().map(|e| e["id"].clone()).collect::<Vec<_>>());
    let a = call(
        &ctx,
        Method::GET,
        &format!("{base}?limit=0"),
        Some(&owner),
        json!(null),
    )
    .await;
    assert_eq!(a.body["error"]["details"][0]["field"], "limit");
}
