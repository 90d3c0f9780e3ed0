"""How fast sampled generation runs at several batch sizes (the cost of `sc_humaneval_chat_sampled` on a CPU).

    python scripts/generate_batch_probe.py MODEL_DIR [STEPS] [BATCH ...]

Loads MODEL_DIR as `sparsecraft eval` does, puts HumanEval's first problem through the chat template, and samples
exactly STEPS new tokens (min = max, so every batch does the same work) for each batch size, batches interleaved
over two rounds. Prints seconds per decode step and generated tokens per second; the fastest batch is what to pass
as `--batch-size` (lm-eval fills each batch with the 10 repeats of neighbouring problems).
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from sparsecraft.evaluate.humaneval import load_problems
from sparsecraft.generation import load_tokenizer_for
from sparsecraft.loading import load


def main() -> None:
    path = sys.argv[1]
    steps = int(sys.argv[2]) if len(sys.argv) > 2 else 64
    batches = [int(b) for b in sys.argv[3:]] or [16, 64, 160]
    model = load(path)
    tokenizer = load_tokenizer_for(path, model)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": load_problems()[0]["prompt"]}],
                                           tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    print(f"{path}: prompt {ids.shape[1]} tokens, {steps} sampled tokens, {torch.get_num_threads()} threads")
    times: dict[int, list[float]] = {b: [] for b in batches}
    for _ in range(2):
        for batch in batches:
            inputs = ids.expand(batch, -1)
            start = time.perf_counter()
            with torch.inference_mode():
                model.generate(inputs, attention_mask=torch.ones_like(inputs), do_sample=True, temperature=0.8,
                               top_p=0.95, max_new_tokens=steps, min_new_tokens=steps,
                               pad_token_id=tokenizer.eos_token_id)
            times[batch].append(time.perf_counter() - start)
    for batch in batches:
        seconds = statistics.median(times[batch])
        print(f"batch {batch:4d}: {seconds / steps * 1000:7.1f} ms/step  {batch * steps / seconds:7.1f} tokens/s")


if __name__ == "__main__":
    main()
