"""Compression with the model in the loop (``solar.refine``, ``solar.reweigh``).

The codec prices each layer's error on its own (Frobenius, or K-FAC blocks with calibration
statistics); what the rounding in one layer does through the others is invisible to it. An
encoder that holds the model can see it: ``refine`` compresses, restores, measures how far the
restored model's outputs are from the adapted model's on a few batches (KL divergence), and moves
the update it hands the codec against that divergence's gradient, so that the next file's
rounding errors partly cancel each other. It keeps the file with the smallest divergence; the
first file is plain ``compress``'s, so it never returns a worse one on the batches it is given.
The result is an ordinary ``.solar`` file: the decoder is unchanged.

``reweigh`` corrects the statistics themselves, once: K-FAC prices each position's error on its
own, so a layer whose error every position shares (a value projection, which attention sums over
positions) costs more than its statistics say. Each round compresses, measures the divergence
each layer's coding error causes alone, divides it by what the statistics predict, and scales the
layer's input moment by that ratio (relative to the layers' geometric mean: the plan is invariant
to a common factor) for the next round. The re-weighed statistics are an ordinary statistics
file: plain ``compress`` (and the CLI's ``--calib``) then uses them for files of the size they
were measured at (on stories260K they also served smaller files, not larger ones). ``refine``
runs the same rounds first when it is given statistics.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Callable, Iterable, Mapping, Optional

from .api import CompressedAdapter, compress, restore
from .calibrate import Statistics, _coded_modules, _logits, _save_statistics

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


def _damped(moment, damping):
    import torch

    m = torch.as_tensor(moment).double()
    return m + damping * m.diagonal().mean() * torch.eye(m.shape[0], dtype=m.dtype)


def _load_statistics(calibration) -> Statistics:
    """The tensors of a statistics dict or file, with its metadata (a plain dict has none)."""
    import torch

    if isinstance(calibration, Mapping):
        return Statistics({k: torch.as_tensor(v) for k, v in calibration.items()},
                          getattr(calibration, "metadata", None))
    from safetensors import safe_open

    with safe_open(os.fspath(calibration), "pt") as f:
        return Statistics({k: f.get_tensor(k) for k in f.keys()}, f.metadata())


def _weighted(statistics: dict, weights: dict) -> dict:
    """The statistics with each layer's input moment scaled by its weight."""
    suffix = ".input_moment"
    return {k: v * weights[k[: -len(suffix)]] if k.endswith(suffix) and k[: -len(suffix)] in weights else v
            for k, v in statistics.items()}


