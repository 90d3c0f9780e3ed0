"""Pickle only by opt-in, everywhere (issue 15.2): one gate in `sources.load_base_model` that every load passes,
an `--allow-pickle` on every command that loads, and peft's `adapter_model.bin` refused the same way."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer

import sparsecraft
from sparsecraft.cli import build_parser, main
from sparsecraft.errors import CheckpointError


@pytest.fixture(scope="module")
def pickled(tmp_path_factory):
    """A dense base with only pytorch_model.bin, and a crafted directory that refers to it."""
    root = tmp_path_factory.mktemp("pickle")
    base = root / "base"
    model = tiny_model("llama")
    model.save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    (base / "model.safetensors").unlink()
    torch.save(model.state_dict(), base / "pytorch_model.bin")
    crafted = sparsecraft.craft(tiny_model("llama"), sparsecraft.CraftConfig(num_experts=4, adapter_dim=8), seed=0)
    sparsecraft.save(crafted, root / "crafted", base=str(base), tokenizer=tiny_tokenizer())
    return root


def one_line_pickle_error(capsys, *argv):
    code = main([str(a) for a in argv])
    err = [line for line in capsys.readouterr().err.splitlines() if "Traceback" in line or line.startswith("error")]
    assert code == 2 and len(err) == 1 and err[0].startswith("error:") and "--allow-pickle" in err[0], err


def test_every_loading_command_refuses_pickles_without_the_flag(pickled, tmp_path, capsys):
    base, crafted = pickled / "base", pickled / "crafted"
    one_line_pickle_error(capsys, "craft", base, tmp_path / "c1", "--experts", "4", "--adapter-dim", "8")
    one_line_pickle_error(capsys, "generate", crafted, "--prompt", "hi", "--max-new-tokens", "2")
    one_line_pickle_error(capsys, "export", crafted, tmp_path / "e1")
    one_line_pickle_error(capsys, "convert", crafted, tmp_path / "v1", "--to", "camelidae")
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"query": "1?", "response": "1"}) + "\n")
    one_line_pickle_error(capsys, "routes", crafted, data, "--out", tmp_path / "r1")
    with pytest.raises(CheckpointError, match="allow-pickle"):
        sparsecraft.load(crafted)
    with pytest.raises(CheckpointError, match="allow-pickle"):
        sparsecraft.craft_from(base)


def test_the_flag_opens_each_of_them(pickled, tmp_path, capsys):
    base, crafted = pickled / "base", pickled / "crafted"
    assert main(["craft", str(base), str(tmp_path / "c2"), "--experts", "4", "--adapter-dim", "8",
                 "--allow-pickle"]) == 0
    assert main(["generate", str(crafted), "--prompt", "hi", "--max-new-tokens", "2", "--allow-pickle"]) == 0
    assert main(["export", str(crafted), str(tmp_path / "e2"), "--allow-pickle"]) == 0
    assert sparsecraft.is_crafted(sparsecraft.load(crafted, allow_pickle=True))


def test_training_and_upit_take_the_opt_in(pickled, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"query": f"{i}?", "response": str(i)}) + "\n" for i in range(8)))
    args = ["train", "configs/quickstart.yaml", f"model={pickled / 'base'}", f"output_dir={tmp_path / 'run'}",
            f"data={data}", "quantization=none", "max_steps=1", "batch_size=4", "lora.r=4", "craft.num_experts=4",
            "craft.adapter_dim=8", "data.max_length=24", "logging.progress=false", "checkpoint.every=0"]
    one_line_pickle_error(capsys, *args)
    assert main(args + ["--allow-pickle"]) == 0
    parsed = build_parser().parse_args(["upit", "x.yaml", "--allow-pickle"])
    assert parsed.allow_pickle is True


def test_a_pickled_lora_adapter_is_refused(tmp_path, capsys):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "base")
    tiny_tokenizer().save_pretrained(tmp_path / "base")
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules=["q_proj"]))
    sparsecraft.save(peft_model.base_model.model, tmp_path / "dense", base=str(tmp_path / "base"),
                     lora_model=peft_model)
    lora = tmp_path / "dense" / "lora"
    from safetensors.torch import load_file

    tensors = load_file(str(lora / "adapter_model.safetensors"))
    (lora / "adapter_model.safetensors").unlink()
    torch.save(tensors, lora / "adapter_model.bin")
    with pytest.raises(CheckpointError, match="adapter_model.bin.*allow-pickle"):
        sparsecraft.load(tmp_path / "dense")
    assert sparsecraft.load(tmp_path / "dense", allow_pickle=True) is not None
    shutil.rmtree(tmp_path / "dense")


def test_bench_takes_the_opt_in(pickled, capsys):
    args = ["bench", "--model", str(pickled / "base"), "--level", "model", "--methods", "dense", "--repeats", "1",
            "--warmup", "0", "--decode-tokens", "0", "--no-memory", "--no-progress", "--batch-size", "1",
            "--seq-len", "8"]
    one_line_pickle_error(capsys, *args)
    assert main(args + ["--allow-pickle"]) == 0
    assert build_parser().parse_args(["bench", "--serve", "m", "--allow-pickle"]).allow_pickle is True
