//! The guest image of VM capsules: a kernel (Debian's cloud kernel by
//! default, any `vmlinuz` by configuration), an initramfs built here, and
//! an ext4 root disk per template with a qcow2 overlay per capsule.
//!
//! The initramfs holds a static busybox, envd, the kernel modules the
//! guest needs to reach its disk and network (with their dependencies, in
//! load order) and [`INIT`], which loads them, configures `eth0` from the
//! kernel command line, mounts the root disk, puts envd on a read-only
//! tmpfs at `/.wrenn` (where OCI capsules have it too) and switches to it
//! as PID 1.

use std::collections::{BTreeMap, HashSet};
use std::io::Cursor;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use crate::cmd;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("no guest kernel under {0} (expected boot/vmlinuz-* and lib/modules/*)")]
    NoKernel(PathBuf),
    #[error("guest kernel module {0} is not in modules.dep")]
    NoModule(String),
    #[error("{what}: {source}")]
    Tool {
        what: String,
        #[source]
        source: cmd::CmdError,
    },
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("kernel command line is {0} bytes, over the 2048 the kernel takes")]
    CmdlineTooLong(usize),
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> ImageError + 'a {
    move |source| ImageError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

fn tool(what: impl Into<String>) -> impl FnOnce(cmd::CmdError) -> ImageError {
    let what = what.into();
    move |source| ImageError::Tool { what, source }
}

/// A kernel and its modules, as a kernel package lays them out under a
/// root (`boot/vmlinuz-<release>`, `lib/modules/<release>/`), or any
/// kernel image QEMU boots with its modules wherever they are, or none
/// (what the guest needs built in).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestKernel {
    pub vmlinuz: PathBuf,
    /// `lib/modules/<release>` (with `modules.dep`); `None`: no modules.
    pub modules: Option<PathBuf>,
    /// Names the initramfs built for this kernel.
    pub release: String,
}

/// Debian's package the default guest kernel comes from.
pub const DEBIAN_KERNEL: &str = "linux-image-cloud-amd64";

