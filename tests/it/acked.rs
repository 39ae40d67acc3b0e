//! `PublishAcked` on the real binary: one ack per request, in request order, while the
//! caller is still sending; failed requests are answered and the stream goes on; the
//! queue holds exactly what was acknowledged; a stalled broker and a caller that does
//! not read its acks both push the stream back with bounded memory.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use futures::StreamExt;
use ingest::proto::{Event, PublishAck, PublishRequest};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status, Streaming};
use tonic_types::StatusExt;

use crate::support::{
    AMQP_ADDR, AMQP_URL, ChildServer, FaultProxy, Mode, TestQueue, assert_exactly_once, json_event,
    unique,
};

const GUARD: Duration = Duration::from_secs(60);

/// The ack's `google.rpc.Status` as a `tonic::Status`, to read its rich details.
fn ack_status(ack: &PublishAck) -> Status {
    use prost::Message;
    let rich = ack.status.clone().expect("every ack carries a status");
    Status::with_details(
        Code::from_i32(rich.code),
        rich.message.clone(),
        rich.encode_to_vec().into(),
    )
}

fn one(event: Event, sequence: u64) -> PublishRequest {
    PublishRequest {
        events: vec![event],
        sequence,
    }
}

/// Sends `requests` on one `PublishAcked` stream, counting each as the transport
/// takes it; returns the sender's count and the ack stream.
async fn open(
    client: &mut ingest::proto::ingest_client::IngestClient<tonic::transport::Channel>,
    requests: Vec<PublishRequest>,
) -> (Arc<AtomicUsize>, Streaming<PublishAck>) {
    let pulled = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&pulled);
    let outbound = futures::stream::iter(requests).inspect(move |_| {
        counter.fetch_add(1, Ordering::SeqCst);
    });
    let acks = client
        .publish_acked(outbound)
        .await
        .expect("PublishAcked opens")
        .into_inner();
    (pulled, acks)
}

/// 10,000 requests on one stream: an ack per request, in order, most of them while the
/// caller is still sending; an invalid request and an unroutable one in the middle are
/// answered with their errors and the stream goes on; the queue holds exactly the
/// acknowledged events, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_requests_are_acked_in_order_as_they_go() {
    const REQUESTS: u64 = 10_000;
    const INVALID: u64 = 4_000;
    const UNROUTABLE: u64 = 7_000;
    // A topic no binding of the queue matches.
    let queue = TestQueue::new("acked.#").await;
    let server = ChildServer::start(AMQP_URL, &queue.exchange, &[]);
    let mut client = server.ready_client().await;

    let mut expected = Vec::new();
    let requests: Vec<PublishRequest> = (0..REQUESTS)
        .map(|seq| {
            let id = unique(&format!("acked-{seq:05}"));
            let event = match seq {
                INVALID => json_event("", &id, "{}"),
                UNROUTABLE => json_event("nobody.listens", &id, "{}"),
                // Every tenth request holds three events.
                _ if seq % 10 == 0 => {
                    let ids: Vec<String> = (0..3).map(|k| format!("{id}-{k}")).collect();
                    expected.push(ids.clone());
                    return PublishRequest {
                        events: ids
                            .iter()
                            .map(|id| json_event("acked.t", id, "{\"n\":3}"))
                            .collect(),
                        sequence: seq + 1,
                    };
                }
                _ => {
                    expected.push(vec![id.clone()]);
                    json_event("acked.t", &id, "{\"n\":1}")
                }
            };
            // Sequence numbers start at 1: 0 is what an unset field reads as.
            one(event, seq + 1)
        })
        .collect();

    let (pulled, mut acks) = open(&mut client, requests).await;
    let mut got: Vec<PublishAck> = Vec::new();
    let mut sent_at_ack = Vec::new();
    while let Some(ack) = tokio::time::timeout(GUARD, acks.next())
        .await
        .expect("acks keep coming")
    {
        let ack = ack.expect("the stream ends OK after the caller closes its side");
        sent_at_ack.push(pulled.load(Ordering::SeqCst));
        got.push(ack);
    }

    assert_eq!(got.len() as u64, REQUESTS, "one ack per request");
    let sequences: Vec<u64> = got.iter().map(|a| a.sequence).collect();
    assert!(
        sequences.iter().copied().eq(1..=REQUESTS),
        "acks out of request order, first misplaced at {:?}",
        sequences
            .iter()
            .enumerate()
            .find(|(i, s)| **s != *i as u64 + 1)
    );
    // Acks arrived while the caller was still sending: most of them before it had
    // handed over its last request.
    let before_end = sent_at_ack
        .iter()
        .filter(|&&sent| (sent as u64) < REQUESTS)
        .count();
    eprintln!(
        "{before_end} of {REQUESTS} acks arrived before the caller had sent its last request"
    );
    assert!(
        before_end as u64 >= REQUESTS / 2,
        "only {before_end} acks arrived while the caller was sending: acks wait for the stream's end"
    );

    let invalid = ack_status(&got[INVALID as usize]);
    assert_eq!(invalid.code(), Code::InvalidArgument, "{invalid:?}");
    let violations = invalid
        .get_details_bad_request()
        .expect("BadRequest details")
        .field_violations;
    assert_eq!(violations[0].field, "events[0].topic", "{violations:?}");
    assert!(got[INVALID as usize].ids.is_empty());

    let unroutable = ack_status(&got[UNROUTABLE as usize]);
    assert_eq!(
        unroutable.code(),
        Code::FailedPrecondition,
        "{unroutable:?}"
    );
    assert!(
        unroutable.message().contains("nobody.listens"),
        "{unroutable:?}"
    );
    assert!(unroutable.get_details_precondition_failure().is_some());

    let mut acked_ids = Vec::new();
    for (i, ack) in got.iter().enumerate() {
        if i as u64 == INVALID || i as u64 == UNROUTABLE {
            continue;
        }
        let status = ack_status(ack);
        assert_eq!(status.code(), Code::Ok, "request {i}: {status:?}");
        acked_ids.extend(ack.ids.iter().cloned());
    }
    let expected: Vec<String> = expected.into_iter().flatten().collect();
    assert_eq!(
        acked_ids, expected,
        "OK acks carry their requests' ids in order"
    );

    let landed = queue.settled_message_ids(Duration::from_millis(500)).await;
    assert_exactly_once(&landed, &acked_ids);
    assert_eq!(
        landed, acked_ids,
        "the queue holds the acknowledged events in order"
    );
    queue.cleanup().await;
}

