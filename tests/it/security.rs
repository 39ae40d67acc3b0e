//! TLS, mutual TLS, certificate rotation, tenants (tokens, JWTs, client
//! certificates), topic permissions and per-tenant quotas, on the real service and
//! broker, with a CA, certificates and keys made in the test.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use ingest::{
    config::Config,
    proto::{PublishRequest, ingest_client::IngestClient},
    tls::TlsFiles,
};
use lapin::types::AMQPValue;
use tonic::{Code, transport::Channel};
use tonic_types::StatusExt;

use crate::support::{
    AMQP_URL, ChildServer, TestQueue, json_event,
    pki::{self, Ca, JwtKey, TempDir, bearer, tls_client, token_sha256},
    request, spawn_server, test_config,
};

const GUARD: Duration = Duration::from_secs(30);

fn tls_config(queue: &TestQueue, dir: &TempDir, ca: &Ca, client_ca: Option<&Ca>) -> Config {
    let (cert, key) = pki::write_server(dir, &ca.server(1));
    let client_ca = client_ca.map(|c| dir.write("client-ca.pem", c.pem()));
    Config {
        tls: Some(TlsFiles {
            cert,
            key,
            client_ca,
        }),
        ..test_config(AMQP_URL, &queue.exchange)
    }
}

/// Publishes one event on `client` until OK (the broker connection may still be coming
/// up); the server answered nothing but OK or UNAVAILABLE meanwhile.
async fn until_ok(
    client: &mut IngestClient<Channel>,
    req: impl Fn() -> tonic::Request<PublishRequest>,
) {
    let deadline = Instant::now() + GUARD;
    loop {
        match client.publish(req()).await {
            Ok(_) => return,
            Err(s) if s.code() == Code::Unavailable && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(s) => panic!("publish failed: {s:?}"),
        }
    }
}

fn one(topic: &str, id: &str) -> PublishRequest {
    request(vec![json_event(topic, id, "{}")])
}

