"""Dispatch chosen by measurement: the probe picks the fastest candidate, caches it per shape, leaves the global
RNG alone, agrees with every fixed path, and its choices survive a checkpoint."""

from __future__ import annotations

import pytest
import torch

from sparsecraft.moe import experts as ex
from sparsecraft.moe.experts import candidate_paths, choose_path, dispatch, probed_choice, probed_path
from sparsecraft.moe.probe import PROBE, ROUTINGS, DispatchProbe, token_bucket


class FakeClock:
    """A timer that advances by the running path's scripted duration."""

    def __init__(self, durations: dict[str, float]):
        self.now, self.durations, self.calls = 0.0, durations, []

    def __call__(self) -> float:
        return self.now

    def run(self, path: str) -> None:
        self.calls.append(path)
        self.now += self.durations[path]


@pytest.fixture(autouse=True)
def fresh_probe():
    PROBE.clear()
    yield
    PROBE.clear()


def make_call(n: int, e: int = 8, k: int = 2, r: int = 16, h: int = 64, grad: bool = False, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, generator=g).requires_grad_(grad)
    scores, idx = torch.randn(n, e, generator=g).topk(k, dim=-1)
    down = (torch.randn(e, r, h, generator=g) * 0.1).requires_grad_(grad)
    up = (torch.randn(e, h, r, generator=g) * 0.1).requires_grad_(grad)
    return x, scores.softmax(-1), idx, down, up


def test_probe_keeps_the_fastest_candidate_and_measures_each_shape_once():
    clock = FakeClock({"dense": 3.0, "grouped": 1.0, "gathered": 2.0})
    probe = DispatchProbe(repeats=3, timer=clock)
    cpu = torch.device("cpu")
    assert probe.choose(("a",), ["dense", "grouped", "gathered"], clock.run, cpu) == "grouped"
    assert clock.calls.count("dense") == 4 and clock.calls.count("grouped") == 4  # one warm-up + 3 timed each
    before = len(clock.calls)
    assert probe.choose(("a",), ["dense", "grouped", "gathered"], clock.run, cpu) == "grouped"
    assert len(clock.calls) == before  # cached: nothing runs again
    clock.durations["dense"] = 0.5
    assert probe.choose(("b",), ["dense", "grouped"], clock.run, cpu) == "dense"  # another shape, its own probe
    assert probe.results()[("a",)].seconds == {"dense": 3.0, "grouped": 1.0, "gathered": 2.0}
    before = len(clock.calls)
    assert probe.choose(("c",), ["dense"], clock.run, cpu) == "dense" and len(clock.calls) == before  # no choice


def test_warmup_calls_run_untimed_before_the_timed_ones():
    clock = FakeClock({"dense": 1.0, "grouped": 2.0})
    probe = DispatchProbe(repeats=3, timer=clock, warmup=5)
    assert probe.choose(("a",), ["dense", "grouped"], clock.run, torch.device("cpu")) == "dense"
    assert clock.calls == ["dense"] * 8 + ["grouped"] * 8
    assert PROBE.warmup == ROUTINGS  # the process-wide probe warms each path on all its routings


def test_export_and_restore_round_trip():
    clock = FakeClock({"dense": 2.0, "sorted": 1.0})
    probe = DispatchProbe(timer=clock)
    probe.choose((16, 8, 2, 16, 64, "float32", "cpu", True), ["dense", "sorted"], clock.run, torch.device("cpu"))
    other = DispatchProbe(timer=FakeClock({}))
    other.restore(probe.export())
    assert other.results() == probe.results()


@pytest.mark.parametrize("seconds, timed", [(1.0, 3), (5e-4, 4), (1e-4, 20), (1e-6, 25)])
def test_short_calls_are_timed_more_often(seconds, timed):
    clock = FakeClock({"dense": seconds, "gathered": 2 * seconds})
    probe = DispatchProbe(repeats=3, timer=clock, min_seconds=2e-3, max_repeats=25)
    assert probe.choose(("k",), ["dense", "gathered"], clock.run, torch.device("cpu")) == "dense"
    # one warm-up each, then until 2 ms are timed (at least 3, at most 25)
    assert clock.calls.count("dense") == 1 + timed


def test_token_bucket():
    assert [token_bucket(n) for n in (0, 1, 2, 3, 64, 65, 1000)] == [1, 1, 2, 4, 64, 128, 1024]