/// A broker that stops answering: the stream stops being read (the caller hands over a
/// bounded amount), the server's memory stays within the buffer, and once the broker
/// answers again every request is acknowledged and lands once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_broker_stops_the_stream_with_bounded_memory_then_every_request_is_acked() {
    const REQUESTS: usize = 600;
    const EVENT_BYTES: usize = 64 * 1024;
    const BUFFER_BYTES: usize = 4 * 1024 * 1024;
    const STREAM_WINDOW: usize = 256 * 1024;
    const CONNECTION_WINDOW: usize = 1024 * 1024;
    /// Fixed overhead over the idle process, as in the PublishStream stall test (README).
    const OVERHEAD: u64 = 24 * 1024 * 1024;

    let queue = TestQueue::new("#").await;
    let proxy = FaultProxy::start(AMQP_ADDR.parse().unwrap()).await;
    let server = ChildServer::start(
        &proxy.amqp_url(),
        &queue.exchange,
        &[
            ("INGEST_BUFFER_BYTES", &BUFFER_BYTES.to_string()),
            ("INGEST_MAX_EVENT_BYTES", "64KiB"),
            ("INGEST_HTTP2_STREAM_WINDOW", &STREAM_WINDOW.to_string()),
            (
                "INGEST_HTTP2_CONNECTION_WINDOW",
                &CONNECTION_WINDOW.to_string(),
            ),
            ("INGEST_CONFIRM_TIMEOUT", "2m"),
        ],
    );
    let mut client = server.ready_client().await;
    let (idle_rss, _) = server.memory();

    proxy.set_mode(Mode::Stall);
    let body = format!("{{\"p\":\"{}\"}}", "x".repeat(EVENT_BYTES - 16));
    let ids: Vec<String> = (0..REQUESTS)
        .map(|i| unique(&format!("stall-{i:04}")))
        .collect();
    let requests = ids
        .iter()
        .enumerate()
        .map(|(i, id)| one(json_event("t", id, &body), i as u64 + 1))
        .collect();
    let (pulled, mut acks) = open(&mut client, requests).await;

    // What the caller handed over stops growing.
    let handed_over = crate::support::until_it_stops_growing(
        &pulled,
        "the stream",
        Duration::from_millis(500),
        GUARD,
    )
    .await;
    // Admitted (the streams' 3/4 of the byte buffer) + the HTTP/2 windows + the one
    // request read before admission + what the client library buffers.
    let bound = BUFFER_BYTES * 3 / 4 / EVENT_BYTES + STREAM_WINDOW / EVENT_BYTES + 1 + 3;
    let (rss, peak) = server.memory();
    let limit = idle_rss + BUFFER_BYTES as u64 + OVERHEAD;
    eprintln!(
        "stalled: handed over {handed_over}/{REQUESTS} (bound {bound}); idle RSS {idle_rss} B, \
         RSS {rss} B, peak {peak} B, limit {limit} B"
    );
    assert!(
        handed_over <= bound,
        "the caller handed over {handed_over} requests while the broker was stalled; bound {bound}"
    );
    assert!(
        peak <= limit,
        "peak RSS {peak} B over idle {idle_rss} B + buffer {BUFFER_BYTES} B + overhead {OVERHEAD} B"
    );
    // Nothing could be confirmed, so nothing was acknowledged yet.
    assert!(
        tokio::time::timeout(Duration::from_millis(200), acks.next())
            .await
            .is_err(),
        "an ack arrived while the broker confirmed nothing"
    );

    proxy.set_mode(Mode::Forward);
    let mut got = Vec::new();
    while let Some(ack) = tokio::time::timeout(GUARD, acks.next())
        .await
        .expect("acks come once the broker answers")
    {
        got.push(ack.expect("the stream ends OK"));
    }
    assert_eq!(got.len(), REQUESTS);
    for (i, ack) in got.iter().enumerate() {
        assert_eq!(ack.sequence, i as u64 + 1);
        let status = ack_status(ack);
        assert_eq!(
            status.code(),
            Code::Ok,
            "request {i} after the stall: {status:?}"
        );
        assert_eq!(ack.ids, [ids[i].clone()]);
    }
    let landed = queue.settled_message_ids(Duration::from_millis(500)).await;
    assert_exactly_once(&landed, &ids);
    queue.cleanup().await;
}

