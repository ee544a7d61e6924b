"""scripts/gpu_check.sh --dry-run prints the GPU demo and benchmark commands without running them,
and the overrides it passes to the demo are valid config keys."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check__dry_run_prints_valid_commands() -> None:
    out = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu_check.sh"), "--dry-run"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    lines = [shlex.split(x) for x in out.strip().splitlines()]
    demo = next(x for x in lines if "demo" in x)
    bench = next(x for x in lines if "benchmarks/bench_step.py" in x)
    sets = [demo[i + 1] for i, a in enumerate(demo) if a == "--set"]
    assert {
        "scaling.num_workers=1",
        "scaling.use_gpu=true",
        "runtime.compile=true",
        "finetune.schedule.amp=bf16",
    } <= set(sets)
    assert "--device" in bench and bench[bench.index("--device") + 1] == "cuda"
    from ray_jobs.config import load_config

    cfg = load_config("demo", sets)
    assert cfg.scaling.use_gpu and cfg.runtime.compile and cfg.scaling.num_workers == 1
