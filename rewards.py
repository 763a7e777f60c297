r"""Answer extraction, equivalence grading and GRPO reward functions for math.

One grader (`grade` / `grade_batch`) serves both the TRL reward functions and the
GSM8K / MATH evaluation, so training and test score answers alike.

Run the CLI (prints the extracted answer(s), the verdict and the timing):

    python rewards.py --gold '\frac{1}{2}' --completion 'So the answer is $\boxed{0.5}$.'
    python rewards.py --gold 18 --completion 'She makes $18 every day. #### 18'
    python rewards.py --gold '3\sqrt{13}' --completion 'Hence $\boxed{\sqrt{117}}$.'
    python rewards.py --gold 42 --completion 'In total 40 + 2 = 42 apples.' --numeric_fallback
    python rewards.py --gold '3\sqrt{13}' --completion 'Multiplying out, we get $\sqrt{117}$.' --extraction flexible

Tests and throughput benchmark:

    python -m pytest tests/test_rewards.py -q
    python benchmarks/bench_rewards.py

Verdicts: True (equivalent), False (wrong or no final answer), None (cannot grade: bad
gold, input rejected by the guards, timeout, worker crash). correctness_reward gives 0.0
for None, except for a bad gold: None (TRL then skips that reward).

Extraction (`extraction=`): "strict", the RL reward's and evaluation's main score: every
\boxed{} answer, else a '####' line, an 'The answer is' / 'Final Answer:' sentence or a
bare answer (GSM8K may fall back to the last number). "flexible", evaluation only, so that
models which do not box are not scored 0: several different boxes are one answer split in
pieces, and without a box or marker the last formula ($...$, \(...\), \[...\]) or the last
number, whichever comes later. "minerva": lm-eval's minerva_math sentence 'Final Answer: The
final answer is X. I hope it is correct.', normalised as Minerva does (normalize_final_answer),
like the gold: its exact match compares the two strings, grade() their equivalence.

Policies:
- A mixed number is its value: 1 1/2, 1\ 1/2 and 1\frac{1}{2} are 3/2 (never 1, nor 11/2).
- Tuples vs unordered lists: the notation decides. A tuple, vector, matrix or interval is
  ordered, and so are assignments to several variables ('x=-1, y=6' equals (-1, 6), never
  (6, -1)). A bare comma list or a set in braces is a list of solutions ('Enter all the
  solutions, separated by commas'): any order, each value once.
- Numbers: a digit-group separator (1,000; 1{,}000; 1\,000; 32,\! 349) joins digits; a comma
  before other than three digits (2,5; 0{,}75) is a decimal comma when the gold is a decimal;
  a decimal, also in scientific notation, equals the gold at math-verify's 6 decimal places;
  degrees are dropped, but inside a trigonometric function they are converted to radians.
  X% equals X/100, and X itself when both are integers (math-verify's rule).
- i is the imaginary unit, and 'y = 2x+3' equals 'f(x) = 2x+3': both name a function.

Cheap cases (numbers, identical strings, a list offered for one number) are decided in
the calling process. The rest goes to math-verify in worker subprocesses, SIGKILLed and
replaced past a wall-clock limit: math-verify's timeout uses SIGALRM (main thread only,
TRL turns it off) and sympy can hang in C code where no signal helps. Workers are Popen
children because multiprocessing cannot start children from (daemonic) DataLoader
workers. POSIX only. Both paths compare the same rewritten answers (_prepare_pair), and
the fast path never gives a verdict math-verify would not (tested on every test corpus).
"""

import argparse
import atexit
import json
import logging
import os
import re
import select
import subprocess
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal
from fractions import Fraction
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

logger = logging.getLogger(__name__)

MAX_COMPLETION_CHARS = 100_000  # longer completions are "cannot grade" (4k tokens are ~16k chars)
MAX_ANSWER_CHARS = 2_000  # an extracted final answer longer than this is no real answer
MAX_NUMBER_DIGITS = 200  # longer digit runs are rejected before int() or sympy sees them
MAX_NESTING = 50  # deeper bracket nesting only serves to blow up parser recursion
MAX_EXPONENT_DIGITS = 5  # 10^{99999} is fine, 10^{10000000} hangs sympy
DEFAULT_TIMEOUT_S = 5.0  # hard wall-clock limit per math-verify comparison
WORKER_START_TIMEOUT_S = 60.0  # importing sympy on a loaded 2-core box can take a while
WORKER_MEMORY_BYTES = 2 << 30  # address-space cap per worker: huge powers raise MemoryError
MAX_FAILED_STARTS = 3  # then give up (None) instead of restarting broken workers forever

BOXED_PATTERN = r"\\(?:boxed|fbox)(?![A-Za-z])"

EXTRACTIONS = ("strict", "flexible", "minerva")  # how answers are found in a completion (module docstring)

# Result codes of grade_codes(); grade() maps them to True / False / None.
CORRECT, WRONG, BAD_GOLD, REJECTED, TIMEOUT, ERROR = "correct", "wrong", "bad_gold", "rejected", "timeout", "error"
_VERDICT = {CORRECT: True, WRONG: False}

# Counters for the trainer to read (graded, worker_jobs, timeouts, errors, rejected, bad_gold,
# worker_restarts), per process: a DataLoader worker counts its own.
GRADER_STATS: Counter = Counter()

# ----------------------------------------------------------------------------- extraction
_BOXED_RE = re.compile(BOXED_PATTERN)
_BRACE_RE = re.compile(r"[{}]")
_BOX_OPEN_RE = re.compile(r"[ \t]*\{")
_UNBRACED_BOX_ARG_RE = re.compile(r"\s+([^\s${}]+)")  # "\boxed 5"
_ANSWER_MARKER_RE = re.compile(
    r"(?:\bfinal\s+answer|\bthe\s+answer|^[ \t*#]*answer)\**(?:\s+is\b|\s*:)\**\s*:?", re.IGNORECASE | re.MULTILINE
)
_LINE_AFTER_RE = re.compile(r"\s*([^\n]*)")  # skips blank lines, then takes one line
_ANSWER_TRIM_RE = re.compile(r"^[\s*$]+|[\s*$.]+$")  # markdown bold, math dollars, the full stop
_GSM8K_MARKER = "####"
_LAST_NUMBER_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
# $$...$$, $...$ (within a line: a lone $ may be money), \(...\), \[...\]
_MATH_SPAN_RE = re.compile(r"\$\$(.+?)\$\$|\$([^$\n]+)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]", re.DOTALL)

