//! Import of Pterodactyl eggs (PTDL_v1, PTDL_v2; JSON) and Pelican eggs (PLCN_v1 to
//! PLCN_v3; JSON or YAML) into native blueprints.
//!
//! The egg is read as a generic document and every field is taken out of it as it is
//! mapped; whatever is left, and whatever could only be mapped approximately, goes into the
//! [`Report`], field by field. Nothing is dropped silently.
//!
//! Mapping, in short:
//! - `docker_images` (v1: `image`/`images`) → `images`; `startup` (PLCN_v3:
//!   `startup_commands`, first entry) → `startup`. A startup that needs a shell (`$VAR`,
//!   `&&`, `$(...)`, an `A=b` prefix) runs as `/bin/sh -c '...'` with every `{{VAR}}`
//!   turned into `${VAR}`: values then reach the shell through the environment, so they can
//!   never add shell syntax (as they could if pasted into the command line).
//! - `config.startup.done` → `running.console_regex` (escaped; several are alternatives);
//!   `config.stop` → a command, or SIGINT for `^C`; `config.files` → `config_files` for the
//!   properties, ini, yaml and json parsers, with `{{server.build.default.port}}` and
//!   friends rewritten to `{{SERVER_PORT}}`, `{{server.build.env.X}}` to `{{X}}`.
//! - `scripts.installation` → `install` (image, script, shell); the script runs as the
//!   unprivileged container user, not root.
//! - `variables[]` → `variables`, rules through [`mamba_shared::rules`].
//! - Eggs carry no ports or limits: one port `game` (TCP and UDP) and default limits.

use std::collections::{BTreeMap, BTreeSet};

use mamba_shared::blueprint::{
    self, Blueprint, BlueprintImage, ConfigFileEdit, ConfigFormat, ConsoleSpec, DefaultLimits, FieldError,
    InstallSpec, PortSpec, Protocol, RESERVED_ENV, RunningDetection, StopSignal, StopSpec, Variable,
};
use mamba_shared::template;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Egg files larger than this are refused.
pub const MAX_EGG_BYTES: usize = 2 * 1024 * 1024;

const VERSIONS: &[&str] = &["PTDL_v1", "PTDL_v2", "PLCN_v1", "PLCN_v2", "PLCN_v3"];

/// What happened to one field of the egg.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Not carried over: there is no equivalent, or the value is unusable.
    Unmapped,
    /// Carried over, but not exactly as the egg meant it.
    Changed,
    /// Metadata or presentation that a blueprint has no place for.
    Ignored,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ReportItem {
    /// The egg's field, e.g. `config.files.server.properties.find.query.port`.
    pub field: String,
    pub outcome: Outcome,
    pub message: String,
}

/// Everything about the import that is not a plain one-to-one mapping.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Report {
    /// `meta.version` of the egg.
    pub source_format: String,
    pub items: Vec<ReportItem>,
}

impl Report {
    fn add(&mut self, field: impl Into<String>, outcome: Outcome, message: impl Into<String>) {
        self.items.push(ReportItem {
            field: field.into(),
            outcome,
            message: message.into(),
        });
    }

    pub fn count(&self, outcome: Outcome) -> usize {
        self.items.iter().filter(|i| i.outcome == outcome).count()
    }
}

#[derive(Debug, Clone)]
pub struct Imported {
    pub blueprint: Blueprint,
    pub report: Report,
}

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("not an egg: {0}")]
    NotAnEgg(String),
    #[error("the egg maps to an invalid blueprint")]
    Invalid { errors: Vec<FieldError>, report: Report },
}

