"""Compression with the model in the loop (``solar.refine``).

The codec prices each layer's error on its own (Frobenius, or K-FAC blocks with calibration
statistics); what the rounding in one layer does through the others is invisible to it. An
encoder that holds the model can see it: ``refine`` compresses, restores, measures how far the
restored model's outputs are from the adapted model's on a few batches (KL divergence), and moves
the update it hands the codec against that divergence's gradient, so that the next file's
rounding errors partly cancel each other. It keeps the file with the smallest divergence; the
first file is plain ``compress``'s, so it never returns a worse one on the batches it is given.
The result is an ordinary ``.solar`` file: the decoder is unchanged.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Mapping, Optional

from .api import CompressedAdapter, compress, restore
from .calibrate import _coded_modules, _logits

# Teacher log-probabilities are kept in memory up to this many elements (1 GiB of float32);
# beyond it they are recomputed for every batch of every step, with the adapter swapped in.
_TEACHER_CACHE_ELEMENTS = 1 << 28


def _default_output(model, batch):
    return _logits(model(**batch) if isinstance(batch, Mapping) else model(batch))


def _position_weights(batch, logits):
    """Weights of the logits' positions: attention_mask where it matches them, else all ones."""
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    if mask is not None and tuple(mask.shape) == tuple(logits.shape[:-1]):
        return mask.to(logits.dtype)
    return None


def _divergence(objective, teacher, outputs, weights):
    """Mean over positions of KL(teacher || model) (teacher: log-probabilities) or of the squared
    distance between outputs."""
    import torch

    if objective == "kl":
        logp = torch.log_softmax(outputs.float(), -1)
        per_position = (teacher.exp() * (teacher - logp)).sum(-1)
    else:
        per_position = ((outputs.float() - teacher) ** 2).sum(-1)
    if weights is None:
        return per_position.mean()
    return (per_position * weights).sum() / weights.sum().clamp_min(1)


