"""Hub model IDs, through huggingface_hub's own cache: a tiny model placed in a temporary hub cache
(`models--org--name/snapshots/<commit>` + `refs/main`) is crafted, saved, reloaded and trained by ID with
`HF_HUB_OFFLINE=1`; the package itself never sets a hub variable; errors are one line.

huggingface_hub and transformers read HF_HUB_OFFLINE and HF_HUB_CACHE when they are imported, so the offline
cases run in a subprocess with those variables set by the test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer

import sparsecraft
from sparsecraft import hub
from sparsecraft.errors import CheckpointError

REPO = Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"
NEWER = "fedcba9876543210fedcba9876543210fedcba98"


def put_in_cache(cache: Path, repo_id: str, folder_writer, commit: str = COMMIT, main: bool = True) -> Path:
    """Write a snapshot of `repo_id` into a hub cache as `hf download` would leave it."""
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo_dir / "snapshots" / commit
    snap.mkdir(parents=True)
    folder_writer(snap)
    if main:
        (repo_dir / "refs").mkdir(exist_ok=True)
        (repo_dir / "refs" / "main").write_text(commit)
    return snap


def write_tiny(folder: Path, seed: int = 0) -> None:
    tiny_model("llama", seed=seed).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    put_in_cache(root, "org/tiny", write_tiny)
    put_in_cache(root, "org/tiny", lambda f: write_tiny(f, seed=1), commit=NEWER, main=False)
    return root


def run_offline(cache: Path, code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "hf-home"),
           "PYTHONPATH": str(REPO / "tests") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)


def test_model_ids_load_craft_save_and_reload_offline_from_the_hub_cache(cache, tmp_path):
    code = f"""
import json, torch, sparsecraft
from sparsecraft.cli import main
ids = torch.tensor([[5, 6, 7, 8]])
dense = sparsecraft.load("org/tiny")
older = sparsecraft.load("org/tiny@{NEWER}")
assert not torch.equal(dense(ids).logits, older(ids).logits)  # another commit, other weights
model = sparsecraft.craft_from("org/tiny", sparsecraft.CraftConfig(num_experts=4, top_k=2, adapter_dim=8), seed=0)
assert torch.allclose(model(ids).logits, dense(ids).logits, atol=1e-5)
sparsecraft.save(model, "crafted")
base = json.load(open("crafted/config.json"))["base"]
back = sparsecraft.load("crafted")
assert torch.equal(back(ids).logits, model(ids).logits)
code = main(["craft", "org/tiny@{NEWER}", "cli-crafted", "--experts", "4", "--adapter-dim", "8"])
print(json.dumps({{"base": base, "cli": json.load(open("cli-crafted/config.json"))["base"], "code": code}}))
"""
    done = run_offline(cache, code, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["base"]["spec"] == "org/tiny" and out["base"]["revision"] == COMMIT  # refs/main resolved
    assert out["cli"]["revision"] == NEWER and out["code"] == 0


def test_training_a_hub_model_by_id_offline(cache, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"query": f"{i}+1?", "response": str(i + 1)}) + "\n" for i in range(16)))
    code = f"""
import json
from sparsecraft.cli import main
code = main(["train", "{REPO / 'configs' / 'quickstart.yaml'}", "model=org/tiny", "output_dir=run", "data={data}",
             "quantization=none", "max_steps=2",
             "batch_size=4", "lora.r=4", "craft.num_experts=4", "craft.adapter_dim=8", "data.max_length=32",
             "logging.progress=false", "checkpoint.every=0"])
print(json.dumps({{"code": code, "base": json.load(open("run/model/config.json"))["base"]}}))
"""
    done = run_offline(cache, code, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["code"] == 0 and out["base"]["revision"] == COMMIT


def test_a_crafted_directory_on_the_hub_loads_by_id(tmp_path):
    model = sparsecraft.craft(tiny_model("llama"), sparsecraft.CraftConfig(num_experts=4, top_k=2, adapter_dim=8),
                              seed=0)
    with torch.no_grad():
        for p in sparsecraft.new_parameters(model).values():
            p.normal_(0, 0.1, generator=torch.Generator().manual_seed(3))
    ids = torch.tensor([[9, 10, 11]])
    want = model(ids).logits
    cache = tmp_path / "cache"
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = "TRAINED {{ messages[0]['content'] }}"  # the repo's own, not the base's
    put_in_cache(cache, "me/pesc", lambda f: sparsecraft.save(model, f, standalone=True, tokenizer=tokenizer))
    torch.save(want, tmp_path / "want.pt")
    code = f"""
