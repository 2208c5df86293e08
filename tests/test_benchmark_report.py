"""The benchmarks' bookkeeping: which contenders a test times in alternation, and that the speedups
the summary and the README tables print are the ratios of those same rounds' medians."""
import dataclasses

import pytest
import torch

import xception_fast
from benchmarks import harness, readme_tables
from benchmarks.report import Results
from xception_fast.fusion import FusedSeparableConv2d

_ENV = {"device": "a CPU (2 threads)", "slug": "cpu-test-2t", "profile": "full", "torch": "t", "triton": None,
        "python": "3", "date": "today", "commit": "abc"}
_PEAKS = {"flops": {"fp32": 1e12}, "bandwidth": 1e11, "source": "test"}


def _row(contender, median, paired=None):
    row = {"kind": "infer", "shape": "net 224²", "dtype": "fp32", "batch": 8, "contender": contender,
           "group": "infer net 224² fp32 b8", "panel": "Whole model, inference, fp32, batch 8", "row": "net 224²",
           "median_s": median, "tflops": 1.0, "gbps": 1.0, "roofline_fraction": 0.5}
    if paired:
        row["paired_medians_s"] = paired
    return row


@pytest.mark.skipif(harness.DEVICE.type != "cpu" or harness.PROFILE != "full",
                    reason="the pairing rule checked is the CPU's full profile")
def test_fused_contenders_are_paired_with_eager_and_compile_where_their_case_has_it():
    shape = harness.UNIT_SHAPES[0]
    fused = harness.Case("unit", "fp32", 8, "fused_cpu", shape=shape)

    def paired(case):
        return [c.contender for c in harness.paired_baselines(case)]

    assert paired(fused) == ["eager_cl", "compile"]
    assert all(c.group == fused.group for c in harness.paired_baselines(fused))
    # bf16 units have no torch.compile contender; compile itself and eager pair only with eager.
    assert paired(dataclasses.replace(fused, dtype="bf16")) == ["eager_cl"]
    assert paired(dataclasses.replace(fused, contender="compile")) == ["eager_cl"]
    assert paired(dataclasses.replace(fused, contender="product_only")) == ["eager_cl"]
    assert paired(dataclasses.replace(fused, contender="eager_cl")) == []
    model = harness.Case("infer", "fp32", 8, "fused_cpu_compiled", model="Xception")
    assert paired(model) == ["eager_cl", "compile"]


def test_speedups_are_ratios_of_the_paired_medians(tmp_path):
    results = Results(_ENV, _PEAKS, str(tmp_path))
    results.rows = [_row("eager_cl", 1.0), _row("compile", 1.0),
                    _row("fused_cpu", 0.5, {"eager_cl": 0.8, "compile": 0.6}), _row("fused_cpu_compiled", 0.5)]
    paired, unpaired = results.speedups()[2:]
    assert paired["eager_cl"] == pytest.approx(1.6) and paired["compile"] == pytest.approx(1.2)
    # Without medians timed beside it, a contender is compared with the other tests' medians.
    assert unpaired["eager_cl"] == pytest.approx(2.0) and unpaired["compile"] == pytest.approx(2.0)
    table = results.markdown()
    assert "| net 224² | fused_cpu | 500 ms | 800 ms | 600 ms | 1.60× | 1.20× |" in table
    assert "| net 224² | fused_cpu_compiled | 500 ms | — | — | 2.00× | 2.00× |" in table


def test_readme_tables_use_the_paired_medians():
    rows = [_row("eager_cl", 1.0), _row("compile", 1.0), _row("fused_cpu", 0.5, {"eager_cl": 0.8, "compile": 0.6}),
            _row("fused_cpu_compiled", 0.5, {"eager_cl": 0.7, "compile": 0.45})]
    assert readme_tables._speedups(rows, "fused_cpu", shape="net 224²", dtype="fp32", batch=8) == "1.60 / 1.20"
    assert readme_tables._over(rows, rows[3], "compile") == pytest.approx(0.9)
    del rows[2]["paired_medians_s"]["compile"]
    assert readme_tables._speedups(rows, "fused_cpu", shape="net 224²", dtype="fp32", batch=8) == "1.60 / 2.00"


