//! Blueprints: the declarative description of one game, shared by panel and wings.
//!
//! A blueprint file lives under `blueprints/` as YAML. Wings receives the same document as
//! JSON inside a create request, so it never needs blueprint files of its own.
//! [`Blueprint::validate`] is the schema: every problem it finds names the field.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::template;
use crate::variables::{VariableRules, VariableType};

/// The blueprint format this code reads. Bumped only for incompatible changes.
pub const FORMAT: &str = "mamba.blueprint/v1";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Blueprint {
    /// Must be [`FORMAT`].
    pub format: String,
    /// Stable identifier: lowercase letters, digits and dashes.
    pub slug: String,
    pub name: String,
    /// The blueprint's own version, free-form (for example "1.2").
    pub version: String,
    #[serde(default)]
    pub description: String,
    /// Images a server may run, the first being the default.
    pub images: Vec<BlueprintImage>,
    /// The startup command line. It is split into arguments first and each argument is then
    /// rendered, so a variable's value can never add arguments or shell syntax.
    pub startup: String,
    #[serde(default)]
    pub variables: Vec<Variable>,
    /// Named ports. The first is bound to the server's default allocation, the next ones to
    /// its additional allocations in order.
    #[serde(default)]
    pub ports: Vec<PortSpec>,
    pub running: RunningDetection,
    pub stop: StopSpec,
    #[serde(default)]
    pub install: Option<InstallSpec>,
    #[serde(default)]
    pub config_files: Vec<ConfigFileEdit>,
    pub limits: DefaultLimits,
    /// How console commands reach the game.
    #[serde(default)]
    pub console: ConsoleSpec,
    /// Paths (relative to the server root) users may not touch through the file manager.
    #[serde(default)]
    pub file_denylist: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlueprintImage {
    /// What a user picks from, for example "Java 21".
    pub label: String,
    pub image: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Variable {
    /// The environment variable name, also used as `{{ENV}}` in templates.
    pub env: String,
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub default: String,
    #[serde(default = "yes")]
    pub user_viewable: bool,
    #[serde(default = "yes")]
    pub user_editable: bool,
    #[serde(default)]
    pub rules: VariableRules,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortSpec {
    /// Lowercase name; exposed to the game as `PORT_<NAME>` (uppercased).
    pub name: String,
    pub protocols: Vec<Protocol>,
    #[serde(default)]
    pub description: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunningDetection {
    /// A console line matching this regex moves the server from starting to running.
    pub console_regex: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StopSpec {
    /// A console command that stops the game, for example `stop` or `quit`.
    #[serde(default)]
    pub command: Option<String>,
    /// A signal that stops the game, for example `SIGINT`. Used when there is no command.
    #[serde(default)]
    pub signal: Option<StopSignal>,
    /// How long to wait for the game to exit before killing it.
    pub timeout_secs: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StopSignal {
    #[serde(rename = "SIGINT")]
    Int,
    #[serde(rename = "SIGTERM")]
    Term,
    #[serde(rename = "SIGQUIT")]
    Quit,
    #[serde(rename = "SIGHUP")]
    Hup,
    #[serde(rename = "SIGUSR1")]
    Usr1,
}

impl StopSignal {
    pub fn name(self) -> &'static str {
        match self {
            StopSignal::Int => "SIGINT",
            StopSignal::Term => "SIGTERM",
            StopSignal::Quit => "SIGQUIT",
            StopSignal::Hup => "SIGHUP",
            StopSignal::Usr1 => "SIGUSR1",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstallSpec {
    /// The image the install script runs in.
    pub image: String,
    /// A POSIX shell script. It runs as the unprivileged container user with the server root
    /// at `/mnt/server` and the server's variables in its environment.
    pub script: String,
    /// The interpreter, default `/bin/sh`.
    #[serde(default = "default_shell")]
    pub shell: String,
    /// Hard limit on the install's duration.
    #[serde(default = "default_install_timeout")]
    pub timeout_secs: u32,
}

fn default_shell() -> String {
    "/bin/sh".into()
}

fn default_install_timeout() -> u32 {
    1800
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConfigFormat {
    Properties,
    Yaml,
    Json,
    Ini,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFileEdit {
    /// Path relative to the server root.
    pub path: String,
    pub format: ConfigFormat,
    /// Keys to set, with templated values. YAML and JSON keys are dotted paths; INI keys are
    /// `section.key`, split at the last dot (section names may contain dots, keys may not).
    pub set: BTreeMap<String, String>,
    /// Create the file when it does not exist yet.
    #[serde(default = "yes")]
    pub create: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DefaultLimits {
    pub memory_mb: u64,
    pub cpu_percent: u32,
    pub disk_mb: u64,
    #[serde(default = "default_pids")]
    pub pids: u32,
}

fn default_pids() -> u32 {
    512
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(tag = "transport", rename_all = "lowercase", deny_unknown_fields)]
pub enum ConsoleSpec {
    /// Commands are written to the game's standard input.
    #[default]
    Stdin,
    /// Commands go over Source RCON (which Minecraft also speaks).
    Rcon {
        /// The variable holding the RCON port.
        port_variable: String,
        /// The variable holding the RCON password.
        password_variable: String,
    },
}

/// One problem found in a blueprint, naming the field it concerns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// A blueprint that could not be read or is invalid.
#[derive(Debug, thiserror::Error)]
pub enum BlueprintError {
    #[error("{source_name}: {message}")]
    Parse {
        source_name: String,
        field: String,
        message: String,
    },
    #[error("{source_name}: {}", join(.errors))]
    Invalid {
        source_name: String,
        errors: Vec<FieldError>,
    },
}

fn join(errors: &[FieldError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

impl BlueprintError {
    /// The fields the error is about, for error envelopes.
    pub fn field_errors(&self) -> Vec<FieldError> {
        match self {
            BlueprintError::Parse { field, message, .. } => {
                vec![FieldError {
                    field: field.clone(),
                    message: message.clone(),
                }]
            }
            BlueprintError::Invalid { errors, .. } => errors.clone(),
        }
    }
}

const MAX_BLUEPRINT_BYTES: usize = 1024 * 1024;

impl Blueprint {
    /// Reads a blueprint from YAML text; `source_name` (usually the file name) starts every
    /// error message.
    pub fn from_yaml(source_name: &str, text: &str) -> Result<Blueprint, BlueprintError> {
        if text.len() > MAX_BLUEPRINT_BYTES {
            return Err(BlueprintError::Parse {
                source_name: source_name.into(),
                field: String::new(),
                message: format!("larger than {MAX_BLUEPRINT_BYTES} bytes"),
            });
        }
        let deserializer = serde_norway::Deserializer::from_str(text);
        let blueprint: Blueprint = serde_path_error(source_name, deserializer)?;
        blueprint.validate().map_err(|errors| BlueprintError::Invalid {
            source_name: source_name.into(),
            errors,
        })?;
        Ok(blueprint)
    }

    /// Checks everything serde cannot: names, regexes, templates, rules and limits.
    pub fn validate(&self) -> Result<(), Vec<FieldError>> {
        let mut errors = Vec::new();
        let mut err = |field: String, message: String| errors.push(FieldError { field, message });

        if self.format != FORMAT {
            err("format".into(), format!("must be \"{FORMAT}\""));
        }
        if !is_slug(&self.slug) {
            err(
                "slug".into(),
                "must be 1-64 lowercase letters, digits or dashes".into(),
            );
        }
        if self.name.trim().is_empty() {
            err("name".into(), "must not be empty".into());
        }
        if self.version.trim().is_empty() {
            err("version".into(), "must not be empty".into());
        }
        if self.images.is_empty() {
            err("images".into(), "at least one image is required".into());
        }
        for (i, image) in self.images.iter().enumerate() {
            if !is_image_ref(&image.image) {
                err(
                    format!("images[{i}].image"),
                    format!("{:?} is not an image reference", image.image),
                );
            }
        }

        let mut envs = BTreeMap::new();
        for (i, v) in self.variables.iter().enumerate() {
            if !is_env_name(&v.env) {
                err(
                    format!("variables[{i}].env"),
                    "must be an uppercase name like MAX_PLAYERS".into(),
                );
            } else if RESERVED_ENV.contains(&v.env.as_str()) || v.env.starts_with("PORT_") {
                err(
                    format!("variables[{i}].env"),
                    format!("{} is set by wings and cannot be a variable", v.env),
                );
            } else if envs.insert(v.env.clone(), i).is_some() {
                err(
                    format!("variables[{i}].env"),
                    format!("{} is declared twice", v.env),
                );
            }
            if let Err(message) = v.rules.check_definition() {
                err(format!("variables[{i}].rules"), message);
            } else if let Err(message) = v.rules.check(&v.default) {
                err(format!("variables[{i}].default"), message);
            }
        }

        let mut port_names = BTreeMap::new();
        for (i, p) in self.ports.iter().enumerate() {
            if !is_port_name(&p.name) {
                err(
                    format!("ports[{i}].name"),
                    "must be lowercase letters, digits or underscores".into(),
                );
            } else if port_names.insert(p.name.clone(), i).is_some() {
                err(
                    format!("ports[{i}].name"),
                    format!("{} is declared twice", p.name),
                );
            }
            if p.protocols.is_empty() {
                err(format!("ports[{i}].protocols"), "at least one of tcp, udp".into());
            }
        }

        let known = |name: &str| {
            envs.contains_key(name)
                || RESERVED_ENV.contains(&name)
                || name
                    .strip_prefix("PORT_")
                    .is_some_and(|p| port_names.contains_key(&p.to_ascii_lowercase()))
        };
        let mut check_template = |field: String, text: &str| {
            for name in template::placeholders(text) {
                if !known(name) {
                    err(
                        field.clone(),
                        format!("{{{{{name}}}}} is not a declared variable"),
                    );
                }
            }
        };
        check_template("startup".into(), &self.startup);
        for (i, edit) in self.config_files.iter().enumerate() {
            for (key, value) in &edit.set {
                check_template(format!("config_files[{i}].set.{key}"), value);
            }
        }
        let mut err = |field: String, message: String| errors.push(FieldError { field, message });
        match shell_words::split(&self.startup) {
            Ok(args) if args.is_empty() => err("startup".into(), "must not be empty".into()),
            Ok(_) => {}
            Err(e) => err("startup".into(), format!("cannot be split into arguments: {e}")),
        }

        if let Err(e) = regex::RegexBuilder::new(&self.running.console_regex)
            .size_limit(1 << 20)
            .build()
        {
            err("running.console_regex".into(), format!("invalid regex: {e}"));
        }
        if self.stop.command.is_none() && self.stop.signal.is_none() {
            err("stop".into(), "needs a command or a signal".into());
        }
        if self
            .stop
            .command
            .as_deref()
            .is_some_and(|c| c.trim().is_empty() || c.contains('\n'))
        {
            err("stop.command".into(), "must be one non-empty line".into());
        }
        if !(1..=3600).contains(&self.stop.timeout_secs) {
            err("stop.timeout_secs".into(), "must be between 1 and 3600".into());
        }
        if let Some(install) = &self.install {
            if !is_image_ref(&install.image) {
                err(
                    "install.image".into(),
                    format!("{:?} is not an image reference", install.image),
                );
            }
            if install.script.trim().is_empty() {
                err("install.script".into(), "must not be empty".into());
            }
            if !install.shell.starts_with('/') {
                err("install.shell".into(), "must be an absolute path".into());
            }
            if !(1..=86_400).contains(&install.timeout_secs) {
                err(
                    "install.timeout_secs".into(),
                    "must be between 1 and 86400".into(),
                );
            }
        }
        for (i, edit) in self.config_files.iter().enumerate() {
            if let Err(message) = check_relative_path(&edit.path) {
                err(format!("config_files[{i}].path"), message);
            }
            if edit.set.is_empty() {
                err(
                    format!("config_files[{i}].set"),
                    "must set at least one key".into(),
                );
            }
        }
        for (i, path) in self.file_denylist.iter().enumerate() {
            if let Err(message) = check_relative_path(path.trim_end_matches('/')) {
                err(format!("file_denylist[{i}]"), message);
            }
        }
        let l = &self.limits;
        if l.memory_mb < 16 {
            err("limits.memory_mb".into(), "must be at least 16".into());
        }
        if l.cpu_percent == 0 {
            err("limits.cpu_percent".into(), "must be at least 1".into());
        }
        if l.disk_mb == 0 {
            err("limits.disk_mb".into(), "must be at least 1".into());
        }
        if l.pids < 16 {
            err("limits.pids".into(), "must be at least 16".into());
        }
        if let ConsoleSpec::Rcon {
            port_variable,
            password_variable,
        } = &self.console
        {
            for (field, name) in [
                ("console.port_variable", port_variable),
                ("console.password_variable", password_variable),
            ] {
                if !known(name) {
                    err(field.into(), format!("{name} is not a declared variable"));
                }
            }
        }
        if errors.is_empty() { Ok(()) } else { Err(errors) }
    }

    pub fn default_image(&self) -> Option<&str> {
        self.images.first().map(|i| i.image.as_str())
    }

    pub fn variable(&self, env: &str) -> Option<&Variable> {
        self.variables.iter().find(|v| v.env == env)
    }

    /// The startup command as arguments, each rendered with `values`.
    pub fn startup_args(&self, values: &BTreeMap<String, String>) -> Result<Vec<String>, String> {
        let args = shell_words::split(&self.startup).map_err(|e| e.to_string())?;
        Ok(args.iter().map(|a| template::render(a, values)).collect())
    }
}

/// Names wings sets itself in every server's environment.
pub const RESERVED_ENV: &[&str] = &[
    "SERVER_ID",
    "SERVER_IP",
    "SERVER_PORT",
    "SERVER_MEMORY",
    "HOME",
    "USER",
    "TZ",
    "STARTUP",
    "PATH",
];

fn serde_path_error<'de, T: Deserialize<'de>>(
    source_name: &str,
    deserializer: serde_norway::Deserializer<'de>,
) -> Result<T, BlueprintError> {
    T::deserialize(deserializer).map_err(|e| {
        let message = e.to_string();
        // serde_norway reports the location as "at line L column C" and names unknown or
        // missing fields in the message itself.
        let field = field_from_serde_message(&message).unwrap_or_default();
        BlueprintError::Parse {
            source_name: source_name.into(),
            field,
            message,
        }
    })
}

fn field_from_serde_message(message: &str) -> Option<String> {
    let start = message.find('`')? + 1;
    let end = start + message[start..].find('`')?;
    let prefix = message.split(':').next().unwrap_or_default();
    let name = &message[start..end];
    if prefix.is_empty() || prefix.contains(' ') {
        Some(name.to_string())
    } else {
        Some(format!("{prefix}.{name}"))
    }
}

pub(crate) fn is_slug(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
}

fn is_env_name(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
        && s.bytes().next().is_some_and(|b| b.is_ascii_uppercase())
}

fn is_port_name(s: &str) -> bool {
    (1..=32).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && s.bytes().next().is_some_and(|b| b.is_ascii_lowercase())
}

/// A Docker image reference: `[registry/]name[:tag][@digest]`, conservatively checked.
pub fn is_image_ref(s: &str) -> bool {
    (1..=255).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-/:@+".contains(&b))
        && s.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && !s.contains("//")
}

/// A path that stays inside the server root by construction: relative, no `..`, no NUL.
pub fn check_relative_path(path: &str) -> Result<(), String> {
    if path.is_empty() {
        return Err("must not be empty".into());
    }
    if path.starts_with('/') {
        return Err("must be relative to the server root".into());
    }
    if path.contains('\0') || path.contains('\\') {
        return Err("must not contain NUL or backslashes".into());
    }
    if path.split('/').any(|c| c == ".." || c == "." || c.is_empty()) {
        return Err("must not contain empty, '.' or '..' components".into());
    }
    Ok(())
}

impl VariableRules {
    /// Short human description, for docs and UIs.
    pub fn describe(&self) -> String {
        let mut parts = vec![
            match self.kind {
                VariableType::String => "string",
                VariableType::Integer => "integer",
                VariableType::Number => "number",
                VariableType::Boolean => "boolean",
            }
            .to_string(),
        ];
        if self.required {
            parts.push("required".into());
        }
        if let Some(min) = self.min {
            parts.push(format!("min {min}"));
        }
        if let Some(max) = self.max {
            parts.push(format!("max {max}"));
        }
        if let Some(list) = &self.one_of {
            parts.push(format!("one of {}", list.join(", ")));
        }
        if let Some(re) = &self.regex {
            parts.push(format!("matches {re}"));
        }
        parts.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
format: mamba.blueprint/v1
slug: demo
name: Demo
version: "1"
images: [{ label: Default, image: "mamba/testbox:latest" }]
startup: "fake-game --port {{SERVER_PORT}} --name {{NAME}}"
variables:
  - env: NAME
    name: Server name
    default: "My server"
    rules: { type: string, required: true, max: 20 }
ports: [{ name: game, protocols: [tcp, udp] }]
running: { console_regex: "ready" }
stop: { command: stop, timeout_secs: 10 }
limits: { memory_mb: 256, cpu_percent: 100, disk_mb: 1024 }
"#;

    #[test]
    fn minimal_blueprint_parses() {
        let b = Blueprint::from_yaml("demo.yaml", MINIMAL).unwrap();
        assert_eq!(b.slug, "demo");
        assert_eq!(b.limits.pids, 512);
        let mut values = BTreeMap::new();
        values.insert("SERVER_PORT".to_string(), "27015".to_string());
        values.insert("NAME".to_string(), "a; rm -rf / {{SERVER_PORT}}".to_string());
        assert_eq!(
            b.startup_args(&values).unwrap(),
            vec![
                "fake-game",
                "--port",
                "27015",
                "--name",
                "a; rm -rf / {{SERVER_PORT}}"
            ]
        );
    }

    #[test]
    fn unknown_field_is_named() {
        let text = MINIMAL.replace("stop: {", "stop: { bogus: 1,");
        let err = Blueprint::from_yaml("demo.yaml", &text).unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("demo.yaml: "), "{msg}");
        assert!(msg.contains("bogus"), "{msg}");
    }

    #[test]
    fn semantic_errors_name_file_and_field() {
        let text = MINIMAL
            .replace("{{NAME}}", "{{NOPE}}")
            .replace("console_regex: \"ready\"", "console_regex: \"(\"")
            .replace(
                "default: \"My server\"",
                "default: \"a name far longer than twenty characters\"",
            );
        let err = Blueprint::from_yaml("demo.yaml", &text).unwrap_err();
        let fields: Vec<String> = err.field_errors().into_iter().map(|e| e.field).collect();
        assert!(fields.contains(&"startup".to_string()), "{fields:?}");
        assert!(
            fields.contains(&"running.console_regex".to_string()),
            "{fields:?}"
        );
        assert!(fields.contains(&"variables[0].default".to_string()), "{fields:?}");
        assert!(err.to_string().starts_with("demo.yaml: "));
    }

    #[test]
    fn reserved_and_escaping_names_are_refused() {
        let text = MINIMAL
            .replace("env: NAME", "env: SERVER_PORT")
            .replace("{{NAME}}", "x");
        let err = Blueprint::from_yaml("demo.yaml", &text).unwrap_err();
        assert!(err.to_string().contains("variables[0].env"), "{err}");
        assert!(check_relative_path("../etc/passwd").is_err());
        assert!(check_relative_path("/etc/passwd").is_err());
        assert!(check_relative_path("a/./b").is_err());
        assert!(check_relative_path("server.properties").is_ok());
    }
}
