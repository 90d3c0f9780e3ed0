"""UpIT run configuration: one YAML file for all four stages; any field overridable as `a.b=value`.

The top level holds the fields of an ordinary training recipe (`model`, `data`, `lora`, `optim`, `train`,
`craft`, ... — see `train/recipe.py`), shared by the two training stages, plus UpIT's own:

    kind: lora | ffn | adapter          what an expert is (the expert kinds of the registered methods)
    output_dir: runs/upit               prepare/ expand/ route/ upcycle/ are written under it
    extends: other.yaml                 (file only) start from another UpIT config, relative to this file
    prepare: {...}                      PrepareSettings; prepare.recipe overrides recipe fields for the dense stage
    expand:  {...}                      ExpandSettings
    route:   {...}                      RouteSettings
    upcycle: {...}                      UpcycleSettings; upcycle.recipe overrides recipe fields for post-training

The final MoE's shape is the `craft` section: `craft.num_experts` is n (the expert count after expansion),
`craft.top_k` its k. The dense stage's and the post-training stage's recipes are derived from it (`stage_recipe`):
kind defaults < the shared top-level fields < the stage's `recipe:` section < what the stage must set itself.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..methods import expert_kinds, method_for_kind
from ..methods.upit import UpitMethod
from ..train.recipe import Recipe, build_recipe, merge_recipe
from ..yaml_settings import build_dataclass, merge, parse_overrides, read_yaml
from .assign import BUCKETINGS, NORMALISATIONS
from .crossover import MERGES
from .expand import LORA_MERGES, PARENT_CHOICES

SELECTIONS = ("even", "last")
SHARED_MODES = ("average", "last", "base")
TOKEN_SCOPES = ("response", "all")
ROUTER_INITS = ("default", "random")
STAGES = ("prepare", "expand", "route", "upcycle")

# Fields a stage sets itself; a user value there would be silently ignored, so it is refused instead.
_RECIPE_FIELDS = {f.name for f in dataclasses.fields(Recipe)} - {"output_dir", "method", "upit"}

# Each kind's dense-stage method, the recipe fields it must have and its defaults (lowest precedence) are the
# registered method's (`methods/`: `upit_dense_method`, `upit_dense_recipe`, `upit_defaults`). Attention LoRA
# is off in the dense stage by default: when turned on, its checkpoints' states are averaged into the shared
# weights.


@dataclass
class PrepareSettings:
    """Stage 1: dense instruction tuning with intermediate checkpoints, m of which become experts.

    `interval`: save a checkpoint every this fraction of an epoch (the paper: 0.25). The final state of the
    run is a candidate too. `select`: `even` (m evenly spaced candidates ending at the last), `last` (the m
    last), or an explicit list of optimizer steps. `shared`: what the non-expert weights trained in the dense
    stage (attention LoRA) become: `average` of the chosen checkpoints, the `last` chosen one, or the `base`.
    `experts_from`: existing experts instead of the dense stage — PEFT LoRA adapter directories (kind lora)
    or full checkpoints of the same base (kind ffn).
    """

    num_experts: int = 4
    interval: float = 0.25
    select: Any = "even"
    shared: str = "average"
    experts_from: list = field(default_factory=list)
    recipe: dict = field(default_factory=dict)


@dataclass
class ExpandSettings:
    """Stage 2: genetic expansion from m to n = craft.num_experts experts (no children when n == m).

    `enabled: false` is the "no genetic expansion" ablation: the n experts are n dense-stage checkpoints
    (`prepare.num_experts` must then be n) and the stage only passes them on. `merge`: how two parents make a
    child (`dare`, `ties`, `linear`; see `crossover.py`); `p`: the fraction of each parent's delta dropped (DARE:
    at random, then rescaled; TIES: the smallest entries; unused by linear). `parents`: `dissimilar` (the least
    similar unused pair) or `random` (the paper's ablation).
    """

    enabled: bool = True
    p: float = 0.5
    seed: int = 0
    merge: str = "dare"
    parents: str = "dissimilar"
    lora_merge: str = "separate"  # lora kind: merge A and B apart, or the product B·A refactored by SVD


@dataclass
class RouteSettings:
    """Stage 3: seed data bucketed by each expert's response perplexity, router rows pre-trained on them.

    Buckets (`assign.py`): `bucketing` `balanced` (default: per-expert normalised scores, `normalise` margin |
    zscore | rank | none, then a minimum-cost assignment giving every expert floor or ceil of S/E records; with
    `min_share` below 1, at least floor(min_share * S/E) each and the rest where it fits best), `argmin` (the
    lowest raw perplexity; can put every record in one bucket) or `random` (a seeded balanced assignment ignoring
    the perplexities: the paper's "router initialised on random data" ablation).
    Loss `lm_weight * L_lm + aux_weight * L_aux`, `L_aux` the binary cross-entropy of `sigmoid(h · r_i)`
    (1 for tokens of bucket i; with `negatives`, 0 for the other rows). Experts frozen unless
    `freeze_experts: false`. `enabled: false` skips router pre-training; the router is then `init`: `default`
    (the crafted init of any new MoE, seeded by the post-training seed) or `random` (rows drawn from
    N(0, init_std^2) with `seed`, written to route/router.safetensors).
    """

    enabled: bool = True
    bucketing: str = "balanced"
    normalise: str = "margin"
    min_share: float = 1.0  # balanced: each expert gets >= floor(min_share * S/E) records; 1 = exactly balanced
    init: str = "default"
    init_std: float = 0.02
    seed_fraction: float = 0.01
    seed_min: int = 64
    seed_max: int = 2000
    heldout_fraction: float = 0.2
    seed: int = 0
    negatives: bool = True
    lm_weight: float = 0.5
    aux_weight: float = 0.5
    tokens: str = "response"  # tokens that score perplexity and carry L_aux: response only, or all real tokens
    epochs: float = 4.0
    lr: float = 1e-3
    batch_size: int = 4
    freeze_experts: bool = True


@dataclass
class UpcycleSettings:
    """Stage 4: post-training of the MoE on the full data (LM + load-balancing loss)."""

    recipe: dict = field(default_factory=dict)


@dataclass
class UpitConfig:
    """A whole UpIT run. `common` holds the shared recipe fields of the YAML's top level."""

    kind: str = "lora"
    output_dir: str = "runs/upit"
    common: dict = field(default_factory=dict)
    prepare: PrepareSettings = field(default_factory=PrepareSettings)
    expand: ExpandSettings = field(default_factory=ExpandSettings)
    route: RouteSettings = field(default_factory=RouteSettings)
    upcycle: UpcycleSettings = field(default_factory=UpcycleSettings)

    @property
    def out(self) -> Path:
        return Path(self.output_dir)

    def stage_dir(self, stage: str) -> Path:
        return self.out / stage

    @property
    def model(self) -> str:
        return str(self.common.get("model", Recipe.model))

    def craft_dict(self) -> dict:
        """The final MoE's craft settings (n = num_experts, top_k, ...), kind defaults applied."""
        return dict(self.stage_dict("upcycle").get("craft") or {})

    @property
    def route_stage(self) -> bool:
        """Whether the route stage runs: router pre-training, or writing the random router rows."""
        return self.route.enabled or self.route.init == "random"

    @property
    def num_experts(self) -> int:
        """n: experts of the final MoE."""
        return int(self.craft_dict().get("num_experts", 8))

    def stage_dict(self, stage: str) -> dict:
        """The recipe mapping of a training stage (`prepare` or `upcycle`) before stage-forced fields."""
        defaults = method_for_kind(self.kind).upit_defaults
        data = merge(defaults.get("common") or {}, defaults.get(stage) or {})
        data = merge(data, self.common)
        return merge_recipe(data, getattr(self, stage).recipe)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        return {**data.pop("common"), **data}

    def validate(self) -> None:
        method = method_for_kind(self.kind)  # ConfigError naming the kinds
        p, e, r = self.prepare, self.expand, self.route
        if p.num_experts <= 0:
            raise ConfigError(f"prepare.num_experts (m) must be positive, got {p.num_experts}")
        if not 0 < p.interval:
            raise ConfigError(f"prepare.interval must be a positive fraction of an epoch, got {p.interval}")
        if not (p.select in SELECTIONS or (isinstance(p.select, list) and p.select and all(
                isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in p.select))):
            raise ConfigError(f"prepare.select must be even, last or a list of positive steps; got {p.select!r}")
        if isinstance(p.select, list) and len(p.select) != p.num_experts:
            raise ConfigError(f"prepare.select lists {len(p.select)} steps but prepare.num_experts is "
                              f"{p.num_experts}")
        if p.shared not in SHARED_MODES:
            raise ConfigError(f"prepare.shared must be one of {', '.join(SHARED_MODES)}; got {p.shared!r}")
        if not all(isinstance(x, str) and x for x in p.experts_from):
            raise ConfigError("prepare.experts_from must be a list of directories")
        if p.experts_from and method.upit_existing is None:
            takers = ", ".join(f"kind {k}" for k in expert_kinds() if method_for_kind(k).upit_existing)
            raise ConfigError(f"prepare.experts_from takes existing experts only for {takers}; {self.kind} experts "
                              "come from the dense stage")
        if not 0 <= e.p < 1:
            raise ConfigError(f"expand.p must be in [0, 1), got {e.p}")
        if e.lora_merge not in LORA_MERGES:
            raise ConfigError(f"expand.lora_merge must be one of {', '.join(LORA_MERGES)}; got {e.lora_merge!r}")
        if e.merge not in MERGES:
            raise ConfigError(f"expand.merge must be one of {', '.join(MERGES)}; got {e.merge!r}")
        if e.parents not in PARENT_CHOICES:
            raise ConfigError(f"expand.parents must be one of {', '.join(PARENT_CHOICES)}; got {e.parents!r}")
        if r.bucketing not in BUCKETINGS:
            raise ConfigError(f"route.bucketing must be one of {', '.join(BUCKETINGS)}; got {r.bucketing!r}")
        if r.normalise not in NORMALISATIONS:
            raise ConfigError(f"route.normalise must be one of {', '.join(NORMALISATIONS)}; got {r.normalise!r}")
        if not 0 < r.min_share <= 1:
            raise ConfigError(f"route.min_share must be in (0, 1], got {r.min_share}")
        if r.init not in ROUTER_INITS:
            raise ConfigError(f"route.init must be one of {', '.join(ROUTER_INITS)}; got {r.init!r}")
        if r.init == "random" and r.enabled:
            raise ConfigError("route.init=random is the random-router ablation, which replaces router pre-training: "
                              "set route.enabled=false too")
        if not r.init_std > 0:
            raise ConfigError(f"route.init_std must be positive, got {r.init_std}")
        if not 0 < r.seed_fraction <= 1:
            raise ConfigError(f"route.seed_fraction must be in (0, 1], got {r.seed_fraction}")
        if r.seed_min <= 0 or r.seed_max < r.seed_min:
            raise ConfigError(f"route: need 0 < seed_min <= seed_max, got {r.seed_min} and {r.seed_max}")
        if not 0 <= r.heldout_fraction < 1:
            raise ConfigError(f"route.heldout_fraction must be in [0, 1), got {r.heldout_fraction}")
        if r.lm_weight < 0 or r.aux_weight < 0 or r.lm_weight + r.aux_weight == 0:
            raise ConfigError("route: lm_weight and aux_weight must be >= 0 and not both 0")
        if r.tokens not in TOKEN_SCOPES:
            raise ConfigError(f"route.tokens must be one of {', '.join(TOKEN_SCOPES)}; got {r.tokens!r}")
        if r.epochs <= 0 or r.lr <= 0 or r.batch_size <= 0:
            raise ConfigError("route: epochs, lr and batch_size must be positive")
        for stage in ("prepare", "upcycle"):
            forced = sorted(set(getattr(self, stage).recipe) & {"output_dir", "method", "upit"})
            if forced:
                raise ConfigError(f"{stage}.recipe.{forced[0]} is set by the pipeline; remove it")
        post = stage_recipe(self, "upcycle")  # validates the shared fields, data and the final craft settings
        n, m = post.craft_config().num_experts, self.prepare.num_experts
        if not p.experts_from and n < m:
            raise ConfigError(f"craft.num_experts (n={n}) must be at least prepare.num_experts (m={m})")
        if not e.enabled:
            given, what = (len(p.experts_from), "prepare.experts_from lists") if p.experts_from else \
                (m, "prepare.num_experts is")
            if given != n:
                raise ConfigError(f"expand.enabled=false takes the n={n} experts as they are, but {what} {given}: "
                                  f"make them equal (the ablation's prepare.num_experts={n})")
        if not p.experts_from:
            stage_recipe(self, "prepare")


def stage_recipe(cfg: UpitConfig, stage: str, **forced: Any) -> Recipe:
    """The ordinary training recipe of a training stage (`prepare`: the dense stage, `upcycle`: post-training).

    `forced`: recipe fields the stage sets itself (e.g. `upit={...}` for post-training), merged last.
    """
    if stage not in ("prepare", "upcycle"):
        raise ValueError(stage)
    data = cfg.stage_dict(stage)
    data["output_dir"] = str(cfg.stage_dir(stage))
    if stage == "prepare":
        method = method_for_kind(cfg.kind)
        data["method"] = method.upit_dense_method
        # a dense stage's expert is one adapter / one FFN copy: crafted with a single, always chosen expert
        data["craft"] = {**(data.get("craft") or {}), "num_experts": 1, "top_k": 1}
        data = merge(data, method.upit_dense_recipe)
        # every checkpoint is a candidate expert: none may be deleted (the interval is set by prepare.py)
        data["checkpoint"] = {**(data.get("checkpoint") or {}), "keep": 1_000_000}
    else:
        data["method"] = UpitMethod.name
        # LoRA on the FFN projections would sit under the experts; post-training LoRA is attention only
        data["lora"] = {**(data.get("lora") or {}), "ffn": False}
    data = merge(data, forced)
    try:
        recipe = build_recipe(data)
        if stage == "upcycle" and not recipe.upit.experts:
            recipe.upit.experts = str(cfg.stage_dir("expand"))  # validated where it is used
        recipe.validate()
    except ConfigError as exc:  # say which stage's recipe (shared fields, or its own `recipe:` section)
        raise ConfigError(f"{stage} stage: {exc}") from exc
    return recipe


def _build_upit(data: dict) -> UpitConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"an UpIT config must be a mapping, got {type(data).__name__}")
    own = {f.name for f in dataclasses.fields(UpitConfig)} - {"common"}
    unknown = sorted(set(data) - own - _RECIPE_FIELDS)
    if unknown:
        known = ", ".join(sorted(own | _RECIPE_FIELDS))
        raise ConfigError(f"unknown UpIT config field {unknown[0]} (known: {known})")
    kwargs: dict[str, Any] = {"common": {k: v for k, v in data.items() if k in _RECIPE_FIELDS}}
    hints = typing.get_type_hints(UpitConfig)
    for name in own & set(data):
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = build_dataclass(tp, data[name] if data[name] is not None else {}, f"{name}.", "recipe")
        elif not isinstance(data[name], str):
            raise ConfigError(f"{name} must be a string, got {data[name]!r}")
        else:
            kwargs[name] = data[name]
    return UpitConfig(**kwargs)


def read_upit_yaml(path: str | Path, _seen: frozenset = frozenset()) -> dict:
    """An UpIT YAML file as a mapping, `extends: OTHER.yaml` resolved: OTHER (relative to this file's folder,
    itself possibly extending another) with this file's fields merged on top, as overrides are."""
    path = Path(path)
    data = read_yaml(path, "UpIT config", mapping=True)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str) or not parent:
        raise ConfigError(f"{path}: extends must name another UpIT config file, got {parent!r}")
    here = path.resolve()
    target = path.parent / parent
    if target.resolve() in _seen | {here}:
        raise ConfigError(f"{path}: extends {parent} leads back to itself")
    return merge_recipe(merge_recipe({}, read_upit_yaml(target, _seen | {here})), data)


def load_upit_config(path: str | Path | None, overrides: list[str] | None = None) -> UpitConfig:
    """Read an UpIT YAML config (`extends:` resolved) and apply `key=value` overrides (`output_dir=`,
    `max_steps=`, `data=`, `experts=`, `prepare.num_experts=`, ... as in `sparsecraft train`); validated,
    one-line `ConfigError`s."""
    data: dict = read_upit_yaml(path) if path is not None else {}
    for override in parse_overrides(overrides or []):
        data = merge_recipe(data, override)
    cfg = _build_upit(data)
    cfg.validate()
    return cfg
