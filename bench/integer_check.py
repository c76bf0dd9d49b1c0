"""How much moving a file's integers against the model's true divergence could buy, before building
an encoder that does it (stories260K at half of int4's file, 1,284 B, attention-mixed statistics).

The decoder rebuilds B~ = step_x · qX and A~ = step_y · qYᵀ from a uniform-quantiser layer's
integers (docs/FORMAT.md), so those integers can be optimised directly: here with a
straight-through estimator (the forward pass rounds, the gradient passes through), Adam on the
KL divergence from the adapted model on refine's 128 training windows, every integer allowed to
move by at most one step, zeros kept zero (so that the rate stays about where it was: an
empirical-entropy proxy of the integers is printed before and after). The file is
`compress(quantiser="uniform")`'s; a trellis-coded layer's integers cannot be moved one at a time
(a move flips its parity, and with it the quantiser of every later integer of its column). No
file is written: the retention is that of the moved integers, the best iterate on the training
windows' divergence, on the evaluation set / tuning split.

    python -m bench.integer_check [--lr 0.02] [--steps 150]
"""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

BYTES = 1284


def _grid(values: torch.Tensor) -> tuple[float, torch.Tensor]:
    """The largest step code's step (2^((t − 200) / 8)) on whose grid `values` lie, and the integers."""
    for t in range(255, -1, -1):
        step = 2.0 ** ((t - 200) / 8)
        q = values / step
        if float((q - q.round()).abs().max()) < 1e-3 * max(1.0, float(q.abs().max())) and bool(((q.round() != 0) == (values != 0)).all()):
            return step, q.round()
    raise ValueError("values on no step grid")


def _entropy_bits(q: torch.Tensor) -> float:
    """Empirical entropy of the magnitudes, plus a sign bit per non-zero integer."""
    _, counts = torch.unique(q.abs(), return_counts=True)
    p = counts.double() / counts.sum()
    return float(-(counts.double() * p.log2()).sum()) + float((q != 0).sum())


def main(argv: list[str] | None = None) -> None:
    import solar
    from solar.refine import _divergence, _Loop

    from bench.balance_check import references, tuning_task
    from bench.calibration import ensure
    from bench.evaluate import TASKS, retention
    from bench.refine_check import stories_setup

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--steps", type=int, default=150)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    model, batches, output_fn, _ = stories_setup()
    tasks = {"eval": TASKS["stories260k"](), "tuning": tuning_task("stories260k")}
    refs = {k: references(t) for k, t in tasks.items()}

    def cells(state) -> str:
        state = {k: v.float() for k, v in state.items()}
        return " / ".join(f"{100 * retention(*refs[s], t.evaluate(state))['loss']:.2f}" for s, t in tasks.items())

    mixed = str(ensure("stories260k", mixed=True))
    trellis = solar.compress(model, None, target_bytes=BYTES, calibration=mixed)
    packed = solar.compress(model, None, target_bytes=BYTES, calibration=mixed, quantiser="uniform")
    restored = {k: v.double() for k, v in solar.restore(packed, None).items()}
    print(f"default quantiser (trellis where it pays), {trellis.nbytes:,} B: {cells(solar.restore(trellis, None))}")
    print(f"uniform quantiser, {packed.nbytes:,} B: {cells(restored)}")

    loop = _Loop("integer_check", model, batches, None, BYTES, output_fn, "kl", None, {})
    integers = {}  # PEFT key -> (step, integers at the start, continuous copy being optimised)
    for key in restored:
        if ".lora_A." in key or ".lora_B." in key:
            step, q = _grid(restored[key])
            integers[key] = (step, q, q.clone().requires_grad_(True))
    before = sum(_entropy_bits(q) for _s, q, _c in integers.values()) / 8

    def state(rounded: bool = True) -> dict:
        out = dict(restored)
        for key, (step, _q, c) in integers.items():
            out[key] = step * (c + (c.round() - c).detach() if rounded else c.round())
        return out

    best = (float("inf"), None, -1)
    with loop:
        weights = {}  # the LoRA modules' own weight Parameters, put back on exit
        for _path, (module, _s, a, b) in loop.layers.items():
            weights[a] = module.lora_A[loop.name]
            weights[b] = module.lora_B[loop.name]
        saved = {k: m._parameters.pop("weight") for k, m in weights.items()}
        opt = torch.optim.Adam([c for _s, _q, c in integers.values()], lr=args.lr)
        try:
            for it in range(args.steps + 1):
                current = state()
                for key, linear in weights.items():
                    linear.weight = current[key].float()  # a plain tensor: the forward pass rounds, the gradient passes
                opt.zero_grad()
                loss = sum(_divergence("kl", loop._cached[i], output_fn(model, batch), None)
                           for i, batch in enumerate(batches)) / len(batches)
                if float(loss) < best[0]:
                    best = (float(loss), {k: v.detach().clone() for k, v in state(rounded=False).items()}, it)
                if it % 25 == 0:
                    print(f"step {it}: KL {float(loss):.5f}", flush=True)
                if it == args.steps:
                    break
                loss.backward()
                opt.step()
                with torch.no_grad():
                    for _step, q, c in integers.values():
                        c.copy_(torch.minimum(torch.maximum(c, q - 1), q + 1) * (q != 0))
        finally:
            for key, linear in weights.items():
                del linear.weight
                linear._parameters["weight"] = saved[key]
    kl, moved, at = best
    after = sum(_entropy_bits(moved[k] / step) for k, (step, _q, _c) in integers.items()) / 8
    changed = sum(int((moved[k] / step != q).sum()) for k, (step, q, _c) in integers.items())
    print(f"best iterate (step {at}): KL {kl:.5f}; {changed} integers moved; entropy proxy {before:.0f} → {after:.0f} B; "
          f"retention {cells(moved)}")


if __name__ == "__main__":
    main()
