//! Certificates, keys, tokens and tenants files made in the test: a CA, server and
//! client certificates signed by it (rcgen), TLS gRPC clients, bearer tokens and
//! ES256 JWTs with their JWKS.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

use ingest::proto::ingest_client::IngestClient;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use sha2::{Digest, Sha256};
use tonic::{
    metadata::MetadataValue,
    transport::{Certificate, Channel, ClientTlsConfig, Identity},
};

use super::unique;

/// A folder for one test's files, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> Self {
        let dir = std::env::temp_dir().join(unique("ingest-pki"));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    /// Writes `contents` to `name` in the folder, atomically (a rename), and returns
    /// its path: a reader never sees half a file.
    pub fn write(&self, name: &str, contents: impl AsRef<[u8]>) -> PathBuf {
        let path = self.0.join(name);
        let tmp = self.0.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, contents).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        path
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A certificate authority made for the test.
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate and its key, PEM.
#[derive(Clone)]
pub struct Pair {
    pub cert: String,
    pub key: String,
}

impl Ca {
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Self { issuer }
    }

    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A server certificate for `localhost` and 127.0.0.1, with `serial`.
    pub fn server(&self, serial: u64) -> Pair {
        let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params
            .subject_alt_names
            .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
        params.serial_number = Some(SerialNumber::from(serial));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(params)
    }

    /// A client certificate whose SANs are `dns` names.
    pub fn client(&self, dns: &[&str]) -> Pair {
        let mut params =
            CertificateParams::new(dns.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())
                .unwrap();
        params.distinguished_name.push(DnType::CommonName, dns[0]);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(params)
    }

    fn sign(&self, params: CertificateParams) -> Pair {
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Pair {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }
}

/// A gRPC client over TLS to `addr`, trusting `ca`, presenting `identity` if given.
pub async fn tls_client(
    addr: SocketAddr,
    ca: &str,
    identity: Option<&Pair>,
) -> Result<IngestClient<Channel>, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name("localhost");
    if let Some(pair) = identity {
        tls = tls.identity(Identity::from_pem(&pair.cert, &pair.key));
    }
    let channel = Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)?
        .connect()
        .await?;
    Ok(IngestClient::new(channel))
}

/// The serial number of the certificate the server at `addr` presents to a new
/// connection (verified against `ca`).
pub async fn server_serial(addr: SocketAddr, ca: &str) -> Vec<u8> {
    use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut config = config;
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    serial_of(&leaf)
}

/// The serial number of a DER certificate, big-endian without leading zeros.
pub fn serial_of(der: &[u8]) -> Vec<u8> {
    use x509_parser::prelude::FromDer;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der).unwrap();
    let bytes = cert.tbs_certificate.raw_serial().to_vec();
    bytes.into_iter().skip_while(|b| *b == 0).collect()
}

/// Hex SHA-256 of a bearer token, as the tenants file holds it.
pub fn token_sha256(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Adds `authorization: Bearer <token>` to a request.
pub fn bearer<T>(mut request: tonic::Request<T>, token: &str) -> tonic::Request<T> {
    request.metadata_mut().insert(
        "authorization",
        MetadataValue::try_from(format!("Bearer {token}")).unwrap(),
    );
    request
}

/// An ES256 signing key and its JWKS entry.
pub struct JwtKey {
    key: KeyPair,
    pub kid: String,
}

pub const ISSUER: &str = "https://issuer.test";
pub const AUDIENCE: &str = "ingest";

impl JwtKey {
    pub fn new(kid: &str) -> Self {
        Self {
            key: KeyPair::generate().unwrap(),
            kid: kid.to_owned(),
        }
    }

    /// The JWKS (one EC P-256 key) as JSON.
    pub fn jwks(&self) -> String {
        let raw = self.key.public_key_raw();
        assert_eq!(raw.len(), 65, "uncompressed P-256 point");
        format!(
            r#"{{"keys":[{{"kty":"EC","crv":"P-256","kid":"{}","use":"sig","alg":"ES256","x":"{}","y":"{}"}}]}}"#,
            self.kid,
            base64url(&raw[1..33]),
            base64url(&raw[33..65])
        )
    }

    /// A token for `sub`, from `iss`, expiring `exp_in` seconds from now (negative:
    /// already expired).
    pub fn token(&self, sub: &str, iss: &str, exp_in: i64) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let claims = serde_json::json!({
            "sub": sub, "iss": iss, "aud": AUDIENCE, "iat": now, "nbf": now - 5, "exp": now + exp_in,
        });
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        let key = jsonwebtoken::EncodingKey::from_ec_der(&self.key.serialize_der());
        jsonwebtoken::encode(&header, &claims, &key).unwrap()
    }
}

fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        let chars = chunk.len() + 1;
        for i in 0..chars {
            out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

/// Writes the server certificate and key into `dir` as `server.pem`/`server.key`.
pub fn write_server(dir: &TempDir, pair: &Pair) -> (PathBuf, PathBuf) {
    // The key first: a reload between the two writes finds the new key with the old
    // certificate, refuses the pair, and keeps serving the old one.
    let key = dir.write("server.key", &pair.key);
    let cert = dir.write("server.pem", &pair.cert);
    (cert, key)
}

/// `path` as a string for the config.
pub fn s(path: &Path) -> String {
    path.display().to_string()
}
