"""Chat templates rendered under a time and size limit, and their failures as one-line errors.

A chat template is a Jinja program that comes with a model or a run directory, so it is data from
someone else: ``{% for i in range(100000) %}{% for j in range(100000) %}`` would render for hours
and ``{{ "a" * 1000000000 }}`` would take gigabytes. Transformers renders it in Jinja's immutable
sandbox, which stops attribute tricks but not work. This module renders it in the same sandbox,
set up as transformers sets it up (so the text is the same), with a budget per rendering:

- every ``{% for %}`` loop counts its iterations against MAX_LOOP_ITERATIONS;
- every function or method call, attribute lookup and loop step checks a deadline
  (MAX_RENDER_SECONDS);
- operations that could make a large value from small ones (``*``, ``**``, ``+``, ``~``, string
  methods and filters that pad, replace or repeat) are refused beyond the size limit *before* they
  run;
- every output statement counts what it writes, inside macros too, and the output is read as it
  is produced and stopped past the size limit.

The size limit grows with the conversation (a template writes each message once or a few times,
plus its own markup): ``OUTPUT_CHARS_PER_INPUT_CHAR`` times the characters of the messages, plus
``OUTPUT_BASE_CHARS``. A template that raises (``raise_exception('System role not supported')``),
does not parse, breaks the sandbox's rules or exceeds a limit is a :class:`TemplateError` naming
the template and what happened.
"""

from __future__ import annotations

import contextvars
import functools
import json
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from sft.errors import TemplateError

MAX_RENDER_SECONDS = 10.0
MAX_LOOP_ITERATIONS = 1_000_000
OUTPUT_BASE_CHARS = 1_000_000
OUTPUT_CHARS_PER_INPUT_CHAR = 8
EMITTED_PER_OUTPUT_CHAR = 4
"""Text written inside macros is counted again where the macro's result is written."""


class TemplateLimitExceeded(TemplateError):
    """A rendering that went past its time, loop or size budget."""


@dataclass
class _Budget:
    deadline: float
    max_chars: int
    iterations: int = 0
    emitted: int = 0
    """Characters written by every output statement, macro bodies included (a macro's output is
    counted again where it is written, so the limit on this is a few times max_chars)."""

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise TemplateLimitExceeded(f"rendering took longer than {MAX_RENDER_SECONDS:g} s")

    def size(self, chars: int, what: str) -> None:
        if chars > self.max_chars:
            raise TemplateLimitExceeded(f"{what} would be {chars} characters, more than the {self.max_chars} this "
                                        f"conversation can need")


_budget: contextvars.ContextVar[_Budget] = contextvars.ContextVar("template_budget")


def _counted(iterable: Iterable[Any]) -> Iterator[Any]:
    """A loop's iterable, each step counted against the rendering's budget."""
    budget = _budget.get()
    for item in iterable:
        budget.iterations += 1
        if budget.iterations > MAX_LOOP_ITERATIONS:
            raise TemplateLimitExceeded(f"its loops ran more than {MAX_LOOP_ITERATIONS} steps")
        budget.tick()
        yield item


def _sized(value: Any) -> Any:
    """The value of a ``~`` concatenation, refused past the size limit."""
    _budget.get().size(len(value), "a joined string")
    return value


