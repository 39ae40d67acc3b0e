//! Bearer JWTs: RS256 or ES256, signed by a key of the JWKS file, from the configured
//! issuer, for the configured audience, within their `exp`/`nbf` (with a small
//! leeway). A verified token's `sub` names the caller; the tenants file maps it to a
//! tenant. Only those two algorithms are accepted, whatever the token's header says,
//! and only with a key of the matching type, so an HMAC or `none` token cannot pass.

use std::path::{Path, PathBuf};

use jsonwebtoken::{
    Algorithm, DecodingKey, Validation, decode, decode_header,
    jwk::{AlgorithmParameters, JwkSet},
};
use serde::Deserialize;

/// Clock skew allowed on `exp` and `nbf`, in seconds.
pub const LEEWAY_SECONDS: u64 = 30;

/// The `[jwt]` table of the tenants file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtSettings {
    /// JWKS (JSON) with the issuer's public keys; relative to the tenants file.
    pub jwks_file: PathBuf,
    /// Required `iss`.
    pub issuer: String,
    /// Required `aud`.
    pub audience: String,
}

/// A key of the JWKS, ready to verify with.
struct Key {
    kid: Option<String>,
    algorithm: Algorithm,
    key: DecodingKey,
}

/// The verifier built from `[jwt]` and its JWKS.
pub struct JwtVerifier {
    keys: Vec<Key>,
    issuer: String,
    audience: String,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtVerifier")
            .field("keys", &self.keys.len())
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .finish()
    }
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
}

impl JwtVerifier {
    /// Loads the JWKS (`jwks_file`, relative paths from `base`).
    pub fn load(settings: &JwtSettings, base: &Path) -> Result<Self, String> {
        let path = base.join(&settings.jwks_file);
        let text = std::fs::read_to_string(&path)
            .map_err(|e| format!("[jwt] jwks_file {}: {e}", path.display()))?;
        let set: JwkSet = serde_json::from_str(&text)
            .map_err(|e| format!("[jwt] jwks_file {} is not a JWKS: {e}", path.display()))?;
        let mut keys = Vec::new();
        for jwk in &set.keys {
            let algorithm = match &jwk.algorithm {
                AlgorithmParameters::RSA(_) => Algorithm::RS256,
                AlgorithmParameters::EllipticCurve(_) => Algorithm::ES256,
                // HMAC secrets and EdDSA keys are not accepted here.
                _ => continue,
            };
            let key = DecodingKey::from_jwk(jwk)
                .map_err(|e| format!("[jwt] jwks_file {}: unusable key: {e}", path.display()))?;
            keys.push(Key {
                kid: jwk.common.key_id.clone(),
                algorithm,
                key,
            });
        }
        if keys.is_empty() {
            return Err(format!(
                "[jwt] jwks_file {} holds no RSA or EC (P-256) key",
                path.display()
            ));
        }
        Ok(Self {
            keys,
            issuer: settings.issuer.clone(),
            audience: settings.audience.clone(),
        })
    }

    /// The verified token's subject, or why it was refused.
    pub fn subject(&self, token: &str) -> Result<String, String> {
        let header = decode_header(token).map_err(|e| format!("not a JWT: {e}"))?;
        if !matches!(header.alg, Algorithm::RS256 | Algorithm::ES256) {
            return Err(format!(
                "JWT algorithm {:?} is not accepted (RS256 or ES256)",
                header.alg
            ));
        }
        let mut validation = Validation::new(header.alg);
        validation.leeway = LEEWAY_SECONDS;
        validation.validate_nbf = true;
        validation.set_issuer(&[&self.issuer]);
        validation.set_audience(&[&self.audience]);
        validation.set_required_spec_claims(&["exp", "sub", "iss", "aud"]);
        let candidates = self.keys.iter().filter(|k| {
            k.algorithm == header.alg
                && match (&header.kid, &k.kid) {
                    (Some(wanted), Some(kid)) => wanted == kid,
                    _ => true,
                }
        });
        let mut last = format!("no key in the JWKS for a {:?} token", header.alg);
        for key in candidates {
            match decode::<Claims>(token, &key.key, &validation) {
                Ok(data) => return Ok(data.claims.sub),
                Err(e) => last = format!("JWT refused: {e}"),
            }
        }
        Err(last)
    }
}
