"""`sft chat`: talk to the base model plus a trained adapter in the terminal.

    sft chat --adapter models/sft_output                 interactive, streaming, multi-turn
    sft chat --adapter models/sft_output --prompt "Hi"   one answer, printed, then exit
    sft chat --model smollm2-135m-instruct               the base model alone, to compare

Prompts are built by the same code as training (sft/data/templates.py), with the run's system
prompt unless --system-prompt is given. In the interactive chat, /reset forgets the
conversation and /exit (or Ctrl-D) leaves.
"""

from __future__ import annotations

import argparse
import io
import sys

import torch
from transformers import TextStreamer

from sft.config import StrictArgumentParser
from sft.data.templates import end_of_turn_ids, with_system_prompt
from sft.data.tokenize import generation_prompt
from sft.errors import ConfigError, run_command
from sft.inference.loading import LoadedRun, check_prompt_fits, load_run, run_config

Message = dict[str, str]


class _CollectingStreamer(TextStreamer):
    """Prints the answer as it comes and keeps its token ids, so an answer stopped half-way
    (Ctrl-C) still has the text the user saw."""

    def __init__(self, tokenizer, print_text: bool) -> None:  # noqa: ANN001
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.print_text = print_text
        self.answer_ids: list[int] = []
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # the first call carries the prompt
            self._prompt_seen = True
            return
        self.answer_ids += value.reshape(-1).tolist()
        if self.print_text:
            super().put(value)

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if self.print_text:
            super().on_finalized_text(text, stream_end)


class ChatSession:
    """A loaded run and the conversation so far."""

    def __init__(self, run: LoadedRun, system_prompt: str | None, temperature: float, top_p: float,
                 max_new_tokens: int):
        self.run = run
        self.system_prompt = system_prompt
        self.max_new_tokens = max_new_tokens
        self.sampling = {"do_sample": temperature > 0, "max_new_tokens": max_new_tokens,
                         **({"temperature": temperature, "top_p": top_p} if temperature > 0 else {})}
        self.history: list[Message] = []

    def reset(self) -> None:
        self.history = []

    def reply(self, user_text: str, stream: bool = False) -> str:
        """The assistant's answer to one more user turn; the turn and answer join the history.

        Ctrl-C while the answer streams stops that answer (what was said so far is kept) and
        leaves the session open; a prompt the model cannot read is refused before generating."""
        tokenizer = self.run.tokenizer
        require_text(user_text, "the message")
        messages = with_system_prompt(self.history + [{"role": "user", "content": user_text}], self.system_prompt)
        prompt_ids = generation_prompt(tokenizer, messages, self.run.max_positions)
        check_prompt_fits(self.run, len(prompt_ids), self.max_new_tokens)
        input_ids = torch.tensor([prompt_ids], device=self.run.policy.device)
        streamer = _CollectingStreamer(tokenizer, print_text=stream)
        stop_ids = end_of_turn_ids(tokenizer)
        stopped = False
        try:
            with torch.inference_mode():
                self.run.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                        eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id,
                                        streamer=streamer, **self.sampling)
        except KeyboardInterrupt:
            stopped = True
        answer_ids = [token for token in streamer.answer_ids if token not in stop_ids]
        answer = tokenizer.decode(answer_ids, skip_special_tokens=True).strip()
        if stopped and stream:
            print("\n(answer stopped; the chat goes on)", flush=True)
        self.history += [{"role": "user", "content": user_text}, {"role": "assistant", "content": answer}]
        return answer


def require_text(text: str, what: str) -> None:
    """Refuse text holding bytes that are not UTF-8 (a shell or terminal in another encoding hands
    them over as lone surrogates, which no tokenizer can read)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ConfigError(f"{what} is not valid UTF-8 text (byte 0x{ord(text[exc.start]) & 0xFF:02x} at character "
                          f"{exc.start}); set the terminal to UTF-8, or type it again") from None


def open_session(args: argparse.Namespace) -> ChatSession:
    config = run_config(args.adapter, overrides={"trust_remote_code": args.trust_remote_code})
    run = load_run(args.adapter, config, model_name=args.model, device=args.device)
    system_prompt = config.data.system_prompt if args.system_prompt is None else args.system_prompt
    return ChatSession(run, system_prompt, args.temperature, args.top_p, args.max_new_tokens)


def interact(session: ChatSession) -> None:
    if isinstance(sys.stdin, io.TextIOWrapper):  # a line that is not UTF-8 reaches reply(), which refuses it alone
        sys.stdin.reconfigure(errors="surrogateescape")
    print("Chat started: /reset forgets the conversation, /exit or Ctrl-D leaves.", flush=True)
    while True:
        try:
            text = input("\nyou> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if text == "/exit":
            return
        if text == "/reset":
            session.reset()
            print("(conversation forgotten)")
            continue
        if not text:
            continue
        print("assistant> ", end="", flush=True)
        try:
            session.reply(text, stream=True)
        except ConfigError as exc:  # a prompt too long for the model, or not UTF-8: say so, keep the session
            print(f"\nerror: {exc}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = StrictArgumentParser(prog="sft chat", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", help="training output directory (or checkpoint-N); omit for the base model")
    parser.add_argument("--model", help="base model (default: the adapter's, else the bundled model)")
    parser.add_argument("--prompt", help="answer this one message and exit")
    parser.add_argument("--system-prompt", help="system message (default: the run's)")
    parser.add_argument("--temperature", type=float, default=0.7, help="0 for greedy (default: %(default)s)")
    parser.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="longest answer (default: %(default)s)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "mps", "cuda"),
                        help="where to run (default: %(default)s)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow a Hub model's own code to run (never taken from a run directory)")
    parser.add_argument("--seed", type=int, help="fix the sampling for a repeatable answer")
    args = parser.parse_args(argv)
    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.max_new_tokens < 1:
        parser.error("--temperature must be >= 0, --top-p in (0, 1], --max-new-tokens >= 1")
    if args.seed is not None:
        torch.manual_seed(args.seed)

    def run() -> None:
        for value, flag in ((args.prompt, "--prompt"), (args.system_prompt, "--system-prompt")):
            if value is not None:
                require_text(value, flag)
        session = open_session(args)
        if args.prompt is not None:
            print(session.reply(args.prompt))
        else:
            interact(session)

    return run_command(run)


if __name__ == "__main__":
    sys.exit(main())