/// Reads an egg (JSON or YAML text) and builds a blueprint. `slug` replaces the one made
/// from the egg's name.
pub fn import(text: &str, slug: Option<&str>) -> Result<Imported, ImportError> {
    if text.len() > MAX_EGG_BYTES {
        return Err(ImportError::NotAnEgg(format!(
            "larger than {MAX_EGG_BYTES} bytes"
        )));
    }
    let doc: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(json_err) => serde_norway::from_str(text).map_err(|yaml_err| {
            ImportError::NotAnEgg(format!("neither JSON ({json_err}) nor YAML ({yaml_err})"))
        })?,
    };
    let Value::Object(mut egg) = doc else {
        return Err(ImportError::NotAnEgg("the document is not a mapping".into()));
    };
    let mut meta = take_object(&mut egg, "meta").unwrap_or_default();
    let version = meta
        .remove("version")
        .and_then(|v| v.as_str().map(str::to_string))
        .ok_or_else(|| ImportError::NotAnEgg("meta.version is missing".into()))?;
    if !VERSIONS.contains(&version.as_str()) {
        return Err(ImportError::NotAnEgg(format!(
            "meta.version {version:?} is not one of {}",
            VERSIONS.join(", ")
        )));
    }
    let mut report = Report {
        source_format: version.clone(),
        items: Vec::new(),
    };
    let r = &mut report;
    leftovers(
        r,
        "meta",
        meta,
        Outcome::Ignored,
        "egg metadata; a blueprint keeps no update source",
    );

    let name = take_string(&mut egg, "name").unwrap_or_default();
    let name = if name.trim().is_empty() {
        r.add("name", Outcome::Changed, "missing; named \"Imported egg\"");
        "Imported egg".to_string()
    } else {
        name.trim().to_string()
    };
    let slug = slug.map_or_else(|| slugify(&name), str::to_string);
    let description = take_string(&mut egg, "description").unwrap_or_default();
    let version_text = take_string(&mut egg, "exported_at")
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| "imported".into());

    let images = images(r, &mut egg);
    let variables = variables(r, &mut egg);
    let declared: BTreeSet<String> = variables.iter().map(|v| v.env.clone()).collect();
    let startup = startup(r, &mut egg, &declared);
    let mut config = match egg.remove("config") {
        Some(Value::Object(m)) => m,
        Some(Value::Null) | None => Map::new(),
        Some(_) => {
            r.add("config", Outcome::Unmapped, "not a mapping");
            Map::new()
        }
    };
    let running = running(r, &mut config);
    let stop = stop(r, &mut config);
    let config_files = config_files(r, &mut config, &declared);
    if let Some(logs) = config.remove("logs").map(decode_json_string)
        && !is_empty(&logs)
    {
        r.add(
            "config.logs",
            Outcome::Unmapped,
            "log settings have no equivalent; wings keeps the console log",
        );
    }
    if let Some(extends) = config.remove("extends").filter(|v| !v.is_null()) {
        r.add(
            "config.extends",
            Outcome::Unmapped,
            format!("inherits from egg {extends}, which is not followed"),
        );
    }
    leftovers(r, "config", config, Outcome::Unmapped, "not understood");
    let install = install(r, &mut egg);
    let file_denylist = file_denylist(r, &mut egg);

    for key in [
        "_comment",
        "author",
        "uuid",
        "exported_at",
        "image",
        "icon",
        "tags",
        "update_url",
    ] {
        if let Some(v) = egg.remove(key)
            && !is_empty(&v)
        {
            r.add(key, Outcome::Ignored, "egg metadata; not part of a blueprint");
        }
    }
    if let Some(features) = egg.remove("features")
        && !is_empty(&features)
    {
        let list = strings(&features).join(", ");
        r.add(
            "features",
            Outcome::Unmapped,
            format!("panel front-end hooks ({list}) have no equivalent"),
        );
    }
    leftovers(r, "", egg, Outcome::Unmapped, "not understood");

    r.add(
        "ports",
        Outcome::Changed,
        "eggs declare no ports; the blueprint has one port \"game\" (TCP and UDP) for SERVER_PORT",
    );
    r.add(
        "limits",
        Outcome::Changed,
        "eggs carry no limits; defaults used (1024 MB memory, 100% CPU, 10240 MB disk)",
    );

    let blueprint = Blueprint {
        format: blueprint::FORMAT.into(),
        slug,
        name,
        version: version_text,
        description,
        images,
        startup,
        variables,
        ports: vec![PortSpec {
            name: "game".into(),
            protocols: vec![Protocol::Tcp, Protocol::Udp],
            description: "The server's primary port".into(),
        }],
        running,
        stop,
        install,
        config_files,
        limits: DefaultLimits {
            memory_mb: 1024,
            cpu_percent: 100,
            disk_mb: 10240,
            pids: 512,
        },
        console: ConsoleSpec::Stdin,
        file_denylist,
    };
    match blueprint.validate() {
        Ok(()) => Ok(Imported { blueprint, report }),
        Err(errors) => Err(ImportError::Invalid { errors, report }),
    }
}

