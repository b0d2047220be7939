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
//! - The control plane's own client certificate, made at each start, good
//!   for client authentication only.
//!
//! The authority and the control plane's certificate last
//! [`VALIDITY_DAYS`]; a host's lasts [`HOST_VALIDITY_DAYS`], as long as its
//! refresh token, and a new one comes with every refresh
//! (`/v1/hosts/auth/refresh`, about weekly, when the host token expires;
//! see [`crate::host_tokens`]). A key taken from a host is therefore good
//! for at most that long; a deleted host is not dialed at all.

use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use wrenn_http::tls::{self, Identity};
use wrenn_types::ids::HostId;

use crate::db::{Db, DbError};

pub const VALIDITY_DAYS: i64 = 3650;
pub const HOST_VALIDITY_DAYS: i64 = 60;
const CA_NAME: &str = "Wrenn control plane CA";

/// The name host `id`'s certificate carries, which the control plane
/// checks when it dials the host's address (the pools look it up in
/// [`wrenn_http::tls::NameMap`]).
pub fn agent_name(id: &HostId) -> String {
    format!("{id}.hosts.wrenn")
}

/// What a host gets at registration: its identity and the CA certificate
/// (wrenn's `cert_pem`, `key_pem`, `ca_cert_pem`).
#[derive(Debug, Clone)]
pub struct HostCert {
    pub identity: Identity,
    pub ca_cert_pem: String,
}

/// The authority, and the control plane's TLS client configuration.
pub struct Pki {
    ca_cert_pem: String,
    ca_key: KeyPair,
    /// The control plane's client certificate and key.
    me: Identity,
    /// Verifies agents against the authority; presents the control
    /// plane's client certificate. (No ALPN: each pool sets its own.)
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

/// A new key and a certificate for it, signed by the authority's key.
fn issue(
    ca_key: &KeyPair,
    name: &str,
    dns: Option<&str>,
    usage: ExtendedKeyUsagePurpose,
    days: i64,
) -> Result<Identity, PkiError> {
    let key = KeyPair::generate().map_err(cert_err)?;
    let mut params = leaf(name, usage, days);
    if let Some(dns) = dns {
        let dns = dns.to_owned().try_into().map_err(cert_err)?;
        params.subject_alt_names = vec![rcgen::SanType::DnsName(dns)];
    }
    let cert = params
        .signed_by(&key, &Issuer::new(ca_params(), ca_key))
        .map_err(cert_err)?;
    Ok(Identity {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
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
        let me = issue(
            &ca_key,
            "wrenn control plane",
            None,
            ExtendedKeyUsagePurpose::ClientAuth,
            VALIDITY_DAYS,
        )?;
        let client = tls::client_config(&ca_cert_pem, &me).map_err(PkiError::Cert)?;
        Ok(Pki {
            ca_cert_pem,
            ca_key,
            me,
            client,
        })
    }

    /// A server certificate for host `id` (naming [`agent_name`]).
    pub fn issue_host(&self, id: &HostId) -> Result<HostCert, PkiError> {
        let identity = issue(
            &self.ca_key,
            id.as_str(),
            Some(&agent_name(id)),
            ExtendedKeyUsagePurpose::ServerAuth,
            HOST_VALIDITY_DAYS,
        )?;
        Ok(HostCert {
            identity,
            ca_cert_pem: self.ca_cert_pem.clone(),
        })
    }

    pub fn ca_cert_pem(&self) -> &str {
        &self.ca_cert_pem
    }

    /// What the control plane presents to agents.
    pub fn client_identity(&self) -> &Identity {
        &self.me
    }
}
