//! The CA an `amqps://` broker's certificate may chain to (`--amqp-ca`), besides the
//! system's roots: read and checked once at start, so a wrong file stops the service
//! with one line instead of failing every connection attempt later.
//!
//! lapin (through tcp-stream and rustls-connector) takes the PEM text itself and adds
//! its certificates to the system roots on every connect; it silently skips what it
//! cannot parse, which is why the file is parsed here first, with the same parser.

use std::path::Path;

use rustls::{
    RootCertStore,
    pki_types::{CertificateDer, pem::PemObject},
};

/// How the setting is named in errors, as the configuration names it.
const SETTING: &str = "--amqp-ca / INGEST_AMQP_CA";

/// Reads the PEM CA file at `path`: its text if it holds at least one certificate and
/// every certificate in it can be a trust anchor; otherwise one line naming the setting,
/// the file and why.
pub fn read_ca(path: &Path) -> Result<String, String> {
    let shown = path.display();
    let bytes = std::fs::read(path).map_err(|e| format!("{SETTING}: cannot read {shown}: {e}"))?;
    let pem = String::from_utf8(bytes).map_err(|_| {
        format!("{SETTING}: {shown} is not a PEM certificate file (it is not text)")
    })?;
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{SETTING}: {shown} is not valid PEM: {e}"))?;
    if certs.is_empty() {
        return Err(format!(
            "{SETTING}: {shown} holds no PEM certificate (no -----BEGIN CERTIFICATE----- block)"
        ));
    }
    let mut roots = RootCertStore::empty();
    for cert in certs {
        roots.add(cert).map_err(|e| {
            format!("{SETTING}: {shown} holds a certificate that cannot be a trust anchor: {e}")
        })?;
    }
    Ok(pem)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed CA certificate, PEM.
    fn ca() -> String {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().pem()
    }

    fn file(name: &str, contents: &[u8]) -> std::path::PathBuf {
        let path =
            std::env::temp_dir().join(format!("ingest-broker-ca-{}-{name}", std::process::id()));
        std::fs::write(&path, contents).unwrap();
        path
    }

    #[test]
    fn a_pem_ca_is_read_and_anything_else_is_named() {
        let ca = ca();
        let good = file("good.pem", ca.as_bytes());
        assert_eq!(read_ca(&good), Ok(ca));

        let key = file(
            "key.pem",
            b"-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIA==\n-----END PRIVATE KEY-----\n",
        );
        let binary = file("binary.der", &[0x30, 0x82, 0xff, 0xfe, 0x00]);
        let garbage = file(
            "garbage.pem",
            b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        );
        let missing = std::env::temp_dir().join("ingest-broker-ca-does-not-exist.pem");
        for (path, why) in [
            (&key, "holds no PEM certificate"),
            (&binary, "is not a PEM certificate file"),
            (&garbage, "cannot be a trust anchor"),
            (&missing, "cannot read"),
        ] {
            let error = read_ca(path).unwrap_err();
            assert!(error.starts_with("--amqp-ca / INGEST_AMQP_CA: "), "{error}");
            assert!(error.contains(why), "{error}");
            assert!(error.contains(&path.display().to_string()), "{error}");
            assert!(!error.contains('\n'), "one line: {error}");
        }
        for path in [good, key, binary, garbage] {
            let _ = std::fs::remove_file(path);
        }
    }
}
