"""Datasets and prompts shared by train_sft.py, train_grpo.py and evaluate.py.

Every source (hub dataset or local JSONL/JSON/parquet file in the same schema) is normalised to rows
{"problem", "solution", "answer"} and rendered in Huginn's chat format with the authors' math system prompt, the
assistant turn ending with the answer in \\boxed{} (what rewards.py grades).
"""

import json
import logging
import re
import shutil
import tempfile
from collections import Counter
from pathlib import Path

from datasets import Dataset, IterableDataset, concatenate_datasets, load_dataset
from transformers import AutoTokenizer

import rewards
import tiny
from modeling_huginn_qlora import HUGINN_CHAT_TEMPLATE, PAD, SPECIAL_TOKENS

logger = logging.getLogger(__name__)

SYSTEM_PROMPT = "You are a helpful assistant that can assist users with mathematical reasoning."
ANSWER_INSTRUCTION = "Solve the problem step by step and put the final answer in \\boxed{}."

# Known schemas: name -> (problem field, solution field, answer field or None). The hub names map to them.
SCHEMAS = {
    "openmathinstruct2": ("problem", "generated_solution", "expected_answer"),
    "openmathinstruct1": ("question", "generated_solution", "expected_answer"),
    "gsm8k": ("question", "answer", None),
    "math": ("problem", "solution", "answer"),
}
HUB_DATASETS = {  # hub id -> (schema, config name, default split)
    "nvidia/OpenMathInstruct-2": ("openmathinstruct2", None, "train_1M"),
    "nvidia/OpenMathInstruct-1": ("openmathinstruct1", None, "train"),
    "openai/gsm8k": ("gsm8k", "main", "test"),
    "HuggingFaceH4/MATH-500": ("math", None, "test"),
    "EleutherAI/hendrycks_math": ("math", None, "test"),
}
LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
# A streamed source's seeded shuffle (IterableDataset.shuffle(seed, buffer_size)): the order of its shards (files) is
# shuffled, then rows are drawn at random from a buffer of this many rows filled in that order (datasets >= 5 fills
# it from up to 10 shards at once). N rows so drawn are a random mix of about the first N + buffer rows of the first
# shards in that order, not a uniform sample of the split: a hub split is a few large files (OpenMathInstruct-2's
# 14M-row train split: 16 of ~900k rows), and rows deeper into a file are never drawn. A larger buffer mixes more, but
# reads that many more before the first one and holds them in memory (~2 KB a row for OpenMathInstruct-2); a source
# smaller than the buffer is read whole and shuffled uniformly. The logged problem_source counts show the mix drawn.
SHUFFLE_BUFFER_SIZE = 10_000
MIX_COLUMN = "problem_source"  # OpenMathInstruct-2's origin of a problem: augmented_gsm8k, augmented_math, gsm8k, math


class DataError(ValueError):
    """Bad input data; the message names the file, row and field."""


def load_tokenizer(model_name_or_path: str, revision: str | None = None):
    """The model's tokenizer (left padding, for generation) with Huginn's chat template (HUGINN_CHAT_TEMPLATE),
    whatever template the checkpoint ships: SFT, GRPO and evaluation render alike, with the `{% generation %}`
    markers the assistant-only loss needs. Raises ValueError when a special token the template writes is missing."""
    tokenizer = AutoTokenizer.from_pretrained(tiny.resolve_model_path(model_name_or_path), revision=revision,
                                              padding_side="left")
    missing = [token for token in SPECIAL_TOKENS if token not in tokenizer.get_vocab()]
    if missing:
        raise ValueError(f"{model_name_or_path}: the tokenizer lacks Huginn's special tokens {missing}")
    if tokenizer.chat_template != HUGINN_CHAT_TEMPLATE:
        logger.info(f"{model_name_or_path}: using Huginn's chat template instead of the tokenizer's own")
        tokenizer.chat_template = HUGINN_CHAT_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = PAD
    return tokenizer


def detect_schema(columns: list[str], source: str) -> str:
    for name, (problem, solution, answer) in SCHEMAS.items():
        if {problem, solution} <= set(columns) and (answer is None or answer in columns):
            return name
    expected = "; ".join(f"{name}: {sorted(f for f in fields if f)}" for name, fields in SCHEMAS.items())
    raise DataError(f"{source}: columns {sorted(columns)} match no known schema (expected {expected})")


