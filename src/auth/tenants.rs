//! The tenants file (`--auth-file`, TOML): who the callers are, what each may publish
//! to, and how much of the buffer each may hold.
//!
//! ```toml
//! [jwt]                                   # optional: bearer tokens may be JWTs
//! jwks_file = "/etc/ingest/jwks.json"
//! issuer = "https://issuer.example"
//! audience = "ingest"
//!
//! [[tenant]]
//! name = "ml-platform"
//! tokens_sha256 = ["<hex sha256 of a bearer token>"]
//! jwt_subjects = ["system:serviceaccount:ml:logger"]
//! client_cert_names = ["logger.ml.svc"]
//! topics = ["ml.#", "predictions.*"]
//! max_events_in_flight = 2000
//! max_bytes_in_flight = "16MiB"
//! events_per_second = 5000
//! ```
//!
//! Every problem of the file is reported at once, each naming the tenant and key.

use std::{collections::HashMap, path::Path, sync::Arc};

use serde::Deserialize;

use super::{jwt::JwtSettings, topics::TopicPattern};
use crate::admission::TenantQuota;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    jwt: Option<JwtSettings>,
    #[serde(default)]
    tenant: Vec<TenantEntry>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Size {
    Bytes(u64),
    Text(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TenantEntry {
    name: String,
    #[serde(default)]
    tokens_sha256: Vec<String>,
    #[serde(default)]
    jwt_subjects: Vec<String>,
    #[serde(default)]
    client_cert_names: Vec<String>,
    #[serde(default)]
    topics: Vec<String>,
    max_events_in_flight: Option<u64>,
    max_bytes_in_flight: Option<Size>,
    events_per_second: Option<f64>,
}

/// One tenant, as loaded.
#[derive(Debug)]
pub struct Tenant {
    /// Its name: the `x-ingest-tenant` header and the metrics label.
    pub name: Arc<str>,
    /// SHA-256 of each bearer token that names it.
    pub(super) tokens: Vec<[u8; 32]>,
    /// Verified JWT subjects that name it.
    pub(super) jwt_subjects: Vec<String>,
    /// Client certificate SANs (DNS or URI) that name it.
    pub(super) cert_names: Vec<String>,
    /// What it may publish to.
    topics: Vec<TopicPattern>,
    /// Its share of the buffer and its rate.
    pub quota: Arc<TenantQuota>,
    /// The limits the quota was made from, to keep it across reloads.
    limits: (usize, usize, Option<u64>),
}

impl Tenant {
    /// Whether it may publish to `topic`.
    pub fn allows(&self, topic: &str) -> bool {
        self.topics.iter().any(|p| p.matches(topic))
    }

    /// Its topic patterns, for messages.
    pub fn topics(&self) -> Vec<&str> {
        self.topics.iter().map(TopicPattern::as_str).collect()
    }
}

/// Every tenant, and the JWT settings.
#[derive(Debug, Default)]
pub struct Tenants {
    /// In file order.
    pub tenants: Vec<Arc<Tenant>>,
    /// Set with `[jwt]`.
    pub jwt: Option<super::jwt::JwtVerifier>,
    /// The JWKS file `[jwt]` names (resolved), reloaded with the tenants file.
    pub jwks_path: Option<std::path::PathBuf>,
}

fn parse_hex(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

impl Tenants {
    /// Parses `text` (the file at `path`, for messages and relative paths).
    /// `previous`: tenants whose limits did not change keep their quota (what they
    /// have in flight keeps counting). `buffer`: events and bytes of the whole
    /// buffer, the default share.
    pub fn parse(
        text: &str,
        path: &Path,
        previous: Option<&Tenants>,
        buffer: (usize, usize),
    ) -> Result<Self, String> {
        let file: File =
            toml::from_str(text).map_err(|e| format!("tenants file {}: {e}", path.display()))?;
        let base = path.parent().unwrap_or_else(|| Path::new("."));
        let mut problems = Vec::new();
        let jwt = match &file.jwt {
            Some(settings) => match super::jwt::JwtVerifier::load(settings, base) {
                Ok(v) => Some(v),
                Err(e) => {
                    problems.push(e);
                    None
                }
            },
            None => None,
        };
        let mut names: HashMap<String, usize> = HashMap::new();
        let mut tenants = Vec::new();
        for (i, entry) in file.tenant.into_iter().enumerate() {
            let at = format!("[[tenant]] {} ({:?})", i + 1, entry.name);
            if entry.name.is_empty()
                || entry.name.len() > 128
                || entry.name.chars().any(|c| c.is_control())
            {
                problems.push(format!("{at}: name must be 1..=128 printable characters"));
            }
            if names.insert(entry.name.clone(), i).is_some() {
                problems.push(format!("{at}: the name is used by another tenant"));
            }
            let mut tokens = Vec::new();
            for hex in &entry.tokens_sha256 {
                match parse_hex(&hex.to_ascii_lowercase()) {
                    Some(hash) => tokens.push(hash),
                    None => problems.push(format!(
                        "{at}: tokens_sha256 entry {hex:?} is not 64 hex digits (sha256sum of the token)"
                    )),
                }
            }
            if entry.tokens_sha256.is_empty()
                && entry.jwt_subjects.is_empty()
                && entry.client_cert_names.is_empty()
            {
                problems.push(format!(
                    "{at}: no credential names it (tokens_sha256, jwt_subjects or client_cert_names)"
                ));
            }
            if !entry.jwt_subjects.is_empty() && file.jwt.is_none() {
                problems.push(format!("{at}: jwt_subjects needs a [jwt] table"));
            }
            let mut topics = Vec::new();
            for raw in &entry.topics {
                match TopicPattern::parse(raw) {
                    Ok(p) => topics.push(p),
                    Err(e) => problems.push(format!("{at}: {e}")),
                }
            }
            let events = match entry.max_events_in_flight {
                Some(0) => {
                    problems.push(format!("{at}: max_events_in_flight must be at least 1"));
                    1
                }
                Some(n) => usize::try_from(n).unwrap_or(usize::MAX),
                None => buffer.0,
            };
            let bytes = match &entry.max_bytes_in_flight {
                None => buffer.1,
                Some(Size::Bytes(n)) => usize::try_from(*n).unwrap_or(usize::MAX),
                Some(Size::Text(text)) => match crate::config::parse_size(text) {
                    Ok(n) => n,
                    Err(e) => {
                        problems.push(format!("{at}: max_bytes_in_flight: {e}"));
                        1
                    }
                },
            };
            let rate = match entry.events_per_second {
                Some(r) if !(r.is_finite() && r > 0.0) => {
                    problems.push(format!("{at}: events_per_second must be above 0"));
                    None
                }
                other => other,
            };
            let limits = (events, bytes, rate.map(f64::to_bits));
            let name: Arc<str> = Arc::from(entry.name.as_str());
            let quota = previous
                .and_then(|p| p.tenants.iter().find(|t| *t.name == *name))
                .filter(|t| t.limits == limits)
                .map_or_else(
                    || Arc::new(TenantQuota::new(Arc::clone(&name), events, bytes, rate)),
                    |t| Arc::clone(&t.quota),
                );
            tenants.push(Arc::new(Tenant {
                name,
                tokens,
                jwt_subjects: entry.jwt_subjects,
                cert_names: entry.client_cert_names,
                topics,
                quota,
                limits,
            }));
        }
        if tenants.is_empty() {
            problems.push("no [[tenant]]: nobody could publish".to_owned());
        }
        if !problems.is_empty() {
            return Err(format!(
                "tenants file {}:\n  {}",
                path.display(),
                problems.join("\n  ")
            ));
        }
        let jwks_path = file.jwt.as_ref().map(|j| base.join(&j.jwks_file));
        Ok(Self {
            tenants,
            jwt,
            jwks_path,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BUFFER: (usize, usize) = (10_000, 64 << 20);

    fn parse(text: &str) -> Result<Tenants, String> {
        Tenants::parse(text, Path::new("/etc/ingest/tenants.toml"), None, BUFFER)
    }

    #[test]
    fn a_full_tenant_parses() {
        let t = parse(&format!(
            r#"
            [[tenant]]
            name = "ml"
            tokens_sha256 = ["{}"]
            client_cert_names = ["logger.ml.svc"]
            topics = ["ml.#", "predictions.*"]
            max_events_in_flight = 2000
            max_bytes_in_flight = "16MiB"
            events_per_second = 5000
            "#,
            "ab".repeat(32)
        ))
        .unwrap();
        let ml = &t.tenants[0];
        assert_eq!(&*ml.name, "ml");
        assert_eq!(ml.tokens, vec![[0xab; 32]]);
        assert!(ml.allows("ml.a.b") && ml.allows("predictions.x") && !ml.allows("orders.x"));
        assert_eq!(ml.quota.capacity().events, 2000);
        assert_eq!(ml.quota.capacity().bytes, 16 << 20);
        assert_eq!(ml.quota.per_second(), Some(5000.0));
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let e = parse(
            r#"
            [[tenant]]
            name = "a"
            tokens_sha256 = ["nothex"]
            topics = ["ml.x*"]
            max_bytes_in_flight = "16MB"
            [[tenant]]
            name = "a"
            jwt_subjects = ["s"]
            "#,
        )
        .unwrap_err();
        for part in [
            "not 64 hex digits",
            "whole words",
            "max_bytes_in_flight",
            "used by another tenant",
            "needs a [jwt] table",
        ] {
            assert!(e.contains(part), "{part:?} missing from {e}");
        }
    }

    #[test]
    fn unchanged_tenants_keep_their_quota_across_a_reload() {
        let text = |events: u32| {
            format!(
                "[[tenant]]\nname = \"a\"\ntokens_sha256 = [\"{}\"]\ntopics = [\"#\"]\nmax_events_in_flight = {events}\n",
                "00".repeat(32)
            )
        };
        let first = parse(&text(5)).unwrap();
        let same = Tenants::parse(&text(5), Path::new("t.toml"), Some(&first), BUFFER).unwrap();
        assert!(Arc::ptr_eq(&first.tenants[0].quota, &same.tenants[0].quota));
        let changed = Tenants::parse(&text(6), Path::new("t.toml"), Some(&first), BUFFER).unwrap();
        assert!(!Arc::ptr_eq(
            &first.tenants[0].quota,
            &changed.tenants[0].quota
        ));
    }

    #[test]
    fn unknown_keys_and_empty_files_are_refused() {
        assert!(parse("[[tenant]]\nname = \"a\"\ntokens = []\n").is_err());
        assert!(parse("").unwrap_err().contains("no [[tenant]]"));
    }
}