fn take_object(map: &mut Map<String, Value>, key: &str) -> Option<Map<String, Value>> {
    match map.remove(key)? {
        Value::Object(m) => Some(m),
        _ => None,
    }
}

fn take_string(map: &mut Map<String, Value>, key: &str) -> Option<String> {
    match map.remove(key)? {
        Value::String(s) => Some(s),
        Value::Null => None,
        other => Some(scalar(&other)),
    }
}

/// A scalar as text (numbers and booleans as eggs write them in JSON).
fn scalar(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        Value::Bool(b) => b.to_string(),
        other => other.to_string(),
    }
}

/// `{}`, `[]`, `""` and null: PHP exports empty lists as `{}`.
fn is_empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::String(s) => s.trim().is_empty() || s.trim() == "{}" || s.trim() == "[]",
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    }
}

fn strings(v: &Value) -> Vec<String> {
    match v {
        Value::Array(a) => a.iter().map(scalar).collect(),
        Value::Object(o) => o.values().map(scalar).collect(),
        other => vec![scalar(other)],
    }
}

/// Pterodactyl stores `config.*` as JSON inside strings; Pelican as real objects.
fn decode_json_string(v: Value) -> Value {
    match &v {
        Value::String(s) => serde_json::from_str(s).unwrap_or(v),
        _ => v,
    }
}

fn leftovers(r: &mut Report, prefix: &str, map: Map<String, Value>, outcome: Outcome, why: &str) {
    for (key, value) in map {
        if outcome == Outcome::Ignored && is_empty(&value) {
            continue;
        }
        let field = if prefix.is_empty() {
            key
        } else {
            format!("{prefix}.{key}")
        };
        r.add(field, outcome, why);
    }
}

pub fn slugify(name: &str) -> String {
    let mut slug = String::new();
    for c in name.chars() {
        if c.is_ascii_alphanumeric() {
            slug.push(c.to_ascii_lowercase());
        } else if !slug.ends_with('-') && !slug.is_empty() {
            slug.push('-');
        }
    }
    let slug = slug.trim_end_matches('-');
    let slug: String = slug.chars().take(64).collect();
    let slug = slug.trim_end_matches('-').to_string();
    if slug.is_empty() {
        "imported-egg".into()
    } else {
        slug
    }
}

fn images(r: &mut Report, egg: &mut Map<String, Value>) -> Vec<BlueprintImage> {
    let mut found: Vec<(String, String, String)> = Vec::new();
    match egg.remove("docker_images") {
        Some(Value::Object(m)) => {
            for (label, image) in m {
                found.push((format!("docker_images.{label}"), label, scalar(&image)));
            }
        }
        Some(Value::Array(a)) => {
            for (i, image) in a.iter().enumerate() {
                found.push((format!("docker_images[{i}]"), scalar(image), scalar(image)));
            }
        }
        _ => {}
    }
    // PTDL_v1.
    if let Some(Value::Array(a)) = egg.remove("images") {
        for (i, image) in a.iter().enumerate() {
            found.push((format!("images[{i}]"), scalar(image), scalar(image)));
        }
    }
    if let Some(image) = egg.get("image").and_then(Value::as_str).map(str::to_string)
        && !image.starts_with("data:")
    {
        egg.remove("image");
        found.push(("image".into(), image.clone(), image));
    }
    let mut out = Vec::new();
    for (field, label, image) in found {
        let image = image.trim().to_string();
        if blueprint::is_image_ref(&image) {
            let label = if label.trim().is_empty() {
                image.clone()
            } else {
                label
            };
            out.push(BlueprintImage { label, image });
        } else {
            r.add(
                field,
                Outcome::Unmapped,
                format!("{image:?} is not an image reference"),
            );
        }
    }
    out
}

