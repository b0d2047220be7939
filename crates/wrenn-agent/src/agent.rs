//! The capsule manager: every capsule on this host, and every operation on
//! them (the one internal command API the RPC and the proxy call).
//!
//! Concurrency protocol:
//! - `capsules` (a std `RwLock`, never held across an await) maps IDs to
//!   `Arc<Capsule>`; an entry exists from the moment a create is accepted
//!   until its teardown is done, so IDs cannot be reused mid-flight.
//! - Each capsule's lifecycle operations (create, pause, resume,
//!   hibernate, snapshot, destroy) take its `op` lock, then ask
//!   [`crate::state::transition`] whether they are legal *now*. Races
//!   between them are thereby decided in one place, in arrival order.
//! - Data operations (exec, files, PTY) only check that the capsule is
//!   running when they start; they never hold `op`, so a long stream does
//!   not block a pause or destroy (which cut it off).
//! - Setup and teardown steps touch the kernel and run runtime CLIs: they
//!   run on blocking threads.

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use envd_client::EnvdClient;
use wrenn_types::envd::{InitRequest, ENVD_PRIORITY_BOOST};
use wrenn_types::ids::{CapsuleId, TemplateName};

use crate::cgroup::{Cgroups, Usage};
use crate::config::{AgentConfig, ConfigError};
use crate::error::AgentError;
use crate::network::{self, Firewall, Pool, Slot};
use crate::record::{CapsuleDir, CapsuleRecord, OnTimeout, Undo, METRICS_FILE, RECORD_FILE};
use crate::rootfs::{self, Overlay};
use crate::runtime::spec::{self, BundleParams};
use crate::runtime::vm::firecracker::{FirecrackerRuntime, TxLimit};
use crate::runtime::vm::{self, image::GuestKernel, QemuRuntime, VmSpec};
use crate::runtime::{criu_works, ContainerStatus, OciRuntime, Runtime};
use crate::state::{transition, CapsuleState, Op};
use crate::template::{self, Engine, RuntimeChoice, TemplateMeta, TemplateStore};

const PATH_ENV: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
const HOSTNAME: &str = "capsule";
/// Pause between two runs of a template's ready command.
const READY_POLL: Duration = Duration::from_millis(200);

/// What a caller asks for when creating a capsule.
/// What a snapshot's template starts capsules with, when it should differ
/// from the capsule it was taken from (recipe builds: START, ENV, USER).
#[derive(Debug, Clone, Default)]
pub struct SnapshotOverrides {
    pub start_cmd: Option<String>,
    pub ready_cmd: Option<String>,
    pub env: BTreeMap<String, String>,
    pub default_user: Option<String>,
}

#[derive(Debug, Clone)]
pub struct CreateRequest {
    pub id: CapsuleId,
    pub template: TemplateName,
    pub vcpus: u32,
    pub memory_mb: u64,
    pub timeout_sec: u64,
    pub on_timeout: OnTimeout,
    pub internet: bool,
    pub env: BTreeMap<String, String>,
    pub default_user: Option<String>,
    pub metadata: BTreeMap<String, String>,
    pub access_token: Option<String>,
    pub pids_limit: Option<i64>,
    /// The template's engine unless set.
    pub engine: Option<Engine>,
}

impl CreateRequest {
    /// A request with wrenn's defaults (1 vCPU, 512 MiB, no timeout, internet on).
    pub fn new(id: CapsuleId, template: TemplateName) -> Self {
        CreateRequest {
            id,
            template,
            vcpus: 1,
            memory_mb: 512,
            timeout_sec: 0,
            on_timeout: OnTimeout::Pause,
            internet: true,
            env: BTreeMap::new(),
            default_user: None,
            metadata: BTreeMap::new(),
            access_token: None,
            pids_limit: None,
            engine: None,
        }
    }
}

/// A capsule as callers see it.
#[derive(Debug, Clone, PartialEq)]
pub struct CapsuleInfo {
    pub id: CapsuleId,
    pub template: TemplateName,
    pub state: CapsuleState,
    pub memory_kept: bool,
    pub error: Option<String>,
    pub vcpus: u32,
    pub memory_mb: u64,
    pub timeout_sec: u64,
    pub internet: bool,
    pub ip: Option<Ipv4Addr>,
    pub runtime: String,
    pub engine: Engine,
    pub created_at: u64,
    pub last_active_at: u64,
    pub metadata: BTreeMap<String, String>,
}

/// Counters of one capsule, read when asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CapsuleMetrics {
    pub at_ms: u64,
    pub usage: Usage,
    pub disk_bytes: u64,
}

/// One capsule on this host.
#[derive(Debug)]
pub struct Capsule {
    pub id: CapsuleId,
    /// Directory, container and cgroup name (see [`CapsuleRecord::container`]).
    container: CapsuleId,
    dir: CapsuleDir,
    rec: Mutex<CapsuleRecord>,
    op: Arc<tokio::sync::Mutex<()>>,
    envd: RwLock<Option<Arc<EnvdClient>>>,
    runtime: Arc<dyn Runtime>,
    /// What the metrics sampler saw ([`crate::history`]).
    samples: Mutex<crate::history::History>,
    /// Counts the capsule's pauses: a stream relayed from its envd ends
    /// when it moves (a frozen envd would leave it open, silent, for good).
    pauses: tokio::sync::watch::Sender<u64>,
}

pub use crate::history::SAMPLES_KEPT;

impl Capsule {
    fn state(&self) -> CapsuleState {
        self.rec.lock().unwrap().state
    }

    fn record(&self) -> CapsuleRecord {
        self.rec.lock().unwrap().clone()
    }

    /// Change the record and persist it.
    fn update(&self, f: impl FnOnce(&mut CapsuleRecord)) -> Result<(), AgentError> {
        let mut rec = self.rec.lock().unwrap();
        f(&mut rec);
        rec.save(&self.dir)
    }

    /// Register a teardown step *before* doing the step it undoes (undo
    /// steps tolerate work that was never done, not work left half-done).
    fn push_undo(&self, u: Undo) -> Result<(), AgentError> {
        self.update(|r| r.undo.push(u))
    }

    /// The capsule's envd client (set once its address is known).
    pub fn envd(&self) -> Arc<EnvdClient> {
        self.envd
            .read()
            .unwrap()
            .clone()
            .expect("envd client is set before the capsule runs")
    }

    fn set_envd(&self, client: EnvdClient) {
        *self.envd.write().unwrap() = Some(Arc::new(client));
    }

    fn slot(&self) -> Option<Slot> {
        self.rec.lock().unwrap().slot.clone()
    }

    /// Activity, for the inactivity timeout: a data call, and output
    /// relayed to a client (a command that prints while someone watches is
    /// not idle, however long it runs).
    pub(crate) fn touch(&self) {
        self.rec.lock().unwrap().last_active_at = now_ms();
    }

    /// A snapshot leaves the capsule paused: recorded while the snapshot
    /// still holds the capsule's lock (recorded after it, a pause that got
    /// the lock in between found a frozen container recorded running, and
    /// failed with runc's "container not running").
    fn snapshotted(&self) -> Result<(), AgentError> {
        let was = self.state();
        self.update(|r| r.state = CapsuleState::Paused)?;
        if was == CapsuleState::Running {
            self.pauses.send_modify(|n| *n += 1);
        }
        Ok(())
    }

    /// Whether a destroy has begun (its state is recorded `stopped` before
    /// the teardown, so an operation that the teardown cut short sees it).
    pub(crate) fn destroyed(&self) -> bool {
        self.state() == CapsuleState::Stopped
    }

    /// Follows the capsule's pauses from now on (see [`Capsule::pauses`]).
    pub fn watch_pauses(&self) -> tokio::sync::watch::Receiver<u64> {
        self.pauses.subscribe()
    }
}

/// The manager.
#[derive(Debug)]
pub struct Agent {
    cfg: AgentConfig,
    templates: TemplateStore,
    pool: Pool,
    firewall: Firewall,
    cgroups: Cgroups,
    criu: bool,
    capsules_dir: PathBuf,
    runtimes: Mutex<HashMap<RuntimeChoice, Arc<dyn Runtime>>>,
    capsules: RwLock<HashMap<CapsuleId, Arc<Capsule>>>,
    auto_paused: Mutex<Vec<CapsuleId>>,
    /// Each pause of the reaper, as it happens (for the control plane; the
    /// drained list above is what a reconciliation reads if one was lost).
    auto_pauses: tokio::sync::broadcast::Sender<CapsuleId>,
    on_destroy: Hooks,
    /// Ready capsules per template and engine, not yet anyone's (not in
    /// `capsules`).
    warm: Mutex<HashMap<PoolKey, Vec<Arc<Capsule>>>>,
    /// Slots whose network (netns, veth, shaping, firewall elements with
    /// internet on) is set up and that no capsule owns yet: creation takes
    /// one instead of building it.
    ready_net: Mutex<Vec<u32>>,
    /// Poked when a warm capsule or a ready slot is taken.
    pools_wanted: tokio::sync::Notify,
    /// The microVM engine, prepared on first use (kernel, initramfs).
    vm: Mutex<Option<Arc<VmEngine>>>,
    /// The VMM driver (QEMU, or Firecracker where configured).
    vmm: Mutex<Option<Arc<dyn Runtime>>>,
    /// Serialises the builds of templates' VM disks.
    vm_disks: Mutex<()>,
    /// What every request to this agent must carry ([`crate::auth`]).
    token: Arc<str>,
}

/// A warm pool: its template and the engine its capsules run on.
type PoolKey = (TemplateName, Engine);

/// What every VM capsule of this agent boots with.
#[derive(Debug)]
struct VmEngine {
    kernel: GuestKernel,
    initrd: PathBuf,
}

/// Called with the ID of every capsule destroyed (cache eviction).
pub type DestroyHook = Box<dyn Fn(&CapsuleId) + Send + Sync>;

