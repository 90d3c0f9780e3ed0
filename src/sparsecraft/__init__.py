"""sparsecraft: craft dense decoder LMs into parameter-efficient Mixture-of-Experts (PESC) and tune them."""

from .config import ConfigError, CraftConfig
from .craft import CraftError, craft, crafted_layers, is_crafted, new_parameters, uncraft

__version__ = "0.1.0"
__all__ = ["ConfigError", "CraftConfig", "CraftError", "craft", "crafted_layers", "is_crafted", "new_parameters", "uncraft"]
