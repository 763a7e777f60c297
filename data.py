"""Datasets and prompts shared by train_sft.py, train_grpo.py and evaluate.py.

Every source (hub dataset or local JSONL/JSON/parquet file in the same schema) is normalised to rows
{"problem", "solution", "answer"} and rendered in Huginn's chat format with the authors' math system prompt, the
assistant turn ending with the answer in \\boxed{} (what rewards.py grades).
"""

import re
from pathlib import Path

from datasets import Dataset, IterableDataset, load_dataset

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


def detect_schema(columns: list[str], source: str) -> str:
    for name, (problem, solution, answer) in SCHEMAS.items():
        if {problem, solution} <= set(columns) and (answer is None or answer in columns):
            return name
    expected = "; ".join(f"{name}: {sorted(f for f in fields if f)}" for name, fields in SCHEMAS.items())
    raise DataError(f"{source}: columns {sorted(columns)} match no known schema (expected {expected})")


def load_source(source: str, split: str | None = None, streaming: bool = False) -> tuple[Dataset | IterableDataset, str]:
    """A local file or a hub dataset id, and its schema name. Local files must exist and parse."""
    suffix = Path(source).suffix.lower()
    if suffix in LOCAL_FORMATS:
        if not Path(source).is_file():
            raise DataError(f"{source}: no such file")
        try:
            dataset = load_dataset(LOCAL_FORMATS[suffix], data_files=source, split="train", streaming=streaming)
            columns = dataset.column_names if not streaming else list(next(iter(dataset)).keys())
        except DataError:
            raise
        except Exception as error:  # datasets raises many types for unparsable files; report them uniformly
            raise DataError(f"{source}: cannot be read as {LOCAL_FORMATS[suffix]}: {error}") from error
        return dataset, detect_schema(columns, source)
    if source not in HUB_DATASETS:
        raise DataError(f"{source}: not a local .jsonl/.json/.parquet file nor a known dataset {sorted(HUB_DATASETS)}")
    schema, config_name, default_split = HUB_DATASETS[source]
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
