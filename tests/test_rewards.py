"""Tests for rewards.py: extraction, equivalence, hard time limit, TRL rewards, oracle on real benchmarks.

    python -m pytest tests/test_rewards.py -q
"""

import importlib.util
import json
import random
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import rewards  # noqa: E402
from rewards import (  # noqa: E402
    GRADER_STATS,
    correctness_reward,
    extract_answer,
    extract_answers,
    format_reward,
    gold_answer,
    grade,
    grade_batch,
    grade_codes,
    make_correctness_reward,
    make_format_reward,
    make_length_penalty,
)

BENCHMARKS = ROOT.parent / "shared" / "benchmarks"
SLOW_LATEX = "\\int_0^1 x^{300} e^{x} \\sin(x) \\, dx"  # sympy integrates this for far longer than 10 s
SLOW_GOLD = "\\sqrt{2}"  # not a plain number, so that the fast path cannot rule the integral out


@pytest.fixture(scope="module", autouse=True)
def worker_pool():
    """One shared worker pool for the module, shut down at the end so pytest exits promptly."""
    yield
    rewards.shutdown_pool()


def load_jsonl(name: str) -> list[dict]:
    path = BENCHMARKS / name
    if not path.exists():
        pytest.skip(f"{path} is absent")
    return [json.loads(line) for line in path.open(encoding="utf-8")]


def worker_jobs() -> int:
    return GRADER_STATS["worker_jobs"]


