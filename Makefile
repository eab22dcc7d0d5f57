# `make run`: create .venv from the lock, run the pipeline on the offline quickstart.
# `make test`: create .venv from the lock, run the whole test suite (what CI runs, with `make drift`).
# `make test-fast`: the specification tests alone, under a minute.
# `make lock`: lock what pyproject.toml asks for now, keeping every version already pinned that its range admits.
# `make lock-upgrade`: refresh requirements.lock to the newest versions pyproject.toml's ranges allow.
# `make drift`: install those newest versions in .venv-drift and run the tests on a real Prefect server with them.
# `make stack`: start the team stack on loopback (PostgreSQL, S3, Prefect server + 2 workers, MLflow) in .stack/.
# `make stack-down`: stop every process `make stack` started (by the PIDs recorded in .stack/stack.json).
PYTHON ?= python3
VENV := .venv
INSTALLED := $(VENV)/.installed
LOCK := requirements.lock
PIP_TOOLS := pip-tools==7.6.2

.PHONY: install run test test-fast lock lock-upgrade drift clean stack stack-down

install: $(INSTALLED)

# The venv is made anew from the lock, so it holds exactly the locked versions (`pip freeze` equals the lock);
# --require-hashes refuses any file whose sha256 the lock does not list.
$(INSTALLED): $(LOCK) pyproject.toml
	@echo "Installing the $$(grep -c '==' $(LOCK)) locked packages of $(LOCK) into $(VENV) (PyTorch alone is ~5 GB)"
	$(PYTHON) -m venv --clear $(VENV)
	$(VENV)/bin/python -m pip install --disable-pip-version-check --require-hashes --no-deps -r $(LOCK)
	$(VENV)/bin/python -m pip install --disable-pip-version-check --no-deps --no-build-isolation -e .
	$(VENV)/bin/python -m pip check
	touch $(INSTALLED)

run: $(INSTALLED)
	$(VENV)/bin/twostage run -c configs/quickstart.yaml

test: $(INSTALLED)
	$(VENV)/bin/python -m pytest

test-fast: $(INSTALLED)
	$(VENV)/bin/python -m pytest -m "not engine and not cli and not server and not benchmark and not stack"

PIP_COMPILE_FLAGS ?=
lock:
	$(PYTHON) -m venv --clear .venv-lock
	.venv-lock/bin/python -m pip install --disable-pip-version-check --quiet $(PIP_TOOLS)
	.venv-lock/bin/pip-compile $(PIP_COMPILE_FLAGS) --generate-hashes --allow-unsafe --all-build-deps \
		--extra test --extra stack --strip-extras --no-emit-index-url --no-emit-find-links --output-file $(LOCK) \
		pyproject.toml

lock-upgrade:
	$(MAKE) lock PIP_COMPILE_FLAGS=--upgrade

# Catches an upstream release that breaks us before a user meets it: a fresh venv with the newest releases the
# ranges allow, what differs from the lock, then the tests on a real Prefect server (served, deployed and worker
# runs: where Prefect 3.9.1 broke every served run). When nothing differs, those versions are the
# locked ones that `make test` tests, and the tests are not run twice. `make drift DRIFT_TESTS="engine or server"`
# also runs every flow test (about 14 minutes more here: too long for CI's 25).
DRIFT_TESTS ?= server
drift:
	$(PYTHON) -m venv --clear .venv-drift
	.venv-drift/bin/python -m pip install --disable-pip-version-check --upgrade --upgrade-strategy eager -e ".[test]"
	.venv-drift/bin/python .ci/drift_report.py $(LOCK) | tee .venv-drift/report.txt
	@if grep -q "^drift: 0 of" .venv-drift/report.txt; then \
		echo "drift: nothing to test beyond make test"; \
	else \
		.venv-drift/bin/python -m pytest -m "$(DRIFT_TESTS)"; \
	fi

stack: $(INSTALLED)
	$(VENV)/bin/python deploy/stack.py up

stack-down:
	$(VENV)/bin/python deploy/stack.py down

clean:
	rm -rf $(VENV) .venv-lock .venv-drift outputs data/prepared mlflow.db mlruns mlartifacts
