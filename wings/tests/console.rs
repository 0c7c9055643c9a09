//! The console socket, driven by a real client in another process (Python `websockets`)
//! against real containers: freeciv, and the scripted test box for floods and refusals.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers panic by design

mod common;

use std::time::Duration;

use common::console::{
    ALL, auth, claims, events, expect, expect_arg, expect_contains, python, rss_kib, script, send, sign,
    sign_with, token, tokens_config, ws_url,
};
use common::{Wings, blueprint, free_port, testbox, unique_id};
use serde_json::{Value, json};

const GAME_TIMEOUT: Duration = Duration::from_secs(120);

async fn running_testbox(wings: &Wings) -> String {
    let id = unique_id("ws");
    wings.create(&id, testbox(), json!({}), free_port()).await;
    wings.wait_state(&id, "running", GAME_TIMEOUT).await;
    id
}

#[tokio::test(flavor = "multi_thread")]
async fn freeciv_console_history_commands_power_and_stats() {
    let wings = Wings::start_with(&tokens_config()).await;
    let id = unique_id("freeciv-ws");
    let port = free_port();
    wings
        .create(
            &id,
            blueprint("blueprints/freeciv.yaml"),
            json!({"AI_PLAYERS": "1"}),
            port,
        )
        .await;
    wings.wait_state(&id, "running", GAME_TIMEOUT).await;

    let steps = vec![
        auth(&token(&id, ALL)),
        expect("auth success"),
        // The history comes first, then live events.
        expect_arg("status", json!("running")),
        expect_contains(
            "console output",
            &format!("Now accepting new client connections on port {port}"),
        ),
        send("send command", json!(["set timeout 41"])),
        send("send command", json!(["set timeout 42"])),
        send("send command", json!(["set timeout 43"])),
        json!({"expect_sequence": [
            {"event": "console output", "contains": "'timeout' has been set to 41"},
            {"event": "console output", "contains": "'timeout' has been set to 42"},
            {"event": "console output", "contains": "'timeout' has been set to 43"},
        ]}),
        json!({"expect": {"event": "stats", "json": {"state": "running"}}, "timeout": 15}),
        send("set state", json!(["stop"])),
        json!({"expect_sequence": [
            {"event": "status", "arg": "stopping"},
            {"event": "status", "arg": "offline"},
        ], "timeout": 60}),
        send("set state", json!(["start"])),
        json!({"expect_sequence": [
            {"event": "status", "arg": "starting"},
            {"event": "status", "arg": "running"},
        ], "timeout": 120}),
        send("send stats", json!([])),
        json!({"expect": {"event": "stats", "json": {"state": "running"}}, "timeout": 15}),
    ];
    let output = script(&wings, &id, steps, true).await;
    let stats = events(&output)
        .into_iter()
        .filter(|e| e["event"] == "stats")
        .map(|e| serde_json::from_str::<Value>(e["args"][0].as_str().unwrap()).unwrap())
        .next_back()
        .unwrap();
    assert!(stats["memory_bytes"].as_u64().unwrap() > 0, "{stats}");
    assert!(stats["memory_limit_bytes"].as_u64().unwrap() > 0, "{stats}");
    assert!(stats["uptime_ms"].as_u64().unwrap() > 0, "{stats}");
    assert!(stats["disk_bytes"].as_u64().unwrap() > 0, "{stats}");
    for key in ["cpu_absolute", "network"] {
        assert!(stats.get(key).is_some(), "{key} missing in {stats}");
    }

    // The same figures over HTTP.
    let (status, resources) = wings.get(&format!("/api/servers/{id}/resources")).await;
    assert_eq!(status, 200, "{resources}");
    assert_eq!(resources["state"], "running");
    assert!(resources["memory_bytes"].as_u64().unwrap() > 0, "{resources}");
    assert!(resources["network"]["rx_bytes"].is_u64(), "{resources}");
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_are_refused_for_every_reason() {
    let extra = format!(
        "{}not_before = {}\n\n[websocket]\nauth_timeout_secs = 5\n",
        tokens_config(),
        common::console::now() - 300
    );
    let wings = Wings::start_with(&extra).await;
    let id = running_testbox(&wings).await;
    let other = running_testbox(&wings).await;

    let mut expired = claims(&id, "user-1", ALL);
    expired["iat"] = json!(common::console::now() - 120);
    expired["exp"] = json!(common::console::now() - 60);
    let mut wrong_scope = claims(&id, "user-1", ALL);
    wrong_scope["scope"] = json!("download");
    let mut before_key = claims(&id, "user-1", ALL);
    before_key["iat"] = json!(common::console::now() - 400);
    before_key["exp"] = json!(common::console::now() + 400);
    let mut too_long = claims(&id, "user-1", ALL);
    too_long["exp"] = json!(common::console::now() + 7200);
    let denied = claims(&id, "user-1", ALL);

    let steps = vec![
        auth(&sign(&expired)),
        expect("token expired"),
        auth(&token(&other, ALL)),
        expect_contains("jwt error", "another server"),
        auth(&sign(&wrong_scope)),
        expect_contains("jwt error", "not for this purpose"),
        auth(&sign(&before_key)),
        expect_contains("jwt error", "before the current signing key"),
        auth(&sign(&too_long)),
        expect_contains("jwt error", "lives longer"),
        auth(&sign_with(&claims(&id, "user-1", ALL), "other.key.pem")),
        expect_contains("jwt error", "invalid token"),
        auth("not.a.token"),
        expect_contains("jwt error", "invalid token"),
        auth(&token(&id, &["control.console"])),
        expect_contains("jwt error", "websocket.connect"),
        // Nothing is shown, and nothing can be done, before a valid auth.
        send("send command", json!(["say hidden"])),
        expect_contains("jwt error", "authenticate first"),
        json!({"http": {"path": "/api/tokens/deny", "body": {"tokens": [
            {"jti": denied["jti"], "expires_at": denied["exp"]}]}}}),
        auth(&sign(&denied)),
        expect_contains("jwt error", "revoked"),
        // And with no valid auth, the socket is closed after auth_timeout_secs.
        json!({"expect_close": 4001, "timeout": 15}),
    ];
    script(&wings, &id, steps, false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn each_event_needs_its_permission() {
    let wings = Wings::start_with(&tokens_config()).await;
    let id = running_testbox(&wings).await;
    let denied = |event: &str, arg: &str, permission: &str| {
        vec![
            send(event, json!([arg])),
            expect_contains("daemon error", &format!("{permission} is required")),
        ]
    };
    // A user with nothing but connect can watch, and do nothing else.
    let mut steps = vec![auth(&token(&id, &["websocket.connect"])), expect("auth success")];
    steps.extend(denied("send command", "say nope", "control.console"));
    steps.extend(denied("set state", "start", "control.start"));
    steps.extend(denied("set state", "stop", "control.stop"));
    steps.extend(denied("set state", "kill", "control.stop"));
    steps.extend(denied("set state", "restart", "control.restart"));
    steps.push(json!({"expect_none": {"event": "status", "arg": "stopping"}, "for": 1}));
    script(&wings, &id, steps, false).await;
    assert_eq!(wings.state(&id).await, "running");

    // Install output needs admin.websocket.install; start and end are shown to everyone.
    let watcher = token(&id, &["websocket.connect"]);
    let installer = token(&id, &["websocket.connect", "admin.websocket.install"]);
    let reinstall =
        json!({"http": {"path": format!("/api/servers/{id}/reinstall"), "body": {}}, "status": 202});
    let install = vec![
        auth(&installer),
        expect("auth success"),
        reinstall.clone(),
        json!({"expect": {"event": "install started"}, "timeout": 60}),
        json!({"expect": {"event": "install output", "contains": "install done"}, "timeout": 60}),
        json!({"expect": {"event": "install completed", "arg": "successful"}, "timeout": 60}),
    ];
    script(&wings, &id, install, false).await;
    let watch = vec![
        auth(&watcher),
        expect("auth success"),
        reinstall,
        json!({"expect": {"event": "install started"}, "timeout": 60}),
        json!({"expect": {"event": "install completed", "arg": "successful"}, "timeout": 60}),
    ];
    let watched = script(&wings, &id, watch, true).await;
    assert!(
        !events(&watched).iter().any(|e| e["event"] == "install output"),
        "{watched}"
    );

    // Commands with a console permission work; escape sequences pass through as data.
    let colour = "\u{1b}[31mred <b>bold</b>";
    let steps = vec![
        auth(&token(
            &id,
            &["websocket.connect", "control.console", "control.start"],
        )),
        expect("auth success"),
        send("set state", json!(["start"])),
        json!({"expect": {"event": "status", "arg": "running"}, "timeout": 60}),
        send("send command", json!([format!("say {colour}")])),
        expect_arg("console output", json!(format!("[say] {colour}"))),
        // A command is one line: embedded newlines would smuggle a second command.
        send("send command", json!(["say a\nstop"])),
        expect_contains("daemon error", "one line"),
    ];
    script(&wings, &id, steps, false).await;
    assert_eq!(wings.state(&id).await, "running");
}

#[tokio::test(flavor = "multi_thread")]
async fn deauthorize_and_denied_tokens_close_live_sockets() {
    let wings = Wings::start_with(&tokens_config()).await;
    let id = running_testbox(&wings).await;
    let alice = sign(&claims(&id, "alice", ALL));
    let bob = sign(&claims(&id, "bob", ALL));

    // Bob's socket stays open while Alice is deauthorized.
    let bob_steps = vec![
        auth(&bob),
        expect("auth success"),
        json!({"expect_none": {"event": "jwt error"}, "for": 4}),
        send("send command", json!(["say bob is still here"])),
        expect_contains("console output", "bob is still here"),
    ];
    let alice_steps = vec![
        auth(&alice),
        expect("auth success"),
        json!({"http": {"path": format!("/api/servers/{id}/deauthorize"), "body": {"user": "alice"}}}),
        json!({"expect_close": 4003, "timeout": 5}),
        json!({"reconnect": true}),
        auth(&alice),
        expect_contains("jwt error", "revoked"),
    ];
    let (alice_out, _) = tokio::join!(
        script(&wings, &id, alice_steps, false),
        script(&wings, &id, bob_steps, false)
    );
    let closed = alice_out.lines().find(|l| l.starts_with("closed with 4003"));
    // The measured time is printed for docs/BENCHMARKS.md (run with --nocapture).
    println!("deauthorize: {}", closed.expect(&alice_out));

    // A token minted after the deauthorization works again.
    let mut fresh = claims(&id, "alice", ALL);
    fresh["iat"] = json!(common::console::now() + 2);
    script(
        &wings,
        &id,
        vec![auth(&sign(&fresh)), expect("auth success")],
        false,
    )
    .await;

    // Denying a token's id closes the socket using it, and survives a wings restart.
    let carol = claims(&id, "carol", ALL);
    let steps = vec![
        auth(&sign(&carol)),
        expect("auth success"),
        json!({"http": {"path": "/api/tokens/deny", "body": {"tokens": [
            {"jti": carol["jti"], "expires_at": carol["exp"]}]}}}),
        json!({"expect_close": 4003, "timeout": 5}),
    ];
    script(&wings, &id, steps, false).await;
    let mut wings = wings;
    wings.terminate();
    wings.restart().await;
    let steps = vec![auth(&sign(&carol)), expect_contains("jwt error", "revoked")];
    script(&wings, &id, steps, false).await;
    let steps = vec![auth(&alice), expect_contains("jwt error", "revoked")];
    script(&wings, &id, steps, false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_warn_expire_refresh_and_time_out() {
    let extra = format!("{}\n[websocket]\nauth_timeout_secs = 2\n", tokens_config());
    let wings = Wings::start_with(&extra).await;
    let id = running_testbox(&wings).await;
    let short = |seconds: u64| {
        let mut c = claims(&id, "user-1", ALL);
        c["exp"] = json!(common::console::now() + seconds);
        sign(&c)
    };
    let steps = vec![
        // Less than a minute left: "token expiring" at once.
        auth(&short(4)),
        expect("auth success"),
        expect("token expiring"),
        // A fresh token on the open socket: accepted, without replaying the history again.
        auth(&short(600)),
        expect("auth success"),
        json!({"expect_none": {"event": "token expired"}, "for": 5}),
        send("send command", json!(["say still authorised"])),
        expect_contains("console output", "still authorised"),
    ];
    script(&wings, &id, steps, false).await;
    let steps = vec![
        auth(&short(3)),
        expect("auth success"),
        json!({"expect": {"event": "token expired"}, "timeout": 10}),
        // Expired: nothing more is shown, and without a new token the socket closes.
        json!({"expect_close": 4001, "timeout": 10}),
    ];
    script(&wings, &id, steps, false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flooding_game_and_a_stalled_client_never_slow_the_others() {
    let wings = Wings::start_with(&tokens_config()).await;
    let id = running_testbox(&wings).await;
    let before = rss_kib(wings.pid());
    let (cert, key, ca) = wings.client_files();
    let scenario = json!({
        "url": ws_url(&wings, &id),
        "token": token(&id, ALL),
        "clients": 10,
        "seconds": 12,
        "http": {"base": wings.url(""), "cert": cert, "key": key, "ca": ca, "calls": [
            {"method": "POST", "path": format!("/api/servers/{id}/commands"),
             "body": {"commands": ["flood 0"]}},
        ]},
    });
    let (ok, output) = python("flood", &scenario).await;
    assert!(ok, "{output}");
    let peak = rss_kib(wings.pid());
    let report: Value = serde_json::from_str(output.lines().last().unwrap()).unwrap();
    let clients = report["clients"].as_array().unwrap();
    // Every reading client kept receiving, to the end of the flood.
    for (i, client) in clients.iter().enumerate().skip(1) {
        assert!(client["lines"].as_u64().unwrap() > 1_000, "client {i}: {output}");
        assert!(client["late_lines"].as_u64().unwrap() > 0, "client {i}: {output}");
    }
    // The stalled one learned that it missed lines.
    assert!(clients[0]["throttled"].as_u64().unwrap() > 0, "{output}");
    // The game printed far more than the flood gate lets through, and everyone was told.
    assert!(
        clients
            .iter()
            .skip(1)
            .all(|c| c["throttled"].as_u64().unwrap() > 0),
        "{output}"
    );
    // Memory stays bounded: the ring buffers and queues have fixed sizes.
    assert!(
        peak < before + 64 * 1024,
        "wings grew from {before} KiB to {peak} KiB"
    );
    let (status, _) = wings.power(&id, "kill").await;
    assert_eq!(status, 202);
    wings.wait_state(&id, "offline", GAME_TIMEOUT).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn socket_count_frame_size_and_message_rate_are_limited() {
    let wings = Wings::start_with(&tokens_config()).await;
    let id = running_testbox(&wings).await;
    let scenario = json!({
        "url": ws_url(&wings, &id),
        "token": token(&id, ALL),
        "clients": 31,
        "seconds": 3,
    });
    let (ok, output) = python("many", &scenario).await;
    assert!(ok, "{output}");
    let report: Value = serde_json::from_str(output.lines().last().unwrap()).unwrap();
    let codes = report["close_codes"].as_array().unwrap();
    assert_eq!(codes.iter().filter(|c| c.is_null()).count(), 30, "{output}");
    assert_eq!(codes.iter().filter(|c| **c == json!(1013)).count(), 1, "{output}");

    let oversized = vec![
        auth(&token(&id, ALL)),
        expect("auth success"),
        json!({"send_raw": "x".repeat(5000)}),
        json!({"expect_close": 1009, "timeout": 5}),
    ];
    script(&wings, &id, oversized, false).await;

    let stats = json!({"event": "send stats", "args": []}).to_string();
    let flood = vec![
        auth(&token(&id, ALL)),
        expect("auth success"),
        json!({"send_raw": stats, "repeat": 200}),
        expect_contains("daemon error", "too many messages"),
        json!({"expect_close": 1008, "timeout": 5}),
    ];
    script(&wings, &id, flood, false).await;

    // The server and other users were not affected.
    let steps = vec![
        auth(&token(&id, ALL)),
        expect("auth success"),
        send("send command", json!(["say after the floods"])),
        expect_contains("console output", "after the floods"),
    ];
    script(&wings, &id, steps, false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn scrollback_is_replayed_after_a_wings_restart() {
    let mut wings = Wings::start_with(&tokens_config()).await;
    let id = running_testbox(&wings).await;
    wings.command(&id, "say before the restart").await;
    wings.wait_log(&id, "before the restart", GAME_TIMEOUT).await;
    wings.kill9();
    // The game goes on printing while wings is down; Docker's log keeps it.
    let (ok, out) = common::docker(&[
        "exec",
        &format!("mamba-{id}"),
        "sh",
        "-c",
        "echo printed while wings was down > /proc/1/fd/1",
    ]);
    assert!(ok, "{out}");
    wings.restart().await;
    wings.wait_state(&id, "running", GAME_TIMEOUT).await;
    let steps = vec![
        auth(&token(&id, ALL)),
        expect("auth success"),
        json!({"expect_sequence": [
            {"event": "console output", "contains": "[say] before the restart"},
            {"event": "console output", "contains": "printed while wings was down"},
        ]}),
        send("send command", json!(["say after the restart"])),
        expect_contains("console output", "[say] after the restart"),
        // `send logs` replays the history again.
        send("send logs", json!([])),
        expect_contains("console output", "[say] before the restart"),
    ];
    script(&wings, &id, steps, false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn deleting_a_server_closes_its_sockets() {
    let wings = Wings::start_with(&tokens_config()).await;
    let id = running_testbox(&wings).await;
    let steps = vec![
        auth(&token(&id, ALL)),
        expect("auth success"),
        json!({"http": {"method": "DELETE", "path": format!("/api/servers/{id}")}}),
        json!({"expect_close": 4004, "timeout": 30}),
    ];
    script(&wings, &id, steps, false).await;
}
