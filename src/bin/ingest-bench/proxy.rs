//! A TCP proxy between the overload server and RabbitMQ that can stall: it keeps the
//! connection open but stops moving bytes either way, so the broker looks hung and
//! no confirm comes back. Adapted from the integration tests' fault proxy, cut down
//! to the two modes the benchmark needs.

use std::{net::SocketAddr, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{
        TcpListener, TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
    sync::watch,
};
use tokio_util::sync::CancellationToken;

/// Largest chunk held per direction per connection, so a stall never makes the
/// proxy itself a buffer that grows.
const CHUNK: usize = 16 * 1024;

/// What the proxy does with traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Copy bytes both ways.
    Forward,
    /// Stop reading from either side: kernel buffers fill and the peers' writes
    /// block, like a hung broker. New connections are held, not forwarded.
    Stall,
}

/// A proxy on `127.0.0.1:<port>` in front of `upstream`. Dropping it closes every
/// connection.
pub struct Proxy {
    addr: SocketAddr,
    mode: watch::Sender<Mode>,
    shutdown: CancellationToken,
}

impl Proxy {
    /// Starts forwarding to `upstream` (`host:port`).
    pub async fn start(upstream: String) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (mode, _) = watch::channel(Mode::Forward);
        let shutdown = CancellationToken::new();
        tokio::spawn(accept_loop(
            listener,
            upstream,
            mode.subscribe(),
            shutdown.clone(),
        ));
        Ok(Self {
            addr,
            mode,
            shutdown,
        })
    }

    /// The address to connect to instead of the broker.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Switches between forwarding and stalling.
    pub fn set_mode(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: String,
    mode: watch::Receiver<Mode>,
    shutdown: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let Ok((client, _)) = accepted else {
            // E.g. EMFILE: back off instead of spinning.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let upstream = upstream.clone();
        let mode = mode.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            tokio::select! {
                // Dropping `relay` drops both sockets, closing both sides.
                () = shutdown.cancelled() => {}
                () = relay(client, upstream, mode) => {}
            }
        });
    }
}

async fn relay(client: TcpStream, upstream: String, mut mode: watch::Receiver<Mode>) {
    // Hold the client until forwarding is allowed; only then open the upstream side.
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
        pump(client_read, server_write, mode.clone()),
        pump(server_read, client_write, mode),
    );
}

/// Copies one direction one bounded chunk at a time while the mode is Forward. On
/// EOF it half-closes the other side so shutdowns propagate.
async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, mut mode: watch::Receiver<Mode>) {
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
        // A chunk read just before a stall is held, not delivered, until forwarding
        // resumes.
        if !wait_forward(&mut mode).await {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// Waits while stalled; `false` once the proxy is gone.
async fn wait_forward(mode: &mut watch::Receiver<Mode>) -> bool {
    mode.wait_for(|m| *m == Mode::Forward).await.is_ok()
}
