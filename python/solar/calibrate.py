"""Calibration statistics for output-aware coding (the ``spectral`` modes' ``calibration=``).

For every LoRA-adapted module (and every linear ``modules_to_save`` head, which
``passthrough="spectral"`` codes as one more layer), the second moment of its inputs, E[x x^T] (n x n), and, when the
batches give a loss, of the loss gradient at its outputs, E[g g^T] (m x m). Together they are a
Kronecker-factored Fisher approximation (K-FAC): an update error E then costs about
tr(G E S E^T) / 2 in loss per token when the loss is summed over tokens (with a mean loss, as
``model(**batch).loss``, G carries a constant factor 1 / tokens², which changes no choice the
codec makes: its targets are relative). The codec minimises it instead of the Frobenius norm.
For value projections (by default) both moments are taken where their error arrives, at the
attention output, with the inputs mixed by the attention weights (:mod:`solar.attention_mixing`).
Only this file's tensors leave the machine that computes them; the receiver never needs them.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Iterable, Mapping, Optional

PREFIX = "base_model.model."
# Heads the codec codes as layers (`passthrough="spectral"`): min(out, in) at most this, as
# kMaxLayerCodedRank in include/solar/passthrough_coding.hpp. Larger copies (an lm_head) are
# stored as int8 rows and need no statistics; an m x m gradient moment of a vocabulary would not fit.
MAX_HEAD_RANK = 64
CURVATURE_KEY = "solar.loss_curvature"  # kLossCurvatureKey in include/solar/pipeline.hpp
MIXED_KEY = "solar.attention_mixed"  # metadata: the modules whose moments attention mixed (JSON list)


class Statistics(dict):
    """Calibration statistics: a dict of tensors, and in ``metadata`` the notes a statistics file
    carries with them (e.g. which modules' moments attention mixed), so that a step that changes
    the tensors (:func:`solar.reweigh`) can keep them."""

    def __init__(self, tensors=(), metadata: Optional[Mapping[str, str]] = None):
        super().__init__(tensors)
        self.metadata = dict(metadata or {})


def _coded_modules(model) -> dict:
    """Module path (as in the adapter's keys, without PEFT's prefix) -> module, for LoRA layers
    and for ``modules_to_save`` copies of linear layers (a classifier head: the codec's
    ``passthrough="spectral"`` looks its statistics up by the same path)."""
    import torch

    try:
        from peft.utils.other import ModulesToSaveWrapper
    except ImportError:  # a PEFT without it has no heads to find
        ModulesToSaveWrapper = ()
    found = {}
    for name, module in model.named_modules():
        lora = hasattr(module, "lora_A") and hasattr(module, "base_layer")
        head = (isinstance(module, ModulesToSaveWrapper) and isinstance(module.original_module, torch.nn.Linear)
                and min(module.original_module.in_features, module.original_module.out_features) <= MAX_HEAD_RANK)
        if lora or head:
            found[name[len(PREFIX):] if name.startswith(PREFIX) else name] = module
    return found


def calibrate(
    model,
    batches: Iterable[Mapping[str, Any]],
    *,
    loss_fn: Optional[Callable[[Any, Mapping[str, Any]], Any]] = None,
    gradients: bool = True,
    first_order: bool = False,
    attention_mixing: Optional[bool] = None,
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
        first_order: for batches the adapter was *not* trained on, with gradients: also record
            each LoRA layer's mean loss gradient with respect to its weight,
            ``"<module>.update_gradient"`` (m x n), and the loss's second derivative along the
            adapter, ``"solar.loss_curvature"`` (two more forward passes, every LoRA update scaled
            by 0.9 and 1.1). The codec then also counts what dropping a component costs the loss
            to first order, which the quadratic metric misses: on held-out data an adapter still
            pulls along its minor components (on MiniLM's SST-2 adapter, dropping them cost ~1% of
            its loss gain that the metric priced at ~0). On the training data the gradient is
            mostly noise, which the codec (counting positive costs only) would pay for: on
            SmolLM2's E2E adapter, statistics from its training pairs kept 88.0% instead of 90.4%
            at 4,000 B. Left out (with a warning) if the curvature is not positive.
        attention_mixing: value projections' moments as attention sees them
            (:mod:`solar.attention_mixing`): inputs mixed by each head's attention weights,
            gradients at the attention output. K-FAC's per-position moments miss that a value's
            error reaches every position attending to it; counting it kept more of the gain at
            equal bytes on all three benchmark models (``python -m bench.mixing_check``). Needs
            attention computed by ``torch.nn.functional.scaled_dot_product_attention`` (Hugging
            Face's default "sdpa"); modules it does not see keep plain moments. Default (None): on,
            silently plain where no attention is seen; True: on, with a warning if none is seen;
            False: plain K-FAC moments for every module.
        out: if given, the statistics are also saved there as safetensors (``--calib`` of the CLI).

    Returns ``{"<module>.input_moment": Tensor(n, n), "<module>.output_grad_moment": Tensor(m, m)}``
    (and the first-order entries) in float32, as a dict whose ``metadata`` holds what the file's
    metadata holds (``solar.attention_mixed``: the modules whose moments attention mixed).
    """
    import contextlib

    import torch

    from .attention_mixing import AttentionMixing

    modules = _coded_modules(model)
    if not modules:
        raise ValueError("calibrate: the model has no LoRA layers (pass the PeftModel)")
    sums_x = {k: None for k in modules}
    sums_g = {k: None for k in modules}
    rows_x = {k: 0 for k in modules}
    state = {"mask": None, "tokens": 0, "losses": []}
    first = next(iter(modules))
    # First order: LoRA layers only (a head is coded whole, not by dropping components).
    lora_layers = {k: m for k, m in modules.items() if isinstance(getattr(m, "scaling", None), dict)}
    first_order = first_order and gradients and bool(lora_layers)
    if first_order:
        batches = list(batches)  # walked again for the curvature
    sums_grad = {k: None for k in lora_layers}
    pending_x = {k: [] for k in lora_layers}  # this batch's inputs, until the backward pass pairs them
    mixing = AttentionMixing(lambda: state["mask"]) if attention_mixing is not False else None

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
            rows_x[name] += x.shape[0]
            sums_x[name] = x.T @ x if sums_x[name] is None else sums_x[name] + x.T @ x
            if first_order and name in pending_x and torch.is_grad_enabled():
                pending_x[name].append(x)
            if mixing is not None:
                mixing.record(name, inputs[0], _output)
        return hook

    def bwd_hook(name):
        def hook(_mod, _grad_in, grad_out):
            g = rows(grad_out[0])
            sums_g[name] = g.T @ g if sums_g[name] is None else sums_g[name] + g.T @ g
            if first_order and pending_x.get(name):
                # Backward visits a module's calls in reverse order: pair with the last input.
                grad = g.T @ pending_x[name].pop()
                sums_grad[name] = grad if sums_grad[name] is None else sums_grad[name] + grad
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
        with mixing if mixing is not None else contextlib.nullcontext():
            _calibration_passes(model, batches, state, pending_x, gradients, loss_fn)
    finally:
        for h in handles:
            h.remove()
        for p, flag in zip(lora_params, grad_flags):
            p.requires_grad_(flag)
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    curvature = None
    if first_order and state["losses"]:
        curvature = _curvature_along_adapter(model, lora_layers, batches, loss_fn,
                                             sum(state["losses"]) / len(state["losses"]))
    stats = {}
    for name in modules:
        if sums_x[name] is None:
            continue
        # Inputs are averaged over the module's own rows (a head sees one per sequence, a LoRA
        # layer one per token); gradient moments share one divisor, the first layer's tokens, so
        # that every module's metric keeps the same scale (E[x x^T] (x) sum g g^T, up to it).
        count = max(1.0, float(state["tokens"]))
        stats[f"{name}.input_moment"] = (sums_x[name] / max(1.0, float(rows_x[name]))).float().contiguous()
        if sums_g[name] is not None:
            stats[f"{name}.output_grad_moment"] = (sums_g[name] / count).float().contiguous()
        if curvature is not None and sums_grad.get(name) is not None:
            # The gradient of the mean batch loss (dL/dW = sum over rows of g x^T per batch).
            stats[f"{name}.update_gradient"] = (sums_grad[name] / len(state["losses"])).float().contiguous()
    metadata = {}
    if mixing is not None:
        mixed = mixing.statistics(state["tokens"])
        _use_mixed_moments(stats, mixed, warn=attention_mixing is True)
        metadata = {MIXED_KEY: json.dumps(sorted(mixed))}
    if curvature is not None:
        stats[CURVATURE_KEY] = torch.tensor([curvature], dtype=torch.float32)
    if out is not None:
        _save_statistics(stats, out, metadata)
    return Statistics(stats, metadata)


def _calibration_passes(model, batches, state: dict, pending_x: dict, gradients: bool, loss_fn) -> None:
    """One forward (and with gradients, backward) pass per batch; the hooks collect the sums."""
    import torch

    for batch in batches:
        mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
        state["mask"] = None if mask is None else mask.reshape(-1).bool()
        for xs in pending_x.values():
            xs.clear()
        if gradients:
            with torch.enable_grad():
                model.zero_grad(set_to_none=True)
                loss = loss_fn(model, batch) if loss_fn else model(**batch).loss
                if loss is None:
                    raise ValueError("calibrate: the batches give no loss; pass labels, a loss_fn, or gradients=False")
                # Gradients must flow to the LoRA layers' outputs even if nothing is trainable.
                loss.backward()
                state["losses"].append(float(loss.detach()))
        else:
            with torch.no_grad():
                model(**batch)


def _use_mixed_moments(stats: dict, mixed: dict, warn: bool) -> None:
    """Replaces the value projections' moments by their attention-mixed ones."""
    import warnings

    if not mixed and warn:
        warnings.warn("calibrate: attention_mixing saw no coded module's output used as attention values "
                      "(attention not computed by torch.nn.functional.scaled_dot_product_attention, or no "
                      "value projection adapted); plain moments kept")
    for name, (moment, grad) in mixed.items():
        stats[f"{name}.input_moment"] = moment
        if grad is not None and f"{name}.output_grad_moment" in stats:
            stats[f"{name}.output_grad_moment"] = grad


def _save_statistics(stats: dict, out, metadata: Optional[dict] = None) -> None:
    """Writes statistics as safetensors, atomically: a failed run leaves no half-written file."""
    from safetensors.torch import save_file

    tmp = os.fspath(out) + ".tmp"
    try:
        save_file({k: v.contiguous() for k, v in stats.items()}, tmp, metadata=metadata or None)
        os.replace(tmp, os.fspath(out))
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _curvature_along_adapter(model, lora_layers: dict, batches: list, loss_fn, loss_at_one: float,
                             step: float = 0.1) -> Optional[float]:
    """d²L/dt² at t = 0 for every LoRA update scaled by 1 + t (central difference over the same
    batches), or None (with a warning) if it is not positive."""
    import warnings

    import torch

    def loss_at(factor: float) -> float:
        saved = [(m, dict(m.scaling)) for m in lora_layers.values()]
        try:
            for m, scaling in saved:
                for adapter, value in scaling.items():
                    m.scaling[adapter] = value * factor
            with torch.no_grad():
                losses = [float(loss_fn(model, b) if loss_fn else model(**b).loss) for b in batches]
        finally:
            for m, scaling in saved:
                m.scaling.update(scaling)
        return sum(losses) / len(losses)

    was_training = model.training
    model.eval()
    try:
        curvature = (loss_at(1 + step) + loss_at(1 - step) - 2 * loss_at_one) / step**2
    finally:
        model.train(was_training)
    if not curvature > 0:
        warnings.warn(f"calibrate: the loss's curvature along the adapter is {curvature:.3g} (not convex there, or the "
                      "adapter barely moves the loss on these batches); first-order statistics left out")
        return None
    return curvature


def _logits(output):
    return output.logits if hasattr(output, "logits") else output


def _next_token_loss(model, batch):
    """Mean next-token cross-entropy of a batch of token windows (batch["input_ids"], B x (T+1))."""
    import torch.nn.functional as F

    x = batch["input_ids"]
    logits = _logits(model(x[:, :-1]))
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1))


