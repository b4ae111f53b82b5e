"""How the adapter trains: whole blocks (the paper), or a PEFT method on top of the adapter.

Every method speaks in canonical names (the full model's block indices, see offsite.emulator.adapter),
so the client's upload, the coordinator's checks and the plug-in agree whatever the emulator kept.

- full: every tensor of the adapter blocks trains and travels.
- lora, adalora, ia3 (peft): low-rank (AdaLoRA: SVD-shaped, with its rank budget reallocated during the
  round) or scaling modules on the adapter blocks' linear layers; only their tensors
  travel. The coordinator turns each update into the dense adapter it proposes (peft's own merge), and
  averages those: the mean of merged weights is exact where a mean of B and of A would not be
  (mean(B·A) != mean(B)·mean(A)). The global adapter stays dense, so plug-in and export are plain.
- bitfit: only the adapter blocks' biases train; for bias-free families (LLaMA, Mistral, Qwen...) their
  norm weights, the only per-channel offsets those blocks have.
- prompt, prefix (peft prompt learning): learned virtual tokens. Prompt tuning prepends embeddings to the
  input, which the emulator and the full model share, so it plugs in as it is. Prefix tuning (P-tuning
  v2) learns keys and values for every layer the client has: the adapter blocks' prefixes plug into the
  same blocks of the full model, and each dropped middle block takes the prefix of the nearest middle
  block the emulator kept (the layer that stood in for it during training).
- bottleneck: Houlsby adapters in the adapter blocks (offsite.emulator.bottleneck).

What the adapter trains beyond its blocks (the plan's extras: final norm, LM head, input embeddings; see
offsite.emulator.extras) trains in full with method full. With lora, the head and the embeddings get LoRA
modules of their own (peft's, on the Linear and the Embedding) and only their factors travel; the norm,
a vector, trains in full and travels beside them. A head tied to the input embeddings is one matrix:
its LoRA factors are the embedding's, transposed (`_TiedFactor`), so that training sees the change that
merging makes to the shared matrix, once.

The global adapter is the dense adapter blocks plus the tensors a method keeps beside them (virtual
tokens, bottleneck modules); methods that change only the blocks add nothing. An update of those
methods replaces its tensors in the global adapter, and the average over clients is their mean.
"""
from __future__ import annotations

import contextlib
import math
import re
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from offsite import precision
from offsite.emulator import bottleneck
from offsite.emulator.adapter import adapter_parameters, extract_adapter, freeze_all_but_adapter, load_adapter
from offsite.emulator.blocks import find_blocks
from offsite.emulator.plan import SplitPlan
from offsite.errors import ConfigError, InvalidUpdateError

METHODS = ("full", "lora", "adalora", "ia3", "bitfit", "prompt", "prefix", "bottleneck")
VIRTUAL = ("prompt", "prefix")
PROMPT = "prompt_embeddings"  # the virtual tokens' tensor, named as peft names it