impl GuestKernel {
    /// The kernel extracted under `root` (the newest, if several).
    pub fn find(root: &Path) -> Result<GuestKernel, ImageError> {
        let boot = root.join("boot");
        let mut found: Vec<(String, PathBuf)> = std::fs::read_dir(&boot)
            .map_err(|_| ImageError::NoKernel(root.to_owned()))?
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let release = name.strip_prefix("vmlinuz-")?.to_owned();
                Some((release, e.path()))
            })
            .filter(|(r, _)| root.join("lib/modules").join(r).is_dir())
            .collect();
        found.sort();
        let (release, vmlinuz) = found
            .pop()
            .ok_or_else(|| ImageError::NoKernel(root.to_owned()))?;
        if !root
            .join("lib/modules")
            .join(&release)
            .join("modules.dep")
            .is_file()
        {
            // A package's postinst makes modules.dep; an unpacked one has none.
            cmd::run(
                "depmod",
                [
                    std::ffi::OsStr::new("-b"),
                    root.as_os_str(),
                    std::ffi::OsStr::new(&release),
                ],
                None,
            )
            .map_err(tool(format!("depmod for {release}")))?;
        }
        Ok(GuestKernel {
            modules: Some(root.join("lib/modules").join(&release)),
            vmlinuz,
            release,
        })
    }

    /// A kernel image file (`bzImage`, `vmlinuz`, a PVH `vmlinux`) and the
    /// directory of its modules, if it needs any (one with `modules.dep`).
    pub fn from_image(image: &Path, modules: Option<&Path>) -> Result<GuestKernel, ImageError> {
        use std::os::unix::fs::MetadataExt;
        let md = std::fs::metadata(image).map_err(io("read", image))?;
        if !md.is_file() {
            return Err(ImageError::NoKernel(image.to_owned()));
        }
        if let Some(m) = modules {
            let dep = m.join("modules.dep");
            if !dep.is_file() {
                return Err(ImageError::Io {
                    what: "read (run depmod for these modules)",
                    path: dep,
                    source: std::io::ErrorKind::NotFound.into(),
                });
            }
        }
        let name = |p: &Path| p.file_name().map(|n| n.to_string_lossy().into_owned());
        let release = format!(
            "{}-{:x}-{:x}",
            modules
                .and_then(name)
                .or_else(|| name(image))
                .unwrap_or_default(),
            md.size(),
            md.mtime()
        );
        Ok(GuestKernel {
            vmlinuz: image.to_owned(),
            modules: modules.map(Path::to_owned),
            release,
        })
    }

    /// [`DEBIAN_KERNEL`] downloaded with apt and unpacked under `root`
    /// (nothing is installed on the host); the kernel already there if
    /// there is one.
    pub fn fetch_debian(root: &Path) -> Result<GuestKernel, ImageError> {
        if let Ok(k) = GuestKernel::find(root) {
            return Ok(k);
        }
        let deps = cmd::run(
            "apt-cache",
            ["depends", "--no-recommends", "--no-suggests", DEBIAN_KERNEL],
            None,
        )
        .map_err(tool(format!("apt-cache depends {DEBIAN_KERNEL}")))?;
        let package = deps
            .lines()
            .filter_map(|l| l.trim().strip_prefix("Depends: "))
            .find(|p| p.starts_with("linux-image-"))
            .ok_or_else(|| ImageError::NoKernel(root.to_owned()))?
            .to_owned();
        let parent = root.parent().unwrap_or(Path::new("/"));
        std::fs::create_dir_all(parent).map_err(io("create", parent))?;
        let staging = tempfile::Builder::new()
            .prefix(".kernel-")
            .tempdir_in(parent)
            .map_err(io("create a directory in", parent))?;
        let dl = staging.path().join("deb");
        std::fs::create_dir_all(&dl).map_err(io("create", &dl))?;
        let script = format!(
            "cd {} && apt-get download -q {} >/dev/null",
            shell_word(&dl),
            package
        );
        cmd::run("sh", ["-c", &script], None)
            .map_err(tool(format!("apt-get download {package}")))?;
        let deb = std::fs::read_dir(&dl)
            .map_err(io("read", &dl))?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|e| e == "deb"))
            .ok_or_else(|| ImageError::NoKernel(dl.clone()))?;
        let tree = staging.path().join("root");
        cmd::run(
            "dpkg-deb",
            [
                std::ffi::OsStr::new("-x"),
                deb.as_os_str(),
                tree.as_os_str(),
            ],
            None,
        )
        .map_err(tool(format!("dpkg-deb -x {}", deb.display())))?;
        GuestKernel::find(&tree)?;
        match std::fs::rename(&tree, root) {
            // Someone else unpacked one meanwhile: theirs is as good.
            Err(_) if GuestKernel::find(root).is_ok() => {}
            r => r.map_err(io("rename into", root))?,
        }
        GuestKernel::find(root)
    }

    /// The `.ko` files (relative to [`GuestKernel::modules`]) that load
    /// `wanted`, dependencies first, each once. Modules built into the
    /// kernel are not in `modules.dep` and are skipped when
    /// `modules.builtin` names them.
    /// A kernel without modules has them all built in (or fails to boot:
    /// the agent then says the guest never answered).
    pub fn module_order(&self, wanted: &[&str]) -> Result<Vec<String>, ImageError> {
        let Some(dir) = &self.modules else {
            return Ok(Vec::new());
        };
        let dep_path = dir.join("modules.dep");
        let text = std::fs::read_to_string(&dep_path).map_err(io("read", &dep_path))?;
        let builtin = std::fs::read_to_string(dir.join("modules.builtin")).unwrap_or_default();
        let deps = parse_modules_dep(&text);
        let by_name: BTreeMap<String, &String> =
            deps.keys().map(|path| (module_name(path), path)).collect();
        let builtin: HashSet<String> = builtin.lines().map(module_name).collect();
        let mut order = Vec::new();
        let mut seen = HashSet::new();
        for name in wanted {
            let name = name.replace('-', "_");
            match by_name.get(&name) {
                Some(path) => visit(path, &deps, &mut seen, &mut order),
                None if builtin.contains(&name) => {}
                None => return Err(ImageError::NoModule(name)),
            }
        }
        Ok(order)
    }
}

/// `kernel/fs/ext4/ext4.ko[.xz]` → `ext4` (names use `_`, not `-`).
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

