"""``bench/bench_gpu.py --quick`` runs end to end on the CPU (small random networks), so CI
exercises the GPU benchmark's code; its numbers here mean nothing and are not asserted, but the
table's shape and the no-recompile result are."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "bench_gpu.py"


def test_bench_gpu_quick_runs_and_reports_every_row(tmp_path):
    out = tmp_path / "table.json"
    proc = subprocess.run([sys.executable, str(BENCH), "--quick", "--json", str(out)], capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = json.loads(out.read_text())
    assert [r["tool"] for r in table["rows"]] == ["wiro/text-to-image-sd-lora", "wiro/text-to-image-flux-lora-fast"]
    for row in table["rows"]:
        assert row["raw_s"] > 0 and row["easel_s"] > 0 and row["gflop_per_step"] > 0 and 0 < row["mfu"] < 1
    assert table["recompiles_over_10_changes"] == 0 and table["hotswaps"] == 10
    assert table["tasks_per_s_1w"] > 0 and table["tasks_per_s_2w"] > 0
    assert "ratio" in proc.stdout.splitlines()[1]
