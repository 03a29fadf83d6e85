"""CUDA kernels: the .cu sources (quantized linears, paged decode attention) compile with
nvcc for sm_80/sm_90 (runs on CPU machines with nvcc), and on a GPU the quantized kernels
equal kernels.reference and the paged decode kernel equals the torch path of model.paged_kv.

GPU tests are marked `gpu` and skipped without torch.cuda; bench/gpu_check.py runs
the same parity checks plus bandwidth figures in one go on a lent GPU machine.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from kernels.reference import QuantizedWeight, dequantize, quantized_matmul

CUDA_DIR = Path(__file__).resolve().parents[1] / "kernels" / "cuda"
SOURCES = sorted(CUDA_DIR.glob("*.cu"))
ARCHS = ("sm_80", "sm_90")
NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH")
gpu = pytest.mark.gpu
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
pytestmark = [pytest.mark.processes, pytest.mark.slow]      # nvcc runs as a subprocess; NVRTC compiles


# ---- random weights in the official format ----------------------------------

def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int [N, K] in [-8, 7] -> int8 [N, K/2]; even column in the high nibble."""
    hi, lo = q[:, 0::2].to(torch.int16), q[:, 1::2].to(torch.int16)
    return (hi * 16 + (lo & 0x0F)).to(torch.int8)  # in [-128, 127]: the byte's value


