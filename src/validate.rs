//! Validation: turns raw proto events into [`ValidEvent`]s or a list of field violations.
//!
//! Parse, don't validate: nothing past this module holds an unchecked event. The
//! module is pure (no I/O, no async) so every rule is a unit test away; the only
//! impurity is the UUIDv7 generated for an event without an id.

use std::fmt;

use bytes::Bytes;

use crate::{admission, proto};

/// Longest AMQP short string: routing keys, message ids and content types are sent as one.
pub const MAX_SHORT_STRING: usize = 255;
/// Longest caller-supplied event id.
pub const MAX_ID_BYTES: usize = 128;
/// Most attributes on one event.
pub const MAX_ATTRIBUTES: usize = 64;
/// Longest attribute key.
pub const MAX_ATTRIBUTE_KEY_BYTES: usize = 128;
/// Longest attribute value.
pub const MAX_ATTRIBUTE_VALUE_BYTES: usize = 4096;
/// Most bytes of all attribute keys and values of one event together. AMQP carries
/// headers in a single frame (RabbitMQ's default `frame_max` is 128 KiB) and a broker
/// closes the whole connection on an oversized frame, so the sum is capped well below.
pub const MAX_ATTRIBUTES_TOTAL_BYTES: usize = 64 * 1024;
/// Attribute names the service sets itself (trace context) or that RabbitMQ gives a
/// meaning of its own (sender-selected distribution). Compared case-insensitively;
/// every name starting with `x-` is refused too, as RabbitMQ and its plugins reserve them.
pub const RESERVED_ATTRIBUTES: [&str; 5] = ["traceparent", "tracestate", "baggage", "cc", "bcc"];

/// Request-size limits that come from configuration.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Largest payload of one event.
    pub max_event_bytes: usize,
    /// Most events in one `PublishRequest`.
    pub max_batch_events: usize,
}

/// One rule an event or batch broke, in `google.rpc.BadRequest` terms.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldViolation {
    /// Path of the offending field, e.g. `events[3].topic`.
    pub field: String,
    /// What is wrong, with the limit where one applies.
    pub description: String,
}

impl fmt::Display for FieldViolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.description)
    }
}

/// An event that passed every rule; the only kind the publisher accepts.
#[derive(Clone, Debug, PartialEq)]
pub struct ValidEvent {
    id: String,
    topic: String,
    payload: Bytes,
    content_type: Option<String>,
    attributes: Vec<(String, String)>,
    timestamp: Option<u64>,
}

impl ValidEvent {
    /// The caller's id, or a generated UUIDv7.
    pub fn id(&self) -> &str {
        &self.id
    }
    /// The routing key.
    pub fn topic(&self) -> &str {
        &self.topic
    }
    /// The message body.
    pub fn payload(&self) -> &Bytes {
        &self.payload
    }
    /// The content type, if the caller gave one.
    pub fn content_type(&self) -> Option<&str> {
        self.content_type.as_deref()
    }
    /// Attributes, to become AMQP headers.
    pub fn attributes(&self) -> &[(String, String)] {
        &self.attributes
    }
    /// Event time in whole seconds since the Unix epoch (AMQP timestamps are seconds).
    pub fn timestamp(&self) -> Option<u64> {
        self.timestamp
    }
    /// Bytes this event is charged against the buffer while admitted: what it holds
    /// in memory, by [`admission::event_cost`] (payload, strings and the fixed
    /// per-event and per-attribute overheads).
    pub fn size(&self) -> usize {
        admission::event_cost(
            self.payload.len(),
            self.topic.len() + self.metadata_size(),
            self.attributes.len(),
        )
    }
    /// Bytes of everything but the payload: what travels in the AMQP header frame.
    pub fn metadata_size(&self) -> usize {
        let attributes: usize = self.attributes.iter().map(|(k, v)| k.len() + v.len()).sum();
        let content_type = self.content_type.as_ref().map_or(0, String::len);
        self.id.len() + content_type + attributes
    }
    /// Gives the id back, for the response.
    pub fn into_id(self) -> String {
        self.id
    }
    /// Adds a header the service sets itself (e.g. the caller's tenant): callers
    /// cannot set `x-*` attributes, so whatever is stamped here is the service's word.
    pub fn stamp(&mut self, key: &str, value: &str) {
        self.attributes.retain(|(k, _)| k != key);
        self.attributes.push((key.to_owned(), value.to_owned()));
    }
}

