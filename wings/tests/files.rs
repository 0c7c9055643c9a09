//! The file manager API, signed URLs, decompress, pull and the disk quota against a real wings
//! and real running containers. Symlinks and races are planted from inside the container
//! with `docker exec`, the way a hostile game server would. SECURITY-CHECKLIST items 1-7, 9, 10.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers panic by design

mod common;

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::console::{now, sign, tokens_config};
use common::{Wings, docker, free_port, testbox, unique_id, wait_for};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const T: Duration = Duration::from_secs(60);

/// A running testbox server; answers its id.
async fn running(wings: &Wings, blueprint: Value) -> String {
    let id = unique_id("files");
    wings.create(&id, blueprint, json!({}), free_port()).await;
    wings.wait_state(&id, "running", T).await;
    id
}

fn root(wings: &Wings, id: &str) -> PathBuf {
    wings.data_dir().join("volumes").join(id)
}

/// Runs a shell command inside the server's container, as the game's user.
fn exec(id: &str, script: &str) -> (bool, String) {
    docker(&["exec", &format!("mamba-{id}"), "sh", "-c", script])
}

fn files(id: &str, route: &str) -> String {
    format!("/api/servers/{id}/files/{route}")
}

async fn raw(wings: &Wings, method: reqwest::Method, path: &str, body: Vec<u8>) -> (u16, Vec<u8>) {
    let r = wings
        .http
        .request(method, wings.url(path))
        .body(body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.bytes().await.unwrap().to_vec())
}

