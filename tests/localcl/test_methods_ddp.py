"""Methods under a real 2-process gloo DistributedDataParallel group (CPU).

Checks what the Ray worker loop relies on: ``DDP(method)(batch, step=..., stage=...)`` runs the
training step (``forward`` == ``pretrain_step``) with ``find_unused_parameters=True`` (GLCL
stages leave parts of the network unused), gradients are synchronised (identical weights on both
ranks after a step on different data), workers draw different views (rank-offset generators), and
the key queues stay identical on every rank after ``on_after_step``.
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

from localcl.methods import METHODS

TINY = {"widths": (4, 8), "decoder_widths": (4,)}


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # same initial weights on both ranks
        results: dict[str, torch.Tensor] = {}
        # GLCL global stage: G^D with negatives gathered from both workers
        glcl = METHODS["glcl"](
            METHODS["glcl"].Config(
                **TINY, input_size=16, local_depth=1, partitions=2, volumes_per_batch=2, gather_distributed=True
            ),
            1,
            4,
        )
        ddp = torch.nn.parallel.DistributedDataParallel(glcl, find_unused_parameters=True)
        gen = torch.Generator().manual_seed(100 + rank)  # different data per rank
        batch = {
            "image": torch.rand(4, 1, 16, 16, generator=gen),
            "volume": torch.tensor([0, 0, 1, 1]),
            "partition": torch.tensor([0, 1, 0, 1]),
        }
        opt = torch.optim.SGD(glcl.stage_parameters("global"), lr=0.1)
        out = ddp(batch, step=0, stage="global")
        out["loss"].backward()
        opt.step()
        results["glcl_params"] = torch.cat([p.detach().flatten() for p in glcl.stage_parameters("global")])
        results["glcl_loss"] = out["loss"].detach()
        # IDEAL: queue pushes gather the keys of both workers
        torch.manual_seed(1)
        ideal = METHODS["ideal"](METHODS["ideal"].Config(**TINY, queue_size=32), 1, 4)
        ddp_i = torch.nn.parallel.DistributedDataParallel(ideal, find_unused_parameters=True)
        x = torch.rand(3, 1, 16, 16, generator=gen)
        out = ddp_i({"image": x}, step=0)
        out["loss"].backward()
        ideal.on_after_step()
        results["ideal_queue"] = ideal.loss_fn.queue.negatives().clone()
        results["ideal_filled"] = ideal.loss_fn.queue.filled.clone()
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        # both ranks done before either tears gloo down (a rank that exits while its peer is
        # still in a collective aborted once: "terminate called without an active exception")
        tdist.barrier()
    finally:
        tdist.destroy_process_group()


@pytest.mark.skipif(not tdist.is_available(), reason="torch.distributed not available")
def test_methods_ddp__two_gloo_workers_sync_gradients_and_queues() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        mp.spawn(_worker, args=(2, init_file, tmp), nprocs=2, join=True)
        r0 = torch.load(os.path.join(tmp, "rank0.pt"), weights_only=True)
        r1 = torch.load(os.path.join(tmp, "rank1.pt"), weights_only=True)
    # different data -> different local losses, but identical weights after the synced step
    assert not torch.allclose(r0["glcl_loss"], r1["glcl_loss"])
    torch.testing.assert_close(r0["glcl_params"], r1["glcl_params"])
    # first step warms the queue with the gathered pooled keys, on_after_step pushes them again:
    # both ranks hold the same keys, 2 x (3 + 3) of them
    assert int(r0["ideal_filled"]) == int(r1["ideal_filled"]) == 12
    torch.testing.assert_close(r0["ideal_queue"], r1["ideal_queue"])