# lm-eval minerva_math's answer sentence. Its dots match any character (a missing full stop still counts) and the
# closing sentence is appended first, so that a completion cut right after the answer still has one.
_MINERVA_CLOSING = "I hope it is correct."
_MINERVA_ANSWER_RE = re.compile(r"Final Answer: The final answer is(.*?). I hope it is correct.")
_MINERVA_SUBSTITUTIONS = (
    ("an ", ""), ("a ", ""), (".$", "$"), ("\\$", ""), ("\\ ", ""), (" ", ""), ("mbox", "text"),
    (",\\text{and}", ","), ("\\text{and}", ","), ("\\text{m}", "\\text{}"),
)  # fmt: skip
_MINERVA_REMOVED = (
    "square", "ways", "integers", "dollars", "mph", "inches", "ft", "hours", "km", "units", "\\ldots", "sue",
    "points", "feet", "minutes", "digits", "cents", "degrees", "cm", "gm", "pounds", "meters", "meals", "edges",
    "students", "childrentickets", "multiples", "\\text{s}", "\\text{.}", "\\text{\ns}", "\\text{}^2",
    "\\text{}^3", "\\text{\n}", "\\text{}", "\\mathrm{th}", "^\\circ", "^{\\circ}", "\\;", ",\\!", "{,}", '"',
    "\\dots",
)  # fmt: skip
_MINERVA_FIRST_MATH_RE = re.compile(r".*?\$(.*?)\$.*")  # per line: what the first pair of dollars holds
_MINERVA_UNWRAP = [re.compile(rf"\\{name}\{{(.*?)\}}") for name in ("text", "textbf", "overline")] + [
    re.compile(r"\\boxed\{(.*)\}")
]
_MINERVA_SHORT_FRAC_RE = re.compile(r"frac([^{])(.)")  # \frac12 -> \frac{1}{2}
_MINERVA_SHORT_SQRT_RE = re.compile(r"sqrt([^{])")  # \sqrt2 -> \sqrt{2}


def _as_text(value: Any) -> str:
    """Any completion-ish input as a str: bytes decoded leniently, lone surrogates replaced."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", errors="replace")
    return value.encode("utf-8", errors="replace").decode("utf-8") if isinstance(value, str) else ""


def _matching_brace_end(text: str, open_idx: int) -> int | None:
    """Index just past the '}' that closes the '{' at open_idx; None if unbalanced."""
    depth = 0
    for m in _BRACE_RE.finditer(text, open_idx):
        depth += 1 if m.group() == "{" else -1
        if depth == 0:
            return m.end()
    return None


def find_boxes(text: str, box_re: re.Pattern = _BOXED_RE) -> list[tuple[str | None, int]]:
    """Top-level boxes as (content, end index); content is None for an unclosed box.

    Boxes inside a box are part of its content and scanning resumes after each box,
    so the work stays linear even for thousands of nested boxes.
    """
    boxes, pos = [], 0
    while (m := box_re.search(text, pos)) is not None:
        if opening := _BOX_OPEN_RE.match(text, m.end()):
            end = _matching_brace_end(text, opening.end() - 1)
            if end is None:
                boxes.append((None, len(text)))
                break
            boxes.append((text[opening.end() : end - 1], end))
        elif bare := _UNBRACED_BOX_ARG_RE.match(text, m.end()):
            end = bare.end()
            boxes.append((bare.group(1).rstrip(".,"), end))
        else:
            end = m.end()
            boxes.append(("", end))
        pos = end
    return boxes


def _first_line_after(text: str, pos: int) -> str:
    return _LINE_AFTER_RE.match(text, pos).group(1).strip()


def _answer_after_marker(text: str) -> str | None:
    """First sentence after the last 'The answer is' / 'Final Answer:' marker."""
    if not (markers := list(_ANSWER_MARKER_RE.finditer(text))):
        return None
    answer = re.split(r"(?i)\bI hope\b", _first_line_after(text, markers[-1].end()))[0]
    return _ANSWER_TRIM_RE.sub("", re.split(r"\.\s", answer, maxsplit=1)[0]) or None


def _is_bare_answer(text: str) -> bool:
    """A short one-line text without prose is an answer by itself: '42', 'x^2+1', '18 dollars'."""
    stripped = text.strip()
    if not stripped or len(stripped) > 100 or "\n" in stripped:
        return False
    prose = _COMMANDS_RE.sub(" ", stripped)
    return _parse_number(stripped) is not None or re.search(r"[A-Za-z]{3,}", prose) is None


def extract_answers(text: str, numeric_fallback: bool = False) -> list[str]:
    """Distinct final-answer candidates of a completion, in order of appearance.

    Priority: all top-level \\boxed{} / \\fbox{} (all of them, so that boxing several
    different answers can be caught; an unclosed box gives an empty candidate), else the
    line after the last '####', else the sentence after the last 'The answer is' /
    'Final Answer:', else the whole text if it is a short prose-free answer, else
    (numeric_fallback only: GSM8K-style questions, never MATH) the last number.
    """
    text = _as_text(text)
    if boxes := find_boxes(text):
        candidates = [(content or "").strip() for content, _ in boxes]
    elif (idx := text.rfind(_GSM8K_MARKER)) >= 0:
        candidates = [_first_line_after(text, idx + len(_GSM8K_MARKER))]
    elif (after := _answer_after_marker(text)) is not None:
        candidates = [after]
    elif _is_bare_answer(text):
        candidates = [text.strip()]
    elif numeric_fallback and (numbers := _LAST_NUMBER_RE.findall(text)):
        candidates = [numbers[-1].rstrip(",")]
    else:
        return []
    unique: dict[str, str] = {}
    for candidate in candidates:
        unique.setdefault(_canonical(candidate), candidate)
    return list(unique.values())


def extract_answer(text: str, numeric_fallback: bool = False) -> str | None:
    """The final answer of a completion (the last candidate), or None."""
    candidates = extract_answers(text, numeric_fallback)
    return candidates[-1] if candidates else None


def _last_formula_or_number(text: str) -> str | None:
    """The last math span or the last number outside it, whichever comes later ('... $x = 3$, so 4 in all': 4).
    Only the text's end is searched: ten thousand unclosed \\( would each scan all of it."""
    text = text[-MAX_ANSWER_CHARS:]
    formula = next(reversed(list(_MATH_SPAN_RE.finditer(text))), None)
    number = next(reversed(list(_LAST_NUMBER_RE.finditer(text))), None)
    if number is not None and (formula is None or number.start() >= formula.end()):
        return number.group().rstrip(",")
    return next(group for group in formula.groups() if group is not None).strip() if formula else None


