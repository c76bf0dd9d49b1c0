"""A file's integers chosen with the model in the loop (``solar.polish``).

The encoder picks each layer's integers to minimise its error in a metric (Frobenius, or K-FAC
blocks); what the rounding does through the rest of the model it cannot see. A layer coded with
the uniform quantiser is decoded as B~ = step_x · X, A~ = step_y · Yᵀ from its integers X and Y
(docs/FORMAT.md, "spectral"), so those integers can be moved directly against the restored
model's divergence from the adapted one: straight-through rounding (the forward pass rounds, the
gradient passes through), Adam, every integer at most ``radius`` steps from where the encoder put
it and zeros kept zero, so that the rate stays about where it was. The iterate with the smallest
divergence on the batches whose re-coded file fits is returned (same steps, same components, same
everything else); the decoder is unchanged. The iterates do not fall steadily: Adam moves every
integer by about ``lr`` per step, so for the first ~0.5 / ``lr`` steps nothing rounds differently
and then many integers cross at once (on stories260K the divergence rose 2.5–10× before falling
below the start), hence the best iterate, not the last. Trellis-coded layers keep their
integers: one of them cannot move alone (its parity chooses the quantiser of every later integer
of its column).

Measured on stories260K: ``python -m bench.integer_check``.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

from . import _ext
from .api import CompressedAdapter, restore
from .refine import _divergence, _Loop, _position_weights

_HEAD = 4  # a layer's symbols: k, tx, ty, D, then X's k columns, then Y's (docs/FORMAT.md)


def polish(
    model,
    batches: Iterable[Any],
    packed: CompressedAdapter,
    *,
    steps: int = 150,
    lr: float = 0.02,
    radius: int = 1,
    target_bytes: Optional[int] = None,
    output_fn: Optional[Callable[[Any, Any], Any]] = None,
    objective: str = "kl",
    adapter_name: Optional[str] = None,
) -> CompressedAdapter:
    """Moves the integers of ``packed``'s uniform-quantiser layers against the divergence of the
    restored ``model`` from the adapted one on ``batches``.

    Args:
        model: the fine-tuned ``PeftModel`` the file was compressed from (its adapter is the
            teacher and is left as it was).
        batches, output_fn, objective, adapter_name: as for :func:`solar.refine`.
        packed: a ``spectral`` file of this build's format (``solar.compress(..., mode="spectral")``;
            ``quantiser="uniform"`` gives every layer integers that can move).
        steps: Adam steps (each one forward and backward pass over ``batches``).
        lr: Adam's learning rate, in steps of the quantiser (0.5 / lr steps pass before any
            integer rounds differently).
        radius: how far an integer may move from the encoder's choice, in steps.
        target_bytes: the re-coded file's size limit; by default ``packed``'s size (a smaller one
            is refused: polish keeps the rate about where it was and cannot shrink a file).

    Returns the best iterate's file (``packed`` itself if none beat it), whose ``.refinement``
    (``packed``'s, if it came from :func:`solar.refine`) gains ``"polish": {"divergence": [...],
    "best": i, "moved": n, "layers": [module, ...]}``: the divergence at every step (step 0 is
    ``packed``'s), the step kept, how many integers it moved and the layers whose integers could
    move.
    """
    import math

    import torch
    from peft import set_peft_model_state_dict

    if steps < 0 or radius < 0 or not lr > 0:
        raise ValueError("polish: steps and radius must not be negative, lr must be positive")
    limit = int(target_bytes) if target_bytes is not None else packed.nbytes
    if packed.nbytes > limit:
        raise ValueError(f"polish: the file is {packed.nbytes} B, over target_bytes={limit}: polish moves integers "
                         "at about the same rate and cannot shrink a file (compress it to the size wanted first)")
    loop = _Loop("polish", model, batches, None, limit, output_fn, objective, adapter_name, {}, capture=False)
    # A file from another adapter would fail deep inside PEFT, or polish nothing.
    in_file = {layer["module"]: layer["shape"] for layer in packed.layers}
    for path, (_mod, _s, a, b) in loop.layers.items():
        if path not in in_file:
            raise ValueError(f"polish: the adapter's layer {path} is not in the file: was it compressed from this adapter?")
        m, n, r = in_file[path]
        if tuple(loop.original[a].shape) != (r, n) or tuple(loop.original[b].shape) != (m, r):
            raise ValueError(f"polish: the file's layer {path} is {m} x {n} of rank {r}, the adapter's is not")
    restored = restore(packed, None)
    symbols = packed._c.stream_symbols()
    free = {}  # module path -> (layer index, k, step_x, step_y, X, Y) for the layers that can move
    for i, (layer, sym) in enumerate(zip(packed.layers, symbols)):
        path = layer["module"]
        if path not in loop.layers or len(sym) <= _HEAD or sym[3] != 0:
            continue
        m, n, _r = layer["shape"]
        k = sym[0]
        x = torch.tensor(sym[_HEAD: _HEAD + m * k], dtype=torch.float64).reshape(k, m).T
        y = torch.tensor(sym[_HEAD + m * k:], dtype=torch.float64).reshape(k, n).T
        free[path] = (i, k, _ext.step_of_code(sym[1]), _ext.step_of_code(sym[2]), x, y)
    history = {"divergence": [], "best": 0, "moved": 0, "layers": sorted(free)}
    if not free:
        packed.refinement = dict(packed.refinement or {}, polish=history)
        return packed

    def recoded(state: dict) -> CompressedAdapter:
        new = [list(s) for s in symbols]
        for path, (i, k, _sx, _sy, _x, _y) in free.items():
            x, y = (t.clone() for t in state[path])
            for j in range(k):  # v5: a column's first non-zero integer of X is positive
                nonzero = torch.nonzero(x[:, j])
                if nonzero.numel() and x[nonzero[0, 0], j] < 0:
                    x[:, j], y[:, j] = -x[:, j], -y[:, j]
            new[i] = new[i][:_HEAD] + [int(v) for v in x.T.reshape(-1)] + [int(v) for v in y.T.reshape(-1)]
        return CompressedAdapter(packed._c.with_stream_symbols(new))

    with loop:
        if loop._cached is None:
            raise ValueError("polish: the adapted model's outputs on these batches are too large to keep in memory; "
                             "pass fewer or smaller batches")
        set_peft_model_state_dict(loop.model, restored, adapter_name=loop.name)
        weights = {p: (loop.layers[p][0].lora_A[loop.name], loop.layers[p][0].lora_B[loop.name]) for p in free}
        saved = {p: (a._parameters.pop("weight"), b._parameters.pop("weight")) for p, (a, b) in weights.items()}
        params = {p: (x.clone().requires_grad_(True), y.clone().requires_grad_(True))
                  for p, (_i, _k, _sx, _sy, x, y) in free.items()}
        optimiser = torch.optim.Adam([t for pair in params.values() for t in pair], lr=lr)
        best, best_value, best_state = packed, math.inf, None
        try:
            for it in range(steps + 1):
                for p, (a, b) in weights.items():  # plain tensors: the forward pass rounds, the gradient passes
                    _i, k, sx, sy, _x, _y = free[p]
                    cx, cy = params[p]
                    factor_b = torch.zeros(saved[p][1].shape, dtype=torch.float64)
                    factor_a = torch.zeros(saved[p][0].shape, dtype=torch.float64)
                    factor_b[:, :k] = sx * (cx + (cx.round() - cx).detach())
                    factor_a[:k] = sy * (cy + (cy.round() - cy).detach()).T
                    a.weight, b.weight = factor_a.to(saved[p][0].dtype), factor_b.to(saved[p][1].dtype)
                optimiser.zero_grad()
                loss = 0.0
                for j, batch in enumerate(loop.batches):
                    outputs = loop.output_fn(loop.model, batch)
                    loss = loss + _divergence(objective, loop._cached[j], outputs, _position_weights(batch, outputs)) / len(loop.batches)
                value = float(loss.detach())
                history["divergence"].append(value)
                if value < best_value:
                    state = {p: (cx.detach().round(), cy.detach().round()) for p, (cx, cy) in params.items()}
                    file = recoded(state) if it else packed
                    if file.nbytes <= limit:
                        best, best_value, best_state, history["best"] = file, value, state, it
                if it == steps:
                    break
                loss.backward()
                optimiser.step()
                with torch.no_grad():
                    for p, (cx, cy) in params.items():
                        for c, q in ((cx, free[p][4]), (cy, free[p][5])):
                            c.copy_(torch.minimum(torch.maximum(c, q - radius), q + radius) * (q != 0))
        finally:
            for p, (a, b) in weights.items():
                del a.weight, b.weight
                a._parameters["weight"], b._parameters["weight"] = saved[p]
    if best_state is not None:
        history["moved"] = sum(int((best_state[p][0] != free[p][4]).sum() + (best_state[p][1] != free[p][5]).sum())
                               for p in free)
    best.refinement = dict(packed.refinement or {}, polish=history)
    return best


def cli_main(argv=None) -> int:
    """``python -m solar polish``: a finished ``.solar`` file's integers moved against a Hugging
    Face causal LM's own outputs (as :func:`polish`), on a text file or (``--self``) on the
    adapted model's own text; the file written is never larger than the one read."""
    import argparse
    import os
    import sys

    from .api import load
    from .calibrate import _add_model_arguments, _cli_batches, _load_causal_lm, _next_token_logits
    from .errors import SolarError

    ap = argparse.ArgumentParser(prog="python -m solar polish", description=cli_main.__doc__.split("\n\n")[0])
    _add_model_arguments(ap)
    ap.add_argument("--in", dest="source", required=True,
                    help=".solar file compressed from --adapter (spectral mode; `solar compress --quantiser uniform` "
                         "gives every layer integers that can move)")
    ap.add_argument("--out", required=True, help=".solar file to write (may be --in)")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="UTF-8 text file (consecutive windows; the adapter's training text will do)")
    src.add_argument("--self", dest="self_generated", action="store_true",
                     help="no data: the adapted model's own text (seeded samples)")
    ap.add_argument("--steps", type=int, default=150, help="Adam steps (default 150)")
    ap.add_argument("--lr", type=float, default=0.02, help="Adam's learning rate, in quantiser steps (default 0.02)")
    ap.add_argument("--target-bytes", type=int, help="the file's size limit (default: the size of --in)")
    args = ap.parse_args(argv)
    for path in (args.text, args.source):
        if path and not os.path.isfile(path):  # before minutes of model loading
            print(f"solar polish: error: {path}: no such file", file=sys.stderr)
            return 1
    if args.sequences < 1 or args.length < 1 or args.steps < 0 or not args.lr > 0:
        print("solar polish: error: --sequences, --length and --lr must be positive, --steps not negative",
              file=sys.stderr)
        return 2
    try:
        packed = load(args.source)  # a damaged file is refused before the model loads
        if args.target_bytes is not None and packed.nbytes > args.target_bytes:
            raise ValueError(f"{args.source} is {packed.nbytes} B, over --target-bytes {args.target_bytes}: polish "
                             "cannot shrink a file (compress it to the size wanted first)")
        model, tokenizer = _load_causal_lm(args)
        batches = _cli_batches(args, model, tokenizer)
        polished = polish(model, batches, packed, steps=args.steps, lr=args.lr, target_bytes=args.target_bytes,
                          output_fn=_next_token_logits)
        polished.save(args.out)  # atomic: a failed run leaves no half-written file
    except (OSError, ValueError, SolarError) as e:
        print(f"solar polish: error: {e}", file=sys.stderr)
        return 1
    h = polished.refinement["polish"]
    if not h["layers"]:
        print(f"wrote {args.out} ({polished.nbytes} B; unchanged: no layer of {args.source} has uniform-quantiser "
              "integers to move)")
        return 0
    kl = h["divergence"]
    print(f"wrote {args.out} ({polished.nbytes} B; divergence {kl[0]:.4g} -> {kl[h['best']]:.4g}, step {h['best']} "
          f"of {len(kl) - 1}, {h['moved']} integers moved in {len(h['layers'])} layers)")
    return 0
