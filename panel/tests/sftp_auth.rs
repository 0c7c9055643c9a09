//! SFTP logins checked by the panel, on both backends: users' SSH keys through the account
//! API, and `POST /api/node/v1/sftp/auth` on the real node listener, asked by nodes enrolled
//! with wings' real enrollment code, through wings' own `PanelAuthSource` and raw. A right
//! password and a registered key are granted the role's `file.*` permissions; a wrong
//! password, an unknown user and an unknown key get one answer; a non-member, another
//! node's server and a two-factor account's password are refused; password guessing hits
//! the login limits (SECURITY-CHECKLIST 15); a deauthorized user's cached grant is dropped
//! (SECURITY-CHECKLIST 12, for new logins). What a user does over SFTP and through the
//! file manager reaches the server's activity log, through wings' reporter.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::web;
use common::node::free_port;
use common::{TestDb, send};
use diesel::prelude::*;
use mamba_panel::http::{AppState, app};
use mamba_shared::ids::ServerId;
use mamba_shared::node_sftp::SFTP_AUTH_PATH;
use mamba_wings::node_identity::NodeIdentity;
use mamba_wings::sftp::auth::{AuthSource, Credential, LoginName};
use mamba_wings::sftp::panel_auth::PanelAuthSource;
use mamba_wings::tokens::TokenVerifier;
use russh::keys::PublicKey;
use serde_json::json;

both_backends!(
    passwords_keys_members_and_nodes,
    password_guessing_is_rate_limited,
    ssh_keys_through_the_account_api,
    real_node_and_real_clients,
    activity_from_sftp_and_the_file_manager_reaches_the_panel,
);

const IP: &str = "198.51.100.70";
const PASSWORD: &str = "sftp auth test passphrase";
const CLIENT: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(203, 0, 113, 9));

const KEY_A: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAILC5luZSKdAsnXmQLIF1kkq8Ca552mXdEdKthWmo6ESS alice@laptop";
const KEY_A_FINGERPRINT: &str = "SHA256:WP69KUlimChNPFmNMY3rLtMg0mZ+kWEhPa4dCqV+4B4";
const KEY_OTHER: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDY8IJjAKbWmQcwpsmkcx3oqcuCQkhdjC0pI9YC4xE2q other";

struct Panel {
    state: web::Data<AppState>,
    url: String,
    data: tempfile::TempDir,
}

impl Panel {
    fn start(t: &TestDb) -> Panel {
        let mut config = t.config();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("https://{}", listener.local_addr().unwrap());
        config.node_listener.public_url = url.clone();
        let state = t.state_with(config);
        let server = mamba_panel::http::node_pki::node_server(state.clone(), listener).unwrap();
        actix_web::rt::spawn(server);
        let panel = Panel {
            state,
            url,
            data: tempfile::tempdir().unwrap(),
        };
        make_user(t, &panel.state, "op@example.test", true);
        panel
    }

    async fn bearer(&self, email: &str) -> String {
        let svc = actix_web::test::init_service(app(self.state.clone(), common::metrics())).await;
        let login = send(
            &svc,
            common::post(
                "/api/v1/auth/login",
                json!({"email": email, "password": PASSWORD, "client": "api"}),
                IP,
            )
            .to_request(),
        )
        .await;
        assert_eq!(login.status, StatusCode::OK, "{login:?}");
        format!(
            "Bearer {}",
            login.body["tokens"]["access_token"].as_str().unwrap()
        )
    }

    /// A node row, enrolled through an operator's token with wings' real client.
    async fn enrolled_node(&self, t: &TestDb, name: &str) -> (String, NodeIdentity) {
        let node = make_node(t, name);
        let token = self.token(&node).await;
        let dir = self.data.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let identity = NodeIdentity::enroll(&dir, &self.url, &token).await.unwrap();
        (node, identity)
    }

    /// An operator's enrollment token for `node`, through the API.
    async fn token(&self, node: &str) -> String {
        let bearer = self.bearer("op@example.test").await;
        let svc = actix_web::test::init_service(app(self.state.clone(), common::metrics())).await;
        let a = send(
            &svc,
            actix_web::test::TestRequest::post()
                .uri(&format!("/api/v1/admin/nodes/{node}/enrollment-token"))
                .peer_addr(common::peer(IP))
                .insert_header(("authorization", bearer))
                .to_request(),
        )
        .await;
        assert_eq!(a.status, StatusCode::CREATED, "{a:?}");
        a.body["token"].as_str().unwrap().to_string()
    }
}

