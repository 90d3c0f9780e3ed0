"""Routing statistics: exact on hand-set routers, equal to an independent reference on random ones, padding
left out, PESC and upcycled models, files and plots, and the `sparsecraft routes` command."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch
from conftest import tiny_model, tiny_tokenizer

import sparsecraft
from sparsecraft import cli
from sparsecraft.cli import routes as routes_cmd
from sparsecraft.errors import ConfigError
from sparsecraft.evaluate.route_collect import collect_routing
from sparsecraft.evaluate.route_data import data_sources, routing_stats
from sparsecraft.evaluate.route_stats import RoutingStats
from sparsecraft.evaluate.routes import write_routes
from sparsecraft.moe.router import route
from sparsecraft.surgery import crafted_layers

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_valid_png(path: Path, min_std: float = 0.02) -> None:
    """A PNG that matplotlib reads back, with visible content (not one flat colour)."""
    assert path.is_file() and path.read_bytes()[:8] == PNG_SIGNATURE, path
    pixels = mpimg.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert float(np.std(pixels[..., :3])) > min_std, f"{path} looks blank"


def crafted(method: str = "pesc", experts: int = 4, top_k: int = 1, **cfg):
    model = tiny_model("llama")
    config = sparsecraft.CraftConfig(num_experts=experts, top_k=top_k, adapter_dim=8, **cfg)
    (sparsecraft.craft if method == "pesc" else sparsecraft.upcycle)(model, config, seed=0)
    return model.eval()


def hand_set_router(model, logit_scale: dict[int, float]) -> None:
    """Every token's router logits become `scale_e * x_0` for the listed experts and 0 for the others, with
    `x_0 > 0` for every token: the embeddings put 5 in hidden dim 0 and no block writes to that dim, so after
    the (positive-weight) RMSNorm the router input's dim 0 is positive everywhere."""
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 5.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[0] = 0.0
            mlp = layer.mlp
            if hasattr(mlp, "down_proj"):
                mlp.down_proj.weight[0] = 0.0  # PESC: F's dim 0; the adapters add 0 (W_up starts at zero)
            else:
                mlp.moe.experts.down_proj[:, 0] = 0.0  # upcycled: every expert copy [E, h, i]
        for _, mlp in crafted_layers(model):
            weight = mlp.moe.router.weight
            weight.zero_()
            for expert, scale in logit_scale.items():
                weight[expert, 0] = scale