def _emitted(value: Any) -> Any:
    """A value an output statement writes, counted: a macro can write one large string a million
    times into its own buffer before anything reaches the rendering's output."""
    budget = _budget.get()
    budget.emitted += len(value) if isinstance(value, str) else len(str(value))
    budget.size(budget.emitted // EMITTED_PER_OUTPUT_CHAR, "the text written (macros included)")
    return value


def _replace_size(text: str, old: str, new: str) -> int:
    return len(text) + (text.count(old) if old else len(text) + 1) * len(new)


def _length(value: Any) -> int:
    return len(value) if isinstance(value, (str, list, tuple)) else 0


_WIDE_FORMAT = re.compile(r"\d{7,}|\*")
"""A width or precision of seven digits or more (or ``*``, taken from the arguments) in a format string."""

_PADDING_METHODS = {"center", "ljust", "rjust", "zfill", "expandtabs"}
_SIZED_FILTERS = {"center", "indent", "batch", "slice", "wordwrap", "truncate"}


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox with the rendering budget checked at every loop step, call,
    attribute lookup and growing operator (see the module docstring)."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def _parse(self, source: str, name: str | None, filename: str | None) -> jinja2.nodes.Template:
        tree = super()._parse(source, name, filename)
        for loop in tree.find_all(jinja2.nodes.For):
            loop.iter = jinja2.nodes.Call(jinja2.nodes.Name("__sft_counted", "load"), [loop.iter], [], None, None)
        for concat in list(tree.find_all(jinja2.nodes.Concat)):
            concat.nodes = [jinja2.nodes.Call(jinja2.nodes.Name("__sft_sized", "load"),
                                              [jinja2.nodes.Concat(concat.nodes)], [], None, None)]
        for output in tree.find_all(jinja2.nodes.Output):
            output.nodes = [jinja2.nodes.Call(jinja2.nodes.Name("__sft_emitted", "load"), [node], [], None, None)
                            for node in output.nodes]
        return tree

    def call(__self, __context: jinja2.runtime.Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        budget = _budget.get()
        budget.tick()
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, str):
            method = getattr(__obj, "__name__", "")
            if method in _PADDING_METHODS:
                budget.size(max([len(owner), *(a for a in args if isinstance(a, int))]), f"str.{method}")
            elif method == "replace" and len(args) >= 2 and all(isinstance(a, str) for a in args[:2]):
                budget.size(_replace_size(owner, *args[:2]), "str.replace")
            elif method in {"format", "format_map"} and _WIDE_FORMAT.search(owner):
                budget.size(budget.max_chars + 1, "a formatted string")
        return super().call(__context, __obj, *args, **kwargs)

    def getattr(self, obj: Any, attribute: str) -> Any:
        _budget.get().tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        _budget.get().tick()
        return super().getitem(obj, argument)

    def call_binop(self, context: jinja2.runtime.Context, operator: str, left: Any, right: Any) -> Any:
        budget = _budget.get()
        budget.tick()
        if operator == "*":
            for sequence, count in ((left, right), (right, left)):
                if _length(sequence) and isinstance(count, int):
                    budget.size(_length(sequence) * count, "a repeated value")
            if isinstance(left, int) and isinstance(right, int):
                budget.size((left.bit_length() + right.bit_length()) // 4, "a product's digits")
        elif operator == "**" and isinstance(left, int) and isinstance(right, int) and right > 0:
            budget.size(left.bit_length() * right // 4, "a power's digits")
        elif operator == "+":
            budget.size(_length(left) + _length(right), "a joined value")
        elif operator == "%" and isinstance(left, str) and _WIDE_FORMAT.search(left):
            budget.size(budget.max_chars + 1, "a formatted string")
        return super().call_binop(context, operator, left, right)


def _checked_replace(function: Any) -> Any:
    """The replace filter, refused where its result would pass the size limit."""

    @functools.wraps(function)
    def checked(eval_ctx: Any, text: Any, old: Any, new: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(text, str) and isinstance(old, str) and isinstance(new, str):
            _budget.get().size(_replace_size(text, old, new), "the replace filter's result")
        return function(eval_ctx, text, old, new, *args, **kwargs)

    return checked


def _checked_format(function: Any) -> Any:
    """The format filter, refused for a width or precision of a million characters or more."""

    @functools.wraps(function)
    def checked(value: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(value, str) and _WIDE_FORMAT.search(value):
            budget = _budget.get()
            budget.size(budget.max_chars + 1, "a formatted string")
        return function(value, *args, **kwargs)

    return checked


def _sized_filter(name: str, function: Any) -> Any:
    """A filter whose numeric arguments (a width, a count) are refused past the size limit."""

    @functools.wraps(function)
    def checked(*args: Any, **kwargs: Any) -> Any:
        budget = _budget.get()
        for value in (*args, *kwargs.values()):
            if isinstance(value, int) and not isinstance(value, bool):
                budget.size(value, f"the {name} filter's width")
        return function(*args, **kwargs)

    return checked


class _Generation(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``, which some templates use to mark the assistant's
    text for transformers' assistant masks: rendered as its content, as transformers does."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_content"), [], [], body).set_lineno(lineno)

    def _content(self, caller: Any) -> str:
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """``namespace()`` without underscore attributes, as transformers allows it."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - Jinja's own signature trick
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a namespace cannot hold the underscore attribute {name!r}")


class _Dict:
    """``dict()`` as transformers gives templates: a call and fromkeys, no type to climb out of."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    """The template compiled in the bounded sandbox, with transformers' settings, filters and globals."""
    environment = _BoundedSandbox(trim_blocks=True, lstrip_blocks=True,
                                  extensions=[_Generation, jinja2.ext.loopcontrols])
    for name in _SIZED_FILTERS:
        environment.filters[name] = _sized_filter(name, environment.filters[name])
    environment.filters["replace"] = _checked_replace(environment.filters["replace"])
    environment.filters["format"] = _checked_format(environment.filters["format"])
    environment.filters["tojson"] = _tojson
    environment.globals.pop("lipsum", None)  # writes as many paragraphs as asked
    environment.globals.update(raise_exception=_raise_exception, dict=_Dict(), namespace=_Namespace,
                               strftime_now=lambda fmt: datetime.now().strftime(fmt),
                               __sft_counted=_counted, __sft_sized=_sized, __sft_emitted=_emitted)
    return environment.from_string(template)


_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
"""The names transformers copies an assistant's reasoning under before rendering."""


def _text_size(value: Any) -> int:
    """The characters of the strings in a JSON-like value: what a template can write from it."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(_text_size(key) + _text_size(item) for key, item in value.items())
    if isinstance(value, (list, tuple)):
        return sum(_text_size(item) for item in value)
    return 8


def _as_transformers_passes(message: dict[str, Any]) -> dict[str, Any]:
    """A message as apply_chat_template hands it to the template: keys holding None dropped, and
    reasoning under each name templates read it by."""
    message = {key: value for key, value in message.items() if value is not None}
    reasoning = next((message[key] for key in _REASONING_FIELDS if message.get(key) is not None), None)
    return message if reasoning is None else {"thinking": reasoning, **message, "reasoning_content": reasoning}


def render_chat_template(template: str, messages: list[dict[str, Any]], add_generation_prompt: bool,
                         variables: dict[str, Any], template_name: str,
                         tools: list[dict[str, Any]] | None = None) -> str:
    """``template`` rendered for ``messages`` and ``tools`` (and ``variables``: the tokenizer's
    special tokens) as ``tokenizer.apply_chat_template(..., tokenize=False)`` renders them, within
    the budget; any failure is a TemplateError naming ``template_name``."""
    messages = [_as_transformers_passes(message) for message in messages]
    input_chars = _text_size(messages) + _text_size(tools)
    budget = _Budget(time.monotonic() + MAX_RENDER_SECONDS, OUTPUT_BASE_CHARS + OUTPUT_CHARS_PER_INPUT_CHAR * input_chars)
    token = _budget.set(budget)
    try:
        compiled = _compile(template)
        pieces, size = [], 0
        for piece in compiled.generate(**variables, messages=messages, tools=tools, documents=None,
                                       add_generation_prompt=add_generation_prompt):
            size += len(piece)
            budget.size(size, "the rendered conversation")
            pieces.append(piece)
        return "".join(pieces)
    except TemplateLimitExceeded as exc:
        raise TemplateLimitExceeded(f"{template_name} was stopped: {exc}; a chat template renders a conversation "
                                    f"in well under that") from None
    except jinja2.exceptions.TemplateSyntaxError as exc:
        raise TemplateError(f"{template_name} is not a valid Jinja template (line {exc.lineno}: {exc.message})") from None
    except jinja2.exceptions.SecurityError as exc:
        raise TemplateError(f"{template_name} broke the sandbox's rules: {exc}") from None
    except jinja2.exceptions.TemplateError as exc:  # raise_exception('System role not supported'), undefined, ...
        raise TemplateError(f"{template_name} refused the conversation: {exc.message or exc}") from None
    except (ArithmeticError, AttributeError, LookupError, RecursionError, TypeError, ValueError,
            MemoryError) as exc:
        raise TemplateError(f"{template_name} failed while rendering: {type(exc).__name__}: {exc}") from None
    finally:
        _budget.reset(token)
