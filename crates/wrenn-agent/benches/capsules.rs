//! Capsule benchmarks of the agent on real runc, each against a baseline
//! measured in the same run (ratios, not absolute numbers, are what holds
//! on a shared, noisy machine):
//!
//! - `cold`: create → first exec of `true` in a busybox capsule, vs raw
//!   `runc run` of `/bin/true` on the same rootfs (the template's layer),
//!   interleaved. Goal p50 ≤ 1.5×. The agent keeps network slots set up
//!   ahead (`net_pool`), refilled untimed between iterations as a running
//!   agent does in the background; `cold create, network built inline`
//!   shows the cost without it.
//! - `warm`: the same create → first exec served from a warm pool. Goal
//!   p50 ≤ 0.25× cold.
//! - `concurrent`: N creates at once. Goal p95 ≤ 3× the serial create p50.
//!   Then the same burst met by a warm pool of N (filled untimed): how far
//!   a pool sized for a burst absorbs it.
//! - `busy`: exec of `true` in a capsule whose own workload keeps its
//!   CPUs busy (four shell loops, 2 vCPUs), with envd at its priority
//!   (nice 5 below the agent) and, interleaved in blocks, at the agent's
//!   nice value: what envd's lead over its workloads buys.
//! - `network`: a slot's network as the agent builds it (rtnetlink
//!   in-process, shaping included), against the same steps through
//!   iproute2 processes (`ip netns add`, `ip -batch`, `ip -n … -batch`,
//!   `tc -n … -batch`), as the agent took them before: one slot at a time,
//!   interleaved, then bursts of N slots on N threads at once, in turns;
//!   and a capsule's firewall elements added and removed in-process
//!   against the same through `nft -f`.
//! - `pause`: pause and resume p50.
//! - `idle`: memory per idle capsule (what its cgroup is charged: envd and
//!   the kernel objects it owns; the agent's RSS; the host's
//!   MemAvailable), and how many idle capsules would fit.
//! - `sampler`: one round of the metrics sampler (every 500 ms) over those
//!   idle capsules, their upper dirs walked (as every 5 s) against the
//!   rounds between, which reuse the last walk.
//! - `vm`: VM capsules (QEMU microvm; TCG where KVM cannot run guests) next
//!   to OCI ones, interleaved: create → first exec, pause, resume, and
//!   memory per idle capsule. Runs when QEMU is installed; the guest
//!   kernel comes from `WRENN_VM_KERNEL` (else it is downloaded).
//! - `copy`: a template copied to another host's store as the control
//!   plane copies it (`template::export` → a channel of 8 pieces →
//!   `template::Import`, staged, checked, committed), against GNU tar
//!   piped into tar with the same options (the floor), interleaved; the
//!   template is made for it: many small files and a few large ones
//!   (`--copy-mb`, 256 MiB; 4 in smoke mode; `--only-copy` runs this
//!   section alone). Goal: ≤ 1.25× the floor.
//!
//! Root only. `cargo bench -p wrenn-agent --bench capsules [-- --smoke]`;
//! the static envd comes from `ENVD_STATIC_BIN` (scripts/lib.sh builds it).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use envd_client::ExecRequest;
use wrenn_agent::config::WarmPool;
use wrenn_agent::network::{self, NetworkConfig, Slot};
use wrenn_agent::{Agent, AgentConfig, CreateRequest};
use wrenn_types::ids::CapsuleId;

struct Opts {
    iterations: usize,
    concurrent: usize,
    idle: usize,
    pauses: usize,
    vm_iterations: usize,
    copy_mb: usize,
    copies: usize,
    /// `--only-copy`: the `copy` section alone.
    only_copy: bool,
}

fn opts() -> Opts {
    let args: Vec<String> = std::env::args().collect();
    let smoke = args.iter().any(|a| a == "--smoke");
    let num = |name: &str, full: usize, small: usize| -> usize {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(if smoke { small } else { full })
    };
    Opts {
        iterations: num("--iterations", 30, 2),
        concurrent: num("--concurrent", 50, 3),
        idle: num("--idle", 20, 2),
        pauses: num("--pauses", 30, 2),
        vm_iterations: num("--vm-iterations", 5, 1),
        copy_mb: num("--copy-mb", 256, 4),
        copies: num("--copies", 5, 1),
        only_copy: args.iter().any(|a| a == "--only-copy"),
    }
}

