//! Result rows: the table on stdout and the same rows as JSON.

use std::{fmt::Write as _, path::Path};

use serde::Serialize;

use crate::{
    args::Scenario,
    scenarios::{self, Measured},
    security::Mode,
};

const MIB: f64 = 1024.0 * 1024.0;

/// Quantiles sampled for the latency CDF plot: fine steps in the body, then the tail.
const CDF_QUANTILES: &[f64] = &[0.99, 0.995, 0.999, 0.9995, 0.9999, 1.0];

/// Whether the queue held exactly the acknowledged events.
#[derive(Serialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum QueueCheck {
    Ok,
    Mismatch,
}

/// One scenario's line of the report.
#[derive(Serialize, Debug, Clone)]
pub struct Row {
    /// The scenario, with `/tls` or `/tls+auth` for those security modes.
    pub scenario: String,
    /// The scenario without the mode.
    #[serde(skip)]
    pub kind: Scenario,
    /// `plain`, `tls` or `tls+auth` for the gRPC scenarios and direct (whose
    /// `tls+auth` row publishes the messages ingest stamps); none for the others.
    pub security: Option<&'static str>,
    /// Workload shape, e.g. "64 callers x 1 on 1 conn".
    pub setup: String,
    /// Events acknowledged in the measured phase.
    pub events: u64,
    /// Wall time of the measured phase.
    pub seconds: f64,
    pub events_per_sec: f64,
    /// Payload bytes per second, in MiB.
    pub mib_per_sec: f64,
    /// Throughput relative to the direct scenario of the same run (not for overload).
    pub ratio_to_direct: Option<f64>,
    /// Throughput relative to the same scenario's plain row of the same run (rows
    /// in tls and tls+auth).
    pub ratio_to_plain: Option<f64>,
    /// What the latency percentiles time: "publish" (to its confirm), "call", "ack"
    /// (a PublishAcked request, handed to the stream until its ack), "refusal" or
    /// "n/a".
    pub latency_of: &'static str,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub p999_ms: Option<f64>,
    /// Calls or publishes that failed for good.
    pub errors: u64,
    /// Calls answered RESOURCE_EXHAUSTED.
    pub refused: u64,
    /// Server CPU seconds per million events of the measured phase (not for
    /// overload, whose CPU goes to refusals: see its notes).
    pub server_cpu_s_per_million: Option<f64>,
    /// Server peak RSS (VmHWM), MiB.
    pub server_peak_rss_mib: Option<f64>,
    /// Events acknowledged in the whole scenario, warm-up included.
    pub queue_expected: u64,
    /// Messages found in the scenario's queue.
    pub queue_actual: u64,
    pub queue_check: QueueCheck,
    pub notes: Vec<String>,
    /// (latency ms, percentile) points for the plot.
    #[serde(skip)]
    pub cdf: Vec<(f64, f64)>,
}

impl Row {
    /// Turns a measurement of `scenario` in `mode` into a row.
    pub fn new(scenario: Scenario, mode: Mode, measured: Measured, payload_bytes: usize) -> Self {
        let Measured {
            setup,
            tally,
            elapsed,
            server,
            queue_expected,
            queue_actual,
            mut notes,
        } = measured;
        let seconds = elapsed.as_secs_f64().max(1e-9);
        let events = tally.acked;
        let latency = &tally.latency;
        let has_latency = !latency.is_empty();
        let ms = |q: f64| has_latency.then(|| latency.value_at_quantile(q) as f64 / 1000.0);
        let cdf = if has_latency {
            (0..99)
                .map(|i| f64::from(i) / 100.0)
                .chain(CDF_QUANTILES.iter().copied())
                .map(|q| (latency.value_at_quantile(q) as f64 / 1000.0, q * 100.0))
                .collect()
        } else {
            Vec::new()
        };
        if let Some(error) = &tally.first_error {
            notes.push(format!("{} errors, first: {error}", tally.errors));
        }
        if tally.refused > 0 && scenario != Scenario::Overload {
            notes.push(format!("{} calls refused and retried", tally.refused));
        }
        // Overload's server CPU goes to refusing calls, not to the few events it
        // admits: per refusal is the meaningful unit there.
        let cpu_per_million = match (scenario, server) {
            (Scenario::Overload, Some(s)) => {
                let calls = (tally.refused + tally.errors).max(1);
                notes.push(format!(
                    "server CPU {:.2} s = {:.0} us per refused call",
                    s.cpu_seconds,
                    s.cpu_seconds * 1e6 / calls as f64
                ));
                None
            }
            (_, Some(s)) if events > 0 => Some(s.cpu_seconds / (events as f64 / 1e6)),
            _ => None,
        };
        let latency_of = match scenario {
            _ if !has_latency => "n/a",
            Scenario::Direct => "publish",
            Scenario::Overload => "refusal",
            Scenario::Acked1 | Scenario::Acked100 => "ack",
            _ => "call",
        };
        Self {
            scenario: scenarios::row_name(scenario, mode),
            kind: scenario,
            security: (scenario.is_grpc() || scenario == Scenario::Direct).then(|| mode.name()),
            setup,
            events,
            seconds,
            events_per_sec: events as f64 / seconds,
            mib_per_sec: events as f64 * payload_bytes as f64 / seconds / MIB,
            ratio_to_direct: None,
            ratio_to_plain: None,
            latency_of,
            p50_ms: ms(0.5),
            p99_ms: ms(0.99),
            p999_ms: ms(0.999),
            errors: tally.errors,
            refused: tally.refused,
            server_cpu_s_per_million: cpu_per_million,
            server_peak_rss_mib: server.map(|s| s.peak_rss as f64 / MIB),
            queue_expected,
            queue_actual,
            queue_check: if queue_expected == queue_actual {
                QueueCheck::Ok
            } else {
                QueueCheck::Mismatch
            },
            notes,
            cdf,
        }
    }
}

