//! Named network namespaces, links, addresses and routes made from inside
//! the agent over rtnetlink, instead of one `ip` process per step: on a
//! busy host a capsule's network was three `ip` runs (namespace, host
//! end, capsule end), each an exec, a dynamic link and a netlink
//! conversation of its own.
//!
//! A namespace is named as iproute2 names one (a bind mount of the
//! namespace on `/run/netns/{name}`), so `ip netns` and the runtimes see
//! the same thing. It is made on a short-lived thread of its own: a
//! namespace switch is per thread, and no thread of the agent's pools is
//! ever moved out of the host's. That thread also opens the netlink
//! socket that configures the inside; a socket stays in the namespace it
//! was made in, whichever thread uses it later.
//!
//! Egress shaping is spoken here too ([`Rtnl::htb_qdisc`],
//! [`Rtnl::htb_class`], [`Rtnl::u32_filter`]): the route crate has u32
//! filters but no HTB, whose two structs (`tc_htb_glob`, `tc_htb_opt`)
//! are laid out here as the kernel's `pkt_sched.h` declares them, with
//! rates in bytes per second and bursts in scheduler ticks as `tc`
//! computes them; the test compares the result with what `tc` builds.
//!
//! Requests are synchronous (send, then read until the kernel's ack, 10 s
//! at most), as the rest of the network code is: callers are on blocking
//! threads. The firewall's nf_tables batches use the same socket ([`Link`]).

