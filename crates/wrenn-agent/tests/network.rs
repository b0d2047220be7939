//! A capsule's network as `network::create` builds it in-process over
//! rtnetlink, read back with iproute2 (what an operator would look at),
//! used for a real connection, and undone by `network::destroy`.

mod common;

use std::io::Write as _;
use std::process::Command;

use serde_json::Value;
use wrenn_agent::network::{self, Slot};

fn ip(args: &[&str]) -> Value {
    let out = Command::new("ip").arg("-j").args(args).output().unwrap();
    assert!(out.status.success(), "ip {args:?}: {out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The one link `ip -j [-n ns] addr show dev` names.
fn link(ns: Option<&str>, dev: &str) -> Value {
    let mut args = Vec::new();
    if let Some(ns) = ns {
        args.extend(["-n", ns]);
    }
    args.extend(["addr", "show", "dev", dev]);
    ip(&args)[0].clone()
}

fn is_up(link: &Value) -> bool {
    link["flags"].as_array().unwrap().iter().any(|f| f == "UP")
}

fn inet(link: &Value) -> Vec<(String, u64)> {
    link["addr_info"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["family"] == "inet")
        .map(|a| {
            (
                a["local"].as_str().unwrap().to_owned(),
                a["prefixlen"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn sh(script: &str) {
    let out = Command::new("sh").args(["-c", script]).output().unwrap();
    assert!(out.status.success(), "{script}: {out:?}");
}

/// `tc -d {what} show dev eth0` in `ns`, lines sorted, the qdisc's
/// reference count (which the namespace's other users move) left out.
fn tc_show(ns: &str, what: &str) -> String {
    let out = Command::new("tc")
        .args(["-n", ns, "-d", what, "show", "dev", "eth0"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    let mut lines: Vec<String> = text
        .lines()
        .map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            let mut kept = Vec::new();
            let mut skip = false;
            for w in words {
                if skip {
                    skip = false;
                } else if w == "refcnt" {
                    skip = true;
                } else {
                    kept.push(w);
                }
            }
            kept.join(" ")
        })
        .collect();
    lines.sort();
    lines.join("\n")
}

fn mounted(path: &std::path::Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let p = path.display().to_string();
    info.lines()
        .any(|l| l.split(' ').nth(4) == Some(p.as_str()))
}

/// `slot`'s shaping against what `tc` makes of the same plan in a
/// reference namespace (slot `reference` of the pool).
fn shaped_like_tc(cfg: &network::NetworkConfig, slot: &Slot, reference: u32) {
    let reference = Slot::new(&cfg.instance, reference, &cfg.pool);
    let _undo = Undo(reference.clone());
    let shaping = network::Shaping::new(cfg.egress_rate, cfg.egress_burst, slot.host_ip);
    let rns = reference.netns.as_str();
    sh(&format!(
        "set -e; ip netns add {rns}; ip link add {v} type veth peer name eth0 netns {rns}; \
         ip -n {rns} link set eth0 txqueuelen 5000 up; ip -n {rns} link set lo up",
        v = reference.veth
    ));
    let mut tc = Command::new("tc")
        .args(["-n", rns, "-batch", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    tc.stdin
        .take()
        .unwrap()
        .write_all(shaping.tc_script().as_bytes())
        .unwrap();
    assert!(tc.wait().unwrap().success(), "{}", shaping.tc_script());
    for what in ["qdisc", "class", "filter"] {
        let ours = tc_show(&slot.netns, what);
        assert!(
            ours.contains("htb") || ours.contains("u32"),
            "{what}: {ours}"
        );
        assert_eq!(ours, tc_show(rns, what), "{what}");
    }
}

/// Undoes the slot if the test fails half-way.
struct Undo(Slot);

impl Drop for Undo {
    fn drop(&mut self) {
        let _ = network::destroy(&self.0);
    }
}

#[test]
fn a_slot_is_built_as_iproute2_shows_it_and_undone() {
    let data = tempfile::tempdir().unwrap();
    let cfg = common::test_config(data.path()).network;
    let slot = Slot::new(&cfg.instance, 2, &cfg.pool);
    let undo = Undo(slot.clone());
    network::create(&cfg, &slot).unwrap();

    // the namespace is a named one, where `ip netns` and runtimes look
    let ns = slot.netns.as_str();
    assert!(mounted(&slot.netns_path()), "{:?}", slot.netns_path());
    let listed = Command::new("ip").args(["netns", "list"]).output().unwrap();
    assert!(String::from_utf8_lossy(&listed.stdout).contains(ns));

    // host end: address, up, queue length
    let host = link(None, &slot.veth);
    assert!(is_up(&host), "{host}");
    assert_eq!(host["txqlen"], 5000, "{host}");
    assert_eq!(inet(&host), [(slot.host_ip.to_string(), 30)]);

    // capsule end: eth0 addressed and up, lo up, the default route via the host
    let eth0 = link(Some(ns), "eth0");
    assert!(is_up(&eth0), "{eth0}");
    assert_eq!(eth0["txqlen"], 5000, "{eth0}");
    assert_eq!(inet(&eth0), [(slot.capsule_ip.to_string(), 30)]);
    assert!(is_up(&link(Some(ns), "lo")));
    let routes = ip(&["-n", ns, "route", "show", "default"]);
    assert_eq!(routes.as_array().unwrap().len(), 1, "{routes}");
    assert_eq!(routes[0]["gateway"], slot.host_ip.to_string(), "{routes}");
    assert_eq!(routes[0]["dev"], "eth0", "{routes}");
    // shaping: the same qdisc, classes and filter as `tc` makes of the
    // same plan; also at a rate past 32 bits of bytes per second
    shaped_like_tc(&cfg, &slot, 3);
    let fast = network::NetworkConfig {
        egress_rate: 5_000_000_000,
        ..cfg.clone()
    };
    let fast_slot = Slot::new(&cfg.instance, 4, &cfg.pool);
    let _undo_fast = Undo(fast_slot.clone());
    network::create(&fast, &fast_slot).unwrap();
    shaped_like_tc(&fast, &fast_slot, 5);
    network::destroy(&fast_slot).unwrap();

    // and it carries a connection from the capsule side to the host end
    let listener = std::net::TcpListener::bind((slot.host_ip, 0)).unwrap();
    let port = listener.local_addr().unwrap().port();
    let connect = format!(
        "import socket; s = socket.create_connection(('{}', {port}), timeout=5); s.sendall(b'hi')",
        slot.host_ip
    );
    let client = Command::new("ip")
        .args(["netns", "exec", ns, "python3", "-c", &connect])
        .spawn()
        .unwrap();
    let (mut conn, peer) = listener.accept().unwrap();
    assert_eq!(peer.ip(), std::net::IpAddr::V4(slot.capsule_ip));
    let mut got = String::new();
    std::io::Read::read_to_string(&mut conn, &mut got).unwrap();
    assert_eq!(got, "hi");
    assert!(client.wait_with_output().unwrap().status.success());

    // a slot that is taken is refused, and the refusal takes nothing down
    let err = network::create(&cfg, &slot).unwrap_err();
    assert!(err.to_string().contains("create netns"), "{err}");
    assert!(std::error::Error::source(&err)
        .unwrap()
        .to_string()
        .contains("exists"));
    assert_eq!(
        inet(&link(Some(ns), "eth0")),
        [(slot.capsule_ip.to_string(), 30)]
    );

    // destroy undoes it all, and again is no error
    network::destroy(&slot).unwrap();
    assert!(!slot.netns_path().exists());
    assert!(!mounted(&slot.netns_path()));
    assert_eq!(network::list_links(&cfg.instance), []);
    network::destroy(&slot).unwrap();
    drop(undo);
}

/// The set elements of `table`'s `set`, as `nft` lists them.
fn nft_elements(table: &str, set: &str) -> String {
    let out = Command::new("nft")
        .args(["list", "set", "inet", table, set])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    // (a long list wraps over several lines)
    let text = String::from_utf8(out.stdout).unwrap();
    let flat = text.split_whitespace().collect::<Vec<_>>().join(" ");
    match flat.split_once("elements = ") {
        Some((_, rest)) => rest[..=rest.find('}').unwrap()].to_owned(),
        None => String::new(),
    }
}

/// Removes the test's firewall table however the test ends.
struct Uninstall(network::Firewall);

impl Drop for Uninstall {
    fn drop(&mut self) {
        let _ = self.0.uninstall();
    }
}

#[test]
fn firewall_elements_are_sent_as_nft_would_write_them() {
    let data = tempfile::tempdir().unwrap();
    let cfg = common::test_config(data.path()).network;
    let fw = network::Firewall::new(&cfg.instance, cfg.pool);
    let table = fw.table().to_owned();
    fw.install([]).unwrap();
    let fw = Uninstall(fw);
    let a = Slot::new(&cfg.instance, 7, &cfg.pool);
    let b = Slot::new(&cfg.instance, 12, &cfg.pool);

    fw.0.add(&a, true).unwrap();
    fw.0.add(&b, false).unwrap();
    let bound = |s: &Slot| format!("\"{}\" . {}", s.veth, s.capsule_ip);
    let listed = nft_elements(&table, "bound");
    assert!(
        listed.contains(&bound(&a)) && listed.contains(&bound(&b)),
        "{listed}"
    );
    assert_eq!(
        nft_elements(&table, "internet"),
        format!("{{ {} }}", a.capsule_ip)
    );
    // adding what is there already is no error (nft's `add element`)
    fw.0.add(&a, true).unwrap();

    // internet switched for one capsule, the other untouched
    fw.0.set_internet(&b, true).unwrap();
    fw.0.set_internet(&a, false).unwrap();
    assert_eq!(
        nft_elements(&table, "internet"),
        format!("{{ {} }}", b.capsule_ip)
    );
    // switching off what is off is refused, with the kernel's reason
    let err = fw.0.set_internet(&a, false).unwrap_err();
    let why = std::error::Error::source(&err).unwrap().to_string();
    assert!(why.contains("No such file"), "{why}");

    // removal: all of a capsule's elements; again is no error, even when
    // the batch as a whole is refused (a's internet element is gone)
    fw.0.remove(&a, true).unwrap();
    fw.0.remove(&a, true).unwrap();
    let listed = nft_elements(&table, "bound");
    assert!(
        !listed.contains(&bound(&a)) && listed.contains(&bound(&b)),
        "{listed}"
    );
    fw.0.remove(&b, true).unwrap();
    assert_eq!(nft_elements(&table, "bound"), "");
    assert_eq!(nft_elements(&table, "internet"), "");

    // a table that is not there: a clear error, nothing half done
    fw.0.uninstall().unwrap();
    let err = fw.0.add(&a, true).unwrap_err();
    assert!(err.to_string().contains("add capsule rules"), "{err}");
}
