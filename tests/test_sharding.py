"""Sharded training on the CPU with gloo, 2 processes: FSDP2 (`fully_shard`, experts split along the expert
dimension) and DeepSpeed ZeRO-2/3 give the single-process run's losses and weights after a few AdamW steps; the
gathered trainable tensors reload in one process. (accelerate refuses FSDP and DeepSpeed on a CPU, so these drive
the engines directly; docs/scale.md has the GPU commands.)"""

from __future__ import annotations

import json
import os
import socket
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import tiny_model

import sparsecraft
from sparsecraft.moe.balance import selection_biases, update_router_biases

STEPS, LR = 3, 1e-2
IDS = torch.randint(5, 120, (4, 12), generator=torch.Generator().manual_seed(0))  # 4 rows, no padding


BIAS_RATE = 0.05  # large, so that the biases change which experts are chosen within the few steps


def crafted(bias: bool = False):
    """`bias`: auxiliary-loss-free balancing, its selection biases moved by rule after every step."""
    model = sparsecraft.craft(tiny_model("llama"), sparsecraft.CraftConfig(num_experts=4, top_k=2, adapter_dim=8,
                                                                           dropout=0.0, bias_balance=bias,
                                                                           bias_update_rate=BIAS_RATE), seed=0)
    for name, p in model.named_parameters():
        p.requires_grad_(".moe." in f".{name}")
    with torch.no_grad():  # non-zero up-projections, so the adapters' gradients are not trivially zero
        for _, mlp in sparsecraft.crafted_layers(model):
            mlp.moe.experts.up.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    return model.train()


def reference(steps: int = STEPS, bias: bool = False) -> tuple[list[float], dict[str, torch.Tensor]]:
    model = crafted(bias)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    losses = []
    for _ in range(steps):
        out = model(input_ids=IDS, labels=IDS)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        if bias:
            update_router_biases(model, out.expert_counts, BIAS_RATE)
        losses.append(float(out.loss))
    return losses, {k: v.detach().clone() for k, v in sparsecraft.new_parameters(model).items()}


def _engine(engine: str, world: int, bias: bool = False):
    """A crafted model under `engine`, the unwrapped model, and its step / gather functions. With `bias`, each
    step moves the selection biases by the global batch's expert counts, as the training loop does."""
    import torch.distributed as dist

    from sparsecraft.train import sharding

    model = crafted(bias)
    model._sparsecraft_recorder.sync_across_processes = True  # router statistics over the global batch
    assert sharding.one_dispatch_path(model, tokens_per_batch=24) == "dense"  # as the training loop does
    params = [p for p in model.parameters() if p.requires_grad]

    def move_biases(out):
        if bias:
            counts = out.expert_counts.detach().clone()
            dist.all_reduce(counts)
            update_router_biases(model, counts, BIAS_RATE)

    if engine == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh

        sharding.shard_model(model, init_device_mesh("cpu", (world,)))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)

        def step(rows):
            out = model(input_ids=rows, labels=rows)
            out.loss.backward()
            opt.step()
            opt.zero_grad()
            move_biases(out)
            return float(out.loss)

        return model, model, opt, step, lambda: sharding.full_trainable_state(model)  # biases included
    import deepspeed

    stage = int(engine[-1])
    if stage == 3:
        sharding.register_zero3_externals(model)
    config = sharding.deepspeed_config(stage=stage, micro_batch=2, grad_accum=1, world_size=world,
                                       max_grad_norm=0.0, bf16=False)
    ds, opt, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(params, lr=LR), config=config,
                                         dist_init_required=False)

    def step(rows):
        out = ds(input_ids=rows, labels=rows)
        ds.backward(out.loss)
        ds.step()
        move_biases(out)
        return float(out.loss)

    def gather():
        named = sparsecraft.new_parameters(ds.module)
        with deepspeed.zero.GatheredParameters(list(named.values()), enabled=stage == 3):
            return {k: v.detach().clone() for k, v in named.items()}  # biases included

    return ds, ds.module, opt, step, gather


class _Schedule:
    """The loop's LR scheduler, as far as a checkpoint sees it."""

    def state_dict(self) -> dict:
        return {"last_epoch": 1}

    def load_state_dict(self, state: dict) -> None:
        assert state == {"last_epoch": 1}


