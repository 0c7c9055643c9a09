//! All servers on this node: creation (with every check done before anything is made),
//! lookup, deletion and recovery after a wings restart.

use std::collections::{BTreeMap, HashMap};
use std::io::ErrorKind;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::sync::{Arc, RwLock};

use mamba_shared::blueprint::{FieldError, Protocol};
use mamba_shared::ids::ServerId;
use mamba_shared::wings_api::{Allocation, CreateServerRequest, Limits};

use super::spec::ServerSpec;
use super::{Context, Job, Server, new_record, store};
use crate::backups::service::Backups;
use crate::config::Config;
use crate::docker::{ContainerKind, DockerClient};

#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    #[error("the request is invalid")]
    Invalid(Vec<FieldError>),
    #[error("a server with id {0} already exists")]
    Duplicate(ServerId),
    #[error("{field}: {message}")]
    PortInUse { field: String, message: String },
    #[error("{field}: image {image} is not present on this node")]
    ImageMissing { field: String, image: String },
    #[error("docker: {0}")]
    Docker(String),
    #[error("{0}")]
    Internal(String),
    #[error("no such server")]
    UnknownServer,
}

#[derive(Debug)]
pub struct Manager {
    ctx: Arc<Context>,
    servers: RwLock<HashMap<ServerId, Arc<Server>>>,
    /// Serialises the last checks and the insert of a create, so two creates cannot take the
    /// same id or port.
    create_lock: tokio::sync::Mutex<()>,
    backups: Arc<Backups>,
}

fn field(field: impl Into<String>, message: impl Into<String>) -> FieldError {
    FieldError {
        field: field.into(),
        message: message.into(),
    }
}

impl Manager {
    /// Connects to Docker, prepares the data folders and network, loads every server and
    /// reattaches to the ones still running.
    pub async fn start(config: Config) -> anyhow::Result<Arc<Manager>> {
        let docker = DockerClient::connect(&config.docker).await?;
        docker
            .ensure_network(&config.docker.network, config.docker.inter_container_traffic)
            .await?;
        let ctx = Arc::new(Context {
            config,
            docker,
            reports: tokio::sync::broadcast::channel(1024).0,
            // Roomier than events: an SFTP client creating many files makes one entry each.
            activity: tokio::sync::broadcast::channel(4096).0,
        });
        for dir in [ctx.servers_dir(), ctx.volumes_dir()] {
            std::fs::create_dir_all(&dir)?;
        }
        // Sweeps backups a previous run left unfinished before anything new starts.
        let backups = Backups::open(&ctx.config.backups, &ctx.config.system.data_dir).await?;
        let manager = Arc::new(Manager {
            ctx: ctx.clone(),
            servers: RwLock::new(HashMap::new()),
            create_lock: tokio::sync::Mutex::new(()),
            backups,
        });
        manager.recover().await?;
        Ok(manager)
    }

    async fn recover(&self) -> anyhow::Result<()> {
        let data_dir = self.ctx.config.system.data_dir.display().to_string();
        let containers = self.ctx.docker.list_managed(&data_dir).await?;
        let mut records = Vec::new();
        // Every server folder counts as known, even one whose state cannot be read, so its
        // container is never mistaken for an orphan and removed.
        let mut known = std::collections::HashSet::new();
        for entry in std::fs::read_dir(self.ctx.servers_dir())? {
            let dir = entry?.path();
            if let Some(name) = dir.file_name() {
                known.insert(name.to_string_lossy().to_string());
            }
            match store::load(&dir) {
                Ok(record) => records.push(record),
                Err(e) if e.kind() == ErrorKind::NotFound => {
                    tracing::warn!(path = %dir.display(), "a server folder without server.json; leaving it alone");
                }
                Err(e) => tracing::error!(path = %dir.display(), "cannot read the server's state: {e}"),
            }
        }
        for container in &containers {
            let leftover_install = container.kind == Some(ContainerKind::Install);
            let orphan = !known.contains(&container.server);
            if leftover_install || orphan {
                tracing::info!(container.id = %container.id, server.id = %container.server, "removing a leftover container");
                self.ctx.docker.remove(&container.id).await?;
            }
        }
        let mut servers = self.write_servers();
        for record in records {
            let id = record.spec.id.clone();
            match Server::spawn(self.ctx.clone(), record) {
                Ok(server) => {
                    server.enqueue(Job::Recover);
                    servers.insert(id, server);
                }
                Err(e) => tracing::error!(server.id = %id, "cannot load the server: {e}"),
            }
        }
        tracing::info!(servers = servers.len(), "servers loaded");
        Ok(())
    }

