//! The AMQP side of one event: properties, publish with `mandatory`, and the confirm.

use lapin::{
    BasicProperties, Channel, Confirmation,
    options::BasicPublishOptions,
    types::{AMQPValue, FieldTable, LongString, ShortString},
};
use tokio::time::{Instant, timeout_at};

use super::PublishError;
use crate::validate::ValidEvent;

/// AMQP `delivery_mode` 2: the broker writes the message to disk in durable queues.
const PERSISTENT: u8 = 2;

/// Publishes one event and waits for its confirm, both before `deadline`.
///
/// The future owns the `PublisherConfirm` until it settles; it must therefore run in a
/// task the caller cannot cancel (see `Publisher::publish`): lapin keeps a dropped,
/// unsettled confirm in a list that only `wait_for_confirms` empties.
pub(super) async fn publish_one(
    channel: &Channel,
    exchange: &ShortString,
    event: &ValidEvent,
    trace: &[(&'static str, String)],
    deadline: Instant,
    accept_unroutable: bool,
) -> Result<(), PublishError> {
    let routing_key = short(event.topic())?;
    let properties = properties(event, trace)?;
    let options = BasicPublishOptions {
        mandatory: true,
        immediate: false,
    };
    let publish = channel.basic_publish(
        exchange.clone(),
        routing_key,
        options,
        event.payload(),
        properties,
    );
    let confirm = match timeout_at(deadline, publish).await {
        Ok(Ok(confirm)) => confirm,
        Ok(Err(err)) => return Err(failed(&err)),
        Err(_) => return Err(PublishError::ConfirmTimeout),
    };
    match timeout_at(deadline, confirm).await {
        Ok(Ok(Confirmation::Ack(None))) => Ok(()),
        Ok(Ok(Confirmation::Ack(Some(_)))) if accept_unroutable => Ok(()),
        Ok(Ok(Confirmation::Ack(Some(returned)))) => Err(PublishError::Unroutable {
            topic: event.topic().to_owned(),
            reason: returned.reply_text.to_string(),
        }),
        Ok(Ok(Confirmation::Nack(_))) => Err(PublishError::Nacked),
        Ok(Ok(Confirmation::NotRequested)) => Err(PublishError::Channel(
            "channel is not in confirm mode".to_owned(),
        )),
        Ok(Err(err)) => Err(failed(&err)),
        Err(_) => Err(PublishError::ConfirmTimeout),
    }
}

/// What an error of lapin's means for an event in flight: its connection failed
/// (socket, heartbeat, the broker closed the connection, its state; a channel in
/// state `Error`, which lapin sets only when the connection fails) or only its
/// channel did.
fn failed(err: &lapin::Error) -> PublishError {
    let connection = err.is_io_error()
        || err.is_amqp_hard_error()
        || matches!(
            err.kind(),
            lapin::ErrorKind::InvalidConnectionState(_)
                | lapin::ErrorKind::InvalidChannelState(lapin::ChannelState::Error, _)
                | lapin::ErrorKind::MissingHeartbeatError
                | lapin::ErrorKind::ParsingError(_)
        );
    if connection {
        PublishError::Connection(err.to_string())
    } else {
        PublishError::Channel(err.to_string())
    }
}

/// Maps an event onto AMQP properties: persistent, `message_id` = id, content type,
/// timestamp, attributes and the W3C trace context (`trace`) as string headers.
fn properties(
    event: &ValidEvent,
    trace: &[(&'static str, String)],
) -> Result<BasicProperties, PublishError> {
    let mut props = BasicProperties::default()
        .with_delivery_mode(PERSISTENT)
        .with_message_id(short(event.id())?);
    if let Some(content_type) = event.content_type() {
        props = props.with_content_type(short(content_type)?);
    }
    if let Some(timestamp) = event.timestamp() {
        props = props.with_timestamp(timestamp);
    }
    if !event.attributes().is_empty() || !trace.is_empty() {
        let mut headers = FieldTable::default();
        // Validation refuses attribute names `traceparent`/`tracestate`: no clash.
        let trace = trace.iter().map(|(k, v)| (*k, v.as_str()));
        let attributes = event
            .attributes()
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()));
        for (key, value) in attributes.chain(trace) {
            headers.insert(
                short(key)?,
                AMQPValue::LongString(LongString::from(value.as_bytes())),
            );
        }
        props = props.with_headers(headers);
    }
    Ok(props)
}

/// Validation keeps every short string within 255 bytes; this keeps lapin's
/// panicking `From<&str>` off the request path all the same.
fn short(value: &str) -> Result<ShortString, PublishError> {
    ShortString::try_new(value).map_err(|err| PublishError::Channel(err.to_string()))
}

#[cfg(test)]
mod tests {
    use lapin::{ChannelState, ConnectionState, ErrorKind};

    use super::*;

    /// A connection-level failure makes a republish skip every channel of that
    /// connection; a channel-level one only that channel (the others still work).
    #[test]
    fn lapin_errors_are_told_apart_by_what_they_took_down() {
        let connection = [
            lapin::Error::from(std::io::Error::from(std::io::ErrorKind::BrokenPipe)),
            ErrorKind::InvalidConnectionState(ConnectionState::Error).into(),
            // lapin sets a channel's state to Error only when its connection failed.
            ErrorKind::InvalidChannelState(ChannelState::Error, "basic.publish").into(),
            ErrorKind::MissingHeartbeatError.into(),
        ];
        for err in connection {
            assert!(matches!(failed(&err), PublishError::Connection(_)), "{err}");
        }
        // Closed by the broker on its own (say the exchange was deleted) or by us.
        let channel: lapin::Error =
            ErrorKind::InvalidChannelState(ChannelState::Closed, "basic.publish").into();
        assert!(matches!(failed(&channel), PublishError::Channel(_)));
    }
}