fn make_node(t: &TestDb, name: &str) -> String {
    use mamba_panel::db::schema::nodes;
    let id = uuid::Uuid::now_v7().to_string();
    let mut conn = t.db.get_blocking().unwrap();
    diesel::insert_into(nodes::table)
        .values((
            nodes::id.eq(&id),
            nodes::name.eq(name),
            nodes::fqdn.eq(format!("{name}.example.test")),
            nodes::location.eq("test"),
            nodes::cpu_percent.eq(400i64),
            nodes::memory_mb.eq(8192i64),
            nodes::disk_mb.eq(100_000i64),
            nodes::overallocation_percent.eq(0i64),
            nodes::is_public.eq(true),
            nodes::maintenance.eq(false),
            nodes::status.eq("active"),
            nodes::reservation_seq.eq(0i64),
            nodes::created_at.eq(0i64),
            nodes::updated_at.eq(0i64),
        ))
        .execute(&mut conn)
        .unwrap();
    id
}

fn make_user(t: &TestDb, state: &AppState, email: &str, super_admin: bool) -> String {
    let hash = state.hasher.hash(PASSWORD).unwrap();
    let mut conn = t.db.get_blocking().unwrap();
    mamba_panel::users::create(
        &mut conn,
        mamba_panel::users::NewUser {
            email: email.into(),
            display_name: "Someone".into(),
            password_hash: hash,
            email_verified: true,
            is_super_admin: super_admin,
        },
        &mamba_panel::audit::Actor::System,
        &mamba_panel::request_meta::RequestMeta::system(),
    )
    .unwrap()
    .id
    .to_string()
}

fn make_tenant(t: &TestDb, owner: &str, slug: &str) -> String {
    let mut conn = t.db.get_blocking().unwrap();
    mamba_panel::tenants::create(
        &mut conn,
        &mamba_panel::ids::UserId::parse(owner).unwrap(),
        slug,
        slug,
        &mamba_panel::request_meta::RequestMeta::system(),
    )
    .unwrap()
    .id
    .to_string()
}

fn remove_member(t: &TestDb, tenant: &str, user: &str) {
    use mamba_panel::db::schema::memberships;
    let mut conn = t.db.get_blocking().unwrap();
    let n = diesel::delete(
        memberships::table
            .filter(memberships::tenant_id.eq(tenant))
            .filter(memberships::user_id.eq(user)),
    )
    .execute(&mut conn)
    .unwrap();
    assert_eq!(n, 1);
}

/// A server row on `node` (the data layer's placement is exercised by the allocation tests;
/// here only the row matters).
fn make_server(t: &TestDb, tenant: &str, node: &str) -> String {
    make_server_with_id(t, tenant, node, &uuid::Uuid::now_v7().to_string())
}

fn make_server_with_id(t: &TestDb, tenant: &str, node: &str, id: &str) -> String {
    use mamba_panel::db::schema::servers;
    let id = id.to_string();
    let mut conn = t.db.get_blocking().unwrap();
    diesel::insert_into(servers::table)
        .values((
            servers::id.eq(&id),
            servers::tenant_id.eq(tenant),
            servers::node_id.eq(node),
            servers::name.eq("game"),
            servers::blueprint.eq("freeciv"),
            servers::memory_mb.eq(512i64),
            servers::cpu_percent.eq(100i64),
            servers::disk_mb.eq(1024i64),
            servers::variables.eq("{}"),
            servers::status.eq("running"),
            servers::created_at.eq(0i64),
            servers::updated_at.eq(0i64),
        ))
        .execute(&mut conn)
        .unwrap();
    id
}

fn enable_totp(t: &TestDb, user: &str) {
    use mamba_panel::db::schema::users;
    let mut conn = t.db.get_blocking().unwrap();
    diesel::update(users::table.find(user))
        .set(users::totp_enabled_at.eq(Some(1i64)))
        .execute(&mut conn)
        .unwrap();
}

async fn add_key(panel: &Panel, email: &str, key: &str) -> common::Answer {
    let bearer = panel.bearer(email).await;
    let svc = actix_web::test::init_service(app(panel.state.clone(), common::metrics())).await;
    send(
        &svc,
        common::post("/api/v1/users/me/ssh-keys", json!({"public_key": key}), IP)
            .insert_header(("authorization", bearer))
            .to_request(),
    )
    .await
}

/// One raw request to the SFTP check, as `identity`'s node.
async fn raw(panel: &Panel, identity: &NodeIdentity, body: serde_json::Value) -> (u16, serde_json::Value) {
    let response = identity
        .panel_client()
        .unwrap()
        .post(format!("{}{SFTP_AUTH_PATH}", panel.url))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(serde_json::Value::Null))
}

