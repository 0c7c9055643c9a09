//! A server's specification as wings stores it, and how it becomes Docker containers.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use bollard::models::{ContainerCreateBody, HostConfig, HostConfigLogConfig, PortBinding};
use mamba_shared::blueprint::{Blueprint, Protocol};
use mamba_shared::ids::ServerId;
use mamba_shared::wings_api::{Allocation, Allocations, Limits};
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::docker::{ContainerKind, LABEL_DATA_DIR, LABEL_KIND, LABEL_MANAGED, LABEL_SERVER};

/// Everything needed to (re)create a server's containers. Variables are complete: defaults
/// are filled in when the server is created.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServerSpec {
    pub id: ServerId,
    pub blueprint: Blueprint,
    pub variables: BTreeMap<String, String>,
    pub limits: Limits,
    pub allocations: Allocations,
    pub image: String,
}

/// Capabilities kept in game and install containers; everything else is dropped.
/// None are needed to run a game as an unprivileged user on ports above 1023.
pub const KEPT_CAPABILITIES: &[&str] = &[];

impl ServerSpec {
    pub fn container_name(&self) -> String {
        format!("mamba-{}", self.id)
    }

    pub fn install_container_name(&self) -> String {
        format!("mamba-install-{}", self.id)
    }

    /// Each allocation with the protocols it is bound for: the blueprint's ports in order
    /// (first = default allocation), and any extra allocation on both TCP and UDP.
    pub fn bindings(&self) -> Vec<(Allocation, Vec<Protocol>)> {
        self.allocations
            .all()
            .enumerate()
            .map(|(i, a)| {
                let protocols = self
                    .blueprint
                    .ports
                    .get(i)
                    .map_or_else(|| vec![Protocol::Tcp, Protocol::Udp], |p| p.protocols.clone());
                (*a, protocols)
            })
            .collect()
    }

    /// Values for templates and the container environment: the variables plus what wings sets.
    pub fn values(&self, timezone: &str) -> BTreeMap<String, String> {
        let mut values = self.variables.clone();
        let default = self.allocations.default;
        values.insert("SERVER_ID".into(), self.id.to_string());
        values.insert("SERVER_IP".into(), default.ip.to_string());
        values.insert("SERVER_PORT".into(), default.port.to_string());
        values.insert("SERVER_MEMORY".into(), self.limits.memory_mb.to_string());
        values.insert("TZ".into(), timezone.to_string());
        values.insert("HOME".into(), "/home/container".into());
        values.insert("USER".into(), "container".into());
        for (port, allocation) in self.blueprint.ports.iter().zip(self.allocations.all()) {
            values.insert(
                format!("PORT_{}", port.name.to_ascii_uppercase()),
                allocation.port.to_string(),
            );
        }
        values
    }

    fn env(&self, config: &Config) -> Vec<String> {
        let mut values = self.values(&config.system.timezone);
        values.insert("STARTUP".into(), self.blueprint.startup.clone());
        values.insert(
            "PATH".into(),
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:/usr/games".into(),
        );
        values.into_iter().map(|(k, v)| format!("{k}={v}")).collect()
    }

    fn labels(&self, config: &Config, kind: ContainerKind) -> HashMap<String, String> {
        HashMap::from([
            (LABEL_MANAGED.to_string(), "true".to_string()),
            (
                LABEL_DATA_DIR.to_string(),
                config.system.data_dir.display().to_string(),
            ),
            (LABEL_SERVER.to_string(), self.id.to_string()),
            (LABEL_KIND.to_string(), kind.label().to_string()),
        ])
    }

    /// The hardening and limits every container of this server gets, game or install.
    fn host_config(&self, config: &Config, binds: Vec<String>) -> HostConfig {
        let memory = i64::try_from(self.limits.memory_mb.saturating_mul(1024 * 1024)).unwrap_or(i64::MAX);
        HostConfig {
            memory: Some(memory),
            // Equal to memory: no swap, so the memory limit is real and OOM is visible.
            memory_swap: Some(memory),
            cpu_period: Some(100_000),
            cpu_quota: Some(i64::from(self.limits.cpu_percent) * 1000),
            pids_limit: Some(i64::from(self.limits.pids)),
            blkio_weight: Some(self.limits.io_weight.clamp(10, 1000)),
            oom_kill_disable: Some(false),
            privileged: Some(false),
            readonly_rootfs: Some(true),
            security_opt: Some(vec!["no-new-privileges:true".into()]),
            cap_drop: Some(vec!["ALL".into()]),
            cap_add: Some(KEPT_CAPABILITIES.iter().map(|c| c.to_string()).collect()),
            tmpfs: Some(HashMap::from([(
                "/tmp".to_string(),
                format!("rw,exec,nosuid,nodev,size={}m", config.docker.tmpfs_mb),
            )])),
            log_config: Some(HostConfigLogConfig {
                typ: Some("json-file".into()),
                config: Some(HashMap::from([
                    ("max-size".to_string(), format!("{}m", config.docker.log_max_mb)),
                    ("max-file".to_string(), "1".to_string()),
                ])),
            }),
            network_mode: Some(config.docker.network.clone()),
            binds: Some(binds),
            ..Default::default()
        }
    }

    fn user(config: &Config) -> String {
        format!("{}:{}", config.system.container_uid, config.system.container_gid)
    }

