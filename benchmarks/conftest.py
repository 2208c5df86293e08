"""The benchmark session: the device's peaks measured or looked up once at the start, a warm-up
before the first benchmark, and the summary printed and written (markdown, PNG, JSON under
benchmarks/results/ or $XCEPTION_FAST_BENCH_DIR) at the end.

    pytest benchmarks --benchmark-only
"""
import pytest
import torch

from . import harness
from .peaks import device_peaks
from .report import Results, environment

_results = None


def pytest_configure(config):
    # pytest-benchmark's own table, narrowed to what the project's summary does not say; it comes
    # first, the summary last.
    if getattr(config.option, "benchmark_columns", None) is not None:
        config.option.benchmark_columns = ["median", "iqr", "rounds"]


@pytest.fixture(scope="session")
def results():
    global _results
    if harness.DEVICE.type == "cuda":
        # Eager gets its best convolution algorithms too, as the autotuned contenders get theirs
        # (the search happens in the untimed warm-up).
        torch.backends.cudnn.benchmark = True
    env = environment(harness.DEVICE, harness.PROFILE)
    if harness.DEVICE.type == "cpu":
        if harness.HOST_ALLOCATOR == "kept":
            env["host_allocator"] = harness.keep_freed_host_memory()
        else:
            env["host_allocator"] = "the process's default (no mallopt: glibc maps large blocks afresh)"
            env["slug"] += "-default-allocator"
        # Loads the CPU kernel (building it if it must) before anything is timed.
        env["cpu_kernel_vector_bytes"] = torch.ops.xception_fast.cpu_vector_bytes()
    peaks = device_peaks(harness.DEVICE, env["device"])
    env["session_warmup_s"] = harness.warm_up_session()
    _results = Results(env, peaks, harness.OUT_DIR)
    return _results


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter):
    if _results is None or not (_results.rows or _results.memory or _results.exactness):
        return
    chart = _results.write_chart()
    terminalreporter.write_sep("=", "xception_fast: speedups and roofline")
    terminalreporter.write_line(_results.markdown())
    terminalreporter.write_line(f"written: {_results.path('md')}, {_results.path('json')}"
                                + (f", {chart}" if chart else " (no chart: matplotlib is not installed; "
                                   "`python -m benchmarks.report <json>` draws it where it is)"))