#[derive(Default)]
struct Hooks(Mutex<Vec<DestroyHook>>);

impl std::fmt::Debug for Hooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} hooks", self.0.lock().unwrap().len())
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f)
        .await
        .expect("blocking task does not panic")
}

impl Agent {
    /// Validate the configuration, prepare the host (forwarding, firewall,
    /// the `busybox` template), re-adopt the capsules of a previous run and
    /// sweep what crashed runs left behind.
    pub async fn open(cfg: AgentConfig) -> Result<Arc<Agent>, OpenError> {
        cfg.validate()?;
        blocking(move || Agent::open_blocking(cfg)).await
    }

    fn open_blocking(cfg: AgentConfig) -> Result<Arc<Agent>, OpenError> {
        let templates = TemplateStore::open(cfg.data_dir.join("templates"))?;
        templates.sweep();
        let capsules_dir = cfg.data_dir.join("capsules");
        std::fs::create_dir_all(&capsules_dir).map_err(AgentError::io("create", &capsules_dir))?;
        template::build_busybox(&templates, &cfg.busybox_bin)?;
        let token = crate::auth::load_or_create(&cfg.data_dir).map_err(AgentError::io(
            "create",
            &cfg.data_dir.join(crate::auth::TOKEN_FILE),
        ))?;
        network::enable_forwarding().map_err(AgentError::io(
            "enable",
            "/proc/sys/net/ipv4/ip_forward".as_ref(),
        ))?;
        let cgroups = Cgroups::host();
        let agent = Arc::new(Agent {
            pool: Pool::new(cfg.network.pool),
            firewall: Firewall::new(&cfg.instance, cfg.network.pool),
            criu: criu_works(),
            templates,
            cgroups,
            capsules_dir,
            runtimes: Mutex::new(HashMap::new()),
            capsules: RwLock::new(HashMap::new()),
            auto_paused: Mutex::new(Vec::new()),
            auto_pauses: tokio::sync::broadcast::channel(256).0,
            on_destroy: Hooks::default(),
            warm: Mutex::new(HashMap::new()),
            ready_net: Mutex::new(Vec::new()),
            pools_wanted: tokio::sync::Notify::new(),
            vm: Mutex::new(None),
            vmm: Mutex::new(None),
            vm_disks: Mutex::new(()),
            token: token.into(),
            cfg,
        });
        // Fail fast when the default runtime is not installed.
        agent.runtime_for(&agent.cfg.runtime.clone())?;
        agent.adopt()?;
        Ok(agent)
    }

    /// Register a hook run after every destroy.
    pub fn on_destroy(&self, hook: DestroyHook) {
        self.on_destroy.0.lock().unwrap().push(hook);
    }

    pub fn config(&self) -> &AgentConfig {
        &self.cfg
    }

    /// The token clients of this agent present ([`crate::auth`]).
    pub fn token(&self) -> &Arc<str> {
        &self.token
    }

    pub fn templates(&self) -> &TemplateStore {
        &self.templates
    }

    pub fn cgroups(&self) -> &Cgroups {
        &self.cgroups
    }

    /// The cgroup path a capsule's limits live under.
    pub fn cgroup_path(&self, id: &CapsuleId) -> String {
        format!("/{}/{}", self.cfg.instance, id)
    }

    pub fn capsule_dir(&self, id: &CapsuleId) -> PathBuf {
        self.capsules_dir.join(id.as_str())
    }

    /// Whether hibernation keeps memory on this host.
    pub fn can_checkpoint(&self) -> bool {
        self.criu
    }

    /// The runtime of a capsule with this engine and OCI runtime choice.
    fn runtime_of(
        &self,
        engine: Engine,
        choice: &RuntimeChoice,
    ) -> Result<Arc<dyn Runtime>, AgentError> {
        match engine {
            Engine::Oci => self.runtime_for(choice),
            Engine::Vm => Ok(self.vm_runtime()?),
        }
    }

    /// The VMM driver (no kernel needed: enough to adopt and tear down).
    fn vm_runtime(&self) -> Result<Arc<dyn Runtime>, AgentError> {
        let mut slot = self.vmm.lock().unwrap();
        if let Some(rt) = &*slot {
            return Ok(rt.clone());
        }
        let rt: Arc<dyn Runtime> = match &self.cfg.vm.firecracker {
            Some(fc) => {
                if !crate::cmd::on_path(&fc.binary) {
                    return Err(crate::runtime::RuntimeError::Missing {
                        binary: fc.binary.clone(),
                    }
                    .into());
                }
                Arc::new(FirecrackerRuntime::new(
                    &fc.binary,
                    &fc.vmlinux,
                    &self.cfg.state_root,
                    TxLimit {
                        rate: self.cfg.network.egress_rate,
                        burst: self.cfg.network.egress_burst,
                    },
                ))
            }
            None => {
                let rt = QemuRuntime::new(
                    &self.cfg.vm.qemu,
                    vm::Accel::detect(),
                    &self.cfg.state_root,
                    self.cgroups.clone(),
                );
                if !rt.installed() {
                    return Err(crate::runtime::RuntimeError::Missing {
                        binary: self.cfg.vm.qemu.clone(),
                    }
                    .into());
                }
                Arc::new(rt)
            }
        };
        *slot = Some(rt.clone());
        Ok(rt)
    }

    /// The VM engine, preparing it the first time: the guest kernel
    /// (downloaded when the configured directory has none) and the
    /// initramfs (rebuilt when envd changes).
    fn vm_engine(&self) -> Result<Arc<VmEngine>, AgentError> {
        let mut slot = self.vm.lock().unwrap();
        if let Some(vm) = &*slot {
            return Ok(vm.clone());
        }
        let dir = &self.cfg.vm.kernel_dir;
        let kernel = match GuestKernel::find(dir) {
            Ok(k) => k,
            Err(_) if dir.is_file() => {
                GuestKernel::from_image(dir, self.cfg.vm.modules.as_deref())?
            }
            Err(_) => {
                tracing::info!(dir = %dir.display(), "downloading Debian's cloud kernel for VM capsules");
                GuestKernel::fetch_debian(dir)?
            }
        };
        let envd_id = std::fs::metadata(&self.cfg.envd_bin)
            .map(|m| {
                use std::os::unix::fs::MetadataExt;
                format!("{:x}-{:x}", m.size(), m.mtime())
            })
            .map_err(AgentError::io("read", &self.cfg.envd_bin))?;
        let initrd = self
            .cfg
            .data_dir
            .join("vm")
            .join(format!("initramfs-{}-{envd_id}.cpio", kernel.release));
        if !initrd.is_file() {
            vm::image::build_initramfs(
                &kernel,
                &self.cfg.envd_bin,
                &self.cfg.busybox_bin,
                &initrd,
            )?;
        }
        let vm = Arc::new(VmEngine { kernel, initrd });
        *slot = Some(vm.clone());
        Ok(vm)
    }

    /// The ext4 image of `meta`'s rootfs, built on first use.
    fn vm_disk(&self, meta: &TemplateMeta) -> Result<PathBuf, AgentError> {
        let disk = self.templates.dir_of(&meta.name).join("vm-root.ext4");
        let _one_at_a_time = self.vm_disks.lock().unwrap();
        if !disk.is_file() {
            let layers = self.templates.lower_dirs(meta)?;
            let t0 = std::time::Instant::now();
            vm::image::build_root_disk(&layers, &disk, self.cfg.vm.disk_mb)?;
            tracing::info!(template = %meta.name, ms = t0.elapsed().as_millis() as u64, "built the template's VM disk");
        }
        Ok(disk)
    }

    fn runtime_for(&self, choice: &RuntimeChoice) -> Result<Arc<dyn Runtime>, AgentError> {
        let mut map = self.runtimes.lock().unwrap();
        if let Some(rt) = map.get(choice) {
            return Ok(rt.clone());
        }
        let rt = OciRuntime::new(
            &choice.binary,
            choice.args.clone(),
            &self.cfg.state_root,
            self.cgroups.mode,
        )
        .with_criu(self.criu);
        if !rt.installed() {
            return Err(crate::runtime::RuntimeError::Missing {
                binary: choice.binary.clone(),
            }
            .into());
        }
        let rt: Arc<dyn Runtime> = Arc::new(rt);
        map.insert(choice.clone(), rt.clone());
        Ok(rt)
    }

    fn get(&self, id: &CapsuleId) -> Result<Arc<Capsule>, AgentError> {
        self.capsules
            .read()
            .unwrap()
            .get(id)
            .cloned()
            .ok_or_else(|| AgentError::NotFound(id.clone()))
    }

    fn info(&self, c: &Capsule) -> CapsuleInfo {
        let r = c.rec.lock().unwrap();
        let mut metadata = r.metadata.clone();
        metadata.insert("agent_version".into(), env!("CARGO_PKG_VERSION").into());
        metadata.insert("runtime".into(), c.runtime.name().into());
        metadata.insert("engine".into(), r.engine.to_string());
        CapsuleInfo {
            id: r.id.clone(),
            template: r.template.clone(),
            state: r.state,
            memory_kept: r.memory_kept,
            error: r.error.clone(),
            vcpus: r.vcpus,
            memory_mb: r.memory_mb,
            timeout_sec: r.timeout_sec,
            internet: r.internet,
            ip: r.slot.as_ref().map(|s| s.capsule_ip),
            runtime: c.runtime.name().to_owned(),
            engine: r.engine,
            created_at: r.created_at,
            last_active_at: r.last_active_at,
            metadata,
        }
    }

    pub fn list(&self) -> Vec<CapsuleInfo> {
        let caps: Vec<_> = self.capsules.read().unwrap().values().cloned().collect();
        let mut v: Vec<_> = caps.iter().map(|c| self.info(c)).collect();
        v.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
        v
    }

    pub fn info_of(&self, id: &CapsuleId) -> Result<CapsuleInfo, AgentError> {
        Ok(self.info(&*self.get(id)?))
    }

