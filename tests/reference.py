"""The oracle: plain single-process PyTorch training, written here without any raytorch helper
but one: for a model with dropout (seeded_forward=True), each step's forward runs within
raytorch.seeded_forward, as its docstring tells a plain loop to."""

import contextlib
import math

import torch

import raytorch


def train_reference(model_fn, dataset, loss_fn, *, seed, epochs, batch_size, lr, optimizer,
                    lr_schedule="constant", shuffle=True, drop_last=False, skip_nonfinite=False,
                    weight_decay=0.0, grad_clip=None, warmup_steps=0, max_steps=None, optimizer_fn=None,
                    schedule_fn=None, seeded_forward=False, collate_fn=None):
    """skip_nonfinite: a step whose loss or gradient is NaN or inf leaves the weights as they are
    (the schedule still steps) and is left out of the epoch's mean loss. optimizer_fn(model) and
    schedule_fn(optimizer, total_steps), where given, replace optimizer, lr and lr_schedule.
    collate_fn: how a batch's items become (inputs, targets) (default: stacked)."""
    torch.manual_seed(seed)
    model = model_fn()
    opt = optimizer_fn(model) if optimizer_fn else {"sgd": torch.optim.SGD, "adam": torch.optim.Adam,
                                                   "adamw": torch.optim.AdamW}[optimizer](
        model.parameters(), lr=lr, weight_decay=weight_decay)
    n = len(dataset)
    if collate_fn is None:  # (inputs, targets) by stacking every item once
        x = torch.stack([torch.as_tensor(dataset[i][0]) for i in range(n)])
        y = torch.stack([torch.as_tensor(dataset[i][1]) for i in range(n)])
        batch = lambda idx: (x[idx], y[idx])  # noqa: E731
    else:  # what the user's collate makes of the batch's items, as a DataLoader would give it
        batch = lambda idx: collate_fn([dataset[int(i)] for i in idx])  # noqa: E731
    steps = n // batch_size if drop_last else (n + batch_size - 1) // batch_size
    total = min(steps * epochs, max_steps or steps * epochs)
    main = max(1, total - warmup_steps)
    # the schedule written out as a factor of lr per step, independently of raytorch's optim.py
    def factor(k):
        if k < warmup_steps:  # linear from 1/warmup_steps (step 0) towards 1 (step warmup_steps)
            return 1 / warmup_steps + (1 - 1 / warmup_steps) * k / warmup_steps
        k -= warmup_steps
        if lr_schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * k / main))
        if lr_schedule == "step":
            return 0.1 ** ((k >= main // 2) + (k >= 3 * main // 4))
        return 1.0
    schedule = schedule_fn(opt, total) if schedule_fn else None
    done = 0
    losses = []
    for epoch in range(epochs):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)) if shuffle else torch.arange(n)
        total_loss, counted = 0.0, 0
        for k in range(steps):
            if done == total:
                break
            if optimizer_fn is None:
                for group in opt.param_groups:
                    group["lr"] = lr * factor(done)
            done += 1
            idx = order[k * batch_size:(k + 1) * batch_size]
            opt.zero_grad()
            with (raytorch.seeded_forward(seed, done - 1, idx) if seeded_forward else contextlib.nullcontext()):
                inputs, targets = batch(idx)
                loss = loss_fn(model(inputs), targets)
            loss.backward()
            if grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            finite = math.isfinite(loss.item()) and all(p.grad.isfinite().all() for p in model.parameters()
                                                        if p.grad is not None)
            if finite or not skip_nonfinite:
                opt.step()
                total_loss, counted = total_loss + loss.item() * len(idx), counted + len(idx)
            if schedule is not None:
                schedule.step()
        if counted:
            losses.append(total_loss / counted)
    return model, losses


def assert_same_parameters(actual, expected, rel=1e-5):
    a, e = dict(actual.named_parameters()), dict(expected.named_parameters())
    assert a.keys() == e.keys()
    for name in a:
        diff = (a[name].detach() - e[name].detach()).norm().item()
        scale = max(e[name].detach().norm().item(), 1e-12)
        assert diff / scale < rel, f"{name}: relative error {diff / scale:.3g} >= {rel}"
