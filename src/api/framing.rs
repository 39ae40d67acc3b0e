//! The framing of a gRPC request body, read as its bytes arrive: where each message
//! begins and ends, and how many events a `PublishRequest` holds, known before the
//! message is decoded and without keeping any of its bytes.
//!
//! A gRPC message is a 5-byte prefix (a compression flag and a big-endian `u32`
//! length) and that many bytes of protobuf. [`Framer`] walks the prefix, stops at the
//! end of it so the caller can reserve room for the whole message before taking any
//! more of it off the connection, then walks the message's top-level protobuf fields
//! (`PublishRequest`: field 1 `events`, field 2 `sequence`, unknown fields skipped),
//! counting events, and stops again just before the last byte, so the caller can admit
//! the counted events before the decoder gets the whole message. It is pure: no I/O,
//! no allocation, any byte sequence in any chunking gives the same answers.

/// Bytes of a gRPC message prefix.
pub const PREFIX_BYTES: usize = 5;

/// The smallest encoding of an event that can be valid: the field tag and length of
/// the event, and a topic (required) of one byte with its own tag and length.
pub const MIN_VALID_EVENT_BYTES: usize = 2 + 3;

/// Most attribute entries one event may hold (validation's limit), checked here so
/// that decoding cannot turn a few bytes per entry into a map entry each.
pub const MAX_ATTRIBUTES: usize = crate::validate::MAX_ATTRIBUTES;

/// Limits checked while the bytes pass, before anything is decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameLimits {
    /// Largest message accepted (the decoding limit).
    pub max_message: usize,
    /// Most events one message may hold (`--max-batch-events`).
    pub max_events: usize,
    /// Walk the messages' fields as `PublishRequest`s, counting events; otherwise
    /// only the framing is read (other services' messages).
    pub walk_fields: bool,
}

/// Why a body was refused while its bytes passed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The prefix declares more than the decoding limit.
    #[error("request message of {len} bytes is larger than the limit of {max} bytes")]
    TooLarge {
        /// Declared length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// More events than one request may hold.
    #[error("a request holds more than {max} events (max-batch-events)")]
    TooManyEvents {
        /// The limit.
        max: usize,
    },
    /// An event with more attribute entries than an event may hold.
    #[error("events[{index}].attributes: more than {max} attributes")]
    TooManyAttributes {
        /// Position of the event in the request.
        index: usize,
        /// The limit.
        max: usize,
    },
    /// An event too short to carry the required topic.
    #[error("events[{index}]: an event of {len} bytes cannot carry a topic, which is required")]
    EventWithoutTopic {
        /// Position of the event in the request.
        index: usize,
        /// Its encoded length.
        len: usize,
    },
    /// The protobuf is not well formed (a bad tag, a group, a field running past the
    /// end of the message, or a varint longer than ten bytes).
    #[error("malformed request message: {0}")]
    Malformed(&'static str),
}

/// What the caller must do before passing more bytes on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// A message of `len` bytes begins: reserve room for all of it.
    Message {
        /// Declared length of the message.
        len: usize,
    },
    /// Only the last byte of the message is left: admit its `events` first.
    LastByte {
        /// Events the message holds.
        events: usize,
        /// Attribute entries its events hold, all together.
        attributes: usize,
        /// Length of the message.
        len: usize,
    },
}

/// Result of [`Framer::advance`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Advance {
    /// Leading bytes of the input taken; they may be passed on.
    pub taken: usize,
    /// Why it stopped before the end of the input, if it did.
    pub stop: Option<Stop>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Reading a prefix; `have` of its bytes seen, `len` the length so far.
    Prefix { have: usize, len: u32 },
    /// The prefix is read: waiting for [`Framer::reserved`].
    Reserve { len: usize },
    /// Inside a message, `left` bytes to go; `admitted` once its events are.
    Body {
        left: usize,
        len: usize,
        admitted: bool,
    },
    /// Before the last byte (or at once, for an empty message): waiting for
    /// [`Framer::admitted`].
    Admit {
        events: usize,
        attributes: usize,
        len: usize,
    },
}

