# The README's two commands: `make demo` (the main job) and `make test` (the tests). Each installs what it needs,
# builds pyperf._C in place, then runs. CI runs `make test` (.ci/run).
PY ?= python3
TORCH ?= torch==2.14.1
export CUDA_HOME ?= /usr/local/cuda
# One arch keeps developer and CI builds fast; `pip install` for users builds the default set (setup.py).
export TORCH_CUDA_ARCH_LIST ?= 9.0
export MAX_JOBS ?= 2

.PHONY: deps build demo test test-py test-cpp bench clean

deps:
	$(PY) -m pip install -q "$(TORCH)" -r requirements-dev.txt

build: deps
	$(PY) setup.py -q build_ext --inplace

demo: build
	$(PY) examples/train_gpt_ddp.py $(DEMO_ARGS)

test: build test-cpp test-py

test-py:
	$(PY) -m pytest -q tests

test-cpp:
	cmake -S . -B build/cmake -DCMAKE_BUILD_TYPE=Release > /dev/null
	cmake --build build/cmake -j2
	ctest --test-dir build/cmake --output-on-failure

bench: build
	$(PY) -m pyperf.bench all

clean:
	rm -rf build pyperf/_C*.so
