"""The CUDA kernel's resources, checked without a GPU: csrc/cuda/sepconv_cuda.cu compiled for sm_80 and
sm_90 with ``-Xptxas -v``, the flags and include paths those of the extension's own build, and
ptxas' report of every kernel held to:

- no spill stores or loads, and no stack frame (no local memory at all);
- static shared memory plus the dynamic shared memory its launch requests within the device's
  per-block limit (163 KB on sm_80, 227 KB on sm_90);
- two blocks' shared memory within an SM's (the occupancy its __launch_bounds__ plan for), and the
  registers within what that occupancy leaves (128 per thread);
- every instantiation present (one per dtype / product and kernel size).

The dynamic shared memory a launch requests is a template argument of the kernel (see
``sepconv_kernel`` in the .cu), so it is part of the kernel's mangled name in ptxas' report: the
number checked is the one the compiled launch passes, read from the same compilation as the
registers, with no second copy of the tile arithmetic here to drift from the source.

The flags: torch.utils.cpp_extension writes the build file of the extension's compilation
(``_write_ninja_file_to_build_library``, with _build_config's sources, flags and include paths, as
``_extension`` passes them to ``cpp_extension.load``); the nvcc command here is that build file's,
for one architecture, device code only (``--cubin``), with ``-Xptxas -v``.

The table of every kernel's registers and shared memory is printed (``pytest -s`` shows it), or
run this file as a script (``python tests/test_cuda_build.py [sm_80 sm_90]``) to print it only.
"""
import inspect
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

import pytest
import torch

from xception_fast import _build_config

SOURCE = os.path.join(_build_config.PACKAGE_DIR, "csrc", "cuda", "sepconv_cuda.cu")
# The opt-in dynamic shared memory one block may have (CUDA C++ Programming Guide, table of
# technical specifications per compute capability).
SMEM_PER_BLOCK = {"sm_80": 163 * 1024, "sm_90": 227 * 1024}
# Shared memory per SM, and what the driver reserves per resident block.
SMEM_PER_SM = {"sm_80": 164 * 1024, "sm_90": 228 * 1024}
SMEM_RESERVED_PER_BLOCK = 1024
BLOCKS_PER_SM = 2  # the kernel's __launch_bounds__(256, 2)
KERNEL_SIZES = (1, 3, 5, 7)
PRODUCTS = 4  # bf16 wmma, fp16 wmma, fp32 tf32 wmma, fp32 FFMA
COMPILE_TIMEOUT_S = 600


def _skip_reason():
    if os.environ.get(_build_config.SKIP_CUDA_ENV, "0") not in ("", "0"):
        return f"{_build_config.SKIP_CUDA_ENV} is set"
    if torch.version.cuda is None:
        return "torch is not a CUDA build"
    if _build_config.cuda_home() is None:
        return "no CUDA toolkit (nvcc and include/cuda_runtime.h) found"
    return None


def _ninja_variables(path):
    values = {}
    with open(path) as f:
        for line in f:
            m = re.match(r"^(\w+) = (.*)$", line.rstrip("\n"))
            if m:
                values[m.group(1)] = m.group(2)
    return values


