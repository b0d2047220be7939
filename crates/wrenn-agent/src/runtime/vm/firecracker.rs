//! Firecracker as a VMM for VM capsules, for hosts with KVM and a
//! `firecracker` binary: the same [`VmSpec`] as QEMU, driven over
//! Firecracker's API socket (HTTP/1.1 on a unix socket) — machine config,
//! boot source, the root drive, the network interface with its
//! `tx_rate_limiter`, MMDS with the capsule's metadata, `InstanceStart`,
//! and snapshot create/load for pause and resume.
//!
//! Differences from QEMU: Firecracker boots an uncompressed `vmlinux`
//! (configured apart from QEMU's `vmlinuz`) and takes raw disks, so a
//! capsule's disk is a reflink (or sparse) copy of the template's image
//! rather than a qcow2 overlay.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use wrenn_types::ids::CapsuleId;

use super::{failed, io, VmSpec, VmmFiles, PAUSED_STATE};
use crate::runtime::{ContainerState, ContainerStatus, Runtime, RuntimeError};

/// A failed API call.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("firecracker api {0}")]
    Io(#[from] std::io::Error),
    #[error("firecracker api: {0}")]
    Http(String),
    #[error("firecracker {method} {path}: {status}: {fault}")]
    Refused {
        method: &'static str,
        path: String,
        status: u16,
        fault: String,
    },
}

/// A client of one Firecracker process's API socket.
#[derive(Debug, Clone)]
pub struct FirecrackerApi {
    socket: PathBuf,
}

/// Egress shaping of a capsule's NIC, as Firecracker's token bucket:
/// `rate` bytes per second sustained, `burst` bytes once on top.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxLimit {
    pub rate: u64,
    pub burst: u64,
}

impl FirecrackerApi {
    pub fn new(socket: &Path) -> Self {
        FirecrackerApi {
            socket: socket.to_owned(),
        }
    }

    async fn call_async(
        &self,
        method: &'static str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, ApiError> {
        let stream = tokio::net::UnixStream::connect(&self.socket).await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ApiError::Http(e.to_string()))?;
        tokio::spawn(conn);
        let bytes = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
        let req = http::Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, "localhost")
            .header(http::header::ACCEPT, "application/json")
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(bytes))
            .map_err(|e| ApiError::Http(e.to_string()))?;
        let resp = tokio::time::timeout(Duration::from_secs(60), sender.send_request(req))
            .await
            .map_err(|_| ApiError::Http(format!("{method} {path} timed out")))?
            .map_err(|e| ApiError::Http(e.to_string()))?;
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| ApiError::Http(e.to_string()))?
            .to_bytes();
        let value: Value = if body.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&body)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()))
        };
        if !(200..300).contains(&status) {
            return Err(ApiError::Refused {
                method,
                path: path.to_owned(),
                status,
                fault: value["fault_message"]
                    .as_str()
                    .map_or_else(|| value.to_string(), str::to_owned),
            });
        }
        Ok(value)
    }

    /// One API call, from a blocking thread (as runtime calls are).
    pub fn call(
        &self,
        method: &'static str,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, ApiError> {
        let fut = self.call_async(method, path, body.as_ref());
        match tokio::runtime::Handle::try_current() {
            Ok(h) => h.block_on(fut),
            Err(_) => tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(fut),
        }
    }

    /// Everything before `InstanceStart`, from a capsule's spec.
    pub fn configure(
        &self,
        spec: &VmSpec,
        kernel: &Path,
        disk: &Path,
        tx: TxLimit,
        metadata: &Value,
    ) -> Result<(), ApiError> {
        self.call(
            "PUT",
            "/machine-config",
            Some(json!({ "vcpu_count": spec.vcpus, "mem_size_mib": spec.memory_mb, "smt": false })),
        )?;
        self.call(
            "PUT",
            "/boot-source",
            Some(json!({
                "kernel_image_path": kernel,
                "initrd_path": spec.initrd,
                "boot_args": spec.cmdline,
            })),
        )?;
        self.call(
            "PUT",
            "/drives/root",
            Some(json!({
                "drive_id": "root",
                "path_on_host": disk,
                "is_root_device": false,
                "is_read_only": false,
            })),
        )?;
        self.call(
            "PUT",
            "/network-interfaces/eth0",
            Some(json!({
                "iface_id": "eth0",
                "host_dev_name": spec.tap,
                "guest_mac": spec.mac,
                "tx_rate_limiter": tx_rate_limiter(tx),
            })),
        )?;
        self.call(
            "PUT",
            "/mmds/config",
            Some(json!({ "version": "V2", "network_interfaces": ["eth0"] })),
        )?;
        self.call("PUT", "/mmds", Some(metadata.clone()))?;
        Ok(())
    }
}