def test_cpu_peaks_take_the_faster_of_the_matmul_and_the_pointwise_conv(monkeypatch):
    """The CPU's FLOP peak per dtype is the faster of its two measurements, whichever that is, so
    that neither library's slower product sets the roofline."""
    from benchmarks import peaks

    rates = {("mm", "fp32"): 1.5e11, ("conv", "fp32"): 2.1e11, ("mm", "bf16"): 4.2e11, ("conv", "bf16"): 3.9e11}
    names = {torch.float32: "fp32", torch.bfloat16: "bf16"}
    monkeypatch.setattr(peaks, "_measure_matmul", lambda device, dtype, tf32=False: rates["mm", names[dtype]])
    monkeypatch.setattr(peaks, "_measure_pointwise_conv", lambda device, dtype: rates["conv", names[dtype]])
    monkeypatch.setattr(peaks, "_measure_copy", lambda device: 3e10)
    measured = peaks.measure_peaks(torch.device("cpu"))
    assert measured["flops"] == {"fp32": 2.1e11, "bf16": 4.2e11}
    assert "1x1 convolution" in measured["source"]


def test_verdicts_set_each_fused_speedup_against_the_product_alone(tmp_path):
    results = Results(_ENV, _PEAKS, str(tmp_path))
    unit = dict(kind="unit", shape="u", row="u", panel="Per layer, fp32, batch 8")
    results.rows = [_row("eager_cl", 1.0), _row("product_only", 0.8, {"eager_cl": 1.0}),
                    _row("fused_cpu", 0.9, {"eager_cl": 1.08}),
                    {**_row("eager_cl", 2.0), **unit, "group": "unit u fp32 b8"},
                    {**_row("product_only", 1.0, {"eager_cl": 2.0}), **unit, "group": "unit u fp32 b8"},
                    {**_row("fused_cpu", 1.25, {"eager_cl": 2.0}), **unit, "group": "unit u fp32 b8"}]
    verdicts = "\n".join(results._verdicts(results.speedups()))
    assert ("fused_cpu is faster than eager on this CPU: 1.20×; its units' products alone (the ceiling at eager's "
            "convolution speed): 1.25×") in verdicts
    assert "its speedup is 80–80 % of the product alone's" in verdicts
    # The ceiling is not a contender: it gets no verdict of its own.
    assert "product_only is" not in verdicts and "batch 8, product_only" not in verdicts


def _small_unit(**fields):
    return harness.UnitShape(**{"family": "Xception", "channels": 8, "out_channels": 12, "size": 9, **fields})


@pytest.mark.parametrize("shape", [_small_unit(), _small_unit(family="MobileNetV2", k=5, stride=2)],
                         ids=["xception", "inverted-k5-s2"])
def test_the_product_alone_is_the_units_own_product(shape):
    """product_only's unit multiplies the unit's own depthwise result by its own folded pointwise
    weights: its output is the eager unit's."""
    torch.manual_seed(0)
    unit = harness.EagerUnit(shape)
    x = torch.randn(2, shape.channels, shape.size, shape.size).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = unit(x)
        got = unit.product_alone(x, torch.float32)(x, None)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_the_products_only_model_runs_every_unit_as_its_product():
    """product_only's model: each fused unit's call goes to its pointwise conv over a tensor of the
    depthwise result's shape, and the model's output keeps its shape."""
    from xception_fast.model import Xception

    torch.manual_seed(0)
    model = Xception(num_classes=10).eval()
    x = torch.randn(1, 3, 71, 71).contiguous(memory_format=torch.channels_last)
    fused, report = xception_fast.fuse(model)
    harness._products_only(fused)
    with torch.no_grad():
        out = fused(x)
    units = [m for m in fused.modules() if isinstance(m, FusedSeparableConv2d)]
    assert out.shape == (1, 10) and len(units) == report.count == 34
    for unit in units:
        (depthwise, weight, _), = unit.product_inputs.values()
        assert depthwise.shape[1] == unit.out_channels == weight.shape[1]