fn pct(v: &[Duration], p: f64) -> Duration {
    let mut s = v.to_vec();
    s.sort();
    s[((s.len() as f64 - 1.0) * p).round() as usize]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn line(name: &str, v: &[Duration]) {
    println!(
        "{name:<34} n={:<4} p50={:>8.1} ms  p95={:>8.1} ms  min={:>8.1} ms",
        v.len(),
        ms(pct(v, 0.5)),
        ms(pct(v, 0.95)),
        ms(pct(v, 0.0))
    );
}

fn request(template: &str) -> CreateRequest {
    let mut r = CreateRequest::new(CapsuleId::random(), template.parse().expect("valid"));
    r.memory_mb = 128;
    r
}

async fn first_exec(agent: &Agent, id: &CapsuleId) -> Result<()> {
    let c = agent.running(id)?;
    let out = c
        .envd()
        .exec(ExecRequest::new("true", Vec::<String>::new()))
        .await?;
    if out.exit_code != 0 {
        bail!("true exited {}", out.exit_code);
    }
    Ok(())
}

/// A runc bundle whose root is the busybox template's layer, read-only.
fn raw_bundle(dir: &Path, layer: &Path) -> Result<PathBuf> {
    let bundle = dir.join("raw-bundle");
    std::fs::create_dir_all(&bundle)?;
    let out = Command::new("runc")
        .arg("spec")
        .current_dir(&bundle)
        .output()?;
    if !out.status.success() {
        bail!("runc spec: {}", String::from_utf8_lossy(&out.stderr));
    }
    let path = bundle.join("config.json");
    let mut spec: serde_json::Value = serde_json::from_slice(&std::fs::read(&path)?)?;
    spec["process"]["terminal"] = false.into();
    spec["process"]["args"] = serde_json::json!(["/bin/true"]);
    spec["root"] = serde_json::json!({ "path": layer, "readonly": true });
    spec["linux"]["cgroupsPath"] = "/wbench-raw/run".into();
    std::fs::write(&path, serde_json::to_vec(&spec)?)?;
    Ok(bundle)
}

fn raw_run(bundle: &Path, root: &Path, n: usize) -> Result<Duration> {
    let started = Instant::now();
    let st = Command::new("runc")
        .arg(format!("--root={}", root.display()))
        .args(["run", "--bundle"])
        .arg(bundle)
        .arg(format!("raw-{n}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .status()?;
    let took = started.elapsed();
    if !st.success() {
        bail!("runc run failed: {st}");
    }
    Ok(took)
}

fn mem_available_kb() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .map(|l| l.to_owned())
        })
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

fn rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .map(|l| l.to_owned())
        })
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

struct Cleanup {
    agent: Arc<Agent>,
    cfg: AgentConfig,
    rt: tokio::runtime::Handle,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let agent = self.agent.clone();
        let _ = std::thread::scope(|s| s.spawn(|| self.rt.block_on(agent.destroy_all())).join());
        let _ = self.agent.uninstall_firewall();
        let cg = wrenn_agent::cgroup::Cgroups::host();
        cg.remove_parent("/wbench-raw/run");
        cg.remove_parent("/wbench-raw");
        cg.remove_parent(&self.cfg.instance);
        let _ = std::fs::remove_dir_all(&self.cfg.state_root);
    }
}

/// The first SIGINT or SIGTERM.
async fn interrupted() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(mut int), Ok(mut term)) => tokio::select! {
            _ = int.recv() => "SIGINT",
            _ = term.recv() => "SIGTERM",
        },
        _ => std::future::pending().await,
    }
}

