//! The OCI bundle (`config.json`) of a capsule, written with `oci-spec`.
//!
//! Security baseline, at least as strict as `runc spec`'s defaults:
//! runc's masked and read-only paths, its default device list (the runtime
//! adds it), no user namespace, and `noNewPrivileges` unless the template
//! allows setuid programs (`sudo`). On top of runc's three capabilities,
//! the capsule keeps only what envd needs to run processes as other users
//! and manage their files (setuid, setgid, chown, dac_override, fowner,
//! fsetid); no `CAP_SYS_ADMIN`, `CAP_NET_ADMIN`, `CAP_SYS_MODULE`… A
//! seccomp filter (runc's default has none) refuses mounting, module and
//! kexec loading, new user namespaces, keyrings, bpf, perf, clock setting
//! and the other host-facing calls that Docker's profile refuses.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use oci_spec::runtime::{
    Arch, Capability, LinuxBuilder, LinuxCapabilitiesBuilder, LinuxCpuBuilder, LinuxMemoryBuilder,
    LinuxNamespaceBuilder, LinuxNamespaceType, LinuxPidsBuilder, LinuxResourcesBuilder,
    LinuxSeccompAction, LinuxSeccompArgBuilder, LinuxSeccompBuilder, LinuxSeccompOperator,
    LinuxSyscall, LinuxSyscallBuilder, Mount, MountBuilder, PosixRlimitBuilder, PosixRlimitType,
    ProcessBuilder, RootBuilder, Spec, SpecBuilder, UserBuilder,
};

/// Where envd appears inside every capsule (bind-mounted read-only).
pub const ENVD_PATH: &str = "/.wrenn/envd";

/// Everything the bundle depends on.
#[derive(Debug, Clone)]
pub struct BundleParams {
    pub hostname: String,
    pub rootfs: PathBuf,
    pub envd: PathBuf,
    /// Per-capsule copies of `resolv.conf`, `hosts`, `hostname`.
    pub etc_dir: PathBuf,
    pub netns: PathBuf,
    pub cgroups_path: String,
    pub vcpus: u32,
    pub memory_mb: u64,
    pub pids: i64,
    pub env: Vec<String>,
    pub default_user: Option<String>,
    pub start_cmd: Option<String>,
    pub allow_setuid: bool,
    /// Open-files limit (soft = hard); at most the agent's own hard limit,
    /// since the capsule lacks CAP_SYS_RESOURCE to go above it.
    pub nofile: u64,
}

#[derive(Debug, thiserror::Error)]
#[error("build OCI config: {0}")]
pub struct SpecError(String);

fn e(err: impl std::fmt::Display) -> SpecError {
    SpecError(err.to_string())
}

const CAPS: &[Capability] = &[
    // runc's defaults
    Capability::AuditWrite,
    Capability::Kill,
    Capability::NetBindService,
    // envd: run processes as the requested user, own their files
    Capability::Setuid,
    Capability::Setgid,
    Capability::Chown,
    Capability::DacOverride,
    Capability::Fowner,
    Capability::Fsetid,
];

/// Refused with EPERM.
const DENIED_SYSCALLS: &[&str] = &[
    "acct",
    "add_key",
    "bpf",
    "clock_adjtime",
    "clock_settime",
    "create_module",
    "delete_module",
    "finit_module",
    "fsconfig",
    "fsmount",
    "fsopen",
    "fspick",
    "get_kernel_syms",
    "init_module",
    "ioperm",
    "iopl",
    "kexec_file_load",
    "kexec_load",
    "keyctl",
    "lookup_dcookie",
    "mount",
    "mount_setattr",
    "move_mount",
    "name_to_handle_at",
    "nfsservctl",
    "open_by_handle_at",
    "open_tree",
    "perf_event_open",
    "pivot_root",
    "query_module",
    "quotactl",
    "quotactl_fd",
    "reboot",
    "request_key",
    "setns",
    "settimeofday",
    "stime",
    "swapoff",
    "swapon",
    "syslog",
    "umount",
    "umount2",
    "unshare",
    "uselib",
    "userfaultfd",
    "vm86",
    "vm86old",
    "_sysctl",
];

const CLONE_NEWUSER: u64 = 0x1000_0000;
const ENOSYS: u32 = 38;
const EPERM: u32 = 1;

