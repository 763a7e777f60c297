"""huginn-0125 at full size: the default config is the published one, benchmarks/fullsize_smoke.py writes the
published checkpoint layout (float32 shards, the tied embedding stored twice) that NF4 and bf16 loads read right, and
the smoke run itself through SFT, GRPO, evaluation and a bf16 load: at 1/15 width in the default run (`slow`), at full
size by hand (marker `fullsize`: ~15 minutes and 15.6 GB of disk): `python -m pytest -q -m fullsize
tests/test_fullsize.py`."""

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


@pytest.fixture(scope="module")
def published_layout(tmp_path_factory) -> tuple[dict, Path]:
    """The smoke's checkpoint at 1/15 width: (config, folder)."""
    config = fullsize_smoke.published_config(tiny_widths=True)
    folder = tmp_path_factory.mktemp("published") / "checkpoint"
    return config, fullsize_smoke.write_checkpoint(folder, config, shard_bytes=fullsize_smoke.TINY_SHARD_BYTES)


def test_smoke_checkpoint_has_the_published_layout(published_layout):
    config, checkpoint = published_layout
    stored = stored_tensors(checkpoint)
    with torch.device("meta"):
        expected_keys = set(HuginnForCausalLM(AutoConfig.for_model(**config)).state_dict())
    if REFERENCE.is_dir():  # the published names, which the meta model's keys must be
        names = json.loads((REFERENCE / "huginn-tiny-parity" / "state_dict_keys.json").read_text())["state_dict_keys"]
        assert expected_keys == set(names)
    assert set(stored) == expected_keys  # lm_head.weight included: the published shards store the tied head twice
    assert {dtype for _, dtype in stored.values()} == {"F32"}
    head, embedding = (fullsize_smoke.stored_tensor(checkpoint, name) for name in ("lm_head.weight",
                                                                                  "transformer.wte.weight"))
    assert torch.equal(head, embedding)
    index = json.loads((checkpoint / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {key: file for key, (file, _) in stored.items()}
    assert len(set(index["weight_map"].values())) == 4  # as published
    shards = sum(file.stat().st_size for file in checkpoint.glob("*.safetensors"))
    assert index["metadata"]["total_size"] < shards < index["metadata"]["total_size"] + 4 * 2**16  # + headers
    assert json.loads((checkpoint / "config.json").read_text()) == config

    assert GenerationConfig.from_pretrained(checkpoint).eos_token_id == 65505  # as published: <|end_text|> only
    tokenizer = data.load_tokenizer(str(checkpoint))
    assert tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS) == list(range(65504, 65510))
    assert tokenizer.chat_template == HUGINN_CHAT_TEMPLATE  # the checkpoint ships none


@pytest.mark.parametrize("quantized", [False, True], ids=["bf16", "nf4"])
def test_published_layout_loads_tied_and_as_stored(published_layout, quantized):
    """From float32 shards holding the head twice, bf16 and NF4 loads keep one tensor for the embedding and head,
    equal to the stored weights cast to bf16, and NF4 weights within NF4's rounding of the stored ones."""
    config, checkpoint = published_layout
    quantization = {"device_map": "cpu", "quantization_config": nf4_quantization_config(torch.bfloat16)}
    model, info = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16, output_loading_info=True,
                                                       **(quantization if quantized else {}))
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    checks = fullsize_smoke.load_checks(model, checkpoint)
    assert checks.pop("head_is_embedding")
    nf4 = {name: checks.pop(name) for name, value in list(checks.items()) if isinstance(value, dict)}
    assert all(checks.values()) and {"transformer.wte.weight", "lm_head.weight"} <= checks.keys()
    assert len(nf4) == (3 if quantized else 0)
    for errors in nf4.values():  # at most half NF4's widest gap (0.152), plus the double-quantized scale's rounding
        assert 0.1 < errors["stored"] < 0.17
    weights = fullsize_smoke.bytes_by_kind(model)
    nf4_bytes, unquantized, _ = expected_weights(config)
    if quantized:
        assert weights["unquantized bfloat16"] == unquantized  # the embedding once
        assert nf4_bytes <= weights["nf4"] <= 1.06 * nf4_bytes
    else:
        assert weights["unquantized bfloat16"] == unquantized + nf4_bytes * 4  # every weight in bf16, the head once


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


@pytest.mark.parametrize("size", [pytest.param("tiny", marks=pytest.mark.slow),
                                  pytest.param("full", marks=pytest.mark.fullsize)])
def test_fullsize_smoke(tmp_path, size):
    command = [sys.executable, str(REPO / "benchmarks" / "fullsize_smoke.py"), "--workdir", str(tmp_path),
               "--results", str(tmp_path / "results.md")] + (["--tiny"] if size == "tiny" else [])
    try:
        subprocess.run(command, check=True, timeout=2400)
    finally:
        shutil.rmtree(tmp_path / "checkpoint", ignore_errors=True)  # 15.6 GB at full size
    sft, grpo, evaluation, bf16 = (json.loads((tmp_path / f"{stage}.json").read_text())
                                   for stage in fullsize_smoke.STAGES)
    config = fullsize_smoke.published_config(tiny_widths=size == "tiny")
    nf4, unquantized, lora = expected_weights(config)
    weights = sft["bytes_after"]
    assert nf4 <= weights["nf4"] <= 1.06 * nf4  # packed 4-bit plus double-quantized scales (~3%)
    assert weights["unquantized bfloat16"] == unquantized  # the tied head stored twice is loaded once
    (lora_kind,) = [kind for kind in weights if kind.startswith("lora")]
    assert weights[lora_kind] == lora * {"lora float32": 4, "lora bfloat16": 2}[lora_kind]
    assert sft["sequence_tokens"] == 64 and torch.isfinite(torch.tensor(sft["loss"]))
    assert torch.isfinite(torch.tensor(grpo["loss"])) and set(grpo["stop_token_ids"]) >= {65505, 65508}
    assert evaluation["n"] == 1 and evaluation["mean_output_tokens"] > 0
    assert bf16["bytes_after"]["unquantized bfloat16"] == unquantized + nf4 * 4
    loads = [load for stage in (sft, grpo, evaluation, bf16) for load in stage["loads"]]
    for load in loads:
        checks = load["checks"]
        assert all(value for value in checks.values() if isinstance(value, bool))  # the head tied, exact weights
        assert all(value["stored"] < 0.17 for value in checks.values() if isinstance(value, dict))
    # the process's own memory (the mmap'd checkpoint pages in VmHWM can be dropped): at full size the NF4 model
    # (2.3 GiB) and the tensors being converted (5.7 GiB measured), or the bf16 model (6.6 GiB; 7.6 measured)
    nf4_loads = [load for stage in (sft, grpo, evaluation) for load in stage["loads"]]
    assert max(load["peak_anon"] for load in nf4_loads) < (7 if size == "full" else 1) * 2**30
    assert bf16["loads"][0]["peak_anon"] < (10 if size == "full" else 1) * 2**30