fn main() -> Result<()> {
    if !rustix::process::geteuid().is_root() {
        bail!("the capsule benchmarks need root (runc, namespaces, nftables)");
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let o = opts();
    let envd = std::env::var_os("ENVD_STATIC_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../target/x86_64-unknown-linux-gnu/release/envd"
            ))
        });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let data = tempfile::Builder::new()
        .prefix("wrenn-bench")
        .tempdir_in("/var/tmp")?;
    let mut cfg = AgentConfig::new(data.path().to_owned(), envd).with_instance("wbench");
    if let Some(k) = std::env::var_os("WRENN_VM_KERNEL") {
        cfg.vm.kernel_dir = k.into();
    }
    cfg.network.pool = "10.233.0.0/16".parse().expect("valid");
    cfg.net_pool = 1;
    cfg.warm_pools = vec![WarmPool {
        template: "busybox".parse().expect("valid"),
        engine: None,
        size: 0,
        vcpus: 1,
        memory_mb: 128,
    }];
    let agent = rt
        .block_on(Agent::open(cfg.clone()))
        .context("open the agent")?;
    let _cleanup = Cleanup {
        agent: agent.clone(),
        cfg: cfg.clone(),
        rt: rt.handle().clone(),
    };
    let layer = agent
        .templates()
        .layer_dir(&"busybox".parse().expect("valid"));
    let bundle = raw_bundle(data.path(), &layer)?;
    let raw_root = data.path().join("raw-state");
    let mut json = Vec::new();

    // Ctrl-C or SIGTERM ends the run, not the process: `_cleanup` must
    // still take the capsules, their network and their mounts down.
    let work = async {
        if o.only_copy {
            json.push(copy(&agent, data.path(), &o).await?);
            return anyhow::Ok(());
        }
        // cold vs raw runc, interleaved (one of each untimed first)
        let (mut raw, mut cold, mut create_only) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..=o.iterations {
            let r = raw_run(&bundle, &raw_root, i)?;
            // A running agent keeps network slots prepared; refill untimed.
            agent.fill_net_pool().await;
            let req = request("busybox");
            let id = req.id.clone();
            let started = Instant::now();
            agent.create(req).await?;
            let created = started.elapsed();
            first_exec(&agent, &id).await?;
            let total = started.elapsed();
            agent.destroy(&id).await?;
            if i > 0 {
                raw.push(r);
                cold.push(total);
                create_only.push(created);
            }
        }
        let mut inline = Vec::new();
        for _ in 0..o.iterations.min(10) {
            let req = request("busybox");
            let id = req.id.clone();
            let started = Instant::now();
            agent.create(req).await?;
            first_exec(&agent, &id).await?;
            inline.push(started.elapsed());
            agent.destroy(&id).await?;
        }
        line("raw `runc run /bin/true`", &raw);
        line("cold create → first exec", &cold);
        line("cold create alone", &create_only);
        line("cold, network built inline", &inline);
        let cold_ratio = ms(pct(&cold, 0.5)) / ms(pct(&raw, 0.5));
        println!("  cold / raw runc p50 ratio: {cold_ratio:.2}× (goal ≤ 1.5×)");

        // warm pool: refill untimed, then claim → first exec
        let (mut warm, mut warm_create) = (Vec::new(), Vec::new());
        let busybox = "busybox".parse().expect("valid");
        for _ in 0..o.iterations {
            fill_one(&agent).await?;
            assert_eq!(agent.warm_count(&busybox), 1);
            let req = request("busybox");
            let id = req.id.clone();
            let started = Instant::now();
            agent.create(req).await?;
            warm_create.push(started.elapsed());
            first_exec(&agent, &id).await?;
            warm.push(started.elapsed());
            agent.destroy(&id).await?;
        }
        line("warm create → first exec", &warm);
        let warm_ratio = ms(pct(&warm, 0.5)) / ms(pct(&cold, 0.5));
        println!("  warm / cold p50 ratio: {warm_ratio:.3}× (goal ≤ 0.25×)");

        // concurrent creates vs the serial create p50
        let (conc, wall) = burst(&agent, o.concurrent).await?;
        line(&format!("{} concurrent creates", o.concurrent), &conc);
        let conc_ratio = ms(pct(&conc, 0.95)) / ms(pct(&create_only, 0.5));
        println!("  concurrent p95 / serial create p50: {conc_ratio:.2}× (goal ≤ 3×); all done in {:.0} ms", ms(wall));

        // the same burst met by a warm pool of its size (filled untimed)
        agent.fill_warm_pools_to(&busybox, o.concurrent).await;
        anyhow::ensure!(
            agent.warm_count(&busybox) == o.concurrent,
            "the warm pool holds {} of {}",
            agent.warm_count(&busybox),
            o.concurrent
        );
        let (warm_burst, warm_wall) = burst(&agent, o.concurrent).await?;
        line(
            &format!(
                "{} concurrent creates, warm pool of {}",
                o.concurrent, o.concurrent
            ),
            &warm_burst,
        );
        line("warm create alone (serial)", &warm_create);
        let warm_burst_ratio = ms(pct(&warm_burst, 0.95)) / ms(pct(&create_only, 0.5));
        println!(
            "  warm burst p95 / serial cold create p50: {warm_burst_ratio:.2}×; / serial warm create p50: {:.2}×; all done in {:.0} ms",
            ms(pct(&warm_burst, 0.95)) / ms(pct(&warm_create, 0.5)),
            ms(warm_wall)
        );

        // exec beside a busy workload: envd ahead of it, and level with it
        let (boosted, level) = busy(&agent, o.pauses).await?;
        line("exec beside 4 busy loops", &boosted);
        line("  the same, envd not ahead", &level);
        let busy_ratio = ms(pct(&boosted, 0.5)) / ms(pct(&level, 0.5));
        println!("  envd ahead / level p50 ratio: {busy_ratio:.2}×");

        // a slot's network: in-process against iproute2 processes
        let net = net_setup(&cfg.network, o.iterations, o.concurrent.min(20) as u32)?;

        // pause / resume
        let req = request("busybox");
        let id = req.id.clone();
        agent.create(req).await?;
        let (mut pauses, mut resumes) = (Vec::new(), Vec::new());
        for _ in 0..o.pauses {
            let t = Instant::now();
            agent.pause(&id).await?;
            pauses.push(t.elapsed());
            let t = Instant::now();
            agent.resume(&id).await?;
            resumes.push(t.elapsed());
        }
        line("pause", &pauses);
        line("resume", &resumes);
        agent.destroy(&id).await?;

        // idle memory
        let avail_before = mem_available_kb();
        let rss_before = rss_kb();
        let mut ids = Vec::new();
        for _ in 0..o.idle {
            let req = request("busybox");
            ids.push(req.id.clone());
            agent.create(req).await?;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let mut charged = 0u64;
        for id in &ids {
            charged += agent.metrics(id).await?.usage.memory_bytes;
        }
        let n = o.idle as u64;
        let cgroup_kib = charged / 1024 / n;
        let agent_kib = rss_kb().saturating_sub(rss_before) / n;
        let host_kib = avail_before.saturating_sub(mem_available_kb()) / n;
        let fit = avail_before.checked_div(host_kib).unwrap_or(0);
        println!(
            "idle capsule memory (n={n}): cgroup {cgroup_kib} KiB, agent RSS {agent_kib} KiB, host MemAvailable drop {host_kib} KiB → about {fit} idle capsules fit in {} MiB available (address pool: {} slots)",
            avail_before / 1024,
            1u64 << (30 - cfg.network.pool.prefix_len())
        );
        let (mut walked, mut cached) = (Vec::new(), Vec::new());
        for _ in 0..o.idle {
            let t = Instant::now();
            for id in &ids {
                agent.metrics(id).await?;
            }
            walked.push(t.elapsed());
            agent.sample_all().await; // walks where the last walk is 5 s old
            let t = Instant::now();
            agent.sample_all().await;
            cached.push(t.elapsed());
        }
        line(&format!("sampler round, {n} capsules, walked"), &walked);
        line(&format!("sampler round, {n} capsules"), &cached);
        let sampler_ratio = ms(pct(&cached, 0.5)) / ms(pct(&walked, 0.5));
        let sampler_share = ms(pct(&cached, 0.5)) / 500.0 * 100.0;
        println!(
            "  sampler round / walked round p50: {sampler_ratio:.2}×; at 500 ms, {sampler_share:.2}% of one core for {n} capsules"
        );
        for id in &ids {
            agent.destroy(id).await?;
        }

        if wrenn_agent::cmd::on_path(&cfg.vm.qemu) {
            json.push(vm_vs_oci(&agent, &o).await?);
        } else {
            println!("vm: skipped ({} is not installed)", cfg.vm.qemu);
        }

        json.push(copy(&agent, data.path(), &o).await?);

        json.push(serde_json::json!({
            "bench": "capsules",
            "raw_runc_p50_ms": ms(pct(&raw, 0.5)),
            "cold_p50_ms": ms(pct(&cold, 0.5)),
            "cold_create_p50_ms": ms(pct(&create_only, 0.5)),
            "cold_over_raw": cold_ratio,
            "warm_p50_ms": ms(pct(&warm, 0.5)),
            "warm_over_cold": warm_ratio,
            "concurrent": o.concurrent,
            "concurrent_p95_ms": ms(pct(&conc, 0.95)),
            "concurrent_p95_over_serial_p50": conc_ratio,
            "warm_burst_p95_ms": ms(pct(&warm_burst, 0.95)),
            "warm_burst_p95_over_serial_p50": warm_burst_ratio,
            "busy_exec_p50_ms": ms(pct(&boosted, 0.5)),
            "busy_exec_level_p50_ms": ms(pct(&level, 0.5)),
            "busy_ahead_over_level": busy_ratio,
            "pause_p50_ms": ms(pct(&pauses, 0.5)),
            "resume_p50_ms": ms(pct(&resumes, 0.5)),
            "idle_cgroup_kib": cgroup_kib,
            "idle_agent_rss_kib": agent_kib,
            "idle_host_kib": host_kib,
            "idle_fit": fit,
            "sampler_round_p50_ms": ms(pct(&cached, 0.5)),
            "sampler_round_over_walked": sampler_ratio,
        }));
        json.push(net);
        anyhow::Ok(())
    };
    rt.block_on(async {
        tokio::select! {
            r = work => r,
            signal = interrupted() => Err(anyhow::anyhow!("interrupted by {signal}")),
        }
    })?;
    for j in json {
        println!("{j}");
    }
    Ok(())
}