/// A whole request's events, all valid, with their total size precomputed.
#[derive(Debug)]
pub struct ValidBatch {
    events: Vec<ValidEvent>,
    bytes: usize,
}

impl ValidBatch {
    /// The events, in request order.
    pub fn events(&self) -> &[ValidEvent] {
        &self.events
    }
    /// Sum of [`ValidEvent::size`]: what admission charges for the batch.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
    /// Number of events.
    pub fn len(&self) -> usize {
        self.events.len()
    }
    /// Never true for a batch built by [`validate_batch`]; here for completeness.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }
    /// The event ids in request order.
    pub fn ids(&self) -> Vec<String> {
        self.events.iter().map(|e| e.id.clone()).collect()
    }
    /// Hands the events over.
    pub fn into_events(self) -> Vec<ValidEvent> {
        self.events
    }
    /// The events, to stamp headers on; the size is computed again afterwards.
    pub fn stamp_all(&mut self, key: &str, value: &str) {
        for event in &mut self.events {
            event.stamp(key, value);
        }
        self.bytes = self.events.iter().map(ValidEvent::size).sum();
    }
}

use admission::GENERATED_ID_BYTES;

/// What [`ValidBatch::bytes`] will be if `events` are valid, computed without
/// allocating: lets admission refuse an overloaded request before it is validated.
pub fn estimated_size(events: &[proto::Event]) -> usize {
    events
        .iter()
        .map(|e| {
            let id = if e.id.is_empty() {
                GENERATED_ID_BYTES
            } else {
                e.id.len()
            };
            let attributes: usize = e.attributes.iter().map(|(k, v)| k.len() + v.len()).sum();
            admission::event_cost(
                e.payload.len(),
                id + e.topic.len() + e.content_type.len() + attributes,
                e.attributes.len(),
            )
        })
        .sum()
}

/// Validates a whole request. Every violation of every event is reported, so a
/// caller fixes its batch in one round trip; if there is any, no event is valid.
pub fn validate_batch(
    events: Vec<proto::Event>,
    limits: &Limits,
) -> Result<ValidBatch, Vec<FieldViolation>> {
    let mut violations = Vec::new();
    if events.is_empty() {
        violations.push(violation("events", "at least one event is required"));
        return Err(violations);
    }
    if events.len() > limits.max_batch_events {
        violations.push(violation(
            "events",
            format!(
                "{} events in one request, more than the limit of {} (max-batch-events)",
                events.len(),
                limits.max_batch_events
            ),
        ));
        return Err(violations);
    }
    let mut valid = Vec::with_capacity(events.len());
    for (index, event) in events.into_iter().enumerate() {
        if let Some(event) = validate_event(event, index, limits, &mut violations) {
            valid.push(event);
        }
    }
    if !violations.is_empty() {
        return Err(violations);
    }
    let bytes = valid.iter().map(ValidEvent::size).sum();
    Ok(ValidBatch {
        events: valid,
        bytes,
    })
}

