//! Envelope encryption of stored secrets on both backends, master-key rotation, and the
//! `panel` binary's commands (migrate, admin create-user, admin rotate-master-key).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::TestDb;
use diesel::RunQueryDsl;
use mamba_panel::audit::Actor;
use mamba_panel::authz::{TenantScope, authorize};
use mamba_panel::db::DbConnection;
use mamba_panel::keys::MasterKey;
use mamba_panel::request_meta::RequestMeta;
use mamba_panel::secrets::{SecretBox, SecretError, rotate_master_key};
use mamba_panel::users::{self, NewUser};

both_backends!(
    secrets_are_sealed_per_tenant_and_bound_to_their_row,
    rotating_the_master_key_rewraps_data_keys,
    the_binary_migrates_bootstraps_and_rotates,
);

/// A user owning a new tenant, and the scope authorisation grants them.
fn owner_scope(conn: &mut DbConnection, email: &str, slug: &str) -> TenantScope {
    let meta = RequestMeta::system();
    let user = users::create(
        conn,
        NewUser {
            email: email.into(),
            display_name: "Owner".into(),
            password_hash: "x".into(),
            email_verified: true,
            is_super_admin: false,
        },
        &Actor::System,
        &meta,
    )
    .unwrap();
    let tenant = mamba_panel::tenants::create(conn, &user.id, slug, slug, &meta).unwrap();
    let row = users::find(conn, &user.id).unwrap().unwrap();
    authorize(conn, &row, Actor::User(user.id), &tenant.id, None).unwrap()
}

#[derive(diesel::QueryableByName)]
struct Text {
    #[diesel(sql_type = diesel::sql_types::Text)]
    v: String,
}

async fn secrets_are_sealed_per_tenant_and_bound_to_their_row(t: TestDb) {
    let mut conn = t.db.get_blocking().unwrap();
    let sb = SecretBox::new(&MasterKey::from_bytes([3; 32]));
    let a = owner_scope(&mut conn, "a@s.test", "secret-a");
    let b = owner_scope(&mut conn, "b@s.test", "secret-b");
    let meta = RequestMeta::system();
    let url = "https://discord.example/api/webhooks/123/very-secret-token";
    sb.put(&mut conn, &a, "discord_webhook", url, &meta).unwrap();
    assert_eq!(
        sb.get(&mut conn, &a, "discord_webhook").unwrap().as_deref(),
        Some(url)
    );
    assert_eq!(
        sb.get(&mut conn, &b, "discord_webhook").unwrap(),
        None,
        "scoped to its tenant"
    );
    sb.put(&mut conn, &a, "discord_webhook", "replaced", &meta)
        .unwrap();
    assert_eq!(
        sb.get(&mut conn, &a, "discord_webhook").unwrap().as_deref(),
        Some("replaced")
    );

    // At rest: neither the secret nor the data key in the clear.
    let stored: Vec<Text> = diesel::sql_query("SELECT ciphertext AS v FROM secrets")
        .load(&mut *conn)
        .unwrap();
    assert!(!stored[0].v.contains("replaced") && !stored[0].v.is_empty());
    // Two seals of the same value differ (fresh nonce).
    sb.put(&mut conn, &b, "same", "value", &meta).unwrap();
    sb.put(&mut conn, &b, "same2", "value", &meta).unwrap();
    let stored: Vec<Text> = diesel::sql_query("SELECT ciphertext AS v FROM secrets WHERE name LIKE 'same%'")
        .load(&mut *conn)
        .unwrap();
    assert_ne!(stored[0].v, stored[1].v);

    // A ciphertext copied onto another tenant's row does not open there.
    sb.put(&mut conn, &b, "discord_webhook", "b's own", &meta)
        .unwrap();
    diesel::sql_query(format!(
        "UPDATE secrets SET ciphertext = (SELECT ciphertext FROM secrets WHERE tenant_id = '{}' AND name = 'discord_webhook') \
         WHERE tenant_id = '{}' AND name = 'discord_webhook'",
        a.tenant(),
        b.tenant()
    ))
    .execute(&mut *conn)
    .unwrap();
    assert!(matches!(
        sb.get(&mut conn, &b, "discord_webhook"),
        Err(SecretError::Undecryptable)
    ));
    // Another master key opens nothing.
    let other = SecretBox::new(&MasterKey::from_bytes([4; 32]));
    assert!(matches!(
        other.get(&mut conn, &a, "discord_webhook"),
        Err(SecretError::Undecryptable)
    ));
    // One audit entry per stored secret, without the value.
    let puts: Vec<Text> =
        diesel::sql_query("SELECT metadata AS v FROM audit_log WHERE action = 'secret.put'")
            .load(&mut *conn)
            .unwrap();
    assert_eq!(puts.len(), 5);
    assert!(
        puts.iter()
            .all(|p| !p.v.contains("replaced") && !p.v.contains("secret-token"))
    );
}