/// How a slot's network is set up in [`net_setup`].
#[derive(Clone, Copy)]
enum Plumbing {
    /// What the agent does: `network::create`.
    Agent,
    /// The same through `ip` and `tc` processes, as the agent did before.
    Iproute2,
}

fn plumb(how: Plumbing, cfg: &NetworkConfig, slot: &Slot) -> Result<()> {
    match how {
        Plumbing::Agent => network::create(cfg, slot)?,
        Plumbing::Iproute2 => {
            let ip = |args: &[&str], stdin: String| {
                wrenn_agent::cmd::run("ip", args, Some(stdin.as_bytes())).map(drop)
            };
            let (ns, veth) = (slot.netns.as_str(), slot.veth.as_str());
            ip(&["netns", "add", ns], String::new())?;
            ip(
                &["-batch", "-"],
                format!(
                    "link add {veth} txqueuelen 5000 type veth peer name eth0 netns {ns}\n\
                     addr add {}/30 dev {veth}\nlink set {veth} up\n",
                    slot.host_ip
                ),
            )?;
            ip(
                &["-n", ns, "-batch", "-"],
                format!(
                    "link set lo up\nlink set eth0 txqueuelen 5000\n\
                     addr add {}/30 dev eth0\nlink set eth0 up\n\
                     route add default via {}\n",
                    slot.capsule_ip, slot.host_ip
                ),
            )?;
            let shaping = network::Shaping::new(cfg.egress_rate, cfg.egress_burst, slot.host_ip);
            wrenn_agent::cmd::run(
                "tc",
                ["-n", ns, "-batch", "-"],
                Some(shaping.tc_script().as_bytes()),
            )?;
        }
    }
    Ok(())
}

