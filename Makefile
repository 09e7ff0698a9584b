# medusa-cli developer entry points. `make demo` and `make test` are all a newcomer needs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DEMO   := out/demo

.PHONY: setup demo test test-all bench gpu-bundle clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

# End to end on a small generated checkpoint: example, then `medusa build` (convert -> compile
# -> verify against the numpy oracle, one JSON report), then what it built. Then heads built
# with a seeded evaluation set whose accuracies are known: eval -> tree-search -> compile --tree.
demo: setup
	rm -rf $(DEMO)
	$(BIN)/medusa example $(DEMO)/ckpt --preset tiny --layout medusa1 --seed 0
	$(BIN)/medusa inspect $(DEMO)/ckpt
	$(BIN)/medusa build $(DEMO)/ckpt --target llvm --quantization q4f16_1 -o $(DEMO)/build
	$(BIN)/medusa inspect $(DEMO)/build/params
	$(BIN)/medusa inspect $(DEMO)/build/medusa-llvm-q4f16_1.so
	$(BIN)/medusa verify $(DEMO)/build/medusa-llvm-q4f16_1.so $(DEMO)/build/params
	$(BIN)/medusa example $(DEMO)/eval-ckpt --preset eval-tiny --seed 0 --eval-set $(DEMO)/eval.npz
	$(BIN)/medusa build $(DEMO)/eval-ckpt --target llvm --quantization q4f16_1 -o $(DEMO)/eval-build
	$(BIN)/medusa eval $(DEMO)/eval-build/medusa-llvm-q4f16_1.so $(DEMO)/eval-build/params \
	  --data $(DEMO)/eval.npz -o $(DEMO)/accuracy.json --plot $(DEMO)/accuracy.svg
	$(BIN)/medusa tree mc_sim_7b_63 --accuracy $(DEMO)/accuracy.json
	$(BIN)/medusa tree-search --accuracy $(DEMO)/accuracy.json --ranks $(DEMO)/accuracy.ranks.npy \
	  --nodes 8,16,32,64
	$(BIN)/medusa tree-search --accuracy $(DEMO)/accuracy.json --nodes 32 -o $(DEMO)/tree.json \
	  --plot $(DEMO)/tree.svg
	$(BIN)/medusa compile $(DEMO)/eval-build/params --target llvm --tree $(DEMO)/tree.json \
	  -o $(DEMO)/eval-build/medusa-llvm-q4f16_1-tree.so

test: setup
	$(BIN)/python -m pytest -q -m "not slow"

test-all: setup
	$(BIN)/python -m pytest -q

# Benchmarks at the vicuna-7b shape, written to BENCHMARKS.md; see README "Benchmarks".
bench: setup
	$(BIN)/python tools/bench_suite.py --preset vicuna-7b --output BENCHMARKS.md

# For a GPU machine without TVM's compiler or a network (the device machines lent here): every
# scheme's heads (with a tree) compiled for GPU_ARCH, TVM's runtime and the wheels it needs on
# Python 3.12, in .gpu/. There, `python3 tools/gpu_bundle.py run` verifies and benches them at
# batch 1, 4 and 8 (gpu-out/BENCHMARKS-GPU.md; see tools/gpu_bundle.py).
GPU_ARCH ?= sm_90
gpu-bundle: setup
	$(BIN)/python tools/gpu_bundle.py build --arch $(GPU_ARCH) --bundle .gpu

clean:
	rm -rf out bench-out .pytest_cache .gpu
