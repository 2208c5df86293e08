"""What the package needs, and what it ships: the pure-Python paths need no C++ compiler, the
extension is built only when a call needs it (and says so only then), and a wheel carries the
kernels' sources."""
import os
import subprocess
import sys
import textwrap
import zipfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Everything here must run with the compiler broken and an empty extension cache: a build would fail.
NO_COMPILER = textwrap.dedent("""
    import os, torch, xception_fast
    from xception_fast import Xception, _extension
    model = Xception(num_classes=10).eval()
    fused, report = xception_fast.fuse(model, backend="reference")
    assert report.count == 34, report
    with torch.no_grad():
        fused(torch.randn(1, 3, 71, 71))
    g = torch.Generator().manual_seed(0)
    x, dw = torch.randn(2, 8, 5, 6, generator=g), torch.randn(8, 1, 3, 3, generator=g)
    pw = torch.randn(4, 8, 1, 1, generator=g)
    xception_fast.sepconv(x, dw, pw, stride=2, act_mid="relu6", backend="reference")
    if os.environ.get("TRITON_INTERPRET") == "1":
        y = xception_fast.sepconv(x, dw, pw, stride=2, act_mid="relu6", backend="triton")
        assert y.shape == (2, 4, 3, 3)
    assert _extension._loaded is None, _extension._loaded
    print("no compiler needed")
""")


def run_python(code, tmp_path, **env):
    environment = dict(os.environ, CXX="/bin/false", CC="/bin/false", TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"),
                       PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment,
                          cwd=tmp_path, timeout=600)


@pytest.mark.parametrize("triton", [False, True], ids=["reference", "triton-interpreter"])
def test_python_paths_need_no_compiler(tmp_path, triton):
    if triton:
        pytest.importorskip("triton")
    done = run_python(NO_COMPILER, tmp_path, **({"TRITON_INTERPRET": "1"} if triton else {}))
    assert done.returncode == 0 and "no compiler needed" in done.stdout, done.stderr[-3000:]
    assert "compiling the" not in done.stderr


def test_a_call_that_needs_the_kernels_says_it_builds_them_only_then(tmp_path):
    code = textwrap.dedent("""
        import torch, xception_fast
        x, dw, pw = torch.randn(1, 4, 5, 5), torch.randn(4, 1, 3, 3), torch.randn(2, 4, 1, 1)
        print("before the call")
        xception_fast.sepconv(x, dw, pw, backend="cpu")
    """)
    done = run_python(code, tmp_path)
    # The compiler is broken: the build is attempted, announced first, and fails loudly.
    assert done.returncode != 0 and "before the call" in done.stdout
    assert "compiling the C++ kernels" in done.stderr, done.stderr[-3000:]


def test_the_wheel_carries_the_kernel_sources(tmp_path):
    # Built in pip's isolated environment, as `pip install .` builds it: no torch there, so nothing
    # is compiled and the sources are what the wheel must carry.
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), REPO],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (wheel,) = [f for f in os.listdir(tmp_path) if f.endswith(".whl")]
    names = set(zipfile.ZipFile(tmp_path / wheel).namelist())
    from xception_fast import _build_config

    for source in _build_config.CPU_SOURCES + _build_config.CUDA_SOURCES + _build_config.HEADERS:
        assert f"xception_fast/{source}" in names, f"the wheel lacks {source}"


def test_the_build_command_reports_what_was_compiled():
    """`python -m xception_fast._extension` says whether the CUDA kernel is in the library (CI fails
    on --require-cuda without it): built without the CUDA sources, it must say so. The CPU-only
    build is the one the tests load already (no compile here)."""
    env = dict(os.environ, XCEPTION_FAST_SKIP_CUDA="1")
    env.pop("XCEPTION_FAST_BUILD_CUDA", None)
    done = subprocess.run([sys.executable, "-m", "xception_fast._extension"], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "CUDA kernel compiled in: False" in done.stdout, done.stdout
