"""UpIT stage 1: experts from the checkpoints of one dense instruction-tuning run, or from existing files.

The dense stage is an ordinary `train.loop.run` of the recipe `config.stage_recipe(cfg, "prepare")`:

- kind `lora`: method `dense` with LoRA on the FFN projections; an expert = one checkpoint's FFN LoRA;
- kind `ffn`: method `upcycle` with one expert (the FFN itself, trained); an expert = one checkpoint's FFN;
- kind `adapter`: method `pesc` with one always-chosen adapter; an expert = one checkpoint's adapter.

Checkpoints are saved every `prepare.interval` of an epoch and all kept; the run's final state counts too.
Each chosen state is loaded into the stage's model (rebuilt with the run's seed, so before loading it holds
the step-0 state: the expert set's `base`) and read out under the canonical keys of `upit.experts`.
LoRA the dense stage trained elsewhere (attention) is merged into the base weights and averaged over the
chosen checkpoints (`prepare.shared`) into `ExpertSet.shared`.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from ..craft import find_decoder_layers, find_ffn, text_config
from ..errors import CheckpointError, ConfigError
from ..sources import load_base_model, resolve_base
from .config import UpitConfig, stage_recipe
from .experts import ExpertSet, expert_state, lora_meta, save_expert_set

EXPERTS_SUBDIR = "experts"


@dataclass
class Candidate:
    """A saved state of the dense run: a checkpoint (`OUT/checkpoints/step-N`) or the final model (`OUT/model`)."""

    step: int
    path: Path
    final: bool = False

    @property
    def name(self) -> str:
        return f"step{self.step}"


# ---------------------------------------------------------------------------------------------- the dense run


def checkpoint_interval(recipe, interval: float) -> tuple[int, int]:
    """(checkpoint.every in optimizer steps, total steps) for a checkpoint every `interval` epochs.

    Counted on the loaded records with one process (what `sparsecraft upit` runs); samples dropped later by
    tokenisation can make the real epoch a little shorter.
    """
    from ..data import DataConfig, load_records
    from ..train.batches import BatchPlan

    data = DataConfig.from_dict(recipe.data)
    if data.packing:
        # packed rows are fewer than records, so an interval counted in records would be several times too long
        raise ConfigError("prepare: data.packing is not supported in the dense stage (checkpoint intervals are "
                          "counted in records); set data.packing=false")
    train, _, _ = load_records(data)
    plan = BatchPlan(len(train), recipe.train.batch_size, 1, 0, recipe.train.grad_accum, recipe.train.seed)
    if plan.steps_per_epoch == 0:
        raise ConfigError(f"{len(train)} training records cannot fill one optimizer step of "
                          f"{recipe.train.batch_size * recipe.train.grad_accum}; lower train.batch_size")
    every = max(1, round(interval * plan.steps_per_epoch))
    return every, plan.total_steps(recipe.train.epochs, recipe.train.max_steps)


def run_dense(cfg: UpitConfig, *, resume: bool = False) -> Path:
    """Train the dense stage (skipped when `prepare/summary.json` exists); returns its output directory."""
    from ..train.checkpoints import latest_checkpoint
    from ..train.loop import run

    recipe = stage_recipe(cfg, "prepare")
    every, total = checkpoint_interval(recipe, cfg.prepare.interval)
    recipe.checkpoint.every = every
    available = len(range(every, total, every)) + 1  # the loop saves no checkpoint at the last step: the model
    needed = max(cfg.prepare.select) if isinstance(cfg.prepare.select, list) else None
    if available < cfg.prepare.num_experts:
        raise ConfigError(f"the dense stage saves {available} states ({total} steps, a checkpoint every {every}); "
                          f"prepare.num_experts={cfg.prepare.num_experts} needs more: lower prepare.interval or "
                          "train longer")
    if needed is not None and needed > total:
        raise ConfigError(f"prepare.select names step {needed} but the dense stage runs {total} steps")
    out = Path(recipe.output_dir)
    if (out / "summary.json").is_file():
        print(f"prepare: dense stage already trained in {out}")
        return out
    print(f"prepare: dense stage (method {recipe.method}), {total} steps, a checkpoint every {every} steps")
    run(recipe, resume=resume and latest_checkpoint(out) is not None)
    return out


def candidates(out: Path) -> list[Candidate]:
    """The dense run's saved states, oldest first: its checkpoints, then its final model."""
    from ..train.checkpoints import list_checkpoints

    found = [Candidate(json.loads((c / "state.json").read_text())["step"], c) for c in list_checkpoints(out)]
    summary = out / "summary.json"
    if summary.is_file():
        found.append(Candidate(int(json.loads(summary.read_text())["steps"]), out / "model", final=True))
    return found