    /// Capsules the reaper paused since the last call (drained).
    pub fn take_auto_paused(&self) -> Vec<CapsuleId> {
        std::mem::take(&mut self.auto_paused.lock().unwrap())
    }

    /// The capsules the reaper pauses from now on, one by one as it does.
    pub fn subscribe_auto_pauses(&self) -> tokio::sync::broadcast::Receiver<CapsuleId> {
        self.auto_pauses.subscribe()
    }

    // ---- create -------------------------------------------------------

    pub async fn create(self: &Arc<Self>, req: CreateRequest) -> Result<CapsuleInfo, AgentError> {
        validate(&req)?;
        let meta = self.templates.get(&req.template)?;
        if self.capsules.read().unwrap().contains_key(&req.id) {
            return Err(AgentError::AlreadyExists(req.id));
        }
        if let Some(warm) = self.take_warm(&req, &meta) {
            return self.claim(warm, req, &meta).await;
        }
        let capsule = self.new_capsule(&req, &meta, req.id.clone())?;
        {
            let mut map = self.capsules.write().unwrap();
            if map.contains_key(&req.id) {
                return Err(AgentError::AlreadyExists(req.id));
            }
            map.insert(req.id.clone(), capsule.clone());
        }
        let result = self.start_new(&capsule, &meta).await;
        if result.is_err() {
            self.capsules.write().unwrap().remove(&req.id);
        }
        result?;
        tracing::info!(capsule_id = %req.id, template = %req.template, "capsule running");
        Ok(self.info(&capsule))
    }

    /// A capsule object for `req`, not yet set up, known to the host as
    /// `container`.
    fn new_capsule(
        &self,
        req: &CreateRequest,
        meta: &TemplateMeta,
        container: CapsuleId,
    ) -> Result<Arc<Capsule>, AgentError> {
        let choice = meta
            .runtime
            .clone()
            .unwrap_or_else(|| self.cfg.runtime.clone());
        let engine = req.engine.unwrap_or(meta.engine);
        let runtime = self.runtime_of(engine, &choice)?;
        let mut rec = CapsuleRecord {
            id: req.id.clone(),
            container: container.clone(),
            warm: false,
            template: req.template.clone(),
            state: CapsuleState::Pending,
            memory_kept: true,
            error: None,
            vcpus: req.vcpus,
            memory_mb: req.memory_mb,
            pids_limit: req.pids_limit.unwrap_or(self.cfg.default_pids),
            timeout_sec: 0,
            on_timeout: OnTimeout::Pause,
            internet: req.internet,
            env: BTreeMap::new(),
            default_user: None,
            metadata: BTreeMap::new(),
            access_token: None,
            runtime: choice,
            engine,
            start_cmd: meta.start_cmd.clone(),
            ready_cmd: meta.ready_cmd.clone(),
            slot: None,
            created_at: 0,
            last_active_at: 0,
            undo: Vec::new(),
        };
        apply_request(&mut rec, req, meta);
        Ok(Arc::new(Capsule {
            id: req.id.clone(),
            dir: CapsuleDir(self.capsule_dir(&container)),
            container,
            rec: Mutex::new(rec),
            op: Arc::new(tokio::sync::Mutex::new(())),
            envd: RwLock::new(None),
            runtime,
            samples: Mutex::default(),
            pauses: Default::default(),
        }))
    }

    /// Boot a new capsule; on failure, undo every step taken.
    async fn start_new(
        self: &Arc<Self>,
        capsule: &Arc<Capsule>,
        meta: &TemplateMeta,
    ) -> Result<(), AgentError> {
        let _op = capsule.op.lock().await;
        let result = match self.boot(capsule, meta).await {
            Ok(()) => capsule.update(|r| {
                r.state = transition(CapsuleState::Pending, Op::Start).expect("pending starts");
                r.last_active_at = now_ms();
            }),
            Err(e) => Err(e),
        };
        if let Err(e) = &result {
            tracing::warn!(capsule_id = %capsule.id, error = %e, "create failed; tearing down");
            self.teardown(capsule).await;
        }
        result
    }

    // ---- warm pools ---------------------------------------------------

    /// A ready capsule from the warm pool of `req`'s template and engine,
    /// if the request has the pool's shape.
    fn take_warm(&self, req: &CreateRequest, meta: &TemplateMeta) -> Option<Arc<Capsule>> {
        let engine = req.engine.unwrap_or(meta.engine);
        let spec =
            self.cfg.warm_pools.iter().find(|w| {
                w.template == req.template && w.engine.unwrap_or(meta.engine) == engine
            })?;
        let shape_fits = req.vcpus == spec.vcpus
            && req.memory_mb == spec.memory_mb
            && req.pids_limit.is_none_or(|p| p == self.cfg.default_pids);
        if !shape_fits {
            return None;
        }
        let taken = self
            .warm
            .lock()
            .unwrap()
            .get_mut(&(req.template.clone(), engine))?
            .pop();
        self.pools_wanted.notify_one();
        taken
    }

    /// Give a warm capsule its identity and settings: a new record under
    /// the requested ID, internet as asked, and a fresh `/init`.
    async fn claim(
        self: &Arc<Self>,
        warm: Arc<Capsule>,
        req: CreateRequest,
        meta: &TemplateMeta,
    ) -> Result<CapsuleInfo, AgentError> {
        let mut rec = warm.record();
        apply_request(&mut rec, &req, meta);
        rec.warm = false;
        let c = Arc::new(Capsule {
            id: req.id.clone(),
            container: warm.container.clone(),
            dir: warm.dir.clone(),
            rec: Mutex::new(rec),
            op: Arc::new(tokio::sync::Mutex::new(())),
            envd: RwLock::new(warm.envd.read().unwrap().clone()),
            runtime: warm.runtime.clone(),
            samples: Mutex::default(),
            pauses: Default::default(),
        });
        let taken = {
            let mut map = self.capsules.write().unwrap();
            let taken = map.contains_key(&req.id);
            if !taken {
                map.insert(req.id.clone(), c.clone());
            }
            taken
        };
        if taken {
            let agent = self.clone();
            blocking(move || agent.teardown_blocking(&warm)).await;
            return Err(AgentError::AlreadyExists(req.id));
        }
        // Holding the capsule's lock through a failed claim's teardown, so a
        // concurrent destroy cannot run the same cleanup stack alongside.
        let op = c.op.clone().lock_owned().await;
        let result = self.finish_claim(&c).await;
        if let Err(e) = result {
            tracing::warn!(capsule_id = %req.id, error = %e, "claiming a warm capsule failed; tearing down");
            self.teardown(&c).await;
            {
                let mut map = self.capsules.write().unwrap();
                if map.get(&req.id).is_some_and(|now| Arc::ptr_eq(now, &c)) {
                    map.remove(&req.id);
                }
            }
            for hook in self.on_destroy.0.lock().unwrap().iter() {
                hook(&req.id);
            }
            return Err(e);
        }
        drop(op);
        tracing::info!(capsule_id = %req.id, container = %c.container, "capsule running (from the warm pool)");
        Ok(self.info(&c))
    }

    /// The rest of a claim; the caller holds the capsule's lock.
    async fn finish_claim(self: &Arc<Self>, c: &Arc<Capsule>) -> Result<(), AgentError> {
        c.update(|_| {})?;
        let r = c.record();
        if !r.internet {
            let (fw, slot) = (
                self.firewall.clone(),
                r.slot.clone().expect("warm capsules have a slot"),
            );
            blocking(move || fw.set_internet(&slot, false)).await?;
        }
        self.start_envd(c).await?;
        if let (Some(_), Some(slot)) = (&r.access_token, &r.slot) {
            // /init set the token; from now on every call must carry it.
            c.set_envd(self.envd_client(c, slot)?);
        }
        Ok(())
    }

    /// Top up every warm pool to its size.
    pub async fn fill_warm_pools(self: &Arc<Self>) {
        for spec in self.cfg.warm_pools.clone() {
            self.fill_warm_pool(&spec, spec.size).await;
        }
    }

    /// Top the pool of `template` up to `size` (benchmarks, tests).
    pub async fn fill_warm_pools_to(self: &Arc<Self>, template: &TemplateName, size: usize) {
        if let Some(spec) = self
            .cfg
            .warm_pools
            .iter()
            .find(|w| w.template == *template)
            .cloned()
        {
            self.fill_warm_pool(&spec, size).await;
        }
    }