/// Where a top-level protobuf field walk is, across chunks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Field {
    /// Reading a tag varint.
    Tag(Varint),
    /// Reading the length varint of a field (`counted`: the caller wants its length).
    Length { counted: bool, varint: Varint },
    /// Skipping a varint value.
    VarintValue(Varint),
    /// Skipping `left` bytes of a fixed or length-delimited value.
    Skip { left: u64 },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
struct Varint {
    value: u64,
    shift: u32,
}

impl Varint {
    /// Feeds one byte; `Some(value)` when the varint is complete.
    fn push(&mut self, byte: u8) -> Result<Option<u64>, FrameError> {
        if self.shift >= 64 {
            return Err(FrameError::Malformed("varint longer than ten bytes"));
        }
        self.value |= u64::from(byte & 0x7f) << self.shift;
        self.shift += 7;
        Ok((byte & 0x80 == 0).then_some(self.value))
    }
}

/// Walks a request body's messages; see the module documentation.
#[derive(Clone, Debug)]
pub struct Framer {
    limits: FrameLimits,
    state: State,
    field: Field,
    /// Events counted in the current message.
    events: usize,
    /// Attribute entries counted in the current message's events.
    attributes: usize,
    /// The event being walked, if inside one.
    event: Option<EventWalk>,
}

const BOUNDARY: State = State::Prefix { have: 0, len: 0 };

impl Framer {
    /// A framer at the start of a body.
    pub fn new(limits: FrameLimits) -> Self {
        Self {
            limits,
            state: BOUNDARY,
            field: Field::Tag(Varint::default()),
            events: 0,
            attributes: 0,
            event: None,
        }
    }

    /// True between messages (nothing of a message is half read): a body may end here.
    pub fn at_boundary(&self) -> bool {
        self.state == BOUNDARY
    }

    /// The stop the framer is waiting at, if any.
    pub fn stop(&self) -> Option<Stop> {
        match self.state {
            State::Reserve { len } => Some(Stop::Message { len }),
            State::Admit {
                events,
                attributes,
                len,
            } => Some(Stop::LastByte {
                events,
                attributes,
                len,
            }),
            _ => None,
        }
    }

    /// Confirms the room for the message announced by [`Stop::Message`].
    pub fn reserved(&mut self) {
        if let State::Reserve { len } = self.state {
            self.field = Field::Tag(Varint::default());
            self.events = 0;
            self.attributes = 0;
            self.event = None;
            self.state = if len == 0 {
                State::Admit {
                    events: 0,
                    attributes: 0,
                    len: 0,
                }
            } else {
                State::Body {
                    left: len,
                    len,
                    admitted: false,
                }
            };
        }
    }

    /// Confirms the admission announced by [`Stop::LastByte`].
    pub fn admitted(&mut self) {
        if let State::Admit { len, .. } = self.state {
            self.state = if len == 0 {
                BOUNDARY
            } else {
                State::Body {
                    left: 1,
                    len,
                    admitted: true,
                }
            };
        }
    }

    /// Takes as much of `data` as it may: every byte up to the next stop, which it
    /// then names (also when it was reached with the last byte of `data`).
    pub fn advance(&mut self, data: &[u8]) -> Result<Advance, FrameError> {
        let mut taken = 0;
        while taken < data.len() && self.stop().is_none() {
            match self.state {
                State::Prefix { have, len } => {
                    let byte = data[taken];
                    taken += 1;
                    // Byte 0 is the compression flag; the decoder judges it.
                    let len = if have == 0 {
                        0
                    } else {
                        len << 8 | u32::from(byte)
                    };
                    if have + 1 < PREFIX_BYTES {
                        self.state = State::Prefix {
                            have: have + 1,
                            len,
                        };
                        continue;
                    }
                    let len = len as usize;
                    if len > self.limits.max_message {
                        return Err(FrameError::TooLarge {
                            len,
                            max: self.limits.max_message,
                        });
                    }
                    self.state = State::Reserve { len };
                }
                State::Body {
                    left,
                    len,
                    admitted,
                } => {
                    if left == 1 && !admitted {
                        // The last byte cannot add an event (an event is at least
                        // MIN_VALID_EVENT_BYTES long): the count is final.
                        self.state = State::Admit {
                            events: self.events,
                            attributes: self.attributes + self.event.map_or(0, |e| e.attributes),
                            len,
                        };
                        continue;
                    }
                    // Up to, not into, the last byte until admitted.
                    let room = if admitted { left } else { left - 1 };
                    let n = if self.limits.walk_fields {
                        self.walk(&data[taken..], room)?
                    } else {
                        (data.len() - taken).min(room)
                    };
                    taken += n;
                    let left = left - n;
                    if left == 0 {
                        if self.field != Field::Tag(Varint::default()) || self.event.is_some() {
                            return Err(FrameError::Malformed("a field runs past the end"));
                        }
                        self.state = BOUNDARY;
                    } else {
                        self.state = State::Body {
                            left,
                            len,
                            admitted,
                        };
                    }
                }
                State::Reserve { .. } | State::Admit { .. } => break,
            }
        }
        Ok(Advance {
            taken,
            stop: self.stop(),
        })
    }

