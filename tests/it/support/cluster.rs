//! A real three-node RabbitMQ cluster of private nodes, for failover tests: a node
//! can be killed (`kill -9`), shut down and started again while a service publishes
//! to a quorum queue replicated on all three.
//!
//! Each member is a [`PrivateNode`] (its own AMQP/distribution ports, folder owned by
//! `rabbitmq`, `rabbitmq.conf` with `listeners.tcp.local`, a missing
//! `advanced.config`, watchdog), so a dropped or panicking test leaves nothing
//! running. The three boot at once; the second and third then join the first
//! (`stop_app`, `join_cluster`, `start_app`). Nodes started as root drop to the
//! `rabbitmq` user and share its Erlang cookie, so no cookie setup is needed.
//!
//! Start-up costs ~35 s on 2 cores: share one cluster across the scenarios of a test.

use std::collections::{BTreeSet, HashSet};
use std::time::Duration;

use futures::StreamExt;
use futures::future::join_all;
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ConnectionProperties, ExchangeKind};
use tokio::time::{Instant, sleep, timeout};

use super::{PrivateNode, unique};

/// Members of the cluster.
pub const NODES: usize = 3;
/// How long the cluster may take to show every member running after a join or a restart.
const WHOLE_TIMEOUT: Duration = Duration::from_secs(60);
/// One AMQP connect or declare to a live node; longer means it is stuck.
const BROKER_ANSWER: Duration = Duration::from_secs(10);
/// A queue's depth must hold still this long before it is read, so late arrivals show.
const SETTLE: Duration = Duration::from_secs(1);
/// Longest a queue may keep changing before it is read anyway.
const SETTLE_GUARD: Duration = Duration::from_secs(60);

/// Three clustered private nodes; all shut down on drop (SIGKILL as the fallback).
pub struct Cluster {
    nodes: Vec<PrivateNode>,
}

impl Cluster {
    /// Boots three nodes at once, clusters them, and checks `cluster_status` shows all
    /// three running. Prints how long it took.
    pub async fn start() -> Cluster {
        let started = Instant::now();
        // Concurrently: a node that fails to boot panics here, and the others, whose
        // futures are dropped with it, are shut down by their own drop.
        let nodes = join_all((0..NODES).map(|_| PrivateNode::start())).await;
        let booted = started.elapsed();
        let cluster = Cluster { nodes };
        let first = cluster.nodes[0].name().to_owned();
        let joining = &cluster.nodes[1..];
        join_all(joining.iter().map(PrivateNode::stop_app)).await;
        // One at a time: two nodes joining at the same moment may race in the schema.
        for node in joining {
            node.rabbitmqctl(&["join_cluster", &first]).await;
        }
        join_all(joining.iter().map(PrivateNode::start_app)).await;
        cluster.wait_whole().await;
        eprintln!(
            "cluster of {NODES} up in {:.1?} (boot {booted:.1?}, join {:.1?}): ports {:?}",
            started.elapsed(),
            started.elapsed() - booted,
            cluster.ports()
        );
        cluster
    }

    /// Member `i`.
    pub fn node(&self, i: usize) -> &PrivateNode {
        &self.nodes[i]
    }

