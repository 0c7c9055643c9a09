//! Every file under `blueprints/` is a valid blueprint, and invalid ones are refused with a
//! message that names the file and the field.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers panic by design

use std::fs;
use std::path::{Path, PathBuf};

use mamba_shared::blueprint::Blueprint;

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

#[test]
fn every_shipped_blueprint_is_valid() {
    let files = yaml_files(&workspace_root().join("blueprints"));
    assert!(
        files.len() >= 17,
        "expected freeciv, minetest and the catalogue, found {}",
        files.len()
    );
    let mut slugs = std::collections::BTreeSet::new();
    for path in files {
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let text = fs::read_to_string(&path).unwrap();
        let blueprint = Blueprint::from_yaml(&name, &text).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            format!("{}.yaml", blueprint.slug),
            name,
            "file name must be <slug>.yaml"
        );
        assert!(slugs.insert(blueprint.slug.clone()));
        assert!(
            !blueprint.ports.is_empty(),
            "{name}: a game needs at least one port"
        );
    }
    for slug in [
        "freeciv",
        "minetest",
        "minecraft-vanilla",
        "minecraft-paper",
        "valheim",
        "rust",
        "ark",
        "palworld",
        "7-days-to-die",
        "project-zomboid",
        "satisfactory",
        "factorio",
        "starbound",
        "dont-starve-together",
        "cs2",
        "terraria",
        "garrys-mod",
    ] {
        assert!(slugs.contains(slug), "the catalogue lacks {slug}");
    }
}

/// Each fixture starts with a line `# expect: <field>`; loading it must fail naming the file
/// and that field.
#[test]
fn bad_blueprints_are_refused_naming_file_and_field() {
    let files = yaml_files(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bad-blueprints"));
    assert!(files.len() >= 5);
    for path in files {
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let text = fs::read_to_string(&path).unwrap();
        let expected = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# expect: "))
            .unwrap()
            .trim();
        let err = Blueprint::from_yaml(&name, &text).expect_err(&name);
        let message = err.to_string();
        assert!(message.starts_with(&format!("{name}: ")), "{message}");
        assert!(
            message.contains(expected),
            "{name}: expected the field {expected} in: {message}"
        );
    }
}
