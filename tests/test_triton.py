"""What is particular to the Triton kernel (xception_fast.triton_sepconv) beyond the shared suite:
the autotuner's choice of tiles, which no CPU run exercises otherwise."""
import pytest
import torch

triton_sepconv = pytest.importorskip("xception_fast.triton_sepconv")

ALL = "all of the dtype's configs"
# (dtype, M, C, Cout) -> the (BLOCK_M, BLOCK_N, BLOCK_K) tuned on a GPU
PRUNED_TILES = [
    (torch.bfloat16, 20, 3, 5, {(64, 64, 32)}),  # every tile is wider: the smallest alone
    (torch.float32, 20, 3, 5, {(32, 64, 32)}),
    (torch.bfloat16, 100, 40, 30, {(128, 64, 32), (64, 64, 32)}),
    (torch.float32, 100, 40, 30, {(64, 64, 32), (32, 64, 32)}),
    (torch.bfloat16, 300000, 64, 128,
     {(128, 128, 64), (128, 128, 32), (64, 128, 32), (128, 64, 32), (64, 64, 32)}),
    (torch.bfloat16, 2888, 728, 728, ALL),
    (torch.float32, 2888, 728, 728, ALL),
]


def tile(cfg):
    return cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_K"]


def prune(dtype, m, c, cout):
    # The launcher passes C and Cout as DIV * VEC (triton_sepconv._alignment).
    c_vec, cout_vec = triton_sepconv._alignment(c), triton_sepconv._alignment(cout)
    return triton_sepconv._prune_configs(triton_sepconv._GPU_CONFIGS,
                                         {"x_ptr": torch.empty(0, dtype=dtype), "M": m, "C_DIV": c // c_vec,
                                          "COUT_DIV": cout // cout_vec}, C_VEC=c_vec, COUT_VEC=cout_vec)


@pytest.mark.parametrize("dtype, m, c, cout, tiles", PRUNED_TILES)
def test_autotuning_keeps_the_tiles_that_fit_the_problem(dtype, m, c, cout, tiles):
    ours = triton_sepconv._FP32_CONFIGS if dtype == torch.float32 else triton_sepconv._HALF_CONFIGS
    expected = ours if tiles == ALL else [cfg for cfg in ours if tile(cfg) in tiles]
    assert prune(dtype, m, c, cout) == expected
