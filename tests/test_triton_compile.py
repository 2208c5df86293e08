"""Every autotune config of the Triton kernel compiles for Hopper (sm_90) and Ampere (sm_80), with
no GPU: Triton's CUDA backend compiles ahead of time to PTX and cubin with its own ptxas.

For each config and each dtype it serves (bfloat16 and float16 for the half-precision configs,
float32 with TF32 and in full precision for the float32 ones), at k = 3 as Xception's units launch
it (stride and dilation 1, which Triton specialises) and at k = 5 with runtime stride and
dilation (the general kernel): no compile error, shared memory within the device's per-block
limit, and the sm_90 half-precision builds on wgmma. The table of registers, spills (the stack
frame, from cuobjdump of the cubin Triton built) and shared memory is printed
(``pytest tests/test_triton_compile.py -s``, or run this file).

The builds run in two worker processes (this file, run as a script), one per architecture: they
import the kernel without TRITON_INTERPRET, which the test session sets when it has no GPU.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import pytest

ARCHS = (90, 80)
# Shared memory per block (opt-in maximum): 227 KB on H100/H200, 163 KB on A100.
SMEM_LIMIT = {90: 227 * 1024, 80: 163 * 1024}
WORKER_TIMEOUT_S = 600
SKIP = 77  # the worker's exit status when this machine cannot compile for CUDA


# ----------------------------------------------------------------------------------------------
# Worker: compile the configs for one architecture, print one JSON record per build

def _builds():
    """(dtype name, k, TF32, stride, dilation, activations) of every build of one config list."""
    xception = dict(k=3, stride=1, dilation=1, acts=(1, 0, 0))  # relu, identity, identity
    general = dict(k=5, stride=2, dilation=2, acts=(0, 3, 2))  # identity, hardswish, relu6
    half = [dict(dtype=dtype, tf32=False, **unit) for unit in (xception, general) for dtype in ("bf16", "fp16")]
    fp32 = ([dict(dtype="fp32", tf32=True, **unit) for unit in (xception, general)]
            + [dict(dtype="fp32", tf32=False, **xception)])
    return half, fp32


def _cuda_tool(name):
    """A CUDA binary tool: the one Triton ships (next to its ptxas), else one on PATH."""
    import triton.backends.nvidia

    path = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin", name)
    return path if os.path.exists(path) else shutil.which(name)


def _resources(cubin):
    """(registers, stack frame bytes) of the kernel in ``cubin``, as cuobjdump reads them, or
    Nones. The kernel keeps no local arrays, so its stack frame is its register spills."""
    tool = _cuda_tool("cuobjdump")
    if tool is None:
        return None, None
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        try:
            out = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True,
                                 check=True).stdout
        except (OSError, subprocess.CalledProcessError):
            return None, None
    found = re.search(r"REG:(\d+)\s+STACK:(\d+)", out)
    return (int(found.group(1)), int(found.group(2))) if found else (None, None)


def _compile(fn, signature, constexprs, attrs, arch, num_warps, num_stages):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def _probe(arch):
    """None if a trivial kernel compiles for ``arch`` here, else why not."""
    try:
        import triton
        import triton.language as tl

        @triton.jit
        def probe(x_ptr, BLOCK: tl.constexpr):
            offs = tl.arange(0, BLOCK)
            tl.store(x_ptr + offs, tl.load(x_ptr + offs) + 1.0)

        _compile(probe, {"x_ptr": "*fp32", "BLOCK": "constexpr"}, {"BLOCK": 32}, {}, arch, 4, 1)
    except Exception as error:  # no CUDA backend, no ptxas, ...
        return f"Triton cannot compile for sm_{arch} here: {type(error).__name__}: {error}"
    return None


def worker(arch):
    os.environ.pop("TRITON_INTERPRET", None)
    reason = _probe(arch)
    if reason:
        print(json.dumps({"skip": reason}), flush=True)
        return SKIP
    from xception_fast import triton_sepconv

    jit_fn = triton_sepconv._sepconv_kernel.fn
    assert not triton_sepconv._interpreted(), "imported under TRITON_INTERPRET"
    names = jit_fn.arg_names
    constexpr_names = {names[i] for i in jit_fn.constexprs}
    pointers = ("x_ptr", "taps_ptr", "dw_bias_ptr", "pw_ptr", "pw_bias_ptr", "res_ptr", "out_ptr")
    float32_pointers = ("taps_ptr", "dw_bias_ptr", "pw_bias_ptr")
    # What a launch specialises (Triton: pointers 16-byte aligned, ints divisible by 16, ints equal
    # to 1 made constants): the unit's sizes are Xception's middle flow, 728 -> 728 channels.
    c = cout = 728
    c_vec = triton_sepconv._alignment(c)
    half, fp32 = _builds()
    lists = ((triton_sepconv._HALF_CONFIGS, half), (triton_sepconv._FP32_CONFIGS, fp32))
    print(json.dumps({"expected": sum(len(configs) * len(builds) for configs, builds in lists)}), flush=True)
    for configs, builds in lists:
        for cfg in configs:
            for b in builds:
                ints = dict(M=19 * 19, H=19, W=19, Ho=19, Wo=19, C_DIV=c // c_vec, COUT_DIV=cout // c_vec, C_PAD=768,
                            stride=b["stride"], padding=b["dilation"] * (b["k"] - 1) // 2, dilation=b["dilation"])
                values = dict(K=b["k"], C_VEC=c_vec, COUT_VEC=c_vec, ACT_IN=b["acts"][0], ACT_MID=b["acts"][1],
                              ACT_OUT=b["acts"][2], HAS_RESIDUAL=True, ALLOW_TF32=b["tf32"], BF16_BY_HAND=False,
                              **cfg.kwargs)
                values.update({name: 1 for name, v in ints.items() if v == 1})
                assert constexpr_names <= set(values), constexpr_names - set(values)
                signature, attrs = {}, {}
                for i, name in enumerate(names):
                    if name in constexpr_names or name in values:
                        signature[name] = "constexpr"
                    elif name in pointers:
                        signature[name] = "*fp32" if name in float32_pointers else "*" + b["dtype"]
                        attrs[(i,)] = [["tt.divisibility", 16]]
                    else:
                        signature[name] = "i32"
                        if ints[name] % 16 == 0:
                            attrs[(i,)] = [["tt.divisibility", 16]]
                record = dict(config=f"{cfg.kwargs['BLOCK_M']}x{cfg.kwargs['BLOCK_N']}x{cfg.kwargs['BLOCK_K']} "
                                     f"w{cfg.num_warps} s{cfg.num_stages}",
                              dtype=b["dtype"] + ("/tf32" if b["tf32"] else ""), k=b["k"], error=None)
                try:
                    compiled = _compile(jit_fn, signature, {k: values[k] for k in signature if k in values}, attrs,
                                        arch, cfg.num_warps, cfg.num_stages)
                except Exception as error:
                    record["error"] = f"{type(error).__name__}: {error}"[:2000]
                else:
                    ptx = compiled.asm["ptx"]
                    regs, stack = _resources(compiled.asm["cubin"])
                    record.update(shared=compiled.metadata.shared, regs=regs, spills=stack,
                                  wgmma="wgmma.mma_async" in ptx, mma="mma.sync" in ptx)
                print(json.dumps(record), flush=True)
    return 0


# ----------------------------------------------------------------------------------------------
# Tests

@pytest.fixture(scope="module")
def builds():
    """{arch: records}, from one worker per architecture, run side by side."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in [env.get("PYTHONPATH")] if p])
    procs = {arch: subprocess.Popen([sys.executable, os.path.abspath(__file__), str(arch)], env=env, cwd=root,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for arch in ARCHS}
    results = {}
    try:
        for arch, proc in procs.items():
            try:
                out, err = proc.communicate(timeout=WORKER_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                pytest.fail(f"sm_{arch}: the builds took more than {WORKER_TIMEOUT_S} s")
            records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
            if proc.returncode == SKIP:
                pytest.skip(records[0]["skip"])
            assert proc.returncode == 0, f"sm_{arch} worker failed ({proc.returncode}):\n{err[-4000:]}"
            expected = records.pop(0)["expected"]
            assert len(records) == expected, f"sm_{arch}: {len(records)} builds reported, {expected} expected"
            results[arch] = records
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


def table(arch, records):
    head = f"sm_{arch}: {'config':<18} {'dtype':<9} {'k':>1} {'regs':>4} {'spills B':>8} {'smem KB':>7} product"
    lines = [head]
    for r in records:
        if r["error"]:
            lines.append(f"        {r['config']:<18} {r['dtype']:<9} {r['k']:>1}  ERROR {r['error'][:80]}")
            continue
        kind = "wgmma" if r["wgmma"] else "mma.sync" if r["mma"] else "fma"
        spills = "?" if r["spills"] is None else r["spills"]
        lines.append(f"        {r['config']:<18} {r['dtype']:<9} {r['k']:>1} {r['regs'] or '?':>4} {spills:>8} "
                     f"{r['shared'] / 1024:>7.1f} {kind}")
    return "\n".join(lines)


@pytest.mark.parametrize("arch", ARCHS)
def test_every_config_compiles(builds, arch, capsys):
    records = builds[arch]
    with capsys.disabled():
        print("\n" + table(arch, records))
    errors = [f"{r['config']} {r['dtype']} k={r['k']}: {r['error']}" for r in records if r["error"]]
    assert not errors, "compile errors:\n" + "\n".join(errors)
    too_big = [f"{r['config']} {r['dtype']} k={r['k']}: {r['shared']} B" for r in records
               if r["shared"] > SMEM_LIMIT[arch]]
    assert not too_big, f"shared memory past sm_{arch}'s {SMEM_LIMIT[arch]} B per block:\n" + "\n".join(too_big)
    if arch == 90:
        no_wgmma = [f"{r['config']} {r['dtype']} k={r['k']}" for r in records
                    if r["dtype"] in ("bf16", "fp16") and not r["wgmma"]]
        assert not no_wgmma, "sm_90 half-precision builds without wgmma:\n" + "\n".join(no_wgmma)


if __name__ == "__main__":
    if len(sys.argv) == 2 and sys.argv[1].isdigit():
        sys.exit(worker(int(sys.argv[1])))
    sys.exit(pytest.main([__file__, "-s", "-q"]))
