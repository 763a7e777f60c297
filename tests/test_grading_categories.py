r"""Labelled grading cases, by category, written by hand; and the fast path's contract over every corpus in the tests.

    python -m pytest tests/test_grading_categories.py -q

Each case is (gold, completion, label): what a careful human grader says. The golds are MATH-500 and GSM8K answers
(../shared/benchmarks) where one fits, else written in their style. Every category holds cases that must be rejected
besides those that must be accepted, so a grader that says "right" to everything fails each one. Categories:

- mixed_numbers: a mixed number is its value (1 1/2 = 3/2), never its whole part.
- tuples_and_lists: rewards.py's policy; an ordered answer (tuple, vector, assignments to several variables) in its
  order, an unordered list of solutions (bare commas, set braces) in any order.
- number_formats: how numbers are written (digit-group separators, a decimal comma, units, \approx, degrees),
  which the in-process fast path used to reject while math-verify accepted them.
- extraction: evaluation's flexible extraction (`extraction="flexible"`), for completions that do not box their
  answer, or box it in pieces. The RL reward keeps the strict rule.
- equivalences: answers equal as mathematics: scientific notation at math-verify's precision, complex numbers,
  a function's name, degrees inside trigonometric functions.
"""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import rewards  # noqa: E402
from rewards import grade  # noqa: E402

BENCHMARKS = ROOT.parent / "shared" / "benchmarks"


def boxed(answer: str) -> str:
    return f"Working through it, we get $\\boxed{{{answer}}}$."


MIXED_NUMBERS = [
    ("1 1/2", boxed("1"), False),
    ("1", boxed("1 1/2"), False),
    ("1\\frac{4}{5}", boxed("1"), False),
    ("137 \\frac{1}{2}", boxed("137"), False),
    ("6", boxed("6 \\frac{1}{3}"), False),
    ("11/2", boxed("1 1/2"), False),
    ("1\\ 1/2", boxed("\\frac{11}{2}"), False),
    ("4 \\tfrac{2}{3}", boxed("\\frac{2}{3}"), False),
    ("1 1/2", boxed("\\frac{3}{2}"), True),
    ("1 1/2", boxed("1.5"), True),
    ("1\\frac{4}{5}", boxed("\\frac{9}{5}"), True),
    ("137 \\frac{1}{2}", boxed("275/2"), True),
    ("7\\frac{1}{2}", boxed("7 1/2"), True),
    ("5\\frac{1}{2}", boxed("5\\ 1/2"), True),
    ("-1\\frac{1}{2}", boxed("-\\frac{3}{2}"), True),
    ("2 3/4", boxed("2.75"), True),
]

TUPLES_AND_LISTS = [
    ("(6,31,-1)", boxed("(6, 31, -1)"), True),
    ("(6,31,-1)", boxed("(-1, 6, 31)"), False),
    ("(-2,1)", boxed("(1,-2)"), False),
    ("\\left( \\frac{3}{2}, -13 \\right)", boxed("\\left( -13, \\frac{3}{2} \\right)"), False),
    ("(1,-16,-4,43)", boxed("(1, -16, -4, 43)"), True),
    ("(2, -1)", boxed("2, -1"), True),
    ("(2, -1)", boxed("-1, 2"), False),
    ("x=-1, y=6", boxed("(-1, 6)"), True),
    ("x=-1, y=6", boxed("(6, -1)"), False),
    ("a=8, b=-2", boxed("(-2, 8)"), False),
    ("(8,-2)", boxed("a = 8, b = -2"), True),
    ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", boxed("\\begin{pmatrix} 2 \\\\ 1 \\end{pmatrix}"), False),
    ("3, 5, 7", boxed("7, 5, 3"), True),
    ("-2,1", boxed("1, -2"), True),
    ("1,-2", boxed("-2,1"), True),
    ("\\{1, 2\\}", boxed("\\{2, 1\\}"), True),
    ("3, 5, 7", boxed("3, 5"), False),
]

NUMBER_FORMATS = [
    ("\\$32,\\!348", boxed("32,\\! 348"), True),
    ("32348", boxed("\\$32,\\! 348"), True),
    ("11,\\! 111,\\! 111,\\! 100", boxed("11111111100"), True),
    ("10,\\!080", boxed("10\\,080"), True),
    ("2.5", boxed("2{,}5"), True),
    ("0.75", boxed("0,75"), True),
    ("5.4 \\text{ cents}", boxed("5{,}4"), True),
    ("5", boxed("5\\textnormal{ cm}"), True),
    ("12", boxed("12 \\text{ } \\text{inches}"), True),
    ("3.14", boxed("\\approx 3.14"), True),
    ("5", boxed("x \\approx 5"), True),
    ("30", boxed("30°"), True),
    ("90^\\circ", boxed("90\\degree"), True),
    ("32349", boxed("32,\\! 348"), False),
    ("2.5", boxed("2, 5"), False),
    ("1.5", boxed("1{,}500"), False),
    ("30^\\circ", boxed("31°"), False),
    ("5", boxed("5.1\\textnormal{ cm}"), False),
    ("3.14", boxed("\\approx 3.1"), False),
    ("1000", boxed("1 000"), True),
    ("12", boxed("1 2"), False),
    ("5", boxed("5,0"), False),
]

