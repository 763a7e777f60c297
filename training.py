"""What train_sft.py and train_grpo.py share: config parsing, model loading (NF4 + LoRA) and an interruption-safe
trainer (`SafeTrainerMixin`): atomic checkpoints that carry the depth sampler's state, a checkpoint and a clean exit
on SIGTERM, a guard that skips NaN/Inf updates, and logging of the recurrence depth. `LIBRARY_INTERNALS` and
`USE_VLLM_READERS` list the TRL / transformers / PEFT internals both trainers override or rely on.

    class HuginnSFTTrainer(SafeTrainerMixin, SFTTrainer): ...
    trainer.train(resume_from_checkpoint=resume_checkpoint(training_args))
"""

import logging
import os
import shutil
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch
import torch.distributed as dist
import transformers
from peft import LoraConfig, PeftModel
from transformers import AutoModelForCausalLM, PreTrainedModel, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints
from trl import ModelConfig, TrlParser, get_peft_config

import tiny
from modeling_huginn_qlora import HuginnModel, nf4_quantization_config

logger = logging.getLogger(__name__)

HUGINN_LORA_TARGETS = ["Wqkv", "proj", "fc"]  # attention and MLP projections of prelude, core and coda blocks
STAGING_DIR = ".checkpoint-staging"  # a checkpoint is written here whole, then renamed into output_dir
COMPLETE_MARKER = "trainer_state.json"  # the Trainer writes it last: a checkpoint without it is incomplete
DEPTH_SAMPLER_FILE = "depth_sampler.pt"


@dataclass
class SafetyArguments:
    """The trainer options of SafeTrainerMixin; the scripts' ScriptArguments extend this."""

    max_consecutive_nonfinite: int = field(
        default=10, metadata={"help": "stop with an error after this many NaN/Inf steps in a row (each is skipped)"})


def parse_args(script_args_class: type, training_args_class: type, args: list[str] | None = None) -> tuple:
    """(script_args, training_args, model_args) from `--config x.yaml` and CLI overrides. Unknown keys are errors:
    TrlParser raises for YAML keys no dataclass has, HfArgumentParser for unknown CLI flags. bf16 without a GPU
    fails in transformers' TrainingArguments with "Your setup doesn't support bf16/gpu": it gets the likely cause."""
    try:
        return TrlParser((script_args_class, training_args_class, ModelConfig)).parse_args_and_config(args)
    except ValueError as error:
        if "bf16" in str(error) and not torch.cuda.is_available():
            require_gpu(["bf16"], cpu_switch="use_cpu: true")
        raise


