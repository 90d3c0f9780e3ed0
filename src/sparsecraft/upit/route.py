"""UpIT stage 3: seed data bucketed by expert perplexity, router rows pre-trained on the buckets.

1. Seed: `route.seed_fraction` of the training records (clamped to [seed_min, seed_max]), drawn with a seeded
   generator; `route.heldout_fraction` of it is held out to measure routing accuracy.
2. Buckets: each seed record's perplexity on its response tokens under the dense model carrying expert j alone
   (`build_moe` with that single expert: top-1 of one expert is that expert, so the model is dense + expert j);
   the record goes to the expert with the lowest perplexity. Empty buckets are a warning.
3. Router pre-training on the MoE of all n experts (experts frozen by default): per batch
   `lm_weight * L_lm + aux_weight * L_aux`, with L_lm the response-token LM loss and, per MoE layer,
   `L_aux = BCE(sigmoid(h·r_b), 1)` for the tokens of a record of bucket b; with `negatives` the other rows
   get `BCE(sigmoid(h·r_i), 0)` averaged over i != b, and the two halves are averaged (otherwise positives
   alone would let every logit grow). Averaged over layers and tokens.
4. Accuracy on the held-out seed records: a record is routed right when the argmax of its router
   probabilities (softmax of the logits), averaged over layers and its response tokens, is its bucket. The
   token-level rate (top-1 expert of each (layer, token) == bucket) is reported too, before and after.

Writes `route/buckets.json`, `route/router.safetensors` (`layers.{i}.router: [E, h]`), `route/accuracy.json`, and
with `freeze_experts: false` the experts as they trained, `route/experts/` (post-training starts from them).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ..checkpoint.atomic import atomic_write_json
from ..config import CraftConfig
from ..errors import CheckpointError, ConfigError
from ..moe.layers import RoutedBlock
from .config import RouteSettings, UpitConfig, stage_recipe
from .experts import ExpertSet, build_moe, save_expert_set

ROUTER_NAME = "router.safetensors"
BUCKETS_NAME = "buckets.json"
ACCURACY_NAME = "accuracy.json"
EXPERTS_SUBDIR = "experts"  # only when the experts trained with the router (route.freeze_experts: false)


# ------------------------------------------------------------------------------------------------ router files


def router_rows(model: nn.Module) -> dict[int, torch.Tensor]:
    """`{decoder layer index: router weight [E, h]}` of every MoE block of a model (fp32 copies on the CPU)."""
    rows = {m.layer_index: m.router.weight.detach().float().cpu().clone()
            for m in model.modules() if isinstance(m, RoutedBlock)}
    if not rows:
        raise ConfigError("the model has no MoE router")
    return dict(sorted(rows.items()))


def save_router(rows: dict[int, torch.Tensor], path: str | Path) -> Path:
    """Write `{layers.{i}.router: [E, h]}` atomically (temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({f"layers.{i}.router": w.contiguous() for i, w in rows.items()}, str(tmp))
    tmp.replace(path)
    return path


def load_router(path: str | Path) -> dict[int, torch.Tensor]:
    """Read a router file written by `save_router`: `{decoder layer index: [E, h]}`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"router file not found: {path}")
    try:
        tensors = load_file(str(path))
    except SafetensorError as exc:
        raise CheckpointError(f"{path} is corrupted or truncated: {exc}") from exc
    rows = {}
    for key, value in tensors.items():
        match = re.fullmatch(r"layers\.(\d+)\.router", key)
        if match is None or value.dim() != 2:
            raise CheckpointError(f"{path}: unexpected tensor {key} {tuple(value.shape)} (want layers.{{i}}.router "
                                  "[E, h])")
        rows[int(match.group(1))] = value
    return dict(sorted(rows.items()))


# ------------------------------------------------------------------------------------------------------ seeding


def seed_count(total: int, settings: RouteSettings) -> int:
    """Seed size: `seed_fraction * total`, clamped to [seed_min, seed_max] and to the data."""
    wanted = round(settings.seed_fraction * total)
    return min(total, max(settings.seed_min, min(settings.seed_max, wanted)))


def seed_split(total: int, settings: RouteSettings) -> tuple[list[int], list[int]]:
    """(router-training indices, held-out indices) into the training records, drawn with `route.seed`."""
    count = seed_count(total, settings)
    order = torch.randperm(total, generator=torch.Generator().manual_seed(settings.seed))[:count].tolist()
    held = round(settings.heldout_fraction * count)
    if settings.heldout_fraction > 0 and count >= 2:
        held = min(max(held, 1), count - 1)
    return sorted(order[held:]), sorted(order[:held])


def scored_mask(batch: dict, scope: str) -> torch.Tensor:
    """Bool `[B, T]`: the tokens that count (response tokens, or every real token)."""
    if scope == "response":
        return batch["labels"] != -100
    return batch["attention_mask"].bool()


def _batches(dataset, collator, batch_size: int, order: list[int] | None = None):
    order = list(range(len(dataset))) if order is None else order
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        yield idx, collator([dataset[i] for i in idx])


def _forward(model, batch: dict, device, **kwargs):
    inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask")}
    return model(**inputs, use_cache=False, **kwargs)


def _token_nll(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (sum of NLL, count) over next-token predictions of the scored tokens.
    `logits [B, T, V]`, `input_ids, mask [B, T]` -> `[B]`, `[B]`."""
    target = input_ids[:, 1:]
    keep = mask[:, 1:]
    nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), target, reduction="none")  # [B, T-1]
    return (nll * keep).sum(-1), keep.sum(-1)