@pytest.mark.parametrize("n, grad", [(1, False), (12, False), (300, False), (300, True)])
def test_auto_equals_every_fixed_path(n, grad):
    x, gates, idx, down, up = make_call(n, grad=grad)
    auto = dispatch(x, gates, idx, down, up, path="auto")
    for path in ("loop", "dense", "grouped", "padded", "sorted"):
        torch.testing.assert_close(auto, dispatch(x, gates, idx, down, up, path=path), rtol=1e-5, atol=1e-6)
    chosen = probed_choice(n, 8, 2, 16, 64, torch.float32, torch.device("cpu"), grad)
    assert chosen in candidate_paths(x, n, 8, 2, 16)
    if grad:  # the probe's own backward leaves no gradient on the caller's tensors
        assert x.grad is None and down.grad is None


def test_each_activation_is_probed_on_its_own():
    """The candidates (and their speeds) depend on the activation: a choice for GELU is not reused for SiLU."""
    x, gates, idx, down, up = make_call(300)
    dispatch(x, gates, idx, down, up, path="auto", activation="gelu")
    assert probed_choice(300, 8, 2, 16, 64, torch.float32, "cpu", False, "silu") is None
    dispatch(x, gates, idx, down, up, path="auto", activation="silu")
    assert probed_choice(300, 8, 2, 16, 64, torch.float32, "cpu", False, "silu") is not None
    assert len(PROBE.results()) == 2


def test_probe_leaves_the_global_random_stream_alone():
    x, gates, idx, down, up = make_call(200)
    torch.manual_seed(123)
    dispatch(x, gates, idx, down, up, path="auto")
    after_probe = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(3), after_probe)
    assert len(PROBE.results()) == 1


def test_rule_never_probes_and_follows_choose_path():
    x, gates, idx, down, up = make_call(200)
    out = dispatch(x, gates, idx, down, up, path="rule")
    assert not PROBE.results()
    torch.testing.assert_close(out, dispatch(x, gates, idx, down, up, path=choose_path(200, 8, 2, 16)))


def test_a_rigged_timer_decides_the_auto_path(monkeypatch):
    x, gates, idx, down, up = make_call(300)
    slow = {"dense": 5.0, "grouped": 1.0, "sorted": 1.0, "padded": 3.0}
    clock = FakeClock(slow)
    calls = []
    real = PROBE.choose

    def choose(key, candidates, run, device):
        def timed(path):
            run(path)
            clock.run(path)
            calls.append(path)
        return real(key, candidates, timed, device)

    monkeypatch.setattr(PROBE, "timer", clock)
    monkeypatch.setattr(PROBE, "choose", choose)
    assert probed_path(x, idx, down, up) in ("grouped", "sorted")
    clock.durations = {"dense": 0.1, "grouped": 9.0, "sorted": 9.0, "padded": 9.0}
    x2, gates2, idx2, down2, up2 = make_call(300, h=32)  # another shape
    assert probed_path(x2, idx2, down2, up2) == "dense"
    clock.durations = {"dense": 2.0, "grouped": 9.0, "sorted": 9.0, "padded": 1.0}
    x3, gates3, idx3, down3, up3 = make_call(300, h=48)
    assert probed_path(x3, idx3, down3, up3) == "dense"  # padded is never a candidate, however fast
    assert "padded" not in calls


