//! Backups against real stores: a local folder, and moto's S3 server (started here, in its
//! own process) checked independently with boto3 (tests/s3_tool.py). Real wings, real Docker.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers panic by design

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::console::{self, auth, expect, script, token, tokens_config};
use common::{Wings, free_port, testbox, unique_id, wait_for, workspace_root};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(120);
const BUCKET: &str = "backups";
const KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
const OTHER_KEY: &str = "HxwdGhsYGRYXFBUSExAREA8ODQwLCgkIBwYFBAMCAQA=";

/// moto's S3 server on a free port, with one bucket; killed on drop.
struct Moto {
    child: Child,
    port: u16,
}

impl Moto {
    async fn start() -> Moto {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let port = free_port();
        let child = Command::new("python3")
            .args(["-m", "moto.server", "-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 with moto[server] (scripts/test.sh installs it)");
        let moto = Moto { child, port };
        let url = format!("{}/", moto.endpoint());
        wait_for("moto to answer", Duration::from_secs(60), || {
            let url = url.clone();
            async move {
                reqwest::get(&url)
                    .await
                    .ok()
                    .filter(|r| r.status().is_success())
                    .map(|_| ())
            }
        })
        .await;
        moto.tool(&["create-bucket", BUCKET]).await;
        moto
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Freezes the store: every request to it hangs until `resume`.
    fn pause(&self) {
        assert!(
            Command::new("kill")
                .args(["-STOP", &self.child.id().to_string()])
                .status()
                .unwrap()
                .success()
        );
    }

    fn resume(&self) {
        assert!(
            Command::new("kill")
                .args(["-CONT", &self.child.id().to_string()])
                .status()
                .unwrap()
                .success()
        );
    }

    async fn tool(&self, args: &[&str]) -> Value {
        let output = tokio::process::Command::new("python3")
            .arg(workspace_root().join("wings/tests/s3_tool.py"))
            .arg(self.endpoint())
            .args(args)
            .output()
            .await
            .unwrap();
        assert!(
            output.status.success(),
            "s3_tool {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).unwrap()
    }

    fn config(&self) -> String {
        format!(
            "[backups]\npart_size_mb = 5\n\n[backups.s3]\nendpoint = \"{}\"\nbucket = \"{BUCKET}\"\nregion = \"us-east-1\"\naccess_key_id = \"test\"\nsecret_access_key = \"test\"\nallow_http = true\n",
            self.endpoint()
        )
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-CONT", &self.child.id().to_string()])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Deterministic bytes that do not compress (xorshift).
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn root(wings: &Wings, id: &str) -> PathBuf {
    wings.data_dir().join("volumes").join(id)
}

fn write(root: &Path, rel: &str, data: &[u8]) {
    let path = root.join(rel);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, data).unwrap();
}

fn read(root: &Path, rel: &str) -> Option<Vec<u8>> {
    std::fs::read(root.join(rel)).ok()
}

/// A small server folder: text, a random region file bigger than one part, deep folders,
/// a symlink, and things the ignore list leaves out.
fn fill(root: &Path) {
    write(root, "config/server.properties", b"motd=hello\nmax-players=10\n");
    write(root, "world/level.dat", &noise(2048, 1));
    write(root, "world/region/r.0.0.mca", &noise(7 << 20, 2));
    write(root, "plugins/a/b/c/deep.txt", b"deep");
    write(root, "logs/latest.log", b"a log line\n");
    write(root, "cache/tmp.bin", &noise(1000, 3));
    std::os::unix::fs::symlink("world/level.dat", root.join("level-link")).unwrap();
}

async fn running_server(wings: &Wings) -> String {
    let id = unique_id("bk");
    wings.create(&id, testbox(), json!({}), free_port()).await;
    wings.wait_state(&id, "running", T).await;
    id
}

async fn backup(wings: &Wings, server: &str, body: Value) -> (u16, Value) {
    wings.post(&format!("/api/servers/{server}/backups"), body).await
}

async fn wait_backup(wings: &Wings, server: &str, backup: &str) -> Value {
    wait_for(&format!("backup {backup} to finish"), T, || async move {
        let (status, body) = wings
            .get(&format!("/api/servers/{server}/backups/{backup}"))
            .await;
        assert_eq!(status, 200, "{body}");
        (body["state"] != "running").then_some(body)
    })
    .await
}

async fn restore(wings: &Wings, server: &str, backup: &str, body: Value) -> (u16, Value) {
    wings
        .post(&format!("/api/servers/{server}/backups/{backup}/restore"), body)
        .await
}

/// Waits for the restore's final console line and answers it.
async fn wait_restored(wings: &Wings, server: &str, backup: &str, seen_before: usize) -> String {
    let done = format!("Restored backup {backup}");
    let failed = format!("Restore of backup {backup} failed");
    wait_for(&format!("restore of {backup}"), T, || {
        let (done, failed) = (done.clone(), failed.clone());
        async move {
            let lines = wings.logs(server).await;
            let finals: Vec<String> = lines
                .into_iter()
                .filter(|l| l.contains(&done) || l.contains(&failed))
                .collect();
            finals.get(seen_before).cloned()
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn s3_backup_restore_and_delete_checked_with_boto3() {
    let moto = Moto::start().await;
    let wings = Wings::start_with(&moto.config()).await;
    let id = running_server(&wings).await;
    let root = root(&wings, &id);
    fill(&root);

    let (status, body) = backup(
        &wings,
        &id,
        json!({"id": "b1", "adapter": "s3", "ignore": ["cache/", "*.log", "# comment"]}),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["state"], "running");
    let done = wait_backup(&wings, &id, "b1").await;
    assert_eq!(done["state"], "complete", "{done}");
    assert_eq!(done["encrypted"], false);
    assert!(done["files"].as_u64().unwrap() >= 4, "{done}");

    // boto3 sees one complete object with exactly the recorded size and checksum, and no
    // unfinished multipart upload.
    let objects = moto.tool(&["objects", BUCKET]).await;
    assert_eq!(objects.as_array().unwrap().len(), 1, "{objects}");
    assert_eq!(objects[0]["key"], format!("{id}/b1.tar.zst"));
    assert_eq!(objects[0]["size"], done["size"]);
    assert_eq!(objects[0]["sha256"], done["sha256"]);
    assert!(
        done["size"].as_u64().unwrap() > 5 << 20,
        "more than one part was uploaded"
    );
    assert_eq!(moto.tool(&["uploads", BUCKET]).await, json!([]));

    // Change things, then restore without truncate: backed-up files come back, new files stay.
    write(&root, "config/server.properties", b"motd=changed\n");
    std::fs::remove_file(root.join("world/level.dat")).unwrap();
    std::fs::remove_dir_all(root.join("plugins")).unwrap();
    write(&root, "new-file.txt", b"made after the backup");
    write(&root, "cache/tmp.bin", b"changed cache");
    let (status, body) = restore(&wings, &id, "b1", json!({"truncate": false})).await;
    assert_eq!(status, 202, "{body}");
    let line = wait_restored(&wings, &id, "b1", 0).await;
    assert!(!line.contains("failed"), "{line}");
    assert_eq!(
        read(&root, "config/server.properties").unwrap(),
        b"motd=hello\nmax-players=10\n"
    );
    assert_eq!(read(&root, "world/level.dat").unwrap(), noise(2048, 1));
    assert_eq!(read(&root, "world/region/r.0.0.mca").unwrap(), noise(7 << 20, 2));
    assert_eq!(read(&root, "plugins/a/b/c/deep.txt").unwrap(), b"deep");
    assert_eq!(
        std::fs::read_link(root.join("level-link")).unwrap(),
        Path::new("world/level.dat")
    );
    assert_eq!(read(&root, "new-file.txt").unwrap(), b"made after the backup");
    assert_eq!(
        read(&root, "cache/tmp.bin").unwrap(),
        b"changed cache",
        "ignored: never in the archive"
    );
    // Restored files belong to the container user.
    let meta = std::fs::metadata(root.join("world/level.dat")).unwrap();
    assert_eq!(std::os::unix::fs::MetadataExt::uid(&meta), 988);
    // The server was running, was stopped for the restore and runs again.
    let lines = wings.logs(&id).await;
    assert!(
        lines.iter().any(|l| l.contains("Server stopped for the restore")),
        "{lines:#?}"
    );
    wings.wait_state(&id, "running", T).await;

    // With truncate, only what the backup holds remains.
    let (status, _) = restore(&wings, &id, "b1", json!({"truncate": true})).await;
    assert_eq!(status, 202);
    let line = wait_restored(&wings, &id, "b1", 1).await;
    assert!(!line.contains("failed"), "{line}");
    assert!(read(&root, "new-file.txt").is_none());
    assert!(read(&root, "cache/tmp.bin").is_none());
    assert!(read(&root, "logs/latest.log").is_none());
    assert_eq!(read(&root, "world/level.dat").unwrap(), noise(2048, 1));
    wings.wait_state(&id, "running", T).await;

    // Encrypted: the key is needed, and only the right one.
    let (status, body) = backup(
        &wings,
        &id,
        json!({"id": "b2", "adapter": "s3", "encryption_key": KEY}),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let done = wait_backup(&wings, &id, "b2").await;
    assert_eq!(
        (done["state"].as_str(), done["encrypted"].as_bool()),
        (Some("complete"), Some(true)),
        "{done}"
    );
    let (status, body) = restore(&wings, &id, "b2", json!({"truncate": true})).await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = restore(
        &wings,
        &id,
        "b2",
        json!({"truncate": true, "encryption_key": OTHER_KEY}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    write(&root, "new-file.txt", b"again");
    let (status, _) = restore(
        &wings,
        &id,
        "b2",
        json!({"truncate": true, "encryption_key": KEY}),
    )
    .await;
    assert_eq!(status, 202);
    let line = wait_restored(&wings, &id, "b2", 0).await;
    assert!(!line.contains("failed"), "{line}");
    assert!(read(&root, "new-file.txt").is_none());
    assert_eq!(read(&root, "world/region/r.0.0.mca").unwrap(), noise(7 << 20, 2));

    // Listing, then deleting: the objects are gone from the bucket.
    let (status, list) = wings.get(&format!("/api/servers/{id}/backups")).await;
    assert_eq!(status, 200);
    assert_eq!(list.as_array().unwrap().len(), 2, "{list}");
    for b in ["b1", "b2"] {
        let (status, body) = wings.delete(&format!("/api/servers/{id}/backups/{b}")).await;
        assert_eq!(status, 204, "{body}");
    }
    assert_eq!(moto.tool(&["objects", BUCKET]).await, json!([]));
    let (status, _) = wings.get(&format!("/api/servers/{id}/backups/b1")).await;
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tampered_archive_is_refused_before_any_file_is_touched() {
    let moto = Moto::start().await;
    let wings = Wings::start_with(&moto.config()).await;
    let id = running_server(&wings).await;
    let root = root(&wings, &id);
    fill(&root);
    let cases = [
        ("local-plain", "local", None),
        ("local-sealed", "local", Some(KEY)),
        ("s3-plain", "s3", None),
        ("s3-sealed", "s3", Some(KEY)),
    ];
    for (backup_id, adapter, key) in cases {
        let mut body = json!({"id": backup_id, "adapter": adapter});
        if let Some(key) = key {
            body["encryption_key"] = json!(key);
        }
        let (status, body) = backup(&wings, &id, body).await;
        assert_eq!(status, 202, "{body}");
        let done = wait_backup(&wings, &id, backup_id).await;
        assert_eq!(done["state"], "complete", "{done}");
        // One byte in the middle of the stored archive changes.
        let middle = (done["size"].as_u64().unwrap() / 2).to_string();
        if adapter == "local" {
            let path = wings
                .data_dir()
                .join(format!("backup-archives/{id}/{backup_id}.tar.zst"));
            let mut bytes = std::fs::read(&path).unwrap();
            let at: usize = middle.parse().unwrap();
            bytes[at] ^= 1;
            std::fs::write(&path, bytes).unwrap();
        } else {
            moto.tool(&["flip", BUCKET, &format!("{id}/{backup_id}.tar.zst"), &middle])
                .await;
        }
    }
    write(&root, "world/level.dat", b"changed after the backups");
    write(&root, "new-file.txt", b"new");
    for (n, (backup_id, _, key)) in cases.into_iter().enumerate() {
        let mut body = json!({"truncate": true});
        if let Some(key) = key {
            body["encryption_key"] = json!(key);
        }
        let (status, body) = restore(&wings, &id, backup_id, body).await;
        assert_eq!(status, 202, "{body}");
        let line = wait_restored(&wings, &id, backup_id, 0).await;
        assert!(
            line.contains("failed verification") && line.contains("nothing was changed"),
            "{n}: {line}"
        );
        // Truncate was asked for, yet nothing was removed or overwritten.
        assert_eq!(
            read(&root, "world/level.dat").unwrap(),
            b"changed after the backups"
        );
        assert_eq!(read(&root, "new-file.txt").unwrap(), b"new");
        assert_eq!(read(&root, "world/region/r.0.0.mca").unwrap(), noise(7 << 20, 2));
    }
    // Verification runs before the server is stopped: it never went down.
    let lines = wings.logs(&id).await;
    assert!(
        !lines.iter().any(|l| l.contains("Server stopped for the restore")),
        "{lines:#?}"
    );
    assert_eq!(wings.state(&id).await, "running");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backup_killed_midway_is_failed_and_leaves_nothing_behind() {
    let moto = Moto::start().await;
    let mut wings = Wings::start_with(&moto.config()).await;
    let id = running_server(&wings).await;
    let root = root(&wings, &id);
    for i in 0..6 {
        write(&root, &format!("world/region/r.{i}.mca"), &noise(8 << 20, 10 + i));
    }
    let record_path = wings.data_dir().join(format!("backups/{id}/midway.json"));

    // S3: once the upload id is recorded, freeze the store so the backup cannot finish, and
    // kill wings.
    let (status, body) = backup(&wings, &id, json!({"id": "midway", "adapter": "s3"})).await;
    assert_eq!(status, 202, "{body}");
    let upload_id = wait_for("the upload id in the record", T, || {
        let path = record_path.clone();
        async move {
            let record: Value = serde_json::from_slice(&std::fs::read(&path).ok()?).ok()?;
            record["upload_id"].as_str().map(str::to_string)
        }
    })
    .await;
    moto.pause();
    wings.kill9();
    moto.resume();
    let uploads = moto.tool(&["uploads", BUCKET]).await;
    assert_eq!(
        uploads[0]["upload_id"],
        upload_id.as_str(),
        "the upload is unfinished: {uploads}"
    );
    wings.restart().await;
    let (status, record) = wings.get(&format!("/api/servers/{id}/backups/midway")).await;
    assert_eq!(status, 200);
    assert_eq!(record["state"], "failed", "{record}");
    assert!(
        record["error"].as_str().unwrap().contains("wings stopped"),
        "{record}"
    );
    assert_eq!(
        moto.tool(&["uploads", BUCKET]).await,
        json!([]),
        "the parts were aborted"
    );
    assert_eq!(moto.tool(&["objects", BUCKET]).await, json!([]));
    let (status, body) = restore(&wings, &id, "midway", json!({})).await;
    assert_eq!(status, 409, "a failed backup cannot be restored: {body}");

    // Local: frozen mid-upload (its staging file exists and the record says running), then
    // killed.
    let (status, body) = backup(&wings, &id, json!({"id": "local-midway", "adapter": "local"})).await;
    assert_eq!(status, 202, "{body}");
    let dir = wings.data_dir().join(format!("backup-archives/{id}"));
    let staging = dir.join("local-midway.tar.zst#1");
    // A tight poll and a direct signal: the archive holds 48 MiB, far more than can be
    // written between seeing the staging file and freezing.
    let deadline = std::time::Instant::now() + T;
    while !staging.exists() {
        assert!(std::time::Instant::now() < deadline, "no staging file");
        std::thread::yield_now();
    }
    let pid = rustix::process::Pid::from_raw(i32::try_from(wings.pid()).unwrap()).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::STOP).unwrap();
    let record: Value = serde_json::from_slice(
        &std::fs::read(wings.data_dir().join(format!("backups/{id}/local-midway.json"))).unwrap(),
    )
    .unwrap();
    assert_eq!(record["state"], "running", "frozen before it finished");
    wings.kill9();
    wings.restart().await;
    let (_, record) = wings
        .get(&format!("/api/servers/{id}/backups/local-midway"))
        .await;
    assert_eq!(record["state"], "failed", "{record}");
    let left: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "nothing left in the local store: {left:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrency_limit_and_bad_requests() {
    let moto = Moto::start().await;
    let wings = Wings::start_with(
        &format!("{}\n", moto.config()).replace("[backups]\n", "[backups]\nmax_concurrent = 1\n"),
    )
    .await;
    let id = running_server(&wings).await;
    write(&root(&wings, &id), "data.bin", &noise(1 << 20, 5));

    // The store is frozen, so the first backup holds the node's only slot.
    moto.pause();
    let (status, body) = backup(&wings, &id, json!({"id": "first", "adapter": "s3"})).await;
    assert_eq!(status, 202, "{body}");
    let (status, body) = backup(&wings, &id, json!({"id": "second", "adapter": "local"})).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"]["code"], "too_many_backups");
    moto.resume();
    assert_eq!(wait_backup(&wings, &id, "first").await["state"], "complete");
    let (status, body) = backup(&wings, &id, json!({"id": "second", "adapter": "local"})).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(wait_backup(&wings, &id, "second").await["state"], "complete");

    // Bad input answers 4xx with the envelope.
    for (body, code) in [
        (json!({"id": "first", "adapter": "local"}), 409),
        (json!({"id": "../x", "adapter": "local"}), 400),
        (json!({"id": "", "adapter": "local"}), 400),
        (json!({"id": "x", "adapter": "ftp"}), 400),
        (json!({"id": "x", "adapter": "local", "ignore": ["a["]}), 400),
        (
            json!({"id": "x", "adapter": "local", "encryption_key": "c2hvcnQ="}),
            400,
        ),
        (json!({"id": "x", "adapter": "local", "surprise": 1}), 400),
    ] {
        let (status, answer) = backup(&wings, &id, body.clone()).await;
        assert_eq!(status, code, "{body} -> {answer}");
        assert!(answer["error"]["code"].is_string(), "{answer}");
    }
    let (status, _) = restore(&wings, &id, "nope", json!({})).await;
    assert_eq!(status, 404);
    let (status, _) = wings.delete(&format!("/api/servers/{id}/backups/nope")).await;
    assert_eq!(status, 404);
    let (status, _) = backup(&wings, "no-such-server", json!({"id": "x", "adapter": "local"})).await;
    assert_eq!(status, 404);

    // Deleting the server deletes its backups, in both stores.
    let local = wings
        .data_dir()
        .join(format!("backup-archives/{id}/second.tar.zst"));
    assert!(local.exists());
    assert_eq!(moto.tool(&["objects", BUCKET]).await.as_array().unwrap().len(), 1);
    let (status, body) = wings.delete(&format!("/api/servers/{id}")).await;
    assert_eq!(status, 204, "{body}");
    assert!(!local.exists());
    assert_eq!(moto.tool(&["objects", BUCKET]).await, json!([]));
}

#[tokio::test(flavor = "multi_thread")]
async fn progress_and_results_reach_console_sockets_with_backup_read() {
    let wings = Wings::start_with(&tokens_config()).await;
    let id = running_server(&wings).await;
    write(&root(&wings, &id), "data.bin", &noise(3 << 20, 6));
    let mut permissions = console::ALL.to_vec();
    permissions.push("backup.read");
    let backups = format!("/api/servers/{id}/backups");
    let output = script(
        &wings,
        &id,
        vec![
            auth(&token(&id, &permissions)),
            expect("auth success"),
            json!({"http": {"method": "POST", "path": backups, "body": {"id": "p1", "adapter": "local"}}, "status": 202}),
            json!({"expect": {"event": "backup progress", "json": {"backup": "p1", "operation": "backup"}}, "timeout": 60}),
            json!({"expect": {"event": "backup completed", "json": {"backup": "p1", "successful": true}}, "timeout": 60}),
            json!({"http": {"method": "POST", "path": format!("{backups}/p1/restore"), "body": {"truncate": false}}, "status": 202}),
            json!({"expect": {"event": "backup progress", "json": {"backup": "p1", "operation": "restore"}}, "timeout": 60}),
            json!({"expect": {"event": "backup restore completed", "json": {"backup": "p1", "successful": true}}, "timeout": 90}),
        ],
        true,
    )
    .await;
    let completed = console::events(&output)
        .into_iter()
        .find(|e| e["event"] == "backup completed")
        .unwrap();
    let (_, record) = wings.get(&format!("{backups}/p1")).await;
    assert_eq!(completed["args"][0]["checksum"], record["sha256"]);

    // A signed single-use URL downloads exactly the stored archive.
    let now = console::now();
    let signed = console::sign(&json!({
        "sub": "user-1", "server": id, "scope": "backup-download", "backup": "p1",
        "iat": now, "exp": now + 60, "jti": uuid::Uuid::new_v4().to_string(),
    }));
    let url = wings.public_url(&format!("/download/backup?token={signed}"));
    let r = wings.public.get(&url).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert!(
        r.headers()["content-disposition"]
            .to_str()
            .unwrap()
            .contains("p1.tar.zst")
    );
    let body = r.bytes().await.unwrap();
    assert_eq!(body.len() as u64, record["size"].as_u64().unwrap());
    assert_eq!(
        hex::encode(ring::digest::digest(&ring::digest::SHA256, &body).as_ref()),
        record["sha256"].as_str().unwrap()
    );
    let r = wings.public.get(&url).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 403, "the URL is single-use");

    // Without backup.read the socket hears the console line but no backup event.
    let output = script(
        &wings,
        &id,
        vec![
            auth(&token(&id, console::ALL)),
            expect("auth success"),
            json!({"http": {"method": "POST", "path": backups, "body": {"id": "p2", "adapter": "local"}}, "status": 202}),
            json!({"expect": {"event": "daemon message", "contains": "Backup p2 completed"}, "timeout": 60}),
            json!({"expect_none": {"event": "backup completed"}, "for": 1}),
        ],
        true,
    )
    .await;
    assert!(!output.contains("backup progress"), "{output}");
}
