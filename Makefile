# Two commands for a newcomer: `make demo` and `make test` (and `make lint`). All set everything up first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.stamp-setup

.PHONY: setup demo test lint bench clean

setup: $(STAMP)

# Pinned install (ENVIRONMENT.md §8): torch from the local CPU wheel, torchvision 0.28.0 without its deps
# (the +cu130 build; sysu30k.io.compat guards its ops), then Pillow-SIMD last so nothing puts Pillow back
# (reinstalled by force: on a rerun, removing a stock Pillow that a dependency pulled in also removes PIL/).
$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps torchvision==0.28.0
	$(BIN)/pip uninstall -y -q pillow || true
	CC="cc -mavx2" $(BIN)/pip install -q --no-deps --force-reinstall pillow-simd==12.1.1.post0
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	$(BIN)/python -c "import PIL; assert 'post' in PIL.__version__, 'Pillow-SIMD did not install: ' + PIL.__version__"
	touch $(STAMP)

demo: setup
	PATH="$(abspath $(BIN)):$$PATH" bash pipelines/demo.sh

test: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider

lint: setup
	$(BIN)/ruff check .

bench: setup
	PATH="$(abspath $(BIN)):$$PATH" bash benchmarks/run_all.sh

clean:
	rm -rf demo-out bench-out
