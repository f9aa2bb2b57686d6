# The README's two commands: `make demo` (the main job) and `make test` (the tests). Each creates a virtual
# environment for the torch it tests (.venv/torch-<version>: versions never mix), installs what it needs, builds
# pyperf._C in place, then runs. CI (.ci/run) runs `make test` on torch 2.14.1 and the Python tests again on 2.11.0.
#   make test TORCH=torch==2.11.0 PYPERF_CUDA=0    the tests against another torch (CPU kernels only: quicker)
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PY ?= python3
TORCH ?= torch==2.14.1
TORCH_TAG := $(subst ==,-,$(TORCH))
VENV ?= .venv/$(TORCH_TAG)
VPY := $(VENV)/bin/python
export CUDA_HOME ?= /usr/local/cuda
# One arch keeps developer and CI builds fast; `pip install` for users builds the default set (setup.py).
export TORCH_CUDA_ARCH_LIST ?= 9.0
export MAX_JOBS ?= 2
SAN := build/sanitize
# The test files of the kernels (CPU kernels, and the CUDA kernels under the emulation): what runs under the
# sanitizers.
KERNEL_TESTS := tests/test_pack.py tests/test_quant.py tests/test_quant_tensors.py tests/test_norm.py \
                tests/test_activation.py
SAN_ENV := LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libubsan.so)" \
           ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1

.PHONY: deps build demo test test-py test-py-others test-cpp cuda-emu test-cuda-emu cuda-resources bench clean

deps: $(VENV)/.deps

$(VENV)/.deps: requirements-dev.txt
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q "$(TORCH)" -r requirements-dev.txt
	touch $@

# --force: the in-place .so may come from another torch's build; ninja still recompiles only what changed (each
# torch has its own object directory). The log keeps ptxas's register/spill report for `make cuda-resources`.
build: deps
	mkdir -p build/temp-$(TORCH_TAG)
	PYPERF_PTXAS_VERBOSE=1 $(VPY) setup.py -q build_ext --inplace --force --build-temp build/temp-$(TORCH_TAG) 2>&1 \
	    | tee build/temp-$(TORCH_TAG)/build.log

demo: build
	$(VPY) examples/train_gpt_ddp.py $(DEMO_ARGS)

# Every test once: the kernel tests (CPU kernels and emulated CUDA kernels) under the sanitizers in test-cuda-emu,
# the rest in test-py-others.
test: build test-cpp test-py-others test-cuda-emu cuda-resources

test-py: build
	$(VPY) -m pytest -q tests

test-py-others: build
	$(VPY) -m pytest -q tests $(addprefix --ignore=,$(KERNEL_TESTS))

test-cpp:
	cmake -S . -B build/cmake -DCMAKE_BUILD_TYPE=Release > /dev/null
	cmake --build build/cmake -j2
	ctest --test-dir build/cmake --output-on-failure

# The CUDA kernels run on the CPU under the SIMT emulation (csrc/emu): pyperf._C_emu in place, no sanitizers.
cuda-emu: deps
	$(VPY) csrc/emu/build.py

# The emulated CUDA kernels and the CPU kernels, built with ASan + UBSan into $(SAN), and their tests run there
# (any sanitizer report aborts the run and is printed: --capture=sys leaves the C-level stderr alone); the C++
# tests too.
test-cuda-emu: deps
	$(VPY) csrc/emu/build.py --sanitize --out $(SAN)
	PYPERF_CUDA=0 PYPERF_SANITIZE=1 $(VPY) setup.py -q build_ext --build-lib $(SAN) --build-temp $(SAN)/temp-cpu
	cd pyperf && find . -name '*.py' -exec install -D -m 644 {} ../$(SAN)/pyperf/{} \;
	cmake -S . -B build/cmake-sanitize -DCMAKE_BUILD_TYPE=RelWithDebInfo -DPYPERF_SANITIZE=ON > /dev/null
	cmake --build build/cmake-sanitize -j2
	ASAN_OPTIONS=detect_leaks=1 ctest --test-dir build/cmake-sanitize --output-on-failure
	rm -f $(SAN)/emu-coverage.txt
	cd $(SAN) && $(SAN_ENV) PYPERF_TEST_ROOT=$(abspath $(SAN)) PYPERF_EMU_COVERAGE=$(abspath $(SAN))/emu-coverage.txt \
	    $(abspath $(VPY)) -m pytest -q -p no:cacheprovider --capture=sys $(addprefix $(CURDIR)/,$(KERNEL_TESTS))

# Registers, shared memory and spills of every CUDA kernel (sm_90, ptxas: from the build log for what the build
# compiled, by compiling the device code of the rest); fails on any spill or stack frame, and, after
# test-cuda-emu, on any compiled kernel that the tests never ran under the emulation.
cuda-resources: build
	cov=$(SAN)/emu-coverage.txt; $(VPY) scripts/cuda_resources.py --log build/temp-$(TORCH_TAG)/build.log \
	    $$([ -f $$cov ] && echo --executed $$cov)

bench: build
	$(VPY) -m pyperf.bench all

clean:
	rm -rf build pyperf/_C*.so
