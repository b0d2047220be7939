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
//! Requests are synchronous (send, then read until the kernel's ack), as
//! the rest of the network code is: callers are on blocking threads.

use std::fs::File;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use netlink_packet_core::{
    NetlinkBuffer, NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE,
    NLM_F_EXCL, NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage, AddressScope};
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

/// Where named namespaces live (iproute2's directory).
pub const NETNS_DIR: &str = "/run/netns";

/// A route netlink socket, in the namespace it was opened in.
pub struct Rtnl {
    sock: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl Rtnl {
    /// A socket in the calling thread's network namespace.
    pub fn open() -> io::Result<Rtnl> {
        let mut sock = Socket::new(NETLINK_ROUTE)?;
        sock.bind_auto()?;
        sock.connect(&SocketAddr::new(0, 0))?;
        Ok(Rtnl {
            sock,
            seq: 0,
            buf: Vec::with_capacity(16 * 1024),
        })
    }

    /// Send `msg` and wait for its answer: `Ok(Some(reply))` for a request
    /// that returns a message, `Ok(None)` for an ack, the kernel's errno
    /// as an error.
    fn call(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> io::Result<Option<RouteNetlinkMessage>> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = self.seq;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
        packet.finalize();
        let mut out = vec![0; packet.buffer_len()];
        packet.serialize(&mut out);
        self.sock.send(&out, 0)?;
        let mut reply = None;
        loop {
            self.buf.clear();
            let n = self.sock.recv(&mut self.buf, 0)?;
            let mut at = 0;
            while at < n {
                let bytes = &self.buf[at..n];
                let len = NetlinkBuffer::new_checked(bytes)
                    .map_err(|e| invalid(format!("netlink reply: {e}")))?
                    .length() as usize;
                let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&bytes[..len])
                    .map_err(|e| invalid(format!("netlink reply: {e}")))?;
                // netlink pads each message to 4 bytes
                at += (len + 3) & !3;
                if msg.header.sequence_number != self.seq {
                    continue;
                }
                match msg.payload {
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            None => Ok(reply),
                            Some(_) => Err(e.to_io()),
                        }
                    }
                    NetlinkPayload::Done(_) => return Ok(reply),
                    NetlinkPayload::InnerMessage(m) => {
                        reply = Some(m);
                        // a request without NLM_F_ACK ends with its reply
                        if flags & NLM_F_ACK == 0 {
                            return Ok(reply);
                        }
                    }
                    _ => {}
                }
            }
        }
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
