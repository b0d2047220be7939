//! The microVM engine: a capsule is a virtual machine with its own kernel.
//!
//! Everything but the VMM process is shared with the OCI engine: the
//! capsule's netns (which holds a TAP bridged to the host veth, so the
//! same addresses, shaping and nftables rules apply), envd as the guest's
//! init, the agent RPC. The guest boots Debian's cloud kernel with an
//! initramfs of ours ([`image`]) from an ext4 image of the template, with
//! a qcow2 copy-on-write overlay per capsule.
//!
//! The driver here is QEMU's `microvm` machine: `-accel kvm` where `/dev/kvm`
//! can run a guest, TCG (software emulation) elsewhere. Pause writes the
//! VM's memory and device state to a file and stops the VMM (a paused VM
//! costs no RAM); resume starts a new VMM from that file.
//! [`firecracker`] drives Firecracker's API instead, on hosts with KVM.

pub mod firecracker;
pub mod image;
mod qmp;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use wrenn_types::ids::CapsuleId;

use self::qmp::{Qmp, QmpError};
use super::{ContainerState, ContainerStatus, Runtime, RuntimeError};
use crate::cgroup::{CgroupLimits, Cgroups};

/// What a VM capsule boots, written by the agent as [`SPEC_FILE`] in the
/// capsule's bundle directory (the VM's "bundle").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// The capsule's qcow2 overlay of the template's ext4 image.
    pub disk: PathBuf,
    /// The capsule's network namespace; the VMM runs in it.
    pub netns: PathBuf,
    pub tap: String,
    pub mac: String,
    pub vcpus: u32,
    pub memory_mb: u64,
    pub cmdline: String,
    /// The VMM's cgroup (absolute path), for limits and metrics.
    pub cgroup: String,
    /// Where the guest's serial console is appended.
    pub console: PathBuf,
}

pub const SPEC_FILE: &str = "vm.json";
/// The memory and device state of a paused VM, in its bundle directory.
pub(crate) const PAUSED_STATE: &str = "memory.snap";
/// Room the VMM itself needs above the guest's memory (QEMU under TCG
/// keeps a translation cache of its own).
const VMM_OVERHEAD_MB: u64 = 384;
const BOOT_WAIT: Duration = Duration::from_secs(10);
const MIGRATE_WAIT: Duration = Duration::from_secs(300);

impl VmSpec {
    pub fn load(bundle: &Path) -> Result<VmSpec, RuntimeError> {
        let path = bundle.join(SPEC_FILE);
        let text = std::fs::read(&path).map_err(io("read", &path))?;
        serde_json::from_slice(&text).map_err(|e| RuntimeError::Io {
            what: "parse",
            path,
            source: std::io::Error::other(e),
        })
    }

    /// The disk the guest of `bundle` writes and its format: QEMU's qcow2
    /// overlay (the spec's disk) or Firecracker's raw private copy of the
    /// spec's image. The format is never guessed from the contents: every
    /// byte of a raw disk is the guest's, and a qcow2 header written there
    /// would name host files as backing files.
    pub fn written_disk(bundle: &Path) -> Result<(PathBuf, image::DiskFormat), RuntimeError> {
        let copy = firecracker::FirecrackerRuntime::raw_disk(bundle);
        if copy.is_file() {
            return Ok((copy, image::DiskFormat::Raw));
        }
        let disk = Self::load(bundle)?.disk;
        let format = if disk.extension().is_some_and(|e| e == "qcow2") {
            image::DiskFormat::Qcow2
        } else {
            image::DiskFormat::Raw
        };
        Ok((disk, format))
    }

    pub fn save(&self, bundle: &Path) -> Result<(), RuntimeError> {
        let path = bundle.join(SPEC_FILE);
        std::fs::create_dir_all(bundle).map_err(io("create", bundle))?;
        let text = serde_json::to_vec_pretty(self).expect("serializable");
        std::fs::write(&path, text).map_err(io("write", &path))
    }
}

pub(crate) fn io<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> RuntimeError + 'a {
    move |source| RuntimeError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// What a VMM driver keeps per VM under `/run/<instance>/<driver>/`: the