# ----------------------------------------------------------------------------- extraction
@pytest.mark.parametrize(
    "text, expected",
    [
        ("so $\\boxed{\\frac{1}{\\sqrt{2}}}$.", "\\frac{1}{\\sqrt{2}}"),
        ("\\boxed{\\left\\{ 1, \\{2\\} \\right\\}}", "\\left\\{ 1, \\{2\\} \\right\\}"),
        ("the result is \\fbox{7}", "7"),
        ("hence $\\boxed 5$.", "5"),
        ("\\boxed {12}", "12"),
        ("first \\boxed{1}, then correcting: \\boxed{2}", "2"),
        ("He pays 2*3=<<2*3=6>>6 dollars.\n#### 1,234", "1,234"),
        ("Adding up, the answer is 12.", "12"),
        ("So the answer is: $x^2+1$.", "x^2+1"),
        ("Final Answer: The final answer is $\\frac{1}{2}$. I hope it is correct.", "\\frac{1}{2}"),
        ("**Final Answer:** 7", "7"),
        ("Answer: 3 apples", "3 apples"),
        ("42", "42"),
        ("\\frac{3}{4}", "\\frac{3}{4}"),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_extract_answers_keeps_every_distinct_box_once():
    assert extract_answers("\\boxed{1} ... \\boxed{2} ... \\boxed{ 1 }") == ["1", "2"]
    assert extract_answers("\\boxed{3} and again \\boxed{3}") == ["3"]
    assert extract_answers("\\boxed{\\boxed{4}}") == ["\\boxed{4}"]  # nested box is content, not a second box


def test_unbalanced_or_empty_box_gives_empty_candidate():
    assert extract_answers("\\boxed{5") == [""]
    assert extract_answers("\\boxed{}") == [""]
    assert grade("\\boxed{5", "5") is False
    assert grade("\\boxed{}", "5") is False


def test_numeric_fallback_only_when_asked():
    text = "She has 40 + 2 = 42 apples left over."
    assert extract_answer(text) is None
    assert extract_answer(text, numeric_fallback=True) == "42"
    assert extract_answer("In total 1,250 dollars were spent.", numeric_fallback=True) == "1,250"
    assert grade(text, "42") is False
    assert grade(text, "42", numeric_fallback=True) is True
    assert grade(text, "43", numeric_fallback=True) is False


def test_markers_beat_the_fallback():
    # The last number is 3, but the marked answer is 12: markers come first.
    assert extract_answer("The answer is 12. Check: 4 * 3", numeric_fallback=True) == "12"


# ----------------------------------------------------------------------------- evaluation's extractions
@pytest.mark.parametrize(
    "text, expected",
    [
        ("so $x = \\boxed{2}$ and $y = \\boxed{-1}$", ["2, -1"]),  # one answer boxed in pieces
        ("\\boxed{3} and again \\boxed{3}", ["3"]),
        ("the sum is \\boxed{1", [""]),  # cut off inside the box: no answer
        ("The answer is 9.", ["9"]),
        ("Multiplying out, the product is $6 - 5i$.", ["6 - 5i"]),
        ("First $2 + 2 = 4$, and doubling twice gives 16.", ["16"]),  # a later number beats an earlier formula
        ("Each costs $5, so the share is \\(\\dfrac{3}{4}\\)", ["\\dfrac{3}{4}"]),  # a lone $ is money, not math
        ("no answer here", []),
    ],
)
def test_flexible_extraction(text, expected):
    assert rewards.extract_answers_flexible(text) == expected


# (completion, gold, lm-eval's exact match after Minerva's normalisation, equivalence)
MINERVA_COMPLETIONS = [
    ("So $\\boxed{24}$.\nFinal Answer: The final answer is $24$. I hope it is correct.", "24", True, True),
    ("Final Answer: The final answer is $25$. I hope it is correct.", "24", False, False),
    ("Final Answer: The final answer is $\\frac12$. I hope it is correct.", "\\frac{1}{2}", True, True),
    ("Final Answer: The final answer is $\\dfrac{1}{2}$. I hope it is correct.", "\\frac{1}{2}", False, True),
    ("Final Answer: The final answer is $0.5$. I hope it is correct.", "\\frac{1}{2}", False, True),
    ("Final Answer: The final answer is $x = 5$. I hope it is correct.", "5", True, True),
    ("Final Answer: The final answer is $10,\\!080$. I hope it is correct.", "10080", True, True),
    ("Final Answer: The final answer is $18$ dollars. I hope it is correct.", "18", True, True),
    ("Final Answer: The final answer is $5 \\text{ cm}$. I hope it is correct.", "5", True, True),
    ("Final Answer: The final answer is $12$. I hope it is correct.\n\nFinal Answer: The final answer is $7$.", "12",
     True, True),  # the first sentence counts
    ("Final Answer: The final answer is $12$", "12", False, False),  # cut before the full stop: lm-eval finds none
    ("So $\\boxed{12}$.\nFinal Answer: The final answer is", "12", False, False),  # cut before the answer
    ("So the answer is $\\boxed{12}$.", "12", False, False),  # boxed, but not in the Minerva sentence
    ("Final Answer: The final answer is $(3, \\frac{\\pi}{2})$. I hope it is correct.",
     "\\left( 3, \\frac{\\pi}{2} \\right)", False, False),  # Minerva's normalisation breaks \\left: lm-eval's 0
]


@pytest.mark.parametrize("completion, gold, exact_match, equivalent", MINERVA_COMPLETIONS)
def test_minerva_exact_match_and_equivalence(completion, gold, exact_match, equivalent):
    assert rewards.minerva_exact_match(completion, gold) is exact_match
    assert (grade(completion, gold, extraction="minerva") is True) is equivalent


@pytest.mark.parametrize(
    "answer, normalised",
    [
        ("$\\frac12$", "\\frac{1}{2}"),
        ("x = \\sqrt3", "\\sqrt{3}"),
        ("\\text{(C)}", "(C)"),
        ("\\boxed{10,\\!080}", "10080"),
        ("90^\\circ", "90"),
        ("5 \\text{ cm}^2", "5"),
        ("\\left( 3, \\frac{\\pi}{2} \\right)", "\\le(3,\\frac{\\pi}{2}\\right)"),  # its quirk: "ft" is a unit
    ],
)
def test_normalize_final_answer_is_minervas(answer, normalised):
    assert rewards.normalize_final_answer(answer) == normalised


def test_unknown_extraction_is_an_error():
    with pytest.raises(ValueError, match="extraction"):
        grade("\\boxed{1}", "1", extraction="lenient")


# ----------------------------------------------------------------------------- gold answers
def test_gold_answer_schemas():
    gsm8k = {"question": "q", "answer": "So 70,000 - 1 = <<70000-1=69999>>69,999\n#### 69,999"}
    assert gold_answer(gsm8k) == "69999"
    assert gold_answer({"problem": "p", "solution": "so $\\boxed{\\frac{1}{2}}$", "answer": "\\frac12"}) == "\\frac12"
    assert gold_answer({"problem": "p", "solution": "first \\boxed{1}, finally \\boxed{\\sqrt{2}}"}) == "\\sqrt{2}"
    assert gold_answer({"problem": "p", "solution": "no box here"}) is None
    omi2 = {"problem": "p", "generated_solution": "\\boxed{3}", "expected_answer": "3", "problem_source": "math"}
    assert gold_answer(omi2) == "3"
    omi1 = {"question": "q", "generated_solution": "...", "expected_answer": " 2.5 ", "is_correct": True}
    assert gold_answer(omi1) == "2.5"


def test_gold_answer_names_missing_keys():
    with pytest.raises(ValueError) as err:
        gold_answer({"prompt": "p", "completion": "c"})
    message = str(err.value)
    for key in ("expected_answer", "problem", "solution", "question", "answer", "prompt", "completion"):
        assert key in message


# ----------------------------------------------------------------------------- equivalence
FAST_PATH_CASES = [
    ("1000", "1,000", True),
    ("1000", "1000.0", True),
    ("1,000", "1000", True),
    ("0.5", "\\frac{1}{2}", True),
    ("\\frac{1}{2}", "0.5", True),
    ("1/2", "\\dfrac{1}{2}", True),
    ("\\frac12", "0.50", True),
    ("50", "50\\%", True),
    ("0.5", "50%", True),
    ("18", "\\$18", True),
    ("18", "$18.00", True),
    ("18", "18 dollars", True),
    ("90", "90^\\circ", True),
    ("90^\\circ", "90", True),
    ("5", "5\\text{ cm}", True),
    ("-3", "−3", True),
    ("\\frac{1}{3}", "0.333333", True),
    ("1000", "100", False),
    ("0.5", "0.6", False),
    ("18", "81", False),
    ("\\frac{1}{3}", "0.33", False),
    ("5", "-5", False),
    ("50", "5%", False),
    ("10", "10 meters", True),
    ("1", "1, 2", False),
    ("1", "1 \\text{ or } 2", False),
    ("(1, 2)", "1", False),
    ("4", "x^8 + x + 1", False),
    ("p - q", "5", False),
    ("2", "2k+2", False),
    ("3", "3 m^2", False),
]


@pytest.mark.parametrize("gold, prediction, expected", FAST_PATH_CASES)
def test_fast_path(gold, prediction, expected):
    before = worker_jobs()
    assert grade(prediction, gold) is expected
    assert worker_jobs() == before  # decided in this process, no IPC


# Integer answers, the tiny task's and GSM8K's kind: the notation rules left their verdicts as they were (1,456
# integer gradings compared with the grader before them; the one change is '1 000' no longer equal to 0).
INTEGER_CASES = [
    ("3+4+5=12. \\boxed{12}", "12", True),
    ("\\boxed{13}", "12", False),
    ("\\boxed{120}", "12", False),
    ("\\boxed{ 12 }", "12", True),
    ("\\boxed{12.0}", "12", True),
    ("\\boxed{012}", "12", True),
    ("\\boxed{+12}", "12", True),
    ("\\boxed{-12}", "12", False),
    ("\\boxed{12\\%}", "12", True),
    ("\\boxed{1200\\%}", "12", True),
    ("\\boxed{\\$12}", "12", True),
    ("\\boxed{12\\text{ dollars}}", "12", True),
    ("\\boxed{12^\\circ}", "12", True),
    ("\\boxed{\\frac{12}{1}}", "12", True),
    ("\\boxed{x = 12}", "12", True),
    ("\\boxed{12} \\boxed{12}", "12", True),
    ("\\boxed{12, 1}", "12", False),
    ("\\boxed{12,000}", "12", False),
    ("\\boxed{12\\,000}", "12000", True),
    ("#### 1,234", "1234", True),
    ("The answer is 12.", "12", True),
    ("\\boxed{1 000}", "0", False),
]


@pytest.mark.parametrize("completion, gold, expected", INTEGER_CASES)
def test_integer_answers_grade_as_they_always_did(completion, gold, expected):
    assert grade(completion, gold) is expected


MATH_VERIFY_CASES = [
    ("\\frac{\\sqrt{3}}{2}", "\\frac{\\sqrt3}{2}", True),
    ("3\\sqrt{13}", "\\sqrt{117}", True),
    ("(x+1)^2", "x^2+2x+1", True),
    ("x=5", "5", True),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3, \\pi/2)", True),
    ("(1,2)", "(2,1)", False),
    ("\\pi", "3.14", False),
    ("\\sqrt{2}", "\\sqrt{2}, -\\sqrt{2}", False),
    ("x^2+1", "x^2-1", False),
    ("1.5", "1.5 m", True),  # math-verify drops unit words, single letters included
    ("5", "5x", False),
]


@pytest.mark.parametrize("gold, prediction, expected", MATH_VERIFY_CASES)
def test_math_verify_path(gold, prediction, expected):
    before = worker_jobs()
    assert grade(f"The answer is $\\boxed{{{prediction}}}$.", gold) is expected
    assert worker_jobs() == before + 1


def test_identical_latex_is_decided_without_sympy():
    before = worker_jobs()
    assert grade("\\boxed{\\left( 3, \\dfrac{\\pi}{2} \\right)}", "\\left(3,\\frac{\\pi}{2}\\right)") is True
    assert worker_jobs() == before


# ----------------------------------------------------------------------------- anti-hacking
def test_several_different_boxes_score_zero():
    completion = "Maybe \\boxed{1}. Or rather \\boxed{2}."
    assert correctness_reward([completion, completion], answer=["1", "2"]) == [0.0, 0.0]


def test_same_answer_boxed_twice_is_correct_but_badly_formatted():
    completion = "So $\\boxed{3}$. Double-checking gives $\\boxed{3}$."
    assert correctness_reward([completion], answer=["3"]) == [1.0]
    assert format_reward([completion]) == [0.0]


def test_empty_box_scores_zero():
    assert correctness_reward(["\\boxed{}", "\\boxed{ }"], answer=["5", "5"]) == [0.0, 0.0]
    assert format_reward(["\\boxed{}"]) == [0.0]


@pytest.mark.parametrize(
    "completion",
    [
        "The answer is 1 or 2.",
        "\\boxed{1, 2}",
        "\\boxed{1,2}",
        "\\boxed{1 \\text{ or } 2}",
        "\\boxed{1 \\text{ and } 2}",
        "\\boxed{\\pm 1}",
    ],
)
def test_hedged_answers_score_zero(completion):
    assert correctness_reward([completion], answer=["1"]) == [0.0]
    assert correctness_reward([completion], answer=["2"]) == [0.0]


def test_answer_in_prompt_only_scores_zero():
    prompts = [[{"role": "user", "content": "Is it 5? Reply with \\boxed{5} if so."}]]
    completions = [[{"role": "assistant", "content": "I do not know."}]]
    assert correctness_reward(completions, answer=["5"], prompts=prompts) == [0.0]


def test_answer_in_reasoning_without_marker_scores_zero_for_math():
    completion = "We get 2 + 3 = 5 by adding, and we can stop here."
    assert correctness_reward([completion], answer=["5"]) == [0.0]
    assert make_correctness_reward(numeric_fallback=True)([completion], answer=["5"]) == [1.0]


# ----------------------------------------------------------------------------- TRL signature
def test_correctness_reward_trl_signature_plain_and_conversational():
    logged = []
    kwargs = dict(
        prompts=["What is 2+3?", [{"role": "user", "content": "What is 2+3?"}]],
        completion_ids=[[1, 2, 3], [4, 5]],
        trainer_state=object(),
        log_extra=lambda *args: None,
        log_metric=lambda name, value: logged.append((name, value)),
        subject=["Algebra", "Algebra"],
    )
    completions = [
        "2 + 3 = 5, so the answer is $\\boxed{5}$.",
        [{"role": "assistant", "content": "2 + 3 = 6. \\boxed{6}"}],
    ]
    assert correctness_reward(completions, answer=["5", "5"], **kwargs) == [1.0, 0.0]
    assert correctness_reward.__name__ == "correctness_reward"
    assert logged == [("grader/timeouts", 0.0)]


def test_multimodal_style_content_parts():
    completion = [{"role": "assistant", "content": [{"type": "text", "text": "It is \\boxed{4}"}]}]
    assert correctness_reward([completion], answer=["4"]) == [1.0]


@pytest.mark.parametrize("bad_gold", [None, "", "   ", "5^{5^{5^{5^5}}}", "9" * 1000, "\\boxed{"])
def test_unparseable_gold_gives_none(bad_gold):
    assert correctness_reward(["\\boxed{5}", "\\boxed{5}"], answer=[bad_gold, "5"]) == [None, 1.0]
    assert grade("\\boxed{5}", bad_gold) is None


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("so the answer is $\\boxed{5}$.", 1.0),
        ("so the answer is \\boxed{5}", 1.0),
        ("\\[ \\boxed{x^2 + \\frac{1}{2}} \\]\n", 1.0),
        ("$$\\boxed{5}$$", 1.0),
        ("\\boxed{5} and that is all.", 0.0),
        ("The answer is 5.", 0.0),
        ("\\boxed{5} \\boxed{6}", 0.0),
        ("\\boxed{}", 0.0),
        ("\\boxed{5", 0.0),
    ],
)
def test_format_reward(completion, expected):
    assert format_reward([completion]) == [expected]
    assert format_reward([[{"role": "assistant", "content": completion}]], prompts=["p"], trainer_state=None) == [
        expected
    ]


