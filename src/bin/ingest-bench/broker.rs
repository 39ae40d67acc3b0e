//! The bench's own view of RabbitMQ: it declares each scenario's exchange and queue,
//! and afterwards counts what really arrived, over a connection of its own (never
//! through the overload proxy).

use std::time::{Duration, Instant};

use anyhow::Context as _;
use lapin::{
    Channel, Connection, ConnectionProperties, ExchangeKind,
    options::{
        ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
        QueueDeleteOptions,
    },
    types::{AMQPValue, FieldTable},
};

/// How long the queue depth may take to reach the acknowledged count. A confirm
/// means the broker has the message, so this is only a safety margin.
const SETTLE: Duration = Duration::from_secs(5);
/// How often the queue depth is re-read while settling.
const POLL: Duration = Duration::from_millis(100);

/// A scenario's exchange and its queue bound with `#`.
#[derive(Debug, Clone)]
pub struct Topology {
    pub exchange: String,
    pub queue: String,
    /// Whether the exchange is the bench's own (deleted afterwards) or the one of a
    /// server given with `--addr` (left alone).
    pub owns_exchange: bool,
}

/// `prefix-<random hex>`, so runs and scenarios never share a name on a shared broker.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{:016x}", fastrand::u64(..))
}

/// An admin connection and channel.
pub struct Broker {
    connection: Connection,
    channel: Channel,
}

impl Broker {
    /// Connects to the broker.
    pub async fn connect(url: &str) -> anyhow::Result<Self> {
        let properties =
            ConnectionProperties::default().with_connection_name("ingest-bench admin".into());
        let connection = Connection::connect(url, properties)
            .await
            .with_context(|| format!("cannot connect to RabbitMQ at {}", redact(url)))?;
        let channel = connection.create_channel().await?;
        Ok(Self {
            connection,
            channel,
        })
    }

    /// Declares (or, for a foreign exchange, checks) the exchange and a durable queue
    /// bound to it with `#`. The queue expires after `expires` unused, so a crashed
    /// run leaves no permanent litter.
    pub async fn declare(&self, topology: &Topology, expires: Duration) -> anyhow::Result<()> {
        self.channel
            .exchange_declare(
                topology.exchange.as_str().into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    passive: !topology.owns_exchange,
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .with_context(|| format!("declaring exchange {:?}", topology.exchange))?;
        let mut arguments = FieldTable::default();
        let expires_ms = i64::try_from(expires.as_millis()).unwrap_or(i64::MAX);
        arguments.insert("x-expires".into(), AMQPValue::LongLongInt(expires_ms));
        self.channel
            .queue_declare(
                topology.queue.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                arguments,
            )
            .await
            .with_context(|| format!("declaring queue {:?}", topology.queue))?;
        self.channel
            .queue_bind(
                topology.queue.as_str().into(),
                topology.exchange.as_str().into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .context("binding the queue")?;
        Ok(())
    }

    /// Messages in `queue` now (passive declare).
    pub async fn depth(&self, queue: &str) -> anyhow::Result<u64> {
        let queue = self
            .channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .with_context(|| format!("reading the depth of queue {queue:?}"))?;
        Ok(u64::from(queue.message_count()))
    }

    /// Polls the depth of `queue` until it equals `expected` or stops changing for
    /// [`SETTLE`]; returns the last depth read.
    pub async fn settle(&self, queue: &str, expected: u64) -> anyhow::Result<u64> {
        let mut depth = self.depth(queue).await?;
        let mut changed = Instant::now();
        while depth != expected && changed.elapsed() < SETTLE {
            tokio::time::sleep(POLL).await;
            let now = self.depth(queue).await?;
            if now != depth {
                changed = Instant::now();
                depth = now;
            }
        }
        Ok(depth)
    }

    /// Deletes the queue (a full queue left behind slows the broker for the next
    /// scenario) and the exchange if the bench declared it.
    pub async fn remove(&self, topology: &Topology) -> anyhow::Result<()> {
        self.channel
            .queue_delete(
                topology.queue.as_str().into(),
                QueueDeleteOptions::default(),
            )
            .await
            .with_context(|| format!("deleting queue {:?}", topology.queue))?;
        if topology.owns_exchange {
            self.channel
                .exchange_delete(
                    topology.exchange.as_str().into(),
                    ExchangeDeleteOptions::default(),
                )
                .await
                .with_context(|| format!("deleting exchange {:?}", topology.exchange))?;
        }
        Ok(())
    }

    /// Closes the connection politely.
    pub async fn close(self) {
        let _ = self.connection.close(200, "bench done".into()).await;
    }
}

/// The URL without its password, for error messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// Splits an AMQP URL into what comes before the host, `host:port` (port 5672 or
/// 5671 by scheme if absent) and what follows, so the overload scenario can put
/// its proxy in the broker's place.
pub fn split_authority(url: &str) -> anyhow::Result<(String, String, String)> {
    let scheme_end = url
        .find("://")
        .with_context(|| format!("{} is not a URL", redact(url)))?
        + 3;
    let rest = &url[scheme_end..];
    let host_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let authority = &rest[..host_end];
    let host_start = authority.rfind('@').map_or(0, |at| at + 1);
    let hostport = &authority[host_start..];
    anyhow::ensure!(!hostport.is_empty(), "{} has no host", redact(url));
    let has_port = match hostport.rfind(':') {
        Some(colon) => !hostport[colon..].contains(']'),
        None => false,
    };
    let hostport = if has_port {
        hostport.to_owned()
    } else if url.starts_with("amqps") {
        format!("{hostport}:5671")
    } else {
        format!("{hostport}:5672")
    };
    Ok((
        url[..scheme_end + host_start].to_owned(),
        hostport,
        rest[host_end..].to_owned(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authority_is_split_out() {
        let (head, host, tail) = split_authority("amqp://guest:guest@127.0.0.1:5672/%2f").unwrap();
        assert_eq!(
            (head.as_str(), host.as_str(), tail.as_str()),
            ("amqp://guest:guest@", "127.0.0.1:5672", "/%2f")
        );
        let (head, host, tail) = split_authority("amqp://mq?heartbeat=5").unwrap();
        assert_eq!(
            (head.as_str(), host.as_str(), tail.as_str()),
            ("amqp://", "mq:5672", "?heartbeat=5")
        );
        assert!(split_authority("nonsense").is_err());
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(redact("amqp://u:p@h/v"), "amqp://u:***@h/v");
        assert_eq!(redact("amqp://h/v"), "amqp://h/v");
    }
}