import torch, sparsecraft
from transformers import AutoModelForCausalLM
from sparsecraft.generation import load_tokenizer_for
want = torch.load({str(tmp_path / 'want.pt')!r})
ids = torch.tensor([[9, 10, 11]])
for model in (sparsecraft.load("me/pesc"), AutoModelForCausalLM.from_pretrained("me/pesc", revision="{COMMIT}")):
    assert sparsecraft.is_crafted(model) and torch.equal(model(ids).logits, want)
    assert load_tokenizer_for("me/pesc", model).chat_template.startswith("TRAINED")  # what generate/eval/serve use
print("ok")
"""
    done = run_offline(cache, code, tmp_path)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def test_offline_and_not_cached_is_one_line_naming_the_id_and_the_setting(cache, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "sparsecraft", "craft", "org/missing", str(tmp_path / "out")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "org/missing" in lines[0] and "HF_HUB_OFFLINE" in lines[0], done.stderr


def _raising(exc):
    def fake(*args, **kwargs):
        raise exc
    return fake


@pytest.mark.parametrize("name, message", [
    ("GatedRepoError", "is gated"), ("RepositoryNotFoundError", "no such model on the hub"),
    ("RevisionNotFoundError", "org/private@v9: no such revision"),
])
def test_hub_errors_are_one_line(monkeypatch, name, message):
    import httpx
    import huggingface_hub
    from huggingface_hub import errors

    response = httpx.Response(404, request=httpx.Request("GET", "https://huggingface.co/api/models/org/private"))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _raising(getattr(errors, name)("boom",
                                                                                            response=response)))
    with pytest.raises(CheckpointError, match=message) as info:
        sparsecraft.load("org/private@v9")
    assert "\n" not in str(info.value) and "org/private" in str(info.value)


def test_repo_ids_and_paths():
    assert hub.looks_like_repo_id("Qwen/Qwen2.5-0.5B-Instruct") and hub.looks_like_repo_id("gpt2")
    assert hub.looks_like_repo_id("org/name@main") and hub.split_revision("org/n@v1") == ("org/n", "v1")
    for text in ("./rel/dir", "/abs/dir", "a/b/c", "model.gguf", "x/../y"):
        assert not hub.looks_like_repo_id(text)
    with pytest.raises(CheckpointError, match="model path not found"):
        sparsecraft.load("./no/such/dir")


def test_the_package_never_sets_a_hub_variable():
    offenders = []
    for path in (REPO / "src").rglob("*.py"):
        text = path.read_text()
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
            if f'environ.setdefault("{var}"' in text or f'environ["{var}"] =' in text:
                offenders.append(f"{path.name}: {var}")
    assert offenders == []


def test_a_base_in_a_cache_dir_of_its_own_is_found_again(cache, tmp_path):
    """`cache_dir=` (and `token=`) given to craft and load reach every read of the base: its tokenizer is saved
    with the crafted model and the crafted model loads again from that cache."""
    code = f"""
import os, torch, sparsecraft
ids = torch.tensor([[5, 6, 7, 8]])
own = {str(cache)!r}  # HF_HUB_CACHE is an empty folder: only the cache_dir argument says where the base is
model = sparsecraft.craft_from("org/tiny", sparsecraft.CraftConfig(num_experts=4, top_k=2, adapter_dim=8),
                               cache_dir=own)
sparsecraft.save(model, "crafted")
assert os.path.isfile("crafted/tokenizer_config.json")
back = sparsecraft.load("crafted", cache_dir=own)
assert torch.equal(back(ids).logits, model(ids).logits)
print("ok")
"""
    done = run_offline(tmp_path / "empty-cache", code, tmp_path)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def test_offline_a_cached_hub_base_with_only_pickled_weights_names_allow_pickle(tmp_path):
    """Offline the repo's file list cannot be fetched: the cached snapshot tells that its weights are pickled."""
    cache = tmp_path / "cache"

    def write_pickled(folder: Path) -> None:  # transformers 5 writes safetensors only: the old format by hand
        model = tiny_model("llama")
        model.config.save_pretrained(folder)
        torch.save(model.state_dict(), folder / "pytorch_model.bin")

    put_in_cache(cache, "org/pickled", write_pickled)
    code = """
from sparsecraft.cli import main
raise SystemExit(main(["craft", "org/pickled", "out", "--experts", "2", "--adapter-dim", "4"]))
"""
    done = run_offline(cache, code, tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "--allow-pickle" in done.stderr.strip().splitlines()[-1]