def check_jsonl(path: str) -> None:
    """DataError naming the row and line of the first line that is not JSON (datasets' own error does not)."""
    with open(path, encoding="utf-8") as f:
        for index, line in enumerate(f):
            if not line.strip():
                continue
            try:
                json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}: row {index} (line {index + 1}): not valid JSON: {error}") from None


def is_local_file(source: str) -> bool:
    """Whether a source (tiny:<name> resolved) names a local file, by its suffix, rather than a hub dataset."""
    return Path(source).suffix.lower() in LOCAL_FORMATS


def load_source(source: str, split: str | None = None,
                streaming: bool = False) -> tuple[Dataset | IterableDataset, str]:
    """A local file or a hub dataset id, and its schema name. Local files must exist and parse."""
    suffix = Path(source).suffix.lower()
    if is_local_file(source):
        if not Path(source).is_file():
            raise DataError(f"{source}: no such file")
        if suffix == ".jsonl":
            check_jsonl(source)
        try:
            dataset = load_dataset(LOCAL_FORMATS[suffix], data_files=source, split="train", streaming=streaming)
            columns = dataset.column_names if not streaming else list(next(iter(dataset)).keys())
        except Exception as error:  # datasets raises many types for unparsable files; report them uniformly
            raise DataError(f"{source}: cannot be read as {LOCAL_FORMATS[suffix]}: {error}") from error
        return dataset, detect_schema(columns, source)
    if source not in HUB_DATASETS:
        raise DataError(f"{source}: not a local .jsonl/.json/.parquet file nor a known dataset {sorted(HUB_DATASETS)}")
    schema, config_name, default_split = HUB_DATASETS[source]
    if source == "EleutherAI/hendrycks_math":
        return load_hendrycks_math(split or default_split, streaming), schema
    return load_dataset(source, config_name, split=split or default_split, streaming=streaming), schema


def normalise_row(row: dict, schema: str, source: str, index: int) -> dict:
    """{"problem", "solution", "answer"} of one row; DataError naming the source, row and field if one is missing
    or empty. The answer of a GSM8K row is taken from its solution (after '####')."""
    problem_key, solution_key, answer_key = SCHEMAS[schema]
    for key in (problem_key, solution_key, answer_key):
        if key is not None and (not isinstance(row.get(key), str) or not row[key].strip()):
            raise DataError(f"{source}: row {index}: field {key!r} is missing or empty")
    solution = row[solution_key]
    if answer_key is not None:
        answer = row[answer_key]
    elif "####" in solution:
        answer = solution.rsplit("####", 1)[1].strip().replace(",", "")
    else:
        raise DataError(f"{source}: row {index}: field {solution_key!r} has no '#### <answer>' line")
    return {"problem": row[problem_key].strip(), "solution": solution.strip(), "answer": answer.strip()}


def prompt_messages(problem: str, system_prompt: str | None = SYSTEM_PROMPT) -> list[dict]:
    """The chat that asks the model one problem (zero-shot)."""
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return system + [{"role": "user", "content": f"{problem}\n\n{ANSWER_INSTRUCTION}"}]


def boxed_solution(solution: str, answer: str) -> str:
    """The assistant turn SFT trains on: the solution, ending with the answer boxed exactly once. GSM8K's
    calculator annotations and '#### N' line become a plain final sentence."""
    if "\\boxed" in solution:
        return solution
    body = re.sub(r"<<[^>]*>>", "", solution.rsplit("####", 1)[0]).strip()
    return f"{body}\nThe final answer is \\boxed{{{answer}}}."


# ---------------------------------------------------------------------------------------------------------------
# SFT examples (train_sft.py): read, screen, render, tokenize, count
# ---------------------------------------------------------------------------------------------------------------