def test_format_reward_pattern_is_configurable():
    fbox_only = make_format_reward(r"\\fbox(?![A-Za-z])")
    assert fbox_only(["so \\fbox{5}."]) == [1.0]
    assert fbox_only(["so \\boxed{5}."]) == [0.0]
    assert fbox_only.__name__ == "format_reward"


def test_length_penalty():
    penalty = make_length_penalty(max_length=100, soft_margin=20)
    ids = [[0] * n for n in (10, 80, 90, 100, 150)]
    assert penalty(["x"] * 5, completion_ids=ids, prompts=["p"] * 5) == [0.0, 0.0, -0.5, -1.0, -1.0]
    assert penalty.__name__ == "length_penalty"
    by_chars = make_length_penalty(max_length=10, soft_margin=5, unit="chars")
    assert by_chars(["abcde", "abcdefgh", [{"role": "assistant", "content": "a" * 12}]]) == [0.0, -0.6, -1.0]
    with pytest.raises(ValueError, match="completion_ids"):
        penalty(["x"])
    with pytest.raises(ValueError):
        make_length_penalty(max_length=10, soft_margin=0)


# ----------------------------------------------------------------------------- hard time limit
def test_stuck_worker_is_killed_and_replaced():
    timeouts, restarts = GRADER_STATS["timeouts"], GRADER_STATS["worker_restarts"]
    reward = make_correctness_reward(timeout_s=1.5)
    start = time.monotonic()
    completions = [f"\\boxed{{{SLOW_LATEX}}}", "\\boxed{\\frac{\\sqrt3}{2}}"]
    scores = reward(completions, answer=[SLOW_GOLD, "\\frac{\\sqrt{3}}{2}"])
    assert scores == [0.0, 1.0]  # the timeout gives 0.0; the other completion is unaffected
    assert time.monotonic() - start < 10
    assert GRADER_STATS["timeouts"] == timeouts + 1
    assert GRADER_STATS["worker_restarts"] == restarts + 1
    assert grade_codes([f"\\boxed{{{SLOW_LATEX}}}"], [SLOW_GOLD], timeout_s=1.0) == [rewards.TIMEOUT]
    assert grade("\\boxed{\\sqrt{8}}", "2\\sqrt{2}") is True  # the pool still works afterwards


