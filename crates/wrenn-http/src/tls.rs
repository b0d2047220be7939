//! Mutual TLS between the control plane and its agents (wrenn-api.md §1.2
//! and §6): the control plane is a certificate authority; it issues each
//! host a server certificate when the host registers, and itself a client
//! certificate. An agent that holds its certificate serves only TLS and
//! only to clients whose certificate chains to that authority; the control
//! plane only talks to agents whose certificate does, for the address it
//! dials.
//!
//! An agent's certificate names the host, not its address:
//! `{host-id}.hosts.wrenn` (see the control plane's `pki`). The control
//! plane dials `https://ip:port` and checks the certificate against the
//! name its [`NameMap`] has for that address (the host registered or last
//! heartbeated there). A host can so move and keep its certificate, and can
//! never pass for another, even one on the same IP.
//!
//! The traffic class rides on ALPN, since an agent cannot read a request
//! inside TLS before accepting it: the control plane's user-traffic pool
//! offers [`ALPN_BULK`], its RPC pool `h2`, its pool for envd's port
//! `http/1.1`. The agent peeks at the ClientHello (without consuming it)
//! and serves bulk connections on its bulk runtime (see the server).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{
    ClientSessionMemoryCache, ClientSessionStore, ResolvesClientCert, Resumption,
    Tls12ClientSessionValue, Tls13ClientSessionValue, WebPkiServerVerifier,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{
    CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName, UnixTime,
};
use rustls::server::WebPkiClientVerifier;
use rustls::sign::CertifiedKey;
use rustls::{
    ClientConfig, DigitallySignedStruct, NamedGroup, RootCertStore, ServerConfig, SignatureScheme,
};

pub use rustls;
pub use tokio_rustls::{TlsAcceptor, TlsConnector};

/// HTTP/2 (RPC streams).
pub const ALPN_H2: &[u8] = b"h2";
/// HTTP/1.1 in the RPC class (envd's port through an agent).
pub const ALPN_HTTP1: &[u8] = b"http/1.1";
/// HTTP/1.1 carrying user traffic to capsule ports: served as bulk.
pub const ALPN_BULK: &[u8] = b"wrenn-bulk";

/// A certificate chain and its private key, PEM.
#[derive(Clone, PartialEq, Eq)]
pub struct Identity {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity").finish_non_exhaustive()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("bad certificate PEM: {e}"))?;
    if certs.is_empty() {
        return Err("no certificate in the PEM".into());
    }
    Ok(certs)
}

fn key(pem: &str) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| format!("bad private key PEM: {e}"))
}

fn roots(ca_pem: &str) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for c in certs(ca_pem)? {
        roots
            .add(c)
            .map_err(|e| format!("bad CA certificate: {e}"))?;
    }
    Ok(roots)
}

/// An agent's TLS: `identity` as the server; clients must present a
/// certificate for client authentication that chains to `ca_pem`.
pub fn server_config(identity: &Identity, ca_pem: &str) -> Result<Arc<ServerConfig>, String> {
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca_pem)?), provider())
            .build()
            .map_err(|e| e.to_string())?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs(&identity.cert_pem)?, key(&identity.key_pem)?)
        .map_err(|e| e.to_string())?;
    config.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP1.to_vec(), ALPN_BULK.to_vec()];
    Ok(Arc::new(config))
}

/// How the control plane checks an agent's certificate: it must chain to
/// the authority, name the agent dialed, and not be on the authority's
/// revocation list ([`AgentVerifier::revoke`]). Every pool's configuration
/// shares one, so a new list applies to the next handshake of each;
/// connections already open are not closed.
///
/// A resumed TLS session checks no certificate, so the sessions to resume
/// are kept here too ([`Sessions`]) and forgotten with each new list.
pub struct AgentVerifier {
    roots: Arc<RootCertStore>,
    current: RwLock<Arc<WebPkiServerVerifier>>,
    sessions: Arc<Sessions>,
}

/// How many agents' sessions the control plane keeps to resume.
const SESSIONS: usize = 256;

/// The TLS sessions the control plane may resume with agents, one
/// [`Round`] per revocation list (and client certificate): replaced by an
/// empty one when either changes, since a resumed session checks no
/// certificate and presents none.
#[derive(Debug)]
struct Sessions(RwLock<Arc<Round>>);

/// Sessions begun under one revocation list: rustls's in-memory cache,
/// and the agents whose certificates were checked against that list. A
/// session is kept only for those: a handshake checked against the list
/// before may hand over its ticket after the list changed.
#[derive(Debug)]
struct Round {
    cache: ClientSessionMemoryCache,
    checked: std::sync::Mutex<std::collections::HashSet<ServerName<'static>>>,
}