def sample_text(
    model,
    *,
    sequences: int = 32,
    length: int = 256,
    bos_token_id: Optional[int] = None,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 8,
):
    """Token ids ``(sequences, length + 1)`` sampled from a causal language model, each row
    starting at its BOS token (plain ancestral sampling: no top-k / top-p, so the text follows the
    model's own distribution). Models with a Hugging Face ``generate`` use it (KV cache); any
    other model that maps ``(B, T)`` ids to logits is sampled token by token. Deterministic for a
    given seed and batch size on a given machine."""
    import torch

    if sequences < 1 or length < 1:
        raise ValueError("sample_text: sequences and length must be positive")
    if not temperature > 0:
        raise ValueError("sample_text: temperature must be positive")
    config = getattr(model, "config", None)
    bos = bos_token_id if bos_token_id is not None else getattr(config, "bos_token_id", None)
    if bos is None:
        raise ValueError("sample_text: the model's config names no bos_token_id; pass bos_token_id=")
    was_training = model.training
    model.eval()
    generate = getattr(model, "generate", None)  # Hugging Face models (a PeftModel forwards it)
    rows = []
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            generator = torch.Generator().manual_seed(seed)
            for start in range(0, sequences, batch_size):
                ids = torch.full((min(batch_size, sequences - start), 1), int(bos), dtype=torch.long)
                if callable(generate) and config is not None:
                    # Every row gets `length` new tokens (EOS is not allowed to end one early).
                    ids = generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=0,
                                   top_p=1.0, temperature=temperature, max_new_tokens=length, min_new_tokens=length,
                                   pad_token_id=getattr(config, "eos_token_id", None) or 0)
                else:
                    for _ in range(length):
                        logits = _logits(model(ids))[:, -1, :].float() / temperature
                        nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)
                        ids = torch.cat([ids, nxt], 1)
                rows.append(ids[:, : length + 1])
    finally:
        model.train(was_training)
    return torch.cat(rows, 0)