def select(found: list[Candidate], m: int, how) -> list[Candidate]:
    """m of the candidates: `even` (evenly spaced, ending at the last), `last`, or a list of steps."""
    if isinstance(how, list):
        by_step = {c.step: c for c in found}
        missing = [s for s in how if s not in by_step]
        if missing:
            raise ConfigError(f"prepare.select: no saved state at step {missing[0]} "
                              f"(saved: {', '.join(str(c.step) for c in found)})")
        return [by_step[s] for s in how]
    if len(found) < m:
        raise ConfigError(f"prepare: {len(found)} saved states, fewer than prepare.num_experts={m}")
    if how == "last":
        return found[-m:]
    count = len(found)
    return [found[math.ceil((j + 1) * count / m) - 1] for j in range(m)]


# ----------------------------------------------------------------------------------- reading experts from a model


def ffn_modules(model: nn.Module) -> list[tuple[int, str, nn.Module]]:
    """`(layer index, qualified name, FFN module)` of every decoder layer of a (possibly peft-injected) model."""
    layers_name, layers = find_decoder_layers(model)
    hidden = text_config(model).hidden_size
    out = []
    for i, layer in enumerate(layers):
        name, ffn = find_ffn(layer, hidden)
        out.append((i, f"{layers_name}.{i}.{name}", ffn))
    return out


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", torch.float32).clone()


def _lora_layers(model: nn.Module):
    from peft.tuners.lora import LoraLayer

    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            yield name, module


def shared_lora_deltas(model: nn.Module, skip_ffn: bool) -> dict[str, torch.Tensor]:
    """`{dense state-dict key: scaling * B @ A}` of LoRA outside the experts (attention; FFN when not experts)."""
    prefixes = tuple(qual + "." for _, qual, _ in ffn_modules(model)) if skip_ffn else ()
    return {f"{name}.weight": _cpu(module.get_delta_weight("default"))
            for name, module in _lora_layers(model) if not (prefixes and name.startswith(prefixes))}


def ffn_expert_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """FFN of a one-expert upcycled model: `layers.{i}.{param path inside the MLP}` (e.g. `gate_proj.weight`)."""
    from ..moe.upcycle import dense_ffn_state

    layers_name, _ = find_decoder_layers(model)
    pattern = re.compile(rf"^{re.escape(layers_name)}\.(\d+)\.[^.]+\.(.+)$")
    state = {}
    for key, value in dense_ffn_state(model).items():
        match = pattern.match(key)
        if match is None:
            raise CheckpointError(f"unexpected upcycled FFN key {key}")
        state[f"layers.{match.group(1)}.{match.group(2)}"] = _cpu(value)
    return state


def read_experts(model: nn.Module, kind: str) -> tuple[dict[str, torch.Tensor], dict]:
    """The canonical expert state the live dense-stage model holds now, and meta."""
    if kind == "lora":
        return expert_state(model, "lora"), lora_meta(model)
    if kind == "adapter":
        return expert_state(model, "adapter"), {}
    return ffn_expert_state(model), {}  # the dense stage's FFN is a one-expert upcycled block


