"""K-FAC calibration statistics for the benchmark's calibrated spectral points.

Computed with ``solar.calibrate`` on data the adapters were not evaluated on: stories260K on 32
random 256-token windows of the TinyShakespeare *training* split (LM loss); MiniLM on the last
512 SST-2 training sentences (the fixture trained on the first 12,800), with their labels, and
first-order statistics (the sentences are held out from its training);
SmolLM2 on the last 64 pairs of E2E valid.txt (its training file; the eval scores test.txt) with
the training loss (target tokens only, prompt masked).
Cached under bench/results/cache/ (not committed: ~14 MB for MiniLM, ~124 MB for SmolLM2).

    python -m bench.calibration {stories260k|minilm_sst2|smollm2_e2e} [--out FILE]
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CACHE = Path(__file__).resolve().parent / "results" / "cache"


# Models whose calibration data the adapter was not trained on: their statistics carry first-order
# entries by default (solar.calibrate's first_order). stories260K's windows and SmolLM2's pairs
# come from the adapters' training data, where the mean gradient is mostly noise.
HELD_OUT = {"minilm_sst2"}


def stats_path(model: str, first_order: bool | None = None) -> Path:
    """The cached statistics; `first_order` defaults to the model being in HELD_OUT."""
    if first_order is None:
        first_order = model in HELD_OUT
    if first_order and model not in HELD_OUT:
        raise ValueError(f"{model}: its calibration data is training data; no first-order statistics")
    if model == "minilm_sst2":
        # Also the classifier head's statistics (solar.calibrate records modules_to_save heads
        # since format v6); the K-FAC-only file is what the tuning-split checks before first-order
        # statistics measured with.
        return CACHE / f"{model}_kfac_{'first_order' if first_order else 'heads'}.safetensors"
    return CACHE / f"{model}_kfac.safetensors"


def _stories(out: Path, first_order: bool = False) -> None:
    import torch
    import torch.nn.functional as F
    from peft import PeftModel

    import solar
    from bench.fixtures.paths import fixtures_dir, stories260k_dir
    from bench.fixtures.stories import Tokenizer, load_stories260k
    from bench.fixtures.train_stories_lora import shakespeare_splits

    tok = Tokenizer(str(stories260k_dir() / "tok512.bin"))
    train, _ = shakespeare_splits(tok)
    model = PeftModel.from_pretrained(load_stories260k(), str(fixtures_dir() / "stories260k_lora_r4"))
    g = torch.Generator().manual_seed(0)
    starts = torch.randint(0, len(train) - 257, (32,), generator=g).tolist()
    batches = [{"input_ids": train[s: s + 257][None]} for s in starts]

    def lm_loss(m, batch):
        x = batch["input_ids"]
        logits = m(x[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))

    solar.calibrate(model, batches, loss_fn=lm_loss, first_order=first_order, out=out)


def _minilm(out: Path, first_order: bool = False) -> None:
    import torch
    from peft import PeftModel

    import solar
    from bench.fixtures.paths import fixtures_dir
    from bench.fixtures.train_minilm_sst2 import load_base_model, load_sst2, load_tokenizer

    tok = load_tokenizer()
    model = PeftModel.from_pretrained(load_base_model(), str(fixtures_dir() / "minilm_sst2_lora_r8"))
    examples = load_sst2("train")[-512:]

    def batches():
        for i in range(0, len(examples), 32):
            chunk = examples[i: i + 32]
            enc = tok([t for t, _ in chunk], padding=True, truncation=True, max_length=64, return_tensors="pt")
            enc["labels"] = torch.tensor([y for _, y in chunk])
            yield dict(enc)

    solar.calibrate(model, batches(), first_order=first_order, out=out)


def _smollm2(out: Path, first_order: bool = False) -> None:
    from peft import PeftModel

    import solar
    from bench.fixtures.paths import fixtures_dir
    from bench.fixtures.train_smollm2_e2e import calib_examples, collate, load_base_model, load_tokenizer, target_loss

    tok = load_tokenizer()
    model = PeftModel.from_pretrained(load_base_model(), str(fixtures_dir() / "smollm2_e2e_lora_r8"))
    examples = calib_examples()
    batches = [collate(tok, examples[i: i + 16]) for i in range(0, len(examples), 16)]
    solar.calibrate(model, batches, loss_fn=target_loss, first_order=first_order, out=out)


CALIBRATORS = {"stories260k": _stories, "minilm_sst2": _minilm, "smollm2_e2e": _smollm2}


def cached(out: Path, make) -> Path:
    """`out`, made once by make(tmp_path) on 2 torch threads and moved into place atomically."""
    if not out.exists():
        import torch

        torch.set_num_threads(2)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        make(tmp)
        tmp.replace(out)
    return out


def ensure(model: str, first_order: bool | None = None) -> Path:
    """The statistics file for `model` (see stats_path), computed once."""
    path = stats_path(model, first_order)

    def make(tmp: Path) -> None:
        import torch

        torch.manual_seed(0)
        CALIBRATORS[model](tmp, first_order=model in HELD_OUT if first_order is None else first_order)

    return cached(path, make)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", choices=sorted(CALIBRATORS))
    print(ensure(ap.parse_args().model))
