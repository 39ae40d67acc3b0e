//! ingest: a gRPC front door that forwards events to RabbitMQ and answers OK only
//! after the broker confirmed them.
//!
//! Data flow, one module per stage: [`api`] → [`validate`] → [`admission`] →
//! [`publisher`]; beside them [`config`], [`telemetry`], [`health`], [`admin`] and
//! [`shutdown`].
//! `main` parses the configuration and calls [`run`]; tests call the same [`App`] on a
//! listener bound to an ephemeral port.

pub mod admin;
pub mod admission;
pub mod api;
pub mod auth;
pub mod config;
pub mod health;
#[cfg(any(test, feature = "fuzzing"))]
pub mod properties;
pub mod publisher;
pub mod reload;
pub mod shutdown;
pub mod telemetry;
pub mod tls;
pub mod transport;
pub mod validate;

/// Code generated from `proto/ingest/v1/ingest.proto`.
#[allow(missing_docs, clippy::all, clippy::pedantic, unreachable_pub)]
pub mod proto {
    tonic::include_proto!("ingest.v1");

    /// Encoded descriptors of the proto files, served by reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("ingest_descriptor");
}

use std::{future::Future, sync::Arc};

use tokio::{net::TcpListener, sync::watch, task::JoinHandle, time::Instant};
use tokio_util::sync::CancellationToken;

use crate::{
    admission::{Admission, Usage},
    api::{IngestService, ServiceSettings},
    config::Config,
    proto::ingest_server::IngestServer,
    publisher::{BrokerState, Publisher, PublisherSettings},
    telemetry::Metrics,
    validate::Limits,
};

/// Why the service stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The configuration could not be turned into a running service.
    #[error("cannot start: {0}")]
    Start(String),
    /// The gRPC server failed.
    #[error("gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
    /// The drain deadline passed with events still unconfirmed.
    #[error("drain timeout: {} events ({} bytes) were still unconfirmed", .0.events, .0.bytes)]
    DrainTimeout(Usage),
}

/// The wired service: admission, publisher and the gRPC surface, before it serves.
#[derive(Debug)]
pub struct App {
    config: Config,
    /// The shared bound; exposed so tests and metrics can read it.
    admission: Arc<Admission>,
    /// The broker side; owns the connection supervisor.
    publisher: Publisher,
    /// The supervisor task, awaited on shutdown so the connection closes cleanly.
    supervisor: JoinHandle<()>,
    /// Cancelled when shutdown begins.
    draining: CancellationToken,
    /// Counts, gauges and histograms, served on the admin listener.
    metrics: Metrics,
    /// TLS on the gRPC listener (reloaded when its files change), if configured.
    tls: Option<Arc<tls::TlsAcceptor>>,
    /// The tenants file (reloaded when it changes), if configured.
    authenticator: Option<Arc<auth::Authenticator>>,
}

impl App {
    /// Wires the stages and starts connecting to the broker in the background. Must be
    /// called inside a tokio runtime.
    pub fn new(config: Config) -> Result<Self, RunError> {
        let tls = match &config.tls {
            Some(files) => Some(Arc::new(
                tls::TlsAcceptor::new(files.clone()).map_err(RunError::Start)?,
            )),
            None => None,
        };
        let authenticator = match &config.auth_file {
            Some(path) => Some(Arc::new(
                auth::Authenticator::load(path, (config.buffer_events, config.buffer_bytes))
                    .map_err(RunError::Start)?,
            )),
            None => None,
        };
        let admission = Arc::new(Admission::new(config.buffer_events, config.buffer_bytes));
        let (state, state_rx) = watch::channel(BrokerState::default());
        let metrics = Metrics::new(
            Arc::clone(&admission),
            state_rx,
            telemetry::otlp_metrics_configured(),
        )
        .map_err(RunError::Start)?;
        let (publisher, supervisor) = Publisher::start(
            PublisherSettings {
                amqp_url: config.amqp_url.clone(),
                // Read once here: a file that is not a PEM CA stops the start.
                amqp_ca: config
                    .amqp_ca
                    .as_deref()
                    .map(publisher::read_ca)
                    .transpose()
                    .map_err(RunError::Start)?,
                exchange: config.exchange.clone(),
                declare_exchange: config.declare_exchange,
                retry_unconfirmed: config.retry_unconfirmed,
                accept_unroutable: config.accept_unroutable,
                channels: config.channels,
                confirm_timeout: config.confirm_timeout,
                reconnect_max_backoff: config.reconnect_max_backoff,
                stall_after: config.stall_after,
            },
            state,
            metrics.clone(),
        )
        .map_err(|e| RunError::Start(e.to_string()))?;
        Ok(Self {
            config,
            admission,
            publisher,
            supervisor,
            draining: CancellationToken::new(),
            metrics,
            tls,
            authenticator,
        })
    }