    /// Walks the fields over at most `room` bytes of `data`; returns how many it
    /// took (all it was given, up to `room`).
    fn walk(&mut self, data: &[u8], room: usize) -> Result<usize, FrameError> {
        let n = data.len().min(room);
        let mut i = 0;
        while i < n {
            let Some(event) = &mut self.event else {
                i += self.walk_request(&data[i..n])?;
                continue;
            };
            // Inside an event: at most its own bytes.
            // `left` is the peer's varint: anything up to 2^64 - 1.
            let end = n.min(i.saturating_add(usize::try_from(event.left).unwrap_or(usize::MAX)));
            let k = walk_fields(&mut event.field, &data[i..end], |number| {
                if number == 5 {
                    event.attributes += 1;
                }
            })?;
            if event.attributes > MAX_ATTRIBUTES {
                return Err(FrameError::TooManyAttributes {
                    index: self.events - 1,
                    max: MAX_ATTRIBUTES,
                });
            }
            event.left -= k as u64;
            i += k;
            if event.left == 0 {
                if event.field != Field::Tag(Varint::default()) {
                    return Err(FrameError::Malformed(
                        "a field runs past the end of its event",
                    ));
                }
                self.attributes += event.attributes;
                self.event = None;
            }
        }
        Ok(n)
    }

    /// Walks request-level fields until an event's content begins (or `data` ends).
    fn walk_request(&mut self, data: &[u8]) -> Result<usize, FrameError> {
        let mut i = 0;
        while i < data.len() {
            match &mut self.field {
                Field::Skip { left } => {
                    let k = (*left).min((data.len() - i) as u64);
                    *left -= k;
                    i += k as usize;
                    if *left == 0 {
                        self.field = Field::Tag(Varint::default());
                    }
                }
                Field::Tag(varint) => {
                    let byte = data[i];
                    i += 1;
                    if let Some(tag) = varint.push(byte)? {
                        self.field = after_tag(tag, |number| number == 1)?;
                    }
                }
                Field::Length { counted, varint } => {
                    let is_event = *counted;
                    let byte = data[i];
                    i += 1;
                    let Some(len) = varint.push(byte)? else {
                        continue;
                    };
                    self.field = Field::Tag(Varint::default());
                    if !is_event {
                        if len > 0 {
                            self.field = Field::Skip { left: len };
                        }
                        continue;
                    }
                    let index = self.events;
                    if len < (MIN_VALID_EVENT_BYTES - 2) as u64 {
                        return Err(FrameError::EventWithoutTopic {
                            index,
                            len: usize::try_from(len).unwrap_or(usize::MAX),
                        });
                    }
                    if index >= self.limits.max_events {
                        return Err(FrameError::TooManyEvents {
                            max: self.limits.max_events,
                        });
                    }
                    self.events += 1;
                    self.event = Some(EventWalk {
                        left: len,
                        field: Field::Tag(Varint::default()),
                        attributes: 0,
                    });
                    return Ok(i);
                }
                Field::VarintValue(varint) => {
                    let byte = data[i];
                    i += 1;
                    if varint.push(byte)?.is_some() {
                        self.field = Field::Tag(Varint::default());
                    }
                }
            }
        }
        Ok(i)
    }
}

/// The walk through one event's fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct EventWalk {
    /// Bytes of the event still to come.
    left: u64,
    field: Field,
    /// `attributes` entries (field 5) seen so far.
    attributes: usize,
}