def _worker(rank: int, world: int, port: int, engine: str, out: str, stop_at: int, bias: bool) -> None:
    """Train STEPS steps under `engine`; with `stop_at`, save a sharded checkpoint after that step, build the model
    and optimizer again from scratch, load the checkpoint and train the rest."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    # a busy node: each rank's timed dispatch probe picks another path. Under ZeRO-2 that reduced one parameter's
    # gradient into another's (buckets fill in backward order) until the loop fixed one path for all ranks.
    import sparsecraft.moe.experts as experts

    experts.probed_path = lambda *args, **kwargs: ("dense", "grouped")[rank]
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from sparsecraft.train.checkpoints import load_checkpoint, save_checkpoint
    from sparsecraft.train.engine_checkpoint import load_engine_state, save_engine_state

    kind = "fsdp" if engine == "fsdp2" else "deepspeed"
    run_dir = Path(out).parent / "run"
    rows = IDS[rank * 2:(rank + 1) * 2]
    model, inner, opt, step, gather = _engine(engine, world, bias)
    shard_rows = None
    if engine == "fsdp2":  # the stacked experts split along the expert dimension
        shard_rows = next(mlp.moe.experts.down for _, mlp in sparsecraft.crafted_layers(model)).to_local().shape[0]
    losses = []
    for i in range(STEPS):
        if i == stop_at:  # the training loop's own atomic checkpoint, with each rank's shard inside
            path = save_checkpoint(run_dir, i, {}, opt, _Schedule(), {}, rank=rank, world_size=world,
                                   barrier=dist.barrier, engine_save=partial(save_engine_state, kind, model, opt),
                                   by_rule=selection_biases(inner))
            torch.manual_seed(123)  # the rebuilt model must get everything from the checkpoint
            model, inner, opt, step, gather = _engine(engine, world, bias)
            load_checkpoint(path, {}, opt, _Schedule(), rank=rank, world_size=world, engine=kind,
                            engine_load=partial(load_engine_state, kind, model, opt), by_rule=selection_biases(inner))
        losses.append(step(rows))
    state = gather()
    mean = torch.tensor(losses)
    dist.all_reduce(mean)
    if rank == 0:
        torch.save({"losses": (mean / world).tolist(), "state": state, "shard_rows": shard_rows}, out)
    dist.barrier()  # rank 0's results are written
    # ended here, without the interpreter's teardown: DeepSpeed's CPU communication op leaves a thread whose
    # destructor at exit sometimes aborts the process ("terminate called without an active exception", 1 zero3 run
    # in ~10), which fails the launch after the results are in
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def reference_steps(steps: int) -> dict[str, torch.Tensor]:
    return reference(steps)[1]


@pytest.fixture(scope="module")
def single():
    return reference()


def _launch(engine: str, tmp_path: Path, stop_at: int = -1, bias: bool = False) -> dict:
    if engine != "fsdp2":
        pytest.importorskip("deepspeed")
    out = tmp_path / "rank0.pt"
    mp.start_processes(_worker, args=(2, _free_port(), engine, str(out), stop_at, bias), nprocs=2, start_method="spawn")
    return torch.load(out, weights_only=False)


@pytest.mark.parametrize("engine", ["fsdp2", "zero2", "zero3"])
def test_two_processes_match_one(engine, single, tmp_path):
    got = _launch(engine, tmp_path)
    want_losses, want_state = single
    assert got["losses"] == pytest.approx(want_losses, rel=1e-4, abs=1e-5)
    assert set(got["state"]) == set(want_state)
    for key, value in want_state.items():
        torch.testing.assert_close(got["state"][key].float(), value, rtol=1e-4, atol=1e-5)
    if engine == "fsdp2":
        assert got["shard_rows"] == 2  # 4 experts over 2 ranks


def test_gathered_state_reloads_in_one_process(single, tmp_path):
    """What a sharded run gathers is what `sparsecraft.save` writes: it reloads as the single-process model."""
    _, state = single
    model = crafted()
    with torch.no_grad():
        for key, param in sparsecraft.new_parameters(model).items():
            param.copy_(state[key])
    sparsecraft.save(model, tmp_path / "m", standalone=True)
    loaded = sparsecraft.load(tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, model.eval()(IDS).logits)


def test_fsdp1_wrap_policy_sees_the_experts():
    from sparsecraft.moe.layers import RoutedBlock
    from sparsecraft.train.sharding import fsdp1_wrap_policy

    model = crafted()
    policy = fsdp1_wrap_policy(model).keywords["lambda_fn"]
    blocks = [m for m in model.modules() if isinstance(m, RoutedBlock)]
    assert blocks and all(policy(b) for b in blocks)
    assert all(policy(layer) for layer in model.model.layers)
    assert not policy(model.model.embed_tokens)  # frozen leaf: left to its parent unit
    from sparsecraft.train.sharding import deepspeed_config

    cfg = deepspeed_config(stage=3, micro_batch=4, grad_accum=4, world_size=8, max_grad_norm=0.3, bf16=True)
    assert cfg["train_batch_size"] == 128 and cfg["zero_optimization"]["stage"] == 3
    json.dumps(cfg)
    assert Path(__file__).name == "test_sharding.py"


def test_a_gathered_state_saves_what_the_model_itself_would(tmp_path):
    """The final save of a sharded run passes the gathered state dict of the peft model: the files equal those of
    a normal save (so the sharded path writes the same directory one process does)."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file

    from sparsecraft.checkpoint.crafted import save_crafted

    model = crafted()
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(2))
    base = tmp_path / "base"
    tiny_model("llama").save_pretrained(base)
    save_crafted(model, tmp_path / "plain", base=str(base), lora_model=peft_model)
    state = {k: v.clone() for k, v in peft_model.state_dict().items()}
    save_crafted(model, tmp_path / "gathered", base=str(base), lora_model=peft_model, full_state=state)
    for name in ("sparsecraft.safetensors", "lora/adapter_model.safetensors"):
        a, b = load_file(str(tmp_path / "plain" / name)), load_file(str(tmp_path / "gathered" / name))
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.parametrize("engine", ["fsdp2", "zero2", "zero3"])
def test_sharded_checkpoint_resumes_and_reads_whole_in_one_process(engine, single, tmp_path):
    """Saved after step 1 by 2 sharded processes, model and optimizer rebuilt from scratch and loaded: the
    remaining steps give the uninterrupted run's losses and weights; the checkpoint's trainable tensors then read
    back whole in this (single, non-distributed) process, under the single-process model's names."""
    from sparsecraft.train.checkpoints import read_trainable
    from sparsecraft.train.engine_checkpoint import engine_of

    got = _launch(engine, tmp_path, stop_at=1)
    want_losses, want_state = single
    assert got["losses"] == pytest.approx(want_losses, rel=1e-4, abs=1e-5)
    for key, value in want_state.items():
        torch.testing.assert_close(got["state"][key].float(), value, rtol=1e-4, atol=1e-5)
    checkpoint = tmp_path / "run" / "checkpoints" / "step-000001"
    assert engine_of(checkpoint) == ("fsdp" if engine == "fsdp2" else "deepspeed")
    assert not list((tmp_path / "run" / "checkpoints").glob(".*"))  # the temporary folder was renamed into place
    whole = read_trainable(checkpoint)
    plain = crafted()
    assert set(whole) == set(sparsecraft.new_parameters(plain))  # names as one unsharded process has them
    after_one = reference_steps(1)
    for key, value in whole.items():
        assert value.shape == after_one[key].shape
        torch.testing.assert_close(value.float(), after_one[key], rtol=1e-4, atol=1e-5)


