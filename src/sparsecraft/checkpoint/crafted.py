"""sparsecraft's own on-disk format for crafted models.

A crafted directory is self-describing and holds no pickle:

    config.json                 model_type "sparsecraft": crafting settings, the base's config, where the base is
    sparsecraft.safetensors     the new weights only (routers, adapters), sparsecraft's stacked key names
    tokenizer files             copied from the base when it has a tokenizer
    lora/                       only for LoRA-tuned models: a peft adapter directory, merged into the base on load
    base/                       only with standalone=True: the base model as a plain transformers directory
    shared.safetensors          only for referenced models whose base weights were replaced (UpIT's `shared`):
                                those tensors under the base's own keys, loaded into the base before crafting

`method` is a registered method's name (`methods/`: `pesc` adapter experts, `upcycle` FFN copies, `mixlora` /
`lora_experts` per-expert LoRA on the shared MLP, ...); the method says which weights the file holds and how
the structure is rebuilt on load. `dense` has no MoE: the dense-LoRA baseline, base + lora/ only.

Referenced directories point at their base (a built-in name, an absolute directory or GGUF file, or a hub ID with
the commit it resolved to) instead of
copying it. Loading = load the base with `from_pretrained` (so every from_pretrained option works: dtype,
device_map, 4-bit quantization), craft it with the saved settings, then load the new weights.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..atomic import atomic_directory
from ..config import CraftConfig
from ..errors import CheckpointError, ConfigError
from ..methods import get_method, method_of
from ..moe.model import set_saver
from ..nf4 import round_trip_nf4
from ..sources import (
    BUILTIN_MODELS,
    PICKLE_HELP,
    BaseSource,
    hub_options,
    load_base_config,
    load_base_model,
    load_tokenizer,
    resolve_base,
)
from ..surgery import craft_config_of, is_added_name, text_config
from .card import write_model_card

MODEL_TYPE = "sparsecraft"
WEIGHTS_NAME = "sparsecraft.safetensors"
SHARED_NAME = "shared.safetensors"
LORA_SUBDIR = "lora"
BASE_SUBDIR = "base"
FORMAT_VERSION = 1
# config fields compared between the saved base config and the base found at load time
_SHAPE_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size")


def base_source_of(model) -> BaseSource | None:
    """The base a model was crafted from, when sparsecraft loaded it (None for a model object built by hand)."""
    return getattr(model, "_sparsecraft_base", None)


def save_crafted(
    model,
    out_dir: str | os.PathLike,
    *,
    base: BaseSource | str | None = None,
    standalone: bool = False,
    tokenizer=None,
    lora_model=None,
    extra: dict | None = None,
    summary: dict | None = None,
    card_name: str | None = None,
    full_state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a crafted model to `out_dir` (atomically: a temp dir renamed into place).

    Args:
        base: the base to refer to; defaults to the one the model was loaded from. Required unless standalone.
        standalone: also write the base weights (`base/`) so the directory loads with no other file.
        tokenizer: saved beside the weights; defaults to the base's tokenizer when one can be found.
        lora_model: a peft model wrapping `model`; its LoRA adapter is saved in `lora/` and merged on load.
        extra: more JSON fields for config.json (e.g. the training recipe).
        summary: a training run's summary, for the model card's held-out results (README.md, always written).
        card_name: what the model card calls the model (default: the directory's name).
        full_state: whole tensors of a model trained sharded (FSDP, ZeRO-3), whose own parameters are shards:
            the state dict of the trained (peft) model, gathered; the added weights and the LoRA come from it.

    A model that is not crafted is saved as method `dense` (base + optional LoRA), the baseline's format.
    """
    method = method_of(model)
    if not method.builds_moe and lora_model is None:
        raise CheckpointError("save_crafted needs a crafted model (or a LoRA-tuned one); use sparsecraft.craft first")
    source = resolve_base(base) if isinstance(base, (str, os.PathLike)) else (base or base_source_of(model))
    if source is None and not standalone:
        raise CheckpointError("this model does not know its base: pass base=PATH or standalone=True")
    changed = getattr(model, "_sparsecraft_base_changed", None)
    if changed and not standalone:
        raise CheckpointError(f"this model's base weights differ from its base's files ({changed}): a directory "
                              "referring to the base would lose that; save it with standalone=True")
    cfg = craft_config_of(model) if method.builds_moe else None
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        if method.builds_moe:
            tensors = {name: p.detach().to("cpu").contiguous() for name, p in method.new_parameters(model).items()}
            if full_state is not None:
                tensors = {name: _gathered(full_state, name) for name in tensors}
            save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "producer": "sparsecraft"})
        if lora_model is not None:
            lora_model.save_pretrained(str(tmp / LORA_SUBDIR), **({"state_dict": full_state} if full_state else {}))
        shared = None
        if not standalone and getattr(model, "_sparsecraft_shared", None):
            # the model's base weights were replaced (UpIT); referring to the base alone would lose them
            shared = SHARED_NAME
            save_file(_shared_tensors(model), str(tmp / SHARED_NAME), metadata={"format": "pt"})
        if standalone:
            _save_base(model, tmp / BASE_SUBDIR)
            base_entry = {"spec": BASE_SUBDIR, "relative": True, "gguf_file": None}
        else:
            base_entry = {"spec": source.spec, "directory": source.directory, "gguf_file": source.gguf_file}
            if source.is_hub:
                base_entry["revision"] = source.revision  # the commit: the same weights wherever it is loaded
        config = {
            "model_type": MODEL_TYPE,
            "architectures": ["SparsecraftForCausalLM"],
            "sparsecraft_format": FORMAT_VERSION,
            "method": method.name,
            "base": base_entry,
            "base_architecture": _base_class(model).__name__,
            "base_config": _config_dict(model),
            "craft": cfg.to_dict() if cfg else None,
            "crafted_layers": list(model._sparsecraft_layers) if cfg else [],
            "weights": WEIGHTS_NAME if cfg else None,
            "lora": LORA_SUBDIR if lora_model is not None else None,
            **({"shared": shared} if shared else {}),
            **(extra or {}),
        }
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
        tok = tokenizer if tokenizer is not None else (load_tokenizer(source) if source is not None else None)
        if tok is not None:
            tok.save_pretrained(str(tmp))
        origin = None if source is None else {"spec": source.spec, "revision": source.revision}
        write_model_card(tmp, config, standalone=standalone, name=card_name or out_dir.name, base=origin,
                         summary=summary)
    return out_dir


