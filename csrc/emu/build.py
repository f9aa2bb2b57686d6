"""Builds pyperf._C_emu, the SIMT emulation of pyperf's CUDA kernels (test-only, never installed).

    python csrc/emu/build.py                         # in place: pyperf/_C_emu*.so next to pyperf/_C*.so
    python csrc/emu/build.py --sanitize --out DIR    # with ASan + UBSan, into DIR/pyperf/ (make test-cuda-emu)

It compiles csrc/cuda/*.cu as host C++ with -DPYPERF_CUDA_EMU (so csrc/include/pyperf/cuda_glue.cuh takes the
emulator's runtime, csrc/emu/runtime.h), together with csrc/pyperf.cpp (the same schemas, as torch.ops.pyperf_emu),
csrc/autograd/*.cpp (the same autograd over them) and the scheduler csrc/emu/simt.cpp. Two mechanical edits are
made to each .cu on its way to the compiler, on the same lines (#line keeps diagnostics pointing at the .cu):
  - every __global__ function body starts with PYPERF_EMU_KERNEL(<its __launch_bounds__ or 0>), which names the
    kernel for error messages and checks the block size against its bounds;
  - every `__shared__ T name[dims];` becomes a reference into the block's shared arena (per block, poisoned).
Nothing else differs from what nvcc compiles.
"""
import argparse
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CSRC = os.path.join(ROOT, "csrc")
sys.path.insert(0, CSRC)
import sources  # noqa: E402  (csrc/sources.py: the one source list)

VERSION = "0.1.0"


def _blank_comments_and_strings(src):
    """The same text with comments and string/char literals replaced by spaces (same length, same newlines), so
    that the patterns below only match code."""
    out = list(src)
    i, n = 0, len(src)
    while i < n:
        c = src[i]
        if src.startswith("//", i):
            j = src.find("\n", i)
            j = n if j < 0 else j
        elif src.startswith("/*", i):
            j = src.find("*/", i + 2)
            j = n if j < 0 else j + 2
        elif c in "\"'":
            j = i + 1
            while j < n and src[j] != c:
                j += 2 if src[j] == "\\" else 1
            j += 1
        else:
            i += 1
            continue
        for k in range(i, min(j, n)):
            if out[k] != "\n":
                out[k] = " "
        i = j
    return "".join(out)


def _matching(code, i, open_="(", close=")"):
    depth = 0
    for j in range(i, len(code)):
        if code[j] == open_:
            depth += 1
        elif code[j] == close:
            depth -= 1
            if depth == 0:
                return j
    raise ValueError("unbalanced %s at offset %d" % (open_, i))


_KERNEL = re.compile(r"__global__\s+void\s+(?:__launch_bounds__\s*(?P<lb>\())?")
_SHARED = re.compile(r"__shared__\s+(?P<type>[^;{}()]+?)\s+(?P<name>[A-Za-z_]\w*)\s*(?P<dims>(?:\[[^\];]*\]\s*)*);")


def instrument(src, path):
    """The two edits of the module docstring; raises on a __global__ or __shared__ it cannot parse."""
    code = _blank_comments_and_strings(src)
    edits = []  # (offset, replace_length, text)
    for m in _KERNEL.finditer(code):
        bounds = "0"
        pos = m.end()
        if m.group("lb"):
            close = _matching(code, m.start("lb"))
            bounds = src[m.start("lb") + 1:close].strip()
            pos = close + 1
        name = re.match(r"\s*([A-Za-z_]\w*)\s*\(", code[pos:])
        if not name:
            raise ValueError("%s:%d: cannot parse the kernel declared here" % (path, code.count("\n", 0, m.start()) + 1))
        params_end = _matching(code, pos + name.end() - 1)
        brace = code.find("{", params_end)
        if brace < 0 or code[params_end + 1:brace].strip():
            raise ValueError("%s:%d: kernel %s: expected its body after the parameters"
                             % (path, code.count("\n", 0, m.start()) + 1, name.group(1)))
        edits.append((brace + 1, 0, " PYPERF_EMU_KERNEL(%s);" % bounds))
    for m in re.finditer(r"__shared__", code):
        d = _SHARED.match(code, m.start())
        if not d:
            raise ValueError("%s:%d: cannot parse this __shared__ declaration (expected `__shared__ T name[dims];`)"
                             % (path, code.count("\n", 0, m.start()) + 1))
        t, name, dims = d.group("type").strip(), d.group("name"), re.sub(r"\s+", "", d.group("dims"))
        text = ("static const char pyperf_emu_key_%s = 0; auto& %s = ::pyperf_emu::shared<%s %s>(&pyperf_emu_key_%s, "
                "\"%s\");" % (name, name, t, dims, name, name))
        edits.append((d.start(), d.end() - d.start(), text))
    out = src
    for off, length, text in sorted(edits, reverse=True):
        out = out[:off] + text + out[off + length:]
    return '#line 1 "%s"\n' % path + out