def test_a_sharded_checkpoint_loads_into_an_unsharded_model(tmp_path):
    """DCP reshards on load: FSDP files written by 2 processes resume a plain model and optimizer in one process,
    which then continues exactly as the uninterrupted run."""
    from sparsecraft.errors import CheckpointError
    from sparsecraft.train.checkpoints import load_checkpoint
    from sparsecraft.train.engine_checkpoint import load_engine_state

    _launch("fsdp2", tmp_path, stop_at=1)
    checkpoint = tmp_path / "run" / "checkpoints" / "step-000001"
    model = crafted()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    with pytest.raises(CheckpointError, match="under fsdp; resume it under the same engine"):
        load_checkpoint(checkpoint, {}, opt, _Schedule(), world_size=2)  # a plain run cannot take sharded files
    load_engine_state("fsdp", model, opt, checkpoint)
    losses = []
    for _ in range(STEPS - 1):
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    want_losses, want_state = reference()
    assert losses == pytest.approx(want_losses[1:], rel=1e-4, abs=1e-5)
    for key, value in sparsecraft.new_parameters(model).items():
        torch.testing.assert_close(value.detach(), want_state[key], rtol=1e-4, atol=1e-5)


def test_one_dispatch_path_names_the_rules_choice_unless_a_path_is_named():
    from sparsecraft.train.sharding import one_dispatch_path

    model = crafted()
    assert one_dispatch_path(model, tokens_per_batch=1) == "dense"  # never `gathered`, whatever the count
    assert sparsecraft.surgery.craft_config_of(model).dispatch == "dense"
    sparsecraft.surgery.set_dispatch(model, "sorted")
    assert one_dispatch_path(model, tokens_per_batch=4096) is None  # a named path is the user's choice
    assert sparsecraft.surgery.craft_config_of(model).dispatch == "sorted"
    assert one_dispatch_path(tiny_model("llama"), tokens_per_batch=4096) is None  # nothing crafted


@pytest.fixture(scope="module")
def single_biased():
    return reference(bias=True)


@pytest.mark.parametrize("engine", ["fsdp2", "zero2", "zero3"])
def test_balancing_biases_move_and_resume_under_sharding(engine, single_biased, tmp_path):
    """Auxiliary-loss-free balancing under a sharded engine: each rank moves the selection biases by the global
    counts, the checkpoint after step 1 keeps them (a rebuilt model starts them at zero), and the remaining steps
    give the single-process run's losses, weights and biases."""
    got = _launch(engine, tmp_path, stop_at=1, bias=True)
    want_losses, want_state = single_biased
    biases = [k for k in want_state if k.endswith("router_bias")]
    assert biases and all(want_state[k].ne(0).any() for k in biases)
    assert set(got["state"]) == set(want_state)
    assert got["losses"] == pytest.approx(want_losses, rel=1e-4, abs=1e-5)
    for key, value in want_state.items():
        torch.testing.assert_close(got["state"][key].float(), value, rtol=1e-4, atol=1e-5)