/// `path: dep dep…` lines of `modules.dep`.
fn parse_modules_dep(text: &str) -> BTreeMap<String, Vec<String>> {
    text.lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(m, d)| {
            (
                m.trim().to_owned(),
                d.split_whitespace().map(str::to_owned).collect(),
            )
        })
        .collect()
}

fn visit(
    path: &String,
    deps: &BTreeMap<String, Vec<String>>,
    seen: &mut HashSet<String>,
    order: &mut Vec<String>,
) {
    if !seen.insert(path.clone()) {
        return;
    }
    for d in deps.get(path).into_iter().flatten() {
        visit(d, deps, seen, order);
    }
    order.push(path.clone());
}

/// What the guest needs from the kernel as modules: the virtio-mmio bus
/// QEMU's microvm and Firecracker use, the disk, the NIC, ext4.
pub const GUEST_MODULES: &[&str] = &["virtio_mmio", "virtio_blk", "virtio_net", "ext4"];

/// The initramfs's `/init`: a busybox shell script.
pub const INIT: &str = include_str!("init.sh");

/// Build the initramfs (a newc cpio) at `out`, atomically.
pub fn build_initramfs(
    kernel: &GuestKernel,
    envd: &Path,
    busybox: &Path,
    out: &Path,
) -> Result<(), ImageError> {
    let modules = kernel.module_order(GUEST_MODULES)?;
    let read = |p: &Path| std::fs::read(p).map_err(io("read", p));
    let mut entries: Vec<(cpio::NewcBuilder, Cursor<Vec<u8>>)> = Vec::new();
    let dir = |name: &str| {
        (
            cpio::NewcBuilder::new(name).mode(0o040_755).nlink(2),
            Cursor::new(Vec::new()),
        )
    };
    for d in ["bin", "dev", "proc", "sys", "newroot", "modules"] {
        entries.push(dir(d));
    }
    let file = |name: &str, mode: u32, data: Vec<u8>| {
        (
            cpio::NewcBuilder::new(name).mode(0o100_000 | mode).nlink(1),
            Cursor::new(data),
        )
    };
    entries.push(file("init", 0o755, INIT.as_bytes().to_vec()));
    entries.push(file("bin/busybox", 0o755, read(busybox)?));
    entries.push(file("envd", 0o755, read(envd)?));
    let mut listed = String::new();
    let module_dir = kernel.modules.as_deref().unwrap_or(Path::new("/"));
    for (i, m) in modules.iter().enumerate() {
        let src = module_dir.join(m);
        let data = read(&src)?;
        let data = if m.ends_with(".xz") || m.ends_with(".zst") {
            decompress(&src, m)?
        } else {
            data
        };
        // Numbered, so the load order is the order of the names.
        let name = format!("{i:02}-{}.ko", module_name(m));
        listed.push_str(&name);
        listed.push('\n');
        entries.push(file(&format!("modules/{name}"), 0o644, data));
    }
    entries.push(file("modules/order", 0o644, listed.into_bytes()));
    let parent = out.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(io("create", parent))?;
    let part = out.with_extension("part");
    let f = std::fs::File::create(&part).map_err(io("create", &part))?;
    let w = std::io::BufWriter::new(f);
    let w = cpio::write_cpio(entries.into_iter(), w).map_err(io("write", &part))?;
    w.into_inner()
        .map_err(|e| e.into_error())
        .and_then(|f| f.sync_all())
        .map_err(io("write", &part))?;
    std::fs::rename(&part, out).map_err(io("rename", &part))
}

/// A compressed module, decompressed with `xz`/`zstd`.
fn decompress(src: &Path, name: &str) -> Result<Vec<u8>, ImageError> {
    let program = if name.ends_with(".xz") { "xz" } else { "zstd" };
    let out = std::process::Command::new(program)
        .args(["-dc"])
        .arg(src)
        .output()
        .map_err(io("run xz/zstd on", src))?;
    if !out.status.success() {
        return Err(ImageError::Io {
            what: "decompress",
            path: src.to_owned(),
            source: std::io::Error::other(String::from_utf8_lossy(&out.stderr).into_owned()),
        });
    }
    Ok(out.stdout)
}