fn seccomp() -> Result<oci_spec::runtime::LinuxSeccomp, SpecError> {
    let deny = |names: &[&str], errno: u32| -> Result<LinuxSyscall, SpecError> {
        LinuxSyscallBuilder::default()
            .names(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .action(LinuxSeccompAction::ScmpActErrno)
            .errno_ret(errno)
            .build()
            .map_err(e)
    };
    // clone(2) creating a user namespace (the only namespace creation the
    // missing capabilities would not already stop); clone3 answers ENOSYS
    // so that libc falls back to clone, whose flags can be inspected.
    let newuser = LinuxSyscallBuilder::default()
        .names(vec!["clone".to_string()])
        .action(LinuxSeccompAction::ScmpActErrno)
        .errno_ret(EPERM)
        .args(vec![LinuxSeccompArgBuilder::default()
            .index(0usize)
            .value(CLONE_NEWUSER)
            .value_two(CLONE_NEWUSER)
            .op(LinuxSeccompOperator::ScmpCmpMaskedEq)
            .build()
            .map_err(e)?])
        .build()
        .map_err(e)?;
    LinuxSeccompBuilder::default()
        .default_action(LinuxSeccompAction::ScmpActAllow)
        .architectures(vec![
            Arch::ScmpArchX86_64,
            Arch::ScmpArchX86,
            Arch::ScmpArchX32,
        ])
        .syscalls(vec![
            deny(DENIED_SYSCALLS, EPERM)?,
            deny(&["clone3"], ENOSYS)?,
            newuser,
        ])
        .build()
        .map_err(e)
}

fn bind(src: &Path, dst: &str, ro: bool) -> Result<Mount, SpecError> {
    let mut opts = vec![
        "rbind".to_string(),
        "nosuid".to_string(),
        "nodev".to_string(),
    ];
    if ro {
        opts.push("ro".to_string());
    }
    MountBuilder::default()
        .destination(dst)
        .typ("bind")
        .source(src)
        .options(opts)
        .build()
        .map_err(e)
}

pub fn build(p: &BundleParams) -> Result<Spec, SpecError> {
    let mut args = vec![ENVD_PATH.to_string()];
    if let Some(u) = &p.default_user {
        args.extend(["--default-user".to_string(), u.clone()]);
    }
    if let Some(c) = &p.start_cmd {
        args.extend(["--cmd".to_string(), c.clone()]);
    }
    let caps: HashSet<Capability> = CAPS.iter().copied().collect();
    let process = ProcessBuilder::default()
        .terminal(false)
        .user(
            UserBuilder::default()
                .uid(0u32)
                .gid(0u32)
                .build()
                .map_err(e)?,
        )
        .args(args)
        .env(p.env.clone())
        .cwd("/")
        .capabilities(
            LinuxCapabilitiesBuilder::default()
                .bounding(caps.clone())
                .effective(caps.clone())
                .permitted(caps)
                .inheritable(HashSet::new())
                .ambient(HashSet::new())
                .build()
                .map_err(e)?,
        )
        .rlimits(vec![PosixRlimitBuilder::default()
            .typ(PosixRlimitType::RlimitNofile)
            .hard(p.nofile)
            .soft(p.nofile)
            .build()
            .map_err(e)?])
        .no_new_privileges(!p.allow_setuid)
        .oom_score_adj(500)
        .build()
        .map_err(e)?;

    let period: u64 = 100_000;
    let memory = (p.memory_mb as i64) << 20;
    let resources = LinuxResourcesBuilder::default()
        .memory(
            LinuxMemoryBuilder::default()
                .limit(memory)
                .swap(memory)
                .build()
                .map_err(e)?,
        )
        .cpu(
            LinuxCpuBuilder::default()
                .quota(period as i64 * i64::from(p.vcpus.max(1)))
                .period(period)
                .build()
                .map_err(e)?,
        )
        .pids(
            LinuxPidsBuilder::default()
                .limit(p.pids)
                .build()
                .map_err(e)?,
        )
        .build()
        .map_err(e)?;

    let ns = |t: LinuxNamespaceType| LinuxNamespaceBuilder::default().typ(t).build().map_err(e);
    let namespaces = vec![
        ns(LinuxNamespaceType::Pid)?,
        LinuxNamespaceBuilder::default()
            .typ(LinuxNamespaceType::Network)
            .path(&p.netns)
            .build()
            .map_err(e)?,
        ns(LinuxNamespaceType::Ipc)?,
        ns(LinuxNamespaceType::Uts)?,
        ns(LinuxNamespaceType::Mount)?,
        ns(LinuxNamespaceType::Cgroup)?,
    ];
    let mut masked = oci_spec::runtime::get_default_maskedpaths();
    masked.extend([
        "/proc/kallsyms".to_string(),
        "/sys/devices/virtual/powercap".to_string(),
    ]);
    let linux = LinuxBuilder::default()
        .namespaces(namespaces)
        .resources(resources)
        .cgroups_path(PathBuf::from(&p.cgroups_path))
        .masked_paths(masked)
        .readonly_paths(oci_spec::runtime::get_default_readonly_paths())
        .seccomp(seccomp()?)
        .build()
        .map_err(e)?;

    let mut mounts = oci_spec::runtime::get_default_mounts();
    mounts.push(
        MountBuilder::default()
            .destination("/run")
            .typ("tmpfs")
            .source("tmpfs")
            .options(vec![
                "nosuid".into(),
                "nodev".into(),
                "mode=755".into(),
                "size=64m".into(),
            ])
            .build()
            .map_err(e)?,
    );
    mounts.push(bind(&p.envd, ENVD_PATH, true)?);
    for f in ["resolv.conf", "hosts", "hostname"] {
        mounts.push(bind(&p.etc_dir.join(f), &format!("/etc/{f}"), false)?);
    }

    SpecBuilder::default()
        .version("1.0.2")
        .root(
            RootBuilder::default()
                .path(&p.rootfs)
                .readonly(false)
                .build()
                .map_err(e)?,
        )
        .hostname(p.hostname.clone())
        .process(process)
        .mounts(mounts)
        .linux(linux)
        .build()
        .map_err(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_keeps_runc_defaults_and_adds_limits() {
        let p = BundleParams {
            hostname: "capsule".into(),
            rootfs: "/r".into(),
            envd: "/usr/local/bin/envd".into(),
            etc_dir: "/e".into(),
            netns: "/run/netns/w-1".into(),
            cgroups_path: "/w/cl-x".into(),
            vcpus: 2,
            memory_mb: 256,
            pids: 512,
            env: vec!["PATH=/bin".into()],
            default_user: Some("user".into()),
            start_cmd: None,
            allow_setuid: false,
            nofile: 1024,
        };
        let v = serde_json::to_value(build(&p).unwrap()).unwrap();
        assert_eq!(
            v["process"]["args"],
            serde_json::json!([ENVD_PATH, "--default-user", "user"])
        );
        assert_eq!(v["process"]["noNewPrivileges"], true);
        let bounding: Vec<String> =
            serde_json::from_value(v["process"]["capabilities"]["bounding"].clone()).unwrap();
        assert!(bounding.contains(&"CAP_SETUID".to_string()));
        assert!(!bounding
            .iter()
            .any(|c| c == "CAP_SYS_ADMIN" || c == "CAP_NET_ADMIN" || c == "CAP_NET_RAW"));
        assert_eq!(v["linux"]["resources"]["memory"]["limit"], 256 << 20);
        assert_eq!(v["linux"]["resources"]["cpu"]["quota"], 200_000);
        assert_eq!(v["linux"]["resources"]["pids"]["limit"], 512);
        for path in oci_spec::runtime::get_default_maskedpaths() {
            assert!(v["linux"]["maskedPaths"]
                .as_array()
                .unwrap()
                .contains(&path.into()));
        }
        assert!(v["linux"]["readonlyPaths"]
            .as_array()
            .unwrap()
            .contains(&"/proc/sys".into()));
        let netns = v["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["type"] == "network")
            .unwrap();
        assert_eq!(netns["path"], "/run/netns/w-1");
        let syscalls = v["linux"]["seccomp"]["syscalls"][0]["names"]
            .as_array()
            .unwrap();
        assert!(syscalls.contains(&"mount".into()) && syscalls.contains(&"unshare".into()));
        let envd = v["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["destination"] == ENVD_PATH)
            .unwrap();
        assert!(envd["options"].as_array().unwrap().contains(&"ro".into()));
    }
}
