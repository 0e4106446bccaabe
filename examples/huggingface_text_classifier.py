"""Monitor a Hugging Face text classifier: tokenizer-style batches with attention masks.

A ``BertForSequenceClassification`` built from a tiny ``BertConfig`` (nothing is
downloaded) trains on a synthetic task (does the sequence contain token 7?) with padded
sequences, in a Lightning ``Trainer`` with ``NTKMonitor``. The batches are dicts
``{input_ids, attention_mask, token_type_ids, labels}``, as a tokenizer and a collator
produce them: the monitor draws its probe from them, keeps every field but the labels,
and evaluates the model as ``model(**inputs)``; ``output_fn`` picks the logits out of
the model's output object.

The model's attention and embeddings are not all supported by the structured method
(position embeddings come from a ``(1, T)`` buffer, attention runs through SDPA, a
padding check calls ``.item()``): the engine uses per-example Jacobians there and falls
back where ``vmap`` cannot run, and ``tracker.kernel_info`` says how it went.

Run: ``python examples/huggingface_text_classifier.py`` (seconds on a CPU). Exits 0 with
a message when ``transformers`` is not installed (``pip install lightning-ntk[hf]``).
"""

from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

try:
    from transformers import BertConfig, BertForSequenceClassification
except ImportError:
    print("transformers is not installed: skipping (pip install 'lightning-ntk[hf]').")
    sys.exit(0)

import pytorch_lightning as pl

from lightning_ntk import NTKMonitor

VOCAB, LENGTH, MARKER = 32, 12, 7


class Sentences(Dataset):
    """Padded token sequences; the label says whether the marker token occurs."""

    def __init__(self, n: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.arange(n) % 2
        lengths = torch.randint(4, LENGTH + 1, (n,), generator=g)
        self.mask = (torch.arange(LENGTH)[None] < lengths[:, None]).long()
        ids = torch.randint(8, VOCAB, (n, LENGTH), generator=g)  # no marker by chance
        where = (torch.rand(n, generator=g) * (lengths - 1)).long() + 1
        ids[self.labels == 1, where[self.labels == 1]] = MARKER
        ids[:, 0] = 2  # a [CLS]-like first token
        self.ids = ids * self.mask  # 0 = padding

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.ids[i],
            "attention_mask": self.mask[i],
            "token_type_ids": torch.zeros(LENGTH, dtype=torch.long),
            "labels": self.labels[i],
        }


class TextClassifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        config = BertConfig(
            vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=32, max_position_embeddings=LENGTH, num_labels=2,
        )  # fmt: skip
        self.model = BertForSequenceClassification(config)

    def forward(self, **inputs):
        return self.model(**inputs)

    def training_step(self, batch, batch_idx):
        labels = batch.pop("labels")
        logits = self(**batch).logits
        loss = F.cross_entropy(logits, labels, label_smoothing=0.1)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3, weight_decay=0.01)

    def train_dataloader(self):
        return DataLoader(Sentences(128), batch_size=16, shuffle=True)


def main() -> None:
    pl.seed_everything(0, verbose=False)
    monitor = NTKMonitor(n_probe=8, log_base=2, output_fn=lambda out: out.logits)
    trainer = pl.Trainer(
        callbacks=[monitor], max_steps=8, logger=False, enable_checkpointing=False,
        enable_model_summary=False, enable_progress_bar=False, accelerator="cpu", devices=1,
    )  # fmt: skip
    trainer.fit(TextClassifier())
    tracker = monitor.tracker
    probe = tracker.probe_x
    assert isinstance(probe, dict) and "attention_mask" in probe, "the probe keeps the mask"
    print(f"probe fields: {sorted(probe)}, {len(tracker.probe_y)} examples")
    print(f"kernel: {tracker.kernel_info.summary()}")
    for report in monitor.history:
        values = (report.relative_change, report.kernel_distance, report.linearization_error)
        assert all(math.isfinite(v) for v in values), report
        print(
            f"step {report.step:3d}  relative_change {report.relative_change:.4f}  "
            f"linearization_error {report.linearization_error:.4f}  verdict {report.verdict}"
        )
    assert [r.step for r in monitor.history] == [2, 4, 8]
    print("OK: every ntk metric finite on a Hugging Face model with attention masks")


if __name__ == "__main__":
    main()
