"""Task metrics of a (restored) adapter on a fixed evaluation set.

One PeftModel per task is built once; each point loads its state dict into it with
``set_peft_model_state_dict`` and is scored on exactly the same data:

* stories260K + TinyShakespeare: mean next-token loss over the first ``windows`` non-overlapping
  ``seq_len``-token windows of the validation split (the last 10 % of the text).
* all-MiniLM-L6-v2 + SST-2: accuracy and mean cross-entropy on the GLUE dev set (872 sentences).
* SmolLM2-135M-Instruct + E2E NLG: mean next-token loss on the target text tokens (prompt masked)
  of a fixed subset of the E2E test set (128 pairs, bench/fixtures/train_smollm2_e2e.py; 15 s a pass).

"Base" is the same PeftModel with every lora_A / lora_B zeroed; passthrough tensors (MiniLM's
trained classifier head in ``modules_to_save``) are kept, so retention measures what the LoRA
factors contribute.
"""
from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from bench.fixtures.paths import fixtures_dir, minilm_dir, stories260k_dir  # noqa: E402


class Task:
    name: str
    metrics: tuple[str, ...]
    higher_is_better: dict[str, bool]
    adapter_dir: Path
    base_path: Path  # what the CLI gets as --base

    def evaluate(self, sd: dict[str, torch.Tensor]) -> dict[str, float]:
        """Each metric of the adapter `sd` on the evaluation set."""
        return {m: float(v.sum() / w.sum()) for m, (v, w) in self.per_example(sd).items()}

    def per_example(self, sd: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Each metric as (values, weights) per evaluation example (float64), the metric being
        sum(values) / sum(weights): what a bootstrap over the examples resamples (bench.noise_check)."""
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(self.model, sd)
        return self._per_example()

    def describe(self) -> str:
        raise NotImplementedError


class StoriesTask(Task):
    name = "stories260k"
    metrics = ("loss",)
    higher_is_better = {"loss": False}

    def __init__(self, windows: int = 64, seq_len: int = 256, adapter_dir: Path | None = None):
        from peft import PeftModel

        from bench.fixtures.stories import Tokenizer, eval_windows, load_stories260k
        from bench.fixtures.train_stories_lora import shakespeare_splits

        self.adapter_dir = Path(adapter_dir or fixtures_dir() / "stories260k_lora_r4")
        self.base_path = stories260k_dir() / "stories260K.safetensors"
        self.windows, self.seq_len = windows, seq_len
        tok = Tokenizer(str(stories260k_dir() / "tok512.bin"))
        _, val = shakespeare_splits(tok)
        self.data = eval_windows(val, seq_len, windows)  # fixed (windows, seq_len + 1)
        self.model = PeftModel.from_pretrained(load_stories260k(), str(self.adapter_dir)).eval()

    @torch.no_grad()
    def _per_example(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        sums = []
        for i in range(0, len(self.data), 16):
            w = self.data[i: i + 16]
            logits = self.model(w[:, :-1])
            token = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), w[:, 1:].reshape(-1),
                                                      reduction="none")
            sums.append(token.double().reshape(len(w), -1).sum(1))
        loss = torch.cat(sums)
        return {"loss": (loss, torch.full_like(loss, float(self.data.shape[1] - 1)))}

    def describe(self) -> str:
        return (f"stories260K (llama2.c) + LoRA r=4 on wq,wv; metric: mean next-token loss (nats) on the first "
                f"{len(self.data)} non-overlapping {self.seq_len}-token windows of the TinyShakespeare validation split")


class MiniLMTask(Task):
    name = "minilm_sst2"
    metrics = ("loss", "accuracy")
    higher_is_better = {"loss": False, "accuracy": True}

    def __init__(self, dev_limit: int | None = None, adapter_dir: Path | None = None):
        from peft import PeftModel

        from bench.fixtures.train_minilm_sst2 import load_base_model, load_sst2, load_tokenizer

        self.adapter_dir = Path(adapter_dir or fixtures_dir() / "minilm_sst2_lora_r8")
        self.base_path = minilm_dir()
        self.tokenizer = load_tokenizer()
        dev = load_sst2("dev", limit=dev_limit)
        # Same sentences, ordered by length so that batches carry little padding (~2x faster;
        # accuracy and mean loss do not depend on the order).
        lengths = [len(ids) for ids in self.tokenizer([s for s, _ in dev], truncation=True, max_length=64)["input_ids"]]
        self.dev = [dev[i] for i in sorted(range(len(dev)), key=lambda i: (lengths[i], i))]
        self.model = PeftModel.from_pretrained(load_base_model(0), str(self.adapter_dir)).eval()

    @torch.no_grad()
    def _per_example(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        from bench.fixtures.train_minilm_sst2 import batches

        losses, correct = [], []
        for enc, labels in batches(self.dev, self.tokenizer, 64):
            logits = self.model(**enc).logits.float()
            losses.append(torch.nn.functional.cross_entropy(logits, labels, reduction="none").double())
            correct.append((logits.argmax(-1) == labels).double())
        loss, acc = torch.cat(losses), torch.cat(correct)
        return {"loss": (loss, torch.ones_like(loss)), "accuracy": (acc, torch.ones_like(acc))}

    def describe(self) -> str:
        return (f"all-MiniLM-L6-v2 (BertForSequenceClassification) + LoRA r=8 on query,value + classifier head "
                f"(modules_to_save); metrics: accuracy and mean cross-entropy on the SST-2 dev set "
                f"({len(self.dev)} sentences, max 64 tokens)")


class SmolLM2Task(Task):
    name = "smollm2_e2e"
    metrics = ("loss",)
    higher_is_better = {"loss": False}

    def __init__(self, eval_examples: int | None = None, adapter_dir: Path | None = None):
        from peft import PeftModel

        from bench.fixtures import train_smollm2_e2e as e2e

        self.adapter_dir = Path(adapter_dir or fixtures_dir() / "smollm2_e2e_lora_r8")
        self.n_eval = eval_examples or e2e.EVAL_EXAMPLES
        self.batches = e2e.eval_batches(e2e.load_tokenizer(), e2e.eval_examples(self.n_eval))
        base = e2e.load_base_model()
        self.base_path = e2e.smollm2_base_path(base)  # the dequantised weights as one file (exported once)
        self.model = PeftModel.from_pretrained(base, str(self.adapter_dir)).eval()

    @torch.no_grad()
    def _per_example(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        from bench.fixtures.train_smollm2_e2e import target_loss

        sums, counts = [], []
        for b in self.batches:
            token = target_loss(self.model, b, reduction="none").double()  # the target tokens, row by row
            per_row = (b["labels"][:, 1:] != -100).sum(1)
            sums.append(torch.stack([t.sum() for t in token.split(per_row.tolist())]))
            counts.append(per_row.double())
        return {"loss": (torch.cat(sums), torch.cat(counts))}

    def describe(self) -> str:
        tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in self.batches)
        return (f"SmolLM2-135M-Instruct (Q4_1 GGUF dequantised to fp32) + LoRA r=8 on q_proj,v_proj (60 modules), "
                f"trained on E2E NLG; metric: mean next-token loss (nats) on the target text of {self.n_eval} "
                f"E2E test pairs ({tokens} target tokens; prompt 'MR\\n=>' masked)")


TASKS = {"stories260k": StoriesTask, "minilm_sst2": MiniLMTask, "smollm2_e2e": SmolLM2Task}


def retention(base: dict[str, float], lora: dict[str, float], got: dict[str, float]) -> dict[str, float]:
    """(metric_base - metric) / (metric_base - metric_lora), per metric (same formula for loss and
    accuracy: the signs cancel). 1 = the full gain of the LoRA, 0 = no better than the base."""
    out = {}
    for k, v in got.items():
        gap = base[k] - lora[k]
        out[k] = (base[k] - v) / gap if gap != 0 else float("nan")
    return out