/// Walks the fields of one level over all of `data`, calling `seen` with the number
/// of every length-delimited field whose length is read.
fn walk_fields(
    field: &mut Field,
    data: &[u8],
    mut seen: impl FnMut(u64),
) -> Result<usize, FrameError> {
    let mut i = 0;
    while i < data.len() {
        match field {
            Field::Skip { left } => {
                let k = (*left).min((data.len() - i) as u64);
                *left -= k;
                i += k as usize;
                if *left == 0 {
                    *field = Field::Tag(Varint::default());
                }
            }
            Field::Tag(varint) => {
                let byte = data[i];
                i += 1;
                if let Some(tag) = varint.push(byte)? {
                    *field = after_tag(tag, |_| false)?;
                    if let Field::Length { .. } = field {
                        seen(tag >> 3);
                    }
                }
            }
            Field::Length { varint, .. } => {
                let byte = data[i];
                i += 1;
                if let Some(len) = varint.push(byte)? {
                    *field = if len == 0 {
                        Field::Tag(Varint::default())
                    } else {
                        Field::Skip { left: len }
                    };
                }
            }
            Field::VarintValue(varint) => {
                let byte = data[i];
                i += 1;
                if varint.push(byte)?.is_some() {
                    *field = Field::Tag(Varint::default());
                }
            }
        }
    }
    Ok(i)
}