/// Make the ext4 root disk of a template at `out` (atomically) from its
/// layers, topmost first: `mkfs.ext4 -d` from the layer itself, or from a
/// read-only overlay mount of several. The image is sparse; `size_mb` is
/// what the guest sees (its disk limit), at least the content plus room.
pub fn build_root_disk(layers: &[PathBuf], out: &Path, size_mb: u64) -> Result<(), ImageError> {
    let parent = out.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(io("create", parent))?;
    let staging = tempfile::Builder::new()
        .prefix(".disk-")
        .tempdir_in(parent)
        .map_err(io("create a directory in", parent))?;
    let (source, mounted) = match layers {
        [one] => (one.clone(), false),
        many => {
            let mnt = staging.path().join("merged");
            std::fs::create_dir_all(&mnt).map_err(io("create", &mnt))?;
            let lower = many
                .iter()
                .map(|p| p.display().to_string().replace(',', "\\,"))
                .collect::<Vec<_>>()
                .join(":");
            cmd::run(
                "mount",
                [
                    "-t",
                    "overlay",
                    "overlay",
                    "-o",
                    &format!("ro,lowerdir={lower}"),
                    &mnt.display().to_string(),
                ],
                None,
            )
            .map_err(tool("mount the template's layers"))?;
            (mnt, true)
        }
    };
    let content_mb = crate::template::dir_size(&source) >> 20;
    let size_mb = size_mb.max(content_mb + content_mb / 4 + 256);
    let img = staging.path().join("root.ext4");
    let made = cmd::run(
        "mkfs.ext4",
        [
            "-q",
            "-F",
            "-L",
            "wrenn-root",
            "-E",
            "root_owner=0:0",
            "-d",
            &source.display().to_string(),
            &img.display().to_string(),
            &format!("{size_mb}M"),
        ],
        None,
    )
    .map_err(tool("mkfs.ext4"));
    if mounted {
        let _ = crate::rootfs::unmount_if_mounted(&source);
    }
    made?;
    std::fs::rename(&img, out).map_err(io("rename", &img))
}

/// How a capsule's disk file is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskFormat {
    Raw,
    Qcow2,
}

/// Make a template from a VM capsule's disk, with the VMM stopped: the
/// disk flattened into the template's raw root disk at `image` (what VM
/// capsules of the template boot from, so no `mkfs` is needed), its journal
/// replayed, and its files copied into `layer` (what OCI capsules of the
/// template mount).
pub fn export_disk(
    disk: &Path,
    format: DiskFormat,
    image: &Path,
    layer: &Path,
) -> Result<(), ImageError> {
    let [disk_s, image_s] = [disk, image].map(|p| p.display().to_string());
    let format = match format {
        DiskFormat::Raw => "raw",
        DiskFormat::Qcow2 => "qcow2",
    };
    cmd::run(
        "qemu-img",
        [
            "convert",
            "-q",
            "-f",
            format,
            "-O",
            "raw",
            disk_s.as_str(),
            image_s.as_str(),
        ],
        None,
    )
    .map_err(tool("qemu-img convert"))?;
    // The guest was stopped with the disk mounted: replay its journal, and
    // repair what a guest may have left broken (exit 1: errors corrected).
    match cmd::run("e2fsck", ["-f", "-y", image_s.as_str()], None) {
        Ok(_) => {}
        Err(cmd::CmdError::Failed { status, .. }) if status.code() == Some(1) => {}
        Err(e) => return Err(tool("e2fsck the capsule's disk")(e)),
    }
    let parent = image.parent().unwrap_or(Path::new("."));
    let mnt = tempfile::Builder::new()
        .prefix(".mnt-")
        .tempdir_in(parent)
        .map_err(io("create a directory in", parent))?;
    let mnt_s = mnt.path().display().to_string();
    // The filesystem is the guest's making: nothing on it acts on the host.
    cmd::run(
        "mount",
        [
            "-t",
            "ext4",
            "-o",
            "loop,ro,nodev,nosuid,noexec",
            image_s.as_str(),
            mnt_s.as_str(),
        ],
        None,
    )
    .map_err(tool("mount the capsule's disk"))?;
    let copied = cmd::run(
        "cp",
        ["-a", &format!("{mnt_s}/."), &layer.display().to_string()],
        None,
    )
    .map_err(tool("copy the capsule's files"));
    let unmounted = crate::rootfs::unmount_if_mounted(mnt.path());
    copied?;
    if let Err(e) = unmounted {
        tracing::warn!(path = %mnt_s, error = %e, "cannot unmount the exported disk");
    }
    // mkfs.ext4's directory, not the capsule's.
    let _ = std::fs::remove_dir(layer.join("lost+found"));
    Ok(())
}