EXTRACTION = [
    ("9", "Adding the two groups, the answer is 9.", True),
    ("\\frac{1}{2}", "Final Answer: The final answer is $\\frac{1}{2}$. I hope it is correct.", True),
    ("(2, -1)", "Solving the system gives $x = \\boxed{2}$ and $y = \\boxed{-1}$.", True),
    ("3, 5, 7", "The roots are $\\boxed{3}$, $\\boxed{5}$ and $\\boxed{7}$.", True),
    ("6 - 5i", "Multiplying out, we find the product is $6 - 5i$.", True),
    ("\\frac{3}{4}", "Hence the probability is \\(\\dfrac{3}{4}\\).", True),
    ("y = 2x + 3", "So the line through both points is\n$$y = 2x + 3$$", True),
    ("7", "The answer is: **7**", True),
    ("18", "Janet sells 16 - 3 - 4 = 9 eggs, so she makes 9 * 2 = 18 dollars a day.", True),
    ("1", "Maybe it is $\\boxed{1}$, or maybe $\\boxed{2}$.", False),
    ("3", "We have $x = 3$, so the answer is 4.", False),
    ("4", "First $2 + 2 = 4$, and doubling that twice gives 16.", False),
    ("12", "Adding the terms, the sum is \\boxed{1", False),
    ("\\frac{3}{4}", "Hence the probability is $\\frac{4}{3}$.", False),
]

EQUIVALENCES = [
    ("\\frac{1}{432}", boxed("2.3148 \\times 10^{-3}"), True),
    ("1500000", boxed("1.5 \\times 10^{6}"), True),
    ("\\frac{1}{432}", boxed("2.3 \\times 10^{-3}"), False),
    ("0", boxed("1 \\times 10^{-7}"), False),
    ("1+2i", boxed("i(2-i)"), True),
    ("6 - 5i", boxed("(2-i)(3-i) + 1"), True),
    ("6 - 5i", boxed("6 + 5i"), False),
    ("-3 - 4i", boxed("(1-2i)^2"), True),
    ("1+2i", boxed("i(2+i)"), False),
    ("f(x) = 2x+3", boxed("y = 2x+3"), True),
    ("y = 2x + 3", boxed("g(x) = 3 + 2x"), True),
    ("y = -2x", boxed("f(x) = -2x"), True),
    ("y = 2x + 3", boxed("f(x) = 3x + 2"), False),
    ("y = 2x + 3", boxed("x = 2y + 3"), False),
    ("\\cos x", boxed("\\sin(90^\\circ - x)"), True),
    ("\\sin x", boxed("\\cos(90^{\\circ} - x)"), True),
    ("\\frac{\\sqrt{3}}{2}", boxed("\\cos 30^\\circ"), True),
    ("\\cos x", boxed("\\sin(x - 90^\\circ)"), False),
]

CATEGORIES = {
    "mixed_numbers": MIXED_NUMBERS,
    "tuples_and_lists": TUPLES_AND_LISTS,
    "number_formats": NUMBER_FORMATS,
    "extraction": EXTRACTION,
    "equivalences": EQUIVALENCES,
}
CATEGORY_EXTRACTION = {"extraction": "flexible"}  # the other categories grade boxed answers, as the RL reward does


@pytest.fixture(scope="module", autouse=True)
def worker_pool():
    yield
    rewards.shutdown_pool()


@pytest.mark.parametrize("category", sorted(CATEGORIES))
def test_every_category_has_ten_accepts_and_rejects_together(category):
    labels = [label for _, _, label in CATEGORIES[category]]
    assert len(labels) >= 10 and labels.count(True) >= 4 and labels.count(False) >= 4


@pytest.mark.parametrize("category", sorted(CATEGORIES))
def test_grader_agrees_with_every_label(category):
    cases = CATEGORIES[category]
    extraction = CATEGORY_EXTRACTION.get(category, "strict")
    verdicts = rewards.grade_batch([c for _, c, _ in cases], [g for g, _, _ in cases], extraction=extraction)
    wrong = [
        (gold, completion, verdict)
        for (gold, completion, label), verdict in zip(cases, verdicts, strict=True)
        if verdict is not label
    ]
    assert not wrong


