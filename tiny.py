"""The embedded tiny default: a small Huginn-architecture model with a local tokenizer, and tiny math datasets in
the real datasets' schemas, so every script runs offline through the same code paths as huginn-0125.

    python tiny.py --output_dir outputs/tiny-huginn            # model + tokenizer directory
    python tiny.py --output_dir outputs/tiny-data --data_only   # sft/rl/eval JSONL files

Scripts accept `--model_name_or_path tiny-huginn`: `resolve_model_path` builds it on first use.
"""

import argparse
import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import GenerationConfig, PreTrainedTokenizerFast

from modeling_huginn_qlora import (
    BOS,
    END_TURN,
    EOS,
    HUGINN_CHAT_TEMPLATE,
    PAD,
    SPECIAL_TOKENS,
    HuginnConfig,
    HuginnForCausalLM,
)

TINY_MODEL_NAME = "tiny-huginn"
CACHE_DIR = Path(os.environ.get("TINYMATH_CACHE", Path.home() / ".cache" / "tinymath-huginn"))

def _byte_alphabet() -> list[str]:
    """The printable stand-in character of each byte 0..255 (GPT-2's byte-level mapping)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


# Words of the prompts and answers (data.py's instruction and system prompt, the tiny problems, \\boxed) that get a
# token each, as in a trained BPE vocabulary: the chat prompt of a tiny problem is 38 tokens instead of 104 bytes,
# so the tiny SFT, GRPO and evaluation stages run several times faster. Digits are never merged.
WORDS = ["What", " is", "Solve", " the", " problem", " step", " by", " and", " put", " final", " answer", " in",
         " \\boxed{", "\\boxed{", "You", " are", " a", " helpful", " assistant", " that", " can", " assist", " users",
         " with", " mathematical", " reasoning", "Huginn", "user", "system"]


def word_merges(words: list[str], alphabet: list[str]) -> list[tuple[str, str]]:
    """BPE merges that build each word left to right (prefix + next byte), in its byte-level spelling."""
    merges = []
    for word in words:
        spelled = [alphabet[byte] for byte in word.encode()]
        for end in range(2, len(spelled) + 1):
            merge = ("".join(spelled[:end - 1]), spelled[end - 1])
            if merge not in merges:
                merges.append(merge)
    return merges


def build_tiny_tokenizer(first_special_id: int | None = None) -> PreTrainedTokenizerFast:
    """Byte-level tokenizer (any text encodes; digits stay separate) with merges for WORDS, plus Huginn's special
    tokens and chat template. Deterministic: no training. `first_special_id` (65504 for huginn-0125's ids) pads the
    vocabulary with unreachable filler entries so the special tokens get the real model's ids."""
    alphabet = _byte_alphabet()
    merges = word_merges(WORDS, alphabet)
    vocab = {char: idx for idx, char in enumerate(alphabet)}
    vocab.update({left + right: len(alphabet) + idx for idx, (left, right) in enumerate(merges)})
    if first_special_id is not None:  # no merge builds "<filler_N>", so these ids never appear in an encoding
        vocab.update({f"<filler_{idx}>": idx for idx in range(len(vocab), first_special_id)})
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        chat_template=HUGINN_CHAT_TEMPLATE, padding_side="left", model_max_length=1024,
    )


def tiny_config(tokenizer: PreTrainedTokenizerFast) -> HuginnConfig:
    """huginn-0125's architecture (2 prelude, 4 core, 2 coda sandwich blocks) at width 128: ~1.4M parameters.
    Widths are multiples of 64 so bitsandbytes' CPU NF4 path can quantize every Linear."""
    return HuginnConfig(
        vocab_size=len(tokenizer), padding_multiple=64, block_size=1024, n_embd=128, num_attention_heads=4,
        intermediate_size=256, mean_recurrence=8, mean_backprop_depth=4,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )


def build_tiny_default(output_dir: str | Path, seed: int = 0) -> Path:
    """Write a randomly initialised tiny model, its tokenizer and generation config as a normal HF directory."""
    output_dir = Path(output_dir)
    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(seed)
    model = HuginnForCausalLM(tiny_config(tokenizer))
    model.generation_config = GenerationConfig(
        eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(END_TURN)],
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, max_new_tokens=64,
    )
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(dir=output_dir.parent, prefix=f".{output_dir.name}."))
    model.save_pretrained(tmp_dir)
    tokenizer.save_pretrained(tmp_dir)
    shutil.rmtree(output_dir, ignore_errors=True)
    tmp_dir.rename(output_dir)  # a half-written directory is never taken for the model
    return output_dir


def resolve_model_path(name_or_path: str) -> str:
    """The tiny default's name maps to its cached directory (built on first use); anything else is unchanged."""
    if name_or_path != TINY_MODEL_NAME or Path(name_or_path).is_dir():
        return name_or_path
    path = CACHE_DIR / TINY_MODEL_NAME
    if not (path / "config.json").exists():
        build_tiny_default(path)
    return str(path)


# ---------------------------------------------------------------------------------------------------------------
# Tiny math datasets: sums of 2-4 single-digit numbers, a task a ~1M-parameter model learns on CPU in minutes and
# where more recurrent steps visibly help. The expression has no spaces ("3+4+5": one token per character, so
# short sequences). Solutions restate it and give the total at once ("3+4+5=12. \\boxed{12}"): the sum is computed in
# the latent recurrence at the "=" token, with no written steps. Rows use the real datasets' schemas.
# ---------------------------------------------------------------------------------------------------------------


def sum_problem(rng: random.Random) -> tuple[str, str, int]:
    """(problem, expression, total), e.g. ("What is 3+4+5?", "3+4+5", 12)."""
    terms = [rng.randint(1, 9) for _ in range(rng.randint(2, 4))]
    expression = "+".join(map(str, terms))
    return f"What is {expression}?", expression, sum(terms)


def tiny_openmathinstruct2(num_rows: int, seed: int) -> list[dict]:
    rows = []
    rng = random.Random(seed)
    for _ in range(num_rows):
        problem, expression, total = sum_problem(rng)
        rows.append({"problem": problem, "generated_solution": f"{expression}={total}. \\boxed{{{total}}}",
                     "expected_answer": str(total), "problem_source": "tiny_sums"})
    return rows


def tiny_gsm8k(num_rows: int, seed: int) -> list[dict]:
    rows = []
    rng = random.Random(seed)
    for _ in range(num_rows):
        problem, expression, total = sum_problem(rng)
        rows.append({"question": problem, "answer": f"{expression} = <<{expression}={total}>>{total}\n#### {total}"})
    return rows


def tiny_math(num_rows: int, seed: int) -> list[dict]:
    rows = []
    rng = random.Random(seed)
    for idx in range(num_rows):
        problem, expression, total = sum_problem(rng)
        rows.append({"problem": problem, "solution": f"${expression} = \\boxed{{{total}}}$", "answer": str(total),
                     "subject": "Prealgebra", "level": 1, "unique_id": f"tiny/sums/{idx}.json"})
    return rows


TINY_DATASETS = {  # file name -> (builder, rows, seed); distinct seeds keep train and test problems apart
    "openmathinstruct2_train.jsonl": (tiny_openmathinstruct2, 2000, 1),
    "gsm8k_train.jsonl": (tiny_gsm8k, 500, 2),
    "gsm8k_test.jsonl": (tiny_gsm8k, 64, 3),
    "math_test.jsonl": (tiny_math, 64, 4),
}


def write_tiny_datasets(output_dir: str | Path) -> Path:
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    for name, (builder, num_rows, seed) in TINY_DATASETS.items():
        with open(output_dir / name, "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in builder(num_rows, seed))
    return output_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data_only", action="store_true", help="write the tiny datasets instead of the model")
    args = parser.parse_args()
    path = write_tiny_datasets(args.output_dir) if args.data_only else build_tiny_default(args.output_dir, args.seed)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
