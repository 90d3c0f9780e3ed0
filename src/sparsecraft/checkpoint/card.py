"""Model cards: the README.md every model directory sparsecraft writes carries, built with huggingface_hub's
`ModelCard` / `ModelCardData` (YAML metadata the hub reads, then Markdown a person reads).

Metadata: `base_model` (a hub ID, when the base has one), `base_model_relation` (`adapter` when the directory
refers to its base, `finetune` when it holds it), `library_name`, `tags` (`moe`, the method), `datasets` (hub
dataset IDs of the recipe), `pipeline_tag`, and the held-out losses as `eval_results`. Body: the method and its
settings, the data, the held-out results and how to load the model.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..hub import looks_like_repo_id
from ..methods import get_method
from ..sources import BUILTIN_MODELS

CARD_NAME = "README.md"


def base_model_id(base: dict | None) -> str | None:
    """The hub ID of a saved base entry (`{"spec", "revision", ...}`), or None for a local base."""
    if not base or base.get("relative"):
        return None
    spec = str(base.get("spec") or "")
    if spec in BUILTIN_MODELS:
        return BUILTIN_MODELS[spec][3]
    if base.get("revision") or (looks_like_repo_id(spec) and not os.path.exists(spec)):
        return spec
    return None


def _hub_datasets(recipe: dict | None) -> list[str]:
    sources = ((recipe or {}).get("data") or {}).get("sources") or []
    paths = [s.get("path") if isinstance(s, dict) else s for s in sources]
    return sorted({str(p).split("@")[0] for p in paths if p and looks_like_repo_id(str(p)) and not os.path.exists(p)})


def _eval_results(summary: dict | None, name: str):
    from huggingface_hub import EvalResult

    out = []
    for key, value in sorted((summary or {}).items()):
        if key.startswith("eval_loss/") and isinstance(value, (int, float)):
            source = key.split("/", 1)[1]
            out.append(EvalResult(task_type="text-generation", dataset_type="held-out", dataset_name=f"held-out "
                                  f"{source} ({name})", metric_type="loss", metric_value=round(float(value), 4)))
    return out


def _settings_table(config: dict) -> list[str]:
    craft = config.get("craft") or {}
    keys = ("num_experts", "top_k", "adapter_dim", "scaling", "routing", "aux_loss_coef", "dropout", "layers")
    rows = [f"| {k} | {craft[k]} |" for k in keys if k in craft]
    return ["| setting | value |", "|---|---|", *rows] if rows else []


def _training_lines(recipe: dict | None, summary: dict | None) -> list[str]:
    if not recipe:
        return []
    lora, optim, train = recipe.get("lora") or {}, recipe.get("optim") or {}, recipe.get("train") or {}
    lines = ["## Training", "",
             f"- base quantisation: {recipe.get('quantization')}; LoRA: "
             + (f"r={lora.get('r')}, alpha={lora.get('alpha')}, dropout={lora.get('dropout')}, on "
                f"{', '.join(lora.get('targets') or [])}{' + FFN' if lora.get('ffn') else ''}"
                if lora.get("enabled") else "none"),
             f"- optimiser: lr {optim.get('lr')}, {optim.get('schedule')} schedule, warm-up {optim.get('warmup_ratio')}"
             f", batch {train.get('batch_size')} x {train.get('grad_accum')} accumulation, seed {train.get('seed')}"]
    if summary:
        lines.append(f"- {summary.get('steps')} steps, {summary.get('tokens')} tokens, "
                     f"{summary.get('trainable_params'):,} trainable of {summary.get('total_params'):,} parameters")
    sources = ((recipe.get("data") or {}).get("sources")) or []
    if sources:
        lines += ["", "Data:", ""]
        for s in sources:
            s = s if isinstance(s, dict) else {"path": s}
            share = f", weight {s['weight']}" if s.get("weight") else (f", {s['samples']} samples"
                                                                       if s.get("samples") else "")
            lines.append(f"- `{s.get('path')}` ({s.get('format', 'auto')}{share})")
    return lines + [""]


def _results_lines(summary: dict | None) -> list[str]:
    keys = sorted(k.split("/", 1)[1] for k in (summary or {}) if k.startswith("eval_loss/"))
    if not keys:
        return []
    lines = ["## Held-out results", "", "| source | loss before | loss after |", "|---|---|---|"]
    for source in keys:
        before = summary.get(f"initial_eval_loss/{source}")
        lines.append(f"| {source} | {before:.4f} | {summary[f'eval_loss/{source}']:.4f} |" if before is not None
                     else f"| {source} | - | {summary[f'eval_loss/{source}']:.4f} |")
    return lines + [""]


def model_card(config: dict, *, standalone: bool, name: str, base: dict | None = None, summary: dict | None = None):
    """The `ModelCard` of a model directory whose config.json is `config` (sparsecraft's format or a plain
    transformers one); `base`: where its base came from (defaults to `config["base"]`); `summary`: the training
    run's summary (held-out losses)."""
    from huggingface_hub import ModelCard, ModelCardData

    method = get_method(config.get("method") or "dense")
    base_id = base_model_id(base or config.get("base"))
    recipe = config.get("recipe")
    tags = ["sparsecraft", method.name] + (["moe", "mixture-of-experts"] if method.builds_moe else ["lora"])
    data = ModelCardData(
        base_model=base_id, library_name="sparsecraft", pipeline_tag="text-generation", tags=tags,
        datasets=_hub_datasets(recipe) or None, model_name=name, eval_results=_eval_results(summary, name) or None,
        **({"base_model_relation": "finetune" if standalone else "adapter"} if base_id else {}),
    )
    lines = [f"# {name}", "",
             f"A {method.title} model made with sparsecraft from "
             f"{'`' + base_id + '`' if base_id else 'a local base model'}"
             + (" (the base weights are in `base/`)." if standalone else
                " (this directory holds only what was added; the base is fetched from its own place on load)."), ""]
    settings = _settings_table(config)
    if settings:
        lines += ["## Method", "", *settings, ""]
    lines += _training_lines(recipe, summary) + _results_lines(summary)
    lines += ["## Use", "", "```python", "import sparsecraft", "", f'model = sparsecraft.load("{name}")',
              "```", "", "```bash", f'sparsecraft generate {name} --prompt "Hello"', "```", ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


def write_model_card(directory: str | os.PathLike, config: dict, *, standalone: bool, name: str | None = None,
                     base: dict | None = None, summary: dict | None = None) -> Path:
    """Write `directory/README.md` (see `model_card`); returns its path."""
    directory = Path(directory)
    card = model_card(config, standalone=standalone, name=name or directory.name, base=base, summary=summary)
    path = directory / CARD_NAME
    card.save(path)
    return path
