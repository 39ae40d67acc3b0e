//! The ceiling: the same events published straight to RabbitMQ with lapin, with the
//! guarantees ingest gives (confirm mode, persistent, `mandatory`), pipelined as far
//! as a client can: `inflight` unconfirmed publishes per channel.
//!
//! The messages are shaped as ingest writes them, since the broker's cost per message
//! depends on it: a `message_id` as long as the UUID ingest generates, and with
//! `header` the header ingest stamps (e.g. `x-ingest-tenant` with a tenants file).
//! RabbitMQ 3.10 was measured here to publish about a fifth slower once a message's
//! properties pass 64 bytes (an Erlang heap binary's limit), which a 36-byte id plus
//! `x-ingest-tenant: bench` does: a ceiling of smaller messages would be no ceiling.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use anyhow::Context as _;
use bytes::Bytes;
use futures::{StreamExt, stream::FuturesUnordered};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties,
    options::{BasicPublishOptions, ConfirmSelectOptions},
    types::{AMQPValue, FieldTable, ShortString},
};

use crate::plan::{Plan, Tally};

/// AMQP `delivery_mode` 2: written to disk in durable queues, as ingest publishes.
const PERSISTENT: u8 = 2;

/// What the direct publisher needs.
pub struct Direct {
    pub amqp_url: String,
    pub exchange: String,
    pub routing_key: String,
    pub channels: usize,
    pub inflight: usize,
    pub payload: Bytes,
    /// A header every message carries, as ingest stamps it.
    pub header: Option<(&'static str, &'static str)>,
}

impl Direct {
    /// Publishes until `plan` is exhausted on a connection of its own, one task per
    /// channel, and returns once every publish is settled.
    pub async fn run(&self, plan: Arc<Plan>, progress: Arc<AtomicU64>) -> anyhow::Result<Tally> {
        let properties =
            ConnectionProperties::default().with_connection_name("ingest-bench direct".into());
        let connection = Connection::connect(&self.amqp_url, properties)
            .await
            .context("direct: cannot connect to RabbitMQ")?;
        // Message ids as ingest sets them (one per event), unique across channels.
        let sequence = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::with_capacity(self.channels);
        for _ in 0..self.channels {
            let channel = connection.create_channel().await?;
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await?;
            tasks.push(tokio::spawn(publish_loop(
                channel,
                Target {
                    exchange: ShortString::try_new(self.exchange.clone())?,
                    routing_key: ShortString::try_new(self.routing_key.clone())?,
                    payload: self.payload.clone(),
                    header: self.header,
                },
                self.inflight,
                Arc::clone(&plan),
                Arc::clone(&progress),
                Arc::clone(&sequence),
            )));
        }
        let mut tallies = Vec::with_capacity(tasks.len());
        for task in tasks {
            tallies.push(task.await?);
        }
        let _ = connection.close(200, "direct done".into()).await;
        Ok(Tally::sum(tallies))
    }
}

/// Where and what one channel publishes.
struct Target {
    exchange: ShortString,
    routing_key: ShortString,
    payload: Bytes,
    header: Option<(&'static str, &'static str)>,
}

/// Keeps up to `inflight` publishes open on `channel` until the plan runs out, then
/// drains them. Every publish future is polled to its end: lapin keeps a dropped,
/// unsettled `PublisherConfirm` in a list for the life of the channel, so the loop
/// never returns early and never drops `pending` while it holds one.
async fn publish_loop(
    channel: Channel,
    target: Target,
    inflight: usize,
    plan: Arc<Plan>,
    progress: Arc<AtomicU64>,
    sequence: Arc<AtomicU64>,
) -> Tally {
    let mut tally = Tally::default();
    let mut pending = FuturesUnordered::new();
    loop {
        while pending.len() < inflight && plan.claim(1) == 1 {
            let id = sequence.fetch_add(1, Ordering::Relaxed);
            pending.push(publish_one(&channel, &target, id));
        }
        let Some((outcome, latency)) = pending.next().await else {
            break;
        };
        match outcome {
            Ok(Confirmation::Ack(None)) => {
                tally.acked += 1;
                tally.record(latency);
                progress.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Confirmation::Ack(Some(returned))) => {
                tally.error(|| format!("unroutable: {}", returned.reply_text));
            }
            Ok(Confirmation::Nack(_)) => tally.error(|| "nacked".to_owned()),
            Ok(Confirmation::NotRequested) => {
                tally.error(|| "channel not in confirm mode".to_owned());
            }
            Err(error) => tally.error(|| error.to_string()),
        }
    }
    tally
}

/// One publish and its confirm, and the time between handing it to lapin and the
/// confirm.
async fn publish_one(
    channel: &Channel,
    target: &Target,
    id: u64,
) -> (lapin::Result<Confirmation>, std::time::Duration) {
    let started = Instant::now();
    // 36 bytes, as a hyphenated UUID.
    let mut properties = BasicProperties::default()
        .with_delivery_mode(PERSISTENT)
        .with_message_id(format!("direct00-0000-7000-8000-{id:012x}").into());
    if let Some((key, value)) = target.header {
        let mut headers = FieldTable::default();
        headers.insert(key.into(), AMQPValue::LongString(value.as_bytes().into()));
        properties = properties.with_headers(headers);
    }
    let outcome = async {
        channel
            .basic_publish(
                target.exchange.clone(),
                target.routing_key.clone(),
                BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                &target.payload,
                properties,
            )
            .await?
            .await
    }
    .await;
    (outcome, started.elapsed())
}