def setup_logging(training_args) -> None:
    """The libraries at training_args.log_level / log_level_replica; ours (the resolved config, data counts) at INFO
    on the main process unless log_level says otherwise: its default, "passive", would hide them."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stdout)
    level = training_args.get_process_log_level()
    ours = logging.INFO if training_args.log_level == "passive" and training_args.should_log else level
    logging.getLogger().setLevel(ours)
    for name in ("transformers", "datasets", "trl"):
        logging.getLogger(name).setLevel(level)
    transformers.utils.logging.set_verbosity(level)
    datasets.utils.logging.set_verbosity(level)


# ---------------------------------------------------------------------------------------------------------------
# Model and tokenizer
# ---------------------------------------------------------------------------------------------------------------


def gpu_missing_reason() -> str:
    """Why torch sees no GPU, as far as this process can tell: a CPU build of torch, no driver, or a CUDA build newer
    than the driver supports (pip's default torch wheel targets the newest CUDA)."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU build; install the CUDA build that matches `nvidia-smi`"
    if shutil.which("nvidia-smi") is None:
        return "no NVIDIA driver found (no nvidia-smi): this machine may have no GPU"
    return (f"torch {torch.__version__} is built for CUDA {torch.version.cuda}; if the CUDA version `nvidia-smi` "
            "shows is older, the driver cannot run this wheel: install the torch build for the driver's CUDA version")


def require_gpu(settings: list[str], cpu_switch: str) -> None:
    """A clear error, before anything loads, when GPU-only settings meet a torch that sees no GPU (else training
    would crawl on the CPU, or fail deep in bitsandbytes)."""
    if settings and not torch.cuda.is_available():
        raise RuntimeError(f"{', '.join(settings)} asked for, but torch sees no GPU: {gpu_missing_reason()}. "
                           f"To run on the CPU anyway, set {cpu_switch}.")


def load_model(model_args: ModelConfig, training_args) -> PreTrainedModel:
    """Huginn in `model_args.dtype`; with `load_in_4bit`, NF4 + double quantization computing in that dtype (bf16
    when "auto"), placed on this process's device as bitsandbytes quantizes when weights move there."""
    if not training_args.use_cpu:
        require_gpu([name for name, asked in (("bf16", training_args.bf16), ("load_in_4bit", model_args.load_in_4bit))
                     if asked], cpu_switch="use_cpu: true")
    dtype = getattr(torch, model_args.dtype) if model_args.dtype not in (None, "auto") else "auto"
    quantization = None
    if model_args.load_in_4bit:
        quantization = nf4_quantization_config(dtype if isinstance(dtype, torch.dtype) else torch.bfloat16)
    return AutoModelForCausalLM.from_pretrained(
        tiny.resolve_model_path(model_args.model_name_or_path), revision=model_args.model_revision, dtype=dtype,
        quantization_config=quantization, device_map={"": training_args.device} if quantization else None,
    )


def lora_config(model_args: ModelConfig) -> LoraConfig | None:
    """LoRA from model_args (None unless use_peft); target modules default to every attention and MLP projection.
    Add "adapter" (the Linear that mixes the state and the prelude output at each step) to adapt the recurrence."""
    config = get_peft_config(model_args)
    if config is not None and config.target_modules is None:
        config.target_modules = set(HUGINN_LORA_TARGETS)
    return config


def keep_trainable_weights_fp32(model: torch.nn.Module) -> None:
    """TRL's SFT and GRPO trainers cast every trainable weight of a quantized model to bf16 (the QLoRA paper's
    advice). LoRA entries of ~1e-2 have a bf16 spacing of ~6e-5, so Adam's updates at RL learning rates (1e-5 and
    below) round to nothing. The trainable weights, and so Adam's moments, go back to fp32; PEFT casts activations to
    the LoRA weights' dtype and the result back, so the frozen base still computes in its own dtype."""
    for parameter in model.parameters():
        if parameter.requires_grad and parameter.dtype != torch.float32:
            parameter.data = parameter.data.float()


def huginn_backbone(model: PreTrainedModel | PeftModel) -> HuginnModel:
    """The HuginnModel inside a HuginnForCausalLM, PEFT-wrapped or not: it owns the depth sampler and records the
    depth of its last forward."""
    return (model.get_base_model() if isinstance(model, PeftModel) else model).transformer


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints: complete or ignored
# ---------------------------------------------------------------------------------------------------------------


def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    """checkpoint-N directories in output_dir, by step."""
    found = [path for path in Path(output_dir).glob(f"{PREFIX_CHECKPOINT_DIR}-*")
             if path.is_dir() and path.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda path: int(path.name.split("-")[-1]))


def is_complete(checkpoint: str | Path) -> bool:
    return (Path(checkpoint) / COMPLETE_MARKER).is_file()


def resume_checkpoint(training_args) -> str | None:
    """The checkpoint to resume from: `resume_from_checkpoint` if set (it must be complete), else the newest complete
    checkpoint in output_dir, so rerunning an interrupted command continues it. Incomplete checkpoints and staging
    leftovers of a run killed while saving are deleted (main process) so that no later rotation counts them."""
    if training_args.resume_from_checkpoint:
        if not is_complete(training_args.resume_from_checkpoint):
            raise FileNotFoundError(f"{training_args.resume_from_checkpoint} is not a complete checkpoint "
                                    f"(no {COMPLETE_MARKER})")
        return training_args.resume_from_checkpoint
    checkpoints = checkpoint_dirs(training_args.output_dir)
    if training_args.should_save:
        for incomplete in [path for path in checkpoints if not is_complete(path)]:
            logger.warning(f"deleting incomplete checkpoint {incomplete}")
            shutil.rmtree(incomplete)
        shutil.rmtree(Path(training_args.output_dir) / STAGING_DIR, ignore_errors=True)
    complete = [path for path in checkpoints if is_complete(path)]
    if complete:
        logger.info(f"resuming from {complete[-1]}")
    return str(complete[-1]) if complete else None


def train_and_save(trainer):
    """Train (resuming from the newest complete checkpoint), then save the adapter or model and tokenizer to
    output_dir, unless SIGTERM stopped the run: its checkpoint is what a rerun resumes from."""
    trainer.train(resume_from_checkpoint=resume_checkpoint(trainer.args))
    if trainer.stopped_by_signal:
        logger.warning(f"stopped by SIGTERM after step {trainer.state.global_step}; rerun the command to resume")
        return trainer
    trainer.save_model(trainer.args.output_dir)
    logger.info(f"saved to {trainer.args.output_dir}")
    return trainer


def publish_checkpoint(staged: Path, final: Path) -> None:
    """Move a fully written checkpoint into place with one rename, replacing a stale one of the same step."""
    if final.exists():
        shutil.rmtree(final)
    staged.rename(final)
    staged.parent.rmdir()


# ---------------------------------------------------------------------------------------------------------------
# The trainer mixin
# ---------------------------------------------------------------------------------------------------------------


class SafeTrainerMixin:
    """Interruption safety for a transformers/TRL trainer; list it first: `class T(SafeTrainerMixin, SFTTrainer)`.

    - Checkpoints are written to output_dir/.checkpoint-staging and renamed into place once every rank has written
      its part, then rotated (save_total_limit): a kill while saving leaves the previous checkpoint intact.
    - The depth sampler's generator is saved with the RNG states and restored with them, so random-depth runs
      resume exactly.
    - SIGTERM saves a checkpoint at the end of the current step and stops training (`stopped_by_signal`); with
      several processes, the step at which every rank has heard of it.
    - A step whose loss or gradient holds NaN/Inf is skipped (gradients dropped, so AdamW moves neither weights nor
      moments), counted and logged; `max_consecutive_nonfinite` in a row raise RuntimeError.
    - Training logs gain mean_depth / mean_backprop_depth (recurrent steps per forward) and nonfinite_skipped_steps.
    """

    def __init__(self, *args, max_consecutive_nonfinite: int = 10, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_consecutive_nonfinite = max_consecutive_nonfinite
        self.stop_requested = False  # this process got SIGTERM
        self.stopped_by_signal = False  # every rank agreed to stop after this step
        self.nonfinite_skipped_steps = 0
        self.consecutive_nonfinite = 0
        self.step_loss_nonfinite = False  # any micro-batch of the current step
        self.depths: list[tuple[int, int]] = []  # (no_grad, with_grad) of each forward since the last log
        self.staging = False
        self.add_callback(_StepGuardCallback(self))
        keep_trainable_weights_fp32(self.model)


    def train(self, *args, **kwargs):
        previous_handler = signal.signal(signal.SIGTERM, self._request_stop)
        try:
            return super().train(*args, **kwargs)
        finally:
            signal.signal(signal.SIGTERM, previous_handler)

    def _request_stop(self, signum, frame) -> None:
        logger.warning("SIGTERM: saving a checkpoint at the end of this step, then stopping")
        self.stop_requested = True

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.depths.append(huginn_backbone(self.model).last_num_steps)
        self.step_loss_nonfinite |= not bool(torch.isfinite(loss))
        return loss

    def guard_update(self, optimizer) -> None:
        """Before optimizer.step: agree across ranks on skipping this update and on stopping, then skip if asked."""
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        nonfinite = self.step_loss_nonfinite or not bool(torch.isfinite(torch.nn.utils.get_total_norm(grads)))
        flags = torch.tensor([nonfinite, self.stop_requested], dtype=torch.float32, device=self.args.device)
        if dist.is_available() and dist.is_initialized():  # losses differ per rank; one SIGTERM may reach one rank
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        nonfinite, self.stopped_by_signal = bool(flags[0]), bool(flags[1])
        self.step_loss_nonfinite = False
        if not nonfinite:
            self.consecutive_nonfinite = 0
            return
        for group in optimizer.param_groups:
            for param in group["params"]:
                param.grad = None  # AdamW skips parameters without a gradient
        self.nonfinite_skipped_steps += 1
        self.consecutive_nonfinite += 1
        step = self.state.global_step + 1
        logger.warning(f"step {step}: NaN/Inf loss or gradient, update skipped ({self.consecutive_nonfinite} in a row,"
                       f" {self.nonfinite_skipped_steps} in all)")
        if self.consecutive_nonfinite >= self.max_consecutive_nonfinite:
            raise RuntimeError(f"step {step}: {self.consecutive_nonfinite} steps in a row had a NaN/Inf loss or "
                               f"gradient (max_consecutive_nonfinite={self.max_consecutive_nonfinite}); stopping")

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self.depths:  # a training log (not eval, not the final summary)
            logs["mean_depth"] = sum(no_grad + grad for no_grad, grad in self.depths) / len(self.depths)
            logs["mean_backprop_depth"] = sum(grad for _, grad in self.depths) / len(self.depths)
            logs["nonfinite_skipped_steps"] = self.nonfinite_skipped_steps
            self.depths.clear()
        super().log(logs, start_time)

    # Atomic checkpoints: while `staging`, the Trainer's checkpoint root is the staging directory.
    def _get_output_dir(self, trial) -> str:
        output_dir = super()._get_output_dir(trial)
        return os.path.join(output_dir, STAGING_DIR) if self.staging else output_dir

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = Path(self._get_output_dir(trial))
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        self.staging = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.staging = False
        self.accelerator.wait_for_everyone()  # every rank has written its RNG state
        if self.args.should_save:
            publish_checkpoint(run_dir / STAGING_DIR / name, run_dir / name)
            rotate_checkpoints(str(run_dir), self.args.save_total_limit, self.state.best_model_checkpoint)
        self.accelerator.wait_for_everyone()

    def _save_rng_state(self, output_dir: str) -> None:
        super()._save_rng_state(output_dir)
        if self.args.should_save:  # every rank's sampler has the same seed and draws, so one copy serves all
            torch.save(huginn_backbone(self.model).depth_sampler.state_dict(), os.path.join(output_dir,
                                                                                         DEPTH_SAMPLER_FILE))

    def _load_rng_state(self, checkpoint: str | None) -> None:
        super()._load_rng_state(checkpoint)
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, DEPTH_SAMPLER_FILE)
        if not os.path.isfile(path):
            logger.warning(f"{checkpoint} has no {DEPTH_SAMPLER_FILE}: sampled depths will not continue exactly")
            return
        huginn_backbone(self.model).depth_sampler.load_state_dict(torch.load(path))


class _StepGuardCallback(TrainerCallback):
    """SafeTrainerMixin's hooks into the Trainer's loop: between gradient clipping and optimizer.step, and at the end
    of each optimizer step."""

    def __init__(self, trainer: SafeTrainerMixin):
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.trainer.guard_update(optimizer)

    def on_step_end(self, args, state, control, **kwargs):
        if self.trainer.stopped_by_signal:  # agreed by all ranks, so all of them save
            control.should_save = True
            control.should_training_stop = True


# ---------------------------------------------------------------------------------------------------------------
# The library internals the trainers rely on (checked by tests/test_library_fence.py)
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LibraryInternal:
    """A TRL / transformers / PEFT method or function whose signature our code relies on."""

    owner: str  # the library class or module that defines it
    name: str
    parameters: tuple[str, ...]  # its leading parameters (after self), in the order our code receives or passes them
    overridden_by: str | None  # our trainer class that overrides it; None: our code calls it
    why: str


# Every library method our trainers override (bar `__init__` and `train`, which forward *args and **kwargs), and the
# private PEFT function train_grpo.py calls. A TRL, transformers or PEFT release that renames, reorders or drops one
# of these parameters would bind arguments to the wrong names or skip our code without an error; the fence test
# fails instead. pyproject.toml pins TRL and PEFT to the minor versions it passed on.
LIBRARY_INTERNALS = (
    LibraryInternal("transformers.Trainer", "training_step", ("model", "inputs", "num_items_in_batch"),
                    "SafeTrainerMixin", "records each forward's recurrence depth and whether its loss is finite"),
    LibraryInternal("transformers.Trainer", "log", ("logs", "start_time"), "SafeTrainerMixin",
                    "adds mean_depth, mean_backprop_depth and nonfinite_skipped_steps to training logs"),
    LibraryInternal("transformers.Trainer", "_get_output_dir", ("trial",), "SafeTrainerMixin",
                    "points the checkpoint root at the staging directory while a checkpoint is written"),
    LibraryInternal("transformers.Trainer", "_save_checkpoint", ("model", "trial"), "SafeTrainerMixin",
                    "writes the checkpoint into staging, then renames it into place and rotates checkpoints"),
    LibraryInternal("transformers.Trainer", "_save_rng_state", ("output_dir",), "SafeTrainerMixin",
                    "saves the depth sampler's generator with the RNG states"),
    LibraryInternal("transformers.Trainer", "_load_rng_state", ("checkpoint",), "SafeTrainerMixin",
                    "restores the depth sampler's generator on resume"),
    LibraryInternal("transformers.Trainer", "compute_loss",
                    ("model", "inputs", "return_outputs", "num_items_in_batch"), "HuginnSFTTrainer",
                    "passes the fixed recurrence depth (num_steps) to the model"),
    LibraryInternal("transformers.Trainer", "compute_loss",
                    ("model", "inputs", "return_outputs", "num_items_in_batch"), "HuginnGRPOTrainer",
                    "runs the loss at its rollout's depth and initial state; counts the loss's tokens"),
    LibraryInternal("transformers.Trainer", "training_step", ("model", "inputs", "num_items_in_batch"),
                    "HuginnGRPOTrainer", "logs the loss's time apart from the rollout's"),
    LibraryInternal("transformers.Trainer", "create_optimizer", ("model",), "HuginnGRPOTrainer",
                    "gives the final norm's gain a parameter group of its own learning rate"),
    LibraryInternal("trl.GRPOTrainer", "_generate_single_turn",
                    ("prompt_ids", "images", "multimodal_fields", "num_generations", "has_tool_images"),
                    "HuginnGRPOTrainer", "replaces TRL's vLLM / transformers generation: HuginnEngine decodes the "
                    "rollouts and returns (completion token ids, their log-probs), as vLLM's path does"),
    LibraryInternal("trl.GRPOTrainer", "_calculate_rewards",
                    ("inputs", "prompts", "completions", "completion_ids_list"), "HuginnGRPOTrainer",
                    "adds each completion's mean_steps_used and the round's depth to the reward functions' arguments"),
    LibraryInternal("trl.GRPOTrainer", "_generate_and_score_completions", ("inputs",), "HuginnGRPOTrainer",
                    "fixes the round's depth and initial state around rollout and scoring; logs rollout metrics"),
    LibraryInternal("trl.GRPOTrainer", "_get_per_token_logps_and_entropies",
                    ("model", "input_ids", "attention_mask", "logits_to_keep", "batch_size", "compute_entropy",
                     "compute_aux_loss"),
                    "HuginnGRPOTrainer", "computes TRL's per-token log-probs on packed rows, a group's prompt once"),
    LibraryInternal("peft.utils.other", "_set_trainable", ("model", "adapter_name", "module_names", "inference_mode"),
                    None, "train_grpo.load_policy: makes the final norm a module to save of an SFT adapter that "
                    "lacks it, wrapped as PEFT wraps its own"),
)

# HuginnGRPOTrainer sets `use_vllm = True` after GRPOTrainer.__init__ so that TRL's correction for a sampler that
# differs from the trained forward (truncated importance sampling over the sampler's log-probs, and its metrics)
# runs for our rollouts. Every GRPOTrainer method that reads the flag, and why the trick is safe there; the fence
# test fails on a method that reads it and is not listed.
USE_VLLM_READERS = {
    "__init__": "reads it before HuginnGRPOTrainer sets it: no vLLM engine is built",
    "_generate_single_turn": "overridden: HuginnEngine replaces the vLLM call",
    "_generate": "reads it only with a rollout_func, which we never pass",
    "_tool_call_loop": "runs only with tools, which we never pass",
    "_generate_and_score_completions": "the goal: old_per_token_logps against the sampler's sampling_per_token_logps "
                                       "give importance_sampling_ratio, and the mismatch metrics",
    "_compute_loss": "the goal: each token's loss weighted by importance_sampling_ratio",
}
