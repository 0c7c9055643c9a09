//! Node facts for `GET /api/system`: host, CPU, memory and disk from sysinfo and statvfs.

use std::path::Path;
use std::sync::Mutex;

use mamba_shared::wings_api::{DockerInfo, SystemInfo};
use sysinfo::{CpuRefreshKind, MemoryRefreshKind, RefreshKind, System};

/// Holds one sysinfo `System`, refreshed on each request, so CPU usage is measured between
/// two requests without a sampler running in the background.
pub struct SystemProbe {
    system: Mutex<Option<System>>,
}

impl Default for SystemProbe {
    fn default() -> Self {
        let kind = RefreshKind::nothing()
            .with_cpu(CpuRefreshKind::nothing().with_usage())
            .with_memory(MemoryRefreshKind::nothing().with_ram());
        let system = System::new_with_specifics(kind)
            .inspect_err(|e| tracing::warn!("system statistics are unavailable: {e}"))
            .ok();
        SystemProbe {
            system: Mutex::new(system),
        }
    }
}

impl SystemProbe {
    pub fn snapshot(&self, data_dir: &Path, docker: DockerInfo, servers: usize) -> SystemInfo {
        let mut guard = self.system.lock().unwrap_or_else(|p| p.into_inner());
        let (cpu_count, cpu_usage_percent, memory_total_bytes, memory_used_bytes) = match guard.as_mut() {
            Some(system) => {
                system.refresh_cpu_usage();
                system.refresh_memory();
                (
                    system.cpus().len(),
                    system.global_cpu_usage(),
                    system.total_memory(),
                    system.used_memory(),
                )
            }
            None => (0, 0.0, 0, 0),
        };
        drop(guard);
        let (disk_total_bytes, disk_available_bytes) = rustix::fs::statvfs(data_dir)
            .map(|s| (s.f_blocks * s.f_frsize, s.f_bavail * s.f_frsize))
            .unwrap_or((0, 0));
        SystemInfo {
            version: env!("CARGO_PKG_VERSION").to_string(),
            hostname: System::host_name().unwrap_or_default(),
            kernel: System::kernel_version().unwrap_or_default(),
            os: System::long_os_version().unwrap_or_default(),
            architecture: std::env::consts::ARCH.to_string(),
            cpu_count,
            cpu_usage_percent,
            memory_total_bytes,
            memory_used_bytes,
            disk_total_bytes,
            disk_available_bytes,
            docker,
            servers,
        }
    }
}