def extract_answers_flexible(text: str) -> list[str]:
    """Evaluation's extraction (never the reward's): different boxes are one answer boxed in pieces, joined as a
    list; without a box, the strict rule's '####' / marker / bare answer, else the last formula or number."""
    text = _as_text(text)
    if boxes := find_boxes(text):
        if any(content is None for content, _ in boxes):  # cut off inside a box: no answer yet
            return [""]
        return [", ".join(answer for answer in extract_answers(text) if answer)]
    if candidates := extract_answers(text):
        return candidates
    return [answer] if (answer := _last_formula_or_number(text)) else []


def minerva_answer(text: str) -> str | None:
    """X of lm-eval minerva_math's 'Final Answer: The final answer is X. I hope it is correct.' (the first one)."""
    match = _MINERVA_ANSWER_RE.search(_as_text(text) + _MINERVA_CLOSING)
    answer = match.group(1).strip() if match else None
    return answer if answer is not None and len(answer) <= MAX_ANSWER_CHARS else None  # normalising is quadratic


def normalize_final_answer(answer: str) -> str:
    """Minerva's normalisation of a final answer (Lewkowycz et al. 2022, appendix D), step for step as lm-eval's
    minerva_math applies it, quirks included ('\\left' loses its 'ft', a unit)."""
    answer = answer.split("=")[-1]
    for old, new in _MINERVA_SUBSTITUTIONS:
        answer = answer.replace(old, new)
    for unit in _MINERVA_REMOVED:
        answer = answer.replace(unit, "")
    answer = _MINERVA_FIRST_MATH_RE.sub(r"$\1$", answer)
    for wrapper in _MINERVA_UNWRAP:
        answer = wrapper.sub(r"\1", answer)
    answer = _MINERVA_SHORT_SQRT_RE.sub(r"sqrt{\1}", _MINERVA_SHORT_FRAC_RE.sub(r"frac{\1}{\2}", answer))
    answer = answer.replace("$", "")
    return answer.replace(",", "") if answer.replace(",", "").isdigit() else answer


def minerva_exact_match(text: str, gold: str) -> bool:
    """The Final Answer sentence's answer and the gold are one string once both are normalised as Minerva does.
    (lm-eval's metric of that name parses the two strings with sympy's LaTeX parser and compares them; that parser
    needs antlr4 4.11, which math-verify's 4.13 excludes. extraction="minerva" compares them with math-verify.)"""
    answer = minerva_answer(text)
    return answer is not None and normalize_final_answer(answer) == normalize_final_answer(_as_text(gold))


def gold_answer(row: Mapping[str, Any]) -> str | None:
    """Gold answer of a GSM8K, MATH or OpenMathInstruct-1/2 row.

    None when the schema matches but holds no answer (a MATH solution without a box);
    ValueError naming the keys when no schema matches.
    """
    if "expected_answer" in row:  # OpenMathInstruct-1 and -2
        return _as_text(row["expected_answer"]).strip() or None
    if "problem" in row and ("answer" in row or "solution" in row):  # MATH, MATH-500
        if answer := _as_text(row.get("answer")).strip():
            return answer
        boxes = find_boxes(_as_text(row.get("solution")))
        return (boxes[-1][0] or "").strip() or None if boxes else None
    if "question" in row and "answer" in row:  # GSM8K: "...reasoning...\n#### 1,234"
        return _as_text(row["answer"]).rsplit(_GSM8K_MARKER, 1)[-1].strip().replace(",", "") or None
    raise ValueError(
        f"row matches no gold-answer schema; it has keys {sorted(row)} but needs 'expected_answer' "
        "(OpenMathInstruct), 'problem' + 'answer'/'solution' (MATH) or 'question' + 'answer' (GSM8K)"
    )


# ----------------------------------------------------------------------------- guards
_BRACKET_RE = re.compile(r"[()\[\]{}]")
_HOSTILE_RE = re.compile(
    rf"\d{{{MAX_NUMBER_DIGITS + 1}}}"  # a huge number
    rf"|\^\s*\{{?\s*\d{{{MAX_EXPONENT_DIGITS + 1}}}"  # 10^{10000000}
    r"|\^\s*\{[^{}]*?\d\s*\^"  # a numeric power tower 5^{5^{5}}
    r"|\^\s*[\w.]+\s*\^"  # 5^5^5
)


def _nesting_depth(text: str) -> int:
    """Deepest bracket nesting; any of ([{ opens and any of )]} closes, as in '[0, 1)'."""
    depth = deepest = 0
    for m in _BRACKET_RE.finditer(text):
        depth += 1 if m.group() in "([{" else -1
        deepest = max(deepest, depth)
    return deepest


def _is_rejected(answer: str) -> bool:
    """Cheap checks that keep hostile answers away from int() and sympy."""
    return len(answer) > MAX_ANSWER_CHARS or bool(_HOSTILE_RE.search(answer)) or _nesting_depth(answer) > MAX_NESTING


