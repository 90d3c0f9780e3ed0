"""Time the evaluation engine on a fixed sampled-HumanEval workload (what `sc_humaneval_chat_sampled` asks of it).

    python scripts/engine_workload_probe.py MODEL_DIR [--problems 10] [--samples 10] [--rows 40] [--max-tokens 256]

HumanEval's first PROBLEMS prompts through the chat template, SAMPLES answers each (T=0.8, top-p 0.95, seeded per
request as `sparsecraft eval` seeds them), through `evaluate.engine_generation.generate_all` with ROWS rows. Prints
wall time, generated tokens and tokens/s, and a digest of the answers: two code versions that agree on
the digest did the same work. Run it with `PYTHONPATH=<other checkout>/src` to time another version of the engine.
"""

from __future__ import annotations

import argparse
import hashlib
import time

import torch

import sparsecraft
from sparsecraft.evaluate.engine_generation import Prompt, generate_all, request_seed
from sparsecraft.evaluate.humaneval import load_problems
from sparsecraft.generation import load_tokenizer_for
from sparsecraft.loading import load


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--problems", type=int, default=10)
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--rows", type=int, default=40)
    parser.add_argument("--max-tokens", type=int, default=256)
    args = parser.parse_args()
    model = load(args.model)
    tokenizer = load_tokenizer_for(args.model, model)
    prompts = []
    for problem in load_problems()[:args.problems]:
        text = tokenizer.apply_chat_template([{"role": "user", "content": problem["prompt"]}], tokenize=False,
                                             add_generation_prompt=True)
        ids = tokenizer(text).input_ids
        prompts += [Prompt(ids, args.max_tokens, temperature=0.8, top_p=0.95, seed=request_seed(1234, len(prompts)))
                    for _ in range(args.samples)]
    start = time.perf_counter()
    answers = generate_all(model, tokenizer, prompts, max_batch_size=args.rows)
    seconds = time.perf_counter() - start
    tokens = sum(len(tokenizer(a).input_ids) for a in answers)
    digest = hashlib.sha256("\x00".join(answers).encode()).hexdigest()[:12]
    print(f"sparsecraft from {sparsecraft.__file__}; {torch.get_num_threads()} threads")
    print(f"{len(prompts)} answers, {args.rows} rows: {seconds:.1f} s, "
          f"~{tokens} answer tokens, {tokens / seconds:.1f} tokens/s, answers digest {digest}")


if __name__ == "__main__":
    main()
