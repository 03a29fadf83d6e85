# The two set-up commands of the README: `make demo` (main job) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO := .cache/demo

.PHONY: demo test venv clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -e '.[test]'
	touch $@

venv: $(BIN)/.installed

$(DEMO)/latest: | $(BIN)/.installed
	$(BIN)/glm init-tiny $(DEMO) --preset glm-small

demo: $(BIN)/.installed $(DEMO)/latest
	$(BIN)/glm generate --checkpoint $(DEMO) --max-new-tokens 24 \
	    --prompt "The capital of the country is [MASK], a city by the river."

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .cache