    /// The game container. Ports are published on the allocated IP and port only.
    pub fn server_container(&self, config: &Config, root: &Path) -> Result<ContainerCreateBody, String> {
        let values = self.values(&config.system.timezone);
        let cmd = self.blueprint.startup_args(&values)?;
        let mut exposed = Vec::new();
        let mut port_bindings = HashMap::new();
        for (allocation, protocols) in self.bindings() {
            for protocol in protocols {
                let key = format!("{}/{protocol}", allocation.port);
                exposed.push(key.clone());
                port_bindings.insert(
                    key,
                    Some(vec![PortBinding {
                        host_ip: Some(allocation.ip.to_string()),
                        host_port: Some(allocation.port.to_string()),
                    }]),
                );
            }
        }
        let mut host_config = self.host_config(config, vec![format!("{}:/home/container", root.display())]);
        host_config.port_bindings = Some(port_bindings);
        Ok(ContainerCreateBody {
            image: Some(self.image.clone()),
            cmd: Some(cmd),
            entrypoint: Some(vec![]),
            env: Some(self.env(config)),
            user: Some(Self::user(config)),
            working_dir: Some("/home/container".into()),
            hostname: Some(self.id.short().to_string()),
            labels: Some(self.labels(config, ContainerKind::Server)),
            exposed_ports: Some(exposed),
            open_stdin: Some(true),
            stdin_once: Some(false),
            attach_stdin: Some(true),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            tty: Some(false),
            host_config: Some(host_config),
            ..Default::default()
        })
    }

    /// The install container: the install image, the script mounted read-only, the server
    /// root at `/mnt/server`. Same user, hardening and limits as the game; never privileged.
    pub fn install_container(
        &self,
        config: &Config,
        root: &Path,
        script_dir: &Path,
    ) -> Option<ContainerCreateBody> {
        let install = self.blueprint.install.as_ref()?;
        let binds = vec![
            format!("{}:/mnt/server", root.display()),
            format!("{}:/mnt/install:ro", script_dir.display()),
        ];
        let mut env = self.env(config);
        env.retain(|e| !e.starts_with("HOME="));
        env.push("HOME=/mnt/server".into());
        Some(ContainerCreateBody {
            image: Some(install.image.clone()),
            cmd: Some(vec![install.shell.clone(), "/mnt/install/install.sh".into()]),
            entrypoint: Some(vec![]),
            env: Some(env),
            user: Some(Self::user(config)),
            working_dir: Some("/mnt/server".into()),
            labels: Some(self.labels(config, ContainerKind::Install)),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            tty: Some(false),
            host_config: Some(self.host_config(config, binds)),
            ..Default::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ServerSpec {
        let blueprint: Blueprint =
            serde_norway::from_str(include_str!("../../../blueprints/minetest.yaml")).unwrap();
        let variables = blueprint
            .variables
            .iter()
            .map(|v| (v.env.clone(), v.default.clone()))
            .collect();
        ServerSpec {
            id: ServerId::new("abc12345-xyz").unwrap(),
            image: blueprint.default_image().unwrap().into(),
            blueprint,
            variables,
            limits: Limits {
                memory_mb: 256,
                cpu_percent: 150,
                disk_mb: 100,
                pids: 64,
                io_weight: 500,
            },
            allocations: Allocations {
                default: Allocation {
                    ip: "127.0.0.1".parse().unwrap(),
                    port: 30000,
                },
                additional: vec![Allocation {
                    ip: "127.0.0.1".parse().unwrap(),
                    port: 30001,
                }],
            },
        }
    }

    #[test]
    fn containers_are_hardened_and_limited() {
        let config = Config::default();
        let spec = spec();
        for body in [
            spec.server_container(&config, Path::new("/srv/x")).unwrap(),
            spec.install_container(&config, Path::new("/srv/x"), Path::new("/srv/i"))
                .unwrap(),
        ] {
            let host = body.host_config.unwrap();
            assert_eq!(body.user.as_deref(), Some("988:988"));
            assert_eq!(host.privileged, Some(false));
            assert_eq!(host.cap_drop, Some(vec!["ALL".to_string()]));
            assert_eq!(
                host.security_opt,
                Some(vec!["no-new-privileges:true".to_string()])
            );
            assert_eq!(host.memory, Some(256 * 1024 * 1024));
            assert_eq!(host.memory_swap, host.memory);
            assert_eq!(host.cpu_quota, Some(150_000));
            assert_eq!(host.pids_limit, Some(64));
            assert!(host.tmpfs.unwrap()["/tmp"].contains("size=100m"));
            assert_eq!(host.readonly_rootfs, Some(true));
            assert_eq!(host.network_mode.as_deref(), Some("mamba0"));
        }
    }

    #[test]
    fn ports_bind_on_the_allocation_with_the_blueprint_protocols() {
        let spec = spec();
        let body = spec
            .server_container(&Config::default(), Path::new("/srv/x"))
            .unwrap();
        let bindings = body.host_config.unwrap().port_bindings.unwrap();
        let game = bindings["30000/udp"].as_ref().unwrap();
        assert_eq!(game[0].host_ip.as_deref(), Some("127.0.0.1"));
        assert_eq!(game[0].host_port.as_deref(), Some("30000"));
        assert!(
            !bindings.contains_key("30000/tcp"),
            "minetest's game port is UDP only"
        );
        assert!(bindings.contains_key("30001/tcp") && bindings.contains_key("30001/udp"));
        let cmd = body.cmd.unwrap();
        assert_eq!(cmd[0], "/usr/games/minetestserver");
        assert!(cmd.windows(2).any(|w| w[0] == "--port" && w[1] == "30000"));
        assert!(body.env.unwrap().contains(&"SERVER_PORT=30000".to_string()));
    }
}
