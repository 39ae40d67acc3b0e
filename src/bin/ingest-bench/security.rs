//! `--security`: the same gRPC scenario over plaintext, over TLS, and over TLS with a
//! bearer token checked against a tenants file, so one run shows what each costs.
//!
//! For the non-plain modes the bench makes, at start, a CA and a server certificate
//! for `localhost` and 127.0.0.1 (rcgen), a random token and a tenants file naming
//! its SHA-256, all in a temporary folder removed when the run ends.

use std::{
    io::Read as _,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use clap::ValueEnum;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use sha2::{Digest as _, Sha256};
use tonic::{
    metadata::MetadataValue,
    transport::{Certificate, ClientTlsConfig},
};

use crate::server::{Bearer, Dial};

/// How the gRPC scenarios reach the server.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Plaintext HTTP/2, no credential.
    #[value(name = "plain")]
    Plain,
    /// HTTP/2 over TLS (ALPN h2), no credential.
    #[value(name = "tls")]
    Tls,
    /// HTTP/2 over TLS, every call with `authorization: Bearer <token>` checked
    /// against a tenants file.
    #[value(name = "tls+auth")]
    TlsAuth,
}

impl Mode {
    /// The name on the command line and the suffix of a row's name.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Plain => "plain",
            Mode::Tls => "tls",
            Mode::TlsAuth => "tls+auth",
        }
    }
}

/// The name the client dials and the server certificate is made for.
const SERVER_NAME: &str = "localhost";
/// The one tenant of the tenants file.
const TENANT: &str = "bench";

/// The header ingest stamps on every message in `mode` (the tenant, with a tenants
/// file), for a direct ceiling that publishes the same messages.
pub fn stamped_header(mode: Mode) -> Option<(&'static str, &'static str)> {
    (mode == Mode::TlsAuth).then_some((ingest::auth::TENANT_HEADER, TENANT))
}

/// What one mode adds to a started server and to the clients that dial it.
#[derive(Clone, Default)]
pub struct Setup {
    /// INGEST_TLS_CERT, INGEST_TLS_KEY, INGEST_AUTH_FILE as the mode needs.
    pub server_env: Vec<(&'static str, String)>,
    pub dial: Dial,
}

/// The certificates, key, token and tenants file of a run, in a temporary folder
/// removed on drop.
pub struct Material {
    dir: PathBuf,
    ca_pem: String,
    cert: PathBuf,
    key: PathBuf,
    auth_file: PathBuf,
    /// `Bearer <token>`, ready to send.
    bearer: MetadataValue<tonic::metadata::Ascii>,
}

impl Material {
    /// Makes everything the non-plain modes need.
    pub fn create() -> anyhow::Result<Self> {
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "ingest-bench CA");
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let issuer = CertifiedIssuer::self_signed(ca, KeyPair::generate()?)?;

        let mut server = CertificateParams::new(vec![SERVER_NAME.to_owned()])?;
        server
            .subject_alt_names
            .push(SanType::IpAddress([127, 0, 0, 1].into()));
        server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate()?;
        let cert = server.signed_by(&key, &issuer)?;

        let token = hex(&random_bytes::<32>()?);
        let tenants = format!(
            "[[tenant]]\nname = \"{TENANT}\"\ntokens_sha256 = [\"{}\"]\ntopics = [\"#\"]\n",
            hex(&Sha256::digest(token.as_bytes()))
        );

        let dir = std::env::temp_dir().join(format!(
            "ingest-bench-security-{}-{:016x}",
            std::process::id(),
            fastrand::u64(..)
        ));
        create_private_dir(&dir)?;
        // From here on the folder goes away on drop, whatever fails next.
        let material = Self {
            ca_pem: issuer.pem(),
            cert: dir.join("server.crt"),
            key: dir.join("server.key"),
            auth_file: dir.join("tenants.toml"),
            bearer: format!("Bearer {token}").parse()?,
            dir,
        };
        for (path, contents) in [
            (&material.key, key.serialize_pem()),
            (&material.cert, cert.pem()),
            (&material.auth_file, tenants),
        ] {
            std::fs::write(path, contents)
                .with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(material)
    }

    /// What `mode` adds to the server and its clients.
    pub fn setup(&self, mode: Mode) -> anyhow::Result<Setup> {
        if mode == Mode::Plain {
            return Ok(Setup::default());
        }
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .domain_name(SERVER_NAME);
        let mut setup = Setup {
            server_env: vec![
                ("INGEST_TLS_CERT", path_str(&self.cert)?),
                ("INGEST_TLS_KEY", path_str(&self.key)?),
            ],
            dial: Dial::tls(tls),
        };
        if mode == Mode::TlsAuth {
            setup
                .server_env
                .push(("INGEST_AUTH_FILE", path_str(&self.auth_file)?));
            setup.dial.bearer = Bearer::new(self.bearer.clone());
        }
        Ok(setup)
    }
}

impl Drop for Material {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A folder only this user can read: it holds a private key and a token.
fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))
}

fn path_str(path: &Path) -> anyhow::Result<String> {
    path.to_str()
        .map(str::to_owned)
        .with_context(|| format!("{} is not UTF-8", path.display()))
}

/// `N` bytes from the kernel's CSPRNG (the bench already needs Linux for `/proc`).
fn random_bytes<const N: usize>() -> anyhow::Result<[u8; N]> {
    let mut bytes = [0u8; N];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("reading /dev/urandom")?;
    Ok(bytes)
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut out, b| {
        let _ = write!(out, "{b:02x}");
        out
    })
}