def nvcc_command(arch, output):
    """The extension build's nvcc command for the .cu, for ``arch`` only, device code only, with
    ptxas' report; or raises RuntimeError when this torch's cpp_extension cannot say it."""
    root = _build_config.prepare_cuda_environment()
    import torch.utils.cpp_extension as cpp_extension

    if root and cpp_extension.CUDA_HOME != root:
        # As _extension does: cpp_extension fixed CUDA_HOME when first imported.
        cpp_extension.CUDA_HOME = root
    writer = getattr(cpp_extension, "_write_ninja_file_to_build_library", None)
    if writer is None:
        raise RuntimeError("torch.utils.cpp_extension has no _write_ninja_file_to_build_library")
    args = _build_config.compile_args(True)
    # An explicit architecture: cpp_extension then adds none of TORCH_CUDA_ARCH_LIST's.
    nvcc_flags = args["nvcc"] + [f"-gencode=arch=compute_{arch[3:]},code={arch}"]
    wanted = dict(name="xception_fast_ptxas_check", sources=[SOURCE], extra_cflags=args["cxx"],
                  extra_cuda_cflags=nvcc_flags, extra_sycl_cflags=[], extra_ldflags=_build_config.LINK_FLAGS,
                  extra_include_paths=_build_config.include_dirs(), with_cuda=True, with_sycl=False,
                  is_standalone=False, is_python_module=False, torch_exclude=False)
    params = inspect.signature(writer).parameters
    missing = [p for p in params if p not in wanted and p != "path"]
    if missing:
        raise RuntimeError(f"cpp_extension._write_ninja_file_to_build_library takes parameters this test does not "
                           f"know: {missing}")
    with tempfile.TemporaryDirectory() as tmp:
        build_file = os.path.join(tmp, "build.ninja")
        writer(path=build_file, **{k: v for k, v in wanted.items() if k in params})
        variables = _ninja_variables(build_file)
    for key in ("nvcc", "cuda_cflags", "cuda_post_cflags"):
        if key not in variables:
            raise RuntimeError(f"cpp_extension's build file has no {key!r} variable")
    return (shlex.split(variables["nvcc"]) + shlex.split(variables["cuda_cflags"]) + ["--cubin", SOURCE, "-o", output]
            + shlex.split(variables["cuda_post_cflags"]) + ["-Xptxas", "-v"])


# ptxas -v, per kernel:
#   ptxas info    : Compiling entry function '<mangled>' for 'sm_90'
#   ptxas info    : Function properties for <mangled>
#       0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
#   ptxas info    : Used 128 registers, used 1 barriers, 0 bytes smem, 400 bytes cmem[0]
_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+a?)'")
_PROPERTIES = re.compile(r"Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")
# sepconv_kernel<T, Math, K, kDynamicSmem>: its last two template arguments, int literals.
_KERNEL_ARGS = re.compile(r"Li(\d+)ELi(\d+)EEEv")


def parse_ptxas(text):
    """{mangled kernel name: {"arch", "registers", "smem", "stack", "spill_stores", "spill_loads"}}."""
    kernels, current, properties_of = {}, None, None
    for line in text.splitlines():
        m = _ENTRY.search(line)
        if m:
            current = m.group(1)
            kernels[current] = {"arch": m.group(2)}
            continue
        m = _PROPERTIES.search(line)
        if m:
            properties_of = m.group(1)
            continue
        m = _FRAME.search(line)
        if m and properties_of in kernels:
            kernels[properties_of].update(stack=int(m.group(1)), spill_stores=int(m.group(2)),
                                          spill_loads=int(m.group(3)))
            continue
        m = _USED.search(line)
        if m and current in kernels:
            s = _SMEM.search(line)
            kernels[current].update(registers=int(m.group(1)), smem=int(s.group(1)) if s else 0)
    return kernels


def _demangle(names):
    tool = shutil.which("c++filt")
    if tool is None:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return dict(zip(names, out.splitlines()))


def _short_name(demangled):
    """'bf16 wmma, k=3' style labels from the demangled name (the mangled one where c++filt is missing)."""
    m = re.search(r"sepconv_kernel<([^,]+), (.*), (\d+), (\d+)>\(", demangled)
    if not m:
        return demangled
    dtype = {"__nv_bfloat16": "bf16", "__half": "fp16", "float": "fp32"}.get(m.group(1), m.group(1))
    math = m.group(2)
    product = "FFMA" if "FfmaMath" in math else ("tf32 wmma" if "tf32" in math else "wmma")
    return f"{dtype} {product}, k={m.group(3)}"


