"""Peak RSS of the bench's model-level step under glibc defaults, with grad strategies.
usage: memexp.py METHOD STRATEGY   (strategy: none | flat | keep)"""
import sys, json, gc, torch, functools
if 'fused' in sys.argv[3:]:
    torch.optim.AdamW = functools.partial(torch.optim.AdamW, fused=True)
from sparsecraft.bench.settings import BenchSettings
from sparsecraft.bench.model import build_model_variants
from sparsecraft.bench.worker import max_rss_bytes, reset_high_water_mark
method, strategy = sys.argv[1], sys.argv[2]
s = BenchSettings(levels=["model"], methods=[method], shape="smollm2-135m", batch_size=4, seq_len=256,
                  repeats=1, warmup=0, decode_tokens=0)
[v] = build_model_variants(s, [method], torch.device("cpu"), share_base=False)
params = [p for p in v.model.parameters() if p.requires_grad]
if strategy == "flat":
    total = sum(p.numel() for p in params)
    flat = torch.zeros(total)
    off = 0
    for p in params:
        p.grad = flat[off:off + p.numel()].view_as(p); off += p.numel()
reset_high_water_mark()
peaks = []
for _ in range(3):
    if strategy == "none":
        v.reset()
    else:
        for p in params:
            p.grad.zero_() if p.grad is not None else None
    v.step()
    peaks.append(max_rss_bytes() / 2**20)
print(json.dumps({"method": method, "strategy": strategy, "extra": sys.argv[3:], "peaks_mib": [round(x) for x in peaks]}))