class _Loop:
    """The model in the loop: its LoRA layers, the adapted model's outputs on the batches (the
    teacher), the divergence of a candidate adapter from them and its gradient per layer, and
    every round's file. A context manager: on exit the model's adapter, ``requires_grad`` flags
    and train/eval mode are as they were."""

    def __init__(self, who, model, batches, base, target_bytes, output_fn, objective, adapter_name, compress_options,
                 capture: bool = True):
        import torch
        from peft import get_peft_model_state_dict

        if objective not in ("kl", "mse"):
            raise ValueError(f"{who}: objective must be 'kl' or 'mse', not {objective!r}")
        if target_bytes is None or int(target_bytes) <= 0:
            raise ValueError(f"{who}: target_bytes must be a positive byte budget")
        if "target_error" in compress_options:
            raise ValueError(f"{who}: a target_error would let the file's size change between rounds; use target_bytes")
        name = adapter_name or model.active_adapter
        if name not in model.peft_config:
            raise KeyError(f"{who}: the PEFT model has no adapter named {name!r} (it has {sorted(model.peft_config)})")
        config = model.peft_config[name]
        if getattr(config, "use_dora", False):
            raise ValueError(f"{who}: DoRA adapters are not supported (their output is not linear in B A)")
        if getattr(config, "fan_in_fan_out", False):
            raise ValueError(f"{who}: fan_in_fan_out adapters (GPT-2 Conv1D) are not supported")
        self.batches = list(batches)
        if not self.batches:
            raise ValueError(f"{who}: no batches")
        self.model, self.name, self.base, self.objective = model, name, base, objective
        self.target_bytes = int(target_bytes)
        self.output_fn = output_fn or _default_output
        self.compress_options = compress_options
        self.capture = capture  # each layer's gradient into `grads` on backward passes (refine's rounds)
        self.original = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model, adapter_name=name).items()}
        self.layers = {}  # path -> (module, scaling, lora_A key, lora_B key)
        for path, module in _coded_modules(model).items():
            if not isinstance(getattr(module, "scaling", None), dict) or name not in module.lora_A:
                continue
            if not isinstance(module.base_layer, torch.nn.Linear):
                raise ValueError(f"{who}: {path}: only LoRA on linear layers is supported")
            a_key, b_key = f"base_model.model.{path}.lora_A.weight", f"base_model.model.{path}.lora_B.weight"
            if a_key not in self.original or b_key not in self.original:
                raise ValueError(f"{who}: {path}: its factors are not in the adapter's state dict")
            self.layers[path] = (module, float(module.scaling[name]), a_key, b_key)
        if not self.layers:
            raise ValueError(f"{who}: the model has no LoRA layers (pass the PeftModel)")
        self.peft_config = config.to_dict()
        self.peft_config["inference_mode"] = True
        self.grads: dict = {}
        self.history = {"divergence": [], "bytes": []}
        self.best = None  # (divergence, round, file, weights, restored)

    def __enter__(self):
        import torch

        model = self.model
        self._was_training = model.training
        model.eval()
        self._params = [p for m, _s, _a, _b in self.layers.values() for n, p in m.named_parameters() if "lora_" in n]
        self._flags = [p.requires_grad for p in self._params]
        self._hooks = []
        try:
            with torch.no_grad():
                cached, total = [], 0
                for batch in self.batches:
                    outputs = self.output_fn(model, batch)
                    total += outputs.numel()
                    if total > _TEACHER_CACHE_ELEMENTS:
                        cached = None
                        break
                    cached.append(self._as_teacher(outputs))
            self._cached = cached
            for p in self._params:
                p.requires_grad_(True)
            if self.capture:
                self._hooks = [m.register_forward_hook(self._capture(path)) for path, (m, _s, _a, _b) in self.layers.items()]
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *_exc):
        from peft import set_peft_model_state_dict

        for h in self._hooks:
            h.remove()
        for p, flag in zip(self._params, self._flags):
            p.requires_grad_(flag)
        set_peft_model_state_dict(self.model, self.original, adapter_name=self.name)
        self.model.zero_grad(set_to_none=True)
        self.model.train(self._was_training)
        return False

    def _as_teacher(self, outputs):
        import torch

        return torch.log_softmax(outputs.float(), -1) if self.objective == "kl" else outputs.detach().float()

    def _capture(self, path):
        import torch

        def hook(_mod, inputs, output):
            if not torch.is_grad_enabled() or not output.requires_grad:
                return
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()

            def on_grad(g):
                grad = g.detach().reshape(-1, g.shape[-1]).double().T @ x
                self.grads[path] = grad if path not in self.grads else self.grads[path] + grad
            output.register_hook(on_grad)
        return hook

    def _teacher(self, i, batch, state):
        import torch
        from peft import set_peft_model_state_dict

        if self._cached is not None:
            return self._cached[i]
        set_peft_model_state_dict(self.model, self.original, adapter_name=self.name)
        try:
            with torch.no_grad():
                return self._as_teacher(self.output_fn(self.model, batch))
        finally:
            set_peft_model_state_dict(self.model, state, adapter_name=self.name)

    def measure(self, state, with_grad: bool = False) -> float:
        """The divergence of the model with adapter ``state`` from the adapted one; with
        ``with_grad``, each layer's gradient of it (out x in) in ``grads``."""
        import torch
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(self.model, state, adapter_name=self.name)
        self.grads.clear()
        divergence = 0.0
        for i, batch in enumerate(self.batches):
            t = self._teacher(i, batch, state)
            with torch.set_grad_enabled(with_grad):
                outputs = self.output_fn(self.model, batch)
                loss = _divergence(self.objective, t, outputs, _position_weights(batch, outputs)) / len(self.batches)
                if with_grad:
                    loss.backward()
            divergence += float(loss.detach())
            self.model.zero_grad(set_to_none=True)
        return divergence

    def round(self, adapter, calibration, weights: dict, with_grad: bool) -> dict:
        """Compresses ``adapter`` (a state dict) with ``calibration``, records the file and its
        divergence, and returns the restored tensors."""
        packed = compress((adapter, self.peft_config), self.base, target_bytes=self.target_bytes,
                          calibration=calibration, **self.compress_options)
        restored = restore(packed, self.base)
        divergence = self.measure(restored, with_grad=with_grad)
        self.history["divergence"].append(divergence)
        self.history["bytes"].append(packed.nbytes)
        if self.best is None or divergence < self.best[0]:
            self.best = (divergence, len(self.history["bytes"]) - 1, packed, dict(weights), restored)
        return restored

    def layer_ratios(self, restored, statistics, damping) -> dict:
        """Per layer: the log of the divergence its coding error causes alone over what the
        statistics predict for it (tr(G E S E^T), both damped as the encoder damps them)."""
        logs = {}
        for path, (_m, s, a, b) in self.layers.items():
            moment = statistics.get(f"{path}.input_moment")
            if moment is None:
                continue
            original = self.original
            error = s * (restored[b].double() @ restored[a].double() - original[b].double() @ original[a].double())
            grad_moment = statistics.get(f"{path}.output_grad_moment")
            left = error if grad_moment is None else _damped(grad_moment, damping) @ error
            predicted = float((left * (error @ _damped(moment, damping))).sum())
            alone = dict(original)
            alone[a], alone[b] = restored[a], restored[b]
            actual = self.measure(alone)
            if predicted > 0 and actual > 0 and math.isfinite(actual):
                logs[path] = math.log(actual / predicted)
        return logs

    def reweigh(self, adapter, statistics, damping, rounds: int) -> dict:
        """Round 0 compresses with ``statistics`` as they are; each of ``rounds`` more re-weighs
        the layers by the measured-to-predicted ratio of their divergence, averaged over the
        rounds so far. Returns the weights of the best file."""
        weights: dict = {}
        logs: dict = {}
        for r in range(rounds + 1):
            restored = self.round(adapter, _weighted(statistics, weights), weights, with_grad=False)
            if r == rounds:
                break
            for path, value in self.layer_ratios(restored, statistics, damping).items():
                logs.setdefault(path, []).append(value)
            means = {p: sum(v) / len(v) for p, v in logs.items()}
            centre = sum(means.values()) / len(means) if means else 0.0
            weights = {p: math.exp(v - centre) for p, v in means.items()}
        return self.best[3]

    def result(self) -> CompressedAdapter:
        packed = self.best[2]
        self.history["best"] = self.best[1]
        self.history["layer_weights"] = {p: self.best[3].get(p, 1.0) for p in self.layers}
        packed.refinement = self.history
        return packed


