"""The docs are checked like code: README.md and docs/*.md.

- every relative link resolves, and every #anchor matches a heading slug as GitHub makes it;
- every command in a ```bash / ```sh / ```console block is parsed by the real argument parser of
  the command it names (`sft <command>`, `python -m sft.X`, `python scripts/X.py`, `python
  benchmarks/X.py`, and the command a `torchrun` / `accelerate launch` wraps), and where that
  parser holds a run's configuration the configuration is built and validated too, as a dry run:
  parsing stops before the command does any work, and no model is loaded;
- `make X` names a target of the Makefile; any other program must be on ALLOWED_PROGRAMS;
- repository paths in commands (configs/, scripts/, benchmarks/, tests/, sft/) exist;
- docs/architecture.md lists every module of sft/, and nothing else;
- README.md stays within MAX_README_LINES.

A failure names the doc file, the line and the command.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import importlib.util
import io
import re
import shlex
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MAX_README_LINES = 250
SHELL_LANGUAGES = {"bash", "sh", "shell", "console"}
PYTHONS = {"python", "python3", ".venv/bin/python", ".venv/bin/python3"}
ALLOWED_PROGRAMS = {"pip", "source", "cp", "cat", "ollama", "llama-cli", "apt-get"}
"""Programs of other projects that the docs show as they are (Ollama, llama.cpp, the shell)."""
ALLOWED_PYTHON_MODULES = {"pytest"}
REPO_DIRS = ("configs/", "scripts/", "benchmarks/", "tests/", "sft/")
SHELL_OPERATORS = {"&&", "||", ";", "|", "&"}
REDIRECTIONS = {">", ">>", "<"}


# --- reading markdown ------------------------------------------------------------------------

@dataclass
class Block:
    language: str
    first_line: int
    """Line number (1-based) of the block's first content line."""
    lines: list[str]


def fenced_blocks(text: str) -> list[Block]:
    """The fenced code blocks of a markdown text, with their language."""
    blocks: list[Block] = []
    current: Block | None = None
    for number, line in enumerate(text.splitlines(), 1):
        fence = re.match(r"^\s*```\s*([\w-]*)", line)
        if fence and current is None:
            current = Block(fence.group(1).lower(), number + 1, [])
        elif fence:
            blocks.append(current)
            current = None
        elif current is not None:
            current.lines.append(line)
    return blocks


