"""`localcl study`: the label-efficiency study (methods x label budgets x seeds)."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from typing import TYPE_CHECKING

from ray_jobs.errors import UserError

if TYPE_CHECKING:  # pragma: no cover - the study modules load torch / Ray (see run)
    from ray_jobs.study.spec import StudyConfig


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "study",
        help="label-efficiency study: every method x label budgets x seeds",
        description="Pretrain (once per method where pretraining sees no labels), fine-tune on "
        "each label budget with each seed, evaluate on the evaluation split, and "
        "write results.csv/json, results.md (tables + published numbers) and "
        "curve.png into the study directory. Re-run with --resume to continue: "
        "finished cells and stages are skipped.",
    )
    p.add_argument(
        "--config",
        "-c",
        required=True,
        help="study YAML or shipped name (ray_jobs/configs/study/: acdc_cpu, acdc_paper)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a study key, e.g. --set seeds=[0] or "
        "--set base.scaling.num_workers=2 (value parsed as YAML; repeatable)",
    )
    p.add_argument(
        "--study-dir", default=None, help="study directory (default: the config's study_dir or runs/study/<name>)"
    )
    p.add_argument(
        "--resume", action="store_true", help="continue the study in --study-dir (same config): skip finished cells"
    )
    p.add_argument(
        "--address",
        default=None,
        help="Ray cluster address (ray://host:10001 or auto); default: a local Ray "
        "on 127.0.0.1 (RAY_ADDRESS is honoured)",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="validate and list the cells and pretraining runs, train nothing"
    )
    p.add_argument("--report-only", action="store_true", help="rewrite results.* and curve.png from the finished cells")
    p.add_argument(
        "--max-cells",
        type=int,
        default=None,
        metavar="N",
        help="stop after N newly finished cells (the report is marked partial)",
    )
    p.add_argument(
        "--only-seed",
        dest="only_seeds",
        type=int,
        action="append",
        default=None,
        metavar="SEED",
        help="run only this seed's cells (repeatable); several "
        "drivers with different --only-seed can share one study directory",
    )
    p.add_argument(
        "--only-method",
        dest="only_methods",
        action="append",
        default=None,
        metavar="KEY",
        help="run only this method's cells (a methods key, repeatable), e.g. to add or redo one "
        "method of a finished study; the report covers every finished cell",
    )
    p.set_defaults(func=run)


# flags that pick which part of a study one driver runs, not what the study is
_PARTITION_FLAGS = ("--only-seed", "--only-method", "--max-cells")


def study_command(argv: list[str]) -> str:
    """The command that reproduces the whole study (``study ...`` argv): the driver's own,
    without ``--resume`` and without the flags that run only part of it (``--only-seed``,
    ``--only-method``, ``--max-cells``, each with its value), so the report quotes the study,
    not one of several drivers that built it."""
    out: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
        elif a == "--resume" or a.startswith(tuple(f + "=" for f in _PARTITION_FLAGS)):
            continue
        elif a in _PARTITION_FLAGS:
            skip = True
        else:
            out.append(a)
    return "localcl " + " ".join(shlex.quote(a) for a in out)


def run(args: argparse.Namespace) -> int:
    # deferred: loads torch / Ray / zarr (seconds); `localcl --help` and the other verbs stay fast
    from ray_jobs.study import cells as study_cells
    from ray_jobs.study import report as study_report
    from ray_jobs.study import run as study_run
    from ray_jobs.study import spec as study_spec

    st = study_spec.load_study(args.config, args.overrides)
    study_dir = st.resolved_dir(args.study_dir)
    if args.max_cells is not None and args.max_cells < 1:
        raise UserError("--max-cells: must be >= 1")
    if args.dry_run:
        todo = study_cells.cells(st)
        pre = sorted(
            {
                os.path.relpath(study_cells.pretrain_dir(st, study_dir, c), study_dir)
                for c in todo
                if "pretrain" in st.methods[c.method]
            }
        )
        print(
            f"study {st.name}: {len(todo)} cells ({len(st.methods)} methods x "
            f"{len(st.budgets)} budgets x {len(st.seeds)} seeds) -> {study_dir}"
        )
        print(f"pretraining runs ({len(pre)}): {', '.join(pre) or 'none'}")
        for c in todo:
            print(f"  {c.key}")
        return 0
    if args.report_only:
        out = study_report.report_only(st, study_dir)
        print(f"{len(out['records'])} finished cell(s); report: {out['report']['md']}")
        return 0
    study_run.prepare_study_dir(st, study_dir, args.resume)
    _local_mode_threads(st)
    cmd = study_command(sys.argv[1:]) if sys.argv[1:2] == ["study"] else ""
    if cmd and not os.path.exists(os.path.join(study_dir, "command.txt")):
        with open(os.path.join(study_dir, "command.txt"), "w") as f:
            f.write(cmd + "\n")
    _init_ray_patiently(args.address)
    out = study_run.run_study(
        st,
        study_dir,
        resume=True,
        max_cells=args.max_cells,
        only_seeds=args.only_seeds,
        only_methods=args.only_methods,
        log=lambda m: print(m, flush=True),
    )
    print()
    print(open(out["report"]["md"]).read())
    print(f"{out['done']} of {out['total']} cells; report: {out['report']['md']}, {out['report']['png']}")
    return 0


def _init_ray_patiently(address: str | None, attempts: int = 3) -> None:
    """``trainer.init_ray``, retried when a local Ray node misses Ray's fixed 30 s start-up
    window (seen on an overloaded machine); a study runs for hours, so a slow start should not
    end it. Other errors propagate at once."""
    # deferred: loads torch / Ray / zarr (seconds); `localcl --help` and the other verbs stay fast
    import ray

    from ray_jobs.train.trainer import init_ray

    for i in range(attempts):
        try:
            init_ray(address, num_cpus=None)
            return
        except Exception as exc:  # ray raises a bare Exception for this case
            if "timed out during startup" not in str(exc) or i == attempts - 1:
                raise
            print(
                f"localcl: Ray start-up timed out (attempt {i + 1}/{attempts}); retrying", file=sys.stderr, flush=True
            )
            ray.shutdown()
            time.sleep(5)


def _local_mode_threads(st: StudyConfig) -> None:
    """One torch thread in the driver when every cell runs in Ray Train local mode on CPU and
    ``OMP_NUM_THREADS`` is unset (what Ray gives each Train worker). Measured on the shared
    2-core machine, a fine-tuning step of the CPU study (batch 8, 96x96, widths 8..64) cost
    0.23 CPU-s with 1 thread and 1.64 CPU-s with 2 (OpenMP spinning under contention)."""
    scaling = st.base.get("scaling") or {}
    if scaling.get("num_workers", 2) != 0 or scaling.get("use_gpu") or os.environ.get("OMP_NUM_THREADS"):
        return
    # deferred: loads torch / Ray / zarr (seconds); `localcl --help` and the other verbs stay fast
    import torch

    torch.set_num_threads(1)
    print("localcl: local mode on CPU: 1 torch thread in the driver (set OMP_NUM_THREADS to change)", flush=True)
