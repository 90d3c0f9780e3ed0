"""HumanEval scoring takes a chat answer's function wherever its fences sit, and counts a pass only when the
problem's own tests ran to the end (an early exit or the answer's own test runner is not a pass)."""

from __future__ import annotations

import pytest

from sparsecraft.evaluate import humaneval


@pytest.fixture(scope="module")
def problem():
    return {p["task_id"]: p for p in humaneval.load_problems()}["HumanEval/28"]  # concatenate(strings)


BODY = "def concatenate(strings):\n    return ''.join(strings)\n"

# shapes real chat answers take (kept samples of the paper-small runs), each holding a correct function
ANSWERS = {
    "fenced": f"Here you go:\n```python\n{BODY}```\nDone.",
    "code first, closing fence, prose": f"from typing import List\n\n{BODY}```\n\nThe `join` method glues them.",
    "capitalised language tag": f"Here you go:\n```Python\n{BODY}```\nDone.",
    "python3 tag": f"```python3\n{BODY}```",
    "usage block before the function": f"```python\nprint(concatenate(['a']))\n```\nHow:\n```python\n{BODY}```",
    "unterminated fence": f"Sure.\n```python\n{BODY}",
    "no fence": f"{BODY}\nThis joins the strings.",
    "indented fence": f"Answer:\n  ```python\n{BODY}  ```\n",
    "body only in a fence": "```python\n    return ''.join(strings)\n```\nThat is all.",
    "plain continuation": "    return ''.join(strings)\n\n\nprint('x')\n",
}


@pytest.mark.parametrize("shape", list(ANSWERS))
def test_every_answer_shape_yields_the_function(problem, shape):
    with humaneval.allow_code_execution():
        assert humaneval.process_any_completion(problem, [ANSWERS[shape]]) == {"pass@1": 1.0}, (
            humaneval.completion_as_code(problem, ANSWERS[shape]))


def test_wrong_code_in_any_shape_still_fails(problem):
    wrong = "def concatenate(strings):\n    return ''\n"
    with humaneval.allow_code_execution():
        for answer in (f"```Python\n{wrong}```", f"{wrong}```\nprose", f"```python\nx = 1\n```\n```python\n{wrong}```"):
            assert humaneval.process_any_completion(problem, [answer]) == {"pass@1": 0.0}


@pytest.mark.parametrize("exit_call", ["import sys; sys.exit(0)", "exit()", "import os; os._exit(0)",
                                       "raise SystemExit"])
def test_exiting_before_the_tests_is_not_a_pass(problem, exit_call):
    with humaneval.allow_code_execution():
        result = humaneval.check_completion(problem, f"    return ''\n\n{exit_call}\n")
    assert not result.passed


def test_the_answers_own_test_runner_does_not_replace_the_problems_tests(problem):
    # unittest.main() exits 0 when the model's own (weaker) tests pass; HumanEval's tests must still run
    answer = ("```python\ndef concatenate(strings):\n    return ''\n\nimport unittest\n"
              "class T(unittest.TestCase):\n    def test(self):\n        self.assertEqual(concatenate([]), '')\n\n"
              "if __name__ == '__main__':\n    unittest.main()\n```")
    with humaneval.allow_code_execution():
        assert humaneval.process_any_completion(problem, [answer]) == {"pass@1": 0.0}
        right = answer.replace("return ''\n\nimport", "return ''.join(strings)\n\nimport")
        assert humaneval.process_any_completion(problem, [right]) == {"pass@1": 1.0}


def test_an_answer_that_prints_still_passes(problem):
    # its prints are buffered and flushed at exit, after the end-of-program token
    answer = f"```python\n{BODY}print(concatenate(['a', 'b']))\nfor i in range(3):\n    print(i)\n```"
    with humaneval.allow_code_execution():
        assert humaneval.process_any_completion(problem, [answer]) == {"pass@1": 1.0}
