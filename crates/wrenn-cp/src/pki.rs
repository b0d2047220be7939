//! The control plane as a certificate authority (wrenn-api.md §1.2, §6).
//!
//! - The authority: an ECDSA P-256 key and a self-signed CA certificate,
//!   made by the first control plane to start on a database and kept in
//!   it (`authority`), so every control plane sharing the database trusts
//!   and is trusted by the same agents.
//! - A host's certificate, issued when it registers: its key is made here
//!   and handed over once, with the CA certificate. It names the host by
//!   its ID ([`agent_name`]), which is what the control plane checks when
//!   it dials the host, wherever the host is now; so a host can pose
//!   neither as another host (even one on the same address) nor, since it
//!   is good for server authentication only, as the control plane.
//! - The control plane's own client certificate, good for client
//!   authentication only, made at each start and renewed every
//!   [`CLIENT_RENEW_EVERY`] while it runs ([`renew_client_cert`]). It
//!   lives only in the control plane's memory (as does the authority's
//!   key).
//!
//! The authority lasts [`VALIDITY_DAYS`]; the control plane's certificate
//! [`CLIENT_VALIDITY_DAYS`] (an agent's TLS sessions with the control
//! plane can be resumed past that: rustls does not check a resumed
//! client's certificate again); a host's lasts [`HOST_VALIDITY_DAYS`], as
//! long as its refresh token, and a new one comes with every refresh
//! (`/v1/hosts/auth/refresh`, about weekly, when the host token expires;
//! see [`crate::host_tokens`]).
//!
//! Revocation: the database keeps each host's newest certificate
//! (`hosts.cert_serial`). Issuing the next one, or deleting the host,
//! revokes it (`revoked_certs`), and the control plane checks agents
//! against a revocation list it signs from those rows ([`Pki::revoke`]):
//! at once where the change was made, within a reconcile interval on
//! every other control plane on the database. A key taken from a host is
//! so good only until the host's next certificate, at most
//! [`HOST_VALIDITY_DAYS`].

use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevokedCertParams, SerialNumber,
};
use wrenn_http::tls::{self, AgentVerifier, ClientCert, Identity};
use wrenn_types::ids::HostId;

use crate::auth::{hex, unhex};
use crate::db::{Db, DbError};

pub const VALIDITY_DAYS: i64 = 3650;
pub const HOST_VALIDITY_DAYS: i64 = 60;
pub const CLIENT_VALIDITY_DAYS: i64 = 7;
/// How often a running control plane renews its client certificate, well
/// inside the certificate's life.
pub const CLIENT_RENEW_EVERY: std::time::Duration = std::time::Duration::from_secs(24 * 3600);
const CA_NAME: &str = "Wrenn control plane CA";

/// The name host `id`'s certificate carries, which the control plane
/// checks when it dials the host's address (the pools look it up in
/// [`wrenn_http::tls::NameMap`]).
pub fn agent_name(id: &HostId) -> String {
    format!("{id}.hosts.wrenn")
}

/// What a host gets at registration: its identity and the CA certificate
/// (wrenn's `cert_pem`, `key_pem`, `ca_cert_pem`), and what the database
/// keeps of it: its serial (hex) and when it expires (Unix ms).
#[derive(Debug, Clone)]
pub struct HostCert {
    pub identity: Identity,
    pub ca_cert_pem: String,
    pub serial: String,
    pub expires_at: i64,
}

/// The authority, and the control plane's TLS client configuration.
pub struct Pki {
    ca_cert_pem: String,
    ca_key: KeyPair,
    /// The control plane's client certificate and key, and what presents
    /// them to agents.
    me: std::sync::RwLock<Identity>,
    presented: Arc<ClientCert>,
    /// Checks agents' certificates: the authority's, and not revoked.
    agents: Arc<AgentVerifier>,
    /// The revoked certificates `agents` checks against, once a list was
    /// installed.
    installed: std::sync::Mutex<Option<Vec<(String, i64)>>>,
    /// Verifies agents with `agents`; presents the control plane's client
    /// certificate. (No ALPN: each pool sets its own.)
    pub client: Arc<tls::rustls::ClientConfig>,
}