def self_calibrate(
    model,
    *,
    sequences: int = 32,
    length: int = 256,
    bos_token_id: Optional[int] = None,
    temperature: float = 1.0,
    seed: int = 0,
    attention_mixing: Optional[bool] = None,
    out: Optional[os.PathLike | str] = None,
) -> dict:
    """Calibration statistics without calibration data, for causal language models: the
    fine-tuned ``PeftModel`` writes its own text (:func:`sample_text`) and :func:`calibrate`
    collects the K-FAC statistics of its next-token loss on it. Since the targets are the model's
    own samples, the gradient moments are those of the true Fisher of the adapted model.

    On stories260K's TinyShakespeare adapter (tuning split, ``python -m bench.calibration_check``)
    this kept as much of the loss gain at equal bytes as statistics from real training text did
    (1,400 B: 95.3% vs 94.9%; data-free coding without statistics: 88.9%).
    ``attention_mixing`` as for :func:`calibrate`.
    Returns the same dict as :func:`calibrate` (and saves it to ``out`` if given)."""
    ids = sample_text(model, sequences=sequences, length=length, bos_token_id=bos_token_id,
                      temperature=temperature, seed=seed)
    batches = [{"input_ids": ids[i: i + 4]} for i in range(0, ids.shape[0], 4)]
    # Own samples: zero expected gradient, so no first-order entries.
    return calibrate(model, batches, loss_fn=_next_token_loss, attention_mixing=attention_mixing, out=out)


