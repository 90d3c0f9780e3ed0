import sys, torch, time, collections
from torch.profiler import profile, ProfilerActivity
from sparsecraft.moe.grouped import grouped_adapters
from sparsecraft.moe.masked_dense import masked_dense_adapters
import torch.nn.functional as F
N = int(sys.argv[1]); E, k, r, h = 8, 2, 64, 576
dt = torch.bfloat16
g = torch.Generator().manual_seed(0)
x = torch.randn(N, h, generator=g).to(dt).requires_grad_()
down = (torch.randn(E, r, h, generator=g) * 0.02).requires_grad_()
up = (torch.randn(E, h, r, generator=g) * 0.02).requires_grad_()
logits = torch.randn(N, E, generator=g) + torch.linspace(0, 1.5, E)
gates, idx = logits.softmax(-1).topk(k, -1)
gates = gates.to(dt).requires_grad_()
act = F.gelu
def run(fn):
    out = fn(x, gates, idx, down.to(dt), up.to(dt), act)
    out.backward(torch.ones_like(out))
for name, fn in (("grouped", grouped_adapters), ("masked", masked_dense_adapters)):
    for _ in range(20): run(fn)
    t = time.perf_counter()
    for _ in range(50): run(fn)
    print(name, "ms/call", (time.perf_counter() - t) / 50 * 1e3)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(10): run(fn)
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    tot = sum(e.self_cpu_time_total for e in rows) / 10
    print(f"  profiled total {tot/1e3:.2f} ms")
    for e in rows[:22]:
        print(f"  {e.key[:45]:45s} {e.self_cpu_time_total/10:8.0f} us  n={e.count//10}")
