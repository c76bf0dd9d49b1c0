"""Why the model in the loop helps, and two ways of using it that did not beat `solar.refine`
(stories260K at half of int4's file, 1,284 B, with the benchmark's attention-mixed statistics).

Part 1, coupling: the file plain `compress` writes, each layer's coding error put into the adapted
model alone. Per layer: the KL divergence it causes alone (refine's 128 training windows) over
what the statistics predict (tr(G E S Eᵀ), damped as the encoder damps them), and cosines in the
layer's K-FAC metric between its own error E, the K-FAC-preconditioned gradient G⁻¹ ∇ S⁻¹ of the
divergence with that error alone, and the same gradient with every layer's error present. A
quadratic model with independent layers would give cosines of 1 and gradients that do not depend
on the other layers.

Part 2, Newton targets: refine's rounds, with the target each round moved toward the K-FAC Newton
point R − G⁻¹ ∇ S⁻¹ / κ (R the restored update, κ the measured divergence over the statistics'
prediction), by a share `eta`, and cut to the LoRA rank in the metric, instead of refine's small
gradient steps. Keeps the smallest-divergence file, as refine does.

Part 3, true-Fisher statistics: `solar.calibrate` on the benchmark's 32 training windows with the
labels drawn from the adapted model's own distribution (4 draws per window) instead of the text's
next tokens, so that G estimates the Fisher of the KL divergence; plain `compress` at five sizes
against the benchmark's statistics.

Part 4, nearest Kronecker product: K-FAC's S ⊗ G is the product of the means of x xᵀ and g gᵀ; the
per-position Fisher mean(x xᵀ ⊗ g gᵀ) has a nearest Kronecker product A ⊗ B in Frobenius norm
(alternating least squares from S, G; 5 sweeps) that keeps the positions where large inputs meet
large gradients together. Same windows and loss as the benchmark's statistics; for every layer, and
for the query projections only with the value projections' attention-mixed moments.

Retention of the fine-tuning gain in % on the benchmark's evaluation set / the tuning split.

    python -m bench.coupling_check [--parts 1 2 3] [--eta 0.05 0.15 0.3] [--rounds 8]
"""
from __future__ import annotations

import argparse
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

BYTES = 1284


