"""`blockdiff generate PROMPT`: stream one continuation to stdout, a canvas at a time."""
from __future__ import annotations

import argparse

from .common import add_model_flags, add_sampling_flags, build_llm, sampling_params, setup


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt",
                       description="Generate a continuation of PROMPT with block diffusion and print it.")
    p.add_argument("prompt", metavar="PROMPT", help="the prompt text")
    add_sampling_flags(p, seed=0)
    p.add_argument("--chat", action="store_true", help="wrap PROMPT in the tokenizer's chat template")
    add_model_flags(p, max_model_len=4096, compile_flag=False)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    setup(args)
    params = sampling_params(args)
    llm = build_llm(args, max_num_seqs=1)
    prompt = args.prompt
    if args.chat:
        prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    for out in llm.stream(prompt, params):      # print each canvas's text as it commits
        print(out.delta_text, end="", flush=True)
    print()
    return 0
