"""Profile one fixed-batch training step of dense vs pesc (quickstart), op totals side by side."""
import sys, collections, torch
import torch.nn.functional as F
from torch.profiler import profile, ProfilerActivity
from sparsecraft.train.recipe import load_recipe
from sparsecraft.train.setup import build_model, trainable_parameters

seq = int(sys.argv[1]) if len(sys.argv) > 1 else 256
extra = sys.argv[2:]
models = {}
for method in ("dense", "pesc"):
    recipe = load_recipe("configs/quickstart.yaml", [f"method={method}", *extra])
    built = build_model(recipe)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in built.model.named_parameters():
            if name.endswith("experts.up"):
                p.normal_(0.0, 0.02, generator=gen)
    opt = torch.optim.AdamW(list(trainable_parameters(built.model).values()), lr=1e-5, fused=True)
    models[method] = (built.model, opt)
ids = torch.randint(0, built.inner.config.vocab_size, (4, seq), generator=torch.Generator().manual_seed(0))
def step(model, opt):
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step(); opt.zero_grad(set_to_none=True)
for _ in range(3):
    for m, o in models.values():
        step(m, o)
tables = {}
for name, (m, o) in models.items():
    with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
        for _ in range(2):
            step(m, o)
    agg = collections.Counter()
    cnt = collections.Counter()
    for ev in prof.key_averages():
        agg[ev.key] += ev.self_cpu_time_total / 2
        cnt[ev.key] += ev.count / 2
    tables[name] = (agg, cnt)
    print(name, "total self ms", sum(agg.values()) / 1e3)
d, p = tables["dense"][0], tables["pesc"][0]
keys = sorted(set(d) | set(p), key=lambda k: -(p[k] - d[k]))
print(f"{'op':55s} {'dense ms':>9s} {'pesc ms':>9s} {'diff':>9s} {'n_d':>6s} {'n_p':>6s}")
for k in keys[:45]:
    print(f"{k[:55]:55s} {d[k]/1e3:9.1f} {p[k]/1e3:9.1f} {(p[k]-d[k])/1e3:9.1f} {tables['dense'][1][k]:6.0f} {tables['pesc'][1][k]:6.0f}")
print("sum diff", (sum(p.values()) - sum(d.values())) / 1e3)
