"""UpIT stage 1: experts from the checkpoints of one dense instruction-tuning run, or from existing files.

The dense stage is an ordinary `train.loop.run` of the recipe `config.stage_recipe(cfg, "prepare")`:

- kind `lora`: method `dense` with LoRA on the FFN projections; an expert = one checkpoint's FFN LoRA;
- kind `ffn`: method `upcycle` with one expert (the FFN itself, trained); an expert = one checkpoint's FFN;
- kind `adapter`: method `pesc` with one always-chosen adapter; an expert = one checkpoint's adapter.

Checkpoints are saved every `prepare.interval` of an epoch and all kept; the run's final state counts too.
Each chosen state is loaded into the stage's model (rebuilt with the run's seed, so before loading it holds
the step-0 state: the expert set's `base`) and read out under the canonical expert keys.
LoRA the dense stage trained elsewhere (attention) is merged into the base weights and averaged over the
chosen checkpoints (`prepare.shared`) into `ExpertSet.shared`.

This module reads the chosen states into an ExpertSet and runs the stage; the dense run and its saved states are
`dense_run.py`, reading weights out of a model `readout.py`, existing experts (`prepare.experts_from`)
`existing.py`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from ..errors import CheckpointError
from ..methods import method_for_kind
from ..methods.expert_set import ExpertSet, save_expert_set
from ..sources import load_base_model, resolve_base
from ..train.checkpoints import read_trainable
from .config import UpitConfig, stage_recipe
from .dense_run import Candidate, candidates, run_dense, select
from .existing import experts_from_paths
from .readout import combine_shared, read_experts, shared_lora_deltas

EXPERTS_SUBDIR = "experts"


# ------------------------------------------------------------------------------------ experts from the dense run


def _load_state(built, params: dict[str, nn.Parameter], candidate: Candidate) -> None:
    """Copy a saved state's trainable tensors into the dense-stage model."""
    if not candidate.final:
        tensors = read_trainable(candidate.path)  # also a sharded (FSDP / DeepSpeed) run's checkpoint
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
    craft = recipe.craft_config()
    base, meta = read_experts(built.inner, cfg.kind, craft)
    skip_ffn = method_for_kind(cfg.kind).upit_ffn_lora_is_expert  # then only the rest becomes shared weights
    states, deltas = [], []
    for candidate in chosen:
        _load_state(built, params, candidate)
        state, _ = read_experts(built.inner, cfg.kind, craft)
        states.append(state)
        deltas.append(shared_lora_deltas(built.inner, skip_ffn) if recipe.lora.enabled else {})
    base_model = None
    if cfg.prepare.shared != "base" and deltas and deltas[0]:
        base_model = load_base_model(resolve_base(recipe.model), dtype=torch.float32,
                                     allow_pickle=recipe.allow_pickle)
    shared = combine_shared(deltas, cfg.prepare.shared, base_model)
    meta.update(model=recipe.model, source="dense-stage", steps=[c.step for c in chosen],
                shared_mode=cfg.prepare.shared, shared_keys=len(shared))
    return ExpertSet(kind=cfg.kind, states=states, base=base, shared=shared, meta=meta,
                     names=[c.name for c in chosen])


# ---------------------------------------------------------------------------------------------------- the stage


def run_prepare(cfg: UpitConfig, *, resume: bool = False) -> ExpertSet:
    """Stage 1: the dense run (or the named existing experts) -> `prepare/experts/` (an ExpertSet)."""
    target = cfg.stage_dir("prepare") / EXPERTS_SUBDIR
    if cfg.prepare.experts_from:
        es = experts_from_paths(cfg.prepare.experts_from, cfg.model, cfg.kind, cfg.prepare.shared,
                                bool(cfg.common.get("allow_pickle")))
    else:
        out = run_dense(cfg, resume=resume)
        es = experts_from_run(cfg, out)
    save_expert_set(es, target)
    print(f"prepare: {len(es.states)} {es.kind} experts ({', '.join(es.names)}) -> {target}")
    return es