    async fn fill_warm_pool(self: &Arc<Self>, spec: &crate::config::WarmPool, size: usize) {
        loop {
            let made = async {
                let meta = self.templates.get(&spec.template)?;
                let key = (spec.template.clone(), spec.engine.unwrap_or(meta.engine));
                if self.warm.lock().unwrap().get(&key).map_or(0, Vec::len) >= size {
                    return Ok(None);
                }
                let id = CapsuleId::random();
                let mut req = CreateRequest::new(id.clone(), spec.template.clone());
                req.vcpus = spec.vcpus;
                req.memory_mb = spec.memory_mb;
                req.engine = spec.engine;
                let c = self.new_capsule(&req, &meta, id)?;
                c.rec.lock().unwrap().warm = true;
                self.start_new(&c, &meta).await?;
                Ok::<_, AgentError>(Some((key, c)))
            };
            match made.await {
                Ok(Some((key, c))) => self.warm.lock().unwrap().entry(key).or_default().push(c),
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!(template = %spec.template, error = %e, "cannot fill the warm pool");
                    return;
                }
            }
        }
    }

    /// Set up networks for free slots until `net_pool` are ready.
    pub async fn fill_net_pool(self: &Arc<Self>) {
        let agent = self.clone();
        blocking(move || {
            while agent.ready_net.lock().unwrap().len() < agent.cfg.net_pool {
                let Ok(index) = agent.pool.allocate() else {
                    return;
                };
                let slot = Slot::new(&agent.cfg.instance, index, &agent.cfg.network.pool);
                let prepared = network::create(&agent.cfg.network, &slot)
                    .and_then(|()| agent.firewall.add(&slot, true));
                if let Err(e) = prepared {
                    tracing::warn!(error = %e, "cannot prepare a network slot");
                    let _ = agent.firewall.remove(&slot, true);
                    let _ = network::destroy(&slot);
                    agent.pool.release(index);
                    return;
                }
                agent.ready_net.lock().unwrap().push(index);
            }
        })
        .await
    }

    /// Tear down what the pools hold (ready networks, warm capsules): at
    /// shutdown, since nobody owns them.
    pub async fn drain_pools(self: &Arc<Self>) {
        let warm: Vec<_> = self
            .warm
            .lock()
            .unwrap()
            .drain()
            .flat_map(|(_, v)| v)
            .collect();
        for c in warm {
            self.teardown(&c).await;
        }
        let agent = self.clone();
        blocking(move || {
            let ready: Vec<u32> = std::mem::take(&mut *agent.ready_net.lock().unwrap());
            for index in ready {
                let slot = Slot::new(&agent.cfg.instance, index, &agent.cfg.network.pool);
                let _ = agent.firewall.remove(&slot, true);
                if let Err(e) = network::destroy(&slot) {
                    tracing::warn!(error = %e, "removing a prepared network slot");
                }
                agent.pool.release(index);
            }
        })
        .await
    }

    /// Keep the network and warm pools full until shutdown (refilled after
    /// each take).
    pub async fn run_warm_pools(self: Arc<Self>, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => return,
                _ = async { self.fill_net_pool().await; self.fill_warm_pools().await } => {}
            }
            tokio::select! {
                _ = &mut shutdown => return,
                _ = self.pools_wanted.notified() => {}
                _ = tokio::time::sleep(std::time::Duration::from_secs(10)) => {}
            }
        }
    }

    /// Ready capsules waiting in the pool of `template`.
    /// Warm capsules of `template`, of any engine.
    pub fn warm_count(&self, template: &TemplateName) -> usize {
        self.warm
            .lock()
            .unwrap()
            .iter()
            .filter(|((t, _), _)| t == template)
            .map(|(_, v)| v.len())
            .sum()
    }

    /// Every setup step of a new capsule, each registering its undo first.
    async fn boot(
        self: &Arc<Self>,
        c: &Arc<Capsule>,
        meta: &TemplateMeta,
    ) -> Result<(), AgentError> {
        let (agent, cap, meta) = (self.clone(), c.clone(), meta.clone());
        blocking(move || agent.setup(&cap, &meta)).await?;
        self.start_envd(c).await
    }

    fn setup(&self, c: &Capsule, meta: &TemplateMeta) -> Result<(), AgentError> {
        let dir = &c.dir;
        if dir.0.exists() {
            return Err(AgentError::AlreadyExists(c.id.clone()));
        }
        std::fs::create_dir_all(&dir.0).map_err(AgentError::io("create", &dir.0))?;
        c.update(|r| {
            r.undo.push(Undo::RemoveDir);
            r.state = CapsuleState::Starting;
        })?;

        let (index, ready) = match self.ready_net.lock().unwrap().pop() {
            Some(i) => (i, true),
            None => (self.pool.allocate()?, false),
        };
        self.pools_wanted.notify_one();
        c.update(|r| {
            r.slot = Some(Slot::new(&self.cfg.instance, index, &self.cfg.network.pool));
            r.undo.push(Undo::ReleaseSlot);
            if ready {
                // A prepared slot comes with its network and firewall
                // elements: the capsule's to undo from the moment its
                // record names the slot (an agent killed before a later
                // save would otherwise leave them to nobody: the slot is
                // owned, so not swept, and never torn down).
                r.undo.push(Undo::DestroyNetwork);
                r.undo.push(Undo::FirewallRules);
            }
        })?;
        let slot = c.slot().expect("just set");
        c.set_envd(self.envd_client(c, &slot)?);

        let t0 = std::time::Instant::now();
        let internet = c.record().internet;
        if !ready {
            c.push_undo(Undo::DestroyNetwork)?;
            network::create(&self.cfg.network, &slot)?;
            c.push_undo(Undo::FirewallRules)?;
            self.firewall.add(&slot, internet)?;
        } else if !internet {
            // Prepared slots come with internet on.
            self.firewall.set_internet(&slot, false)?;
        }
        let t_net = t0.elapsed();

        if c.record().engine == Engine::Vm {
            return self.setup_vm(c, meta, &slot, t0);
        }
        self.write_etc(c, &slot)?;
        let lowers = self.templates.lower_dirs(meta)?;
        c.push_undo(Undo::UnmountRootfs)?;
        self.overlay(dir, lowers).mount()?;
        self.write_bundle(c, &slot, meta.allow_setuid)?;
        let t_fs = t0.elapsed();
        c.push_undo(Undo::DeleteContainer)?;
        self.start_container(c)?;
        tracing::debug!(
            capsule_id = %c.id,
            network_ms = t_net.as_millis() as u64,
            rootfs_ms = (t_fs - t_net).as_millis() as u64,
            container_ms = (t0.elapsed() - t_fs).as_millis() as u64,
            "capsule set up"
        );
        Ok(())
    }

    /// The VM half of [`Agent::setup`], after the network: a TAP for the
    /// VMM, the template's disk and the capsule's overlay, the VMM.
    fn setup_vm(
        &self,
        c: &Capsule,
        meta: &TemplateMeta,
        slot: &Slot,
        t0: std::time::Instant,
    ) -> Result<(), AgentError> {
        let engine = self.vm_engine()?;
        network::attach_tap(slot)?;
        let t_net = t0.elapsed();
        let base = self.vm_disk(meta)?;
        let bundle = c.dir.bundle();
        std::fs::create_dir_all(&bundle).map_err(AgentError::io("create", &bundle))?;
        let disk = if self.cfg.vm.firecracker.is_some() {
            // Firecracker takes raw disks: it copies the image itself.
            base
        } else {
            let disk = bundle.join("disk.qcow2");
            vm::image::create_overlay(&base, &disk)?;
            disk
        };
        let r = c.record();
        let tsc_khz = match vm::Accel::detect() {
            vm::Accel::Tcg => vm::image::host_tsc_khz(),
            vm::Accel::Kvm => None,
        };
        let cmdline = vm::image::cmdline(&vm::image::BootParams {
            tsc_khz,
            capsule_id: r.id.as_str(),
            template: r.template.as_str(),
            ip: slot.capsule_ip,
            prefix: 30,
            gateway: slot.host_ip,
            nameservers: &self.cfg.network.nameservers,
            hostname: HOSTNAME,
            default_user: r.default_user.as_deref(),
            start_cmd: r.start_cmd.as_deref(),
        })?;
        VmSpec {
            kernel: engine.kernel.vmlinuz.clone(),
            initrd: engine.initrd.clone(),
            disk,
            netns: slot.netns_path(),
            tap: network::VM_TAP.into(),
            mac: vm::mac_for(slot.capsule_ip),
            vcpus: r.vcpus,
            memory_mb: r.memory_mb,
            cmdline,
            cgroup: self.cgroup_path(&c.container),
            console: c.dir.log(),
        }
        .save(&bundle)?;
        let t_fs = t0.elapsed();
        c.push_undo(Undo::DeleteContainer)?;
        c.runtime.run(&c.container, &bundle, &c.dir.log())?;
        tracing::debug!(
            capsule_id = %c.id,
            network_ms = t_net.as_millis() as u64,
            disk_ms = (t_fs - t_net).as_millis() as u64,
            vmm_ms = (t0.elapsed() - t_fs).as_millis() as u64,
            "VM capsule set up"
        );
        Ok(())
    }

    fn envd_client(&self, c: &Capsule, slot: &Slot) -> Result<EnvdClient, AgentError> {
        let url = format!(
            "http://{}:{}",
            slot.capsule_ip,
            wrenn_types::envd::ENVD_PORT
        );
        let token = c.rec.lock().unwrap().access_token.clone();
        let client = match token {
            Some(t) => EnvdClient::with_access_token(&url, &t),
            None => EnvdClient::new(&url),
        };
        client.map_err(|source| AgentError::Envd {
            id: c.id.clone(),
            what: "client",
            source: Box::new(source),
        })
    }

    fn overlay(&self, dir: &CapsuleDir, lowers: Vec<PathBuf>) -> Overlay {
        Overlay {
            lowers,
            upper: dir.upper(),
            work: dir.work(),
            merged: dir.rootfs(),
        }
    }

    fn write_etc(&self, c: &Capsule, slot: &Slot) -> Result<(), AgentError> {
        let etc = c.dir.etc();
        std::fs::create_dir_all(&etc).map_err(AgentError::io("create", &etc))?;
        let hosts = format!(
            "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n{}\t{HOSTNAME}\n",
            slot.capsule_ip
        );
        let files = [
            (
                "resolv.conf",
                network::resolv_conf(&self.cfg.network.nameservers),
            ),
            ("hosts", hosts),
            ("hostname", format!("{HOSTNAME}\n")),
        ];
        for (name, text) in files {
            let p = etc.join(name);
            std::fs::write(&p, text).map_err(AgentError::io("write", &p))?;
        }
        Ok(())
    }

    fn write_bundle(&self, c: &Capsule, slot: &Slot, allow_setuid: bool) -> Result<(), AgentError> {
        let r = c.record();
        let spec = spec::build(&BundleParams {
            hostname: HOSTNAME.into(),
            rootfs: c.dir.rootfs(),
            envd: self.cfg.envd_bin.clone(),
            etc_dir: c.dir.etc(),
            netns: slot.netns_path(),
            cgroups_path: self.cgroup_path(&c.container),
            vcpus: r.vcpus,
            memory_mb: r.memory_mb,
            pids: r.pids_limit,
            env: vec![PATH_ENV.into(), "HOME=/root".into()],
            default_user: r.default_user.clone(),
            start_cmd: r.start_cmd.clone(),
            allow_setuid,
            nofile: nofile_limit(),
        })?;
        let path = c.dir.bundle().join("config.json");
        spec.save(&path).map_err(|e| AgentError::Io {
            what: "write",
            path,
            source: std::io::Error::other(e.to_string()),
        })
    }

    /// One runtime invocation (`run --detach`): a separate `create` and
    /// `start` cost a second start-up of the runtime, ≈ 11 ms of runc's.
    fn start_container(&self, c: &Capsule) -> Result<(), AgentError> {
        c.runtime.run(&c.container, &c.dir.bundle(), &c.dir.log())?;
        Ok(())
    }

    /// Wait for envd and hand it the capsule's settings.
    async fn start_envd(&self, c: &Capsule) -> Result<(), AgentError> {
        let envd = c.envd();
        let t0 = std::time::Instant::now();
        let boot_timeout = match c.record().engine {
            Engine::Oci => self.cfg.envd_ready_timeout,
            Engine::Vm => self.cfg.vm.boot_timeout,
        };
        envd.wait_healthy(boot_timeout)
            .await
            .map_err(|source| AgentError::Envd {
                id: c.id.clone(),
                what: "did not start",
                source: Box::new(source),
            })?;
        let healthy = t0.elapsed();
        let r = c.record();
        // envd's threads exist now (and later ones inherit)
        self.prioritise_envd(c, ENVD_PRIORITY_BOOST);
        let body = InitRequest {
            env_vars: Some(r.env.clone()),
            default_user: r.default_user.clone(),
            ..init_request(&r)
        };
        envd.init(body).await.map_err(|source| AgentError::Envd {
            id: c.id.clone(),
            what: "refused /init",
            source: Box::new(source),
        })?;
        tracing::debug!(
            capsule_id = %c.id,
            healthy_ms = healthy.as_millis() as u64,
            init_ms = (t0.elapsed() - healthy).as_millis() as u64,
            "envd ready"
        );
        if let Some(cmd) = &r.ready_cmd {
            self.wait_ready(c, &envd, cmd).await?;
        }
        Ok(())
    }

    /// Give capsule `id`'s envd a nice value `boost` below the agent's
    /// (every capsule starts with [`ENVD_PRIORITY_BOOST`]; benchmarks
    /// compare with 0). Returns how many of its threads it found.
    pub fn set_envd_priority(&self, id: &CapsuleId, boost: i32) -> Result<usize, AgentError> {
        Ok(self.prioritise_envd(&*self.running(id)?, boost))
    }

    fn prioritise_envd(&self, c: &Capsule, boost: i32) -> usize {
        if c.record().engine != Engine::Oci {
            return 0;
        }
        let bundle = c.dir.bundle();
        crate::runtime::set_envd_priority(&bundle, &self.cfg.envd_bin, boost).unwrap_or_else(|e| {
            tracing::debug!(capsule_id = %c.id, error = %e, "envd keeps its nice value");
            0
        })
    }

    /// After a VM comes back from a snapshot: `/init` again, so the guest's
    /// clock catches up and its metadata is this capsule's.
    async fn refresh_envd(&self, c: &Capsule) -> Result<(), AgentError> {
        c.envd()
            .init(init_request(&c.record()))
            .await
            .map_err(|source| AgentError::Envd {
                id: c.id.clone(),
                what: "refused /init after a restore",
                source: Box::new(source),
            })
    }

    /// Run the template's ready command until it exits 0.
    async fn wait_ready(
        &self,
        c: &Capsule,
        envd: &envd_client::EnvdClient,
        cmd: &str,
    ) -> Result<(), AgentError> {
        let t0 = std::time::Instant::now();
        let deadline = t0 + self.cfg.ready_timeout;
        loop {
            let last = match envd.exec(envd_client::ExecRequest::shell(cmd)).await {
                Ok(out) if out.exit_code == 0 => break,
                Ok(out) => format!("exit {}", out.exit_code),
                Err(e) => e.to_string(),
            };
            if std::time::Instant::now() >= deadline {
                return Err(AgentError::NotReady {
                    id: c.id.clone(),
                    cmd: cmd.to_owned(),
                    last,
                });
            }
            tokio::time::sleep(READY_POLL).await;
        }
        tracing::debug!(capsule_id = %c.id, ready_ms = t0.elapsed().as_millis() as u64, "template ready");
        Ok(())
    }

    // ---- teardown -----------------------------------------------------

    /// Run the capsule's cleanup stack, top first, each step exactly once.
    /// Failures are logged and the rest still runs; they are returned.
    async fn teardown(self: &Arc<Self>, c: &Arc<Capsule>) -> Vec<String> {
        let (agent, cap) = (self.clone(), c.clone());
        blocking(move || agent.teardown_blocking(&cap)).await
    }

    fn teardown_blocking(&self, cap: &Capsule) -> Vec<String> {
        let mut errors = Vec::new();
        loop {
            let (step, rec) = {
                let mut r = cap.rec.lock().unwrap();
                let Some(step) = r.undo.pop() else { break };
                (step, r.clone())
            };
            if let Err(e) = self.undo(cap, step, &rec) {
                tracing::warn!(capsule_id = %cap.id, ?step, error = %e, "teardown step failed");
                errors.push(format!("{step:?}: {e}"));
            }
            if step != Undo::RemoveDir && cap.dir.0.exists() {
                let _ = rec_save_after_pop(cap);
            }
        }
        errors
    }

    fn undo(&self, c: &Capsule, step: Undo, rec: &CapsuleRecord) -> Result<(), AgentError> {
        match step {
            Undo::DeleteContainer => {
                if let Ok(Some(s)) = c.runtime.state(&c.container) {
                    if s.status == ContainerStatus::Paused && c.runtime.freezes_in_place() {
                        // Frozen processes cannot die: thaw, then kill.
                        let _ = c.runtime.resume(&c.container);
                    }
                }
                c.runtime.delete(&c.container)?;
            }
            Undo::UnmountRootfs => rootfs::unmount_if_mounted(&c.dir.rootfs())?,
            Undo::FirewallRules => {
                if let Some(slot) = &rec.slot {
                    // Both elements, whatever the record says: a failed
                    // switch-off must not leave `internet` to the next owner.
                    self.firewall.remove(slot, true)?;
                }
            }
            Undo::DestroyNetwork => {
                if let Some(slot) = &rec.slot {
                    network::destroy(slot)?;
                }
            }
            Undo::ReleaseSlot => {
                if let Some(slot) = &rec.slot {
                    self.pool.release(slot.index);
                }
                // A record that outlives this step must not claim the slot again.
                c.rec.lock().unwrap().slot = None;
            }
            Undo::RemoveDir => {
                let mounts = rootfs::mounts_under(&c.dir.0);
                if !mounts.is_empty() {
                    return Err(AgentError::Invalid(format!(
                        "refusing to delete {} while {} is mounted",
                        c.dir.0.display(),
                        mounts[0].display()
                    )));
                }
                match std::fs::remove_dir_all(&c.dir.0) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        return Err(AgentError::io("remove", &c.dir.0)(e))
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }

    // ---- lifecycle ----------------------------------------------------

    /// After waiting for a capsule's lock: is it still the capsule this ID
    /// names (not destroyed, not replaced by a new one)?
    fn still_current(&self, c: &Arc<Capsule>) -> Result<(), AgentError> {
        match self.capsules.read().unwrap().get(&c.id) {
            Some(now) if Arc::ptr_eq(now, c) => Ok(()),
            _ => Err(AgentError::NotFound(c.id.clone())),
        }
    }

    /// Lock the capsule's lifecycle and check that `op` is legal now.
    async fn begin(
        &self,
        id: &CapsuleId,
        op: Op,
    ) -> Result<(Arc<Capsule>, tokio::sync::OwnedMutexGuard<()>, CapsuleState), AgentError> {
        let c = self.get(id)?;
        let g = c_op_lock(&c).await;
        self.still_current(&c)?;
        let from = c.state();
        transition(from, op).map_err(|i| AgentError::illegal(id, i))?;
        Ok((c, g, from))
    }

    pub async fn destroy(self: &Arc<Self>, id: &CapsuleId) -> Result<(), AgentError> {
        let c = self.get(id)?;
        let _g = c_op_lock(&c).await;
        if self.still_current(&c).is_err() {
            // Another destroy finished while we waited (the ID may even
            // name a new capsule by now: that one is not ours to destroy).
            return Ok(());
        }
        self.destroy_locked(&c).await;
        Ok(())
    }

    /// Destroy `c`; the caller holds its lock and checked it is current.
    async fn destroy_locked(self: &Arc<Self>, c: &Arc<Capsule>) {
        let id = &c.id;
        if let Err(e) = c.update(|r| r.state = CapsuleState::Stopped) {
            tracing::warn!(capsule_id = %id, error = %e, "cannot record the stop; tearing down anyway");
        }
        let errors = self.teardown(c).await;
        {
            let mut map = self.capsules.write().unwrap();
            if map.get(id).is_some_and(|now| Arc::ptr_eq(now, c)) {
                map.remove(id);
            }
        }
        for hook in self.on_destroy.0.lock().unwrap().iter() {
            hook(id);
        }
        if errors.is_empty() {
            tracing::info!(capsule_id = %id, "capsule destroyed");
        } else {
            tracing::warn!(capsule_id = %id, ?errors, "capsule destroyed with teardown errors");
        }
    }

    pub async fn pause(self: &Arc<Self>, id: &CapsuleId) -> Result<CapsuleInfo, AgentError> {
        let (c, _g, _) = self.begin(id, Op::Pause).await?;
        self.pause_locked(&c).await
    }

    /// Freeze `c`; the caller holds its lock and checked the transition.
    async fn pause_locked(&self, c: &Arc<Capsule>) -> Result<CapsuleInfo, AgentError> {
        if c.record().engine == Engine::Vm {
            // The VM's memory goes to a file: let envd settle first.
            if let Err(e) = c.envd().prepare_snapshot().await {
                tracing::debug!(capsule_id = %c.id, error = %e, "envd did not prepare for the snapshot");
            }
        }
        self.freeze_locked(c).await
    }

    /// The runtime's pause of `c`, recorded; the caller holds its lock.
    async fn freeze_locked(&self, c: &Arc<Capsule>) -> Result<CapsuleInfo, AgentError> {
        let rt = c.clone();
        blocking(move || rt.runtime.pause(&rt.container)).await?;
        c.update(|r| r.state = CapsuleState::Paused)?;
        c.pauses.send_modify(|n| *n += 1);
        Ok(self.info(c))
    }

    pub async fn resume(self: &Arc<Self>, id: &CapsuleId) -> Result<CapsuleInfo, AgentError> {
        let (c, _g, from) = self.begin(id, Op::Resume).await?;
        if from == CapsuleState::Paused {
            let rt = c.clone();
            blocking(move || rt.runtime.resume(&rt.container)).await?;
            if c.record().engine == Engine::Vm {
                self.refresh_envd(&c).await?;
            }
        } else {
            // From hibernation: restore the checkpoint, or boot afresh.
            let (agent, cap) = (self.clone(), c.clone());
            let kept = c.record().memory_kept;
            blocking(move || {
                cap.runtime.delete(&cap.container)?;
                if kept {
                    let images = cap.dir.checkpoint();
                    cap.runtime.restore(
                        &cap.container,
                        &cap.dir.bundle(),
                        &images,
                        &cap.dir.log(),
                    )?;
                    Ok(())
                } else {
                    agent.start_container(&cap)
                }
            })
            .await?;
            if !kept {
                self.start_envd(&c).await?;
            } else if c.record().engine == Engine::Vm {
                self.refresh_envd(&c).await?;
            }
        }
        c.update(|r| {
            r.state = CapsuleState::Running;
            r.last_active_at = now_ms();
        })?;
        Ok(self.info(&c))
    }

    /// Stop the capsule's processes, keeping its filesystem (and its memory
    /// too where CRIU works: `memory_kept` says which happened).
    pub async fn hibernate(self: &Arc<Self>, id: &CapsuleId) -> Result<CapsuleInfo, AgentError> {
        let (c, _g, from) = self.begin(id, Op::Hibernate).await?;
        let cap = c.clone();
        let kept = blocking(move || -> Result<bool, AgentError> {
            if from == CapsuleState::Paused {
                cap.runtime.resume(&cap.container)?;
            }
            let stopped = if cap.runtime.can_checkpoint() {
                let images = cap.dir.checkpoint();
                let _ = std::fs::remove_dir_all(&images);
                std::fs::create_dir_all(&images)
                    .map_err(AgentError::io("create", &images))
                    .and_then(|()| Ok(cap.runtime.checkpoint(&cap.container, &images)?))
                    .map(|()| true)
            } else {
                cap.runtime
                    .delete(&cap.container)
                    .map(|()| false)
                    .map_err(AgentError::from)
            };
            if stopped.is_err() && from == CapsuleState::Paused {
                // Leave it as it was found: frozen, as its record says.
                let _ = cap.runtime.pause(&cap.container);
            }
            stopped
        })
        .await?;
        c.update(|r| {
            r.state = CapsuleState::Hibernated;
            r.memory_kept = kept;
        })?;
        Ok(self.info(&c))
    }

    /// Reset the inactivity timer (optionally to a new timeout).
    pub fn ping(
        &self,
        id: &CapsuleId,
        timeout_sec: Option<u64>,
    ) -> Result<CapsuleInfo, AgentError> {
        if timeout_sec.is_some_and(|t| t > MAX_TIMEOUT_SEC) {
            return Err(AgentError::Invalid(format!(
                "timeout_sec must be at most {MAX_TIMEOUT_SEC}"
            )));
        }
        let c = self.running(id)?;
        c.update(|r| {
            r.last_active_at = now_ms();
            if let Some(t) = timeout_sec {
                r.timeout_sec = t;
            }
        })?;
        Ok(self.info(&c))
    }

    /// A running capsule, for a data operation (exec, files, PTY); counts
    /// as activity for the inactivity timeout.
    pub fn running(&self, id: &CapsuleId) -> Result<Arc<Capsule>, AgentError> {
        let c = self.get(id)?;
        transition(c.state(), Op::Use).map_err(|i| AgentError::illegal(id, i))?;
        c.touch();
        Ok(c)
    }

    /// Where the proxy reaches `port` of a running capsule (not activity).
    pub fn proxy_target(&self, id: &CapsuleId, port: u16) -> Result<SocketAddr, AgentError> {
        let c = self.get(id)?;
        // One look at the record (every proxied request comes here).
        let (state, ip) = {
            let r = c.rec.lock().unwrap();
            (r.state, r.slot.as_ref().map(|s| s.capsule_ip))
        };
        transition(state, Op::Use).map_err(|i| AgentError::illegal(id, i))?;
        let ip = ip
            .ok_or_else(|| AgentError::illegal(id, crate::state::Illegal { op: Op::Use, state }))?;
        Ok(SocketAddr::from((ip, port)))
    }

    /// Turn internet access on or off.
    pub async fn set_internet(&self, id: &CapsuleId, on: bool) -> Result<(), AgentError> {
        let c = self.get(id)?;
        let _g = c_op_lock(&c).await;
        self.still_current(&c)?;
        let r = c.record();
        if matches!(
            r.state,
            CapsuleState::Stopped | CapsuleState::Error | CapsuleState::Pending
        ) {
            return Err(AgentError::illegal(
                id,
                crate::state::Illegal {
                    op: Op::Use,
                    state: r.state,
                },
            ));
        }
        let Some(slot) = r.slot.clone() else {
            return Err(AgentError::illegal(
                id,
                crate::state::Illegal {
                    op: Op::Use,
                    state: r.state,
                },
            ));
        };
        if r.internet != on {
            let fw = self.firewall.clone();
            blocking(move || fw.set_internet(&slot, on)).await?;
            c.update(|r| r.internet = on)?;
        }
        Ok(())
    }

    pub async fn metrics(&self, id: &CapsuleId) -> Result<CapsuleMetrics, AgentError> {
        let c = self.get(id)?;
        Ok(self.measure(&c, None).await)
    }

    /// A capsule's counters now; its disk use walked unless `disk` is given.
    async fn measure(&self, c: &Capsule, disk: Option<u64>) -> CapsuleMetrics {
        let cg = self.cgroups.clone();
        let path = self.cgroup_path(&c.container);
        let upper = c.dir.upper();
        let vm_disk = c.dir.bundle().join("disk.qcow2");
        let (usage, disk) = blocking(move || {
            use std::os::unix::fs::MetadataExt;
            let vm = std::fs::metadata(&vm_disk).map_or(0, |m| m.blocks() * 512);
            (
                cg.usage(&path).unwrap_or_default(),
                disk.unwrap_or_else(|| template::dir_size(&upper) + vm),
            )
        })
        .await;
        CapsuleMetrics {
            at_ms: now_ms(),
            usage,
            disk_bytes: disk,
        }
    }

    /// Sample every running capsule once (CPU, memory, pids; disk when the
    /// last walk of its upper dir is older than
    /// [`crate::history::DISK_FRESH_MS`]).
    pub async fn sample_all(&self) {
        let running: Vec<Arc<Capsule>> = self
            .capsules
            .read()
            .unwrap()
            .values()
            .filter(|c| c.state() == CapsuleState::Running)
            .cloned()
            .collect();
        for c in running {
            let fresh = c.samples.lock().unwrap().fresh_disk(now_ms());
            let m = self.measure(&c, fresh).await;
            let mut h = c.samples.lock().unwrap();
            if fresh.is_none() {
                h.disk_measured(m.at_ms, m.disk_bytes);
            }
            h.push(m);
        }
    }

    /// The sampler's history of a capsule, oldest first: every sample, and
    /// the 30 s and 5 min tiers.
    pub fn samples(&self, id: &CapsuleId) -> Result<[Vec<CapsuleMetrics>; 3], AgentError> {
        let c = self.get(id)?;
        let h = c.samples.lock().unwrap();
        Ok([h.fine(), h.coarse(0), h.coarse(1)])
    }

    /// Run [`Agent::sample_all`] every `sample_interval` until shutdown,
    /// and [`Agent::save_samples`] every `metrics_save_interval` and once
    /// more at shutdown.
    pub async fn run_sampler(self: Arc<Self>, shutdown: impl std::future::Future<Output = ()>) {
        let saved = Mutex::new(tokio::time::Instant::now());
        let (this, saved) = (&*self, &saved);
        every(self.cfg.sample_interval, shutdown, move || async move {
            this.sample_all().await;
            let due = saved.lock().unwrap().elapsed() >= this.cfg.metrics_save_interval;
            if due {
                this.save_samples(Duration::ZERO).await;
                *saved.lock().unwrap() = tokio::time::Instant::now();
            }
        })
        .await;
        self.save_samples(SAVE_AT_STOP_WAIT).await;
    }

    /// Write the history of each capsule that has new samples to its
    /// directory ([`CapsuleDir::metrics`]), for the agent's next run. A
    /// capsule busy with a lifecycle operation (one that may remove the
    /// directory) for longer than `wait` is left for the next time.
    pub async fn save_samples(&self, wait: Duration) {
        let all: Vec<Arc<Capsule>> = self.capsules.read().unwrap().values().cloned().collect();
        for c in all {
            if !c.samples.lock().unwrap().unsaved() {
                continue;
            }
            let op = c.op.clone();
            let guard = if wait.is_zero() {
                op.try_lock_owned().ok()
            } else {
                tokio::time::timeout(wait, op.lock_owned()).await.ok()
            };
            let Some(guard) = guard else {
                if !wait.is_zero() {
                    tracing::warn!(capsule_id = %c.id, "busy: its metrics history since the last save is not kept");
                }
                continue;
            };
            if self.still_current(&c).is_err() {
                continue;
            }
            let bytes = c.samples.lock().unwrap().to_bytes();
            let dir = c.dir.clone();
            let written = blocking(move || {
                let _guard = guard;
                dir.replace(METRICS_FILE, &bytes)
            })
            .await;
            if let Err(e) = written {
                tracing::warn!(capsule_id = %c.id, error = %e, "cannot save the metrics history");
                c.samples.lock().unwrap().save_failed();
            }
        }
    }

    // ---- snapshot -----------------------------------------------------

    /// Turn a capsule into a template: its upper dir becomes a new layer on
    /// top of its template's (a VM capsule's disk becomes a whole new one).
    /// The capsule is frozen for the copy and stays paused afterwards (as
    /// wrenn's agent leaves it).
    pub async fn snapshot(
        self: &Arc<Self>,
        id: &CapsuleId,
        name: TemplateName,
        overrides: SnapshotOverrides,
    ) -> Result<TemplateMeta, AgentError> {
        // The guard moves into the blocking work below: should the caller
        // give up (an RPC deadline), nothing else touches the capsule
        // until the copy is done.
        let (c, guard, from) = self.begin(id, Op::Snapshot).await?;
        let r = c.record();
        let base = self.templates.get(&r.template)?;
        let store = self.templates.clone();
        // Claim the name before freezing anything.
        let staged = {
            let (store, name) = (store.clone(), name.clone());
            blocking(move || store.stage(&name)).await?
        };
        let mut env = r.env.clone();
        env.extend(overrides.env);
        let mut meta = TemplateMeta {
            name: name.clone(),
            layers: vec![name.clone()],
            default_user: overrides.default_user.or_else(|| r.default_user.clone()),
            start_cmd: overrides.start_cmd.or_else(|| r.start_cmd.clone()),
            ready_cmd: overrides.ready_cmd.or_else(|| r.ready_cmd.clone()),
            env,
            runtime: base.runtime.clone(),
            engine: r.engine,
            allow_setuid: base.allow_setuid,
            created_at: template::now_secs(),
            size_bytes: 0,
        };
        let cap = c.clone();
        let meta = if r.engine == Engine::Vm {
            // The VMM must be gone for its disk to hold still: pausing
            // (envd syncs the guest's filesystem first) stops it, keeping
            // the capsule's memory as any pause does.
            if from == CapsuleState::Running {
                // Unlike a pause, a template must not miss what the guest
                // has not written to its disk yet: envd's sync is required.
                c.envd()
                    .prepare_snapshot()
                    .await
                    .map_err(|source| AgentError::Envd {
                        id: c.id.clone(),
                        what: "could not sync the guest's filesystem",
                        source: Box::new(source),
                    })?;
                self.freeze_locked(&c).await?;
            }
            blocking(move || -> Result<TemplateMeta, AgentError> {
                let _guard = guard;
                let (disk, format) = VmSpec::written_disk(&cap.dir.bundle())?;
                let image = staged.dir().join("vm-root.ext4");
                vm::image::export_disk(&disk, format, &image, &staged.layer)?;
                let meta = store.commit(staged, meta)?;
                cap.snapshotted()?;
                Ok(meta)
            })
            .await?
        } else {
            meta.layers.extend(base.layers.iter().cloned());
            blocking(move || -> Result<TemplateMeta, AgentError> {
                let _guard = guard;
                if from == CapsuleState::Running {
                    cap.runtime.pause(&cap.container)?;
                }
                let thaw = || {
                    if from == CapsuleState::Running {
                        let _ = cap.runtime.resume(&cap.container);
                    }
                };
                let upper = cap.dir.upper();
                crate::cmd::run(
                    "cp",
                    [
                        std::ffi::OsStr::new("-a"),
                        format!("{}/.", upper.display()).as_ref(),
                        staged.layer.as_os_str(),
                    ],
                    None,
                )
                .map_err(|e| {
                    thaw();
                    AgentError::Invalid(format!("copy capsule filesystem: {e}"))
                })?;
                let meta = store.commit(staged, meta).map_err(|e| {
                    thaw();
                    AgentError::from(e)
                })?;
                cap.snapshotted()?;
                Ok(meta)
            })
            .await?
        };
        Ok(meta)
    }

    /// Delete a template unless a capsule (warm ones included) or another
    /// template uses it.
    pub async fn delete_template(&self, name: &TemplateName) -> Result<(), AgentError> {
        let uses = |c: &Capsule| {
            let t = c.rec.lock().unwrap().template.clone();
            t == *name
                || self
                    .templates
                    .get(&t)
                    .is_ok_and(|m| m.layers.contains(name))
        };
        let user = self
            .capsules
            .read()
            .unwrap()
            .values()
            .find(|c| uses(c))
            .map(|c| format!("capsule {}", c.id));
        let warm = self
            .warm
            .lock()
            .unwrap()
            .values()
            .flatten()
            .any(|c| uses(c));
        if let Some(who) = user.or_else(|| warm.then(|| "a warm pool".to_owned())) {
            return Err(AgentError::Invalid(format!(
                "template {name} is used by {who}"
            )));
        }
        let store = self.templates.clone();
        let name = name.clone();
        Ok(blocking(move || store.remove(&name)).await?)
    }

    // ---- timeouts -----------------------------------------------------

    /// Pause (or destroy) running capsules idle past their timeout.
    pub async fn reap_expired(self: &Arc<Self>) {
        let candidates: Vec<Arc<Capsule>> = self
            .capsules
            .read()
            .unwrap()
            .values()
            .filter(|c| idle_past_timeout(&c.rec.lock().unwrap(), now_ms()))
            .cloned()
            .collect();
        for c in candidates {
            // Decide again under the capsule's lock: it may have been used,
            // pinged, paused or destroyed since the list was made.
            let _g = c_op_lock(&c).await;
            let rec = c.record();
            if self.still_current(&c).is_err() || !idle_past_timeout(&rec, now_ms()) {
                continue;
            }
            let id = c.id.clone();
            match rec.on_timeout {
                OnTimeout::Destroy => {
                    self.destroy_locked(&c).await;
                    tracing::info!(capsule_id = %id, "destroyed after its inactivity timeout");
                }
                OnTimeout::Pause => match self.pause_locked(&c).await {
                    Ok(_) => {
                        tracing::info!(capsule_id = %id, "paused after its inactivity timeout");
                        self.auto_paused.lock().unwrap().push(id.clone());
                        let _ = self.auto_pauses.send(id); // (nobody may listen)
                    }
                    Err(e) => {
                        tracing::warn!(capsule_id = %id, error = %e, "pausing an idle capsule failed; destroying it");
                        self.destroy_locked(&c).await;
                    }
                },
            }
        }
    }

    /// Run [`Agent::reap_expired`] every `reaper_interval` until shutdown.
    pub async fn run_reaper(self: Arc<Self>, shutdown: impl std::future::Future<Output = ()>) {
        every(self.cfg.reaper_interval, shutdown, || self.reap_expired()).await
    }

    // ---- restart ------------------------------------------------------

    /// Re-adopt the capsules of a previous run from their records, ask the
    /// runtime what became of each, and sweep leftovers nobody owns.
    fn adopt(self: &Arc<Self>) -> Result<(), OpenError> {
        let mut adopted = Vec::new();
        let rd = std::fs::read_dir(&self.capsules_dir)
            .map_err(AgentError::io("read", &self.capsules_dir))?;
        for entry in rd.flatten() {
            let path = entry.path();
            let Ok(id) = entry.file_name().to_string_lossy().parse::<CapsuleId>() else {
                continue;
            };
            match CapsuleRecord::load(&path.join(RECORD_FILE)) {
                Ok(rec) if rec.container == id => adopted.push(rec),
                other => {
                    let why = other
                        .err()
                        .unwrap_or_else(|| "record names another capsule".into());
                    tracing::warn!(capsule_id = %id, %why, "sweeping a capsule directory without a usable record");
                    self.sweep_dir(&id, &path);
                }
            }
        }
        for mut rec in adopted {
            let runtime = match self.runtime_of(rec.engine, &rec.runtime) {
                Ok(rt) => rt,
                Err(e) => {
                    rec.error = Some(format!("cannot adopt: {e}"));
                    rec.state = CapsuleState::Error;
                    Arc::new(OciRuntime::new(
                        &rec.runtime.binary,
                        rec.runtime.args.clone(),
                        &self.cfg.state_root,
                        self.cgroups.mode,
                    ))
                }
            };
            if let Some(slot) = &rec.slot {
                self.pool.claim(slot.index);
            }
            let container = runtime
                .state(&rec.container)
                .ok()
                .flatten()
                .map(|s| s.status);
            let (state, error) = reconcile(rec.state, container);
            if state != rec.state {
                tracing::warn!(capsule_id = %rec.id, was = %rec.state, now = %state, "capsule changed while the agent was down");
            }
            rec.state = state;
            if error.is_some() {
                rec.error = error;
            }
            let dir = CapsuleDir(self.capsule_dir(&rec.container));
            let c = Arc::new(Capsule {
                id: rec.id.clone(),
                container: rec.container.clone(),
                samples: Mutex::new(saved_history(&dir)),
                dir,
                rec: Mutex::new(rec.clone()),
                op: Arc::new(tokio::sync::Mutex::new(())),
                envd: RwLock::new(None),
                runtime,
                pauses: Default::default(),
            });
            if let Some(slot) = &rec.slot {
                c.set_envd(self.envd_client(&c, slot)?);
            }
            if rec.warm {
                // A warm capsule of the previous run: nobody's; drop it.
                let errors = self.teardown_blocking(&c);
                if !errors.is_empty() {
                    tracing::warn!(container = %rec.container, ?errors, "removing a leftover warm capsule");
                }
                continue;
            }
            rec.save(&c.dir)?;
            self.capsules.write().unwrap().insert(rec.id.clone(), c);
        }
        let caps: Vec<_> = self.capsules.read().unwrap().values().cloned().collect();
        let recs: Vec<CapsuleRecord> = caps.iter().map(|c| c.record()).collect();
        self.firewall.install(
            recs.iter()
                .filter_map(|r| r.slot.as_ref().map(|s| (s, r.internet))),
        )?;
        let owned: std::collections::HashSet<u32> = recs
            .iter()
            .filter_map(|r| r.slot.as_ref().map(|s| s.index))
            .collect();
        let pool = self.cfg.network.pool;
        for (index, _) in network::list_netns(&self.cfg.instance)
            .into_iter()
            .chain(network::list_links(&self.cfg.instance))
        {
            if !owned.contains(&index) {
                tracing::warn!(index, "sweeping a network slot no capsule owns");
                let _ = network::destroy(&Slot::new(&self.cfg.instance, index, &pool));
            }
        }
        Ok(())
    }

    /// Best-effort removal of a capsule directory that has no record.
    fn sweep_dir(&self, id: &CapsuleId, dir: &std::path::Path) {
        let rt = OciRuntime::new(
            &self.cfg.runtime.binary,
            self.cfg.runtime.args.clone(),
            &self.cfg.state_root,
            self.cgroups.mode,
        );
        let _ = rt.delete(id);
        for m in rootfs::mounts_under(dir).iter().rev() {
            let _ = rootfs::unmount_if_mounted(m);
        }
        if rootfs::mounts_under(dir).is_empty() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }

    /// Destroy every capsule (tests, `Terminate`).
    pub async fn destroy_all(self: &Arc<Self>) {
        let ids: Vec<_> = self.capsules.read().unwrap().keys().cloned().collect();
        for id in ids {
            let _ = self.destroy(&id).await;
        }
        self.drain_pools().await;
    }

    /// Remove the agent's firewall table (after `destroy_all`).
    pub fn uninstall_firewall(&self) -> Result<(), AgentError> {
        Ok(self.firewall.uninstall()?)
    }
}

/// Run `f` every `period` (a late tick is delayed, not bunched) until
/// `shutdown` resolves.
async fn every<F, Fut>(
    period: std::time::Duration,
    shutdown: impl std::future::Future<Output = ()>,
    mut f: F,
) where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            _ = tick.tick() => f().await,
        }
    }
}