# ----------------------------------------------------------------------------- notation
# Rewrites of notations that math-verify misreads, applied to every compared pair before the fast path and before
# math-verify, so both read an answer alike (the policies in the module docstring).
_NOTATION_RE = re.compile(r"[°≈×~\\{ ]")  # each rewrite below needs one of these: plain numbers skip them all
_DEGREE_SIGN_RE = re.compile(r"°|\\degree(?![A-Za-z])")
_TEXT_VARIANT_RE = re.compile(r"\\text(?:normal|rm)(?![A-Za-z])")
_LEADING_APPROX_RE = re.compile(r"^\s*(?:\\approx(?![A-Za-z])|≈)\s*")
_APPROX_RE = re.compile(r"\\approx(?![A-Za-z])|≈")
_GAP = r"(?:\s|~|\\[,;: !])"  # what may stand between a mixed number's whole part and its fraction
_MIXED_NUMBER_RE = re.compile(
    rf"(?<![\w.^_}}\\])(\d{{1,9}})"  # the whole part: not an exponent, index or the tail of a decimal
    rf"(?:{_GAP}*\\[dt]?frac\s*\{{\s*(\d{{1,9}})\s*\}}\s*\{{\s*(\d{{1,9}})\s*\}}"  # 1\frac{1}{2}
    rf"|{_GAP}*\\[dt]?frac(\d)(\d)"  # 1\frac12
    rf"|{_GAP}+(\d{{1,9}})\s*/\s*(\d{{1,9}}))"  # 1 1/2 (without the gap it is 11/2)
    r"(?![\d.])"
)
_GROUP_SEPARATOR_RE = re.compile(r"(?<=\d)(?:,\s*\\!|\{,\}|\\[,!]|\\ |~|\s)\s*(?=\d{3}(?!\d))")  # 32,\! 349; 1 000
# Down to 10^{-5} only: math-verify's 6 decimal places would make 1 \times 10^{-7} equal 0.
_SCIENTIFIC_RE = re.compile(
    r"(?<![\w.])(\d+(?:\.\d+)?)\s*(?:\\times|\\cdot|×)\s*10\s*\^\s*(?:\{\s*([-−]?[1-5]|\+?\d{1,2})\s*\}|(\d))"
)
_TRIG_RE = re.compile(r"\\(?:sin|cos|tan|cot|sec|csc)(?![A-Za-z])")
_DEGREES_VALUE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*\^\s*(?:\{\s*\\circ\s*\}|\\circ)")
_DECIMAL_COMMA_RE = re.compile(r"(?<![\d,.])(\d+)(?:\{,\}|,)(\d+)(?![\d,.])")
_DEFINITION_RE = re.compile(r"\s*([A-Za-z])\s*(?:\(\s*[A-Za-z](?:\s*,\s*[A-Za-z])*\s*\))?\s*=")  # y =, f(x) =
_ASSIGNMENT_RE = re.compile(r"\s*([A-Za-z])\s*=\s*([^=]+?)\s*")


def _improper_fraction(match: re.Match) -> str:
    """1\\frac{1}{2}, 1 1/2 as \\frac{3}{2}."""
    whole = int(match[1])
    numerator, denominator = next((int(match[i]), int(match[i + 1])) for i in (2, 4, 6) if match[i] is not None)
    return f"\\frac{{{whole * denominator + numerator}}}{{{denominator}}}" if denominator else match[0]


def _positional_decimal(match: re.Match) -> str:
    """2.3148 \\times 10^{-3} as 0.0023148: math-verify compares decimals at 6 places, not products."""
    exponent = int((match[2] or match[3]).replace("−", "-"))
    return format(Decimal(match[1]).scaleb(exponent), "f")


@lru_cache(maxsize=8192)
def _rewrite_notation(answer: str) -> str:
    """One answer as both paths should read it: degree signs as ^{\\circ}, \\textnormal as \\text, \\approx as =,
    mixed numbers as improper fractions, digit-group separators dropped, scientific notation positional, and
    degrees inside a trigonometric function in radians."""
    if not _NOTATION_RE.search(answer):
        return answer
    text = _TEXT_VARIANT_RE.sub(r"\\text", _DEGREE_SIGN_RE.sub(r"^{\\circ}", answer))
    text = _APPROX_RE.sub("=", _LEADING_APPROX_RE.sub("", text))
    text = _GROUP_SEPARATOR_RE.sub("", _MIXED_NUMBER_RE.sub(_improper_fraction, text))
    text = _SCIENTIFIC_RE.sub(_positional_decimal, text)
    if "\\circ" in text and _TRIG_RE.search(text):
        text = _DEGREES_VALUE_RE.sub(r"\\frac{\1\\pi}{180}", text)
    return text


def _with_decimal_point(answer: str) -> str:
    """2,5 and 0{,}75 as 2.5 and 0.75; 1,000 stays a thousand (three digits after a nonzero integer part)."""

    def point(match: re.Match) -> str:
        is_group = len(match[2]) == 3 and match[1] != "0"
        return match[0] if is_group else f"{match[1]}.{match[2]}"

    return _DECIMAL_COMMA_RE.sub(point, answer)


def _function_body(answer: str) -> str | None:
    """'2x+3' of 'y = 2x+3' or 'f(x) = 2x+3' (a function named); None for a value ('x = 5') or other equation."""
    if not (match := _DEFINITION_RE.match(answer)) or "=" in (body := answer[match.end() :]):
        return None
    names_itself = re.search(rf"(?<![A-Za-z\\]){match[1]}(?![A-Za-z])", body)
    has_variable = _VARIABLE_RE.search(_COMMANDS_RE.sub(" ", body))  # 2x is a term here, not 2 of a unit x
    return body.strip() if has_variable and not names_itself else None


def _as_tuple(answer: str) -> str:
    """'x=-1, y=6' (several variables, each once) as the tuple '(-1, 6)' in the order written; else unchanged."""
    parts = answer.split(",") if "=" in answer else []
    assignments = [match for part in parts if (match := _ASSIGNMENT_RE.fullmatch(part))]
    names = {match[1] for match in assignments}
    if len(parts) < 2 or len(assignments) < len(parts) or len(names) < len(parts):
        return answer
    values = [match[2] for match in assignments]
    if any(value.count(open_) != value.count(close) for value in values for open_, close in ("()", "[]", "{}")):
        return answer  # a comma inside a value split it
    return f"({', '.join(values)})"


def _prepare_pair(gold: str, candidate: str) -> tuple[str, str]:
    """The pair as both paths compare it: each answer's notation rewritten, then what depends on the other answer:
    a decimal comma (against one decimal number only: '5,0' stays a list beside 5), two names of one function,
    assignments against a tuple or list."""
    gold, candidate = _rewrite_notation(gold), _rewrite_notation(candidate)
    if "," in candidate and (number := _parse_number(gold)) is not None and number.is_decimal:
        candidate = _with_decimal_point(candidate)
    if "=" in gold and "=" in candidate:
        gold_body, candidate_body = _function_body(gold), _function_body(candidate)
        if gold_body is not None and candidate_body is not None:
            gold, candidate = gold_body, candidate_body
    elif "=" in gold and "," in candidate:
        gold = _as_tuple(gold)
    elif "=" in candidate and "," in gold:
        candidate = _as_tuple(candidate)
    return _bare_number(gold), _bare_number(candidate)


def _bare_number(answer: str) -> str:
    """A plain number as bare LaTeX ('\\$18', '18 dollars', '30^\\circ' as 18, 18, 30): math-verify then reads it
    as the fast path does, units it does not know included."""
    if (number := _parse_number(answer)) is None:
        return answer
    magnitude = abs(number.value)
    if number.is_decimal:
        text = _exact_decimal(magnitude)
    elif magnitude.denominator == 1:
        text = str(magnitude)
    else:
        text = f"\\frac{{{magnitude.numerator}}}{{{magnitude.denominator}}}"
    return ("-" if number.value < 0 else "") + text + ("\\%" if number.is_percent else "")


