"""`blockdiff generate PROMPT [--image PATH]`: stream one continuation to stdout, a canvas at a time."""
from __future__ import annotations

import argparse
from pathlib import Path

from .common import add_model_flags, add_sampling_flags, build_llm, sampling_params, setup


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt",
                       description="Generate a continuation of PROMPT with block diffusion and print it.")
    p.add_argument("prompt", metavar="PROMPT", help="the prompt text")
    add_sampling_flags(p, seed=0)
    p.add_argument("--chat", action="store_true", help="wrap PROMPT in the tokenizer's chat template")
    p.add_argument("--image", action="append", default=[], type=Path, metavar="PATH",
                   help="an image (PNG, JPEG or WebP) for a multimodal model (repeatable). With --chat the "
                        "images come before PROMPT in the user turn; without, PROMPT holds one <|image|> per "
                        "image, or the markers are put before it")
    add_model_flags(p, max_model_len=4096, compile_flag=False)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    setup(args)
    params = sampling_params(args)
    with build_llm(args, max_num_seqs=1) as llm:          # closing stops tensor-parallel workers
        images = [path.read_bytes() for path in args.image]       # decoded and checked by the engine
        prompt = args.prompt
        if args.chat:
            parts = [{"type": "image", "image": data} for data in images] + [{"type": "text", "text": prompt}]
            prompt = llm.inputs.chat([{"role": "user", "content": parts if images else prompt}])
        elif images:
            marker = llm.tokenizer.image_token
            text = prompt if marker in prompt else marker * len(images) + prompt
            prompt = {"prompt": text, "multi_modal_data": {"image": images}}
        for out in llm.stream(prompt, params):      # print each canvas's text as it commits
            print(out.delta_text, end="", flush=True)
    print()
    return 0
