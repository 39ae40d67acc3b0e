//! The connection supervisor: connects, declares topology, opens the confirm-mode
//! channels, watches the connection, and reconnects with capped exponential backoff
//! and jitter. It is the only writer of the channel pool and of the broker state.

use std::{
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use futures::StreamExt;
use lapin::{
    Connection, ConnectionProperties, Event, ExchangeKind,
    options::{ConfirmSelectOptions, ExchangeDeclareOptions},
    tcp::OwnedTLSConfig,
    types::FieldTable,
    uri::AMQPUri,
};
use tokio::time::{sleep, timeout};

use super::{BrokerState, Pool, Shared, last_error};

/// First retry delay; doubles per failed attempt up to the configured cap.
const BASE_BACKOFF: Duration = Duration::from_millis(100);
/// A connect that takes longer than this (e.g. a black-holed address) counts as failed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a live connection's status is re-read, besides its events.
const STATUS_POLL: Duration = Duration::from_secs(1);
/// Heartbeat interval asked for unless the URL sets `?heartbeat=`: a dead connection is
/// noticed after two missed beats.
const DEFAULT_HEARTBEAT_SECS: u16 = 10;
/// Closing waits at most this long: lapin's `close` hangs on a blocked connection.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a connection attempt failed.
struct Failure {
    /// One line for the logs, `/readyz` and callers.
    reason: String,
    /// The broker refused the credentials or the vhost, or TLS failed (e.g. its
    /// certificate is not trusted): retrying will not help until someone fixes the
    /// configuration, so it is logged as an error.
    refused: bool,
}

impl From<String> for Failure {
    fn from(reason: String) -> Self {
        Self {
            reason,
            refused: false,
        }
    }
}

pub(super) async fn run(shared: Arc<Shared>) {
    let mut attempt: u32 = 0;
    loop {
        let connected = tokio::select! {
            biased;
            () = shared.stop.cancelled() => return,
            result = connect_any(&shared) => result,
        };
        match connected {
            Ok((connection, node)) => {
                attempt = 0;
                shared.last_error.set(None);
                shared.node.set(Some(&node));
                tracing::info!(%node, exchange = %shared.settings.exchange, channels = shared.settings.channels, "connected to RabbitMQ");
                let reason = watch(&shared, &connection).await;
                shared.node.set(None);
                if !shared.stop.is_cancelled() {
                    // Before the state turns: whoever sees "disconnected" sees why.
                    shared
                        .last_error
                        .set(Some(&format!("lost the connection: {reason}")));
                }
                let pool = shared.pool.read().ok().and_then(|p| p.clone());
                set_pool(&shared, None);
                shared.state.send_replace(BrokerState {
                    failing_over: shared.settings.retry_unconfirmed && !shared.stop.is_cancelled(),
                    ..BrokerState::default()
                });
                if shared.stop.is_cancelled() {
                    // Channels first, then the connection; all bounded, since a
                    // blocked broker answers neither.
                    let _ = timeout(CLOSE_TIMEOUT, async {
                        if let Some(pool) = pool {
                            let closes = pool
                                .channels
                                .iter()
                                .map(|c| c.close(200, "ingest shutting down".into()));
                            futures::future::join_all(closes).await;
                        }
                        connection.close(200, "ingest shutting down".into()).await
                    })
                    .await;
                    tracing::info!("RabbitMQ connection closed");
                    return;
                }
                tracing::warn!(%node, %reason, "lost the RabbitMQ connection; reconnecting");
            }
            // Each new reason is logged once; the same one again on every retry only at
            // debug (a wrong password would otherwise fill the log), while `/readyz`
            // and the callers' UNAVAILABLE keep showing it.
            Err(failure) => {
                let error = failure.reason.as_str();
                let new = shared.last_error.set(Some(error));
                // The first round after a loss found no node: the broker is away, and
                // calls fail at once again (with the reason just set).
                if shared.state.borrow().failing_over {
                    shared.state.send_replace(BrokerState::default());
                }
                const RETRYING: &str = "cannot connect to RabbitMQ; retrying (the same error again is logged at debug)";
                match (new, failure.refused) {
                    (true, true) => tracing::error!(error = %error, attempt, "{RETRYING}"),
                    (true, false) => tracing::warn!(error = %error, attempt, "{RETRYING}"),
                    (false, _) => {
                        tracing::debug!(error = %error, attempt, "cannot connect to RabbitMQ")
                    }
                }
            }
        }
        let delay = backoff(attempt, shared.settings.reconnect_max_backoff);
        shared.progress.reconnect_in(delay);
        attempt = attempt.saturating_add(1);
        tokio::select! {
            () = shared.stop.cancelled() => return,
            () = sleep(delay) => {}
        }
    }
}

/// Tries every URL of `--amqp-url` once, in shuffled order (so replicas spread over
/// a cluster's nodes, and a dead node is not always tried first), each within
/// [`CONNECT_TIMEOUT`]; the first that connects wins, with its `host:port`. If none
/// does, the failure names each node's reason (a refusal anywhere is kept as one).
async fn connect_any(shared: &Shared) -> Result<(Connection, String), Failure> {
    let mut urls: Vec<&str> = shared
        .settings
        .amqp_url
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .collect();
    fastrand::shuffle(&mut urls);
    let several = urls.len() > 1;
    let mut failures: Vec<Failure> = Vec::with_capacity(urls.len());
    for url in urls {
        let node = node_of(url);
        let result = timeout(CONNECT_TIMEOUT, connect(shared, url))
            .await
            .unwrap_or_else(|_| Err(Failure::from("connect timed out".to_owned())));
        match result {
            Ok(connection) => return Ok((connection, node)),
            Err(failure) if several => failures.push(Failure {
                reason: format!("{node}: {}", failure.reason),
                refused: failure.refused,
            }),
            Err(failure) => failures.push(failure),
        }
    }
    let refused = failures.iter().any(|f| f.refused);
    let reasons: Vec<String> = failures.into_iter().map(|f| f.reason).collect();
    Err(Failure {
        reason: if several {
            format!("no node answered ({})", reasons.join("; "))
        } else {
            reasons.concat()
        },
        refused,
    })
}

/// `host:port` of an AMQP URL, for logs, `/readyz` and the node metric label (never
/// the credentials).
pub(super) fn node_of(url: &str) -> String {
    match url.parse::<AMQPUri>() {
        Ok(uri) => format!("{}:{}", uri.authority.host, uri.authority.port),
        Err(_) => "?".to_owned(),
    }
}

/// Opens the connection, the topology and the channels, and installs the pool. A
/// connection whose setup fails is closed, not left to linger until the broker notices.
async fn connect(shared: &Shared, url: &str) -> Result<Connection, Failure> {
    let properties = ConnectionProperties::default().with_connection_name("ingest".into());
    let mut uri: AMQPUri = url.parse()?;
    // Without heartbeats a silently dead broker (a cut cable, a black-holed address) is
    // noticed only when TCP gives up, minutes later; RabbitMQ proposes 60 s.
    uri.query.heartbeat.get_or_insert(DEFAULT_HEARTBEAT_SECS);
    let user = uri.authority.userinfo.username.clone();
    // For amqps://: the system's roots plus the --amqp-ca certificates, if any (lapin
    // builds the rustls client from them on each connect). Plain amqp:// ignores it.
    let tls = OwnedTLSConfig {
        identity: None,
        cert_chain: shared.settings.amqp_ca.clone(),
    };
    let runtime = lapin::runtime::default_runtime().map_err(|e| e.to_string())?;
    let connection = Connection::connect_uri_with_config(uri, properties, tls, runtime)
        .await
        .map_err(|e| Failure {
            reason: last_error::describe(&e, &user),
            refused: last_error::needs_fix(&e),
        })?;
    if let Err(error) = setup(shared, &connection).await {
        let _ = timeout(CLOSE_TIMEOUT, connection.close(200, "setup failed".into())).await;
        return Err(error.into());
    }
    Ok(connection)
}

async fn setup(shared: &Shared, connection: &Connection) -> Result<(), String> {
    let settings = &shared.settings;
    let setup = connection
        .create_channel()
        .await
        .map_err(|e| e.to_string())?;
    let options = ExchangeDeclareOptions {
        passive: !settings.declare_exchange,
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    setup
        .exchange_declare(
            shared.exchange.clone(),
            ExchangeKind::Topic,
            options,
            FieldTable::default(),
        )
        .await
        .map_err(|e| format!("declaring exchange {:?}: {e}", settings.exchange))?;
    let _ = setup.close(200, "topology declared".into()).await;
    let mut channels = Vec::with_capacity(settings.channels);
    for _ in 0..settings.channels {
        channels.push(open_channel(connection).await?);
    }
    let frame_max = connection.configuration().frame_max() as usize;
    set_pool(
        shared,
        Some(Pool {
            channels,
            connection: shared.connections.fetch_add(1, Ordering::Relaxed) + 1,
            status: connection.status().clone(),
            frame_max,
        }),
    );
    shared.state.send_replace(BrokerState {
        connected: true,
        blocked: connection.status().blocked(),
        stalled: false,
        failing_over: false,
    });
    Ok(())
}

async fn open_channel(connection: &Connection) -> Result<lapin::Channel, String> {
    let channel = connection
        .create_channel()
        .await
        .map_err(|e| e.to_string())?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    Ok(channel)
}

/// Follows a live connection until it fails or the publisher is stopped; replaces
/// channels the broker closed. Returns why it ended.
async fn watch(shared: &Shared, connection: &Connection) -> String {
    let mut events = connection.events_listener();
    let mut poll = tokio::time::interval(STATUS_POLL);
    loop {
        tokio::select! {
            () = shared.stop.cancelled() => return "shutting down".into(),
            event = events.next() => match event {
                Some(Event::Error(error)) => return error.to_string(),
                Some(Event::ConnectionBlocked(reason)) => {
                    tracing::warn!(%reason, "RabbitMQ blocked publishing (resource alarm)");
                    shared.state.send_modify(|s| s.blocked = true);
                }
                Some(Event::ConnectionUnblocked) => {
                    tracing::info!("RabbitMQ unblocked publishing");
                    shared.state.send_modify(|s| s.blocked = false);
                }
                Some(_) => {}
                None => return "connection events ended".into(),
            },
            _ = poll.tick() => {}
            () = shared.repair.notified() => {}
        }
        if !connection.status().connected() {
            return "connection no longer connected".into();
        }
        if let Err(error) = repair(shared, connection).await {
            return error;
        }
    }
}

/// Replaces channels that are no longer open (e.g. closed by the broker after an error)
/// and channels retired after a confirm timeout (those are closed in the background).
async fn repair(shared: &Shared, connection: &Connection) -> Result<(), String> {
    let current = shared.pool.read().ok().and_then(|p| p.clone());
    let Some(pool) = current else { return Ok(()) };
    let retired = shared
        .retired
        .lock()
        .map(|mut r| std::mem::take(&mut *r))
        .unwrap_or_default();
    let healthy = |c: &lapin::Channel| c.status().connected() && !retired.contains(&c.id());
    if pool.channels.iter().all(healthy) {
        return Ok(());
    }
    let mut channels = Vec::with_capacity(pool.channels.len());
    for channel in &pool.channels {
        if healthy(channel) {
            channels.push(channel.clone());
            continue;
        }
        let open = channel.status().connected();
        tracing::warn!(channel = channel.id(), open, "replacing AMQP channel");
        if open {
            let old = channel.clone();
            // At most one per pool channel per repair; bounded, since a blocked broker
            // never answers the close.
            tokio::spawn(async move {
                let _ = timeout(CLOSE_TIMEOUT, old.close(200, "confirm timed out".into())).await;
            });
        }
        // A broker that does not answer must not hold the supervisor here: past the
        // timeout the connection counts as lost and is replaced whole.
        let fresh = timeout(CONNECT_TIMEOUT, open_channel(connection))
            .await
            .map_err(|_| "opening a replacement channel timed out".to_owned())??;
        channels.push(fresh);
    }
    set_pool(
        shared,
        Some(Pool {
            channels,
            connection: pool.connection,
            status: pool.status.clone(),
            frame_max: pool.frame_max,
        }),
    );
    Ok(())
}

fn set_pool(shared: &Shared, pool: Option<Pool>) {
    let mut slot = match shared.pool.write() {
        Ok(slot) => slot,
        Err(poisoned) => poisoned.into_inner(),
    };
    let new = pool.is_some();
    *slot = pool.map(Arc::new);
    drop(slot);
    if new {
        shared.pools.send_modify(|n| *n = n.wrapping_add(1));
    }
}

/// Capped exponential backoff with jitter: a random delay in the upper half of
/// `min(BASE * 2^attempt, max)`, so many instances do not reconnect in lockstep.
pub(super) fn backoff(attempt: u32, max: Duration) -> Duration {
    let exp = BASE_BACKOFF.saturating_mul(1u32.checked_shl(attempt.min(20)).unwrap_or(u32::MAX));
    let cap = exp.min(max);
    cap / 2 + cap.mul_f64(fastrand::f64() / 2.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let max = Duration::from_secs(30);
        for _ in 0..100 {
            let first = backoff(0, max);
            assert!(
                first >= Duration::from_millis(50) && first <= Duration::from_millis(100),
                "{first:?}"
            );
            let fifth = backoff(4, max);
            assert!(
                fifth >= Duration::from_millis(800) && fifth <= Duration::from_millis(1600),
                "{fifth:?}"
            );
            let late = backoff(40, max);
            assert!(late >= Duration::from_secs(15) && late <= max, "{late:?}");
        }
    }
}