def _gathered(state: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """`name` (the crafted model's own key) in a gathered state dict of it or of the peft model around it."""
    for key in (name, f"base_model.model.{name}"):
        if key in state:
            return state[key].detach().to("cpu").contiguous()
    raise CheckpointError(f"the gathered state has no tensor {name}")


def _shared_tensors(model) -> dict[str, torch.Tensor]:
    """The replaced base weights (`model._sparsecraft_shared`, set by `upit.build_moe`) to write beside a
    referenced save: the live value where the model still holds that key as a plain float tensor of that shape
    (it may have been trained since), else the kept copy (the key is hidden by a peft wrapper or the layer was
    quantised to 4 bits; both leave the base weight frozen, so the copy is still exact)."""
    live = model.state_dict()
    out = {}
    for key, kept in model._sparsecraft_shared.items():
        value = live.get(key)
        if value is None or not value.is_floating_point() or value.shape != kept.shape:
            value = kept
        out[key] = value.detach().to("cpu").clone().contiguous()  # clones: tied weights share storage
    return out


def load_shared_weights(model, path: Path) -> dict[str, torch.Tensor]:
    """Load a `shared.safetensors` into a freshly loaded base (names and shapes checked); returns the tensors."""
    if not path.is_file():
        raise CheckpointError(f"missing shared weights file {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            names = f.keys()
            tensors = {name: f.get_tensor(name) for name in names}
    except SafetensorError as exc:
        raise CheckpointError(f"{path} is corrupted or truncated: {exc}") from exc
    state = model.state_dict()
    for name, tensor in tensors.items():
        own = state.get(name)
        if own is None:
            raise CheckpointError(f"{path}: {name} is not a weight of the base model")
        if not own.is_floating_point() or own.shape != tensor.shape:
            raise CheckpointError(
                f"{path}: {name} has shape {tuple(tensor.shape)}, the base holds {tuple(own.shape)} "
                f"({own.dtype}); load without quantization or save the model standalone"
            )
    model.load_state_dict(tensors, strict=False)
    return tensors


def _base_class(model) -> type:
    return getattr(type(model), "_sparsecraft_base_class", type(model))


def _config_dict(model) -> dict:
    data = text_config(model).to_dict()
    data.pop("quantization_config", None)
    return data


def _save_base(model, directory: Path) -> None:
    """The base part of a crafted model as a plain transformers directory (new weights left out)."""
    base_state = {k: v for k, v in model.state_dict().items() if not is_added_name(k)}
    # a method whose experts replaced base keys (upcycling) writes them back, so base/ is a complete checkpoint
    base_state = method_of(model).standalone_base_state(model, base_state)
    quantizer = getattr(model, "hf_quantizer", None)
    quant_cfg = getattr(model.config, "quantization_config", None)
    is_gguf = quantizer is not None and "gguf" in type(quantizer).__name__.lower()
    if is_gguf:
        # GGUF weights were de-quantised on load; what we hold is a plain dense model
        model.hf_quantizer = None
        del model.config.quantization_config
    architectures = model.config.architectures
    try:
        # the base class's save_pretrained: a crafted model's own save_pretrained writes this format
        _base_class(model).save_pretrained(model, str(directory), state_dict=base_state)
    finally:
        model.config.architectures = architectures  # save_pretrained sets it to the Pesc* class name
        if is_gguf:
            model.hf_quantizer = quantizer
            model.config.quantization_config = quant_cfg
    config_path = directory / "config.json"
    data = json.loads(config_path.read_text())
    data["architectures"] = [_base_class(model).__name__]
    config_path.write_text(json.dumps(data, indent=2) + "\n")


def read_config(path: str | os.PathLike) -> dict:
    """config.json of a model directory, with one-line errors for missing or unreadable files."""
    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{path} is not a model directory: no config.json")
    try:
        return json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{config_path} is not valid JSON: {exc}") from exc


def is_crafted_dir(path: str | os.PathLike) -> bool:
    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        return False
    try:
        return json.loads(config_path.read_text()).get("model_type") == MODEL_TYPE
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def resolve_saved_base(path: Path, entry: dict, **hub) -> BaseSource:
    """Where a crafted directory's base is; a one-line error when it has gone missing. `hub`: `token`,
    `cache_dir` for a hub base."""
    if entry.get("relative"):
        base_dir = path / entry["spec"]
        if not base_dir.is_dir():
            raise CheckpointError(f"standalone model at {path} is missing its {entry['spec']}/ folder")
        return resolve_base(base_dir)
    spec = entry.get("spec")
    if entry.get("revision"):  # a hub base, pinned to its commit; its errors (offline, gated, ...) say it best
        return resolve_base(spec, entry["revision"], **hub)
    directory, gguf = entry.get("directory"), entry.get("gguf_file")
    recorded = os.path.join(directory, gguf) if directory and gguf else directory
    # the folder recorded at save time first: a relative name would find whatever the current directory holds
    # (a built-in name is looked up again: its package may live elsewhere on this machine)
    if spec not in BUILTIN_MODELS and recorded and os.path.exists(recorded):
        return resolve_base(recorded)
    try:
        return resolve_base(spec)
    except CheckpointError:
        if recorded and os.path.exists(recorded):
            return resolve_base(recorded)
        raise CheckpointError(
            f"crafted model at {path} refers to base '{spec}', which is missing; restore it, or re-save with "
            "--standalone"
        ) from None


def load_crafted(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    allow_pickle: bool = False,
    as_trained: bool = False,
    **from_pretrained_kwargs,
):
    """Load a sparsecraft directory as a ready (eval-mode) crafted transformers model; pickled base or LoRA
    weights only with `allow_pickle`. A model trained over an NF4 base has its LoRA merged into the
    full-precision base by default (the usual QLoRA deployment, and the better model in docs/results.md);
    `as_trained=True` NF4-rounds the layers the run quantised first (`nf4.round_trip_nf4`), giving exactly the model
    that was trained and whose held-out loss the run reported (unless the base is loaded quantised)."""
    path = Path(path)
    config = read_config(path)
    try:
        method = get_method(config.get("method", "pesc"))  # written before methods other than PESC existed
    except ConfigError:
        raise CheckpointError(f"{path}/config.json names an unknown method {config.get('method')!r}") from None
    for key in ("base", "base_config") + (("craft",) if method.builds_moe else ()):
        if not config.get(key):
            raise CheckpointError(f"{path}/config.json is a sparsecraft config without '{key}'")
    craft_cfg = None
    if method.builds_moe:
        try:
            craft_cfg = CraftConfig.from_dict(config["craft"])
        except (ConfigError, TypeError) as exc:
            raise CheckpointError(f"{path}/config.json has invalid crafting settings: {exc}") from exc
    hub = hub_options(from_pretrained_kwargs)
    source = resolve_saved_base(path, config["base"], **hub)
    _check_base_shapes(path, source, config["base_config"])
    model = load_base_model(source, dtype=dtype, device=device, allow_pickle=allow_pickle, **from_pretrained_kwargs)
    if config.get("shared"):
        # before crafting: these are base weights under the base's own keys (an upcycled FFN's keys go away)
        model._sparsecraft_shared = load_shared_weights(model, path / config["shared"])
    rounding = as_trained and trained_over_nf4(config) and "quantization_config" not in from_pretrained_kwargs
    # the training quantised a GGUF base, or a base whose FFN copies train, after crafting (train/setup.py)
    after_crafting = bool(source.gguf_file) or method.experts_full_precision
    if rounding and not after_crafting:
        round_trip_nf4(model)
    if method.builds_moe:
        method.restore(model, craft_cfg, config.get("crafted_layers") or craft_cfg.layers)
        load_new_weights(model, path / (config.get("weights") or WEIGHTS_NAME))
    if rounding and after_crafting:
        round_trip_nf4(model)
    if config.get("lora"):
        model = _merge_lora(model, path / config["lora"], allow_pickle)
    model._sparsecraft_base = source
    changes = (["its LoRA merged in"] if config.get("lora") else []) + (["NF4-rounded"] if rounding else [])
    # its base weights are not the base's on disk any more: a save that refers to that base would lose them
    model._sparsecraft_base_changed = ", ".join(changes) or None
    model._sparsecraft_path = str(path)
    return model.eval()


def trained_over_nf4(config: dict) -> bool:
    """Whether a saved model's training recipe put its base in NF4."""
    return ((config.get("recipe") or {}).get("quantization") or "none") == "nf4"


def _merge_lora(model, lora_dir: Path, allow_pickle: bool = False):
    """Apply a saved peft LoRA adapter and merge it into the base weights (de-quantising 4-bit ones)."""
    from peft import PeftModel

    if not lora_dir.is_dir():
        raise CheckpointError(f"missing LoRA adapter folder {lora_dir}")
    if not (lora_dir / "adapter_model.safetensors").is_file() and not allow_pickle:
        pickled = (lora_dir / "adapter_model.bin").is_file()
        raise CheckpointError(f"{lora_dir} holds only a pickled adapter_model.bin: {PICKLE_HELP}" if pickled
                              else f"{lora_dir} has no adapter_model.safetensors")
    peft_model = PeftModel.from_pretrained(model, str(lora_dir))
    merged = peft_model.merge_and_unload()
    for attr in ("_sparsecraft_base",):
        if hasattr(model, attr):
            setattr(merged, attr, getattr(model, attr))
    return merged


def _check_base_shapes(path: Path, source: BaseSource, saved: dict) -> None:
    found = text_config(load_base_config(source))
    for field in _SHAPE_FIELDS:
        if field in saved and getattr(found, field, None) != saved[field]:
            raise CheckpointError(
                f"base '{source.spec}' has {field}={getattr(found, field, None)} but {path} was crafted from a "
                f"base with {field}={saved[field]}"
            )


def load_new_weights(model, weights_path: Path) -> None:
    """Copy router/adapter tensors from a safetensors file into a crafted model, checking names and shapes."""
    if not weights_path.is_file():
        raise CheckpointError(f"missing weights file {weights_path}")
    expected = method_of(model).new_parameters(model)
    try:
        with safe_open(str(weights_path), framework="pt") as f:
            names = set(f.keys())
            missing = sorted(set(expected) - names)
            unexpected = sorted(names - set(expected))
            if missing or unexpected:
                what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
                raise CheckpointError(f"{weights_path} does not match the crafting config: {what}")
            with torch.no_grad():
                for name, param in expected.items():
                    tensor = f.get_tensor(name)
                    if tuple(tensor.shape) != tuple(param.shape):
                        raise CheckpointError(
                            f"{weights_path}: {name} has shape {tuple(tensor.shape)}, the config implies "
                            f"{tuple(param.shape)}"
                        )
                    param.copy_(tensor.to(device=param.device, dtype=param.dtype))
    except SafetensorError as exc:
        raise CheckpointError(f"{weights_path} is corrupted or truncated: {exc}") from exc


set_saver(lambda model, directory, *, standalone: save_crafted(model, directory, standalone=standalone))