def _text_batches(tokenizer, path: str, length: int, sequences: int) -> list:
    """Up to `sequences` consecutive windows of length + 1 tokens from a UTF-8 text file."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    if ids.numel() < length + 1:
        raise ValueError(f"{path}: {ids.numel()} tokens, fewer than one window of {length + 1}")
    count = min(sequences, ids.numel() // (length + 1))
    windows = ids[: count * (length + 1)].reshape(count, length + 1)
    return [{"input_ids": windows[i: i + 4]} for i in range(0, count, 4)]


def _next_token_logits(model, batch):
    return _logits(model(input_ids=batch["input_ids"]))


def _cli_batches(args, model, tokenizer) -> list:
    """The batches of the ``python -m solar`` commands: windows of ``--text``, or (``--self``)
    sequences the adapted model samples (seeded), 4 to a batch."""
    if args.self_generated:
        ids = sample_text(model, sequences=args.sequences, length=args.length, seed=args.seed)
        return [{"input_ids": ids[i: i + 4]} for i in range(0, ids.shape[0], 4)]
    return _text_batches(tokenizer(), args.text, args.length, args.sequences)


def _add_model_arguments(ap) -> None:
    """The options every ``python -m solar`` command takes to load a Hugging Face causal LM with its
    PEFT adapter and to read (``--text``) or sample (``--self``) its text."""
    ap.add_argument("--base-model", required=True, help="Hugging Face model directory (AutoModelForCausalLM)")
    ap.add_argument("--gguf-file", help="a GGUF file inside --base-model to load (transformers gguf_file=)")
    ap.add_argument("--adapter", required=True, help="PEFT adapter directory")
    ap.add_argument("--sequences", type=int, default=32, help="windows or sampled sequences (default 32)")
    ap.add_argument("--length", type=int, default=256, help="tokens per window or sequence (default 256)")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed for --self (default 0)")


def _load_causal_lm(args):
    """The adapted model (fp32, eval mode) and a loader of its tokenizer, from those options."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    extra = {"gguf_file": args.gguf_file} if args.gguf_file else {}
    model = AutoModelForCausalLM.from_pretrained(args.base_model, dtype=torch.float32, **extra)
    return PeftModel.from_pretrained(model, args.adapter).eval(), (lambda: AutoTokenizer.from_pretrained(args.base_model, **extra))


