"""`localcl demo` end to end (tiny schedule, local mode) and the check that keeps the demo table
quoted in docs/getting-started.md in step with what the code prints."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "check_demo_table.py"


def load_script():
    spec = importlib.util.spec_from_file_location("check_demo_table", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_getting_started__quotes_a_demo_table_for_both_models():
    table = load_script().quoted_table((REPO / "docs" / "getting-started.md").read_text())
    rows = [r for r in table.splitlines() if r.startswith("| method |") or r.startswith("| baseline |")]
    assert len(rows) == 2 and "..." not in table, table
    assert "1 labelled volume(s)" in table  # the shipped budget: data.label_cases, one volume


def test_check_demo_table__match_stale_and_write(tmp_path: Path):
    mod = load_script()
    doc = tmp_path / "page.md"
    doc.write_text(f"intro\n{mod.START}\n```\n| model | Dice |\n| method | 0.5 |\n```\n{mod.END}\noutro\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / "demo_table.md").write_text("| model | Dice |\n| method | 0.5 |\n")
    assert mod.main(["--run-dir", str(run), "--doc", str(doc)]) == 0
    (run / "demo_table.md").write_text("| model | Dice |\n| method | 0.7 |\n")
    assert mod.main(["--run-dir", str(run), "--doc", str(doc)]) == 1
    assert mod.main(["--run-dir", str(run), "--doc", str(doc), "--write"]) == 0
    text = doc.read_text()
    assert "0.7" in text and "0.5" not in text and text.startswith("intro\n") and text.endswith("outro\n")
    assert mod.main(["--run-dir", str(run), "--doc", str(doc)]) == 0
    assert mod.main(["--run-dir", str(tmp_path / "missing"), "--doc", str(doc)]) == 2
    with pytest.raises(ValueError, match="no quoted demo table"):
        mod.quoted_table("no markers here", doc)


def test_cli_demo__tiny_run_prints_and_writes_the_table(tmp_path: Path):
    """The real `localcl demo` (phantom, local mode, a few steps): the printed table is the file
    that scripts/check_demo_table.py reads."""
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}
    sched = "{epochs: 1, steps_per_epoch: 2, batch_size: 4, unlabelled_batch_size: 4}"
    args = [
        sys.executable, "-m", "ray_jobs.cli", "demo", "--run-dir", str(tmp_path / "demo"), "--no-progress",
        "--set", "scaling.num_workers=0", "--set", "data.size=[48, 48]",
        "--set", "pretrain.schedule={epochs: 1, steps_per_epoch: 2, batch_size: 4}",
        "--set", f"finetune.schedule={sched}",
        "--set", "logging.tensorboard=false",
    ]  # fmt: skip
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = (tmp_path / "demo" / "demo_table.md").read_text()
    assert table.strip() in proc.stdout
    assert "| method |" in table and "| baseline |" in table and "1 labelled volume(s)" in table
