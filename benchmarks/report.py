"""Results of a benchmark run: each result's extra_info, and the summary (markdown table, PNG
chart, raw JSON) named by device under the output folder.

The JSON and the markdown are rewritten after every result, so a run cut short (a timeout in the
GPU check) still leaves what it measured; the chart is drawn at the end.
"""
import datetime
import itertools
import json
import os
import platform
import re
import subprocess

import torch

from .harness import COMPILERS, CONTENDERS, DTYPES, FORK_JOIN_ELEMENTS, TARGETS, UNIT_BY_LABEL
from .peaks import roofline, unit_flop

BASELINES = ("eager_cl", "eager_nchw")


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _bf16_hardware():
    """The CPU's bf16 multiply instructions, which oneDNN's bf16 kernels (eager's and the fused
    op's) run on: AMX's tiles, AVX512-BF16's dot products, or neither (bf16 emulated in fp32)."""
    return [name for name, present in (("AVX512-BF16", torch.cpu._is_avx512_bf16_supported()),
                                       ("AMX", torch.cpu._is_amx_tile_supported())) if present]


def _slug(text):
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _commit():
    """The checkout's commit (with "+" if it has uncommitted changes), or None outside git."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+" if dirty.stdout.strip() else "")


# The settings that cap the instruction sets ATen's kernels (and so the CPU kernel's loops) and
# oneDNN's use below what the CPU has.
ISA_CAPS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")


def environment(device, profile):
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        slug = _slug(name)
    else:
        # The vector ISA ATen dispatches to and what the CPU multiplies bf16 with: one model name
        # covers CPUs with and without AVX-512 (an "AMD EPYC" may be either) and, among the AVX-512
        # ones, CPUs with AMX, with AVX512-BF16 alone and with neither (an "Intel(R) Xeon(R)
        # Processor" may be any of the three), whose results differ.
        isa = torch.backends.cpu.get_cpu_capability()
        # A run capped to a narrower instruction set than the CPU has is not that of a CPU without
        # the wider one: it says so, and goes to a file of its own.
        caps = " ".join(f"{k}={os.environ[k]}" for k in ISA_CAPS if os.environ.get(k))
        features = [isa] + ([] if caps else _bf16_hardware())
        name = (f"{_cpu_name()} ({', '.join(features)}{', capped by ' + caps if caps else ''}, "
                f"{torch.get_num_threads()} threads)")
        slug = (f"cpu-{_slug(_cpu_name())}-{'-'.join(_slug(f.replace('AVX512-', '')) for f in features)}"
                f"{'-capped' if caps else ''}-{torch.get_num_threads()}t")
    return {
        "device": name,
        "slug": slug if profile == "full" else f"{slug}-{profile}",
        "profile": profile,
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "cudnn_benchmark": torch.backends.cudnn.benchmark if device.type == "cuda" else None,
        "tf32_convs": torch.backends.cudnn.allow_tf32 if device.type == "cuda" else None,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": _commit(),
        # Other processes competing for the device make both the timings and measured peaks noisy.
        "load_average_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


# Two medians taken in the same state of the host: their fork-join probe readings (harness.
# fork_join_probe) differ by at most this much. The probe's two states lie far further apart.
_SAME_STATE_TOLERANCE = 0.15
_SAME_STATE = f"fork-join probe readings within {100 * _SAME_STATE_TOLERANCE:.0f} % of each other"


def _same_state(a_us, b_us):
    """Whether two fork-join probe readings (µs) were taken in the same state of the host."""
    return max(a_us, b_us) <= (1 + _SAME_STATE_TOLERANCE) * min(a_us, b_us)


def _spread(entries):
    """max / min - 1 of the (seconds, probe µs) entries' times."""
    times = [t for t, _ in entries]
    return max(times) / min(times) - 1


def _worst_spread(medians):
    """The largest spread over the cases of ``medians`` (Results._model_medians), as text with its
    case and, where the probe was read, the fastest and slowest medians with their readings."""
    group, entries = max(medians.items(), key=lambda item: _spread(item[1]))
    text = f"{100 * _spread(entries):.1f} % ({group}"
    fastest, slowest = min(entries), max(entries)
    if fastest[1] is not None and slowest[1] is not None:
        text += (f": {_time(fastest[0])} with the fork-join probe at {fastest[1]:.1f} µs, {_time(slowest[0])} "
                 f"at {slowest[1]:.1f} µs")
    return text + ")"