def batch(rows: list[int], sources: list[int] | None = None, seed: int = 0) -> dict:
    """Right-padded `input_ids`/`attention_mask` with the given real lengths (pad id 0)."""
    g = torch.Generator().manual_seed(seed)
    width = max(rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, n in enumerate(rows):
        ids[i, :n] = torch.randint(5, 120, (n,), generator=g)
        mask[i, :n] = 1
    out = {"input_ids": ids, "attention_mask": mask}
    if sources is not None:
        out["source_ids"] = torch.tensor(sources)
    return out


def write_jsonl(path: Path, n: int, word: str) -> Path:
    with open(path, "w") as f:
        f.writelines(json.dumps({"messages": [{"role": "user", "content": f"{word} {i} " + "x" * (i % 5)},
                                             {"role": "assistant", "content": f"{word}{i * 7}"}]}) + "\n"
                     for i in range(n))
    return path


# ---------------------------------------------------------------------------------------------- exact cases


def test_all_tokens_to_expert_3_exactly():
    model = crafted(top_k=1)
    hand_set_router(model, {3: 100.0})
    data = [batch([9, 4, 7], [0, 1, 0]), batch([3, 8], [1, 1], seed=1)]
    stats = collect_routing(model, data, ["math", "code"])
    real = 9 + 4 + 7 + 3 + 8  # padding left out
    L = len(stats.layers)
    assert stats.layers == [0, 1, 2] and stats.tokens == real
    assert stats.source_tokens == [16, 15] and stats.source_records == [2, 3]
    expected_counts = torch.zeros(L, 4, dtype=torch.int64)
    expected_counts[:, 3] = real
    assert torch.equal(stats.counts, expected_counts)
    share = stats.token_share()
    assert torch.equal(share[:, 3], torch.ones(L, dtype=torch.float64))
    assert torch.equal(share[:, :3], torch.zeros(L, 3, dtype=torch.float64))
    gate = stats.mean_gate()
    assert torch.equal(gate[:, 3], torch.ones(L, dtype=torch.float64)) and torch.isnan(gate[:, :3]).all()
    # a one-hot softmax and a one-expert load: zero entropy, exactly
    assert torch.equal(stats.router_entropy(), torch.zeros(L, dtype=torch.float64))
    assert torch.equal(stats.load_entropy(), torch.zeros(L, dtype=torch.float64))
    assert stats.load_imbalance().tolist() == [4.0] * L
    expected_co = torch.zeros(L, 4, 4, dtype=torch.int64)
    expected_co[:, 3, 3] = real
    assert torch.equal(stats.coselection, expected_co)
    source_share = stats.source_share()
    assert torch.equal(source_share[:, :, 3], torch.ones(2, L, dtype=torch.float64))
    assert stats.top_experts() == {"math": [3] * L, "code": [3] * L}
    assert torch.equal(stats.specialisation(), torch.zeros(L, dtype=torch.float64))


def test_pair_of_experts_coselection_exact():
    model = crafted(top_k=2)
    hand_set_router(model, {3: 2.0, 1: 1.0})  # logits (0, x0, 0, 2 x0): every token picks 3 then 1
    stats = collect_routing(model, [batch([6, 2, 5])])
    n = 13
    for layer in range(3):
        expected = torch.zeros(4, 4, dtype=torch.int64)
        expected[3, 3] = expected[1, 1] = expected[1, 3] = expected[3, 1] = n
        assert torch.equal(stats.coselection[layer], expected)
    assert stats.token_share()[:, [1, 3]].tolist() == [[0.5, 0.5]] * 3
    gate = stats.mean_gate()
    # topk_softmax: the two gates of a token sum to 1 and the larger logit gets the larger gate
    assert torch.allclose(gate[:, 1] + gate[:, 3], torch.ones(3, dtype=torch.float64), atol=1e-7)
    assert (gate[:, 3] > 0.5).all()
    assert stats.load_entropy().tolist() == pytest.approx([math.log(2)] * 3, abs=1e-12)


@pytest.mark.parametrize("routing", ["topk_softmax", "softmax_topk"])
def test_uniform_router_entropy_and_gates_exact(routing):
    model = crafted(top_k=2, routing=routing)
    hand_set_router(model, {})  # all logits 0: the router distribution is uniform for every token
    stats = collect_routing(model, [batch([5, 3])])
    assert stats.router_entropy().tolist() == pytest.approx([math.log(4)] * 3, abs=1e-6)
    chosen = stats.counts > 0
    assert torch.equal(stats.mean_gate()[chosen], torch.full((int(chosen.sum()),), 0.5, dtype=torch.float64))
    assert stats.counts.sum(-1).tolist() == [2 * 8] * 3  # k slots per real token


# ---------------------------------------------------------------------------------------------- general cases


def _reference(model, data: list[dict]):
    """Router inputs captured by hooks, routed by `route` itself, masked by hand: the expected statistics."""
    inputs: dict[int, list] = {}
    hooks = [mlp.moe.register_forward_pre_hook(lambda mod, args, i=i: inputs.setdefault(i, []).append(args[0]))
             for i, mlp in crafted_layers(model)]
    with torch.no_grad():
        for b in data:
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    for h in hooks:
        h.remove()
    cfg = model._sparsecraft_config
    counts, gate_sums, entropy, co = [], [], [], []
    for i, mlp in crafted_layers(model):
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in inputs[i]])
        mask = torch.cat([b["attention_mask"].reshape(-1) for b in data]).bool()
        with torch.no_grad():
            gates, idx, logits = route(x, mlp.moe.router.weight, cfg.top_k, cfg.routing, cfg.normalize_topk)
        gates, idx, logits = gates[mask], idx[mask], logits[mask].double()
        counts.append(torch.bincount(idx.reshape(-1), minlength=cfg.num_experts))
        gate_sums.append(torch.zeros(cfg.num_experts, dtype=torch.float64).index_add_(
            0, idx.reshape(-1), gates.reshape(-1).double()))
        p = torch.softmax(logits, -1)
        entropy.append(float(-(p * p.log()).sum(-1).mean()))
        onehot = torch.zeros(len(idx), cfg.num_experts).scatter_(1, idx, 1.0)
        co.append((onehot.T @ onehot).long())
    return torch.stack(counts), torch.stack(gate_sums), entropy, torch.stack(co)


