"""What the calibrated metric's gain is made of, and what can stand in for calibration data,
checked on tuning splits (the ones bench/balance_check.py uses, not the benchmark's evaluation
sets): retention at equal file size (`--target-bytes`) with

* none: data-free (default balance 1);
* K-FAC: bench/calibration.py's statistics from real training text (input moments S and output
  gradient moments G);
* S only / G only: the same file with the other side replaced by the identity;
* layer scale only: S and G replaced by tr(S)/n I and tr(G)/m I (which layers matter, not which
  directions);
* norm gains (causal LMs): S = diag(g^2) from the RMSNorm weight in front of the layer (from the
  base checkpoint alone), G = I;
* self-generated (causal LMs): `solar.self_calibrate`, the adapted model's own sampled text;
* random words (MiniLM): 512 sequences of random whole-word tokens, labels sampled from the
  adapted model (its true Fisher on nonsense input).

    python -m bench.calibration_check [--models stories260k minilm_sst2]
"""
from __future__ import annotations

import argparse
import os
import random
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

def _variant_files(model: str, task, kfac: dict, td: Path) -> list[tuple[str, list[str]]]:
    from safetensors.torch import load_file, save_file

    import solar

    def write(name: str, stats: dict) -> list[str]:
        path = td / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in stats.items()}, str(path))
        return ["--calib", str(path), "--balance", "0"]

    eye = {k: torch.eye(v.shape[0]) for k, v in kfac.items()}
    s_only = {k: (v if k.endswith("input_moment") else eye[k]) for k, v in kfac.items()}
    g_only = {k: (v if k.endswith("output_grad_moment") else eye[k]) for k, v in kfac.items()}
    scale = {k: eye[k] * float(v.double().trace() / v.shape[0]) for k, v in kfac.items()}
    out = [("none", []), ("K-FAC", write("kfac", kfac)), ("S only", write("s_only", s_only)),
           ("G only", write("g_only", g_only)), ("layer scale only", write("scale", scale))]
    if model == "stories260k":
        base = load_file(str(task.base_path))
        norms = {k: torch.diag(base[f"layers.{k.split('.')[1]}.attention_norm.weight"].double() ** 2).float()
                 for k in kfac if k.endswith("input_moment")}
        out.append(("norm gains", write("norms", norms)))
        out.append(("self-generated", write("self", solar.self_calibrate(task.model, bos_token_id=1, attention_mixing=False))))
    else:
        from bench.fixtures.train_minilm_sst2 import load_tokenizer

        tok = load_tokenizer()
        vocab = [i for t, i in tok.get_vocab().items() if t.isalpha() and t.islower() and len(t) > 1]
        rng, gen = random.Random(0), torch.Generator().manual_seed(0)
        texts = [" ".join(tok.convert_ids_to_tokens([rng.choice(vocab) for _ in range(rng.randint(6, 30))]))
                 for _ in range(512)]

        def batches():
            for i in range(0, len(texts), 32):
                enc = tok(texts[i: i + 32], padding=True, truncation=True, max_length=64, return_tensors="pt")
                with torch.no_grad():
                    p = torch.softmax(task.model(**enc).logits.float(), -1)
                enc["labels"] = torch.multinomial(p, 1, generator=gen)[:, 0]
                yield dict(enc)

        out.append(("random words", write("random_words", solar.calibrate(task.model, batches(), attention_mixing=False))))
    return out


def main(argv: list[str] | None = None) -> None:
    from safetensors.torch import load_file

    from bench.balance_check import BUDGETS, print_table_head, references, retention_cells, tuning_task
    from bench.calibration import ensure
    from bench.run import find_cli

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["stories260k", "minilm_sst2"])
    ap.add_argument("--threads", type=int, default=2, help="torch threads (1 when the machine is shared)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cli = find_cli()
    for model in args.models:
        task = tuning_task(model)
        refs = references(task)
        print_table_head(model, refs, ["statistics"], BUDGETS[model])
        with tempfile.TemporaryDirectory() as td:
            for label, extra in _variant_files(model, task, load_file(str(ensure(model, earlier=True))), Path(td)):
                print(f"| {label} | " + " | ".join(retention_cells(task, cli, BUDGETS[model], extra, refs, td)) + " |",
                      flush=True)


if __name__ == "__main__":
    main()