ADVERSARIAL = [
    ("power_tower", "\\boxed{5^{5^{5^{5^5}}}}", "5"),
    ("power_tower_gold", "\\boxed{5}", "5^{5^{5^{5^5}}}"),
    ("power_chain", "The answer is 9^9^9^9", "9"),
    ("huge_exponent", "\\boxed{10^{10000000}}", "10"),
    ("million_digits", "The answer is " + "9" * 1_000_000, "9"),
    ("5000_digits_boxed", "\\boxed{" + "7" * 5000 + "}", "7"),
    ("300_digits_both", "\\boxed{" + "1" * 300 + "}", "1" * 300),
    ("nested_braces", "\\boxed{" + "{" * 10_000 + "5" + "}" * 10_000 + "}", "5"),
    ("nested_parens", "\\boxed{" + "(" * 900 + "1" + ")" * 900 + "}", "1"),
    ("nested_boxes", "\\boxed{" * 10_000 + "5" + "}" * 10_000, "5"),
    ("unbalanced_open", "\\boxed{" * 10_000 + "5", "5"),
    ("unbalanced_close", "}" * 10_000 + " \\boxed{5", "5"),
    ("huge_latex", "\\boxed{" + "\\frac{1}{2}+" * 90_000 + "1}", "1"),
    ("non_utf8_bytes", b"\xff\xfe\x80 \\boxed{\xc3\x28\xa0} \xed\xa0\x80", "5"),
    ("lone_surrogates", "\ud800 The answer is \udfff\ud800 \\boxed{\udc00}", "5"),
    ("slow_sympy", f"\\boxed{{{SLOW_LATEX}}}", SLOW_GOLD),
]
ADVERSARIAL_TIMEOUT_S = 2.0


