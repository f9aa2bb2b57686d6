"""The package imports, says what it built, and fails clearly when the extension is missing or stale."""
import subprocess
import sys

import torch

import pyperf


def test_build_info():
    info = pyperf.build_info()
    assert info["pyperf"] == pyperf.__version__
    assert info["torch"] == torch.__version__
    assert info["built_against_torch"] == torch.__version__
    assert "cpu" in info["backends"]
    assert {"pack", "unpack", "quantize", "dequantize"} <= set(info["ops"]), info["ops"]
    if "cuda" in info["backends"]:
        assert info["cuda_archs"], "a CUDA build must record its archs"


def test_info_command_runs():
    out = subprocess.run([sys.executable, "-m", "pyperf.info"], capture_output=True, text=True, check=True,
                         cwd=__import__("os").path.dirname(__import__("os").path.dirname(pyperf.__file__)))
    assert "backends" in out.stdout and "ops" in out.stdout


def test_stale_extension_message(monkeypatch):
    from pyperf import _load
    monkeypatch.setattr(pyperf._C, "TORCH_VERSION", "0.0.0-other")
    try:
        _load.load()
    except _load.BuildError as e:
        assert "built against torch 0.0.0-other" in str(e) and "build_ext --inplace" in str(e)
    else:
        raise AssertionError("a stale _C must raise BuildError")
