"""`python -m pyperf.info`: what this pyperf build is, and how to fix what is missing."""
import importlib.metadata as md
import sys


def _other_pyperf():
    """PyPI's `pyperf` (the Python benchmark toolkit) imports under the same name as ours."""
    try:
        dist = md.distribution("pyperf")
    except md.PackageNotFoundError:
        return None
    return "PyPI's `pyperf` %s (the Python benchmark toolkit) is installed in this environment too; both import " \
           "as `pyperf`, so one shadows the other. Use separate environments (pip uninstall pyperf)." % dist.version


def main():
    other = _other_pyperf()
    if other:
        print("WARNING:", other)
    try:
        import pyperf
    except ImportError as e:
        print("pyperf could not be imported:", e)
        return 1
    if not hasattr(pyperf, "build_info"):
        print("`import pyperf` found %s, which is not pyperf-torch." % getattr(pyperf, "__file__", "?"))
        return 1
    info = pyperf.build_info()
    for key in ("pyperf", "torch", "torch_cuda", "built_against_torch", "backends", "cuda_archs", "cuda_available",
                "extension"):
        print("%-20s %s" % (key, info[key]))
    print("%-20s %d: %s" % ("ops", len(info["ops"]), ", ".join(info["ops"])))
    if "cuda" not in info["backends"]:
        print("CUDA kernels were not built. With a CUDA build of torch and nvcc (CUDA_HOME), rebuild: "
              "PYPERF_CUDA=1 pip install --no-build-isolation -e .")
    elif not info["cuda_available"]:
        print("CUDA kernels are built, but no GPU is visible: CPU kernels will be used.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
