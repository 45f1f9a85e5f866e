"""`sft plot DIR`: the training and validation loss of a run against the optimizer step.

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


def plot_losses(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw train and validation loss of a run into an image (PNG by default); returns its path."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    out = Path(out) if out else run_dir / PLOT_FILE
    image_format = _image_format(out)
    history = _read_history(_state_file(run_dir))
    train = [(entry["step"], entry["loss"]) for entry in history if "loss" in entry]
    val = [(entry["step"], entry["eval_loss"]) for entry in history if "eval_loss" in entry]
    figure, axes = plt.subplots(figsize=(7, 4), dpi=120)
    if train:
        axes.plot(*zip(*train), label="train", color="tab:blue", linewidth=1.2)
    if val:
        axes.plot(*zip(*val), label="validation", color="tab:orange", marker="o", linewidth=1.5)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss (nats per answer token)")
    axes.set_title(f"{run_dir.name}: training and validation loss")
    axes.grid(alpha=0.3)
    axes.legend()
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
