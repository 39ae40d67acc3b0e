//! Abuse: what callers that send large requests faster than they are decoded do to
//! the server's memory. A raw HTTP/2 client (no gRPC library would send this) floods
//! a server with `--buffer-bytes 8MiB` with requests each declared at the largest
//! size the server takes, with the broker healthy and then stalled, and the server's
//! peak RSS over idle is printed for each flood:
//!
//! - 16 connections x 16 unary `Publish` calls,
//! - 16 connections x 16 `PublishStream` calls,
//! - 400 connections x 4 `PublishStream` calls.
//!
//! Then the per-event cost: with the broker stalled, streams of 1 KiB events fill
//! the buffer, and the RSS growth divided by the events admitted is what one
//! in-flight event costs (README, "Memory bound").

use std::{
    future::poll_fn,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use bytes::Bytes;
use h2::client::SendRequest;
use ingest::proto::{Event, PublishRequest};
use prost::Message;
use tokio::{net::TcpStream, task::JoinSet};

use crate::{
    broker::split_authority,
    plan::Tally,
    progress::Progress,
    proxy::{Mode, Proxy},
    scenarios::{Env, Measured, Stats},
    server::{ChildServer, Dial},
};

/// The server's byte budget for every flood.
const BUFFER: &str = "8MiB";
/// The largest request message with that budget (its receive share).
const MAX_MESSAGE: usize = 2 * 1024 * 1024;
/// How long each flood runs.
const FLOOD: Duration = Duration::from_secs(3);
const MIB: f64 = 1024.0 * 1024.0;

/// Runs every flood, then the per-event measurement.
pub async fn run(env: &Env<'_>, progress: &Progress) -> anyhow::Result<Measured> {
    let bin = env.ingest_bin.context("abuse needs a server it starts")?;
    let mut notes = Vec::new();
    let mut peak = 0;
    let started = Instant::now();
    for (connections, calls, method) in [
        (16, 16, "Publish"),
        (16, 16, "PublishStream"),
        (400, 4, "PublishStream"),
    ] {
        for stalled in [false, true] {
            let label = format!(
                "{connections} connections x {calls} {method}, broker {}",
                if stalled { "stalled" } else { "healthy" }
            );
            progress.status(if stalled {
                "flood, broker stalled"
            } else {
                "flood"
            });
            let topology = env.topology("abuse", true);
            env.broker.declare(&topology, env.queue_expiry()).await?;
            let flood = flood(
                env,
                bin,
                &topology.exchange,
                stalled,
                connections,
                calls,
                method,
            )
            .await;
            env.broker.remove(&topology).await?;
            let (idle, top, sent) = flood?;
            peak = peak.max(top);
            notes.push(format!(
                "{label}: handed over {:.0} MiB; RSS idle {:.1} MiB, peak {:.1} MiB (+{:.1} MiB)",
                sent as f64 / MIB,
                idle as f64 / MIB,
                top as f64 / MIB,
                top.saturating_sub(idle) as f64 / MIB
            ));
        }
    }
    progress.status("per-event cost");
    let topology = env.topology("abuse-fill", true);
    env.broker.declare(&topology, env.queue_expiry()).await?;
    let fill = per_event(env, bin, &topology.exchange).await;
    env.broker.remove(&topology).await?;
    notes.push(fill?);
    Ok(Measured {
        setup: "raw HTTP/2 floods, --buffer-bytes 8MiB".to_owned(),
        tally: Tally::default(),
        elapsed: started.elapsed(),
        server: Some(Stats {
            cpu_seconds: 0.0,
            peak_rss: peak,
        }),
        queue_expected: 0,
        queue_actual: 0,
        notes,
    })
}

/// A server behind a proxy (stalled or not), flooded; returns idle RSS, peak RSS
/// and the bytes the flood handed over.
async fn flood(
    env: &Env<'_>,
    bin: &std::path::Path,
    exchange: &str,
    stalled: bool,
    connections: usize,
    calls: usize,
    method: &'static str,
) -> anyhow::Result<(u64, u64, u64)> {
    let (head, upstream, tail) = split_authority(&env.args.amqp_url)?;
    let proxy = Proxy::start(upstream).await?;
    let url = format!("{head}{}{tail}", proxy.addr());
    let child_env = [
        ("INGEST_BUFFER_BYTES", BUFFER.to_owned()),
        ("INGEST_MAX_EVENT_BYTES", "2MiB".to_owned()),
        ("INGEST_CONFIRM_TIMEOUT", "60s".to_owned()),
        ("RUST_LOG", "error".to_owned()),
    ];
    let child = ChildServer::start(bin, &url, exchange, &child_env, Dial::default()).await?;
    let idle = child.rss()?;
    if stalled {
        proxy.set_mode(Mode::Stall);
    }
    let sent = Arc::new(AtomicU64::new(0));
    let mut floods = JoinSet::new();
    for _ in 0..connections {
        let client = connect(&child.addr).await?;
        for _ in 0..calls {
            let (client, sent) = (client.clone(), Arc::clone(&sent));
            floods.spawn(async move { flood_call(&client, method, sent).await });
        }
    }
    tokio::time::sleep(FLOOD).await;
    let peak = child.peak_rss()?;
    floods.abort_all();
    drop(child);
    drop(proxy);
    Ok((idle, peak, sent.load(Ordering::Relaxed)))
}

/// The broker stalled, four streams of 1 KiB events until the buffer is full: RSS
/// growth over the events admitted.
async fn per_event(env: &Env<'_>, bin: &std::path::Path, exchange: &str) -> anyhow::Result<String> {
    const EVENTS: usize = 10_000;
    let (head, upstream, tail) = split_authority(&env.args.amqp_url)?;
    let proxy = Proxy::start(upstream).await?;
    let url = format!("{head}{}{tail}", proxy.addr());
    let child_env = [
        ("INGEST_BUFFER_EVENTS", EVENTS.to_string()),
        ("INGEST_BUFFER_BYTES", "1GiB".to_owned()),
        ("INGEST_CONFIRM_TIMEOUT", "120s".to_owned()),
        ("RUST_LOG", "error".to_owned()),
    ];
    let child = ChildServer::start(bin, &url, exchange, &child_env, Dial::default()).await?;
    let idle = child.rss()?;
    proxy.set_mode(Mode::Stall);
    let taken = Arc::new(AtomicU64::new(0));
    let mut streams = JoinSet::new();
    let payload = Bytes::from(vec![b'x'; 1024]);
    for s in 0..4 {
        let mut client =
            ingest::proto::ingest_client::IngestClient::connect(format!("http://{}", child.addr))
                .await?;
        let (taken, payload) = (Arc::clone(&taken), payload.clone());
        streams.spawn(async move {
            let messages = futures::stream::iter(0..EVENTS).map(move |i| {
                taken.fetch_add(1, Ordering::Relaxed);
                PublishRequest {
                    sequence: 0,
                    events: vec![Event {
                        id: format!("fill-{s}-{i}"),
                        topic: "bench.fill".into(),
                        payload: payload.clone(),
                        ..Event::default()
                    }],
                }
            });
            let _ = client.publish_stream(messages).await;
        });
    }
    // Until the streams stop taking events: the buffer is full.
    let mut last = u64::MAX;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = taken.load(Ordering::Relaxed);
        if now == last {
            break;
        }
        last = now;
    }
    let peak = child.peak_rss()?;
    streams.abort_all();
    drop(child);
    drop(proxy);
    let per_event = peak.saturating_sub(idle) as f64 / EVENTS as f64;
    Ok(format!(
        "per event: {EVENTS} 1 KiB events admitted with the broker stalled grew RSS by \
         {:.1} MiB: {per_event:.0} bytes per in-flight event (charged: 2 x 1024 + id and \
         topic + EVENT_OVERHEAD, {})",
        peak.saturating_sub(idle) as f64 / MIB,
        ingest::admission::EVENT_OVERHEAD
    ))
}