/// Validates one event, found at `events[index]`, appending what is wrong with it.
pub fn validate_event(
    event: proto::Event,
    index: usize,
    limits: &Limits,
    violations: &mut Vec<FieldViolation>,
) -> Option<ValidEvent> {
    let before = violations.len();
    let field = |name: &str| format!("events[{index}].{name}");

    if event.topic.is_empty() {
        violations.push(violation(field("topic"), "topic is required"));
    } else {
        check_short_string(&event.topic, MAX_SHORT_STRING, &field("topic"), violations);
    }

    if !event.id.is_empty() {
        check_short_string(&event.id, MAX_ID_BYTES, &field("id"), violations);
    }

    if event.payload.len() > limits.max_event_bytes {
        violations.push(violation(
            field("payload"),
            format!(
                "payload is {} bytes, more than the limit of {} (max-event-bytes)",
                event.payload.len(),
                limits.max_event_bytes
            ),
        ));
    }

    if !event.content_type.is_empty() {
        let ct_field = field("content_type");
        check_short_string(&event.content_type, MAX_SHORT_STRING, &ct_field, violations);
        if !event.content_type.is_ascii() {
            // A MIME type is ASCII (RFC 2045); consumers match it byte for byte.
            violations.push(violation(
                ct_field.clone(),
                "must be ASCII (a MIME type such as application/json)",
            ));
        }
        if is_json(&event.content_type)
            && event.payload.len() <= limits.max_event_bytes
            && let Err(err) = serde_json::from_slice::<serde::de::IgnoredAny>(&event.payload)
        {
            violations.push(violation(
                field("payload"),
                format!(
                    "content type {} but payload is not JSON: {err}",
                    event.content_type
                ),
            ));
        }
    }

    check_attributes(&event.attributes, index, violations);

    let timestamp = match &event.time {
        None => None,
        Some(t) if t.seconds < 0 => {
            violations.push(violation(
                field("time"),
                "event time before 1970 cannot be sent as an AMQP timestamp",
            ));
            None
        }
        Some(t) if !(0..1_000_000_000).contains(&t.nanos) => {
            violations.push(violation(
                field("time.nanos"),
                "nanos must be in 0..999999999",
            ));
            None
        }
        Some(t) => u64::try_from(t.seconds).ok(),
    };

    if violations.len() > before {
        return None;
    }
    let id = if event.id.is_empty() {
        uuid::Uuid::now_v7().to_string()
    } else {
        event.id
    };
    let mut attributes: Vec<(String, String)> = event.attributes.into_iter().collect();
    // Sorted so the AMQP header table is the same whatever the map's iteration order.
    attributes.sort_unstable();
    Some(ValidEvent {
        id,
        topic: event.topic,
        // The decoded payload is a slice of tonic's receive buffer and keeps that whole
        // buffer alive for as long as the event waits for its confirm: a 100-byte event
        // can pin kilobytes that admission never counted. Its own allocation makes the
        // memory held what admission charges. (lapin copies it into frames anyway.)
        payload: Bytes::copy_from_slice(&event.payload),
        content_type: (!event.content_type.is_empty()).then_some(event.content_type),
        attributes,
        timestamp,
    })
}

fn check_attributes(
    attributes: &std::collections::HashMap<String, String>,
    index: usize,
    violations: &mut Vec<FieldViolation>,
) {
    if attributes.len() > MAX_ATTRIBUTES {
        violations.push(violation(
            format!("events[{index}].attributes"),
            format!(
                "{} attributes, more than the limit of {MAX_ATTRIBUTES}",
                attributes.len()
            ),
        ));
        return;
    }
    let total: usize = attributes.iter().map(|(k, v)| k.len() + v.len()).sum();
    if total > MAX_ATTRIBUTES_TOTAL_BYTES {
        violations.push(violation(
            format!("events[{index}].attributes"),
            format!(
                "attributes hold {total} bytes in all, more than the limit of {MAX_ATTRIBUTES_TOTAL_BYTES}"
            ),
        ));
        return;
    }
    let mut keys: Vec<&String> = attributes.keys().collect();
    keys.sort_unstable();
    for key in keys {
        let field = format!("events[{index}].attributes[{key:?}]");
        if key.is_empty() {
            violations.push(violation(field, "attribute key must not be empty"));
            continue;
        }
        if key.len() > MAX_ATTRIBUTE_KEY_BYTES {
            violations.push(violation(
                format!("events[{index}].attributes"),
                format!(
                    "attribute key of {} bytes, more than the limit of {MAX_ATTRIBUTE_KEY_BYTES}",
                    key.len()
                ),
            ));
            continue;
        }
        if key.chars().any(char::is_control) {
            violations.push(violation(
                field,
                "attribute key must not contain control characters",
            ));
            continue;
        }
        let lower = key.to_ascii_lowercase();
        if lower.starts_with("x-") || RESERVED_ATTRIBUTES.contains(&lower.as_str()) {
            violations.push(violation(
                field,
                format!(
                    "attribute name {key:?} is reserved (trace context, CC/BCC and x-* headers)"
                ),
            ));
            continue;
        }
        let value = &attributes[key];
        if value.len() > MAX_ATTRIBUTE_VALUE_BYTES {
            violations.push(violation(
                field,
                format!(
                    "attribute value of {} bytes, more than the limit of {MAX_ATTRIBUTE_VALUE_BYTES}",
                    value.len()
                ),
            ));
        }
    }
}

