import json
import re

import pytest

from pavlit.interfaces import SPLITS, Task
from pavlit.tasks.arithmetic import ALPHABET, MAX_VALUE, ArithmeticTask, format_prompt, solve
from pavlit.tasks.jsonl import JsonlTask
from pavlit.tasks.reasoning_gym import ReasoningGymTask

# ---------------------------------------------------------------------------------------------------------------
# arithmetic


@pytest.fixture(scope="module")
def arithmetic() -> ArithmeticTask:
    return ArithmeticTask(difficulty=2, seed=0, n_train=300, n_validation=50, n_test=50)


def test_solve_matches_hand_computed_chain():
    expression, steps, answer = solve(17, ["+", "*", "-", "+"], [25, 3, 8, 46])
    assert expression == "(17+25)*3-8+46"
    assert steps == ["17+25=42\n", "42*3=126\n", "126-8=118\n", "118+46=164\n", "Answer: 164\n"]
    assert answer == 164
    assert solve(6, ["*", "*", "-", "*"], [3, 2, 4, 5])[0] == "(6*3*2-4)*5"
    assert format_prompt("(17+25)*3-8+46") == "Compute (17+25)*3-8+46.\n"


def test_arithmetic_is_deterministic_and_seed_dependent(arithmetic):
    again = ArithmeticTask(difficulty=2, seed=0, n_train=300, n_validation=50, n_test=50)
    other = ArithmeticTask(difficulty=2, seed=1, n_train=300, n_validation=50, n_test=50)
    for split in SPLITS:
        assert arithmetic.problems(split) == again.problems(split)
    assert [p.prompt for p in arithmetic.problems("test")] != [p.prompt for p in other.problems("test")]


def test_arithmetic_test_split_does_not_depend_on_train_size(arithmetic):
    bigger = ArithmeticTask(difficulty=2, seed=0, n_train=600, n_validation=50, n_test=50)
    assert bigger.problems("test") == arithmetic.problems("test")
    assert bigger.problems("validation") == arithmetic.problems("validation")


def test_arithmetic_splits_are_disjoint_and_sized(arithmetic):
    prompts = {split: [p.prompt for p in arithmetic.problems(split)] for split in SPLITS}
    assert [len(prompts[split]) for split in SPLITS] == [300, 50, 50]
    all_prompts = [prompt for split in SPLITS for prompt in prompts[split]]
    assert len(set(all_prompts)) == len(all_prompts)
    ids = [p.id for p in arithmetic.problems("train")]
    assert len(set(ids)) == len(ids)


@pytest.mark.parametrize("difficulty", [1, 2, 3])
def test_arithmetic_reference_solutions(difficulty):
    task = ArithmeticTask(difficulty=difficulty, seed=3, n_train=100, n_validation=10, n_test=10)
    problems = [p for split in SPLITS for p in task.problems(split)]
    for problem in problems:
        steps = problem.reference_steps
        response = "".join(steps)
        assert len(steps) == {1: 4, 2: 5, 3: 5}[difficulty] == task.n_ops + 1
        assert all(step.endswith("\n") and step.count("\n") == 1 for step in steps)
        assert problem.prompt.endswith("\n") and problem.prompt.count("\n") == 1
        assert set(problem.prompt + response) <= set(ALPHABET)
        expression = problem.prompt.removeprefix("Compute ").removesuffix(".\n")
        assert eval(expression) == int(problem.answer)  # minimal parentheses keep the chain's value
        previous = None
        for step in steps[:-1]:
            left, op, right, result = re.fullmatch(r"(\d+)([+*-])(\d+)=(\d+)\n", step).groups()
            assert 0 <= int(result) <= task.max_value <= MAX_VALUE and int(result) == eval(f"{left}{op}{right}")
            assert previous is None or int(left) == previous
            previous = int(result)
        assert steps[-1] == f"Answer: {problem.answer}\n" and previous == int(problem.answer)
        assert task.score(problem, response) == 1.0
        assert task.is_final_step(steps[-1]) and not any(task.is_final_step(step) for step in steps[:-1])
        assert task.extract_answer(response) == problem.answer


def test_arithmetic_difficulty_grows_numbers_and_operations():
    def largest(task):
        return max(
            int(n) for p in task.problems("train") for step in p.reference_steps for n in re.findall(r"\d+", step)
        )

    tasks = {d: ArithmeticTask(difficulty=d, n_train=200, n_validation=0, n_test=0) for d in (1, 2, 3, 5)}
    assert largest(tasks[1]) <= 99 and largest(tasks[2]) <= 99
    assert 99 < largest(tasks[3]) <= 999 and largest(tasks[5]) <= 999
    assert [tasks[d].n_ops for d in (1, 2, 3, 5)] == [3, 4, 4, 6]


