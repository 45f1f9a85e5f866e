"""Configuration YAML that would expand without bound or cannot name a field: one error line,
for a preset and for the sft_config.yaml of a run directory someone hands over."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from sft.config import RUN_CONFIG_FILE, ConfigError, build_config
from sft.inference.chat import main as chat_main
from tests.reliability.helpers import assert_user_error


def alias_bomb(levels: int = 8) -> str:
    """Under 1 KB of YAML whose value expands to 9 ** levels strings."""
    anchors = ["&a0 [x, x, x, x, x, x, x, x, x]"]
    anchors += [f"&a{n} [{', '.join([f'*a{n - 1}'] * 9)}]" for n in range(1, levels)]
    return f"[{', '.join(anchors)}]"


@pytest.mark.parametrize("section, key", [("lora", "target_modules"), ("training", "output_dir"),
                                          ("data", "system_prompt")])
def test_an_alias_bomb_is_refused_quickly_in_one_short_line(tmp_path: Path, section: str, key: str) -> None:
    config = tmp_path / "bomb.yaml"
    config.write_text(f"{section}:\n  {key}: {alias_bomb()}\n")
    assert config.stat().st_size < 1000
    started = time.monotonic()
    with pytest.raises(ConfigError) as error:
        build_config(config)
    assert time.monotonic() - started < 5
    message = str(error.value)
    assert "expands to more than" in message and str(config) in message and len(message) < 500


def test_an_alias_bomb_in_a_handed_over_run_directory_is_refused(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    (tmp_path / RUN_CONFIG_FILE).write_text(f"lora:\n  target_modules: {alias_bomb()}\n")
    status = chat_main(["--adapter", str(tmp_path), "--prompt", "hi"])
    line = assert_user_error(status, capsys.readouterr().err, str(tmp_path / RUN_CONFIG_FILE), "expands to more than")
    assert len(line) < 500


def test_a_key_that_is_a_list_is_refused_naming_the_line(tmp_path: Path) -> None:
    config = tmp_path / "odd.yaml"
    config.write_text("training:\n  max_steps: 2\n  ? [a, b]\n  : 1\n")
    with pytest.raises(ConfigError, match=r"odd.yaml: not valid YAML at line 3, column 5: a key must be a plain "
                                          r"name, got a list"):
        build_config(config)


def test_a_small_shared_value_is_still_read(tmp_path: Path) -> None:
    config = tmp_path / "shared.yaml"
    config.write_text("lora:\n  target_modules: &modules [q_proj, v_proj]\n"
                      "training:\n  output_dir: runs/x\n")
    assert build_config(config).lora.target_modules == ["q_proj", "v_proj"]
