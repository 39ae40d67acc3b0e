//! Properties of the code that reads untrusted bytes, checked by the fuzz targets in
//! `fuzz/` (for minutes, coverage-guided) and by a short proptest run in the unit
//! tests (on every test run). Each function panics when a property fails; any other
//! panic inside is a finding too.

use prost::Message;

use crate::{
    admission,
    api::framing::{Advance, FrameLimits, Framer, Stop},
    proto::PublishRequest,
    validate::{self, Limits},
};

/// What driving a [`Framer`] over a body gave.
#[derive(Debug, PartialEq, Eq)]
struct Walk {
    stops: Vec<Stop>,
    /// Whether it refused the body.
    refused: bool,
    /// Messages passed whole, last byte included.
    passed: usize,
}

/// Drives a framer over `data` cut into pieces at `cuts`, confirming every stop.
fn walk(limits: FrameLimits, data: &[u8], cuts: &[usize]) -> Walk {
    let mut framer = Framer::new(limits);
    let mut stops = Vec::new();
    let mut passed = 0;
    let mut bounds: Vec<usize> = cuts.iter().map(|c| c % (data.len() + 1)).collect();
    bounds.push(data.len());
    bounds.sort_unstable();
    let mut start = 0;
    for end in bounds {
        let mut piece = &data[start..end];
        start = end;
        loop {
            let Advance { taken: n, stop } = match framer.advance(piece) {
                Ok(advance) => advance,
                Err(_) => {
                    return Walk {
                        stops,
                        refused: true,
                        passed,
                    };
                }
            };
            assert!(n <= piece.len(), "took {n} of {} bytes", piece.len());
            piece = &piece[n..];
            if framer.at_boundary() {
                passed = stops.len() / 2;
            }
            match stop {
                Some(stop @ Stop::Message { len }) => {
                    assert!(len <= limits.max_message, "a message over the limit: {len}");
                    stops.push(stop);
                    framer.reserved();
                }
                Some(stop @ Stop::LastByte { events, .. }) => {
                    assert!(events <= limits.max_events, "{events} events passed");
                    stops.push(stop);
                    framer.admitted();
                    if framer.at_boundary() {
                        // An empty message: nothing more to pass.
                        passed = stops.len() / 2;
                    }
                }
                None => {
                    assert!(piece.is_empty(), "stopped with no stop and bytes left");
                    break;
                }
            }
        }
    }
    // An empty message at the very end still stops for its admission.
    while let Some(stop) = framer.stop() {
        stops.push(stop);
        framer.reserved();
        framer.admitted();
    }
    if framer.at_boundary() {
        passed = stops.len() / 2;
    }
    Walk {
        stops,
        refused: false,
        passed,
    }
}

/// The framing of `data` does not depend on how it is cut into chunks; every stop
/// is within the limits; and for every message it passes whole, what it counted is
/// what the message decodes to, and the bound it is admitted for covers what its
/// valid events cost.
pub fn framing(data: &[u8], cuts: &[usize]) {
    let limits = FrameLimits {
        max_message: 64 * 1024,
        max_events: 50,
        walk_fields: true,
    };
    let whole = walk(limits, data, &[]);
    let cut = walk(limits, data, cuts);
    assert_eq!(
        (&whole.stops, whole.refused),
        (&cut.stops, cut.refused),
        "the chunking changed the framing"
    );
    // A refused advance does not say how far it got: whether the last admitted
    // message's final byte passed before the refusal depends on the chunking, so
    // only the messages before it are surely whole.
    let passed = if whole.refused {
        (whole.stops.len() / 2).saturating_sub(1)
    } else {
        whole.passed
    };
    // Messages passed whole, in order: check each against the decoder.
    let mut at = 0;
    let mut stops = whole.stops.iter();
    for _ in 0..passed {
        let Some(Stop::Message { len }) = stops.next() else {
            break;
        };
        let Some(&Stop::LastByte {
            events,
            attributes,
            len: last_len,
        }) = stops.next()
        else {
            break;
        };
        assert_eq!(*len, last_len);
        let Some(message) = data.get(at + 5..at + 5 + len) else {
            break;
        };
        at += 5 + len;
        let Ok(request) = PublishRequest::decode(message) else {
            // The framer walks structure, not UTF-8: the decoder may still refuse.
            continue;
        };
        assert_eq!(request.events.len(), events, "events counted");
        let counted: usize = request.events.iter().map(|e| e.attributes.len()).sum();
        // Repeated keys collapse into one map entry: the count is an upper bound.
        assert!(counted <= attributes, "attributes counted");
        check_bound(request, *len, events, attributes);
    }
}

