//! The identity flow end to end, on both backends, with mail delivered over SMTP to a real
//! sink: register, read the mail, verify, log in, enable 2FA, log in with TOTP, use a
//! recovery code, reset the password. Also: refresh-token rotation and reuse, CSRF,
//! non-enumerating answers, login rate limits and forwarded headers
//! (SECURITY-CHECKLIST 20, 21, 23).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use actix_web::http::StatusCode;
use actix_web::test;
use common::{SmtpSink, TestDb, get, link_token, post, send};
use mamba_panel::config::SmtpSecurity;
use mamba_panel::http::app;
use serde_json::{Value, json};

both_backends!(
    the_whole_identity_flow_over_smtp,
    refresh_tokens_rotate_and_reuse_revokes_the_family,
    answers_never_reveal_whether_an_account_exists,
    a_login_flood_from_one_address_never_locks_out_the_owner,
    state_changing_browser_requests_need_the_csrf_token,
    a_second_factor_step_is_bound_to_its_login,
    every_account_change_writes_one_audit_entry,
    changing_the_email_reveals_no_other_account,
);

const IP: &str = "198.51.100.10";
const PASSWORD: &str = "correct horse battery";

fn totp_code(secret: &str, email: &str, offset_secs: i64) -> String {
    let totp = mamba_panel::identity::totp_for(secret, email).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    totp.generate(now.saturating_add_signed(offset_secs)).to_string()
}