async fn write(wings: &Wings, id: &str, file: &str, body: &[u8]) -> (u16, Value) {
    let path = format!("{}?file={}", files(id, "write"), enc(file));
    let (status, body) = raw(wings, reqwest::Method::POST, &path, body.to_vec()).await;
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

async fn read(wings: &Wings, id: &str, file: &str) -> (u16, Vec<u8>) {
    let path = format!("{}?file={}", files(id, "contents"), enc(file));
    raw(wings, reqwest::Method::GET, &path, Vec::new()).await
}

fn enc(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// A refusal: a 4xx with the JSON error envelope.
fn refused(status: u16, body: &Value, what: &str) {
    assert!(
        (400..500).contains(&status),
        "{what}: expected a 4xx, got {status} {body}"
    );
    assert!(body["error"]["code"].is_string(), "{what}: no envelope: {body}");
}

fn signed(server: &str, scope: &str, file: &str, lifetime: u64) -> String {
    let now = now();
    sign(&json!({
        "sub": "user-1",
        "server": server,
        "scope": scope,
        "file": file,
        "iat": now,
        "exp": now + lifetime,
        "jti": uuid::Uuid::new_v4().to_string(),
    }))
}

#[tokio::test(flavor = "multi_thread")]
async fn every_file_route_works() {
    let wings = Wings::start().await;
    let id = running(&wings, testbox()).await;

    // write (streamed body), contents with ranges
    let (status, body) = write(&wings, &id, "cfg/motd.txt", b"hello world").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!({"file": "cfg/motd.txt", "size": 11}));
    assert_eq!(
        read(&wings, &id, "cfg/motd.txt").await,
        (200, b"hello world".to_vec())
    );
    let ranged = wings
        .http
        .get(wings.url(&format!("{}?file=cfg/motd.txt", files(&id, "contents"))))
        .header("range", "bytes=6-")
        .send()
        .await
        .unwrap();
    assert_eq!(ranged.status().as_u16(), 206);
    assert_eq!(ranged.headers()["content-range"], "bytes 6-10/11");
    assert_eq!(ranged.bytes().await.unwrap().as_ref(), b"world");
    let unsatisfiable = wings
        .http
        .get(wings.url(&format!("{}?file=cfg/motd.txt", files(&id, "contents"))))
        .header("range", "bytes=50-")
        .send()
        .await
        .unwrap();
    assert_eq!(unsatisfiable.status().as_u16(), 416);
    // The file written from the API is visible inside the container, owned by its user.
    assert_eq!(
        exec(&id, "cat /home/container/cfg/motd.txt"),
        (true, "hello world".into())
    );

    // create-directory, list with pages
    let (status, body) = wings
        .post(
            &files(&id, "create-directory"),
            json!({"root": "cfg", "name": "deep/er"}),
        )
        .await;
    assert_eq!(status, 204, "{body}");
    let (status, body) = wings
        .post(
            &files(&id, "create-directory"),
            json!({"root": "cfg", "name": "deep/er"}),
        )
        .await;
    assert_eq!(status, 409, "{body}");
    exec(&id, "ln -s motd.txt /home/container/cfg/link");
    let (status, body) = wings.get(&format!("{}?directory=cfg", files(&id, "list"))).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["total"], 3);
    let names: Vec<&str> = body["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["deep", "link", "motd.txt"]);
    assert_eq!(body["entries"][1]["kind"], "symlink");
    assert_eq!(body["entries"][1]["symlink_target"], "motd.txt");
    assert_eq!(body["entries"][2]["size"], 11);
    let (_, page) = wings
        .get(&format!("{}?directory=cfg&page=2&per_page=2", files(&id, "list")))
        .await;
    assert_eq!(page["entries"].as_array().unwrap().len(), 1);
    assert_eq!(page["entries"][0]["name"], "motd.txt");

    // copy, rename, chmod
    let (status, body) = wings
        .post(&files(&id, "copy"), json!({"file": "cfg/motd.txt"}))
        .await;
    assert_eq!(
        (status, body["file"].as_str()),
        (200, Some("cfg/motd copy.txt")),
        "{body}"
    );
    let (status, body) = wings
        .post(
            &files(&id, "rename"),
            json!({"root": "cfg", "files": [{"from": "motd copy.txt", "to": "deep/moved.txt"}]}),
        )
        .await;
    assert_eq!(status, 204, "{body}");
    let (status, body) = wings
        .post(
            &files(&id, "rename"),
            json!({"root": "cfg", "files": [{"from": "deep/moved.txt", "to": "motd.txt"}]}),
        )
        .await;
    assert_eq!(status, 409, "an existing target is never replaced: {body}");
    assert_eq!(body["error"]["details"][0]["field"], "files[0]");
    let (status, body) = wings
        .post(
            &files(&id, "chmod"),
            json!({"root": "cfg", "files": [{"file": "motd.txt", "mode": "600"}]}),
        )
        .await;
    assert_eq!(status, 204, "{body}");
    let (_, listing) = wings.get(&format!("{}?directory=cfg", files(&id, "list"))).await;
    assert_eq!(listing["entries"][2]["mode_octal"], "600");
    let (status, body) = wings
        .post(
            &files(&id, "chmod"),
            json!({"root": "cfg", "files": [{"file": "motd.txt", "mode": "4755"}]}),
        )
        .await;
    refused(status, &body, "setuid");

    // compress in every format, decompress each elsewhere
    for format in ["zip", "tar.gz", "tar.zst"] {
        let (status, body) = wings
            .post(
                &files(&id, "compress"),
                json!({"root": "cfg", "files": ["deep", "motd.txt", "link"], "format": format, "name": format!("a.{format}")}),
            )
            .await;
        assert_eq!(status, 200, "{format}: {body}");
        assert_eq!(body["file"], format!("cfg/a.{format}"));
        let dir = format!("out-{}", format.replace('.', "-"));
        wings
            .post(&files(&id, "create-directory"), json!({"name": dir}))
            .await;
        let (status, body) = wings
            .post(
                &files(&id, "rename"),
                json!({"files": [{"from": format!("cfg/a.{format}"), "to": format!("{dir}/a.{format}")}]}),
            )
            .await;
        assert_eq!(status, 204, "{body}");
        let (status, body) = wings
            .post(
                &files(&id, "decompress"),
                json!({"root": dir, "file": format!("a.{format}")}),
            )
            .await;
        assert_eq!(status, 200, "{format}: {body}");
        assert_eq!(
            read(&wings, &id, &format!("{dir}/motd.txt")).await.1,
            b"hello world"
        );
        assert_eq!(
            read(&wings, &id, &format!("{dir}/deep/moved.txt")).await.1,
            b"hello world"
        );
        let (_, listing) = wings
            .get(&format!("{}?directory={dir}", files(&id, "list")))
            .await;
        let link = listing["entries"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == "link")
            .cloned()
            .unwrap();
        assert_eq!(
            (link["kind"].as_str(), link["symlink_target"].as_str()),
            (Some("symlink"), Some("motd.txt"))
        );
    }

    // search
    let (status, body) = wings
        .get(&format!("{}?pattern=*.txt", files(&id, "search")))
        .await;
    assert_eq!(status, 200, "{body}");
    let paths: Vec<&str> = body["hits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["path"].as_str().unwrap())
        .collect();
    assert!(
        paths.contains(&"cfg/motd.txt") && paths.contains(&"out-zip/deep/moved.txt"),
        "{paths:?}"
    );
    let (_, body) = wings
        .get(&format!("{}?pattern=MOVED&directory=cfg", files(&id, "search")))
        .await;
    assert_eq!(body["hits"].as_array().unwrap().len(), 1, "{body}");

    // delete (recursive), never the root
    let (status, body) = wings
        .post(
            &files(&id, "delete"),
            json!({"files": ["out-zip", "out-tar-gz", "cfg/link"]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["deleted"], 3);
    assert!(!root(&wings, &id).join("out-zip").exists());
    assert!(
        root(&wings, &id).join("cfg/motd.txt").exists(),
        "the link's target stays"
    );
    let (status, body) = wings.post(&files(&id, "delete"), json!({"files": [""]})).await;
    refused(status, &body, "deleting the root");

    // unknown server
    let (status, body) = wings.get(&format!("{}?directory=", files("nope", "list"))).await;
    assert_eq!(status, 404, "{body}");
}

// ---- a tiny HTTP server for pulls -------------------------------------------------------

struct Origin {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
}

/// Serves `/file` (the given body), `/redirect?<url>` (302 there), `/slow` (a body that never
/// ends) and `/huge` (claims 1 TB). Counts every connection it accepts.
async fn origin(bind: &str, body: Vec<u8>) -> Origin {
    let listener = tokio::net::TcpListener::bind(bind).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let counter = connections.clone();
    let body = Arc::new(body);
    tokio::spawn(async move {
        loop {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            counter.fetch_add(1, Ordering::SeqCst);
            let body = body.clone();
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let line = String::from_utf8_lossy(&request);
                let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
                if let Some(to) = path.strip_prefix("/redirect?") {
                    let head = format!(
                        "HTTP/1.1 302 Found\r\nLocation: {to}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    );
                    let _ = socket.write_all(head.as_bytes()).await;
                } else if path == "/slow" {
                    let _ = socket
                        .write_all(
                            b"HTTP/1.1 200 OK\r\nContent-Length: 10000000\r\nConnection: close\r\n\r\n",
                        )
                        .await;
                    loop {
                        if socket.write_all(&[b'x'; 1024]).await.is_err() {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                } else if path == "/huge" {
                    let _ = socket
                        .write_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
                        .await;
                    let chunk = vec![b'z'; 64 * 1024];
                    while socket.write_all(&chunk).await.is_ok() {}
                } else {
                    let head = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = socket.write_all(head.as_bytes()).await;
                    let _ = socket.write_all(&body).await;
                }
            });
        }
    });
    Origin { addr, connections }
}

/// Checklist 10: loopback, private, link-local, CGNAT, unspecified, multicast, in every
/// spelling and through DNS, are refused, and no connection to them is ever made.
#[tokio::test(flavor = "multi_thread")]
async fn pulls_reach_only_public_addresses() {
    let wings = Wings::start().await;
    let id = running(&wings, testbox()).await;
    let local = origin("127.0.0.1:0", b"secret".to_vec()).await;
    let port = local.addr.port();
    for url in [
        format!("http://127.0.0.1:{port}/file"),
        format!("http://localhost:{port}/file"),
        format!("http://2130706433:{port}/file"),
        format!("http://0x7f.0.0.1:{port}/file"),
        format!("http://127.1:{port}/file"),
        format!("http://0177.0.0.1:{port}/file"),
        format!("http://[::ffff:127.0.0.1]:{port}/file"),
        format!("http://[::1]:{port}/file"),
        format!("http://0.0.0.0:{port}/file"),
        format!("http://0:{port}/file"),
        "http://169.254.169.254/latest/meta-data/".to_string(),
        "http://[fe80::1]/x".to_string(),
        "http://10.0.0.1/x".to_string(),
        "http://172.17.0.1/x".to_string(),
        "http://192.168.0.1/x".to_string(),
        "http://100.64.0.1/x".to_string(),
        "http://224.0.0.1/x".to_string(),
        "http://[fd00::1]/x".to_string(),
        "http://[64:ff9b::a9fe:a9fe]/x".to_string(),
    ] {
        let (status, body) = wings
            .post(
                &files(&id, "pull"),
                json!({"url": url, "foreground": true, "file_name": "x"}),
            )
            .await;
        assert_eq!(status, 403, "{url}: {body}");
        assert_eq!(body["error"]["code"], "forbidden_address", "{url}: {body}");
    }
    for url in [
        "file:///etc/passwd",
        "gopher://example.com/",
        "http://user:pw@example.com/",
    ] {
        let (status, body) = wings.post(&files(&id, "pull"), json!({"url": url})).await;
        assert_eq!(status, 400, "{url}: {body}");
    }
    assert_eq!(
        local.connections.load(Ordering::SeqCst),
        0,
        "no connection was ever made"
    );
    assert!(!root(&wings, &id).join("x").exists());
}

/// With one loopback address allowed (an operator's mirror), pulls work, are listed and
/// cancelled, respect size and quota, and a redirect to any other address is refused.
#[tokio::test(flavor = "multi_thread")]
async fn pulls_download_list_cancel_and_refuse_redirects() {
    let wings =
        Wings::start_with("[files]\npull_allowed_networks = [\"127.0.0.1/32\"]\npull_max_bytes = 50000000\n")
            .await;
    let id = running(&wings, testbox()).await;
    let mirror = origin("127.0.0.1:0", vec![7u8; 300_000]).await;
    let forbidden = origin("127.0.0.2:0", b"secret".to_vec()).await;
    let base = format!("http://127.0.0.1:{}", mirror.addr.port());

    let (status, body) = wings
        .post(&files(&id, "pull"), json!({"url": format!("{base}/file"), "directory": "mods", "file_name": "a.jar", "foreground": true}))
        .await;
    // The folder must exist first.
    refused(status, &body, "missing folder");
    wings
        .post(&files(&id, "create-directory"), json!({"name": "mods"}))
        .await;
    let (status, body) = wings
        .post(&files(&id, "pull"), json!({"url": format!("{base}/file"), "directory": "mods", "file_name": "a.jar", "foreground": true}))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!({"file": "mods/a.jar", "size": 300_000}));
    assert_eq!(
        std::fs::read(root(&wings, &id).join("mods/a.jar")).unwrap(),
        vec![7u8; 300_000]
    );
    let (status, _) = wings
        .post(
            &files(&id, "pull"),
            json!({"url": format!("{base}/file"), "directory": "mods", "file_name": "a.jar"}),
        )
        .await;
    assert_eq!(status, 409, "an existing file is never replaced");

    for to in [
        format!("http://127.0.0.2:{}/file", forbidden.addr.port()),
        format!("http://[::1]:{}/file", forbidden.addr.port()),
        "http://169.254.169.254/latest/meta-data/".to_string(),
    ] {
        let (status, body) = wings
            .post(
                &files(&id, "pull"),
                json!({"url": format!("{base}/redirect?{to}"), "file_name": "r", "foreground": true}),
            )
            .await;
        assert!(status == 403 || status == 502, "{to}: {status} {body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("not a public address"),
            "{body}"
        );
    }
    assert_eq!(forbidden.connections.load(Ordering::SeqCst), 0);

    // Size cap: an endless body is stopped, and nothing stays behind.
    let (status, body) = wings
        .post(
            &files(&id, "pull"),
            json!({"url": format!("{base}/huge"), "file_name": "huge", "foreground": true}),
        )
        .await;
    assert_eq!(status, 413, "{body}");

    // Background pulls are listed and can be cancelled; no partial file stays.
    let (status, body) = wings
        .post(
            &files(&id, "pull"),
            json!({"url": format!("{base}/slow"), "file_name": "slow"}),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let pull_id = body["id"].as_str().unwrap().to_string();
    let listed = wait_for("the pull to be listed with progress", T, || async {
        let (_, list) = wings.get(&files(&id, "pull")).await;
        list.as_array()
            .and_then(|a| a.first().cloned())
            .filter(|p| p["bytes"].as_u64() > Some(0))
    })
    .await;
    assert_eq!(listed["id"], pull_id);
    assert_eq!(listed["total"], 10_000_000);
    let (status, _) = wings.delete(&format!("{}/{pull_id}", files(&id, "pull"))).await;
    assert_eq!(status, 204);
    wait_for("the pull to end", T, || async {
        let (_, list) = wings.get(&files(&id, "pull")).await;
        list.as_array().unwrap().is_empty().then_some(())
    })
    .await;
    let (status, _) = wings.delete(&format!("{}/{pull_id}", files(&id, "pull"))).await;
    assert_eq!(status, 404);
    let leftovers: Vec<String> = std::fs::read_dir(root(&wings, &id))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("mamba-pull") || n == "slow" || n == "huge")
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// Checklist 1: traversal in every path parameter is refused, and nothing outside is touched.
#[tokio::test(flavor = "multi_thread")]
async fn traversal_is_refused_in_every_path_parameter() {
    let wings = Wings::start_with(&tokens_config()).await;
    let id = running(&wings, testbox()).await;
    let state_file = format!("../../servers/{id}/server.json");
    let long = "a/".repeat(3000);
    let bad = [
        "../x",
        state_file.as_str(),
        "/etc/passwd",
        "a/../../x",
        "..\\x",
        "a\0b",
        "..",
        long.as_str(),
        &"n".repeat(300),
    ];
    let before = std::fs::read(wings.data_dir().join(format!("servers/{id}/server.json"))).unwrap();
    for p in bad {
        let what = |route: &str| format!("{route} with {:?}", &p[..p.len().min(40)]);
        let (s, b) = wings
            .get(&format!("{}?directory={}", files(&id, "list"), enc(p)))
            .await;
        refused(s, &b, &what("list"));
        let (s, b) = read(&wings, &id, p).await;
        refused(
            s,
            &serde_json::from_slice(&b).unwrap_or(Value::Null),
            &what("contents"),
        );
        let (s, b) = write(&wings, &id, p, b"pwned").await;
        refused(s, &b, &what("write"));
        for (route, body) in [
            ("rename", json!({"files": [{"from": p, "to": "x"}]})),
            ("rename", json!({"files": [{"from": "x", "to": p}]})),
            ("rename", json!({"root": p, "files": [{"from": "a", "to": "b"}]})),
            ("copy", json!({"file": p})),
            ("copy", json!({"file": "x", "to": p})),
            ("delete", json!({"files": [p]})),
            ("delete", json!({"root": p, "files": ["a"]})),
            ("create-directory", json!({"name": p})),
            ("create-directory", json!({"root": p, "name": "a"})),
            ("chmod", json!({"files": [{"file": p, "mode": "777"}]})),
            ("compress", json!({"files": [p]})),
            ("compress", json!({"root": p, "files": ["a"]})),
            ("compress", json!({"files": ["x"], "name": p})),
            ("decompress", json!({"file": p})),
            ("decompress", json!({"root": p, "file": "a.zip"})),
            ("pull", json!({"url": "https://example.com/a", "directory": p})),
            ("pull", json!({"url": "https://example.com/a", "file_name": p})),
        ] {
            let (s, b) = wings.post(&files(&id, route), body).await;
            refused(s, &b, &what(route));
        }
        let (s, b) = wings
            .get(&format!(
                "{}?pattern=a&directory={}",
                files(&id, "search"),
                enc(p)
            ))
            .await;
        refused(s, &b, &what("search"));
        for scope in ["file-download", "file-upload"] {
            let token = signed(&id, scope, p, 60);
            let r = if scope == "file-download" {
                wings
                    .public
                    .get(wings.public_url(&format!("/download/file?token={token}")))
                    .send()
                    .await
                    .unwrap()
            } else {
                wings
                    .public
                    .post(wings.public_url(&format!("/upload/file?token={token}")))
                    .body("pwned")
                    .send()
                    .await
                    .unwrap()
            };
            let status = r.status().as_u16();
            let body: Value = r.json().await.unwrap_or(Value::Null);
            refused(status, &body, &what(scope));
        }
    }
    // Percent-encoded dots are decoded before the check, so they are refused too.
    let (s, b) = wings
        .get(&format!("{}?file=%2e%2e%2fx", files(&id, "contents")))
        .await;
    refused(s, &b, "encoded ..");
    assert_eq!(
        std::fs::read(wings.data_dir().join(format!("servers/{id}/server.json"))).unwrap(),
        before
    );
    assert!(!wings.data_dir().join("x").exists() && !wings.data_dir().join("volumes/x").exists());
}

/// Checklist 2, 3 and 9: symlinks planted from inside the running container to `/`, `/etc`
/// and another server's folder never let a route reach their targets; a folder swapped for
/// a link in a loop (from inside) never lets one through; the denylist holds on the path
/// reached through a link.
#[tokio::test(flavor = "multi_thread")]
async fn symlinks_and_races_from_inside_the_container_lead_nowhere() {
    let wings = Wings::start_with(&tokens_config()).await;
    let mut blueprint = testbox();
    blueprint["file_denylist"] = json!(["secret.txt", "locked"]);
    let id = running(&wings, blueprint).await;
    let other = running(&wings, testbox()).await;
    let other_root = root(&wings, &other);
    std::fs::write(other_root.join("victim"), "other server's").unwrap();
    let victim_mode = std::fs::metadata(other_root.join("victim"))
        .unwrap()
        .permissions();

    let (ok, out) = exec(
        &id,
        &format!(
            "cd /home/container && ln -s / rootfs && ln -s /etc etc && ln -s ../{other} other \
             && ln -s ../{other}/victim victim-link && ln -s /etc/passwd passwd \
             && echo s > secret.txt && ln -s secret.txt innocent && mkdir locked && ln -s locked door"
        ),
    );
    assert!(ok, "{out}");

    // Paths that go through a link to outside: refused by every route.
    for p in ["rootfs/etc/passwd", "etc/passwd", "other/victim", "etc/hostname"] {
        let (s, b) = read(&wings, &id, p).await;
        refused(s, &serde_json::from_slice(&b).unwrap_or(Value::Null), p);
        let (s, b) = write(&wings, &id, p, b"pwned").await;
        refused(s, &b, p);
        let (s, b) = wings
            .post(
                &files(&id, "chmod"),
                json!({"files": [{"file": p, "mode": "777"}]}),
            )
            .await;
        refused(s, &b, p);
        let (s, b) = wings
            .post(&files(&id, "copy"), json!({"file": p, "to": "stolen"}))
            .await;
        refused(s, &b, p);
        let (s, b) = wings
            .post(
                &files(&id, "rename"),
                json!({"files": [{"from": p, "to": "stolen"}]}),
            )
            .await;
        refused(s, &b, p);
        let (s, b) = wings.post(&files(&id, "delete"), json!({"files": [p]})).await;
        refused(s, &b, p);
        let (s, b) = wings.post(&files(&id, "decompress"), json!({"file": p})).await;
        refused(s, &b, p);
        let token = signed(&id, "file-download", p, 60);
        let r = wings
            .public
            .get(wings.public_url(&format!("/download/file?token={token}")))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_client_error(), "{p} downloaded");
    }
    // Links to outside: their contents are never read, copied or chmod'ed.
    for p in ["passwd", "victim-link"] {
        let (s, b) = read(&wings, &id, p).await;
        refused(s, &serde_json::from_slice(&b).unwrap_or(Value::Null), p);
        let (s, b) = wings
            .post(
                &files(&id, "chmod"),
                json!({"files": [{"file": p, "mode": "777"}]}),
            )
            .await;
        refused(s, &b, p);
        let (s, b) = wings
            .post(&files(&id, "copy"), json!({"file": p, "to": "stolen"}))
            .await;
        refused(s, &b, p);
        let token = signed(&id, "file-download", p, 60);
        let r = wings
            .public
            .get(wings.public_url(&format!("/download/file?token={token}")))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_client_error(), "{p} downloaded");
    }
    // Writing to a link replaces the link with a file in the server's folder; the target
    // is never written.
    let (s, b) = write(&wings, &id, "passwd", b"pwned").await;
    assert_eq!(s, 200, "{b}");
    assert!(
        root(&wings, &id)
            .join("passwd")
            .symlink_metadata()
            .unwrap()
            .is_file()
    );
    assert!(!std::fs::read_to_string("/etc/passwd").unwrap().contains("pwned"));
    for dir in ["rootfs", "etc", "other"] {
        let (s, b) = wings
            .get(&format!("{}?directory={dir}", files(&id, "list")))
            .await;
        refused(s, &b, dir);
        let (s, b) = wings
            .post(&files(&id, "create-directory"), json!({"root": dir, "name": "x"}))
            .await;
        refused(s, &b, dir);
        let (s, b) = write(&wings, &id, &format!("{dir}/dropped"), b"x").await;
        refused(s, &b, dir);
    }
    // Links themselves can be removed: the link goes, its target stays.
    let (s, b) = wings
        .post(&files(&id, "delete"), json!({"files": ["victim-link", "other"]}))
        .await;
    assert_eq!(s, 200, "{b}");
    // Compress stores links as links, never what they point to.
    let (s, b) = wings
        .post(
            &files(&id, "compress"),
            json!({"files": ["rootfs", "etc", "passwd"], "format": "tar.gz", "name": "links.tar.gz"}),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    assert!(b["size"].as_u64().unwrap() < 4096, "only links were packed: {b}");
    let (ok, listing) = exec(&id, "tar -tvzf /home/container/links.tar.gz");
    assert!(
        ok && !listing.contains("shadow") && listing.contains("rootfs -> /"),
        "{listing}"
    );

    // The denylist, reached directly and through links.
    for p in ["secret.txt", "innocent", "locked/x", "door/x"] {
        let (s, b) = read(&wings, &id, p).await;
        let b: Value = serde_json::from_slice(&b).unwrap_or(Value::Null);
        assert_eq!(s, 403, "{p}: {b}");
    }
    for p in ["secret.txt", "locked/x", "door/x"] {
        let (s, b) = write(&wings, &id, p, b"x").await;
        refused(s, &b, p);
    }
    assert_eq!(
        std::fs::read_dir(root(&wings, &id).join("locked"))
            .unwrap()
            .count(),
        0
    );
    // Writing to the link replaces the link, never the denied file it led to.
    let (s, b) = write(&wings, &id, "innocent", b"x").await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(
        std::fs::read_to_string(root(&wings, &id).join("secret.txt")).unwrap(),
        "s\n"
    );
    let (s, _) = wings
        .post(&files(&id, "delete"), json!({"files": ["locked"]}))
        .await;
    assert_eq!(s, 403);

    // The race: `swap` flips between a folder and a link to the other server, from inside.
    exec(
        &id,
        &format!(
            "cd /home/container && nohup sh -c 'while true; do rm -rf swap; mkdir swap; echo in > swap/victim; \
             rm -rf swap; ln -s ../{other} swap; done' >/dev/null 2>&1 &"
        ),
    );
    for i in 0..150 {
        assert_ne!(
            read(&wings, &id, "swap/victim").await.1,
            b"other server's",
            "read through the swap"
        );
        let _ = write(&wings, &id, "swap/victim", format!("overwritten {i}").as_bytes()).await;
        let _ = wings
            .post(
                &files(&id, "chmod"),
                json!({"files": [{"file": "swap/victim", "mode": "777"}]}),
            )
            .await;
        let _ = wings
            .post(&files(&id, "delete"), json!({"files": ["swap/victim"]}))
            .await;
        let _ = wings
            .post(
                &files(&id, "rename"),
                json!({"files": [{"from": "swap/victim", "to": format!("moved{i}")}]}),
            )
            .await;
        let _ = wings
            .post(
                &files(&id, "copy"),
                json!({"file": "swap/victim", "to": format!("copied{i}")}),
            )
            .await;
    }
    exec(&id, "pkill -f 'while true' || killall sh || true");
    assert_eq!(
        std::fs::read_to_string(other_root.join("victim")).unwrap(),
        "other server's"
    );
    assert_eq!(
        std::fs::metadata(other_root.join("victim"))
            .unwrap()
            .permissions(),
        victim_mode
    );
    let other_files: Vec<String> = std::fs::read_dir(&other_root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !other_files
            .iter()
            .any(|n| n.starts_with("moved") || n.starts_with("copied") || n.contains("mamba")),
        "{other_files:?}"
    );
    assert!(std::path::Path::new("/etc/passwd").exists());
}

fn raw_tar(entries: &[(&str, tar::EntryType, &str, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, kind, link, data) in entries {
        let mut header = tar::Header::new_gnu();
        {
            let old = header.as_old_mut();
            old.name[..name.len()].copy_from_slice(name.as_bytes());
            old.linkname[..link.len()].copy_from_slice(link.as_bytes());
        }
        header.set_entry_type(*kind);
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.resize(out.len() + 1024, 0);
    out
}

fn gz(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// Checklist 4 and 5: unsafe archives are refused before anything is created; bombs stop at
/// the bytes actually written.
#[tokio::test(flavor = "multi_thread")]
async fn decompress_refuses_unsafe_archives_and_bombs() {
    let wings = Wings::start().await;
    let id = running(&wings, testbox()).await;
    let mut zip_slip = std::io::Cursor::new(Vec::new());
    {
        let mut zip = zip::ZipWriter::new(&mut zip_slip);
        let o = zip::write::SimpleFileOptions::default();
        zip.start_file("fine.txt", o).unwrap();
        zip.write_all(b"x").unwrap();
        zip.start_file("../../../../evil.txt", o).unwrap();
        zip.write_all(b"x").unwrap();
        zip.finish().unwrap();
    }
    let zeros = vec![0u8; 48 * 1024 * 1024];
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("zip-slip.zip", zip_slip.into_inner(), 422),
        (
            "dotdot.tar.gz",
            gz(&raw_tar(&[
                ("ok", tar::EntryType::Regular, "", b"x"),
                ("../evil", tar::EntryType::Regular, "", b"x"),
            ])),
            422,
        ),
        (
            "abs.tar",
            raw_tar(&[
                ("ok", tar::EntryType::Regular, "", b"x"),
                ("/tmp/evil", tar::EntryType::Regular, "", b"x"),
            ]),
            422,
        ),
        (
            "hardlink.tar",
            raw_tar(&[
                ("ok", tar::EntryType::Regular, "", b"x"),
                ("h", tar::EntryType::Link, "/etc/passwd", b""),
            ]),
            422,
        ),
        (
            "link-then-file.tar",
            raw_tar(&[
                ("l", tar::EntryType::Symlink, "/etc", b""),
                ("l/evil", tar::EntryType::Regular, "", b"x"),
            ]),
            422,
        ),
        (
            "link-inside-then-file.tar",
            raw_tar(&[
                ("d", tar::EntryType::Directory, "", b""),
                ("l", tar::EntryType::Symlink, "d", b""),
                ("l/x", tar::EntryType::Regular, "", b"x"),
            ]),
            422,
        ),
        (
            "link-and-dir.tar",
            raw_tar(&[
                ("same", tar::EntryType::Directory, "", b""),
                ("same", tar::EntryType::Symlink, "..", b""),
            ]),
            422,
        ),
        (
            "bomb.tar.zst",
            zstd::encode_all(&raw_tar(&[("bomb", tar::EntryType::Regular, "", &zeros)])[..], 19).unwrap(),
            413,
        ),
        ("not-an-archive.zip", b"just text".to_vec(), 415),
    ];
    for (name, data, expected) in cases {
        wings
            .post(
                &files(&id, "create-directory"),
                json!({"name": name.replace('.', "-")}),
            )
            .await;
        let dir = name.replace('.', "-");
        let (s, b) = write(&wings, &id, &format!("{dir}/{name}"), &data).await;
        assert_eq!(s, 200, "{b}");
        let (s, b) = wings
            .post(&files(&id, "decompress"), json!({"root": dir, "file": name}))
            .await;
        assert_eq!(s, expected, "{name}: {b}");
        refused(s, &b, name);
        let left: Vec<String> = std::fs::read_dir(root(&wings, &id).join(&dir))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(left, vec![name.to_string()], "{name}: nothing was created");
    }
    assert!(!wings.data_dir().join("evil.txt").exists() && !std::path::Path::new("/tmp/evil").exists());
}

/// Checklist 6: an upload past the quota is refused and leaves nothing; a container filling
/// its disk from inside is noticed within seconds and stopped, and cannot start again.
#[tokio::test(flavor = "multi_thread")]
async fn the_quota_refuses_uploads_and_stops_a_container_that_fills_its_disk() {
    let wings = Wings::start_with(&format!(
        "{}\n[files]\ndisk_check_interval_secs = 1\n",
        tokens_config()
    ))
    .await;
    let id = unique_id("quota");
    let (status, body) = wings
        .post(
            "/api/servers",
            json!({
                "id": id,
                "blueprint": testbox(),
                "limits": {"memory_mb": 128, "cpu_percent": 100, "disk_mb": 8, "pids": 64},
                "allocations": {"default": {"ip": "127.0.0.1", "port": free_port()}},
                "start_on_completion": true,
            }),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    wings.wait_state(&id, "running", T).await;

    let (s, b) = write(&wings, &id, "keep.txt", b"old contents").await;
    assert_eq!(s, 200, "{b}");
    let big = vec![1u8; 9 * 1024 * 1024];
    let (s, b) = write(&wings, &id, "keep.txt", &big).await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (413, Some("quota_exceeded")),
        "{b}"
    );
    assert_eq!(
        read(&wings, &id, "keep.txt").await.1,
        b"old contents",
        "the old file is intact"
    );
    let token = signed(&id, "file-upload", "upload.bin", 60);
    let r = wings
        .public
        .post(wings.public_url(&format!("/upload/file?token={token}")))
        .body(big.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 413);
    let leftovers: Vec<String> = std::fs::read_dir(root(&wings, &id))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("mamba-upload") || n == "upload.bin")
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // From inside: 12 MiB into an 8 MiB quota.
    let (ok, out) = exec(
        &id,
        "dd if=/dev/zero of=/home/container/fill bs=1048576 count=12 2>&1",
    );
    assert!(ok, "{out}");
    wings.wait_state(&id, "offline", T).await;
    let lines = wings.wait_log(&id, "Disk quota exceeded", T).await;
    assert!(
        lines.iter().any(|l| l.contains("stopping the server")),
        "{lines:?}"
    );
    let (s, b) = wings.power(&id, "start").await;
    let refused_start = s == 409 || {
        wings.wait_log(&id, "disk quota", T).await;
        true
    };
    assert!(refused_start, "{s} {b}");
    assert_eq!(wings.state(&id).await, "offline");
    // Freeing space lets it start again.
    let (s, b) = wings
        .post(&files(&id, "delete"), json!({"files": ["fill"]}))
        .await;
    assert_eq!(s, 200, "{b}");
    let (s, b) = wings.power(&id, "start").await;
    assert_eq!(s, 202, "{b}");
    wings.wait_state(&id, "running", T).await;
}

/// Checklist 7: a huge file handed to a blueprint's config-file parser is refused above the
/// size cap; the server does not start with it, and wings stays up.
#[tokio::test(flavor = "multi_thread")]
async fn huge_config_files_are_refused_by_the_parser() {
    let wings = Wings::start_with("max_config_file_bytes = 65536\n").await;
    let id = running(&wings, testbox()).await;
    let (s, _) = wings.power(&id, "stop").await;
    assert_eq!(s, 202);
    wings.wait_state(&id, "offline", T).await;
    let (s, b) = write(&wings, &id, "settings.properties", &vec![b'a'; 4 * 1024 * 1024]).await;
    assert_eq!(s, 200, "{b}");
    wings.power(&id, "start").await;
    let lines = wings.wait_log(&id, "config file edit failed", T).await;
    assert!(lines.iter().any(|l| l.contains("larger than 65536")), "{lines:?}");
    let (s, _) = wings.get("/healthz").await;
    assert_eq!(s, 200);
}

/// Checklist 11 for signed URLs: one purpose, one use (also after a restart), short-lived.
#[tokio::test(flavor = "multi_thread")]
async fn signed_urls_are_single_use_scoped_and_survive_restarts() {
    let mut wings = Wings::start_with(&tokens_config()).await;
    let id = running(&wings, testbox()).await;
    write(&wings, &id, "world/level.dat", b"level data").await;

    let token = signed(&id, "file-download", "world/level.dat", 60);
    let url = wings.public_url(&format!("/download/file?token={token}"));
    let r = wings.public.get(&url).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert!(
        r.headers()["content-disposition"]
            .to_str()
            .unwrap()
            .contains("level.dat")
    );
    assert_eq!(r.bytes().await.unwrap().as_ref(), b"level data");
    let r = wings.public.get(&url).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 403, "replayed");
    let unused = signed(&id, "file-download", "world/level.dat", 60);
    wings.terminate();
    wings.restart().await;
    let r = wings.public.get(&url).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 403, "replayed after a restart");
    let r = wings
        .public
        .get(wings.public_url(&format!("/download/file?token={unused}")))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status().as_u16(),
        200,
        "an unused token still works after a restart"
    );

    // Purpose confusion: a download token on upload, an upload token on download, a console
    // token anywhere, a token for a backup on a file.
    let download = signed(&id, "file-download", "world/level.dat", 60);
    let r = wings
        .public
        .post(wings.public_url(&format!("/upload/file?token={download}")))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);
    let upload = signed(&id, "file-upload", "world/level.dat", 60);
    let r = wings
        .public
        .get(wings.public_url(&format!("/download/file?token={upload}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);
    let console = common::console::token(&id, &["websocket.connect"]);
    let r = wings
        .public
        .get(wings.public_url(&format!("/download/file?token={console}")))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_client_error());
    let r = wings
        .public
        .get(wings.public_url(&format!("/download/backup?token={download}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);
    // Expired, too long-lived, or signed by another key.
    let now = now();
    let expired = sign(
        &json!({"sub": "u", "server": id, "scope": "file-download", "file": "world/level.dat", "iat": now - 120, "exp": now - 60, "jti": "e1"}),
    );
    let r = wings
        .public
        .get(wings.public_url(&format!("/download/file?token={expired}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let long = signed(&id, "file-download", "world/level.dat", 86_400);
    let r = wings
        .public
        .get(wings.public_url(&format!("/download/file?token={long}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);
    let forged = common::console::sign_with(
        &json!({"sub": "u", "server": id, "scope": "file-download", "file": "world/level.dat", "iat": now, "exp": now + 60, "jti": "f1"}),
        "other.key.pem",
    );
    let r = wings
        .public
        .get(wings.public_url(&format!("/download/file?token={forged}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);

    // Uploads: a raw body and a multipart form, each to exactly the token's file.
    let token = signed(&id, "file-upload", "uploads/raw.bin", 60);
    let r = wings
        .public
        .post(wings.public_url(&format!("/upload/file?token={token}")))
        .body(vec![5u8; 3 * 1024 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(
        std::fs::read(root(&wings, &id).join("uploads/raw.bin"))
            .unwrap()
            .len(),
        3 * 1024 * 1024
    );
    let token = signed(&id, "file-upload", "uploads/form.txt", 60);
    let boundary = "mamba-test-boundary";
    let form = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\nignored\r\n\
         --{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"whatever.txt\"\r\n\
         Content-Type: application/octet-stream\r\n\r\nfrom a form\r\n--{boundary}--\r\n"
    );
    let r = wings
        .public
        .post(wings.public_url(&format!("/upload/file?token={token}")))
        .header(
            "content-type",
            format!("multipart/form-data; boundary={boundary}"),
        )
        .body(form)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200, "{}", r.text().await.unwrap());
    assert_eq!(
        std::fs::read(root(&wings, &id).join("uploads/form.txt")).unwrap(),
        b"from a form"
    );
    let r = wings
        .public
        .post(wings.public_url(&format!("/upload/file?token={token}")))
        .body("again")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403, "upload tokens are single-use too");

    // Backup downloads check the token, then find no backup yet.
    let now = common::console::now();
    let backup = sign(
        &json!({"sub": "u", "server": id, "scope": "backup-download", "backup": "b1", "iat": now, "exp": now + 60, "jti": uuid::Uuid::new_v4().to_string()}),
    );
    let r = wings
        .public
        .get(wings.public_url(&format!("/download/backup?token={backup}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
}