def _exact_decimal(value: Fraction) -> str:
    """A terminating decimal's digits, point included (1000.0 stays a decimal, as math-verify's Float)."""
    places = next(k for k in range(MAX_NUMBER_DIGITS) if (value * 10**k).denominator == 1)
    digits = str(int(value * 10**places)).rjust(places + 1, "0")
    return f"{digits[: len(digits) - places]}.{digits[len(digits) - places :] or '0'}"


# ----------------------------------------------------------------------------- fast path
class _Number(NamedTuple):
    value: Fraction
    is_percent: bool
    is_decimal: bool


_LEFT_RIGHT_RE = re.compile(r"\\(?:left|right)(?![A-Za-z])")
_SPACING_RE = re.compile(r"\\[,;:! ]|~")
_SPACE_OFF_DIGITS_RE = re.compile(r"(?<!\d)\s++|\s++(?!\d)")  # whitespace not between two digits; leaves one
_DEGREES_RE = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|°")
_TEXT_UNIT_RE = re.compile(r"\\(?:text|mbox|mathrm|textbf)\s*\{\s*([A-Za-z .%/]*)\}")
_MULTI_VALUE_RE = re.compile(r",(?!\d{3}(?!\d))|;|\\cup|\\pm|\bor\b|\band\b|\\begin")  # 1,000 is one value
_COMMANDS_RE = re.compile(r"\\(?:text|mbox|mathrm|textbf|operatorname)\s*\{[^{}]*\}|\\[A-Za-z]+")
_VARIABLE_RE = re.compile(r"[a-df-hj-zA-Z]")  # e and i are constants
_UNIT_TAIL_RE = re.compile(r"(?<=[\d}\s])\s*[A-Za-z][A-Za-z\s.]*$")
_NUMBER_RE = re.compile(
    r"(?P<sign>[-+]?)\s*(?:"
    r"(?P<decimal>(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)"
    r"|\\frac\s*\{\s*(?P<frac_num>[-+]?\d+)\s*\}\s*\{\s*(?P<frac_den>\d+)\s*\}"
    r"|\\frac(?P<short_num>\d)(?P<short_den>\d)"
    r"|(?P<slash_num>\d+)\s*/\s*(?P<slash_den>\d+))"
    r"\s*(?P<percent>%|percent\b)?"
    # unit words ("dollars", "km/h"); words that would make it an expression are excluded
    r"(?:\s+(?!(?:or|and|pi|sqrt|plus|minus|times|over)\b)[A-Za-z]{2,}(?:/[A-Za-z]+)?\.?)*",
    re.IGNORECASE,
)


def _has_free_variable(answer: str) -> bool:
    """A letter standing for a variable: not e or i, no command, no \\text words, no trailing unit
    word ('1.5 m', which math-verify accepts as 1.5), and no equation ('x = 5' is math-verify's)."""
    if "=" in answer:
        return False
    return _VARIABLE_RE.search(_UNIT_TAIL_RE.sub("", _COMMANDS_RE.sub(" ", answer))) is not None


def _canonical(answer: str) -> str:
    """Conservative normal form: equal canonical strings are surely equivalent answers. A gap between two digits
    stays (one space): 1 1/2 is not 11/2, nor 1\\,000 obviously 1000."""
    s = re.sub(r"\\[dt]frac", r"\\frac", _LEFT_RIGHT_RE.sub("", answer))
    s = _SPACE_OFF_DIGITS_RE.sub("", _SPACING_RE.sub(" ", s))
    return s.strip("$").rstrip(".")


def _unit_words(match: re.Match) -> str:
    """The words of a \\text{} unit; a single letter there is a unit too ('5\\text{ m}'), not a variable."""
    words = match[1].strip()
    return f" {words}" if len(words) > 1 else ""


@lru_cache(maxsize=8192)
def _parse_number(answer: str) -> _Number | None:
    """A plain number (maybe with $, %, degrees or unit words) as an exact Fraction."""
    s = answer.replace("−", "-").replace("{,}", ",").replace("\\%", "%").replace("\\$", "$")
    s = _TEXT_UNIT_RE.sub(_unit_words, _DEGREES_RE.sub("", re.sub(r"\\[dt]frac", r"\\frac", s)))
    s = _SPACING_RE.sub(" ", s).replace("$", "").strip().rstrip(".").strip()
    if len(s) > 100 or (m := _NUMBER_RE.fullmatch(s)) is None:  # 100 digits are cheap for Fraction
        return None
    sign = -1 if m["sign"] == "-" else 1
    if m["decimal"] is not None:
        return _Number(sign * Fraction(m["decimal"].replace(",", "")), bool(m["percent"]), "." in m["decimal"])
    denominator = int(m["frac_den"] or m["short_den"] or m["slash_den"])
    if denominator == 0:
        return None
    numerator = int(m["frac_num"] or m["short_num"] or m["slash_num"])
    return _Number(sign * Fraction(numerator, denominator), bool(m["percent"]), False)


def _numbers_match(gold: _Number, pred: _Number) -> bool:
    """math-verify's numeric rules, so that fast path and workers agree: X% is X/100; with a decimal on either side,
    equal at 6 decimal places; two integers are also equal when only a percent sign sets them apart ('50%' is 50
    and 0.5, '2.5%' is 0.025 only)."""
    gold_value = gold.value / 100 if gold.is_percent else gold.value
    pred_value = pred.value / 100 if pred.is_percent else pred.value
    if gold.is_decimal or pred.is_decimal:
        return round(gold_value, 6) == round(pred_value, 6)
    integers = gold.value.denominator == pred.value.denominator == 1
    return gold_value == pred_value or (integers and gold.value == pred.value)


def _fast_code(gold: str, candidate: str) -> str | None:
    """REJECTED / CORRECT / WRONG decided without sympy; None when math-verify must decide."""
    if _is_rejected(candidate):
        return REJECTED
    if not candidate:
        return WRONG
    if _canonical(candidate) == _canonical(gold):
        return CORRECT
    prepared = _prepare_pair(gold, candidate)
    if prepared != (gold, candidate) and _canonical(prepared[1]) == _canonical(prepared[0]):
        return CORRECT
    gold, candidate = prepared
    gold_number, pred_number = _parse_number(gold), _parse_number(candidate)
    if gold_number is not None and pred_number is not None:
        return CORRECT if _numbers_match(gold_number, pred_number) else WRONG
    if (gold_number is None) != (pred_number is None):  # exactly one side is a plain number
        other = gold if gold_number is None else candidate
        if _MULTI_VALUE_RE.search(_SPACING_RE.sub("", other)) or _has_free_variable(other):
            return WRONG  # a number never equals "1, 2", "1 or 2", an interval or "p - q"
    return None


