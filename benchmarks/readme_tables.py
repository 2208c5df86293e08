"""The README's measured tables, from the result files of CPU benchmark runs.

    python -m benchmarks.readme_tables benchmarks/results/<cpu>.json [benchmarks/results/<cpu>-more-models.json]

prints the models table (one row per model found in the files, in harness.MODELS' order) and the
per-layer table (from the files that have units), as markdown. Every number is a ratio of medians
from one run: "x eager" is a contender's median against the eager channels_last median timed in
alternation with it, "x compile" torch.compile's median against the contender's: the one timed in
alternation with it where the run did (else that of torch.compile's own test of the case). Beside
the fused op's speedups, the product alone's (harness.CONTENDERS, product_only): the ceiling.
"""
import json
import sys

from .harness import MODELS

# The README's names for the models whose benchmark names say less.
_LABELS = {"Xception": "Xception (this package's)", "xception41-os16": "xception41, output_stride=16",
           "tv_mobilenet_v2": "torchvision mobilenet_v2"}
_UNIT_COLUMNS = [("fp32", 1), ("fp32", 8), ("fp32", 32), ("bf16", 1), ("bf16", 8), ("bf16", 32)]


def _ratio(value):
    """A speedup to two decimals, bold where it rounds below 1 (slower)."""
    text = f"{value:.2f}"
    return f"**{text}**" if float(text) < 1 else text


def _median(rows, contender, **where):
    for r in rows:
        if r["contender"] == contender and all(r[k] == v for k, v in where.items()):
            return r
    return None


def _over(rows, got, baseline):
    """A result's speedup over ``baseline`` in its case: over the baseline's median timed in
    alternation with it, else over the baseline's own test's; None where neither was measured."""
    paired = got.get("paired_medians_s", {}).get(baseline)
    if paired is None:
        own = _median(rows, baseline, shape=got["shape"], dtype=got["dtype"], batch=got["batch"])
        paired = own and own["median_s"]
    return paired and paired / got["median_s"]


def _over_eager(rows, contender, **where):
    """A contender's speedup over eager channels_last (as _over takes it), as a README cell; "—"
    where it was not measured."""
    got = _median(rows, contender, **where)
    over = got and _over(rows, got, "eager_cl")
    return "—" if over is None else _ratio(over)


def _speedups(rows, fused, **where):
    """"x eager / x compile" of contender ``fused`` in the case ``where``, or "not measured"."""
    got = _median(rows, fused, **where)
    over = got and [_over(rows, got, b) for b in ("eager_cl", "compile")]
    if not over or None in over:
        return "not measured"
    return " / ".join(_ratio(v) for v in over)


def models_table(runs):
    rows = [r for run in runs for r in run["results"] if r["kind"] == "infer"]
    exactness = {e["model"]: e for run in runs for e in run["exactness"]}
    lines = ["| model | fused / depthwise | logit error ratio fp32 / bf16 / bf16 autocast | fp32 b1 | fp32 b8 "
             "| bf16 autocast b1 | bf16 autocast b8 | compiled fused / compiled eager, fp32 b8 "
             "| products alone fp32 b8 / bf16 autocast b8 |",
             "|---|---:|---|---|---|---|---|---:|---|"]
    for name, spec in MODELS.items():
        shape = f"{name} {spec.size}²"
        if name not in exactness and not any(r["shape"] == shape for r in rows):
            continue
        e = exactness.get(name)
        fused = f"{e['fused_units']} / {e['units']}" if e else "not measured"
        errors = " / ".join(f"{e[p]:.2f}" for p in ("fp32", "bf16", "amp-bf16")) if e else "not measured"
        cells = [_speedups(rows, "fused_cpu", shape=shape, dtype=dtype, batch=batch)
                 for dtype, batch in (("fp32", 1), ("fp32", 8), ("amp-bf16", 1), ("amp-bf16", 8))]
        both = _median(rows, "fused_cpu_compiled", shape=shape, dtype="fp32", batch=8)
        composed = both and _over(rows, both, "compile")
        composed = "not measured" if composed is None else _ratio(composed)
        ceilings = " / ".join(_over_eager(rows, "product_only", shape=shape, dtype=dtype, batch=8)
                              for dtype in ("fp32", "amp-bf16"))
        lines.append(f"| {_LABELS.get(name, name)} | {fused} | {errors} | " + " | ".join(cells)
                     + f" | {composed} | {ceilings} |")
    return "\n".join(lines)


def units_table(runs):
    rows = [r for run in runs for r in run["results"] if r["kind"] == "unit"]
    if not rows:
        return ""
    lines = ["| unit, fused / product alone | " + " | ".join(f"{d} b{b}" for d, b in _UNIT_COLUMNS)
             + " | fp32 b8 × compile |",
             "|---|" + "---:|" * (len(_UNIT_COLUMNS) + 1)]
    for shape in dict.fromkeys(r["shape"] for r in rows):
        cells = [" / ".join(_over_eager(rows, contender, shape=shape, dtype=dtype, batch=batch)
                            for contender in ("fused_cpu", "product_only"))
                 for dtype, batch in _UNIT_COLUMNS]
        got = _median(rows, "fused_cpu", shape=shape, dtype="fp32", batch=8)
        over = got and _over(rows, got, "compile")
        cells.append("—" if over is None else _ratio(over))
        lines.append(f"| {shape} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(paths):
    runs = [json.load(open(p)) for p in paths]
    for run, path in zip(runs, paths):
        env = run["environment"]
        print(f"<!-- {path}: {env['device']}, commit {env.get('commit')}, {env['date']} -->")
    print(models_table(runs))
    print()
    print(units_table(runs))


if __name__ == "__main__":
    main(sys.argv[1:])
