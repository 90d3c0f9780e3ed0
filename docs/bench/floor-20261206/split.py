"""Where PESC's extra step time goes: dense, pesc, pesc with adapters skipped (router+aux+dropout+casts only),
pesc with router skipped too (block returns F). Fixed batch, round robin."""
import sys, statistics, torch
from functools import partial
import sparsecraft.moe.layers as L
from sparsecraft.bench.timing import Timed, round_robin
from sparsecraft.train.recipe import load_recipe
from sparsecraft.train.setup import build_model, trainable_parameters
seq = int(sys.argv[1]); rounds = int(sys.argv[2])
real_dispatch, real_math = L.dispatch, L.pesc_math
def no_adapters(adapter_in, gates, indices, down, up, act, s, d):
    # keeps the graph connected to gates so the router still gets a gradient; no adapter work
    return adapter_in * gates.sum(-1, keepdim=True).to(adapter_in.dtype) * 0
def passthrough(x_flat, f_flat, *a, **k):
    return f_flat, None, None, None
models = {}
for v in ("dense", "pesc", "pesc-noadapt", "pesc-passthrough"):
    recipe = load_recipe("configs/quickstart.yaml", [f"method={v.split('-')[0]}"])
    built = build_model(recipe)
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for n, p in built.model.named_parameters():
            if n.endswith("experts.up"): p.normal_(0, 0.02, generator=g)
    opt = torch.optim.AdamW(list(trainable_parameters(built.model).values()), lr=1e-5, fused=True)
    models[v] = (built.model, opt)
ids = torch.randint(0, built.inner.config.vocab_size, (4, seq), generator=torch.Generator().manual_seed(0))
def step(v, model, opt):
    L.dispatch = no_adapters if v == "pesc-noadapt" else real_dispatch
    L.pesc_math = passthrough if v == "pesc-passthrough" else real_math
    if v == "pesc-passthrough":
        for m in model.modules():
            if isinstance(m, L.PescMoE): m.record_routing = lambda *a: None
    try:
        out = model(input_ids=ids, labels=ids)
        loss = out.loss
        loss.backward()
    finally:
        L.dispatch, L.pesc_math = real_dispatch, real_math
    opt.step()
items = [Timed(v, partial(step, v, *mo), reset=partial(mo[1].zero_grad, set_to_none=True)) for v, mo in models.items()]
round_robin(items, rounds, warmup=1, sync=lambda: None, progress=False)
med = {i.name: statistics.median(i.times_s) for i in items}
for k, m in med.items(): print(f"{k}: {m:.3f} s  {m/med['dense']:.3f}x", [round(t,3) for t in items[[i.name for i in items].index(k)].times_s])
