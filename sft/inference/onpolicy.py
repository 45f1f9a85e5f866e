"""`sft onpolicy-pairs`: preference pairs from an SFT run's own answers.

For every conversation of a prepared SFT file, the run's model (base + adapter) answers the
prompt (everything before the last assistant turn) greedily; the pair's chosen answer is the
conversation's reference answer and its rejected answer is the model's own. DPO on such pairs
pushes the model away from what it actually says towards the reference (on-policy data, where
the rejected side is the policy's own output rather than some other model's). A conversation
whose greedy answer equals its reference, or that does not finish within ``--max-new-tokens``
when ``--finished-only`` is given, gives no pair.

The output is a prepared preference file, ``{"id", "source", "prompt", "chosen", "rejected"}``
per line, ready for ``sft dpo --train-file`` (split it with ``sft prepare-preferences`` for a
validation set).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from sft.config import StrictArgumentParser
from sft.data.prepared import read_conversations
from sft.data.templates import end_of_turn_ids, with_system_prompt
from sft.data.tokenize import generation_prompt
from sft.errors import ConfigError, run_command
from sft.files import atomic_write_text
from sft.inference.loading import LoadedRun, check_adapter_dir, load_run, run_config
from sft.modeling.generate import generate_greedy
from sft.outputs import check_output, writing_into

SOURCE = "on-policy"


def onpolicy_pairs(run: LoadedRun, conversations: list[dict[str, Any]], max_new_tokens: int,
                   finished_only: bool = False) -> tuple[list[dict[str, Any]], int]:
    """The pairs (reference answer chosen, the model's greedy answer rejected) of the conversations,
    and how many conversations were passed over because their prompt leaves the model fewer than
    ``max_new_tokens`` positions (an answer generated past them would be garbage)."""
    system_prompt = run.config.data.system_prompt
    tokenizer = run.tokenizer
    kept, prompt_ids = [], []
    for conversation in conversations:
        prompt = conversation["messages"][:-1]
        ids = generation_prompt(tokenizer, with_system_prompt(prompt, system_prompt), run.max_positions)
        if run.max_positions is None or len(ids) + max_new_tokens <= run.max_positions:
            kept.append((conversation, prompt))
            prompt_ids.append(ids)
    answers = generate_greedy(run.model, tokenizer, prompt_ids, max_new_tokens, end_of_turn_ids(tokenizer),
                              batch_size=run.config.training.eval_batch_size)
    pairs = []
    for (conversation, prompt), answer in zip(kept, answers, strict=True):
        reference = conversation["messages"][-1]["content"]
        if answer.text != reference.strip() and (answer.finished or not finished_only):
            pairs.append({"id": conversation["id"], "source": SOURCE, "prompt": prompt, "chosen": reference,
                          "rejected": answer.text})
    return pairs, len(conversations) - len(kept)


def main(argv: list[str] | None = None) -> int:
    parser = StrictArgumentParser(prog="sft onpolicy-pairs", description=__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", required=True, metavar="DIR", help="the SFT run (or checkpoint-N) that answers")
    parser.add_argument("--source", required=True, metavar="JSONL", help="a prepared SFT file (sft_train.jsonl, ...)")
    parser.add_argument("--out", required=True, metavar="JSONL", help="the preference file to write")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="longest answer generated (default 256)")
    parser.add_argument("--limit", type=int, default=0, help="use the first N conversations only (default: all)")
    parser.add_argument("--finished-only", action="store_true",
                        help="keep only pairs whose generated answer ended its turn within --max-new-tokens")
    parser.add_argument("--force", action="store_true",
                        help="replace an existing --out file that sft did not write (default: refuse)")
    args = parser.parse_args(argv)

    def run() -> None:
        if args.max_new_tokens < 1 or args.limit < 0:
            raise ConfigError("--max-new-tokens must be >= 1 and --limit >= 0")
        adapter_dir = Path(args.adapter)
        check_adapter_dir(adapter_dir)
        out = Path(args.out)
        inputs = [args.source, *(path for path in adapter_dir.iterdir() if path.is_file())]
        check_output(out, inputs, args.force)
        conversations = read_conversations(args.source)
        conversations = conversations[:args.limit] if args.limit else conversations
        run = load_run(adapter_dir, run_config(adapter_dir))
        pairs, too_long = onpolicy_pairs(run, conversations, args.max_new_tokens, args.finished_only)
        with writing_into(out.parent, [out.name], inputs, args.force):
            atomic_write_text(out, "".join(json.dumps(pair, ensure_ascii=False) + "\n" for pair in pairs))
        print(f"wrote {len(pairs)} pairs to {args.out} ({len(conversations) - len(pairs)} of {len(conversations)} "
              f"conversations gave none: the model's answer was the reference, or unfinished with --finished-only"
              + (f"; {too_long} passed over: their prompt leaves fewer than --max-new-tokens {args.max_new_tokens} "
                 f"of the model's {run.max_positions} positions" if too_long else "") + ")")

    return run_command(run)


if __name__ == "__main__":
    raise SystemExit(main())