async fn the_whole_identity_flow_over_smtp(t: TestDb) {
    let Some(sink) = SmtpSink::start() else { return };
    let mut config = t.config();
    config.smtp.host = "127.0.0.1".into();
    config.smtp.port = sink.port;
    config.smtp.security = SmtpSecurity::None;
    config.smtp.from = "Mamba <noreply@mamba.test>".into();
    let svc = test::init_service(app(t.state_with(config), common::metrics())).await;
    let email = "alice@example.test";

    // Register; the verification link arrives by mail.
    let reg = json!({"email": email, "password": PASSWORD, "display_name": "<b>Alice</b>"});
    let a = send(&svc, post("/api/v1/auth/register", reg, IP).to_request()).await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{a:?}");
    let mail = sink.next_mail(email);
    assert!(mail.contains("Subject: Verify your email address"), "{mail}");
    let verify_token = link_token(&mail);

    // Not verified yet: the right password learns only that.
    let login = json!({"email": email, "password": PASSWORD});
    let a = send(&svc, post("/api/v1/auth/login", login.clone(), IP).to_request()).await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    assert_eq!(a.body["error"]["code"], "email_not_verified");

    let a = send(
        &svc,
        post("/api/v1/auth/verify-email", json!({"token": verify_token}), IP).to_request(),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{a:?}");

    // Log in with a browser session.
    let a = send(&svc, post("/api/v1/auth/login", login.clone(), IP).to_request()).await;
    assert_eq!(a.status, StatusCode::OK, "{a:?}");
    let cookie = a.cookie("__Host-mamba_session").unwrap();
    let set_cookie = a
        .headers
        .get_all("set-cookie")
        .map(|v| v.to_str().unwrap().to_string())
        .collect::<Vec<_>>();
    let session_line = set_cookie
        .iter()
        .find(|c| c.starts_with("__Host-mamba_session="))
        .unwrap();
    for flag in ["HttpOnly", "Secure", "SameSite=Lax", "Path=/"] {
        assert!(session_line.contains(flag), "{session_line} lacks {flag}");
    }
    let csrf = a.body["csrf_token"].as_str().unwrap().to_string();
    let me = send(
        &svc,
        get("/api/v1/users/me", IP)
            .insert_header(("cookie", cookie.clone()))
            .to_request(),
    )
    .await;
    assert_eq!(me.status, StatusCode::OK);
    assert_eq!(me.body["email"], email);
    // Markup in names is stored as given and served as JSON data, never as HTML.
    assert_eq!(me.body["display_name"], "<b>Alice</b>");
    assert_eq!(me.headers.get("content-type").unwrap(), "application/json");

    // Enable TOTP.
    let with_session = |r: test::TestRequest| {
        r.insert_header(("cookie", cookie.clone()))
            .insert_header(("x-csrf-token", csrf.clone()))
    };
    let a = send(
        &svc,
        with_session(post("/api/v1/users/me/two-factor/setup", json!({}), IP)).to_request(),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{a:?}");
    let secret = a.body["secret"].as_str().unwrap().to_string();
    assert!(
        a.body["otpauth_uri"]
            .as_str()
            .unwrap()
            .starts_with("otpauth://totp/")
    );
    {
        // The seed is sealed at rest.
        let mut conn = t.db.get_blocking().unwrap();
        let row = mamba_panel::users::find_by_email(&mut conn, email)
            .unwrap()
            .unwrap();
        let stored = row.totp_secret.unwrap();
        assert!(
            !stored.contains(&secret),
            "the TOTP seed must not be stored in the clear"
        );
    }
    let enable_code = totp_code(&secret, email, 0);
    let a = send(
        &svc,
        with_session(post(
            "/api/v1/users/me/two-factor/enable",
            json!({"code": "000000x"}),
            IP,
        ))
        .to_request(),
    )
    .await;
    assert_eq!(a.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(a.body["error"]["details"][0]["field"], "code");
    let a = send(
        &svc,
        with_session(post(
            "/api/v1/users/me/two-factor/enable",
            json!({"code": enable_code}),
            IP,
        ))
        .to_request(),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{a:?}");
    let recovery: Vec<String> = serde_json::from_value(a.body["recovery_codes"].clone()).unwrap();
    assert_eq!(recovery.len(), 10);

    // Log in again: the password alone now yields a challenge, not a session.
    let a = send(&svc, post("/api/v1/auth/login", login.clone(), IP).to_request()).await;
    assert_eq!(a.body["status"], "two_factor_required", "{a:?}");
    assert!(a.cookie("__Host-mamba_session").is_none());
    let challenge = a.body["challenge"].as_str().unwrap().to_string();
    // The code that enabled 2FA was used in its window already: replay refused.
    let a = send(
        &svc,
        post(
            "/api/v1/auth/login/two-factor",
            json!({"challenge": challenge, "code": enable_code}),
            IP,
        )
        .to_request(),
    )
    .await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED, "{a:?}");
    assert_eq!(a.body["error"]["code"], "invalid_code");
    // The next step's code (within the allowed skew) is fresh.
    let next_code = totp_code(&secret, email, 30);
    let a = send(
        &svc,
        post(
            "/api/v1/auth/login/two-factor",
            json!({"challenge": challenge, "code": next_code}),
            IP,
        )
        .to_request(),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{a:?}");
    assert!(a.cookie("__Host-mamba_session").is_some());
    // The same code again, on a new login, is a replay.
    let a = send(&svc, post("/api/v1/auth/login", login.clone(), IP).to_request()).await;
    let challenge = a.body["challenge"].as_str().unwrap().to_string();
    let a = send(
        &svc,
        post(
            "/api/v1/auth/login/two-factor",
            json!({"challenge": challenge, "code": next_code}),
            IP,
        )
        .to_request(),
    )
    .await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);

    // A recovery code works once, on an API login.
    let api_login = json!({"email": email, "password": PASSWORD, "client": "api"});
    let a = send(
        &svc,
        post("/api/v1/auth/login", api_login.clone(), IP).to_request(),
    )
    .await;
    let challenge = a.body["challenge"].as_str().unwrap().to_string();
    let a = send(
        &svc,
        post(
            "/api/v1/auth/login/two-factor",
            json!({"challenge": challenge, "recovery_code": recovery[0]}),
            IP,
        )
        .to_request(),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{a:?}");
    let access = a.body["tokens"]["access_token"].as_str().unwrap().to_string();
    let me = send(
        &svc,
        get("/api/v1/users/me", IP)
            .insert_header(("authorization", format!("Bearer {access}")))
            .to_request(),
    )
    .await;
    assert_eq!(me.status, StatusCode::OK);
    assert_eq!(me.body["two_factor_enabled"], true);
    let a = send(
        &svc,
        post("/api/v1/auth/login", api_login.clone(), IP).to_request(),
    )
    .await;
    let challenge = a.body["challenge"].as_str().unwrap().to_string();
    let a = send(
        &svc,
        post(
            "/api/v1/auth/login/two-factor",
            json!({"challenge": challenge, "recovery_code": recovery[0]}),
            IP,
        )
        .to_request(),
    )
    .await;
    assert_eq!(
        a.status,
        StatusCode::UNAUTHORIZED,
        "a recovery code is spent once used"
    );

    // Reset the password by mail: every existing login ends.
    let a = send(
        &svc,
        post("/api/v1/auth/password-reset", json!({"email": email}), IP).to_request(),
    )
    .await;
    assert_eq!(a.status, StatusCode::ACCEPTED);
    let reset_token = link_token(&sink.next_mail(email));
    let new_password = "a brand new passphrase";
    let confirm = json!({"token": reset_token, "password": new_password});
    let a = send(
        &svc,
        post("/api/v1/auth/password-reset/confirm", confirm.clone(), IP).to_request(),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{a:?}");
    let a = send(
        &svc,
        post("/api/v1/auth/password-reset/confirm", confirm, IP).to_request(),
    )
    .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST, "a reset link works once");
    let me = send(
        &svc,
        get("/api/v1/users/me", IP)
            .insert_header(("cookie", cookie.clone()))
            .to_request(),
    )
    .await;
    assert_eq!(me.status, StatusCode::UNAUTHORIZED, "the old session ended");
    let me = send(
        &svc,
        get("/api/v1/users/me", IP)
            .insert_header(("authorization", format!("Bearer {access}")))
            .to_request(),
    )
    .await;
    assert_eq!(me.status, StatusCode::UNAUTHORIZED, "the old access token ended");
    let a = send(&svc, post("/api/v1/auth/login", login, IP).to_request()).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED, "the old password is gone");
    let a = send(
        &svc,
        post(
            "/api/v1/auth/login",
            json!({"email": email, "password": new_password}),
            IP,
        )
        .to_request(),
    )
    .await;
    assert_eq!(a.body["status"], "two_factor_required", "{a:?}");
}

/// A verified user made directly in the database; returns its email.
async fn verified_user(t: &TestDb, email: &str) -> String {
    let state = t.state();
    let hash = state.hasher.hash(PASSWORD).unwrap();
    let mut conn = t.db.get_blocking().unwrap();
    mamba_panel::users::create(
        &mut conn,
        mamba_panel::users::NewUser {
            email: email.into(),
            display_name: "User".into(),
            password_hash: hash,
            email_verified: true,
            is_super_admin: false,
        },
        &mamba_panel::audit::Actor::System,
        &mamba_panel::request_meta::RequestMeta::system(),
    )
    .unwrap();
    email.into()
}

async fn refresh_tokens_rotate_and_reuse_revokes_the_family(t: TestDb) {
    let email = verified_user(&t, "bob@example.test").await;
    let svc = test::init_service(app(t.state(), common::metrics())).await;
    let a = send(
        &svc,
        post(
            "/api/v1/auth/login",
            json!({"email": email, "password": PASSWORD, "client": "api"}),
            IP,
        )
        .to_request(),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{a:?}");
    assert_eq!(
        a.body["tokens"]["expires_in"], 900,
        "access tokens live 15 minutes"
    );
    let first = a.body["tokens"]["refresh_token"].as_str().unwrap().to_string();

    let a = send(
        &svc,
        post("/api/v1/auth/token", json!({"refresh_token": first}), IP).to_request(),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{a:?}");
    let second = a.body["tokens"]["refresh_token"].as_str().unwrap().to_string();
    let access = a.body["tokens"]["access_token"].as_str().unwrap().to_string();
    assert_ne!(first, second, "refresh tokens rotate");
    let bearer = format!("Bearer {access}");
    let me = send(
        &svc,
        get("/api/v1/users/me", IP)
            .insert_header(("authorization", bearer.clone()))
            .to_request(),
    )
    .await;
    assert_eq!(me.status, StatusCode::OK);

    // Someone replays the first token: the whole family dies, including the newest tokens.
    let a = send(
        &svc,
        post("/api/v1/auth/token", json!({"refresh_token": first}), IP).to_request(),
    )
    .await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    let a = send(
        &svc,
        post("/api/v1/auth/token", json!({"refresh_token": second}), IP).to_request(),
    )
    .await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED, "the family is revoked");
    let me = send(
        &svc,
        get("/api/v1/users/me", IP)
            .insert_header(("authorization", bearer))
            .to_request(),
    )
    .await;
    assert_eq!(me.status, StatusCode::UNAUTHORIZED, "its access tokens too");
    let mut conn = t.db.get_blocking().unwrap();
    let reuse: Vec<Count> = diesel::RunQueryDsl::load(
        diesel::sql_query("SELECT COUNT(*) AS n FROM audit_log WHERE action = 'auth.refresh_reuse'"),
        &mut *conn,
    )
    .unwrap();
    assert_eq!(reuse[0].n, 1);
}

#[derive(diesel::QueryableByName)]
struct Count {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    n: i64,
}

async fn answers_never_reveal_whether_an_account_exists(t: TestDb) {
    let email = verified_user(&t, "carol@example.test").await;
    let svc = test::init_service(app(t.state(), common::metrics())).await;
    let wrong_password = send(
        &svc,
        post(
            "/api/v1/auth/login",
            json!({"email": email, "password": "wrong password!"}),
            IP,
        )
        .to_request(),
    )
    .await;
    let no_account = send(
        &svc,
        post(
            "/api/v1/auth/login",
            json!({"email": "nobody@example.test", "password": "wrong password!"}),
            IP,
        )
        .to_request(),
    )
    .await;
    assert_eq!(wrong_password.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        (wrong_password.status, &wrong_password.body),
        (no_account.status, &no_account.body)
    );

    let taken = send(
        &svc,
        post(
            "/api/v1/auth/register",
            json!({"email": email, "password": PASSWORD, "display_name": "X"}),
            IP,
        )
        .to_request(),
    )
    .await;
    let fresh = send(
        &svc,
        post(
            "/api/v1/auth/register",
            json!({"email": "dave@example.test", "password": PASSWORD, "display_name": "X"}),
            IP,
        )
        .to_request(),
    )
    .await;
    assert_eq!(taken.status, StatusCode::ACCEPTED);
    assert_eq!((taken.status, &taken.body), (fresh.status, &fresh.body));

    let known = send(
        &svc,
        post("/api/v1/auth/password-reset", json!({"email": email}), IP).to_request(),
    )
    .await;
    let unknown = send(
        &svc,
        post(
            "/api/v1/auth/password-reset",
            json!({"email": "nobody@example.test"}),
            IP,
        )
        .to_request(),
    )
    .await;
    assert_eq!(known.status, StatusCode::ACCEPTED);
    assert_eq!((known.status, &known.body), (unknown.status, &unknown.body));

    // Validation errors name the field, and say nothing about accounts.
    let bad = send(
        &svc,
        post(
            "/api/v1/auth/register",
            json!({"email": "not-an-email", "password": "short", "display_name": ""}),
            IP,
        )
        .to_request(),
    )
    .await;
    assert_eq!(bad.status, StatusCode::UNPROCESSABLE_ENTITY);
    let fields: Vec<&str> = bad.body["error"]["details"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["field"].as_str().unwrap())
        .collect();
    assert_eq!(fields, ["email", "display_name", "password"]);
    let malformed = send(
        &svc,
        actix_web::test::TestRequest::post()
            .uri("/api/v1/auth/login")
            .peer_addr(common::peer(IP))
            .insert_header(("content-type", "application/json"))
            .set_payload("{")
            .to_request(),
    )
    .await;
    assert_eq!(malformed.status, StatusCode::BAD_REQUEST);
    assert_eq!(malformed.body["error"]["code"], "invalid_request");
}

async fn a_login_flood_from_one_address_never_locks_out_the_owner(t: TestDb) {
    let email = verified_user(&t, "erin@example.test").await;
    let proxy = "10.0.0.1";
    let mut config = t.config();
    config.http.trusted_proxies = vec![proxy.parse().unwrap()];
    let per_account = config.rate_limits.login_per_account_per_15min;
    let svc = test::init_service(app(t.state_with(config), common::metrics())).await;
    let attacker = "203.0.113.66";
    let wrong = json!({"email": email, "password": "guess guess guess"});
    let mut limited = None;
    for i in 0..per_account + 1 {
        // Forged forwarding headers from an untrusted peer change nothing.
        let a = send(
            &svc,
            post("/api/v1/auth/login", wrong.clone(), attacker)
                .insert_header(("x-forwarded-for", format!("192.0.2.{i}")))
                .to_request(),
        )
        .await;
        if a.status == StatusCode::TOO_MANY_REQUESTS {
            limited = Some(a);
            break;
        }
        assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    }
    let limited = limited.expect("the flood is limited");
    assert_eq!(limited.body["error"]["code"], "rate_limited");
    let retry: u64 = limited.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=900).contains(&retry), "{retry}");

    // The owner, from elsewhere, is not locked out.
    let right = json!({"email": email, "password": PASSWORD});
    let a = send(
        &svc,
        post("/api/v1/auth/login", right.clone(), "198.51.100.20").to_request(),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{a:?}");
    // Behind the trusted proxy, the forwarded client address is the one counted.
    let a = send(
        &svc,
        post("/api/v1/auth/login", right.clone(), proxy)
            .insert_header(("x-forwarded-for", "198.51.100.21"))
            .to_request(),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{a:?}");
    let a = send(
        &svc,
        post("/api/v1/auth/login", right, proxy)
            .insert_header(("x-forwarded-for", attacker))
            .to_request(),
    )
    .await;
    assert_eq!(
        a.status,
        StatusCode::TOO_MANY_REQUESTS,
        "the attacker's address stays limited through the proxy"
    );
}

async fn state_changing_browser_requests_need_the_csrf_token(t: TestDb) {
    let email = verified_user(&t, "frank@example.test").await;
    let svc = test::init_service(app(t.state(), common::metrics())).await;
    let a = send(
        &svc,
        post(
            "/api/v1/auth/login",
            json!({"email": email, "password": PASSWORD}),
            IP,
        )
        .to_request(),
    )
    .await;
    let cookie = a.cookie("__Host-mamba_session").unwrap();
    let csrf = a.body["csrf_token"].as_str().unwrap().to_string();
    for bad in [None, Some("forged".to_string())] {
        let mut req = post("/api/v1/auth/logout", json!({}), IP).insert_header(("cookie", cookie.clone()));
        if let Some(token) = bad {
            req = req.insert_header(("x-csrf-token", token));
        }
        let a = send(&svc, req.to_request()).await;
        assert_eq!(a.status, StatusCode::FORBIDDEN);
        assert_eq!(a.body["error"]["code"], "csrf_failed");
    }
    // Reads need no token; the session is still alive after the refused logouts.
    let me = send(
        &svc,
        get("/api/v1/users/me", IP)
            .insert_header(("cookie", cookie.clone()))
            .to_request(),
    )
    .await;
    assert_eq!(me.status, StatusCode::OK);
    let a = send(
        &svc,
        post("/api/v1/auth/logout", json!({}), IP)
            .insert_header(("cookie", cookie.clone()))
            .insert_header(("x-csrf-token", csrf))
            .to_request(),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK);
    let me = send(
        &svc,
        get("/api/v1/users/me", IP)
            .insert_header(("cookie", cookie))
            .to_request(),
    )
    .await;
    assert_eq!(me.status, StatusCode::UNAUTHORIZED);
}

async fn a_second_factor_step_is_bound_to_its_login(t: TestDb) {
    let svc = test::init_service(app(t.state(), common::metrics())).await;
    let mut secrets = Vec::new();
    for email in ["gina@example.test", "hank@example.test"] {
        verified_user(&t, email).await;
        let a = send(
            &svc,
            post(
                "/api/v1/auth/login",
                json!({"email": email, "password": PASSWORD, "client": "api"}),
                IP,
            )
            .to_request(),
        )
        .await;
        let bearer = format!("Bearer {}", a.body["tokens"]["access_token"].as_str().unwrap());
        let a = send(
            &svc,
            post("/api/v1/users/me/two-factor/setup", json!({}), IP)
                .insert_header(("authorization", bearer.clone()))
                .to_request(),
        )
        .await;
        let secret = a.body["secret"].as_str().unwrap().to_string();
        let a = send(
            &svc,
            post(
                "/api/v1/users/me/two-factor/enable",
                json!({"code": totp_code(&secret, email, 0)}),
                IP,
            )
            .insert_header(("authorization", bearer))
            .to_request(),
        )
        .await;
        assert_eq!(a.status, StatusCode::OK, "{a:?}");
        secrets.push((email, secret));
    }
    let (gina, gina_secret) = &secrets[0];
    let (hank, _) = &secrets[1];
    // Hank's password step, then Gina's valid code: refused.
    let a = send(
        &svc,
        post(
            "/api/v1/auth/login",
            json!({"email": hank, "password": PASSWORD}),
            IP,
        )
        .to_request(),
    )
    .await;
    let hank_challenge = a.body["challenge"].as_str().unwrap().to_string();
    let gina_code = totp_code(gina_secret, gina, 30);
    let a = send(
        &svc,
        post(
            "/api/v1/auth/login/two-factor",
            json!({"challenge": hank_challenge, "code": gina_code}),
            IP,
        )
        .to_request(),
    )
    .await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    // A made-up challenge with a valid code: refused.
    let a = send(
        &svc,
        post(
            "/api/v1/auth/login/two-factor",
            json!({"challenge": "mch_made_up", "code": gina_code}),
            IP,
        )
        .to_request(),
    )
    .await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    assert_eq!(a.body["error"]["code"], "invalid_challenge");
    // A challenge is used up after five wrong tries, even by the right code afterwards.
    let a = send(
        &svc,
        post(
            "/api/v1/auth/login",
            json!({"email": gina, "password": PASSWORD}),
            IP,
        )
        .to_request(),
    )
    .await;
    let challenge = a.body["challenge"].as_str().unwrap().to_string();
    for _ in 0..5 {
        let a = send(
            &svc,
            post(
                "/api/v1/auth/login/two-factor",
                json!({"challenge": challenge, "code": "000000"}),
                IP,
            )
            .to_request(),
        )
        .await;
        assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    }
    let a = send(
        &svc,
        post(
            "/api/v1/auth/login/two-factor",
            json!({"challenge": challenge, "code": gina_code}),
            IP,
        )
        .to_request(),
    )
    .await;
    assert_eq!(a.body["error"]["code"], "invalid_challenge");
    // With its own challenge, the code works.
    let a = send(
        &svc,
        post(
            "/api/v1/auth/login",
            json!({"email": gina, "password": PASSWORD}),
            IP,
        )
        .to_request(),
    )
    .await;
    let challenge = a.body["challenge"].as_str().unwrap().to_string();
    let a = send(
        &svc,
        post(
            "/api/v1/auth/login/two-factor",
            json!({"challenge": challenge, "code": gina_code}),
            IP,
        )
        .to_request(),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{a:?}");
    let _: Value = a.body;
}

fn audit_actions(t: &TestDb) -> Vec<String> {
    #[derive(diesel::QueryableByName)]
    struct Action {
        #[diesel(sql_type = diesel::sql_types::Text)]
        action: String,
    }
    let mut conn = t.db.get_blocking().unwrap();
    let rows: Vec<Action> = diesel::RunQueryDsl::load(
        diesel::sql_query("SELECT action FROM audit_log ORDER BY id"),
        &mut *conn,
    )
    .unwrap();
    rows.into_iter().map(|r| r.action).collect()
}

/// Each state-changing account route adds exactly the one entry it should; refused
/// attempts add none.
async fn every_account_change_writes_one_audit_entry(t: TestDb) {
    let svc = test::init_service(app(t.state(), common::metrics())).await;
    let email = "ivy@example.test";
    let mut expected: Vec<&str> = Vec::new();
    let mut check = |t: &TestDb, action: Option<&'static str>| {
        expected.extend(action);
        assert_eq!(audit_actions(t), expected);
    };
    send(
        &svc,
        post(
            "/api/v1/auth/register",
            json!({"email": email, "password": PASSWORD, "display_name": "Ivy"}),
            IP,
        )
        .to_request(),
    )
    .await;
    check(&t, Some("user.create"));
    // The verification link, signed the way the mail would carry it.
    let state = t.state();
    let row = {
        let mut conn = t.db.get_blocking().unwrap();
        mamba_panel::users::find_by_email(&mut conn, email)
            .unwrap()
            .unwrap()
    };
    let token = state.links.sign(&mamba_panel::keys::LinkClaims {
        purpose: mamba_panel::keys::LinkPurpose::VerifyEmail,
        user: row.id.clone(),
        binding: email.into(),
        expires_at: mamba_panel::db::now_ms() + 60_000,
    });
    let a = send(
        &svc,
        post("/api/v1/auth/verify-email", json!({"token": token}), IP).to_request(),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK);
    check(&t, Some("user.verify_email"));
    send(
        &svc,
        post("/api/v1/auth/verify-email", json!({"token": token}), IP).to_request(),
    )
    .await;
    check(&t, None);
    let a = send(
        &svc,
        post(
            "/api/v1/auth/login",
            json!({"email": email, "password": "wrong password!!"}),
            IP,
        )
        .to_request(),
    )
    .await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    check(&t, None);
    let a = send(
        &svc,
        post(
            "/api/v1/auth/login",
            json!({"email": email, "password": PASSWORD, "client": "api"}),
            IP,
        )
        .to_request(),
    )
    .await;
    check(&t, Some("auth.login"));
    let bearer = format!("Bearer {}", a.body["tokens"]["access_token"].as_str().unwrap());
    let refresh = a.body["tokens"]["refresh_token"].as_str().unwrap().to_string();
    let a = send(
        &svc,
        post("/api/v1/users/me/two-factor/setup", json!({}), IP)
            .insert_header(("authorization", bearer.clone()))
            .to_request(),
    )
    .await;
    check(&t, Some("user.two_factor_setup"));
    let secret = a.body["secret"].as_str().unwrap().to_string();
    send(
        &svc,
        post(
            "/api/v1/users/me/two-factor/enable",
            json!({"code": totp_code(&secret, email, 0)}),
            IP,
        )
        .insert_header(("authorization", bearer.clone()))
        .to_request(),
    )
    .await;
    check(&t, Some("user.two_factor_enable"));
    let a = send(
        &svc,
        post(
            "/api/v1/users/me/two-factor/disable",
            json!({"code": totp_code(&secret, email, 30)}),
            IP,
        )
        .insert_header(("authorization", bearer.clone()))
        .to_request(),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{a:?}");
    check(&t, Some("user.two_factor_disable"));
    let a = send(
        &svc,
        post("/api/v1/auth/token", json!({"refresh_token": refresh}), IP).to_request(),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK);
    check(&t, Some("auth.refresh"));
    let bearer = format!("Bearer {}", a.body["tokens"]["access_token"].as_str().unwrap());
    send(
        &svc,
        post("/api/v1/auth/logout", json!({}), IP)
            .insert_header(("authorization", bearer))
            .to_request(),
    )
    .await;
    check(&t, Some("auth.logout"));
    let reset = state.links.sign(&mamba_panel::keys::LinkClaims {
        purpose: mamba_panel::keys::LinkPurpose::ResetPassword,
        user: row.id.clone(),
        binding: mamba_panel::tokens::digest(&row.password_hash)[..32].to_string(),
        expires_at: mamba_panel::db::now_ms() + 60_000,
    });
    let a = send(
        &svc,
        post(
            "/api/v1/auth/password-reset/confirm",
            json!({"token": reset, "password": "another good passphrase"}),
            IP,
        )
        .to_request(),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{a:?}");
    check(&t, Some("user.password_reset"));
}

async fn changing_the_email_reveals_no_other_account(t: TestDb) {
    let email = verified_user(&t, "jude@example.test").await;
    verified_user(&t, "taken@example.test").await;
    let svc = test::init_service(app(t.state(), common::metrics())).await;
    let a = send(
        &svc,
        post(
            "/api/v1/auth/login",
            json!({"email": email, "password": PASSWORD, "client": "api"}),
            IP,
        )
        .to_request(),
    )
    .await;
    let bearer = format!("Bearer {}", a.body["tokens"]["access_token"].as_str().unwrap());
    let change = |new: &str, password: &str| {
        post(
            "/api/v1/users/me/email",
            json!({"new_email": new, "password": password}),
            IP,
        )
        .insert_header(("authorization", bearer.clone()))
        .to_request()
    };
    let taken = send(&svc, change("taken@example.test", PASSWORD)).await;
    let free = send(&svc, change("jude.new@example.test", PASSWORD)).await;
    assert_eq!(taken.status, StatusCode::ACCEPTED);
    assert_eq!((taken.status, &taken.body), (free.status, &free.body));
    let wrong = send(&svc, change("jude.new@example.test", "not my password")).await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    let bad = send(&svc, change("nope", PASSWORD)).await;
    assert_eq!(bad.body["error"]["details"][0]["field"], "new_email");

    // The link (as mailed to the new address) moves the account; it works once.
    let row = {
        let mut conn = t.db.get_blocking().unwrap();
        mamba_panel::users::find_by_email(&mut conn, &email)
            .unwrap()
            .unwrap()
    };
    let token = t.state().links.sign(&mamba_panel::keys::LinkClaims {
        purpose: mamba_panel::keys::LinkPurpose::ChangeEmail,
        user: row.id.clone(),
        binding: format!("{email} -> jude.new@example.test"),
        expires_at: mamba_panel::db::now_ms() + 60_000,
    });
    let before = audit_actions(&t).len();
    let a = send(
        &svc,
        post("/api/v1/auth/confirm-email-change", json!({"token": token}), IP).to_request(),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{a:?}");
    assert_eq!(audit_actions(&t)[before..], ["user.email_change".to_string()]);
    let me = send(
        &svc,
        get("/api/v1/users/me", IP)
            .insert_header(("authorization", bearer.clone()))
            .to_request(),
    )
    .await;
    assert_eq!(me.body["email"], "jude.new@example.test");
    let again = send(
        &svc,
        post("/api/v1/auth/confirm-email-change", json!({"token": token}), IP).to_request(),
    )
    .await;
    assert_eq!(again.status, StatusCode::BAD_REQUEST);
    // A verification link is no change-email link.
    let wrong_purpose = t.state().links.sign(&mamba_panel::keys::LinkClaims {
        purpose: mamba_panel::keys::LinkPurpose::VerifyEmail,
        user: row.id,
        binding: "jude.new@example.test -> x@example.test".into(),
        expires_at: mamba_panel::db::now_ms() + 60_000,
    });
    let a = send(
        &svc,
        post(
            "/api/v1/auth/confirm-email-change",
            json!({"token": wrong_purpose}),
            IP,
        )
        .to_request(),
    )
    .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
}
