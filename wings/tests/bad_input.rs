//! Bad input gets a clear 4xx with the JSON error envelope, and nothing is created.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers panic by design

mod common;

use std::net::TcpListener;

use common::{Wings, free_port, testbox, unique_id};
use serde_json::{Value, json};

fn create_body(id: &str, blueprint: Value, variables: Value, port: Value) -> Value {
    json!({
        "id": id,
        "blueprint": blueprint,
        "variables": variables,
        "allocations": {"default": {"ip": "127.0.0.1", "port": port}},
    })
}

/// Asserts the envelope, and that nothing was made for `id`.
async fn assert_refused(wings: &Wings, id: &str, body: Value, status: u16, code: &str, field: Option<&str>) {
    let (got, answer) = wings.post("/api/servers", body).await;
    assert_eq!(got, status, "{answer}");
    assert_eq!(answer["error"]["code"], code, "{answer}");
    assert!(
        answer["error"]["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{answer}"
    );
    if let Some(field) = field {
        let details = answer["error"]["details"].as_array().cloned().unwrap_or_default();
        assert!(
            details.iter().any(|d| d["field"] == field),
            "expected a detail for {field}: {answer}"
        );
    }
    assert_eq!(
        wings.get(&format!("/api/servers/{id}")).await.0,
        404,
        "{id} must not exist"
    );
    assert!(!wings.data_dir().join("servers").join(id).exists());
    assert!(!wings.data_dir().join("volumes").join(id).exists());
    assert!(!common::docker(&["inspect", &format!("mamba-{id}")]).0);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_creates_are_refused_and_nothing_is_created() {
    let wings = Wings::start().await;
    let id = unique_id("bad");
    let port = free_port();

    // Unknown variable, and a variable that breaks its rule.
    assert_refused(
        &wings,
        &id,
        create_body(&id, testbox(), json!({"NOPE": "1"}), json!(port)),
        422,
        "validation_failed",
        Some("variables.NOPE"),
    )
    .await;
    assert_refused(
        &wings,
        &id,
        create_body(&id, testbox(), json!({"FAKE_EXIT_CODE": "300"}), json!(port)),
        422,
        "validation_failed",
        Some("variables.FAKE_EXIT_CODE"),
    )
    .await;
    assert_refused(
        &wings,
        &id,
        create_body(&id, testbox(), json!({"GREETING": "Robert'); DROP"}), json!(port)),
        422,
        "validation_failed",
        Some("variables.GREETING"),
    )
    .await;

    // Ports out of range: 0 is refused by validation, 70000 is not even a port number.
    assert_refused(
        &wings,
        &id,
        create_body(&id, testbox(), json!({}), json!(0)),
        422,
        "validation_failed",
        Some("allocations.default.port"),
    )
    .await;
    assert_refused(
        &wings,
        &id,
        create_body(&id, testbox(), json!({}), json!(70000)),
        400,
        "invalid_request",
        None,
    )
    .await;
    // A port something else already holds.
    let holder = TcpListener::bind(("127.0.0.1", 0)).unwrap();
    let taken = holder.local_addr().unwrap().port();
    assert_refused(
        &wings,
        &id,
        create_body(&id, testbox(), json!({}), json!(taken)),
        409,
        "port_in_use",
        Some("allocations.default"),
    )
    .await;
    // An address that is not on this node.
    let mut body = create_body(&id, testbox(), json!({}), json!(port));
    body["allocations"]["default"]["ip"] = json!("192.0.2.1");
    assert_refused(
        &wings,
        &id,
        body,
        422,
        "validation_failed",
        Some("allocations.default.ip"),
    )
    .await;

    // A missing image (no registry: images are never pulled).
    let mut blueprint = testbox();
    blueprint["images"] = json!([{"label": "gone", "image": "mamba/does-not-exist:1"}]);
    assert_refused(
        &wings,
        &id,
        create_body(&id, blueprint, json!({}), json!(port)),
        422,
        "image_missing",
        Some("image"),
    )
    .await;
    let mut blueprint = testbox();
    blueprint["install"]["image"] = json!("mamba/no-installer:1");
    assert_refused(
        &wings,
        &id,
        create_body(&id, blueprint, json!({}), json!(port)),
        422,
        "image_missing",
        Some("blueprint.install.image"),
    )
    .await;

    // Malformed blueprints: a missing field, and one that is there but wrong.
    let mut blueprint = testbox();
    blueprint.as_object_mut().unwrap().remove("stop");
    assert_refused(
        &wings,
        &id,
        create_body(&id, blueprint, json!({}), json!(port)),
        400,
        "invalid_request",
        None,
    )
    .await;
    let mut blueprint = testbox();
    blueprint["running"]["console_regex"] = json!("(unclosed");
    assert_refused(
        &wings,
        &id,
        create_body(&id, blueprint, json!({}), json!(port)),
        422,
        "validation_failed",
        Some("blueprint.running.console_regex"),
    )
    .await;
    let mut blueprint = testbox();
    blueprint["startup"] = json!("fake-game {{SECRET_TOKEN}}");
    assert_refused(
        &wings,
        &id,
        create_body(&id, blueprint, json!({}), json!(port)),
        422,
        "validation_failed",
        Some("blueprint.startup"),
    )
    .await;

    // Ids that are not path-safe never reach the disk.
    for bad_id in ["../etc", "a/b", "", "x y"] {
        let (status, answer) = wings
            .post(
                "/api/servers",
                create_body(bad_id, testbox(), json!({}), json!(port)),
            )
            .await;
        assert_eq!(status, 400, "{bad_id:?}: {answer}");
    }
    let (status, answer) = wings.post_raw("/api/servers", "{not json").await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (400, Some("invalid_request"))
    );

    // A duplicate id.
    let (status, _) = wings
        .post(
            "/api/servers",
            create_body(&id, testbox(), json!({}), json!(port)),
        )
        .await;
    assert_eq!(status, 202);
    let (status, answer) = wings
        .post(
            "/api/servers",
            create_body(&id, testbox(), json!({}), json!(free_port())),
        )
        .await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (409, Some("duplicate_id")),
        "{answer}"
    );
    // The same port as the first server, even though it is not bound yet.
    let other = unique_id("bad");
    assert_refused(
        &wings,
        &other,
        create_body(&other, testbox(), json!({}), json!(port)),
        409,
        "port_in_use",
        Some("allocations.default"),
    )
    .await;
    let (_, list) = wings.get("/api/servers").await;
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_on_servers_get_the_envelope() {
    let wings = Wings::start().await;
    let (status, body) = wings.power("no-such-server", "start").await;
    assert_eq!((status, body["error"]["code"].as_str()), (404, Some("not_found")));
    let (status, body) = wings
        .post("/api/servers/no-such-server/commands", json!({"commands": ["x"]}))
        .await;
    assert_eq!((status, body["error"]["code"].as_str()), (404, Some("not_found")));
    let (status, _) = wings.delete("/api/servers/no-such-server").await;
    assert_eq!(status, 404);

    let id = unique_id("box");
    wings.create(&id, testbox(), json!({}), free_port()).await;
    wings
        .wait_state(&id, "running", std::time::Duration::from_secs(60))
        .await;
    let (status, body) = wings
        .post(&format!("/api/servers/{id}/power"), json!({"action": "explode"}))
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("invalid_request"))
    );
    let (status, body) = wings
        .post(
            &format!("/api/servers/{id}/commands"),
            json!({"commands": ["two\nlines"]}),
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("invalid_request"))
    );
    let (status, _) = wings
        .post(&format!("/api/servers/{id}/commands"), json!({"commands": []}))
        .await;
    assert_eq!(status, 400);
    let (status, body) = wings.get("/api/nope").await;
    assert_eq!((status, body["error"]["code"].as_str()), (404, Some("not_found")));

    // Off the mutual-TLS listener the panel's routes answer 401, whatever the request
    // carries; only /healthz, console sockets and signed URLs work there.
    let r = wings
        .public
        .get(wings.public_url("/api/servers"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let r = wings
        .public
        .get(wings.public_url("/api/servers"))
        .bearer_auth("test-token-0123456789abcdef0123456789")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unauthorized");

    // Commands to a stopped server are refused, not lost silently.
    assert_eq!(wings.power(&id, "stop").await.0, 202);
    wings
        .wait_state(&id, "offline", std::time::Duration::from_secs(60))
        .await;
    let (status, body) = wings
        .post(
            &format!("/api/servers/{id}/commands"),
            json!({"commands": ["say hi"]}),
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("not_running"))
    );
}

