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
