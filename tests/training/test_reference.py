"""The reference log-probability cache: reused when nothing changed, recomputed when anything did."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

import sft.modeling.attention  # noqa: F401  (registers varlen_sdpa)
from sft.data.pairs import encode_pairs
from sft.training import reference as reference_module
from sft.training.preference.collate import PairCollator
from sft.training.reference import REFERENCE_FILE, cached_reference_logps, reference_identity
from tests.training.tiny_pairs import preference_records


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="varlen_sdpa",
                                                dtype=torch.float32)


@pytest.fixture()
def sft_adapter(tiny_model_dir: Path, tmp_path: Path) -> Path:
    """An SFT run's adapter directory (random weights)."""
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    torch.manual_seed(3)
    adapter = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapter.save_pretrained(tmp_path / "sft_run")
    return tmp_path / "sft_run"


def _pairs(tokenizer, max_seq_length: int = 128, system_prompt: str | None = None, n: int = 6) -> list[dict]:
    return encode_pairs(tokenizer, preference_records(n), max_seq_length, system_prompt, progress=False)[0]


class _Counting:
    """Counts how often the reference pass runs."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        compute = reference_module.compute_reference_logps

        def counted(*args, **kwargs):
            self.calls += 1
            return compute(*args, **kwargs)

        monkeypatch.setattr(reference_module, "compute_reference_logps", counted)


def test_cache_is_reused_unchanged_and_recomputed_on_any_change(model, chatml_tokenizer, tiny_model_dir: Path,
                                                                 sft_adapter: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    counting = _Counting(monkeypatch)
    out = tmp_path / "run"
    identity = reference_identity(str(tiny_model_dir), None, torch.float32)

    def run(pairs: list[dict], identity: dict = identity) -> tuple[torch.Tensor, bool]:
        results, computed = cached_reference_logps(model, {"train": pairs, "val": val}, out, identity, 4,
                                                   PairCollator(), "cpu")
        return results["train"], "train" not in computed

    val = _pairs(chatml_tokenizer, n=3)
    pairs = _pairs(chatml_tokenizer)
    first, hit = run(pairs)
    assert not hit and counting.calls == 2 and first.shape == (len(pairs), 2)  # train and val
    assert (out / REFERENCE_FILE).is_file()

    again, hit = run(_pairs(chatml_tokenizer))  # an unchanged rerun (or a resume): read back, equal
    assert hit and counting.calls == 2 and torch.equal(again, first)

    changes = {
        "data": lambda: run(_pairs(chatml_tokenizer, n=7)),
        "an answer's text": lambda: run([pairs[0] | {"chosen_ids": pairs[0]["chosen_ids"][:-1]}, *pairs[1:]]),
        "max_seq_length": lambda: run(_pairs(chatml_tokenizer, max_seq_length=100)),
        "system prompt": lambda: run(_pairs(chatml_tokenizer, system_prompt="Be brief.")),
    }
    for what, change in changes.items():
        calls = counting.calls
        _, hit = change()
        assert not hit and counting.calls == calls + 1, what  # the train split only: val is unchanged
        _, hit = run(pairs)  # the original again: its key no longer matches the file either
        assert not hit, what
    for what, other in {"SFT adapter": reference_identity(str(tiny_model_dir), str(sft_adapter), torch.float32),
                        "dtype": reference_identity(str(tiny_model_dir), None, torch.bfloat16)}.items():
        calls = counting.calls
        _, hit = run(pairs, other)
        assert not hit and counting.calls == calls + 2, what  # another reference: both splits


def test_identity_follows_the_sft_adapter_weights_and_the_base_files(tiny_model_dir: Path, sft_adapter: Path,
                                                                     tmp_path: Path) -> None:
    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    before = reference_identity(str(base), str(sft_adapter), torch.float32)
    assert reference_identity(str(base), str(sft_adapter), torch.float32) == before
    weights = sft_adapter / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    weights.write_bytes(bytes(data))
    assert reference_identity(str(base), str(sft_adapter), torch.float32)["sft_adapter_sha256"] \
        != before["sft_adapter_sha256"]
    model_file = base / "model.safetensors"  # copied with its original time; rewritten: same size, new time
    model_file.write_bytes(model_file.read_bytes())
    assert reference_identity(str(base), str(sft_adapter), torch.float32)["base"] != before["base"]


def test_an_unreadable_cache_is_recomputed(model, chatml_tokenizer, tiny_model_dir: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    counting = _Counting(monkeypatch)
    identity = reference_identity(str(tiny_model_dir), None, torch.float32)
    splits = {"train": _pairs(chatml_tokenizer)}
    first, _ = cached_reference_logps(model, splits, tmp_path, identity, 8, PairCollator(), "cpu")
    (tmp_path / REFERENCE_FILE).write_bytes(b"not a safetensors file")
    again, computed = cached_reference_logps(model, splits, tmp_path, identity, 8, PairCollator(), "cpu")
    assert computed == ["train"] and counting.calls == 2
    assert torch.allclose(again["train"], first["train"], atol=1e-5, rtol=0)


def _tamper(path: Path, change: str) -> None:
    """Rewrite the cache as someone editing it would, keeping its keys metadata."""
    with safe_open(path, framework="pt") as file:
        metadata = dict(file.metadata())
        tensors = {name: file.get_tensor(name) for name in file.keys()}  # noqa: SIM118
    if change == "+1000 on chosen":
        tensors["train"][:, 0] += 1000
    elif change == "int64 values":
        tensors["train"] = tensors["train"].round().to(torch.int64)
    elif change == "NaN":
        tensors["train"][0, 1] = float("nan")
    elif change == "a slightly changed value":
        tensors["train"][0, 0] -= 0.5
    elif change == "keys metadata []":
        metadata["keys"] = "[]"
    elif change == "no sha256 metadata (an earlier version)":
        del metadata["sha256"]
    save_file(tensors, path, metadata=metadata)


@pytest.mark.parametrize("change", ["+1000 on chosen", "int64 values", "NaN", "a slightly changed value",
                                    "keys metadata []", "no sha256 metadata (an earlier version)"])
def test_an_edited_or_poisoned_cache_is_recomputed_with_a_note_never_used(
        model, chatml_tokenizer, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        change: str) -> None:
    counting = _Counting(monkeypatch)
    identity = reference_identity(str(tiny_model_dir), None, torch.float32)
    splits = {"train": _pairs(chatml_tokenizer)}
    notes: list[str] = []
    first, _ = cached_reference_logps(model, splits, tmp_path, identity, 8, PairCollator(), "cpu", notes.append)
    assert notes == []
    _tamper(tmp_path / REFERENCE_FILE, change)
    again, computed = cached_reference_logps(model, splits, tmp_path, identity, 8, PairCollator(), "cpu",
                                             notes.append)
    assert computed == ["train"] and counting.calls == 2
    assert torch.allclose(again["train"], first["train"], atol=1e-5, rtol=0)
    assert len(notes) == 1 and str(tmp_path / REFERENCE_FILE) in notes[0] and "recomputing" in notes[0]
    # the rewritten cache is intact again: read back without a note
    _, computed = cached_reference_logps(model, splits, tmp_path, identity, 8, PairCollator(), "cpu", notes.append)
    assert computed == [] and len(notes) == 1