/// Fills in each row's throughput relative to the direct row, if there is one, and
/// notes each acked row's ack p99 beside direct's confirm p99; notes each tls and
/// tls+auth row's throughput relative to its scenario's plain row.
pub fn fill_ratios(rows: &mut [Row]) {
    let plain = Some(Mode::Plain.name());
    let plain_rates: Vec<(Scenario, f64)> = rows
        .iter()
        .filter(|r| r.security == plain && r.events_per_sec > 0.0)
        .map(|r| (r.kind, r.events_per_sec))
        .collect();
    for row in rows
        .iter_mut()
        .filter(|r| r.security.is_some_and(|s| s != Mode::Plain.name()))
    {
        let Some(&(kind, rate)) = plain_rates.iter().find(|(kind, _)| *kind == row.kind) else {
            continue;
        };
        let ratio = row.events_per_sec / rate;
        row.ratio_to_plain = Some(ratio);
        row.notes.push(format!(
            "events/s {ratio:.3}x of {} (plain) in this run ({:+.1} %)",
            kind.name(),
            (ratio - 1.0) * 100.0
        ));
    }
    // Each row against the direct ceiling of the same messages: `direct/tls+auth`
    // carries the tenant header as ingest stamps it; otherwise plain `direct`.
    let directs: Vec<(Option<&'static str>, Option<f64>, Option<f64>)> = rows
        .iter()
        .filter(|r| r.kind == Scenario::Direct)
        .map(|r| {
            let rate = Some(r.events_per_sec).filter(|&rate| rate > 0.0);
            (r.security, rate, r.p99_ms)
        })
        .collect();
    let direct_for = |security: Option<&'static str>| {
        directs
            .iter()
            .find(|(s, ..)| *s == security)
            .or_else(|| directs.iter().find(|(s, ..)| *s == plain))
            .map(|&(_, rate, p99)| (rate, p99))
    };
    // Overload's throughput is bounded by the stall by design; no ratio.
    for row in rows
        .iter_mut()
        .filter(|r| r.scenario != Scenario::Overload.name() && r.scenario != Scenario::Abuse.name())
    {
        let Some((rate, confirm_p99)) = direct_for(row.security) else {
            continue;
        };
        row.ratio_to_direct = rate.map(|direct| row.events_per_sec / direct);
        if let (Some(ack), Some(confirm)) =
            (row.p99_ms.filter(|_| row.latency_of == "ack"), confirm_p99)
        {
            row.notes.push(format!(
                "ack p99 {ack:.3} ms beside direct's confirm p99 {confirm:.3} ms ({:.2}x)",
                ack / confirm.max(1e-9)
            ));
        }
    }
}

