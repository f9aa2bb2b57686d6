"""The one list of pyperf._C sources, read by setup.py (import) and CMakeLists.txt (`python csrc/sources.py cpu|cuda`).

A feature X adds csrc/cpu/X.cpp and csrc/cuda/X.cu (and csrc/autograd/X.cpp when its autograd is in C++: built
for CPU and CUDA builds alike, it holds no device code); nothing else needs editing for them to be built.
"""
import glob
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def cpu_sources():
    return ([os.path.join(HERE, "pyperf.cpp")] + sorted(glob.glob(os.path.join(HERE, "cpu", "*.cpp")))
            + sorted(glob.glob(os.path.join(HERE, "autograd", "*.cpp"))))


def cuda_sources():
    return sorted(glob.glob(os.path.join(HERE, "cuda", "*.cu")))


if __name__ == "__main__":
    kind = sys.argv[1] if len(sys.argv) > 1 else "cpu"
    print(";".join(cpu_sources() if kind == "cpu" else cuda_sources()), end="")