/// The `x-ingest-tenant` header of a consumed message.
fn tenant_of(message: &lapin::message::BasicGetMessage) -> Option<String> {
    let headers = message.properties.headers().as_ref()?;
    match headers.inner().get("x-ingest-tenant")? {
        AMQPValue::LongString(s) => Some(s.to_string()),
        other => panic!("x-ingest-tenant is {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_listener_serves_grpc_over_tls_and_refuses_plaintext() {
    let queue = TestQueue::new("#").await;
    let dir = TempDir::new();
    let ca = Ca::new("test CA");
    let server = spawn_server(tls_config(&queue, &dir, &ca, None)).await;

    let mut client = tls_client(server.addr, &ca.pem(), None)
        .await
        .expect("TLS connect");
    until_ok(&mut client, || tonic::Request::new(one("t.tls", "tls-1"))).await;

    // A plaintext client cannot even start HTTP/2 on a TLS port.
    let plaintext = async {
        let mut c = IngestClient::connect(server.url()).await?;
        c.publish(one("t.tls", "plain-1")).await.map_err(Into::into)
    };
    let refused: Result<_, Box<dyn std::error::Error>> = tokio::time::timeout(GUARD, plaintext)
        .await
        .expect("plaintext attempt hung");
    assert!(
        refused.is_err(),
        "a plaintext call got through: {refused:?}"
    );

    // Another CA's server certificate is refused by a client that trusts only its own.
    let stranger = Ca::new("stranger CA");
    assert!(
        tls_client(server.addr, &stranger.pem(), None)
            .await
            .is_err()
    );

    let ids = queue.settled_message_ids(Duration::from_millis(300)).await;
    assert_eq!(ids, ["tls-1"], "only the TLS call published");
    drop(server);
    queue.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_refuses_clients_without_a_good_certificate_and_names_the_tenant() {
    let queue = TestQueue::new("#").await;
    let dir = TempDir::new();
    let ca = Ca::new("test CA");
    let clients = Ca::new("client CA");
    let auth = dir.write(
        "tenants.toml",
        r#"
        [[tenant]]
        name = "ml-logger"
        client_cert_names = ["logger.ml.svc"]
        topics = ["ml.#"]
        "#,
    );
    let config = Config {
        auth_file: Some(auth),
        ..tls_config(&queue, &dir, &ca, Some(&clients))
    };
    let server = spawn_server(config).await;

    let good = clients.client(&["logger.ml.svc"]);
    let mut client = tls_client(server.addr, &ca.pem(), Some(&good))
        .await
        .expect("mTLS connect");
    until_ok(&mut client, || {
        tonic::Request::new(one("ml.predictions", "m-1"))
    })
    .await;

    // No certificate, or one from another CA: the handshake fails, nothing is served.
    for (what, identity) in [
        ("no client certificate", None),
        (
            "a certificate of another CA",
            Some(Ca::new("other CA").client(&["logger.ml.svc"])),
        ),
    ] {
        let attempt = async {
            let mut c = tls_client(server.addr, &ca.pem(), identity.as_ref()).await?;
            c.publish(one("ml.predictions", "m-refused"))
                .await
                .map_err(Into::into)
        };
        let result: Result<_, Box<dyn std::error::Error>> =
            tokio::time::timeout(GUARD, attempt).await.expect("hung");
        assert!(result.is_err(), "{what}: a call got through");
    }

    // A good certificate whose names are no tenant's: UNAUTHENTICATED.
    let nobody = clients.client(&["nobody.svc"]);
    let mut c = tls_client(server.addr, &ca.pem(), Some(&nobody))
        .await
        .expect("connect");
    let status = c.publish(one("ml.x", "m-nobody")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(status.message().contains("nobody.svc"), "{status:?}");

    let landed = queue.take_all().await;
    assert_eq!(landed.len(), 1);
    assert_eq!(tenant_of(&landed[0]).as_deref(), Some("ml-logger"));
    drop(server);
    queue.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_under_load_without_a_failed_call() {
    let queue = TestQueue::new("#").await;
    let dir = TempDir::new();
    let ca = Ca::new("test CA");
    let server = spawn_server(tls_config(&queue, &dir, &ca, None)).await;
    let addr = server.addr;
    let ca_pem = ca.pem();
    let mut first = tls_client(addr, &ca_pem, None).await.unwrap();
    until_ok(&mut first, || tonic::Request::new(one("t.rot", "warm"))).await;
    assert_eq!(pki::server_serial(addr, &ca_pem).await, [1]);

    // A caller publishing in a loop, a new connection (and handshake) every call.
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let caller = {
        let (stop, ok, ca_pem) = (Arc::clone(&stop), Arc::clone(&ok), ca_pem.clone());
        tokio::spawn(async move {
            let mut failures = Vec::new();
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let call = async {
                    let mut c = tls_client(addr, &ca_pem, None).await?;
                    c.publish(one("t.rot", &format!("rot-{i}"))).await?;
                    Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
                };
                match call.await {
                    Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        failures.push(format!("call {i}: {e}"));
                        0
                    }
                };
            }
            failures
        })
    };

    tokio::time::sleep(Duration::from_millis(500)).await;
    // A half-written rotation first (the new key with the old certificate): refused,
    // the old pair keeps serving.
    dir.write("server.key", ca.server(99).key);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        pki::server_serial(addr, &ca_pem).await,
        [1],
        "a bad pair was loaded"
    );
    // Then the real rotation.
    pki::write_server(&dir, &ca.server(2));
    let rotated = Instant::now();
    let deadline = rotated + Duration::from_secs(10);
    while pki::server_serial(addr, &ca_pem).await != [2] {
        assert!(
            Instant::now() < deadline,
            "new connections still see the old certificate"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let seen_after = rotated.elapsed();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.store(true, Ordering::Relaxed);
    let failures = caller.await.unwrap();
    let calls = ok.load(Ordering::Relaxed);
    println!(
        "rotation: new certificate seen {seen_after:?} after the files changed; {calls} calls OK, {} failed",
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "calls failed during the rotation: {failures:?}"
    );
    assert!(
        calls > 20,
        "only {calls} calls: the loop did not run through the rotation"
    );
    // The connection opened before the rotation still works.
    first
        .publish(one("t.rot", "after"))
        .await
        .expect("old connection");
    drop(server);
    queue.cleanup().await;
}

/// A tenants file with two tenants: `orders` (a token) and `ml` (JWT subject).
fn tenants_file(dir: &TempDir, jwt: &JwtKey, orders_tokens: &[&str]) -> std::path::PathBuf {
    dir.write("jwks.json", jwt.jwks());
    let tokens: Vec<String> = orders_tokens
        .iter()
        .map(|t| format!("\"{}\"", token_sha256(t)))
        .collect();
    dir.write(
        "tenants.toml",
        format!(
            r#"
            [jwt]
            jwks_file = "jwks.json"
            issuer = "{}"
            audience = "{}"

            [[tenant]]
            name = "orders"
            tokens_sha256 = [{}]
            topics = ["orders.#"]

            [[tenant]]
            name = "ml"
            jwt_subjects = ["system:serviceaccount:ml:logger"]
            topics = ["ml.#", "predictions.*"]
            "#,
            pki::ISSUER,
            pki::AUDIENCE,
            tokens.join(", ")
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_are_authenticated_confined_to_their_topics_and_stamped() {
    let queue = TestQueue::new("#").await;
    let dir = TempDir::new();
    let jwt = JwtKey::new("k1");
    let config = Config {
        auth_file: Some(tenants_file(&dir, &jwt, &["orders-secret"])),
        ..test_config(AMQP_URL, &queue.exchange)
    };
    let server = spawn_server(config).await;
    let mut client: IngestClient<Channel> = server.client().await;
    until_ok(&mut client, || {
        bearer(
            tonic::Request::new(one("orders.warm", "o-0")),
            "orders-secret",
        )
    })
    .await;

    // Health needs no credential.
    assert_eq!(
        server.health("").await,
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );

    let refused = |status: tonic::Status, what: &str, needle: &str| {
        assert_eq!(status.code(), Code::Unauthenticated, "{what}: {status:?}");
        assert!(status.message().contains(needle), "{what}: {status:?}");
    };
    let s = client.publish(one("orders.x", "bad-1")).await.unwrap_err();
    refused(s, "no token", "no credentials");
    let s = client
        .publish(bearer(
            tonic::Request::new(one("orders.x", "bad-2")),
            "guess",
        ))
        .await
        .unwrap_err();
    refused(s, "unknown token", "unknown bearer token");
    let other = JwtKey::new("k1"); // same kid, another key: a bad signature
    for (what, token, needle) in [
        (
            "expired JWT",
            jwt.token("system:serviceaccount:ml:logger", pki::ISSUER, -120),
            "Expired",
        ),
        (
            "wrong issuer",
            jwt.token("system:serviceaccount:ml:logger", "https://evil.test", 600),
            "Issuer",
        ),
        (
            "bad signature",
            other.token("system:serviceaccount:ml:logger", pki::ISSUER, 600),
            "Signature",
        ),
        (
            "unknown subject",
            jwt.token("system:serviceaccount:ml:other", pki::ISSUER, 600),
            "no tenant",
        ),
    ] {
        let s = client
            .publish(bearer(tonic::Request::new(one("ml.x", "bad-jwt")), &token))
            .await
            .unwrap_err();
        refused(s, what, needle);
    }

    // A topic outside the tenant's patterns: PERMISSION_DENIED naming the field;
    // nothing of the request is published.
    let denied = client
        .publish(bearer(
            tonic::Request::new(request(vec![
                json_event("orders.created", "d-0", "{}"),
                json_event("ml.sneaky", "d-1", "{}"),
            ])),
            "orders-secret",
        ))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    let info = denied.get_details_error_info().expect("ErrorInfo");
    assert_eq!(info.reason, "TOPIC_NOT_ALLOWED");
    assert_eq!(
        info.metadata.get("field").map(String::as_str),
        Some("events[1].topic")
    );

    // The good ones land, each stamped with its tenant.
    client
        .publish(bearer(
            tonic::Request::new(one("orders.created", "o-1")),
            "orders-secret",
        ))
        .await
        .expect("orders token");
    let ml_token = jwt.token("system:serviceaccount:ml:logger", pki::ISSUER, 600);
    client
        .publish(bearer(
            tonic::Request::new(one("predictions.churn", "p-1")),
            &ml_token,
        ))
        .await
        .expect("ml JWT");

    // The file is reloaded when it changes: a second token for `orders`...
    tenants_file(&dir, &jwt, &["orders-secret", "orders-rotated"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while client
        .publish(bearer(
            tonic::Request::new(one("orders.created", "o-2")),
            "orders-rotated",
        ))
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "the new token never worked");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // ...and a broken file keeps the tenants loaded before.
    dir.write("tenants.toml", "[[tenant]]\nname = ");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    client
        .publish(bearer(
            tonic::Request::new(one("orders.created", "o-3")),
            "orders-rotated",
        ))
        .await
        .expect("a bad file replaced the good tenants");

    let landed = queue.take_all().await;
    let seen: Vec<(String, Option<String>)> = landed
        .iter()
        .map(|m| {
            let id = m
                .properties
                .message_id()
                .as_ref()
                .map(|s| s.to_string())
                .unwrap_or_default();
            (id, tenant_of(m))
        })
        .collect();
    let want = |id: &str, tenant: &str| (id.to_owned(), Some(tenant.to_owned()));
    assert_eq!(
        seen,
        [
            want("o-0", "orders"),
            want("o-1", "orders"),
            want("p-1", "ml"),
            want("o-2", "orders"),
            want("o-3", "orders"),
        ],
        "exactly the authorized events, stamped, and nothing of the refused ones"
    );
    drop(server);
    queue.cleanup().await;
}

/// Latencies of `calls` one-event unary calls by tenant `token`, one at a time with
/// `pause` between them; panics on any error.
async fn modest_caller(
    server: &ChildServer,
    token: &str,
    calls: usize,
    pause: Duration,
) -> Vec<Duration> {
    let mut client = server.client().await;
    let mut latencies = Vec::with_capacity(calls);
    for i in 0..calls {
        let began = Instant::now();
        client
            .publish(bearer(
                tonic::Request::new(one("b.events", &format!("b-{i}"))),
                token,
            ))
            .await
            .unwrap_or_else(|s| panic!("tenant B refused: {s:?}"));
        latencies.push(began.elapsed());
        tokio::time::sleep(pause).await;
    }
    latencies
}

fn p99(mut latencies: Vec<Duration>) -> Duration {
    latencies.sort();
    latencies[(latencies.len() * 99 / 100).min(latencies.len() - 1)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_flooding_far_over_its_quota_does_not_slow_another() {
    let queue = TestQueue::new("#").await;
    let dir = TempDir::new();
    let auth = dir.write(
        "tenants.toml",
        format!(
            r##"
            [[tenant]]
            name = "a"
            tokens_sha256 = ["{}"]
            topics = ["#"]
            max_events_in_flight = 20
            events_per_second = 200
            [[tenant]]
            name = "b"
            tokens_sha256 = ["{}"]
            topics = ["#"]
            "##,
            token_sha256("token-a"),
            token_sha256("token-b")
        ),
    );
    // The real binary: its CPU is its own, apart from the test's callers.
    let server = ChildServer::start(
        AMQP_URL,
        &queue.exchange,
        // A buffer A alone could fill three times over without its quota.
        &[
            ("INGEST_AUTH_FILE", &pki::s(&auth)),
            ("INGEST_BUFFER_EVENTS", "60"),
            ("RUST_LOG", "warn"),
        ],
    );
    let mut warm = server.ready_client().await;
    until_ok(&mut warm, || {
        bearer(tonic::Request::new(one("b.warm", "warm")), "token-b")
    })
    .await;

    const CALLS: usize = 300;
    let pause = Duration::from_millis(5);
    let alone = p99(modest_caller(&server, "token-b", CALLS, pause).await);

    // A floods: 4 callers, 20 events a call, each call 10 ms after the last answer and
    // ignoring every RetryInfo: about 8,000 events/s offered against a quota of 200 a
    // second and 20 in flight, twenty times over. (Unpaced, the debug-build callers
    // and the refusals alone take the machine's two cores: that measures CPU, not
    // admission.)
    let stop = Arc::new(AtomicBool::new(false));
    let (ok_a, quota_a, other_a) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(std::sync::Mutex::new(Vec::<String>::new())),
    );
    let mut flood = Vec::new();
    for caller in 0..4 {
        let mut client = server.client().await;
        let (stop, ok_a, quota_a, other_a) = (
            Arc::clone(&stop),
            Arc::clone(&ok_a),
            Arc::clone(&quota_a),
            Arc::clone(&other_a),
        );
        flood.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let events = (0..20)
                    .map(|k| json_event("a.flood", &format!("a-{caller}-{i}-{k}"), "{}"))
                    .collect();
                match client
                    .publish(bearer(tonic::Request::new(request(events)), "token-a"))
                    .await
                {
                    Ok(_) => {
                        ok_a.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(s) if s.code() == Code::ResourceExhausted => {
                        let quota = s.get_details_quota_failure().expect("QuotaFailure");
                        assert_eq!(quota.violations[0].subject, "tenant:a");
                        assert!(s.get_details_retry_info().is_some(), "RetryInfo");
                        quota_a.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(s) => other_a.lock().unwrap().push(format!("{s:?}")),
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let with_flood = p99(modest_caller(&server, "token-b", CALLS, pause).await);
    stop.store(true, Ordering::Relaxed);
    for f in flood {
        f.await.unwrap();
    }
    let (ok_a, quota_a) = (
        ok_a.load(Ordering::Relaxed),
        quota_a.load(Ordering::Relaxed),
    );
    println!(
        "tenant B p99 alone {alone:?}, with A flooding {with_flood:?}; A: {ok_a} calls OK, {quota_a} refused over quota"
    );
    assert!(
        quota_a > 100,
        "A was not refused over its quota ({quota_a})"
    );
    assert!(ok_a > 0, "A got nothing through its own quota");
    assert!(
        other_a.lock().unwrap().is_empty(),
        "{:?}",
        other_a.lock().unwrap()
    );
    assert!(
        with_flood <= alone * 2,
        "B's p99 went from {alone:?} alone to {with_flood:?} with A flooding"
    );
    drop(server);
    queue.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_files_and_the_process_keeps_serving() {
    let queue = TestQueue::new("#").await;
    let dir = TempDir::new();
    let auth = dir.write(
        "tenants.toml",
        format!(
            "[[tenant]]\nname = \"a\"\ntokens_sha256 = [\"{}\"]\ntopics = [\"#\"]\n",
            token_sha256("token-a")
        ),
    );
    let log = dir.path("stderr.log");
    let server = ChildServer::start_with_stderr(
        AMQP_URL,
        &queue.exchange,
        &[("INGEST_AUTH_FILE", &pki::s(&auth))],
        std::process::Stdio::from(std::fs::File::create(&log).unwrap()),
    );
    let mut client = server.ready_client().await;
    until_ok(&mut client, || {
        bearer(tonic::Request::new(one("t.hup", "h-1")), "token-a")
    })
    .await;

    // SIGHUP's default action ends a process: here it reloads instead.
    let sent = std::process::Command::new("kill")
        .args(["-HUP", &server.child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let deadline = Instant::now() + GUARD;
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("SIGHUP: reloading") && text.contains("what=\"tenants file\"") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no reload logged after SIGHUP:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    client
        .publish(bearer(tonic::Request::new(one("t.hup", "h-2")), "token-a"))
        .await
        .expect("still serving after SIGHUP");
    assert_eq!(
        queue.settled_message_ids(Duration::from_millis(300)).await,
        ["h-1", "h-2"]
    );
    drop(server);
    queue.cleanup().await;
}