impl std::fmt::Debug for Pki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pki").finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("certificate: {0}")]
    Cert(String),
}

fn cert_err(e: impl std::fmt::Display) -> PkiError {
    PkiError::Cert(e.to_string())
}

/// The authority's parameters. Deterministic: an issuer rebuilt from them
/// and the stored key signs as the stored certificate's subject.
fn ca_params() -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_NAME);
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p
}

/// From an hour ago (clocks differ a little) for `days`.
fn valid_now(p: &mut CertificateParams, days: i64) {
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::hours(1);
    p.not_after = now + time::Duration::days(days);
}

fn leaf(name: &str, usage: ExtendedKeyUsagePurpose, days: i64) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    p.distinguished_name = dn;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![usage];
    p.use_authority_key_identifier_extension = true;
    valid_now(&mut p, days);
    p
}

/// A certificate the authority issued: its identity, serial and expiry.
struct Issued {
    identity: Identity,
    serial: String,
    expires_at: i64,
}

/// A new key and a certificate for it, signed by the authority's key,
/// with a random serial (positive, 16 bytes: RFC 5280 allows up to 20).
fn issue(
    ca_key: &KeyPair,
    name: &str,
    dns: Option<&str>,
    usage: ExtendedKeyUsagePurpose,
    days: i64,
) -> Result<Issued, PkiError> {
    let key = KeyPair::generate().map_err(cert_err)?;
    let mut params = leaf(name, usage, days);
    if let Some(dns) = dns {
        let dns = dns.to_owned().try_into().map_err(cert_err)?;
        params.subject_alt_names = vec![rcgen::SanType::DnsName(dns)];
    }
    let mut serial = [0u8; 16];
    getrandom::fill(&mut serial).map_err(cert_err)?;
    serial[0] = (serial[0] & 0x7f) | 0x01;
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    let cert = params
        .signed_by(&key, &Issuer::new(ca_params(), ca_key))
        .map_err(cert_err)?;
    Ok(Issued {
        identity: Identity {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        },
        serial: hex(&serial),
        expires_at: (params.not_after.unix_timestamp_nanos() / 1_000_000) as i64,
    })
}

fn ms_time(ms: i64) -> Result<time::OffsetDateTime, PkiError> {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).map_err(cert_err)
}

impl Pki {
    /// The database's authority (made now if it has none) and a fresh
    /// client certificate signed by it.
    pub async fn load(db: &Db) -> Result<Pki, PkiError> {
        let (ca_cert_pem, ca_key_pem) = match db.authority().await? {
            Some(stored) => stored,
            None => {
                let key = KeyPair::generate().map_err(cert_err)?;
                let mut params = ca_params();
                valid_now(&mut params, VALIDITY_DAYS);
                let cert = params.self_signed(&key).map_err(cert_err)?;
                db.set_authority((cert.pem(), key.serialize_pem())).await?
            }
        };
        let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(cert_err)?;
        let me = issue_client(&ca_key)?;
        let presented = ClientCert::new(&me).map_err(PkiError::Cert)?;
        let agents = AgentVerifier::new(&ca_cert_pem).map_err(PkiError::Cert)?;
        let client = tls::client_config(&agents, &presented).map_err(PkiError::Cert)?;
        let pki = Pki {
            ca_cert_pem,
            ca_key,
            me: std::sync::RwLock::new(me),
            presented,
            agents,
            installed: Default::default(),
            client,
        };
        pki.revoke(&db.revoked_certs(crate::db::now_ms()).await?)?;
        Ok(pki)
    }

    /// A server certificate for host `id` (naming [`agent_name`]). Nothing
    /// is revoked until the database is told it replaces the host's last
    /// one (`Db::replace_host_cert`).
    pub fn issue_host(&self, id: &HostId) -> Result<HostCert, PkiError> {
        let issued = issue(
            &self.ca_key,
            id.as_str(),
            Some(&agent_name(id)),
            ExtendedKeyUsagePurpose::ServerAuth,
            HOST_VALIDITY_DAYS,
        )?;
        Ok(HostCert {
            identity: issued.identity,
            ca_cert_pem: self.ca_cert_pem.clone(),
            serial: issued.serial,
            expires_at: issued.expires_at,
        })
    }