def refine(
    model,
    batches: Iterable[Any],
    base: Any = None,
    *,
    target_bytes: int,
    steps: int = 32,
    step_size: float = 0.002,
    output_fn: Optional[Callable[[Any, Any], Any]] = None,
    objective: str = "kl",
    adapter_name: Optional[str] = None,
    **compress_options,
) -> CompressedAdapter:
    """Compresses a ``peft.PeftModel``'s LoRA adapter to at most ``target_bytes``, steering the
    codec with the model's outputs on ``batches``.

    Args:
        model: the fine-tuned ``PeftModel`` (its adapter is the teacher and is left as it was).
        batches: model inputs, as for :func:`solar.calibrate` (no labels needed): data like the
            adapter's own (its training data will do: only the adapted model's outputs are matched).
        base: as for :func:`solar.compress`.
        target_bytes: the file's size limit (every candidate file honours it).
        steps: compress-restore rounds after the first (each one forward and backward pass over
            ``batches`` and one ``compress``).
        step_size: how far each round moves every layer's update, as a share of its norm.
        output_fn: ``output_fn(model, batch) -> outputs``; by default ``model(**batch).logits``
            (or the output itself). Positions where ``attention_mask`` is 0 are left out.
        objective: ``"kl"`` (the outputs are logits: KL divergence of the adapted model's
            distribution to the restored one's) or ``"mse"`` (any outputs, e.g. hidden states:
            squared distance), summed over the last axis and averaged over positions.
        compress_options: passed on to :func:`solar.compress` (``calibration``, ``mode``, ...).

    Returns the smallest-divergence file, with ``.refinement`` = ``{"divergence": [...], "bytes": [...],
    "best": i}`` for every round (round 0 is plain ``compress``).
    """
    import torch
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    if objective not in ("kl", "mse"):
        raise ValueError(f"refine: objective must be 'kl' or 'mse', not {objective!r}")
    if target_bytes is None or int(target_bytes) <= 0:
        raise ValueError("refine: target_bytes must be a positive byte budget")
    if "target_error" in compress_options:
        raise ValueError("refine: a target_error would let the file's size change between rounds; use target_bytes")
    name = adapter_name or model.active_adapter
    if name not in model.peft_config:
        raise KeyError(f"refine: the PEFT model has no adapter named {name!r} (it has {sorted(model.peft_config)})")
    config = model.peft_config[name]
    if getattr(config, "use_dora", False):
        raise ValueError("refine: DoRA adapters are not supported (their output is not linear in B A)")
    if getattr(config, "fan_in_fan_out", False):
        raise ValueError("refine: fan_in_fan_out adapters (GPT-2 Conv1D) are not supported")
    batches = list(batches)
    if not batches:
        raise ValueError("refine: no batches")
    output_fn = output_fn or _default_output
    original = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model, adapter_name=name).items()}
    layers = {}  # path -> (module, scaling, lora_A key, lora_B key)
    for path, module in _coded_modules(model).items():
        if not isinstance(getattr(module, "scaling", None), dict) or name not in module.lora_A:
            continue
        if not isinstance(module.base_layer, torch.nn.Linear):
            raise ValueError(f"refine: {path}: only LoRA on linear layers is supported")
        a_key, b_key = f"base_model.model.{path}.lora_A.weight", f"base_model.model.{path}.lora_B.weight"
        if a_key not in original or b_key not in original:
            raise ValueError(f"refine: {path}: its factors are not in the adapter's state dict")
        layers[path] = (module, float(module.scaling[name]), a_key, b_key)
    if not layers:
        raise ValueError("refine: the model has no LoRA layers (pass the PeftModel)")

    # The pre-image handed to the codec: each layer's update as a dense matrix.
    target = {p: s * original[b].double() @ original[a].double() for p, (_m, s, a, b) in layers.items()}
    rank = {p: original[a].shape[0] for p, (_m, _s, a, _b) in layers.items()}

    def as_adapter() -> dict:
        state = dict(original)  # heads and other tensors as they are
        for p, (_m, s, a, b) in layers.items():
            u, sv, vt = torch.linalg.svd(target[p], full_matrices=False)
            k = min(rank[p], sv.numel())
            root = (sv[:k] / s).sqrt()
            lora_a = torch.zeros_like(original[a], dtype=torch.float64)
            lora_b = torch.zeros_like(original[b], dtype=torch.float64)
            lora_a[:k] = root[:, None] * vt[:k]
            lora_b[:, :k] = u[:, :k] * root
            state[a], state[b] = lora_a.to(original[a].dtype), lora_b.to(original[b].dtype)
        return state

    peft_config = config.to_dict()
    peft_config["inference_mode"] = True
    was_training = model.training
    model.eval()
    lora_params = [p for m, _s, _a, _b in layers.values() for n, p in m.named_parameters() if "lora_" in n]
    grad_flags = [p.requires_grad for p in lora_params]
    grads: dict = {}
    hooks = []

    def capture(path):
        def hook(_mod, inputs, output):
            if not torch.is_grad_enabled() or not output.requires_grad:
                return
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()

            def on_grad(g):
                grad = g.detach().reshape(-1, g.shape[-1]).double().T @ x
                grads[path] = grad if path not in grads else grads[path] + grad
            output.register_hook(on_grad)
        return hook

    def as_teacher(outputs):
        return torch.log_softmax(outputs.float(), -1) if objective == "kl" else outputs.detach().float()

    try:
        with torch.no_grad():
            cached = []
            total = 0
            for batch in batches:
                logits = output_fn(model, batch)
                total += logits.numel()
                if total > _TEACHER_CACHE_ELEMENTS:
                    cached = None
                    break
                cached.append(as_teacher(logits))

        def teacher(i, batch):
            if cached is not None:
                return cached[i]
            set_peft_model_state_dict(model, original, adapter_name=name)
            try:
                with torch.no_grad():
                    return as_teacher(output_fn(model, batch))
            finally:
                set_peft_model_state_dict(model, restored, adapter_name=name)

        for p in lora_params:
            p.requires_grad_(True)
        hooks = [m.register_forward_hook(capture(path)) for path, (m, _s, _a, _b) in layers.items()]
        history = {"divergence": [], "bytes": []}
        best = None
        for step in range(steps + 1):
            packed = compress((as_adapter(), peft_config), base, target_bytes=int(target_bytes), **compress_options)
            restored = restore(packed, base)
            set_peft_model_state_dict(model, restored, adapter_name=name)
            grads.clear()
            divergence = 0.0
            for i, batch in enumerate(batches):
                t = teacher(i, batch)
                with torch.enable_grad():
                    logits = output_fn(model, batch)
                    loss = _divergence(objective, t, logits, _position_weights(batch, logits)) / len(batches)
                    loss.backward()
                divergence += float(loss.detach())
                model.zero_grad(set_to_none=True)
            history["divergence"].append(divergence)
            history["bytes"].append(packed.nbytes)
            if best is None or divergence < best[0]:
                best = (divergence, step, packed)
            if step == steps:
                break
            # Every layer moves by the same share of its update: their gradients differ by orders
            # of magnitude, and the codec's choices depend on relative, not absolute, errors.
            for path in layers:
                g = grads.get(path)
                if g is None:
                    continue
                norm = float(g.norm())
                if norm > 0 and math.isfinite(norm):
                    target[path] -= step_size * float(target[path].norm()) / norm * g
    finally:
        for h in hooks:
            h.remove()
        for p, flag in zip(lora_params, grad_flags):
            p.requires_grad_(flag)
        set_peft_model_state_dict(model, original, adapter_name=name)
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    result = best[2]
    history["best"] = best[1]
    result.refinement = history
    return result


