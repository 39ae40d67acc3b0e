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

use std::{
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use futures::Stream;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
    time::{Instant, Sleep},
};
use tonic::transport::server::{Connected, TcpConnectInfo};

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

/// Accepted connections, at most `max_connections` open at once. The stream never
/// ends by itself and never yields an error: accept errors are logged and retried.
pub fn incoming(
    listener: TcpListener,
    settings: TransportSettings,
) -> impl Stream<Item = Result<Connection, io::Error>> {
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
                        return Some((Ok(connection), (listener, slots, short)));
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

impl Connected for Connection {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
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
