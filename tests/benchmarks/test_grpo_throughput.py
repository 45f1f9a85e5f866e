"""benchmarks/grpo_throughput.py end to end on the tiny model: both trainers run and measure the same thing."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tiny import write_prepared_split

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "grpo_throughput.py"

pytestmark = pytest.mark.skipif(importlib.util.find_spec("trl") is None,
                                reason="TRL is the peer measured (pip install trl==1.16.0)")


def test_quick_run_measures_sft_and_trl_on_equal_settings(tiny_model_dir: Path, tmp_path: Path) -> None:
    """One warm-up and one timed step each, in a subprocess as a user runs it; the prompts are
    drawn from a prepared file by `sft constraints`' code."""
    source, _ = write_prepared_split(tmp_path / "data", n_train=16, n_val=1)
    out = tmp_path / "grpo.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--model", str(tiny_model_dir),
                           "--source", str(source), "--contenders", "sft,trl", "--steps", "1", "--rounds", "1",
                           "--out", str(out)], capture_output=True, text=True, env=env, cwd=tmp_path, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text(encoding="utf-8"))
    results = {r["contender"]: r for r in report["results"]}
    assert sorted(results) == ["sft", "trl"]
    for result in results.values():
        assert result["steps_per_s"] > 0 and result["sampled_tokens_per_s"] > 0
        assert result["steps_timed"] == 1 and len(result["step_seconds"]) == 2  # the warm-up step is not counted
        assert result["answer_tokens"] == [16.0, 16.0]  # every answer runs to exactly --answer-tokens
        assert len(result["rewards"]) == 2 and all(0.0 <= reward <= 1.0 for reward in result["rewards"])
        assert result["peak_rss_gb"] > 0
    shared = ("group_size", "prompts_per_step", "answers_per_micro_batch", "answer_tokens", "lora", "learning_rate",
              "beta", "loss", "temperature", "top_p", "generation_batch_size")
    assert {key: results["sft"]["settings"][key] for key in shared} == \
        {key: results["trl"]["settings"][key] for key in shared}
    assert results["sft"]["settings"]["lora"]["r"] == 16 and results["sft"]["settings"]["group_size"] == 4
    assert results["trl"]["same_prompt_tokens"] is True
    assert report["settings"]["quick"] and report["versions"]["trl"]
    assert "| sft |" in report["table"] and "| trl |" in report["table"]
    assert report["prompts"]["used"] == 4  # 2 prompts x 2 steps
