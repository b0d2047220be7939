//! The agent's nftables table (`inet {instance}`): installed whole at start
//! (one atomic `nft -f`), then edited per capsule by adding and removing set
//! elements. Those edits are nf_tables batches the agent sends itself over
//! a netfilter netlink socket (what `nft add element` sends, without the
//! process), so a create or destroy runs no `nft`.
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
use std::io;

use netlink_packet_core::{NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_REQUEST};
use netlink_packet_netfilter::nftables::{
    DataAttribute, ListAttribute, NfTablesMessage, SetElementAttribute, SetElementList,
    SetElementMessage,
};
use netlink_packet_netfilter::none::ControlMessage;
use netlink_packet_netfilter::{NetfilterHeader, NetfilterMessage, NetfilterProtoFamily};
use netlink_sys::protocols::NETLINK_NETFILTER;

use super::netlink::Link;
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
            script.push_str(&self.add_script(slot, internet));
        }
        self.apply(&script, "install firewall")
    }

    /// Let a capsule's traffic through (to the internet only if `internet`).
    pub fn add(&self, slot: &Slot, internet: bool) -> Result<(), NetError> {
        self.change(true, &keys(slot, internet))
            .map_err(super::step("add capsule rules", &self.table))
    }

    /// Forget a capsule; missing elements are fine (teardown is repeatable).
    pub fn remove(&self, slot: &Slot, internet: bool) -> Result<(), NetError> {
        // One atomic batch normally; if it fails because an element is
        // already gone, one at a time, each missing one taken as removed.
        let all = keys(slot, internet);
        if self.change(false, &all).is_ok() {
            return Ok(());
        }
        for key in all {
            match self.change(false, &[key]) {
                Err(e) if e.raw_os_error() != Some(libc::ENOENT) => {
                    return Err(super::step("remove capsule rules", &self.table)(e))
                }
                _ => {}
            }
        }
        Ok(())
    }

    pub fn set_internet(&self, slot: &Slot, on: bool) -> Result<(), NetError> {
        self.change(on, &[internet_key(slot)])
            .map_err(super::step("switch internet", &self.table))
    }

    /// Add (`add`) or delete set elements, as one nf_tables batch: all of
    /// them or, when the kernel refuses one, none. The first refusal is
    /// the error.
    fn change(&self, add: bool, elements: &[(&'static str, Vec<u8>)]) -> io::Result<()> {
        let control = |m: ControlMessage| {
            // batch delimiters name the subsystem in the resource ID
            let header = NetfilterHeader::new(
                NetfilterProtoFamily::Unspec,
                0,
                libc::NFNL_SUBSYS_NFTABLES as u16,
            );
            let mut p = NetlinkMessage::from(NetfilterMessage::new(header, m));
            p.header.flags = NLM_F_REQUEST;
            p
        };
        let mut packets = vec![control(ControlMessage::BatchBegin)];
        for (set, key) in elements {
            let list = SetElementMessage {
                attributes: vec![
                    SetElementList::Table(self.table.clone()),
                    SetElementList::Set((*set).to_owned()),
                    SetElementList::Elements(vec![ListAttribute::Element(vec![
                        SetElementAttribute::Key(DataAttribute::Value(key.clone())),
                    ])]),
                ],
            };
            let msg = if add {
                NfTablesMessage::NewSetElement(list)
            } else {
                NfTablesMessage::DeleteSetElement(list)
            };
            let header = NetfilterHeader::new(NetfilterProtoFamily::Inet, 0, 0);
            let mut p = NetlinkMessage::from(NetfilterMessage::new(header, msg));
            p.header.flags = NLM_F_REQUEST | NLM_F_ACK | if add { NLM_F_CREATE } else { 0 };
            packets.push(p);
        }
        packets.push(control(ControlMessage::BatchEnd));
        let mut link = Link::open(NETLINK_NETFILTER)?;
        let first = link.send(packets)?;
        // one answer (an ack or an error) per element, after the batch; an
        // error for the batch's begin or end (no nf_tables, say) ends it
        let n = elements.len() as u32;
        let (asked, mut answered) = (first + 1..first + 1 + n, 0);
        let mut refused = None;
        link.receive(|msg: NetlinkMessage<NetfilterMessage>| {
            let NetlinkPayload::Error(e) = msg.payload else {
                return false;
            };
            let seq = msg.header.sequence_number;
            if e.code.is_some() && refused.is_none() {
                refused = Some(e.to_io());
            }
            if asked.contains(&seq) {
                answered += 1;
                answered == n
            } else {
                e.code.is_some() && (first..=first + n + 1).contains(&seq)
            }
        })?;
        refused.map_or(Ok(()), Err)
    }

    /// Remove the whole table (agent uninstall, tests).
    pub fn uninstall(&self) -> Result<(), NetError> {
        let s = format!("table inet {t}\ndelete table inet {t}\n", t = self.table);
        self.apply(&s, "remove firewall")
    }

    /// `nft` script lines adding `slot`'s elements (for [`Firewall::install`]).
    fn add_script(&self, slot: &Slot, internet: bool) -> String {
        let t = &self.table;
        let mut s = format!(
            "add element inet {t} bound {{ \"{}\" . {} }}\n",
            slot.veth, slot.capsule_ip
        );
        if internet {
            let _ = writeln!(s, "add element inet {t} internet {{ {} }}", slot.capsule_ip);
        }
        s
    }

    fn apply(&self, script: &str, step: &'static str) -> Result<(), NetError> {
        cmd::run("nft", ["-f", "-"], Some(script.as_bytes()))
            .map(|_| ())
            .map_err(super::step(step, &self.table))
    }
}

/// `slot`'s set elements as the kernel keys them: `bound` is `ifname .
/// ipv4_addr`, the name zero-padded to IFNAMSIZ (16) then the address in
/// network order; `internet` the address.
fn keys(slot: &Slot, internet: bool) -> Vec<(&'static str, Vec<u8>)> {
    let mut bound = [0u8; 20];
    let name = slot.veth.as_bytes();
    bound[..name.len().min(15)].copy_from_slice(&name[..name.len().min(15)]);
    bound[16..].copy_from_slice(&slot.capsule_ip.octets());
    let mut v = vec![("bound", bound.to_vec())];
    if internet {
        v.push(internet_key(slot));
    }
    v
}

fn internet_key(slot: &Slot) -> (&'static str, Vec<u8>) {
    ("internet", slot.capsule_ip.octets().to_vec())
}
