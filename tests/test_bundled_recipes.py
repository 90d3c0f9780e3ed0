"""Every recipe shipped in configs/ loads through the loader its command uses: a training recipe through
`load_recipe` (method registered, values finite), an UpIT recipe through `load_upit_config`. A typo in a bundled
file would otherwise surface only when a user runs it."""

from __future__ import annotations

from pathlib import Path

import pytest

from sparsecraft.methods.registry import method_names
from sparsecraft.train.recipe import load_recipe
from sparsecraft.upit.config import load_upit_config, read_upit_yaml

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted(p for p in (REPO / "configs").rglob("*.yaml") if "accelerate" not in p.parts)


def _is_upit(path: Path) -> bool:
    return path.name.startswith("upit") or "upit-ablation" in path.parts


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_bundled_recipe_loads(path: Path) -> None:
    if _is_upit(path):
        assert isinstance(read_upit_yaml(path), dict)
        config = load_upit_config(path)
        assert config is not None
    else:
        recipe = load_recipe(path)
        assert recipe.method in method_names()
        assert recipe.output_dir, f"{path.name} names no output_dir"


def test_paper_small_recipes_differ_only_where_they_say() -> None:
    """The paper-small comparison is fair only if data, steps, batch and optimiser are identical."""
    folder = REPO / "configs" / "paper-small"
    recipes = {p.stem: load_recipe(p) for p in folder.glob("*.yaml") if not _is_upit(p)}
    assert {"dense", "camel", "pesc", "pesc-camelidae", "dense-matched", "mixlora", "upcycle"} <= set(recipes)
    reference = recipes["pesc"]
    for name, recipe in recipes.items():
        assert recipe.data == reference.data, name
        assert recipe.optim == reference.optim, name
        assert recipe.train == reference.train, name