# ----------------------------------------------------------------------------- workers
_WORKER_BOOT = "import sys; sys.path.insert(0, {dir!r}); from {module} import _worker_main; _worker_main()"
_WARMUP_PAIRS = [  # one of each kind, so sympy's lazy imports happen before the first timed job
    ("(1,2)", "[1,2]"), ("\\begin{pmatrix}1\\\\2\\end{pmatrix}", "x^2+1"), ("x=5", "5"),
    ("\\frac{\\sqrt{3}}{2}", "0.866"), ("(-\\infty, 2) \\cup (3, \\infty)", "x<1"),
    ("\\{1\\pm\\sqrt{5},-2\\}", "15"), ("\\cot x", "1\\frac{4}{5}"), ("2", "4210_{5}"),
]  # fmt: skip


def _imaginary_unit(parsed: Any) -> Any:
    """i as the imaginary unit: math-verify only treats it so where its regex spots a lone i ('i(2-i)', not '1+2i')."""
    import sympy

    symbols = {symbol: sympy.I for symbol in getattr(parsed, "free_symbols", ()) if symbol.name == "i"}
    return parsed.xreplace(symbols) if symbols else parsed


@lru_cache(maxsize=4096)
def _parse_for_verify(answer: str) -> tuple:
    """math-verify parse of one answer, boxed so that its LaTeX extraction takes all of it."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    config = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    return tuple(map(_imaginary_unit, parse(f"\\boxed{{{answer}}}", extraction_config=config, parsing_timeout=None)))


def _math_verify_code(gold: str, candidate: str) -> str:
    """Worker-side comparison of the pair as _prepare_pair writes it. math-verify's timeouts are off: the parent
    kills us instead."""
    from math_verify import verify

    try:
        gold, candidate = _prepare_pair(gold, candidate)
        if not (gold_parsed := _parse_for_verify(gold)):
            return BAD_GOLD
        if not (pred_parsed := _parse_for_verify(candidate)):
            return WRONG
        # Gold first: verify() is asymmetric (assignments, relation/set conversions).
        return CORRECT if verify(list(gold_parsed), list(pred_parsed), timeout_seconds=None) else WRONG
    except Exception:  # sympy raises anything: RecursionError, MemoryError, TypeError, ...
        return ERROR


def _worker_main() -> None:
    """Grading subprocess: a JSON job per stdin line -> a JSON result code per stdout line."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the trainer; stdin EOF ends us
    protocol = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)  # stray prints of libraries must not corrupt the protocol
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (WORKER_MEMORY_BYTES if hard < 0 else min(WORKER_MEMORY_BYTES, hard), hard))
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # the parent counts timeouts
    try:
        for gold, candidate in _WARMUP_PAIRS:
            _math_verify_code(gold, candidate)
        protocol.write("ready\n")
        protocol.flush()
        for line in sys.stdin:
            job = json.loads(line)
            protocol.write(json.dumps(_math_verify_code(job["gold"], job["pred"])) + "\n")
            protocol.flush()
    except BrokenPipeError:  # the parent closed the pool or died: leave without a traceback
        os._exit(0)