/// Firecracker's token bucket for `tx`: `size` bytes refilled every
/// second, plus a one-time burst.
pub fn tx_rate_limiter(tx: TxLimit) -> Value {
    json!({
        "bandwidth": { "size": tx.rate, "one_time_burst": tx.burst, "refill_time": 1000 }
    })
}

/// Firecracker as a [`Runtime`].
#[derive(Debug, Clone)]
pub struct FirecrackerRuntime {
    binary: String,
    /// An uncompressed guest kernel (`vmlinux`).
    kernel: PathBuf,
    files: VmmFiles,
    tx: TxLimit,
}

impl FirecrackerRuntime {
    pub fn new(binary: &str, kernel: &Path, state_root: &Path, tx: TxLimit) -> Self {
        FirecrackerRuntime {
            binary: binary.to_owned(),
            kernel: kernel.to_owned(),
            files: VmmFiles::new(state_root.join("firecracker"), "sock"),
            tx,
        }
    }

    /// Why Firecracker cannot run guests here, if it cannot: no binary on
    /// `PATH`, or no `/dev/kvm` that opens read-write.
    pub fn unavailable(binary: &str) -> Option<String> {
        if !crate::cmd::on_path(binary) {
            return Some(format!("no {binary} binary on PATH"));
        }
        if let Err(e) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
        {
            return Some(format!("/dev/kvm cannot be opened: {e}"));
        }
        None
    }

    fn api(&self, id: &CapsuleId) -> FirecrackerApi {
        FirecrackerApi::new(&self.files.socket(id))
    }

    fn failed(&self, op: &'static str, id: &CapsuleId, message: impl ToString) -> RuntimeError {
        failed(&self.binary, op, id, message)
    }

    /// The raw disk Firecracker writes: a reflink or sparse copy of the
    /// template's image, next to the spec.
    pub(crate) fn raw_disk(bundle: &Path) -> PathBuf {
        bundle.join("disk.raw")
    }

