"""What `sparsecraft serve` is asked to do: the model, where to listen and the limits of the batcher."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError


@dataclass
class ServeSettings:
    """Server settings (the CLI's flags).

    Attributes:
        model: anything `sparsecraft.load` opens (crafted, trained, published or dense directory, GGUF, built-in
            name, hub ID).
        served_model_name: the id clients put in `model` (default: `model` as given).
        max_batch_size: sequences decoded together; more requests wait in the queue.
        max_queue: requests allowed to wait for a slot; one more gets 429.
        max_model_len: context length (prompt + completion); default the model's `max_position_embeddings`.
        max_prefill_tokens: padded prompt tokens admitted into one prefill forward (one request always fits).
        max_body_bytes: larger request bodies get 413.
        drain_timeout: seconds in-flight requests get to finish after Ctrl-C / SIGTERM.
    """

    model: str
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str | None = None
    dtype: str | None = None
    device: str | None = None
    allow_pickle: bool = False
    max_batch_size: int = 8
    max_queue: int = 64
    max_model_len: int | None = None
    max_prefill_tokens: int = 4096
    max_body_bytes: int = 4 * 1024 * 1024
    drain_timeout: float = 30.0
    threads: int | None = None
    compile: bool = False  # PESC blocks under torch.compile (moe/compiled.py)
    log_level: str = "info"

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model

    def validate(self) -> ServeSettings:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port must be in 0..65535, got {self.port}")
        for name in ("max_batch_size", "max_queue", "max_prefill_tokens", "max_body_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ConfigError(f"--max-model-len must be at least 2, got {self.max_model_len}")
        if self.drain_timeout < 0:
            raise ConfigError(f"--drain-timeout must be >= 0, got {self.drain_timeout}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"--threads must be positive, got {self.threads}")
        if self.log_level not in ("critical", "error", "warning", "info", "debug"):
            raise ConfigError(f"--log-level must be critical, error, warning, info or debug, got {self.log_level!r}")
        return self