@torch.no_grad()
def record_nll(model, dataset, collator, batch_size: int, scope: str, device="cpu") -> torch.Tensor:
    """Mean NLL per record over its scored tokens: `[S]` (perplexity = exp)."""
    out = torch.empty(len(dataset))
    for idx, batch in _batches(dataset, collator, batch_size):
        logits = _forward(model, batch, device).logits
        total, count = _token_nll(logits, batch["input_ids"].to(device), scored_mask(batch, scope).to(device))
        out[idx] = (total / count.clamp(min=1)).float().cpu()
    return out


def single_expert(es: ExpertSet, j: int) -> ExpertSet:
    return dataclasses.replace(es, states=[es.states[j]], names=[es.names[j]])


def expert_nll(base_model: nn.Module, es: ExpertSet, craft: CraftConfig, dataset, collator, batch_size: int,
               scope: str, device="cpu", progress: bool = True) -> torch.Tensor:
    """`[E, S]` mean response NLL of each seed record under the dense model carrying each expert alone."""
    one = dataclasses.replace(craft, num_experts=1, top_k=1)
    rows = []
    for j in tqdm(range(len(es.states)), desc="route: expert perplexity", unit="expert", disable=not progress):
        model = build_moe(copy.deepcopy(base_model), single_expert(es, j), one).to(device).eval()
        rows.append(record_nll(model, dataset, collator, batch_size, scope, device))
        del model
    return torch.stack(rows)


def bucket_report(nll: torch.Tensor, sources: list[str], train_idx: list[int], held_idx: list[int],
                  names: list[str], scope: str) -> dict:
    """buckets.json: bucket per seed record (lowest perplexity), sizes, and bucket counts per data source."""
    buckets = nll.argmin(0)
    num = nll.shape[0]
    sizes = torch.bincount(buckets, minlength=num).tolist()
    per_source: dict[str, list[int]] = {}
    for s, b in zip(sources, buckets.tolist()):
        per_source.setdefault(s, [0] * num)[b] += 1
    records = [{"index": i, "split": split, "source": s, "bucket": int(b),
                "perplexity": [round(math.exp(min(float(v), 80.0)), 4) for v in nll[:, k]]}
               for k, (i, split, s, b) in enumerate(zip(
                   train_idx + held_idx, ["train"] * len(train_idx) + ["heldout"] * len(held_idx), sources,
                   buckets.tolist()))]
    return {"experts": names, "sizes": sizes, "empty": [names[j] for j, n in enumerate(sizes) if n == 0],
            "by_source": per_source, "scope": scope, "records": records}


# -------------------------------------------------------------------------------------------- router training