/// A decoded request, validated: the cost of its valid events stays within the
/// bound the intake admitted it for.
fn check_bound(request: PublishRequest, len: usize, events: usize, attributes: usize) {
    let limits = Limits {
        max_event_bytes: 64 * 1024,
        max_batch_events: 50,
    };
    if let Ok(batch) = validate::validate_batch(request.events, &limits) {
        let bound = admission::message_bound(len, events, attributes);
        assert!(
            batch.bytes() <= bound,
            "cost {} over the bound {bound}",
            batch.bytes()
        );
    }
}

/// Validation of any decodable request never panics, refuses with at least one
/// named field or accepts, and what it accepts has ids, sizes that match the cheap
/// estimate, and events within the limits.
pub fn validation(data: &[u8]) {
    let Ok(request) = PublishRequest::decode(data) else {
        return;
    };
    for limits in [
        Limits {
            max_event_bytes: 1024,
            max_batch_events: 10,
        },
        Limits {
            max_event_bytes: 1 << 20,
            max_batch_events: 1000,
        },
    ] {
        let estimate = validate::estimated_size(&request.events);
        match validate::validate_batch(request.events.clone(), &limits) {
            Ok(batch) => {
                assert!(batch.len() <= limits.max_batch_events);
                assert_eq!(batch.bytes(), estimate, "estimate and cost differ");
                for event in batch.events() {
                    assert!(!event.id().is_empty() && !event.topic().is_empty());
                    assert!(event.payload().len() <= limits.max_event_bytes);
                }
            }
            Err(violations) => {
                assert!(!violations.is_empty(), "refused without a reason");
                for v in violations {
                    assert!(!v.field.is_empty() && !v.description.is_empty());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::proto::Event;

    /// A request with arbitrary events, some valid, some not.
    fn request() -> impl Strategy<Value = PublishRequest> {
        let event = (
            "[a-z.]{0,12}",
            proptest::collection::vec(any::<u8>(), 0..64),
            "[ -~é]{0,8}",
            proptest::collection::btree_map("[a-z]{0,6}", "[ -~]{0,6}", 0..4),
        )
            .prop_map(|(topic, payload, content_type, attributes)| Event {
                topic,
                payload: payload.into(),
                content_type,
                attributes: attributes.into_iter().collect(),
                ..Event::default()
            });
        proptest::collection::vec(event, 0..8).prop_map(|events| PublishRequest {
            events,
            sequence: 0,
        })
    }

    fn framed(requests: &[PublishRequest]) -> Vec<u8> {
        let mut out = Vec::new();
        for request in requests {
            let body = request.encode_to_vec();
            out.push(0);
            out.extend_from_slice(&(body.len() as u32).to_be_bytes());
            out.extend_from_slice(&body);
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn framing_of_arbitrary_bytes(
            data in proptest::collection::vec(any::<u8>(), 0..512),
            cuts in proptest::collection::vec(any::<usize>(), 0..8),
        ) {
            framing(&data, &cuts);
        }

        #[test]
        fn framing_of_real_requests(
            requests in proptest::collection::vec(request(), 1..4),
            cuts in proptest::collection::vec(any::<usize>(), 0..8),
            flip in any::<(usize, u8)>(),
        ) {
            let mut data = framed(&requests);
            framing(&data, &cuts);
            // One byte changed anywhere.
            if !data.is_empty() {
                let at = flip.0 % data.len();
                data[at] ^= flip.1 | 1;
                framing(&data, &cuts);
            }
        }

        #[test]
        fn validation_of_real_requests(request in request()) {
            validation(&request.encode_to_vec());
        }

        #[test]
        fn validation_of_arbitrary_bytes(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            validation(&data);
        }
    }
}
