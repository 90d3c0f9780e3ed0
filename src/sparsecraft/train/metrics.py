"""Run logging: a JSONL file of metrics (and TensorBoard when installed), and the terminal progress bar."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from tqdm.auto import tqdm


class MetricsLog:
    """Appends one JSON object per logged step to `OUTPUT/metrics.jsonl`; mirrors scalars to TensorBoard."""

    def __init__(self, output_dir: str | os.PathLike, enabled: bool = True, tensorboard: bool = True) -> None:
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self.writer = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    self.writer = SummaryWriter(str(Path(output_dir) / "tensorboard"))
                except ImportError:
                    self.writer = None

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            step = record.get("step", 0)
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def truncate_after(path: Path, step: int) -> None:
    """On resume, drop log lines of steps after the checkpoint (they will be logged again)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
    path.write_text("".join(l + "\n" for l in kept))


def expert_load(counts: torch.Tensor) -> list[list[float]]:
    """Per-layer share of (token, slot) assignments per expert: `[L, E]` counts -> rows summing to 1."""
    counts = counts.double()
    return (counts / counts.sum(-1, keepdim=True).clamp_min(1)).round(decimals=4).tolist()


def load_imbalance(counts: torch.Tensor) -> float:
    """Mean over layers of max/mean expert load (1.0 = perfectly balanced)."""
    counts = counts.double()
    mean = counts.mean(-1).clamp_min(1e-9)
    return float((counts.max(-1).values / mean).mean())


def progress_bar(total: int, initial: int, enabled: bool):
    return tqdm(total=total, initial=initial, disable=not enabled, desc="train", unit="step", dynamic_ncols=True)