def test_arithmetic_scores_corrupted_solutions_zero(arithmetic):
    problem = arithmetic.problems("test")[0]
    steps = list(problem.reference_steps)
    wrong = str(int(problem.answer) + 1)
    assert arithmetic.score(problem, "".join(steps[:-1]) + f"Answer: {wrong}\n") == 0.0
    # A slip in the first step propagates: the chain continues consistently from the wrong value.
    parsed = [re.fullmatch(r"(\d+)([+*-])(\d+)=(\d+)\n", step).groups() for step in steps[:-1]]
    slipped = int(parsed[0][3]) + 10
    _, rest, _ = solve(slipped, [p[1] for p in parsed[1:]], [int(p[2]) for p in parsed[1:]])
    first = f"{parsed[0][0]}{parsed[0][1]}{parsed[0][2]}={slipped}\n"
    assert arithmetic.score(problem, first + "".join(rest)) == 0.0
    assert arithmetic.score(problem, "".join(steps[:-1])) == 0.0  # no Answer line
    assert arithmetic.score(problem, "") == 0.0
    assert arithmetic.score(problem, f"Answer: {problem.answer}\nAnswer: {wrong}\n") == 0.0
    assert arithmetic.score(problem, f"Answer: {wrong}\nAnswer: {problem.answer}") == 1.0
    assert arithmetic.extract_answer("12+3=15\n") is None


def test_arithmetic_rejects_bad_arguments():
    with pytest.raises(ValueError, match="difficulty"):
        ArithmeticTask(difficulty=0)
    with pytest.raises(ValueError, match="split"):
        ArithmeticTask().problems("dev")


def test_alphabet_is_small_and_sorted():
    assert ALPHABET == "".join(sorted(set(ALPHABET)))
    assert set("0123456789+-*=()\n ") <= set(ALPHABET) and len(ALPHABET) <= 40


# ---------------------------------------------------------------------------------------------------------------
# reasoning-gym


@pytest.fixture(scope="module")
def gsm() -> ReasoningGymTask:
    return ReasoningGymTask("gsm_symbolic", seed=1, n_train=3, n_validation=3, n_test=3)


def test_reasoning_gym_gsm_symbolic(gsm):
    problems = [p for split in SPLITS for p in gsm.problems(split)]
    assert len(problems) == 9
    assert len({p.prompt for p in problems}) == 9
    for problem in problems:
        steps = problem.reference_steps
        assert steps and all(step.endswith("\n") and step.strip() for step in steps)
        assert steps[-1].startswith("#### ")
        assert problem.prompt.endswith("\n")
        assert "".join(steps).replace("\n", "") == problem.metadata["entry"]["metadata"]["answer_cot"].replace("\n", "")
        response = "".join(steps)
        assert gsm.score(problem, response) == 1.0
        assert gsm.is_final_step(steps[-1]) and not gsm.is_final_step(steps[0])
        assert gsm.extract_answer(response) == problem.answer
        wrong = str(float(problem.answer) + 1)
        assert gsm.score(problem, "".join(steps[:-1]) + f"#### {wrong}\n") == 0.0
        assert gsm.score(problem, "I do not know.") == 0.0
        assert gsm.score(problem, f"The answer is {float(problem.answer):,}.") == 1.0


def test_reasoning_gym_is_deterministic(gsm):
    again = ReasoningGymTask("gsm_symbolic", seed=1, n_train=3, n_validation=3, n_test=3)
    assert [p.prompt for p in again.problems("train")] == [p.prompt for p in gsm.problems("train")]


def test_reasoning_gym_other_dataset_and_config_errors():
    task = ReasoningGymTask("chain_sum", seed=0, n_train=2, n_validation=2, n_test=2)
    problem = task.problems("test")[0]
    assert problem.reference_steps is None
    assert task.score(problem, f"Let me add.\n{problem.answer}") == 1.0  # no marker: the last line is the answer
    assert task.score(problem, f"<answer>{problem.answer}</answer>") == 1.0
    with pytest.raises(ValueError, match="bad config"):
        ReasoningGymTask("gsm_symbolic", config={"bogus": 1}, n_train=1, n_validation=1, n_test=1).problems("train")


# ---------------------------------------------------------------------------------------------------------------
# JSONL


def _write(path, rows):
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return str(path)