def test_readme_unit_table_sets_the_fused_op_beside_the_product_alone():
    unit = dict(kind="unit", shape="u", dtype="bf16", batch=8)
    rows = [{**_row("fused_cpu", 0.5, {"eager_cl": 0.8}), **unit},
            {**_row("product_only", 0.4, {"eager_cl": 0.8}), **unit}]
    table = readme_tables.units_table([{"results": rows}])
    assert "| u | — / — | — / — | — / — | — / — | 1.60 / 2.00 | — / — | — |" in table


def test_verdicts_give_the_spread_of_eager_medians_with_and_without_its_own_test(tmp_path):
    results = Results(_ENV, _PEAKS, str(tmp_path))
    results.rows = [_row("eager_cl", 1.0), _row("compile", 0.9, {"eager_cl": 0.8}),
                    _row("fused_cpu", 0.5, {"eager_cl": 0.84, "compile": 0.9})]
    verdicts = "\n".join(results._verdicts(results.speedups()))
    assert ("eager channels_last, measured in its own test and with each contender it is paired with: its medians "
            "within one model case differ by at most 25.0 % (infer net 224² fp32 b8); those timed beside the "
            "contenders alone (the ones the ratios use) by at most 5.0 %") in verdicts


def test_spreads_say_the_host_state_each_eager_median_was_taken_in(tmp_path):
    """Eager's medians of one case: 1.0 s and 0.95 s with the fork-join probe at 5 µs, 1.3 s at
    7.5 µs. The spread is 36.8 %; within one state of the host 5.3 %, which meets the target."""
    results = Results(_ENV, _PEAKS, str(tmp_path))
    model = dict(shape="Xception 299²", row="Xception 299²", group="infer Xception 299² fp32 b8")
    results.rows = [{**_row("eager_cl", 1.0), **model, "fork_join_us": 5.0},
                    {**_row("compile", 0.9, {"eager_cl": 0.95}), **model, "fork_join_us": 5.2},
                    {**_row("fused_cpu", 0.5, {"eager_cl": 1.3, "compile": 0.9}), **model, "fork_join_us": 7.5}]
    verdicts = "\n".join(results._verdicts(results.speedups()))
    assert ("its medians within one model case differ by at most 36.8 % (infer Xception 299² fp32 b8: 950 ms with "
            "the fork-join probe at 5.2 µs, 1.30 s at 7.5 µs)") in verdicts
    assert ("those timed in the same state of the host (fork-join probe readings within 15 % of each other) by at "
            "most 5.3 % (infer Xception 299² fp32 b8)") in verdicts
    markdown = results.markdown()
    assert ("the same eager case measured twice in one run agrees within 10 %: **missed**, its medians within one "
            "model case differ by at most 36.8 %") in markdown
    assert ("timed in the same state of the host (fork-join probe readings within 15 % of each other), by at most "
            "5.3 % (infer Xception 299² fp32 b8): what is left is the host changing state between the tests"
            ) in markdown
    assert "5.0–7.5 µs over this run's tests; the host changed state during the run" in markdown
    assert "| 1.00× | 0.90× | 1 | 1 | 50.0 % | 5.0 µs |  |" in markdown


def _unit_row(contender, median, shape="Xception 256→256 @74²", dtype="bf16", batch=8, paired=None):
    group = f"unit {shape} {dtype} b{batch}"
    row = {**_row(contender, median, paired), "kind": "unit", "shape": shape, "row": shape, "dtype": dtype,
           "batch": batch, "math": dtype, "group": group, "panel": f"Per layer, {dtype}, batch {batch}"}
    return row


