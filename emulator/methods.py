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

The global adapter is the dense adapter blocks plus the tensors a method keeps beside them (virtual
tokens, bottleneck modules); methods that change only the blocks add nothing. An update of those
methods replaces its tensors in the global adapter, and the average over clients is their mean.
"""
from __future__ import annotations

import math
import re
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


def _canonical(state: dict[str, torch.Tensor], model: nn.Module, plan: SplitPlan,
               dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """peft state names on the emulator -> canonical names (full model's indices, no peft prefix), in `dtype`."""
    path = find_blocks(model).path
    pattern, out = _block_name(path), {}
    for name, tensor in state.items():
        m = pattern.match(name)
        if m is None:
            raise InvalidUpdateError(f"method tensor {name} is not inside a block")
        out[f"{path}.{plan.emulator_order[int(m.group(1))]}.{m.group(2)}"] = tensor.detach().to(dtype or tensor.dtype, copy=True)
    return out


def _emulator_names(update: dict[str, torch.Tensor], model: nn.Module, plan: SplitPlan) -> dict[str, torch.Tensor]:
    path = find_blocks(model).path
    pattern, out = _block_name(path), {}
    for name, tensor in update.items():
        m = pattern.match(name)
        if m is None or int(m.group(1)) not in plan.adapter_blocks:
            raise InvalidUpdateError(f"update tensor {name} is not in an adapter block")
        out[f"base_model.model.{path}.{plan.emulator_index(int(m.group(1)))}.{m.group(2)}"] = tensor
    return out


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


def _peft_config(cfg: MethodConfig, model: nn.Module, plan: SplitPlan, on_emulator: bool, total_steps: int = 1):
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
    return LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=regex,
                      fan_in_fan_out=fan_in_fan_out)


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
        from peft import get_peft_model
        model = get_peft_model(model, _peft_config(cfg, model, plan, on_emulator, total_steps))
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
    try:
        return _canonical(get_peft_model_state_dict(model), model.get_base_model(), plan, dtype)
    finally:
        if cfg.name == "adalora":
            config.rank_pattern = pattern


def touched(cfg: MethodConfig, update_names) -> set[str]:
    """The names of the global adapter's tensors that updates with these names can change: the update's
    own, or for the methods that merge, the weight of every layer their modules sit on."""
    if not cfg.merges:
        return set(update_names)
    return {re.sub(r"\.(lora_[ABE]|ia3_l)(\.weight)?$", "", n) + ".weight" for n in update_names}


def propose(emulator: nn.Module | None, plan: SplitPlan, cfg: MethodConfig, start: dict[str, torch.Tensor],
            update: dict[str, torch.Tensor], copy: bool = True) -> dict[str, torch.Tensor]:
    """The global adapter an update proposes: `start` with the update's tensors replaced, or for the
    methods that merge, with the update merged in by peft. `emulator` is a scratch model, needed only
    when `cfg.merges`: its adapter blocks are overwritten, in fp32, so that a merge into a half-precision
    adapter rounds once, when the round's mean is cast to the adapter's dtype, not once per update.
    Without `copy` the result is the scratch's own tensors, which the next proposal overwrites."""
    if not cfg.merges:
        return {**start, **update}
    from peft import get_peft_model, set_peft_model_state_dict
    precision.master_weights(list(adapter_parameters(emulator, plan, on_emulator=True).values()))
    load_adapter(emulator, plan, start, on_emulator=True)
    wrapped = get_peft_model(emulator, _peft_config(cfg, emulator, plan, on_emulator=True))
    result = set_peft_model_state_dict(wrapped, _emulator_names(update, emulator, plan))
    if result.unexpected_keys:
        raise InvalidUpdateError(f"update has tensors the method does not: {result.unexpected_keys[:3]}")
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
    if cfg.name == "lora" and all(_is_lora_factor(n) for u in updates for n in u):
        stacked = {n: torch.cat([u[n].float() * (s if ".lora_B." in n else 1.0) for u, s in zip(updates, share)],
                                dim=1 if ".lora_B." in n else 0) for n in updates[0]}
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
    return name.endswith((".lora_A.weight", ".lora_B.weight"))