def cli_main(argv=None) -> int:
    """``python -m solar refine``: a ``.solar`` file of at most ``--target-bytes`` for a Hugging Face
    causal LM's PEFT adapter, compressed with the model in the loop on a text file or (``--self``)
    on the adapted model's own text."""
    import argparse
    import os
    import sys

    from .calibrate import _add_model_arguments, _load_causal_lm, _logits, _text_batches, sample_text
    from .errors import SolarError

    ap = argparse.ArgumentParser(prog="python -m solar refine", description=cli_main.__doc__.split("\n\n")[0])
    _add_model_arguments(ap)
    ap.add_argument("--out", required=True, help=".solar file to write")
    ap.add_argument("--target-bytes", type=int, required=True, help="the file's size limit")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="UTF-8 text file (consecutive windows; the adapter's training text will do)")
    src.add_argument("--self", dest="self_generated", action="store_true",
                     help="no data: the adapted model's own text (seeded samples)")
    ap.add_argument("--calib", help="calibration statistics (python -m solar calibrate) for the codec's metric")
    ap.add_argument("--steps", type=int, default=32, help="compress-restore rounds (default 32)")
    ap.add_argument("--step-size", type=float, default=0.002, help="share of each update moved per round")
    args = ap.parse_args(argv)
    for path in (args.text, args.calib):
        if path and not os.path.isfile(path):  # before minutes of model loading
            print(f"solar refine: error: {path}: no such file", file=sys.stderr)
            return 1
    if args.sequences < 1 or args.length < 1 or args.steps < 0 or not args.step_size > 0:
        print("solar refine: error: --sequences, --length and --step-size must be positive, --steps not negative",
              file=sys.stderr)
        return 2
    try:
        model, tokenizer = _load_causal_lm(args)
        if args.self_generated:
            ids = sample_text(model, sequences=args.sequences, length=args.length, seed=args.seed)
            batches = [{"input_ids": ids[i: i + 4]} for i in range(0, ids.shape[0], 4)]
        else:
            batches = _text_batches(tokenizer(), args.text, args.length, args.sequences)
        packed = refine(model, batches, None, target_bytes=args.target_bytes, steps=args.steps,
                        step_size=args.step_size, output_fn=lambda m, b: _logits(m(input_ids=b["input_ids"])),
                        calibration=args.calib)
        packed.save(args.out)  # atomic: a failed run leaves no half-written file
    except (OSError, ValueError, SolarError) as e:
        print(f"solar refine: error: {e}", file=sys.stderr)
        return 1
    kl = packed.refinement["divergence"]
    print(f"wrote {args.out} ({packed.nbytes} B; divergence {kl[0]:.4g} -> {kl[packed.refinement['best']]:.4g}, "
          f"round {packed.refinement['best']} of {args.steps})")
    return 0
