"""`sft plot DIR`: the training and validation loss of a run against the optimizer step.

Training writes ``loss.png`` into its output directory at the end; this command redraws it from
``trainer_state.json`` at any time (also for a run still in progress, from its latest checkpoint).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sft.config import StrictArgumentParser
from sft.training.checkpoints import latest_complete_checkpoint

PLOT_FILE = "loss.png"


def _state_file(run_dir: Path) -> Path:
    """trainer_state.json of a finished run, else of its latest complete checkpoint."""
    if (run_dir / "trainer_state.json").is_file():
        return run_dir / "trainer_state.json"
    checkpoint = latest_complete_checkpoint(run_dir)
    if checkpoint is None:
        raise FileNotFoundError(f"{run_dir}: no trainer_state.json (is this a training output directory?)")
    return checkpoint / "trainer_state.json"


def plot_losses(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw train and validation loss of a run into a PNG; returns its path."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    history = json.loads(_state_file(run_dir).read_text(encoding="utf-8"))["log_history"]
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
    out = Path(out) if out else run_dir / PLOT_FILE
    figure.savefig(out)
    plt.close(figure)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = StrictArgumentParser(prog="sft plot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a training output directory (holding trainer_state.json)")
    parser.add_argument("--out", help=f"PNG file to write (default: RUN_DIR/{PLOT_FILE})")
    args = parser.parse_args(argv)
    try:
        print(f"wrote {plot_losses(args.run_dir, args.out)}")
    except (FileNotFoundError, json.JSONDecodeError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
