//! Capsule networking: one network namespace per capsule, a veth pair into
//! it, an address pair from the pool, egress shaping and the nftables
//! rules that keep capsules away from the host, each other and link-local
//! addresses.
//!
//! Names derive from the agent's instance name and the capsule's slot
//! (`{instance}-{slot}` for both the netns and the host-side veth, which
//! stays under the kernel's 15-byte limit), so resources left behind by a
//! crash can be recognised and swept. Everything here is synchronous:
//! namespaces, links, addresses, routes and egress shaping over rtnetlink
//! in-process ([`netlink`]), the firewall's per-capsule elements as
//! nf_tables batches over netlink (its table installed once by `nft`);
//! callers run it on blocking threads.

mod netlink;
mod nft;
mod pool;

use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use std::path::PathBuf;

use netlink_packet_route::tc::TcHandle;
use serde::{Deserialize, Serialize};
use wrenn_types::envd::ENVD_PORT;

use crate::cmd;

pub use nft::Firewall;
pub use pool::{Pool, PoolError};

/// Per-agent network settings.
#[derive(Debug, Clone)]
pub struct NetworkConfig {
    /// Prefix of every name the agent creates (netns, veth, nft table).
    pub instance: String,
    /// Address pool; each capsule takes a /30.
    pub pool: ipnet::Ipv4Net,
    /// Sustained egress rate per capsule, bytes per second.
    pub egress_rate: u64,
    /// Egress burst per capsule, bytes.
    pub egress_burst: u64,
    /// Nameservers written into capsules' `/etc/resolv.conf`.
    pub nameservers: Vec<std::net::IpAddr>,
}

/// One capsule's network, as persisted in its record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slot {
    pub index: u32,
    pub netns: String,
    pub veth: String,
    pub host_ip: Ipv4Addr,
    pub capsule_ip: Ipv4Addr,
}

impl Slot {
    pub fn new(instance: &str, index: u32, pool: &ipnet::Ipv4Net) -> Self {
        let base = u32::from(pool.network()) + index * 4;
        let name = format!("{instance}-{index}");
        Slot {
            index,
            netns: name.clone(),
            veth: name,
            host_ip: Ipv4Addr::from(base + 1),
            capsule_ip: Ipv4Addr::from(base + 2),
        }
    }

    /// Where the named namespace is mounted, as iproute2 keeps it (handed
    /// to the runtime).
    pub fn netns_path(&self) -> PathBuf {
        netlink::netns_path(&self.netns)
    }
}

/// Failure of one network step.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("{step} for {name}")]
    Step {
        step: &'static str,
        name: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

fn step<'a, E: std::error::Error + Send + Sync + 'static>(
    step: &'static str,
    name: &'a str,
) -> impl FnOnce(E) -> NetError + 'a {
    move |source| NetError::Step {
        step,
        name: name.to_owned(),
        source: Box::new(source),
    }
}

/// Create the namespace and the veth pair, address both ends, route the
/// capsule through the host end and shape its egress.
pub fn create(cfg: &NetworkConfig, slot: &Slot) -> Result<(), NetError> {
    const PLEN: u8 = 30;
    const TXQUEUELEN: u32 = 5000;
    let (ns, mut inside) =
        netlink::add_netns(&slot.netns).map_err(step("create netns", &slot.netns))?;
    let host = || -> std::io::Result<()> {
        let mut rtnl = netlink::Rtnl::open()?;
        rtnl.add_veth(&slot.veth, "eth0", ns.as_fd(), TXQUEUELEN)?;
        let veth = rtnl.link_index(&slot.veth)?;
        rtnl.add_address(veth, slot.host_ip, PLEN)?;
        rtnl.set_up(veth)
    };
    host().map_err(step("create veth", &slot.veth))?;
    let mut capsule = || -> std::io::Result<u32> {
        let lo = inside.link_index("lo")?;
        inside.set_up(lo)?;
        let eth0 = inside.link_index("eth0")?;
        inside.add_address(eth0, slot.capsule_ip, PLEN)?;
        inside.set_up(eth0)?;
        inside.add_default_route(slot.host_ip)?;
        Ok(eth0)
    };
    let eth0 = capsule().map_err(step("configure eth0", &slot.netns))?;
    Shaping::new(cfg.egress_rate, cfg.egress_burst, slot.host_ip)
        .apply(&mut inside, eth0)
        .map_err(step("shape egress", &slot.netns))
}