GSM_ROW = {
    "question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72",
}
MATH_ROW = {
    "problem": "What is $\\frac{1}{4}+\\frac{1}{4}$?",
    "solution": "We add:\n\n$\\frac14+\\frac14=\\frac{2}{4}$, which is $\\boxed{\\frac{1}{2}}$.",
}


def test_jsonl_gsm8k_happy_path(tmp_path):
    train = _write(tmp_path / "train.jsonl", [GSM_ROW, "", {"question": "1+1?", "answer": "2"}])
    task = JsonlTask(train_path=train, style="gsm8k")
    first, second = task.problems("train")
    assert first.id == "train-0" and first.answer == "72"
    assert first.prompt == GSM_ROW["question"] + "\n"
    assert first.reference_steps == (
        "Natalia sold 48/2 = 24 clips in May.\n",
        "Natalia sold 48+24 = 72 clips.\n",
        "#### 72\n",
    )
    assert task.score(first, "".join(first.reference_steps)) == 1.0
    assert task.score(first, "#### 72.0") == 1.0
    assert task.score(first, "#### 73") == 0.0
    assert task.is_final_step("#### 72\n") and not task.is_final_step("Natalia sold 48/2 = 24 clips.\n")
    assert second.answer == "2" and second.reference_steps is None  # a bare answer
    with pytest.raises(ValueError, match="no test file"):
        task.problems("test")


def test_jsonl_math_and_custom_fields(tmp_path):
    path = _write(tmp_path / "math.jsonl", [MATH_ROW])
    task = JsonlTask(train_path=[path, path], validation_path=path, style="math")
    problems = task.problems("train")
    assert [p.id for p in problems] == ["train-0", "train-1"]
    problem = problems[0]
    assert problem.answer == "\\frac{1}{2}"
    assert problem.reference_steps == (
        "We add:\n",
        "$\\frac14+\\frac14=\\frac{2}{4}$, which is $\\boxed{\\frac{1}{2}}$.\n",
    )
    assert task.score(problem, "So $\\boxed{0.5}$") == 1.0
    assert task.score(problem, "The answer is 0.5") == 0.0  # math style needs \boxed
    assert task.extract_answer("\\boxed{\\dfrac{2}{4}}") == "0.5"

    custom = _write(tmp_path / "custom.jsonl", [{"uid": "a7", "q": "Two plus two?", "sol": "Answer: 4"}])
    task = JsonlTask(train_path=custom, question_field="q", answer_field="sol", id_field="uid")
    (problem,) = task.problems("train")
    assert (problem.id, problem.prompt, problem.answer) == ("a7", "Two plus two?\n", "4")
    assert task.score(problem, "2+2=4\nAnswer: 4") == 1.0


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ([json.dumps(GSM_ROW), "{not json"], r"bad\.jsonl:2: invalid JSON"),
        (["", json.dumps(GSM_ROW), "[1, 2]"], r"bad\.jsonl:3: expected a JSON object"),
        ([json.dumps({"answer": "#### 1"})], r"bad\.jsonl:1: missing field 'question' or 'problem'"),
        ([json.dumps({"question": "q"})], r"bad\.jsonl:1: missing field 'answer'"),
        ([json.dumps({"question": "q", "answer": "two\nlines"})], r"bad\.jsonl:1: no extractable answer.*####"),
        ([json.dumps({"question": "q", "answer": ""})], r"bad\.jsonl:1: no extractable answer"),
        ([json.dumps({"question": ["q"], "answer": "#### 1"})], r"bad\.jsonl:1: field 'question' should be a string"),
        ([], r"bad\.jsonl: empty file"),
        (["", "  "], r"bad\.jsonl: empty file"),
    ],
)
def test_jsonl_malformed_lines_name_file_and_line(tmp_path, lines, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + ("\n" if lines else ""))
    with pytest.raises(ValueError, match=message):
        JsonlTask(train_path=str(path), style="gsm8k").problems("train")


def test_jsonl_duplicate_ids(tmp_path):
    path = _write(tmp_path / "dup.jsonl", [{"id": 1, **GSM_ROW}, {"id": 1, **GSM_ROW}])
    with pytest.raises(ValueError, match=r"dup\.jsonl:2: duplicate id '1'"):
        JsonlTask(train_path=path, id_field="id").problems("train")


def test_tasks_implement_the_interface():
    for cls in (ArithmeticTask, ReasoningGymTask, JsonlTask):
        assert issubclass(cls, Task) and cls.step_delimiter == "\n"