def test_the_rl_reward_keeps_the_strict_rule_on_the_extraction_cases():
    """Pieces boxed apart and an unboxed last formula are for evaluation only: the reward leaves them ungraded."""
    split_boxes = next(c for g, c, _ in EXTRACTION if g == "(2, -1)")
    assert grade(split_boxes, "(2, -1)") is False
    unboxed = next(c for g, c, _ in EXTRACTION if g == "6 - 5i")
    assert grade(unboxed, "6 - 5i") is False
    assert rewards.correctness_reward([split_boxes, unboxed], answer=["(2, -1)", "6 - 5i"]) == [0.0, 0.0]


# ----------------------------------------------------------------------------- the fast path's contract
# Numbers as people write them, each against itself and against the next one's value (right and wrong pairs).
NUMBER_WRITINGS = {
    "32349": ["32,349", "32,\\! 349", "32{,}349", "32\\,349", "32 349", "32\\;349"],
    "2.5": ["2,5", "2{,}5", "2.50", "\\frac{5}{2}", "2\\frac{1}{2}", "2.5\\%"],
    "1000": ["1,\\!000", "1\\,000", "1{,}000", "1 000", "10^3", "1 \\times 10^{3}", "1000.0"],
    "0.5": ["0,5", "50\\%", "\\frac12", "5 \\times 10^{-1}", ".5", "1/2"],
    "1\\frac{1}{2}": ["1 1/2", "1\\ 1/2", "3/2", "1.5", "11/2", "1"],
    "50": ["50\\%", "5000\\%", "0.5", "50.0", "\\$50", "50 \\text{ dollars}"],
    "-4": ["-4", "−4", "- 4", "-4.0", "4", "-\\frac{8}{2}"],
    "30^\\circ": ["30", "30°", "30\\degree", "30^{\\circ}", "\\frac{\\pi}{6}", "30 \\text{ degrees}"],
}
DRESSINGS = [
    "{}",
    "{}\\textnormal{ cm}",
    "{} \\text{ } \\text{cm}",
    "\\approx {}",
    "x \\approx {}",
    "{}°",
    "{}\\mbox{ m}",
    "x = {}",
    "\\${}",
    "{} \\text{ dollars}",
    "\\boxed{{}}",
    "({})",
    "{}, 7",
]


def dressed_pairs() -> list[tuple[str, str]]:
    golds = list(NUMBER_WRITINGS)
    pairs = []
    for gold, other in zip(golds, golds[1:] + golds[:1], strict=True):
        for writing in [gold, other, *NUMBER_WRITINGS[gold], *NUMBER_WRITINGS[other][:2]]:
            for dressing in DRESSINGS:
                answer = dressing.replace("{}", writing, 1)  # the first {} holds the number
                pairs += [(gold, answer), (answer, gold)]  # MATH golds come dressed too
    return pairs


def load_test_module(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tests" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def corpus_pairs() -> list[tuple[str, str]]:
    """Every (gold, candidate) comparison the tests' corpora make: test_rewards' cases and adversarial inputs, the
    benchmark files' gold solutions against their own and another problem's gold, the labelled categories here
    (under their extraction) and the dressed numbers."""
    test_rewards = load_test_module("test_rewards")
    bench = test_rewards.load_bench_module()
    cases = test_rewards.FAST_PATH_CASES + test_rewards.MATH_VERIFY_CASES
    graded = [(text, gold, "strict") for gold, text, _ in cases]
    graded += [(text, gold, "strict") for _, text, gold in test_rewards.ADVERSARIAL]
    for solutions, golds in (bench.math_workload(BENCHMARKS), bench.gsm8k_workload(BENCHMARKS)):
        graded += [(s, g, "strict") for s, g in zip(solutions + solutions[1:], golds + golds[:-1], strict=True)]
    graded += [
        (text, gold, CATEGORY_EXTRACTION.get(name, "strict"))
        for name, cases in CATEGORIES.items()
        for gold, text, _ in cases
    ]
    pairs = dressed_pairs()
    for text, gold, extraction in graded:
        if (gold_text := rewards._gold_text(gold)) is not None:
            pairs += [(gold_text, answer) for answer in rewards.candidate_answers(text, extraction)]
    return list(dict.fromkeys(pairs))


@pytest.mark.slow
def test_fast_path_never_changes_a_verdict():
    """Wherever the fast path decides alone, math-verify (in the workers, on the same rewritten pair) decides alike:
    it exists for speed only. Covers every corpus in the tests."""
    decided = [(pair, code) for pair in corpus_pairs() if (code := rewards._fast_code(*pair)) in ("correct", "wrong")]
    verdicts = rewards._run_on_pool([pair for pair, _ in decided], 10.0, rewards.default_num_workers())
    disagreements = [(pair, fast, full) for (pair, fast), full in zip(decided, verdicts, strict=True) if fast != full]
    assert len(decided) >= 3000 and {"correct", "wrong"} <= {code for _, code in decided}
    assert not disagreements