def test_choices_travel_with_training_checkpoints(tmp_path):
    from sparsecraft.train.checkpoints import load_checkpoint, save_checkpoint

    x, gates, idx, down, up = make_call(100)
    dispatch(x, gates, idx, down, up, path="auto")
    measured = PROBE.export()
    param = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([param], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    path = save_checkpoint(tmp_path, 1, {"p": param}, opt, sched, {"tokens": 0})
    assert (path / "dispatch_0.json").is_file()
    PROBE.clear()
    load_checkpoint(path, {"p": param}, opt, sched)
    assert PROBE.export() == measured


def test_probing_inside_activation_checkpointing():
    """The first forward probes, the recomputation hits the cache: the saved-tensor count must still agree."""
    from torch.utils.checkpoint import checkpoint

    x, gates, idx, down, up = make_call(256, grad=True)
    out = checkpoint(lambda a, d, u: dispatch(a, gates, idx, d, u, path="auto"), x, down, up, use_reentrant=False)
    out.square().sum().backward()
    assert len(PROBE.results()) == 1
    grads = [t.grad.clone() for t in (x, down, up)]
    for t in (x, down, up):
        t.grad = None
    dispatch(x, gates, idx, down, up, path="auto").square().sum().backward()
    for got, t in zip(grads, (x, down, up)):
        torch.testing.assert_close(got, t.grad)


def test_bench_labels_auto_with_the_probed_path():
    from sparsecraft.bench.base import pesc_path
    from sparsecraft.bench.settings import BenchSettings

    settings = BenchSettings(experts=8, top_k=2, adapter_dim=64, tokens=2048)
    cpu = torch.device("cpu")
    assert pesc_path("auto", 2048, settings, 576, cpu) == "auto:grouped"  # before any run: the rule's pick
    PROBE.restore([{"key": [2048, 8, 2, 64, 576, "float32", "cpu", True, "gelu"], "path": "dense"}])
    assert pesc_path("auto", 2048, settings, 576, cpu) == "auto:dense"
    assert pesc_path("rule", 2048, settings, 576, cpu) == "rule:grouped"


def test_the_probe_times_the_calls_own_routing(monkeypatch):
    """Uneven routing (a fresh router's) makes the grouped and padded paths slower than uniform random choices
    would: the probe must time the expert choices the call really makes."""
    x, gates, idx, down, up = make_call(300)
    idx = torch.stack([torch.zeros(300, dtype=torch.long), torch.ones(300, dtype=torch.long)], 1)  # all on 0, 1
    seen = []
    real_dense = ex._PATHS["dense"]

    def spy(x_, g_, i_, *rest):
        seen.append(i_.clone())
        return real_dense(x_, g_, i_, *rest)

    monkeypatch.setitem(ex._PATHS, "dense", spy)
    probed_path(x, idx, down, up)
    assert len(seen) >= 4
    for i in seen:  # the call's own choices, with an eighth of the tokens drawn again per timed call
        changed = (i != idx).any(1)
        assert 0 < int(changed.sum()) <= 300 // 8
        assert torch.equal(i[~changed], idx[~changed])
        assert torch.all(i[:, 0] != i[:, 1]) and int(i.max()) < 8
    counts = {tuple(torch.bincount(i.reshape(-1), minlength=8).tolist()) for i in seen}
    assert len(counts) > 1  # per-expert counts vary from call to call, as a real router's do
    # steady state: every routing is run untimed first, and the timed calls reuse them (kernels built once)
    warm, timed = seen[:ROUTINGS], seen[ROUTINGS:]
    assert len(timed) >= 3 and len({tuple(i.reshape(-1).tolist()) for i in warm}) == ROUTINGS
    assert all(any(torch.equal(t, w) for w in warm) for t in timed)


def test_redraw_some_tokens_keeps_choices_distinct_and_leaves_the_global_stream():
    idx = torch.stack([torch.arange(64) % 4, (torch.arange(64) + 1) % 4], 1)
    torch.manual_seed(5)
    expected = torch.rand(2)
    torch.manual_seed(5)
    out = ex.redraw_some_tokens(idx, 4, torch.Generator().manual_seed(0))
    assert torch.equal(torch.rand(2), expected)
    assert out.shape == idx.shape and torch.all(out[:, 0] != out[:, 1])
    assert int((out != idx).any(1).sum()) <= 8
    assert ex.redraw_some_tokens(idx[:0], 4, torch.Generator()).shape == (0, 2)


def test_the_probe_times_in_the_callers_thread_unless_a_mode_is_active():
    """A second thread's OpenMP team runs small CPU ops at about half speed, so the probe times in the caller's
    thread; under a torch dispatch mode (which it must not run under) it takes a thread of its own."""
    import threading

    from torch.utils._python_dispatch import TorchDispatchMode

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    where = []
    probe = DispatchProbe(repeats=1, timer=FakeClock({}), warmup=0)
    cpu = torch.device("cpu")
    probe.choose(("a",), ["dense", "grouped"], lambda path: where.append(threading.get_ident()), cpu)
    assert set(where) == {threading.get_ident()}
    where.clear()
    with Passthrough():
        probe.choose(("b",), ["dense", "grouped"], lambda path: where.append(threading.get_ident()), cpu)
    assert where and threading.get_ident() not in where


def test_the_probe_takes_a_thread_where_the_caller_disabled_saved_tensor_hooks():
    """Its own identity hooks cannot be installed there: it times in a thread instead of failing the call."""
    import threading

    where = []
    probe = DispatchProbe(repeats=1, timer=FakeClock({}), warmup=0)
    with torch.autograd.graph.disable_saved_tensors_hooks("no hooks here"):
        path = probe.choose(("c",), ["dense", "grouped"], lambda path: where.append(threading.get_ident()),
                            torch.device("cpu"))
    assert path in ("dense", "grouped")
    assert where and threading.get_ident() not in where


def test_the_probes_saved_tensors_bypass_the_callers_hooks():
    x, gates, idx, down, up = make_call(256, grad=True)
    packed = []

    def pack(t):
        packed.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        probed_path(x, idx, down, up)  # the probe runs forward and backward of every candidate here
    assert PROBE.results() and not packed
