"""Every launch configuration the heuristic can pick compiles for Hopper (sm_90) without register spills.

No GPU is needed: each kernel variant (block sizes, warps, T-split, input dtype, what the forward stores) is
compiled the way the GPU path compiles it (Triton -> PTX -> ptxas), and ``ptxas -v`` reports its spills.
The CPU suite compiles the largest tile of each kernel per dtype (the most live registers); the full set
(~150 compiles, a few minutes on one core) runs with ``MEDURWKV_TEST_ALL_LAUNCH_CONFIGS=1``, which
``benchmarks/gpu_check.sh`` sets (16 cores there, pytest-xdist).
"""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import tempfile

import pytest
import torch

triton = pytest.importorskip("triton")
from medurwkv.ops import triton_biwkv as tb  # noqa: E402

ALL = os.environ.get("MEDURWKV_TEST_ALL_LAUNCH_CONFIGS") == "1"
DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}

# a grid wide enough to reach every branch of launch_config (tiny C and T, 2D and 3D sizes, huge B and T)
GRID_B = (1, 2, 3, 4, 8, 16, 32, 64, 128, 512, 4096)
GRID_T = (1, 2, 3, 5, 8, 9, 16, 17, 32, 33, 64, 65, 128, 129, 196, 257, 1000, 1024, 4096, 13824, 65536, 10**6)
GRID_C = (1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 48, 64, 96, 192, 384, 768, 1024)


def reachable_configs() -> set:
    cpu = torch.device("cpu")  # the heuristic assumes 132 SMs (H100/H200) off-GPU
    return {tb.launch_config(*s, cpu) for s in itertools.product(GRID_B, GRID_T, GRID_C)}


def variants() -> list:
    """(kernel name, constexprs, num_warps, pointer dtypes) of every compile the reachable configs need."""
    out = set()
    for cfg, dtype in itertools.product(reachable_configs(), DTYPES.values()):
        for save in (False, True):
            y32 = save and dtype != "fp32"
            ptrs = {"k_ptr": dtype, "v_ptr": dtype, "y_ptr": dtype, "y32_ptr": "fp32" if y32 else dtype,
                    "lse_ptr": "fp32" if save else dtype}
            const = {"BLOCK_T": cfg.block_t, "BLOCK_C": cfg.block_c, "HAS_SPLIT": cfg.split, "STORE_Y32": y32, "STORE_LSE": save}
            out.add(("_bi_wkv_fwd_kernel", tuple(sorted(const.items())), cfg.num_warps, tuple(sorted(ptrs.items()))))
        const = {"BLOCK_T": cfg.block_t_bwd, "BLOCK_C": cfg.block_c, "HAS_SPLIT": cfg.split}
        ptrs = {"k_ptr": dtype, "v_ptr": dtype, "g_ptr": dtype, "dk_ptr": dtype, "dv_ptr": dtype}
        out.add(("_bi_wkv_bwd_kernel", tuple(sorted(const.items())), cfg.num_warps_bwd, tuple(sorted(ptrs.items()))))
        if cfg.split:
            out.add(("_chunk_summary_kernel", (("BLOCK_C", cfg.block_c), ("BLOCK_T", cfg.block_t), ("BWD", False)),
                     cfg.num_warps, (("p0", dtype), ("p1", dtype), ("p2", dtype))))
            out.add(("_chunk_summary_kernel", (("BLOCK_C", cfg.block_c), ("BLOCK_T", cfg.block_t_bwd), ("BWD", True)),
                     cfg.num_warps_bwd, (("p0", "fp32"), ("p1", dtype), ("p2", "fp32"))))
    return sorted(out)


def _largest(variant) -> bool:
    """The largest tiles (64 x 32 forward, 32 x 32 backward) with a T-split and everything stored, for
    float32 and bf16 inputs (float16 compiles as bf16 does, with other conversions)."""
    name, const, _, ptrs = variant[0], dict(variant[1]), variant[2], dict(variant[3])
    big_t = 32 if name == "_bi_wkv_bwd_kernel" or const.get("BWD") else 64
    return (const["BLOCK_C"] == 32 and const["BLOCK_T"] == big_t and const.get("HAS_SPLIT", True)
            and const.get("STORE_LSE", True) and (ptrs.get("k_ptr") or ptrs["p1"]) in ("fp32", "bf16"))


VARIANTS = variants()
CPU_VARIANTS = [v for v in VARIANTS if _largest(v)]


def _ptxas() -> str:
    tool = getattr(getattr(getattr(triton, "knobs", None), "nvidia", None), "ptxas", None)
    if tool is not None and getattr(tool, "path", None):
        return tool.path
    from triton.backends.nvidia.compiler import get_ptxas  # older layouts

    return get_ptxas(90).path if callable(get_ptxas) else get_ptxas()


def compile_and_count_spills(name, constexprs, num_warps, ptrs) -> tuple[int, int]:
    """Compile for sm_90; (registers, spill bytes) from ``ptxas -v`` on the PTX."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = getattr(tb, name)
    if not hasattr(kernel, "arg_names"):
        pytest.skip("kernels were loaded under TRITON_INTERPRET")
    sig = {}
    for arg in kernel.arg_names:
        if arg in constexprs:
            sig[arg] = "constexpr"
        elif arg.endswith("_ptr") or arg in ("p0", "p1", "p2"):
            sig[arg] = "*" + ptrs.get(arg, "fp32")
        else:
            sig[arg] = "i32"
    src = ASTSource(kernel, sig, constexprs=dict(constexprs))
    out = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    assert out.asm.get("cubin"), name
    with tempfile.TemporaryDirectory(prefix="cuda-ptxas-") as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(out.asm["ptx"])
        log = subprocess.run([_ptxas(), "-v", "--gpu-name=sm_90a", ptx, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True, check=True).stderr
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    return regs, spills


def test_heuristic_reaches_every_tile_shape():
    cfgs = reachable_configs()
    assert {c.block_c for c in cfgs} == {4, 8, 16, 32}
    assert {c.block_t for c in cfgs} == {16, 32, 64} and {c.block_t_bwd for c in cfgs} == {16, 32}
    assert {c.split for c in cfgs} == {False, True}
    # the shapes of the issue are among them
    for shape in ((16, 196, 192), (8, 1024, 768), (2, 13824, 96), (1, 65536, 64), (2, 17, 3)):
        assert tb.launch_config(*shape, torch.device("cpu")) in cfgs
    assert len(CPU_VARIANTS) == 8 and len(VARIANTS) > 100


@pytest.mark.parametrize("variant", VARIANTS if ALL else CPU_VARIANTS,
                         ids=lambda v: f"{v[0]}-{'-'.join(f'{k}{int(x) if isinstance(x, bool) else x}' for k, x in v[1])}-w{v[2]}-{dict(v[3]).get('k_ptr', dict(v[3]).get('p1'))}")
def test_compiles_without_spills(variant):
    name, constexprs, num_warps, ptrs = variant
    regs, spills = compile_and_count_spills(name, constexprs, num_warps, dict(ptrs))
    assert spills == 0, f"{name} {constexprs} num_warps={num_warps}: {spills} bytes spilled ({regs} registers)"