    /// Each member's AMQP port, by index.
    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(PrivateNode::amqp_port).collect()
    }

    /// The member listening on AMQP port `port`, if any.
    pub fn index_of_port(&self, port: u16) -> Option<usize> {
        self.nodes.iter().position(|n| n.amqp_port() == port)
    }

    /// The member named by `host:port` (e.g. `127.0.0.1:10123`), if any.
    pub fn index_of_node(&self, node: &str) -> Option<usize> {
        let port = node.rsplit_once(':')?.1.parse().ok()?;
        self.index_of_port(port)
    }

    /// `127.0.0.1:PORT` of member `i`: how the service names the node it is connected to.
    pub fn node_addr(&self, i: usize) -> String {
        format!("127.0.0.1:{}", self.nodes[i].amqp_port())
    }

    /// guest/guest on the default vhost of member `i` (guest may log in over loopback).
    pub fn amqp_url(&self, i: usize) -> String {
        self.nodes[i].amqp_url()
    }

    /// The three AMQP URLs, by index.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(PrivateNode::amqp_url).collect()
    }

    /// The three URLs comma-separated, as `INGEST_AMQP_URL` takes them.
    pub fn url_list(&self) -> String {
        self.urls().join(",")
    }

    /// Whether member `i`'s VM is alive.
    pub fn is_running(&self, i: usize) -> bool {
        self.nodes[i].is_running()
    }

    /// Kills member `i`'s VM with SIGKILL (by its pid file) and waits until it is gone.
    pub fn kill9(&self, i: usize) {
        self.nodes[i].kill9();
    }

    /// Shuts member `i` down in order (`rabbitmqctl shutdown`).
    pub async fn stop_node(&self, i: usize) {
        self.nodes[i].shutdown().await;
    }

    /// Boots member `i` again after [`Cluster::kill9`] or [`Cluster::stop_node`] (same
    /// name, ports and data, so it rejoins), and waits until the cluster is whole.
    pub async fn start_node(&self, i: usize) {
        self.nodes[i].restart().await;
        self.wait_whole().await;
    }

    /// The running nodes `cluster_status` reports, asked of the first live member.
    pub async fn running_nodes(&self) -> BTreeSet<String> {
        let Some(node) = self.nodes.iter().find(|n| n.is_running()) else {
            return BTreeSet::new();
        };
        let json = node
            .rabbitmqctl(&["cluster_status", "--formatter", "json"])
            .await;
        let status: serde_json::Value = serde_json::from_str(&json)
            .unwrap_or_else(|e| panic!("cluster_status is not JSON ({e}): {json}"));
        status["running_nodes"]
            .as_array()
            .unwrap_or_else(|| panic!("cluster_status has no running_nodes: {json}"))
            .iter()
            .filter_map(|n| n.as_str().map(str::to_owned))
            .collect()
    }

    /// Waits until `cluster_status` lists all three members running; panics naming what
    /// it saw after [`WHOLE_TIMEOUT`].
    pub async fn wait_whole(&self) {
        let all: BTreeSet<String> = self.nodes.iter().map(|n| n.name().to_owned()).collect();
        let deadline = Instant::now() + WHOLE_TIMEOUT;
        loop {
            let running = self.running_nodes().await;
            if running == all {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "cluster not whole after {WHOLE_TIMEOUT:?}: running {running:?}, members {all:?}"
            );
            sleep(Duration::from_millis(250)).await;
        }
    }

    /// A connection to the first live member that accepts one, with its index.
    pub async fn connect_any(&self) -> (usize, Connection) {
        let mut failures = Vec::new();
        for (i, node) in self.nodes.iter().enumerate() {
            if !node.is_running() {
                continue;
            }
            let url = node.amqp_url();
            let connect = Connection::connect(&url, ConnectionProperties::default());
            match timeout(BROKER_ANSWER, connect).await {
                Ok(Ok(connection)) => return (i, connection),
                Ok(Err(e)) => failures.push(format!("{url}: {e}")),
                Err(_) => failures.push(format!("{url}: timed out")),
            }
        }
        panic!("no cluster member accepts a connection: {failures:?}");
    }

    /// Declares `exchange` (a durable topic exchange, as the service declares it) and a
    /// fresh durable quorum queue (`x-queue-type=quorum`, replicated on every member)
    /// bound to it with `binding`; returns the queue's name.
    pub async fn declare_quorum_queue(&self, exchange: &str, binding: &str) -> String {
        let (i, connection) = self.connect_any().await;
        self.declare_quorum_queue_over(connection, i, exchange, binding)
            .await
    }

    /// [`Cluster::declare_quorum_queue`] through member `i`, where the queue's leader
    /// then starts (RabbitMQ places it on the declaring connection's node).
    pub async fn declare_quorum_queue_on(&self, i: usize, exchange: &str, binding: &str) -> String {
        let url = self.amqp_url(i);
        let connection = timeout(
            BROKER_ANSWER,
            Connection::connect(&url, ConnectionProperties::default()),
        )
        .await
        .unwrap_or_else(|_| panic!("connecting to {url} timed out"))
        .unwrap_or_else(|e| panic!("connecting to {url}: {e}"));
        self.declare_quorum_queue_over(connection, i, exchange, binding)
            .await
    }

    async fn declare_quorum_queue_over(
        &self,
        connection: Connection,
        i: usize,
        exchange: &str,
        binding: &str,
    ) -> String {
        let queue = unique("ingest-test-qq");
        let declare = async {
            let channel = connection.create_channel().await?;
            channel
                .exchange_declare(
                    exchange.into(),
                    ExchangeKind::Topic,
                    ExchangeDeclareOptions {
                        durable: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await?;
            let mut args = FieldTable::default();
            args.insert(
                "x-queue-type".into(),
                AMQPValue::LongString("quorum".into()),
            );
            channel
                .queue_declare(
                    queue.as_str().into(),
                    QueueDeclareOptions {
                        durable: true,
                        ..Default::default()
                    },
                    args,
                )
                .await?;
            channel
                .queue_bind(
                    queue.as_str().into(),
                    exchange.into(),
                    binding.into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            Ok::<_, lapin::Error>(())
        };
        timeout(BROKER_ANSWER * 3, declare)
            .await
            .unwrap_or_else(|_| panic!("declaring quorum queue {queue} on member {i} timed out"))
            .unwrap_or_else(|e| panic!("declaring quorum queue {queue} on member {i}: {e}"));
        let _ = timeout(BROKER_ANSWER, connection.close(200, "OK".into())).await;
        queue
    }

    /// `leader` and `online` members of quorum queue `queue`, as `list_queues` on the
    /// first live member shows them (one line, for the test's log).
    pub async fn quorum_status(&self, queue: &str) -> String {
        let Some(node) = self.nodes.iter().find(|n| n.is_running()) else {
            return "(no member running)".to_owned();
        };
        let out = node
            .rabbitmqctl(&[
                "list_queues",
                "name",
                "leader",
                "online",
                "--quiet",
                "--no-table-headers",
            ])
            .await;
        out.lines()
            .find(|l| l.split_whitespace().next() == Some(queue))
            .map(|l| l.split_whitespace().skip(1).collect::<Vec<_>>().join(" "))
            .unwrap_or_else(|| format!("(queue {queue} not listed)"))
    }

    /// The member leading quorum queue `queue` (`list_queues name leader`), if any is
    /// known.
    pub async fn quorum_leader(&self, queue: &str) -> Option<usize> {
        let node = self.nodes.iter().find(|n| n.is_running())?;
        let out = node
            .rabbitmqctl(&[
                "list_queues",
                "name",
                "leader",
                "--quiet",
                "--no-table-headers",
            ])
            .await;
        let leader = out
            .lines()
            .filter_map(|l| l.split_once(char::is_whitespace))
            .find(|(name, _)| *name == queue)?
            .1
            .trim();
        self.nodes.iter().position(|n| n.name() == leader)
    }

    /// Drains `queue` through whichever member is alive and returns every message's
    /// `message_id` in queue order, once its depth has held still for [`SETTLE`].
    /// Panics if a message has no id (the service always sets one).
    pub async fn message_ids(&self, queue: &str) -> Vec<String> {
        let (i, connection) = self.connect_any().await;
        let channel = timeout(BROKER_ANSWER, connection.create_channel())
            .await
            .expect("create channel timed out")
            .expect("create channel");
        let count = || async {
            let declare = channel.queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            );
            timeout(BROKER_ANSWER, declare)
                .await
                .unwrap_or_else(|_| panic!("passive declare of {queue} on member {i} timed out"))
                .unwrap_or_else(|e| panic!("passive declare of {queue} on member {i}: {e}"))
                .message_count() as usize
        };
        let deadline = Instant::now() + SETTLE_GUARD;
        let mut last = count().await;
        let mut since = Instant::now();
        while since.elapsed() < SETTLE {
            assert!(
                Instant::now() < deadline,
                "queue {queue} kept changing for {SETTLE_GUARD:?} (now {last})"
            );
            sleep(Duration::from_millis(100)).await;
            let now = count().await;
            if now != last {
                (last, since) = (now, Instant::now());
            }
        }
        let tag = unique("ids");
        let mut consumer = channel
            .basic_consume(
                queue.into(),
                tag.as_str().into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("consume quorum queue");
        let mut ids = Vec::with_capacity(last);
        while ids.len() < last {
            let delivery = timeout(Duration::from_secs(30), consumer.next())
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "queue {queue} stopped delivering after {} of {last}",
                        ids.len()
                    )
                })
                .expect("consumer ended")
                .expect("delivery");
            let id = delivery
                .properties
                .message_id()
                .as_ref()
                .expect("message has no message_id property");
            ids.push(id.to_string());
        }
        let _ = channel
            .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
            .await;
        let _ = timeout(BROKER_ANSWER, connection.close(200, "OK".into())).await;
        ids
    }

    /// Which member process `pid` is connected to: the first of its established TCP
    /// connections whose remote port is a member's AMQP port.
    pub fn connected_node(&self, pid: u32) -> Option<usize> {
        self.connected_nodes(pid).into_iter().next()
    }

    /// Every member process `pid` holds an established TCP connection to (by remote
    /// port), once each, in the order `/proc` lists them.
    pub fn connected_nodes(&self, pid: u32) -> Vec<usize> {
        let mut found = Vec::new();
        for port in established_remote_ports(pid) {
            if let Some(i) = self.index_of_port(port)
                && !found.contains(&i)
            {
                found.push(i);
            }
        }
        found
    }
}