@pytest.mark.parametrize("method,routing", [("pesc", "topk_softmax"), ("pesc", "softmax_topk"),
                                            ("upcycle", "topk_softmax")])
def test_random_router_matches_reference_and_ignores_padding(method, routing):
    model = crafted(method, experts=6, top_k=2, routing=routing, normalize_topk=False)
    rows = [11, 4, 8, 6]
    padded = [batch(rows, [0, 1, 1, 0])]
    stats = collect_routing(model, padded, ["a", "b"])
    counts, gate_sums, entropy, co = _reference(model, padded)
    assert torch.equal(stats.counts, counts) and torch.equal(stats.coselection, co)
    assert torch.allclose(stats.gate_sums, gate_sums, rtol=0, atol=1e-9)
    assert stats.router_entropy().tolist() == pytest.approx(entropy, abs=1e-6)
    assert stats.tokens == sum(rows) and stats.source_tokens == [17, 12]
    assert torch.equal(stats.source_counts.sum(0), stats.counts)
    assert torch.allclose(stats.token_share().sum(-1), torch.ones(3, dtype=torch.float64))
    # the same records one at a time (no padding at all) give the same counts
    single = [{k: v[i:i + 1, :n] if v.dim() == 2 else v[i:i + 1] for k, v in padded[0].items()}
              for i, n in enumerate(rows)]
    alone = collect_routing(model, single, ["a", "b"])
    assert torch.equal(alone.counts, stats.counts) and torch.equal(alone.source_counts, stats.source_counts)
    assert torch.equal(alone.coselection, stats.coselection)


def test_upcycled_model_all_to_expert_3():
    model = crafted("upcycle", top_k=1)
    hand_set_router(model, {3: 100.0})
    stats = collect_routing(model, [batch([7, 3])])
    assert stats.method == "upcycle" and stats.tokens == 10
    assert stats.token_share()[:, 3].tolist() == [1.0] * 3 and stats.mean_gate()[:, 3].tolist() == [1.0] * 3


@pytest.mark.parametrize("routing,normalize", [("topk_softmax", True), ("softmax_topk", True),
                                               ("softmax_topk", False)])
def test_mean_gates_are_the_forwards_own_gates(routing, normalize):
    """The statistics use the gates each block computed (recorded with the routing), not a recomputation: the
    mean gate per expert equals the one taken by hand from a forward's recorded gates."""
    model = crafted(top_k=2, routing=routing, normalize_topk=normalize)
    data = batch([6, 4], seed=3)
    recorder = model._sparsecraft_recorder
    recorder.start()
    with torch.no_grad():
        model(input_ids=data["input_ids"], attention_mask=data["attention_mask"])
    records = recorder.stop()
    stats = collect_routing(model, [data])
    real = data["attention_mask"].reshape(-1).bool()
    for i, rec in enumerate(records):
        gates, indices = rec.gates[real].double(), rec.indices[real]
        sums = torch.zeros(4, dtype=torch.float64).index_add_(0, indices.reshape(-1), gates.reshape(-1))
        counts = torch.bincount(indices.reshape(-1), minlength=4).double()
        want = torch.where(counts > 0, sums / counts.clamp_min(1), torch.zeros_like(sums))
        torch.testing.assert_close(stats.mean_gate()[i].double(), want)
        if routing == "topk_softmax" or normalize:
            torch.testing.assert_close(rec.gates.sum(-1), torch.ones(rec.gates.shape[0]))


def test_dense_model_and_bad_input_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="dense model"):
        collect_routing(tiny_model("llama"), [batch([3])])
    with pytest.raises(ConfigError, match="not found"):
        data_sources([f"math={tmp_path / 'missing.jsonl'}"])
    with pytest.raises(ConfigError, match="at least one"):
        data_sources([])