/// The field a tag begins; `counted(number)` marks the length-delimited fields the
/// caller wants to know the length of.
fn after_tag(tag: u64, counted: impl Fn(u64) -> bool) -> Result<Field, FrameError> {
    let number = tag >> 3;
    if number == 0 {
        return Err(FrameError::Malformed("field number 0"));
    }
    match tag & 7 {
        0 => Ok(Field::VarintValue(Varint::default())),
        1 => Ok(Field::Skip { left: 8 }),
        2 => Ok(Field::Length {
            counted: counted(number),
            varint: Varint::default(),
        }),
        5 => Ok(Field::Skip { left: 4 }),
        _ => Err(FrameError::Malformed("group or unknown wire type")),
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;
    use crate::proto::{Event, PublishRequest};

    const LIMITS: FrameLimits = FrameLimits {
        max_message: 1 << 20,
        max_events: 100,
        walk_fields: true,
    };

    fn framed(request: &PublishRequest) -> Vec<u8> {
        let body = request.encode_to_vec();
        let mut out = vec![0];
        out.extend_from_slice(&(body.len() as u32).to_be_bytes());
        out.extend_from_slice(&body);
        out
    }

    fn event(topic: &str, payload: &[u8]) -> Event {
        Event {
            topic: topic.into(),
            payload: payload.to_vec().into(),
            ..Event::default()
        }
    }

    fn with_attributes(mut e: Event, n: usize) -> Event {
        for i in 0..n {
            e.attributes.insert(format!("k{i}"), "v".into());
        }
        e
    }

    /// Feeds `body` in chunks of `chunk` bytes, confirming every stop; returns the
    /// stops seen, in order.
    pub(super) fn run(
        limits: FrameLimits,
        body: &[u8],
        chunk: usize,
    ) -> Result<Vec<Stop>, FrameError> {
        let mut framer = Framer::new(limits);
        let mut stops = Vec::new();
        for piece in body.chunks(chunk.max(1)) {
            let mut rest = piece;
            loop {
                let advance = framer.advance(rest)?;
                rest = &rest[advance.taken..];
                match advance.stop {
                    Some(stop @ Stop::Message { .. }) => {
                        stops.push(stop);
                        framer.reserved();
                    }
                    Some(stop @ Stop::LastByte { .. }) => {
                        stops.push(stop);
                        framer.admitted();
                    }
                    None => break,
                }
            }
            assert!(rest.is_empty(), "bytes left with no stop");
        }
        // An empty message at the very end still stops for its admission.
        while let Some(stop) = framer.stop() {
            stops.push(stop);
            framer.reserved();
            framer.admitted();
        }
        if !framer.at_boundary() {
            return Err(FrameError::Malformed("body ends inside a message"));
        }
        Ok(stops)
    }

    #[test]
    fn stops_at_each_message_and_before_its_last_byte_in_any_chunking() {
        let first = PublishRequest {
            sequence: 0,
            events: vec![
                event("a", b"{}"),
                with_attributes(event("b.c", &[7; 300]), 2),
            ],
        };
        let empty = PublishRequest::default();
        let third = PublishRequest {
            sequence: 0,
            events: vec![event("t", b"")],
        };
        // Field 2 (`sequence`, a varint) and an unknown field 7 are walked over.
        let mut first_bytes = first.encode_to_vec();
        first_bytes.extend([0x10, 0x89, 0x01, 0x3a, 0x02, 0xff, 0xff]);
        let mut body = vec![0];
        body.extend_from_slice(&(first_bytes.len() as u32).to_be_bytes());
        body.extend_from_slice(&first_bytes);
        body.extend(framed(&empty));
        body.extend(framed(&third));
        let len = |r: &PublishRequest| r.encoded_len();
        let expected = vec![
            Stop::Message {
                len: first_bytes.len(),
            },
            Stop::LastByte {
                events: 2,
                attributes: 2,
                len: first_bytes.len(),
            },
            Stop::Message { len: 0 },
            Stop::LastByte {
                events: 0,
                attributes: 0,
                len: 0,
            },
            Stop::Message { len: len(&third) },
            Stop::LastByte {
                events: 1,
                attributes: 0,
                len: len(&third),
            },
        ];
        for chunk in [1, 2, 3, 5, 7, 64, 4096] {
            assert_eq!(
                run(LIMITS, &body, chunk).unwrap(),
                expected,
                "chunk {chunk}"
            );
        }
    }

    #[test]
    fn refuses_before_decoding() {
        // Declared past the limit: refused at the prefix.
        let mut huge = vec![0];
        huge.extend_from_slice(&(2u32 << 20).to_be_bytes());
        assert_eq!(
            run(LIMITS, &huge, 5),
            Err(FrameError::TooLarge {
                len: 2 << 20,
                max: 1 << 20
            })
        );
        // One event too many.
        let many = PublishRequest {
            sequence: 0,
            events: (0..101).map(|_| event("t", b"")).collect(),
        };
        assert_eq!(
            run(LIMITS, &framed(&many), 4096),
            Err(FrameError::TooManyEvents { max: 100 })
        );
        // Empty events cannot be valid, and would decode to far more than they weigh.
        let empty_events = PublishRequest {
            sequence: 0,
            events: vec![event("t", b""), Event::default()],
        };
        assert_eq!(
            run(LIMITS, &framed(&empty_events), 3),
            Err(FrameError::EventWithoutTopic { index: 1, len: 0 })
        );
        // Too many attributes on one event, refused before the map is built.
        let attributes = PublishRequest {
            sequence: 0,
            events: vec![event("t", b""), with_attributes(event("t", b""), 65)],
        };
        assert_eq!(
            run(LIMITS, &framed(&attributes), 7),
            Err(FrameError::TooManyAttributes { index: 1, max: 64 })
        );
        // A truncated field.
        let mut truncated = framed(&PublishRequest {
            sequence: 0,
            events: vec![event("topic", b"payload")],
        });
        truncated[4] -= 3;
        truncated.truncate(truncated.len() - 3);
        assert!(matches!(
            run(LIMITS, &truncated, 2),
            Err(FrameError::Malformed(_))
        ));
        // An event whose length is the largest varint (found by the fuzzer: the end
        // of the event's bytes once overflowed and sliced backwards).
        let mut huge = vec![0x0a];
        huge.extend_from_slice(&[0xff; 9]);
        huge.push(0x01);
        huge.extend_from_slice(&[0x12, 0x01, b't']);
        let mut body = vec![0];
        body.extend_from_slice(&(huge.len() as u32).to_be_bytes());
        body.extend_from_slice(&huge);
        assert!(matches!(
            run(LIMITS, &body, 4096),
            Err(FrameError::Malformed(_))
        ));
        // A group (wire type 3) is not part of a PublishRequest.
        let group = [0, 0, 0, 0, 2, 0x0b, 0x0c];
        assert!(matches!(
            run(LIMITS, &group, 1),
            Err(FrameError::Malformed(_))
        ));
    }
}
