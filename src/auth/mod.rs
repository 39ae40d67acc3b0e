//! Authentication and tenancy: with a tenants file (`--auth-file`), every call to
//! `ingest.v1.Ingest` must carry a credential that names a tenant, checked from the
//! request headers and the TLS session *before* the request body is read.
//!
//! A caller is identified by the first of these that names a tenant:
//! 1. `authorization: Bearer <token>`: the token's SHA-256 against every tenant's
//!    `tokens_sha256`, compared in constant time; else, with a `[jwt]` table, the token
//!    as a JWT (see [`jwt`]) whose verified `sub` is in a tenant's `jwt_subjects`;
//! 2. the mutual-TLS client certificate (already verified against `--tls-client-ca`
//!    by the handshake): a DNS or URI subject alternative name in a tenant's
//!    `client_cert_names`.
//!
//! Nothing names a tenant: `UNAUTHENTICATED`, saying which credential failed and why.
//! Health and reflection need no credential. Without a tenants file nothing is checked.

pub mod jwt;
pub mod layer;
pub mod tenants;
pub mod topics;

use std::{
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
};

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

pub use tenants::{Tenant, Tenants};

use crate::transport::PeerInfo;

/// The AMQP header every message of an authenticated caller carries: its tenant.
/// Callers cannot set `x-*` attributes, so it cannot be forged.
pub const TENANT_HEADER: &str = "x-ingest-tenant";

/// The authenticated caller, in the request's extensions.
#[derive(Clone, Debug)]
pub struct Caller(pub Arc<Tenant>);

/// The tenants file, reloaded when it changes.
#[derive(Debug)]
pub struct Authenticator {
    path: PathBuf,
    /// Events and bytes of the whole buffer: a tenant's share when it sets none.
    buffer: (usize, usize),
    current: RwLock<Arc<Tenants>>,
}

impl Authenticator {
    /// Loads the file; fails (at start) naming every problem in it.
    pub fn load(path: &Path, buffer: (usize, usize)) -> Result<Self, String> {
        let tenants = read(path, None, buffer)?;
        Ok(Self {
            path: path.to_owned(),
            buffer,
            current: RwLock::new(Arc::new(tenants)),
        })
    }

    /// The tenants now in force.
    pub fn tenants(&self) -> Arc<Tenants> {
        match self.current.read() {
            Ok(t) => Arc::clone(&t),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// Loads the file again; a bad file keeps the tenants loaded before.
    pub fn reload(&self) -> Result<(), String> {
        let tenants = read(&self.path, Some(&self.tenants()), self.buffer)?;
        match self.current.write() {
            Ok(mut current) => *current = Arc::new(tenants),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(tenants),
        }
        Ok(())
    }

    /// The tenant `headers` and `peer` name, or why none does.
    pub fn authenticate(
        &self,
        headers: &http::HeaderMap,
        peer: Option<&PeerInfo>,
    ) -> Result<Arc<Tenant>, String> {
        let tenants = self.tenants();
        let mut why = None;
        match bearer(headers) {
            Ok(Some(token)) => match by_token(&tenants, token) {
                Ok(tenant) => return Ok(tenant),
                Err(e) => why = Some(e),
            },
            Ok(None) => {}
            Err(e) => why = Some(e),
        }
        if let Some(cert) = peer.and_then(|p| p.client_cert.as_deref()) {
            match by_certificate(&tenants, cert) {
                Ok(tenant) => return Ok(tenant),
                Err(e) => why = Some(why.map_or(e.clone(), |w| format!("{w}; {e}"))),
            }
        }
        Err(why.unwrap_or_else(|| {
            "no credentials: send `authorization: Bearer <token>` (or a client certificate, with mutual TLS)".to_owned()
        }))
    }
}

impl crate::reload::Reloadable for Authenticator {
    fn what(&self) -> &'static str {
        "tenants file"
    }
    fn paths(&self) -> Vec<PathBuf> {
        // The JWKS the tenants in force name reloads with them (known since they were
        // loaded: no parse of the file on every look).
        let mut paths = vec![self.path.clone()];
        paths.extend(self.tenants().jwks_path.clone());
        paths
    }
    fn reload(&self) -> Result<(), String> {
        Authenticator::reload(self)
    }
}

fn read(
    path: &Path,
    previous: Option<&Tenants>,
    buffer: (usize, usize),
) -> Result<Tenants, String> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        format!(
            "cannot read the tenants file (--auth-file) {}: {e}",
            path.display()
        )
    })?;
    Tenants::parse(&text, path, previous, buffer)
}

/// The bearer token of `authorization`, if the header is there.
fn bearer(headers: &http::HeaderMap) -> Result<Option<&str>, String> {
    let Some(value) = headers.get(http::header::AUTHORIZATION) else {
        return Ok(None);
    };
    let value = value
        .to_str()
        .map_err(|_| "the authorization header is not ASCII".to_owned())?;
    match value.split_once(' ') {
        Some((scheme, token))
            if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() =>
        {
            Ok(Some(token.trim()))
        }
        _ => Err("the authorization header is not `Bearer <token>`".to_owned()),
    }
}

/// The tenant whose `tokens_sha256` holds the token's hash (every hash is compared,
/// in constant time), else the tenant of its JWT subject.
fn by_token(tenants: &Tenants, token: &str) -> Result<Arc<Tenant>, String> {
    let presented = Sha256::digest(token.as_bytes());
    let mut found: Option<&Arc<Tenant>> = None;
    for tenant in &tenants.tenants {
        for hash in &tenant.tokens {
            let same: bool = hash.ct_eq(presented.as_slice()).into();
            if same && found.is_none() {
                found = Some(tenant);
            }
        }
    }
    if let Some(tenant) = found {
        return Ok(Arc::clone(tenant));
    }
    let Some(jwt) = &tenants.jwt else {
        return Err("unknown bearer token".to_owned());
    };
    if token.split('.').count() != 3 {
        return Err("unknown bearer token".to_owned());
    }
    let subject = jwt.subject(token)?;
    tenants
        .tenants
        .iter()
        .find(|t| t.jwt_subjects.contains(&subject))
        .cloned()
        .ok_or_else(|| format!("JWT subject {subject:?} is no tenant's"))
}

/// The tenant one of the certificate's DNS or URI names belongs to.
fn by_certificate(
    tenants: &Tenants,
    cert: &rustls::pki_types::CertificateDer<'_>,
) -> Result<Arc<Tenant>, String> {
    let names = subject_alt_names(cert)?;
    tenants
        .tenants
        .iter()
        .find(|t| t.cert_names.iter().any(|n| names.contains(n)))
        .cloned()
        .ok_or_else(|| format!("client certificate names {names:?} are no tenant's"))
}

/// The DNS and URI subject alternative names of a DER certificate.
pub fn subject_alt_names(cert: &[u8]) -> Result<Vec<String>, String> {
    use x509_parser::{extensions::GeneralName, prelude::FromDer};
    let (_, parsed) = x509_parser::certificate::X509Certificate::from_der(cert)
        .map_err(|e| format!("client certificate does not parse: {e}"))?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = parsed.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(n) | GeneralName::URI(n) => names.push((*n).to_owned()),
                _ => {}
            }
        }
    }
    Ok(names)
}