def test_model_recorder_is_restored():
    model = crafted()
    recorder = model._sparsecraft_recorder
    collect_routing(model, [batch([3])])
    assert model._sparsecraft_recorder is recorder
    assert all(mlp.moe.recorder is recorder for _, mlp in crafted_layers(model))
    out = model(input_ids=torch.tensor([[5, 6, 7]]), labels=torch.tensor([[5, 6, 7]]))
    assert out.aux_loss is not None and int(out.expert_counts.sum()) == 3 * 3


# ---------------------------------------------------------------------------------------------- data and files


def test_data_items_and_recipe(tmp_path):
    math_file = write_jsonl(tmp_path / "math.jsonl", 3, "sum")
    code_file = write_jsonl(tmp_path / "snippets.jsonl", 3, "def")
    sources = data_sources([f"numbers={math_file}", str(code_file)])
    assert [s.display_name for s in sources] == ["numbers", "snippets"]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"data:\n  sources: [{math_file}]\n  eval_sources:\n    - {{path: {code_file}, name: code}}\n")
    assert [s.display_name for s in data_sources([str(recipe)])] == ["code"]


def test_routing_stats_tokenises_like_training(tmp_path):
    from datasets import Dataset

    from sparsecraft.data import DataSource, tokenize_records

    tok = tiny_tokenizer()
    model = crafted(top_k=1)
    hand_set_router(model, {3: 100.0})
    files = [write_jsonl(tmp_path / "m.jsonl", 5, "sum"), write_jsonl(tmp_path / "c.jsonl", 7, "def")]
    sources = data_sources([f"math={files[0]}", f"code={files[1]}"])
    stats = routing_stats(model, tok, sources, max_records=4, batch_size=3, max_length=40)
    assert stats.sources == ["math", "code"] and stats.source_records == [4, 4]
    # the tokens counted are exactly those training would feed for these records
    expected = []
    for f, name in zip(files, ("math", "code")):
        rows = [{"messages": json.loads(line)["messages"], "source": name} for line in f.read_text().splitlines()[:4]]
        ds, _ = tokenize_records(Dataset.from_list(rows), tok, "auto", 40)
        expected.append(sum(len(ids) for ids in ds["input_ids"]))
    assert stats.source_tokens == expected and stats.tokens == sum(expected)
    assert stats.token_share()[:, 3].tolist() == [1.0] * 3
    assert DataSource(path=str(files[0])).display_name == "m"


def test_write_routes_files_and_plots(tmp_path):
    model = crafted(experts=4, top_k=2)
    stats = collect_routing(model, [batch([9, 6, 4], [0, 1, 2])], ["math", "code", "general"])
    metrics = tmp_path / "metrics.jsonl"
    with open(metrics, "w") as f:
        f.writelines(json.dumps({"step": step, "loss": 3 - step / 10, "aux_loss": 1 + 1 / step, "z_loss": 0.1,
                                "load_imbalance": 1 + 2 / step, "expert_load": [[0.25] * 4] * 3}) + "\n"
                     for step in range(1, 21))
        f.write('{"step": 21, "loss": 1.')  # a line cut by a kill is skipped
    out = tmp_path / "routes"
    written = write_routes(stats, out, metrics, title="pesc")
    names = {p.name for p in written}
    assert {"routes.json", "layers.csv", "experts.csv", "coselection.csv", "sources.csv", "load_heatmap.png",
            "domain_share.png", "coselection.png", "router_curves.png"} <= names
    for png in ("load_heatmap.png", "domain_share.png", "coselection.png", "router_curves.png"):
        assert_valid_png(out / png)
        assert (out / png).with_suffix(".csv").is_file()  # the numbers behind every plot
    again = RoutingStats.read(out)
    assert torch.equal(again.counts, stats.counts) and torch.equal(again.source_counts, stats.source_counts)
    assert torch.allclose(again.router_entropy(), stats.router_entropy())
    data = json.loads((out / "routes.json").read_text())
    assert data["token_share"][0] == pytest.approx(stats.token_share()[0].tolist())
    heat = (out / "load_heatmap.csv").read_text().splitlines()
    assert heat[0] == "layer,expert,share" and len(heat) == 1 + 3 * 4
    curve = (out / "router_curves.csv").read_text().splitlines()
    assert len(curve) == 1 + 2 * 20  # aux loss and imbalance at 20 steps
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temporaries


# ---------------------------------------------------------------------------------------------- command line


