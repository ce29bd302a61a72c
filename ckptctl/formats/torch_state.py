"""Which tensors of a torch state-dict file (``torch.save`` of nested dicts, names joined with ``.``) are the model.

A Lightning ``.ckpt`` keeps the LightningModule's weights under ``state_dict`` beside ``optimizer_states``,
``lr_schedulers``, ``callbacks`` and ``loops``; a hand-written training loop often saves
``{"model": ..., "optimizer": ..., "epoch": ...}``. Plain ``model.state_dict()`` files (``pytorch_model.bin``,
``model.pt``) are all model. Decided from the tensor names alone, so it costs nothing beyond the listing.
"""

from __future__ import annotations

from collections.abc import Iterable

from ckptctl.formats.dcp import NON_MODEL_ROOTS

LIGHTNING_STATE = "state_dict"
MODEL_WRAPPERS = ("model", "model_state_dict")
# Roots of training state that may sit beside a model wrapper (torch's tutorials save "model_state_dict" and
# "optimizer_state_dict"; Lightning "optimizer_states" and "lr_schedulers").
TRAINING_STATE_ROOTS = NON_MODEL_ROOTS | {
    "optimizer_state_dict",
    "optimizer_states",
    "lr_schedulers",
    "scheduler",
    "scaler",
    "ema",
}


def model_subtree(names: Iterable[str]) -> str | None:
    """The sub-tree that holds the model weights, or None when every tensor is the model's.

    ``state_dict`` when there is one (Lightning); a wrapper (``model``, ``model_state_dict``) only when training
    state (``optimizer``…) or nothing else sits beside it. A bare ``model.`` beside other model roots is a
    model's own sub-module (HF ``LlamaForCausalLM``: ``model.layers…`` and ``lm_head``).
    """
    roots = {name.split(".", 1)[0] for name in names}
    if LIGHTNING_STATE in roots:
        return LIGHTNING_STATE
    for wrapper in MODEL_WRAPPERS:
        if wrapper in roots and roots - {wrapper} <= TRAINING_STATE_ROOTS and roots != {"model"}:
            return wrapper
    return None
