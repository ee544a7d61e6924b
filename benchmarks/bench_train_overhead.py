"""Ray Train overhead vs a plain PyTorch loop doing the same work, and samples/s with W workers.

The work: ``E`` epochs x ``S`` steps of supervised fine-tuning (``localcl.methods.FINETUNE
["supervised"]``: augmentation + U-Net + Dice/CE + Adam) on a fixed random batch of ``B``
slices of ``H x H`` (no data loading, so only the training machinery differs), and at the end of
every epoch a checkpoint of model + optimiser state (``torch.save``) as the real loop writes.

- ``plain``: that loop in this process (1 thread per process, as Ray sets OMP_NUM_THREADS=1 in
  its workers), timed twice (before and after the Ray runs; the faster is the baseline).
- ``ray W``: the same loop as a ``TorchTrainer`` with ``W`` workers (gloo DDP for W > 1,
  ``ray.train.report`` + ``Checkpoint`` each epoch, rank 0 writes). Each worker does ``B / W``
  slices per step, so the global work per step is the same. Reported:
    * ``steady_s``: time of epochs 2..E measured inside rank 0 (after start-up and the first,
      warm-up epoch), comparable to the plain loop's epochs 2..E;
    * ``fit_s``: wall time of ``trainer.fit()`` (includes worker start-up, imports, DDP setup);
    * ``overhead = steady_s(ray 1) / steady_s(plain) - 1`` (target <= 10 %), and the same
      ratio of process CPU seconds (``time.process_time`` of the loop's process, which includes
      Ray's in-process threads): on a shared, oversubscribed machine wall time measures the
      scheduler, CPU time still measures the work;
    * ``samples/s`` over epochs 2..E = ``B * S * (E - 1) / steady_s``.

Usage::

    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 \\
        .venv/bin/python benchmarks/bench_train_overhead.py [--epochs 4 --steps 10 --batch 8 \\
        --size 96 --workers 1 2]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from typing import Any

import torch


def build(size: int, batch: int, seed: int = 0) -> tuple[Any, torch.optim.Optimizer, dict]:
    from localcl.methods import FINETUNE

    torch.manual_seed(seed)
    cls = FINETUNE["supervised"]
    model = cls(cls.Config(widths=(8, 16, 32, 64), decoder_widths=(32, 16, 8)), in_channels=1, num_classes=4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed + 1)
    image = torch.rand(batch, 1, size, size, generator=g)
    label = torch.randint(0, 4, (batch, size, size), generator=g)
    return model, opt, {"image": image, "label": label}


def epoch_loop(model: Any, opt: torch.optim.Optimizer, batch: dict, steps: int, step0: int, total: int) -> float:
    last = 0.0
    for i in range(steps):
        out = model(batch, None, step0 + i, total)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        last = float(out["loss"].detach())
    return last


def plain(args: argparse.Namespace) -> dict[str, float]:
    torch.set_num_threads(1)
    model, opt, batch = build(args.size, args.batch)
    total = args.epochs * args.steps
    times: list[float] = []
    cpu: list[float] = []
    with tempfile.TemporaryDirectory() as d:
        for e in range(args.epochs):
            t0, c0 = time.perf_counter(), time.process_time()
            epoch_loop(model, opt, batch, args.steps, e * args.steps, total)
            torch.save(
                {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": e}, os.path.join(d, "state.pt")
            )
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    return {"steady_s": sum(times[1:]), "first_epoch_s": times[0], "steady_cpu_s": sum(cpu[1:])}


def ray_worker(cfg: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    model, opt, batch = build(cfg["size"], cfg["batch"] // world, seed=0)
    batch = {k: v for k, v in batch.items()}
    if world > 1:
        model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True})
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    total = cfg["epochs"] * cfg["steps"]
    times: list[float] = []
    cpu: list[float] = []
    for e in range(cfg["epochs"]):
        t0, c0 = time.perf_counter(), time.process_time()
        loss = epoch_loop(model, opt, batch, cfg["steps"], e * cfg["steps"], total)
        with tempfile.TemporaryDirectory() as d:
            ckpt = None
            if rank == 0:
                raw = getattr(model, "module", model)
                torch.save(
                    {"model": raw.state_dict(), "optimizer": opt.state_dict(), "epoch": e}, os.path.join(d, "state.pt")
                )
                ckpt = ray.train.Checkpoint.from_directory(d)
            ray.train.report({"epoch": e, "loss": loss, "times": list(times), "cpu": list(cpu)}, checkpoint=ckpt)
        # the epoch includes the report (checkpoint upload to storage, metrics to the controller)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    if rank == 0:  # the last report cannot carry its own epoch: write the totals beside it
        with open(cfg["out"], "w") as f:
            json.dump({"times": times, "cpu": cpu}, f)


def ray_run(args: argparse.Namespace, workers: int, storage: str) -> dict[str, float]:
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    trainer = TorchTrainer(
        ray_worker,
        train_loop_config={
            "size": args.size,
            "batch": args.batch,
            "epochs": args.epochs,
            "steps": args.steps,
            "out": os.path.join(storage, f"times-{workers}.json"),
        },
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=False, resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(
            name=f"bench-{workers}w-{time.time_ns()}",
            storage_path=storage,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
        ),
    )
    t0 = time.perf_counter()
    trainer.fit()
    fit_s = time.perf_counter() - t0
    with open(os.path.join(storage, f"times-{workers}.json")) as f:
        t = json.load(f)
    return {
        "steady_s": sum(t["times"][1:]),
        "first_epoch_s": t["times"][0],
        "fit_s": fit_s,
        "steady_cpu_s": sum(t["cpu"][1:]),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=8, help="global batch (split over workers)")
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--json", default=None, help="also write the figures to this file")
    args = p.parse_args()
    if args.epochs < 2:
        p.error("--epochs must be >= 2 (epoch 1 is the warm-up)")
    import ray

    ray.init(
        num_cpus=max(args.workers),
        object_store_memory=256 * 2**20,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        log_to_driver=False,
        configure_logging=False,
    )
    n = args.batch * args.steps * (args.epochs - 1)
    res: dict[str, Any] = {"args": vars(args)}
    base = [plain(args)]
    with tempfile.TemporaryDirectory() as storage:
        for w in args.workers:
            res[f"ray_{w}"] = ray_run(args, w, storage)
    base.append(plain(args))
    res["plain"] = min(base, key=lambda r: r["steady_s"])
    res["plain_runs_steady_s"] = [r["steady_s"] for r in base]
    ray.shutdown()
    print(
        f"work: {args.epochs - 1} steady epochs x {args.steps} steps x {args.batch} slices "
        f"{args.size}x{args.size} ({n} samples), checkpoint each epoch"
    )
    print(
        f"{'run':<10}{'steady s':>10}{'samples/s':>11}{'fit s':>9}{'vs plain':>10}{'rank-0 CPU s':>14}{'vs plain':>10}"
    )
    ps, pc = res["plain"]["steady_s"], res["plain"]["steady_cpu_s"]
    print(f"{'plain':<10}{ps:>10.2f}{n / ps:>11.1f}{'':>9}{'1.00':>10}{pc:>14.2f}{'1.00':>10}")
    for w in args.workers:
        r = res[f"ray_{w}"]
        print(
            f"{f'ray {w}w':<10}{r['steady_s']:>10.2f}{n / r['steady_s']:>11.1f}"
            f"{r['fit_s']:>9.1f}{r['steady_s'] / ps:>10.2f}{r['steady_cpu_s']:>14.2f}"
            f"{r['steady_cpu_s'] / pc:>10.2f}"
        )
    if 1 in args.workers:
        ov = res["ray_1"]["steady_s"] / ps - 1
        ovc = res["ray_1"]["steady_cpu_s"] / pc - 1
        res["overhead_1_worker"], res["cpu_overhead_1_worker"] = ov, ovc
        print(
            f"Ray Train 1-worker overhead after start-up: wall {100 * ov:+.1f} %, CPU "
            f"{100 * ovc:+.1f} % (target <= 10 %); plain runs "
            f"{', '.join(f'{t:.2f}' for t in res['plain_runs_steady_s'])} s wall"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
