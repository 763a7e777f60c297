"""huginn-0125 at full size: the default config is the published one, benchmarks/fullsize_smoke.py writes the
published checkpoint layout, and (marker `fullsize`, deselected by default: ~10 minutes and ~7 GB of disk) the
smoke run itself through SFT, GRPO and evaluation: `python -m pytest -q -m fullsize tests/test_fullsize.py`."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

import data
import tiny
from modeling_huginn_qlora import (
    HUGINN_CHAT_TEMPLATE,
    SPECIAL_TOKENS,
    HuginnConfig,
    HuginnForCausalLM,
    nf4_quantization_config,
)

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO.parent / "shared" / "reference"
needs_reference = pytest.mark.skipif(not REFERENCE.is_dir(), reason="../shared/reference not present")
sys.path.insert(0, str(REPO / "benchmarks"))
import fullsize_smoke  # noqa: E402


@needs_reference
def test_default_config_is_the_published_one():
    published = AutoConfig.for_model(**json.loads((REFERENCE / "huginn-0125-config.json").read_text()))
    default = HuginnConfig()
    fields = [name for name in HuginnConfig.__annotations__ if name != "init_values"] + ["init_values"]
    assert {name: getattr(default, name) for name in fields} == {name: getattr(published, name) for name in fields}


def stored_tensors(checkpoint: Path) -> dict[str, tuple[str, torch.dtype]]:
    """key -> (file, dtype) of every tensor in the checkpoint's shards."""
    found = {}
    for file in sorted(checkpoint.glob("*.safetensors")):
        with safe_open(file, "pt") as shard:
            found.update({key: (file.name, shard.get_slice(key).get_dtype()) for key in shard.keys()})
    return found


def test_smoke_checkpoint_has_the_published_layout(tmp_path):
    config = fullsize_smoke.published_config(tiny_widths=True)
    checkpoint = fullsize_smoke.write_checkpoint(tmp_path / "checkpoint", config, shard_bytes=32 * 2**20)
    stored = stored_tensors(checkpoint)
    with torch.device("meta"):
        expected_keys = set(HuginnForCausalLM(AutoConfig.for_model(**config)).state_dict())
    if REFERENCE.is_dir():  # the published names, which the meta model's keys must be
        names = json.loads((REFERENCE / "huginn-tiny-parity" / "state_dict_keys.json").read_text())["state_dict_keys"]
        assert expected_keys == set(names)
    assert set(stored) == expected_keys - {"lm_head.weight"}  # tied to transformer.wte.weight, stored once
    assert {dtype for _, dtype in stored.values()} == {"BF16"}
    index = json.loads((checkpoint / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {key: file for key, (file, _) in stored.items()}
    assert len(set(index["weight_map"].values())) > 1
    assert json.loads((checkpoint / "config.json").read_text()) == config

    model, info = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.lm_head.weight is model.transformer.wte.weight
    with safe_open(checkpoint / stored["transformer.wte.weight"][0], "pt") as shard:
        assert torch.equal(model.transformer.wte.weight, shard.get_tensor("transformer.wte.weight"))

    assert GenerationConfig.from_pretrained(checkpoint).eos_token_id == 65505  # as published: <|end_text|> only
    tokenizer = data.load_tokenizer(str(checkpoint))
    assert tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS) == list(range(65504, 65510))
    assert tokenizer.chat_template == HUGINN_CHAT_TEMPLATE  # the checkpoint ships none


@pytest.mark.parametrize("width", [96, 128])
def test_nf4_model_evaluates_then_trains_on_cpu(tmp_path, width):
    """An eval-mode forward without grad (evaluation, generation) of an NF4 model must work at widths that are not a
    multiple of the 64-weight block (96, like huginn-0125's 5280), and must not change the gradients of a later
    training step (bitsandbytes' AVX512-BF16 CPU kernel, when used, crashed at 96 and, at 128, has no backward)."""
    tokenizer = tiny.build_tiny_tokenizer()
    config = HuginnConfig(vocab_size=len(tokenizer), padding_multiple=64, n_embd=width, num_attention_heads=4,
                          intermediate_size=256, mean_recurrence=2, mean_backprop_depth=2)
    HuginnForCausalLM(config).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, device_map="cpu",
                                                 quantization_config=nf4_quantization_config(torch.bfloat16))
    ids = torch.randint(0, len(tokenizer), (2, 12), generator=torch.Generator().manual_seed(0))

    def adapter_gradient():
        model.zero_grad()
        model.train()
        model(ids, labels=ids, num_steps=2, init_state="zero").loss.backward()
        return model.transformer.adapter.weight.grad.clone()

    before = adapter_gradient()
    model.eval()
    with torch.no_grad():
        logits = model(ids, num_steps=2, init_state="zero").logits
    assert torch.isfinite(logits).all()
    assert torch.equal(adapter_gradient(), before)


def expected_weights(config: dict, lora_r: int = 16) -> tuple[int, int, int]:
    """(NF4 bytes without scales, unquantized bf16 bytes, LoRA parameters) of the config: every block Linear is NF4
    (half a byte per weight) and carries LoRA A and B; the embedding (tied head), the adapter, norms and qk biases
    stay bf16."""
    with torch.device("meta"):
        model = HuginnForCausalLM(AutoConfig.for_model(**config))
    blocks = [module for name, module in model.named_modules()
              if isinstance(module, torch.nn.Linear) and name not in ("lm_head", "transformer.adapter")]
    quantized = sum(module.weight.numel() for module in blocks)
    total = sum(parameter.numel() for parameter in model.parameters())
    lora = sum(lora_r * (module.in_features + module.out_features) for module in blocks)
    return quantized // 2, (total - quantized) * 2, lora


@pytest.mark.fullsize
@pytest.mark.parametrize("size", ["tiny", "full"])
def test_fullsize_smoke(tmp_path, size):
    command = [sys.executable, str(REPO / "benchmarks" / "fullsize_smoke.py"), "--workdir", str(tmp_path),
               "--results", str(tmp_path / "results.md")] + (["--tiny"] if size == "tiny" else [])
    try:
        subprocess.run(command, check=True, timeout=1200)
    finally:
        shutil.rmtree(tmp_path / "checkpoint", ignore_errors=True)  # 7 GB at full size
    sft, grpo, evaluation = (json.loads((tmp_path / f"{stage}.json").read_text()) for stage in ("sft", "grpo", "eval"))
    nf4, unquantized, lora = expected_weights(fullsize_smoke.published_config(tiny_widths=size == "tiny"))
    weights = sft["bytes_after"]
    assert nf4 <= weights["nf4"] <= 1.06 * nf4  # packed 4-bit plus double-quantized scales (~3%)
    assert weights["unquantized bfloat16"] == unquantized
    (lora_kind,) = [kind for kind in weights if kind.startswith("lora")]
    assert weights[lora_kind] == lora * {"lora float32": 4, "lora bfloat16": 2}[lora_kind]
    assert sft["sequence_tokens"] == 64 and torch.isfinite(torch.tensor(sft["loss"]))
    assert torch.isfinite(torch.tensor(grpo["loss"])) and set(grpo["stop_token_ids"]) >= {65505, 65508}
    assert evaluation["n"] == 1 and evaluation["mean_output_tokens"] > 0
    for stage in (sft, grpo, evaluation):
        assert stage["peak_rss"] < 16 * 2**30
