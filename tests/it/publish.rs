//! `ingest.v1.Ingest/Publish` end to end: what reaches RabbitMQ for good input, and
//! that bad, unroutable or oversized input is refused with the right status and
//! details while nothing reaches the broker. Every assertion on "published" or "not
//! published" is made on the broker's queue, never on the service's word alone.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    time::Duration,
};

use ingest::{
    api::max_message_bytes,
    health::SERVICE_NAME,
    proto::{Event, PublishRequest},
    validate::{
        Limits, MAX_ATTRIBUTE_KEY_BYTES, MAX_ATTRIBUTE_VALUE_BYTES, MAX_ATTRIBUTES,
        MAX_ATTRIBUTES_TOTAL_BYTES, MAX_ID_BYTES,
    },
};
use lapin::{BasicProperties, message::BasicGetMessage, types::AMQPValue};
use prost::Message as _;
use prost_types::{FileDescriptorProto, Timestamp};
use tonic::{Code, Status, transport::Channel};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_types::StatusExt;

use crate::support::{
    AMQP_URL, TestQueue, TestServer, UNBOUND_TOPIC, json_event, request, spawn_ready_server,
    test_config, unique,
};

/// How long published messages may take to show in the queue.
const ARRIVE: Duration = Duration::from_secs(5);
/// How long a count must hold to show nothing else (late, duplicate) arrives.
const SETTLE: Duration = Duration::from_millis(300);

async fn publish(server: &TestServer, events: Vec<Event>) -> Result<Vec<String>, Status> {
    publish_request(server, request(events)).await
}

async fn publish_request(
    server: &TestServer,
    request: PublishRequest,
) -> Result<Vec<String>, Status> {
    let mut client = server.client().await;
    client
        .publish(request)
        .await
        .map(|response| response.into_inner().ids)
}

/// Waits for exactly `n` messages (and no more arriving), then takes them all.
async fn take_exactly(queue: &TestQueue, n: u32) -> Vec<BasicGetMessage> {
    assert_eq!(queue.wait_for_count(n, ARRIVE).await, n);
    queue.assert_count_stays(n, SETTLE).await;
    let messages = queue.take_all().await;
    assert_eq!(messages.len(), n as usize);
    messages
}

fn message_id(message: &BasicGetMessage) -> String {
    message
        .delivery
        .properties
        .message_id()
        .as_ref()
        .expect("message has no message_id")
        .to_string()
}

/// The AMQP headers as strings; panics on a header that is not a long string.
fn headers(properties: &BasicProperties) -> BTreeMap<String, String> {
    let Some(table) = properties.headers() else {
        return BTreeMap::new();
    };
    table
        .inner()
        .iter()
        .map(|(key, value)| match value {
            AMQPValue::LongString(s) => (
                key.to_string(),
                String::from_utf8(s.as_bytes().to_vec()).unwrap(),
            ),
            other => panic!("header {key} is {other:?}, not a LongString"),
        })
        .collect()
}

fn field_violations(status: &Status) -> Vec<String> {
    status
        .get_error_details()
        .bad_request()
        .unwrap_or_else(|| panic!("no BadRequest details in {status:?}"))
        .field_violations
        .iter()
        .map(|v| v.field.clone())
        .collect()
}

