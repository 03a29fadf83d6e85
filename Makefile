# The two set-up commands of the README: `make demo` (main job) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test venv clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -e '.[test,local,cuda]'
	touch $@

venv: $(BIN)/.installed

# glm serve: gateway on 127.0.0.1:50051 + scheduler + worker pool + private Redis, with the
# demo model created on first use; it makes one client call, then serves until Ctrl-C.
demo: $(BIN)/.installed
	$(BIN)/glm serve

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .cache
