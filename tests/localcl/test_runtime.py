"""Runtime switches (localcl.runtime): each reaches the model and leaves a few training steps'
losses and weights within a stated tolerance of the plain fp32 eager run."""

from __future__ import annotations

import pytest
import torch

from localcl.methods import FINETUNE
from localcl.runtime import RuntimeOptions, apply_runtime, autocast_dtype

WIDTHS = [4, 8, 16, 32]
NET = {"widths": WIDTHS, "decoder_widths": [16, 8, 4]}


def _train(
    opts: RuntimeOptions, bf16: bool = False, name: str = "supervised", steps: int = 3
) -> tuple[list[float], torch.Tensor]:
    """Losses of ``steps`` fine-tuning steps and the flattened final weights (fixed seeds)."""
    torch.manual_seed(0)
    cls = FINETUNE[name]
    m = apply_runtime(cls(cls.Config(**NET), 1, 4), opts)
    opt = torch.optim.SGD(m.parameters(), 1e-2)
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(4, 1, 32, 32, generator=g), torch.randint(0, 4, (4, 32, 32), generator=g)
    losses = []
    for s in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = m.finetune_step({"image": x, "label": y}, {"image": x}, s, steps)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    return losses, torch.cat([p.detach().flatten() for p in m.parameters()])


@pytest.fixture(scope="module")
def reference() -> tuple[list[float], torch.Tensor]:
    return _train(RuntimeOptions())


def test_runtime__defaults_change_nothing(reference: tuple[list[float], torch.Tensor]) -> None:
    losses, w = _train(RuntimeOptions())
    assert losses == reference[0] and torch.equal(w, reference[1])


def test_runtime__channels_last_reaches_the_convolutions_and_matches(
    reference: tuple[list[float], torch.Tensor],
) -> None:
    cls = FINETUNE["supervised"]
    m = apply_runtime(cls(cls.Config(**NET), 1, 4), RuntimeOptions(channels_last=True))
    # (a weight with one input channel has identical strides in both layouts: not telling)
    convs = [p for p in m.parameters() if p.dim() == 4 and p.shape[-1] > 1 and p.shape[1] > 1]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous() for p in convs)
    losses, w = _train(RuntimeOptions(channels_last=True))
    assert losses == pytest.approx(reference[0], rel=1e-4)  # summation order only
    assert torch.allclose(w, reference[1], atol=1e-4)


def test_runtime__bf16_autocast_stays_close(reference: tuple[list[float], torch.Tensor]) -> None:
    losses, w = _train(RuntimeOptions(), bf16=True)
    assert losses == pytest.approx(reference[0], rel=3e-2)  # bf16 has an 8-bit mantissa
    assert (w - reference[1]).abs().max() < 1e-2


def test_runtime__bf16_two_stream_ideal_trains() -> None:
    ref, _ = _train(RuntimeOptions(), name="ideal")
    losses, _ = _train(RuntimeOptions(channels_last=True), bf16=True, name="ideal")
    assert all(torch.isfinite(torch.tensor(losses))) and losses == pytest.approx(ref, rel=5e-2)


def test_runtime__threads_are_set() -> None:
    before = torch.get_num_threads()
    try:
        apply_runtime(torch.nn.Linear(2, 2), RuntimeOptions(threads=1))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_runtime__compile_wraps_children_and_keeps_state_dict_keys() -> None:
    cls = FINETUNE["supervised"]
    m = cls(cls.Config(**NET), 1, 4)
    keys = list(m.state_dict())
    apply_runtime(m, RuntimeOptions(compile=True))
    assert list(m.state_dict()) == keys
    assert m.unet._compiled_call_impl is not None  # nn.Module.compile() sets it


def test_runtime__autocast_dtype() -> None:
    cpu = torch.device("cpu")
    assert autocast_dtype("auto", cpu) is None and autocast_dtype("off", cpu) is None
    assert autocast_dtype("fp16", cpu) is None and autocast_dtype("bf16", cpu) is torch.bfloat16
