//! Starts the real service in-process on an ephemeral port, as `main` does.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use ingest::{
    RunError,
    admission::{Admission, Usage},
    config::Config,
    proto::{Event, PublishRequest, ingest_client::IngestClient},
    publisher::BrokerState,
};
use tokio::{
    sync::{oneshot, watch},
    task::JoinHandle,
};
use tonic::transport::Channel;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// Defaults for a test: ephemeral port, the given broker and exchange.
pub fn test_config(amqp_url: &str, exchange: &str) -> Config {
    Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        amqp_url: amqp_url.to_owned(),
        exchange: exchange.to_owned(),
        ..Config::default()
    }
}

/// A running service and what a test needs to observe it.
pub struct TestServer {
    pub addr: SocketAddr,
    /// The admin HTTP listener (`/metrics`, `/healthz`, `/readyz`).
    pub admin_addr: SocketAddr,
    pub admission: Arc<Admission>,
    /// The service's view of the broker connection.
    pub broker: watch::Receiver<BrokerState>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), RunError>>>,
}

/// With `RUST_LOG` set, the in-process services log to the test's output (shown for
/// a failing test, or for all with `--nocapture`); without it they are silent.
fn init_log() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("RUST_LOG").is_some() {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
                .with_test_writer()
                .try_init();
        }
    });
}

/// Starts the service with `config` on 127.0.0.1:0.
pub async fn spawn_server(config: Config) -> TestServer {
    init_log();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin_addr = admin.local_addr().unwrap();
    let app = ingest::App::new(config).unwrap();
    let admission = app.admission();
    let broker = app.broker_state();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(app.serve(listener, admin, async {
        let _ = stopped.await;
    }));
    TestServer {
        addr,
        admin_addr,
        admission,
        broker,
        stop: Some(stop),
        task: Some(task),
    }
}

/// Starts the service and waits until it is connected to the broker. The service
/// reports `NOT_SERVING` (overall and for `ingest.v1.Ingest`) before it accepts its
/// first connection, so SERVING here means the broker connection is up.
pub async fn spawn_ready_server(config: Config) -> TestServer {
    let server = spawn_server(config).await;
    server
        .wait_health(ServingStatus::Serving, Duration::from_secs(30))
        .await;
    server
}

/// Publishes one event with `id` until the service answers OK (it may still be
/// recovering from a fault), within `timeout`; returns the ids it answered with.
pub async fn publish_until_ok(
    client: &mut IngestClient<Channel>,
    id: &str,
    timeout: Duration,
) -> Vec<String> {
    tokio::time::timeout(timeout, async {
        loop {
            match client
                .publish(request(vec![json_event("t", id, "{}")]))
                .await
            {
                Ok(ok) => return ok.into_inner().ids,
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no OK for {id} within {timeout:?}"))
}

impl TestServer {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `ingest_events_republished_total`: events it published again after a lost
    /// connection, the only ones that may be in the broker twice.
    pub async fn republished(&self) -> usize {
        let metrics = http_get(self.admin_addr, "/metrics").await.1;
        sample(&metrics, "ingest_events_republished_total", &[]) as usize
    }

    pub async fn client(&self) -> IngestClient<Channel> {
        IngestClient::connect(self.url()).await.unwrap()
    }

    /// The health of `service` (`""`: overall); panics if the service does not
    /// answer within 10 s.
    pub async fn health(&self, service: &str) -> ServingStatus {
        const ANSWER: Duration = Duration::from_secs(10);
        let check = async {
            let channel = Channel::from_shared(self.url())
                .unwrap()
                .connect()
                .await
                .unwrap();
            let mut health = HealthClient::new(channel);
            let response = health
                .check(HealthCheckRequest {
                    service: service.to_owned(),
                })
                .await
                .unwrap();
            response.into_inner().status()
        };
        tokio::time::timeout(ANSWER, check)
            .await
            .unwrap_or_else(|_| panic!("health check of {service:?} unanswered after {ANSWER:?}"))
    }

    /// Waits until the overall health is `status`; panics after `timeout`.
    pub async fn wait_health(&self, status: ServingStatus, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let now = self.health("").await;
            if now == status {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "health stayed {now:?}, expected {status:?} within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Waits until nothing is admitted, neither in the buffer nor in the streams'
    /// share of it, and nothing is reserved for messages being received or read;
    /// panics with every usage after `timeout`.
    pub async fn wait_admission_idle(&self, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        let held = || {
            (
                self.admission.in_use(),
                self.admission.stream_in_use(),
                self.admission.receiving().0,
                self.admission.reading().0,
            )
        };
        while held() != (Usage::default(), Usage::default(), 0, 0) {
            let (buffer, streams, receiving, reading) = held();
            assert!(
                tokio::time::Instant::now() < deadline,
                "admission still holds {buffer:?} of the buffer, {streams:?} of the \
                 streams' share, {receiving} bytes reserved for messages being received \
                 and {reading} for reads after {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Triggers shutdown and returns how the service ended.
    pub async fn stop(mut self) -> Result<(), RunError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.take().unwrap().await.unwrap()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// An event with a JSON payload.
pub fn json_event(topic: &str, id: &str, body: &str) -> Event {
    Event {
        id: id.to_owned(),
        topic: topic.to_owned(),
        payload: body.as_bytes().to_vec().into(),
        content_type: "application/json".to_owned(),
        ..Event::default()
    }
}

pub fn request(events: Vec<Event>) -> PublishRequest {
    PublishRequest {
        events,
        sequence: 0,
    }
}

impl TestServer {
    /// Counts the times the service loses its broker connection from now on.
    pub fn count_disconnects(&self) -> Arc<std::sync::atomic::AtomicUsize> {
        let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut broker = self.broker.clone();
        let counter = Arc::clone(&count);
        tokio::spawn(async move {
            let mut was_connected = broker.borrow_and_update().connected;
            while broker.changed().await.is_ok() {
                let connected = broker.borrow_and_update().connected;
                if was_connected && !connected {
                    counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
                was_connected = connected;
            }
        });
        count
    }
}

/// Longest wait for the admin listener's answer to one local HTTP request.
const HTTP_ANSWER: Duration = Duration::from_secs(10);

/// GET `path` from `addr` over HTTP/1.0: (status code, body).
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let exchange = async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        response
    };
    // HTTP/1.0: the answer ends when the server closes the connection.
    let response = tokio::time::timeout(HTTP_ANSWER, exchange)
        .await
        .unwrap_or_else(|_| {
            panic!("GET {path} on {addr}: no complete answer within {HTTP_ANSWER:?}")
        });
    let status = response.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// The value of the series `name{labels...}` (labels given as `k="v"` substrings).
pub fn sample(metrics: &str, name: &str, labels: &[&str]) -> f64 {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| {
            let (series, _) = l.rsplit_once(' ').unwrap();
            (series == name || series.starts_with(&format!("{name}{{")))
                && labels.iter().all(|lab| series.contains(lab))
        })
        .map(|l| l.rsplit_once(' ').unwrap().1.parse().unwrap())
        .unwrap_or_else(|| panic!("no sample {name}{labels:?} in:\n{metrics}"))
}