/// The egg's placeholders in our names.
fn translate_placeholders(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find("}}") else {
            out.push_str(&rest[start..]);
            return out;
        };
        let name = after[..end].trim();
        let ours = match name {
            "server.build.default.port" | "server.allocations.default.port" => "SERVER_PORT".to_string(),
            "server.build.default.ip" | "server.allocations.default.ip" => "SERVER_IP".to_string(),
            "server.build.memory" | "server.build.memory_limit" => "SERVER_MEMORY".to_string(),
            other => other
                .strip_prefix("server.build.env.")
                .or_else(|| other.strip_prefix("server.environment."))
                .or_else(|| other.strip_prefix("env."))
                .unwrap_or(other)
                .to_string(),
        };
        out.push_str("{{");
        out.push_str(&ours);
        out.push_str("}}");
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    out
}

fn known(name: &str, declared: &BTreeSet<String>) -> bool {
    declared.contains(name) || RESERVED_ENV.contains(&name) || name == "PORT_GAME"
}

fn startup(r: &mut Report, egg: &mut Map<String, Value>, declared: &BTreeSet<String>) -> String {
    let mut command = take_string(egg, "startup").filter(|s| !s.trim().is_empty());
    let mut field = "startup".to_string();
    if let Some(Value::Object(commands)) = egg.remove("startup_commands") {
        for (i, (label, cmd)) in commands.into_iter().enumerate() {
            if command.is_none() && i == 0 {
                command = Some(scalar(&cmd));
                field = format!("startup_commands.{label}");
            } else {
                r.add(
                    format!("startup_commands.{label}"),
                    Outcome::Unmapped,
                    "a blueprint has one startup command; the first was kept",
                );
            }
        }
    }
    let Some(command) = command else {
        r.add(
            "startup",
            Outcome::Unmapped,
            "missing; the blueprint starts an empty shell",
        );
        return "/bin/sh".into();
    };
    let command = translate_placeholders(command.trim());
    let names = template::placeholders(&command);
    let unknown: Vec<&str> = names.iter().copied().filter(|n| !known(n, declared)).collect();
    let bare = {
        let mut s = String::new();
        let mut rest = command.as_str();
        while let Some(start) = rest.find("{{") {
            s.push_str(&rest[..start]);
            match rest[start..].find("}}") {
                Some(end) => rest = &rest[start + end + 2..],
                None => {
                    rest = "";
                }
            }
        }
        s.push_str(rest);
        s
    };
    let first_word_assigns = bare
        .split_whitespace()
        .next()
        .is_some_and(|w| w.contains('=') && !w.starts_with('-'));
    let needs_shell = bare.contains(['$', ';', '&', '|', '(', ')', '`', '<', '>', '*', '?', '~'])
        || first_word_assigns
        || shell_words::split(&command).is_err();
    if !needs_shell && unknown.is_empty() {
        return command;
    }
    // Through a shell, with values from the environment rather than pasted in.
    let mut script = String::new();
    let mut rest = command.as_str();
    while let Some(start) = rest.find("{{") {
        script.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find("}}") else { break };
        script.push_str(&format!("${{{}}}", after[..end].trim()));
        rest = &after[end + 2..];
    }
    script.push_str(rest);
    for name in &unknown {
        r.add(
            field.clone(),
            Outcome::Changed,
            format!("{{{{{name}}}}} is no variable of the egg; it becomes ${{{name}}}, empty unless the environment sets it"),
        );
    }
    r.add(
        field,
        Outcome::Changed,
        "runs through /bin/sh -c, with {{VAR}} placeholders as environment references (${VAR})",
    );
    format!("/bin/sh -c '{}'", script.replace('\'', r"'\''"))
}