use futures::StreamExt as _;

/// One raw HTTP/2 connection.
async fn connect(addr: &str) -> anyhow::Result<SendRequest<Bytes>> {
    let tcp = TcpStream::connect(addr).await?;
    let (client, connection) = h2::client::Builder::new()
        .initial_window_size(1 << 20)
        .handshake(tcp)
        .await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// The head of a `PublishRequest` message of exactly `len` bytes with one event
/// whose payload fills it (prefix included), and the payload's length.
fn flood_head(len: usize) -> (Bytes, usize) {
    let mut payload = len.saturating_sub(32);
    loop {
        let request = PublishRequest {
            sequence: 0,
            events: vec![Event {
                topic: "abuse.t".into(),
                payload: Bytes::from(vec![0; payload]),
                ..Event::default()
            }],
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

/// One call whose message declares `MAX_MESSAGE` bytes, sent as fast as the
/// server's flow control allows.
async fn flood_call(client: &SendRequest<Bytes>, method: &str, sent: Arc<AtomicU64>) {
    let (head, payload) = flood_head(MAX_MESSAGE);
    let Ok(request) = http::Request::builder()
        .method("POST")
        .uri(format!("http://ingest/ingest.v1.Ingest/{method}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
    else {
        return;
    };
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
    std::future::pending::<()>().await;
}