def routing_loss(out, batch: dict, buckets: torch.Tensor, settings: RouteSettings) -> tuple[torch.Tensor, dict]:
    """`lm_weight * L_lm + aux_weight * L_aux` of one batch; `buckets: [B]` bucket of each row."""
    device = out.logits.device
    labels = batch["labels"].to(device)
    total, count = _token_nll(out.logits, batch["input_ids"].to(device), labels != -100)
    lm = total.sum() / count.sum().clamp(min=1)
    mask = scored_mask(batch, settings.tokens).to(device).reshape(-1)  # [N]
    target = buckets.to(device)[:, None].expand(labels.shape).reshape(-1)[mask]  # [n]
    layers = []
    for logits in out.router_logits:  # one [N, E] per MoE layer
        z = logits.float()[mask]
        pos = F.binary_cross_entropy_with_logits(z.gather(1, target[:, None]).squeeze(1), torch.ones_like(target,
                                                 dtype=z.dtype))
        if settings.negatives and z.shape[1] > 1:
            others = torch.ones_like(z, dtype=torch.bool).scatter_(1, target[:, None], False)
            neg = F.binary_cross_entropy_with_logits(z[others], torch.zeros(int(others.sum()), device=device))
            layers.append(0.5 * (pos + neg))
        else:
            layers.append(pos)
    aux = torch.stack(layers).mean()
    loss = settings.lm_weight * lm + settings.aux_weight * aux
    return loss, {"lm": lm.item(), "aux": aux.item()}


@torch.no_grad()
def routing_accuracy(model, dataset, collator, buckets: torch.Tensor, batch_size: int, scope: str,
                     device="cpu") -> dict:
    """Record accuracy (mean router probabilities over layers and scored tokens, argmax == bucket) and token
    accuracy (top-1 expert of each layer and scored token == bucket), over `dataset` with `buckets: [S]`."""
    if len(dataset) == 0:
        return {"records": 0, "record_accuracy": None, "token_accuracy": None}
    right, token_right, tokens = 0, 0.0, 0
    for idx, batch in _batches(dataset, collator, batch_size):
        out = _forward(model, batch, device, output_router_logits=True)
        mask = scored_mask(batch, scope).to(device)  # [B, T]
        b, t = mask.shape
        probs = torch.stack([torch.softmax(z.float(), -1).reshape(b, t, -1) for z in out.router_logits])  # [L,B,T,E]
        weight = mask[None, :, :, None].float()
        mean = (probs * weight).sum((0, 2)) / (weight.sum((0, 2)).clamp(min=1))  # [B, E]
        want = buckets[idx].to(device)
        right += int((mean.argmax(-1) == want).sum())
        top1 = probs.argmax(-1)  # [L, B, T]
        hit = (top1 == want[None, :, None]) & mask[None]
        token_right += float(hit.sum())
        tokens += int(mask.sum()) * probs.shape[0]
    return {"records": len(dataset), "record_accuracy": right / len(dataset),
            "token_accuracy": token_right / max(tokens, 1)}