def _statistics_and_damping(calibration, compress_options):
    damping = compress_options.get("calibration_damping")
    return _load_statistics(calibration), 0.1 if damping is None else float(damping)


def reweigh(
    model,
    batches: Iterable[Any],
    base: Any = None,
    *,
    calibration: Any,
    target_bytes: int,
    rounds: int = 3,
    output_fn: Optional[Callable[[Any, Any], Any]] = None,
    objective: str = "kl",
    adapter_name: Optional[str] = None,
    out: Optional[os.PathLike | str] = None,
    **compress_options,
) -> dict:
    """Calibration statistics corrected with the model in the loop: each LoRA layer's input
    moment scaled by how much more (or less) divergence its coding error causes than the
    statistics predict, measured on files of ``target_bytes``: the size the files will be
    shipped at (on stories260K, weights measured at 1,284 B also served smaller files, but not
    larger ones, whose errors are of another kind).

    Args:
        model, batches, base, output_fn, objective, adapter_name: as for :func:`refine`.
        calibration: the statistics to correct (from :func:`calibrate`; a dict or a path).
        target_bytes: the size of the files the errors are measured on.
        rounds: re-weighing rounds (each one ``compress`` and one forward pass over ``batches``
            per layer); the weights kept are those of the smallest-divergence file, round 0
            being the statistics as they are.
        out: if given, the statistics are also saved there (safetensors; atomically), with the
            weights in its metadata (``solar.layer_weights``, JSON).
        compress_options: passed on to :func:`solar.compress`.

    Returns the statistics: a dict of tensors with the input's keys, each LoRA layer's input
    moment scaled by its weight (all weights 1 if no round beat round 0), whose ``metadata`` (as
    the file's) is the input's with the weights added.
    """
    if calibration is None:
        raise ValueError("reweigh: calibration statistics are needed (solar.calibrate)")
    if rounds < 0:
        raise ValueError("reweigh: rounds must not be negative")
    statistics, damping = _statistics_and_damping(calibration, compress_options)
    loop = _Loop("reweigh", model, batches, base, target_bytes, output_fn, objective, adapter_name, compress_options)
    with loop:
        weights = loop.reweigh(loop.original, statistics, damping, rounds)
    # The input's notes (which modules attention mixed) stay true of the re-weighed tensors.
    metadata = {**statistics.metadata,
                "solar.layer_weights": json.dumps({p: weights.get(p, 1.0) for p in loop.layers})}
    result = Statistics(_weighted(statistics, weights), metadata)
    if out is not None:
        _save_statistics(result, out, metadata)
    return result