/// How a capsule's egress is shaped, on its eth0, with HTB (set from
/// outside: without CAP_NET_ADMIN the workload cannot change it). One
/// class holds the whole budget (`rate` bytes/s sustained after `burst`
/// bytes); under it, envd's answers to the agent (source port 49983 to
/// the host end's address, matched by u32) have the first claim, so a
/// terminal's echo never waits behind the bulk backlog the shaper queues
/// (a tbf here held it ~8 ms behind one saturating flow); those answers
/// count against the same budget. (Policing on the host end would need
/// act_police, which kernels built without CONFIG_NET_ACT_POLICE lack,
/// and without sch_prio — this machine's — HTB is the classful qdisc
/// there is.)
#[derive(Debug, Clone)]
pub struct Shaping {
    classes: [netlink::HtbClass; 3],
    host: Ipv4Addr,
}

/// The qdisc's handle (`1:`).
const HTB_ROOT: TcHandle = TcHandle { major: 1, minor: 0 };
/// The class of everything but envd's answers (`1:20`, the default).
const HTB_DEFAULT: u16 = 0x20;
/// The class of envd's answers (`1:10`).
const HTB_ENVD: u16 = 0x10;
const HTB_QUANTUM: u32 = 60_000;

impl Shaping {
    pub fn new(rate: u64, burst: u64, host: Ipv4Addr) -> Shaping {
        // envd's assured share; it borrows up to the whole rate before the rest
        let envd = (rate / 100).max(1_000);
        let rest = rate.saturating_sub(envd).max(1_000);
        // every class may borrow up to the whole rate
        let class = |parent, minor, assured, prio| netlink::HtbClass {
            parent,
            id: TcHandle { major: 1, minor },
            rate: assured,
            ceil: rate,
            burst,
            quantum: HTB_QUANTUM,
            prio,
        };
        let top = TcHandle { major: 1, minor: 1 };
        let classes = [
            class(HTB_ROOT, 1, rate, 0),
            class(top, HTB_ENVD, envd, 0),
            class(top, HTB_DEFAULT, rest, 1),
        ];
        Shaping { classes, host }
    }

    /// Set it up on link `eth0` of `rtnl`'s namespace.
    fn apply(&self, rtnl: &mut netlink::Rtnl, eth0: u32) -> std::io::Result<()> {
        rtnl.htb_qdisc(eth0, HTB_ROOT, HTB_DEFAULT)?;
        for c in &self.classes {
            rtnl.htb_class(eth0, c)?;
        }
        let envd = TcHandle {
            major: 1,
            minor: HTB_ENVD,
        };
        rtnl.u32_filter(eth0, HTB_ROOT, 1, ENVD_PORT, self.host, envd)
    }

    /// The same as `tc -batch` lines for eth0 (what the agent ran before it
    /// spoke netlink; the bench's baseline and the test's reference).
    pub fn tc_script(&self) -> String {
        let mut s = format!("qdisc replace dev eth0 root handle 1: htb default {HTB_DEFAULT:x}\n");
        for c in &self.classes {
            let prio = if c.parent == HTB_ROOT {
                String::new()
            } else {
                format!(" prio {}", c.prio)
            };
            let parent = match c.parent.minor {
                0 => format!("{:x}:", c.parent.major),
                m => format!("{:x}:{m:x}", c.parent.major),
            };
            s.push_str(&format!(
                "class add dev eth0 parent {parent} classid {:x}:{:x} htb rate {}bit ceil {}bit \
                 burst {b} cburst {b}{prio} quantum {}\n",
                c.id.major,
                c.id.minor,
                c.rate * 8,
                c.ceil * 8,
                c.quantum,
                b = c.burst,
            ));
        }
        s.push_str(&format!(
            "filter add dev eth0 parent 1: protocol ip prio 1 u32 \
             match ip sport {ENVD_PORT} 0xffff match ip dst {}/32 flowid 1:{HTB_ENVD:x}\n",
            self.host
        ));
        s
    }
}

/// The TAP device a VM capsule's VMM opens, in the capsule's namespace.
pub const VM_TAP: &str = "tap0";

/// Turn a slot made by [`create`] into one for a VM: the capsule address
/// moves from `eth0` to the guest, and a bridge in the namespace joins
/// `eth0` and a TAP (txqueuelen 5000) for the VMM. The host side is
/// untouched, so routes, shaping (on `eth0`) and nftables rules apply to
/// the guest as they do to a container.
pub fn attach_tap(slot: &Slot) -> Result<(), NetError> {
    let script = format!(
        "addr flush dev eth0\n\
         route flush table main\n\
         tuntap add {VM_TAP} mode tap\n\
         link set {VM_TAP} txqueuelen 5000\n\
         link add br0 type bridge forward_delay 0\n\
         link set eth0 master br0\n\
         link set {VM_TAP} master br0\n\
         link set {VM_TAP} up\n\
         link set br0 up\n"
    );
    cmd::run(
        "ip",
        ["-n", &slot.netns, "-batch", "-"],
        Some(script.as_bytes()),
    )
    .map_err(step("attach a tap", &slot.netns))?;
    Ok(())
}

