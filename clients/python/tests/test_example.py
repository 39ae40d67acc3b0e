"""examples/python/stream_publish.py, the long-running ML-logging example, as a user
runs it: a child process on the installed package, against the real service."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

from support import REPO

SCRIPT = REPO / "examples" / "python" / "stream_publish.py"


def run(args: list[str], ingest, stop_after: float | None = None) -> dict:
    child = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--addr", ingest.addr, "--report", "0.5", *args],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        if stop_after is not None:
            time.sleep(stop_after)
            child.send_signal(signal.SIGTERM)
        out, _ = child.communicate(timeout=120)
    finally:
        child.kill()
    assert child.returncode == 0, f"exit {child.returncode}: {out}"
    return json.loads(out.strip().splitlines()[-1])


def test_logs_a_fixed_number_of_predictions_all_confirmed(ingest, queue):
    summary = run(["--count", "3000", "--rate", "0"], ingest)
    assert summary["logged"] == summary["confirmed"] == 3000 and summary["failed"] == 0
    landed = queue.take_all(3000)
    assert len(landed) == 3000
    first = json.loads(landed[0][1])
    assert first["model"] == "churn-v7" and first["request"] == 0
    assert landed[0][2]["model"] == "churn-v7"


def test_sigterm_ends_a_paced_run_with_every_logged_prediction_confirmed(ingest, queue):
    summary = run(["--rate", "500"], ingest, stop_after=2.0)
    assert summary["logged"] > 200, summary
    assert summary["confirmed"] == summary["logged"], summary
    assert len(queue.take_all(summary["logged"])) == summary["logged"]
