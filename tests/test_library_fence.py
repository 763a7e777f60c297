"""The fence around TRL's, transformers' and PEFT's internals (training.LIBRARY_INTERNALS, USE_VLLM_READERS): the
trainers override private methods, passing their arguments on by position, and set `use_vllm` to reach TRL's
importance-sampling path. A release that changes one of those signatures, or reads `use_vllm` somewhere new, would
mis-bind arguments or reach for a vLLM engine that does not exist; these checks fail first, and name the method."""

import inspect
import pkgutil

import peft.utils.other
import pytest
import transformers
from trl import GRPOTrainer

import training
from train_grpo import HuginnGRPOTrainer
from train_sft import HuginnSFTTrainer

TRAINERS = (HuginnSFTTrainer, HuginnGRPOTrainer)
LIBRARIES = ("trl", "transformers", "peft")
# The names TRL's importance-sampling path reads in the methods that are the goal of the `use_vllm` trick.
IMPORTANCE_SAMPLING_NAMES = {
    "_generate_and_score_completions": ("vllm_importance_sampling_correction", "old_per_token_logps",
                                        "sampling_per_token_logps", "importance_sampling_ratio"),
    "_compute_loss": ("vllm_importance_sampling_correction", "importance_sampling_ratio"),
}


def is_library(cls: type) -> bool:
    return cls.__module__.split(".")[0] in LIBRARIES


def parameters(function) -> list[inspect.Parameter]:
    """The parameters after self, through functools.wraps decorators (TRL's profiling_decorator)."""
    found = list(inspect.signature(function).parameters.values())
    return found[1:] if found and found[0].name == "self" else found


