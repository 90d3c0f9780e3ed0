"""sparsecraft.yaml_settings: YAML file + key=value overrides -> a checked dataclass."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from sparsecraft.errors import ConfigError
from sparsecraft.yaml_settings import build_dataclass, coerce, merge, parse_overrides, read_yaml


@dataclass
class Inner:
    lr: float = 1e-3
    steps: int = 10
    names: list = field(default_factory=list)


@dataclass
class Outer:
    name: str = "run"
    ratio: float | None = None
    inner: Inner = field(default_factory=Inner)
    extra: dict = field(default_factory=dict)


def test_parse_overrides_nests_keys_and_parses_values_as_yaml():
    assert parse_overrides(["a.b.c=1", "lr=3e-4", "names=[x, y]", "flag=true", "empty=", "text=a: b: c"]) == [
        {"a": {"b": {"c": 1}}}, {"lr": "3e-4"}, {"names": ["x", "y"]}, {"flag": True}, {"empty": ""},
        {"text": "a: b: c"},  # not YAML: kept as the raw string
    ]
    assert parse_overrides([" spaced.key =2"]) == [{"spaced": {"key": 2}}]
    with pytest.raises(ConfigError, match="must look like key=value"):
        parse_overrides(["max_steps"])


def test_merge_is_recursive_and_leaves_inputs_alone():
    base = {"a": {"x": 1, "y": {"p": 1}}, "b": 2}
    extra = {"a": {"y": {"q": 2}}, "b": {"now": "a mapping"}, "c": [1]}
    out = merge(base, extra)
    assert out == {"a": {"x": 1, "y": {"p": 1, "q": 2}}, "b": {"now": "a mapping"}, "c": [1]}
    assert base == {"a": {"x": 1, "y": {"p": 1}}, "b": 2}


def test_merge_shorthands_and_expansions_apply_at_the_top_only():
    shorthands = {"lr": ("optim", "lr"), "deep": ("a", "b", "c")}

    def data_file(value, current):
        return {**(current or {}), "sources": [{"path": str(value)}]}

    base = {"optim": {"lr": 1, "eps": 2}, "data": {"max_length": 8, "sources": [{"path": "old"}]}}
    out = base
    for extra in parse_overrides(["lr=0.5", "deep=3", "data=new.jsonl"]):
        out = merge(out, extra, shorthands=shorthands, expand={"data": data_file})
    assert out == {"optim": {"lr": 0.5, "eps": 2}, "a": {"b": {"c": 3}},
                   "data": {"max_length": 8, "sources": [{"path": "new.jsonl"}]}}
    # inside a mapping, or with a mapping value, the names are plain keys
    nested = merge({}, {"train": {"lr": 1}, "lr": {"x": 1}}, shorthands=shorthands)
    assert nested == {"train": {"lr": 1}, "lr": {"x": 1}}
    assert merge({}, {"lr": 1}) == {"lr": 1}  # no shorthands given: none apply


def test_a_shorthand_into_a_section_that_is_not_a_mapping_is_a_one_line_error():
    with pytest.raises(ConfigError, match="optim is 5, not a mapping"):
        merge({"optim": 5}, {"lr": 1}, shorthands={"lr": ("optim", "lr")})


def test_build_dataclass_builds_nested_and_coerces():
    built = build_dataclass(Outer, {"name": "x", "ratio": 1, "inner": {"lr": 2, "steps": 3}, "extra": {"k": 1}})
    assert built == Outer("x", 1.0, Inner(2.0, 3), {"k": 1})
    assert isinstance(built.inner.lr, float) and isinstance(built.ratio, float)
    assert build_dataclass(Inner, {"lr": "3e-3"}).lr == 3e-3  # YAML 1.1 reads 3e-3 as a string
    assert build_dataclass(Outer, {"ratio": None}).ratio is None
    assert build_dataclass(Outer, {}) == Outer()


def test_wrong_types_are_one_line_errors():
    with pytest.raises(ConfigError, match=r"^inner.steps must be int, got str 'ten'$"):
        build_dataclass(Outer, {"inner": {"steps": "ten"}})
    with pytest.raises(ConfigError, match=r"^inner.steps must be int, got True$"):
        build_dataclass(Outer, {"inner": {"steps": True}})
    with pytest.raises(ConfigError, match=r"^ratio: 'high' has the wrong type$"):
        build_dataclass(Outer, {"ratio": "high"})
    with pytest.raises(ConfigError, match=r"^inner must be a mapping, got int$"):
        build_dataclass(Outer, {"inner": 3})
    with pytest.raises(ConfigError, match=r"^settings must be a mapping, got list$"):
        build_dataclass(Outer, [1], what="settings")
    with pytest.raises(ConfigError, match="x must be list, got str"):
        coerce("x", "a", list)


def test_unknown_fields_name_the_path_and_the_known_ones():
    with pytest.raises(ConfigError, match=r"^unknown config field inner\.step \(known: lr, names, steps\)$"):
        build_dataclass(Outer, {"inner": {"step": 1}})
    with pytest.raises(ConfigError, match=r"^unknown recipe field colour "):
        build_dataclass(Outer, {"colour": "red"}, what="recipe")


def test_read_yaml(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("a:\n  b: 1\nc: [x]\n")
    assert read_yaml(good) == {"a": {"b": 1}, "c": ["x"]}
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert read_yaml(empty) == {}
    with pytest.raises(ConfigError, match=r"^recipe not found: .*none\.yaml$"):
        read_yaml(tmp_path / "none.yaml", "recipe")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\nb: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml is not valid YAML: ") as info:
        read_yaml(bad)
    assert "\n" not in str(info.value)
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n")
    assert read_yaml(listed) == [1, 2]
    with pytest.raises(ConfigError, match=r"list\.yaml must hold a mapping of fields, got list"):
        read_yaml(listed, mapping=True)
