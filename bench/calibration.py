"""K-FAC calibration statistics for the benchmark's calibrated spectral points.

Computed with ``solar.calibrate`` on data the adapters were not evaluated on: stories260K on 32
random 256-token windows of the TinyShakespeare *training* split (LM loss); MiniLM on the last
512 SST-2 training sentences (the fixture trained on the first 12,800), with their labels, and
first-order statistics (the sentences are held out from its training);
SmolLM2 on 256 pairs of E2E valid.txt (its training file) that the fixture never trained on (the
tail of its training run's shuffle; the eval scores test.txt) with the training loss (target
tokens only, prompt masked). Until 2026-11-30 SmolLM2's came from the last 64 pairs of valid.txt,
each with a 34% chance of having been trained on; on a tuning split the never-seen pairs did
better at 4,000 and 8,500 B and the same at 23,000 B (`python -m bench.first_order_check --parts
4`), so the benchmark moved to them. The tuning-split checks that recorded README figures with the
earlier files keep them: ``ensure(model, earlier=True)``.
Cached under bench/results/cache/ (not committed: ~14 MB for MiniLM, ~124 MB for SmolLM2).

    python -m bench.calibration {stories260k|minilm_sst2|smollm2_e2e} [--out FILE]
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CACHE = Path(__file__).resolve().parent / "results" / "cache"


# Models whose statistics carry first-order entries by default (solar.calibrate's first_order):
# their calibration data must be data the adapter was not trained on. stories260K's windows are
# its training data, where the mean gradient is mostly noise; SmolLM2's pairs are held out, but
# there the entries gave nothing measurable (bench.first_order_check, part 4).
FIRST_ORDER = {"minilm_sst2"}
HELD_OUT_DATA = {"minilm_sst2", "smollm2_e2e"}  # calibration data the adapter never trained on


def _with_first_order(model: str, first_order: bool | None, earlier: bool) -> bool:
    return model in FIRST_ORDER and not earlier if first_order is None else first_order


def stats_path(model: str, first_order: bool | None = None, earlier: bool = False, mixed: bool = False) -> Path:
    """The cached statistics; `first_order` defaults to the model being in FIRST_ORDER.
    `earlier`: the files the tuning-split checks recorded their figures with (MiniLM: without
    first-order entries; SmolLM2: from the last 64 pairs of valid.txt, partly training data).
    `mixed`: the same data with the value projections' moments mixed by attention
    (solar.calibrate's attention_mixing)."""
    first_order = _with_first_order(model, first_order, earlier)
    if first_order and (model not in HELD_OUT_DATA or earlier):
        raise ValueError(f"{model}: its calibration data is training data; no first-order statistics")
    if mixed:
        if earlier:
            raise ValueError("attention-mixed statistics exist for the current calibration data only")
        plain = stats_path(model, first_order)
        return plain.with_name(plain.stem + "_mixed" + plain.suffix)
    if model == "minilm_sst2":
        # Also the classifier head's statistics (solar.calibrate records modules_to_save heads
        # since format v6).
        return CACHE / f"{model}_kfac_{'first_order' if first_order else 'heads'}.safetensors"
    if model == "smollm2_e2e" and not earlier:
        return CACHE / f"{model}_kfac_held_out{'_first_order' if first_order else ''}.safetensors"
    return CACHE / f"{model}_kfac.safetensors"


def stories_lm_loss(m, batch):
    """stories260K's next-token loss on a batch of windows ({"input_ids": (b, seq_len + 1)})."""
    import torch.nn.functional as F

    x = batch["input_ids"]
    logits = m(x[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))


# Each calibrator takes `adapter_dir` to calibrate another adapter of the same model on the same
# data (bench.dora_check: the DoRA fixtures); by default the benchmark's LoRA fixture.
def _stories(out: Path, first_order: bool = False, earlier: bool = False, adapter_dir: Path | None = None,
             mixed: bool = False) -> None:
    import torch
    from peft import PeftModel

    import solar
    from bench.fixtures.paths import fixtures_dir, stories260k_dir
    from bench.fixtures.stories import Tokenizer, load_stories260k
    from bench.fixtures.train_stories_lora import shakespeare_splits

    tok = Tokenizer(str(stories260k_dir() / "tok512.bin"))
    train, _ = shakespeare_splits(tok)
    model = PeftModel.from_pretrained(load_stories260k(), str(adapter_dir or fixtures_dir() / "stories260k_lora_r4"))
    g = torch.Generator().manual_seed(0)
    starts = torch.randint(0, len(train) - 257, (32,), generator=g).tolist()
    batches = [{"input_ids": train[s: s + 257][None]} for s in starts]
    solar.calibrate(model, batches, loss_fn=stories_lm_loss, first_order=first_order, attention_mixing=mixed, out=out)


def _minilm(out: Path, first_order: bool = False, earlier: bool = False, adapter_dir: Path | None = None,
            mixed: bool = False) -> None:
    import torch
    from peft import PeftModel

    import solar
    from bench.fixtures.paths import fixtures_dir
    from bench.fixtures.train_minilm_sst2 import load_base_model, load_sst2, load_tokenizer

    tok = load_tokenizer()
    model = PeftModel.from_pretrained(load_base_model(), str(adapter_dir or fixtures_dir() / "minilm_sst2_lora_r8"))
    examples = load_sst2("train")[-512:]

    def batches():
        for i in range(0, len(examples), 32):
            chunk = examples[i: i + 32]
            enc = tok([t for t, _ in chunk], padding=True, truncation=True, max_length=64, return_tensors="pt")
            enc["labels"] = torch.tensor([y for _, y in chunk])
            yield dict(enc)

    solar.calibrate(model, batches(), first_order=first_order, attention_mixing=mixed, out=out)


def _smollm2(out: Path, first_order: bool = False, earlier: bool = False, adapter_dir: Path | None = None,
             mixed: bool = False) -> None:
    from peft import PeftModel

    import solar
    from bench.fixtures.paths import fixtures_dir
    from bench.fixtures.train_smollm2_e2e import (calib_examples, collate, heldout_examples, load_base_model,
                                                  load_tokenizer, target_loss)

    tok = load_tokenizer()
    model = PeftModel.from_pretrained(load_base_model(), str(adapter_dir or fixtures_dir() / "smollm2_e2e_lora_r8"))
    examples = calib_examples() if earlier else heldout_examples(256)
    batches = [collate(tok, examples[i: i + 16]) for i in range(0, len(examples), 16)]
    solar.calibrate(model, batches, loss_fn=target_loss, first_order=first_order, attention_mixing=mixed, out=out)


# Each writes the statistics to `out`; `earlier` selects the data the tuning-split checks recorded
# with, which changed for SmolLM2 only (MiniLM's earlier file is the one without first order).
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


def ensure(model: str, first_order: bool | None = None, earlier: bool = False, mixed: bool = False) -> Path:
    """The statistics file for `model` (see stats_path), computed once."""
    path = stats_path(model, first_order, earlier, mixed)
    first_order = _with_first_order(model, first_order, earlier)

    def make(tmp: Path) -> None:
        import torch

        torch.manual_seed(0)
        CALIBRATORS[model](tmp, first_order=first_order, earlier=earlier, mixed=mixed)

    return cached(path, make)


# Models whose report carries the re-weighed family (solar.reweigh), with the file size the
# weights are measured at: stories260K's half-size-check budget (half of int4's file). Not MiniLM:
# there its 12 LoRA layers' measured ratios swing from round to round and the divergence did not fall
# (bench.refine_check --models minilm_sst2 --bytes 4325 --steps 0).
REWEIGH_BYTES = {"stories260k": 1284}


def reweighed_path(model: str) -> Path:
    return CACHE / f"{model}_kfac_reweighed.safetensors"


def ensure_reweighed(model: str) -> Path:
    """The benchmark's K-FAC statistics re-weighed with the model in the loop (solar.reweigh, 3
    rounds at REWEIGH_BYTES, on bench.refine_check's batches: for stories260K 128 training
    windows), computed once."""
    def make(tmp: Path) -> None:
        import solar
        from bench.refine_check import SETUPS

        peft_model, batches, output_fn, options = SETUPS[model]()
        solar.reweigh(peft_model, batches, None, calibration=str(ensure(model)), target_bytes=REWEIGH_BYTES[model],
                      output_fn=output_fn, out=tmp, **options)

    return cached(reweighed_path(model), make)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", choices=sorted(CALIBRATORS))
    print(ensure(ap.parse_args().model))
