"""sparsecraft: craft dense decoder LMs into parameter-efficient Mixture-of-Experts (PESC) and tune them.

    import sparsecraft
    model = sparsecraft.craft_from("smollm2-135m", sparsecraft.CraftConfig(num_experts=8, top_k=2))
    sparsecraft.save(model, "out/pesc")
    model = sparsecraft.load("out/pesc")
"""

from .auto import register as _register
from .checkpoint.crafted import load_crafted
from .checkpoint.crafted import save_crafted as save
from .config import CraftConfig
from .craft import craft, uncraft, upcycle
from .errors import CheckpointError, ConfigError, CraftError, SparsecraftError
from .loading import craft_from, load
from .methods import get_method, method_names
from .report import dry_run, parameter_report
from .surgery import crafted_layers, is_crafted, new_parameters
from .version import __version__  # noqa: F401 (the package face)

_register()

__all__ = [
    "CheckpointError", "ConfigError", "CraftConfig", "CraftError", "SparsecraftError",
    "craft", "craft_from", "crafted_layers", "dry_run", "get_method", "is_crafted", "load", "load_crafted",
    "method_names", "new_parameters",
    "parameter_report", "save", "upcycle",
    "uncraft",
]