def generate(gen_dir):
    """Instrumented copies of csrc/cuda/*.cu and csrc/include/pyperf/*.cuh (build artifacts) and the build-config
    header; returns the sources to compile."""
    os.makedirs(gen_dir, exist_ok=True)
    import torch
    config = ("#pragma once\n"
              '#define PYPERF_VERSION_STR "%s"\n'
              '#define PYPERF_TORCH_VERSION_STR "%s"\n'
              '#define PYPERF_CUDA_ARCHS_STR "simt-emulation"\n'
              "#define PYPERF_BUILT_WITH_CUDA 0\n" % (VERSION, torch.__version__))
    _write_if_changed(os.path.join(gen_dir, "pyperf_build_config.h"), config)
    # device code in headers (the multi-tensor-apply kernel): instrumented copies that shadow the originals
    inc = os.path.join(CSRC, "include", "pyperf")
    os.makedirs(os.path.join(gen_dir, "pyperf"), exist_ok=True)
    for h in sorted(f for f in os.listdir(inc) if f.endswith(".cuh")):
        with open(os.path.join(inc, h)) as f:
            _write_if_changed(os.path.join(gen_dir, "pyperf", h), instrument(f.read(), os.path.join(inc, h)))
    out = []
    for cu in sources.cuda_sources():
        with open(cu) as f:
            text = instrument(f.read(), cu)
        dst = os.path.join(gen_dir, os.path.basename(cu) + ".cpp")
        _write_if_changed(dst, text)
        out.append(dst)
    return out


def _write_if_changed(path, text):
    old = open(path).read() if os.path.exists(path) else None
    if old != text:  # keep the mtime when nothing changed, so ninja does not rebuild
        with open(path, "w") as f:
            f.write(text)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sanitize", action="store_true", help="build with AddressSanitizer and UBSan")
    ap.add_argument("--out", help="put pyperf/_C_emu*.so under this directory instead of in place")
    args = ap.parse_args(argv)

    if not os.environ.get("CUDA_HOME") and os.path.exists("/usr/local/cuda/bin/nvcc"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"  # as in setup.py: keeps torch from guessing /usr/local
    from setuptools import setup
    from torch.utils import cpp_extension

    tag = "sanitize" if args.sanitize else "plain"
    work = os.path.join(ROOT, "build", "emu-" + tag)
    gen = os.path.join(work, "gen")
    srcs = ([os.path.join(CSRC, "pyperf.cpp")] + sorted(
        os.path.join(CSRC, "autograd", f) for f in os.listdir(os.path.join(CSRC, "autograd")) if f.endswith(".cpp"))
        + [os.path.join(CSRC, "emu", "simt.cpp")] + generate(gen))
    cxx = ["-std=c++20", "-g", "-O1", "-ffp-contract=off", "-fno-fast-math", "-DPYPERF_CUDA_EMU", "-Wno-unknown-pragmas",
           "-fvisibility=hidden"]
    link = []
    if args.sanitize:
        san = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
        cxx += san
        link += san
    ext = cpp_extension.CppExtension(
        "pyperf._C_emu", sources=[os.path.relpath(s, ROOT) for s in srcs],
        include_dirs=[gen, os.path.join(CSRC, "include"), CSRC],
        extra_compile_args={"cxx": cxx}, extra_link_args=link)
    script = ["build_ext", "--build-temp", os.path.join(work, "temp")]
    script += ["--build-lib", args.out] if args.out else ["--inplace"]
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        setup(name="pyperf-emu", ext_modules=[ext], script_args=script + ["-q"],
              cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)})
    finally:
        os.chdir(cwd)


if __name__ == "__main__":
    main()