impl Round {
    fn new() -> Arc<Round> {
        Arc::new(Round {
            cache: ClientSessionMemoryCache::new(SESSIONS),
            checked: Default::default(),
        })
    }

    fn checked(&self, server_name: &ServerName<'_>) -> bool {
        let checked = self.checked.lock().unwrap_or_else(|e| e.into_inner());
        checked.contains(server_name)
    }
}

impl Sessions {
    fn new() -> Sessions {
        Sessions(RwLock::new(Round::new()))
    }

    fn current(&self) -> Arc<Round> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn forget(&self) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Round::new();
    }
}

impl ClientSessionStore for Sessions {
    fn set_kx_hint(&self, server_name: ServerName<'static>, group: NamedGroup) {
        self.current().cache.set_kx_hint(server_name, group)
    }

    fn kx_hint(&self, server_name: &ServerName<'_>) -> Option<NamedGroup> {
        self.current().cache.kx_hint(server_name)
    }

    fn set_tls12_session(&self, server_name: ServerName<'static>, value: Tls12ClientSessionValue) {
        let round = self.current();
        if round.checked(&server_name) {
            round.cache.set_tls12_session(server_name, value)
        }
    }

    fn tls12_session(&self, server_name: &ServerName<'_>) -> Option<Tls12ClientSessionValue> {
        self.current().cache.tls12_session(server_name)
    }

    fn remove_tls12_session(&self, server_name: &ServerName<'static>) {
        self.current().cache.remove_tls12_session(server_name)
    }

    fn insert_tls13_ticket(
        &self,
        server_name: ServerName<'static>,
        value: Tls13ClientSessionValue,
    ) {
        let round = self.current();
        if round.checked(&server_name) {
            round.cache.insert_tls13_ticket(server_name, value)
        }
    }

    fn take_tls13_ticket(
        &self,
        server_name: &ServerName<'static>,
    ) -> Option<Tls13ClientSessionValue> {
        self.current().cache.take_tls13_ticket(server_name)
    }
}

impl std::fmt::Debug for AgentVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentVerifier").finish_non_exhaustive()
    }
}

impl AgentVerifier {
    /// Certificates of the authority `ca_pem`, none revoked yet.
    pub fn new(ca_pem: &str) -> Result<Arc<AgentVerifier>, String> {
        let roots = Arc::new(roots(ca_pem)?);
        let current = RwLock::new(Self::build(&roots, Vec::new())?);
        Ok(Arc::new(AgentVerifier {
            roots,
            current,
            sessions: Arc::new(Sessions::new()),
        }))
    }

    fn build(
        roots: &Arc<RootCertStore>,
        crls: Vec<CertificateRevocationListDer<'static>>,
    ) -> Result<Arc<WebPkiServerVerifier>, String> {
        WebPkiServerVerifier::builder_with_provider(roots.clone(), provider())
            .with_crls(crls)
            // (agents' certificates come straight from the root)
            .only_check_end_entity_revocation()
            .build()
            .map_err(|e| e.to_string())
    }

    /// From the next handshake on, refuse the certificates `crl` (DER, signed
    /// by the authority) lists. It replaces the list installed before, and
    /// no session from before is resumed.
    pub fn revoke(&self, crl: Vec<u8>) -> Result<(), String> {
        let next = Self::build(&self.roots, vec![CertificateRevocationListDer::from(crl)])?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = next;
        self.sessions.forget();
        Ok(())
    }

    /// Resume no session from before: the next handshake with each agent
    /// is a full one (after the control plane's certificate changed).
    pub fn forget_sessions(&self) {
        self.sessions.forget();
    }

    fn current(&self) -> Arc<WebPkiServerVerifier> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl ServerCertVerifier for AgentVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // (the round is taken first: `revoke` installs the new list before
        // it starts a new round, so a check by the old list is never
        // counted in the new round)
        let round = self.sessions.current();
        let verified = self.current().verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        round
            .checked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(server_name.to_owned());
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.current().supported_verify_schemes()
    }
}

/// The certificate the control plane presents to agents. It renews it
/// while it runs ([`ClientCert::set`]); every pool's configuration shares
/// this, so the next handshake of each presents the new one.
pub struct ClientCert(RwLock<Arc<CertifiedKey>>);

impl std::fmt::Debug for ClientCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientCert").finish_non_exhaustive()
    }
}

impl ClientCert {
    pub fn new(identity: &Identity) -> Result<Arc<ClientCert>, String> {
        Ok(Arc::new(ClientCert(RwLock::new(Self::load(identity)?))))
    }

    /// Present `identity` from the next handshake on.
    pub fn set(&self, identity: &Identity) -> Result<(), String> {
        let next = Self::load(identity)?;
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = next;
        Ok(())
    }