def grade_adversarial() -> list[tuple[str, object, float]]:
    results = []
    for name, text, gold in ADVERSARIAL:
        start = time.monotonic()
        verdict = grade(text, gold, timeout_s=ADVERSARIAL_TIMEOUT_S)
        results.append((name, verdict, time.monotonic() - start))
    return results


def check_adversarial(results):
    assert [name for name, _, _ in results] == [name for name, _, _ in ADVERSARIAL]
    for name, verdict, seconds in results:
        assert verdict is not True, name
        assert seconds < 10, (name, seconds)


def test_adversarial_inputs_main_thread():
    results = grade_adversarial()
    check_adversarial(results)
    assert dict((n, v) for n, v, _ in results)["power_tower_gold"] is None  # bad gold: cannot grade


def test_adversarial_inputs_from_a_thread():
    results: list = []
    thread = threading.Thread(target=lambda: results.extend(grade_adversarial()))
    thread.start()
    thread.join(timeout=120)
    assert not thread.is_alive()
    check_adversarial(results)


EVALUATION_ADVERSARIAL = [  # each took 20-90 s before the extractions searched only a bounded text
    ("unclosed_parens", "\\(" * 30_000, "5"),
    ("unclosed_brackets", "\\[ x" * 20_000, "5"),
    ("long_minerva_answer", "Final Answer: The final answer is " + "x" * 90_000 + "$ I hope it is correct.", "5"),
]


