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


def load_source(source: str, split: str | None = None, streaming: bool = False) -> tuple[Dataset | IterableDataset, str]:
    """A local file or a hub dataset id, and its schema name. Local files must exist and parse."""
    suffix = Path(source).suffix.lower()
    if suffix in LOCAL_FORMATS:
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
        return load_hendrycks_math(split or default_split), schema
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


def load_hendrycks_math(split: str) -> Dataset:
    """EleutherAI/hendrycks_math, all subjects, in the "math" schema. It has one config per subject and no "answer"
    column: the answer is the solution's last \\boxed{} (empty when there is none, so the row counts as malformed)."""
    subjects = [load_dataset("EleutherAI/hendrycks_math", subject, split=split) for subject in MATH_SUBJECTS]
    return concatenate_datasets(subjects).map(lambda row: {"answer": rewards.gold_answer(row) or ""})


def read_sft_source(source: str, split: str | None, streaming: bool, max_samples: int | None) -> tuple[Dataset, str]:
    """The first `max_samples` rows (all when None) of one source, in memory or the datasets cache, and its schema.
    Streaming reads only those rows from the hub (OpenMathInstruct-2's 14M rows never touch the disk)."""
    dataset, schema = load_source(resolve_source(source), split or SFT_SPLITS.get(source), streaming)
    if streaming:
        if max_samples is None:
            raise DataError(f"{source}: streaming reads max_samples rows; set max_samples")
        return Dataset.from_list(list(dataset.take(max_samples))), schema
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
    labels = [token if in_answer else -100 for token, in_answer in zip(encoded["input_ids"], encoded["assistant_masks"])]
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
                     num_proc: int | None = None) -> tuple[Dataset, Counter]:
    """Tokenized SFT examples {"input_ids", "labels"} of one source and their counts: read, kept, malformed,
    incorrect, code, overlong (longer than max_length) and overlong_dropped. Raises DataError, quoting the first bad
    rows (file, row, field), when more than `max_bad_fraction` of the rows read are malformed."""
    if overlong not in OVERLONG_MODES:
        raise ValueError(f"overlong must be one of {OVERLONG_MODES}, got {overlong!r}")
    dataset, schema = read_sft_source(source, split, streaming, max_samples)
    screened = dataset.map(screen_row, with_indices=True, remove_columns=dataset.column_names, num_proc=num_proc,
                           fn_kwargs={"schema": schema, "source": source, "keep_code": keep_code})
    skips = screened["skip"]
    counts = Counter(read=len(skips), **Counter(skip.split(":")[0] for skip in skips if skip))
    malformed = [skip.removeprefix("malformed: ") for skip in skips if skip.startswith("malformed")]
    if malformed and len(malformed) > max_bad_fraction * len(skips):
        raise DataError(f"{source}: {len(malformed)} of {len(skips)} rows are malformed, more than max_bad_fraction="
                        f"{max_bad_fraction}; first: " + " | ".join(malformed[:3]))
    kept = screened.filter(lambda skip: not skip, input_columns="skip", num_proc=num_proc)
    tokenized = kept.map(tokenize_sft_row, fn_kwargs={"tokenizer": tokenizer, "system_prompt": system_prompt},
                         remove_columns=kept.column_names, num_proc=num_proc)
    fitted = fit_length(tokenized, max_length, overlong, num_proc)
    counts["overlong"] = len(tokenized.filter(lambda ids: len(ids) > max_length, input_columns="input_ids",
                                              num_proc=num_proc))
    counts["overlong_dropped"] = len(tokenized) - len(fitted)
    counts["kept"] = len(fitted)
    if malformed:
        logger.warning(f"{source}: skipped {len(malformed)} malformed rows; first: {malformed[0]}")
    return fitted, counts


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