@dataclass(frozen=True)
class MethodConfig:
    name: str = "full"
    r: int = 8                      # lora rank; adalora's initial rank
    target_r: int = 0               # adalora: the average rank its budget ends at (0: half of r)
    orth_reg_weight: float = 0.5    # adalora: weight of the orthogonality penalty on P and Q
    alpha: float = 16.0             # lora scaling numerator (scale = alpha / r)
    dropout: float = 0.0            # lora dropout
    target_modules: tuple[str, ...] = field(default=())  # leaf names; default: every linear (lora), peft's family default (ia3)
    virtual_tokens: int = 16        # prompt, prefix: how many
    bottleneck_dim: int = 32        # bottleneck: inner width of each adapter

    def __post_init__(self) -> None:
        if self.name not in METHODS:
            raise ConfigError(f"adapter method must be one of {', '.join(METHODS)}, got {self.name!r}")
        if self.r < 1 or self.alpha <= 0 or not 0 <= self.dropout < 1:
            raise ConfigError(f"lora needs r >= 1, alpha > 0 and 0 <= dropout < 1, got {self.r}, {self.alpha}, {self.dropout}")
        if self.virtual_tokens < 1 or self.bottleneck_dim < 1:
            raise ConfigError(f"virtual_tokens and bottleneck_dim must be >= 1, got {self.virtual_tokens}, {self.bottleneck_dim}")
        if not self.target_r:
            object.__setattr__(self, "target_r", max(1, self.r // 2))
        if self.name == "adalora" and (not 1 <= self.target_r <= self.r or self.orth_reg_weight < 0):
            raise ConfigError(f"adalora needs 1 <= target_r <= r and orth_reg_weight >= 0, got {self.target_r}, {self.orth_reg_weight}")
        object.__setattr__(self, "target_modules", tuple(self.target_modules))

    @property
    def merges(self) -> bool:
        """peft modules train, and an update merges into the dense adapter only through a model."""
        return self.name in ("lora", "adalora", "ia3")

    def to_dict(self) -> dict:
        return {"name": self.name, "r": self.r, "alpha": self.alpha, "dropout": self.dropout,
                "target_modules": list(self.target_modules), "target_r": self.target_r, "orth_reg_weight": self.orth_reg_weight,
                "virtual_tokens": self.virtual_tokens, "bottleneck_dim": self.bottleneck_dim}


# --- names -----------------------------------------------------------------------------------------
def _block_name(path: str) -> re.Pattern:
    return re.compile(rf"^(?:base_model\.model\.)?{re.escape(path)}\.(\d+)\.(.+)$")


def _outer_module(name: str, model: nn.Module, plan: SplitPlan) -> bool:
    """Whether peft state `name` (no peft prefix) belongs to a LoRA module on one of the plan's extras."""
    return any(name.startswith(f"{m}.lora_") for m in _outer_targets(model, plan))


def _canonical(state: dict[str, torch.Tensor], model: nn.Module, plan: SplitPlan,
               dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """peft state names on the emulator -> canonical names (full model's indices, no peft prefix), in `dtype`.
    The LoRA modules on the plan's extras keep their names, which are the same in both models."""
    path = find_blocks(model).path
    pattern, out = _block_name(path), {}
    for name, tensor in state.items():
        m, bare = pattern.match(name), name.removeprefix("base_model.model.")
        if m is not None:
            bare = f"{path}.{plan.emulator_order[int(m.group(1))]}.{m.group(2)}"
        elif not _outer_module(bare, model, plan):
            raise InvalidUpdateError(f"method tensor {name} is not inside a block or on what the adapter trains beyond them")
        out[bare] = tensor.detach().to(dtype or tensor.dtype, copy=True)
    return out


def _emulator_names(update: dict[str, torch.Tensor], model: nn.Module, plan: SplitPlan) -> dict[str, torch.Tensor]:
    path = find_blocks(model).path
    pattern, out = _block_name(path), {}
    for name, tensor in update.items():
        m = pattern.match(name)
        if m is not None and int(m.group(1)) in plan.adapter_blocks:
            out[f"base_model.model.{path}.{plan.emulator_index(int(m.group(1)))}.{m.group(2)}"] = tensor
        elif m is None and _outer_module(name, model, plan):
            out[f"base_model.model.{name}"] = tensor
        else:
            raise InvalidUpdateError(f"update tensor {name} is not in an adapter block or on what the adapter trains beyond them")
    return out


# --- the plan's extras under lora ------------------------------------------------------------------
def _outer_targets(model: nn.Module, plan: SplitPlan) -> list[str]:
    """Module names of the plan's extras that LoRA adapts: the input embeddings and the LM head, whose
    weight the adapter trains (a tied head: through the embeddings, the name the plan has for the matrix).
    `model` may carry peft's modules."""
    modules = dict(model.named_modules())
    base = lambda m: m.get_base_layer() if hasattr(m, "get_base_layer") else m  # noqa: E731
    names = [n.rpartition(".") for n in plan.extras]
    return [m for m, _, leaf in names if leaf == "weight" and isinstance(base(modules.get(m)), (nn.Embedding, nn.Linear))]


def _dense_extras(model: nn.Module, plan: SplitPlan) -> list[str]:
    """The plan's extras that train in full under lora: the final norm (and any bias beside a weight)."""
    targets = set(_outer_targets(model, plan))
    return [n for n in plan.extras if n.rpartition(".")[0] not in targets or not n.endswith(".weight")]


def _dense_parameters(model: nn.Module, names: list[str]) -> dict[str, nn.Parameter]:
    """`names` (as the unwrapped model has them) -> the live parameters of `model`, which peft may wrap."""
    live = {re.sub(r"\.base_layer(?=\.)", "", n).removeprefix("base_model.model."): p
            for n, p in model.named_parameters(remove_duplicate=False)}
    return {n: live[n] for n in names}


def _tied_head(model: nn.Module) -> str | None:
    """The LM head's module name where it is the input embedding matrix (tied), else None. Unwrapped `model`."""
    head, table = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or table is None or head.weight is not table.weight:
        return None
    return next(n for n, m in model.named_modules() if m is head)


class _TiedFactor(nn.Module):
    """A LoRA factor of a tied head: the embedding's factor, transposed, read at every call (no copy, no
    parameter of its own: the optimizer and the upload see one tensor, with the gradient of both its uses).
    For the shared W (vocab x hidden) the embedding's LoRA adds scale (B_e A_e)^T; the head computes x W^T,
    so its change is scale x B_e A_e: lora_A = B_e^T, lora_B = A_e^T."""

    def __init__(self, embedding: nn.Module, factor: str):
        super().__init__()
        object.__setattr__(self, "_embedding", embedding)  # not a submodule: its parameters stay the embedding's
        self.factor = factor

    @property
    def weight(self) -> torch.Tensor:
        return getattr(self._embedding, self.factor)["default"].t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight)


def _tie_head(wrapped: nn.Module, head: str) -> None:
    """Make the tied head's LoRA factors the embedding's (see _TiedFactor). peft ties adapters only for the
    modules it knows by name (embed_tokens, lm_head); this does it for every family (GPT-2's wte, BLOOM's...)."""
    base = wrapped.get_base_model()
    layer, embedding = base.get_submodule(head), base.get_input_embeddings()
    layer.lora_A["default"] = _TiedFactor(embedding, "lora_embedding_B")  # lora_A: r x hidden = B_e^T
    layer.lora_B["default"] = _TiedFactor(embedding, "lora_embedding_A")  # lora_B: vocab x r = A_e^T


# --- peft ------------------------------------------------------------------------------------------
def _adapter_linears(model: nn.Module, plan: SplitPlan, on_emulator: bool) -> list[str]:
    """Full module names of the linear layers (nn.Linear, GPT-2's Conv1D) inside the adapter blocks."""
    found = find_blocks(model)
    names = []
    for original in plan.adapter_blocks:
        index = plan.emulator_index(original) if on_emulator else original
        for name, module in found.blocks[index].named_modules():
            if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":
                names.append(f"{found.path}.{index}.{name}")
    return names


def _peft_config(cfg: MethodConfig, model: nn.Module, plan: SplitPlan, on_emulator: bool, total_steps: int = 1,
                 merging: bool = False):
    from peft import AdaLoraConfig, IA3Config, LoraConfig
    from peft.utils.constants import (TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING,
                                      TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING)

    linears = _adapter_linears(model, plan, on_emulator)
    if cfg.name == "ia3":
        model_type = model.config.model_type
        leaves = cfg.target_modules or tuple(TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING.get(model_type, ()))
        feedforward = [f for f in TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING.get(model_type, ()) if f in leaves]
        if not leaves:
            raise ConfigError(f"no IA3 default targets for model type {model_type!r}: set target_modules")
    else:
        leaves, feedforward = cfg.target_modules, []
    targets = [n for n in linears if not leaves or n.rsplit(".", 1)[-1] in leaves]
    if not targets:
        raise ConfigError(f"{cfg.name}: no linear layer named {list(leaves)} in the adapter blocks")
    outer = _outer_targets(model, plan)
    if outer and cfg.name != "lora":
        raise ConfigError(f"the adapter trains {outer} beyond its blocks: that needs method full or lora, not {cfg.name}")
    regex = "|".join(re.escape(n) for n in targets)  # exact module names: only the adapter blocks change
    fan_in_fan_out = model.config.model_type == "gpt2"  # GPT-2's Conv1D stores weights transposed
    if cfg.name == "ia3":
        ff = [n for n in targets if n.rsplit(".", 1)[-1] in feedforward]
        return IA3Config(target_modules=regex, feedforward_modules="|".join(re.escape(n) for n in ff) or None,
                         fan_in_fan_out=fan_in_fan_out)
    if cfg.name == "adalora":  # the rank budget shrinks from r to target_r over the round's steps
        return AdaLoraConfig(init_r=cfg.r, target_r=cfg.target_r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                             target_modules=regex, fan_in_fan_out=fan_in_fan_out, total_step=max(total_steps, 1),
                             orth_reg_weight=cfg.orth_reg_weight)
    tied = _tied_head(model) if outer else None
    if tied and not merging:  # merging, the embedding's merge changes the shared matrix: the head adds nothing
        outer.append(tied)
    # full module names, a list: peft matches each exactly (or as a dotted suffix, which no other module has)
    return LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets + outer,
                      fan_in_fan_out=fan_in_fan_out)


@contextlib.contextmanager
def _known_peft_warnings():
    """peft's warnings about what this module handles: a tied matrix in the adapter (tied here, merged once),
    and fan_in_fan_out, which it sets per module (GPT-2's Conv1D: yes; its nn.Linear head: no)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*tie_word_embeddings")
        warnings.filterwarnings("ignore", message="fan_in_fan_out is set to")
        yield


def _lora_model(model: nn.Module, config) -> nn.Module:
    """`model` wrapped by peft with `config`, a tied head's factors made the embedding's (_tie_head)."""
    from peft import get_peft_model
    tied = _tied_head(model) if isinstance(config.target_modules, (list, set)) else None
    with _known_peft_warnings():
        wrapped = get_peft_model(model, config)
    if tied is not None and tied in config.target_modules:
        _tie_head(wrapped, tied)
    return wrapped


# --- bitfit ----------------------------------------------------------------------------------------
def _bitfit_names(model: nn.Module, plan: SplitPlan, on_emulator: bool) -> set[str]:
    params = adapter_parameters(model, plan, on_emulator)
    biases = {n for n in params if n.endswith(".bias")}
    return biases or {n for n, p in params.items() if p.dim() == 1 and "norm" in n.lower()}


# --- prompt learning -------------------------------------------------------------------------------
def _prompt_config(cfg: MethodConfig):
    from peft import PrefixTuningConfig, PromptTuningConfig
    kind = PromptTuningConfig if cfg.name == "prompt" else PrefixTuningConfig
    return kind(task_type="CAUSAL_LM", num_virtual_tokens=cfg.virtual_tokens)


def _full_depth(prefix: torch.Tensor, plan: SplitPlan) -> torch.Tensor:
    """An emulator-depth prefix (tokens, layers * 2 * kv width) for every block of the full model: each
    block the client had keeps its own; a dropped middle block takes the nearest kept middle block's."""
    per_layer = prefix.reshape(prefix.shape[0], len(plan.emulator_order), -1)
    slot = {original: i for i, original in enumerate(plan.emulator_order)}
    kept = plan.kept_middle or plan.emulator_order

    def source(block: int) -> int:
        return slot[block] if block in slot else slot[min(kept, key=lambda k: (abs(k - block), k))]
    return per_layer[:, [source(b) for b in range(plan.num_blocks)]].reshape(prefix.shape[0], -1)


# --- what a method does ------------------------------------------------------------------------------
def fresh_extras(model: nn.Module, plan: SplitPlan, cfg: MethodConfig) -> dict[str, torch.Tensor]:
    """The tensors the method keeps beside the adapter blocks, freshly initialised, for the job's first
    global adapter (empty for methods that change only the blocks). `model` is the emulator; unchanged.
    Prompt tuning starts from the embeddings of randomly drawn vocabulary tokens (Lester et al., 2021),
    prefix tuning from peft's initialisation. In the base's dtype, as the rest of the global adapter."""
    stored = precision.stored_dtype(model)
    if cfg.name == "bottleneck":
        return precision.stored_state(bottleneck.fresh_state(model, plan, cfg.bottleneck_dim), stored)
    if cfg.name == "prompt":
        table = model.get_input_embeddings().weight
        return {PROMPT: table[torch.randint(0, table.shape[0], (cfg.virtual_tokens,))].detach().to(stored, copy=True)}
    if cfg.name == "prefix":
        from peft import get_peft_model_state_dict, get_peft_model
        return {PROMPT: get_peft_model_state_dict(get_peft_model(model, _prompt_config(cfg)))[PROMPT].to(stored, copy=True)}
    return {}


def apply(model: nn.Module, plan: SplitPlan, cfg: MethodConfig, adapter: dict[str, torch.Tensor],
          on_emulator: bool = True, share: bool = False) -> nn.Module:
    """`model` (the emulator, or the full model with `on_emulator=False`) with the global `adapter` in
    effect: its blocks loaded (with `share`, `adapter`'s tensors become theirs: see load_adapter), and the
    method's extras installed (bottleneck modules, or a peft wrapper holding the virtual tokens). Returns
    the model to run, which may be a wrapper of `model`."""
    if cfg.name == "bottleneck":
        bottleneck.install(model, plan, cfg.bottleneck_dim, on_emulator)
    extras = {k: v for k, v in adapter.items() if k == PROMPT}
    load_adapter(model, plan, {k: v for k, v in adapter.items() if k != PROMPT}, on_emulator, share)
    if cfg.name not in VIRTUAL:
        if extras:
            raise InvalidUpdateError(f"adapter has virtual tokens, which method {cfg.name} does not use")
        return model
    if not extras:
        raise InvalidUpdateError(f"adapter has no virtual tokens ({PROMPT}), which method {cfg.name} needs")
    from peft import get_peft_model, set_peft_model_state_dict
    wrapped = get_peft_model(model, _prompt_config(cfg))
    tokens = extras[PROMPT] if on_emulator or cfg.name == "prompt" else _full_depth(extras[PROMPT], plan)
    expected = wrapped.prompt_encoder["default"].embedding.weight.shape
    if tokens.shape != expected:
        raise InvalidUpdateError(f"{PROMPT} has shape {list(tokens.shape)}, the model needs {list(expected)}")
    set_peft_model_state_dict(wrapped, {PROMPT: tokens})
    return wrapped


def attach(model: nn.Module, plan: SplitPlan, cfg: MethodConfig, on_emulator: bool = True,
           total_steps: int = 1) -> tuple[nn.Module, list[nn.Parameter]]:
    """Make `model` (as `apply` returned it) train with the method: returns the (possibly peft-wrapped)
    model and its trainables, in fp32 (offsite.precision.master_weights). Everything outside the method
    (embeddings, emulator middle, head) stays frozen, in its stored dtype. `total_steps` is the round's
    optimizer steps (AdaLoRA schedules its rank budget over them)."""
    if cfg.name == "full":
        return model, precision.master_weights(freeze_all_but_adapter(model, plan, on_emulator))
    for p in model.parameters():
        p.requires_grad_(False)
    if cfg.name in ("bitfit", "bottleneck"):
        params = adapter_parameters(model, plan, on_emulator)
        names = _bitfit_names(model, plan, on_emulator) if cfg.name == "bitfit" else filter(bottleneck.is_bottleneck, params)
        trainable = [params[n] for n in sorted(names)]
    elif cfg.name in VIRTUAL:
        trainable = list(model.prompt_encoder.parameters())
    else:
        dense = _dense_parameters(model, _dense_extras(model, plan))
        model = _lora_model(model, _peft_config(cfg, model, plan, on_emulator, total_steps))
        for p in dense.values():  # peft froze everything but its modules
            p.requires_grad_(True)
        return model, precision.master_weights([p for p in model.parameters() if p.requires_grad])
    for p in trainable:
        p.requires_grad_(True)
    return model, precision.master_weights(trainable)


def training_hooks(model: nn.Module, cfg: MethodConfig) -> dict:
    """Extra pieces of the training step a method needs, as keyword arguments for `lm.train`: AdaLoRA
    adds its orthogonality penalty to the loss and reallocates its rank budget after each optimizer step."""
    if cfg.name != "adalora":
        return {}
    lora = [(n, p) for n, p in model.named_parameters() if p.requires_grad and ("lora_A" in n or "lora_B" in n)]

    def orthogonality() -> torch.Tensor:  # AdaLoRA (Zhang et al. 2023), eq. 4: P^T P = I and Q Q^T = I
        terms = [torch.linalg.matrix_norm((p @ p.T if "lora_A" in n else p.T @ p) - torch.eye(
            p.shape[0] if "lora_A" in n else p.shape[1], device=p.device)) for n, p in lora]
        return cfg.orth_reg_weight * torch.stack(terms).mean()

    return {"regularizer": orthogonality, "after_optimizer_step": model.base_model.update_and_allocate}


def trainable_state(model: nn.Module, plan: SplitPlan, cfg: MethodConfig, on_emulator: bool = True,
                    dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """What a client uploads: only the method's trainable tensors, canonical names, in `dtype` (the job's
    upload dtype; None: as they trained)."""
    if cfg.name in ("full", "bitfit", "bottleneck"):
        full = extract_adapter(model, plan, on_emulator, dtype)
        if cfg.name == "full":
            return full
        names = _bitfit_names(model, plan, on_emulator) if cfg.name == "bitfit" else filter(bottleneck.is_bottleneck, full)
        return {n: full[n] for n in sorted(names)}
    from peft import get_peft_model_state_dict
    if cfg.name in VIRTUAL:
        tokens = get_peft_model_state_dict(model)[PROMPT]
        return {PROMPT: tokens.detach().to(dtype or tokens.dtype, copy=True)}
    config = model.peft_config["default"]
    pattern = getattr(config, "rank_pattern", None)
    if cfg.name == "adalora":  # peft would cut pruned ranks out; fixed shapes (pruned = 0) keep one spec for all
        config.rank_pattern = None
    base = model.get_base_model()
    dense = {n: p.detach().to(dtype or p.dtype, copy=True) for n, p in _dense_parameters(model, _dense_extras(base, plan)).items()}
    try:
        return {**_canonical(get_peft_model_state_dict(model, save_embedding_layers=False), base, plan, dtype), **dense}
    finally:
        if cfg.name == "adalora":
            config.rank_pattern = pattern


def touched(cfg: MethodConfig, update_names) -> set[str]:
    """The names of the global adapter's tensors that updates with these names can change: the update's
    own, or for the methods that merge, the weight of every layer their modules sit on (and the dense
    tensors lora trains beside them: the final norm)."""
    if not cfg.merges:
        return set(update_names)
    factor = re.compile(r"\.(lora_[ABE]|lora_embedding_[AB]|ia3_l)(\.weight)?$")
    return {factor.sub("", n) + ".weight" if factor.search(n) else n for n in update_names}


def propose(emulator: nn.Module | None, plan: SplitPlan, cfg: MethodConfig, start: dict[str, torch.Tensor],
            update: dict[str, torch.Tensor], copy: bool = True) -> dict[str, torch.Tensor]:
    """The global adapter an update proposes: `start` with the update's tensors replaced, or for the
    methods that merge, with the update merged in by peft. `emulator` is a scratch model, needed only
    when `cfg.merges`: its adapter blocks are overwritten, in fp32, so that a merge into a half-precision
    adapter rounds once, when the round's mean is cast to the adapter's dtype, not once per update.
    Without `copy` the result is the scratch's own tensors, which the next proposal overwrites."""
    if not cfg.merges:
        return {**start, **update}
    from peft import set_peft_model_state_dict
    precision.master_weights(list(adapter_parameters(emulator, plan, on_emulator=True).values()))
    dense = {k: v for k, v in update.items() if k in plan.extras}  # lora's norm: replaced, as method full's
    load_adapter(emulator, plan, {**start, **dense}, on_emulator=True)
    wrapped = _lora_model(emulator, _peft_config(cfg, emulator, plan, on_emulator=True, merging=True))
    result = set_peft_model_state_dict(wrapped, _emulator_names({k: v for k, v in update.items() if k not in dense}, emulator, plan))
    if result.unexpected_keys:
        raise InvalidUpdateError(f"update has tensors the method does not: {result.unexpected_keys[:3]}")
    with _known_peft_warnings():
        merged = wrapped.merge_and_unload()
    if copy:
        return extract_adapter(merged, plan, on_emulator=True)
    return {k: v.detach() for k, v in adapter_parameters(merged, plan, on_emulator=True).items()}


def propose_mean(emulator: nn.Module | None, plan: SplitPlan, cfg: MethodConfig, start: dict[str, torch.Tensor],
                 updates: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """The weighted mean of the adapters `updates` propose (see `propose`), in fp32, with one peft merge for
    all of them instead of one each where the method allows it exactly:

    - lora: sum_i w_i * scale * B_i A_i is one product of the stacked factors, [w_1 B_1 | ... | w_n B_n] times
      [A_1; ...; A_n], so the updates merge as a single LoRA of rank n * r (alpha scaled by n to keep
      scale = alpha / r); peft does the merge, fan_in_fan_out (GPT-2's Conv1D) included.
    - ia3: a merged weight is W * l, linear in l, so the mean of the proposals is the merge of the mean l.
    - adalora (its budget masks and rank counts do not stack) merges one update at a time.

    The methods that do not merge have nothing to batch: their proposals stream into the round's mean one
    at a time (`propose`). The result may be the scratch emulator's own tensors (the next merge overwrites them)."""
    if not cfg.merges:
        raise ValueError(f"method {cfg.name} does not merge: its proposals need no batching")
    if not updates or len(updates) != len(weights) or not all(math.isfinite(w) and w > 0 for w in weights):
        raise InvalidUpdateError(f"a mean needs updates with positive finite weights, got {len(updates)} and {weights[:3]}")
    share = [w / sum(weights) for w in weights]
    if cfg.name == "lora":  # factors stack (B-like ones weighted, along r); the dense norm is a plain mean
        stacked = {n: torch.cat([u[n].float() * (s if _is_lora_b(n) else 1.0) for u, s in zip(updates, share)],
                                dim=1 if _is_lora_b(n) else 0) if _is_lora_factor(n) else
                   sum(u[n].float() * s for u, s in zip(updates, share)) for n in updates[0]}
        wide = MethodConfig("lora", r=cfg.r * len(updates), alpha=cfg.alpha * len(updates), target_modules=cfg.target_modules)
        return propose(emulator, plan, wide, start, stacked, copy=False)
    if cfg.name == "ia3":
        return propose(emulator, plan, cfg, start, {n: sum(u[n].float() * s for u, s in zip(updates, share))
                                                    for n in updates[0]}, copy=False)
    out: dict[str, torch.Tensor] = {}
    for update, s in zip(updates, share):
        for k, v in propose(emulator, plan, cfg, start, update, copy=False).items():
            out[k] = out[k].add_(v, alpha=s) if k in out else v.float() * s
    return out


def _is_lora_factor(name: str) -> bool:
    return name.endswith((".lora_A.weight", ".lora_B.weight", ".lora_embedding_A", ".lora_embedding_B"))


def _is_lora_b(name: str) -> bool:
    """B-like factors (out x r: Linear's lora_B, Embedding's lora_embedding_B) stack along r as columns."""
    return name.endswith((".lora_B.weight", ".lora_embedding_B"))
