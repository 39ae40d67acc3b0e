//! A TCP fault-injection proxy placed between the service and RabbitMQ.
//!
//! Tests point the service at [`FaultProxy::amqp_url`] instead of the broker
//! and then flip the proxy between healthy and broken states to exercise the
//! service's reconnect, back-pressure and timeout paths against a real broker.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Largest chunk read (and therefore held) per direction per connection, so a
/// stalled or slowed proxy never buffers more than this.
pub const CHUNK: usize = 16 * 1024;

/// What the proxy does with traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Copy bytes both ways.
    Forward,
    /// Keep connections open but stop reading from either side, so kernel
    /// buffers fill and the peers' writes eventually block — a hung broker or
    /// a black-holed network. New connections are held, not forwarded.
    Stall,
    /// Accept new connections and close them immediately; existing ones are
    /// cut when this mode is set — a broker that is down.
    Refuse,
}

/// A TCP proxy in front of `upstream` whose behaviour tests can change at any
/// time. Dropping it stops the accept loop and closes every connection.
pub struct FaultProxy {
    addr: SocketAddr,
    mode: watch::Sender<Mode>,
    latency: watch::Sender<Duration>,
    /// Cancelled when the proxy is dropped; parent of every `cut` token.
    shutdown: CancellationToken,
    /// Token handed to connections accepted from now on; `cut` cancels it
    /// and installs a fresh one, so only current connections are closed.
    cut: Arc<Mutex<CancellationToken>>,
    connections: Arc<AtomicUsize>,
}

impl FaultProxy {
    /// Starts a proxy on `127.0.0.1:0` in [`Mode::Forward`].
    pub async fn start(upstream: SocketAddr) -> FaultProxy {
        Self::start_in(upstream, Mode::Forward).await
    }

    /// Starts a proxy on `127.0.0.1:0` in the given mode (e.g. `Refuse` to
    /// test a service starting while the broker is down).
    pub async fn start_in(upstream: SocketAddr, mode: Mode) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fault proxy");
        let addr = listener.local_addr().expect("fault proxy local addr");
        let (mode_tx, _) = watch::channel(mode);
        let (latency_tx, _) = watch::channel(Duration::ZERO);
        let shutdown = CancellationToken::new();
        let proxy = FaultProxy {
            addr,
            cut: Arc::new(Mutex::new(shutdown.child_token())),
            mode: mode_tx,
            latency: latency_tx,
            shutdown,
            connections: Arc::new(AtomicUsize::new(0)),
        };
        tokio::spawn(accept_loop(listener, upstream, proxy.shared()));
        proxy
    }

    /// The address the proxy listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// AMQP URL (guest/guest, vhost `/`) that goes through this proxy.
    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.addr.port())
    }

    /// Switches mode. Setting [`Mode::Refuse`] also cuts existing connections.
    pub fn set_mode(&self, mode: Mode) {
        self.mode.send_replace(mode);
        if mode == Mode::Refuse {
            self.cut();
        }
    }

    /// Closes every current proxied connection (both sides) now, leaving the
    /// mode unchanged — a dropped TCP connection.
    pub fn cut(&self) {
        let mut current = self.cut.lock().unwrap();
        let old = std::mem::replace(&mut *current, self.shutdown.child_token());
        old.cancel();
    }

    /// Delay added before writing each forwarded chunk, in both directions.
    /// `Duration::ZERO` disables it.
    pub fn set_latency(&self, d: Duration) {
        self.latency.send_replace(d);
    }

    /// Number of currently open proxied connections (including held ones).
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    fn shared(&self) -> Shared {
        Shared {
            mode: self.mode.subscribe(),
            latency: self.latency.subscribe(),
            shutdown: self.shutdown.clone(),
            cut: self.cut.clone(),
            connections: self.connections.clone(),
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// The proxy state the background tasks need.
#[derive(Clone)]
struct Shared {
    mode: watch::Receiver<Mode>,
    latency: watch::Receiver<Duration>,
    shutdown: CancellationToken,
    cut: Arc<Mutex<CancellationToken>>,
    connections: Arc<AtomicUsize>,
}

async fn accept_loop(listener: TcpListener, upstream: SocketAddr, shared: Shared) {
    loop {
        let accepted = tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let client = match accepted {
            Ok((client, _)) => client,
            Err(_) => {
                // E.g. EMFILE: back off instead of spinning.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        if *shared.mode.borrow() == Mode::Refuse {
            drop(client);
            continue;
        }
        let token = shared.cut.lock().unwrap().clone();
        let guard = ConnectionGuard::new(shared.connections.clone());
        let shared = shared.clone();
        tokio::spawn(async move {
            let _guard = guard;
            tokio::select! {
                // Dropping `relay` drops both sockets, closing both sides.
                _ = token.cancelled() => {}
                _ = relay(client, upstream, shared) => {}
            }
        });
    }
}

/// Counts a proxied connection for as long as its task lives.
struct ConnectionGuard(Arc<AtomicUsize>);

impl ConnectionGuard {
    fn new(count: Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        ConnectionGuard(count)
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn relay(client: TcpStream, upstream: SocketAddr, shared: Shared) {
    let mut mode = shared.mode.clone();
    // Hold the client until forwarding is allowed; only then open the
    // upstream side, so the broker sees no half-open handshake meanwhile.
    if !wait_forward(&mut mode).await {
        return;
    }
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    tokio::join!(
        pump(client_read, server_write, shared.clone()),
        pump(server_read, client_write, shared),
    );
}

/// Copies one direction, one bounded chunk at a time, honouring mode and
/// latency. On EOF it half-closes the other side so shutdowns propagate.
async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, shared: Shared) {
    let Shared {
        mut mode, latency, ..
    } = shared;
    let mut buf = vec![0u8; CHUNK];
    loop {
        if !wait_forward(&mut mode).await {
            return;
        }
        let read = tokio::select! {
            // Stop reading as soon as the mode leaves Forward; a TCP read is
            // cancel-safe, so nothing is lost.
            changed = mode.wait_for(|m| *m != Mode::Forward) => {
                if changed.is_err() {
                    return;
                }
                continue;
            }
            read = from.read(&mut buf) => read,
        };
        let n = match read {
            Ok(0) | Err(_) => {
                let _ = to.shutdown().await;
                return;
            }
            Ok(n) => n,
        };
        let delay = *latency.borrow();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        // A chunk read just before a Stall is held, not delivered, until
        // forwarding resumes.
        if !wait_forward(&mut mode).await {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// Waits while stalled. Returns `true` once forwarding is allowed, `false` if
/// the connection should close (Refuse, or the proxy is gone).
async fn wait_forward(mode: &mut watch::Receiver<Mode>) -> bool {
    match mode.wait_for(|m| *m != Mode::Stall).await {
        Ok(m) => *m == Mode::Forward,
        Err(_) => false,
    }
}
