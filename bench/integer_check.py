"""How much moving a file's integers against the model's true divergence buys (`solar.polish`),
stories260K at half of int4's file, 1,284 B.

The decoder rebuilds B~ = step_x · qX and A~ = step_y · qYᵀ from a uniform-quantiser layer's
integers (docs/FORMAT.md), so those integers can be chosen against the model itself: `solar.polish`
moves them with a straight-through estimator (the forward pass rounds, the gradient passes
through), Adam on the KL divergence from the adapted model on refine's 128 training windows, every
integer by at most one step, zeros kept zero, and re-codes the best iterate whose file fits. For
the attention-mixed statistics' file and the data-free one, both `compress(quantiser="uniform")`
(a trellis-coded layer's integers cannot move one at a time: a move flips its parity, and with it
the quantiser of every later integer of its column), against the default quantiser's file.
Retention on the evaluation set / tuning split.

    python -m bench.integer_check [--lr 0.02] [--steps 150]
"""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

BYTES = 1284


def main(argv: list[str] | None = None) -> None:
    import solar

    from bench.balance_check import stories_loss_retention
    from bench.calibration import ensure
    from bench.refine_check import stories_setup

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--steps", type=int, default=150)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    model, batches, output_fn, _ = stories_setup()
    cells = stories_loss_retention()

    mixed = str(ensure("stories260k", mixed=True))
    print(f"stories260K, {BYTES:,} B; retention in % (evaluation / tuning); polish: {args.steps} steps, lr {args.lr}")
    print("| statistics | default quantiser | uniform quantiser | uniform, polished | polish: divergence, best step, integers moved |")
    print("|---|---|---|---|---|")
    for label, stats in (("attention-mixed K-FAC", mixed), ("none (data-free)", None)):
        default = solar.compress(model, None, target_bytes=BYTES, calibration=stats)
        uniform = solar.compress(model, None, target_bytes=BYTES, calibration=stats, quantiser="uniform")
        polished = solar.polish(model, batches, uniform, steps=args.steps, lr=args.lr, output_fn=output_fn)
        h = polished.refinement["polish"]
        print(f"| {label} | {cells(default)} ({default.nbytes:,} B) | {cells(uniform)} ({uniform.nbytes:,} B) | "
              f"{cells(polished)} ({polished.nbytes:,} B) | {h['divergence'][0]:.4f} → {h['divergence'][h['best']]:.4f}, "
              f"{h['best']}, {h['moved']} |", flush=True)


if __name__ == "__main__":
    main()
