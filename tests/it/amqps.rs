//! `amqps://` to a private RabbitMQ node with a TLS listener whose certificate a CA
//! made in the test signed (one node for both cases, to save its start-up): with that
//! CA as `--amqp-ca` the service serves and its publishes land over TLS; with another
//! CA the real binary names the untrusted certificate once in its log (ERROR), in
//! `/readyz` and in the `UNAVAILABLE` a caller gets, and stays `NOT_SERVING`. A CA file
//! that is not PEM stops the start with one line naming `--amqp-ca`.

use std::{
    io::Read,
    process::Stdio,
    time::{Duration, Instant},
};

use ingest::RunError;
use tonic::{Code, transport::Channel};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::support::{
    ChildServer, NodeTls, PrivateNode, TestQueue, http_get, json_event,
    pki::{Ca, TempDir, s},
    request, spawn_server, test_config, unique,
};

/// Longest wait for a state the service reaches in well under a second here.
const GUARD: Duration = Duration::from_secs(30);

/// What a broker certificate that does not chain to `--amqp-ca` looks like, everywhere.
const UNTRUSTED: &str = "TLS: RabbitMQ's certificate is not trusted (invalid peer certificate: \
                         UnknownIssuer) — check --amqp-ca / INGEST_AMQP_URL host";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_with_the_brokers_ca_publishes_and_another_ca_is_named_not_trusted() {
    let started = Instant::now();
    let pki = TempDir::new();
    let ca = Ca::new("ingest-test broker CA");
    let server = ca.server(1);
    let node = PrivateNode::start_with_tls(&NodeTls {
        ca: ca.pem(),
        cert: server.cert,
        key: server.key,
    })
    .await;
    eprintln!("node with TLS listener up after {:.1?}", started.elapsed());
    let trusted = async {
        let at = Instant::now();
        with_the_brokers_ca_events_are_confirmed_over_tls(&node, &pki, &ca).await;
        eprintln!("trusted CA: passed in {:.1?}", at.elapsed());
    };
    let untrusted = async {
        let at = Instant::now();
        with_another_ca_the_untrusted_certificate_is_named(&node, &pki).await;
        eprintln!("untrusted CA: passed in {:.1?}", at.elapsed());
    };
    tokio::join!(trusted, untrusted);
    eprintln!("amqps test done after {:.1?}", started.elapsed());
}

