//! Helpers for observing what actually reached the (shared) RabbitMQ broker.
//!
//! The broker is shared between tests and runs, so every exchange and queue
//! gets a random suffix, queues expire on their own if a test crashes before
//! [`TestQueue::cleanup`], and nothing relies on global broker state.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use futures::StreamExt;

use lapin::message::BasicGetMessage;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};

/// Where the test broker listens (plain `host:port`, e.g. for a [`super::FaultProxy`]).
pub const AMQP_ADDR: &str = "127.0.0.1:5672";
/// AMQP URL of the test broker: guest/guest, default vhost `/`.
pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// A one-word topic: no binding of [`TestQueue::all_but_one_word_topics`] matches it.
pub const UNBOUND_TOPIC: &str = "unbound";

/// Queues self-delete after 10 minutes unused, so a crashed test leaves no
/// permanent litter on the shared broker.
const QUEUE_EXPIRES_MS: i32 = 600_000;

/// Longest wait for one answer from the broker to a test's own request: it is local
/// and idle enough to answer in milliseconds, so waiting longer means it is stuck.
const BROKER_ANSWER: Duration = Duration::from_secs(10);

/// How often polling helpers re-check the queue depth.
const POLL: Duration = Duration::from_millis(25);

/// `prefix` + `-` + a random 64-bit hex suffix, so concurrent tests and runs
/// never collide on the shared broker.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{:016x}", fastrand::u64(..))
}

/// Connects directly to the broker, panicking with a how-to-fix message if it
/// is not running (the most common reason integration tests fail locally).
pub async fn connect_broker() -> Connection {
    connect_to(AMQP_URL).await
}

async fn connect_to(url: &str) -> Connection {
    Connection::connect(url, ConnectionProperties::default())
        .await
        .unwrap_or_else(|e| {
            panic!(
                "RabbitMQ is not reachable at {url} ({e}): \
                 start it with `rabbitmq-server -detached`"
            )
        })
}

/// A durable topic exchange plus a bound, randomly named queue that captures
/// whatever the service publishes, inspected over a separate direct
/// connection (never through a fault proxy).
pub struct TestQueue {
    pub exchange: String,
    pub queue: String,
    /// The broker it lives on: the shared one, or a private node.
    url: String,
    connection: Connection,
    channel: Channel,
}

impl TestQueue {
    /// Declares a fresh durable topic exchange `unique("ingest-test")` and a
    /// queue bound to it with `binding_key` (e.g. `"#"` or `"orders.*"`).
    pub async fn new(binding_key: &str) -> TestQueue {
        Self::bind_existing(&unique("ingest-test"), binding_key).await
    }

    /// A queue bound to every routing key of two or more words (`*.*.#`) and to the
    /// empty one: only one-word topics such as [`UNBOUND_TOPIC`] are unroutable. For
    /// tests of unroutable events, which cannot bind `#`: a publish of anything else
    /// (a copy under another topic, an example's default topic) lands here and shows.
    pub async fn all_but_one_word_topics() -> TestQueue {
        let queue = Self::new("*.*.#").await;
        queue.bind("").await;
        queue
    }