    /// The authority's revocation list of `revoked` ((serial hex, revoked
    /// at) rows, see `Db::revoked_certs`), DER. Its next update is a day
    /// away (the list's age is not checked: a control plane makes a new one
    /// whenever the rows change).
    pub fn revocation_list(&self, revoked: &[(String, i64)]) -> Result<Vec<u8>, PkiError> {
        let now = time::OffsetDateTime::now_utc();
        // (a row this control plane could not have written is left out,
        // not allowed to stop every later list)
        let revoked_certs = revoked
            .iter()
            .filter_map(|(serial, at)| {
                let entry = unhex(serial).zip(ms_time(*at).ok());
                if entry.is_none() {
                    tracing::warn!(serial, revoked_at = at, "a corrupt revoked_certs row");
                }
                let (serial, revocation_time) = entry?;
                Some(RevokedCertParams {
                    serial_number: SerialNumber::from_slice(&serial),
                    revocation_time,
                    reason_code: None,
                    invalidity_date: None,
                })
            })
            .collect();
        let params = CertificateRevocationListParams {
            this_update: now - time::Duration::hours(1),
            next_update: now + time::Duration::days(1),
            crl_number: SerialNumber::from(now.unix_timestamp() as u64),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: KeyIdMethod::Sha256,
        };
        let crl = params
            .signed_by(&Issuer::new(ca_params(), &self.ca_key))
            .map_err(cert_err)?;
        Ok(crl.der().to_vec())
    }

    /// Check agents against `revoked` from the next handshake on (nothing
    /// to do when it is the list installed last: a new one would only make
    /// the sessions with agents start over).
    pub fn revoke(&self, revoked: &[(String, i64)]) -> Result<(), PkiError> {
        let mut installed = self.installed.lock().unwrap_or_else(|e| e.into_inner());
        if installed.as_deref() == Some(revoked) {
            return Ok(());
        }
        let crl = self.revocation_list(revoked)?;
        self.agents.revoke(crl).map_err(PkiError::Cert)?;
        *installed = Some(revoked.to_vec());
        Ok(())
    }

    /// What checks agents' certificates (for tests and tools that dial an
    /// agent as the control plane does).
    pub fn agents(&self) -> &Arc<AgentVerifier> {
        &self.agents
    }

    pub fn ca_cert_pem(&self) -> &str {
        &self.ca_cert_pem
    }

    /// What the control plane presents to agents.
    pub fn client_identity(&self) -> Identity {
        self.me.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// A new client certificate, presented from the next handshake on (no
    /// session is resumed across the change: a resumed one would go on
    /// with the certificate it began with).
    pub fn renew_client(&self) -> Result<(), PkiError> {
        let me = issue_client(&self.ca_key)?;
        self.presented.set(&me).map_err(PkiError::Cert)?;
        self.agents.forget_sessions();
        *self.me.write().unwrap_or_else(|e| e.into_inner()) = me;
        Ok(())
    }
}

/// A client certificate for the control plane.
fn issue_client(ca_key: &KeyPair) -> Result<Identity, PkiError> {
    let issued = issue(
        ca_key,
        "wrenn control plane",
        None,
        ExtendedKeyUsagePurpose::ClientAuth,
        CLIENT_VALIDITY_DAYS,
    )?;
    Ok(issued.identity)
}

/// Renew the control plane's client certificate every
/// [`CLIENT_RENEW_EVERY`] until it stops. The age is read off the wall
/// clock once an hour: tokio's timers stand still while the machine
/// sleeps, a certificate's life does not.
pub async fn renew_client_cert(cp: Arc<crate::server::Cp>) {
    let mut renewed = std::time::SystemTime::now();
    loop {
        tokio::select! {
            () = tokio::time::sleep(std::time::Duration::from_secs(3600)) => {}
            () = cp.stop.cancelled() => return,
        }
        let age = renewed.elapsed().unwrap_or_default();
        if age < CLIENT_RENEW_EVERY {
            continue;
        }
        match cp.pki.renew_client() {
            Ok(()) => {
                renewed = std::time::SystemTime::now();
                tracing::info!("the control plane's client certificate was renewed");
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot renew the control plane's client certificate")
            }
        }
    }
}
