//! Hosts and how the control plane reaches them.
//!
//! Each registered host gets an [`AgentClient`] on its own HTTP/2
//! connection (the RPC class: lifecycle, exec streams, PTYs, files). User
//! traffic to capsule ports goes through one separate HTTP/1.1-only pool
//! ([`wrenn_http::proxy_client`]) shared by all hosts: the two classes
//! never share a transport (DESIGN.md). Both are TLS, with the control
//! plane's client certificate, checked against its authority
//! ([`crate::pki`]) for the name ([`crate::pki::agent_name`]) that
//! [`Hosts::names`] has for the address a host registered or last
//! heartbeated.
//!
//! Placement is least-loaded over online hosts: a host's capacity is its
//! cores × [`CPU_OVERCOMMIT`] and its memory less [`MEMORY_RESERVE_MB`] ×
//! [`MEMORY_OVERCOMMIT`]; paused capsules count [`PAUSED_WEIGHT`] of their
//! size (their memory is kept by the freezer but they use no CPU). A host
//! fits when the new capsule stays within both; the score is the larger
//! of the two fractions after placing, lowest wins.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use connectrpc::client::{ClientBody, ClientConfig, ClientTransport};
use connectrpc::ConnectError;
use http_body_util::BodyExt;
use wrenn_proto::wrenn::agent::v1::AgentClient;
use wrenn_types::hosts::AGENT_TOKEN_HEADER;
use wrenn_types::ids::HostId;

use crate::db::{Db, Host};
use crate::error::{ApiError, ApiResult};

pub type Rpc = AgentClient<AgentTransport>;

/// The agent RPC transport: a hyper HTTP/2 client (over mutual TLS) of our own (see
/// [`wrenn_http::rpc_h2_client`]), so that its connection can be named and,
/// in the benchmark's shared mode only, reused for proxied traffic.
#[derive(Clone)]
pub struct AgentTransport {
    pub client: wrenn_http::ProxyClient,
}

impl ClientTransport for AgentTransport {
    type ResponseBody = hyper::body::Incoming;
    type Error = ConnectError;

    fn send(
        &self,
        request: http::Request<ClientBody>,
    ) -> futures::future::BoxFuture<'static, Result<http::Response<Self::ResponseBody>, ConnectError>>
    {
        let req = request.map(|b| b.map_err(std::io::Error::other).boxed_unsync());
        let client = self.client.clone();
        Box::pin(async move {
            client.request(req).await.map_err(|e| {
                ConnectError::unavailable(format!(
                    "agent unreachable: {}",
                    wrenn_http::relay::error_chain(&e)
                ))
            })
        })
    }
}

pub const CPU_OVERCOMMIT: f64 = 4.0;
pub const MEMORY_OVERCOMMIT: f64 = 1.5;
pub const MEMORY_RESERVE_MB: i64 = 1024;
pub const PAUSED_WEIGHT: f64 = 0.25;

/// A connection to one host's agent.
pub struct HostConn {
    pub id: HostId,
    /// `ip:port` of the agent's listener (RPC and `/proxy/`).
    pub address: String,
    /// The name its certificate carries and it is dialed by.
    pub name: String,
    /// The agent's secret, sent as `X-Wrenn-Agent-Token` with every RPC
    /// (by `rpc`) and every proxied request (by the proxy).
    pub agent_token: http::HeaderValue,
    pub rpc: Rpc,
    /// The HTTP/2 client under `rpc`.
    pub h2: wrenn_http::ProxyClient,
    /// Whether the host was reconciled over this connection (or a
    /// heartbeat started that): until then, its next heartbeat reconciles
    /// it at once (a host that registered, or whose agent restarted on
    /// another address).
    pub reconciled: std::sync::atomic::AtomicBool,
    /// When its agent started, as its last heartbeat said (empty before
    /// one said): see [`HostConn::restarted`].
    agent_started: std::sync::Mutex<String>,
}

impl std::fmt::Debug for HostConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostConn")
            .field("id", &self.id)
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