/// A capsule's copy-on-write disk over the template's image.
pub fn create_overlay(base: &Path, out: &Path) -> Result<(), ImageError> {
    cmd::run(
        "qemu-img",
        [
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "-b",
            &base.display().to_string(),
            &out.display().to_string(),
        ],
        None,
    )
    .map(drop)
    .map_err(tool("qemu-img create"))
}

/// What the guest's init reads from the kernel command line.
#[derive(Debug, Clone)]
pub struct BootParams<'a> {
    /// The host's TSC frequency, for guests without KVM: microvm has no
    /// timer the kernel can calibrate the TSC against, and without this
    /// the boot hangs. `None` under KVM (kvmclock).
    pub tsc_khz: Option<u64>,
    pub capsule_id: &'a str,
    pub template: &'a str,
    pub ip: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Ipv4Addr,
    pub nameservers: &'a [IpAddr],
    pub hostname: &'a str,
    pub default_user: Option<&'a str>,
    pub start_cmd: Option<&'a str>,
}

/// The kernel command line for `p`. Free text (the start command) is
/// base64, so no value can split into two parameters.
pub fn cmdline(p: &BootParams) -> Result<String, ImageError> {
    use base64::Engine as _;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    // Quiet, and nothing probed that a microVM does not have.
    let mut line = String::from(
        "console=ttyS0 reboot=k panic=-1 quiet pci=off 8250.nr_uarts=1 i8042.noaux i8042.nokbd \
         i8042.nopnp cryptomgr.notests audit=0",
    );
    if let Some(khz) = p.tsc_khz {
        line.push_str(&format!(" tsc_early_khz={khz} tsc=reliable"));
    }
    line.push_str(&format!(
        " wrenn.id={} wrenn.template={} wrenn.ip={}/{} wrenn.gw={} wrenn.hostname={}",
        p.capsule_id, p.template, p.ip, p.prefix, p.gateway, p.hostname
    ));
    let dns: Vec<String> = p.nameservers.iter().map(|a| a.to_string()).collect();
    if !dns.is_empty() {
        line.push_str(&format!(" wrenn.dns={}", dns.join(",")));
    }
    if let Some(u) = p.default_user {
        line.push_str(&format!(" wrenn.user={}", b64(u)));
    }
    if let Some(c) = p.start_cmd {
        line.push_str(&format!(" wrenn.cmd={}", b64(c)));
    }
    if line.len() >= 2048 {
        return Err(ImageError::CmdlineTooLong(line.len()));
    }
    Ok(line)
}

/// The host's TSC frequency in kHz, from `/proc/cpuinfo` (under TCG the
/// guest's TSC runs at the host's rate).
pub fn host_tsc_khz() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    parse_cpu_mhz(&info)
}