@pytest.mark.parametrize("extraction", ["flexible", "minerva"])
def test_adversarial_inputs_under_evaluation_extractions(extraction):
    for name, text, gold in ADVERSARIAL + EVALUATION_ADVERSARIAL:
        start = time.monotonic()
        verdict = grade(text, gold, timeout_s=ADVERSARIAL_TIMEOUT_S, extraction=extraction)
        assert verdict is not True and not rewards.minerva_exact_match(text, gold), name
        assert time.monotonic() - start < 10, name


class AdversarialDataset:
    """Grades inside the DataLoader worker: a forked, daemonic process that needs its own pool."""

    def __len__(self):
        return 2

    def __getitem__(self, index):
        if index == 0:  # a case that needs math-verify workers, started from inside this process
            return [("sqrt", grade("\\boxed{\\frac{\\sqrt3}{2}}", "\\frac{\\sqrt{3}}{2}"), 0.0)]
        return grade_adversarial()


def test_adversarial_inputs_from_a_dataloader_worker():
    torch_data = pytest.importorskip("torch.utils.data")
    loader = torch_data.DataLoader(AdversarialDataset(), batch_size=None, num_workers=1, timeout=300)
    warmup, results = list(loader)
    assert [tuple(item) for item in warmup] == [("sqrt", True, 0.0)]
    check_adversarial([tuple(item) for item in results])


# ----------------------------------------------------------------------------- oracle on real benchmarks
def normalise(answer: str) -> str:
    answer = re.sub(r"\\(?:left|right)(?![A-Za-z])|\\[,!;: ]|\s+", "", answer)
    return answer.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").rstrip(".")