use std::fs::File;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use netlink_packet_core::{
    DefaultNla, NetlinkBuffer, NetlinkDeserializable, NetlinkHeader, NetlinkMessage,
    NetlinkPayload, NetlinkSerializable, NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE,
    NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage, AddressScope};
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::tc::{
    TcAttribute, TcFilterU32Option, TcHandle, TcMessage, TcOption, TcU32Key, TcU32Selector,
    TcU32SelectorFlags,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

/// Where named namespaces live (iproute2's directory).
pub const NETNS_DIR: &str = "/run/netns";

/// How long a netlink request may wait for its answer.
const REPLY_TIMEOUT_SECS: libc::time_t = 10;

/// A netlink socket of one family (`protocol`), in the namespace it was
/// opened in, spoken synchronously (rtnetlink here, nf_tables batches in
/// the firewall).
pub struct Link {
    sock: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl Link {
    /// A socket in the calling thread's network namespace.
    pub fn open(protocol: isize) -> io::Result<Link> {
        let mut sock = Socket::new(protocol)?;
        sock.bind_auto()?;
        sock.connect(&SocketAddr::new(0, 0))?;
        // The kernel answers at once; a reply that never comes is an error
        // after this long, not a blocked thread.
        let timeout = libc::timeval {
            tv_sec: REPLY_TIMEOUT_SECS,
            tv_usec: 0,
        };
        // SAFETY: a timeval of the size given, for a socket we own.
        let set = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&timeout as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if set != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Link {
            sock,
            seq: 0,
            buf: Vec::with_capacity(16 * 1024),
        })
    }

    /// Send `packets` in one write, numbered from the next sequence number
    /// on; returns the first one's number.
    pub fn send<M: NetlinkSerializable>(
        &mut self,
        packets: Vec<NetlinkMessage<M>>,
    ) -> io::Result<u32> {
        let first = self.seq.wrapping_add(1);
        let mut out = Vec::new();
        for mut packet in packets {
            self.seq = self.seq.wrapping_add(1);
            packet.header.sequence_number = self.seq;
            packet.finalize();
            let at = out.len();
            out.resize(at + packet.buffer_len(), 0);
            packet.serialize(&mut out[at..]);
        }
        self.sock.send(&out, 0)?;
        Ok(first)
    }

    /// Read messages, passing each to `each`, until it says it has seen
    /// enough (`true`).
    pub fn receive<M: NetlinkDeserializable>(
        &mut self,
        mut each: impl FnMut(NetlinkMessage<M>) -> bool,
    ) -> io::Result<()> {
        loop {
            self.buf.clear();
            let n = self.sock.recv(&mut self.buf, 0)?;
            let mut at = 0;
            while at < n {
                let bytes = &self.buf[at..n];
                let len = NetlinkBuffer::new_checked(bytes)
                    .map_err(|e| invalid(format!("netlink reply: {e}")))?
                    .length() as usize;
                let msg = NetlinkMessage::<M>::deserialize(&bytes[..len])
                    .map_err(|e| invalid(format!("netlink reply: {e}")))?;
                // netlink pads each message to 4 bytes
                at += (len + 3) & !3;
                if each(msg) {
                    return Ok(());
                }
            }
        }
    }
}

/// A route netlink socket, in the namespace it was opened in.
pub struct Rtnl(Link);

impl Rtnl {
    /// A socket in the calling thread's network namespace.
    pub fn open() -> io::Result<Rtnl> {
        Link::open(NETLINK_ROUTE).map(Rtnl)
    }

    /// Send `msg` and wait for its answer: `Ok(Some(reply))` for a request
    /// that returns a message, `Ok(None)` for an ack, the kernel's errno
    /// as an error.
    fn call(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> io::Result<Option<RouteNetlinkMessage>> {
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        let seq = self.0.send(vec![NetlinkMessage::new(
            header,
            NetlinkPayload::InnerMessage(msg),
        )])?;
        let mut reply = None;
        let mut failed = None;
        self.0.receive(|msg: NetlinkMessage<RouteNetlinkMessage>| {
            if msg.header.sequence_number != seq {
                return false;
            }
            match msg.payload {
                NetlinkPayload::Error(e) => {
                    failed = e.code.map(|_| e.to_io());
                    true
                }
                NetlinkPayload::Done(_) => true,
                NetlinkPayload::InnerMessage(m) => {
                    reply = Some(m);
                    // a request without NLM_F_ACK ends with its reply
                    flags & NLM_F_ACK == 0
                }
                _ => false,
            }
        })?;
        failed.map_or(Ok(reply), Err)
    }

    fn create(&mut self, msg: RouteNetlinkMessage) -> io::Result<()> {
        self.call(msg, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL)
            .map(drop)
    }

    /// The index of the link called `name`.
    pub fn link_index(&mut self, name: &str) -> io::Result<u32> {
        let mut m = LinkMessage::default();
        m.attributes.push(LinkAttribute::IfName(name.to_owned()));
        match self.call(RouteNetlinkMessage::GetLink(m), 0)? {
            Some(RouteNetlinkMessage::NewLink(l)) => Ok(l.header.index),
            _ => Err(invalid(format!("no link message for {name}"))),
        }
    }

    /// A veth pair: `name` here, `peer` in the namespace `peer_ns`, both
    /// with `txqueuelen`.
    pub fn add_veth(
        &mut self,
        name: &str,
        peer: &str,
        peer_ns: BorrowedFd<'_>,
        txqueuelen: u32,
    ) -> io::Result<()> {
        let mut p = LinkMessage::default();
        p.attributes = vec![
            LinkAttribute::IfName(peer.to_owned()),
            LinkAttribute::TxQueueLen(txqueuelen),
            LinkAttribute::NetNsFd(peer_ns.as_raw_fd()),
        ];
        let mut m = LinkMessage::default();
        m.attributes = vec![
            LinkAttribute::IfName(name.to_owned()),
            LinkAttribute::TxQueueLen(txqueuelen),
            LinkAttribute::LinkInfo(vec![
                LinkInfo::Kind(InfoKind::Veth),
                LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(p))),
            ]),
        ];
        self.create(RouteNetlinkMessage::NewLink(m))
    }

    /// Bring link `index` up.
    pub fn set_up(&mut self, index: u32) -> io::Result<()> {
        let mut m = LinkMessage::default();
        m.header.index = index;
        m.header.flags = LinkFlags::Up;
        m.header.change_mask = LinkFlags::Up;
        self.call(RouteNetlinkMessage::SetLink(m), NLM_F_ACK)
            .map(drop)
    }

    /// `addr/prefix_len` on link `index`.
    pub fn add_address(&mut self, index: u32, addr: Ipv4Addr, prefix_len: u8) -> io::Result<()> {
        let mut m = AddressMessage::default();
        m.header.family = AddressFamily::Inet;
        m.header.prefix_len = prefix_len;
        m.header.scope = AddressScope::Universe;
        m.header.index = index;
        m.attributes = vec![
            AddressAttribute::Local(addr.into()),
            AddressAttribute::Address(addr.into()),
        ];
        self.create(RouteNetlinkMessage::NewAddress(m))
    }

    /// The main table's default route, through `gateway`.
    pub fn add_default_route(&mut self, gateway: Ipv4Addr) -> io::Result<()> {
        let mut m = RouteMessage::default();
        m.header.address_family = AddressFamily::Inet;
        m.header.table = RouteHeader::RT_TABLE_MAIN;
        m.header.protocol = RouteProtocol::Boot;
        m.header.scope = RouteScope::Universe;
        m.header.kind = RouteType::Unicast;
        m.attributes = vec![RouteAttribute::Gateway(RouteAddress::Inet(gateway))];
        self.create(RouteNetlinkMessage::NewRoute(m))
    }

    /// Delete the link called `name`; one that is not there is no error.
    pub fn delete_link(&mut self, name: &str) -> io::Result<()> {
        let mut m = LinkMessage::default();
        m.attributes.push(LinkAttribute::IfName(name.to_owned()));
        match self.call(RouteNetlinkMessage::DelLink(m), NLM_F_ACK) {
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(()),
            other => other.map(drop),
        }
    }
}

