"""Depth-aware GRPO (train_grpo.py): depth credit's earlier read-outs are the model's forward at that depth, the
option reduces to plain GRPO when the earlier weights are 0, and its weights enter the gradient linearly; adaptive-exit
rollouts hand each completion's steps to the rewards, and the step-saving reward pays only right answers."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import rewards
import tiny
import train_grpo
from tests.test_grpo import generation_round, grpo_args


@pytest.mark.parametrize("num_steps", [6, (2, 4)])
def test_readouts_equal_the_forward_at_their_depth(num_steps):
    """HuginnModel(readout_steps=...) stacks the coda's read-out of each earlier state: each equals a forward run to
    that depth (same initial state), with truncated backprop too, and the final one is the plain forward's."""
    model = AutoModelForCausalLM.from_pretrained(tiny.resolve_model_path("tiny-huginn")).eval()
    ids = torch.randint(0, 300, (3, 11), generator=torch.Generator().manual_seed(0))
    seeds = torch.tensor([5, 6, 7])
    backbone = model.transformer
    stacked = backbone(ids, num_steps=num_steps, state_seeds=seeds, readout_steps=(1, 2, 4)).last_hidden_state
    assert stacked.shape[0] == 4 * 3
    for chunk, depth in zip(stacked.chunk(4), [1, 2, 4, 6], strict=True):
        alone = backbone(ids, num_steps=depth, state_seeds=seeds).last_hidden_state
        assert (chunk - alone).abs().max() <= 1e-6
    assert (stacked[:3] - stacked[-3:]).abs().max() > 1e-2  # depth matters: the check above can fail
    with pytest.raises(ValueError, match="readout_steps"):
        backbone(ids, num_steps=num_steps, readout_steps=(6,))


def test_trainer_readouts_are_the_policy_at_each_depth(tmp_path):
    """The loss forward's earlier read-outs (PEFT, packed rows, fused head) give each completion token the log-prob
    the policy gives it when run to that depth alone."""
    trainer = train_grpo.build_trainer(*grpo_args(tmp_path, "--rollout_num_steps", "6"))
    output = generation_round(trainer)
    ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
    mask = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
    width, scored = output["completion_ids"].shape[1], output["completion_mask"].bool()
    with torch.no_grad(), trainer.recurrence(6):
        readouts, _ = trainer.readout_logps(trainer.model, ids, mask, width, (1, 3))
    for logp, depth in zip(readouts, [1, 3, 6], strict=True):
        with torch.no_grad(), trainer.recurrence(depth):
            alone, _ = trainer.readout_logps(trainer.model, ids, mask, width, ())
        assert (logp - alone[0])[scored].abs().max() <= 1e-5
    assert (readouts[0] - readouts[2])[scored].abs().max() > 1e-2


def loss_and_grads(trainer, inputs, depth_credit: dict[float, float]):
    trainer.depth_credit = depth_credit
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, dict(inputs))
    loss.backward()
    grads = [p.grad.clone() for p in trainer.model.parameters() if p.requires_grad]
    return loss.item(), grads


@pytest.mark.parametrize("beta", ["0.0", "0.1"])
def test_depth_credit_reduces_to_plain_grpo_and_weights_enter_linearly(tmp_path, beta):
    """Earlier weights 0 (all on the last step): the plain GRPO loss and gradients within 1e-6. Weights w: the same
    loss value (the final read-out's), a gradient that moves by w times one direction."""
    trainer = train_grpo.build_trainer(*grpo_args(tmp_path, "--rollout_num_steps", "6", "--backprop_steps", "6",
                                                  "--beta", beta, "--final_norm_learning_rate", "0.01"))
    for parameter in trainer.model.parameters():  # LoRA B starts at 0: give every adapter a gradient to check
        if parameter.requires_grad:
            torch.nn.init.normal_(parameter, std=0.02, generator=torch.Generator().manual_seed(parameter.numel()))
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop
    inputs = generation_round(trainer)  # the random tiny model earns no reward: advantages of our own
    inputs["advantages"] = torch.randn(len(inputs["advantages"]), generator=torch.Generator().manual_seed(0))
    plain_loss, plain = loss_and_grads(trainer, inputs, {})
    zero_loss, zero = loss_and_grads(trainer, inputs, {0.25: 0.0, 0.5: 0.0})
    assert abs(zero_loss - plain_loss) <= 1e-6
    assert max((g - p).abs().max() for g, p in zip(zero, plain, strict=True)) <= 1e-6
    one_loss, one = loss_and_grads(trainer, inputs, {0.25: 0.0, 0.5: 1.0})
    two_loss, two = loss_and_grads(trainer, inputs, {0.25: 0.0, 0.5: 2.0})
    assert abs(one_loss - plain_loss) <= 1e-6 and abs(two_loss - plain_loss) <= 1e-6
    moved = [o - p for o, p in zip(one, plain, strict=True)]
    assert max(m.abs().max() for m in moved) > 1e-4  # the earlier read-out does reach the gradient
    for t, p, m in zip(two, plain, moved, strict=True):
        assert torch.allclose(t - p, 2 * m, rtol=1e-3, atol=1e-7)
    assert "depth_credit/logp_step_3" in trainer._metrics["train"]