/// A caller that sends without reading its acks: the acks waiting for it are bounded,
/// so the stream stops being read and the server's memory stays flat; once the caller
/// reads, every ack comes, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_that_does_not_read_its_acks_is_pushed_back() {
    const REQUESTS: usize = 30_000;
    /// Requests taken while no ack is read: the acks pending (1,024) and waiting in
    /// the server's channel (64) and encoder (32 KiB), the client's 64 KiB windows of
    /// acks, the server's window of requests, with room to spare. Unbounded, all
    /// 30,000 would be taken.
    const SLACK: usize = 10_000;
    const OVERHEAD: u64 = 24 * 1024 * 1024;
    let queue = TestQueue::new("#").await;
    let server = ChildServer::start(
        AMQP_URL,
        &queue.exchange,
        &[("INGEST_BUFFER_BYTES", "16MiB")],
    );
    server.ready_client().await;
    // A small stream window, so what the client's HTTP/2 layer takes in while the
    // caller reads nothing stays small (64 KiB of acks, about 2,700). The connection
    // window is larger: h2 (0.4.20 on) lets a connection hold unread small DATA frames
    // for at most half of it, counting 256 bytes less each frame's size per frame, and
    // past that closes it (GOAWAY "too_many_data_frames"). With 64 KiB it did, once
    // the acks came one per frame: 2,700 of them need about 620 KiB.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .initial_stream_window_size(64 * 1024)
        .initial_connection_window_size(4 * 1024 * 1024)
        .connect()
        .await
        .unwrap();
    let mut client = ingest::proto::ingest_client::IngestClient::new(channel);
    let (idle_rss, _) = server.memory();

    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let pulled = Arc::new(AtomicUsize::new(0));
    let sender = {
        let pulled = Arc::clone(&pulled);
        tokio::spawn(async move {
            for i in 0..REQUESTS {
                let event = json_event("t", &format!("unread-{i:06}"), "{}");
                if tx.send(one(event, i as u64 + 1)).await.is_err() {
                    break;
                }
                pulled.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    let mut acks = client
        .publish_acked(ReceiverStream::new(rx))
        .await
        .expect("PublishAcked opens")
        .into_inner();

    // Not reading: what the caller hands over stops growing.
    // No ack is read: the stream must stop taking requests.
    let handed_over = crate::support::until_it_stops_growing(
        &pulled,
        "the stream with no ack read",
        Duration::from_millis(1000),
        GUARD,
    )
    .await;
    let (rss, peak) = server.memory();
    let limit = idle_rss + 16 * 1024 * 1024 + OVERHEAD;
    eprintln!(
        "acks unread: the caller handed over {handed_over} of {REQUESTS}; idle RSS {idle_rss} B, \
         RSS {rss} B, peak {peak} B, limit {limit} B"
    );
    assert!(
        handed_over < SLACK,
        "{handed_over} requests were read while the caller read no ack"
    );
    assert!(peak <= limit, "peak RSS {peak} B over {limit} B");

    let mut n = 0;
    while let Some(ack) = tokio::time::timeout(GUARD, acks.next())
        .await
        .expect("acks come once the caller reads")
    {
        let ack = ack.expect("the stream ends OK");
        n += 1;
        assert_eq!(ack.sequence, n as u64);
        assert_eq!(ack_status(&ack).code(), Code::Ok, "{ack:?}");
    }
    sender.await.unwrap();
    assert_eq!(n, REQUESTS);
    assert_eq!(
        queue.wait_for_count(REQUESTS as u32, GUARD).await,
        REQUESTS as u32
    );
    queue.cleanup().await;
}