/// One HTB class: `rate` assured and up to `ceil` borrowed (bytes per
/// second), `burst` bytes at line rate, and its priority among siblings.
#[derive(Debug, Clone, Copy)]
pub struct HtbClass {
    pub parent: TcHandle,
    pub id: TcHandle,
    pub rate: u64,
    pub ceil: u64,
    pub burst: u64,
    pub quantum: u32,
    pub prio: u32,
}

// pkt_sched.h
const TCA_HTB_PARMS: u16 = 1;
const TCA_HTB_INIT: u16 = 2;
const TCA_HTB_RATE64: u16 = 6;
const TCA_HTB_CEIL64: u16 = 7;
const TC_HTB_PROTOVER: u32 = 3;
const TC_LINKLAYER_ETHERNET: u8 = 1;
/// The kernel's scheduler tick (`PSCHED_SHIFT` = 6: 64 ns).
const PSCHED_TICK_NS: u128 = 64;

impl Rtnl {
    fn tc(&mut self, msg: RouteNetlinkMessage, flags: u16) -> io::Result<()> {
        self.call(msg, NLM_F_ACK | flags).map(drop)
    }

    /// `qdisc replace dev {index} root handle {handle} htb default {default}`.
    pub fn htb_qdisc(&mut self, index: u32, handle: TcHandle, default: u16) -> io::Result<()> {
        // struct tc_htb_glob: version, rate2quantum, defcls, debug, direct_pkts
        let glob = [TC_HTB_PROTOVER, 10, u32::from(default), 0, 0];
        let mut m = TcMessage::with_index(index as i32);
        m.header.handle = handle;
        m.header.parent = TcHandle::ROOT;
        m.attributes = vec![
            TcAttribute::Kind("htb".into()),
            TcAttribute::Options(vec![TcOption::Other(DefaultNla::new(
                TCA_HTB_INIT,
                glob.iter().flat_map(|v| v.to_ne_bytes()).collect(),
            ))]),
        ];
        self.tc(
            RouteNetlinkMessage::NewQueueDiscipline(m),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
    }

    /// `class add dev {index} parent … classid … htb rate … ceil … burst …
    /// cburst … prio … quantum …`.
    pub fn htb_class(&mut self, index: u32, c: &HtbClass) -> io::Result<()> {
        let mut opt = Vec::with_capacity(44);
        // struct tc_ratespec (rate, then ceil): cell_log, linklayer,
        // overhead, cell_align, mpu, rate (32 bits; RATE64 beyond)
        for r in [c.rate, c.ceil] {
            opt.extend([0u8, TC_LINKLAYER_ETHERNET]);
            opt.extend(0u16.to_ne_bytes());
            opt.extend(0i16.to_ne_bytes());
            opt.extend(0u16.to_ne_bytes());
            opt.extend((r.min(u64::from(u32::MAX)) as u32).to_ne_bytes());
        }
        // buffer, cbuffer (ticks at rate and ceil), quantum, level, prio
        for v in [
            ticks(c.burst, c.rate),
            ticks(c.burst, c.ceil),
            c.quantum,
            0,
            c.prio,
        ] {
            opt.extend(v.to_ne_bytes());
        }
        let mut options = vec![TcOption::Other(DefaultNla::new(TCA_HTB_PARMS, opt))];
        for (kind, r) in [(TCA_HTB_RATE64, c.rate), (TCA_HTB_CEIL64, c.ceil)] {
            if r > u64::from(u32::MAX) {
                options.push(TcOption::Other(DefaultNla::new(
                    kind,
                    r.to_ne_bytes().to_vec(),
                )));
            }
        }
        let mut m = TcMessage::with_index(index as i32);
        m.header.handle = c.id;
        m.header.parent = c.parent;
        m.attributes = vec![
            TcAttribute::Kind("htb".into()),
            TcAttribute::Options(options),
        ];
        self.tc(
            RouteNetlinkMessage::NewTrafficClass(m),
            NLM_F_CREATE | NLM_F_EXCL,
        )
    }

    /// `filter add dev {index} parent {parent} protocol ip prio {prio} u32
    /// match ip sport {sport} 0xffff match ip dst {dst}/32 flowid {flow}`.
    pub fn u32_filter(
        &mut self,
        index: u32,
        parent: TcHandle,
        prio: u16,
        sport: u16,
        dst: Ipv4Addr,
        flow: TcHandle,
    ) -> io::Result<()> {
        const ETH_P_IP: u16 = 0x0800;
        let key = |val: u32, mask: u32, off: i32| {
            let mut k = TcU32Key::default();
            (k.val, k.mask, k.off) = (val, mask, off);
            k
        };
        let mut sel = TcU32Selector::default();
        sel.flags = TcU32SelectorFlags::Terminal;
        // offsets into an IPv4 header without options, as tc's `match
        // ip` takes them: the source port right after it (20), the
        // destination address at 16
        sel.keys = vec![
            key(u32::from(sport) << 16, 0xffff_0000, 20),
            key(u32::from(dst), u32::MAX, 16),
        ];
        sel.nkeys = sel.keys.len() as u8;
        let mut m = TcMessage::with_index(index as i32);
        m.header.parent = parent;
        // the filter's priority above, its protocol (network order) below
        m.header.info = (u32::from(prio) << 16) | u32::from(ETH_P_IP.to_be());
        m.attributes = vec![
            TcAttribute::Kind("u32".into()),
            TcAttribute::Options(vec![
                TcOption::U32(TcFilterU32Option::ClassId(flow)),
                TcOption::U32(TcFilterU32Option::Selector(sel)),
            ]),
        ];
        self.tc(
            RouteNetlinkMessage::NewTrafficFilter(m),
            NLM_F_CREATE | NLM_F_EXCL,
        )
    }
}

/// Scheduler ticks to send `bytes` at `rate` bytes/s, at most what the
/// field holds; rounded as `tc` rounds (`tc_calc_xmittime`: whole
/// microseconds first).
fn ticks(bytes: u64, rate: u64) -> u32 {
    let us = u128::from(bytes) * 1_000_000 / u128::from(rate.max(1));
    (us * 1_000 / PSCHED_TICK_NS).min(u128::from(u32::MAX)) as u32
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// Where the namespace called `name` is mounted.
pub fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// A new network namespace named `name`: a handle on it, and a netlink
/// socket inside it. Fails if the name is taken; leaves nothing behind
/// when it fails.
pub fn add_netns(name: &str) -> io::Result<(OwnedFd, Rtnl)> {
    std::fs::create_dir_all(NETNS_DIR)?;
    let path = netns_path(name);
    // the mount point (iproute2 makes it the same way: empty, mode 0)
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)?;
    let made = std::thread::scope(|s| {
        s.spawn(|| -> io::Result<(OwnedFd, Rtnl)> {
            // SAFETY: only the network namespace is unshared, on a thread
            // that ends here; no file-descriptor table is split.
            unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWNET) }?;
            let own = "/proc/thread-self/ns/net";
            rustix::mount::mount_bind(own, &path)?;
            Ok((File::open(own)?.into(), Rtnl::open()?))
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("namespace thread panicked")))
    });
    if made.is_err() {
        let _ = delete_netns(name);
    }
    made
}

/// Unmount and remove the namespace called `name` (the kernel frees it
/// once nothing else holds it). A name that is not there is no error.
pub fn delete_netns(name: &str) -> io::Result<()> {
    let path = netns_path(name);
    match rustix::mount::unmount(&path, rustix::mount::UnmountFlags::DETACH) {
        // EINVAL: not a mount point (a failed add); ENOENT: gone
        Ok(()) | Err(rustix::io::Errno::INVAL) | Err(rustix::io::Errno::NOENT) => {}
        Err(e) => return Err(e.into()),
    }
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::ticks;

    #[test]
    fn bursts_become_ticks_as_tc_rounds_them() {
        // 100 MB at 200 MB/s: half a second of 64 ns ticks
        assert_eq!(ticks(100_000_000, 200_000_000), 7_812_500);
        // tc drops the fraction of a microsecond first (505050.5 µs)
        assert_eq!(ticks(100_000_000, 198_000_000), 7_891_406);
        // a burst too long for the field is the longest it holds
        assert_eq!(ticks(u64::MAX, 1), u32::MAX);
        assert_eq!(ticks(1, 0), 15_625_000);
    }
}