def random_qweight(n: int, k: int, bits: int, group_size: int | None,
                   gen: torch.Generator) -> tuple[QuantizedWeight, torch.Tensor]:
    """A random QuantizedWeight and its exact fp32 weight [N, K] (q * scale)."""
    qmax = 127 if bits == 8 else 7
    q = torch.randint(-qmax, qmax + 1, (n, k), generator=gen, dtype=torch.int8)
    groups = 1 if group_size is None else k // group_size
    scale = ((torch.rand(n, groups, generator=gen) + 0.5) / qmax).to(torch.float16)
    w = q.float() * scale.float().repeat_interleave(k // groups, dim=1)
    values = q if bits == 8 else pack_int4(q)
    scale = scale[:, 0].contiguous() if group_size is None else scale
    return QuantizedWeight(values=values, scale=scale, bits=bits, in_features=k,
                           group_size=group_size), w


def assert_close_fp32_acc(got: torch.Tensor, ref: torch.Tensor) -> None:
    """Within two output ulps, relative to the element and to the output's rms.

    Both sides accumulate in fp32 and round the result to the activation dtype;
    the reference also rounds each dequantized weight to that dtype first.
    """
    assert got.dtype == ref.dtype and got.shape == ref.shape
    eps = torch.finfo(ref.dtype).eps
    got, ref = got.float(), ref.float()
    tol = 2 * eps * (ref.abs() + ref.pow(2).mean().sqrt())
    err = (got - ref).abs()
    assert torch.all(err <= tol), f"max err {err.max().item():.3e}, max tol {tol.max().item():.3e}"


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("group_size", [None, 64])
def test_random_weights_follow_reference_layout(bits, group_size):
    """The test's packing agrees with the reference's unpacking (CPU)."""
    gen = torch.Generator().manual_seed(0)
    qw, w = random_qweight(8, 256, bits, group_size, gen)
    torch.testing.assert_close(dequantize(qw, torch.float32), w, rtol=0, atol=0)


# ---- nvcc compile (CPU CI) ---------------------------------------------------

def _nvcc(src: Path, arch: str, out: Path, *defines: str) -> subprocess.CompletedProcess:
    cmd = [NVCC, "-cubin", f"-arch={arch}", "--std=c++17", "-Xptxas", "-v", *defines,
           "-o", str(out), str(src)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def expected_kernel_names(src: Path) -> set[str]:
    """Every entry point the host code can ask for in ``src`` (kernels.cuda: at the default
    rows per block; kernels.cuda_paged: every pool dtype)."""
    from kernels.cuda import GEMV_MAX_ROWS, Variant

    if src.name == "paged_attention.cu":
        from kernels.cuda_paged import _NAMES

        return {f"paged_decode_{name}" for name in _NAMES.values()}
    names = set()
    for dtype in (torch.float16, torch.bfloat16):
        for bits in (8, 4):
            for grouped in (False, True):
                v = Variant(dtype, bits, grouped)
                names |= {v.gemv_name(m) for m in range(1, GEMV_MAX_ROWS + 1)} | {v.dequant_name()}
    return names


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Every .cu file for every arch, compiled in parallel: {(src, arch): (proc, cubin)}."""
    out = tmp_path_factory.mktemp("cubin")
    jobs = [(src, arch, out / f"{src.stem}.{arch}.cubin") for src in SOURCES for arch in ARCHS]
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        procs = list(pool.map(lambda j: _nvcc(*j), jobs))
    return {(src, arch): (proc, cubin) for (src, arch, cubin), proc in zip(jobs, procs)}


def test_cuda_sources_exist():
    assert [p.name for p in SOURCES] == ["paged_attention.cu", "quant_gemv.cu"]


def test_cuda_module_is_lazy_and_rejects_cpu():
    """kernels.cuda imports without cupy or a GPU; preparing for a CPU device is an error."""
    import kernels.cuda as kc

    assert kc.SOURCE.is_file()
    qw, _ = random_qweight(4, 64, 8, None, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="CUDA device"):
        kc.prepare_cuda(qw, "cpu", torch.float16)


@needs_nvcc
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("src", SOURCES, ids=lambda p: p.name)
def test_nvcc_compiles(compiled, src, arch):
    proc, cubin = compiled[(src, arch)]
    assert proc.returncode == 0, proc.stderr
    assert cubin.stat().st_size > 0
    kernels = set(re.findall(r"Compiling entry function '(\w+)'", proc.stderr))
    assert kernels == expected_kernel_names(src)  # the names kernels/cuda*.py launch
    spills = re.findall(r"(\d+) bytes spill stores", proc.stderr)
    assert spills and all(s == "0" for s in spills), "a kernel spills registers"


@needs_nvcc
def test_nvcc_compiles_single_family(tmp_path):
    """The -DQG_ONLY form the runtime passes to NVRTC, at a non-default R."""
    defines = ("-DQG_ONLY", "-DQG_TNAME=bf16", "-DQG_TAG=qg::BF16", "-DQG_BITS=4",
               "-DQG_SCHEME=grp", "-DQG_GROUPED=1", "-DQG_ROWS=8")
    proc = _nvcc(CUDA_DIR / "quant_gemv.cu", "sm_90", tmp_path / "one.cubin", *defines)
    assert proc.returncode == 0, proc.stderr
    names = set(re.findall(r"Compiling entry function '(\w+)'", proc.stderr))
    assert names == {f"qgemv_bf16_w4_grp_m{m}_r8" for m in range(1, 9)} | {"qdequant_bf16_w4_grp"}
    from kernels.cuda import Variant

    variant = Variant(torch.bfloat16, 4, True, rows_per_block=8)
    assert defines == variant.defines()


@needs_nvcc
@pytest.mark.parametrize("name", ["f32", "f16", "bf16"])
def test_nvcc_compiles_one_paged_dtype(tmp_path, name):
    """The -DPA_ONLY form kernels.cuda_paged passes to NVRTC."""
    proc = _nvcc(CUDA_DIR / "paged_attention.cu", "sm_90", tmp_path / "one.cubin", "-DPA_ONLY", f"-DPA_TNAME={name}")
    assert proc.returncode == 0, proc.stderr
    assert set(re.findall(r"Compiling entry function '(\w+)'", proc.stderr)) == {f"paged_decode_{name}"}


def _nvrtc():
    try:
        from cupy_backends.cuda.libs import nvrtc
        nvrtc.getVersion()
    except Exception as e:  # cupy or libnvrtc missing
        pytest.skip(f"cupy NVRTC unavailable: {e}")
    return nvrtc


@pytest.mark.parametrize("src, options", [
    ("quant_gemv.cu", ("-DQG_ONLY", "-DQG_TNAME=f16", "-DQG_TAG=qg::F16", "-DQG_BITS=4", "-DQG_SCHEME=grp",
                       "-DQG_GROUPED=1", "-DQG_ROWS=4")),
    ("paged_attention.cu", ("-DPA_ONLY", "-DPA_TNAME=bf16")),
])
def test_nvrtc_compiles_without_headers(src, options):
    """What the runtime does, minus the GPU: NVRTC with no include paths (needs cupy)."""
    nvrtc = _nvrtc()
    if src == "quant_gemv.cu":
        from kernels.cuda import Variant

        assert options == Variant(torch.float16, 4, True).defines()
    prog = nvrtc.createProgram((CUDA_DIR / src).read_text(), src, [], [])
    try:
        nvrtc.compileProgram(prog, ["--std=c++17", "-arch=sm_80", *options])
    except nvrtc.NVRTCError:
        pytest.fail(nvrtc.getProgramLog(prog))
    assert len(nvrtc.getCUBIN(prog)) > 0


# ---- GPU parity --------------------------------------------------------------

M_VALUES = (1, 3, 8, 17, 64)


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("group_size", [None, 128], ids=["row", "grp128"])
@pytest.mark.parametrize("bits", [8, 4])
def test_cuda_matches_reference(bits, group_size, dtype):
    from kernels.cuda import prepare_cuda

    gen = torch.Generator().manual_seed(1000 * bits + (group_size or 0))
    n, k = 203, 1024  # N not a multiple of the rows per block: exercises the tail
    qw, _ = random_qweight(n, k, bits, group_size, gen)
    op = prepare_cuda(qw, "cuda", dtype)
    assert op.vectorized
    assert op.nbytes == qw.values.nbytes + qw.scale.nbytes
    for m in M_VALUES:
        x = torch.randn(m, k, generator=gen).to("cuda", dtype)
        ref = quantized_matmul(x, op.qw)
        assert_close_fp32_acc(op(x), ref)
    ref_w = dequantize(op.qw, dtype)
    torch.testing.assert_close(op.dequantize(), ref_w, rtol=0, atol=0)  # same single rounding


@gpu
@needs_gpu
def test_cuda_leading_dims_and_empty():
    from kernels.cuda import prepare_cuda

    gen = torch.Generator().manual_seed(7)
    qw, _ = random_qweight(64, 256, 4, None, gen)
    op = prepare_cuda(qw, "cuda", torch.float16)
    x = torch.randn(2, 3, 256, generator=gen).to("cuda", torch.float16)
    assert_close_fp32_acc(op(x), quantized_matmul(x, op.qw))
    assert op(x[:, :0]).shape == (2, 0, 64)
    xs = torch.randn(5, 512, generator=gen).to("cuda", torch.float16)[:, ::2]  # strided
    assert_close_fp32_acc(op(xs), quantized_matmul(xs.contiguous(), op.qw))


@gpu
@needs_gpu
def test_cuda_unaligned_shapes_fall_back_to_torch():
    from kernels.cuda import prepare_cuda

    gen = torch.Generator().manual_seed(8)
    qw, _ = random_qweight(10, 40, 4, None, gen)  # 40 int4 = 20 bytes: no 16-byte chunks
    op = prepare_cuda(qw, "cuda", torch.bfloat16)
    assert not op.vectorized
    for m in (1, 17):
        x = torch.randn(m, 40, generator=gen).to("cuda", torch.bfloat16)
        assert_close_fp32_acc(op(x), quantized_matmul(x, op.qw))


# ---- paged decode attention (kernels.cuda_paged) ----------------------------------

def scattered_pool(heads: int, dim: int, lens: list[int], block_size: int, dtype, device, gen):
    """A pool layer ``[heads, slots, dim]`` with random keys/values and each row's blocks taken
    in a shuffled order; (keys, values, tables [rows, most], lens)."""
    from model.kv_footprint import blocks_for

    need = [blocks_for(n, block_size) for n in lens]
    total = sum(need) + 3
    order = torch.randperm(total, generator=gen).tolist()
    keys = torch.randn(heads, total * block_size, dim, generator=gen).to(device, dtype)
    values = torch.randn(heads, total * block_size, dim, generator=gen).to(device, dtype)
    most, tables, at = max(max(need), 1), [], 0
    for n in need:
        table = order[at:at + n] or [order[-1]]
        at += n
        tables.append(table + [table[-1]] * (most - len(table)))
    return (keys, values, torch.tensor(tables, dtype=torch.long, device=device),
            torch.tensor(lens, dtype=torch.long, device=device))


def test_paged_decode_is_lazy_and_off_without_a_gpu():
    import kernels.cuda_paged as kp

    assert kp.SOURCE.is_file()
    assert not kp.supports(torch.device("cpu"), torch.float16, 128)


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("dim", [32, 128])
def test_paged_decode_kernel_matches_the_reference(dtype, dim):
    from kernels import cuda_paged, reference

    assert cuda_paged.supports(torch.device("cuda"), dtype, dim)
    gen = torch.Generator().manual_seed(dim)
    lens = [1, 15, 16, 17, 300, 0, 2048]                   # one block, a block boundary, padding, GLM's longest
    keys, values, tables, lens_t = scattered_pool(12, dim, lens, 16, dtype, "cuda", gen)
    q = (torch.randn(len(lens), 12, dim, generator=gen) / dim ** 0.5).to("cuda")
    got = cuda_paged.paged_decode(q, keys, values, tables, lens_t, 16)
    assert got.dtype == dtype and got.shape == q.shape
    ref = reference.paged_decode(q, keys, values, tables, lens_t, 16)
    tol = 1e-5 if dtype == torch.float32 else 4 * torch.finfo(dtype).eps
    torch.testing.assert_close(got.float(), ref, rtol=0, atol=tol)
    assert torch.count_nonzero(got[5]) == 0                # a length-0 row gives zeros


def test_the_reference_is_what_the_cpu_kernel_computes():
    """The GPU test's pool builder and reference, pinned on a CPU to kernels.cpu_paged."""
    from kernels import cpu_paged, reference

    if not cpu_paged.supports(torch.float32):
        pytest.skip("no C compiler for kernels.cpu_paged on this machine")
    gen = torch.Generator().manual_seed(3)
    lens = [1, 15, 16, 17, 300, 0]
    keys, values, tables, lens_t = scattered_pool(4, 32, lens, 16, torch.float32, "cpu", gen)
    q = torch.randn(len(lens), 4, 32, generator=gen) / 32 ** 0.5
    ref = reference.paged_decode(q, keys, values, tables, lens_t, 16)
    got = cpu_paged.paged_decode(q, keys, values, tables, lens_t, 16)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    assert torch.count_nonzero(ref[5]) == 0 and torch.count_nonzero(got[5]) == 0
