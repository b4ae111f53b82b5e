"""What the adapter may train beyond its blocks: the final norm, the LM head, the input embeddings.

A domain whose token statistics differ from pretraining (the demo's bulletins) needs them: with only the
adapter blocks trainable, the frozen head caps what the plug-in can learn. The emulator holds all three
already (they are not in the middle), so training them shows the data owner nothing new. With tied
embeddings (most small bases), the head is the embedding matrix: "head" and "embeddings" name one
parameter. With method full they travel with every update in full: the embeddings are vocab x hidden (at
128 k x 4 k, half a billion parameters), which suits small vocabularies only. With method lora the head and
the embeddings train through LoRA modules of their own (a tied matrix: one, see offsite.emulator.methods)
and only their factors travel, r x (vocab + hidden) each; the norm, a vector, trains in full.
"""
from __future__ import annotations

from torch import nn

from offsite.emulator.blocks import find_blocks
from offsite.emulator.config import EXTRAS
from offsite.errors import ConfigError, UnsupportedModelError


def extra_names(model: nn.Module, kinds: tuple[str, ...]) -> tuple[str, ...]:
    """The parameter names (as model.named_parameters() gives them, tied ones once) of the `kinds` asked for."""
    unknown = [k for k in kinds if k not in EXTRAS]
    if unknown:
        raise ConfigError(f"train_extra must name some of {', '.join(EXTRAS)}, got {unknown}")
    named = {id(p): n for n, p in model.named_parameters()}
    modules = []
    for kind in kinds:
        if kind == "norm":
            modules.append(final_norm(model))
        elif kind == "head":
            modules.append(model.get_output_embeddings())
        else:
            modules.append(model.get_input_embeddings())
    names = {named[id(p)] for m in modules if m is not None for p in m.parameters() if id(p) in named}
    return tuple(sorted(names))


def outer_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The modules outside the blocks that hold what `extra_names` can name, by module name: the final
    norm (where the family has one it can tell), the input embeddings and the output head (one matrix, two
    modules, when tied)."""
    found = {id(m): n for n, m in model.named_modules()}
    try:
        norm = [final_norm(model)]
    except UnsupportedModelError:
        norm = []
    modules = [*norm, model.get_input_embeddings(), model.get_output_embeddings()]
    return {found[id(m)]: m for m in modules if m is not None and id(m) in found}


def final_norm(model: nn.Module) -> nn.Module:
    """The norm after the last block: a norm beside the block list (LLaMA's model.norm, GPT-2's ln_f, OPT's
    final_layer_norm), not one of the embeddings (BLOOM's word_embeddings_layernorm)."""
    path = find_blocks(model).path.rpartition(".")[0]
    parent = model.get_submodule(path) if path else model
    norms = [m for name, m in parent.named_children() if "norm" in type(m).__name__.lower() and "emb" not in name]
    if len(norms) != 1:
        raise UnsupportedModelError(f"cannot tell the final norm of model type {model.config.model_type!r}: "
                                    f"{len(norms)} norms beside its blocks")
    return norms[0]
