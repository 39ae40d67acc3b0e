//! `ingest-bench` end to end, briefly: every scenario runs, publishes something, and
//! its queue holds exactly the events that were acknowledged; one scenario also runs
//! over TLS and over TLS with a bearer token. No timing assertions: the benchmark is
//! a tool, not a test; this only keeps it from rotting.

use std::process::{Command, Output};

const SCENARIOS: [&str; 8] = [
    "direct",
    "unary-1",
    "unary-100",
    "stream-1",
    "stream-100",
    "acked-1",
    "acked-100",
    "overload",
];

/// Runs ingest-bench with `args` (counted, small and without warm-up, so the test
/// stays short and light on a machine that runs other integration tests beside it),
/// asserts it succeeded, and returns its JSON rows, its stdout and its process id.
/// The JSON rows, stdout, stderr (progress: one line per row, in the order run) and
/// the bench's pid.
fn run_bench(args: &[&str]) -> (Vec<serde_json::Value>, String, String, u32) {
    let json = std::env::temp_dir().join(format!(
        "ingest-bench-smoke-{}-{:016x}.json",
        std::process::id(),
        fastrand::u64(..)
    ));
    let child = Command::new(env!("CARGO_BIN_EXE_ingest-bench"))
        .args(["--events", "2000", "--warmup", "0s"])
        .args(args)
        .args(["--ingest-bin", env!("CARGO_BIN_EXE_ingest")])
        .arg("--json")
        .arg(&json)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start ingest-bench");
    let pid = child.id();
    let output = child.wait_with_output().expect("wait for ingest-bench");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        output.status.success(),
        "ingest-bench failed ({}); is RabbitMQ running (`rabbitmq-server -detached`)?\n\
         stdout:\n{stdout}\nstderr:\n{stderr}",
        output.status
    );
    let written = std::fs::read(&json).expect("ingest-bench wrote no --json file");
    let _ = std::fs::remove_file(&json);
    let rows = serde_json::from_slice(&written).expect("JSON rows");
    assert!(stdout.contains("events/s"), "no table on stdout:\n{stdout}");
    (rows, stdout, stderr, pid)
}

/// The row named `name`, checked: events acknowledged, the queue holds exactly them,
/// and an acked scenario timed every request until its OK ack.
fn checked_row<'a>(
    rows: &'a [serde_json::Value],
    name: &str,
    stdout: &str,
) -> &'a serde_json::Value {
    let row = rows
        .iter()
        .find(|row| row["scenario"] == name)
        .unwrap_or_else(|| panic!("no row for {name}:\n{stdout}"));
    assert!(
        row["events"].as_u64().is_some_and(|events| events > 0),
        "{name} acknowledged no events:\n{stdout}"
    );
    assert_eq!(row["queue_check"], "ok", "{name}:\n{stdout}");
    if name.starts_with("acked-") {
        assert_eq!(row["latency_of"], "ack", "{name}:\n{stdout}");
        assert!(row["p99_ms"].is_f64(), "{name}: no ack p99:\n{stdout}");
        assert_eq!(row["errors"], 0, "{name}:\n{stdout}");
    }
    row
}

#[test]
fn ingest_bench_runs_every_scenario_briefly() {
    let (rows, stdout, _, _) = run_bench(&[
        "--overload-duration",
        "1s",
        "--overload-callers",
        "64",
        "--scenarios",
        &SCENARIOS.join(","),
    ]);
    for scenario in SCENARIOS {
        checked_row(&rows, scenario, &stdout);
    }
}

/// acked-100 in plain, tls and tls+auth, in two rounds: with a wrong certificate or a
/// missing token every request would fail (errors, no events); the direct ceiling
/// also runs with the tenant header, and the tls+auth row is measured against it; the
/// certificates and token are gone afterwards.
#[test]
fn ingest_bench_runs_a_scenario_in_every_security_mode() {
    let (rows, stdout, stderr, pid) = run_bench(&[
        "--scenarios",
        "direct,acked-100",
        "--security",
        "plain,tls,tls+auth",
        "--rounds",
        "2",
    ]);
    // The JSON holds the last round.
    assert_eq!(rows.len(), 5, "{stdout}");
    for (name, security) in [
        ("direct", "plain"),
        ("direct/tls+auth", "tls+auth"),
        ("acked-100", "plain"),
        ("acked-100/tls", "tls"),
        ("acked-100/tls+auth", "tls+auth"),
    ] {
        let row = checked_row(&rows, name, &stdout);
        assert_eq!(row["security"], security, "{name}:\n{stdout}");
        if security != "plain" {
            assert!(row["ratio_to_plain"].is_f64(), "{name}:\n{stdout}");
        }
    }
    // Each row against the direct ceiling of its own messages.
    let value = |name: &str, key: &str| {
        checked_row(&rows, name, &stdout)[key]
            .as_f64()
            .unwrap_or_else(|| panic!("{name}: no {key}:\n{stdout}"))
    };
    let against = |name: &str, direct: &str| {
        let ratio = value(name, "ratio_to_direct");
        let expected = value(name, "events_per_sec") / value(direct, "events_per_sec");
        assert!(
            (ratio - expected).abs() <= 1e-9 * expected.max(1.0),
            "{name} is {ratio}x direct, not against {direct} ({expected}):\n{stdout}"
        );
    };
    against("acked-100/tls+auth", "direct/tls+auth");
    against("acked-100/tls", "direct");
    against("acked-100", "direct");
    assert!(
        stdout.contains("round 2 of 2:") && stdout.contains("medians over 2 rounds"),
        "no rounds or summary:\n{stdout}"
    );
    // The second round runs in reverse order, and its table is in the order asked for.
    let ran = |round: &str| -> Vec<String> {
        stderr
            .split(round)
            .nth(1)
            .unwrap_or_else(|| panic!("no {round:?}:\n{stderr}"))
            .lines()
            .take_while(|line| !line.contains("ingest-bench: round"))
            .filter(|line| line.contains(" events/s, queue "))
            .filter_map(|line| Some(line.split_once(": ")?.0.trim().to_owned()))
            .collect()
    };
    let first = ran("ingest-bench: round 1 of 2");
    let mut second = ran("ingest-bench: round 2 of 2");
    assert_eq!(first.len(), 5, "{stderr}");
    second.reverse();
    assert_eq!(first, second, "round 2 did not run in reverse:\n{stderr}");
    assert!(
        stdout.contains("x of acked-100 (plain) in this run"),
        "no ratio to plain noted:\n{stdout}"
    );
    let prefix = format!("ingest-bench-security-{pid}-");
    let left: Vec<_> = std::fs::read_dir(std::env::temp_dir())
        .expect("read the temp folder")
        .filter_map(Result::ok)
        .filter(|entry| entry.file_name().to_string_lossy().starts_with(&prefix))
        .collect();
    assert!(left.is_empty(), "certificate folder left behind: {left:?}");
}

#[test]
fn ingest_bench_refuses_tls_against_a_server_it_did_not_start() {
    let Output { status, stderr, .. } = Command::new(env!("CARGO_BIN_EXE_ingest-bench"))
        .args(["--addr", "127.0.0.1:1", "--security", "plain,tls"])
        .output()
        .expect("start ingest-bench");
    let stderr = String::from_utf8_lossy(&stderr);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--security tls") && stderr.contains("only plain"),
        "{stderr}"
    );
}
