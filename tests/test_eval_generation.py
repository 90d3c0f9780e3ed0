"""lm-eval generation through the continuous-batching engine: same answers as lm-eval's own path, repeats of a
prompt prefilled once, seeded samples independent of the batch, exact nucleus sampling."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer

import sparsecraft
from sparsecraft.config import CraftConfig
from sparsecraft.serve.sampling import choose_tokens, make_generator, nucleus

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402

from sparsecraft.evaluate.engine_generation import Prompt, engine_can_run, generate_all  # noqa: E402
from sparsecraft.evaluate.lm_eval_bridge import SparsecraftLM  # noqa: E402

CONTEXTS = ["def add(a, b):", "Question: 2+2?\nAnswer:", "x", "a longer prompt than the others, by far"]


def crafted_pesc():
    model = tiny_model("llama")
    sparsecraft.craft(model, CraftConfig(num_experts=4, top_k=2, adapter_dim=8, dropout=0.0), seed=0)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # trained-looking experts (zero W_up would hide them)
        for p in sparsecraft.new_parameters(model).values():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def answers(lm: SparsecraftLM, contexts: list[str], gen_kwargs: dict) -> list[str]:
    requests = [Instance(request_type="generate_until", doc={}, arguments=(c, dict(gen_kwargs)), idx=0)
                for c in contexts]
    return lm.generate_until(requests, disable_tqdm=True)


def test_engine_answers_equal_lm_evals_own_batched_generate():
    model, tok = crafted_pesc(), tiny_tokenizer()
    engine = SparsecraftLM(model, tokenizer=tok, batch_size=3, max_length=128)
    hf = SparsecraftLM(model, tokenizer=tok, batch_size=3, max_length=128, generation="hf")
    greedy = {"until": [], "max_gen_toks": 12, "do_sample": False}
    free = answers(hf, CONTEXTS, greedy)
    assert answers(engine, CONTEXTS, greedy) == free
    assert all(len(a) > 4 for a in free)
    # a stop string taken from inside one answer cuts it, on both paths alike
    stopped = dict(greedy, until=[free[0][3:5]])
    cut = answers(hf, CONTEXTS, stopped)
    assert answers(engine, CONTEXTS, stopped) == cut
    assert cut[0] == free[0][:free[0].index(free[0][3:5])] and len(cut[0]) < len(free[0])


def test_bad_generation_path_is_one_line_error():
    with pytest.raises(sparsecraft.errors.ConfigError, match="generation must be one of engine, hf"):
        SparsecraftLM(crafted_pesc(), tokenizer=tiny_tokenizer(), generation="vllm")


def test_repeats_share_one_prefill_and_seeded_samples_do_not_depend_on_the_batch():
    model, tok = crafted_pesc(), tiny_tokenizer()
    repeated, other = tok("def f(x):").input_ids, tok("hello").input_ids
    prompts = [Prompt(ids=repeated, max_tokens=10, temperature=1.0, top_p=0.9, seed=s) for s in range(5)]
    prompts.append(Prompt(ids=other, max_tokens=10, temperature=1.0, top_p=0.9, seed=9))
    prefill_rows = []
    hook = model.register_forward_pre_hook(
        lambda _m, _a, kw: prefill_rows.append(kw["input_ids"].shape) if kw["input_ids"].shape[1] > 1 else None,
        with_kwargs=True)
    try:
        together = generate_all(model, tok, prompts, max_batch_size=8)
    finally:
        hook.remove()
    assert prefill_rows == [torch.Size([2, len(repeated)])]  # six requests, two distinct prompts
    assert len(set(together[:5])) > 1  # each repeat draws its own sample
    assert generate_all(model, tok, prompts, max_batch_size=2) == together
    assert generate_all(model, tok, prompts[::-1], max_batch_size=3) == together[::-1]


def test_options_the_engine_lacks_go_to_lm_evals_path():
    assert engine_can_run({"do_sample": True, "temperature": 0.8, "top_p": 0.95})
    assert engine_can_run({"do_sample": False, "temperature": 0.0, "top_k": None, "num_beams": 1})
    assert not engine_can_run({"do_sample": True, "temperature": 0.8, "top_k": 40})
    assert not engine_can_run({"do_sample": False, "num_beams": 4})
    assert not engine_can_run({"do_sample": False, "repetition_penalty": 1.2})


def reference_nucleus(probs: torch.Tensor, top_p: float) -> set[int]:
    """The nucleus by a full sort: every token whose higher-ranked mass is below top_p."""
    values, ids = probs.sort(descending=True)
    before = values.cumsum(0) - values
    return {int(i) for i, b in zip(ids, before, strict=True) if b < top_p} | {int(ids[0])}


@pytest.mark.parametrize("scale", [3.0, 0.01])  # sharp (nucleus in the top candidates) and flat (past them)
def test_nucleus_sampling_draws_only_from_the_exact_nucleus(scale):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 2000, generator=g) * scale
    top_p, temperature = 0.9, 0.7
    probs = torch.softmax(logits / temperature, -1)
    want = [reference_nucleus(probs[r], top_p) for r in range(3)]
    for r in range(3):
        values, ids = probs[r].sort(descending=True)
        got_ids, got_probs = nucleus(values, ids, top_p)
        assert set(got_ids.tolist()) == want[r]
        assert torch.allclose(got_probs.sum(), torch.tensor(1.0))
    generators = [make_generator(r) for r in range(3)]
    drawn: list[set[int]] = [set(), set(), set()]
    for _ in range(200):
        for r, token in enumerate(choose_tokens(logits, [temperature] * 3, [top_p] * 3, generators)):
            drawn[r].add(token)
    assert all(d <= w for d, w in zip(drawn, want, strict=True))
    assert all(len(d) > 1 for d in drawn)
    if scale < 1:
        assert min(len(w) for w in want) > 256  # the flat case really took the full-sort path
    else:
        assert max(len(w) for w in want) < 256  # the sharp case stayed inside the candidates


def test_greedy_and_top_p_one_rows_beside_sampled_rows():
    logits = torch.tensor([[0.0, 5.0, 1.0], [9.0, 0.0, 0.0], [0.0, 0.0, 9.0]])
    gens = [make_generator(i) for i in range(3)]
    out = choose_tokens(logits, [0.0, 1.0, 0.5], [1.0, 1.0, 0.5], gens)
    assert out[0] == 1 and out[2] == 2 and out[1] in (0, 1, 2)


def test_repeats_admitted_one_slot_at_a_time_reuse_the_prompts_cache():
    model, tok = crafted_pesc(), tiny_tokenizer()
    prompt = tok("def g(y):").input_ids
    prompts = [Prompt(ids=prompt, max_tokens=6 + s, temperature=1.0, top_p=0.9, seed=s) for s in range(6)]
    from sparsecraft.serve.engine import Engine
    from sparsecraft.serve.requests import GenerationRequest

    def run(prefix_cache: int) -> tuple[list[str], int]:
        engine = Engine(model, tok, max_batch_size=2, max_queue=8, prefix_cache=prefix_cache)
        texts = [[] for _ in prompts]
        for i, p in enumerate(prompts):
            engine.submit(GenerationRequest(p.ids, p.max_tokens, lambda e, i=i: texts[i].append(e.text),
                                            temperature=1.0, top_p=0.9, seed=p.seed, ignore_eos=True))
        engine.drain()
        return ["".join(t) for t in texts], engine.prefilled_tokens

    cached, computed_once = run(prefix_cache=4)
    fresh, computed_each = run(prefix_cache=0)
    assert cached == fresh  # the kept KV row gives the same samples as a new prefill
    # without the cache each admission prefills again (the rows end one by one, so 2, then 1, 1, 1, 1)
    assert computed_once == len(prompt) and computed_each == 5 * len(prompt)


def test_growing_layer_equals_concatenation_and_survives_outside_replacement():
    from sparsecraft.serve.kvbatch import GrowingLayer, growing_cache

    g = torch.Generator().manual_seed(0)
    chunks = [torch.randn(2, 3, n, 4, generator=g) for n in (5, 1, 1, 70, 1)]
    layer, whole = GrowingLayer(), None
    for c in chunks:
        keys, values = layer.update(c, -c)
        whole = c if whole is None else torch.cat([whole, c], -2)
        assert torch.equal(keys, whole) and torch.equal(values, -whole)
    first = layer.keys.data_ptr()
    layer.update(chunks[1], -chunks[1])  # room left: written in place, no new buffer
    assert layer.keys.data_ptr() == first
    layer.batch_select_indices(torch.tensor([1]))  # replaced from outside: copied on the next update
    keys, _ = layer.update(chunks[2][1:], -chunks[2][1:])
    assert torch.equal(keys, torch.cat([whole[1:], chunks[1][1:], chunks[2][1:]], -2))
    cache = growing_cache([(whole, -whole), (None, None)])
    assert isinstance(cache.layers[0], GrowingLayer) and torch.equal(cache.layers[0].keys, whole)
    assert not cache.layers[1].is_initialized
