"""Calibration statistics for output-aware coding (the ``spectral`` modes' ``calibration=``).

For every LoRA-adapted module, the second moment of its inputs, E[x x^T] (n x n), and, when the
batches give a loss, of the loss gradient at its outputs, E[g g^T] (m x m). Together they are a
Kronecker-factored Fisher approximation (K-FAC): an update error E then costs about
tr(G E S E^T) / 2 in loss per token when the loss is summed over tokens (with a mean loss, as
``model(**batch).loss``, G carries a constant factor 1 / tokens², which changes no choice the
codec makes: its targets are relative). The codec minimises it instead of the Frobenius norm.
Only this file's tensors leave the machine that computes them; the receiver never needs them.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Iterable, Mapping, Optional

PREFIX = "base_model.model."


def _lora_modules(model) -> dict:
    """Module path (as in the adapter's keys, without PEFT's prefix) -> module, for LoRA layers."""
    found = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and hasattr(module, "base_layer"):
            found[name[len(PREFIX):] if name.startswith(PREFIX) else name] = module
    return found


def calibrate(
    model,
    batches: Iterable[Mapping[str, Any]],
    *,
    loss_fn: Optional[Callable[[Any, Mapping[str, Any]], Any]] = None,
    gradients: bool = True,
    out: Optional[os.PathLike | str] = None,
) -> dict:
    """Collects the statistics of a ``peft.PeftModel`` over calibration batches.

    Args:
        model: the fine-tuned ``PeftModel`` (its LoRA layers are found by type).
        batches: dicts of model inputs (e.g. ``input_ids``, ``attention_mask``, ``labels``).
            Padded positions (``attention_mask == 0``) are left out.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``; by default ``model(**batch).loss``.
        gradients: also collect output-gradient moments (needs a loss); without them the codec
            weighs errors by the layer's outputs only.
        out: if given, the statistics are also saved there as safetensors (``--calib`` of the CLI).

    Returns ``{"<module>.input_moment": Tensor(n, n), "<module>.output_grad_moment": Tensor(m, m)}``
    in float32.
    """
    import torch

    modules = _lora_modules(model)
    if not modules:
        raise ValueError("calibrate: the model has no LoRA layers (pass the PeftModel)")
    sums_x = {k: None for k in modules}
    sums_g = {k: None for k in modules}
    state = {"mask": None, "tokens": 0}
    first = next(iter(modules))

    def rows(t):
        t = t.detach().reshape(-1, t.shape[-1]).double()
        if state["mask"] is not None and state["mask"].numel() == t.shape[0]:
            t = t[state["mask"]]
        return t

    def fwd_hook(name):
        def hook(_mod, inputs, _output):
            x = rows(inputs[0])
            if name == first:
                state["tokens"] += x.shape[0]
            sums_x[name] = x.T @ x if sums_x[name] is None else sums_x[name] + x.T @ x
        return hook

    def bwd_hook(name):
        def hook(_mod, _grad_in, grad_out):
            g = rows(grad_out[0])
            sums_g[name] = g.T @ g if sums_g[name] is None else sums_g[name] + g.T @ g
        return hook

    # A loaded PeftModel is frozen; gradients must reach the LoRA layers' outputs.
    lora_params = [p for m in modules.values() for n, p in m.named_parameters() if "lora_" in n]
    grad_flags = [p.requires_grad for p in lora_params]
    if gradients:
        for p in lora_params:
            p.requires_grad_(True)
    handles = []
    for name, module in modules.items():
        handles.append(module.register_forward_hook(fwd_hook(name)))
        if gradients:
            handles.append(module.register_full_backward_hook(bwd_hook(name)))
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
            state["mask"] = None if mask is None else mask.reshape(-1).bool()
            if gradients:
                with torch.enable_grad():
                    model.zero_grad(set_to_none=True)
                    loss = loss_fn(model, batch) if loss_fn else model(**batch).loss
                    if loss is None:
                        raise ValueError("calibrate: the batches give no loss; pass labels, a loss_fn, or gradients=False")
                    # Gradients must flow to the LoRA layers' outputs even if nothing is trainable.
                    loss.backward()
            else:
                with torch.no_grad():
                    model(**batch)
    finally:
        for h in handles:
            h.remove()
        for p, flag in zip(lora_params, grad_flags):
            p.requires_grad_(flag)
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    stats = {}
    for name in modules:
        if sums_x[name] is None:
            continue
        count = max(1.0, float(state["tokens"]))
        stats[f"{name}.input_moment"] = (sums_x[name] / count).float().contiguous()
        if sums_g[name] is not None:
            stats[f"{name}.output_grad_moment"] = (sums_g[name] / count).float().contiguous()
    if out is not None:
        from safetensors.torch import save_file

        save_file(stats, os.fspath(out))
    return stats
