"""Builds exactly one extension, pyperf._C.

C++ (CPU) kernels are always built. CUDA kernels are built when torch was built with CUDA and nvcc is found;
no GPU is needed to build. Environment:
  PYPERF_CUDA=0|1          force CUDA off / on (on fails loudly if it cannot be built)
  TORCH_CUDA_ARCH_LIST     archs to build, default "8.0;9.0;10.0+PTX" (CI uses "9.0" for speed)
  CUDA_HOME                toolkit root; /usr/local/cuda is used when nvcc lives there and CUDA_HOME is unset
  MAX_JOBS                 parallel compile jobs (ninja)
  PYPERF_PTXAS_VERBOSE=1   ptxas reports registers, shared memory and spills of every kernel (the Makefile sets it
                           and keeps the log for scripts/cuda_resources.py)
  PYPERF_SANITIZE=1        build with AddressSanitizer + UBSan (make test-cuda-emu: the CPU kernels' tests run under
                           them; load with the sanitizer runtimes preloaded)
The source list is csrc/sources.py, shared with CMakeLists.txt (which reads it through `python csrc/sources.py`).
"""
import os
import sys

# torch guesses CUDA_HOME from `which nvcc`, which gives /usr/local on machines with a /usr/local/bin/nvcc
# symlink; point it at the real toolkit before torch.utils.cpp_extension is imported.
if not os.environ.get("CUDA_HOME") and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

from setuptools import find_packages, setup  # noqa: E402

try:
    import torch  # noqa: E402
    from torch.utils import cpp_extension  # noqa: E402
except ImportError:  # pragma: no cover - the message is the point
    sys.exit("pyperf-torch needs torch installed first (pip install torch), then "
             "`pip install --no-build-isolation .`")

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(ROOT, "csrc"))
import sources  # noqa: E402  (csrc/sources.py: the one source list)

VERSION = "0.1.0"
DEFAULT_ARCHS = "8.0;9.0;10.0+PTX"


def want_cuda():
    """Returns (build_cuda, reason)."""
    forced = os.environ.get("PYPERF_CUDA")
    nvcc = cpp_extension.CUDA_HOME and os.path.exists(os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc"))
    if forced == "0":
        return False, "PYPERF_CUDA=0"
    if torch.version.cuda is None:
        if forced == "1":
            sys.exit("PYPERF_CUDA=1 but this torch (%s) was built without CUDA" % torch.__version__)
        return False, "torch %s has no CUDA" % torch.__version__
    if not nvcc:
        if forced == "1":
            sys.exit("PYPERF_CUDA=1 but nvcc was not found (set CUDA_HOME)")
        return False, "nvcc not found (set CUDA_HOME)"
    return True, ("PYPERF_CUDA=1" if forced == "1" else "torch has CUDA %s and nvcc is at %s"
                  % (torch.version.cuda, cpp_extension.CUDA_HOME))


def write_build_config(build_cuda, archs):
    """A generated header so _C can say what it is (pyperf.build_info())."""
    gen = os.path.join(ROOT, "build", "generated-sanitize" if os.environ.get("PYPERF_SANITIZE") == "1" else "generated")
    os.makedirs(gen, exist_ok=True)
    path = os.path.join(gen, "pyperf_build_config.h")
    text = ("#pragma once\n"
            '#define PYPERF_VERSION_STR "%s"\n'
            '#define PYPERF_TORCH_VERSION_STR "%s"\n'
            '#define PYPERF_CUDA_ARCHS_STR "%s"\n'
            "#define PYPERF_BUILT_WITH_CUDA %d\n"
            % (VERSION, torch.__version__, archs if build_cuda else "", int(build_cuda)))
    old = open(path).read() if os.path.exists(path) else None
    if old != text:  # keep the mtime when nothing changed, so ninja does not rebuild everything
        with open(path, "w") as f:
            f.write(text)
    return gen


def extensions():
    build_cuda, reason = want_cuda()
    if build_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCHS
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
    gen = write_build_config(build_cuda, archs)
    srcs = sources.cpu_sources() + (sources.cuda_sources() if build_cuda else [])
    print("pyperf: building pyperf._C with %d sources: CPU kernels%s (%s)"
          % (len(srcs), " + CUDA kernels for archs " + archs if build_cuda else ", no CUDA", reason),
          flush=True)
    include_dirs = [os.path.join(ROOT, "csrc", "include"), gen]
    cxx = ["-O3", "-std=c++20", "-fvisibility=hidden"]
    if sys.platform.startswith("linux"):
        cxx.append("-fopenmp")  # at::parallel_for uses torch's OpenMP backend; our code needs only its headers
    # No --use_fast_math: it flushes denormals (tiny gradients) to zero and approximates division, which would
    # break CPU/CUDA agreement of quantization and stochastic rounding. Kernels use fast intrinsics explicitly.
    nvcc = ["-O3", "-std=c++20", "-lineinfo", "--expt-relaxed-constexpr",
            "-DPYPERF_WITH_CUDA=1"]
    if os.environ.get("PYPERF_PTXAS_VERBOSE") == "1":
        nvcc += ["-Xptxas", "-v"]  # registers / spills per kernel in the build log (scripts/cuda_resources.py)
    link = []
    if os.environ.get("PYPERF_SANITIZE") == "1":
        san = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g"]
        cxx = [f for f in cxx if f != "-O3"] + ["-O1"] + san
        link += san
    common = dict(name="pyperf._C", sources=[os.path.relpath(s, ROOT) for s in srcs],
                  include_dirs=include_dirs, py_limited_api=False, extra_link_args=link)
    if build_cuda:
        cxx.append("-DPYPERF_WITH_CUDA=1")
        return [cpp_extension.CUDAExtension(extra_compile_args={"cxx": cxx, "nvcc": nvcc}, **common)]
    return [cpp_extension.CppExtension(extra_compile_args={"cxx": cxx}, **common)]


setup(
    name="pyperf-torch",
    version=VERSION,
    description="Fused gradient bucketing, quantized gradient all-reduce and recompute-friendly fused layers "
                "for PyTorch data-parallel training (imports as `pyperf`)",
    packages=find_packages(include=["pyperf", "pyperf.*"]),
    ext_modules=extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.10",
    install_requires=["torch>=2.11"],
    extras_require={"bench": ["matplotlib", "numpy"], "test": ["pytest", "numpy"]},
    entry_points={"console_scripts": ["pyperf-bench=pyperf.bench.__main__:main"]},
    zip_safe=False,
)