    /// The shared admission bound.
    pub fn admission(&self) -> Arc<Admission> {
        Arc::clone(&self.admission)
    }

    /// Follows the broker connection state.
    pub fn broker_state(&self) -> watch::Receiver<BrokerState> {
        self.publisher.watch_state()
    }

    /// Serves gRPC on `listener` and the admin endpoints on `admin` until `shutdown`
    /// resolves, then drains: health `NOT_SERVING` and `/readyz` 503 at once, new calls
    /// refused, in-flight calls and confirms given until the drain timeout, the AMQP
    /// connection closed. The admin listener stays up until the end.
    pub async fn serve(
        self,
        listener: TcpListener,
        admin: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), RunError> {
        let Self {
            config,
            admission,
            publisher,
            supervisor,
            draining,
            metrics,
            tls,
            authenticator,
        } = self;
        let admin_addr = admin.local_addr();
        let admin_stop = CancellationToken::new();
        let admin_task = tokio::spawn(admin::serve(
            admin,
            metrics.clone(),
            publisher.clone(),
            draining.clone(),
            admin_stop.clone().cancelled_owned(),
        ));
        let limits = Limits {
            max_event_bytes: config.max_event_bytes,
            max_batch_events: config.max_batch_events,
        };
        let max_message = api::max_message_bytes(&limits, config.buffer_bytes);

        let (reporter, health_service) = tonic_health::server::health_reporter();
        health::report(&reporter, false).await;
        tokio::spawn(health::follow(
            reporter,
            publisher.watch_state(),
            draining.clone(),
        ));

        let reflection_v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .map_err(|e| RunError::Start(e.to_string()))?;
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()
            .map_err(|e| RunError::Start(e.to_string()))?;

        let ingest = IngestServer::new(IngestService::new(
            Arc::clone(&admission),
            publisher.clone(),
            ServiceSettings {
                limits,
                retry_after: config.retry_after,
                stream_idle_timeout: config.stream_idle_timeout,
                stream_stall_timeout: config.stream_stall_timeout,
            },
            metrics.clone(),
            draining.clone(),
        ))
        .max_decoding_message_size(max_message);

        let mut reloadable: Vec<Arc<dyn reload::Reloadable>> = Vec::new();
        if let Some(tls) = &tls {
            reloadable.push(Arc::clone(tls) as Arc<dyn reload::Reloadable>);
        }
        if let Some(authenticator) = &authenticator {
            reloadable.push(Arc::clone(authenticator) as Arc<dyn reload::Reloadable>);
            metrics.watch_tenants(Arc::clone(authenticator));
        }
        metrics.watch_node(publisher.node());
        let reload_stop = CancellationToken::new();
        tokio::spawn(reload::watch(reloadable, reload_stop.clone()));

        tracing::info!(
            listen = %shown_addr(listener.local_addr()),
            tls = tls.is_some(),
            mutual_tls = config.tls.as_ref().is_some_and(|t| t.client_ca.is_some()),
            tenants = authenticator.as_ref().map_or(0, |a| a.tenants().tenants.len()),
            admin = %shown_addr(admin_addr),
            max_message,
            buffer_events = config.buffer_events,
            buffer_bytes = config.buffer_bytes,
            "serving gRPC"
        );

        // Every request byte is reserved before it is read, and its events admitted
        // before it is decoded (api::intake).
        let intake = api::intake::IntakeLayer::new(api::intake::IntakeSettings {
            admission: Arc::clone(&admission),
            limits: api::framing::FrameLimits {
                max_message,
                max_events: limits.max_batch_events,
                walk_fields: true,
            },
            max_other_message: api::MAX_OTHER_MESSAGE_BYTES,
            hints: api::hints::RetryHints::new(
                publisher.clone(),
                metrics.clone(),
                config.retry_after,
            ),
            metrics: metrics.clone(),
        });

        let transport_settings = transport::TransportSettings {
            max_connections: config.max_connections,
            handshake_timeout: config.handshake_timeout,
        };
        let (stop_accepting, stopped) = tokio::sync::oneshot::channel::<()>();
        let mut server = tokio::spawn(
            // Transport bounds: what a caller can park in this process before flow
            // control stops it is at most one connection window per connection (and
            // one stream window per stream); nothing adapts the windows upward.
            tonic::transport::Server::builder()
                .initial_stream_window_size(config.http2_stream_window)
                .initial_connection_window_size(config.http2_connection_window)
                .http2_adaptive_window(Some(false))
                .max_concurrent_streams(config.max_concurrent_streams)
                .http2_max_header_list_size(config.max_header_list_size)
                .http2_keepalive_interval(Some(config.http2_keepalive_interval))
                .http2_keepalive_timeout(Some(config.http2_keepalive_timeout))
                // Authentication first: a refused call's body is never read.
                .layer(auth::layer::AuthLayer::new(authenticator, metrics.clone()))
                .layer(intake)
                .add_service(health_service)
                .add_service(reflection_v1)
                .add_service(reflection_v1alpha)
                .add_service(ingest)
                .serve_with_incoming_shutdown(
                    transport::incoming(listener, transport_settings, tls.clone()),
                    async {
                        let _ = stopped.await;
                    },
                ),
        );

        tokio::select! {
            () = shutdown => {}
            result = &mut server => {
                // The server ended on its own: an accept error. Clean up and report it.
                publisher.close();
                let _ = supervisor.await;
                admin_stop.cancel();
                let _ = admin_task.await;
                return match result {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(RunError::Serve(e)),
                    Err(e) => Err(RunError::Start(e.to_string())),
                };
            }
        }

        let deadline = Instant::now() + config.drain_timeout;
        tracing::info!(drain_timeout = ?config.drain_timeout, in_flight = admission.in_use().events, "draining");
        draining.cancel();
        let _ = stop_accepting.send(());
        if tokio::time::timeout_at(deadline, &mut server)
            .await
            .is_err()
        {
            tracing::warn!("calls still open at the drain deadline; closing them");
            server.abort();
        }
        let left = shutdown::drained(&admission, deadline).await;
        publisher.close();
        let _ = supervisor.await;
        admin_stop.cancel();
        let _ = admin_task.await;
        reload_stop.cancel();
        metrics.shutdown();
        if left.events > 0 {
            tracing::error!(
                events = left.events,
                bytes = left.bytes,
                "drain deadline passed with events unconfirmed"
            );
            return Err(RunError::DrainTimeout(left));
        }
        tracing::info!("drained; bye");
        Ok(())
    }
}

/// A listener's address for the logs: `0.0.0.0:50051`, not `Some(0.0.0.0:50051)`.
fn shown_addr(addr: std::io::Result<std::net::SocketAddr>) -> String {
    addr.map_or_else(|e| format!("unknown ({e})"), |a| a.to_string())
}

/// Binds the gRPC and admin listeners from `config` and runs the service until
/// `shutdown` resolves and the drain ends.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    let bind = |addr, what| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|e| RunError::Start(format!("cannot bind the {what} listener on {addr}: {e}")))
    };
    let listener = bind(config.listen, "gRPC").await?;
    let admin = bind(config.admin_listen, "admin").await?;
    App::new(config)?.serve(listener, admin, shutdown).await
}
