"""Offline generation from the command line:

    python -m nanovllm_ray.generate [--model DIR] [--prompt TEXT ...] [--max-tokens N] [--temperature T]

Without --model it uses the tiny demo checkpoint under checkpoints/, making it on first use.
"""

from __future__ import annotations

import argparse
import logging
import time

from nanovllm_ray import LLM, SamplingParams

DEFAULT_MODEL = "checkpoints/qwen3-tiny"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help=f"Hugging Face Qwen3 directory (default: {DEFAULT_MODEL})")
    ap.add_argument("--prompt", action="append", help="a prompt (repeatable); chat-formatted")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--max-model-len", type=int, default=4096)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    model = args.model
    if model is None:
        from nanovllm_ray.demo_model import ensure_demo_checkpoint

        model = str(ensure_demo_checkpoint(DEFAULT_MODEL, "tiny"))
    llm = LLM(model, max_model_len=args.max_model_len)
    prompts = args.prompt or ["Hello, who are you?", "Write a haiku about paged attention."]
    texts = [llm.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                               add_generation_prompt=True) for p in prompts]
    t = time.perf_counter()
    outs = llm.generate(texts, SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens))
    dt = time.perf_counter() - t
    for p, o in zip(prompts, outs):
        print(f"\n>>> {p}\n{o.text!r}  [{o.num_generated_tokens} tokens, {o.finish_reason}]")
    print(f"\n{sum(o.num_generated_tokens for o in outs)} tokens in {dt:.2f} s")


if __name__ == "__main__":
    main()
