//! Crate boundaries and the single crypto provider, checked with `cargo tree`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers panic by design

use std::path::Path;
use std::process::Command;

fn cargo_tree(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO"))
        .arg("tree")
        .args(["--prefix", "none", "--offline"])
        .args(args)
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap())
        .output()
        .expect("cargo tree runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// `cargo tree -i X` fails when X is not in the graph at all.
fn assert_absent(package: &str) {
    let (found, text) = cargo_tree(&["--workspace", "--edges", "normal,build,dev", "--invert", package]);
    assert!(!found, "{package} must not be in the dependency graph:\n{text}");
    assert!(
        text.contains("did not match any packages"),
        "unexpected cargo tree answer:\n{text}"
    );
}

#[test]
fn only_ring_provides_crypto() {
    // Positive control: the check sees crates that are in the graph.
    let (found, text) = cargo_tree(&["--workspace", "--invert", "ring"]);
    assert!(found, "ring should be in the graph:\n{text}");
    for banned in ["aws-lc-sys", "aws-lc-rs", "openssl-sys", "native-tls"] {
        assert_absent(banned);
    }
}

fn deps_of(package: &str) -> String {
    let (ok, text) = cargo_tree(&["--package", package, "--edges", "normal"]);
    assert!(ok, "{text}");
    text
}

fn has_crate(tree: &str, name: &str) -> bool {
    tree.lines().any(|l| l.split_whitespace().next() == Some(name))
}

#[test]
fn shared_knows_no_database_and_no_web_framework() {
    let tree = deps_of("mamba-shared");
    for banned in ["diesel", "actix-web", "actix-http", "bollard", "redis", "tokio"] {
        assert!(
            !has_crate(&tree, banned),
            "mamba-shared depends on {banned}:\n{tree}"
        );
    }
}

#[test]
fn wings_never_depends_on_panel() {
    let tree = deps_of("mamba-wings");
    assert!(
        has_crate(&tree, "bollard") && has_crate(&tree, "mamba-shared"),
        "positive control:\n{tree}"
    );
    assert!(!has_crate(&tree, "mamba-panel"), "{tree}");
    assert!(
        !has_crate(&tree, "diesel"),
        "wings must not pull the panel's database layer:\n{tree}"
    );
}