def prose_lines(text: str) -> Iterator[tuple[int, str]]:
    """(line number, line) of the lines outside fenced code blocks."""
    in_fence = False
    for number, line in enumerate(text.splitlines(), 1):
        if re.match(r"^\s*```", line):
            in_fence = not in_fence
        elif not in_fence:
            yield number, line


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: its text lowercased, punctuation but - and _ dropped,
    spaces as hyphens (github-slugger's rule)."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())  # a link's text
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every heading anchor of a markdown text, repeated headings numbered -1, -2 as GitHub does."""
    seen: dict[str, int] = {}
    result = set()
    for _, line in prose_lines(text):
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line.replace("`", ""))
        if heading:
            slug = github_slug(heading.group(1))
            result.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
            seen[slug] = seen.get(slug, 0) + 1
    return result


def links(text: str) -> Iterator[tuple[int, str]]:
    """(line number, target) of every markdown link outside code."""
    for number, line in prose_lines(text):
        for target in re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", re.sub(r"`[^`]*`", "", line)):
            yield number, target


def shown(path: Path) -> str:
    """A path as a failure names it: relative to the repository where it is inside it."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def link_error(doc: Path, target: str) -> str | None:
    """Why a link of ``doc`` does not resolve, or None: external links are not followed."""
    if re.match(r"^[a-z][a-z0-9+.-]*:", target):
        return None
    path_part, _, anchor = target.partition("#")
    path = (doc.parent / path_part).resolve() if path_part else doc
    if not path.exists():
        return f"no file {path_part}"
    if anchor and path.suffix == ".md" and anchor not in anchors(path.read_text(encoding="utf-8")):
        return f"no heading with anchor #{anchor} in {shown(path)}"
    return None


# --- reading shell blocks -----------------------------------------------------------------------

def shell_lines(block: Block) -> Iterator[tuple[int, str]]:
    """(line number, command line) of a shell block, continuations joined; in a console block
    only the lines after a `$ ` prompt are commands."""
    pending, start = "", 0
    for offset, line in enumerate(block.lines):
        if not pending:
            start = block.first_line + offset
            if block.language == "console":
                if not line.startswith("$ "):
                    continue
                line = line[2:]
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        command = (pending + line).strip()
        pending = ""
        if command and not command.startswith("#"):
            yield start, command


def simple_commands(command_line: str) -> list[list[str]]:
    """The words of each simple command of a line: comments, operators, redirections and leading
    NAME=value assignments taken off."""
    lexer = shlex.shlex(command_line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    tokens = list(lexer)
    while tokens:
        token = tokens.pop(0)
        if token in SHELL_OPERATORS:
            commands.append([])
        elif token in REDIRECTIONS:
            tokens[:1] = []
        elif commands[-1] or not re.match(r"^[A-Za-z_]\w*=", token):
            commands[-1].append(token)
    return [words for words in commands if words]


# --- running a command's parser without running the command --------------------------------

class _Parsed(Exception):
    def __init__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace) -> None:
        super().__init__()
        self.parser, self.namespace = parser, namespace


def _parser_classes() -> list[type]:
    """ArgumentParser and every loaded subclass that defines its own parse_args."""
    found, todo = [argparse.ArgumentParser], [argparse.ArgumentParser]
    while todo:
        for sub in todo.pop().__subclasses__():
            todo.append(sub)
            if "parse_args" in vars(sub):
                found.append(sub)
    return found


Parsed = tuple[argparse.ArgumentParser, argparse.Namespace]


def parse_only(main: Callable[[list[str]], object], argv: list[str]) -> Parsed | str | None:
    """Run ``main(argv)`` up to its first parse_args: (parser, namespace) when it parsed, None
    when it printed help and exited 0, the parser's error message when it refused the flags."""
    def capturing(original: Callable) -> Callable:
        def parse_args(self, args=None, namespace=None):
            raise _Parsed(self, original(self, args, namespace))
        return parse_args

    with contextlib.ExitStack() as stack:
        for cls in _parser_classes():
            stack.enter_context(mock.patch.object(cls, "parse_args", capturing(vars(cls)["parse_args"])))
        err = io.StringIO()
        stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
        stack.enter_context(contextlib.redirect_stderr(err))
        try:
            main(argv)
        except _Parsed as parsed:
            return parsed.parser, parsed.namespace
        except SystemExit as exit_:
            if exit_.code in (0, None):
                return None
            return " ".join(err.getvalue().split()) or f"exit status {exit_.code}"
    return "the command ran without parsing its flags (nothing to check)"


def config_error(parser: argparse.ArgumentParser, namespace: argparse.Namespace) -> str | None:
    """Build and validate the run's configuration the parser holds, if it holds one."""
    from sft.config import CONFIG_CLASSES, ConfigError, config_from_args
    from sft.config.build import fields_of

    dests = {action.dest for action in parser._actions}
    if "config" not in dests:
        return None
    fitting = [cls for cls in CONFIG_CLASSES if set(fields_of(cls)) <= dests]
    if not fitting:
        return None
    try:
        config_from_args(namespace, max(fitting, key=lambda cls: len(fields_of(cls))))
    except ConfigError as exc:
        return f"configuration: {exc}"
    return None


def check_main(main: Callable[[list[str]], object], argv: list[str]) -> str | None:
    parsed = parse_only(main, argv)
    if parsed is None or isinstance(parsed, str):
        return parsed
    return config_error(*parsed)


def check_sft(argv: list[str]) -> str | None:
    from sft.cli import COMMANDS

    if not argv or argv[0] in {"-h", "--help"}:
        return None
    if argv[0] not in COMMANDS:
        return f"unknown sft command {argv[0]!r}"
    return check_main(importlib.import_module(COMMANDS[argv[0]][0]).main, argv[1:])


def _module_main(name: str) -> Callable[[list[str]], object] | str:
    try:
        module = importlib.import_module(name)
    except ImportError as exc:
        return f"no module {name}: {exc}"
    return getattr(module, "main", None) or f"module {name} has no main()"


def _script_main(path: str) -> Callable[[list[str]], object] | str:
    """The main a repository script runs: sft/X.py is module sft.X; scripts/X.py runs the main it
    imports; benchmarks/X.py has a main() that reads sys.argv."""
    file = ROOT / path
    if not file.is_file():
        return f"no file {path}"
    if path.startswith("sft/"):
        return _module_main(path[:-3].replace("/", "."))
    if path.startswith("scripts/"):
        imports = [node.module for node in ast.walk(ast.parse(file.read_text(encoding="utf-8")))
                   if isinstance(node, ast.ImportFrom) and any(a.name == "main" for a in node.names)]
        return _module_main(imports[0]) if imports else f"{path} imports no main"
    if path.startswith("benchmarks/"):
        return _benchmark_main(file)
    return f"{path}: not a script of this repository"


def _benchmark_main(file: Path) -> Callable[[list[str]], object]:
    spec = importlib.util.spec_from_file_location(f"_docs_benchmark_{file.stem}", file)
    module = importlib.util.module_from_spec(spec)
    saved_path = list(sys.path)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = saved_path

    def main(argv: list[str]) -> object:
        with mock.patch.object(sys, "argv", [str(file), *argv]):
            return module.main()
    return main


def check_python(argv: list[str]) -> str | None:
    if argv[:1] == ["-m"] and len(argv) >= 2:
        module, rest = argv[1], argv[2:]
        if module in ALLOWED_PYTHON_MODULES:
            return None
        if module == "sft.cli":
            return check_sft(rest)
        if not module.startswith("sft."):
            return f"python -m {module}: not a module of sft (allowed others: {sorted(ALLOWED_PYTHON_MODULES)})"
        main = _module_main(module)
    elif argv and argv[0].endswith(".py"):
        main, rest = _script_main(argv[0]), argv[1:]
    else:
        return "python with neither -m MODULE nor a script"
    return main if isinstance(main, str) else check_main(main, rest)


def check_launcher(argv: list[str]) -> str | None:
    """torchrun / accelerate launch: the module or script they start is checked."""
    if "-m" in argv:
        return check_python(argv[argv.index("-m"):])
    scripts = [word for word in argv if word.endswith(".py")]
    return check_python(argv[argv.index(scripts[0]):]) if scripts else "a launcher with no -m MODULE or script"


def make_targets(makefile: Path = ROOT / "Makefile") -> set[str]:
    targets = set()
    for line in makefile.read_text(encoding="utf-8").splitlines():
        rule = re.match(r"^([A-Za-z0-9_.$()/ -]+?)\s*:(?!=)", line)
        if rule:
            targets.update(rule.group(1).split())
    return targets


def missing_repo_paths(words: list[str]) -> list[str]:
    values = [word.split("=", 1)[-1] for word in words]
    return [value for value in values if value.startswith(REPO_DIRS)
            and not (ROOT / value.split("::")[0]).exists()]


def check_command(words: list[str]) -> str | None:
    """Why a simple command of the docs would not run as written, or None."""
    missing = missing_repo_paths(words)
    if missing:
        return f"no such path in the repository: {', '.join(missing)}"
    program, rest = words[0], words[1:]
    if program == "sft":
        return check_sft(rest)
    if program in PYTHONS:
        return check_python(rest)
    if program == "make":
        unknown = [target for target in rest if not target.startswith("-") and target not in make_targets()]
        return f"no Makefile target {', '.join(unknown)}" if unknown else None
    if program == "torchrun" or words[:2] == ["accelerate", "launch"]:
        return check_launcher(rest)
    if program == "bash":
        return None if rest and (ROOT / rest[0]).is_file() else f"bash: no script {rest[:1]}"
    if program in ALLOWED_PROGRAMS:
        return None
    return f"{program!r} is neither an sft command nor on ALLOWED_PROGRAMS"


def command_errors(doc: Path) -> list[str]:
    errors = []
    for block in fenced_blocks(doc.read_text(encoding="utf-8")):
        if block.language not in SHELL_LANGUAGES:
            continue
        for line, command_line in shell_lines(block):
            for words in simple_commands(command_line):
                error = check_command(words)
                if error:
                    errors.append(f"{shown(doc)}:{line}: `{shlex.join(words)}`: {error}")
    return errors


# --- the docs themselves -------------------------------------------------------------------------

@pytest.mark.parametrize("doc", DOCS, ids=lambda doc: str(doc.relative_to(ROOT)))
def test_every_link_and_anchor_resolves(doc: Path) -> None:
    broken = [f"{shown(doc)}:{line}: ({target}): {error}"
              for line, target in links(doc.read_text(encoding="utf-8"))
              for error in [link_error(doc, target)] if error]
    assert not broken, "\n".join(broken)


@pytest.mark.parametrize("doc", DOCS, ids=lambda doc: str(doc.relative_to(ROOT)))
def test_every_command_parses(doc: Path) -> None:
    errors = command_errors(doc)
    assert not errors, "\n".join(errors)


def test_readme_is_short() -> None:
    lines = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines, at most {MAX_README_LINES}: move detail to docs/"


def test_readme_names_the_original_commands_once() -> None:
    """The original project's commands keep working and the README says so, once."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for command in ("python scripts/prepare_sft_data.py", "python -m sft.train_sft", "python sft/sft_test.py"):
        assert readme.count(command) == 1, f"README.md should name `{command}` once"


def mapped_modules(text: str) -> set[str]:
    """The sft/ modules a module map names in its table's first column."""
    return set(re.findall(r"^\|\s*`(sft/[\w/]+\.py)`", text, flags=re.MULTILINE))


def test_the_module_map_lists_every_module() -> None:
    actual = {str(path.relative_to(ROOT)) for path in (ROOT / "sft").rglob("*.py")}
    mapped = mapped_modules((ROOT / "docs" / "architecture.md").read_text(encoding="utf-8"))
    assert not actual - mapped, f"docs/architecture.md does not list: {sorted(actual - mapped)}"
    assert not mapped - actual, f"docs/architecture.md lists modules that do not exist: {sorted(mapped - actual)}"


# --- the checks can fail -------------------------------------------------------------------------

@pytest.mark.parametrize(("heading", "slug"), [
    ("Preference data (DPO)", "preference-data-dpo"),
    ("Several GPUs, several machines, and the CUDA fast path", "several-gpus-several-machines-and-the-cuda-fast-path"),
    ("sft export --verify", "sft-export---verify"),
    ("Scores at the reference's settings", "scores-at-the-references-settings"),
    ("The [demo](x.md) run_on", "the-demo-run_on"),
])
def test_github_slug(heading: str, slug: str) -> None:
    assert github_slug(heading) == slug


def test_anchors_number_repeated_headings_and_skip_code() -> None:
    text = "# Usage\n## Usage\n```bash\n# not a heading\n```\n## `sft train`\n"
    assert anchors(text) == {"usage", "usage-1", "sft-train"}


def test_link_errors(tmp_path: Path) -> None:
    (tmp_path / "other.md").write_text("# Other page\n", encoding="utf-8")
    doc = tmp_path / "doc.md"
    doc.write_text("# Top\n[a](other.md#other-page) [b](#top) [c](https://example.com/x#y)\n"
                   "[d](missing.md) [e](other.md#nope) `[f](inline-code.md)`\n", encoding="utf-8")
    errors = {target: link_error(doc, target) for _, target in links(doc.read_text(encoding="utf-8"))}
    assert errors == {"other.md#other-page": None, "#top": None, "https://example.com/x#y": None,
                      "missing.md": "no file missing.md",
                      "other.md#nope": f"no heading with anchor #nope in {tmp_path / 'other.md'}"}


def test_shell_lines_join_continuations_and_read_console_prompts() -> None:
    block = Block("bash", 10, ["sft train \\", "    --max-steps 2   # a comment", "# only a comment", "make demo"])
    assert list(shell_lines(block)) == [(10, "sft train      --max-steps 2   # a comment"), (13, "make demo")]
    console = Block("console", 1, ["$ sft inspect | cat", "output line", "$ make test"])
    assert list(shell_lines(console)) == [(1, "sft inspect | cat"), (3, "make test")]


def test_simple_commands_split_operators_and_drop_comments() -> None:
    assert simple_commands("make install && source .venv/bin/activate # set up") == [
        ["make", "install"], ["source", ".venv/bin/activate"]]
    assert simple_commands("HF_HUB_OFFLINE=1 sft chat --prompt 'Hi there' > out.txt") == [
        ["sft", "chat", "--prompt", "Hi there"]]


@pytest.mark.parametrize("command", [
    "sft train --config configs/demo.yaml --max-steps 2",
    "sft dpo --config configs/dpo-demo.yaml --beta 0.2 --loss-type ipo",
    "sft --help",
    "sft export --help",
    "python -m sft.train_sft --max-steps 3",
    "python scripts/prepare_sft_data.py --out-dir data/x",
    "python sft/sft_test.py --adapter models/x",
    "torchrun --nproc-per-node 2 -m sft.train_sft --config configs/tinyllama-cuda.yaml",
    "make demo",
    "ollama run mymodel",
])
def test_check_command_accepts(command: str) -> None:
    assert [check_command(words) for words in simple_commands(command)] == [None]


@pytest.mark.parametrize(("command", "reason"), [
    ("sft trian --max-steps 2", "unknown sft command 'trian'"),
    ("sft train --max-stepz 2", "--max-stepz"),
    ("sft train --max-steps two", "configuration"),
    ("sft dpo --loss-type nope", "--loss-type"),
    ("sft chat --adapter", "expected one argument"),
    ("python -m sft.no_such_module", "no module sft.no_such_module"),
    ("python scripts/prepare_sft_data.py --no-such-flag", "--no-such-flag"),
    ("python benchmarks/throughput.py --no-such-flag", "--no-such-flag"),
    ("accelerate launch --num_processes 2 -m sft.train_sft --lora-rank 8", "--lora-rank"),
    ("make no-such-target", "no Makefile target no-such-target"),
    ("sft train --config configs/missing.yaml", "no such path in the repository: configs/missing.yaml"),
    ("rm -rf models", "neither an sft command nor on ALLOWED_PROGRAMS"),
])
def test_check_command_refuses(command: str, reason: str) -> None:
    errors = [check_command(words) for words in simple_commands(command)]
    assert errors[0] is not None and reason in errors[0], errors


def test_command_errors_name_file_line_and_command(tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text("# T\n\n```bash\nmake demo\nsft trian\n```\n\n```text\nsft trian\n```\n", encoding="utf-8")
    assert command_errors(doc) == [f"{doc}:5: `sft trian`: unknown sft command 'trian'"]


def test_make_targets_reads_rules_not_variables(tmp_path: Path) -> None:
    makefile = tmp_path / "Makefile"
    makefile.write_text("BIN := .venv/bin\n.PHONY: demo test\ndemo: install\n\t$(BIN)/sft x\ntest clean:\n",
                        encoding="utf-8")
    assert make_targets(makefile) == {".PHONY", "demo", "test", "clean"}


def test_mapped_modules_reads_the_first_column() -> None:
    text = "| module | what |\n|---|---|\n| `sft/cli.py` | the table, see `sft/errors.py` |\n"
    assert mapped_modules(text) == {"sft/cli.py"}