def named(function) -> list[str]:
    return [p.name for p in parameters(function) if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def takes_kwargs(function) -> bool:
    return any(p.kind == p.VAR_KEYWORD for p in parameters(function))


def is_forwarder(function) -> bool:
    """(self, *args, **kwargs), keyword-only options aside: it expects nothing of the signature it forwards to."""
    kinds = {p.kind for p in parameters(function)}
    return {inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD} <= kinds and not kinds & {
        inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD}


def our_classes(trainer: type) -> dict[str, type]:
    return {cls.__name__: cls for cls in trainer.__mro__ if not is_library(cls) and cls is not object}


def check_parent(internal: training.LibraryInternal, parent: type, override) -> list[str]:
    """A library class's definition of an overridden method against what the override expects: the same leading
    parameters in order (the override passes them on by position), and none that the override cannot accept."""
    function = vars(parent)[internal.name]
    if is_forwarder(function):
        return []
    where = f"{parent.__module__}.{parent.__qualname__}.{internal.name}{inspect.signature(function)}"
    leading = tuple(named(function)[:len(internal.parameters)])
    if leading != internal.parameters:
        ours = f"{internal.overridden_by}.{internal.name}"
        return [f"{where}: {ours} expects the leading parameters {internal.parameters}"]
    unaccepted = [name for name in named(function)[len(internal.parameters):] if name not in named(override)]
    if unaccepted and not takes_kwargs(override):
        return [f"{where}: {internal.overridden_by}.{internal.name} does not accept {unaccepted}"]
    return []


def check_override(internal: training.LibraryInternal, trainer: type) -> list[str]:
    """Every library class after the overriding one in this trainer's MRO that defines the method (what super()
    reaches, and what TRL's own overrides in between expect)."""
    ours = our_classes(trainer)[internal.overridden_by]
    override = vars(ours).get(internal.name)
    if override is None:
        return [f"{internal.overridden_by} no longer overrides {internal.name}: update training.LIBRARY_INTERNALS"]
    if tuple(named(override)[:len(internal.parameters)]) != internal.parameters:
        where = f"{internal.overridden_by}.{internal.name}{inspect.signature(override)}"
        return [f"{where} does not start with {internal.parameters}: update training.LIBRARY_INTERNALS"]
    below = trainer.__mro__[trainer.__mro__.index(ours) + 1:]
    parents = [cls for cls in below if is_library(cls) and internal.name in vars(cls)]
    if not parents:
        return [f"{trainer.__name__}: no library class defines {internal.name} any more"]
    return [problem for parent in parents for problem in check_parent(internal, parent, override)]


def check_called(internal: training.LibraryInternal) -> list[str]:
    """A library function our code calls: its leading parameters by these names, in this order, and every other
    parameter optional (our call does not pass it)."""
    function = getattr(pkgutil.resolve_name(internal.owner), internal.name, None)
    if function is None:
        return [f"{internal.owner}.{internal.name} no longer exists"]
    where = f"{internal.owner}.{internal.name}{inspect.signature(function)}"
    if tuple(named(function)[:len(internal.parameters)]) != internal.parameters:
        return [f"{where}: our call expects the leading parameters {internal.parameters}"]
    required = [p.name for p in parameters(function)[len(internal.parameters):]
                if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    return [f"{where}: our call does not pass the required {required}"] if required else []


def check_internal(internal: training.LibraryInternal) -> list[str]:
    if internal.overridden_by is None:
        return check_called(internal)
    owner = pkgutil.resolve_name(internal.owner)
    problems = [] if internal.name in vars(owner) else [f"{internal.owner} no longer defines {internal.name}"]
    trainers = [trainer for trainer in TRAINERS if internal.overridden_by in our_classes(trainer)]
    if not trainers:
        names = [trainer.__name__ for trainer in TRAINERS]
        return [*problems, f"no trainer in {names} is or derives from {internal.overridden_by}"]
    problems += [problem for trainer in trainers for problem in check_override(internal, trainer)]
    return list(dict.fromkeys(problems))  # a mixin's method is checked once per trainer


def unlisted_overrides(trainer: type) -> list[str]:
    """Methods of our trainer classes that override a library method and are not in LIBRARY_INTERNALS (forwarders
    of *args and **kwargs aside)."""
    listed = {(internal.overridden_by, internal.name) for internal in training.LIBRARY_INTERNALS}
    library = [cls for cls in trainer.__mro__ if is_library(cls)]
    unlisted = []
    for owner, cls in our_classes(trainer).items():
        for name, function in vars(cls).items():
            overrides = inspect.isfunction(function) and any(name in vars(parent) for parent in library)
            if overrides and not is_forwarder(function) and (owner, name) not in listed:
                unlisted.append(f"{owner}.{name}")
    return unlisted


def use_vllm_readers() -> set[str]:
    """GRPOTrainer's methods (its library bases' included) whose source reads self.use_vllm."""
    return {name for cls in HuginnGRPOTrainer.__mro__ if is_library(cls) for name, function in vars(cls).items()
            if inspect.isfunction(function) and "self.use_vllm" in inspect.getsource(function)}


def check_use_vllm() -> list[str]:
    readers, listed = use_vllm_readers(), set(training.USE_VLLM_READERS)
    problems = [f"GRPOTrainer.{name} now reads self.use_vllm: check that HuginnGRPOTrainer's use_vllm = True does "
                "not send it to vLLM there, then add it to training.USE_VLLM_READERS"
                for name in sorted(readers - listed)]
    problems += [f"GRPOTrainer.{name} no longer reads self.use_vllm: update training.USE_VLLM_READERS"
                 for name in sorted(listed - readers)]
    for name, expected in IMPORTANCE_SAMPLING_NAMES.items():
        source = inspect.getsource(getattr(GRPOTrainer, name)) if hasattr(GRPOTrainer, name) else ""
        missing = [word for word in expected if word not in source]
        if missing:
            problems.append(f"GRPOTrainer.{name} no longer reads {missing}: the importance-sampling path moved")
    return problems


@pytest.mark.parametrize("internal", training.LIBRARY_INTERNALS,
                         ids=lambda internal: f"{internal.overridden_by or internal.owner}.{internal.name}")
def test_the_library_still_has_what_we_rely_on(internal):
    assert not check_internal(internal)


def test_every_override_of_a_library_method_is_listed():
    assert not [problem for trainer in TRAINERS for problem in unlisted_overrides(trainer)]


def test_use_vllm_is_read_only_where_listed_and_reaches_importance_sampling():
    assert not check_use_vllm()


# The checks themselves: each library change below must be reported (monkeypatch undoes it).


def internal_named(overridden_by: str | None, name: str) -> training.LibraryInternal:
    return next(i for i in training.LIBRARY_INTERNALS if i.overridden_by == overridden_by and i.name == name)


def _save_rng_state_renamed(self, checkpoint_dir):
    pass


def _per_token_logps_reordered(self, model, input_ids, logits_to_keep, attention_mask, batch_size=None,
                               compute_entropy=False, compute_aux_loss=False):
    pass


def compute_loss_with_a_new_option(self, model, inputs, return_outputs=False, num_items_in_batch=None, scale=1.0):
    pass


def _set_trainable_with_a_required_option(model, adapter_name, module_names, inference_mode, wrapper_cls):
    pass


BROKEN_LIBRARIES = {  # id: (object, attribute, replacement (None: deleted), checked internal, words in the report)
    "renamed parameter": (transformers.Trainer, "_save_rng_state", _save_rng_state_renamed,
                          ("SafeTrainerMixin", "_save_rng_state"), "('output_dir',)"),
    "reordered parameters": (GRPOTrainer, "_get_per_token_logps_and_entropies", _per_token_logps_reordered,
                             ("HuginnGRPOTrainer", "_get_per_token_logps_and_entropies"), "leading parameters"),
    "new parameter the override lacks": (GRPOTrainer, "compute_loss", compute_loss_with_a_new_option,
                                         ("HuginnGRPOTrainer", "compute_loss"), "does not accept ['scale']"),
    "method removed": (GRPOTrainer, "_generate_single_turn", None, ("HuginnGRPOTrainer", "_generate_single_turn"),
                       "no longer defines"),
    "PEFT function changed": (peft.utils.other, "_set_trainable", _set_trainable_with_a_required_option,
                              (None, "_set_trainable"), "required ['wrapper_cls']"),
}


@pytest.mark.parametrize("case", BROKEN_LIBRARIES)
def test_the_fence_reports_a_changed_library(case, monkeypatch):
    target, attribute, replacement, (overridden_by, name), report = BROKEN_LIBRARIES[case]
    internal = internal_named(overridden_by, name)
    assert not check_internal(internal)
    if replacement is None:
        monkeypatch.delattr(target, attribute)
    else:
        monkeypatch.setattr(target, attribute, replacement)
    problems = check_internal(internal)
    assert problems and report in problems[0], problems


def log_reading_use_vllm(self, logs, start_time=None):
    if self.use_vllm:
        pass


def test_the_fence_reports_a_new_reader_of_use_vllm(monkeypatch):
    monkeypatch.setattr(GRPOTrainer, "log", log_reading_use_vllm)
    assert any("GRPOTrainer.log now reads self.use_vllm" in problem for problem in check_use_vllm())


def test_the_fence_reports_an_unlisted_override(monkeypatch):
    def _prepare_inputs(self, generation_batch):
        pass

    monkeypatch.setattr(HuginnGRPOTrainer, "_prepare_inputs", _prepare_inputs)
    assert unlisted_overrides(HuginnGRPOTrainer) == ["HuginnGRPOTrainer._prepare_inputs"]


def test_the_fence_reports_an_override_the_list_no_longer_describes(monkeypatch):
    def compute_loss(self, model, batch, return_outputs=False, num_items_in_batch=None):
        pass

    monkeypatch.setattr(HuginnSFTTrainer, "compute_loss", compute_loss)
    problems = check_internal(internal_named("HuginnSFTTrainer", "compute_loss"))
    assert problems and "update training.LIBRARY_INTERNALS" in problems[0], problems