fn running(r: &mut Report, config: &mut Map<String, Value>) -> RunningDetection {
    let startup = config.remove("startup").map(decode_json_string);
    let mut done: Vec<String> = Vec::new();
    match startup {
        Some(Value::Object(mut m)) => {
            match m.remove("done") {
                Some(Value::Array(a)) => done.extend(a.iter().map(scalar)),
                Some(v) if !v.is_null() => done.push(scalar(&v)),
                _ => {}
            }
            leftovers(r, "config.startup", m, Outcome::Unmapped, "not understood");
        }
        Some(Value::Array(a)) => done.extend(a.iter().map(scalar)),
        Some(Value::String(s)) if !s.trim().is_empty() => done.push(s),
        _ => {}
    }
    done.retain(|d| !d.is_empty());
    if done.is_empty() {
        r.add(
            "config.startup.done",
            Outcome::Changed,
            "no done string; the server counts as running from its first console line",
        );
        return RunningDetection {
            console_regex: "^".into(),
        };
    }
    RunningDetection {
        console_regex: done
            .iter()
            .map(|d| regex::escape(d))
            .collect::<Vec<_>>()
            .join("|"),
    }
}

fn stop(r: &mut Report, config: &mut Map<String, Value>) -> StopSpec {
    let stop = config.remove("stop").map(|v| scalar(&v)).unwrap_or_default();
    let stop = stop.trim();
    let (command, signal) = match stop {
        "^C" | "^c" | "^^C" => (None, Some(StopSignal::Int)),
        "" => {
            r.add(
                "config.stop",
                Outcome::Changed,
                "missing; the server is stopped with SIGTERM",
            );
            (None, Some(StopSignal::Term))
        }
        s if s.starts_with('^') => {
            r.add(
                "config.stop",
                Outcome::Changed,
                format!("the key sequence {s} has no equivalent; the server is stopped with SIGTERM"),
            );
            (None, Some(StopSignal::Term))
        }
        s => (Some(s.to_string()), None),
    };
    StopSpec {
        command,
        signal,
        timeout_secs: 30,
    }
}

fn config_files(
    r: &mut Report,
    config: &mut Map<String, Value>,
    declared: &BTreeSet<String>,
) -> Vec<ConfigFileEdit> {
    let files = match config.remove("files").map(decode_json_string) {
        Some(Value::Object(m)) => m,
        Some(v) if is_empty(&v) => return Vec::new(),
        Some(_) => {
            r.add("config.files", Outcome::Unmapped, "not a mapping of files");
            return Vec::new();
        }
        None => return Vec::new(),
    };
    let mut out = Vec::new();
    for (path, spec) in files {
        let field = format!("config.files.{path}");
        let Value::Object(mut spec) = spec else {
            r.add(field, Outcome::Unmapped, "not a mapping");
            continue;
        };
        let parser = spec.remove("parser").map(|p| scalar(&p)).unwrap_or_default();
        let format = match parser.as_str() {
            "properties" => ConfigFormat::Properties,
            "yaml" | "yml" => ConfigFormat::Yaml,
            "json" => ConfigFormat::Json,
            "ini" => ConfigFormat::Ini,
            other => {
                r.add(
                    format!("{field}.parser"),
                    Outcome::Unmapped,
                    format!("the {other:?} parser has no equivalent (properties, yaml, json and ini do); the file is not edited"),
                );
                continue;
            }
        };
        let rel = path.trim_start_matches("/home/container/").to_string();
        if let Err(e) = blueprint::check_relative_path(&rel) {
            r.add(field, Outcome::Unmapped, format!("the path {e}"));
            continue;
        }
        let find = match spec.remove("find") {
            Some(Value::Object(m)) => m,
            _ => Map::new(),
        };
        let mut set = BTreeMap::new();
        for (key, value) in find {
            let kfield = format!("{field}.find.{key}");
            if matches!(format, ConfigFormat::Yaml | ConfigFormat::Json) && key.contains(['[', '*']) {
                r.add(
                    kfield,
                    Outcome::Unmapped,
                    "array or wildcard keys have no equivalent",
                );
                continue;
            }
            if value.is_object() || value.is_array() {
                r.add(
                    kfield,
                    Outcome::Unmapped,
                    "conditional replacements have no equivalent",
                );
                continue;
            }
            let text = translate_placeholders(&scalar(&value));
            let unknown: Vec<String> = template::placeholders(&text)
                .into_iter()
                .filter(|n| !known(n, declared))
                .map(str::to_string)
                .collect();
            if !unknown.is_empty() {
                r.add(
                    kfield,
                    Outcome::Unmapped,
                    format!("refers to {}, which has no equivalent", unknown.join(", ")),
                );
                continue;
            }
            set.insert(key, text);
        }
        leftovers(r, &field, spec, Outcome::Unmapped, "not understood");
        if set.is_empty() {
            r.add(field, Outcome::Unmapped, "nothing left to set in this file");
            continue;
        }
        out.push(ConfigFileEdit {
            path: rel,
            format,
            set,
            create: true,
        });
    }
    out
}