def refine(
    model,
    batches: Iterable[Any],
    base: Any = None,
    *,
    target_bytes: int,
    steps: int = 32,
    step_size: float = 0.002,
    reweigh: int = 3,
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
        steps: gradient rounds after the re-weighing ones (each one forward and backward pass
            over ``batches`` and one ``compress``).
        step_size: how far each gradient round moves every layer's update, as a share of its norm.
        reweigh: with ``calibration``, re-weighing rounds first (as :func:`solar.reweigh`); the
            gradient rounds then use the weights of the best file so far. Ignored without
            ``calibration``.
        output_fn: ``output_fn(model, batch) -> outputs``; by default ``model(**batch).logits``
            (or the output itself). Positions where ``attention_mask`` is 0 are left out.
        objective: ``"kl"`` (the outputs are logits: KL divergence of the adapted model's
            distribution to the restored one's) or ``"mse"`` (any outputs, e.g. hidden states:
            squared distance), summed over the last axis and averaged over positions.
        compress_options: passed on to :func:`solar.compress` (``calibration``, ``mode``, ...).

    Returns the smallest-divergence file, with ``.refinement`` = ``{"divergence": [...], "bytes":
    [...], "best": i, "reweighed": n, "layer_weights": {path: w}}``: every round's divergence and
    size (round 0 is plain ``compress``, rounds 1 to n re-weighed ones, then the gradient rounds)
    and the weights the kept file was coded with (1 for every layer if none were measured).
    """
    import torch

    if steps < 0 or reweigh < 0:
        raise ValueError("refine: steps and reweigh must not be negative")
    calibration = compress_options.pop("calibration", None)
    loop = _Loop("refine", model, batches, base, target_bytes, output_fn, objective, adapter_name, compress_options)
    original, layers = loop.original, loop.layers
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

    with loop:
        if calibration is None:
            reweighed, weights, statistics = 0, {}, None
            loop.round(as_adapter(), None, {}, with_grad=steps > 0)
        else:
            statistics, damping = _statistics_and_damping(calibration, compress_options)
            reweighed = reweigh
            weights = loop.reweigh(as_adapter(), statistics, damping, reweigh)
            if steps:
                loop.measure(loop.best[4], with_grad=True)  # the gradient rounds start from the best file
        calibration_used = None if statistics is None else _weighted(statistics, weights)
        for j in range(steps):
            # Every layer moves by the same share of its update: their gradients differ by orders
            # of magnitude, and the codec's choices depend on relative, not absolute, errors.
            for path in layers:
                g = loop.grads.get(path)
                if g is None:
                    continue
                norm = float(g.norm())
                if norm > 0 and math.isfinite(norm):
                    target[path] -= step_size * float(target[path].norm()) / norm * g
            loop.round(as_adapter(), calibration_used, weights, with_grad=j < steps - 1)
        result = loop.result()
    result.refinement["reweighed"] = reweighed
    return result


def cli_main(argv=None) -> int:
    """``python -m solar refine``: a ``.solar`` file of at most ``--target-bytes`` for a Hugging Face
    causal LM's PEFT adapter, compressed with the model in the loop on a text file or (``--self``)
    on the adapted model's own text."""
    import argparse
    import os
    import sys

    from .calibrate import _add_model_arguments, _cli_batches, _load_causal_lm, _next_token_logits
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
    ap.add_argument("--steps", type=int, default=32, help="gradient rounds (default 32)")
    ap.add_argument("--step-size", type=float, default=0.002, help="share of each update moved per round")
    ap.add_argument("--reweigh", type=int, default=3,
                    help="with --calib: rounds re-weighing the layers by their measured divergence (default 3)")
    args = ap.parse_args(argv)
    for path in (args.text, args.calib):
        if path and not os.path.isfile(path):  # before minutes of model loading
            print(f"solar refine: error: {path}: no such file", file=sys.stderr)
            return 1
    if args.sequences < 1 or args.length < 1 or args.steps < 0 or args.reweigh < 0 or not args.step_size > 0:
        print("solar refine: error: --sequences, --length and --step-size must be positive, --steps and --reweigh "
              "not negative",
              file=sys.stderr)
        return 2
    try:
        model, tokenizer = _load_causal_lm(args)
        batches = _cli_batches(args, model, tokenizer)
        packed = refine(model, batches, None, target_bytes=args.target_bytes, steps=args.steps,
                        step_size=args.step_size, reweigh=args.reweigh, output_fn=_next_token_logits,
                        calibration=args.calib)
        packed.save(args.out)  # atomic: a failed run leaves no half-written file
    except (OSError, ValueError, SolarError) as e:
        print(f"solar refine: error: {e}", file=sys.stderr)
        return 1
    kl = packed.refinement["divergence"]
    print(f"wrote {args.out} ({packed.nbytes} B; divergence {kl[0]:.4g} -> {kl[packed.refinement['best']]:.4g}, "
          f"round {packed.refinement['best']} of {len(kl) - 1})")
    return 0
