"""IFEval's prompts file and response files: reading, checking, and fetching the prompts.

The prompts file is the reference's ``input_data.jsonl``: one ``{"key", "prompt",
"instruction_id_list", "kwargs"}`` per line, 541 prompts. It is not shipped with the package;
``sft fetch-eval-data`` downloads it from the google-research repository at a pinned commit and
checks its sha256, so every user scores against the same bytes. Every instruction is bound to its
checker while the file is read, so a typo in an id or an argument stops the command before a
model is loaded, naming the file and line.
"""

from __future__ import annotations

import hashlib
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from sft.config import StrictArgumentParser
from sft.data.sources import DuplicateKeysObject, describe_json_type, read_source
from sft.errors import DataError, run_command
from sft.files import atomic_file
from sft.verifiers.instructions import Check, record_checks

DEFAULT_INPUT_DATA = Path("data/ifeval/input_data.jsonl")

SOURCE_COMMIT = "19638399cc9e03623c5b9087a1d6fa8813974ce9"
SOURCE_URL = (f"https://raw.githubusercontent.com/google-research/google-research/{SOURCE_COMMIT}/"
              "instruction_following_eval/data/input_data.jsonl")
SOURCE_SHA256 = "67ffeee0fcb87c317c5b08a2de85557b4a7e96ada6178aa645b4954fe4b53d49"


@dataclass(frozen=True)
class IFEvalPrompt:
    key: int
    prompt: str
    instruction_id_list: list[str]
    kwargs: list[dict]
    checks: list[Check] = field(compare=False, repr=False)
    """The checker of each instruction, bound to its arguments."""


def read_prompts(path: str | Path) -> list[IFEvalPrompt]:
    """The prompts of an ``input_data.jsonl`` file, in file order."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no IFEval prompts file here. Run `sft fetch-eval-data` (downloads "
                        f"{DEFAULT_INPUT_DATA}) or pass --input-data with a local copy of input_data.jsonl")
    prompts, seen = [], set()
    for line, record in read_source(path).items:
        where = f"{path}: line {line}"
        _require_fields(where, record, {"key": int, "prompt": str})
        checks = record_checks(where, record)
        if record["prompt"] in seen:
            raise DataError(f"{where}: the prompt repeats an earlier line's; responses are matched by prompt text")
        seen.add(record["prompt"])
        prompts.append(IFEvalPrompt(record["key"], record["prompt"], record["instruction_id_list"], record["kwargs"],
                                    checks))
    if not prompts:
        raise DataError(f"{path}: no prompts")
    return prompts


def read_responses(path: str | Path, prompts: list[IFEvalPrompt]) -> dict[str, str]:
    """Prompt text -> response, from a file of ``{"prompt", "response"}`` lines (the reference's
    response format; other fields are ignored). Each prompt must be one of ``prompts``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no responses file here; expected JSONL of {{\"prompt\": ..., \"response\": ...}}")
    known = {p.prompt for p in prompts}
    responses: dict[str, str] = {}
    for line, record in read_source(path).items:
        where = f"{path}: line {line}"
        _require_fields(where, record, {"prompt": str, "response": str})
        if record["prompt"] not in known:
            raise DataError(f"{where}: the prompt is not in the prompts file (pass the --input-data it answers)")
        if record["prompt"] in responses:
            raise DataError(f"{where}: a second response to the same prompt")
        responses[record["prompt"]] = record["response"]
    return responses


def _require_fields(where: str, record: object, fields: dict[str, type]) -> None:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {describe_json_type(record)}")
    if isinstance(record, DuplicateKeysObject):  # JSON would keep the last value without a word, as prepare refuses
        raise DataError(f"{where}: key {record.duplicate_keys[0]!r} is given twice in one object; keep one")
    for name, kind in fields.items():
        if name not in record:
            raise DataError(f"{where}: missing field {name!r}")
        if not isinstance(record[name], kind) or isinstance(record[name], bool):
            raise DataError(f"{where}: {name} must be {kind.__name__}, got {describe_json_type(record[name])}")


def fetch_prompts(out: Path, url: str = SOURCE_URL, sha256: str = SOURCE_SHA256) -> None:
    """Download the prompts file, check its sha256, and only then put it at ``out``."""
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            data = response.read()
    except (urllib.error.URLError, TimeoutError) as exc:
        raise DataError(f"could not download {url} ({getattr(exc, 'reason', exc)}). Without network, pass "
                        f"--input-data with a local copy of input_data.jsonl (sha256 {sha256})") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise DataError(f"{url}: sha256 {digest} is not the expected {sha256}; the file was not saved")
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out, "wb") as handle:
        handle.write(data)


def main(argv: list[str] | None = None) -> int:
    """`sft fetch-eval-data`: download IFEval's prompts file (checked by sha256)."""
    parser = StrictArgumentParser(prog="sft fetch-eval-data",
                                  description=f"Download IFEval's 541 prompts (input_data.jsonl) from the "
                                              f"google-research repository at commit {SOURCE_COMMIT[:12]} and "
                                              f"check their sha256.")
    parser.add_argument("--out", default=str(DEFAULT_INPUT_DATA), help="where to write it (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="download again even if the file exists")
    args = parser.parse_args(argv)
    out = Path(args.out)

    def run() -> None:
        if out.is_file() and not args.force:
            print(f"{out} already exists (pass --force to download again)")
            return
        fetch_prompts(out)
        print(f"wrote {len(read_prompts(out))} IFEval prompts to {out}")

    return run_command(run)


if __name__ == "__main__":
    raise SystemExit(main())
