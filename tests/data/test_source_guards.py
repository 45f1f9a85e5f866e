"""Sources that would exhaust memory or never end, and file names that are not UTF-8."""

from __future__ import annotations

import gzip
import json
import os
import threading
import tracemalloc
from pathlib import Path

import pytest

import sft.data.sources
from sft.data.prepare import main as prepare_main
from sft.data.prepared import read_conversations
from sft.data.sources import read_source
from sft.errors import DataError
from tests.tiny import alpaca_records, write_jsonl


def test_a_gzip_bomb_is_refused_before_it_is_inflated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sft.data.sources, "MAX_DECOMPRESSED_BYTES", 8 << 20)
    bomb = tmp_path / "bomb.jsonl.gz"
    bomb.write_bytes(gzip.compress(b"\n" * (200 << 20), compresslevel=9))  # 200 MiB of newlines, ~200 KB
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match=r"bomb.jsonl.gz: decompresses to more than 8 MiB"):
            read_source(bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20


def test_gzip_sources_still_read_whole_and_in_several_members(tmp_path: Path) -> None:
    records = alpaca_records(4)
    text = "".join(json.dumps(record) + "\n" for record in records).encode()
    source = tmp_path / "two.jsonl.gz"
    source.write_bytes(gzip.compress(text[:100]) + gzip.compress(text[100:]))
    assert [item for _, item in read_source(source).items] == records


def test_blank_lines_cost_no_memory_per_line(tmp_path: Path) -> None:
    source = tmp_path / "blank.jsonl"
    source.write_bytes(b"\n" * (20 << 20) + b'{"instruction": "a", "output": "b"}\n')
    tracemalloc.start()
    try:
        items = read_source(source).items
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert items == [((20 << 20) + 1, {"instruction": "a", "output": "b"})]
    assert peak < 3 * (20 << 20)  # the bytes and their text, not a pointer per line


@pytest.mark.parametrize("kind", ["device", "fifo"])
def test_a_device_or_fifo_is_refused_as_a_source(tmp_path: Path, kind: str) -> None:
    if kind == "device":
        path = Path("/dev/zero")
    else:
        path = tmp_path / "pipe.jsonl"
        os.mkfifo(path)
    result: list[BaseException] = []
    reader = threading.Thread(target=lambda: result.append(pytest.raises(DataError, read_source, path).value),
                              daemon=True)
    reader.start()
    reader.join(10)
    assert not reader.is_alive(), f"reading {path} did not return"
    assert "is not a regular file" in str(result[0])


def test_a_source_whose_name_is_not_utf8_prepares_files_train_accepts(tmp_path: Path) -> None:
    name = os.fsdecode(b"caf\xe9.jsonl")  # Latin-1 bytes in a UTF-8 world
    write_jsonl(tmp_path / name, alpaca_records(20))
    assert prepare_main(["--source", str(tmp_path / name), "--out-dir", str(tmp_path / "out")]) == 0
    conversations = read_conversations(tmp_path / "out" / "sft_train.jsonl")
    assert conversations and {c["source"] for c in conversations} == {str(tmp_path) + "/caf\\xe9.jsonl"}


@pytest.mark.parametrize("kind", ["device", "fifo"])
def test_a_device_or_fifo_is_refused_as_a_prepared_file(tmp_path: Path, kind: str) -> None:
    path = Path("/dev/zero") if kind == "device" else tmp_path / "pipe.jsonl"
    if kind == "fifo":
        os.mkfifo(path)
    with pytest.raises(DataError, match="is not a regular file"):
        read_conversations(path)


def test_a_prepared_file_of_blank_lines_costs_no_memory_per_line(tmp_path: Path) -> None:
    path = tmp_path / "sft_train.jsonl"
    record = {"id": "a", "source": None, "messages": [{"role": "user", "content": "Hi"},
                                                      {"role": "assistant", "content": "Hello."}]}
    path.write_bytes(b"\n" * (20 << 20) + json.dumps(record).encode() + b"\n")
    tracemalloc.start()
    try:
        assert read_conversations(path) == [record]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3 * (20 << 20)
