"""``kernels.threads``: a forward of few tokens runs its element-wise ops on one torch thread,
and the ops whose work pays for more (large dense and quantized linears, the C kernels) get the
process's thread count back inside it; every count is restored, also when a call raises."""

from __future__ import annotations

import pytest
import torch

from kernels import cpu_dense, threads


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_serial_sets_one_thread_and_parallel_gives_the_outer_count_back(two_threads):
    assert threads.outer() == 2
    with threads.parallel():                         # outside a serial region: no change
        assert torch.get_num_threads() == 2
    with threads.serial():
        assert torch.get_num_threads() == 1 and threads.outer() == 2
        with threads.serial():                       # nested: still one, and still the outer count
            assert torch.get_num_threads() == 1 and threads.outer() == 2
        with threads.parallel():
            assert torch.get_num_threads() == 2
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2 and threads.outer() == 2
    with threads.serial(False):
        assert torch.get_num_threads() == 2


def test_counts_come_back_when_a_block_raises(two_threads):
    with pytest.raises(ZeroDivisionError):
        with threads.serial():
            with threads.parallel():
                1 / 0
    assert torch.get_num_threads() == 2 and threads.outer() == 2


def test_a_large_linear_inside_a_serial_forward_takes_every_thread(two_threads, monkeypatch):
    seen = []
    op = cpu_dense.CpuDenseLinear(torch.randn(8, 16), layout="transposed")
    monkeypatch.setattr(op, "_apply", lambda x: seen.append(torch.get_num_threads()) or x @ op.weight)
    monkeypatch.setattr(cpu_dense, "SERIAL_MACS", 0)            # every call counts as large
    with threads.serial():
        op(torch.randn(1, 16))
        assert torch.get_num_threads() == 1
    monkeypatch.setattr(cpu_dense, "SERIAL_MACS", 10**9)        # every call counts as small
    with threads.serial():
        op(torch.randn(1, 16))
    op(torch.randn(1, 16))
    assert seen == [2, 1, 1] and torch.get_num_threads() == 2


def test_a_few_token_forward_runs_serial_and_a_long_prefill_does_not(two_threads, monkeypatch):
    """The model's element-wise ops (its LayerNorms here) see one thread at a decode step's
    size and the process's count once the widest operand passes SERIAL_ELEMENTS; the logits
    agree either way."""
    from model.config import PRESETS
    from model.glm import GLMModel
    from model.paged_kv import prefill_mask

    torch.manual_seed(0)
    model = GLMModel(PRESETS["glm-tiny"]).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    model.prepare()
    seen = []
    norm = model.transformer.final_layernorm
    monkeypatch.setattr(norm, "forward", lambda x, f=norm.forward: seen.append(torch.get_num_threads()) or f(x))
    ids = torch.tensor([[20100, 20200, 20300, 150001]])
    pos = torch.arange(4)[None]
    mask = prefill_mask(4, 3)
    serial = model(ids, pos, mask)
    monkeypatch.setattr(threads, "SERIAL_ELEMENTS", 0)
    plain = model(ids, pos, mask)
    assert seen == [1, 2] and torch.get_num_threads() == 2
    torch.testing.assert_close(serial, plain)        # the same arithmetic (a library may split sums)


def test_a_c_kernel_takes_one_thread_per_share_of_work_up_to_the_outer_count(two_threads):
    assert threads.for_work(0, 100) == 1 and threads.for_work(199, 100) == 1
    assert threads.for_work(200, 100) == 2 and threads.for_work(10**9, 100) == 2
    with threads.serial():                           # the C kernels' count is the outer one
        assert threads.for_work(10**9, 100) == 2