/// pidfile, the API socket (QMP, Firecracker's) and the path of the bundle
/// (the capsule's directory holding [`SPEC_FILE`]).
#[derive(Debug, Clone)]
pub(crate) struct VmmFiles {
    dir: PathBuf,
    socket_ext: &'static str,
}

impl VmmFiles {
    pub(crate) fn new(dir: PathBuf, socket_ext: &'static str) -> Self {
        VmmFiles { dir, socket_ext }
    }

    pub(crate) fn pidfile(&self, id: &CapsuleId) -> PathBuf {
        self.dir.join(format!("{id}.pid"))
    }

    pub(crate) fn socket(&self, id: &CapsuleId) -> PathBuf {
        self.dir.join(format!("{id}.{}", self.socket_ext))
    }

    fn bundle_link(&self, id: &CapsuleId) -> PathBuf {
        self.dir.join(format!("{id}.bundle"))
    }

    /// Remember `bundle` for `id`, and clear a previous VMM's socket and pidfile.
    pub(crate) fn prepare(&self, id: &CapsuleId, bundle: &Path) -> Result<(), RuntimeError> {
        std::fs::create_dir_all(&self.dir).map_err(io("create", &self.dir))?;
        let link = self.bundle_link(id);
        std::fs::write(&link, bundle.as_os_str().as_encoded_bytes()).map_err(io("write", &link))?;
        let _ = std::fs::remove_file(self.socket(id));
        let _ = std::fs::remove_file(self.pidfile(id));
        Ok(())
    }

    pub(crate) fn bundle(&self, id: &CapsuleId) -> Result<PathBuf, RuntimeError> {
        let link = self.bundle_link(id);
        std::fs::read_to_string(&link)
            .map(PathBuf::from)
            .map_err(io("read", &link))
    }

    /// The VMM's pid, if it is running. The pidfile outlives a crashed
    /// VMM: the process must be the one serving this VM's socket, not a
    /// recycled pid.
    pub(crate) fn pid(&self, id: &CapsuleId) -> Option<i32> {
        let pid: i32 = std::fs::read_to_string(self.pidfile(id))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        String::from_utf8_lossy(&cmdline)
            .contains(self.socket(id).to_string_lossy().as_ref())
            .then_some(pid)
    }

    /// A paused VM is a file, not a process: its state when no VMM runs.
    pub(crate) fn paused_state(&self, id: &CapsuleId) -> Option<ContainerState> {
        self.bundle(id)
            .is_ok_and(|b| b.join(PAUSED_STATE).is_file())
            .then_some(ContainerState {
                status: ContainerStatus::Paused,
                pid: None,
            })
    }