def shuffled_false_positive_rate(solutions: list[str], golds: list[str], numeric_fallback: bool = False):
    """Grade solution j against gold i for a random pairing of truly different golds.

    Pairs whose gold strings normalise alike, or which the grader (math-verify) itself
    calls equal, are dropped; one batch grades both the gold check and the solutions.
    Returns (rate judged correct, number of pairs kept).
    """
    order = list(range(len(golds)))
    random.Random(0).shuffle(order)
    pairs = [(i, j) for i, j in enumerate(order) if normalise(golds[i]) != normalise(golds[j])]
    checks = [f"\\boxed{{{golds[j]}}}" for _, j in pairs]
    verdicts = grade_batch(checks + [solutions[j] for _, j in pairs], [golds[i] for i, _ in pairs] * 2)
    same_gold, judged = verdicts[: len(pairs)], verdicts[len(pairs) :]
    kept = [k for k in range(len(pairs)) if same_gold[k] is False]
    return sum(judged[k] is True for k in kept) / max(1, len(kept)), len(kept)


def test_gsm8k_oracle_and_shuffle():
    rows = load_jsonl("gsm8k_test.jsonl")
    assert len(rows) == 1319
    golds = [gold_answer(row) for row in rows]
    solutions = [row["answer"] for row in rows]
    verdicts = grade_batch(solutions, golds)
    assert sum(v is True for v in verdicts) / len(rows) >= 0.999
    rate, kept = shuffled_false_positive_rate(solutions, golds)
    assert kept >= 0.9 * len(rows)  # a grader that says "equal" to everything would keep no pairs
    assert rate <= 0.005


def test_math500_oracle_and_shuffle():
    rows = load_jsonl("math500_test.jsonl")
    assert len(rows) == 500
    golds = [gold_answer(row) for row in rows]
    solutions = [row["solution"] for row in rows]
    verdicts = grade_batch(solutions, golds)
    assert sum(v is True for v in verdicts) / len(rows) >= 0.99
    rate, kept = shuffled_false_positive_rate(solutions, golds)
    assert kept >= 0.9 * len(rows)
    assert rate <= 0.005


def test_a_yes_grader_fails_the_shuffle_check(monkeypatch):
    """The shuffle check must catch a grader that accepts everything."""
    golds = ["1", "2", "3", "\\frac{1}{2}", "x+1", "\\sqrt{2}"] * 10
    solutions = [f"so \\boxed{{{g}}}" for g in golds]
    monkeypatch.setattr(rewards, "_fast_code", lambda gold, candidate: rewards.CORRECT)
    rate, kept = shuffled_false_positive_rate(solutions, golds)
    assert kept < 0.9 * len(golds) or rate > 0.005


# ----------------------------------------------------------------------------- throughput and CLI
def load_bench_module():
    spec = importlib.util.spec_from_file_location("bench_rewards", ROOT / "benchmarks" / "bench_rewards.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_throughput_floors():
    bench = load_bench_module()
    bench.warm_up()
    gsm8k = bench.throughput(*bench.gsm8k_workload(BENCHMARKS), numeric_fallback=True)
    math = bench.throughput(*bench.math_workload(BENCHMARKS))
    assert gsm8k >= 200, f"GSM8K-style: {gsm8k:.0f} completions/s"
    assert math >= 50, f"MATH-style: {math:.0f} completions/s"


@pytest.mark.slow
def test_slow_path_throughput_floor():
    """Wrong MATH answers mostly need math-verify: the worker path must stay parallel and fast. Measured 78-170/s on
    an idle 2-core machine and 39-48/s with other heavy jobs running, hence a floor of 25/s here (the issue's 50/s
    floor for MATH-style completions is asserted on real completions in test_throughput_floors)."""
    bench = load_bench_module()
    rewards.shutdown_pool()  # fresh workers: no parse caches left from the earlier tests
    bench.warm_up()
    before = worker_jobs()
    math_wrong = bench.throughput(*bench.mismatched(*bench.math_workload(BENCHMARKS)))
    assert worker_jobs() - before >= 100  # this workload really goes through the workers
    assert math_wrong >= 25, f"MATH-style, slow path: {math_wrong:.0f} completions/s"


def test_cli():
    command = [sys.executable, str(ROOT / "rewards.py"), "--gold", "18", "--completion", "She makes $18. #### 18"]
    output = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout
    assert "verdict     : True" in output and "extracted   : ['18']" in output
    command[-1:] = ["In total 40 - 22 = 18 dollars", "--numeric_fallback"]
    fallback = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout
    assert "verdict     : True" in fallback
