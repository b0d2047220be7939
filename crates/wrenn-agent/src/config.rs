//! The agent's configuration: typed, validated once at start.

use std::path::PathBuf;
use std::time::Duration;

use crate::network::NetworkConfig;
use crate::template::RuntimeChoice;

#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Templates, capsules and their records live here.
    pub data_dir: PathBuf,
    /// Prefix of the names this agent gives host objects (netns, veth, nft
    /// table, cgroup parent, runtime state); lets test agents coexist.
    pub instance: String,
    /// The static envd binary bind-mounted into every capsule.
    pub envd_bin: PathBuf,
    /// The static busybox the `busybox` template is built from.
    pub busybox_bin: PathBuf,
    /// Default OCI runtime (templates may name another).
    pub runtime: RuntimeChoice,
    /// Root of the runtimes' state directories.
    pub state_root: PathBuf,
    pub network: NetworkConfig,
    /// How often expired capsules are looked for.
    pub reaper_interval: Duration,
    /// How often each running capsule's usage is sampled.
    pub sample_interval: Duration,
    /// How often the capsules' metrics histories are written to their
    /// directories (and when the agent stops), so that a restarted agent
    /// still has them: a killed one loses at most this much.
    pub metrics_save_interval: Duration,
    /// How long a new capsule's envd has to answer.
    pub envd_ready_timeout: Duration,
    /// How long a template's ready command may keep failing after boot.
    pub ready_timeout: Duration,
    /// Process limit per capsule unless the request says otherwise.
    pub default_pids: i64,
    /// Pre-created capsules kept ready per template.
    pub warm_pools: Vec<WarmPool>,
    /// Network slots (netns, veth, shaping) kept set up ahead of creates.
    pub net_pool: usize,
    pub vm: VmConfig,
}

/// The microVM engine's settings.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// An unpacked kernel package (`boot/vmlinuz-*`, `lib/modules/*`).
    /// When it holds none, Debian's cloud kernel is downloaded into it on
    /// the first VM capsule. Or a kernel image file, with `modules`.
    pub kernel_dir: PathBuf,
    /// With a kernel image file: its modules (`lib/modules/<release>`);
    /// `None`: what the guest needs is built into the kernel.
    pub modules: Option<PathBuf>,
    /// The QEMU binary (`qemu-system-x86_64`).
    pub qemu: String,
    /// Size of a VM capsule's disk (at least its template plus room).
    pub disk_mb: u64,
    /// How long a new VM has to boot and answer (TCG is slow).
    pub boot_timeout: Duration,
    /// Run VMs on Firecracker instead of QEMU (hosts with KVM).
    pub firecracker: Option<FirecrackerConfig>,
}

/// Where Firecracker and the uncompressed kernel it boots are.
#[derive(Debug, Clone)]
pub struct FirecrackerConfig {
    pub binary: String,
    /// An uncompressed `vmlinux` (Firecracker boots no bzImage).
    pub vmlinux: PathBuf,
}

/// A warm pool: `size` capsules of `template` with this shape, booted in
/// advance; a create request with the same template and shape takes one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WarmPool {
    pub template: wrenn_types::ids::TemplateName,
    /// The engine of the pool's capsules (`None`: the template's).
    pub engine: Option<crate::template::Engine>,
    pub size: usize,
    pub vcpus: u32,
    pub memory_mb: u64,
}

impl std::str::FromStr for WarmPool {
    type Err = String;

    /// `TEMPLATE[:ENGINE]=SIZE` (1 vCPU, 512 MiB, as requests default to).
    fn from_str(s: &str) -> Result<Self, String> {
        let (t, n) = s
            .split_once('=')
            .ok_or_else(|| format!("{s:?}: expected TEMPLATE[:ENGINE]=SIZE"))?;
        let (t, engine) = match t.split_once(':') {
            Some((t, e)) => (t, Some(e.parse()?)),
            None => (t, None),
        };
        Ok(WarmPool {
            template: t
                .parse()
                .map_err(|e: wrenn_types::ids::InvalidId| e.to_string())?,
            engine,
            size: n.parse().map_err(|_| format!("{n:?} is not a pool size"))?,
            vcpus: 1,
            memory_mb: 512,
        })
    }
}

#[derive(Debug, thiserror::Error)]
#[error("invalid agent configuration: {0}")]
pub struct ConfigError(pub String);

impl AgentConfig {
    /// Defaults for everything but the paths.
    pub fn new(data_dir: PathBuf, envd_bin: PathBuf) -> Self {
        let instance = "wrenn".to_owned();
        AgentConfig {
            envd_bin,
            busybox_bin: PathBuf::from("/bin/busybox"),
            runtime: RuntimeChoice {
                binary: "runc".into(),
                args: Vec::new(),
            },
            state_root: PathBuf::from("/run").join(&instance),
            network: NetworkConfig {
                instance: instance.clone(),
                pool: "10.88.0.0/16".parse().expect("valid"),
                egress_rate: 200_000_000,
                egress_burst: 100_000_000,
                nameservers: crate::network::host_nameservers(),
            },
            instance,
            reaper_interval: Duration::from_secs(1),
            sample_interval: Duration::from_millis(500),
            metrics_save_interval: Duration::from_secs(30),
            envd_ready_timeout: Duration::from_secs(10),
            ready_timeout: Duration::from_secs(120),
            default_pids: 4096,
            warm_pools: Vec::new(),
            net_pool: 0,
            vm: VmConfig {
                kernel_dir: data_dir.join("vm/kernel"),
                modules: None,
                qemu: "qemu-system-x86_64".into(),
                disk_mb: 2048,
                boot_timeout: Duration::from_secs(120),
                firecracker: None,
            },
            data_dir,
        }
    }

    /// Rename every host object this agent makes.
    pub fn with_instance(mut self, instance: &str) -> Self {
        self.instance = instance.to_owned();
        self.network.instance = instance.to_owned();
        self.state_root = PathBuf::from("/run").join(instance);
        self
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let i = &self.instance;
        if i.is_empty()
            || i.len() > 8
            || !i
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        {
            return Err(ConfigError(format!(
                "instance {i:?} must be 1-8 characters of [a-z0-9]"
            )));
        }
        if self.network.pool.prefix_len() > 29 {
            return Err(ConfigError(format!(
                "pool {} is too small: each capsule needs a /30",
                self.network.pool
            )));
        }
        if !self.envd_bin.is_file() {
            return Err(ConfigError(format!(
                "envd binary {} does not exist",
                self.envd_bin.display()
            )));
        }
        if self.network.egress_rate == 0 || self.network.egress_burst == 0 {
            return Err(ConfigError("egress rate and burst must be positive".into()));
        }
        Ok(())
    }
}
