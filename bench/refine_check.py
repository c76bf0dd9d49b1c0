"""Compression with the model in the loop (`solar.refine`) against plain `compress`, at equal bytes.

Both with the benchmark's K-FAC statistics (bench.calibration) and the same `--target-bytes`;
refine also runs the model: stories260K on 128 random 256-token windows of the TinyShakespeare
training split (the adapter's own training text; only the adapted model's outputs are matched),
MiniLM on the 512 held-out SST-2 training sentences its statistics come from (no labels used),
the head coded with the layers as in the benchmark (`passthrough="spectral"`). Retention of the
fine-tuning gain (loss; MiniLM also accuracy) on the benchmark's evaluation set and on the tuning
split the other checks use (bench.balance_check.tuning_task), and the KL divergence on refine's
own batches of round 0 (plain compress) and of the file kept.

    python -m bench.refine_check [--models stories260k minilm_sst2] [--steps 32] [--step-size 0.002] [--reweigh 3]
    python -m bench.refine_check --models stories260k --steps 0   # re-weighing rounds alone (solar.reweigh's)
    python -m bench.refine_check --models stories260k --self   # no data: self-generated statistics and text
    python -m bench.refine_check --models minilm_sst2 --bytes 4325 [--no-first-order] [--hidden]
    python -m bench.refine_check --models smollm2_e2e --steps 16   # 32 of its held-out pairs, ~15 min a point
    python -m bench.refine_check --models stories260k --bytes 1284 --reweigh 0 --stats FILE   # other statistics
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

BUDGETS = {"stories260k": [1000, 1100, 1284, 1400, 1620], "minilm_sst2": [3500, 4325, 5000, 5500], "smollm2_e2e": [6494]}


def stories_setup():
    from peft import PeftModel

    from bench.fixtures.paths import fixtures_dir, stories260k_dir
    from bench.fixtures.stories import Tokenizer, load_stories260k
    from bench.fixtures.train_stories_lora import shakespeare_splits

    train, _ = shakespeare_splits(Tokenizer(str(stories260k_dir() / "tok512.bin")))
    g = torch.Generator().manual_seed(1)
    starts = torch.randint(0, len(train) - 257, (128,), generator=g).tolist()
    windows = torch.stack([train[s: s + 257] for s in starts])
    model = PeftModel.from_pretrained(load_stories260k(), str(fixtures_dir() / "stories260k_lora_r4")).eval()
    batches = [windows[i: i + 32] for i in range(0, len(windows), 32)]
    return model, batches, (lambda m, b: m(b[:, :-1])), {}


def minilm_setup():
    from peft import PeftModel

    from bench.fixtures.paths import fixtures_dir
    from bench.fixtures.train_minilm_sst2 import load_base_model, load_sst2, load_tokenizer

    tok = load_tokenizer()
    model = PeftModel.from_pretrained(load_base_model(), str(fixtures_dir() / "minilm_sst2_lora_r8")).eval()
    examples = load_sst2("train")[-512:]
    batches = [dict(tok([t for t, _ in examples[i: i + 64]], padding=True, truncation=True, max_length=64,
                        return_tensors="pt")) for i in range(0, len(examples), 64)]
    # The classifier's logits have no position axis: attention_mask does not apply to them.
    return model, batches, (lambda m, b: m(**b).logits), {"passthrough": "spectral"}


def smollm2_setup():
    from peft import PeftModel

    from bench.fixtures.paths import fixtures_dir
    from bench.fixtures.train_smollm2_e2e import collate, heldout_examples, load_base_model, load_tokenizer

    tok = load_tokenizer()
    model = PeftModel.from_pretrained(load_base_model(), str(fixtures_dir() / "smollm2_e2e_lora_r8")).eval()
    # 32 of the 256 held-out pairs its statistics come from: a round is a 135M model's pass over them.
    examples = heldout_examples(256)[:32]
    batches = [collate(tok, examples[i: i + 16]) for i in range(0, len(examples), 16)]
    return model, batches, (lambda m, b: m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits), {}


SETUPS = {"stories260k": stories_setup, "minilm_sst2": minilm_setup, "smollm2_e2e": smollm2_setup}  # -> (PeftModel, batches, output_fn, options)


def main(argv: list[str] | None = None) -> None:
    import solar
    from bench.balance_check import references, tuning_task
    from bench.calibration import ensure
    from bench.evaluate import TASKS, retention

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["stories260k", "minilm_sst2"], choices=list(BUDGETS))
    ap.add_argument("--bytes", type=int, nargs="+", help="budgets (default: per model)")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--step-size", type=float, default=0.002)
    ap.add_argument("--reweigh", type=int, default=3, help="re-weighing rounds before the gradient rounds")
    ap.add_argument("--hidden", action="store_true",
                    help="MiniLM: match the last hidden states (squared distance) instead of the classifier's outputs")
    ap.add_argument("--self", dest="self_text", action="store_true",
                    help="stories260K without data: self-generated statistics (the solar-spectral-selfcal family's) "
                         "and refine on 128 sequences the adapted model samples (solar.sample_text, seed 1)")
    ap.add_argument("--stats", help="a statistics file to use instead of the benchmark's K-FAC ones")
    ap.add_argument("--no-first-order", action="store_true",
                    help="MiniLM: K-FAC statistics without the first-order entries the benchmark's carry")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    for name in args.models:
        model, batches, output_fn, options = SETUPS[name]()
        objective = "kl"
        if args.hidden:
            output_fn, objective = (lambda m, b: m(**b, output_hidden_states=True).hidden_states[-1]), "mse"
        tasks = {"eval": TASKS[name](), "tuning": tuning_task(name)}
        refs = {k: references(t) for k, t in tasks.items()}
        stats = args.stats or str(ensure(name, first_order=False if args.no_first_order else None))
        if args.self_text:
            from bench.self_calibration import SELF_CALIBRATED, ensure_self

            stats = str(ensure_self(name))
            ids = solar.sample_text(model, sequences=128, length=256, seed=1, **SELF_CALIBRATED[name])
            batches = [ids[i: i + 32] for i in range(0, len(ids), 32)]
        base = str(tasks["eval"].base_path)

        def cells(packed) -> str:
            restored = {k: v.float() for k, v in solar.restore(packed, base).items()}
            out = []
            for split, task in tasks.items():
                ret = retention(*refs[split], task.evaluate(restored))
                out.append(" / ".join(f"{100 * ret[m]:.2f}" for m in task.metrics))
            return ", ".join(out)

        print(f"\n{name}: retention in % ({'loss / accuracy, ' if name == 'minilm_sst2' else ''}evaluation set, "
              f"then tuning split); KL on refine's batches; {args.reweigh} re-weighing and {args.steps} gradient rounds, "
              f"step {args.step_size}")
        print("| bytes | compress | refine | KL compress → refine | refine time |")
        print("|---:|---|---|---|---:|")
        for budget in args.bytes or BUDGETS[name]:
            plain = solar.compress(model, base, target_bytes=budget, calibration=stats, **options)
            t0 = time.time()
            refined = solar.refine(model, batches, base, target_bytes=budget, steps=args.steps, step_size=args.step_size,
                                   reweigh=args.reweigh,
                                   output_fn=output_fn, objective=objective, calibration=stats, **options)
            took = time.time() - t0
            kl = refined.refinement["divergence"]
            print(f"| {budget:,} | {cells(plain)} ({plain.nbytes:,} B) | {cells(refined)} ({refined.nbytes:,} B) | "
                  f"{kl[0]:.4f} → {kl[refined.refinement['best']]:.4f} (round {refined.refinement['best']}) | "
                  f"{took:.0f} s |", flush=True)


if __name__ == "__main__":
    main()