    /// Forget the VM (after its VMM is gone).
    pub(crate) fn remove(&self, id: &CapsuleId) {
        for p in [self.pidfile(id), self.socket(id), self.bundle_link(id)] {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// A VMM driver's failure.
pub(crate) fn failed(
    binary: &str,
    op: &'static str,
    id: &CapsuleId,
    message: impl ToString,
) -> RuntimeError {
    RuntimeError::Failed {
        binary: binary.to_owned(),
        op,
        id: id.to_string(),
        message: message.to_string(),
    }
}

/// How QEMU runs guest code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    /// KVM when `/dev/kvm` can run a guest, TCG otherwise. (Opening the
    /// device is not enough: on nested, emulated hosts it opens and then
    /// cannot boot anything; `WRENN_VM_ACCEL=kvm` forces it.)
    pub fn detect() -> Accel {
        match std::env::var("WRENN_VM_ACCEL").as_deref() {
            Ok("kvm") => Accel::Kvm,
            _ => Accel::Tcg,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// QEMU's `microvm` machine as a [`Runtime`].
#[derive(Debug, Clone)]
pub struct QemuRuntime {
    binary: String,
    accel: Accel,
    /// `<state root>/qemu`: a pidfile, a QMP socket and the bundle path per VM.
    files: VmmFiles,
    cgroups: Cgroups,
    name: String,
}

impl QemuRuntime {
    pub fn new(binary: &str, accel: Accel, state_root: &Path, cgroups: Cgroups) -> Self {
        QemuRuntime {
            binary: binary.to_owned(),
            accel,
            files: VmmFiles::new(state_root.join("qemu"), "qmp"),
            cgroups,
            name: format!("qemu-microvm/{}", accel.as_str()),
        }
    }

    /// Whether the QEMU binary can be found.
    pub fn installed(&self) -> bool {
        crate::cmd::on_path(&self.binary)
    }

    fn failed(&self, op: &'static str, id: &CapsuleId, message: impl ToString) -> RuntimeError {
        failed(&self.binary, op, id, message)
    }

    fn qmp(&self, op: &'static str, id: &CapsuleId) -> Result<Qmp, RuntimeError> {
        Qmp::connect(&self.files.socket(id)).map_err(|e| self.failed(op, id, e))
    }

    /// Start a VMM for `spec`, stopped (`-S`), or loading `incoming`.
    fn launch(&self, id: &CapsuleId, bundle: &Path, incoming: bool) -> Result<(), RuntimeError> {
        let spec = VmSpec::load(bundle)?;
        self.files.prepare(id, bundle)?;
        let (sock, pidfile) = (self.files.socket(id), self.files.pidfile(id));
        let mut args: Vec<String> = vec![
            format!("--net={}", spec.netns.display()),
            "--".into(),
            self.binary.clone(),
            "-name".into(),
            format!("wrenn-{id}"),
            "-M".into(),
            "microvm,x-option-roms=off,pit=off,pic=off,rtc=on".into(),
            "-accel".into(),
            self.accel.as_str().into(),
            "-cpu".into(),
            if self.accel == Accel::Kvm {
                "host"
            } else {
                "max"
            }
            .into(),
            "-smp".into(),
            spec.vcpus.to_string(),
            "-m".into(),
            format!("{}M", spec.memory_mb),
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-display".into(),
            "none".into(),
            "-no-reboot".into(),
            "-kernel".into(),
            spec.kernel.display().to_string(),
            "-initrd".into(),
            spec.initrd.display().to_string(),
            "-append".into(),
            spec.cmdline.clone(),
            "-drive".into(),
            format!(
                "id=root,file={},format=qcow2,if=none,discard=unmap",
                qemu_opt(&spec.disk)
            ),
            "-device".into(),
            "virtio-blk-device,drive=root".into(),
            "-netdev".into(),
            format!("tap,id=net0,ifname={},script=no,downscript=no", spec.tap),
            "-device".into(),
            format!("virtio-net-device,netdev=net0,mac={}", spec.mac),
            "-chardev".into(),
            format!("file,id=console,path={},append=on", qemu_opt(&spec.console)),
            "-serial".into(),
            "chardev:console".into(),
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", qemu_opt(&sock)),
            "-pidfile".into(),
            pidfile.display().to_string(),
            "-sandbox".into(),
            // (not `elevateprivileges=deny`: QEMU 7.2 then fails to daemonize)
            "on,obsolete=deny,resourcecontrol=deny".into(),
            "-daemonize".into(),
            "-S".into(),
        ];
        if incoming {
            args.extend(["-incoming".into(), "defer".into()]);
        }
        crate::cmd::run("nsenter", &args, None).map_err(|e| match e {
            crate::cmd::CmdError::Missing { .. } => RuntimeError::Missing {
                binary: self.binary.clone(),
            },
            other => self.failed("start", id, other),
        })?;
        let pid = self
            .files
            .pid(id)
            .ok_or_else(|| self.failed("start", id, "the VMM exited at once"))?;
        self.cgroups
            .create(
                &spec.cgroup,
                &CgroupLimits {
                    memory_bytes: (spec.memory_mb + VMM_OVERHEAD_MB) << 20,
                    cpus: spec.vcpus,
                    pids: 256,
                },
            )
            .and_then(|()| self.cgroups.add_process(&spec.cgroup, pid))
            .map_err(|e| {
                self.kill_vmm(id);
                self.failed("start", id, format!("cgroup {}: {e}", spec.cgroup))
            })?;
        Ok(())
    }

    /// Write the VM's state to `file` and stop the VMM.
    fn save(&self, id: &CapsuleId, file: &Path) -> Result<(), RuntimeError> {
        let mut q = self.qmp("pause", id)?;
        let part = file.with_extension("part");
        let fail = |e: QmpError| self.failed("pause", id, e);
        q.execute("stop", None).map_err(fail)?;
        let saved = (|| {
            // The default cap (128 MiB/s) is for live migration over a
            // network; a stopped VM going to a local file wants no cap.
            q.execute(
                "migrate-set-parameters",
                Some(serde_json::json!({ "max-bandwidth": 64u64 << 30 })),
            )?;
            q.execute(
                "migrate",
                Some(serde_json::json!({ "uri": format!("exec:cat > {}", shell_quote(&part)) })),
            )?;
            q.wait_migration(MIGRATE_WAIT)
        })();
        if let Err(e) = saved {
            let _ = std::fs::remove_file(&part);
            let _ = q.execute("cont", None);
            return Err(fail(e));
        }
        std::fs::rename(&part, file).map_err(io("rename", &part))?;
        let _ = q.execute("quit", None);
        drop(q);
        self.wait_gone(id);
        Ok(())
    }

    /// Start a VMM that loads `file`, and run it.
    fn load(&self, id: &CapsuleId, bundle: &Path, file: &Path) -> Result<(), RuntimeError> {
        if !file.is_file() {
            return Err(self.failed("resume", id, format!("{} is missing", file.display())));
        }
        self.launch(id, bundle, true)?;
        let restored = (|| {
            let mut q = Qmp::connect(&self.files.socket(id))?;
            q.execute(
                "migrate-incoming",
                Some(serde_json::json!({ "uri": format!("exec:cat {}", shell_quote(file)) })),
            )?;
            q.wait_incoming(MIGRATE_WAIT)?;
            q.execute("cont", None).map(|_| ())
        })();
        if let Err(e) = restored {
            self.kill_vmm(id);
            return Err(self.failed("resume", id, e));
        }
        Ok(())
    }

    fn kill_vmm(&self, id: &CapsuleId) {
        if let Some(pid) = self.files.pid(id) {
            // SAFETY: signalling a pid we verified is this VM's QEMU.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        self.wait_gone(id);
    }

    fn wait_gone(&self, id: &CapsuleId) {
        let deadline = Instant::now() + BOOT_WAIT;
        while self.files.pid(id).is_some() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn spec_of(&self, id: &CapsuleId) -> Option<VmSpec> {
        VmSpec::load(&self.files.bundle(id).ok()?).ok()
    }
}

impl Runtime for QemuRuntime {
    fn name(&self) -> &str {
        &self.name
    }

    /// (The console goes where the spec says; `stdio` is the OCI way.)
    fn create(&self, id: &CapsuleId, bundle: &Path, _stdio: &Path) -> Result<(), RuntimeError> {
        self.launch(id, bundle, false)
    }

    fn start(&self, id: &CapsuleId) -> Result<(), RuntimeError> {
        self.qmp("start", id)?
            .execute("cont", None)
            .map(|_| ())
            .map_err(|e| self.failed("start", id, e))
    }

    fn state(&self, id: &CapsuleId) -> Result<Option<ContainerState>, RuntimeError> {
        if let Some(pid) = self.files.pid(id) {
            let status = match self.qmp("state", id)?.status() {
                Ok(s) => s,
                Err(e) => return Err(self.failed("state", id, e)),
            };
            let status = match status.as_str() {
                "running" => ContainerStatus::Running,
                "prelaunch" => ContainerStatus::Created,
                "inmigrate" => ContainerStatus::Creating,
                "shutdown" | "guest-panicked" | "internal-error" => ContainerStatus::Stopped,
                _ => ContainerStatus::Paused,
            };
            return Ok(Some(ContainerState {
                status,
                pid: Some(pid),
            }));
        }
        Ok(self.files.paused_state(id))
    }

    fn pause(&self, id: &CapsuleId) -> Result<(), RuntimeError> {
        let bundle = self.files.bundle(id)?;
        self.save(id, &bundle.join(PAUSED_STATE))
    }

    fn resume(&self, id: &CapsuleId) -> Result<(), RuntimeError> {
        let bundle = self.files.bundle(id)?;
        let file = bundle.join(PAUSED_STATE);
        self.load(id, &bundle, &file)?;
        let _ = std::fs::remove_file(&file);
        Ok(())
    }

    fn kill(&self, id: &CapsuleId, signal: &str) -> Result<(), RuntimeError> {
        let sig = match signal {
            "KILL" | "SIGKILL" | "9" => libc::SIGKILL,
            _ => libc::SIGTERM,
        };
        if let Some(pid) = self.files.pid(id) {
            // SAFETY: signalling a pid we verified is this VM's QEMU.
            unsafe { libc::kill(pid, sig) };
        }
        Ok(())
    }

    fn delete(&self, id: &CapsuleId) -> Result<(), RuntimeError> {
        let spec = self.spec_of(id);
        self.kill_vmm(id);
        if self.files.pid(id).is_some() {
            return Err(self.failed("delete", id, "the VMM does not die"));
        }
        if let Ok(b) = self.files.bundle(id) {
            let _ = std::fs::remove_file(b.join(PAUSED_STATE));
        }
        if let Some(spec) = spec {
            // The killed VMM stays in its cgroup until its parent (init,
            // since it daemonized) reaps it: rmdir is EBUSY until then.
            let deadline = Instant::now() + BOOT_WAIT;
            loop {
                match self.cgroups.remove(&spec.cgroup) {
                    Ok(()) => break,
                    Err(e)
                        if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline =>
                    {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    Err(e) => {
                        return Err(self.failed(
                            "delete",
                            id,
                            format!("cgroup {}: {e}", spec.cgroup),
                        ))
                    }
                }
            }
        }
        self.files.remove(id);
        Ok(())
    }

    fn freezes_in_place(&self) -> bool {
        false
    }

    fn can_checkpoint(&self) -> bool {
        true
    }

    fn checkpoint(&self, id: &CapsuleId, images: &Path) -> Result<(), RuntimeError> {
        self.save(id, &images.join(PAUSED_STATE))
    }

    fn restore(
        &self,
        id: &CapsuleId,
        bundle: &Path,
        images: &Path,
        _stdio: &Path,
    ) -> Result<(), RuntimeError> {
        self.load(id, bundle, &images.join(PAUSED_STATE))
    }
}

/// A path inside a QEMU option list, where `,` must be doubled.
fn qemu_opt(p: &Path) -> String {
    p.display().to_string().replace(',', ",,")
}

/// A path as one word of `sh -c` (QEMU's `exec:` migrations run a shell).
fn shell_quote(p: &Path) -> String {
    format!("'{}'", p.display().to_string().replace('\'', r"'\''"))
}

/// The guest's MAC address: locally administered, from the capsule's IP.
pub fn mac_for(ip: std::net::Ipv4Addr) -> String {
    let o = ip.octets();
    format!("02:57:{:02x}:{:02x}:{:02x}:{:02x}", o[0], o[1], o[2], o[3])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_for_qemu_and_the_shell() {
        assert_eq!(qemu_opt(Path::new("/a,b/c")), "/a,,b/c");
        assert_eq!(shell_quote(Path::new("/it's here")), r"'/it'\''s here'");
        assert_eq!(mac_for([10, 88, 0, 6].into()), "02:57:0a:58:00:06");
    }

    #[test]
    fn specs_round_trip_through_the_bundle() {
        let t = tempfile::tempdir().unwrap();
        let spec = VmSpec {
            kernel: "/k".into(),
            initrd: "/i".into(),
            disk: "/d.qcow2".into(),
            netns: "/run/netns/x".into(),
            tap: "tap0".into(),
            mac: mac_for([10, 0, 0, 2].into()),
            vcpus: 2,
            memory_mb: 256,
            cmdline: "console=ttyS0".into(),
            cgroup: "/wrenn/cl-1".into(),
            console: "/c.log".into(),
        };
        spec.save(t.path()).unwrap();
        assert_eq!(VmSpec::load(t.path()).unwrap(), spec);
        assert!(VmSpec::load(&t.path().join("missing")).is_err());
    }
}