TINY_SOURCE_PREFIX = "tiny:"  # "tiny:gsm8k_train": that file of tiny.TINY_DATASETS, written to the cache on first use
SFT_SPLITS = {"openai/gsm8k": "train", "EleutherAI/hendrycks_math": "train"}  # hub sets whose default split is test
MATH_SUBJECTS = ("algebra", "counting_and_probability", "geometry", "intermediate_algebra", "number_theory",
                 "prealgebra", "precalculus")
CODE_MARKER = "<llm-code>"  # OpenMathInstruct-1 solutions that run Python and paste its output
OVERLONG_MODES = ("drop", "truncate")


def tiny_data_dir() -> Path:
    """tiny.py's generated datasets in the tiny cache, written whole on first use (a temp dir renamed into place, so
    concurrent processes never read a half-written file)."""
    path = tiny.CACHE_DIR / "tiny-data"
    if not path.is_dir():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp_dir = Path(tempfile.mkdtemp(dir=path.parent, prefix=".tiny-data."))
        tiny.write_tiny_datasets(tmp_dir)
        try:
            tmp_dir.rename(path)
        except OSError:  # another process renamed its identical copy first
            shutil.rmtree(tmp_dir)
    return path


def resolve_source(source: str) -> str:
    """`tiny:<name>` maps to the generated tiny file `<name>.jsonl`; any other source is unchanged."""
    if not source.startswith(TINY_SOURCE_PREFIX):
        return source
    name = source.removeprefix(TINY_SOURCE_PREFIX) + ".jsonl"
    if name not in tiny.TINY_DATASETS:
        known = sorted(TINY_SOURCE_PREFIX + Path(file).stem for file in tiny.TINY_DATASETS)
        raise DataError(f"{source}: no such tiny dataset (known: {known})")
    return str(tiny_data_dir() / name)


def load_hendrycks_math(split: str, streaming: bool = False) -> Dataset | IterableDataset:
    """EleutherAI/hendrycks_math, all subjects, in the "math" schema. It has one config per subject and no "answer"
    column: the answer is the solution's last \\boxed{} (empty when there is none, so the row counts as malformed)."""
    subjects = [load_dataset("EleutherAI/hendrycks_math", subject, split=split, streaming=streaming)
                for subject in MATH_SUBJECTS]
    return concatenate_datasets(subjects).map(lambda row: {"answer": rewards.gold_answer(row) or ""})


def shuffled_stream(source: str, split: str | None, seed: int) -> tuple[IterableDataset, str]:
    """One source (hub id, local file or tiny:<name>) streamed in a seeded shuffled order, and its schema: rows are
    read as they are pulled, so a hub split is never downloaded whole. What the order is: SHUFFLE_BUFFER_SIZE."""
    dataset, schema = load_source(resolve_source(source), split, streaming=True)
    return dataset.shuffle(seed=seed, buffer_size=SHUFFLE_BUFFER_SIZE), schema


def read_sft_source(source: str, split: str | None, streaming: bool, max_samples: int | None,
                    seed: int = 0) -> tuple[Dataset, str]:
    """`max_samples` rows (all when None) of one source, in memory or the datasets cache, and its schema. Streaming:
    a seeded shuffled subset (shuffled_stream), of which only those rows and the shuffle buffer are read
    (OpenMathInstruct-2's 14M rows never touch the disk). Otherwise the source is read whole and its first
    `max_samples` rows are kept in file order, as the tiny default's local files have always been read (the trainer
    shuffles the order it trains in; stream a large source for a shuffled subset)."""
    split = split or SFT_SPLITS.get(source)
    if streaming:
        if max_samples is None:
            raise DataError(f"{source}: streaming reads max_samples rows; set max_samples")
        dataset, schema = shuffled_stream(source, split, seed)
        return Dataset.from_list(list(dataset.take(max_samples))), schema
    dataset, schema = load_source(resolve_source(source), split)
    if max_samples is not None and max_samples < len(dataset):
        dataset = dataset.select(range(max_samples))
    return dataset, schema


def screen_row(row: dict, index: int, schema: str, source: str, keep_code: bool) -> dict:
    """The normalised fields of one row and why it is skipped: "" (kept), "incorrect" (OpenMathInstruct-1's
    is_correct is false), "code" (a solution running Python, unless keep_code) or "malformed: <DataError>"."""
    try:
        fields = normalise_row(row, schema, source, index)
    except DataError as error:
        return {"problem": "", "solution": "", "answer": "", "skip": f"malformed: {error}"}
    if row.get("is_correct") is False:
        return {**fields, "skip": "incorrect"}
    if not keep_code and CODE_MARKER in fields["solution"]:
        return {**fields, "skip": "code"}
    return {**fields, "skip": ""}