    /// Start a Firecracker process in the capsule's netns, waiting for its
    /// API socket.
    fn spawn(&self, id: &CapsuleId, bundle: &Path) -> Result<VmSpec, RuntimeError> {
        let spec = VmSpec::load(bundle)?;
        self.files.prepare(id, bundle)?;
        let sock = self.files.socket(id);
        let console = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&spec.console)
            .map_err(io("open", &spec.console))?;
        let child = std::process::Command::new("nsenter")
            .arg(format!("--net={}", spec.netns.display()))
            .arg("--")
            .arg(&self.binary)
            .arg("--api-sock")
            .arg(&sock)
            .arg("--id")
            .arg(id.as_str())
            .stdin(std::process::Stdio::null())
            .stdout(console.try_clone().map_err(io("open", &spec.console))?)
            .stderr(console)
            .process_group(0)
            .spawn()
            .map_err(|e| self.failed("start", id, e))?;
        let pidfile = self.files.pidfile(id);
        std::fs::write(&pidfile, child.id().to_string()).map_err(io("write", &pidfile))?;
        let deadline = Instant::now() + Duration::from_secs(5);
        while !sock.exists() {
            if Instant::now() > deadline {
                self.kill_vmm(id);
                return Err(self.failed("start", id, "the API socket never appeared"));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(spec)
    }

    fn kill_vmm(&self, id: &CapsuleId) {
        if let Some(pid) = self.files.pid(id) {
            // SAFETY: signalling a pid we verified is this VM's Firecracker.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let mut status = 0;
            // SAFETY: reaping our own child (fine if it is not ours).
            unsafe { libc::waitpid(pid, &mut status, 0) };
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.files.pid(id).is_some() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn metadata(id: &CapsuleId, spec: &VmSpec) -> Value {
        json!({ "wrenn": { "capsule_id": id.as_str(), "cmdline": spec.cmdline } })
    }
}

use std::os::unix::process::CommandExt as _;

impl Runtime for FirecrackerRuntime {
    fn name(&self) -> &str {
        "firecracker"
    }

    fn create(&self, id: &CapsuleId, bundle: &Path, _stdio: &Path) -> Result<(), RuntimeError> {
        let spec = VmSpec::load(bundle)?;
        let disk = Self::raw_disk(bundle);
        if !disk.exists() {
            // The spec's disk is the template's raw image for Firecracker.
            crate::cmd::run(
                "cp",
                [
                    std::ffi::OsStr::new("--reflink=auto"),
                    std::ffi::OsStr::new("--sparse=always"),
                    spec.disk.as_os_str(),
                    disk.as_os_str(),
                ],
                None,
            )
            .map_err(|e| self.failed("create", id, e))?;
        }
        let spec = self.spawn(id, bundle)?;
        self.api(id)
            .configure(
                &spec,
                &self.kernel,
                &disk,
                self.tx,
                &Self::metadata(id, &spec),
            )
            .map_err(|e| {
                self.kill_vmm(id);
                self.failed("create", id, e)
            })
    }

    fn start(&self, id: &CapsuleId) -> Result<(), RuntimeError> {
        self.api(id)
            .call(
                "PUT",
                "/actions",
                Some(json!({ "action_type": "InstanceStart" })),
            )
            .map(drop)
            .map_err(|e| self.failed("start", id, e))
    }

    fn state(&self, id: &CapsuleId) -> Result<Option<ContainerState>, RuntimeError> {
        if let Some(pid) = self.files.pid(id) {
            let info = self
                .api(id)
                .call("GET", "/", None)
                .map_err(|e| self.failed("state", id, e))?;
            let status = match info["state"].as_str() {
                Some("Running") => ContainerStatus::Running,
                Some("Paused") => ContainerStatus::Paused,
                _ => ContainerStatus::Created,
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
        self.checkpoint(id, &bundle)
    }

    fn resume(&self, id: &CapsuleId) -> Result<(), RuntimeError> {
        let bundle = self.files.bundle(id)?;
        self.restore(id, &bundle, &bundle, &bundle)?;
        let _ = std::fs::remove_file(bundle.join(PAUSED_STATE));
        let _ = std::fs::remove_file(bundle.join("vmstate.snap"));
        Ok(())
    }

    fn kill(&self, id: &CapsuleId, _signal: &str) -> Result<(), RuntimeError> {
        self.kill_vmm(id);
        Ok(())
    }

    fn delete(&self, id: &CapsuleId) -> Result<(), RuntimeError> {
        self.kill_vmm(id);
        if let Ok(b) = self.files.bundle(id) {
            for f in [PAUSED_STATE, "vmstate.snap", "disk.raw"] {
                let _ = std::fs::remove_file(b.join(f));
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
        let api = self.api(id);
        let fail = |e: ApiError| self.failed("pause", id, e);
        api.call("PATCH", "/vm", Some(json!({ "state": "Paused" })))
            .map_err(fail)?;
        let made = api.call(
            "PUT",
            "/snapshot/create",
            Some(json!({
                "snapshot_type": "Full",
                "snapshot_path": images.join("vmstate.snap"),
                "mem_file_path": images.join(PAUSED_STATE),
            })),
        );
        if let Err(e) = made {
            let _ = api.call("PATCH", "/vm", Some(json!({ "state": "Resumed" })));
            return Err(fail(e));
        }
        self.kill_vmm(id);
        Ok(())
    }

    fn restore(
        &self,
        id: &CapsuleId,
        bundle: &Path,
        images: &Path,
        _stdio: &Path,
    ) -> Result<(), RuntimeError> {
        self.spawn(id, bundle)?;
        self.api(id)
            .call(
                "PUT",
                "/snapshot/load",
                Some(json!({
                    "snapshot_path": images.join("vmstate.snap"),
                    "mem_backend": { "backend_type": "File", "backend_path": images.join(PAUSED_STATE) },
                    "resume_vm": true,
                })),
            )
            .map(drop)
            .map_err(|e| {
                self.kill_vmm(id);
                self.failed("resume", id, e)
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_bucket_refills_the_rate_every_second() {
        let v = tx_rate_limiter(TxLimit {
            rate: 200_000_000,
            burst: 100_000_000,
        });
        assert_eq!(
            v,
            json!({ "bandwidth": { "size": 200_000_000u64, "one_time_burst": 100_000_000u64, "refill_time": 1000 } })
        );
    }

    #[test]
    fn a_missing_binary_is_a_reason_not_a_failure() {
        let why = FirecrackerRuntime::unavailable("no-such-firecracker").unwrap();
        assert!(why.contains("no no-such-firecracker binary"), "{why}");
    }
}