fn attrs<const N: usize>(pairs: [(&str, &str); N]) -> HashMap<String, String> {
    pairs
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_events_land_with_routing_key_body_properties_and_headers() {
    let queue = TestQueue::new("orders.*").await;
    let server = spawn_ready_server(test_config(AMQP_URL, &queue.exchange)).await;

    let topics = ["orders.created", "orders.paid", "orders.shipped"];
    let events: Vec<Event> = topics
        .iter()
        .enumerate()
        .map(|(i, topic)| Event {
            time: Some(Timestamp {
                seconds: 1_700_000_000 + i as i64,
                nanos: 123_456_789,
            }),
            attributes: attrs([("tenant", "acme"), ("step", &i.to_string())]),
            ..json_event(
                topic,
                &unique("order"),
                &format!(r#"{{"order":{i},"note":"héllo"}}"#),
            )
        })
        .collect();

    let ids = publish(&server, events.clone()).await.unwrap();
    let sent_ids: Vec<String> = events.iter().map(|e| e.id.clone()).collect();
    assert_eq!(ids, sent_ids, "response ids are the caller's, in order");

    let messages = take_exactly(&queue, 3).await;
    for (message, event) in messages.iter().zip(&events) {
        let delivery = &message.delivery;
        let props = &delivery.properties;
        assert_eq!(delivery.exchange.as_str(), queue.exchange);
        assert_eq!(delivery.routing_key.as_str(), event.topic);
        assert_eq!(delivery.data, event.payload.as_ref());
        assert_eq!(message_id(message), event.id);
        assert_eq!(
            props.content_type().as_ref().map(|c| c.as_str()),
            Some("application/json")
        );
        assert_eq!(
            *props.timestamp(),
            Some(event.time.as_ref().unwrap().seconds as u64)
        );
        assert_eq!(*props.delivery_mode(), Some(2), "persistent");
        let expected: BTreeMap<String, String> = event
            .attributes
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        assert_eq!(headers(props), expected);
    }

    drop(server);
    queue.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_without_ids_get_uuid_v7_ids_in_request_order() {
    let queue = TestQueue::new("#").await;
    let server = spawn_ready_server(test_config(AMQP_URL, &queue.exchange)).await;

    let events: Vec<Event> = (0..5)
        .map(|i| json_event("orders.created", "", &format!(r#"{{"n":{i}}}"#)))
        .collect();
    let ids = publish(&server, events.clone()).await.unwrap();

    assert_eq!(ids.len(), events.len());
    for id in &ids {
        let uuid = uuid::Uuid::parse_str(id).unwrap_or_else(|e| panic!("{id:?}: {e}"));
        assert_eq!(uuid.get_version_num(), 7, "{id} is not a UUIDv7");
    }
    assert_eq!(
        ids.iter().collect::<HashSet<_>>().len(),
        ids.len(),
        "ids are distinct: {ids:?}"
    );
    // UUIDv7s generated in one process are ordered by creation: generated in
    // request order means ascending in request order.
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(ids, sorted, "ids were not generated in request order");

    let messages = take_exactly(&queue, 5).await;
    let queued: Vec<String> = messages.iter().map(message_id).collect();
    assert_eq!(queued, ids, "message_ids in the queue are the returned ids");
    for (message, event) in messages.iter().zip(&events) {
        assert_eq!(message.delivery.data, event.payload.as_ref());
    }

    drop(server);
    queue.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_validation_rule_is_invalid_argument_naming_the_field_and_publishes_nothing() {
    let queue = TestQueue::new("#").await;
    let mut config = test_config(AMQP_URL, &queue.exchange);
    config.max_batch_events = 5;
    config.max_event_bytes = 1024;
    let server = spawn_ready_server(config).await;

    let valid = || json_event("orders.created", "", r#"{"ok":true}"#);
    // Each bad event goes second, after a valid one, so the index is checked too.
    let after_valid = |bad: Event| vec![valid(), bad];
    let with_attrs = |attributes: HashMap<String, String>| Event {
        attributes,
        ..valid()
    };
    let many_attributes: HashMap<String, String> =
        (0..65).map(|i| (format!("k{i}"), "v".to_owned())).collect();

    let cases: Vec<(&str, Vec<Event>, String)> = vec![
        ("empty batch", vec![], "events".into()),
        (
            "more events than max-batch-events",
            (0..6).map(|_| valid()).collect(),
            "events".into(),
        ),
        (
            "missing topic",
            after_valid(json_event("", "", "{}")),
            "events[1].topic".into(),
        ),
        (
            "topic over 255 bytes",
            after_valid(json_event(&"t".repeat(256), "", "{}")),
            "events[1].topic".into(),
        ),
        (
            "topic with a control character",
            after_valid(json_event("orders.\u{7}created", "", "{}")),
            "events[1].topic".into(),
        ),
        (
            "payload over max-event-bytes",
            after_valid(json_event(
                "orders.created",
                "",
                &format!("\"{}\"", "a".repeat(1023)),
            )),
            "events[1].payload".into(),
        ),
        (
            "invalid JSON as application/json",
            after_valid(json_event("orders.created", "", "{not json")),
            "events[1].payload".into(),
        ),
        (
            "invalid JSON as application/cloudevents+json",
            after_valid(Event {
                content_type: "application/cloudevents+json".into(),
                ..json_event("orders.created", "", r#"{"a":}"#)
            }),
            "events[1].payload".into(),
        ),
        (
            "more than 64 attributes",
            after_valid(with_attrs(many_attributes)),
            "events[1].attributes".into(),
        ),
        (
            "attribute key over 128 bytes",
            after_valid(with_attrs(attrs([(&"k".repeat(129), "v")]))),
            "events[1].attributes".into(),
        ),
        (
            "attribute value over 4096 bytes",
            after_valid(with_attrs(attrs([("k", &"v".repeat(4097))]))),
            r#"events[1].attributes["k"]"#.into(),
        ),
        (
            "reserved attribute traceparent",
            after_valid(with_attrs(attrs([("traceparent", "00-abc-def-01")]))),
            r#"events[1].attributes["traceparent"]"#.into(),
        ),
        (
            "reserved attribute x-foo",
            after_valid(with_attrs(attrs([("x-foo", "bar")]))),
            r#"events[1].attributes["x-foo"]"#.into(),
        ),
        (
            "id over 128 bytes",
            after_valid(json_event("orders.created", &"i".repeat(129), "{}")),
            "events[1].id".into(),
        ),
        (
            "time before 1970",
            after_valid(Event {
                time: Some(Timestamp {
                    seconds: -1,
                    nanos: 0,
                }),
                ..valid()
            }),
            "events[1].time".into(),
        ),
    ];

    for (name, events, field) in cases {
        let Err(status) = publish(&server, events).await else {
            panic!("{name}: was accepted");
        };
        assert_eq!(status.code(), Code::InvalidArgument, "{name}: {status:?}");
        assert_eq!(field_violations(&status), vec![field.clone()], "{name}");
        assert!(
            status.message().contains(&field),
            "{name}: message {:?} does not name {field}",
            status.message()
        );
    }
    queue.assert_count_stays(0, SETTLE).await;

    // The service still serves after all that, and every limit is inclusive.
    let at_limits = vec![
        json_event("orders.created", "", &format!("\"{}\"", "a".repeat(1022))),
        json_event(&"t".repeat(255), &"i".repeat(128), "{}"),
        // 64 attributes, one with the longest key and value. (64 of those at once
        // would be over the 64 KiB all attributes may hold together; the largest
        // valid set is `maximal_attributes_do_not_take_the_broker_connection_down`'s.)
        with_attrs(
            (0..64)
                .map(|i| match i {
                    0 => ("k".repeat(128), "v".repeat(4096)),
                    _ => (format!("k{i}"), "v".to_owned()),
                })
                .collect(),
        ),
        Event {
            time: Some(Timestamp {
                seconds: 0,
                nanos: 0,
            }),
            ..valid()
        },
        valid(),
    ];
    let ids = publish(&server, at_limits.clone()).await.unwrap();
    let messages = take_exactly(&queue, 5).await;
    assert_eq!(messages.iter().map(message_id).collect::<Vec<_>>(), ids);
    assert_eq!(messages[0].delivery.data.len(), 1024);
    assert_eq!(
        messages[1].delivery.routing_key.as_str(),
        at_limits[1].topic
    );
    assert_eq!(message_id(&messages[1]), at_limits[1].id);
    let maximal = headers(&messages[2].delivery.properties);
    assert_eq!(maximal.len(), 64);
    assert_eq!(maximal["k".repeat(128).as_str()], "v".repeat(4096));
    assert_eq!(*messages[3].delivery.properties.timestamp(), Some(0));

    drop(server);
    queue.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unroutable_topic_is_failed_precondition_naming_the_topic() {
    // Bound to every topic but one-word ones: UNBOUND_TOPIC is unroutable, and any
    // other publish (a copy, a retry under another key) would land in the queue.
    let queue = TestQueue::all_but_one_word_topics().await;
    let strict = spawn_ready_server(test_config(AMQP_URL, &queue.exchange)).await;

    let status = publish(
        &strict,
        vec![json_event(UNBOUND_TOPIC, &unique("ev"), "{}")],
    )
    .await
    .expect_err("an unroutable event was answered OK");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(
        status.message().contains(UNBOUND_TOPIC),
        "message {:?} does not name the topic",
        status.message()
    );
    let details = status.get_error_details();
    let failure = details
        .precondition_failure()
        .unwrap_or_else(|| panic!("no PreconditionFailure in {status:?}"));
    assert_eq!(failure.violations.len(), 1, "{failure:?}");
    assert_eq!(failure.violations[0].r#type, "UNROUTABLE");
    assert!(
        failure.violations[0].description.contains(UNBOUND_TOPIC),
        "{failure:?}"
    );
    queue.assert_count_stays(0, SETTLE).await;

    // The same publish on a server that accepts unroutable events is OK (and the
    // broker drops it, since still no queue is bound for it; nothing else lands).
    let mut config = test_config(AMQP_URL, &queue.exchange);
    config.accept_unroutable = true;
    let lenient = spawn_ready_server(config).await;
    let id = unique("ev");
    let ids = publish(&lenient, vec![json_event(UNBOUND_TOPIC, &id, "{}")])
        .await
        .unwrap();
    assert_eq!(ids, vec![id]);
    queue.assert_count_stays(0, SETTLE).await;

    // A routable event still lands through the strict server.
    let id = unique("ev");
    publish(&strict, vec![json_event("orders.created", &id, "{}")])
        .await
        .unwrap();
    let messages = take_exactly(&queue, 1).await;
    assert_eq!(message_id(&messages[0]), id);

    drop(strict);
    drop(lenient);
    queue.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_request_is_refused_before_decoding() {
    let queue = TestQueue::new("#").await;
    let mut config = test_config(AMQP_URL, &queue.exchange);
    config.max_event_bytes = 1024;
    config.max_batch_events = 4;
    config.buffer_bytes = 64 * 1024;
    let limit = max_message_bytes(
        &Limits {
            max_event_bytes: config.max_event_bytes,
            max_batch_events: config.max_batch_events,
        },
        config.buffer_bytes,
    );
    let server = spawn_ready_server(config).await;

    // A request whose encoding is exactly `size` bytes: one event, payload padded.
    let sized = |size: usize| {
        let mut payload_len = size.saturating_sub(64);
        loop {
            let request = request(vec![Event {
                topic: "orders.created".into(),
                payload: vec![b'x'; payload_len].into(),
                ..Event::default()
            }]);
            match request.encoded_len() {
                n if n == size => return request,
                n if n < size => payload_len += 1,
                n => panic!("cannot build a request of exactly {size} bytes (got {n})"),
            }
        }
    };

    let status = publish_request(&server, sized(limit + 1))
        .await
        .expect_err("an oversized request was accepted");
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");

    // At the limit the request is decoded, and then refused by validation: the
    // limit is exactly `max_message_bytes`.
    let status = publish_request(&server, sized(limit))
        .await
        .expect_err("an event over max-event-bytes was accepted");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(field_violations(&status), vec!["events[0].payload"]);

    queue.assert_count_stays(0, SETTLE).await;

    let id = unique("ev");
    let ids = publish(&server, vec![json_event("orders.created", &id, "{}")])
        .await
        .unwrap();
    assert_eq!(ids, vec![id.clone()]);
    let messages = take_exactly(&queue, 1).await;
    assert_eq!(message_id(&messages[0]), id);

    drop(server);
    queue.cleanup().await;
}

/// What one reflection client learnt: the listed services, the files that declare
/// `ingest.v1.Ingest`, and `google/protobuf/timestamp.proto` (which it imports).
struct Reflected {
    services: Vec<String>,
    ingest_files: Vec<FileDescriptorProto>,
    timestamp_files: Vec<FileDescriptorProto>,
}

/// Asks one reflection version the three questions a client like grpcurl asks.
macro_rules! reflect {
    ($name:ident, $version:ident) => {
        async fn $name(url: String) -> Reflected {
            use tonic_reflection::pb::$version::{
                ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
                server_reflection_request::MessageRequest,
                server_reflection_response::MessageResponse,
            };
            let channel = Channel::from_shared(url).unwrap().connect().await.unwrap();
            let mut client = ServerReflectionClient::new(channel);
            let ask = |request| ServerReflectionRequest {
                host: String::new(),
                message_request: Some(request),
            };
            let questions = vec![
                ask(MessageRequest::ListServices(String::new())),
                ask(MessageRequest::FileContainingSymbol(SERVICE_NAME.into())),
                ask(MessageRequest::FileByFilename(
                    "google/protobuf/timestamp.proto".into(),
                )),
            ];
            let mut answers = client
                .server_reflection_info(futures::stream::iter(questions))
                .await
                .unwrap()
                .into_inner();
            let mut next = async || match answers
                .message()
                .await
                .unwrap()
                .expect("reflection stream ended early")
                .message_response
            {
                Some(MessageResponse::ErrorResponse(e)) => {
                    panic!("reflection error {}: {}", e.error_code, e.error_message)
                }
                Some(answer) => answer,
                None => panic!("empty reflection answer"),
            };
            let decode = |answer: MessageResponse| match answer {
                MessageResponse::FileDescriptorResponse(files) => files
                    .file_descriptor_proto
                    .iter()
                    .map(|bytes| FileDescriptorProto::decode(bytes.as_slice()).unwrap())
                    .collect::<Vec<_>>(),
                other => panic!("expected files, got {other:?}"),
            };
            let services = match next().await {
                MessageResponse::ListServicesResponse(list) => {
                    list.service.into_iter().map(|s| s.name).collect()
                }
                other => panic!("expected a service list, got {other:?}"),
            };
            let ingest_files = decode(next().await);
            let timestamp_files = decode(next().await);
            Reflected {
                services,
                ingest_files,
                timestamp_files,
            }
        }
    };
}
reflect!(reflect_v1, v1);
reflect!(reflect_v1alpha, v1alpha);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_and_health_work_without_the_proto() {
    let queue = TestQueue::new("#").await;
    let server = spawn_ready_server(test_config(AMQP_URL, &queue.exchange)).await;

    for (version, reflected) in [
        ("v1", reflect_v1(server.url()).await),
        ("v1alpha", reflect_v1alpha(server.url()).await),
    ] {
        for service in ["ingest.v1.Ingest", "grpc.health.v1.Health"] {
            assert!(
                reflected.services.iter().any(|s| s == service),
                "{version}: {service} not in {:?}",
                reflected.services
            );
        }
        let ingest = reflected
            .ingest_files
            .iter()
            .find(|f| f.package() == "ingest.v1")
            .unwrap_or_else(|| panic!("{version}: no ingest.v1 file"));
        let service = ingest
            .service
            .iter()
            .find(|s| s.name() == "Ingest")
            .unwrap_or_else(|| panic!("{version}: ingest.v1 file declares no Ingest"));
        let methods: Vec<&str> = service.method.iter().map(|m| m.name()).collect();
        assert_eq!(
            methods,
            ["Publish", "PublishStream", "PublishAcked"],
            "{version}"
        );
        assert!(
            ingest
                .dependency
                .iter()
                .any(|d| d == "google/protobuf/timestamp.proto"),
            "{version}: {:?}",
            ingest.dependency
        );
        assert!(
            reflected
                .timestamp_files
                .iter()
                .any(|f| f.message_type.iter().any(|m| m.name() == "Timestamp")),
            "{version}: google.protobuf.Timestamp cannot be resolved"
        );
    }

    assert_eq!(server.health("").await, ServingStatus::Serving);
    assert_eq!(server.health(SERVICE_NAME).await, ServingStatus::Serving);

    drop(server);
    queue.cleanup().await;
}

/// The largest header set validation accepts: MAX_ATTRIBUTES attributes, every key
/// at MAX_ATTRIBUTE_KEY_BYTES, MAX_ATTRIBUTES_TOTAL_BYTES in all; with the longest id.
fn maximal_attributes() -> HashMap<String, String> {
    let keys = MAX_ATTRIBUTES * MAX_ATTRIBUTE_KEY_BYTES;
    let value_len = (MAX_ATTRIBUTES_TOTAL_BYTES - keys) / MAX_ATTRIBUTES;
    assert_eq!(
        keys + value_len * MAX_ATTRIBUTES,
        MAX_ATTRIBUTES_TOTAL_BYTES
    );
    assert!(value_len <= MAX_ATTRIBUTE_VALUE_BYTES);
    (0..MAX_ATTRIBUTES)
        .map(|i| {
            (
                format!("{i:0>width$}", width = MAX_ATTRIBUTE_KEY_BYTES),
                format!("{i:v>width$}", width = value_len),
            )
        })
        .collect()
}

fn maximal_event() -> Event {
    let id = unique("big");
    Event {
        attributes: maximal_attributes(),
        ..json_event("orders.created", &format!("{id:x>MAX_ID_BYTES$}"), "{}")
    }
}

/// Publishes `id` alone and checks it lands: the service still serves.
async fn publishes_one_more(server: &TestServer, queue: &TestQueue) {
    let id = unique("after");
    let ids = publish(server, vec![json_event("orders.created", &id, "{}")])
        .await
        .expect("the service still publishes");
    assert_eq!(ids, vec![id.clone()]);
    let messages = take_exactly(queue, 1).await;
    assert_eq!(message_id(&messages[0]), id);
}

/// An AMQP content header must fit in one frame, and a broker closes the whole
/// connection on an oversized one, failing every in-flight publish of every caller.
/// Validation caps the headers (MAX_ATTRIBUTES_TOTAL_BYTES) well below RabbitMQ's
/// default `frame_max` of 128 KiB, so the largest valid header set is published; and
/// where a smaller `frame_max` is negotiated, the publisher refuses what would not fit
/// (`HeadersTooLarge`) as INVALID_ARGUMENT naming the event, before sending anything.
/// Either way the connection stays up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maximal_attributes_do_not_take_the_broker_connection_down() {
    let queue = TestQueue::new("#").await;
    let server = spawn_ready_server(test_config(AMQP_URL, &queue.exchange)).await;
    let disconnects = server.count_disconnects();

    // One byte more is refused by validation: this is the largest valid set.
    let mut over = maximal_event();
    over.attributes.values_mut().next().unwrap().push('v');
    let status = publish(&server, vec![over])
        .await
        .expect_err("one byte over MAX_ATTRIBUTES_TOTAL_BYTES was accepted");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(field_violations(&status), vec!["events[0].attributes"]);

    let maximal = maximal_event();
    let ids = publish(&server, vec![maximal.clone()])
        .await
        .expect("the largest valid header set is published and confirmed");
    assert_eq!(ids, vec![maximal.id.clone()]);
    let messages = take_exactly(&queue, 1).await;
    assert_eq!(message_id(&messages[0]), maximal.id);
    let expected: BTreeMap<String, String> = maximal.attributes.into_iter().collect();
    assert_eq!(headers(&messages[0].delivery.properties), expected);

    publishes_one_more(&server, &queue).await;
    assert_eq!(server.health("").await, ServingStatus::Serving);
    assert_eq!(
        disconnects.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the broker connection stayed up"
    );
    drop(server);

    // A broker link with a small negotiated frame_max (the URL asks for 8 KiB).
    let url = format!("{AMQP_URL}?frame_max=8192");
    let small = spawn_ready_server(test_config(&url, &queue.exchange)).await;
    let disconnects = small.count_disconnects();
    // Headers that fit the 8 KiB frame are published...
    let fits = Event {
        attributes: (0..4)
            .map(|i| (format!("k{i}"), "v".repeat(1024)))
            .collect(),
        ..json_event("orders.created", &unique("fits"), "{}")
    };
    publish(&small, vec![fits.clone()])
        .await
        .expect("4 KiB of headers fit an 8 KiB frame");
    let messages = take_exactly(&queue, 1).await;
    assert_eq!(message_id(&messages[0]), fits.id);
    // ...the maximal set does not: the whole batch is refused, naming the event, and
    // nothing of it is sent.
    let batch = vec![
        json_event("orders.created", &unique("small"), "{}"),
        maximal_event(),
    ];
    let status = publish(&small, batch)
        .await
        .expect_err("headers larger than the negotiated frame_max were sent");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(field_violations(&status), vec!["events[1].attributes"]);
    assert!(
        status.message().contains("events[1]") && status.message().contains("8192"),
        "the message names the event and the frame size: {status:?}"
    );
    queue.assert_count_stays(0, SETTLE).await;

    publishes_one_more(&small, &queue).await;
    assert_eq!(small.health("").await, ServingStatus::Serving);
    assert_eq!(
        disconnects.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the broker connection stayed up"
    );

    drop(small);
    queue.cleanup().await;
}