/// Set up and tear down slots `0..n` on `n` threads at once: each thread's
/// setup time, and the wall time of the whole burst.
fn net_burst(how: Plumbing, cfg: &NetworkConfig, n: u32) -> Result<(Vec<Duration>, Duration)> {
    let started = Instant::now();
    let times = std::thread::scope(|s| {
        let threads: Vec<_> = (0..n)
            .map(|i| {
                s.spawn(move || {
                    let slot = Slot::new(&cfg.instance, i, &cfg.pool);
                    let t = Instant::now();
                    let made = plumb(how, cfg, &slot).map(|()| t.elapsed());
                    network::destroy(&slot)?;
                    made
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|t| t.join().expect("no panic"))
            .collect::<Result<Vec<_>>>()
    })?;
    Ok((times, started.elapsed()))
}

/// A slot's network, the agent's way against iproute2's: `n` serial
/// setups each way interleaved, then `rounds` bursts of `burst` slots at
/// once each way, in turns (untimed teardown after each).
fn net_setup(agent_net: &NetworkConfig, n: usize, burst: u32) -> Result<serde_json::Value> {
    let cfg = NetworkConfig {
        instance: "wbnet".into(),
        pool: "10.234.0.0/16".parse().expect("valid"),
        ..agent_net.clone()
    };
    let _swept = SweepSlots(cfg.clone());
    let (mut ours, mut ip) = (Vec::new(), Vec::new());
    let slot = Slot::new(&cfg.instance, 0, &cfg.pool);
    for _ in 0..n {
        for (how, into) in [(Plumbing::Agent, &mut ours), (Plumbing::Iproute2, &mut ip)] {
            let t = Instant::now();
            plumb(how, &cfg, &slot)?;
            into.push(t.elapsed());
            network::destroy(&slot)?;
        }
    }
    line("network slot, in-process (agent)", &ours);
    line("network slot, ip processes", &ip);
    let serial_ratio = ms(pct(&ours, 0.5)) / ms(pct(&ip, 0.5));
    println!("  in-process / ip p50: {serial_ratio:.2}×");
    let (mut ours_b, mut ip_b, mut ours_wall, mut ip_wall) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    // a capsule's firewall elements (bound, internet) added and removed:
    // one nf_tables batch each way from the agent, against `nft -f`
    let fw = network::Firewall::new(&cfg.instance, cfg.pool);
    fw.install([])?;
    let (mut fw_ours, mut fw_nft) = (Vec::new(), Vec::new());
    let nft = |verb: &str| {
        let t = fw.table();
        let script = format!(
            "{verb} element inet {t} bound {{ \"{}\" . {} }}\n\
             {verb} element inet {t} internet {{ {} }}\n",
            slot.veth, slot.capsule_ip, slot.capsule_ip
        );
        wrenn_agent::cmd::run("nft", ["-f", "-"], Some(script.as_bytes())).map(drop)
    };
    // (CPU: this process's, and its waited-for children's, in ms)
    let (mut cpu_ours, mut cpu_nft) = (0.0, 0.0);
    for _ in 0..n {
        let (t, c) = (Instant::now(), cpu_ms());
        fw.add(&slot, true)?;
        fw.remove(&slot, true)?;
        fw_ours.push(t.elapsed());
        cpu_ours += cpu_ms() - c;
        let (t, c) = (Instant::now(), cpu_ms());
        nft("add")?;
        nft("delete")?;
        fw_nft.push(t.elapsed());
        cpu_nft += cpu_ms() - c;
    }
    fw.uninstall()?;
    line("firewall add + remove, in-process", &fw_ours);
    line("firewall add + remove, nft processes", &fw_nft);
    let fw_ratio = ms(pct(&fw_ours, 0.5)) / ms(pct(&fw_nft, 0.5));
    let (cpu_ours, cpu_nft) = (cpu_ours / n as f64, cpu_nft / n as f64);
    println!(
        "  in-process / nft p50: {fw_ratio:.2}×; CPU per add + remove {cpu_ours:.2} against {cpu_nft:.2} ms ({:.2}×)",
        cpu_ours / cpu_nft
    );
    let rounds = n.div_ceil(10).max(1);
    for _ in 0..rounds {
        let (t, w) = net_burst(Plumbing::Agent, &cfg, burst)?;
        ours_b.extend(t);
        ours_wall.push(w);
        let (t, w) = net_burst(Plumbing::Iproute2, &cfg, burst)?;
        ip_b.extend(t);
        ip_wall.push(w);
    }
    line(
        &format!("network slots, {burst} at once, in-process"),
        &ours_b,
    );
    line(
        &format!("network slots, {burst} at once, ip processes"),
        &ip_b,
    );
    let burst_ratio = ms(pct(&ours_b, 0.95)) / ms(pct(&ip_b, 0.95));
    println!(
        "  in-process / ip burst p95: {burst_ratio:.2}×; a burst with teardown, p50 {:.0} against {:.0} ms",
        ms(pct(&ours_wall, 0.5)),
        ms(pct(&ip_wall, 0.5))
    );
    Ok(serde_json::json!({
        "bench": "network_slot",
        "in_process_p50_ms": ms(pct(&ours, 0.5)),
        "iproute2_p50_ms": ms(pct(&ip, 0.5)),
        "in_process_over_iproute2": serial_ratio,
        "firewall_in_process_p50_ms": ms(pct(&fw_ours, 0.5)),
        "firewall_nft_p50_ms": ms(pct(&fw_nft, 0.5)),
        "firewall_in_process_over_nft": fw_ratio,
        "firewall_cpu_in_process_ms": cpu_ours,
        "firewall_cpu_nft_ms": cpu_nft,
        "burst": burst,
        "burst_in_process_p95_ms": ms(pct(&ours_b, 0.95)),
        "burst_iproute2_p95_ms": ms(pct(&ip_b, 0.95)),
        "burst_in_process_over_iproute2": burst_ratio,
    }))
}

/// CPU time used so far by this process and its waited-for children, ms.
fn cpu_ms() -> f64 {
    let used = |who| {
        let mut u: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: getrusage fills the struct it is given.
        unsafe { libc::getrusage(who, &mut u) };
        let t = |v: libc::timeval| v.tv_sec as f64 * 1e3 + v.tv_usec as f64 / 1e3;
        t(u.ru_utime) + t(u.ru_stime)
    };
    used(libc::RUSAGE_SELF) + used(libc::RUSAGE_CHILDREN)
}

/// Tears down what [`net_setup`] may leave when it fails half-way.
struct SweepSlots(NetworkConfig);

impl Drop for SweepSlots {
    fn drop(&mut self) {
        let _ = network::Firewall::new(&self.0.instance, self.0.pool).uninstall();
        for (i, _) in network::list_netns(&self.0.instance) {
            let _ = network::destroy(&Slot::new(&self.0.instance, i, &self.0.pool));
        }
        for (i, _) in network::list_links(&self.0.instance) {
            let _ = network::destroy(&Slot::new(&self.0.instance, i, &self.0.pool));
        }
    }
}

/// `n` execs of `true` each way in a capsule running four busy loops: with
/// envd at its priority, and at the agent's (blocks of 5, interleaved).
async fn busy(agent: &Arc<Agent>, n: usize) -> Result<(Vec<Duration>, Vec<Duration>)> {
    let mut req = request("busybox");
    req.vcpus = 2;
    let id = req.id.clone();
    agent.create(req).await?;
    let c = agent.running(&id)?;
    let mut hog = ExecRequest::shell("for i in 1 2 3 4; do (while :; do :; done) & done; wait");
    hog.tag = Some("hog".into());
    let _hog = c.envd().exec_stream(hog).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (mut ahead, mut level) = (Vec::new(), Vec::new());
    while ahead.len() < n || level.len() < n {
        for (boost, out) in [
            (wrenn_types::envd::ENVD_PRIORITY_BOOST, &mut ahead),
            (0, &mut level),
        ] {
            if agent.set_envd_priority(&id, boost)? == 0 {
                bail!("envd's priority could not be set");
            }
            for _ in 0..5.min(n) {
                let t = Instant::now();
                first_exec(agent, &id).await?;
                out.push(t.elapsed());
            }
        }
    }
    agent.destroy(&id).await?;
    Ok((ahead, level))
}

/// `n` creates started at once, each destroyed afterwards: how long each
/// create took, and the whole burst.
async fn burst(agent: &Arc<Agent>, n: usize) -> Result<(Vec<Duration>, Duration)> {
    let started = Instant::now();
    let handles: Vec<_> = (0..n)
        .map(|_| {
            let agent = agent.clone();
            tokio::spawn(async move {
                let req = request("busybox");
                let id = req.id.clone();
                let t = Instant::now();
                let r = agent.create(req).await.map(|_| t.elapsed());
                (id, r)
            })
        })
        .collect();
    let mut done = Vec::new();
    for h in handles {
        done.push(h.await?);
    }
    let wall = started.elapsed();
    let mut times = Vec::new();
    for (id, r) in done {
        if r.is_ok() {
            agent.destroy(&id).await?;
        }
        times.push(r?);
    }
    Ok((times, wall))
}

/// Top the (size-1) warm pool up by hand, so refills stay out of the timing.
async fn fill_one(agent: &Arc<Agent>) -> Result<()> {
    agent
        .fill_warm_pools_to(&"busybox".parse().expect("valid"), 1)
        .await;
    Ok(())
}

/// VM capsules next to OCI ones in the same run, interleaved.
async fn vm_vs_oci(agent: &Arc<Agent>, o: &Opts) -> Result<serde_json::Value> {
    use wrenn_agent::template::Engine;
    let engines = [Engine::Oci, Engine::Vm];
    let make = |e: Engine| {
        let mut r = request("busybox");
        r.memory_mb = 256;
        r.engine = Some(e);
        r
    };
    // One VM untimed first: the kernel, initramfs and template disk are
    // built on first use.
    let warmup = make(Engine::Vm);
    let id = warmup.id.clone();
    let vmm = agent.create(warmup).await?.runtime;
    agent.destroy(&id).await?;
    let mut first = [Vec::new(), Vec::new()];
    let mut pause = [Vec::new(), Vec::new()];
    let mut resume = [Vec::new(), Vec::new()];
    for _ in 0..o.vm_iterations {
        for (i, e) in engines.iter().enumerate() {
            agent.fill_net_pool().await;
            let req = make(*e);
            let id = req.id.clone();
            let t = Instant::now();
            agent.create(req).await?;
            first_exec(agent, &id).await?;
            first[i].push(t.elapsed());
            let t = Instant::now();
            agent.pause(&id).await?;
            pause[i].push(t.elapsed());
            let t = Instant::now();
            agent.resume(&id).await?;
            first_exec(agent, &id).await?;
            resume[i].push(t.elapsed());
            agent.destroy(&id).await?;
        }
    }
    // idle memory: two of each, settled
    let mut idle_host_kib = [0u64; 2];
    let mut idle_cgroup_kib = [0u64; 2];
    let n = 2u64;
    for (i, e) in engines.iter().enumerate() {
        let before = mem_available_kb();
        let mut ids = Vec::new();
        for _ in 0..n {
            let req = make(*e);
            ids.push(req.id.clone());
            agent.create(req).await?;
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        let mut charged = 0;
        for id in &ids {
            charged += agent.metrics(id).await?.usage.memory_bytes;
        }
        idle_host_kib[i] = before.saturating_sub(mem_available_kb()) / n;
        idle_cgroup_kib[i] = charged / 1024 / n;
        for id in &ids {
            agent.destroy(id).await?;
        }
    }
    println!("vm ({vmm}) vs oci (runc), 256 MiB capsules, interleaved:");
    line("  oci create → first exec", &first[0]);
    line("  vm  create → first exec", &first[1]);
    line("  oci pause", &pause[0]);
    line("  vm  pause (memory → file)", &pause[1]);
    line("  oci resume → exec", &resume[0]);
    line("  vm  resume (file → VMM) → exec", &resume[1]);
    let r = |v: &[Vec<Duration>; 2]| ms(pct(&v[1], 0.5)) / ms(pct(&v[0], 0.5));
    println!(
        "  vm / oci p50: create {:.1}×, pause {:.1}×, resume {:.1}×",
        r(&first),
        r(&pause),
        r(&resume)
    );
    println!(
        "  idle memory per capsule: oci cgroup {} KiB / host {} KiB; vm cgroup {} KiB / host {} KiB",
        idle_cgroup_kib[0], idle_host_kib[0], idle_cgroup_kib[1], idle_host_kib[1]
    );
    Ok(serde_json::json!({
        "bench": "vm_vs_oci",
        "vmm": vmm,
        "oci_first_exec_p50_ms": ms(pct(&first[0], 0.5)),
        "vm_first_exec_p50_ms": ms(pct(&first[1], 0.5)),
        "oci_pause_p50_ms": ms(pct(&pause[0], 0.5)),
        "vm_pause_p50_ms": ms(pct(&pause[1], 0.5)),
        "oci_resume_p50_ms": ms(pct(&resume[0], 0.5)),
        "vm_resume_p50_ms": ms(pct(&resume[1], 0.5)),
        "vm_over_oci_create": r(&first),
        "vm_over_oci_pause": r(&pause),
        "vm_over_oci_resume": r(&resume),
        "oci_idle_cgroup_kib": idle_cgroup_kib[0],
        "vm_idle_cgroup_kib": idle_cgroup_kib[1],
        "oci_idle_host_kib": idle_host_kib[0],
        "vm_idle_host_kib": idle_host_kib[1],
    }))
}

/// Make template `name` of about `mb` MiB in `store`: a quarter in 4 KiB
/// files (a package tree's shape), the rest in 16 MiB ones.
fn synthetic_template(
    store: &wrenn_agent::template::TemplateStore,
    name: &wrenn_types::ids::TemplateName,
    mb: usize,
) -> Result<()> {
    let staged = store.stage(name)?;
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut bytes = |n: usize| -> Vec<u8> {
        (0..n)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect()
    };
    let small = (mb << 20) / 4 / 4096;
    for i in 0..small {
        let dir = staged.layer.join(format!("usr/lib/d{}", i / 64));
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join(format!("f{i}")), bytes(4096))?;
    }
    for i in 0..(mb * 3 / 4) / 16 {
        std::fs::write(staged.layer.join(format!("big{i}")), bytes(16 << 20))?;
    }
    let mut meta = wrenn_agent::template::TemplateMeta::base(name.clone(), false);
    meta.layers = vec![name.clone(), "busybox".parse().expect("valid")];
    store.commit(staged, meta)?;
    Ok(())
}

/// `copy`: see the module's comment.
async fn copy(agent: &Arc<Agent>, data: &Path, o: &Opts) -> Result<serde_json::Value> {
    use futures::StreamExt;
    use wrenn_agent::template::{export, Import, TemplateStore};
    let name: wrenn_types::ids::TemplateName = "bench-copy".parse().expect("valid");
    let from = agent.templates().clone();
    {
        let (from, name, mb) = (from.clone(), name.clone(), o.copy_mb);
        tokio::task::spawn_blocking(move || synthetic_template(&from, &name, mb)).await??;
    }
    let size = wrenn_agent::template::dir_size(&from.layer_dir(&name));
    // the other host's store: busybox (the layer below) linked in
    let to = TemplateStore::open(data.join("copy-target"))?;
    std::os::unix::fs::symlink(from.dir_of(&"busybox".parse()?), to.dir().join("busybox"))?;
    let floor_dir = data.join("copy-floor");
    let (mut ours, mut floor) = (Vec::new(), Vec::new());
    for i in 0..o.copies * 2 {
        if i % 2 == 0 {
            std::fs::create_dir_all(&floor_dir)?;
            let script = format!(
                "tar --create --file=- --sparse --numeric-owner --xattrs --xattrs-include='*' \
                 -C {} template.json layer | tar --extract --file=- --same-owner \
                 --preserve-permissions --numeric-owner --xattrs --xattrs-include='*' -C {}",
                from.dir_of(&name).display(),
                floor_dir.display()
            );
            let t0 = Instant::now();
            let ok = tokio::process::Command::new("sh")
                .args(["-c", &script])
                .status()
                .await?
                .success();
            floor.push(t0.elapsed());
            anyhow::ensure!(ok, "tar | tar failed");
            std::fs::remove_dir_all(&floor_dir)?;
        } else {
            let t0 = Instant::now();
            let (tx, mut rx) = tokio::sync::mpsc::channel(8);
            let mut stream = Box::pin(export(&from, &name)?);
            let pump = async move {
                while let Some(piece) = stream.next().await {
                    if tx.send(piece?).await.is_err() {
                        break;
                    }
                }
                anyhow::Ok(())
            };
            let mut import = Import::start(&to, &name)?;
            let take = async {
                while let Some(piece) = rx.recv().await {
                    import.write(&piece).await?;
                }
                anyhow::Ok(())
            };
            let (pumped, taken) = tokio::join!(pump, take);
            pumped?;
            taken?;
            import.finish(&to).await?;
            ours.push(t0.elapsed());
            let (to, name) = (to.clone(), name.clone());
            tokio::task::spawn_blocking(move || to.remove(&name)).await??;
        }
    }
    from.remove(&name)?;
    line("copy, tar | tar (floor)", &floor);
    line("copy, export → import", &ours);
    let ratio = ms(pct(&ours, 0.5)) / ms(pct(&floor, 0.5));
    let mib_s = size as f64 / (1 << 20) as f64 / pct(&ours, 0.5).as_secs_f64();
    println!(
        "  export → import / tar | tar p50: {ratio:.2}× (goal ≤ 1.25×); {:.0} MiB at {mib_s:.0} MiB/s",
        size as f64 / (1 << 20) as f64
    );
    Ok(serde_json::json!({
        "bench": "template_copy",
        "bytes": size,
        "floor_p50_ms": ms(pct(&floor, 0.5)),
        "copy_p50_ms": ms(pct(&ours, 0.5)),
        "copy_over_floor": ratio,
        "copy_mib_per_s": mib_s,
    }))
}