/// Fields that would widen what a container may do, each somewhere a client might try it.
fn widenings() -> Vec<(&'static str, Value)> {
    vec![
        ("privileged", json!(true)),
        (
            "mounts",
            json!([{"type": "bind", "source": "/", "target": "/host"}]),
        ),
        ("binds", json!(["/:/host"])),
        ("volumes", json!({"/host": {}})),
        ("host_config", json!({"Privileged": true})),
        ("cap_add", json!(["SYS_ADMIN"])),
        ("capabilities", json!(["ALL"])),
        ("devices", json!(["/dev/mem:/dev/mem"])),
        ("network_mode", json!("host")),
        ("network", json!("host")),
        ("pid_mode", json!("host")),
        ("ipc_mode", json!("host")),
        ("userns_mode", json!("host")),
        (
            "security_opt",
            json!(["seccomp=unconfined", "apparmor=unconfined"]),
        ),
        ("user", json!("0:0")),
        ("sysctls", json!({"kernel.core_pattern": "|/bin/sh"})),
        ("readonly_rootfs", json!(false)),
    ]
}

/// Every object of a create or update request that could plausibly carry them.
const WIDENING_PLACES: &[&str] = &[
    "",
    "blueprint",
    "blueprint.install",
    "limits",
    "allocations.default",
];