/// Delete the namespace (which takes eth0 and so its veth peer with it),
/// then the host end in case the namespace was already gone. Missing
/// pieces are not errors: teardown must be repeatable.
pub fn destroy(slot: &Slot) -> Result<(), NetError> {
    netlink::delete_netns(&slot.netns).map_err(step("delete netns", &slot.netns))?;
    if link_exists(&slot.veth) {
        // Deleting the netns destroys the pair asynchronously: the link may
        // vanish between the check and the delete, which is what we wanted
        // (and `delete_link` takes a link that is gone as deleted).
        netlink::Rtnl::open()
            .and_then(|mut rtnl| rtnl.delete_link(&slot.veth))
            .map_err(step("delete veth", &slot.veth))?;
    }
    Ok(())
}

fn link_exists(name: &str) -> bool {
    PathBuf::from("/sys/class/net").join(name).exists()
}

/// Namespaces named like this instance's slots (for sweeping leftovers).
pub fn list_netns(instance: &str) -> Vec<(u32, String)> {
    let prefix = format!("{instance}-");
    let Ok(dir) = std::fs::read_dir(netlink::NETNS_DIR) else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter_map(|n| Some((n.strip_prefix(&prefix)?.parse().ok()?, n.clone())))
        .collect()
}

/// Host-side links named like this instance's slots.
pub fn list_links(instance: &str) -> Vec<(u32, String)> {
    let prefix = format!("{instance}-");
    let Ok(dir) = std::fs::read_dir("/sys/class/net") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter_map(|n| Some((n.strip_prefix(&prefix)?.parse().ok()?, n.clone())))
        .collect()
}

/// The nameservers a capsule should use: the host's, except that a
/// loopback resolver (systemd-resolved's 127.0.0.53, a local dnsmasq) is
/// replaced by what it forwards to, since a capsule cannot reach the
/// host's loopback.
pub fn host_nameservers() -> Vec<std::net::IpAddr> {
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .map(|s| parse_resolv(&s))
            .unwrap_or_default()
    };
    let mut ns = read("/etc/resolv.conf");
    if ns.is_empty() || ns.iter().any(|a| a.is_loopback()) {
        let upstream = read("/run/systemd/resolve/resolv.conf");
        let upstream: Vec<_> = upstream.into_iter().filter(|a| !a.is_loopback()).collect();
        ns.retain(|a| !a.is_loopback());
        for a in upstream {
            if !ns.contains(&a) {
                ns.push(a);
            }
        }
    }
    ns
}

fn parse_resolv(text: &str) -> Vec<std::net::IpAddr> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|rest| {
            rest.split_whitespace()
                .next()?
                .split('%')
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

/// The `/etc/resolv.conf` a capsule gets.
pub fn resolv_conf(nameservers: &[std::net::IpAddr]) -> String {
    let mut s = String::from("# written by wrenn-agent\n");
    for n in nameservers {
        s.push_str(&format!("nameserver {n}\n"));
    }
    s
}

/// IP forwarding must be on for capsules to reach anything past the host.
pub fn enable_forwarding() -> std::io::Result<()> {
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_slash_30s_inside_the_pool() {
        let pool: ipnet::Ipv4Net = "10.88.0.0/16".parse().unwrap();
        let s = Slot::new("wrenn", 0, &pool);
        assert_eq!(
            (s.host_ip, s.capsule_ip),
            ("10.88.0.1".parse().unwrap(), "10.88.0.2".parse().unwrap())
        );
        let s = Slot::new("wrenn", 16383, &pool);
        assert_eq!(s.capsule_ip, "10.88.255.254".parse::<Ipv4Addr>().unwrap());
        assert_eq!(s.veth, "wrenn-16383");
        assert!(s.veth.len() <= 15);
    }

    #[test]
    fn loopback_resolvers_are_skipped() {
        let ns = parse_resolv("# c\nnameserver 127.0.0.53\nnameserver  1.1.1.1 \nnameserver fe80::1%eth0\noptions edns0\n");
        assert_eq!(ns.len(), 3);
        assert!(ns[0].is_loopback());
        assert_eq!(ns[1], "1.1.1.1".parse::<std::net::IpAddr>().unwrap());
        assert_eq!(
            resolv_conf(&ns[1..2]),
            "# written by wrenn-agent\nnameserver 1.1.1.1\n"
        );
    }
}
