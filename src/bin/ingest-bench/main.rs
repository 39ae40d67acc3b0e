//! `ingest-bench`: what ingest costs compared with publishing to RabbitMQ directly.
//!
//! In one run it measures `direct` (lapin straight to the broker: the ceiling),
//! unary and streaming gRPC through a freshly started `ingest` per scenario, and an
//! overload against a stalled broker; every scenario's queue is checked to hold
//! exactly the events that were acknowledged. With `--security` each gRPC scenario
//! also runs over TLS and over TLS with a bearer token, beside plaintext. Prints a
//! table on stdout, optionally writes JSON and an SVG plot, and exits non-zero if any
//! check fails.
//!
//! It is a separate binary with its own modules so that the service binary carries
//! none of its dependencies (progress bars, plotting, histograms).

mod abuse;
mod args;
mod broker;
mod direct;
mod grpc;
mod overload;
mod plan;
mod plot;
mod progress;
mod proxy;
mod report;
mod scenarios;
mod security;
mod server;

use std::{process::ExitCode, time::Instant};

use bytes::Bytes;
use clap::Parser;

use crate::{
    args::{Args, Scenario},
    broker::Broker,
    report::{QueueCheck, Row},
    scenarios::Env,
    security::{Material, Mode},
};

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(error) = args.validate() {
        eprintln!("ingest-bench: {error}");
        return ExitCode::from(2);
    }
    match run(&args).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("ingest-bench: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs every scenario asked for; `Ok(false)` if one failed or a queue check did.
async fn run(args: &Args) -> anyhow::Result<bool> {
    let started = Instant::now();
    let needs_server = args.scenarios.iter().any(|s| *s != Scenario::Direct);
    let ingest_bin = if needs_server && args.addr.is_none() {
        Some(server::ingest_bin(args.ingest_bin.as_ref())?)
    } else {
        None
    };
    let broker = Broker::connect(&args.amqp_url).await?;
    // Removed (its folder with the key and token) when `run` returns, however.
    let security = if args.scenarios.iter().any(|s| s.is_grpc())
        && args.security.iter().any(|m| *m != Mode::Plain)
    {
        Some(Material::create()?)
    } else {
        None
    };
    let env = Env {
        args,
        broker: &broker,
        ingest_bin: ingest_bin.as_deref(),
        payload: payload(args.payload_bytes),
        security: security.as_ref(),
    };

    let mut ok = true;
    let mut rounds: Vec<Vec<Row>> = Vec::with_capacity(args.rounds);
    for round in 1..=args.rounds {
        if args.rounds > 1 {
            eprintln!("ingest-bench: round {round} of {}", args.rounds);
        }
        let (mut rows, passed) = run_round(args, &env, round % 2 == 0).await;
        ok &= passed;
        report::fill_ratios(&mut rows);
        if args.rounds > 1 {
            println!("round {round} of {}:", args.rounds);
        }
        print!("{}", report::table(&rows));
        rounds.push(rows);
    }
    broker.close().await;
    if args.rounds > 1 {
        print!("{}", report::rounds_summary(&rounds));
    }
    println!("run time {:.1} s", started.elapsed().as_secs_f64());
    // JSON and the plot show the last round.
    let rows = rounds.pop().unwrap_or_default();
    if let Some(path) = &args.json {
        report::write_json(path, &rows)?;
    }
    if let Some(path) = &args.plot {
        plot::draw(path, &rows)?;
    }
    for row in rounds
        .iter()
        .flatten()
        .chain(&rows)
        .filter(|r| r.queue_check == QueueCheck::Mismatch)
    {
        eprintln!(
            "ingest-bench: {}: queue holds {} messages, {} events were acknowledged",
            row.scenario, row.queue_actual, row.queue_expected
        );
        ok = false;
    }
    Ok(ok)
}

/// One pass over every scenario and mode asked for (`reversed`: last first): the
/// rows, in the order asked for, and whether every scenario ran.
async fn run_round(args: &Args, env: &Env<'_>, reversed: bool) -> (Vec<Row>, bool) {
    let mut plan = Vec::with_capacity(args.scenarios.len() * (args.security.len() + 1));
    for &scenario in &args.scenarios {
        if matches!(scenario, Scenario::Overload | Scenario::Abuse) && args.addr.is_some() {
            eprintln!(
                "ingest-bench: {} skipped: it needs a server it starts (no --addr)",
                scenario.name()
            );
            continue;
        }
        // The direct ceiling also runs with the messages of each mode that changes
        // them (tls+auth stamps the tenant header), to compare like with like.
        let modes: Vec<Mode> = if scenario.is_grpc() {
            args.security.clone()
        } else if scenario == Scenario::Direct {
            std::iter::once(Mode::Plain)
                .chain(
                    args.security
                        .iter()
                        .copied()
                        .filter(|&m| security::stamped_header(m).is_some()),
                )
                .collect()
        } else {
            vec![Mode::Plain]
        };
        plan.extend(modes.into_iter().map(|mode| (scenario, mode)));
    }
    if reversed {
        plan.reverse();
    }
    let mut ok = true;
    let mut rows = Vec::with_capacity(plan.len());
    for (scenario, mode) in plan {
        match scenarios::run(env, scenario, mode).await {
            Ok(measured) => {
                let row = Row::new(scenario, mode, measured, args.payload_bytes);
                eprintln!(
                    "{:>18}: {} events, {:.0} events/s, queue {:?}",
                    row.scenario, row.events, row.events_per_sec, row.queue_check
                );
                rows.push(row);
            }
            Err(error) => {
                eprintln!(
                    "ingest-bench: {} failed: {error:#}",
                    scenarios::row_name(scenario, mode)
                );
                ok = false;
            }
        }
    }
    if reversed {
        rows.reverse();
    }
    (rows, ok)
}

/// A payload of `len` bytes, not all zeros (so nothing on the way can shortcut
/// it), shared by every event without copying.
fn payload(len: usize) -> Bytes {
    (0..len).map(|i| b'a' + (i % 26) as u8).collect()
}