impl Drop for Cluster {
    /// Shuts the members down in parallel (each drop is a blocking `rabbitmqctl
    /// shutdown`, with SIGKILL as the fallback).
    fn drop(&mut self) {
        let nodes = std::mem::take(&mut self.nodes);
        std::thread::scope(|scope| {
            for node in nodes {
                scope.spawn(move || drop(node));
            }
        });
    }
}

/// Remote ports of process `pid`'s established TCP connections: its socket inodes
/// (`/proc/<pid>/fd`) looked up in its network namespace's tables
/// (`/proc/<pid>/net/tcp{,6}`). Empty if the process is gone.
fn established_remote_ports(pid: u32) -> Vec<u16> {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    let inodes: HashSet<String> = fds
        .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .filter_map(|target| {
            let target = target.to_str()?;
            Some(
                target
                    .strip_prefix("socket:[")?
                    .strip_suffix(']')?
                    .to_owned(),
            )
        })
        .collect();
    let mut ports = Vec::new();
    for table in ["tcp", "tcp6"] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")) else {
            continue;
        };
        // sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid
        // timeout inode ...; addresses are HEXIP:HEXPORT, state 01 is ESTABLISHED.
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(remote), Some(&"01"), Some(inode)) =
                (fields.get(2), fields.get(3), fields.get(9))
            else {
                continue;
            };
            if !inodes.contains(*inode) {
                continue;
            }
            if let Some(port) = remote
                .rsplit_once(':')
                .and_then(|(_, hex)| u16::from_str_radix(hex, 16).ok())
            {
                ports.push(port);
            }
        }
    }
    ports
}
