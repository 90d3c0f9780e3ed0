"""Registration with transformers' Auto classes, so `AutoModelForCausalLM.from_pretrained(dir)` loads a crafted
directory after `import sparsecraft` (no trust_remote_code: the code is this installed package).

`SparsecraftForCausalLM.from_pretrained` delegates to `sparsecraft.load` and returns the crafted model of the
base's own class (e.g. a `PescLlamaForCausalLM`), not a wrapper.
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

# keyword arguments of from_pretrained that `sparsecraft.load` does not take (the config is re-read from the
# directory; there is no remote code); `revision`, `token` and `cache_dir` are passed on to the hub lookups
_DROPPED_KWARGS = ("force_download", "proxies", "local_files_only", "subfolder", "trust_remote_code",
                   "code_revision", "_from_auto", "_from_pipeline", "config", "adapter_kwargs")


class SparsecraftConfig(PretrainedConfig):
    """config.json of a crafted directory: crafting settings, base config and base location as plain fields."""

    model_type = "sparsecraft"


class SparsecraftForCausalLM(PreTrainedModel):
    """Loader stub for the Auto classes: instances are never built; from_pretrained returns the real model."""

    config_class = SparsecraftConfig

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        from .loading import load

        for key in _DROPPED_KWARGS:
            kwargs.pop(key, None)
        return load(pretrained_model_name_or_path, **kwargs)


def register() -> None:
    AutoConfig.register("sparsecraft", SparsecraftConfig, exist_ok=True)
    AutoModelForCausalLM.register(SparsecraftConfig, SparsecraftForCausalLM, exist_ok=True)
