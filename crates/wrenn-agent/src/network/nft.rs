//! The agent's nftables table (`inet {instance}`): installed whole at start
//! (one atomic `nft -f`), then edited per capsule by adding and removing set
//! elements, so a create or destroy is a single `nft` call.
//!
//! Policy, for traffic entering from any capsule veth:
//! - to the host itself (input hook): only replies to connections the host
//!   opened (the agent's calls to envd, the proxy) pass;
//! - forwarded: a capsule may send only from its own address on its own
//!   veth (`bound`), never to the pool (other capsules), link-local
//!   (metadata services), multicast or broadcast, never IPv6, and past the
//!   host only if its address is in `internet`, where it is masqueraded.
//! - nothing from outside may open a connection to a capsule.

use std::fmt::Write as _;

use super::{NetError, Slot};
use crate::cmd;

#[derive(Debug, Clone)]
pub struct Firewall {
    table: String,
    pattern: String,
    pool: ipnet::Ipv4Net,
}

impl Firewall {
    pub fn new(instance: &str, pool: ipnet::Ipv4Net) -> Self {
        Firewall {
            table: instance.to_owned(),
            pattern: format!("{instance}-*"),
            pool,
        }
    }

    pub fn table(&self) -> &str {
        &self.table
    }

    /// Replace the table with a fresh one holding `capsules` (slot, internet).
    pub fn install<'a>(
        &self,
        capsules: impl IntoIterator<Item = (&'a Slot, bool)>,
    ) -> Result<(), NetError> {
        let Firewall {
            table,
            pattern: p,
            pool,
        } = self;
        let mut script = format!(
            "table inet {table}\n\
             delete table inet {table}\n\
             table inet {table} {{\n\
               set internet {{ type ipv4_addr; }}\n\
               set bound {{ type ifname . ipv4_addr; }}\n\
               chain input {{ type filter hook input priority filter - 1; policy accept;\n\
                 iifname \"{p}\" ct state established,related accept\n\
                 iifname \"{p}\" drop\n\
               }}\n\
               chain forward {{ type filter hook forward priority filter - 1; policy accept;\n\
                 iifname \"{p}\" iifname . ip saddr != @bound drop\n\
                 iifname \"{p}\" meta nfproto ipv6 drop\n\
                 iifname \"{p}\" ip daddr {{ {pool}, 169.254.0.0/16, 224.0.0.0/4, 255.255.255.255 }} drop\n\
                 iifname \"{p}\" ip saddr != @internet drop\n\
                 oifname \"{p}\" ct state established,related accept\n\
                 oifname \"{p}\" drop\n\
               }}\n\
               chain postrouting {{ type nat hook postrouting priority srcnat; policy accept;\n\
                 ip saddr {pool} oifname != \"{p}\" masquerade\n\
               }}\n\
             }}\n"
        );
        for (slot, internet) in capsules {
            script.push_str(&self.elements("add", slot, internet));
        }
        self.apply(&script, "install firewall")
    }

    /// Let a capsule's traffic through (to the internet only if `internet`).
    pub fn add(&self, slot: &Slot, internet: bool) -> Result<(), NetError> {
        self.apply(&self.elements("add", slot, internet), "add capsule rules")
    }

    /// Forget a capsule; missing elements are fine (teardown is repeatable).
    pub fn remove(&self, slot: &Slot, internet: bool) -> Result<(), NetError> {
        // One atomic batch normally; if it fails because an element is
        // already gone (nft 1.0.6 has no `destroy`), one at a time.
        self.apply(
            &self.elements("delete", slot, internet),
            "remove capsule rules",
        )
        .or_else(|_| {
            for (set, el) in self.element_list(slot, internet) {
                let _ = self.apply(
                    &format!("delete element inet {} {set} {{ {el} }}\n", self.table),
                    "remove",
                );
            }
            Ok(())
        })
    }

    pub fn set_internet(&self, slot: &Slot, on: bool) -> Result<(), NetError> {
        let verb = if on { "add" } else { "delete" };
        let s = format!(
            "{verb} element inet {} internet {{ {} }}\n",
            self.table, slot.capsule_ip
        );
        self.apply(&s, "switch internet")
    }

    /// Remove the whole table (agent uninstall, tests).
    pub fn uninstall(&self) -> Result<(), NetError> {
        let s = format!("table inet {t}\ndelete table inet {t}\n", t = self.table);
        self.apply(&s, "remove firewall")
    }

    fn element_list(&self, slot: &Slot, internet: bool) -> Vec<(&'static str, String)> {
        let mut v = vec![("bound", format!("\"{}\" . {}", slot.veth, slot.capsule_ip))];
        if internet {
            v.push(("internet", slot.capsule_ip.to_string()));
        }
        v
    }

    fn elements(&self, verb: &str, slot: &Slot, internet: bool) -> String {
        let mut s = String::new();
        for (set, el) in self.element_list(slot, internet) {
            let _ = writeln!(s, "{verb} element inet {} {set} {{ {el} }}", self.table);
        }
        s
    }

    fn apply(&self, script: &str, step: &'static str) -> Result<(), NetError> {
        cmd::run("nft", ["-f", "-"], Some(script.as_bytes()))
            .map(|_| ())
            .map_err(super::step(step, &self.table))
    }
}