class Report:
    def __init__(self, arch, kernels, seconds, command):
        self.arch, self.kernels, self.seconds, self.command = arch, kernels, seconds, command
        self.names = _demangle(sorted(kernels))

    def dynamic_smem(self, mangled):
        found = _KERNEL_ARGS.findall(mangled)
        return int(found[-1][1]) if found else None

    def table(self):
        rows = [f"{self.arch}: {len(self.kernels)} kernels, compiled in {self.seconds:.0f} s",
                f"  {'kernel':<22} {'regs':>5} {'static smem':>12} {'dynamic smem':>13} {'stack':>6} "
                f"{'spill st/ld':>12}"]
        for mangled in sorted(self.kernels, key=lambda n: _short_name(self.names[n])):
            k = self.kernels[mangled]
            rows.append(f"  {_short_name(self.names[mangled]):<22} {k.get('registers', '?'):>5} "
                        f"{k.get('smem', '?'):>12} {self.dynamic_smem(mangled) or '?':>13} {k.get('stack', '?'):>6} "
                        f"{str(k.get('spill_stores', '?')) + '/' + str(k.get('spill_loads', '?')):>12}")
        return "\n".join(rows)


def compile_report(arch):
    with tempfile.TemporaryDirectory() as tmp:
        command = nvcc_command(arch, os.path.join(tmp, "sepconv_cuda.cubin"))
        start = time.monotonic()
        done = subprocess.run(command, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
        seconds = time.monotonic() - start
    if done.returncode != 0:
        raise AssertionError(f"nvcc failed ({done.returncode}) for {arch}:\n{shlex.join(command)}\n"
                             f"{done.stdout[-4000:]}\n{done.stderr[-8000:]}")
    return Report(arch, parse_ptxas(done.stdout + "\n" + done.stderr), seconds, command)


@pytest.fixture(scope="module", params=sorted(SMEM_PER_BLOCK))
def report(request):
    reason = _skip_reason()
    if reason:
        pytest.skip(f"cannot compile the CUDA kernel here: {reason}")
    try:
        result = compile_report(request.param)
    except RuntimeError as e:
        pytest.skip(f"cannot reproduce the extension's nvcc flags with this torch: {e}")
    print("\n" + result.table())
    return result


def _sepconv_kernels(report):
    return {n: k for n, k in report.kernels.items() if "sepconv_kernel" in n}


def test_every_instantiation_is_compiled(report):
    kernels = _sepconv_kernels(report)
    assert len(kernels) == PRODUCTS * len(KERNEL_SIZES), report.table()
    for name, k in kernels.items():
        assert k["arch"] == report.arch
        assert {"registers", "stack", "spill_stores", "spill_loads"} <= set(k), f"ptxas reported {k} for {name}"


def test_no_spills_and_no_stack_frame(report):
    bad = {report.names[n]: k for n, k in report.kernels.items()
           if k.get("stack", 1) or k.get("spill_stores", 1) or k.get("spill_loads", 1)}
    assert not bad, f"kernels with local memory on {report.arch}:\n{report.table()}"


def test_registers_fit_the_launch_bounds(report):
    # __launch_bounds__(256, 2): two blocks of 256 threads in the 64K registers of an SM.
    for name, k in _sepconv_kernels(report).items():
        assert k["registers"] <= 128, f"{report.names[name]}: {k['registers']} registers"


def test_shared_memory_fits_a_block(report):
    limit = SMEM_PER_BLOCK[report.arch]
    for name, k in _sepconv_kernels(report).items():
        dynamic = report.dynamic_smem(name)
        assert dynamic is not None, f"no dynamic shared memory size in the name of {report.names[name]}"
        assert k["smem"] + dynamic <= limit, (f"{report.names[name]}: {k['smem']} B static + {dynamic} B dynamic "
                                              f"> {limit} B on {report.arch}")


def test_two_blocks_fit_an_sm(report):
    # The occupancy the launch bounds plan for: two blocks' shared memory side by side on one SM.
    capacity = SMEM_PER_SM[report.arch]
    for name, k in _sepconv_kernels(report).items():
        per_block = k["smem"] + (report.dynamic_smem(name) or 0) + SMEM_RESERVED_PER_BLOCK
        assert BLOCKS_PER_SM * per_block <= capacity, (f"{report.names[name]}: {BLOCKS_PER_SM} blocks of {per_block} B "
                                                       f"> {capacity} B of shared memory per SM on {report.arch}")


def main(argv):
    reason = _skip_reason()
    if reason:
        print(f"cannot compile the CUDA kernel here: {reason}", file=sys.stderr)
        return 2
    for arch in argv or sorted(SMEM_PER_BLOCK):
        print(compile_report(arch).table(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