    fn read_servers(&self) -> std::sync::RwLockReadGuard<'_, HashMap<ServerId, Arc<Server>>> {
        self.servers.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_servers(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<ServerId, Arc<Server>>> {
        self.servers.write().unwrap_or_else(|p| p.into_inner())
    }

    pub fn context(&self) -> &Arc<Context> {
        &self.ctx
    }

    pub fn backups(&self) -> &Arc<Backups> {
        &self.backups
    }

    pub fn get(&self, id: &ServerId) -> Option<Arc<Server>> {
        self.read_servers().get(id).cloned()
    }

    pub fn list(&self) -> Vec<Arc<Server>> {
        let mut list: Vec<_> = self.read_servers().values().cloned().collect();
        list.sort_by(|a, b| a.id.cmp(&b.id));
        list
    }

    pub fn count(&self) -> usize {
        self.read_servers().len()
    }

    /// Creates a server and queues its install. Every check runs before anything is made.
    pub async fn create(&self, request: CreateServerRequest) -> Result<Arc<Server>, CreateError> {
        let spec = resolve(&request)?;
        if self.get(&spec.id).is_some() {
            return Err(CreateError::Duplicate(spec.id));
        }
        self.check_images(&spec).await?;

        let _creating = self.create_lock.lock().await;
        if self.get(&spec.id).is_some() {
            return Err(CreateError::Duplicate(spec.id));
        }
        self.check_ports(&spec)?;

        let state_dir = self.ctx.servers_dir().join(spec.id.as_str());
        let root_dir = self.ctx.volumes_dir().join(spec.id.as_str());
        let record = new_record(spec, request.start_on_completion);
        let (uid, gid) = (
            self.ctx.config.system.container_uid,
            self.ctx.config.system.container_gid,
        );
        let prepared = {
            let record = record.clone();
            tokio::task::spawn_blocking(move || prepare_dirs(&state_dir, &root_dir, uid, gid, &record))
                .await
                .map_err(|e| CreateError::Internal(e.to_string()))?
        };
        prepared.map_err(|e| CreateError::Internal(format!("cannot create the server's folders: {e}")))?;
        let server = Server::spawn(self.ctx.clone(), record).map_err(CreateError::Internal)?;
        self.write_servers().insert(server.id.clone(), server.clone());
        if request.skip_install {
            server.with_record(|r| {
                r.install.status = mamba_shared::wings_api::InstallStatus::Installed;
            });
            server.persist();
            if request.start_on_completion {
                let _ = server.power(mamba_shared::wings_api::PowerAction::Start);
            }
        } else {
            server.enqueue(Job::Install { reinstall: false });
        }
        tracing::info!(server.id = %server.id, "server created");
        Ok(server)
    }

    /// Replaces an existing server's spec with the one in `request` (the same body as a
    /// create, for the same id): blueprint, variables, limits and image. Its allocations
    /// cannot change in place. Answers the server and whether it must restart for all of the
    /// change to apply (see [`Server::replace_spec`]).
    pub async fn update(
        &self,
        id: &ServerId,
        request: CreateServerRequest,
    ) -> Result<(Arc<Server>, bool), CreateError> {
        let server = self.get(id).ok_or(CreateError::UnknownServer)?;
        if request.id != *id {
            return Err(CreateError::Invalid(vec![field(
                "id",
                format!("must be the server in the path, {id}"),
            )]));
        }
        let spec = resolve(&request)?;
        if spec.allocations != server.spec().allocations {
            return Err(CreateError::Invalid(vec![field(
                "allocations",
                "cannot change in place; they must equal the server's current allocations",
            )]));
        }
        self.check_images(&spec).await?;
        let restart_required = server.replace_spec(spec);
        tracing::info!(server.id = %server.id, restart_required, "server spec updated");
        Ok((server, restart_required))
    }

    /// Refuses a spec whose game or install image is not on this node.
    async fn check_images(&self, spec: &ServerSpec) -> Result<(), CreateError> {
        let mut images = vec![("image".to_string(), spec.image.clone())];
        if let Some(install) = &spec.blueprint.install {
            images.push(("blueprint.install.image".into(), install.image.clone()));
        }
        for (field, image) in images {
            let present = self
                .ctx
                .docker
                .image_exists(&image)
                .await
                .map_err(|e| CreateError::Docker(e.to_string()))?;
            if !present {
                return Err(CreateError::ImageMissing { field, image });
            }
        }
        Ok(())
    }

    /// Refuses ports another server on this node holds, and ports something else has bound.
    fn check_ports(&self, spec: &ServerSpec) -> Result<(), CreateError> {
        let overlaps = |a: &Allocation, b: &Allocation| {
            a.port == b.port && (a.ip == b.ip || a.ip.is_unspecified() || b.ip.is_unspecified())
        };
        let servers = self.read_servers();
        for (i, (allocation, protocols)) in spec.bindings().iter().enumerate() {
            let name = allocation_field(i);
            for other in servers.values() {
                let other_spec = other.spec();
                if other_spec.allocations.all().any(|b| overlaps(allocation, b)) {
                    return Err(CreateError::PortInUse {
                        field: name,
                        message: format!(
                            "{}:{} is allocated to server {}",
                            allocation.ip, allocation.port, other.id
                        ),
                    });
                }
            }
            for protocol in protocols {
                let addr = SocketAddr::new(allocation.ip, allocation.port);
                let bound = match protocol {
                    Protocol::Tcp => TcpListener::bind(addr).map(drop),
                    Protocol::Udp => UdpSocket::bind(addr).map(drop),
                };
                match bound {
                    Ok(()) => {}
                    Err(e) if e.kind() == ErrorKind::AddrInUse => {
                        return Err(CreateError::PortInUse {
                            field: name,
                            message: format!("{addr}/{protocol} is already bound on this node"),
                        });
                    }
                    Err(e) if e.kind() == ErrorKind::AddrNotAvailable => {
                        return Err(CreateError::Invalid(vec![field(
                            format!("{name}.ip"),
                            format!("{} is not an address of this node", allocation.ip),
                        )]));
                    }
                    Err(e) => {
                        return Err(CreateError::Internal(format!(
                            "cannot check {addr}/{protocol}: {e}"
                        )));
                    }
                }
            }
        }
        Ok(())
    }

    pub async fn delete(&self, id: &ServerId) -> Option<Result<(), String>> {
        let server = self.write_servers().remove(id)?;
        let result = server.delete().await;
        match &result {
            Ok(()) => {
                tracing::info!(server.id = %id, "server deleted");
                // Its backups go with it (running ones are cancelled and their uploads aborted).
                self.backups.delete_all(id).await;
            }
            // Still known, so the delete can be retried and nothing is left behind unseen.
            Err(e) => {
                tracing::error!(server.id = %id, "delete failed: {e}");
                self.write_servers().insert(id.clone(), server);
            }
        }
        Some(result)
    }
}

fn allocation_field(i: usize) -> String {
    if i == 0 {
        "allocations.default".into()
    } else {
        format!("allocations.additional[{}]", i - 1)
    }
}

fn prepare_dirs(
    state_dir: &std::path::Path,
    root_dir: &std::path::Path,
    uid: u32,
    gid: u32,
    record: &store::ServerRecord,
) -> std::io::Result<()> {
    use std::os::unix::fs::{PermissionsExt, chown};
    std::fs::create_dir_all(state_dir)?;
    std::fs::set_permissions(state_dir, std::fs::Permissions::from_mode(0o700))?;
    std::fs::create_dir_all(root_dir)?;
    chown(root_dir, Some(uid), Some(gid))?;
    std::fs::set_permissions(root_dir, std::fs::Permissions::from_mode(0o750))?;
    store::save(state_dir, record)
}

/// Checks a create request and turns it into a complete spec: blueprint, image, variables
/// (defaults filled in), limits and allocations. Every problem is reported, by field.
pub fn resolve(request: &CreateServerRequest) -> Result<ServerSpec, CreateError> {
    let mut errors = Vec::new();
    let blueprint = &request.blueprint;
    if let Err(blueprint_errors) = blueprint.validate() {
        errors.extend(
            blueprint_errors
                .into_iter()
                .map(|e| field(format!("blueprint.{}", e.field), e.message)),
        );
        return Err(CreateError::Invalid(errors));
    }

    let image = match &request.image {
        Some(image) if blueprint.images.iter().any(|i| &i.image == image) => image.clone(),
        Some(image) => {
            errors.push(field(
                "image",
                format!("{image} is not one of the blueprint's images"),
            ));
            String::new()
        }
        None => blueprint.default_image().unwrap_or_default().to_string(),
    };

    for name in request.variables.keys() {
        if blueprint.variable(name).is_none() {
            errors.push(field(
                format!("variables.{name}"),
                "is not a variable of this blueprint",
            ));
        }
    }
    let mut variables = BTreeMap::new();
    for variable in &blueprint.variables {
        let value = request.variables.get(&variable.env).unwrap_or(&variable.default);
        if let Err(message) = variable.rules.check(value) {
            errors.push(field(format!("variables.{}", variable.env), message));
        }
        variables.insert(variable.env.clone(), value.clone());
    }

    let defaults = blueprint.limits;
    let limits = request.limits.unwrap_or(Limits {
        memory_mb: defaults.memory_mb,
        cpu_percent: defaults.cpu_percent,
        disk_mb: defaults.disk_mb,
        pids: defaults.pids,
        io_weight: 500,
    });
    if !(16..=1024 * 1024).contains(&limits.memory_mb) {
        errors.push(field("limits.memory_mb", "must be between 16 and 1048576"));
    }
    if !(1..=100 * 1024).contains(&limits.cpu_percent) {
        errors.push(field("limits.cpu_percent", "must be between 1 and 102400"));
    }
    if limits.disk_mb == 0 {
        errors.push(field("limits.disk_mb", "must be at least 1"));
    }
    if !(16..=4_194_304).contains(&limits.pids) {
        errors.push(field("limits.pids", "must be between 16 and 4194304"));
    }
    if !(10..=1000).contains(&limits.io_weight) {
        errors.push(field("limits.io_weight", "must be between 10 and 1000"));
    }

    let allocations: Vec<&Allocation> = request.allocations.all().collect();
    for (i, a) in allocations.iter().enumerate() {
        if a.port == 0 {
            errors.push(field(
                format!("{}.port", allocation_field(i)),
                "must be between 1 and 65535",
            ));
        }
        if a.ip.is_multicast() {
            errors.push(field(
                format!("{}.ip", allocation_field(i)),
                "must not be a multicast address",
            ));
        }
        if allocations[..i]
            .iter()
            .any(|b| b.port == a.port && (b.ip == a.ip || b.ip.is_unspecified() || a.ip.is_unspecified()))
        {
            errors.push(field(allocation_field(i), "is given twice"));
        }
    }
    if allocations.len() < blueprint.ports.len() {
        errors.push(field(
            "allocations.additional",
            format!(
                "the blueprint declares {} ports, so {} additional allocations are needed",
                blueprint.ports.len(),
                blueprint.ports.len() - 1
            ),
        ));
    }

    if !errors.is_empty() {
        return Err(CreateError::Invalid(errors));
    }
    let spec = ServerSpec {
        id: request.id.clone(),
        blueprint: blueprint.clone(),
        variables,
        limits,
        allocations: request.allocations.clone(),
        image,
    };
    if let Err(e) = spec.blueprint.startup_args(&spec.values("UTC")) {
        return Err(CreateError::Invalid(vec![field("blueprint.startup", e)]));
    }
    Ok(spec)
}
