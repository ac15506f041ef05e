# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# A CPU build of torch where no GPU is needed; on a CUDA machine pip picks the matching wheel.
TORCH  ?= torch==2.13.0

.PHONY: venv demo test lint bench-cpu clean

$(BIN)/flexpatch: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	@touch $@

venv: $(BIN)/flexpatch

demo: venv
	$(BIN)/flexpatch demo demo_out

test: venv
	$(BIN)/python -m pytest -q -n 2

lint: venv
	$(BIN)/ruff check src tests benchmarks

bench-cpu: venv
	$(BIN)/python benchmarks/sliding_window.py --device cpu

clean:
	rm -rf $(VENV) demo_out .pytest_cache
