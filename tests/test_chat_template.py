"""Huginn's chat template (HUGINN_CHAT_TEMPLATE): rendered strings against the authors' format written out by
hand, the assistant-only loss mask, and that every tokenizer the stages load gets the template."""

import pytest
from tokenizers import Tokenizer, models
from transformers import AutoTokenizer, PreTrainedTokenizerFast

import data
import tiny
from modeling_huginn_qlora import HUGINN_CHAT_TEMPLATE, SPECIAL_TOKENS

SYSTEM = {"role": "system", "content": "  Be brief.\n"}
USER = {"role": "user", "content": "\nWhat is 2+2?  "}
ANSWER = {"role": "assistant", "content": " 2+2=4. \\boxed{4}\n\n"}
FOLLOW_UP = {"role": "user", "content": "And 3+3?"}
SECOND_ANSWER = {"role": "Huginn", "content": "\\boxed{6} "}

SYSTEM_TURN = "<|begin_header|>system<|end_header|>\n\nBe brief.<|end_turn|>"
USER_TURN = "<|begin_header|>user<|end_header|>\n\nWhat is 2+2?<|end_turn|>"
ANSWER_TURN = "<|begin_header|>Huginn<|end_header|>\n\n2+2=4. \\boxed{4}<|end_turn|>"
FOLLOW_UP_TURN = "<|begin_header|>user<|end_header|>\n\nAnd 3+3?<|end_turn|>"
SECOND_ANSWER_TURN = "<|begin_header|>Huginn<|end_header|>\n\n\\boxed{6}<|end_turn|>"
GENERATION_PROMPT = "<|begin_header|>Huginn<|end_header|>\n\n"


@pytest.fixture(scope="module")
def tokenizer():
    return tiny.build_tiny_tokenizer()


def render(tokenizer, messages, add_generation_prompt):
    return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)


@pytest.mark.parametrize("messages, add_generation_prompt, expected", [
    ([SYSTEM, USER], True, "<|begin_text|>" + SYSTEM_TURN + USER_TURN + GENERATION_PROMPT),
    ([USER], True, "<|begin_text|>" + USER_TURN + GENERATION_PROMPT),
    ([SYSTEM, USER, ANSWER], False, "<|begin_text|>" + SYSTEM_TURN + USER_TURN + ANSWER_TURN + "<|end_text|>"),
    ([USER, ANSWER], False, "<|begin_text|>" + USER_TURN + ANSWER_TURN + "<|end_text|>"),
    ([USER], False, "<|begin_text|>" + USER_TURN + "<|end_text|>"),
    ([SYSTEM, USER, ANSWER, FOLLOW_UP, SECOND_ANSWER], False,
     "<|begin_text|>" + SYSTEM_TURN + USER_TURN + ANSWER_TURN + FOLLOW_UP_TURN + SECOND_ANSWER_TURN + "<|end_text|>"),
    ([USER, ANSWER, FOLLOW_UP], True,
     "<|begin_text|>" + USER_TURN + ANSWER_TURN + FOLLOW_UP_TURN + GENERATION_PROMPT),
], ids=["system-prompt", "no-system-prompt", "system-answered", "answered", "no-generation-prompt",
        "multi-turn-answered", "multi-turn-prompt"])
def test_renders_the_authors_format(tokenizer, messages, add_generation_prompt, expected):
    assert render(tokenizer, messages, add_generation_prompt) == expected


def test_assistant_mask_covers_exactly_each_answer_and_its_end_of_turn(tokenizer):
    encoded = tokenizer.apply_chat_template([SYSTEM, USER, ANSWER, FOLLOW_UP, SECOND_ANSWER], tokenize=True,
                                            return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = encoded["input_ids"], encoded["assistant_masks"]
    spans, start = [], None  # maximal runs of masked tokens
    for index, in_answer in enumerate([*mask, 0]):
        if in_answer and start is None:
            start = index
        elif not in_answer and start is not None:
            spans.append(tokenizer.decode(ids[start:index]))
            start = None
    assert spans == ["2+2=4. \\boxed{4}<|end_turn|>", "\\boxed{6}<|end_turn|>"]
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert ids[-1] == tokenizer.eos_token_id and mask[-1] == 0  # <|end_text|> closes the chat, outside the answer


def test_sft_example_supervises_the_answer_not_the_closing_end_text(tokenizer):
    row = {"problem": "What is 2+3?", "solution": "2+3=5. \\boxed{5}", "answer": "5"}
    example = data.tokenize_sft_row(row, tokenizer)
    prompt = tokenizer.apply_chat_template(data.prompt_messages(row["problem"]), add_generation_prompt=True,
                                           tokenize=True, return_dict=True)["input_ids"]
    assert example["input_ids"][:len(prompt)] == prompt
    supervised = [index for index, label in enumerate(example["labels"]) if label != -100]
    assert supervised == list(range(len(prompt), len(example["input_ids"]) - 1))
    assert tokenizer.decode([example["labels"][i] for i in supervised]) == "2+3=5. \\boxed{5}<|end_turn|>"
    assert example["input_ids"][-1] == tokenizer.eos_token_id


def test_padded_tokenizer_has_the_published_special_ids_and_encodes_text_alike(tokenizer):
    padded = tiny.build_tiny_tokenizer(first_special_id=65504)
    assert padded.convert_tokens_to_ids(SPECIAL_TOKENS) == list(range(65504, 65510))
    assert (padded.bos_token_id, padded.eos_token_id, padded.pad_token_id) == (65504, 65505, 65509)
    text = "What is 3+4? <filler_300> \\boxed{7}"  # a filler's spelling encodes as bytes, never as the filler
    assert padded(text).input_ids == tokenizer(text).input_ids
    assert padded.decode(padded.apply_chat_template([USER, ANSWER], tokenize=True)) == render(
        tokenizer, [USER, ANSWER], False)


def test_every_loaded_tokenizer_gets_the_template(tmp_path):
    built = tiny.build_tiny_default(tmp_path / "tiny")
    assert AutoTokenizer.from_pretrained(built).chat_template == HUGINN_CHAT_TEMPLATE
    other = tiny.build_tiny_tokenizer(first_special_id=65504)
    # a checkpoint's own template, with generation markers: replaced all the same, so every stage renders alike
    other.chat_template = "{% for m in messages %}{% generation %}{{ m['content'] }}{% endgeneration %}{% endfor %}"
    other.save_pretrained(tmp_path / "other")
    loaded = data.load_tokenizer(str(tmp_path / "other"))
    assert loaded.chat_template == HUGINN_CHAT_TEMPLATE and loaded.padding_side == "left"


def test_tokenizer_without_huginn_special_tokens_is_refused(tmp_path):
    plain = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(vocab={"a": 0, "b": 1}, merges=[])),
                                    pad_token="a")
    plain.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="special tokens"):
        data.load_tokenizer(str(tmp_path))
