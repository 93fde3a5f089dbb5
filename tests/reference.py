"""The oracle: plain single-process PyTorch training, written here without any raytorch helper."""

import math

import torch


def train_reference(model_fn, dataset, loss_fn, *, seed, epochs, batch_size, lr, optimizer,
                    lr_schedule="constant", shuffle=True, drop_last=False, skip_nonfinite=False):
    """skip_nonfinite: a step whose loss or gradient is NaN or inf leaves the weights as they are
    (the schedule still steps) and is left out of the epoch's mean loss."""
    torch.manual_seed(seed)
    model = model_fn()
    opt = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[optimizer](
        model.parameters(), lr=lr)
    n = len(dataset)
    x = torch.stack([torch.as_tensor(dataset[i][0]) for i in range(n)])
    y = torch.stack([torch.as_tensor(dataset[i][1]) for i in range(n)])
    steps = n // batch_size if drop_last else (n + batch_size - 1) // batch_size
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps * epochs) if lr_schedule == "cosine" else None
    losses = []
    for epoch in range(epochs):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)) if shuffle else torch.arange(n)
        total, counted = 0.0, 0
        for k in range(steps):
            idx = order[k * batch_size:(k + 1) * batch_size]
            opt.zero_grad()
            loss = loss_fn(model(x[idx]), y[idx])
            loss.backward()
            finite = math.isfinite(loss.item()) and all(p.grad.isfinite().all() for p in model.parameters())
            if finite or not skip_nonfinite:
                opt.step()
                total, counted = total + loss.item() * len(idx), counted + len(idx)
            if sched:
                sched.step()
        losses.append(total / counted)
    return model, losses


def assert_same_parameters(actual, expected, rel=1e-5):
    a, e = dict(actual.named_parameters()), dict(expected.named_parameters())
    assert a.keys() == e.keys()
    for name in a:
        diff = (a[name].detach() - e[name].detach()).norm().item()
        scale = max(e[name].detach().norm().item(), 1e-12)
        assert diff / scale < rel, f"{name}: relative error {diff / scale:.3g} >= {rel}"