fn password(user: &str, server: &str, password: &str) -> serde_json::Value {
    json!({
        "user": user,
        "server_short": &server[..8],
        "client_ip": CLIENT.to_string(),
        "credential": {"type": "password", "password": password},
    })
}

fn panel_source(identity: &NodeIdentity, dir: &std::path::Path) -> (PanelAuthSource, Arc<TokenVerifier>) {
    let tokens = Arc::new(TokenVerifier::new(&Default::default(), dir).unwrap());
    let source = PanelAuthSource::new(identity, tokens.clone(), Duration::from_secs(600)).unwrap();
    (source, tokens)
}

fn login(user: &str, server: &str) -> LoginName {
    LoginName::parse(&format!("{user}.{}", &server[..8])).unwrap()
}

async fn passwords_keys_members_and_nodes(t: TestDb) {
    let panel = Panel::start(&t);
    let (node_a, identity_a) = panel.enrolled_node(&t, "node-a").await;
    let (node_b, identity_b) = panel.enrolled_node(&t, "node-b").await;
    let owner = make_user(&t, &panel.state, "owner@example.test", false);
    let alice = make_user(&t, &panel.state, "alice@example.test", false);
    make_user(&t, &panel.state, "carol@example.test", false);
    let tenant = make_tenant(&t, &owner, "acme");
    common::add_membership(&t, &tenant, &alice, "SUPPORT");
    let on_a = make_server(&t, &tenant, &node_a);
    // Ids made within a minute share their first 8 characters: give node B's another.
    let v7 = uuid::Uuid::now_v7().to_string();
    let flipped = if v7.starts_with('f') { '0' } else { 'f' };
    let on_b = make_server_with_id(&t, &tenant, &node_b, &format!("{flipped}{}", &v7[1..]));
    let a = add_key(&panel, "alice@example.test", KEY_A).await;
    assert_eq!(a.status, StatusCode::CREATED, "{a:?}");

    // A right password: the role's file permissions, and nothing else.
    let (status, body) = raw(
        &panel,
        &identity_a,
        password("alice@example.test", &on_a, PASSWORD),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["user_id"], alice.as_str());
    assert_eq!(body["server_id"], on_a.as_str());
    assert_eq!(body["permissions"], json!(["file.read", "file.read-content"]));
    // The user id works as the login's user part too, and the email in any case.
    let (status, _) = raw(&panel, &identity_a, password(&alice, &on_a, PASSWORD)).await;
    assert_eq!(status, 200);
    let (status, _) = raw(
        &panel,
        &identity_a,
        password("Alice@Example.TEST", &on_a, PASSWORD),
    )
    .await;
    assert_eq!(status, 200);
    // The owner has every file permission.
    let (status, body) = raw(
        &panel,
        &identity_a,
        password("owner@example.test", &on_a, PASSWORD),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["permissions"].as_array().unwrap().len(), 5);

    // Wrong password, unknown user, unknown key: one answer.
    let (s1, b1) = raw(
        &panel,
        &identity_a,
        password("alice@example.test", &on_a, "wrong password!"),
    )
    .await;
    let (s2, b2) = raw(
        &panel,
        &identity_a,
        password("nobody@example.test", &on_a, PASSWORD),
    )
    .await;
    let (s3, b3) = raw(
        &panel,
        &identity_a,
        json!({"user": "alice@example.test", "server_short": &on_a[..8], "client_ip": CLIENT.to_string(),
               "credential": {"type": "public_key", "public_key": KEY_OTHER}}),
    )
    .await;
    assert_eq!((s1, s2, s3), (401, 401, 401));
    assert_eq!(b1, b2);
    assert_eq!(b1, b3);
    assert_eq!(b1["error"]["code"], "invalid_credentials");

    // A non-member with the right password is refused.
    let (status, body) = raw(
        &panel,
        &identity_a,
        password("carol@example.test", &on_a, PASSWORD),
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"]["code"], "no_access");
    // Node A asking about node B's server: refused as if it did not exist; node B may.
    let (status, body) = raw(
        &panel,
        &identity_a,
        password("alice@example.test", &on_b, PASSWORD),
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"]["code"], "unknown_server");
    let (status, _) = raw(
        &panel,
        &identity_b,
        password("alice@example.test", &on_b, PASSWORD),
    )
    .await;
    assert_eq!(status, 200);
    // Two of alice's servers on node A share a short id: refused as ambiguous; the whole id
    // tells them apart.
    let twin = make_server_with_id(
        &t,
        &tenant,
        &node_a,
        &format!("{}{}", &on_a[..8], &uuid::Uuid::now_v7().to_string()[8..]),
    );
    let (status, body) = raw(&panel, &identity_a, password(&alice, &on_a, PASSWORD)).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"]["code"], "ambiguous_server");
    let mut whole = password(&alice, &on_a, PASSWORD);
    whole["server_short"] = json!(twin);
    let (status, body) = raw(&panel, &identity_a, whole).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["server_id"], twin.as_str());
    {
        use mamba_panel::db::schema::servers;
        let mut conn = t.db.get_blocking().unwrap();
        diesel::delete(servers::table.find(&twin))
            .execute(&mut conn)
            .unwrap();
    }
    // A suspended server refuses every login.
    let suspend = |at: Option<i64>| {
        use mamba_panel::db::schema::servers;
        let mut conn = t.db.get_blocking().unwrap();
        diesel::update(servers::table.find(&on_a))
            .set(servers::suspended_at.eq(at))
            .execute(&mut conn)
            .unwrap();
    };
    suspend(Some(1));
    let (status, body) = raw(
        &panel,
        &identity_a,
        password("owner@example.test", &on_a, PASSWORD),
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"]["code"], "server_suspended");
    suspend(None);
    // Bad input is a 4xx, never a 5xx.
    let (status, _) = raw(&panel, &identity_a, json!({"user": "x"})).await;
    assert_eq!(status, 400);
    let (status, _) = raw(
        &panel,
        &identity_a,
        password("alice@example.test", "%%%%%%%%", PASSWORD),
    )
    .await;
    assert_eq!(status, 403);

    // Through wings' own source: a key, a password, and the cache.
    let (source, tokens) = panel_source(&identity_a, panel.data.path());
    let key = PublicKey::from_openssh(KEY_A).unwrap();
    let grant = source
        .authenticate(
            &login("alice@example.test", &on_a),
            Credential::PublicKey(&key),
            CLIENT,
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(grant.server, ServerId::new(on_a.clone()).unwrap());
    assert_eq!(grant.user_id, alice);
    assert!(grant.can("file.read-content") && !grant.can("file.create"));
    let other = PublicKey::from_openssh(KEY_OTHER).unwrap();
    assert!(
        source
            .authenticate(
                &login("alice@example.test", &on_a),
                Credential::PublicKey(&other),
                CLIENT
            )
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        source
            .authenticate(
                &login("alice@example.test", &on_a),
                Credential::Password(PASSWORD),
                CLIENT
            )
            .await
            .unwrap()
            .is_some()
    );
    assert!(
        source
            .authenticate(
                &login("carol@example.test", &on_a),
                Credential::Password(PASSWORD),
                CLIENT
            )
            .await
            .unwrap()
            .is_none()
    );
    // Refusals are not cached; the two grants are.
    assert_eq!(source.cached_len(), 2);

    // Removed from the tenant: the cached grant still answers until the node is told...
    remove_member(&t, &tenant, &alice);
    assert!(
        source
            .authenticate(
                &login("alice@example.test", &on_a),
                Credential::PublicKey(&key),
                CLIENT
            )
            .await
            .unwrap()
            .is_some()
    );
    // ...and the deauthorize route (what it calls) drops it: the panel is asked, and refuses.
    tokens
        .deauthorize(&ServerId::new(on_a.clone()).unwrap(), &alice)
        .unwrap();
    assert!(
        source
            .authenticate(
                &login("alice@example.test", &on_a),
                Credential::PublicKey(&key),
                CLIENT
            )
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        source
            .authenticate(
                &login("alice@example.test", &on_a),
                Credential::Password(PASSWORD),
                CLIENT
            )
            .await
            .unwrap()
            .is_none()
    );

    // Two-factor accounts: a key, never a password alone.
    common::add_membership(&t, &tenant, &alice, "MEMBER");
    enable_totp(&t, &alice);
    let (status, body) = raw(
        &panel,
        &identity_a,
        password("alice@example.test", &on_a, PASSWORD),
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"]["code"], "key_required");
    std::fs::create_dir_all(panel.data.path().join("fresh")).unwrap();
    let (fresh, _) = panel_source(&identity_a, &panel.data.path().join("fresh"));
    let grant = fresh
        .authenticate(
            &login("alice@example.test", &on_a),
            Credential::PublicKey(&key),
            CLIENT,
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(grant.permissions.len(), 5);
}

async fn password_guessing_is_rate_limited(t: TestDb) {
    let panel = Panel::start(&t);
    let (node, identity) = panel.enrolled_node(&t, "node-a").await;
    let owner = make_user(&t, &panel.state, "owner@example.test", false);
    let tenant = make_tenant(&t, &owner, "acme");
    let server = make_server(&t, &tenant, &node);
    let limit = panel.state.config.rate_limits.login_per_account_per_15min;
    for _ in 0..limit {
        let (status, _) = raw(
            &panel,
            &identity,
            password("owner@example.test", &server, "a wrong guess"),
        )
        .await;
        assert_eq!(status, 401);
    }
    // Over the account's limit from this address: even the right password is refused...
    let (status, body) = raw(
        &panel,
        &identity,
        password("owner@example.test", &server, PASSWORD),
    )
    .await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"]["code"], "rate_limited");
    // ...while the owner, from another address, still gets in.
    let mut elsewhere = password("owner@example.test", &server, PASSWORD);
    elsewhere["client_ip"] = json!("192.0.2.44");
    let (status, _) = raw(&panel, &identity, elsewhere).await;
    assert_eq!(status, 200);
    // The allowance is the API login's: the API refuses this address for the account too.
    let svc = actix_web::test::init_service(app(panel.state.clone(), common::metrics())).await;
    let a = send(
        &svc,
        common::post(
            "/api/v1/auth/login",
            json!({"email": "owner@example.test", "password": PASSWORD, "client": "api"}),
            &CLIENT.to_string(),
        )
        .to_request(),
    )
    .await;
    assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS, "{a:?}");
}

async fn ssh_keys_through_the_account_api(t: TestDb) {
    let panel = Panel::start(&t);
    make_user(&t, &panel.state, "alice@example.test", false);
    let bearer = panel.bearer("alice@example.test").await;
    let svc = actix_web::test::init_service(app(panel.state.clone(), common::metrics())).await;
    let added = add_key(&panel, "alice@example.test", KEY_A).await;
    assert_eq!(added.status, StatusCode::CREATED, "{added:?}");
    assert_eq!(added.body["fingerprint"], KEY_A_FINGERPRINT);
    assert_eq!(added.body["algorithm"], "ssh-ed25519");
    assert_eq!(added.body["name"], "alice@laptop");
    assert!(
        !added.body["public_key"]
            .as_str()
            .unwrap()
            .contains("alice@laptop")
    );
    let again = add_key(&panel, "alice@example.test", KEY_A).await;
    assert_eq!(again.status, StatusCode::CONFLICT, "{again:?}");
    for bad in [
        "",
        "ssh-ed25519 nope",
        "not a key at all",
        "ssh-dss AAAAB3NzaC1kc3MAAACBAP",
    ] {
        let a = add_key(&panel, "alice@example.test", bad).await;
        assert_eq!(a.status, StatusCode::UNPROCESSABLE_ENTITY, "{bad:?}: {a:?}");
    }
    let list = send(
        &svc,
        common::get("/api/v1/users/me/ssh-keys", IP)
            .insert_header(("authorization", bearer.clone()))
            .to_request(),
    )
    .await;
    assert_eq!(list.status, StatusCode::OK);
    assert_eq!(list.body["data"].as_array().unwrap().len(), 1);
    let id = added.body["id"].as_str().unwrap();
    let delete = |uri: String| {
        actix_web::test::TestRequest::delete()
            .uri(&uri)
            .peer_addr(common::peer(IP))
            .insert_header(("authorization", bearer.clone()))
            .to_request()
    };
    let gone = send(&svc, delete(format!("/api/v1/users/me/ssh-keys/{id}"))).await;
    assert_eq!(gone.status, StatusCode::NO_CONTENT, "{gone:?}");
    let again = send(&svc, delete(format!("/api/v1/users/me/ssh-keys/{id}"))).await;
    assert_eq!(again.status, StatusCode::NOT_FOUND);
    let junk = send(&svc, delete("/api/v1/users/me/ssh-keys/not-a-uuid".into())).await;
    assert_eq!(junk.status, StatusCode::NOT_FOUND);
    // Each change is audited.
    let mut conn = t.db.get_blocking().unwrap();
    let actions: Vec<String> = {
        use mamba_panel::db::schema::audit_log;
        audit_log::table
            .filter(audit_log::action.like("user.ssh_key.%"))
            .order(audit_log::id.asc())
            .select(audit_log::action)
            .load(&mut conn)
            .unwrap()
    };
    assert_eq!(actions, ["user.ssh_key.add", "user.ssh_key.delete"]);
    // Not logged in: 401.
    let anon = send(&svc, common::get("/api/v1/users/me/ssh-keys", IP).to_request()).await;
    assert_eq!(anon.status, StatusCode::UNAUTHORIZED);
}

// ------------------------------------------------------------------ end to end

/// The `wings` binary `cargo test --workspace` builds next to this test's executable.
fn wings_binary() -> Option<std::path::PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let bin = exe.parent()?.parent()?.join("wings");
    bin.exists().then_some(bin)
}

fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// A real wings process, enrolled with the panel through `wings enroll`.
struct Node {
    child: Option<std::process::Child>,
    dir: tempfile::TempDir,
    id: String,
    api: reqwest::Client,
    api_url: String,
    sftp_port: u16,
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let filter = format!("label=mamba.data-dir={}", self.dir.path().join("data").display());
        if let Ok(out) = std::process::Command::new("docker")
            .args(["ps", "-aq", "--filter", &filter])
            .output()
        {
            for id in String::from_utf8_lossy(&out.stdout).lines() {
                let _ = std::process::Command::new("docker")
                    .args(["rm", "-f", id])
                    .output();
            }
        }
        if std::thread::panicking() {
            eprintln!(
                "--- wings log ---\n{}",
                std::fs::read_to_string(self.dir.path().join("wings.log")).unwrap_or_default()
            );
        }
    }
}

async fn wait_for<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

impl Node {
    async fn start(bin: &std::path::Path, panel: &Panel, t: &TestDb, cache_secs: u64) -> Node {
        let id = make_node(t, "e2e");
        let dir = tempfile::Builder::new()
            .prefix("mamba-sftp-e2e")
            .tempdir()
            .unwrap();
        let (api_port, public_port, sftp_port) = (free_port(), free_port(), free_port());
        let config = dir.path().join("wings.toml");
        std::fs::write(
            &config,
            format!(
                "[api]\nlisten = \"127.0.0.1:{api_port}\"\npublic_listen = \"127.0.0.1:{public_port}\"\n\n\
                 [system]\ndata_dir = \"{}\"\n\n[sftp]\nlisten = \"127.0.0.1:{sftp_port}\"\nauth = \"panel\"\n\
                 panel_cache_secs = {cache_secs}\n",
                dir.path().join("data").display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("wings.log")).unwrap();
        let token = panel.token(&id).await;
        let enroll = tokio::process::Command::new(bin)
            .arg("--config")
            .arg(&config)
            .args(["enroll", "--panel", &panel.url, "--token", &token])
            .output()
            .await
            .unwrap();
        assert!(
            enroll.status.success(),
            "{}",
            String::from_utf8_lossy(&enroll.stderr)
        );
        // One start at a time: wings creates the shared Docker network when it is missing,
        // and two creating it at once would make two networks of the same name.
        static STARTING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
        let starting = STARTING.lock().await;
        let child = std::process::Command::new(bin)
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "info,mamba_wings=debug")
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let tls = panel.state.pki.client_for_node(&id).unwrap();
        let api = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .timeout(Duration::from_secs(60))
            // The test blocks on client processes for seconds at a time; a pooled connection
            // wings closed meanwhile would fail the next request.
            .pool_max_idle_per_host(0)
            .build()
            .unwrap();
        let node = Node {
            child: Some(child),
            dir,
            id,
            api,
            api_url: format!("https://127.0.0.1:{api_port}"),
            sftp_port,
        };
        wait_for("wings to answer over mutual TLS", || async {
            let r = node
                .api
                .get(format!("{}/api/system", node.api_url))
                .send()
                .await
                .ok()?;
            r.status().is_success().then_some(())
        })
        .await;
        drop(starting);
        node
    }

    async fn post(&self, path: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
        let r = self
            .api
            .post(format!("{}{path}", self.api_url))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(serde_json::Value::Null))
    }

    /// The panel's server, created on this node as the panel will push it.
    async fn create_server(&self, id: &str) {
        let text =
            std::fs::read_to_string(workspace_root().join("wings/tests/fixtures/testbox.yaml")).unwrap();
        let blueprint: serde_json::Value = serde_norway::from_str(&text).unwrap();
        let (status, body) = self
            .post(
                "/api/servers",
                json!({
                    "id": id,
                    "blueprint": blueprint,
                    "variables": {},
                    "allocations": {"default": {"ip": "127.0.0.1", "port": free_port()}},
                    "start_on_completion": false,
                }),
            )
            .await;
        assert_eq!(status, 202, "{body}");
        wait_for("the install", || async {
            let r = self
                .api
                .get(format!("{}/api/servers/{id}", self.api_url))
                .send()
                .await
                .ok()?;
            let server: serde_json::Value = r.json().await.ok()?;
            (server["install"]["status"] == "installed").then_some(())
        })
        .await;
    }

    /// paramiko in another process running `ops`: one JSON line per operation.
    fn paramiko_ops(&self, login: &str, ops: serde_json::Value) -> Vec<serde_json::Value> {
        let out = std::process::Command::new("python3")
            .arg(workspace_root().join("wings/tests/sftp_client.py"))
            .arg(self.sftp_port.to_string())
            .arg(login)
            .args(["--password", PASSWORD, "ops"])
            .arg(ops.to_string())
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// paramiko in another process (wings' SFTP test client): whether the login worked.
    fn paramiko_login(&self, login: &str, auth: &[&str]) -> bool {
        let out = std::process::Command::new("python3")
            .arg(workspace_root().join("wings/tests/sftp_client.py"))
            .arg(self.sftp_port.to_string())
            .arg(login)
            .args(auth)
            .arg("login")
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let line: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        line["ok"] == true
    }

    /// OpenSSH's `sftp -b -` with `key`: whether every command worked, and what it printed.
    fn openssh(&self, login: &str, key: &std::path::Path, batch: &str) -> (bool, String) {
        use std::io::Write as _;
        let mut child = std::process::Command::new("sftp")
            .args(["-P", &self.sftp_port.to_string(), "-i"])
            .arg(key)
            .args([
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-o",
                "BatchMode=yes",
                "-o",
                "IdentitiesOnly=yes",
                "-o",
                "LogLevel=ERROR",
                "-o",
            ])
            .arg(format!("User={login}"))
            .args(["-b", "-", "127.0.0.1"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(batch.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }
}

fn tools_present() -> bool {
    let sftp = std::process::Command::new("sftp").arg("-V").output().is_ok();
    let paramiko = std::process::Command::new("python3")
        .args(["-c", "import paramiko"])
        .status()
        .is_ok_and(|s| s.success());
    let docker = std::process::Command::new("docker")
        .arg("info")
        .output()
        .is_ok_and(|o| o.status.success());
    sftp && paramiko && docker
}

/// A panel, a real wings enrolled through `wings enroll`, and real SFTP clients: a panel
/// user logs in with their password (paramiko) and their key (OpenSSH), gets their role's
/// permissions, and once removed from the tenant and deauthorized on the node is refused.
async fn real_node_and_real_clients(t: TestDb) {
    let Some(bin) = wings_binary() else {
        common::missing_tool("the wings binary (cargo build -p mamba-wings)");
        return;
    };
    if !tools_present() {
        common::missing_tool("docker, OpenSSH sftp and paramiko (scripts/sftp-tools.sh)");
        return;
    }
    let panel = Panel::start(&t);
    // A long cache, so that only the deauthorization can be what refuses the removed user.
    let node = Node::start(&bin, &panel, &t, 600).await;
    let owner = make_user(&t, &panel.state, "owner@example.test", false);
    let alice = make_user(&t, &panel.state, "alice@example.test", false);
    let tenant = make_tenant(&t, &owner, "acme");
    common::add_membership(&t, &tenant, &alice, "SUPPORT");
    let server = make_server(&t, &tenant, &node.id);
    node.create_server(&server).await;

    let keys = tempfile::tempdir().unwrap();
    let key = keys.path().join("alice");
    let made = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "alice", "-f"])
        .arg(&key)
        .status()
        .unwrap();
    assert!(made.success());
    let public = std::fs::read_to_string(key.with_extension("pub")).unwrap();
    let added = add_key(&panel, "alice@example.test", public.trim()).await;
    assert_eq!(added.status, StatusCode::CREATED, "{added:?}");

    let login = format!("alice@example.test.{}", &server[..8]);
    // The panel password, through paramiko; a wrong one is refused.
    assert!(node.paramiko_login(&login, &["--password", PASSWORD]));
    assert!(!node.paramiko_login(&login, &["--password", "not the password"]));
    // The key, through OpenSSH: SUPPORT may list and read, not create.
    let (ok, out) = node.openssh(&login, &key, "ls -la /\n");
    assert!(ok, "{out}");
    let upload = keys.path().join("upload.txt");
    std::fs::write(&upload, "hello").unwrap();
    let (ok, out) = node.openssh(&login, &key, &format!("put {} /upload.txt\n", upload.display()));
    assert!(!ok, "{out}");
    assert!(out.to_lowercase().contains("permission denied"), "{out}");
    // A user who is not a member is refused, password or not.
    make_user(&t, &panel.state, "carol@example.test", false);
    assert!(!node.paramiko_login(
        &format!("carol@example.test.{}", &server[..8]),
        &["--password", PASSWORD]
    ));

    // Removed from the tenant: the node's cache still vouches (600 s) until the panel's
    // deauthorization reaches it; then both the key and the password are refused.
    remove_member(&t, &tenant, &alice);
    let (status, body) = node
        .post(
            &format!("/api/servers/{server}/deauthorize"),
            json!({"user": alice}),
        )
        .await;
    assert!((200..300).contains(&status), "{status} {body}");
    let (ok, out) = node.openssh(&login, &key, "ls /\n");
    assert!(!ok, "{out}");
    assert!(!node.paramiko_login(&login, &["--password", PASSWORD]));
}

/// A user's SFTP session (login, one file written in many WRITEs, a folder, a rename, a
/// remove) and a file manager write the panel makes for them reach the server's activity
/// log through wings' reporter and outbox, with the user and their address; the many writes
/// are one entry.
async fn activity_from_sftp_and_the_file_manager_reaches_the_panel(t: TestDb) {
    let Some(bin) = wings_binary() else {
        common::missing_tool("the wings binary (cargo build -p mamba-wings)");
        return;
    };
    if !tools_present() {
        common::missing_tool("docker, OpenSSH sftp and paramiko (scripts/sftp-tools.sh)");
        return;
    }
    let panel = Panel::start(&t);
    let node = Node::start(&bin, &panel, &t, 60).await;
    let owner = make_user(&t, &panel.state, "owner@example.test", false);
    let tenant = make_tenant(&t, &owner, "acme");
    let server = make_server(&t, &tenant, &node.id);
    node.create_server(&server).await;

    let login = format!("owner@example.test.{}", &server[..8]);
    // 200 KB: paramiko sends it as several 32 KB WRITEs.
    let results = node.paramiko_ops(
        &login,
        json!([
            {"op": "put", "path": "/world.sav", "data": "0123456789", "repeat": 20_000},
            {"op": "mkdir", "path": "/maps"},
            {"op": "rename", "from": "/world.sav", "to": "/maps/world.sav"},
            {"op": "put", "path": "/scratch.txt", "data": "x"},
            {"op": "remove", "path": "/scratch.txt"},
        ]),
    );
    assert!(results.iter().all(|r| r["ok"] == true), "{results:?}");
    // The file manager, as the panel calls it for a user.
    let written = node
        .api
        .post(format!(
            "{}/api/servers/{server}/files/write?file=config/server.cfg",
            node.api_url
        ))
        .header(mamba_shared::activity::USER_HEADER, &owner)
        .header(mamba_shared::activity::USER_IP_HEADER, "192.0.2.44")
        .body("maxplayers=8\n")
        .send()
        .await
        .unwrap();
    assert_eq!(written.status().as_u16(), 200);

    let bearer = panel.bearer("owner@example.test").await;
    let svc = actix_web::test::init_service(app(panel.state.clone(), common::metrics())).await;
    let uri = format!("/api/v1/tenants/{tenant}/servers/{server}/activity?limit=50");
    let mut items = Vec::new();
    for _ in 0..600 {
        let list = send(
            &svc,
            common::get(&uri, IP)
                .insert_header(("authorization", bearer.clone()))
                .to_request(),
        )
        .await;
        assert_eq!(list.status, StatusCode::OK, "{list:?}");
        items = list.body["items"].as_array().unwrap().clone();
        if items.iter().any(|i| i["event"] == "file.write") && items.len() >= 7 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let of =
        |event: &str| -> Vec<&serde_json::Value> { items.iter().filter(|i| i["event"] == event).collect() };
    assert_eq!(of("sftp.login").len(), 1, "{items:#?}");
    let created = of("sftp.create");
    assert_eq!(created.len(), 2, "{items:#?}");
    let world = created
        .iter()
        .find(|i| i["properties"]["file"] == "world.sav")
        .unwrap_or_else(|| panic!("{items:#?}"));
    assert_eq!(world["properties"]["bytes_written"], 200_000);
    assert!(world["properties"]["writes"].as_u64().unwrap() > 1, "{world}");
    assert_eq!(of("sftp.create-directory")[0]["properties"]["directory"], "maps");
    let renamed = of("sftp.rename");
    assert_eq!(renamed[0]["properties"]["from"], "world.sav");
    assert_eq!(renamed[0]["properties"]["to"], "maps/world.sav");
    assert_eq!(of("sftp.delete")[0]["properties"]["file"], "scratch.txt");
    for entry in items
        .iter()
        .filter(|i| i["event"].as_str().unwrap().starts_with("sftp."))
    {
        assert_eq!(entry["actor"], owner.as_str(), "{entry}");
        assert_eq!(entry["ip"], "127.0.0.1", "{entry}");
    }
    let file_write = of("file.write");
    assert_eq!(file_write.len(), 1, "{items:#?}");
    assert_eq!(file_write[0]["actor"], owner.as_str());
    assert_eq!(file_write[0]["ip"], "192.0.2.44");
    assert_eq!(file_write[0]["properties"]["file"], "config/server.cfg");
    assert_eq!(file_write[0]["properties"]["size"], 13);
    assert_eq!(items.len(), 7, "{items:#?}");
}