/// The table, then one block of notes per scenario.
pub fn table(rows: &[Row]) -> String {
    let header = [
        "scenario",
        "events",
        "events/s",
        "MiB/s",
        "x direct",
        "p50 ms",
        "p99 ms",
        "p99.9 ms",
        "errors",
        "CPU s/M ev",
        "RSS MiB",
        "queue",
    ];
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.scenario.clone(),
                r.events.to_string(),
                format!("{:.0}", r.events_per_sec),
                format!("{:.1}", r.mib_per_sec),
                opt(r.ratio_to_direct, 2),
                opt(r.p50_ms, 3),
                opt(r.p99_ms, 3),
                opt(r.p999_ms, 3),
                r.errors.to_string(),
                opt(r.server_cpu_s_per_million, 1),
                opt(r.server_peak_rss_mib, 1),
                match r.queue_check {
                    QueueCheck::Ok => "ok".to_owned(),
                    QueueCheck::Mismatch => {
                        format!("MISMATCH {}/{}", r.queue_actual, r.queue_expected)
                    }
                },
            ]
        })
        .collect();
    let widths: Vec<usize> = (0..header.len())
        .map(|i| {
            cells
                .iter()
                .map(|row| row[i].len())
                .chain([header[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    let line = |out: &mut String, row: &[&str]| {
        for (i, cell) in row.iter().enumerate() {
            let sep = if i == 0 { "" } else { "  " };
            // Names left, numbers right, so columns of numbers line up.
            if i == 0 || i == row.len() - 1 {
                let _ = write!(out, "{sep}{cell:<w$}", w = widths[i]);
            } else {
                let _ = write!(out, "{sep}{cell:>w$}", w = widths[i]);
            }
        }
        out.truncate(out.trim_end().len());
        out.push('\n');
    };
    line(&mut out, &header);
    let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
    line(
        &mut out,
        &rule.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    for row in &cells {
        line(
            &mut out,
            &row.iter().map(String::as_str).collect::<Vec<_>>(),
        );
    }
    out.push('\n');
    for r in rows {
        let latency = match r.latency_of {
            "n/a" => "no per-call latency (a stream is answered only at its end)".to_owned(),
            "ack" => "latency per request, from handing it to the stream to its ack".to_owned(),
            of => format!("latency per {of}"),
        };
        let _ = writeln!(out, "{}: {}; {latency}", r.scenario, r.setup);
        for note in &r.notes {
            let _ = writeln!(out, "    {note}");
        }
    }
    out
}

fn opt(value: Option<f64>, decimals: usize) -> String {
    value.map_or_else(|| "n/a".to_owned(), |v| format!("{v:.decimals$}"))
}

/// Writes the rows as a JSON array.
pub fn write_json(path: &Path, rows: &[Row]) -> anyhow::Result<()> {
    let json = serde_json::to_string_pretty(rows)?;
    std::fs::write(path, json + "\n")
        .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))
}

/// With `--rounds`: per row, the median over the rounds of its ratio to the direct
/// ceiling of the same messages, and, for the TLS modes, of that ratio against the
/// plain row's in the same round (what the mode costs ingest, the broker's share
/// taken out) and of the raw events/s against plain.
pub fn rounds_summary(rounds: &[Vec<Row>]) -> String {
    let mut out = format!(
        "\nmedians over {} rounds [each round]:\n{:<20}  {:>8}  {:>16}  {:>16}\n",
        rounds.len(),
        "scenario",
        "x direct",
        "x direct / plain",
        "events/s / plain"
    );
    let Some(first) = rounds.first() else {
        return out;
    };
    for row in first {
        let same = |r: &&Row| r.scenario == row.scenario;
        let to_direct: Vec<f64> = rounds
            .iter()
            .filter_map(|round| round.iter().find(same)?.ratio_to_direct)
            .collect();
        let plain_name = scenarios::row_name(row.kind, Mode::Plain);
        let against_plain: Vec<f64> = rounds
            .iter()
            .filter_map(|round| {
                let mine = round.iter().find(same)?.ratio_to_direct?;
                let plain = round.iter().find(|r| r.scenario == plain_name)?;
                Some(mine / plain.ratio_to_direct?)
            })
            .collect();
        let raw: Vec<f64> = rounds
            .iter()
            .filter_map(|round| round.iter().find(same)?.ratio_to_plain)
            .collect();
        let cell = |values: &[f64]| match median(values) {
            None => "n/a".to_owned(),
            Some(m) => format!("{m:.3}"),
        };
        let plain_row = row.security.is_none_or(|s| s == Mode::Plain.name());
        let (against_plain, raw) = if plain_row {
            (Vec::new(), Vec::new())
        } else {
            (against_plain, raw)
        };
        out.push_str(&format!(
            "{:<20}  {:>8}  {:>16}  {:>16}   [{}]\n",
            row.scenario,
            cell(&to_direct),
            cell(&against_plain),
            cell(&raw),
            to_direct
                .iter()
                .map(|r| format!("{r:.2}"))
                .collect::<Vec<_>>()
                .join(" "),
        ));
    }
    out
}

fn median(values: &[f64]) -> Option<f64> {
    let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    if sorted.is_empty() {
        return None;
    }
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    Some(if sorted.len().is_multiple_of(2) {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    } else {
        sorted[mid]
    })
}
