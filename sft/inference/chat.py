"""`sft chat`: talk to the base model plus a trained adapter in the terminal.

    sft chat --adapter models/sft_output                 interactive, streaming, multi-turn
    sft chat --adapter models/sft_output --prompt "Hi"   one answer, printed, then exit
    sft chat --model smollm2-135m-instruct               the base model alone, to compare

Prompts are built by the same code as training (sft/templates.py), with the run's system
prompt unless --system-prompt is given. In the interactive chat, /reset forgets the
conversation and /exit (or Ctrl-D) leaves.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from transformers import TextStreamer

from sft.config import ConfigError, StrictArgumentParser, build_config, saved_run_config
from sft.data.templates import encode_prompt, end_of_turn_ids, ensure_chat_template, render_prompt
from sft.errors import run_command
from sft.modeling.attention import resolve_attention
from sft.modeling.devices import device_policy
from sft.modeling.models import load_adapter, load_model, load_tokenizer, resolve_model_path

Message = dict[str, str]


class ChatSession:
    """A model, its tokenizer and the conversation so far."""

    def __init__(self, model: torch.nn.Module, tokenizer, device: str, system_prompt: str | None,  # noqa: ANN001
                 temperature: float, top_p: float, max_new_tokens: int):
        self.model, self.tokenizer, self.device = model, tokenizer, device
        self.system_prompt = system_prompt
        self.sampling = {"do_sample": temperature > 0, "max_new_tokens": max_new_tokens,
                         **({"temperature": temperature, "top_p": top_p} if temperature > 0 else {})}
        self.history: list[Message] = []

    def reset(self) -> None:
        self.history = []

    def reply(self, user_text: str, stream: bool = False) -> str:
        """The assistant's answer to one more user turn; the turn and answer join the history."""
        system = [] if self.system_prompt is None else [{"role": "system", "content": self.system_prompt}]
        messages = system + self.history + [{"role": "user", "content": user_text}]
        prompt_ids = encode_prompt(self.tokenizer, render_prompt(self.tokenizer, messages))
        input_ids = torch.tensor([prompt_ids], device=self.device)
        streamer = TextStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
        with torch.inference_mode():
            output = self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                         eos_token_id=end_of_turn_ids(self.tokenizer),
                                         pad_token_id=self.tokenizer.pad_token_id, streamer=streamer,
                                         **self.sampling)
        answer = self.tokenizer.decode(output[0, len(prompt_ids):], skip_special_tokens=True).strip()
        self.history += [{"role": "user", "content": user_text}, {"role": "assistant", "content": answer}]
        return answer


def open_session(args: argparse.Namespace) -> ChatSession:
    config = build_config(saved_run_config(args.adapter) if args.adapter else None)
    model_name = args.model or config.model.model
    system_prompt = config.data.system_prompt if args.system_prompt is None else args.system_prompt
    policy = device_policy(args.device, config.model.dtype)
    if args.adapter and not Path(args.adapter, "adapter_config.json").is_file():
        raise ConfigError(f"{args.adapter}: no adapter_config.json here; pass a training output directory")
    model_path = resolve_model_path(model_name)
    tokenizer = load_tokenizer(args.adapter or model_path)
    ensure_chat_template(tokenizer)
    model = load_model(model_path, policy.load_dtype, resolve_attention("auto", policy.device))
    if args.adapter:
        model = load_adapter(model, args.adapter)
    return ChatSession(model.to(policy.device).eval(), tokenizer, policy.device, system_prompt,
                       args.temperature, args.top_p, args.max_new_tokens)


def interact(session: ChatSession) -> None:
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
        session.reply(text, stream=True)


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
    parser.add_argument("--device", default="auto", help="auto, cpu, mps or cuda (default: %(default)s)")
    parser.add_argument("--seed", type=int, help="fix the sampling for a repeatable answer")
    args = parser.parse_args(argv)
    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.max_new_tokens < 1:
        parser.error("--temperature must be >= 0, --top-p in (0, 1], --max-new-tokens >= 1")
    if args.seed is not None:
        torch.manual_seed(args.seed)

    def run() -> None:
        session = open_session(args)
        if args.prompt is not None:
            print(session.reply(args.prompt))
        else:
            interact(session)

    return run_command(run)


if __name__ == "__main__":
    sys.exit(main())