def cli_main(argv=None) -> int:
    """``python -m solar calibrate``: statistics for ``solar compress --calib`` from a Hugging Face
    causal LM and its PEFT adapter, from a text file or (``--self``) from the model's own text."""
    import argparse
    import sys

    from .errors import SolarError

    ap = argparse.ArgumentParser(prog="python -m solar calibrate", description=cli_main.__doc__.split("\n\n")[0])
    _add_model_arguments(ap)
    ap.add_argument("--out", required=True, help="statistics file to write (safetensors)")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="UTF-8 text file to calibrate on (consecutive windows)")
    src.add_argument("--self", dest="self_generated", action="store_true",
                     help="no data: the adapted model writes its own calibration text")
    ap.add_argument("--first-order", action="store_true",
                    help="with --text the adapter was not trained on: also record mean gradients and the loss "
                         "curvature, so that the codec counts what dropping a component costs to first order")
    ap.add_argument("--no-attention-mixing", dest="attention_mixing", action="store_false", default=None,
                    help="plain K-FAC moments for the value projections too (by default their inputs are mixed by "
                         "each head's attention weights and their gradients taken at the attention output: "
                         "solar.calibrate's attention_mixing)")
    ap.add_argument("--reweigh-bytes", type=int, metavar="B",
                    help="then re-weigh the statistics' layers with the model in the loop, measured on files of B "
                         "bytes: the size the files will be shipped at (solar.reweigh)")
    args = ap.parse_args(argv)
    if args.text and not os.path.isfile(args.text):  # before minutes of model loading
        print(f"solar calibrate: error: {args.text}: no such text file", file=sys.stderr)
        return 1
    if args.sequences < 1 or args.length < 1 or (args.reweigh_bytes is not None and args.reweigh_bytes < 1):
        print("solar calibrate: error: --sequences, --length and --reweigh-bytes must be positive", file=sys.stderr)
        return 2
    try:
        model, tokenizer = _load_causal_lm(args)
        batches = _cli_batches(args, model, tokenizer)
        stats = calibrate(model, batches, loss_fn=_next_token_loss, first_order=args.first_order and not args.self_generated,
                          attention_mixing=args.attention_mixing, out=None if args.reweigh_bytes else args.out)
        if args.reweigh_bytes:
            from .refine import reweigh

            reweigh(model, batches, None, calibration=stats, target_bytes=args.reweigh_bytes,
                    output_fn=_next_token_logits, out=args.out)
    except (OSError, ValueError, SolarError) as e:
        print(f"solar calibrate: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}")
    return 0