    fn load(identity: &Identity) -> Result<Arc<CertifiedKey>, String> {
        CertifiedKey::from_der(
            certs(&identity.cert_pem)?,
            key(&identity.key_pem)?,
            &provider(),
        )
        .map(Arc::new)
        .map_err(|e| e.to_string())
    }
}

impl ResolvesClientCert for ClientCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().unwrap_or_else(|e| e.into_inner()).clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The control plane's TLS towards agents: servers are checked by
/// `agents` (see [`AgentVerifier`]); it authenticates with `me`. No ALPN
/// yet: see [`with_alpn`].
///
/// Sessions are resumed only until the next revocation list (see
/// [`AgentVerifier`]).
pub fn client_config(
    agents: &Arc<AgentVerifier>,
    me: &Arc<ClientCert>,
) -> Result<Arc<ClientConfig>, String> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(agents.clone())
        .with_client_cert_resolver(me.clone());
    config.resumption = Resumption::store(agents.sessions.clone());
    Ok(Arc::new(config))
}

/// `config` offering exactly `protocol` (a pool's traffic class).
pub fn with_alpn(config: &Arc<ClientConfig>, protocol: &[u8]) -> Arc<ClientConfig> {
    let mut c = ClientConfig::clone(config);
    c.alpn_protocols = vec![protocol.to_vec()];
    Arc::new(c)
}

/// The name a TLS client checks the server's certificate against (an
/// agent's name, or an IP address).
pub fn server_name(host: &str) -> Result<ServerName<'static>, String> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_owned()).map_err(|e| format!("bad TLS server name {host:?}: {e}"))
}

/// Where a server finds its TLS configuration for the next connection:
/// empty serves plain HTTP, unless TLS is [required](TlsSlot::require),
/// when every connection is closed until a configuration is installed. An
/// agent that belongs to a control plane requires it from the start and
/// fills it once the control plane has issued its certificate.
#[derive(Clone, Default)]
pub struct TlsSlot(Arc<SlotInner>);

#[derive(Default)]
struct SlotInner {
    acceptor: RwLock<Option<TlsAcceptor>>,
    required: AtomicBool,
}

impl std::fmt::Debug for TlsSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSlot")
            .field("set", &self.is_set())
            .field("required", &self.is_required())
            .finish()
    }
}

impl TlsSlot {
    pub fn install(&self, config: Arc<ServerConfig>) {
        *self.0.acceptor.write().unwrap() = Some(TlsAcceptor::from(config));
    }

    /// From now on, never serve plain HTTP.
    pub fn require(&self) {
        self.0.required.store(true, Ordering::SeqCst);
    }

    pub fn current(&self) -> Option<TlsAcceptor> {
        self.0.acceptor.read().unwrap().clone()
    }

    pub fn is_set(&self) -> bool {
        self.0.acceptor.read().unwrap().is_some()
    }

    pub fn is_required(&self) -> bool {
        self.0.required.load(Ordering::SeqCst)
    }
}

/// Which agent is at which address: the name a TLS client checks an
/// agent's certificate against when it dials `ip:port`.
#[derive(Clone, Default)]
pub struct NameMap(Arc<RwLock<HashMap<SocketAddr, String>>>);

impl std::fmt::Debug for NameMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map()
            .entries(self.0.read().unwrap().iter())
            .finish()
    }
}

impl NameMap {
    pub fn set(&self, addr: SocketAddr, name: &str) {
        self.0.write().unwrap().insert(addr, name.to_owned());
    }

    pub fn remove(&self, addr: SocketAddr) {
        self.0.write().unwrap().remove(&addr);
    }

    /// The name of the agent at `authority` (`ip:port`).
    pub fn name_at(&self, authority: &str) -> Option<String> {
        let addr: SocketAddr = authority.parse().ok()?;
        self.0.read().unwrap().get(&addr).cloned()
    }
}

/// How a pool reaches agents: its TLS client (with the pool's ALPN) and
/// the names agents are known by.
#[derive(Clone, Debug)]
pub struct AgentTls {
    pub config: Arc<ClientConfig>,
    pub names: NameMap,
}

/// How long a TLS handshake with an agent may take.
pub const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The ALPN protocols a ClientHello at the start of `bytes` offers:
/// `Ok(None)` while the hello is incomplete, `Err` if it is not one.
pub(crate) fn hello_offers(bytes: &[u8]) -> Result<Option<Vec<Vec<u8>>>, ()> {
    let mut acceptor = rustls::server::Acceptor::default();
    let mut rest = bytes;
    while !rest.is_empty() {
        match acceptor.read_tls(&mut rest) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    match acceptor.accept() {
        Ok(Some(accepted)) => Ok(Some(
            accepted
                .client_hello()
                .alpn()
                .map(|a| a.map(<[u8]>::to_vec).collect())
                .unwrap_or_default(),
        )),
        Ok(None) => Ok(None),
        Err(_) => Err(()),
    }
}
