#!/usr/bin/env python3
"""Your own training code: a small transformer on dict batches, with step_fn, optimizer_fn and schedule_fn.

    python examples/text_dicts.py                  # 2 replicas, 6 epochs: 99.8% eval accuracy (chance: 50%)
    python examples/text_dicts.py --workers 1 --epochs 3

    # the same run from the CLI, each function named by import path:
    PYTHONPATH=$PWD/examples raytorch train --model text_dicts:TinyTransformer --dataset text_dicts:datasets \
        --step text_dicts:step --optimizer text_dicts:optimizer --lr-schedule text_dicts:schedule \
        --batch-size 64 --epochs 6

The task is synthetic text, made here from a fixed seed (no download): sentences of 6 to 16 words,
each holding "cat" once and "dog" once among filler words; the label says whether "cat" comes first.
A bag of words cannot tell (chance is 50%): the model has to attend across positions. Items are dicts
as a Hugging Face tokenizer gives them (input_ids, attention_mask, labels), the model computes its
own loss from keyword arguments as Hugging Face models do, and step_fn is one line.
"""

import argparse

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim import lr_scheduler

from raytorch import TrainConfig, Trainer

WORDS = ["<pad>", "cat", "dog", "the", "a", "sat", "ran", "on", "mat", "big", "small", "and", "then",
         "saw", "near", "house", "tree", "old", "red", "quick"]
PAD, CAT, DOG = 0, 1, 2
MAX_LEN, MIN_LEN = 16, 6


class CatBeforeDog(torch.utils.data.Dataset):
    """`size` sentences from generator seed `seed`: dicts of input_ids, attention_mask (1: a word,
    0: padding) and labels (1 where "cat" comes before "dog")."""

    def __init__(self, size: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        lengths = torch.randint(MIN_LEN, MAX_LEN + 1, (size,), generator=g)
        positions = torch.arange(MAX_LEN)
        self.attention_mask = (positions < lengths[:, None]).long()
        self.input_ids = torch.randint(3, len(WORDS), (size, MAX_LEN), generator=g) * self.attention_mask
        # two distinct places in each sentence for cat and dog
        first = (torch.rand(size, generator=g) * lengths).long()
        second = (first + 1 + (torch.rand(size, generator=g) * (lengths - 1)).long()) % lengths
        rows = torch.arange(size)
        self.input_ids[rows, first], self.input_ids[rows, second] = CAT, DOG
        self.labels = (first < second).long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.input_ids[i], "attention_mask": self.attention_mask[i], "labels": self.labels[i]}


def train_set() -> CatBeforeDog:
    return CatBeforeDog(4_000, seed=1)


def eval_set() -> CatBeforeDog:
    return CatBeforeDog(1_000, seed=2)


def datasets() -> tuple[CatBeforeDog, CatBeforeDog]:
    """(train, eval), for the CLI: --dataset text_dicts:datasets."""
    return train_set(), eval_set()


class TinyTransformer(nn.Module):
    """Token and position embeddings, two encoder layers, a masked mean-pool and a classifier head.
    No dropout: a layer that draws random numbers sees per-replica batches, which would break the
    contract's 'same run for any number of replicas'."""

    def __init__(self, vocab: int = len(WORDS), d_model: int = 32, heads: int = 4, layers: int = 2, classes: int = 2):
        super().__init__()
        self.tokens = nn.Embedding(vocab, d_model, padding_idx=PAD)
        self.positions = nn.Embedding(MAX_LEN, d_model)
        layer = nn.TransformerEncoderLayer(d_model, heads, dim_feedforward=4 * d_model, dropout=0.0,
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, classes)

    def forward(self, input_ids, attention_mask, labels=None) -> dict:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        h = self.tokens(input_ids) + self.positions(positions)
        h = self.norm(self.encoder(h, src_key_padding_mask=attention_mask == 0))
        mask = attention_mask.unsqueeze(-1).to(h.dtype)
        logits = self.head((h * mask).sum(1) / mask.sum(1))
        return {"loss": F.cross_entropy(logits, labels) if labels is not None else None, "logits": logits}


def step(model: nn.Module, batch: dict) -> torch.Tensor:
    """The batch is a dict of batched tensors, already on the replica's device."""
    return model(**batch)["loss"]


LR, WEIGHT_DECAY, WARMUP = 3e-3, 0.01, 0.1


def optimizer(model: nn.Module) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and LayerNorm weights (the one-dimensional parameters)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                              {"params": no_decay, "weight_decay": 0.0}], lr=LR)


def schedule(opt: torch.optim.Optimizer, total_steps: int) -> lr_scheduler.LRScheduler:
    """Linear warm-up over the first 10% of the steps, then cosine to 0."""
    warmup = max(1, int(WARMUP * total_steps))
    return lr_scheduler.SequentialLR(opt, [
        lr_scheduler.LinearLR(opt, start_factor=1 / warmup, total_iters=warmup),
        lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, total_steps - warmup)),
    ], milestones=[warmup])


@torch.no_grad()
def accuracy(model: nn.Module, data: CatBeforeDog) -> float:
    """Plain PyTorch, in this process: the fraction of `data` classified right."""
    model.eval()
    logits = model(data.input_ids, data.attention_mask)["logits"]
    return (logits.argmax(-1) == data.labels).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=6)
    args = parser.parse_args()
    # optimizer_fn and schedule_fn replace config's optimizer, lr and lr_schedule
    config = TrainConfig(workers=args.workers, epochs=args.epochs, batch_size=64, cpus_per_replica=1)
    result = Trainer(config, model_fn=TinyTransformer, dataset_fn=train_set, eval_dataset_fn=eval_set,
                     step_fn=step, optimizer_fn=optimizer, schedule_fn=schedule).fit()
    print("train loss by epoch:", " ".join(f"{loss:.3f}" for loss in result.epoch_losses))
    print(f"eval accuracy {accuracy(result.model, eval_set()):.1%} (chance 50%), eval loss {result.eval_loss:.3f}, "
          f"after {result.steps} steps in {result.wall_time_s:.1f} s")


if __name__ == "__main__":
    main()