def _worst_same_state_spread(medians):
    """The largest spread between two medians of one case taken in the same state of the host, as
    (text with its case, the spread); None where no two were (or the probe was not read)."""
    worst = None
    for group, entries in medians.items():
        for a, b in itertools.combinations(entries, 2):
            if a[1] is None or b[1] is None or not _same_state(a[1], b[1]):
                continue
            spread = _spread([a, b])
            if worst is None or spread > worst[1]:
                worst = (f"{100 * spread:.1f} % ({group})", spread)
    return worst


class Results:
    def __init__(self, env, peaks, out_dir):
        self.env, self.peaks, self.out_dir = env, peaks, out_dir
        self.rows = []
        self.memory = []  # one record per training-step memory comparison (test_memory)
        self.exactness = []  # one record per model (test_exactness)
        os.makedirs(out_dir, exist_ok=True)

    @property
    def device_type(self):
        """"cpu" or "cuda", from the run's result-file name (environment)."""
        return "cpu" if self.env.get("slug", "").startswith("cpu-") else "cuda"

    def path(self, ext):
        return os.path.join(self.out_dir, f"{self.env['slug']}.{ext}")

    def add(self, benchmark, case, median, layers, math, extra=None, paired=(), fork_join=None):
        """Attach the case's extra_info to the benchmark and keep it for the summary; ``layers``
        is the work as [(FLOP, minimum bytes)] (see peaks.roofline); ``paired``: (case, median) of
        each case timed in alternation with this one (harness.paired_baselines); ``fork_join``: the
        fork-join probe's median over the same rounds, in seconds (harness.fork_join_probe)."""
        paired = {c.contender: m for c, m in paired if m is not None}
        info = {
            "device": self.env["device"], "torch": self.env["torch"], "triton": self.env["triton"],
            "kind": case.kind, "shape": case.label, "dtype": case.dtype, "batch": case.batch,
            "contender": case.contender, "math": math,
            "peak_flops": self.peaks["flops"][math], "peak_bandwidth": self.peaks["bandwidth"],
            "peaks_source": self.peaks["source"], **(extra or {}),
        }
        if paired:
            info["paired_medians_s"] = paired
        if fork_join is not None:
            info["fork_join_us"] = fork_join * 1e6
        if median is not None:
            info.update(roofline(layers, median, self.peaks["flops"][math], self.peaks["bandwidth"]))
        benchmark.extra_info.update(info)
        if median is None:
            return
        stats = benchmark.stats.stats
        self.rows.append({**info, "group": case.group, "panel": case.panel, "row": case.row,
                          "median_s": median, "min_s": stats.min, "mean_s": stats.mean,
                          "stddev_s": stats.stddev, "rounds": stats.rounds})
        self.write_tables()

    def add_exactness(self, benchmark, record):
        """Attach a model's fuse() counts and logit error ratios to the benchmark and keep them for
        the summary."""
        record = {"device": self.env["device"], "torch": self.env["torch"], **record}
        benchmark.extra_info.update(record)
        self.exactness.append(record)
        self.write_tables()

    def add_memory(self, benchmark, record):
        """Attach a training-step memory comparison (eager vs fused peaks) to the benchmark and keep
        it for the summary."""
        record = {"device": self.env["device"], "torch": self.env["torch"], **record}
        benchmark.extra_info.update(record)
        self.memory.append(record)
        self.write_tables()

    # ------------------------------------------------------------------------------------------

    def speedups(self):
        """Per result: its speedup over each baseline of its case (and over the fastest compile)."""
        medians = {}
        for r in self.rows:
            medians.setdefault(r["group"], {})[r["contender"]] = r["median_s"]
        out = []
        for r in self.rows:
            group = medians[r["group"]]
            ratios = {b: group[b] / r["median_s"] for b in BASELINES if b in group}
            compiled = [group[c] for c in COMPILERS if c in group]
            if compiled:
                ratios["compile"] = min(compiled) / r["median_s"]
            # Timed in alternation with this contender, a baseline's own median in this test is the
            # one to compare with (the other test's carries a different moment's load).
            for baseline, median in r.get("paired_medians_s", {}).items():
                ratios[baseline] = median / r["median_s"]
            out.append(ratios)
        return out

    def markdown(self):
        peaks = self.peaks
        flops = ", ".join(f"{k} {v / 1e12:.3g}" for k, v in peaks["flops"].items())
        lines = [
            f"# Benchmarks on {self.env['device']}",
            "",
            f"- torch {self.env['torch']}, triton {self.env['triton']}, Python {self.env['python']}; "
            f"profile {self.env['profile']}; {self.env['date']}; commit {self.env.get('commit')}",
            f"- peaks: {flops} TFLOP/s; {peaks['bandwidth'] / 1e9:.4g} GB/s ({peaks['source']})",
        ]
        for key, text in (("cpu_kernel_vector_bytes", "CPU kernel's channel loops: {}-byte vectors"),
                          ("load_average_at_start", "load average (1 min) when the run started: {:.2f}"),
                          ("host_allocator", "host memory allocator: {}"),
                          ("session_warmup_s", "session warm-up before the first benchmark: {:.1f} s")):
            if self.env.get(key) is not None:
                lines.append("- " + text.format(self.env[key]))
        probes = [r["fork_join_us"] for r in self.rows if r.get("fork_join_us") is not None]
        if probes:
            lines.append(f"- fork-join probe (a two-thread ATen op on {FORK_JOIN_ELEMENTS:,} floats, nearly all of it "
                         f"the threads' start and join; the median over each test's rounds): {min(probes):.1f}–{max(probes):.1f} "
                         f"µs over this run's tests"
                         + ("; the host changed state during the run: compare the ratios timed within one test, not "
                            "times across tests (README: how steady the timings are)"
                            if not _same_state(min(probes), max(probes)) else ""))
        if any(r["roofline_fraction"] > 1 for r in self.rows):
            lines.append("- **some results exceed 100 % of the roofline: the peaks above understate what this "
                         "device reached (if measured: while other processes loaded it?). Read the roofline "
                         "column as relative only, or rerun on an idle machine.**")
        paired = any(r.get("paired_medians_s") for r in self.rows)
        paired_note = ("eager CL (paired), compile (paired): the medians of eager channels_last and (for a fused "
                       "contender) torch.compile timed in alternation with the contender, round by round, in the "
                       "same test; × eager CL and × compile are the ratios of those medians to the contender's, "
                       "where they were timed (else of the other tests' medians). "
                       if paired else "")
        lines += [
            "",
            "Median time per call. × eager CL / × compile: the contender's speedup over eager channels_last and "
            f"the fastest torch.compile of the same case (> 1 is faster). {paired_note}TFLOP/s, GB/s: the work's "
            "FLOP and minimum bytes over the time (a unit: the fused unit's; a model: summed over its layers; a "
            "training step: FLOP only). roofline: the floor (per layer the slower of FLOP at peak and minimum bytes "
            "at peak bandwidth) over the time. **slower**: a fused contender slower than eager channels_last or "
            "than torch.compile. product_only: the ceiling, not a contender: a unit's pointwise product alone, "
            "eager's 1x1 convolution with the BatchNorm folded, over a depthwise result computed beforehand (for a "
            "model: the fused model with each unit replaced by it). A fused unit still has its depthwise conv to do: "
            "unless its own product runs faster than eager's convolution, its × eager CL stays under the product's."
            + (" fork-join: the fork-join probe's median over the test's rounds, which says the host's state the "
               "test ran in." if probes else ""),
        ]
        speedups = self.speedups()
        panel = None
        for r, s in zip(self.rows, speedups):
            if r["panel"] != panel:
                panel = r["panel"]
                lines += ["", f"## {panel}", "",
                          "| case | contender | median | eager CL (paired) | compile (paired) | × eager CL | × compile "
                          "| TFLOP/s | GB/s | roofline |" + (" fork-join |" if probes else "") + " |",
                          "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if probes else "") + "---|"]
            paired = r.get("paired_medians_s", {})
            cells = [r["row"], r["contender"], _time(r["median_s"]),
                     *("—" if paired.get(k) is None else _time(paired[k]) for k in ("eager_cl", "compile")),
                     *(_ratio(s.get(k)) for k in ("eager_cl", "compile")),
                     f"{r['tflops']:.3g}", "—" if r["gbps"] is None else f"{r['gbps']:.4g}",
                     f"{100 * r['roofline_fraction']:.1f} %",
                     *([] if not probes else ["—" if r.get("fork_join_us") is None else f"{r['fork_join_us']:.1f} µs"]),
                     _slower(r, s)]
            lines.append("| " + " | ".join(cells) + " |")
        lines += self._verdicts(speedups)
        lines += self._targets(speedups)
        if self.exactness:
            lines += ["", "## What fuse() does to each model", "",
                      "Depthwise convs fused (of all the model's), residual adds taken into the kernel, other convs "
                      "with BatchNorm folded, max-pools with their add in one pass; and the logits' max abs error "
                      "of the fused model over eager's in the same precision, both against a float64 run (random "
                      "weights and BatchNorm statistics, batch 2; the exactness rule allows 2).", "",
                      "| model | fused / depthwise | with residual | folded convs | pool + add | fp32 | bf16 "
                      "| bf16 autocast |",
                      "|---|---:|---:|---:|---:|---:|---:|---:|"]
            for e in self.exactness:
                lines.append(f"| {e['model']} | {e['fused_units']} / {e['units']} | {e['with_residual']} "
                             f"| {e['folded_convs']} | {e.get('pooled', '—')} | {e['fp32']:.2f} | {e['bf16']:.2f} "
                             f"| {e['amp-bf16']:.2f} |")
        if self.memory:
            lines += ["", "## Memory, one training step", "",
                      "Peak of live tensor memory during one training step (forward, cross-entropy, backward, SGD "
                      "step) above what was allocated before it; MB = 10⁶ bytes. saving: (eager − fused) / eager.",
                      "", "| case | fused | method | eager CL peak | fused peak | saving |",
                      "|---|---|---|---:|---:|---:|"]
            for m in self.memory:
                lines.append(f"| {m['shape']}, {m['dtype']}, batch {m['batch']} "
                             f"| {m['contender']}, depthwise {m.get('depthwise', 'recomputed')} | {m['method']} "
                             f"| {m['eager_peak_mb']:.1f} MB | {m['fused_peak_mb']:.1f} MB "
                             f"| {100 * m['saving']:.1f} % |")
        return "\n".join(lines) + "\n"

    def _verdicts(self, speedups):
        """Closing lines: per model case whether fused is faster than eager and torch.compile on
        this device, per per-layer panel how many units fused wins, and how well the eager
        medians measured more than once in a case agree."""
        where = "this CPU" if self.device_type == "cpu" else "this GPU"
        lines = ["", "## Verdicts", ""]
        ceilings = self._ceilings(speedups)
        panels = {}
        for r, s in zip(self.rows, speedups):
            if not r["contender"].startswith("fused_") or "eager_cl" not in s:
                continue
            if r["kind"] == "unit":
                panels.setdefault(r["panel"], []).append((r, s))
                continue
            faster = s["eager_cl"] >= 1.0
            text = (f"- {r['row']}, {r['panel'].split(', ', 1)[1]}: {r['contender']} is "
                    f"{'faster' if faster else '**slower**'} than eager on {where}: {s['eager_cl']:.2f}×")
            if "compile" in s:
                text += (f"; {'faster' if s['compile'] >= 1.0 else '**slower**'} than torch.compile: "
                         f"{s['compile']:.2f}×")
            if r["group"] in ceilings and r["contender"] == "fused_cpu":
                text += (f"; its units' products alone (the ceiling at eager's convolution speed): "
                         f"{ceilings[r['group']]:.2f}×")
            lines.append(text)
        for panel, entries in panels.items():
            for contender in dict.fromkeys(r["contender"] for r, _ in entries):
                mine = [(r, s) for r, s in entries if r["contender"] == contender]
                losers = [f"{r['row']} ({s['eager_cl']:.2f}×)" for r, s in mine if s["eager_cl"] < 1.0]
                lowest = min(s["eager_cl"] for _, s in mine)
                text = (f"- {panel}, {contender}: at least as fast as eager channels_last on "
                        f"{len(mine) - len(losers)} of {len(mine)} units (lowest {lowest:.2f}×)"
                        + (f"; **slower** on {', '.join(losers)}" if losers else ""))
                shares = [s["eager_cl"] / ceilings[r["group"]] for r, s in mine if r["group"] in ceilings]
                if shares:
                    text += (f"; its speedup is {100 * min(shares):.0f}–{100 * max(shares):.0f} % of the product "
                             f"alone's (the ceiling at eager's convolution speed) on {len(shares)} units")
                lines.append(text)
        for baseline, name in (("eager_cl", "eager channels_last"), ("compile", "torch.compile")):
            medians = self._model_medians(baseline)
            if medians:
                text = (f"- {name}, measured in its own test and with each contender it is paired with: its "
                        f"medians within one model case differ by at most {_worst_spread(medians)}")
                paired = self._model_medians(baseline, own=False)
                if paired:
                    text += (f"; those timed beside the contenders alone (the ones the ratios use) by at most "
                             f"{_worst_spread(paired)}")
                same_state = _worst_same_state_spread(medians)
                if same_state:
                    text += f"; those timed in the same state of the host ({_SAME_STATE}) by at most {same_state[0]}"
                lines.append(text)
        return lines

    def _ceilings(self, speedups):
        """Per case, the product alone's speedup over eager channels_last: the ceiling of any fusion
        that multiplies at eager's convolution speed."""
        return {r["group"]: s["eager_cl"] for r, s in zip(self.rows, speedups)
                if r["contender"] == "product_only" and "eager_cl" in s}

    def _targets(self, speedups):
        """The device's TARGETS checked one by one: per target how many of its fused cases meet it,
        and for each one that misses it whether the product alone left room to: the time the target
        allows (the paired eager median over the target), the product alone's time at that eager
        median (the median over the product's speedup) and its rate against the measured peak, and
        for a unit the depthwise conv's multiply-adds at the measured fp32 peak, the least the rest
        of the unit takes (its depthwise rows multiply in fp32 in every dtype), and the bytes a
        depthwise pass that writes its result to memory moves at the measured bandwidth."""
        targets = TARGETS[self.device_type]
        fused = [(r, s) for r, s in zip(self.rows, speedups)
                 if r["contender"].startswith("fused_") and not r["contender"].endswith("_compiled")]
        ceilings = self._ceilings(speedups)
        lines = []
        for target in targets:
            mine = [(r, s) for r, s in fused if target.covers(r) and target.over in s]
            if not mine:
                continue
            missed = [(r, s) for r, s in mine if s[target.over] < target.at_least]
            lowest = min(s[target.over] for _, s in mine)
            lines.append(f"- {target.label}: {'met' if not missed else '**missed**'}, "
                         f"{len(mine) - len(missed)} of {len(mine)} cases (lowest {lowest:.3f}×)")
            lines += ["  - " + self._shortfall(target, r, s, ceilings.get(r["group"])) for r, s in missed]
        medians = self._model_medians("eager_cl")
        if medians and lines:
            worst = max(_spread(entries) for entries in medians.values())
            text = (f"- the same eager case measured twice in one run agrees within 10 %: "
                    f"{'met' if worst <= 0.10 else '**missed**'}, its medians within one model case differ "
                    f"by at most {_worst_spread(medians)}")
            same_state = _worst_same_state_spread(medians)
            if same_state:
                text += f"; timed in the same state of the host ({_SAME_STATE}), by at most {same_state[0]}"
                if worst > 0.10 >= same_state[1]:
                    text += ": what is left is the host changing state between the tests"
            lines.append(text)
        if not lines:
            return []
        return ["", "## Targets", "",
                "The targets of this device's issue, each against this run's medians. For a case that misses a "
                "target: the time it allows (eager's median timed beside the fused op, over the target), the "
                "product alone's time at that same eager median (the median over the product's speedup) with its "
                "rate against the measured peak, and for a unit the least the rest of it takes, its depthwise "
                "conv's multiply-adds at the measured fp32 peak. Where the product alone leaves less than that, "
                "no fusion that multiplies at eager's convolution speed meets the target on this device. Where it "
                "leaves more: the bytes that a depthwise pass writing its result to memory (the materialized "
                "strategy) moves beyond the product alone's, x read and the result written, at the measured "
                "bandwidth (a floor where they do not fit in the last-level cache); where those take longer than is "
                "left, only a fusion that keeps the depthwise result in cache meets the target.", "",
                *lines]

    def _shortfall(self, target, row, speedup, ceiling):
        """One case that misses ``target``: what the target allows against the product alone."""
        name = f"{row['row']}, {row['dtype']}, batch {row['batch']}" + (
            "" if row["contender"] == "fused_cpu" else f", {row['contender']}")
        text = f"{name}: {speedup[target.over]:.3f}×"
        if target.over != "eager_cl" or ceiling is None:
            return text
        eager = row["median_s"] * speedup["eager_cl"]
        allowed, product = eager / target.at_least, eager / ceiling
        text += (f"; eager {_time(eager)}, the target allows {_time(allowed)}, the fused op took "
                 f"{_time(row['median_s'])}")
        if row["kind"] != "unit":
            verdict = ("out of reach at eager's convolution speed" if ceiling < target.at_least else
                       "within reach of the products")
            return text + f"; its units' products alone reach {ceiling:.3f}×: {verdict}"
        shape = UNIT_BY_LABEL.get(row["shape"])
        if shape is None:  # a unit this version of the benchmarks does not list
            return text
        depthwise_flop, pointwise_flop = unit_flop(row["batch"] * shape.out_size ** 2, shape.channels,
                                                   shape.out_channels, shape.k)
        rate = pointwise_flop / product
        floor = depthwise_flop / self.peaks["flops"]["fp32"]
        left = allowed - product
        text += (f"; the product alone {_time(product)} ({ceiling:.3f}×, {rate / 1e9:.0f} GFLOP/s, "
                 f"{100 * rate / self.peaks['flops'][row['math']]:.0f} % of the {row['math']} peak)")
        if left <= 0:
            return text + ": out of reach at eager's convolution speed, the product alone is slower than the target"
        if left < floor:
            return (text + f", which leaves {_time(left)} for the depthwise conv, whose multiply-adds take "
                    f"{_time(floor)} at the fp32 peak: out of reach at eager's convolution speed")
        text += (f", which leaves {_time(left)} for the depthwise conv, whose multiply-adds take {_time(floor)} at "
                 f"the fp32 peak: within reach of a faster depthwise pass; the fused op took "
                 f"{_time(row['median_s'] - product)} more than the product alone")
        # A depthwise pass that writes its result to memory (the materialized strategy) reads x and
        # writes the result on top of what the product alone moves; one that keeps it in cache
        # (tiled) reads x in place of the product's reading the result.
        moved = row["batch"] * (shape.size ** 2 + shape.out_size ** 2) * shape.channels * DTYPES[row["dtype"]].itemsize
        memory = moved / self.peaks["bandwidth"]
        text += (f"; a depthwise pass that writes its result to memory moves {moved / 1e6:.1f} MB more than the "
                 f"product alone, {_time(memory)} at the measured bandwidth where they do not fit in the last-level "
                 f"cache")
        if memory > left:
            text += ": only a fusion that keeps the depthwise result in cache meets the target"
        return text

    def _model_medians(self, baseline, own=True):
        """Per model case with more than one: ``baseline``'s medians, those timed in alternation
        with each other contender and, with ``own``, its own test's; each as (seconds, the fork-join
        probe's median over the same rounds in µs, or None)."""
        medians = {}
        for r in self.rows:
            if r["kind"] == "unit":
                continue
            if r["contender"] == baseline:
                if own:
                    medians.setdefault(r["group"], []).append((r["median_s"], r.get("fork_join_us")))
            elif r.get("paired_medians_s", {}).get(baseline):
                medians.setdefault(r["group"], []).append((r["paired_medians_s"][baseline], r.get("fork_join_us")))
        return {g: v for g, v in medians.items() if len(v) > 1}

    def write_tables(self):
        with open(self.path("json"), "w") as f:
            json.dump({"environment": self.env, "peaks": self.peaks, "results": self.rows, "memory": self.memory,
                       "exactness": self.exactness}, f, indent=1)
        with open(self.path("md"), "w") as f:
            f.write(self.markdown())

    def write_chart(self):
        """Speedup over eager channels_last per case and contender, one panel per table section;
        None without matplotlib (the GPU machine may lack it: ``python -m benchmarks.report`` draws
        the chart from the JSON elsewhere)."""
        try:
            import matplotlib
        except ImportError:
            return None

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        panels = {}
        for r, s in zip(self.rows, self.speedups()):
            if "eager_cl" in s:
                panels.setdefault(r["panel"], []).append((r["row"], r["contender"], s["eager_cl"]))
        if not panels:
            return None
        present = {c for bars in panels.values() for _, c, _ in bars}
        contenders = [c for c in CONTENDERS if c in present]
        colours = {c: plt.get_cmap("tab10")(i) for i, c in enumerate(CONTENDERS)}
        fig, axes = plt.subplots(len(panels), 1, figsize=(12, 0.6 + 3.4 * len(panels)), squeeze=False)
        for ax, (title, bars) in zip(axes[:, 0], panels.items()):
            rows = list(dict.fromkeys(row for row, _, _ in bars))
            in_panel = [c for c in contenders if any(c == b for _, b, _ in bars)]
            width = 0.8 / len(in_panel)
            for i, contender in enumerate(in_panel):
                xs = [rows.index(row) + (i - (len(in_panel) - 1) / 2) * width
                      for row, c, _ in bars if c == contender]
                ax.bar(xs, [v for _, c, v in bars if c == contender], width, color=colours[contender])
            ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
            ax.set_xticks(range(len(rows)), rows, rotation=20, ha="right", fontsize=8)
            ax.set_ylabel("× eager channels_last")
            ax.set_title(title, fontsize=10)
        handles = [plt.Rectangle((0, 0), 1, 1, color=colours[c]) for c in contenders]
        fig.legend(handles, contenders, loc="upper center", ncol=len(contenders), fontsize=9,
                   bbox_to_anchor=(0.5, 1 - 0.4 / fig.get_figheight()))
        fig.suptitle(f"{self.env['device']} — torch {self.env['torch']}", fontsize=11,
                     y=1 - 0.1 / fig.get_figheight())
        fig.tight_layout(rect=(0, 0, 1, 1 - 0.8 / fig.get_figheight()))
        fig.savefig(self.path("png"), dpi=110)
        plt.close(fig)
        return self.path("png")


def _time(seconds):
    for scale, unit in ((1, "s"), (1e-3, "ms"), (1e-6, "µs")):
        if seconds >= scale or unit == "µs":
            value = seconds / scale
            return f"{value:.{0 if value >= 100 else 1 if value >= 10 else 2}f} {unit}"


def _ratio(value):
    return "—" if value is None else f"{value:.2f}×"


def _slower(row, speedups):
    """The mark of a fused contender that loses to eager channels_last or to torch.compile."""
    if not row["contender"].startswith("fused_"):
        return ""
    marks = [f"**slower than {name}**" for key, name in (("eager_cl", "eager CL"), ("compile", "compile"))
             if speedups.get(key) is not None and speedups[key] < 1.0]
    return ", ".join(marks)


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(description="Rewrite a run's markdown table and draw its chart from its JSON "
                                                 "(next to it).")
    parser.add_argument("json", help="a results JSON written by a benchmark run")
    path = parser.parse_args(argv).json
    with open(path) as f:
        data = json.load(f)
    results = Results(data["environment"], data["peaks"], os.path.dirname(os.path.abspath(path)))
    results.rows = data["results"]
    results.memory = data.get("memory", [])
    results.exactness = data.get("exactness", [])
    results.write_tables()
    chart = results.write_chart()
    print(f"written: {results.path('md')}" + (f", {chart}" if chart else " (no chart: matplotlib is not installed)"))


if __name__ == "__main__":
    main()
