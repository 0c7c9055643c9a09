//! The real public eggs kept under `tests/fixtures/eggs` (README.md there gives each one's
//! repository, path and commit) all import into valid blueprints, and the report names,
//! field by field, what did not map.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use mamba_panel::eggs::{self, Outcome};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/eggs");

/// Every fixture egg imports into a valid blueprint, and the report names what did not
/// map. The set spans the formats and the kinds the issue names.
#[test]
fn every_public_egg_imports_and_reports_what_did_not_map() {
    let mut files = Vec::new();
    for dir in std::fs::read_dir(FIXTURES).unwrap() {
        let dir = dir.unwrap().path();
        if !dir.is_dir() {
            continue;
        }
        for f in std::fs::read_dir(&dir).unwrap() {
            let f = f.unwrap().path();
            if matches!(f.extension().and_then(|e| e.to_str()), Some("json" | "yaml")) {
                files.push(f);
            }
        }
    }
    files.sort();
    assert!(files.len() >= 20, "at least 20 eggs: {}", files.len());
    let mut formats = std::collections::BTreeSet::new();
    let mut summary = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        let imported =
            eggs::import(&text, None).unwrap_or_else(|e| panic!("{} does not import: {e:?}", f.display()));
        let b = &imported.blueprint;
        b.validate().unwrap();
        assert!(!b.images.is_empty(), "{}: no image", f.display());
        let r = &imported.report;
        formats.insert(r.source_format.clone());
        // Ports and limits are always reported: eggs have neither.
        assert!(r.items.iter().any(|i| i.field == "ports"), "{}", f.display());
        for item in &r.items {
            assert!(!item.field.is_empty() && !item.message.is_empty(), "{item:?}");
        }
        summary.push(format!(
            "{:<60} {:<8} vars {:>2}  unmapped {:>2}  changed {:>2}  ignored {:>2}",
            f.strip_prefix(FIXTURES).unwrap().display(),
            r.source_format,
            b.variables.len(),
            r.count(Outcome::Unmapped),
            r.count(Outcome::Changed),
            r.count(Outcome::Ignored),
        ));
    }
    eprintln!("{}", summary.join("\n"));
    for format in ["PTDL_v2", "PLCN_v3"] {
        assert!(formats.contains(format), "{format} is covered: {formats:?}");
    }
    assert!(
        files.iter().any(|f| f.extension().is_some_and(|e| e == "yaml")),
        "a YAML egg"
    );
}
