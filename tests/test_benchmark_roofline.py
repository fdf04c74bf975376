"""benchmarks/roofline.py's model on hand-set instruction counts (no compiling): the floors, and
the orderings the NOTES read from it."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
roofline = pytest.importorskip("roofline")

H100 = roofline.DEVICES["H100"]
IPE0 = {"lora.down": 6.0, "lora.dx_add": 10.0, "lora.grad_a": 7.0, "lora.fused_fwd": 4.5}


def test_kernel_time_is_the_largest_floor_plus_a_launch_gap():
    gap = roofline.LAUNCH_GAP_S
    assert roofline.kernel_s(H100, bytes_=3.0e9) == pytest.approx(1e-3 + gap)  # 3 GB at 3 TB/s
    assert roofline.kernel_s(H100, flops=700e9) == pytest.approx(1e-3 + gap)
    issue = H100["sms"] * roofline.LANES_PER_SM_CLOCK * H100["clock"]
    assert roofline.kernel_s(H100, bytes_=1.0, flops=1.0, instrs=issue * 2e-3) == pytest.approx(2e-3 + gap)


def test_lora_plans_order_and_mask_cost():
    M = K = N = 4096
    cheap = {k: v + 12.0 for k, v in IPE0.items()}  # a ~12-instruction mask
    costly = {k: v + 66.0 for k, v in IPE0.items()}  # tl.rand per element
    t = roofline.lora_plans(H100, M, K, N, 16, cheap, IPE0)
    assert t["base"] < t["split"] < t["eager"]
    # a cheap mask keeps the masked kernels memory-bound: regenerating ~ reading a saved bit mask
    assert t["split"] == pytest.approx(t["split_saved_mask"], rel=0.02)
    slow = roofline.lora_plans(H100, M, K, N, 16, costly, IPE0)
    assert slow["split"] > t["split"] * 1.05 and slow["split_saved_mask"] < slow["split"]
    assert t["fused_fwd_with_dropout"] > t["split_fwd_with_dropout"]  # mask per column block


# hand-set loop lengths (instructions per score element) of the four prefix kernels
PREFIX_IPE = {"prefix.fwd": {"loops": [14.0, 12.0, 17.0]}, "prefix.dq": {"loops": [28.0, 25.0, 33.0]},
              "prefix.dkdv": {"loops": [43.0, 30.0]}, "prefix.dprefix": {"loops": [32.0]}}


def test_prefix_block_counts_follow_the_causal_triangle():
    T, P, BM, BN = 2048, 32, 128, 64
    pre, bulk, edge = roofline._query_block_elems(T, T, P, BM, BN)
    assert pre == (T // BM) * BM * BN  # one (padded) prefix block per query block
    assert T * T / 2 < bulk + edge < T * T / 2 + T * BM  # the triangle plus the diagonal blocks
    diag, full = roofline._key_block_elems(T, T, 64, 64)
    assert diag + full == pytest.approx(T * T / 2, rel=0.05) and diag < full


def test_prefix_predictions_order():
    """Serial >= overlapped; the masked baseline (every score, float bias) is slowest; cuDNN's rate
    beats FA2's; the concat copies scale with the KV heads."""
    ours = roofline.prefix_kernel_plan(H100, 16, 32, 32, 2048, 32, 128, PREFIX_IPE)
    assert ours["fwd"][0] <= ours["fwd"][1] and ours["bwd"][0] <= ours["bwd"][1]
    alt = roofline.prefix_alternatives(H100, 16, 32, 32, 2048, 32, 128)
    total = {k: f + b for k, (f, b) in alt.items()}
    assert total["masked"] > max(v for k, v in total.items() if k != "masked")
    assert total["concat cuDNN"] < total["concat FA2"] and total["hybrid cuDNN"] < total["hybrid FA2"]
    gqa = roofline.prefix_alternatives(H100, 16, 32, 8, 2048, 32, 128)
    assert sum(gqa["concat FA2"]) < total["concat FA2"] and sum(gqa["hybrid FA2"]) == pytest.approx(total["hybrid FA2"])
    assert total["masked"] / (ours["fwd"][1] + ours["bwd"][1]) > 1.3


# hand-set counts of the epilogue plan's kernels (dropout on), the NF4 kernels per weight
EPI_IPE = {**{k: v + 12.0 for k, v in IPE0.items()}, "lora.epilogue_dx": 1.5, "lora.grad_dy": 3.0,
           "lora.epilogue_dx:epilogue": 30.0, "lora.epilogue_dx:epilogue unmasked": 15.0}
NF4_IPE = {"nf4.dequant": 2.0, "nf4.matmul fwd": 15.0, "nf4.matmul dx": 40.0}


def test_qlora_plans_add_the_lora_plans_extra_to_the_dequantisation():
    """QLoRA's dequant plans are two dequantisations plus a LoRA plan at the dense base's shape:
    split's extra over its base, or the whole epilogue plan (its Triton GEMMs at cuBLAS' rate,
    the model's stated assumption); the fused plan re-dequantises per row tile and is slowest."""
    M = K = N = 4096
    t = roofline.qlora_train_plans(H100, M, K, N, 16, NF4_IPE, EPI_IPE, IPE0)
    lora = roofline.lora_plans(H100, M, K, N, 16, EPI_IPE, IPE0)
    assert t["dense"] == pytest.approx(lora["base"])
    deq = (t["dequant"] - t["dense"]) - (lora["split"] - lora["base"])  # the two dequantisations
    assert deq > 2 * roofline.kernel_s(H100, bytes_=2 * N * K)  # at least the bf16 weight written twice
    assert t["dequant_epilogue"] == pytest.approx(deq + lora["epilogue"])
    assert t["dequant"] - t["dequant_epilogue"] == pytest.approx(lora["split"] - lora["epilogue"])
    assert t["dense"] < t["dequant_epilogue"] < t["dequant"] < t["fused"]


@pytest.mark.parametrize("shape", [(4096, 4096, 4096), (4096, 4096, 14336), (16384, 4096, 4096)])
def test_lora_floor_is_three_passes_and_no_plan_goes_below_it(shape):
    """The floor: x read twice and dy once (three launches) above the base; the modelled plans,
    with cheap or costly masks, all stay at or above it."""
    M, K, N = shape
    floor = roofline.lora_floor(H100, M, K, N)
    x_pass = roofline.kernel_s(H100, bytes_=2 * M * K)
    assert floor == pytest.approx(2 * x_pass + roofline.kernel_s(H100, bytes_=2 * M * N))
    assert x_pass == pytest.approx(2 * M * K / H100["bw"] + roofline.LAUNCH_GAP_S)
    t = roofline.lora_plans(H100, M, K, N, 16, EPI_IPE, IPE0)
    for plan in ("split", "split_saved_mask", "eager", "epilogue"):
        assert t[plan] - t["base"] >= floor, plan
