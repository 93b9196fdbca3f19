"""``benchmarks/gpu_suite.py --small`` runs end to end on a CPU, so the GPU suite cannot rot.

It runs the real code paths (the compiled train steps, sampling, the stage-1 step with LPIPS and discriminator,
the PyTorch comparison when torch and diffusers are installed) on tiny models; every row must be present and
no row may print ``error:`` (the suite itself keeps going past a failing row and exits 0).
"""

import math
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
EXPECTED_ROWS = [
    "train bf16 b2", "train bf16 max-pow2", "train fp32 b2", "train fp32 max-pow2", "train bf16 b2 fsdp",
    "ddim10+decode b2", "dpm++5+decode b2", "vq-f4 stage-1",
    "torch train b2",
]
COLUMNS = ["row", "batch", "img/s", "step ms", "compile s", "GFLOP/img", "MFU %", "dev peak GiB", "XLA GiB", "note"]


def _positive(text: str) -> bool:
    try:
        value = float(text)
    except ValueError:
        return False
    return math.isfinite(value) and value > 0


def test_gpu_suite_small_dry_run():
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_suite.py"), "--small", "--peak_tflops=1"],
                          capture_output=True, text=True, timeout=900, cwd=REPO, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == COLUMNS, proc.stdout
    rows = {}
    for line in lines[1:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(COLUMNS, cells))
    assert list(rows) == EXPECTED_ROWS, proc.stdout
    errored = {name: r["note"] for name, r in rows.items() if r["note"].startswith("error:")}
    assert not errored, f"rows failed:\n{errored}\n--- stderr ---\n{proc.stderr[-4000:]}"
    assert proc.stdout.startswith("command: ") and "jax " in proc.stdout

    for name in EXPECTED_ROWS[:5]:  # train steps: throughput, compile, XLA FLOPs, MFU and XLA memory
        for col in ("img/s", "step ms", "compile s", "GFLOP/img", "MFU %", "XLA GiB"):
            assert _positive(rows[name][col]), (name, col, rows[name])
    assert rows["train bf16 max-pow2"]["batch"] == "2" and rows["train fp32 max-pow2"]["batch"] == "2"
    assert "fsdp=-1 over 1 device" in rows["train bf16 b2 fsdp"]["note"]
    for name in EXPECTED_ROWS[5:7]:  # sampling
        assert _positive(rows[name]["img/s"]) and _positive(rows[name]["step ms"]), rows[name]
        assert "finite True" in rows[name]["note"], rows[name]
    for col in ("img/s", "step ms", "compile s", "GFLOP/img", "XLA GiB"):
        assert _positive(rows["vq-f4 stage-1"][col]), (col, rows["vq-f4 stage-1"])
    assert "LPIPS on" in rows["vq-f4 stage-1"]["note"] and "disc factor 1" in rows["vq-f4 stage-1"]["note"]
    torch_row = rows["torch train b2"]
    if torch_row["note"].startswith("n/a"):  # torch or diffusers not installed here
        assert "not importable" in torch_row["note"], torch_row
    else:
        assert _positive(torch_row["img/s"]) and "torch/lidiff" in torch_row["note"], torch_row