def combine_shared(deltas: list[dict[str, torch.Tensor]], mode: str, base_model: nn.Module | None) -> dict:
    """Shared weights `{base state-dict key: base weight + delta}`, the delta being the mean (`average`) or the
    last (`last`) of the experts' deltas; empty for `base`. Weights no expert changed are left out."""
    if mode == "base" or not deltas or not deltas[0]:
        return {}
    chosen = deltas if mode == "average" else deltas[-1:]
    weights = base_model.state_dict()
    shared = {}
    for key in deltas[0]:
        if key not in weights:
            raise CheckpointError(f"shared weight {key} is not a weight of the base model")
        mean = torch.stack([d[key] for d in chosen]).mean(0)
        if mean.any():
            shared[key] = (weights[key].detach().float().cpu() + mean.reshape(weights[key].shape)).contiguous()
    return shared


def _load_state(built, params: dict[str, nn.Parameter], candidate: Candidate) -> None:
    """Copy a saved state's trainable tensors into the dense-stage model."""
    if not candidate.final:
        tensors = load_file(str(candidate.path / "trainable.safetensors"))
        if set(tensors) != set(params):
            raise CheckpointError(f"{candidate.path} does not hold this dense stage's trainable parameters")
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(tensors[name].to(param.device, param.dtype))
        return
    from ..checkpoint.crafted import load_new_weights

    weights = candidate.path / "sparsecraft.safetensors"
    if weights.is_file():
        load_new_weights(built.inner, weights)
    lora = candidate.path / "lora" / "adapter_model.safetensors"
    if lora.is_file():
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(built.model, load_file(str(lora)))


def experts_from_run(cfg: UpitConfig, out: Path) -> ExpertSet:
    """Read the chosen states of a finished dense run as an ExpertSet (base = the step-0 state)."""
    from accelerate.utils import set_seed

    from ..train.setup import build_model, trainable_parameters

    recipe = stage_recipe(cfg, "prepare")
    chosen = select(candidates(out), cfg.prepare.num_experts, cfg.prepare.select)
    set_seed(recipe.train.seed)  # as the loop did before building: the same initial LoRA / adapter
    built = build_model(recipe)
    built.model.eval()
    params = trainable_parameters(built.model)
    base, meta = read_experts(built.inner, cfg.kind)
    skip_ffn = cfg.kind == "lora"
    states, deltas = [], []
    for candidate in chosen:
        _load_state(built, params, candidate)
        state, _ = read_experts(built.inner, cfg.kind)
        states.append(state)
        deltas.append(shared_lora_deltas(built.inner, skip_ffn) if recipe.lora.enabled else {})
    base_model = None
    if cfg.prepare.shared != "base" and deltas and deltas[0]:
        base_model = load_base_model(resolve_base(recipe.model), dtype=torch.float32)
    shared = combine_shared(deltas, cfg.prepare.shared, base_model)
    if cfg.kind == "adapter":
        craft = recipe.craft_config()
        meta = {"adapter_dim": craft.adapter_dim, "scaling": craft.scaling, "activation": craft.activation}
    meta.update(model=recipe.model, source="dense-stage", steps=[c.step for c in chosen],
                shared_mode=cfg.prepare.shared, shared_keys=len(shared))
    return ExpertSet(kind=cfg.kind, states=states, base=base, shared=shared, meta=meta,
                     names=[c.name for c in chosen])


# ------------------------------------------------------------------------------------------- existing experts


def expert_name(path: Path) -> str:
    """A label for an expert folder: its name, or its parent's for generic names (`run/model/lora` -> `run`)."""
    for part in reversed(path.resolve().parts):
        if part not in ("lora", "model", "adapter", "checkpoint", "final"):
            return part
    return path.name


def _peft_dir(path: Path) -> Path | None:
    """The PEFT adapter folder of `path`: itself, or a sparsecraft dense model's `lora/`."""
    for candidate in (path, path / "lora"):
        if (candidate / "adapter_config.json").is_file():
            return candidate
    return None


