# `make run`: create .venv, install, run the pipeline on the offline quickstart.
# `make test`: create .venv, install, run the whole test suite (what CI runs).
PYTHON ?= python3
VENV := .venv
INSTALLED := $(VENV)/.installed

.PHONY: install run test clean

install: $(INSTALLED)

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check -e ".[test]"
	touch $(INSTALLED)

run: $(INSTALLED)
	$(VENV)/bin/twostage run -c configs/quickstart.yaml

test: $(INSTALLED)
	$(VENV)/bin/python -m pytest

clean:
	rm -rf $(VENV) outputs data/prepared mlflow.db mlartifacts