/// (a) `--amqp-ca` is the CA that signed the broker's certificate: SERVING, a unary
/// batch is confirmed and lands in a queue on that node, and the node's own list of
/// connections shows the service's as TLS.
async fn with_the_brokers_ca_events_are_confirmed_over_tls(
    node: &PrivateNode,
    pki: &TempDir,
    ca: &Ca,
) {
    // Over the plain listener: only the service's connection uses TLS.
    let queue = TestQueue::new_at(&node.amqp_url(), "#").await;
    let mut config = test_config(&node.amqps_url(), &queue.exchange);
    config.amqp_ca = Some(pki.write("broker-ca.pem", ca.pem()));
    let server = spawn_server(config).await;
    // Ready; if not, the failure quotes why (e.g. the certificate is not trusted).
    let deadline = Instant::now() + GUARD;
    loop {
        let (code, body) = http_get(server.admin_addr, "/readyz").await;
        if code == 200 {
            // The node it is connected to: the TLS port.
            assert_eq!(
                body,
                format!(
                    "ready: connected to RabbitMQ node=localhost:{}\n",
                    node.amqps_port()
                )
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not ready within {GUARD:?}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.wait_health(ServingStatus::Serving, GUARD).await;

    let ids: Vec<String> = (0..3).map(|i| format!("tls-{i}")).collect();
    let events = ids
        .iter()
        .map(|id| json_event("orders.created", id, r#"{"over":"tls"}"#))
        .collect();
    let answer = server
        .client()
        .await
        .publish(request(events))
        .await
        .expect("publish over amqps://");
    assert_eq!(answer.into_inner().ids, ids);
    assert_eq!(queue.wait_for_count(3, GUARD).await, 3);
    assert_eq!(queue.message_ids().await, ids);

    // `name` is `client -> server`: the service's connection is the one to the TLS
    // port, and the node says it is TLS.
    let connections = node
        .rabbitmqctl(&[
            "list_connections",
            "--silent",
            "name",
            "ssl",
            "ssl_protocol",
        ])
        .await;
    let to_tls_port = format!("-> 127.0.0.1:{}", node.amqps_port());
    let over_tls: Vec<&str> = connections
        .lines()
        .filter(|line| line.contains(&to_tls_port))
        .collect();
    assert_eq!(over_tls.len(), 1, "{connections}");
    assert!(over_tls[0].contains("true"), "not TLS: {connections}");
    eprintln!(
        "the node lists the service's connection as: {}",
        over_tls[0]
    );

    server.stop().await.expect("clean stop");
    queue.cleanup().await;
}

/// (b) `--amqp-ca` is a CA that did not sign the broker's certificate: the real binary
/// stays NOT_SERVING, and `/readyz`, a unary caller and the log (once, at ERROR) all
/// name the untrusted certificate.
async fn with_another_ca_the_untrusted_certificate_is_named(node: &PrivateNode, pki: &TempDir) {
    let started = Instant::now();
    let other = Ca::new("some other CA");
    let ca_file = pki.write("other-ca.pem", other.pem());
    let admin = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap();
    let mut child = ChildServer::start_with_stderr(
        &node.amqps_url(),
        &unique("ingest-test-amqps"),
        &[
            ("INGEST_AMQP_CA", &s(&ca_file)),
            ("INGEST_ADMIN_LISTEN", &admin.to_string()),
            // The default filter: lapin's own lines stay out.
            ("RUST_LOG", "info,lapin=off"),
        ],
        Stdio::piped(),
    );
    let mut stderr = child.child.stderr.take().unwrap();
    let log = std::thread::spawn(move || {
        let mut log = String::new();
        let _ = stderr.read_to_string(&mut log);
        log
    });

    // Listening (admin first, then gRPC) and not serving: no broker connection.
    let deadline = Instant::now() + GUARD;
    let status = loop {
        if let Some(status) = health(&child.addr, "").await {
            break status;
        }
        assert!(Instant::now() < deadline, "ingest did not start listening");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status, ServingStatus::NotServing);

    let (code, body) = loop {
        let (code, body) = http_get(admin, "/readyz").await;
        if body.contains("TLS") || Instant::now() >= deadline {
            break (code, body);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(code, 503, "{body}");
    assert_eq!(body, format!("not connected to RabbitMQ: {UNTRUSTED}\n"));

    let refused = child
        .client()
        .await
        .publish(request(vec![json_event("orders.created", "tls-x", "{}")]))
        .await
        .expect_err("an untrusted broker: the call must be refused");
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert_eq!(
        refused.message(),
        format!("not connected to RabbitMQ: {UNTRUSTED}")
    );
    for service in ["", "ingest.v1.Ingest"] {
        assert_eq!(
            health(&child.addr, service).await,
            Some(ServingStatus::NotServing),
            "{service:?}"
        );
    }

    // Several attempts (backoff from 100 ms, doubling) before looking at the log.
    tokio::time::sleep(Duration::from_secs(3).saturating_sub(started.elapsed())).await;
    child.sigterm();
    let exit = child.wait_exit().await;
    let log = log.join().unwrap();
    assert!(exit.success(), "{exit:?}\n{log}");
    let mentions: Vec<&str> = log.lines().filter(|l| l.contains(UNTRUSTED)).collect();
    assert_eq!(mentions.len(), 1, "the reason once, not per retry:\n{log}");
    assert!(mentions[0].contains("ERROR"), "{}", mentions[0]);
    eprintln!("the log names it once: {}", mentions[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_amqp_ca_that_is_not_a_pem_certificate_stops_the_start_naming_the_setting() {
    let pki = TempDir::new();
    let key_only = Ca::new("unused").server(1).key;
    for (name, contents) in [
        ("key.pem", key_only.as_bytes()),
        ("notes.txt", b"not a certificate\n".as_slice()),
    ] {
        let file = pki.write(name, contents);
        let mut config = test_config("amqps://guest:guest@localhost:5671/%2f", "unused");
        config.amqp_ca = Some(file.clone());
        let error = match ingest::App::new(config) {
            Err(RunError::Start(error)) => error,
            Err(other) => panic!("not a start error: {other}"),
            Ok(_) => panic!("{name}: started with a CA file that holds no certificate"),
        };
        assert_eq!(
            error,
            format!(
                "--amqp-ca / INGEST_AMQP_CA: {} holds no PEM certificate (no -----BEGIN \
                 CERTIFICATE----- block)",
                file.display()
            )
        );
    }
}

/// The health of `service` (`""`: overall) from the server at `addr`; `None` while it
/// does not answer.
async fn health(addr: &str, service: &str) -> Option<ServingStatus> {
    let check = async {
        let channel = Channel::from_shared(format!("http://{addr}"))
            .ok()?
            .connect()
            .await
            .ok()?;
        let answer = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: service.to_owned(),
            })
            .await
            .ok()?;
        Some(answer.into_inner().status())
    };
    tokio::time::timeout(Duration::from_secs(5), check)
        .await
        .ok()
        .flatten()
}
