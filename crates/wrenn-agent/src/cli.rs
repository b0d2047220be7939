//! The agent's command-line flags, shared by `wrenn-agent` and `wrenn up`
//! (which runs an agent in-process): one definition, one set of names and
//! environment variables.

use std::path::PathBuf;
use std::time::Duration;

use crate::config::{AgentConfig, WarmPool};
use crate::template::RuntimeChoice;

#[derive(Debug, Clone, clap::Args)]
pub struct AgentArgs {
    /// Templates, capsules and their records (`wrenn up`: also the database and keys).
    #[arg(long, env = "WRENN_DATA_DIR", default_value = "/var/lib/wrenn")]
    pub data_dir: PathBuf,
    /// The static envd binary bind-mounted into capsules.
    #[arg(
        long,
        env = "WRENN_ENVD_BIN",
        default_value = "/usr/local/lib/wrenn/envd"
    )]
    pub envd: PathBuf,
    /// OCI runtime binary (runc, crun, runsc, youki…).
    #[arg(long, env = "WRENN_RUNTIME", default_value = "runc")]
    pub runtime: String,
    /// Extra global flag for the runtime (repeatable), e.g. `--platform=ptrace` for runsc.
    #[arg(long = "runtime-arg", allow_hyphen_values = true)]
    pub runtime_args: Vec<String>,
    /// Prefix of host object names (netns, veth, nft table, cgroups); 1-8 of [a-z0-9].
    #[arg(long, env = "WRENN_INSTANCE", default_value = "wrenn")]
    pub instance: String,
    /// Capsule address pool; each capsule takes a /30.
    #[arg(long, env = "WRENN_POOL", default_value = "10.88.0.0/16")]
    pub pool: ipnet::Ipv4Net,
    /// Static busybox the `busybox` template is built from.
    #[arg(long, default_value = "/bin/busybox")]
    pub busybox: PathBuf,
    /// Keep SIZE capsules of TEMPLATE booted in advance (repeatable), e.g.
    /// `busybox=4`; `busybox:vm=2` for VM capsules of a template whose
    /// default engine is another.
    #[arg(long = "warm", value_name = "TEMPLATE[:ENGINE]=SIZE")]
    pub warm: Vec<WarmPool>,
    /// Network slots kept set up ahead of creates.
    #[arg(long, default_value_t = 4)]
    pub net_pool: usize,
    /// An unpacked guest kernel package for VM capsules (`boot/vmlinuz-*`,
    /// `lib/modules/*`) [default: <data-dir>/vm/kernel, where Debian's
    /// cloud kernel is downloaded on the first VM capsule], or any kernel
    /// image QEMU boots (`bzImage`, `vmlinuz`, a PVH `vmlinux`).
    #[arg(long, env = "WRENN_VM_KERNEL")]
    pub vm_kernel: Option<PathBuf>,
    /// The modules of a `--vm-kernel` image (`lib/modules/<release>`, with
    /// `modules.dep`); without it, virtio-mmio, virtio-blk, virtio-net and
    /// ext4 must be built into the kernel.
    #[arg(long, env = "WRENN_VM_MODULES")]
    pub vm_modules: Option<PathBuf>,
    /// The QEMU binary VM capsules run in.
    #[arg(long, env = "WRENN_QEMU", default_value = "qemu-system-x86_64")]
    pub qemu: String,
    /// Run VM capsules on Firecracker (needs KVM) instead of QEMU; takes
    /// `--firecracker-kernel`.
    #[arg(long, env = "WRENN_FIRECRACKER", requires = "firecracker_kernel")]
    pub firecracker: Option<String>,
    /// The uncompressed guest kernel (`vmlinux`) Firecracker boots.
    #[arg(long, env = "WRENN_FIRECRACKER_KERNEL")]
    pub firecracker_kernel: Option<PathBuf>,
    /// How often expired capsules are looked for.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub reaper_interval: Duration,
    /// How often the capsules' metrics histories are written to disk (and
    /// when the agent stops): what a killed agent loses at most.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub metrics_save_interval: Duration,
}

impl AgentArgs {
    /// The agent configuration these flags describe.
    pub fn config(&self) -> AgentConfig {
        let mut cfg = AgentConfig::new(self.data_dir.clone(), self.envd.clone())
            .with_instance(&self.instance);
        cfg.runtime = RuntimeChoice {
            binary: self.runtime.clone(),
            args: self.runtime_args.clone(),
        };
        cfg.network.pool = self.pool;
        cfg.busybox_bin = self.busybox.clone();
        cfg.reaper_interval = self.reaper_interval;
        cfg.metrics_save_interval = self.metrics_save_interval;
        cfg.warm_pools = self.warm.clone();
        cfg.net_pool = self.net_pool;
        if let Some(k) = &self.vm_kernel {
            cfg.vm.kernel_dir = k.clone();
        }
        cfg.vm.modules = self.vm_modules.clone();
        cfg.vm.qemu = self.qemu.clone();
        if let (Some(binary), Some(vmlinux)) = (&self.firecracker, &self.firecracker_kernel) {
            cfg.vm.firecracker = Some(crate::config::FirecrackerConfig {
                binary: binary.clone(),
                vmlinux: vmlinux.clone(),
            });
        }
        cfg
    }
}