impl HostConn {
    /// Destroy capsule `id` here; one the agent does not have counts as
    /// destroyed.
    pub async fn destroy(&self, id: &wrenn_types::ids::CapsuleId) -> Result<(), ConnectError> {
        match self
            .rpc
            .destroy_capsule(crate::api::capsules::cref(id))
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.code == connectrpc::ErrorCode::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Delete the host-side template `name` here; one the agent does not
    /// have counts as deleted.
    pub async fn drop_template(&self, name: &str) -> Result<(), ConnectError> {
        let req = wrenn_proto::wrenn::agent::v1::TemplateRef {
            name: name.to_owned(),
            ..Default::default()
        };
        match self.rpc.delete_template(req).await {
            Ok(_) => Ok(()),
            Err(e) if e.code == connectrpc::ErrorCode::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Take a heartbeat's `started_at`: whether it says that the agent
    /// restarted since the last heartbeat over this connection (on the
    /// same address, with the same token: nothing else tells). An agent
    /// that sends none, or the first heartbeat here, says nothing.
    pub fn restarted(&self, started_at: &str) -> bool {
        if started_at.is_empty() {
            return false;
        }
        let mut known = self.agent_started.lock().unwrap();
        let before = std::mem::replace(&mut *known, started_at.to_owned());
        !before.is_empty() && before != started_at
    }

    fn new(host: &Host, tls: &wrenn_http::tls::AgentTls) -> Result<HostConn, String> {
        let address = host.address.clone();
        let addr: std::net::SocketAddr = address
            .parse()
            .map_err(|e| format!("bad host address {address:?}: {e}"))?;
        let name = crate::pki::agent_name(&host.id);
        let uri: http::Uri = format!("https://{addr}")
            .parse()
            .map_err(|e| format!("bad host address {address:?}: {e}"))?;
        let mut agent_token = http::HeaderValue::from_str(&host.agent_token)
            .map_err(|_| "the agent token is not a header value".to_owned())?;
        agent_token.set_sensitive(true);
        let h2 = wrenn_http::rpc_h2_client(Some(tls.clone()));
        // last: nothing above failed
        tls.names.set(addr, &name);
        let rpc = AgentClient::new(
            AgentTransport { client: h2.clone() },
            ClientConfig::new(uri)
                .with_default_max_message_size(16 << 20)
                .with_default_header(AGENT_TOKEN_HEADER, agent_token.clone()),
        );
        Ok(HostConn {
            id: host.id.clone(),
            address,
            name,
            agent_token,
            rpc,
            h2,
            reconciled: Default::default(),
            agent_started: Default::default(),
        })
    }
}

/// The hosts the control plane knows, by ID.
#[derive(Debug)]
pub struct Hosts {
    conns: RwLock<HashMap<HostId, Arc<HostConn>>>,
    tls: wrenn_http::tls::AgentTls,
}

impl Hosts {
    /// Hosts reached with `tls` (the control plane's client config).
    pub fn new(tls: Arc<wrenn_http::tls::rustls::ClientConfig>) -> Hosts {
        Hosts {
            conns: RwLock::default(),
            tls: wrenn_http::tls::AgentTls {
                config: tls,
                names: Default::default(),
            },
        }
    }

    /// Which host is at which address: every pool to agents checks the
    /// certificate it is shown against the name found here.
    pub fn names(&self) -> &wrenn_http::tls::NameMap {
        &self.tls.names
    }

    /// (Re)connect to a host at its registered address.
    pub fn connect(&self, host: &Host) -> Result<Arc<HostConn>, String> {
        let mut conns = self.conns.write().unwrap();
        if let Some(c) = conns
            .get(&host.id)
            .filter(|c| c.address == host.address && c.agent_token == host.agent_token)
        {
            return Ok(c.clone());
        }
        let c = Arc::new(HostConn::new(host, &self.tls)?);
        if let Some(old) = conns.insert(host.id.clone(), c.clone()) {
            self.unname(&old, &c.address);
        }
        Ok(c)
    }

    /// Forget the name at `old`'s address, unless `kept` is that address.
    fn unname(&self, old: &HostConn, kept: &str) {
        if old.address != kept {
            if let Ok(addr) = old.address.parse() {
                self.tls.names.remove(addr);
            }
        }
    }

    /// Drop a deleted host's connection.
    pub fn forget(&self, id: &HostId) {
        if let Some(old) = self.conns.write().unwrap().remove(id) {
            self.unname(&old, "");
        }
    }

    pub fn get(&self, id: &HostId) -> Option<Arc<HostConn>> {
        self.conns.read().unwrap().get(id).cloned()
    }

    pub fn all(&self) -> Vec<Arc<HostConn>> {
        self.conns.read().unwrap().values().cloned().collect()
    }

    /// Connect to every online host in the database (start-up).
    pub async fn load(&self, db: &Db) -> Result<(), crate::db::DbError> {
        for h in db.hosts().await? {
            if !h.address.is_empty() {
                if let Err(e) = self.connect(&h) {
                    tracing::warn!(host = %h.id, error = %e, "cannot use host");
                }
            }
        }
        Ok(())
    }

    /// Pick a host for a capsule of `vcpus` and `memory_mb`: the least
    /// loaded. `holders` are the hosts with its template's files when not
    /// every host has them ([`crate::copies`]): with `Holders::Prefer`,
    /// another host may be picked (it gets a copy first), one of them
    /// winning among hosts equally loaded; with `Holders::Only`, only they
    /// are. Either way one of them must be online. Hosts in `avoid` are
    /// not picked (a copy to them failed a moment ago).
    pub async fn place(
        &self,
        db: &Db,
        vcpus: i64,
        memory_mb: i64,
        holders: Option<&[HostId]>,
        how: Holders,
        avoid: &[HostId],
    ) -> ApiResult<Arc<HostConn>> {
        let hosts = db.hosts().await?;
        let up = |h: &Host| h.status == "online" && self.get(&h.id).is_some();
        // (when no host with the files is up, say so, not that no host
        // has room)
        if let Some(holders) = holders {
            if !hosts.iter().any(|h| up(h) && holders.contains(&h.id)) {
                let home = &holders[0];
                return Err(ApiError::host_unavailable(
                    match hosts.iter().find(|h| h.id == *home) {
                        None => {
                            format!("the template's files were on host {home}, which was deleted")
                        }
                        Some(h) => format!(
                            "the template's files are on host {home}, which is {}",
                            if h.status == "online" {
                                "not connected"
                            } else {
                                h.status.as_str()
                            }
                        ),
                    },
                ));
            }
        }
        let holds = |id: &HostId| holders.is_none_or(|hs| hs.contains(id));
        let mut best: Option<((f64, bool), Arc<HostConn>)> = None;
        for h in hosts {
            if h.status != "online"
                || (how == Holders::Only && !holds(&h.id))
                || avoid.contains(&h.id)
            {
                continue;
            }
            let Some(conn) = self.get(&h.id) else {
                continue;
            };
            let load = db.host_load(&h.id).await?;
            if let Some(score) = score(&h, load, vcpus, memory_mb) {
                let key = (score, !holds(&h.id));
                if best.as_ref().is_none_or(|(b, _)| key < *b) {
                    best = Some((key, conn));
                }
            }
        }
        best.map(|(_, c)| c).ok_or_else(|| {
            ApiError::host_unavailable(format!(
                "no host has capacity for {vcpus} vCPUs and {memory_mb} MiB"
            ))
        })
    }
}

/// How [`Hosts::place`] treats the hosts that have a template's files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holders {
    Prefer,
    Only,
}

/// The load of `host` after adding a capsule, or None if it would not fit.
/// `load` = (running vCPUs, running MiB, paused vCPUs, paused MiB).
pub fn score(host: &Host, load: (i64, i64, i64, i64), vcpus: i64, memory_mb: i64) -> Option<f64> {
    let (rv, rm, pv, pm) = load;
    let cpu_cap = host.cpu_cores.max(1) as f64 * CPU_OVERCOMMIT;
    let mem_cap = (host.memory_mb - MEMORY_RESERVE_MB).max(256) as f64 * MEMORY_OVERCOMMIT;
    let cpu = (rv as f64 + PAUSED_WEIGHT * pv as f64 + vcpus as f64) / cpu_cap;
    let mem = (rm as f64 + PAUSED_WEIGHT * pm as f64 + memory_mb as f64) / mem_cap;
    (cpu <= 1.0 && mem <= 1.0).then_some(cpu.max(mem))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(cores: i64, mem: i64) -> Host {
        Host {
            id: HostId::random(),
            status: "online".into(),
            address: "127.0.0.1:1".into(),
            arch: "x86_64".into(),
            cpu_cores: cores,
            memory_mb: mem,
            disk_gb: 10,
            created_at: 0,
            last_heartbeat: None,
            agent_token: String::new(),
        }
    }

    #[test]
    fn emptier_hosts_score_lower_and_full_ones_refuse() {
        let h = host(2, 4096);
        let empty = score(&h, (0, 0, 0, 0), 1, 512).unwrap();
        let busy = score(&h, (4, 2048, 0, 0), 1, 512).unwrap();
        assert!(empty < busy);
        // 2 cores × 4 = 8 vCPUs
        assert!(score(&h, (8, 0, 0, 0), 1, 512).is_none());
        assert!(score(&h, (0, 0, 0, 0), 9, 512).is_none());
        // paused capsules weigh a quarter
        assert!(score(&h, (0, 0, 28, 0), 1, 512).is_some());
        assert!(score(&h, (0, 0, 29, 0), 1, 512).is_none());
        // memory: (4096 - 1024) × 1.5 = 4608 MiB
        assert!(score(&h, (0, 4096, 0, 0), 1, 512).is_some());
        assert!(score(&h, (0, 4097, 0, 0), 1, 512).is_none());
    }
}
