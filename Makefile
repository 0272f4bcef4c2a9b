# make train: install, then train on the embedded phantom data. make test: install, then test.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PORT ?= 5000
MLFLOW_DB ?= sqlite:///mlflow.db
DOCS_PORT ?= 8000

.PHONY: install train test test-slow test-all lint ui mlflow-server bench bench-pneumoniamnist bench-quality bench-lung-seg bench-kermany bench-predict bench-onnx bench-serve bench-pipeline bench-overhead bench-gpu bench-cli bench-shift bench-ui docs docs-serve clean

install: $(STAMP)

$(STAMP): requirements.lock pyproject.toml setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $(STAMP)

train: install
	$(BIN)/python -m medx.train $(ARGS)

test: install
	$(BIN)/python -m pytest -x -q -m "not slow" $(ARGS)

# the heavier tests (subprocess sweeps, signals, PostgreSQL, serving): CI runs them after make test
test-slow: install
	$(BIN)/python -m pytest -x -q -m slow $(ARGS)

lint: install
	$(BIN)/ruff check medx tests benchmarks

# The documentation site (mkdocs.yml, docs/): built offline, --strict (a broken link, anchor or
# API reference fails it); docs-serve: http://127.0.0.1:$(DOCS_PORT), rebuilt as pages change.
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

docs-serve: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve --dev-addr 127.0.0.1:$(DOCS_PORT)

EXPERIMENT ?= medx

ui: install
	-@$(BIN)/python -m medx.ui --backend-store-uri $(MLFLOW_DB) --experiment $(EXPERIMENT) --port $(PORT)
	$(BIN)/mlflow ui --backend-store-uri $(MLFLOW_DB) --host 127.0.0.1 --port $(PORT)

# A tracking server for a team: runs log to it with MLFLOW_TRACKING_URI=http://<host>:$(PORT).
# MLFLOW_BACKEND=postgresql://user:pw@host/db for Postgres; HOST=0.0.0.0 to serve beyond this machine.
# ARTIFACTS=s3://bucket/medx or a shared folder; SERVER_ARGS e.g. --allowed-hosts for a DNS name.
MLFLOW_BACKEND ?= $(MLFLOW_DB)
HOST ?= 127.0.0.1
ARTIFACTS ?= ./mlartifacts
SERVER_ARGS ?=
mlflow-server: install
	$(BIN)/mlflow server --backend-store-uri $(MLFLOW_BACKEND) --host $(HOST) --port $(PORT) \
		--artifacts-destination $(ARTIFACTS) $(SERVER_ARGS)

bench: install
	$(BIN)/python benchmarks/default_run.py

# PneumoniaMNIST, 3 seeds, against the MedMNIST v2 table (needs MEDX_DATA; ~10 min a run)
bench-pneumoniamnist: install
	MEDX_DATA=$${MEDX_DATA:-../shared/data} $(BIN)/python benchmarks/pneumoniamnist.py $(ARGS)

bench-quality: install
	MEDX_DATA=$${MEDX_DATA:-../shared/data} $(BIN)/python benchmarks/quality.py $(ARGS)

bench-lung-seg: install
	MEDX_DATA=$${MEDX_DATA:-../shared/data} $(BIN)/python benchmarks/lung_seg.py $(ARGS)

# Kermany recipe (experiment=kermany_cpu) on $MEDX_DATA/chest_xray/train, val/test carved by patient
bench-kermany: install
	MEDX_DATA=$${MEDX_DATA:-../shared/data} $(BIN)/python benchmarks/kermany.py $(ARGS)

# medx.predict on 1024 px JPEG and DICOM: end-to-end vs model-only, Grad-CAM and TTA cost
bench-predict: install
	MEDX_DATA=$${MEDX_DATA:-../shared/data} $(BIN)/python benchmarks/predict.py $(ARGS)

bench-onnx: install
	MEDX_DATA=$${MEDX_DATA:-../shared/data} $(BIN)/python benchmarks/onnx_speed.py $(ARGS)

bench-serve: install
	MEDX_DATA=$${MEDX_DATA:-../shared/data} $(BIN)/python benchmarks/serve.py $(ARGS)

bench-pipeline: install
	MEDX_DATA=$${MEDX_DATA:-../shared/data} $(BIN)/python benchmarks/pipeline.py $(ARGS)

bench-overhead: install
	$(BIN)/python benchmarks/overhead.py $(ARGS)

bench-gpu: install
	$(BIN)/python benchmarks/gpu.py $(ARGS)

# the shift monitor's false alarms and detection power, and the stress test (needs MEDX_DATA)
bench-shift: install
	MEDX_DATA=$${MEDX_DATA:-../shared/data} $(BIN)/python benchmarks/shift.py $(ARGS)

# how fast medx.ui prints its links, beside `import mlflow`
bench-ui: install
	$(BIN)/python benchmarks/ui_link.py $(ARGS)

# --help of every command and one image through medx.predict, each from a cold process
bench-cli: install
	$(BIN)/python benchmarks/cli.py $(ARGS)

clean:
	rm -rf outputs multirun site build .pytest_cache .ruff_cache