/// AMQP short strings carry at most 255 bytes; control characters in routing keys,
/// ids and content types break consumers and log lines, so they are refused.
fn check_short_string(value: &str, max: usize, field: &str, violations: &mut Vec<FieldViolation>) {
    if value.len() > max {
        violations.push(violation(
            field,
            format!("{} bytes, more than the limit of {max}", value.len()),
        ));
    } else if value.chars().any(char::is_control) {
        violations.push(violation(field, "must not contain control characters"));
    }
}

/// `application/json` and every `+json` structured-syntax type, parameters ignored.
fn is_json(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or_default().trim();
    essence.eq_ignore_ascii_case("application/json")
        || essence.len() > 5
            && essence.as_bytes()[essence.len() - 5..].eq_ignore_ascii_case(b"+json")
}

fn violation(field: impl Into<String>, description: impl Into<String>) -> FieldViolation {
    FieldViolation {
        field: field.into(),
        description: description.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_event_bytes: 1024,
        max_batch_events: 10,
    };

    fn event(topic: &str) -> proto::Event {
        proto::Event {
            topic: topic.into(),
            payload: Bytes::from_static(b"{}"),
            ..Default::default()
        }
    }

    fn fields(events: Vec<proto::Event>) -> Vec<String> {
        validate_batch(events, &LIMITS)
            .expect_err("batch should be invalid")
            .into_iter()
            .map(|v| v.field)
            .collect()
    }

    /// The intake admits a request for its bound before it is decoded; a tenant's
    /// events grow by the stamped header afterwards, and the bound must cover that.
    #[test]
    fn the_stamped_bound_covers_a_tenants_events_after_the_stamp() {
        use prost::Message as _;
        let events: Vec<proto::Event> = (0..10)
            .map(|_| proto::Event {
                topic: "t".into(),
                payload: Bytes::from(vec![b'x'; 1000]),
                ..Default::default()
            })
            .collect();
        let len = proto::PublishRequest {
            events: events.clone(),
            ..Default::default()
        }
        .encoded_len();
        let tenant = "a-tenant-with-a-long-name";
        let mut batch = validate_batch(events, &LIMITS).unwrap();
        batch.stamp_all(crate::auth::TENANT_HEADER, tenant);
        let unstamped = admission::message_bound(len, 10, 0);
        let stamped = admission::stamped_bound(len, 10, 0, Some(tenant));
        assert!(
            unstamped < batch.bytes(),
            "without the stamp counted, the bound {unstamped} is below the {} bytes held",
            batch.bytes()
        );
        assert!(
            stamped >= batch.bytes(),
            "the bound {stamped} is below the {} bytes the stamped events hold",
            batch.bytes()
        );
        assert_eq!(admission::stamped_bound(len, 10, 0, None), unstamped);
    }

    #[test]
    fn valid_event_keeps_everything_and_gets_an_id() {
        let mut e = event("orders.created");
        e.content_type = "application/json".into();
        e.attributes.insert("tenant".into(), "acme".into());
        e.time = Some(prost_types::Timestamp {
            seconds: 1_700_000_000,
            nanos: 5,
        });
        let batch = validate_batch(vec![e], &LIMITS).unwrap();
        let v = &batch.events()[0];
        assert_eq!(v.topic(), "orders.created");
        assert_eq!(v.payload().as_ref(), b"{}");
        assert_eq!(v.content_type(), Some("application/json"));
        assert_eq!(
            v.attributes(),
            &[("tenant".to_string(), "acme".to_string())]
        );
        assert_eq!(v.timestamp(), Some(1_700_000_000));
        let id = uuid::Uuid::parse_str(v.id()).unwrap();
        assert_eq!(id.get_version_num(), 7);
        assert_eq!(batch.bytes(), v.size());
    }

    #[test]
    fn caller_id_is_kept() {
        let mut e = event("t");
        e.id = "order-42".into();
        let batch = validate_batch(vec![e], &LIMITS).unwrap();
        assert_eq!(batch.ids(), vec!["order-42".to_string()]);
    }

    #[test]
    fn empty_and_oversized_batches_are_refused() {
        assert_eq!(fields(vec![]), vec!["events"]);
        assert_eq!(
            fields((0..11).map(|_| event("t")).collect()),
            vec!["events"]
        );
        assert!(validate_batch((0..10).map(|_| event("t")).collect(), &LIMITS).is_ok());
    }

    #[test]
    fn topic_rules() {
        assert_eq!(
            fields(vec![event("ok"), event("")]),
            vec!["events[1].topic"]
        );
        assert_eq!(
            fields(vec![event(&"a".repeat(256))]),
            vec!["events[0].topic"]
        );
        assert!(validate_batch(vec![event(&"a".repeat(255))], &LIMITS).is_ok());
        assert_eq!(fields(vec![event("a\nb")]), vec!["events[0].topic"]);
    }

    #[test]
    fn id_rules() {
        let mut long = event("t");
        long.id = "i".repeat(129);
        let mut ctrl = event("t");
        ctrl.id = "a\u{7}".into();
        assert_eq!(
            fields(vec![long, ctrl]),
            vec!["events[0].id", "events[1].id"]
        );
        let mut max = event("t");
        max.id = "i".repeat(128);
        assert!(validate_batch(vec![max], &LIMITS).is_ok());
    }

    #[test]
    fn payload_limit() {
        let mut big = event("t");
        big.payload = Bytes::from(vec![b'x'; 1025]);
        assert_eq!(fields(vec![big]), vec!["events[0].payload"]);
        let mut max = event("t");
        max.payload = Bytes::from(vec![b'x'; 1024]);
        assert!(validate_batch(vec![max], &LIMITS).is_ok());
    }

    #[test]
    fn json_payloads_must_parse() {
        for ct in [
            "application/json",
            "application/cloudevents+json",
            "Application/JSON; charset=utf-8",
        ] {
            let mut bad = event("t");
            bad.content_type = ct.into();
            bad.payload = Bytes::from_static(b"{not json");
            assert_eq!(fields(vec![bad]), vec!["events[0].payload"], "{ct}");
        }
        let mut text = event("t");
        text.content_type = "text/plain".into();
        text.payload = Bytes::from_static(b"{not json");
        assert!(validate_batch(vec![text], &LIMITS).is_ok());
    }

    #[test]
    fn non_ascii_content_types_are_refused_not_sliced() {
        // A byte offset 5 from the end falls inside a character in each of these.
        for ct in ["ééé", "a+jsoné", "\u{1F600}\u{1F600}", "é+json"] {
            let mut e = event("t");
            e.content_type = ct.into();
            assert_eq!(fields(vec![e]), vec!["events[0].content_type"], "{ct:?}");
        }
    }

    #[test]
    fn attribute_rules() {
        let mut many = event("t");
        for i in 0..65 {
            many.attributes.insert(format!("k{i}"), "v".into());
        }
        assert_eq!(fields(vec![many]), vec!["events[0].attributes"]);

        let mut long_key = event("t");
        long_key.attributes.insert("k".repeat(129), "v".into());
        assert_eq!(fields(vec![long_key]), vec!["events[0].attributes"]);

        let mut long_value = event("t");
        long_value.attributes.insert("k".into(), "v".repeat(4097));
        assert_eq!(
            fields(vec![long_value]),
            vec!["events[0].attributes[\"k\"]"]
        );

        for reserved in ["traceparent", "TraceState", "x-delay", "CC", "bcc"] {
            let mut e = event("t");
            e.attributes.insert(reserved.into(), "v".into());
            assert_eq!(
                fields(vec![e]),
                vec![format!("events[0].attributes[{reserved:?}]")]
            );
        }

        let mut over_total = event("t");
        for i in 0..64 {
            over_total
                .attributes
                .insert(format!("k{i}"), "v".repeat(4096));
        }
        assert_eq!(fields(vec![over_total]), vec!["events[0].attributes"]);

        // Exactly at the total limit: 16 × (128-byte key + 3968-byte value) = 64 KiB.
        let mut ok = event("t");
        for i in 0..16 {
            ok.attributes.insert(format!("{i:0>128}"), "v".repeat(3968));
        }
        assert!(validate_batch(vec![ok.clone()], &LIMITS).is_ok());
        ok.attributes.insert("k".into(), String::new());
        assert_eq!(fields(vec![ok]), vec!["events[0].attributes"]);
    }

    #[test]
    fn time_rules() {
        let mut before_epoch = event("t");
        before_epoch.time = Some(prost_types::Timestamp {
            seconds: -1,
            nanos: 0,
        });
        let mut bad_nanos = event("t");
        bad_nanos.time = Some(prost_types::Timestamp {
            seconds: 1,
            nanos: -3,
        });
        assert_eq!(
            fields(vec![before_epoch, bad_nanos]),
            vec!["events[0].time", "events[1].time.nanos"]
        );
    }

    #[test]
    fn every_violation_is_reported() {
        let mut e = event("");
        e.id = "i".repeat(200);
        e.content_type = "application/json".into();
        e.payload = Bytes::from_static(b"nope");
        let mut f = fields(vec![e, event("fine"), event("")]);
        f.sort();
        assert_eq!(
            f,
            vec![
                "events[0].id",
                "events[0].payload",
                "events[0].topic",
                "events[2].topic"
            ]
        );
    }

    #[test]
    fn estimated_size_matches_the_validated_size() {
        let mut with_id = event("abc");
        with_id.id = "id".into();
        with_id.content_type = "application/json".into();
        with_id.attributes.insert("k".into(), "vv".into());
        let events = vec![with_id, event("generated-id")];
        let estimate = estimated_size(&events);
        assert_eq!(estimate, validate_batch(events, &LIMITS).unwrap().bytes());
    }

    #[test]
    fn size_counts_payload_and_metadata() {
        let mut e = event("abc");
        e.id = "id".into();
        e.attributes.insert("k".into(), "vv".into());
        let batch = validate_batch(vec![e], &LIMITS).unwrap();
        // Payload `{}` twice (the event's copy and lapin's body frame), id, topic,
        // one attribute, and the fixed overheads.
        assert_eq!(
            batch.events()[0].size(),
            2 * 2 + 2 + 3 + 3 + admission::EVENT_OVERHEAD + admission::ATTRIBUTE_OVERHEAD
        );
    }

    #[test]
    fn the_message_bound_covers_every_validated_request() {
        use prost::Message;
        let mut full = event("a.b");
        full.attributes.insert("k".into(), "v".repeat(100));
        full.content_type = "application/json".into();
        let requests = [
            vec![event("t")],
            vec![full.clone(), event("generated"), full],
            (0..10).map(|i| event(&format!("t{i}"))).collect(),
        ];
        for events in requests {
            let request = proto::PublishRequest {
                sequence: 0,
                events: events.clone(),
            };
            let attributes = events.iter().map(|e| e.attributes.len()).sum();
            let bound = admission::message_bound(request.encoded_len(), events.len(), attributes);
            let cost = validate_batch(events, &LIMITS).unwrap().bytes();
            assert!(cost <= bound, "cost {cost} over the bound {bound}");
        }
    }
}