def main(argv: list[str] | None = None) -> None:
    import solar
    from solar.refine import _damped, _Loop, _statistics_and_damping

    from bench.balance_check import stories_loss_retention
    from bench.calibration import ensure
    from bench.evaluate import TASKS
    from bench.refine_check import stories_setup

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", type=int, nargs="+", default=[1, 2, 3, 4], choices=[1, 2, 3, 4])
    ap.add_argument("--eta", type=float, nargs="+", default=[0.05, 0.15, 0.3])
    ap.add_argument("--rounds", type=int, default=8)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    model, batches, output_fn, _ = stories_setup()
    cells = stories_loss_retention()
    base = str(TASKS["stories260k"]().base_path)
    mixed = str(ensure("stories260k", mixed=True))

    stats, damping = _statistics_and_damping(mixed, {})
    loop = _Loop("coupling_check", model, batches, None, BYTES, output_fn, "kl", None, {})
    layers, original = loop.layers, loop.original
    G = {p: _damped(stats[f"{p}.output_grad_moment"], damping) for p in layers}
    S = {p: _damped(stats[f"{p}.input_moment"], damping) for p in layers}

    def dense(state) -> dict:
        return {p: s * state[b].double() @ state[a].double() for p, (_m, s, a, b) in layers.items()}

    def preconditioned(p):
        return torch.linalg.solve(G[p], loop.grads[p]) @ torch.linalg.inv(S[p])

    def inner(p, x, y) -> float:
        return float((x * (G[p] @ y @ S[p])).sum())

    def cosine(p, x, y) -> float:
        return inner(p, x, y) / math.sqrt(inner(p, x, x) * inner(p, y, y))

    target0 = dense(original)
    with loop:
        if 1 in args.parts:
            restored = loop.round(original, stats, {}, with_grad=True)
            total = loop.history["divergence"][-1]
            together = {p: preconditioned(p) for p in layers}
            R = dense(restored)
            print(f"\npart 1: {loop.history['bytes'][-1]:,} B file, KL {total:.5f}")
            print("| layer | KL alone | KL alone / tr(G E S Eᵀ) | cos(own error, gradient alone) | "
                  "cos(own error, gradient together) | cos(gradient alone, together) |")
            print("|---|---:|---:|---:|---:|---:|")
            alone_sum = 0.0
            for p, (_m, _s, a, b) in layers.items():
                alone = dict(original)
                alone[a], alone[b] = restored[a], restored[b]
                kl = loop.measure(alone, with_grad=True)
                alone_sum += kl
                E = R[p] - target0[p]
                P = preconditioned(p)
                print(f"| {p} | {kl:.5f} | {kl / inner(p, E, E):.3g} | {cosine(p, E, P):.3f} | "
                      f"{cosine(p, E, together[p]):.3f} | {cosine(p, P, together[p]):.3f} |", flush=True)
            print(f"sum of the layers' KL alone {alone_sum:.5f}, all layers together {total:.5f}")

        if 2 in args.parts:
            # The rank cut of a full-rank target in the metric: SVD of G^½ T S^½, mapped back.
            def roots(m):
                w, v = torch.linalg.eigh(m)
                return (v * w.clamp_min(0).sqrt()) @ v.T, (v / w.clamp_min(1e-300).sqrt()) @ v.T
            gr, sr = {p: roots(G[p]) for p in layers}, {p: roots(S[p]) for p in layers}

            def as_adapter(target) -> dict:
                state = dict(original)
                for p, (_m, s, a, b) in layers.items():
                    u, sv, vt = torch.linalg.svd(gr[p][0] @ target[p] @ sr[p][0], full_matrices=False)
                    k = original[a].shape[0]
                    root = (sv[:k] / s).sqrt()
                    lora_a, lora_b = torch.zeros_like(original[a], dtype=torch.float64), torch.zeros_like(original[b], dtype=torch.float64)
                    lora_a[:k] = root[:, None] * (vt[:k] @ sr[p][1])
                    lora_b[:, :k] = (gr[p][1] @ u[:, :k]) * root
                    state[a], state[b] = lora_a.to(original[a].dtype), lora_b.to(original[b].dtype)
                return state

            print(f"\npart 2: Newton targets, {args.rounds} rounds (round 0: plain compress)")
            print("| eta | KL per round | kept round | retention | bytes |")
            print("|---:|---|---:|---|---:|")
            for eta in args.eta:
                loop.best, loop.history = None, {"divergence": [], "bytes": []}
                target = dict(target0)
                for r in range(args.rounds + 1):
                    restored = loop.round(as_adapter(target) if r else original, stats, {}, with_grad=r < args.rounds)
                    if r == args.rounds:
                        break
                    R = dense(restored)
                    quad = sum(inner(p, R[p] - target0[p], R[p] - target0[p]) for p in layers)
                    kappa = 2 * loop.history["divergence"][-1] / quad
                    for p in layers:
                        target[p] = (1 - eta) * target[p] + eta * (R[p] - preconditioned(p) / kappa)
                kl = " ".join(f"{x:.4f}" for x in loop.history["divergence"])
                print(f"| {eta} | {kl} | {loop.best[1]} | {cells(loop.best[2])} | {loop.best[2].nbytes:,} |", flush=True)

    budgets = [1100, 1200, 1284, 1400, 1620]

    def compare(rows) -> None:
        print("| statistics | " + " | ".join(f"{b:,} B" for b in budgets) + " |")
        print("|---|" + "---|" * len(budgets))
        for label, st in rows:
            row = []
            for b in budgets:
                packed = solar.compress(model, base, target_bytes=b, calibration=st)
                row.append(f"{cells(packed)} ({packed.nbytes:,})")
            print(f"| {label} | " + " | ".join(row) + " |", flush=True)

    if 3 in args.parts or 4 in args.parts:
        from peft import PeftModel

        from bench.fixtures.paths import fixtures_dir, stories260k_dir
        from bench.fixtures.stories import Tokenizer, load_stories260k
        from bench.fixtures.train_stories_lora import shakespeare_splits

        train, _ = shakespeare_splits(Tokenizer(str(stories260k_dir() / "tok512.bin")))
        peft_model = PeftModel.from_pretrained(load_stories260k(), str(fixtures_dir() / "stories260k_lora_r4"))
        g = torch.Generator().manual_seed(0)  # bench.calibration's windows
        starts = torch.randint(0, len(train) - 257, (32,), generator=g).tolist()

    if 3 in args.parts:
        import torch.nn.functional as F

        draws = torch.Generator().manual_seed(123)

        def sampled_loss(m, batch):
            x = batch["input_ids"]
            logits = m(x[:, :-1])
            logits = logits.reshape(-1, logits.shape[-1])
            with torch.no_grad():
                y = torch.multinomial(torch.softmax(logits.detach().double(), -1), 1, generator=draws)[:, 0]
            return F.cross_entropy(logits, y, reduction="sum") / (x.shape[1] - 1)

        true_fisher = solar.calibrate(peft_model, [{"input_ids": train[s: s + 257][None].repeat(4, 1)} for s in starts],
                                      loss_fn=sampled_loss)
        print("\npart 3: plain compress, retention (bytes)")
        compare([("benchmark's (next tokens, attention-mixed)", mixed), ("true Fisher (sampled labels, 4 draws)", true_fisher)])

    if 4 in args.parts:
        from solar.calibrate import _coded_modules

        from bench.calibration import stories_lm_loss

        rows_x: dict = {}
        rows_g: dict = {}

        def capture(path):
            def hook(_mod, inputs, output):
                rows_x.setdefault(path, []).append(inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double())
                output.register_hook(lambda grad: rows_g.setdefault(path, []).append(grad.reshape(-1, grad.shape[-1]).double()))
            return hook

        modules = _coded_modules(peft_model)
        for n, q in peft_model.named_parameters():
            q.requires_grad_("lora_" in n)
        hooks = [m.register_forward_hook(capture(p)) for p, m in modules.items()]
        try:
            for s in starts:
                stories_lm_loss(peft_model, {"input_ids": train[s: s + 257][None]}).backward()
        finally:
            for h in hooks:
                h.remove()
        plain = solar.calibrate(peft_model, [{"input_ids": train[s: s + 257][None]} for s in starts],
                                loss_fn=stories_lm_loss, attention_mixing=False)
        mixed_stats = _statistics_and_damping(mixed, {})[0]
        nearest, queries = {}, {}
        for p in modules:
            x, gr = torch.cat(rows_x[p]), torch.cat(rows_g[p])
            rows = x.shape[0]
            S_, G_ = x.T @ x / rows, gr.T @ gr / rows
            assert torch.allclose(S_.float(), plain[f"{p}.input_moment"], rtol=1e-4, atol=1e-7)  # K-FAC's own
            A, B = S_.clone(), G_.clone()
            for _ in range(5):
                A = (x * ((gr @ B) * gr).sum(1)[:, None]).T @ x / rows / float((B * B).sum())
                B = (gr * ((x @ A) * x).sum(1)[:, None]).T @ gr / rows / float((A * A).sum())
            c = float(A.trace() / S_.trace())
            nearest[f"{p}.input_moment"], nearest[f"{p}.output_grad_moment"] = (A / c).float(), (B * c).float()
            for k in (f"{p}.input_moment", f"{p}.output_grad_moment"):
                queries[k] = nearest[k] if ".wq" in p else mixed_stats[k]
        print("\npart 4: plain compress, retention (bytes)")
        compare([("K-FAC (plain moments)", plain), ("nearest Kronecker product, every layer", nearest),
                 ("benchmark's (attention-mixed)", mixed), ("nearest Kronecker product for queries, mixed values", queries)])


if __name__ == "__main__":
    main()