/// A create or update body for `id` with `key: value` set in the object at `place`.
fn widened_body(id: &str, port: u16, place: &str, key: &str, value: &Value) -> Value {
    let mut body = create_body(id, testbox(), json!({}), json!(port));
    body["limits"] = json!({"memory_mb": 128, "cpu_percent": 100, "disk_mb": 100, "pids": 64});
    let target = place
        .split('.')
        .filter(|p| !p.is_empty())
        .fold(&mut body, |v, p| &mut v[p]);
    target[key] = value.clone();
    body
}

fn assert_widening_refused(status: u16, answer: &Value, key: &str, place: &str) {
    assert_eq!(status, 400, "{key} in {place:?}: {answer}");
    assert_eq!(answer["error"]["code"], "invalid_request", "{answer}");
    assert!(
        answer["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains(key)),
        "{key} in {place:?}: {answer}"
    );
}

/// The game container of `id` has the node's restrictions, whatever was asked.
fn assert_container_is_narrow(wings: &Wings, container: &str) {
    let (ok, inspect) = common::docker(&["inspect", container]);
    assert!(ok, "{inspect}");
    let inspect: Value = serde_json::from_str(&inspect).unwrap();
    let c = &inspect[0];
    let host = &c["HostConfig"];
    assert_eq!(host["Privileged"], false);
    assert_eq!(host["CapDrop"], json!(["ALL"]));
    assert!(host["CapAdd"].as_array().is_none_or(Vec::is_empty), "{host}");
    assert_eq!(host["NetworkMode"], "mamba0", "{host}");
    for mode in ["PidMode", "IpcMode", "UsernsMode"] {
        assert!(host[mode].as_str().is_none_or(|m| m != "host"), "{mode}: {host}");
    }
    assert!(host["Devices"].as_array().is_none_or(Vec::is_empty), "{host}");
    assert_ne!(c["Config"]["User"], "", "{c}");
    assert!(!c["Config"]["User"].as_str().unwrap().starts_with("0"), "{c}");
    // Every host path mounted lies in this node's data folder: the server's own files.
    let data_dir = wings.data_dir().display().to_string();
    let mounts = c["Mounts"].as_array().unwrap();
    assert!(!mounts.is_empty());
    for mount in mounts {
        if mount["Type"] == "bind" {
            let source = mount["Source"].as_str().unwrap();
            assert!(source.starts_with(&data_dir), "{mount}");
        } else {
            assert_eq!(mount["Type"], "tmpfs", "{mount}");
        }
    }
}

/// SECURITY-CHECKLIST 28: nothing the panel pushes can widen what a container may do on the
/// node. Neither a create request nor a blueprint has a word for host mounts, privileges,
/// capabilities, devices, host namespaces, another network or another user, and every
/// object in them refuses unknown fields, so each such attempt is a 400 and nothing is made.
/// What the node then builds comes from its own configuration, checked on a real container.
#[tokio::test(flavor = "multi_thread")]
async fn a_pushed_config_cannot_widen_the_node_privileges() {
    let wings = Wings::start().await;
    for place in WIDENING_PLACES {
        for (key, value) in &widenings() {
            let id = unique_id("widen");
            let body = widened_body(&id, free_port(), place, key, value);
            let (status, answer) = wings.post("/api/servers", body).await;
            assert_widening_refused(status, &answer, key, place);
            assert_eq!(wings.get(&format!("/api/servers/{id}")).await.0, 404);
        }
    }
    assert!(wings.containers().is_empty(), "a refused create made a container");

    // A proper create: the container gets the node's restrictions, whatever was asked.
    let id = unique_id("narrow");
    wings.create(&id, testbox(), json!({}), free_port()).await;
    wings
        .wait_state(&id, "running", std::time::Duration::from_secs(120))
        .await;
    assert_container_is_narrow(&wings, &format!("mamba-{id}"));
}

/// SECURITY-CHECKLIST 28 for the update route (`PUT /api/servers/{id}`, the panel's
/// `server_update` job): it takes the same request as a create, so every widening is a 400
/// there too, the stored spec stays as it was, and the container made at the next start
/// still has only the node's restrictions.
#[tokio::test(flavor = "multi_thread")]
async fn an_update_cannot_widen_the_node_privileges_either() {
    let wings = Wings::start().await;
    let id = unique_id("upwiden");
    let port = free_port();
    wings.create(&id, testbox(), json!({}), port).await;
    let timeout = std::time::Duration::from_secs(120);
    wings.wait_state(&id, "running", timeout).await;
    let before = wings.server(&id).await;
    let path = format!("/api/servers/{id}");
    for place in WIDENING_PLACES {
        for (key, value) in &widenings() {
            let body = widened_body(&id, port, place, key, value);
            let (status, answer) = wings.put(&path, body).await;
            assert_widening_refused(status, &answer, key, place);
        }
    }
    let after = wings.server(&id).await;
    for field in ["limits", "blueprint", "allocations", "image"] {
        assert_eq!(after[field], before[field], "a refused update changed {field}");
    }
    let stored =
        std::fs::read_to_string(wings.data_dir().join("servers").join(&id).join("server.json")).unwrap();
    for value in [
        "SYS_ADMIN",
        "/dev/mem",
        "seccomp=unconfined",
        "kernel.core_pattern",
        "/host",
    ] {
        assert!(
            !stored.contains(value),
            "{value} reached the stored record: {stored}"
        );
    }

    // A proper update, then a restart: the new container is as narrow as the first.
    let body = widened_body(&id, port, "", "id", &json!(id));
    let (status, answer) = wings.put(&path, body).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(wings.power(&id, "restart").await.0, 202);
    let container = common::wait_for("the restarted container", timeout, || async {
        let server = wings.server(&id).await;
        let container = server["container_id"].as_str()?.to_string();
        (server["state"] == "running" && Some(container.as_str()) != before["container_id"].as_str())
            .then_some(container)
    })
    .await;
    assert_container_is_narrow(&wings, &container);
}
