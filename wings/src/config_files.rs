//! Blueprint config-file edits (properties, INI, YAML, JSON), applied before every start.
//!
//! Files are read and written only through [`ServerFs`], with a size cap.
//! Properties and INI files are edited line by line so comments and order survive.

use std::collections::BTreeMap;

use mamba_shared::blueprint::{ConfigFileEdit, ConfigFormat};
use mamba_shared::template;

use crate::files::{FsError, ServerFs};

#[derive(Debug, thiserror::Error)]
pub enum EditError {
    #[error(transparent)]
    Files(#[from] FsError),
    #[error("{path}: not valid UTF-8")]
    Encoding { path: String },
    #[error("{path}: cannot parse as {format}: {message}")]
    Parse {
        path: String,
        format: &'static str,
        message: String,
    },
    #[error("{path}: key {key:?} runs into a value that is not a table")]
    Conflict { path: String, key: String },
}

pub fn apply(
    root: &ServerFs,
    edit: &ConfigFileEdit,
    values: &BTreeMap<String, String>,
    limit: u64,
) -> Result<(), EditError> {
    let existing = match root.read_file(&edit.path, limit) {
        Ok(bytes) => Some(String::from_utf8(bytes).map_err(|_| EditError::Encoding {
            path: edit.path.clone(),
        })?),
        Err(FsError::NotFound(_)) if edit.create => None,
        Err(e) => return Err(e.into()),
    };
    let text = existing.unwrap_or_default();
    let set: Vec<(String, String)> = edit
        .set
        .iter()
        .map(|(k, v)| (k.clone(), template::render(v, values)))
        .collect();
    let out = match edit.format {
        ConfigFormat::Properties => edit_properties(&text, &set),
        ConfigFormat::Ini => edit_ini(&text, &set),
        ConfigFormat::Json => edit_json(&edit.path, &text, &set)?,
        ConfigFormat::Yaml => edit_yaml(&edit.path, &text, &set)?,
    };
    if out != text {
        root.write_file_atomic(&edit.path, out.as_bytes())?;
    }
    Ok(())
}

fn property_key(line: &str) -> Option<&str> {
    let t = line.trim_start();
    if t.is_empty() || t.starts_with('#') || t.starts_with('!') || t.starts_with(';') {
        return None;
    }
    let end = t.find(['=', ':']).unwrap_or(t.len());
    Some(t[..end].trim())
}

fn edit_properties(text: &str, set: &[(String, String)]) -> String {
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    for (key, value) in set {
        let value = single_line(value);
        match lines.iter().position(|l| property_key(l) == Some(key)) {
            Some(i) => lines[i] = format!("{key}={value}"),
            None => lines.push(format!("{key}={value}")),
        }
    }
    join_lines(lines)
}

fn edit_ini(text: &str, set: &[(String, String)]) -> String {
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    for (path, value) in set {
        let value = single_line(value);
        let (section, key) = match path.rsplit_once('.') {
            Some((s, k)) => (Some(s), k),
            None => (None, path.as_str()),
        };
        // The range of lines belonging to the section (top level before the first header).
        let header = |l: &str| {
            l.trim()
                .strip_prefix('[')
                .and_then(|r| r.strip_suffix(']'))
                .map(str::trim)
                .map(str::to_string)
        };
        let start = match section {
            None => Some(0),
            Some(s) => lines
                .iter()
                .position(|l| header(l).as_deref() == Some(s))
                .map(|i| i + 1),
        };
        let Some(start) = start else {
            if lines.last().is_some_and(|l| !l.trim().is_empty()) {
                lines.push(String::new());
            }
            lines.push(format!("[{}]", section.unwrap_or_default()));
            lines.push(format!("{key}={value}"));
            continue;
        };
        let end = lines[start..]
            .iter()
            .position(|l| header(l).is_some())
            .map_or(lines.len(), |i| start + i);
        match lines[start..end]
            .iter()
            .position(|l| property_key(l) == Some(key))
        {
            Some(i) => lines[start + i] = format!("{key}={value}"),
            None => {
                // Insert after the section's last non-blank line.
                let mut at = end;
                while at > start && lines[at - 1].trim().is_empty() {
                    at -= 1;
                }
                lines.insert(at, format!("{key}={value}"));
            }
        }
    }
    join_lines(lines)
}

fn single_line(value: &str) -> String {
    value.replace(['\n', '\r'], " ")
}

fn join_lines(lines: Vec<String>) -> String {
    let mut out = lines.join("\n");
    out.push('\n');
    out
}

/// A typed scalar from a rendered value: numbers and booleans keep their type.
fn json_scalar(value: &str) -> serde_json::Value {
    match value {
        "true" => serde_json::Value::Bool(true),
        "false" => serde_json::Value::Bool(false),
        _ => value
            .parse::<i64>()
            .map(serde_json::Value::from)
            .or_else(|_| value.parse::<f64>().map(serde_json::Value::from))
            .ok()
            .filter(|_| !value.starts_with('0') || value == "0" || value.starts_with("0."))
            .unwrap_or_else(|| serde_json::Value::String(value.into())),
    }
}

fn edit_json(path: &str, text: &str, set: &[(String, String)]) -> Result<String, EditError> {
    let mut doc: serde_json::Value = if text.trim().is_empty() {
        serde_json::Value::Object(Default::default())
    } else {
        serde_json::from_str(text).map_err(|e| EditError::Parse {
            path: path.into(),
            format: "json",
            message: e.to_string(),
        })?
    };
    for (key, value) in set {
        let mut node = &mut doc;
        let parts: Vec<&str> = key.split('.').collect();
        for (i, part) in parts.iter().enumerate() {
            let serde_json::Value::Object(map) = node else {
                return Err(EditError::Conflict {
                    path: path.into(),
                    key: key.clone(),
                });
            };
            if i + 1 == parts.len() {
                map.insert((*part).to_string(), json_scalar(value));
                break;
            }
            node = map
                .entry((*part).to_string())
                .or_insert_with(|| serde_json::Value::Object(Default::default()));
        }
    }
    let mut out = serde_json::to_string_pretty(&doc).map_err(|e| EditError::Parse {
        path: path.into(),
        format: "json",
        message: e.to_string(),
    })?;
    out.push('\n');
    Ok(out)
}

fn edit_yaml(path: &str, text: &str, set: &[(String, String)]) -> Result<String, EditError> {
    use serde_norway::Value;
    let parse_err = |e: serde_norway::Error| EditError::Parse {
        path: path.into(),
        format: "yaml",
        message: e.to_string(),
    };
    let mut doc: Value = if text.trim().is_empty() {
        Value::Mapping(Default::default())
    } else {
        serde_norway::from_str(text).map_err(parse_err)?
    };
    for (key, value) in set {
        let scalar: Value = serde_norway::to_value(json_scalar(value)).map_err(parse_err)?;
        let mut node = &mut doc;
        let parts: Vec<&str> = key.split('.').collect();
        for (i, part) in parts.iter().enumerate() {
            let Value::Mapping(map) = node else {
                return Err(EditError::Conflict {
                    path: path.into(),
                    key: key.clone(),
                });
            };
            let k = Value::String((*part).to_string());
            if i + 1 == parts.len() {
                map.insert(k, scalar);
                break;
            }
            node = map.entry(k).or_insert_with(|| Value::Mapping(Default::default()));
        }
    }
    serde_norway::to_string(&doc).map_err(parse_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn properties_keep_comments_and_order() {
        let text = "# comment\nmotd=old\nmax-players = 5\n";
        let out = edit_properties(
            text,
            &set(&[("max-players", "20"), ("server-port", "25565"), ("motd", "a\nb")]),
        );
        assert_eq!(out, "# comment\nmotd=a b\nmax-players=20\nserver-port=25565\n");
    }

    #[test]
    fn ini_sections() {
        let text = "top=1\n[ServerSettings]\nName=old\n\n[Other]\nx=1\n";
        let out = edit_ini(
            text,
            &set(&[
                ("ServerSettings.Name", "new"),
                ("ServerSettings.Port", "7777"),
                ("New.k", "v"),
            ]),
        );
        assert_eq!(
            out,
            "top=1\n[ServerSettings]\nName=new\nPort=7777\n\n[Other]\nx=1\n\n[New]\nk=v\n"
        );
        let out = edit_ini(
            "[/Script/Engine.GameSession]\n",
            &set(&[("/Script/Engine.GameSession.MaxPlayers", "10")]),
        );
        assert_eq!(out, "[/Script/Engine.GameSession]\nMaxPlayers=10\n");
    }

    #[test]
    fn json_and_yaml_dotted_paths_keep_types() {
        let out = edit_json(
            "s.json",
            r#"{"name":"x","game":{"max":1}}"#,
            &set(&[("game.max", "16"), ("name", "007"), ("public", "true")]),
        )
        .unwrap();
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["game"]["max"], 16);
        assert_eq!(v["name"], "007");
        assert_eq!(v["public"], true);
        let out = edit_yaml(
            "c.yml",
            "server:\n  port: 1\n",
            &set(&[("server.port", "25565"), ("server.name", "hi")]),
        )
        .unwrap();
        let v: serde_norway::Value = serde_norway::from_str(&out).unwrap();
        assert_eq!(v["server"]["port"].as_i64(), Some(25565));
        assert!(edit_json("s.json", "[1]", &set(&[("a.b", "1")])).is_err());
        assert!(edit_json("s.json", "{not json", &set(&[("a", "1")])).is_err());
    }
}
