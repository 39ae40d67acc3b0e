//! Reloading files without a restart: the TLS certificate and key, the client CA and
//! the tenants file are loaded again when their content changes and on SIGHUP.
//!
//! Changes are found by reading the files once a second and comparing a hash of their
//! content, not by inotify: Kubernetes rotates a mounted Secret by swapping a symlink
//! (`..data`) under the path, which a watch on the file itself misses, and polling a
//! few small files costs nothing. A reload that fails keeps what was loaded before and
//! logs why, once per content; the next change tries again.

use std::{
    collections::hash_map::DefaultHasher,
    hash::{Hash, Hasher},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use tokio_util::sync::CancellationToken;

/// How often the files are looked at.
pub const POLL: Duration = Duration::from_secs(1);

/// Something loaded from files that can be loaded again.
pub trait Reloadable: Send + Sync + 'static {
    /// For the logs: `"TLS certificate"`, `"tenants file"`.
    fn what(&self) -> &'static str;
    /// The files it is loaded from.
    fn paths(&self) -> Vec<PathBuf>;
    /// Loads them again; on error keeps the current state and says why.
    fn reload(&self) -> Result<(), String>;
}

impl Reloadable for crate::tls::TlsAcceptor {
    fn what(&self) -> &'static str {
        "TLS certificate"
    }
    fn paths(&self) -> Vec<PathBuf> {
        self.files().paths()
    }
    fn reload(&self) -> Result<(), String> {
        crate::tls::TlsAcceptor::reload(self)
    }
}

/// A hash of the files' content (a missing file hashes as missing).
fn fingerprint(paths: &[PathBuf]) -> u64 {
    let mut hasher = DefaultHasher::new();
    for path in paths {
        match std::fs::read(path) {
            Ok(bytes) => bytes.hash(&mut hasher),
            Err(e) => e.kind().hash(&mut hasher),
        }
    }
    hasher.finish()
}

struct Watched {
    item: Arc<dyn Reloadable>,
    /// The content last loaded (or last tried and refused, so a bad file is logged once).
    seen: u64,
}

/// Watches `items` until `stop` is cancelled: reloads each when its files change, and
/// every one on SIGHUP.
pub async fn watch(items: Vec<Arc<dyn Reloadable>>, stop: CancellationToken) {
    if items.is_empty() {
        return;
    }
    let mut watched: Vec<Watched> = items
        .into_iter()
        .map(|item| {
            let seen = fingerprint(&item.paths());
            Watched { item, seen }
        })
        .collect();
    let mut hangup = hangup();
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let forced = tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => false,
            () = next_hangup(&mut hangup) => {
                tracing::info!("SIGHUP: reloading certificates and the tenants file");
                true
            }
        };
        for w in &mut watched {
            let now = fingerprint(&w.item.paths());
            if !forced && now == w.seen {
                continue;
            }
            w.seen = now;
            match w.item.reload() {
                Ok(()) => tracing::info!(what = w.item.what(), "reloaded"),
                Err(error) => tracing::warn!(
                    what = w.item.what(),
                    %error,
                    "reload failed; still using what was loaded before"
                ),
            }
        }
    }
}

#[cfg(unix)]
type Hangup = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
type Hangup = ();

#[cfg(unix)]
fn hangup() -> Hangup {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(signal) => Some(signal),
        Err(error) => {
            tracing::warn!(%error, "cannot listen for SIGHUP; files are still reloaded when they change");
            None
        }
    }
}

#[cfg(not(unix))]
fn hangup() -> Hangup {}

#[cfg(unix)]
async fn next_hangup(signal: &mut Hangup) {
    match signal {
        Some(signal) => {
            if signal.recv().await.is_none() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending::<()>().await,
    }
}

#[cfg(not(unix))]
async fn next_hangup(_: &mut Hangup) {
    std::future::pending::<()>().await;
}