    /// Binds the queue to its exchange with `binding_key` too.
    pub async fn bind(&self, binding_key: &str) {
        self.channel
            .queue_bind(
                self.queue.as_str().into(),
                self.exchange.as_str().into(),
                binding_key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind test queue");
    }

    /// Like [`TestQueue::new`] but on a caller-chosen exchange name, e.g. one
    /// the service is expected to declare itself. The exchange is declared
    /// here too, with exactly the properties the service uses (durable topic,
    /// not auto-delete), so either side may declare it first.
    pub async fn bind_existing(exchange: &str, binding_key: &str) -> TestQueue {
        Self::on(AMQP_URL, exchange, binding_key).await
    }

    /// Like [`TestQueue::new`], on the broker at `url` (e.g. a private node).
    pub async fn new_at(url: &str, binding_key: &str) -> TestQueue {
        Self::on(url, &unique("ingest-test"), binding_key).await
    }

    /// Opens a fresh connection after the broker restarted under the old one.
    pub async fn reconnect(&mut self) {
        self.connection = connect_to(&self.url).await;
        self.channel = self
            .connection
            .create_channel()
            .await
            .expect("create channel");
    }

    async fn on(url: &str, exchange: &str, binding_key: &str) -> TestQueue {
        let connection = connect_to(url).await;
        let channel = connection.create_channel().await.expect("create channel");
        channel
            .exchange_declare(
                exchange.into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    durable: true,
                    auto_delete: false,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("declare test exchange");

        let queue = unique("ingest-test-q");
        let mut args = FieldTable::default();
        args.insert("x-expires".into(), AMQPValue::LongInt(QUEUE_EXPIRES_MS));
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                args,
            )
            .await
            .expect("declare test queue");
        channel
            .queue_bind(
                queue.as_str().into(),
                exchange.into(),
                binding_key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind test queue");

        TestQueue {
            exchange: exchange.to_owned(),
            queue,
            url: url.to_owned(),
            connection,
            channel,
        }
    }

    /// Number of ready messages, via a passive `queue.declare`. Panics if the broker
    /// does not answer within [`BROKER_ANSWER`].
    pub async fn count(&self) -> u32 {
        let declare = self.channel.queue_declare(
            self.queue.as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        );
        tokio::time::timeout(BROKER_ANSWER, declare)
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "the broker did not answer a passive declare of queue {} within \
                     {BROKER_ANSWER:?}",
                    self.queue
                )
            })
            .expect("passive declare of test queue")
            .message_count()
    }

    /// Polls until `count() >= n` or `timeout` elapses; returns the last
    /// count so the caller can assert on it with a useful message.
    pub async fn wait_for_count(&self, n: u32, timeout: Duration) -> u32 {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let count = self.count().await;
            if count >= n || tokio::time::Instant::now() >= deadline {
                return count;
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Asserts the count is exactly `n` now and stays so for `settle` —
    /// proves nothing extra (duplicates, late retries) arrives.
    pub async fn assert_count_stays(&self, n: u32, settle: Duration) {
        let deadline = tokio::time::Instant::now() + settle;
        loop {
            let count = self.count().await;
            assert_eq!(
                count, n,
                "queue {} expected to hold exactly {n} messages",
                self.queue
            );
            if tokio::time::Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Removes and acks every message currently in the queue, in queue order.
    pub async fn take_all(&self) -> Vec<BasicGetMessage> {
        let stuck = |what: &str| {
            format!(
                "the broker did not answer {what} on queue {} within {BROKER_ANSWER:?}",
                self.queue
            )
        };
        let mut messages = Vec::new();
        loop {
            let get = self
                .channel
                .basic_get(self.queue.as_str().into(), BasicGetOptions::default());
            let Some(message) = tokio::time::timeout(BROKER_ANSWER, get)
                .await
                .unwrap_or_else(|_| panic!("{}", stuck("basic_get")))
                .expect("basic_get from test queue")
            else {
                return messages;
            };
            let ack = message.delivery.acker.ack(BasicAckOptions::default());
            tokio::time::timeout(BROKER_ANSWER, ack)
                .await
                .unwrap_or_else(|_| panic!("{}", stuck("ack")))
                .expect("ack test message");
            messages.push(message);
        }
    }

    /// Drains the queue and returns each message's `message_id` property, in
    /// order. Panics if a message has none, since the service always sets it.
    /// Uses a consumer rather than one `basic_get` round trip per message: reading
    /// 20,000 messages one by one takes seconds. Call it once the queue has settled.
    pub async fn message_ids(&self) -> Vec<String> {
        let n = self.count().await as usize;
        if n == 0 {
            return Vec::new();
        }
        let tag = unique("ids");
        let mut consumer = self
            .channel
            .basic_consume(
                self.queue.as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("consume test queue");
        let mut ids = Vec::with_capacity(n);
        while ids.len() < n {
            let delivery = tokio::time::timeout(Duration::from_secs(30), consumer.next())
                .await
                .expect("test queue stopped delivering")
                .expect("consumer ended")
                .expect("delivery");
            let id = delivery
                .properties
                .message_id()
                .as_ref()
                .expect("message has no message_id property");
            ids.push(id.to_string());
        }
        self.channel
            .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
            .await
            .expect("cancel consumer");
        ids
    }

    /// Like [`TestQueue::message_ids`], once the queue has settled: its count has not
    /// changed for `settle`, so late arrivals (duplicates, retries) are read too.
    /// Panics if it is still changing after 30 s.
    pub async fn settled_message_ids(&self, settle: Duration) -> Vec<String> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let mut last = self.count().await;
        let mut since = tokio::time::Instant::now();
        while since.elapsed() < settle {
            assert!(
                tokio::time::Instant::now() < deadline,
                "queue {} kept changing (now {last} messages)",
                self.queue
            );
            tokio::time::sleep(POLL).await;
            let count = self.count().await;
            if count != last {
                (last, since) = (count, tokio::time::Instant::now());
            }
        }
        self.message_ids().await
    }

    /// Publishes `payload` straight to the exchange (bypassing the service)
    /// and waits for the broker's confirm — for seeding or checking routing.
    pub async fn publish(&self, routing_key: &str, payload: &[u8]) {
        let channel = self
            .connection
            .create_channel()
            .await
            .expect("create publish channel");
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirm_select");
        let confirmation = channel
            .basic_publish(
                self.exchange.as_str().into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                payload,
                BasicProperties::default(),
            )
            .await
            .expect("basic_publish")
            .await
            .expect("publisher confirm");
        assert!(confirmation.is_ack(), "broker nacked test publish");
        channel
            .close(200, "OK".into())
            .await
            .expect("close channel");
    }

    /// Deletes the queue and the exchange and closes the connection. Call at
    /// the end of every test; the queue's `x-expires` covers crashed tests.
    pub async fn cleanup(self) {
        let _ = self
            .channel
            .queue_delete(self.queue.as_str().into(), QueueDeleteOptions::default())
            .await;
        let _ = self
            .channel
            .exchange_delete(
                self.exchange.as_str().into(),
                ExchangeDeleteOptions::default(),
            )
            .await;
        let _ = self.connection.close(200, "OK".into()).await;
    }
}

/// Asserts that `landed` (message ids read from a queue) holds every id of `expected`
/// exactly once and nothing else, naming the duplicates, the missing and the
/// unexpected ids. A set of the landed ids would hide duplicates.
#[track_caller]
pub fn assert_exactly_once<'a>(landed: &[String], expected: impl IntoIterator<Item = &'a String>) {
    let mut times: BTreeMap<&str, usize> = BTreeMap::new();
    for id in landed {
        *times.entry(id.as_str()).or_default() += 1;
    }
    let expected: BTreeSet<&str> = expected.into_iter().map(String::as_str).collect();
    let duplicated: Vec<(&str, usize)> = times
        .iter()
        .filter(|&(_, &n)| n > 1)
        .map(|(&id, &n)| (id, n))
        .collect();
    let missing: Vec<&str> = expected
        .iter()
        .copied()
        .filter(|id| !times.contains_key(id))
        .collect();
    let unexpected: Vec<&str> = times
        .keys()
        .copied()
        .filter(|id| !expected.contains(id))
        .collect();
    assert!(
        duplicated.is_empty() && missing.is_empty() && unexpected.is_empty(),
        "{} messages landed for {} expected ids: {} ids more than once {:?}, {} missing \
         {:?}, {} unexpected {:?}",
        landed.len(),
        expected.len(),
        duplicated.len(),
        duplicated.iter().take(5).collect::<Vec<_>>(),
        missing.len(),
        missing.iter().take(5).collect::<Vec<_>>(),
        unexpected.len(),
        unexpected.iter().take(5).collect::<Vec<_>>(),
    );
}
