# rlalign developer commands. Every install pins torch so no dependency silently pulls another build:
# torch 2.14.1 + torchvision 0.29.1 is the pair open_clip/timm work with on this project's machines.
PYTHON      ?= python3
VENV        ?= .venv
TORCH_PINS  ?= torch==2.14.1 torchvision==0.29.1
IR_VENV     ?= .venv-imagereward
PYTEST_ARGS ?=
ARGS        ?=
STAMP       := $(VENV)/.rlalign-installed
BIN         := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export RAY_AUTH_MODE := disabled
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: install demo test test-fast test-gpu lint fmt bench image-reward-env clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check $(TORCH_PINS) -e '.[rewards,dev]'
	touch $(STAMP)

## demo: install, then align the embedded digits model end to end (ARGS='algo=ddpo' etc. to change it)
demo: $(STAMP)
	$(BIN)/rlalign train $(ARGS)

## test: the whole CPU suite (unit, component, ray, e2e); pytest's "no tests collected" (exit 5) is a failure
test: $(STAMP) image-reward-env
	RLALIGN_IMAGE_REWARD_VENV=$(CURDIR)/$(IR_VENV) $(BIN)/python -m pytest -q $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit $(PYTEST_ARGS)

test-gpu: $(STAMP)
	$(BIN)/python -m pytest -q -m gpu tests/gpu $(PYTEST_ARGS)

## image-reward-env: ImageReward's own venv (its pins conflict with transformers 5); served over HTTP
image-reward-env: $(IR_VENV)/.ready

$(IR_VENV)/.ready: scripts/setup_image_reward_env.sh
	bash scripts/setup_image_reward_env.sh $(IR_VENV)
	touch $@

lint: $(STAMP)
	$(BIN)/ruff check rlalign reward_servers tests benchmarks
	$(BIN)/ruff format --check rlalign reward_servers tests benchmarks
	$(BIN)/mypy --strict rlalign/algos rlalign/sampling/logprob.py rlalign/pairing.py rlalign/types.py reward_servers/base.py

fmt: $(STAMP)
	$(BIN)/ruff format rlalign reward_servers tests benchmarks
	$(BIN)/ruff check --fix rlalign reward_servers tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

## bench-realsize: real SD1.5 + SDXL U-Net architectures (random weights), one bf16 TailorPO and Diffusion-DPO update each on CPU (~4 min, 7 GiB RAM; docs/gpu-memory.md)
bench-realsize: $(STAMP)
	$(BIN)/python benchmarks/realsize.py $(ARGS)

clean:
	rm -rf $(VENV) $(IR_VENV) .pytest_cache .ruff_cache .mypy_cache