def sft_messages(row: dict, system_prompt: str | None = SYSTEM_PROMPT) -> list[dict]:
    """The chat SFT trains on: the zero-shot prompt evaluate.py asks, answered by the solution ending in \\boxed{}."""
    solution = boxed_solution(row["solution"], row["answer"])
    return prompt_messages(row["problem"], system_prompt) + [{"role": "assistant", "content": solution}]


def tokenize_sft_row(row: dict, tokenizer, system_prompt: str | None = SYSTEM_PROMPT) -> dict:
    """input_ids of the rendered chat; labels equal them on the assistant's tokens (its end-of-turn included, so the
    model learns to stop) and are -100 elsewhere, the closing <|end_text|> included: the model stops at
    <|end_turn|> and never has to predict what follows it. The chat template marks the assistant turn with
    `{% generation %}`."""
    encoded = tokenizer.apply_chat_template(sft_messages(row, system_prompt), tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
    pairs = zip(encoded["input_ids"], encoded["assistant_masks"], strict=True)
    labels = [token if in_answer else -100 for token, in_answer in pairs]
    return {"input_ids": encoded["input_ids"], "labels": labels}


def fit_length(dataset: Dataset, max_length: int, overlong: str, num_proc: int | None) -> Dataset:
    """Rows longer than max_length tokens dropped, or truncated (then dropped only if no answer token is left)."""
    if overlong == "drop":
        return dataset.filter(lambda ids: len(ids) <= max_length, input_columns="input_ids", num_proc=num_proc)
    truncated = dataset.map(lambda row: {key: row[key][:max_length] for key in ("input_ids", "labels")},
                            num_proc=num_proc)
    return truncated.filter(lambda labels: any(label != -100 for label in labels), input_columns="labels",
                            num_proc=num_proc)


def build_sft_source(source: str, tokenizer, max_length: int, *, split: str | None = None, streaming: bool = False,
                     max_samples: int | None = None, keep_code: bool = False, overlong: str = "drop",
                     max_bad_fraction: float = 0.01, system_prompt: str | None = SYSTEM_PROMPT,
                     num_proc: int | None = None, seed: int = 0) -> tuple[Dataset, Counter]:
    """Tokenized SFT examples {"input_ids", "labels"} of one source and their counts: read, kept, malformed,
    incorrect, code, overlong (longer than max_length), overlong_dropped and, for a source with a problem_source
    column (OpenMathInstruct-2), the kept examples' "problem_source=<value>". Raises DataError, quoting the first bad
    rows (file, row, field), when more than `max_bad_fraction` of the rows read are malformed. `seed`: of the
    streamed subset (read_sft_source)."""
    if overlong not in OVERLONG_MODES:
        raise ValueError(f"overlong must be one of {OVERLONG_MODES}, got {overlong!r}")
    dataset, schema = read_sft_source(source, split, streaming, max_samples, seed)
    screened = dataset.map(screen_row, with_indices=True, remove_columns=all_but_mix(dataset), num_proc=num_proc,
                           fn_kwargs={"schema": schema, "source": source, "keep_code": keep_code})
    skips = screened["skip"]
    counts = Counter(read=len(skips), **Counter(skip.split(":")[0] for skip in skips if skip))
    malformed = [skip.removeprefix("malformed: ") for skip in skips if skip.startswith("malformed")]
    if malformed and len(malformed) > max_bad_fraction * len(skips):
        raise DataError(f"{source}: {len(malformed)} of {len(skips)} rows are malformed, more than max_bad_fraction="
                        f"{max_bad_fraction}; first: " + " | ".join(malformed[:3]))
    kept = screened.filter(lambda skip: not skip, input_columns="skip", num_proc=num_proc)
    tokenized = kept.map(tokenize_sft_row, fn_kwargs={"tokenizer": tokenizer, "system_prompt": system_prompt},
                         remove_columns=all_but_mix(kept), num_proc=num_proc)
    fitted = fit_length(tokenized, max_length, overlong, num_proc)
    counts["overlong"] = len(tokenized.filter(lambda ids: len(ids) > max_length, input_columns="input_ids",
                                              num_proc=num_proc))
    counts["overlong_dropped"] = len(tokenized) - len(fitted)
    counts["kept"] = len(fitted)
    if malformed:
        logger.warning(f"{source}: skipped {len(malformed)} malformed rows; first: {malformed[0]}")
    if MIX_COLUMN not in fitted.column_names:
        return fitted, counts
    counts.update(mix_counts(fitted[MIX_COLUMN]))
    return fitted.remove_columns(MIX_COLUMN), counts


def all_but_mix(dataset: Dataset) -> list[str]:
    """The columns a map drops: all but MIX_COLUMN, carried along to count the mix of the examples kept."""
    return [column for column in dataset.column_names if column != MIX_COLUMN]


def mix_counts(values: list) -> Counter:
    """{"problem_source=<value>": rows}, in the values' sorted order (the log's)."""
    return Counter(sorted(f"{MIX_COLUMN}={value}" for value in values))


def build_sft_dataset(sources: list[str], tokenizer, max_length: int, **options) -> tuple[Dataset, dict[str, Counter]]:
    """All sources' examples concatenated (the trainer shuffles them) and each source's counts (build_sft_source)."""
    built = {source: build_sft_source(source, tokenizer, max_length, **options) for source in sources}
    for source, (_, counts) in built.items():
        logger.info(f"SFT data {source}: " + ", ".join(f"{key} {value}" for key, value in counts.items()))
    dataset = concatenate_datasets([examples for examples, _ in built.values()])
    if len(dataset) == 0:
        raise DataError(f"{sources}: no usable SFT example (see the counts above)")
    return dataset, {source: counts for source, (_, counts) in built.items()}


def stop_token_ids(generation_config, tokenizer) -> list[int]:
    """The ids generation stops on: the generation config's eos ids plus <|end_text|> and <|end_turn|>. A chat turn
    ends at <|end_turn|> whatever a checkpoint's generation config lists (the published one lists only
    <|end_text|>; the authors' own decode loop stops on both)."""
    eos = generation_config.eos_token_id
    listed = eos if isinstance(eos, list) else [eos]
    ends = tokenizer.convert_tokens_to_ids(["<|end_text|>", "<|end_turn|>"])
    return sorted({*listed, *ends} - {None, tokenizer.unk_token_id})


# lm-eval-harness's gsm8k_cot prompt (the paper's GSM8K scores): the chain-of-thought exemplars of Wei et al. (2022,
# arXiv 2201.11903), taken first-n, each asked as "Q: {question}\nA:".
GSM8K_COT_EXEMPLARS = (
    ("There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are done, there "
     "will be 21 trees. How many trees did the grove workers plant today?",
     "There are 15 trees originally. Then there were 21 trees after some more were planted. So there must have been "
     "21 - 15 = 6. The answer is 6."),
    ("If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?",
     "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. The answer is 5."),
    ("Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in total?",
     "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. After eating 35, they "
     "had 74 - 35 = 39. The answer is 39."),
    ("Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many lollipops did Jason "
     "give to Denny?",
     "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny 20 - 12 = 8. The "
     "answer is 8."),
    ("Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys does he have now?",
     "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more toys. 5 + 4 = 9. The "
     "answer is 9."),
    ("There were nine computers in the server room. Five more computers were installed each day, from monday to "
     "thursday. How many computers are now in the server room?",
     "There were originally 9 computers. For each of 4 days, 5 more computers were added. So 5 * 4 = 20 computers "
     "were added. 9 + 20 is 29. The answer is 29."),
    ("Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. How many golf balls "
     "did he have at the end of wednesday?",
     "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. After losing 2 more, he "
     "had 35 - 2 = 33 golf balls. The answer is 33."),
    ("Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
     "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has 23 - 15 dollars "
     "left. 23 - 15 is 8. The answer is 8."),
)


def gsm8k_cot_messages(problem: str, system_prompt: str | None, num_fewshot: int) -> list[dict]:
    """lm-eval's gsm8k_cot chat: the first `num_fewshot` exemplars as earlier turns, then the problem."""
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    shots = []
    for question, answer in GSM8K_COT_EXEMPLARS[:num_fewshot]:
        shots += [{"role": "user", "content": f"Q: {question}\nA:"}, {"role": "assistant", "content": answer}]
    return system + shots + [{"role": "user", "content": f"Q: {problem}\nA:"}]


# lm-eval-harness's minerva_math prompt (the paper's MATH scores): the 4 fixed exemplars of Lewkowycz et al.
# (2022, arXiv 2206.14858), each asked as "Problem:\n{problem}\n\nSolution:" and answered with a solution ending
# "Final Answer: The final answer is X. I hope it is correct." (rewards.minerva_answer reads it). Kept as lm-eval
# has them, the stray "}" after the first problem included.
MINERVA_MATH_EXEMPLARS = (
    ("Find the domain of the expression  $\\frac{\\sqrt{x-2}}{\\sqrt{5-x}}$.}",
     "The expressions inside each square root must be non-negative. Therefore, $x-2 \\ge 0$, so $x\\ge2$, and "
     "$5 - x \\ge 0$, so $x \\le 5$. Also, the denominator cannot be equal to zero, so $5-x>0$, which gives $x<5$. "
     "Therefore, the domain of the expression is $\\boxed{[2,5)}$.\nFinal Answer: The final answer is $[2,5)$. I "
     "hope it is correct."),
    ("If $\\det \\mathbf{A} = 2$ and $\\det \\mathbf{B} = 12,$ then find $\\det (\\mathbf{A} \\mathbf{B}).$",
     "We have that $\\det (\\mathbf{A} \\mathbf{B}) = (\\det \\mathbf{A})(\\det \\mathbf{B}) = (2)(12) = "
     "\\boxed{24}.$\nFinal Answer: The final answer is $24$. I hope it is correct."),
    ("Terrell usually lifts two 20-pound weights 12 times. If he uses two 15-pound weights instead, how many times "
     "must Terrell lift them in order to lift the same total weight?",
     "If Terrell lifts two 20-pound weights 12 times, he lifts a total of $2\\cdot 12\\cdot20=480$ pounds of weight.  "
     "If he lifts two 15-pound weights instead for $n$ times, he will lift a total of $2\\cdot15\\cdot n=30n$ pounds "
     "of weight.  Equating this to 480 pounds, we can solve for $n$:\n\\begin{align*}\n30n&=480\\\\\n"
     "\\Rightarrow\\qquad n&=480/30=\\boxed{16}\n\\end{align*}\nFinal Answer: The final answer is $16$. I hope it is "
     "correct."),
    ("If the system of equations\n\n\\begin{align*}\n6x-4y&=a,\\\\\n6y-9x &=b.\n\\end{align*}has a solution $(x, y)$ "
     "where $x$ and $y$ are both nonzero,\nfind $\\frac{a}{b},$ assuming $b$ is nonzero.",
     "If we multiply the first equation by $-\\frac{3}{2}$, we obtain\n\n$$6y-9x=-\\frac{3}{2}a.$$Since we also know "
     "that $6y-9x=b$, we have\n\n$$-\\frac{3}{2}a=b\\Rightarrow\\frac{a}{b}=\\boxed{-\\frac{2}{3}}.$$\nFinal Answer: "
     "The final answer is $-\\frac{2}{3}$. I hope it is correct."),
)


def minerva_math_messages(problem: str, system_prompt: str | None, num_fewshot: int) -> list[dict]:
    """lm-eval's minerva_math chat: the first `num_fewshot` exemplars as earlier turns, then the problem."""
    turns = [turn for question, solution in MINERVA_MATH_EXEMPLARS[:num_fewshot]
             for turn in ({"role": "user", "content": minerva_question(question)},
                          {"role": "assistant", "content": solution})]
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return system + turns + [{"role": "user", "content": minerva_question(problem)}]


def minerva_question(problem: str) -> str:
    return f"Problem:\n{problem}\n\nSolution:"
