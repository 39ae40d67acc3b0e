//! `ingest-bench` end to end, briefly: every scenario runs, publishes something, and
//! its queue holds exactly the events that were acknowledged. No timing assertions:
//! the benchmark is a tool, not a test; this only keeps it from rotting.

use std::process::Command;

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

#[test]
fn ingest_bench_runs_every_scenario_briefly() {
    let json = std::env::temp_dir().join(format!(
        "ingest-bench-smoke-{}-{:016x}.json",
        std::process::id(),
        fastrand::u64(..)
    ));
    // Counted, small and without warm-up, so the test stays short and light on a
    // machine that runs other integration tests beside it.
    let output = Command::new(env!("CARGO_BIN_EXE_ingest-bench"))
        .args(["--events", "2000", "--warmup", "0s"])
        .args(["--overload-duration", "1s", "--overload-callers", "64"])
        .args(["--scenarios", &SCENARIOS.join(",")])
        .args(["--ingest-bin", env!("CARGO_BIN_EXE_ingest")])
        .arg("--json")
        .arg(&json)
        .output()
        .expect("start ingest-bench");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "ingest-bench failed ({}); is RabbitMQ running (`rabbitmq-server -detached`)?\n\
         stdout:\n{stdout}\nstderr:\n{stderr}",
        output.status
    );
    let written = std::fs::read(&json).expect("ingest-bench wrote no --json file");
    let _ = std::fs::remove_file(&json);
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&written).expect("JSON rows");
    for scenario in SCENARIOS {
        let row = rows
            .iter()
            .find(|row| row["scenario"] == scenario)
            .unwrap_or_else(|| panic!("no row for {scenario}:\n{stdout}"));
        assert!(
            row["events"].as_u64().is_some_and(|events| events > 0),
            "{scenario} acknowledged no events:\n{stdout}"
        );
        assert_eq!(row["queue_check"], "ok", "{scenario}:\n{stdout}");
        if scenario.starts_with("acked-") {
            // Every request timed until its ack, every ack OK.
            assert_eq!(row["latency_of"], "ack", "{scenario}:\n{stdout}");
            assert!(row["p99_ms"].is_f64(), "{scenario}: no ack p99:\n{stdout}");
            assert_eq!(row["errors"], 0, "{scenario}:\n{stdout}");
        }
    }
    assert!(stdout.contains("events/s"), "no table on stdout:\n{stdout}");
}