def pretrain_router(model, dataset, collator, buckets: torch.Tensor, settings: RouteSettings,
                    device="cpu", progress: bool = True) -> list[dict]:
    """Train the router rows (and the experts unless frozen) on the bucketed seed records; returns per-epoch
    mean losses. The model stays in eval mode (no dropout) while its router learns."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    blocks = [m for m in model.modules() if isinstance(m, RoutedBlock)]
    params = [b.router.weight for b in blocks]
    if not settings.freeze_experts:
        params = [p for b in blocks for p in b.parameters()]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(settings.seed)
    history = []
    steps_per_epoch = math.ceil(len(dataset) / settings.batch_size)
    total = max(1, math.ceil(settings.epochs * steps_per_epoch))
    bar = tqdm(total=total, desc="route: router pre-training", unit="step", disable=not progress)
    step = 0
    while step < total:
        order = torch.randperm(len(dataset), generator=generator).tolist()
        sums = {"loss": 0.0, "lm": 0.0, "aux": 0.0, "batches": 0}
        for idx, batch in _batches(dataset, collator, settings.batch_size, order):
            if step >= total:
                break
            out = _forward(model, batch, device, output_router_logits=True)
            loss, parts = routing_loss(out, batch, buckets[idx], settings)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sums["loss"] += loss.item()
            sums["lm"] += parts["lm"]
            sums["aux"] += parts["aux"]
            sums["batches"] += 1
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", aux=f"{parts['aux']:.3f}")
        n = max(sums.pop("batches"), 1)
        history.append({k: v / n for k, v in sums.items()})
    bar.close()
    for p in params:
        p.requires_grad_(False)
    return history


def states_from_moe(model: nn.Module, es: ExpertSet) -> list[dict[str, torch.Tensor]]:
    """The experts' states read back from an MoE built by `build_moe(model, es, ...)`, under `es`'s keys (for
    router pre-training with unfrozen experts)."""
    from ..craft import crafted_layers
    from ..moe.upcycle import CopiedExperts

    states: list[dict[str, torch.Tensor]] = [{} for _ in es.states]
    for i, mlp in crafted_layers(model):
        experts = mlp.moe.experts
        prefix = f"layers.{i}."
        keys = [k[len(prefix):] for k in es.base if k.startswith(prefix)]
        for e, state in enumerate(states):
            if es.kind == "lora":
                # canonical `{proj}.lora_A|lora_B` <- the block's `A[proj]` / `B[proj]` (named apart from peft's)
                parts = {k: (experts.A if k.endswith(".lora_A") else experts.B)[k.rsplit(".", 1)[0]][e]
                         for k in keys}
            elif es.kind == "adapter":
                parts = {"down": experts.down[e], "up": experts.up[e]}
            elif isinstance(experts, CopiedExperts):
                parts = dict(experts[e].state_dict())
            else:
                gate_up, inter = experts.gate_up_proj[e], experts.down_proj.shape[-1]
                parts = {"down_proj.weight": experts.down_proj[e]}
                parts.update({"gate_up_proj.weight": gate_up} if experts.fused else
                             {"gate_proj.weight": gate_up[:inter], "up_proj.weight": gate_up[inter:]})
            state.update({prefix + k: v.detach().float().cpu().clone() for k, v in parts.items() if k in keys})
    return states


# ---------------------------------------------------------------------------------------------------- the stage


def _write_json(path: Path, data) -> None:
    atomic_write_json(path, data, indent=1)


def _encode(records, indices: list[int], tokenizer, data_cfg) -> tuple[list[dict], list[int]]:
    """Tokenise the records at `indices` as training does (prompt masked, truncated); records with no scored
    token left are dropped. Returns (samples, the indices kept)."""
    from ..data import BadRecord, encode_conversation, resolve_template
    from ..data.templates import bos_to_add
    from ..data.tokenize import truncate

    template, bos = resolve_template(tokenizer, data_cfg.template), bos_to_add(tokenizer)
    samples, kept = [], []
    for i in indices:
        try:
            ids, labels = encode_conversation(tokenizer, records[i]["messages"], template, bos)
        except BadRecord:
            continue
        ids, labels = truncate(ids, labels, data_cfg.max_length, data_cfg.truncation, tokenizer.bos_token_id)
        if any(x != -100 for x in labels):
            samples.append({"input_ids": ids, "labels": labels})
            kept.append(i)
    return samples, kept


def _seed_data(cfg: UpitConfig):
    """(collator, train-part samples, held-out samples, their record indices, their sources)."""
    from ..data import DataConfig, PaddingCollator, load_records
    from ..data.collate import pad_id_of
    from ..sources import load_tokenizer, resolve_base

    recipe = stage_recipe(cfg, "upcycle")
    data_cfg = DataConfig.from_dict(recipe.data)
    records, _, _ = load_records(data_cfg)
    train_idx, held_idx = seed_split(len(records), cfg.route)
    tokenizer = load_tokenizer(resolve_base(recipe.model))
    if tokenizer is None:
        raise ConfigError(f"base {recipe.model} has no tokenizer; routing needs one")
    train, train_idx = _encode(records, train_idx, tokenizer, data_cfg)
    held, held_idx = _encode(records, held_idx, tokenizer, data_cfg)
    sources = [records[i]["source"] for i in train_idx + held_idx]
    return PaddingCollator(pad_id_of(tokenizer)), train, held, train_idx, held_idx, sources


def run_route(cfg: UpitConfig, es: ExpertSet, *, resume: bool = False) -> dict:
    """Stage 3 (see the module docstring). Reuses `buckets.json` when resuming. Returns accuracy.json's data."""
    from ..sources import load_base_model, resolve_base

    out = cfg.stage_dir("route")
    out.mkdir(parents=True, exist_ok=True)
    settings = cfg.route
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    post = stage_recipe(cfg, "upcycle")
    craft, progress = CraftConfig.from_dict(post.craft), post.logging.progress
    if craft.num_experts != len(es.states):
        raise ConfigError(f"craft.num_experts is {craft.num_experts} but the expert set holds {len(es.states)}")
    collator, train_ds, held_ds, train_idx, held_idx, sources = _seed_data(cfg)
    if not train_idx:
        raise ConfigError("route: the seed holds no record to pre-train the router on; raise route.seed_min")
    seed_ds = train_ds + held_ds
    base = load_base_model(resolve_base(cfg.model), dtype=torch.float32)
    buckets_path = out / BUCKETS_NAME
    reuse = None
    if resume and buckets_path.is_file():
        reuse = json.loads(buckets_path.read_text())
        # buckets of another seed split or expert set would be matched to the wrong records: recompute those
        if ([r["index"] for r in reuse.get("records", [])] != train_idx + held_idx
                or reuse.get("experts") != list(es.names)):
            print(f"route: {buckets_path} is from another seed split or expert set; recomputing it")
            reuse = None
    if reuse is not None:
        report = reuse
        buckets = torch.tensor([r["bucket"] for r in report["records"]])
        print(f"route: reusing {buckets_path}")
    else:
        print(f"route: {len(train_idx)} + {len(held_idx)} held-out seed records, {len(es.states)} experts")
        nll = expert_nll(base, es, craft, seed_ds, collator, settings.batch_size, settings.tokens, device, progress)
        report = bucket_report(nll, sources, train_idx, held_idx, list(es.names), settings.tokens)
        buckets = nll.argmin(0)
        _write_json(buckets_path, report)
    print(f"route: bucket sizes {dict(zip(report['experts'], report['sizes']))}")
    if report["empty"]:
        warnings.warn(f"route: no seed record chose expert(s) {', '.join(report['empty'])}; their router rows "
                      "learn from negatives only", stacklevel=2)
    model = build_moe(base, es, craft, seed=settings.seed).to(device)
    n_train = len(train_idx)
    train_buckets, held_buckets = buckets[:n_train], buckets[n_train:]
    before = routing_accuracy(model, held_ds, collator, held_buckets, settings.batch_size, settings.tokens, device) \
        if held_idx else {}
    history = pretrain_router(model, train_ds, collator, train_buckets, settings, device, progress)
    after = routing_accuracy(model, held_ds, collator, held_buckets, settings.batch_size, settings.tokens, device) \
        if held_idx else {}
    if not settings.freeze_experts:  # the experts trained too: post-training starts from these states
        save_expert_set(dataclasses.replace(es, states=states_from_moe(model, es)), out / EXPERTS_SUBDIR)
    save_router(router_rows(model), out / ROUTER_NAME)
    sizes = report["sizes"]
    result = {
        "heldout_records": len(held_idx), "record_accuracy": after.get("record_accuracy"),
        "token_accuracy": after.get("token_accuracy"), "record_accuracy_before": before.get("record_accuracy"),
        "token_accuracy_before": before.get("token_accuracy"), "chance": 1 / len(sizes),
        "majority_bucket_share": max(sizes) / max(sum(sizes), 1), "history": history,
        "settings": dataclasses.asdict(settings),
    }
    _write_json(out / ACCURACY_NAME, result)
    acc = result["record_accuracy"]
    print(f"route: held-out routing accuracy {acc:.3f} (before {result['record_accuracy_before']:.3f}, chance "
          f"{result['chance']:.3f})" if acc is not None else "route: no held-out seed records")
    return result


def route_done(cfg: UpitConfig) -> bool:
    out = cfg.stage_dir("route")
    return (out / ROUTER_NAME).is_file() and (out / ACCURACY_NAME).is_file()