fn install(r: &mut Report, egg: &mut Map<String, Value>) -> Option<InstallSpec> {
    let mut scripts = take_object(egg, "scripts")?;
    let mut inst = take_object(&mut scripts, "installation");
    leftovers(r, "scripts", scripts, Outcome::Unmapped, "not understood");
    let inst = inst.as_mut()?;
    let script = take_string(inst, "script")
        .unwrap_or_default()
        .replace("\r\n", "\n");
    let container = take_string(inst, "container").unwrap_or_default();
    let entrypoint = take_string(inst, "entrypoint").unwrap_or_default();
    leftovers(
        r,
        "scripts.installation",
        std::mem::take(inst),
        Outcome::Unmapped,
        "not understood",
    );
    if script.trim().is_empty() {
        return None;
    }
    if !blueprint::is_image_ref(container.trim()) {
        r.add(
            "scripts.installation.container",
            Outcome::Unmapped,
            format!("{container:?} is not an image reference; the install script is not kept"),
        );
        return None;
    }
    let shell = match entrypoint.trim() {
        "" => "/bin/sh".to_string(),
        e if e.starts_with('/') => e.to_string(),
        e => format!("/bin/{e}"),
    };
    r.add(
        "scripts.installation",
        Outcome::Changed,
        "the script runs as the unprivileged container user (uid 988), not as root",
    );
    Some(InstallSpec {
        image: container.trim().to_string(),
        script,
        shell,
        timeout_secs: 1800,
    })
}

fn file_denylist(r: &mut Report, egg: &mut Map<String, Value>) -> Vec<String> {
    let Some(list) = egg.remove("file_denylist") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (i, path) in strings(&list).into_iter().enumerate() {
        match blueprint::check_relative_path(&path) {
            Ok(()) => out.push(path),
            Err(e) => r.add(
                format!("file_denylist[{i}]"),
                Outcome::Unmapped,
                format!("{path:?}: {e}"),
            ),
        }
    }
    out
}

