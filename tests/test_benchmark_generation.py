"""benchmarks/generation.py in sampled mode, on the tiny model: a row for every contender at every
batch size, and every answer run to exactly --max-new-tokens (the default when sampling)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from unittest import mock

from tests.tiny import write_jsonl

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "generation.py"


def _benchmark() -> ModuleType:
    """The benchmark as a module (benchmarks/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("_generation_benchmark", BENCHMARK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sampled_mode_times_every_contender_on_full_length_answers(tiny_model_dir: Path, tmp_path: Path) -> None:
    prompts = write_jsonl(tmp_path / "input_data.jsonl", [
        {"key": 1, "prompt": "Write a short note about the moon.", "instruction_id_list": ["punctuation:no_comma"],
         "kwargs": [{}]},
        {"key": 2, "prompt": "Name three colours.", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]},
    ])
    out, max_new_tokens, batch_sizes = tmp_path / "generation.json", 6, [1, 2]
    argv = [str(BENCHMARK), "--model", str(tiny_model_dir), "--input-data", str(prompts), "--device", "cpu",
            "--sampling", "--max-new-tokens", str(max_new_tokens), "--batch-sizes", *map(str, batch_sizes),
            "--out", str(out)]
    with mock.patch.object(sys, "argv", argv):
        _benchmark().main()

    written = json.loads(out.read_text(encoding="utf-8"))
    assert written["full_length"] is True
    assert written["sampling"] == {"temperature": 0.8, "top_p": 0.95, "top_k": 0, "seed": 0}
    assert set(written["machine"]["cpu_flags"]) <= {"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile",
                                                    "amx_bf16", "avx512_fp16"}
    rows = {(r["contender"], r["batch_size"]): r for r in written["results"]}
    assert set(rows) == {(name, size) for name in ("sft", "sft-row-major", "sft-padded-prompts", "sft-bf16",
                                                   "hf-generate") for size in batch_sizes}
    for row in rows.values():
        assert row["answers"] == 2
        assert row["new_tokens"] == 2 * max_new_tokens  # no answer is longer, so each is exactly this long
        assert row["new_tokens_per_s"] > 0 and row["answers_per_s"] > 0
        assert row["vs_hf_generate"] > 0
    assert written["sft_over_hf_generate"] == {str(size): rows[("sft", size)]["vs_hf_generate"]
                                               for size in batch_sizes}
    for size in batch_sizes:
        assert rows[("hf-generate", size)]["vs_hf_generate"] == 1
        assert 0 <= rows[("sft-bf16", size)]["equal_to_float32"] <= 2
        assert rows[("sft-row-major", size)]["equal_to_float32"] == 2  # the layout changes no draw here
        assert rows[("sft-padded-prompts", size)]["equal_to_float32"] == 2  # nor does packing the prompt pass