fn parse_cpu_mhz(cpuinfo: &str) -> Option<u64> {
    let mhz: f64 = cpuinfo
        .lines()
        .find(|l| l.starts_with("cpu MHz"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse()
        .ok()?;
    (mhz > 0.0).then(|| (mhz * 1000.0).round() as u64)
}

fn shell_word(p: &Path) -> String {
    format!("'{}'", p.display().to_string().replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modules_load_after_their_dependencies() {
        let t = tempfile::tempdir().unwrap();
        let m = t.path().join("lib/modules/6.1.0-9-cloud-amd64");
        std::fs::create_dir_all(&m).unwrap();
        std::fs::create_dir_all(t.path().join("boot")).unwrap();
        std::fs::write(t.path().join("boot/vmlinuz-6.1.0-9-cloud-amd64"), "k").unwrap();
        std::fs::write(
            m.join("modules.dep"),
            "kernel/fs/ext4/ext4.ko: kernel/fs/jbd2/jbd2.ko kernel/fs/mbcache.ko kernel/lib/crc16.ko\n\
             kernel/fs/jbd2/jbd2.ko:\n\
             kernel/fs/mbcache.ko:\n\
             kernel/lib/crc16.ko:\n\
             kernel/drivers/block/virtio_blk.ko:\n\
             kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko\n\
             kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko\n\
             kernel/net/core/failover.ko:\n",
        )
        .unwrap();
        std::fs::write(
            m.join("modules.builtin"),
            "kernel/drivers/virtio/virtio_mmio.ko\n",
        )
        .unwrap();
        let k = GuestKernel::find(t.path()).unwrap();
        assert_eq!(k.release, "6.1.0-9-cloud-amd64");
        let order = k.module_order(GUEST_MODULES).unwrap();
        let pos = |n: &str| order.iter().position(|p| p.ends_with(n)).unwrap();
        assert!(pos("failover.ko") < pos("net_failover.ko"));
        assert!(pos("net_failover.ko") < pos("virtio_net.ko"));
        assert!(pos("jbd2.ko") < pos("ext4.ko") && pos("crc16.ko") < pos("ext4.ko"));
        assert_eq!(order.len(), 8);
        assert!(matches!(
            k.module_order(&["nosuch"]),
            Err(ImageError::NoModule(n)) if n == "nosuch"
        ));
        assert!(matches!(
            GuestKernel::find(&t.path().join("x")),
            Err(ImageError::NoKernel(_))
        ));

        // a kernel image file: with its modules, without (all built in)
        let image = t.path().join("boot/vmlinuz-6.1.0-9-cloud-amd64");
        let k = GuestKernel::from_image(&image, Some(&m)).unwrap();
        assert_eq!(k.module_order(GUEST_MODULES).unwrap(), order);
        assert!(
            k.release.starts_with("6.1.0-9-cloud-amd64-"),
            "{}",
            k.release
        );
        let bare = GuestKernel::from_image(&image, None).unwrap();
        assert!(bare.module_order(GUEST_MODULES).unwrap().is_empty());
        assert!(bare.release.starts_with("vmlinuz-6.1.0-9-cloud-amd64-"));
        assert!(matches!(
            GuestKernel::from_image(&image, Some(t.path())),
            Err(ImageError::Io { .. })
        ));
        assert!(matches!(
            GuestKernel::from_image(t.path(), None),
            Err(ImageError::NoKernel(_))
        ));
    }

    #[test]
    fn command_lines_carry_free_text_as_base64() {
        let dns = ["1.1.1.1".parse().unwrap(), "8.8.8.8".parse().unwrap()];
        let p = BootParams {
            tsc_khz: Some(2_445_406),
            capsule_id: "cl-abc",
            template: "busybox",
            ip: [10, 88, 0, 2].into(),
            prefix: 30,
            gateway: [10, 88, 0, 1].into(),
            nameservers: &dns,
            hostname: "capsule",
            default_user: Some("user"),
            start_cmd: Some("python3 -m http.server 8000 --bind 0.0.0.0"),
        };
        let line = cmdline(&p).unwrap();
        assert!(line.contains(" wrenn.ip=10.88.0.2/30 wrenn.gw=10.88.0.1 "));
        assert!(line.contains(" tsc_early_khz=2445406 tsc=reliable "));
        assert!(line.contains(" wrenn.dns=1.1.1.1,8.8.8.8"));
        assert!(line.contains(" wrenn.user=dXNlcg=="));
        assert!(!line.contains("http.server"));
        let long = "x".repeat(2000);
        let p = BootParams {
            start_cmd: Some(&long),
            ..p
        };
        assert!(matches!(cmdline(&p), Err(ImageError::CmdlineTooLong(_))));
    }

    #[test]
    fn the_tsc_rate_comes_from_cpuinfo() {
        let info = "processor\t: 0\nmodel name\t: AMD EPYC\ncpu MHz\t\t: 2445.406\n";
        assert_eq!(parse_cpu_mhz(info), Some(2_445_406));
        assert_eq!(parse_cpu_mhz("processor : 0\n"), None);
        assert_eq!(parse_cpu_mhz("cpu MHz : 0.000\n"), None);
    }
}
