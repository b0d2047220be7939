//! The localhost port forwarder.
//!
//! A dev server that binds 127.0.0.1 or ::1 cannot be reached from outside
//! the capsule. Every second this scans `/proc/net/tcp{,6}` for listeners on
//! loopback only, and for each one listens on the capsule's external
//! addresses at the same port, relaying connections to the loopback
//! listener. When the listener goes away, so does the forward.
//!
//! Ownership: one scanner task; each forwarded port is a task that owns a
//! `JoinSet` of its connections, so dropping a port's entry aborts its
//! accept loop and every relay under it. `pause` (before a snapshot) drops
//! all forwards at once and stops scanning until `resume`.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

/// How often listeners are scanned.
pub const SCAN_INTERVAL: Duration = Duration::from_secs(1);

/// A loopback listener found in `/proc/net/tcp*`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LoopbackListener {
    pub port: u16,
    pub v6: bool,
}

/// Parse one `/proc/net/tcp` or `/proc/net/tcp6` table; returns the ports
/// listening on loopback only.
pub fn parse_proc_net_tcp(table: &str, v6: bool) -> BTreeSet<LoopbackListener> {
    const LISTEN: &str = "0A";
    const V4_LOOPBACK: &str = "0100007F";
    const V6_LOOPBACK: &str = "00000000000000000000000001000000";
    let mut out = BTreeSet::new();
    for line in table.lines().skip(1) {
        let mut f = line.split_whitespace();
        let (Some(_slot), Some(local), Some(_remote), Some(state)) =
            (f.next(), f.next(), f.next(), f.next())
        else {
            continue;
        };
        if state != LISTEN {
            continue;
        }
        let Some((addr, port)) = local.split_once(':') else {
            continue;
        };
        let Ok(port) = u16::from_str_radix(port, 16) else {
            continue;
        };
        let loopback = if v6 {
            addr == V6_LOOPBACK || addr == "0000000000000000FFFF00000100007F"
        } else {
            addr == V4_LOOPBACK
        };
        if loopback && port != 0 {
            out.insert(LoopbackListener { port, v6 });
        }
    }
    out
}

fn scan() -> BTreeSet<LoopbackListener> {
    let mut all = BTreeSet::new();
    for (file, v6) in [("/proc/net/tcp", false), ("/proc/net/tcp6", true)] {
        if let Ok(t) = std::fs::read_to_string(file) {
            all.extend(parse_proc_net_tcp(&t, v6));
        }
    }
    all
}

fn external_addrs() -> Vec<IpAddr> {
    if_addrs::get_if_addrs()
        .map(|ifs| {
            ifs.into_iter()
                .map(|i| i.ip())
                .filter(|ip| !ip.is_loopback())
                .filter(|ip| !matches!(ip, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80))
                .collect()
        })
        .unwrap_or_default()
}

struct Forward {
    task: JoinHandle<()>,
}

impl Drop for Forward {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The forwarder.
pub struct Forwarder {
    enabled: bool,
    paused: Arc<AtomicBool>,
    forwards: Arc<Mutex<HashMap<LoopbackListener, Forward>>>,
    scanner: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Forwarder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forwarder")
            .field("enabled", &self.enabled)
            .finish_non_exhaustive()
    }
}

impl Forwarder {
    pub fn new(enabled: bool) -> Self {
        Self {
            enabled,
            paused: Arc::new(AtomicBool::new(false)),
            forwards: Arc::new(Mutex::new(HashMap::new())),
            scanner: Mutex::new(None),
        }
    }

    /// Start scanning (no-op when disabled).
    pub fn start(&self) {
        if !self.enabled {
            return;
        }
        let paused = self.paused.clone();
        let forwards = self.forwards.clone();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(SCAN_INTERVAL);
            loop {
                tick.tick().await;
                if paused.load(Ordering::Relaxed) {
                    continue;
                }
                let found = scan();
                let addrs = external_addrs();
                let mut map = forwards.lock().unwrap_or_else(|p| p.into_inner());
                map.retain(|l, _| found.contains(l));
                for l in found {
                    if let std::collections::hash_map::Entry::Vacant(slot) = map.entry(l) {
                        if let Some(f) = forward(l, &addrs) {
                            tracing::info!(port = l.port, "forwarding localhost listener");
                            slot.insert(f);
                        }
                    }
                }
            }
        });
        *self.scanner.lock().unwrap_or_else(|p| p.into_inner()) = Some(task);
    }

    /// Drop every forward and stop scanning.
    pub fn pause(&self) {
        self.paused.store(true, Ordering::Relaxed);
        self.forwards
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// Scan again.
    pub fn resume(&self) {
        self.paused.store(false, Ordering::Relaxed);
    }

    /// Ports forwarded now.
    pub fn ports(&self) -> Vec<u16> {
        let map = self.forwards.lock().unwrap_or_else(|p| p.into_inner());
        map.keys().map(|l| l.port).collect()
    }

    /// Stop for good.
    pub async fn stop(&self) {
        self.pause();
        let task = self
            .scanner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(t) = task {
            t.abort();
            let _ = t.await;
        }
    }
}

/// Listen on every external address at `l.port`; `None` if none could be bound.
fn forward(l: LoopbackListener, addrs: &[IpAddr]) -> Option<Forward> {
    let target = if l.v6 {
        SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), l.port)
    } else {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), l.port)
    };
    let listeners: Vec<TcpListener> = addrs
        .iter()
        .filter_map(|ip| {
            let std = std::net::TcpListener::bind(SocketAddr::new(*ip, l.port)).ok()?;
            std.set_nonblocking(true).ok()?;
            TcpListener::from_std(std).ok()
        })
        .collect();
    if listeners.is_empty() {
        return None;
    }
    let task = tokio::spawn(async move {
        let mut accepts = JoinSet::new();
        for listener in listeners {
            accepts.spawn(accept_loop(listener, target));
        }
        while accepts.join_next().await.is_some() {}
    });
    Some(Forward { task })
}

async fn accept_loop(listener: TcpListener, target: SocketAddr) {
    let mut relays = JoinSet::new();
    loop {
        tokio::select! {
            Some(_) = relays.join_next(), if !relays.is_empty() => {}
            accepted = listener.accept() => {
                let Ok((mut inbound, _)) = accepted else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                relays.spawn(async move {
                    let _ = inbound.set_nodelay(true);
                    if let Ok(mut outbound) = TcpStream::connect(target).await {
                        let _ = outbound.set_nodelay(true);
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_loopback_listeners_only() {
        let v4 = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1\n\
   1: 00000000:C383 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2 1\n\
   2: 0100007F:0050 0100007F:9C40 01 00000000:00000000 00:00000000 00000000     0        0 3 1\n";
        let found = parse_proc_net_tcp(v4, false);
        assert_eq!(
            found.into_iter().collect::<Vec<_>>(),
            vec![LoopbackListener {
                port: 8080,
                v6: false
            }]
        );
        let v6 = "header\n   0: 00000000000000000000000001000000:0BB8 00000000000000000000000000000000:0000 0A 0 0 0 0 0 0\n";
        assert_eq!(
            parse_proc_net_tcp(v6, true).into_iter().next(),
            Some(LoopbackListener {
                port: 3000,
                v6: true
            })
        );
        assert!(parse_proc_net_tcp("garbage\nmore garbage", false).is_empty());
    }
}