def test_targets_work_out_what_the_product_alone_leaves_a_unit_that_misses_one(tmp_path):
    """A missed 1.3x unit target: the time it allows, the product alone at the fused op's paired
    eager median, and the depthwise conv's multiply-adds at the fp32 peak (256 channels @74², batch
    8: 2·8·74²·9·256 FLOP, 0.202 ms at 1 TFLOP/s); out of reach where the product leaves less."""
    peaks = {"flops": {"fp32": 1e12, "bf16": 2e12}, "bandwidth": 1e11, "source": "test"}
    results = Results(_ENV, peaks, str(tmp_path))
    results.rows = [_unit_row("eager_cl", 20e-3), _unit_row("product_only", 14e-3, paired={"eager_cl": 21e-3}),
                    _unit_row("fused_cpu", 16e-3, paired={"eager_cl": 20e-3}),
                    _unit_row("eager_cl", 2e-3, batch=1), _unit_row("product_only", 1.5e-3, batch=1,
                                                                      paired={"eager_cl": 1.9e-3}),
                    _unit_row("fused_cpu", 1.7e-3, batch=1, paired={"eager_cl": 2.0e-3}),
                    _unit_row("eager_cl", 3e-3, shape="Xception 728→728 @19²"),
                    _unit_row("fused_cpu", 2.9e-3, shape="Xception 728→728 @19²", paired={"eager_cl": 3e-3})]
    text = "\n".join(results._targets(results.speedups()))
    assert "- every unit, fp32 and bf16, batch 1, 8, 32: ≥ 1× eager channels_last: met, 3 of 3 cases" in text
    assert ("- the 147² and 74² units, fp32 and bf16, batch 1, 8, 32: ≥ 1.3× eager channels_last: **missed**, "
            "0 of 2 cases (lowest 1.176×)") in text
    # batch 8: eager 20 ms allows 15.4 ms; the product alone (1.5×) at that eager median 13.3 ms leaves
    # 2.05 ms, more than the depthwise floor: the fused kernel's to take.
    assert ("  - Xception 256→256 @74², bf16, batch 8: 1.250×; eager 20.0 ms, the target allows 15.4 ms, the fused "
            "op took 16.0 ms; the product alone 13.3 ms (1.500×, 431 GFLOP/s, 22 % of the bf16 peak), which "
            "leaves 2.05 ms for the depthwise conv, whose multiply-adds take 202 µs at the fp32 peak: within "
            "reach of a faster depthwise pass; the fused op took 2.67 ms more than the product alone; a depthwise "
            "pass that writes its result to memory moves 44.9 MB more than the product alone, 449 µs at the "
            "measured bandwidth where they do not fit in the last-level cache") in text
    assert "cache: only" not in text
    # At a tenth of the bandwidth those 44.9 MB take 4.49 ms, more than the 2.05 ms left.
    results.peaks = {**peaks, "bandwidth": 1e10}
    text = "\n".join(results._targets(results.speedups()))
    assert ("44.9 MB more than the product alone, 4.49 ms at the measured bandwidth where they do not fit in the "
            "last-level cache: only a fusion that keeps the depthwise result in cache meets the target") in text
    # batch 1: the product alone at 1.267× leaves nothing for the target of 1.3×.
    assert ("  - Xception 256→256 @74², bf16, batch 1: 1.176×; eager 2.00 ms, the target allows 1.54 ms, the fused "
            "op took 1.70 ms; the product alone 1.58 ms (1.267×, 455 GFLOP/s, 23 % of the bf16 peak): out of reach "
            "at eager's convolution speed, the product alone is slower than the target") in text
    assert "728→728" not in text


def test_targets_of_a_model_set_the_fused_speedup_against_the_products_alone(tmp_path):
    results = Results(_ENV, _PEAKS, str(tmp_path))
    model = dict(shape="Xception 299²", row="Xception 299²", group="infer Xception 299² amp-bf16 b8",
                 dtype="amp-bf16", panel="Whole model, inference, amp-bf16, batch 8")
    results.rows = [{**_row("eager_cl", 1.0), **model},
                    {**_row("product_only", 0.8, {"eager_cl": 1.0}), **model},
                    {**_row("fused_cpu", 0.9, {"eager_cl": 1.0}), **model}]
    text = "\n".join(results._targets(results.speedups()))
    assert ("- Xception, inference, amp-bf16, batch 8: ≥ 1.3× eager channels_last: **missed**, 0 of 1 cases "
            "(lowest 1.111×)") in text
    assert ("  - Xception 299², amp-bf16, batch 8: 1.111×; eager 1.00 s, the target allows 769 ms, the fused op "
            "took 900 ms; its units' products alone reach 1.250×: out of reach at eager's convolution speed") in text
    # A case no target covers (another model) adds nothing, and a run with no target's cases has no section.
    results.rows = [{**r, "shape": "net 224²"} for r in results.rows]
    assert results._targets(results.speedups()) == []
