//! Transport abuse against the real binary (a child process), with a raw HTTP/2
//! client that sends what no gRPC library would: floods of requests declared at the
//! largest decodable size, more idle connections than the process has descriptors,
//! oversized metadata, and bytes that do not decode. The process's peak memory must
//! stay within the buffer plus the documented fixed overhead, and a well-behaved
//! caller on another connection must still get an answer at once.

use std::{
    future::poll_fn,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use h2::client::SendRequest;
use ingest::proto::{Event, PublishRequest};
use prost::Message;
use tokio::{net::TcpStream, task::JoinSet};
use tonic::Code;
use tonic_types::StatusExt;

use crate::support::{
    AMQP_ADDR, ChildServer, FaultProxy, Mode, TestQueue, json_event, request, unique,
};

const GUARD: Duration = Duration::from_secs(30);
const BUFFER_BYTES: u64 = 8 * 1024 * 1024;
/// The fixed part of the memory bound (README, "Memory bound"): runtime, allocator
/// slack, the AMQP connection and its channels.
const FIXED_OVERHEAD: u64 = 16 * 1024 * 1024;
/// Per connection and stream open on it (README): what a peer may send before the
/// server reads (the 64 KiB stream window, within the connection window) about twice
/// over, as h2 holds it in frames, and hyper's and h2's per-connection state.
const PER_STREAM: u64 = 2 * 64 * 1024;
const PER_CONNECTION: u64 = 64 * 1024;
/// The largest request message with an 8 MiB buffer: its receive share (2 MiB).
const MAX_MESSAGE: usize = 2 * 1024 * 1024;
/// A well-behaved call must be answered within this while the floods go on.
const PROMPT: Duration = Duration::from_millis(250);

/// One raw HTTP/2 connection to the server.
async fn connect(addr: &str) -> SendRequest<Bytes> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (client, connection) = h2::client::Builder::new()
        .initial_window_size(1 << 20)
        .handshake(tcp)
        .await
        .unwrap();
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

/// The bytes of a `PublishRequest` message of exactly `len` bytes holding one event
/// (topic `flood.t`) whose payload fills the rest, as a gRPC message: its 5-byte
/// prefix and the protobuf up to the payload. The payload itself is `len - head`
/// more bytes of anything.
fn flood_head(len: usize) -> (Bytes, usize) {
    let mut payload = len.saturating_sub(32);
    loop {
        let event = Event {
            topic: "flood.t".into(),
            payload: Bytes::from(vec![0; payload]),
            ..Event::default()
        };
        let request = PublishRequest {
            sequence: 0,
            events: vec![event],
        };
        match request.encoded_len() {
            n if n == len => {
                let mut bytes = vec![0];
                bytes.extend_from_slice(&(len as u32).to_be_bytes());
                bytes.extend_from_slice(&request.encode_to_vec()[..len - payload]);
                return (Bytes::from(bytes), payload);
            }
            n if n < len => payload += 1,
            _ => payload -= 1,
        }
    }
}

/// Sends `data` as flow control allows; false once the stream is gone.
async fn send(stream: &mut h2::SendStream<Bytes>, mut data: Bytes) -> bool {
    while !data.is_empty() {
        stream.reserve_capacity(data.len());
        match poll_fn(|cx| stream.poll_capacity(cx)).await {
            Some(Ok(0)) => continue,
            Some(Ok(n)) => {
                let chunk = data.split_to(n.min(data.len()));
                if stream.send_data(chunk, false).is_err() {
                    return false;
                }
            }
            _ => return false,
        }
    }
    true
}

/// Starts a call to `method` whose one message declares `MAX_MESSAGE` bytes, then
/// sends its bytes as fast as the server's flow control lets it. `sent` counts the
/// body bytes handed to the connection.
async fn flood_call(client: &SendRequest<Bytes>, method: &str, sent: Arc<AtomicU64>) {
    let (head, payload) = flood_head(MAX_MESSAGE);
    let request = http::Request::builder()
        .method("POST")
        .uri(format!("http://ingest/ingest.v1.Ingest/{method}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let Ok(mut client) = client.clone().ready().await else {
        return;
    };
    let Ok((response, mut stream)) = client.send_request(request, false) else {
        return;
    };
    tokio::spawn(async move {
        let _ = response.await;
    });
    sent.fetch_add(head.len() as u64, Ordering::Relaxed);
    if !send(&mut stream, head).await {
        return;
    }
    let zeros = Bytes::from(vec![0u8; 16 * 1024]);
    let mut left = payload;
    while left > 0 {
        let n = left.min(zeros.len());
        if !send(&mut stream, zeros.slice(..n)).await {
            return;
        }
        sent.fetch_add(n as u64, Ordering::Relaxed);
        left -= n;
    }
    // Keep the stream open (no end of stream): a stream would go on sending.
    std::future::pending::<()>().await;
}

/// The service under a flood, and the bound its memory must keep.
struct Flood {
    server: ChildServer,
    proxy: FaultProxy,
    queue: TestQueue,
}

impl Flood {
    async fn start() -> Flood {
        let queue = TestQueue::new("#").await;
        let proxy = FaultProxy::start(AMQP_ADDR.parse().unwrap()).await;
        let server = ChildServer::start(
            &proxy.amqp_url(),
            &queue.exchange,
            &[
                ("INGEST_BUFFER_BYTES", "8MiB"),
                ("INGEST_MAX_EVENT_BYTES", "2MiB"),
                ("INGEST_CONFIRM_TIMEOUT", "60s"),
                ("INGEST_STREAM_STALL_TIMEOUT", "60s"),
                ("RUST_LOG", "warn"),
            ],
        );
        server.ready_client().await;
        Flood {
            server,
            proxy,
            queue,
        }
    }

    /// Runs `calls` flood calls of `method` on each of `connections` connections for
    /// `duration`, checking on the way that a small unary call on its own connection
    /// is answered promptly; returns the peak RSS over idle and what was handed over.
    async fn run(
        &self,
        connections: usize,
        calls: usize,
        method: &'static str,
        duration: Duration,
        stalled: bool,
    ) -> (u64, u64) {
        let (idle, _) = self.server.memory();
        let sent = Arc::new(AtomicU64::new(0));
        let mut floods = JoinSet::new();
        for _ in 0..connections {
            let client = connect(&self.server.addr).await;
            for _ in 0..calls {
                let (client, sent) = (client.clone(), Arc::clone(&sent));
                floods.spawn(async move { flood_call(&client, method, sent).await });
            }
        }
        let mut polite = self.server.client().await;
        let deadline = tokio::time::Instant::now() + duration;
        while tokio::time::Instant::now() < deadline {
            let began = tokio::time::Instant::now();
            let event = json_event("polite.t", &unique("polite"), "{}");
            let mut call = tonic::Request::new(request(vec![event]));
            call.set_timeout(Duration::from_secs(1));
            let answer = tokio::time::timeout(GUARD, polite.publish(call))
                .await
                .expect("a well-behaved call must be answered during the flood");
            let took = began.elapsed();
            match answer {
                Ok(_) => assert!(!stalled, "confirmed by a stalled broker?"),
                // Admitted, and waiting for a confirm a stalled broker cannot give:
                // the call was served; its deadline ended the wait.
                Err(status) if stalled && status.code() == Code::DeadlineExceeded => {}
                Err(status) => {
                    assert_eq!(
                        status.code(),
                        Code::ResourceExhausted,
                        "a well-behaved call got {status:?}"
                    );
                    assert!(
                        status.get_details_retry_info().is_some(),
                        "a refusal must carry RetryInfo: {status:?}"
                    );
                    assert!(
                        took < PROMPT,
                        "a refusal took {took:?}, more than {PROMPT:?}"
                    );
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (_, peak) = self.server.memory();
        floods.abort_all();
        (peak.saturating_sub(idle), sent.load(Ordering::Relaxed))
    }

    fn bound(connections: usize, calls: usize) -> u64 {
        let per_connection = PER_CONNECTION + calls as u64 * PER_STREAM;
        BUFFER_BYTES + FIXED_OVERHEAD + (connections as u64 + 1) * per_connection
    }
}

/// Each flood of the issue, with the broker healthy and then stalled: peak RSS over
/// idle within buffer + fixed + per-connection overhead.
async fn flood(connections: usize, calls: usize, method: &'static str) {
    for stalled in [false, true] {
        let flood = Flood::start().await;
        if stalled {
            flood.proxy.set_mode(Mode::Stall);
        }
        let (grew, sent) = flood
            .run(connections, calls, method, Duration::from_secs(3), stalled)
            .await;
        let bound = Flood::bound(connections, calls);
        eprintln!(
            "{connections} connections x {calls} {method}, broker {}: handed over {} MiB, peak RSS +{} MiB (bound {} MiB)",
            if stalled { "stalled" } else { "healthy" },
            sent >> 20,
            grew >> 20,
            bound >> 20
        );
        assert!(
            grew <= bound,
            "peak RSS grew by {grew} B, over the bound of {bound} B (buffer {BUFFER_BYTES} + fixed {FIXED_OVERHEAD} + {connections} x ({PER_CONNECTION} + {calls} x {PER_STREAM}))"
        );
        flood.proxy.set_mode(Mode::Forward);
        drop(flood.server);
        flood.queue.cleanup().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unary_floods_of_largest_requests_stay_within_the_buffer() {
    flood(16, 16, "Publish").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_floods_of_largest_messages_stay_within_the_buffer() {
    flood(16, 16, "PublishStream").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_hundred_connections_of_streams_stay_within_the_buffer() {
    flood(400, 4, "PublishStream").await;
}

/// More idle connections than the process has file descriptors: accepting fails
/// with EMFILE, and the service neither ends nor stops serving once they close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_out_of_descriptors_is_survived_and_serving_resumes() {
    let queue = TestQueue::new("#").await;
    let mut server = ChildServer::start_wrapped(
        &["prlimit", "--nofile=64:64", "--"],
        crate::support::AMQP_URL,
        &queue.exchange,
        &[("INGEST_HANDSHAKE_TIMEOUT", "30s")],
        std::process::Stdio::inherit(),
    );
    let mut client = server.ready_client().await;
    // Far past the 64 descriptors; each is accepted until none are left.
    let mut idle = Vec::new();
    for _ in 0..200 {
        idle.push(TcpStream::connect(&server.addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        server.child.try_wait().unwrap().is_none(),
        "ingest ended when it ran out of file descriptors"
    );
    drop(idle);
    // Closed connections free their descriptors; the backlog drains; calls work.
    let deadline = tokio::time::Instant::now() + GUARD;
    loop {
        let event = json_event("fd.t", &unique("fd"), "{}");
        let mut call = tonic::Request::new(request(vec![event]));
        call.set_timeout(Duration::from_secs(2));
        match client.publish(call).await {
            Ok(_) => break,
            Err(status) => assert!(
                tokio::time::Instant::now() < deadline,
                "not serving again after the idle connections closed: {status:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A new connection too.
    let mut fresh = server.client().await;
    let event = json_event("fd.t", &unique("fd"), "{}");
    fresh.publish(request(vec![event])).await.unwrap();
    assert!(server.child.try_wait().unwrap().is_none());
    server.sigterm();
    assert_eq!(server.wait_exit().await.code(), Some(0));
    queue.cleanup().await;
}

/// `--max-connections`: past it a new connection waits unaccepted (its HTTP/2
/// handshake gets no answer) and is served once another closes; a connection that
/// never sends its preface is closed after the handshake timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_limit_wait_and_silent_ones_are_closed() {
    let queue = TestQueue::new("#").await;
    let server = ChildServer::start(
        crate::support::AMQP_URL,
        &queue.exchange,
        &[
            ("INGEST_MAX_CONNECTIONS", "3"),
            ("INGEST_HANDSHAKE_TIMEOUT", "1s"),
        ],
    );
    // ready_client holds one connection.
    let _first = server.ready_client().await;
    let second = connect(&server.addr).await;
    let third = connect(&server.addr).await;
    // A fourth: the TCP connect succeeds (the kernel's backlog), the call waits.
    let fourth = connect(&server.addr).await;
    let id = unique("fourth");
    let body = PublishRequest {
        sequence: 0,
        events: vec![json_event("limit.t", &id, "{}")],
    }
    .encode_to_vec();
    let waiting = tokio::spawn(async move { raw_call(&fourth, "Publish", &body, &[]).await });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        !waiting.is_finished(),
        "a call on a fourth connection was served past --max-connections 3"
    );
    drop((second, third));
    let answer = tokio::time::timeout(GUARD, waiting)
        .await
        .expect("the waiting connection must be served once others close")
        .unwrap();
    assert_eq!(answer, (http::StatusCode::OK, Some(Code::Ok)));

    // Silent: connected, never a byte. Closed by the server after ~1 s.
    let mut silent = TcpStream::connect(&server.addr).await.unwrap();
    let mut buf = [0u8; 64];
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        use tokio::io::AsyncReadExt;
        loop {
            match silent.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "a connection that never sent its preface was not closed"
    );
    queue.cleanup().await;
}

/// Request metadata over `--max-header-list-size` (32 KiB by default) fails that
/// call only, with HTTP 431; other calls on the same HTTP/2 connection go on. (Past
/// four times the limit h2 closes the connection to protect its header decoder: see
/// the README.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_metadata_fails_that_call_only() {
    let queue = TestQueue::new("#").await;
    let server = ChildServer::start(crate::support::AMQP_URL, &queue.exchange, &[]);
    server.ready_client().await;
    let raw = connect(&server.addr).await;
    let id = unique("meta");
    let body = PublishRequest {
        sequence: 0,
        events: vec![json_event("meta.t", &id, "{}")],
    }
    .encode_to_vec();
    let big = "v".repeat(64 * 1024);
    let (http, grpc) = raw_call(&raw, "Publish", &body, &[("x-big", &big)]).await;
    eprintln!("64 KiB of metadata: HTTP {http}, grpc-status {grpc:?}");
    assert_eq!(http, http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    // The same connection serves the next call, and the refused one published nothing.
    let (http, grpc) = raw_call(&raw, "Publish", &body, &[]).await;
    assert_eq!((http, grpc), (http::StatusCode::OK, Some(Code::Ok)));
    let landed = queue.message_ids().await;
    assert_eq!(landed, vec![id], "exactly the accepted call's event");
    queue.cleanup().await;
}

/// Bytes that are not a valid request: a refusal that names what is wrong, never a
/// panic, and the process goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_and_hostile_bytes_are_refused_and_the_service_goes_on() {
    let queue = TestQueue::new("#").await;
    let mut server = ChildServer::start(crate::support::AMQP_URL, &queue.exchange, &[]);
    let mut client = server.ready_client().await;
    let raw = connect(&server.addr).await;

    // A topic that is not UTF-8: prost cannot decode it.
    let mut not_utf8 = vec![0x0a, 0x05, 0x12, 0x03, b'a', 0xff, b'b'];
    // Truncated: an event that claims 100 bytes and has 3.
    let truncated = vec![0x0a, 0x64, 0x12, 0x01, b't'];
    // A content type that is not ASCII (a byte offset slice once panicked on it).
    let event = Event {
        topic: "t".into(),
        content_type: "ééé".into(),
        payload: Bytes::from_static(b"{}"),
        ..Event::default()
    };
    let non_ascii = PublishRequest {
        sequence: 0,
        events: vec![event],
    }
    .encode_to_vec();
    // Field number 0, and a group: not protobuf a PublishRequest can hold.
    let zero = vec![0x00, 0x00];
    let group = vec![0x0b, 0x0c];
    let cases: Vec<(&str, Vec<u8>, &[Code])> = vec![
        (
            "invalid UTF-8",
            std::mem::take(&mut not_utf8),
            &[Code::Internal],
        ),
        ("truncated", truncated, &[Code::InvalidArgument]),
        (
            "non-ASCII content type",
            non_ascii,
            &[Code::InvalidArgument],
        ),
        ("field number 0", zero, &[Code::InvalidArgument]),
        ("group", group, &[Code::InvalidArgument]),
    ];
    for (what, body, codes) in cases {
        let code = raw_unary(&raw, "Publish", &body).await;
        eprintln!("{what}: {code:?}");
        assert!(
            codes.contains(&code),
            "{what}: got {code:?}, want {codes:?}"
        );
    }
    assert!(server.child.try_wait().unwrap().is_none(), "ingest ended");
    let id = unique("after-bytes");
    let ok = client
        .publish(request(vec![json_event("bytes.t", &id, "{}")]))
        .await
        .unwrap();
    assert_eq!(ok.into_inner().ids, vec![id]);
    server.sigterm();
    assert_eq!(server.wait_exit().await.code(), Some(0));
    queue.cleanup().await;
}

/// Sends one gRPC message holding `body` to `method` and returns the `grpc-status`.
async fn raw_unary(client: &SendRequest<Bytes>, method: &str, body: &[u8]) -> Code {
    let (http, grpc) = raw_call(client, method, body, &[]).await;
    grpc.unwrap_or_else(|| panic!("no grpc-status (HTTP {http})"))
}

/// Sends one gRPC message holding `body` to `method` with extra `headers`; returns
/// the HTTP status and the `grpc-status`, if any (headers or trailers).
async fn raw_call(
    client: &SendRequest<Bytes>,
    method: &str,
    body: &[u8],
    headers: &[(&str, &str)],
) -> (http::StatusCode, Option<Code>) {
    let mut request = http::Request::builder()
        .method("POST")
        .uri(format!("http://ingest/ingest.v1.Ingest/{method}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request.body(()).unwrap();
    let mut client = client.clone().ready().await.unwrap();
    let (response, mut stream) = client.send_request(request, false).unwrap();
    let mut message = vec![0];
    message.extend_from_slice(&(body.len() as u32).to_be_bytes());
    message.extend_from_slice(body);
    // A refused stream may already be reset: the answer says what happened.
    let _ = stream.send_data(Bytes::from(message), true);
    let response = tokio::time::timeout(GUARD, response)
        .await
        .expect("an answer")
        .unwrap();
    let http = response.status();
    let status = |headers: &http::HeaderMap| {
        headers
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<i32>().ok())
            .map(Code::from)
    };
    if let Some(code) = status(response.headers()) {
        return (http, Some(code));
    }
    let mut body = response.into_body();
    while let Some(Ok(_)) = body.data().await {}
    let trailers = body.trailers().await.ok().flatten();
    (http, trailers.as_ref().and_then(status))
}