class _Worker:
    """One grading subprocess, the job it works on and the deadline for it."""

    def __init__(self) -> None:
        boot = _WORKER_BOOT.format(dir=str(Path(__file__).resolve().parent), module=Path(__file__).stem)
        self.proc = subprocess.Popen([sys.executable, "-c", boot], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.ready, self.job, self._buffer = False, None, b""
        self.deadline = time.monotonic() + WORKER_START_TIMEOUT_S

    def fileno(self) -> int:
        return self.proc.stdout.fileno()

    def send(self, job: int, gold: str, candidate: str, timeout_s: float) -> None:
        self.proc.stdin.write((json.dumps({"gold": gold, "pred": candidate}) + "\n").encode())
        self.proc.stdin.flush()
        self.job, self.deadline = job, time.monotonic() + timeout_s

    def read_lines(self) -> list[str] | None:
        """Complete lines received so far; None once the worker has exited."""
        if not (data := os.read(self.fileno(), 1 << 16)):
            return None
        *lines, self._buffer = (self._buffer + data).split(b"\n")
        return [line.decode() for line in lines]

    def close_pipes(self) -> None:
        for pipe in (self.proc.stdin, self.proc.stdout):
            try:
                pipe.close()
            except OSError:
                pass  # flushing into a dead worker's stdin; the fd is closed anyway

    def close(self, grace_s: float = 0.0) -> None:
        """EOF on stdin ends the worker's loop; SIGKILL it if it is still alive after grace_s."""
        self.close_pipes()
        try:
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class GraderPool:
    """math-verify worker subprocesses with a hard wall-clock limit per comparison.

    A worker past its deadline is SIGKILLed and replaced; its job gets TIMEOUT while the
    other jobs go on (a ProcessPoolExecutor would turn into BrokenProcessPool instead).
    """

    def __init__(self, num_workers: int) -> None:
        self.num_workers = max(1, num_workers)
        self._workers: list[_Worker] = []
        self._failed_starts = 0

    def run(self, jobs: Sequence[tuple[str, str]], timeout_s: float) -> list[str]:
        """Result code for each (gold, candidate) job."""
        codes = [ERROR] * len(jobs)
        queue = deque(range(len(jobs)))
        while len(self._workers) < min(self.num_workers, len(jobs)):  # grow lazily: one job, one worker
            self._workers.append(_Worker())
        while queue or any(w.job is not None for w in self._workers):
            if self._failed_starts >= MAX_FAILED_STARTS and not any(w.ready for w in self._workers):
                GRADER_STATS["errors"] += len(queue)
                logger.warning("grader workers do not start; %d comparisons left ungraded", len(queue))
                break
            for worker in self._workers:
                if worker.ready and worker.job is None and queue:
                    job = queue.popleft()
                    try:
                        worker.send(job, *jobs[job], timeout_s)
                    except OSError:  # it died while idle: retry the job on a fresh worker
                        queue.appendleft(job)
                        self._replace(worker)
            waiting = [w for w in self._workers if w.job is not None or not w.ready]
            timeout = max(0.0, min(w.deadline for w in waiting) - time.monotonic())
            for worker in select.select(waiting, [], [], timeout)[0]:
                self._receive(worker, codes)
            now = time.monotonic()
            for worker in [w for w in self._workers if (w.job is not None or not w.ready) and now >= w.deadline]:
                self._fail(worker, codes, TIMEOUT, "timeouts", "grader timeout: worker killed and replaced")
        return codes

    def _receive(self, worker: _Worker, codes: list[str]) -> None:
        if (lines := worker.read_lines()) is None:  # segfault, OOM kill, ...
            self._fail(worker, codes, ERROR, "errors", "grader worker died")
            return
        for line in lines:
            if not worker.ready:
                worker.ready, self._failed_starts = True, 0
            elif worker.job is not None:
                codes[worker.job], worker.job = json.loads(line), None

    def _fail(self, worker: _Worker, codes: list[str], code: str, stat: str, message: str) -> None:
        if worker.job is not None:
            codes[worker.job] = code
            GRADER_STATS[stat] += 1
            logger.warning("%s (%d so far)", message, GRADER_STATS[stat])
        elif not worker.ready:
            self._failed_starts += 1
        self._replace(worker)

    def _replace(self, worker: _Worker) -> None:
        worker.close()
        GRADER_STATS["worker_restarts"] += 1
        self._workers[self._workers.index(worker)] = _Worker()

    def close(self) -> None:
        for worker in self._workers:
            worker.close(grace_s=1.0)
        self._workers = []


_POOL: GraderPool | None = None
_POOL_LOCK = threading.Lock()  # one batch at a time on the shared pool, from any thread


def default_num_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def shutdown_pool(wait_s: float = 10.0) -> None:
    """Stop the shared worker pool; the next grading call starts a new one."""
    global _POOL
    if not _POOL_LOCK.acquire(timeout=wait_s):  # a thread is mid-batch: its workers exit on our EOF
        return
    try:
        if _POOL is not None:
            _POOL.close()
            _POOL = None
    finally:
        _POOL_LOCK.release()


def _forget_pool_after_fork() -> None:
    """A forked child (a DataLoader worker) must not use its parent's workers nor hold their pipes."""
    global _POOL, _POOL_LOCK
    for worker in _POOL._workers if _POOL is not None else []:
        worker.close_pipes()
    _POOL, _POOL_LOCK = None, threading.Lock()


atexit.register(shutdown_pool)
os.register_at_fork(after_in_child=_forget_pool_after_fork)


def _run_on_pool(jobs: list[tuple[str, str]], timeout_s: float, num_workers: int) -> list[str]:
    global _POOL
    with _POOL_LOCK:
        if _POOL is not None and _POOL.num_workers != num_workers:
            _POOL.close()
            _POOL = None
        _POOL = _POOL or GraderPool(num_workers)
        return _POOL.run(jobs, timeout_s)


# ----------------------------------------------------------------------------- grading API
def _gold_text(gold: Any) -> str | None:
    """Gold answer string; a raw GSM8K / MATH solution is reduced to its final answer."""
    text = _as_text(gold).strip()
    if _GSM8K_MARKER in text or _BOXED_RE.search(text):
        text = extract_answer(text) or ""
    return text if text and not _is_rejected(text) else None


def candidate_answers(text: Any, extraction: str = "strict", numeric_fallback: bool = False) -> list[str]:
    """The answers a completion offers under one of EXTRACTIONS (see the module docstring)."""
    if extraction == "flexible":
        return extract_answers_flexible(text)
    if extraction == "minerva":
        return [] if (answer := minerva_answer(text)) is None else [normalize_final_answer(answer)]
    return extract_answers(text, numeric_fallback)


def _comparisons(prediction: Any, gold: Any, numeric_fallback: bool, extraction: str) -> str | list[tuple[str, str]]:
    """A final result code, or the (gold, candidate) comparisons that decide it."""
    gold_text, text = _gold_text(gold), _as_text(prediction)
    if gold_text is None:
        return BAD_GOLD
    if extraction == "minerva":  # Minerva's equivalence compares both answers normalised, as its exact match does
        gold_text = normalize_final_answer(gold_text)
    if len(text) > MAX_COMPLETION_CHARS:
        return REJECTED
    candidates = candidate_answers(text, extraction, numeric_fallback)
    return [(gold_text, candidate) for candidate in candidates] if candidates else WRONG


def _combine(codes: list[str]) -> str:
    """Every boxed candidate must be right: boxing one wrong answer besides the right one fails."""
    return next((code for code in (BAD_GOLD, WRONG, TIMEOUT, ERROR, REJECTED) if code in codes), CORRECT)


def grade_codes(
    predictions: Sequence[Any],
    golds: Sequence[Any],
    timeout_s: float = DEFAULT_TIMEOUT_S,
    num_workers: int | None = None,
    numeric_fallback: bool = False,
    extraction: str = "strict",
) -> list[str]:
    """grade_batch with the reason: CORRECT, WRONG, BAD_GOLD, REJECTED, TIMEOUT or ERROR."""
    if len(predictions) != len(golds):
        raise ValueError(f"{len(predictions)} predictions but {len(golds)} golds")
    if extraction not in EXTRACTIONS:
        raise ValueError(f"extraction must be one of {EXTRACTIONS}, got {extraction!r}")
    items = [_comparisons(p, g, numeric_fallback, extraction) for p, g in zip(predictions, golds, strict=True)]
    codes = {pair: _fast_code(*pair) for item in items if isinstance(item, list) for pair in item}
    if todo := [pair for pair, code in codes.items() if code is None]:  # each distinct pair once
        codes.update(zip(todo, _run_on_pool(todo, timeout_s, num_workers or default_num_workers()), strict=True))
    results = [item if isinstance(item, str) else _combine([codes[pair] for pair in item]) for item in items]
    GRADER_STATS.update(
        graded=len(results), worker_jobs=len(todo), rejected=results.count(REJECTED), bad_gold=results.count(BAD_GOLD)
    )
    return results


def grade_batch(
    predictions: Sequence[Any],
    golds: Sequence[Any],
    timeout_s: float = DEFAULT_TIMEOUT_S,
    num_workers: int | None = None,
    numeric_fallback: bool = False,
    extraction: str = "strict",
) -> list[bool | None]:
    """Grade completions (or bare answers) against gold answers, hard cases in parallel.

    True = equivalent, False = wrong / no final answer, None = cannot grade. A hard case
    costs at most ~timeout_s; nothing here hangs or raises on hostile input. `extraction`:
    "strict" (the reward's), "flexible" or "minerva" (evaluation's; module docstring).
    """
    codes = grade_codes(predictions, golds, timeout_s, num_workers, numeric_fallback, extraction)
    return [_VERDICT.get(code) for code in codes]


def gradable_golds(golds: Sequence[Any], timeout_s: float = DEFAULT_TIMEOUT_S) -> list[bool]:
    """Whether each gold answer can grade anything: it is compared with a probe answer, which makes the grader
    parse it (an unparsable gold is BAD_GOLD whatever the prediction; the probe's own verdict is irrelevant)."""
    codes = grade_codes(["\\boxed{0}"] * len(golds), golds, timeout_s)
    return [code != BAD_GOLD for code in codes]


def grade(
    completion_answer_or_text: Any,
    gold: Any,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    numeric_fallback: bool = False,
    extraction: str = "strict",
) -> bool | None:
    """Grade one completion or bare answer against a gold answer (see grade_batch)."""
    return grade_batch([completion_answer_or_text], [gold], timeout_s, None, numeric_fallback, extraction)[0]


# ----------------------------------------------------------------------------- TRL rewards
RewardFn = Callable[..., list[float | None]]
_FORMAT_TRAILER_RE = re.compile(r"(?:\s|\$|\.|\\\]|\\\))*")


def completion_text(completion: Any) -> str:
    """Assistant text of a TRL completion: a plain string or a list of chat messages."""
    if not isinstance(completion, list):
        return _as_text(completion)
    turns = [m for m in completion if isinstance(m, Mapping) and m.get("role", "assistant") == "assistant"]
    content = turns[-1].get("content", "") if turns else ""
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        content = "".join(part.get("text", "") for part in content if isinstance(part, Mapping))
    return _as_text(content)


def make_correctness_reward(
    numeric_fallback: bool = False, timeout_s: float = DEFAULT_TIMEOUT_S, num_workers: int | None = None
) -> RewardFn:
    """1.0 correct; 0.0 wrong, no answer or ungradable completion; None when the gold is bad."""

    def correctness_reward(completions: list, answer: list, **kwargs: Any) -> list[float | None]:
        texts = [completion_text(c) for c in completions]
        codes = grade_codes(texts, answer, timeout_s, num_workers, numeric_fallback)
        if callable(log_metric := kwargs.get("log_metric")):  # TRL passes it: hangs show in the logs
            log_metric("grader/timeouts", float(codes.count(TIMEOUT)))
        return [None if code == BAD_GOLD else float(code == CORRECT) for code in codes]

    correctness_reward.__name__ = "correctness_reward"
    return correctness_reward


def make_format_reward(pattern: str = BOXED_PATTERN) -> RewardFn:
    """1.0 when exactly one non-empty box ends the assistant turn (only space, $, ., \\] after it)."""
    box_re = re.compile(pattern)

    def format_reward(completions: list, **kwargs: Any) -> list[float]:
        rewards = []
        for completion in completions:
            text = completion_text(completion)
            boxes = find_boxes(text, box_re) if len(text) <= MAX_COMPLETION_CHARS else []
            ok = len(boxes) == 1 and bool((boxes[0][0] or "").strip())
            rewards.append(float(ok and _FORMAT_TRAILER_RE.fullmatch(text, boxes[0][1]) is not None))
        return rewards

    format_reward.__name__ = "format_reward"
    return format_reward


def make_length_penalty(max_length: int, soft_margin: int, unit: str = "tokens") -> RewardFn:
    """0 up to max_length - soft_margin, then linearly down to -1 at max_length (and beyond).

    unit="tokens" counts TRL's `completion_ids`; unit="chars" counts the completion text.
    """
    if unit not in ("tokens", "chars"):
        raise ValueError(f"unit must be 'tokens' or 'chars', got {unit!r}")
    if not 0 < soft_margin <= max_length:
        raise ValueError(f"need 0 < soft_margin <= max_length, got {soft_margin=} {max_length=}")

    def length_penalty(completions: list, completion_ids: list | None = None, **kwargs: Any) -> list[float]:
        if unit == "chars":
            lengths = [len(completion_text(c)) for c in completions]
        elif completion_ids is None:
            raise ValueError("length_penalty(unit='tokens') needs completion_ids (TRL passes them)")
        else:
            lengths = [len(ids) for ids in completion_ids]
        return [-min(1.0, max(0, n - (max_length - soft_margin)) / soft_margin) for n in lengths]

    length_penalty.__name__ = "length_penalty"
    return length_penalty


correctness_reward = make_correctness_reward()
format_reward = make_format_reward()


def step_saving_reward(completions: list, answer: list, mean_steps_used: list[float],
                       rollout_num_steps: list[int], **kwargs: Any) -> list[float | None]:
    """Compute-aware reward for rollouts decoded with adaptive exit: a right answer earns the fraction of the
    recurrent depth its tokens skipped, 1 - mean_steps_used / rollout_num_steps; a wrong one earns 0 however quick
    (speed must not pay for itself); None where correctness cannot be graded. train_grpo.py passes the steps."""
    correct = correctness_reward(completions, answer, **kwargs)
    return [None if right is None else right * (1.0 - steps / depth)
            for right, steps, depth in zip(correct, mean_steps_used, rollout_num_steps, strict=True)]


def main() -> None:
    parser = argparse.ArgumentParser(description="Grade one completion against a gold answer.")
    parser.add_argument("--gold", required=True, help="gold answer, or a GSM8K / MATH solution")
    parser.add_argument("--completion", required=True, help="model completion, or a bare answer")
    parser.add_argument("--numeric_fallback", action="store_true", help="last number counts (GSM8K-style)")
    parser.add_argument("--extraction", choices=EXTRACTIONS, default="strict", help="flexible, minerva: evaluation")
    parser.add_argument("--timeout_s", type=float, default=DEFAULT_TIMEOUT_S)
    args = parser.parse_args()
    start = time.perf_counter()
    code = grade_codes([args.completion], [args.gold], args.timeout_s, None, args.numeric_fallback, args.extraction)[0]
    elapsed = time.perf_counter() - start
    print(f"gold answer : {_gold_text(args.gold)!r}")
    print(f"extracted   : {candidate_answers(args.completion, args.extraction, args.numeric_fallback)!r}")
    path = "math-verify worker" if GRADER_STATS["worker_jobs"] else "fast path"
    print(f"verdict     : {_VERDICT.get(code)} ({code}; {path})")
    print(f"time        : {elapsed * 1000:.1f} ms (a first worker call includes starting it)")
    shutdown_pool()


if __name__ == "__main__":
    main()