def test_credit_steps_round_fractions_of_the_depth():
    credit = train_grpo.check_depth_credit({0.5: 0.2, 0.125: 0.5, 0.25: 0.3})
    assert train_grpo.credit_steps(credit, 8) == {1: 0.5, 2: 0.3, 4: 0.2}
    assert train_grpo.credit_steps(credit, 2) == {1: 1.0}  # all three land on step 1
    assert train_grpo.credit_steps(credit, 1) == {}
    assert train_grpo.credit_steps(credit, 32) == {4: 0.5, 8: 0.3, 16: 0.2}
    for bad in ({1.0: 0.5}, {0.0: 0.5}, {0.5: -1.0}):
        with pytest.raises(ValueError, match="fractions must lie in"):
            train_grpo.check_depth_credit(bad)


def test_depth_credit_arguments_are_checked(tmp_path):
    with pytest.raises(ValueError, match="one weight per fraction"):
        train_grpo.build_trainer(*grpo_args(tmp_path, "--depth_credit_fractions", "0.5", "0.25",
                                            "--depth_credit_weights", "1.0"))


def test_step_saving_reward_pays_right_answers_for_the_steps_they_skip():
    completions = [[{"role": "assistant", "content": text}] for text in ("\\boxed{7}", "\\boxed{8}", "\\boxed{7}")]
    scores = rewards.step_saving_reward(completions, answer=["7", "7", "7"], mean_steps_used=[2.0, 2.0, 8.0],
                                        rollout_num_steps=[8, 8, 8])
    assert scores == [0.75, 0.0, 0.0]


def test_adaptive_exit_rollouts_hand_their_steps_to_the_rewards(tmp_path):
    """rollout_exit_threshold: rollouts exit early (with a threshold above any step's KL, every token after its
    first step; a completion's first token comes from the prompt's prefill, at full depth), the reward functions get
    each completion's mean_steps_used and the depth; the sampler correction is required, since exited tokens were
    not sampled from the loss's full-depth forward."""
    seen = {}

    def spy(completions, mean_steps_used, rollout_num_steps, **kwargs):
        seen.update(steps=mean_steps_used, depth=rollout_num_steps)
        return [0.0] * len(completions)

    args = grpo_args(tmp_path, "--rollout_num_steps", "6", "--rollout_exit_threshold", "1e9", "--reward_weights", "1",
                     "--vllm_importance_sampling_correction", "true")
    trainer = train_grpo.build_trainer(*args, reward_funcs=[spy])
    output = generation_round(trainer)
    lengths = output["completion_mask"].sum(1).tolist()  # the first token comes from the prefill, at full depth
    assert seen["steps"] == pytest.approx([(6 + n - 1) / n for n in lengths]) and seen["depth"] == [6] * len(lengths)
    plain = train_grpo.build_trainer(*grpo_args(tmp_path, "--rollout_num_steps", "6", "--reward_weights", "1"),
                                     reward_funcs=[spy])
    generation_round(plain)
    assert seen["steps"] == [6.0] * len(output["prompt_ids"])  # without adaptive exit: the full depth
    with pytest.raises(ValueError, match="vllm_importance_sampling_correction"):
        train_grpo.build_trainer(*grpo_args(tmp_path, "--rollout_exit_threshold", "1e-3"))