fn variables(r: &mut Report, egg: &mut Map<String, Value>) -> Vec<Variable> {
    let list = match egg.remove("variables") {
        Some(Value::Array(a)) => a,
        Some(v) if is_empty(&v) => Vec::new(),
        Some(_) => {
            r.add("variables", Outcome::Unmapped, "not a list");
            Vec::new()
        }
        None => Vec::new(),
    };
    let mut out: Vec<Variable> = Vec::new();
    for (i, v) in list.into_iter().enumerate() {
        let field = format!("variables[{i}]");
        let Value::Object(mut v) = v else {
            r.add(field, Outcome::Unmapped, "not a mapping");
            continue;
        };
        let raw_env = take_string(&mut v, "env_variable").unwrap_or_default();
        let env = raw_env.trim().to_ascii_uppercase();
        let name = take_string(&mut v, "name").unwrap_or_else(|| env.clone());
        if env != raw_env.trim() {
            r.add(
                format!("{field}.env_variable"),
                Outcome::Changed,
                format!("{raw_env} is written {env}"),
            );
        }
        let valid = (1..=64).contains(&env.len())
            && env
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
            && env.bytes().next().is_some_and(|b| b.is_ascii_uppercase());
        if !valid {
            r.add(
                format!("{field}.env_variable"),
                Outcome::Unmapped,
                format!("{raw_env:?} is not a usable variable name; the variable is dropped"),
            );
            continue;
        }
        if RESERVED_ENV.contains(&env.as_str()) || env.starts_with("PORT_") {
            r.add(
                format!("{field}.env_variable"),
                Outcome::Unmapped,
                format!("{env} is set by wings; the variable is dropped and wings' value is used"),
            );
            continue;
        }
        if out.iter().any(|o| o.env == env) {
            r.add(
                format!("{field}.env_variable"),
                Outcome::Unmapped,
                format!("{env} is declared twice; the first is kept"),
            );
            continue;
        }
        let description = take_string(&mut v, "description")
            .unwrap_or_default()
            .replace("\r\n", "\n");
        let default = v.remove("default_value").map(|d| scalar(&d)).unwrap_or_default();
        let flag = |v: &mut Map<String, Value>, key: &str| match v.remove(key) {
            Some(Value::Bool(b)) => b,
            Some(Value::Number(n)) => n.as_i64() != Some(0),
            Some(Value::String(s)) => !matches!(s.as_str(), "" | "0" | "false"),
            _ => true,
        };
        let user_viewable = flag(&mut v, "user_viewable");
        let user_editable = flag(&mut v, "user_editable");
        let parsed = match v.remove("rules") {
            Some(Value::Array(items)) => {
                mamba_shared::rules::parse_list(&items.iter().map(scalar).collect::<Vec<_>>())
            }
            Some(Value::String(s)) => mamba_shared::rules::parse(&s),
            _ => mamba_shared::rules::ParsedRules::default(),
        };
        for u in &parsed.unmapped {
            r.add(
                format!("{field}.rules"),
                Outcome::Unmapped,
                format!("{}: {}", u.rule, u.reason),
            );
        }
        let mut rules = parsed.rules;
        // A blueprint's defaults must satisfy its rules; eggs often leave required values empty.
        if let Err(why) = rules.check(&default) {
            if default.is_empty() && rules.required {
                rules.required = false;
                r.add(
                    format!("{field}.rules"),
                    Outcome::Changed,
                    "required with an empty default: not required here, so the blueprint is valid; give a value when creating a server",
                );
            }
            if let Err(why2) = rules.check(&default) {
                rules = mamba_shared::variables::VariableRules {
                    kind: rules.kind,
                    required: rules.required,
                    ..Default::default()
                };
                let still = rules.check(&default).is_err();
                if still {
                    rules.kind = mamba_shared::variables::VariableType::String;
                }
                r.add(
                    format!("{field}.rules"),
                    Outcome::Changed,
                    format!("the default {default:?} breaks its own rules ({why}; {why2}); only the type and required are kept"),
                );
            }
        }
        for key in ["field_type", "sort", "id", "egg_id", "created_at", "updated_at"] {
            if let Some(val) = v.remove(key)
                && !is_empty(&val)
            {
                r.add(
                    format!("{field}.{key}"),
                    Outcome::Ignored,
                    "presentation or panel bookkeeping",
                );
            }
        }
        leftovers(r, &field, v, Outcome::Unmapped, "not understood");
        out.push(Variable {
            env,
            name: if name.trim().is_empty() {
                raw_env.clone()
            } else {
                name.trim().to_string()
            },
            description,
            default,
            user_viewable,
            user_editable,
            rules,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slugs() {
        assert_eq!(slugify("Counter-Strike 2"), "counter-strike-2");
        assert_eq!(slugify("  Paper (1.20+) "), "paper-1-20");
        assert_eq!(slugify("!!!"), "imported-egg");
    }

    #[test]
    fn placeholders_are_translated() {
        assert_eq!(
            translate_placeholders("{{server.build.default.port}} {{server.build.env.A}} {{env.B}} {{C}}"),
            "{{SERVER_PORT}} {{A}} {{B}} {{C}}"
        );
    }

    #[test]
    fn a_minimal_ptdl_v2_egg() {
        let egg = r#"{
            "meta": {"version": "PTDL_v2", "update_url": null},
            "name": "Demo Game", "author": "a@b.c", "features": ["eula"],
            "docker_images": {"Java 21": "ghcr.io/example/java:21", "bad": "not an image!"},
            "startup": "java -Xmx{{SERVER_MEMORY}}M -jar {{JAR}}",
            "config": {"files": "{\"server.properties\":{\"parser\":\"properties\",\"find\":{\"server-port\":\"{{server.build.default.port}}\",\"motd\":\"{{config.docker.interface}}\"}},\"a.xml\":{\"parser\":\"xml\",\"find\":{}}}",
                       "startup": "{\"done\": \")! For help\"}", "logs": "{}", "stop": "^C"},
            "scripts": {"installation": {"script": "echo hi\r\n", "container": "ghcr.io/example/installers:debian", "entrypoint": "bash"}},
            "variables": [
                {"name": "Jar", "env_variable": "JAR", "default_value": "server.jar", "user_viewable": true,
                 "user_editable": true, "rules": "required|regex:/^([\\w\\d._-]+)(\\.jar)$/", "field_type": "text"},
                {"name": "Token", "env_variable": "TOKEN", "default_value": "", "user_viewable": true,
                 "user_editable": true, "rules": "required|string|ip"}
            ],
            "surprise": 1
        }"#;
        let imported = import(egg, None).unwrap();
        let b = &imported.blueprint;
        assert_eq!(b.slug, "demo-game");
        assert_eq!(b.images.len(), 1);
        assert_eq!(b.startup, "java -Xmx{{SERVER_MEMORY}}M -jar {{JAR}}");
        assert_eq!(b.stop.signal, Some(StopSignal::Int));
        assert!(b.running.console_regex.contains(r"\)! For help"));
        assert_eq!(b.config_files.len(), 1);
        assert_eq!(b.config_files[0].set["server-port"], "{{SERVER_PORT}}");
        assert_eq!(b.install.as_ref().unwrap().shell, "/bin/bash");
        assert_eq!(b.install.as_ref().unwrap().script, "echo hi\n");
        assert!(!b.variables[1].rules.required);
        let fields: Vec<(&str, Outcome)> = imported
            .report
            .items
            .iter()
            .map(|i| (i.field.as_str(), i.outcome))
            .collect();
        for expected in [
            ("docker_images.bad", Outcome::Unmapped),
            ("config.files.server.properties.find.motd", Outcome::Unmapped),
            ("config.files.a.xml.parser", Outcome::Unmapped),
            ("variables[1].rules", Outcome::Unmapped),
            ("variables[1].rules", Outcome::Changed),
            ("variables[0].field_type", Outcome::Ignored),
            ("features", Outcome::Unmapped),
            ("surprise", Outcome::Unmapped),
            ("author", Outcome::Ignored),
        ] {
            assert!(fields.contains(&expected), "{expected:?} missing from {fields:?}");
        }
    }

    #[test]
    fn shell_startups_take_values_from_the_environment() {
        let egg = r#"{"meta": {"version": "PTDL_v2"}, "name": "x", "docker_images": {"a": "img:1"},
            "startup": "./run {{PORT}} $( [ \"$X\" == \"1\" ] || printf %s ' -y' ) {{UNKNOWN}}",
            "config": {"stop": "quit", "startup": "{\"done\": \"ready\"}"},
            "variables": [{"name": "P", "env_variable": "PORT", "default_value": "1", "rules": "required|integer"}]}"#;
        let imported = import(egg, Some("x")).unwrap();
        let startup = &imported.blueprint.startup;
        assert!(startup.starts_with("/bin/sh -c '"), "{startup}");
        assert!(startup.contains("${PORT}") && startup.contains("${UNKNOWN}"));
        assert!(!startup.contains("{{"));
        let args = shell_words::split(startup).unwrap();
        assert_eq!(args.len(), 3);
        assert!(args[2].contains("printf %s ' -y'"), "quotes survive: {}", args[2]);
    }

    #[test]
    fn not_eggs_are_refused() {
        assert!(matches!(import("[1, 2]", None), Err(ImportError::NotAnEgg(_))));
        assert!(matches!(
            import("{\"meta\": {\"version\": \"X\"}}", None),
            Err(ImportError::NotAnEgg(_))
        ));
        assert!(matches!(import(": : :", None), Err(ImportError::NotAnEgg(_))));
    }
}
