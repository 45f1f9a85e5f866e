"""`sft plot DIR`: the training and validation loss of a run against the optimizer step (and,
beside it, a DPO run's rewards, or a GRPO run's mean reward and pass rate).

Training writes ``loss.png`` into its output directory at the end; this command redraws it from
``trainer_state.json`` at any time (also for a run still in progress, from its latest checkpoint).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from sft.config import StrictArgumentParser
from sft.errors import ConfigError, DataError, run_command
from sft.files import atomic_file
from sft.training.checkpoints import latest_complete_checkpoint

PLOT_FILE = "loss.png"


def _state_file(run_dir: Path) -> Path:
    """trainer_state.json of a finished run (or of a checkpoint-N given itself), else of the run's
    latest complete checkpoint."""
    if not run_dir.is_dir():
        raise DataError(f"{run_dir}: no such directory; pass a training output directory")
    if (run_dir / "trainer_state.json").is_file():
        return run_dir / "trainer_state.json"
    checkpoint = latest_complete_checkpoint(run_dir)
    if checkpoint is None:
        raise DataError(f"{run_dir}: no trainer_state.json and no complete checkpoint-N/ in it; pass a training "
                        f"output directory (--output-dir of the run) or one of its checkpoints")
    return checkpoint / "trainer_state.json"


def _read_history(state_file: Path) -> list[dict[str, Any]]:
    """The log_history of a trainer state, or a DataError naming the file and what is wrong."""
    try:
        state = json.loads(state_file.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise DataError(f"{state_file}: not UTF-8 text (byte {exc.start}); it is not a trainer state") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{state_file}: invalid JSON at line {exc.lineno}, column {exc.colno} ({exc.msg}); "
                        f"the file is damaged") from None
    history = state.get("log_history") if isinstance(state, dict) else None
    if not isinstance(history, list) or not all(isinstance(entry, dict) and "step" in entry for entry in history):
        raise DataError(f"{state_file}: not a trainer state (expected an object whose log_history is a list of "
                        f"entries with a step)")
    return history


def _image_format(out: Path) -> str:
    """The image type of ``out`` from its suffix, which matplotlib must be able to write."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    supported = sorted(FigureCanvasAgg.get_supported_filetypes())
    image_format = out.suffix.lower().removeprefix(".")
    if image_format not in supported:
        raise ConfigError(f"--out {out}: not an image file name; end it in one of "
                          f"{', '.join('.' + name for name in supported)} (e.g. loss.png)")
    return image_format


_REWARD_SERIES = {"rewards/chosen": "tab:green", "rewards/rejected": "tab:red", "rewards/margins": "tab:purple",
                  "rewards/accuracies": "tab:gray"}
"""A DPO run's logged rewards (beta x log-probability ratio to the reference) and their colours."""


def _plot_rewards(axes: Any, series: dict[str, list[tuple[int, float]]]) -> None:
    """Rewards of the chosen and rejected answers and their margin; reward accuracy on its own scale."""
    for key, colour in _REWARD_SERIES.items():
        if key != "rewards/accuracies" and series[key]:
            axes.plot(*zip(*series[key], strict=True), label=key.removeprefix("rewards/"), color=colour, linewidth=1.2)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("reward (beta x log-ratio to the reference)")
    axes.set_title("training rewards")
    axes.grid(alpha=0.3)
    accuracy = axes.twinx()
    accuracy.plot(*zip(*series["rewards/accuracies"], strict=True), label="accuracy",
                  color=_REWARD_SERIES["rewards/accuracies"], linestyle="--", linewidth=1.0)
    accuracy.set_ylim(-0.05, 1.05)
    accuracy.set_ylabel("reward accuracy")
    lines, labels = axes.get_legend_handles_labels()
    more_lines, more_labels = accuracy.get_legend_handles_labels()
    axes.legend(lines + more_lines, labels + more_labels, loc="upper left")


_ONLINE_SERIES = {"reward": "tab:green", "pass_rate": "tab:gray"}
"""A GRPO run's logged mean reward of its sampled answers and their pass rate (with the verifier)."""


def _plot_online_rewards(axes: Any, series: dict[str, list[tuple[int, float]]]) -> None:
    """The sampled answers' mean reward; their pass rate on its own scale."""
    axes.plot(*zip(*series["reward"], strict=True), label="reward", color=_ONLINE_SERIES["reward"], linewidth=1.2)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("mean reward of the sampled answers")
    axes.set_title("training rewards")
    axes.grid(alpha=0.3)
    lines, labels = axes.get_legend_handles_labels()
    if series["pass_rate"]:
        rate = axes.twinx()
        rate.plot(*zip(*series["pass_rate"], strict=True), label="pass rate", color=_ONLINE_SERIES["pass_rate"],
                  linestyle="--", linewidth=1.0)
        rate.set_ylim(-0.05, 1.05)
        rate.set_ylabel("answers following all instructions")
        more_lines, more_labels = rate.get_legend_handles_labels()
        lines, labels = lines + more_lines, labels + more_labels
    axes.legend(lines, labels, loc="upper left")


def plot_losses(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw train and validation loss of a run into an image (PNG by default), beside its
    rewards for a DPO run; returns its path."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    out = Path(out) if out else run_dir / PLOT_FILE
    image_format = _image_format(out)
    state_file = _state_file(run_dir)
    history = _read_history(state_file)
    series = {key: [(entry["step"], entry[key]) for entry in history if key in entry]
              for key in ("loss", "eval_loss", *_REWARD_SERIES, *_ONLINE_SERIES)}
    if not any(series.values()):
        raise DataError(f"{state_file}: no loss logged yet ({len(history)} log entries, none with a loss or reward); "
                        f"nothing to plot. Training logs every --logging-steps steps: plot again after the first log")
    preference = bool(series["rewards/margins"])  # a DPO run: its rewards get a panel of their own
    online = bool(series["reward"])  # a GRPO run: so do its sampled answers' rewards
    figure, panels = plt.subplots(1, 2 if preference or online else 1, figsize=(12 if preference or online else 7, 4),
                                  dpi=120, squeeze=False)
    axes = panels[0][0]
    if series["loss"]:
        axes.plot(*zip(*series["loss"], strict=True), label="train", color="tab:blue", linewidth=1.2)
    if series["eval_loss"]:
        axes.plot(*zip(*series["eval_loss"], strict=True), label="validation", color="tab:orange", marker="o",
                  linewidth=1.5)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("DPO loss (mean over pairs)" if preference else
                    "GRPO loss (per answer token)" if online else "loss (nats per answer token)")
    axes.set_title(f"{run_dir.name}: training and validation loss")
    axes.grid(alpha=0.3)
    axes.legend()
    if preference:
        _plot_rewards(panels[0][1], series)
    elif online:
        _plot_online_rewards(panels[0][1], series)
    figure.tight_layout()
    try:
        with atomic_file(out, "wb") as handle:
            figure.savefig(handle, format=image_format)
    finally:
        plt.close(figure)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = StrictArgumentParser(prog="sft plot", description=__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a training output directory (holding trainer_state.json)")
    parser.add_argument("--out", help=f"image file to write, .png, .pdf, .svg, ... (default: RUN_DIR/{PLOT_FILE})")
    args = parser.parse_args(argv)
    return run_command(lambda: print(f"wrote {plot_losses(args.run_dir, args.out)}"))


if __name__ == "__main__":
    raise SystemExit(main())