@pytest.fixture
def main(monkeypatch):
    """`sparsecraft` with the routes command, registered or not in cli/__init__.py yet."""
    monkeypatch.setitem(cli.COMMANDS, "routes", routes_cmd)
    return cli.main


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("routes_cli")
    model = crafted(top_k=2)
    sparsecraft.save(model, root / "model", standalone=True, tokenizer=tiny_tokenizer())
    write_jsonl(root / "math.jsonl", 6, "sum")
    write_jsonl(root / "code.jsonl", 6, "def")
    return root


def test_cli_routes(main, saved_model, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["routes", str(saved_model / "model"), f"math={saved_model / 'math.jsonl'}",
               str(saved_model / "code.jsonl"), "--out", str(out), "--max-records", "4", "--batch-size", "3",
               "--max-length", "48", "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "top[math]" in text and "top[code]" in text
    stats = RoutingStats.read(out)
    assert stats.sources == ["math", "code"] and stats.source_records == [4, 4] and stats.top_k == 2
    assert_valid_png(out / "load_heatmap.png")
    assert_valid_png(out / "domain_share.png")


@pytest.mark.parametrize("extra,message", [
    (["--max-records", "0"], "--max-records must be positive"),
    (["--batch-size", "-1"], "--batch-size must be positive"),
    ([], "no DATA given"),
])
def test_cli_routes_bad_input_exits_2(main, saved_model, tmp_path, capsys, extra, message):
    data = [] if not extra else [str(saved_model / "math.jsonl")]
    rc = main(["routes", str(saved_model / "model"), *data, "--out", str(tmp_path / "o"), *extra])
    assert rc == 2 and message in capsys.readouterr().err


def test_cli_routes_output_that_is_a_file_exits_2_before_the_work(main, saved_model, tmp_path, capsys):
    (tmp_path / "f").write_text("mine")
    assert main(["routes", str(saved_model / "model"), str(saved_model / "math.jsonl"), "--out",
                 str(tmp_path / "f")]) == 2
    assert "is a file" in capsys.readouterr().err and (tmp_path / "f").read_text() == "mine"


def test_cli_routes_missing_inputs_exit_2(main, saved_model, tmp_path, capsys):
    assert main(["routes", str(tmp_path / "nope"), "x.jsonl", "--out", str(tmp_path / "o")]) == 2
    assert "model not found" in capsys.readouterr().err
    assert main(["routes", str(saved_model / "model"), str(tmp_path / "none.jsonl"), "--out",
                 str(tmp_path / "o")]) == 2
    assert "data file not found" in capsys.readouterr().err


def test_domain_mutual_information_by_hand():
    """I(D; X) / H(D) over (source, expert) slots: disjoint experts per domain give 1, identical routing 0, and a
    mixed case its hand value."""
    from sparsecraft.evaluate.route_stats import RoutingStats

    def stats(source_counts):
        sc = torch.tensor(source_counts, dtype=torch.int64)[:, None, :]  # [S, 1, E]
        counts = sc.sum(0)
        return RoutingStats(method="pesc", num_experts=2, top_k=1, routing="topk_softmax", normalize_topk=True,
                            layers=[0], sources=["math", "code"], tokens=int(counts.sum()),
                            source_tokens=sc.sum((1, 2)).tolist(), source_records=[1, 1],
                            counts=counts, gate_sums=counts.double(), entropy_sums=torch.zeros(1),
                            coselection=torch.zeros(1, 2, 2, dtype=torch.int64), source_counts=sc)

    assert float(stats([[10, 0], [0, 10]]).domain_mi()[0]) == pytest.approx(1.0)
    assert float(stats([[5, 5], [5, 5]]).domain_mi()[0]) == pytest.approx(0.0)
    # p = [[.3, .2], [.1, .4]]: I = sum p log(p / (p_d p_e)), H(D) = log 2
    p = [[0.3, 0.2], [0.1, 0.4]]
    pd, pe = [0.5, 0.5], [0.4, 0.6]
    mi = sum(p[d][e] * math.log(p[d][e] / (pd[d] * pe[e])) for d in range(2) for e in range(2))
    assert float(stats([[3, 2], [1, 4]]).domain_mi()[0]) == pytest.approx(mi / math.log(2))
