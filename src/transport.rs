//! The gRPC listener's connections: how many are held at once, how long a new one
//! may take to start talking, and an accept loop that survives running out of file
//! descriptors.
//!
//! A slot is taken *before* a connection is accepted (as mini-redis does) and is held
//! by the connection until it closes, so the bound is structural: past
//! `--max-connections`, new connections wait in the kernel's listen backlog and the
//! process holds nothing for them. Accept errors never end the loop: a descriptor
//! shortage is logged (once per episode) and retried after a pause, since closing
//! connections will free descriptors.
//!
//! With TLS, the handshake runs concurrently per connection (up to the connection
//! limit, each already holding its slot) under the same handshake timeout, so a slow
//! or silent client does not hold up the next one; a failed handshake closes only its
//! own connection.

use std::{
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use futures::{Stream, StreamExt};
use rustls::pki_types::CertificateDer;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
    time::{Instant, Sleep},
};
use tonic::transport::server::Connected;

use crate::tls::TlsAcceptor;

/// Pause after an accept error before the next attempt.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// Bytes a client sends first: the HTTP/2 connection preface (24 bytes) and a
/// SETTINGS frame header (9 bytes).
const HANDSHAKE_BYTES: usize = 24 + 9;

/// Connection limits of the gRPC listener.
#[derive(Clone, Copy, Debug)]
pub struct TransportSettings {
    /// Connections held at once.
    pub max_connections: usize,
    /// A new connection that has not sent its HTTP/2 preface and SETTINGS within
    /// this long is closed.
    pub handshake_timeout: Duration,
}

/// Accepted connections, at most `max_connections` open at once, after their TLS
/// handshake when `tls` is set. The stream never ends by itself and never yields an
/// error: accept errors are logged and retried, failed handshakes logged and dropped.
pub fn incoming(
    listener: TcpListener,
    settings: TransportSettings,
    tls: Option<Arc<TlsAcceptor>>,
) -> impl Stream<Item = Result<Io, io::Error>> {
    let concurrency = settings.max_connections.max(1);
    accepted(listener, settings)
        .map(move |connection| {
            let tls = tls.clone();
            async move {
                let Some(tls) = tls else {
                    return Some(Io::Plain(connection));
                };
                let remote = connection.stream.peer_addr().ok();
                let deadline = connection.deadline();
                match tokio::time::timeout_at(deadline, tls.accept(connection)).await {
                    Ok(Ok(stream)) => Some(Io::Tls(Box::new(stream))),
                    Ok(Err(error)) => {
                        tracing::debug!(?remote, %error, "TLS handshake failed");
                        None
                    }
                    Err(_) => {
                        tracing::debug!(?remote, "no TLS handshake within the handshake timeout");
                        None
                    }
                }
            }
        })
        .buffer_unordered(concurrency)
        .filter_map(|io| async move { io.map(Ok) })
}

/// Accepted TCP connections, each holding its slot.
fn accepted(listener: TcpListener, settings: TransportSettings) -> impl Stream<Item = Connection> {
    let slots = Arc::new(Semaphore::new(
        settings.max_connections.clamp(1, Semaphore::MAX_PERMITS),
    ));
    futures::stream::unfold(
        (listener, slots, false),
        move |(listener, slots, mut short)| async move {
            // The slot first: past the limit, connections wait in the backlog.
            let slot = Arc::clone(&slots).acquire_owned().await.ok()?;
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => {
                        if short {
                            tracing::info!("accepting connections again");
                            short = false;
                        }
                        // Small gRPC answers must not wait for Nagle's algorithm.
                        let _ = stream.set_nodelay(true);
                        let connection = Connection::new(stream, slot, settings.handshake_timeout);
                        return Some((connection, (listener, slots, short)));
                    }
                    Err(error) => {
                        if is_out_of_descriptors(&error) {
                            if !short {
                                tracing::error!(%error, max_connections = settings.max_connections, "out of file descriptors: new connections wait until some close (raise the descriptor limit, e.g. `ulimit -n`, above --max-connections)");
                                short = true;
                            }
                        } else {
                            tracing::debug!(%error, "accept failed; retrying");
                        }
                        tokio::time::sleep(ACCEPT_RETRY).await;
                    }
                }
            }
        },
    )
}

fn is_out_of_descriptors(error: &io::Error) -> bool {
    // EMFILE (the process's limit) and ENFILE (the system's).
    matches!(error.raw_os_error(), Some(24 | 23))
}

/// An accepted connection; holds its slot until dropped.
#[derive(Debug)]
pub struct Connection {
    stream: TcpStream,
    _slot: OwnedSemaphorePermit,
    /// Until the handshake bytes have arrived: the deadline, and how many arrived.
    handshake: Option<(Pin<Box<Sleep>>, usize)>,
}

impl Connection {
    fn new(stream: TcpStream, slot: OwnedSemaphorePermit, timeout: Duration) -> Self {
        Self {
            stream,
            _slot: slot,
            handshake: Some((
                Box::pin(tokio::time::sleep_until(Instant::now() + timeout)),
                0,
            )),
        }
    }
}

impl Connection {
    /// When the handshake must be done by.
    fn deadline(&self) -> Instant {
        self.handshake
            .as_ref()
            .map_or_else(Instant::now, |(sleep, _)| sleep.deadline())
    }
}

/// What a request knows of its connection (in its extensions): who is at the other end
/// and, with mutual TLS, the certificate it proved it holds.
#[derive(Clone, Debug)]
pub struct PeerInfo {
    /// The client's address.
    pub remote: Option<std::net::SocketAddr>,
    /// The client's verified certificate (leaf), with mutual TLS.
    pub client_cert: Option<Arc<CertificateDer<'static>>>,
}

/// A served connection: plain TCP or TLS over it.
#[derive(Debug)]
pub enum Io {
    /// Plaintext (no `--tls-cert`).
    Plain(Connection),
    /// After a completed TLS handshake.
    Tls(Box<tokio_rustls::server::TlsStream<Connection>>),
}

impl Connected for Io {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        match self {
            Io::Plain(connection) => PeerInfo {
                remote: connection.stream.peer_addr().ok(),
                client_cert: None,
            },
            Io::Tls(stream) => {
                let (connection, session) = stream.get_ref();
                PeerInfo {
                    remote: connection.stream.peer_addr().ok(),
                    client_cert: session
                        .peer_certificates()
                        .and_then(|chain| chain.first())
                        .map(|leaf| Arc::new(leaf.clone().into_owned())),
                }
            }
        }
    }
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(c) => Pin::new(c).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(c) => Pin::new(c).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(c) => Pin::new(c).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(c) => Pin::new(c).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(c) => Pin::new(c).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Io::Plain(c) => c.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        let read = Pin::new(&mut this.stream).poll_read(cx, buf);
        if let Some((deadline, seen)) = &mut this.handshake {
            match read {
                Poll::Ready(Ok(())) => {
                    *seen += buf.filled().len() - before;
                    if *seen >= HANDSHAKE_BYTES {
                        this.handshake = None;
                    }
                }
                Poll::Pending => {
                    if deadline.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "no HTTP/2 handshake within the handshake timeout",
                        )));
                    }
                }
                Poll::Ready(Err(_)) => {}
            }
        }
        read
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}
