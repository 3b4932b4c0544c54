# Two set-up commands for a fresh machine: `make demo` and `make test` (see README.md).
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
DEMO    ?= outputs/demo
PIP     := $(PY) -m pip install --disable-pip-version-check -q

.PHONY: install system-deps demo test clean

install: $(STAMP)

# Python packages from the lock file, then the project itself (editable, so configs/ is found beside it).
$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) --upgrade pip==26.3
	$(PIP) -r requirements.lock
	$(PIP) --no-deps -e .
	touch $(STAMP)

# Debian packages the integration tests talk to: a real SLURM (+ munge) and headless Chromium.
system-deps:
	bash tools/install_system_deps.sh

demo: $(STAMP)
	test -f data/tiny-imagenet/tiny_imagenet.json || $(VENV)/bin/spnet make-tiny-imagenet data/tiny-imagenet
	$(VENV)/bin/spnet study --name demo --methods spnet_code --targets 0.5 --static-epochs 4 --epochs 3 \
		data.root=data/tiny-imagenet checkpoint.dir=$(DEMO)/checkpoints tracking.uri=sqlite:///mlflow.db \
		trainer.progress=false
	@echo "Frontier picture: $(DEMO)/checkpoints/demo/frontier_relative.png; runs in MLflow store mlflow.db" \
		"(experiment 'spnet', parent run 'demo'): $(VENV)/bin/spnet ui  (http://127.0.0.1:5000)"

test: $(STAMP) system-deps
	$(PY) -m pytest -q

clean:
	rm -rf outputs data mlflow.db mlruns