def _read_peft(path: Path) -> tuple[dict, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """(adapter config, {module name: (A [r, in], B [out, r])}) of a PEFT LoRA adapter folder."""
    config = json.loads((path / "adapter_config.json").read_text())
    if config.get("peft_type", "LORA") != "LORA" or config.get("use_dora"):
        raise ConfigError(f"{path}: only plain LoRA adapters can be experts (found {config.get('peft_type')}"
                          f"{', DoRA' if config.get('use_dora') else ''})")
    if config.get("fan_in_fan_out"):
        raise ConfigError(f"{path}: fan_in_fan_out LoRA (GPT-2 Conv1D) adapters are not supported")
    weights = path / "adapter_model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"{path} has no adapter_model.safetensors (pickled .bin adapters are not read)")
    tensors = load_file(str(weights))
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        match = re.match(r"^(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$", key)
        if match is None:
            raise ConfigError(f"{path}: unsupported adapter tensor {key} (only LoRA A/B of linear layers)")
        pairs.setdefault(match.group(1), {})[match.group(2)] = value.float()
    incomplete = [m for m, ab in pairs.items() if set(ab) != {"A", "B"}]
    if incomplete:
        raise CheckpointError(f"{path}: LoRA module {incomplete[0]} lacks its A or B matrix")
    return config, {m: (ab["A"], ab["B"]) for m, ab in pairs.items()}


def _lora_scaling(config: dict, module: str, r: int) -> float:
    alpha = config.get("alpha_pattern", {}).get(module.split(".")[-1], config.get("lora_alpha", r))
    return float(alpha) / (math.sqrt(r) if config.get("use_rslora") else r)


def lora_experts_from_peft(paths: list[Path], base_model: nn.Module, shared_mode: str) -> ExpertSet:
    """PEFT LoRA adapters of the same base as experts: FFN LoRA -> expert states (padded to the largest rank,
    each adapter's own scaling folded into B), other LoRA -> merged into `shared`. base = zeros."""
    ffn_names = {qual: i for i, qual, _ in ffn_modules(base_model)}
    experts, deltas = [], []
    for path in paths:
        config, modules = _read_peft(path)
        state: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
        delta = {}
        for module, (a, b) in modules.items():
            owner = next((q for q in ffn_names if module.startswith(q + ".")), None)
            scaling = _lora_scaling(config, module, a.shape[0])
            if owner is None:
                delta[f"{module}.weight"] = scaling * (b @ a)
            else:
                state[f"layers.{ffn_names[owner]}.{module[len(owner) + 1:]}"] = (a, b, scaling)
        if not state:
            raise ConfigError(f"{path} has no LoRA on the FFN projections: LoRA experts are FFN LoRA")
        experts.append(state)
        deltas.append(delta)
    keys = sorted(set().union(*experts))
    r = max(a.shape[0] for e in experts for a, _, _ in e.values())
    scalings = {s for e in experts for _, _, s in e.values()}
    ranks = {a.shape[0] for e in experts for a, _, _ in e.values()}
    common = scalings.pop() if len(scalings) == 1 and len(ranks) == 1 else 1.0
    shapes = {}
    for e in experts:
        for key, (a, b, _) in e.items():
            shapes[key] = (a.shape[1], b.shape[0])
    states = []
    for e in experts:
        state = {}
        for key in keys:
            fan_in, fan_out = shapes[key]
            a_full, b_full = torch.zeros(r, fan_in), torch.zeros(fan_out, r)
            if key in e:  # a module an adapter did not train is a zero LoRA there
                a, b, scaling = e[key]
                a_full[: a.shape[0]] = a
                b_full[:, : b.shape[1]] = b * (scaling / common)
            state[f"{key}.lora_A"], state[f"{key}.lora_B"] = a_full, b_full
        states.append(state)
    all_deltas = sorted(set().union(*deltas))
    deltas = [{k: d.get(k, torch.zeros(0)) for k in all_deltas} for d in deltas]
    for d in deltas:  # a module an adapter did not train has a zero delta
        for k, v in d.items():
            if v.numel() == 0:
                d[k] = torch.zeros(base_model.state_dict()[k].shape)
    shared = combine_shared(deltas, shared_mode, base_model)
    base = {k: torch.zeros_like(v) for k, v in states[0].items()}
    meta = {"r": r, "alpha": common * r, "scaling": common, "targets": sorted({k.split(".", 2)[2] for k in keys}),
            "source": "peft-adapters", "paths": [str(p) for p in paths]}
    return ExpertSet(kind="lora", states=states, base=base, shared=shared, meta=meta,
                     names=[expert_name(p) for p in paths])


def ffn_experts_from_checkpoints(paths: list[Path], base_model: nn.Module, shared_mode: str) -> ExpertSet:
    """Full checkpoints of the same base as experts: their FFNs -> experts, other weights -> `shared`
    (`average`: mean of the checkpoints, `last`: the last one's, `base`: none). base = the base's FFNs."""
    from ..loading import load

    def ffn_state(model) -> dict[str, torch.Tensor]:
        return {f"layers.{i}.{n}": _cpu(p) for i, _, ffn in ffn_modules(model) for n, p in ffn.named_parameters()}

    ffn_prefixes = tuple(qual + "." for _, qual, _ in ffn_modules(base_model))
    base_weights = base_model.state_dict()
    states, others = [], []
    for path in paths:
        model = load(path, dtype=torch.float32)
        from ..craft import is_crafted

        if is_crafted(model):
            raise ConfigError(f"{path} is a mixture-of-experts model; FFN experts come from dense checkpoints")
        weights = model.state_dict()
        for key, value in base_weights.items():
            if key not in weights or weights[key].shape != value.shape:
                raise ConfigError(f"{path} is not a checkpoint of the same base: {key} differs")
        states.append(ffn_state(model))
        others.append({k: (v.float() - base_weights[k].float()).cpu() for k, v in weights.items()
                       if not k.startswith(ffn_prefixes)})
        del model
    shared = combine_shared(others, shared_mode, base_model)
    return ExpertSet(kind="ffn", states=states, base=ffn_state(base_model), shared=shared,
                     meta={"source": "checkpoints", "paths": [str(p) for p in paths], "shared_mode": shared_mode},
                     names=[expert_name(p) for p in paths])


def experts_from_paths(paths: list[str | Path], model: str, kind: str, shared: str = "average") -> ExpertSet:
    """Existing experts instead of the dense stage.

    kind `lora`: PEFT LoRA adapter folders (or sparsecraft `method: dense` model folders holding `lora/`) of the
    base `model`; kind `ffn`: full checkpoints of it (transformers folders, or sparsecraft dense folders whose
    LoRA is merged on load). `shared`: average | last | base, as `prepare.shared`.
    """
    if len(paths) < 1:
        raise ConfigError("prepare.experts_from is empty")
    resolved = [Path(p) for p in paths]
    for p in resolved:
        if not p.is_dir():
            raise CheckpointError(f"expert path not found: {p}")
    base_model = load_base_model(resolve_base(model), dtype=torch.float32)
    if kind == "lora":
        peft_dirs = [_peft_dir(p) for p in resolved]
        bad = [p for p, d in zip(resolved, peft_dirs) if d is None]
        if bad:
            raise ConfigError(f"{bad[0]} is not a PEFT LoRA adapter folder (no adapter_config.json)")
        es = lora_experts_from_peft(peft_dirs, base_model, shared)
    elif kind == "ffn":
        es = ffn_experts_from_checkpoints(resolved, base_model, shared)
    else:
        raise ConfigError(f"existing experts can be LoRA adapters (kind lora) or checkpoints (kind ffn), "
                          f"not kind {kind}")
    es.meta["model"] = model
    return es


# ---------------------------------------------------------------------------------------------------- the stage


def run_prepare(cfg: UpitConfig, *, resume: bool = False) -> ExpertSet:
    """Stage 1: the dense run (or the named existing experts) -> `prepare/experts/` (an ExpertSet)."""
    target = cfg.stage_dir("prepare") / EXPERTS_SUBDIR
    if cfg.prepare.experts_from:
        es = experts_from_paths(cfg.prepare.experts_from, cfg.model, cfg.kind, cfg.prepare.shared)
    else:
        out = run_dense(cfg, resume=resume)
        es = experts_from_run(cfg, out)
    save_expert_set(es, target)
    print(f"prepare: {len(es.states)} {es.kind} experts ({', '.join(es.names)}) -> {target}")
    return es
