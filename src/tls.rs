//! TLS on the gRPC listener: the certificate and key (and, for mutual TLS, the CA
//! client certificates must chain to), loaded from PEM files and swapped in place
//! when the files change, without a restart.
//!
//! The acceptor holds the current `rustls::ServerConfig` behind a lock that is taken
//! only to clone an `Arc` when a connection starts its handshake, so a reload never
//! touches a handshake in progress: connections that began before it finish with the
//! old certificate, later ones get the new. A new file that does not load (missing,
//! half-written, a key that does not match the certificate) leaves the old
//! configuration in place and is logged with the reason; the next change tries again.
//!
//! Crypto provider: ring. aws-lc-rs, rustls' default, is a cmake C build that about
//! doubles a clean build on two cores; ring is already needed by the AMQP client's TLS
//! and by the JWT verifier.

use std::{
    fmt,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
};

use rustls::{
    RootCertStore, ServerConfig,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::WebPkiClientVerifier,
};

/// The files TLS is configured from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM CA certificates; set = mutual TLS, every client must present a certificate
    /// that chains to one of them.
    pub client_ca: Option<PathBuf>,
}

impl TlsFiles {
    /// Every file, for the reload watcher.
    pub fn paths(&self) -> Vec<PathBuf> {
        let mut paths = vec![self.cert.clone(), self.key.clone()];
        paths.extend(self.client_ca.clone());
        paths
    }
}

/// The ring provider, the only one this build has.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read the {what} {}: {e}", path.display()))
}

fn certificates(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = read(path, what)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("the {what} {} is not PEM: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "the {what} {} holds no CERTIFICATE block",
            path.display()
        ));
    }
    Ok(certs)
}

/// Builds the server configuration from `files`; the error names the file and why.
pub fn load(files: &TlsFiles) -> Result<Arc<ServerConfig>, String> {
    let chain = certificates(&files.cert, "certificate (--tls-cert)")?;
    let key_pem = read(&files.key, "key (--tls-key)")?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
        format!(
            "the key (--tls-key) {} holds no usable private key: {e}",
            files.key.display()
        )
    })?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for ca in certificates(path, "client CA (--tls-client-ca)")? {
                roots.add(ca).map_err(|e| {
                    format!(
                        "the client CA (--tls-client-ca) {} holds a certificate that cannot be a trust anchor: {e}",
                        path.display()
                    )
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|e| format!("client CA (--tls-client-ca) {}: {e}", path.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(chain, key).map_err(|e| {
        format!(
            "the certificate {} and key {} do not make a usable pair: {e}",
            files.cert.display(),
            files.key.display()
        )
    })?;
    // gRPC is HTTP/2 only.
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// The listener's current TLS configuration, replaced on reload.
pub struct TlsAcceptor {
    files: TlsFiles,
    current: RwLock<Arc<ServerConfig>>,
}

impl fmt::Debug for TlsAcceptor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsAcceptor")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl TlsAcceptor {
    /// Loads `files`; fails (at start) with the reason.
    pub fn new(files: TlsFiles) -> Result<Self, String> {
        let config = load(&files)?;
        Ok(Self {
            files,
            current: RwLock::new(config),
        })
    }

    /// The files it reloads from.
    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// The configuration a new handshake uses.
    pub fn config(&self) -> Arc<ServerConfig> {
        match self.current.read() {
            Ok(config) => Arc::clone(&config),
            // A panic while swapping an Arc cannot leave it half-written.
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// Loads the files again and swaps the result in; on failure the current
    /// configuration stays and the error says why.
    pub fn reload(&self) -> Result<(), String> {
        let config = load(&self.files)?;
        match self.current.write() {
            Ok(mut current) => *current = config,
            Err(poisoned) => *poisoned.into_inner() = config,
        }
        Ok(())
    }

    /// Starts a handshake on `stream` with the current configuration.
    pub fn accept<IO>(&self, stream: IO) -> tokio_rustls::Accept<IO>
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        tokio_rustls::TlsAcceptor::from(self.config()).accept(stream)
    }
}
