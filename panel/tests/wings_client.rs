//! The panel's client of wings (`wings_client`) against a real `wings` process enrolled to a
//! real panel CA through an enrollment token: every call it makes, how the node's refusals
//! map (not found, conflict, retryable), and that it talks only to the node it names.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::TestDb;
use common::node::{PanelWithListener, WingsNode, blueprint_json, free_port};
use mamba_panel::ids::{NodeId, ServerId};
use mamba_panel::wings_client::{WingsClient, WingsError};
use mamba_shared::wings_api::{
    Allocation, Allocations, CreateServerRequest, DeniedToken, DenyTokensRequest, PowerAction, ServerState,
};

// The node and its client do not touch the database beyond enrollment; one backend is
// enough, and SQLite needs no service.
#[actix_web::test]
async fn the_client_drives_an_enrolled_node_and_maps_its_refusals() {
    let t = TestDb::new(common::Kind::Sqlite).unwrap();
    let panel = PanelWithListener::start(&t);
    let wings = WingsNode::start(&t, &panel, "client-node").await;
    let client = WingsClient::new(&panel.state.pki, &wings.node).unwrap();
    assert_eq!(client.base_url(), format!("https://127.0.0.1:{}", wings.api_port));

    let system = client.system().await.unwrap();
    assert!(!system.version.is_empty());
    assert!(client.servers().await.unwrap().is_empty());

    // Unknown server: 404, not retryable.
    let unknown = ServerId::generate();
    let err = client.server(&unknown).await.unwrap_err();
    assert!(err.is_not_found() && !err.is_retryable(), "{err:?}");

    let id = ServerId::generate();
    let port = free_port();
    let request = CreateServerRequest {
        id: mamba_shared::ids::ServerId::new(id.as_str()).unwrap(),
        blueprint: serde_json::from_value(blueprint_json("wings/tests/fixtures/testbox.yaml")).unwrap(),
        variables: BTreeMap::from([("GREETING".to_string(), "hi there".to_string())]),
        limits: None,
        allocations: Allocations {
            default: Allocation {
                ip: "127.0.0.1".parse().unwrap(),
                port,
            },
            additional: Vec::new(),
        },
        image: None,
        start_on_completion: true,
        skip_install: false,
    };
    let view = client.create_server(&request).await.unwrap();
    assert_eq!(view.id.as_str(), id.as_str());
    // The same id again: a conflict, which install jobs treat as "already created".
    let err = client.create_server(&request).await.unwrap_err();
    assert!(err.is_conflict(), "{err:?}");
    match &err {
        WingsError::Refused { code, .. } => assert_eq!(code, "duplicate_id"),
        other => panic!("{other:?}"),
    }

    wait_state(&client, &id, ServerState::Running).await;
    client
        .commands(&id, vec!["say panel was here".into()])
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let lines = client.logs(&id, 200).await.unwrap().lines;
        if lines.iter().any(|l| l.contains("panel was here")) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the command never reached the console: {lines:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stats = client.resources(&id).await.unwrap();
    assert_eq!(stats.state, ServerState::Running);

    // Revocations are accepted.
    client.deauthorize(&id, "some-user").await.unwrap();
    client
        .deny_tokens(&DenyTokensRequest {
            tokens: vec![DeniedToken {
                jti: "a-token-id".into(),
                expires_at: 4_000_000_000,
            }],
        })
        .await
        .unwrap();
    // Bad input is the node's 400, not retryable.
    let err = client.commands(&id, Vec::new()).await.unwrap_err();
    assert_eq!(err.status(), Some(400), "{err:?}");
    assert!(!err.is_retryable());

    client.power(&id, PowerAction::Stop).await.unwrap();
    wait_state(&client, &id, ServerState::Offline).await;
    // Not running: commands are a conflict.
    let err = client.commands(&id, vec!["say late".into()]).await.unwrap_err();
    assert!(err.is_conflict(), "{err:?}");

    // Queued behind nothing; the delete below runs after it in the server's queue.
    client.reinstall(&id).await.unwrap();

    client.delete_server(&id).await.unwrap();
    let err = client.delete_server(&id).await.unwrap_err();
    assert!(err.is_not_found(), "{err:?}");
    assert!(wings.containers().is_empty(), "{:?}", wings.containers());

    // Expecting another node at this address: the node's certificate does not name it, so
    // nothing is sent.
    let mut impostor = wings.node.clone();
    impostor.id = NodeId::generate();
    let err = WingsClient::new(&panel.state.pki, &impostor)
        .unwrap()
        .system()
        .await
        .unwrap_err();
    assert!(matches!(err, WingsError::Unreachable(_)), "{err:?}");

    // Nobody listening: unreachable, retryable.
    let mut gone = wings.node.clone();
    gone.api_port = free_port();
    let err = WingsClient::new(&panel.state.pki, &gone)
        .unwrap()
        .system()
        .await
        .unwrap_err();
    assert!(err.is_retryable() && !err.is_not_found(), "{err:?}");
}

async fn wait_state(client: &WingsClient, id: &ServerId, state: ServerState) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let view = client.server(id).await.unwrap();
        if view.state == state {
            return;
        }
        assert!(Instant::now() < deadline, "{id} never became {state:?}: {view:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