async fn rotating_the_master_key_rewraps_data_keys(t: TestDb) {
    let mut conn = t.db.get_blocking().unwrap();
    let (old, new) = (MasterKey::from_bytes([5; 32]), MasterKey::from_bytes([6; 32]));
    let meta = RequestMeta::system();
    let scopes: Vec<TenantScope> = (0..3)
        .map(|i| owner_scope(&mut conn, &format!("r{i}@s.test"), &format!("rotate-{i}")))
        .collect();
    for (i, scope) in scopes.iter().enumerate() {
        SecretBox::new(&old)
            .put(&mut conn, scope, "gateway_key", &format!("sk_{i}"), &meta)
            .unwrap();
    }
    // A user's TOTP seed, sealed under the old key.
    let seed_owner = scopes[0].user().clone();
    let old_sealer = mamba_panel::secrets::FieldSealer::totp(&old);
    mamba_panel::identity::begin_totp(&mut conn, &old_sealer, &seed_owner, "JBSWY3DPEHPK3PXPJBSWY3DP")
        .unwrap();
    assert_eq!(rotate_master_key(&mut conn, &old, &new).unwrap(), 3);
    let row = users::find(&mut conn, &seed_owner).unwrap().unwrap();
    let sealed = row.totp_secret.unwrap();
    let new_sealer = mamba_panel::secrets::FieldSealer::totp(&new);
    assert_eq!(
        new_sealer.open(seed_owner.as_str(), &sealed).unwrap(),
        "JBSWY3DPEHPK3PXPJBSWY3DP"
    );
    assert!(old_sealer.open(seed_owner.as_str(), &sealed).is_err());
    for (i, scope) in scopes.iter().enumerate() {
        let value = SecretBox::new(&new).get(&mut conn, scope, "gateway_key").unwrap();
        assert_eq!(value, Some(format!("sk_{i}")));
        assert!(
            SecretBox::new(&old).get(&mut conn, scope, "gateway_key").is_err(),
            "the old key is retired"
        );
    }
    // Running it again finds nothing left to do.
    assert_eq!(rotate_master_key(&mut conn, &old, &new).unwrap(), 0);
}

fn panel(t: &TestDb, master: &str, args: &[&str], extra_env: &[(&str, &str)]) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_panel"))
        .args(args)
        .env("DATABASE_URL", &t.url)
        .env("PANEL_MASTER_KEY", master)
        .env("PANEL_AUTH__ARGON2_MEMORY_KIB", "8192")
        .env("PANEL_AUTH__ARGON2_ITERATIONS", "1")
        .envs(extra_env.iter().copied())
        .env_remove("PANEL_CONFIG")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

async fn the_binary_migrates_bootstraps_and_rotates(t: TestDb) {
    use base64::Engine as _;
    let b64 = |b: [u8; 32]| base64::engine::general_purpose::STANDARD.encode(b);
    let (old, new) = (b64([7; 32]), b64([8; 32]));
    let (ok, text) = panel(&t, &old, &["migrate"], &[]);
    assert!(ok, "{text}");
    let (ok, text) = panel(
        &t,
        &old,
        &["admin", "create-user", "--email", "Ops@Example.test"],
        &[],
    );
    assert!(ok, "{text}");
    let password = text
        .lines()
        .find_map(|l| l.strip_prefix("password: "))
        .expect("the password is printed")
        .trim()
        .to_string();
    assert!(password.len() >= 20, "{password}");
    let mut conn = t.db.get_blocking().unwrap();
    let row = users::find_by_email(&mut conn, "ops@example.test")
        .unwrap()
        .unwrap();
    assert!(row.is_super_admin && row.email_verified_at.is_some());
    // Not through `t.state()`: that would make the panel's node PKI keys under the test
    // harness's master key, which the rotation below (from `old`) rightly cannot open.
    let hasher = mamba_panel::password::PasswordHasherConfig::new(&t.config().auth).unwrap();
    assert!(
        hasher.verify(&password, &row.password_hash),
        "the printed password logs in"
    );
    let (ok, text) = panel(
        &t,
        &old,
        &["admin", "create-user", "--email", "not-an-email"],
        &[],
    );
    assert!(!ok && text.contains("--email"), "{text}");

    let scope = owner_scope(&mut conn, "cli@s.test", "cli-tenant");
    SecretBox::new(&MasterKey::from_base64(&old).unwrap())
        .put(&mut conn, &scope, "node_token", "n0d3", &RequestMeta::system())
        .unwrap();
    drop(conn);
    // The node CA and token key, made (sealed) under the old key as `panel serve` would.
    let cert_days = std::time::Duration::from_secs(86_400);
    let pki_under = |key: &str| {
        mamba_panel::node_pki::PanelPki::load_or_create(
            &t.db,
            &MasterKey::from_base64(key).unwrap(),
            cert_days,
        )
    };
    let ca_before = pki_under(&old).unwrap().ca.fingerprint();
    let (ok, text) = panel(
        &t,
        &old,
        &["admin", "rotate-master-key"],
        &[("PANEL_NEW_MASTER_KEY", &new)],
    );
    assert!(ok && text.contains("rewrapped 1 tenant data keys"), "{text}");
    let mut conn = t.db.get_blocking().unwrap();
    let value = SecretBox::new(&MasterKey::from_base64(&new).unwrap())
        .get(&mut conn, &scope, "node_token")
        .unwrap();
    assert_eq!(value.as_deref(), Some("n0d3"));
    // The same CA, now opened only with the new key.
    assert_eq!(pki_under(&new).unwrap().ca.fingerprint(), ca_before);
    assert!(pki_under(&old).is_err());
    let (ok, text) = panel(
        &t,
        "short",
        &["admin", "rotate-master-key"],
        &[("PANEL_NEW_MASTER_KEY", &new)],
    );
    assert!(!ok && text.contains("PANEL_MASTER_KEY"), "{text}");
}