/// How long the save at stop waits for a capsule busy with an operation.
const SAVE_AT_STOP_WAIT: Duration = Duration::from_secs(5);

/// The metrics history a previous run saved in `dir`; an empty one when
/// there is none or it cannot be read (said in the log).
fn saved_history(dir: &CapsuleDir) -> crate::history::History {
    let path = dir.metrics();
    let read = match std::fs::read(&path) {
        Ok(bytes) => crate::history::History::from_bytes(&bytes, now_ms()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Default::default(),
        Err(e) => Err(e.to_string()),
    };
    read.unwrap_or_else(|why| {
        tracing::warn!(path = %path.display(), %why, "starting the capsule's metrics history afresh");
        Default::default()
    })
}

async fn c_op_lock(c: &Capsule) -> tokio::sync::OwnedMutexGuard<()> {
    c.op.clone().lock_owned().await
}

/// The agent's own hard open-files limit, capped at 2^20.
fn nofile_limit() -> u64 {
    rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .maximum
        .unwrap_or(1 << 20)
        .min(1 << 20)
}

fn rec_save_after_pop(c: &Capsule) -> Result<(), AgentError> {
    let r = c.rec.lock().unwrap();
    r.save(&c.dir)
}

/// Running, with a timeout, and idle for longer than it.
fn idle_past_timeout(r: &CapsuleRecord, now: u64) -> bool {
    r.state == CapsuleState::Running
        && r.timeout_sec > 0
        && now.saturating_sub(r.last_active_at) >= r.timeout_sec.saturating_mul(1000)
}

/// What an adopted capsule is now, given its record and its container.
fn reconcile(
    recorded: CapsuleState,
    container: Option<ContainerStatus>,
) -> (CapsuleState, Option<String>) {
    use CapsuleState as S;
    use ContainerStatus as C;
    match (recorded, container) {
        (S::Running, Some(C::Running)) => (S::Running, None),
        (S::Paused, Some(C::Paused)) => (S::Paused, None),
        // A pause or resume that the agent did not get to record.
        (S::Running, Some(C::Paused)) => (S::Paused, None),
        (S::Paused, Some(C::Running)) => (S::Running, None),
        (S::Hibernated, None | Some(C::Stopped)) => (S::Hibernated, None),
        (S::Stopped, _) => (S::Stopped, None),
        (S::Error, _) => (S::Error, None),
        (S::Pending | S::Starting, _) => (
            S::Error,
            Some("the agent stopped while the capsule was being created".into()),
        ),
        // Its processes are gone (the host rebooted, or init died): the
        // capsule is over, as a VM that is gone is. Kept, stopped, with the
        // reason, until DestroyCapsule frees what it held.
        (S::Running | S::Paused, None) => (
            S::Stopped,
            Some("the container was gone when the agent started".into()),
        ),
        (S::Running | S::Paused, Some(C::Stopped)) => (
            S::Stopped,
            Some("the container had stopped when the agent started".into()),
        ),
        (_, Some(s)) => (
            S::Error,
            Some(format!("the container is {s:?} while the capsule was {recorded}").to_lowercase()),
        ),
    }
}

/// The `/init` every envd gets: token, identity metadata and the time
/// (environment and user only at boot: a refresh must not undo what
/// callers changed since). envd turns metadata keys into environment
/// names; keys that are not identifiers stay in the record only.
fn init_request(r: &CapsuleRecord) -> InitRequest {
    let mut metadata = r.metadata.clone();
    metadata
        .retain(|k, _| !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
    metadata.insert("sandboxId".into(), r.id.to_string());
    metadata.insert("templateId".into(), r.template.to_string());
    InitRequest {
        access_token: r.access_token.clone(),
        env_vars: None,
        default_user: None,
        default_workdir: None,
        metadata: Some(metadata),
        timestamp: Some((now_ms() / 1000).to_string()),
    }
}

/// Copy a request's per-capsule settings into a record (a new one, or a
/// warm capsule's being claimed).
fn apply_request(rec: &mut CapsuleRecord, req: &CreateRequest, meta: &TemplateMeta) {
    let now = now_ms();
    rec.id = req.id.clone();
    rec.template = req.template.clone();
    rec.timeout_sec = req.timeout_sec;
    rec.on_timeout = req.on_timeout;
    rec.internet = req.internet;
    rec.env = meta.env.clone();
    rec.env.extend(req.env.clone());
    rec.default_user = req
        .default_user
        .clone()
        .or_else(|| meta.default_user.clone());
    rec.metadata = req.metadata.clone();
    rec.access_token = req.access_token.clone();
    rec.created_at = now;
    rec.last_active_at = now;
}

pub use wrenn_types::hosts::{MAX_TIMEOUT_SEC, MIN_MEMORY_MB};

fn validate(req: &CreateRequest) -> Result<(), AgentError> {
    if req.timeout_sec > MAX_TIMEOUT_SEC {
        return Err(AgentError::Invalid(format!(
            "timeout_sec must be at most {MAX_TIMEOUT_SEC}"
        )));
    }
    if req.vcpus == 0 || req.vcpus > 64 {
        return Err(AgentError::Invalid(format!(
            "vcpus must be 1-64, not {}",
            req.vcpus
        )));
    }
    if req.memory_mb < MIN_MEMORY_MB || req.memory_mb > 1 << 20 {
        return Err(AgentError::Invalid(format!(
            "memory_mb must be {MIN_MEMORY_MB}-1048576, not {}",
            req.memory_mb
        )));
    }
    if let Some(p) = req.pids_limit {
        if p < 8 {
            return Err(AgentError::Invalid(format!(
                "pids_limit must be at least 8, not {p}"
            )));
        }
    }
    for k in req.env.keys() {
        if k.is_empty() || k.contains('=') || k.contains('\0') {
            return Err(AgentError::Invalid(format!(
                "invalid environment variable name {k:?}"
            )));
        }
    }
    Ok(())
}

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Agent(#[from] AgentError),
}

impl From<template::TemplateError> for OpenError {
    fn from(e: template::TemplateError) -> Self {
        OpenError::Agent(e.into())
    }
}

impl From<network::NetError> for OpenError {
    fn from(e: network::NetError) -> Self {
        OpenError::Agent(e.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconciling_adopted_capsules() {
        use CapsuleState as S;
        use ContainerStatus as C;
        assert_eq!(reconcile(S::Running, Some(C::Running)), (S::Running, None));
        assert_eq!(reconcile(S::Running, Some(C::Paused)), (S::Paused, None));
        assert_eq!(reconcile(S::Hibernated, None), (S::Hibernated, None));
        assert_eq!(reconcile(S::Running, None).0, S::Stopped);
        assert_eq!(reconcile(S::Paused, None).0, S::Stopped);
        assert_eq!(reconcile(S::Running, Some(C::Stopped)).0, S::Stopped);
        assert_eq!(reconcile(S::Paused, Some(C::Stopped)).0, S::Stopped);
        assert_eq!(reconcile(S::Starting, Some(C::Running)).0, S::Error);
    }

    #[test]
    fn requests_are_validated() {
        let mut r = CreateRequest::new(CapsuleId::random(), "busybox".parse().unwrap());
        assert!(validate(&r).is_ok());
        r.vcpus = 0;
        assert!(matches!(validate(&r), Err(AgentError::Invalid(_))));
        r.vcpus = 1;
        r.memory_mb = 1;
        assert!(validate(&r).is_err());
        r.memory_mb = 64;
        r.env.insert("A=B".into(), "x".into());
        assert!(validate(&r).is_err());
    }
}
