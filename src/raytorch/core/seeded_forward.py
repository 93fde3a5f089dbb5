"""Dropout that any number of replicas reproduces: within `seeded_forward(seed, step, samples)`,
every dropout mask of a training forward is a counter-based function of (seed, step, the sample's
index in the dataset, the call site, the element), never of which replica computes the sample, how
the batch was cut, accumulate, or torch's generator. So W replicas, any split, and a run that
recovers from a loss draw the masks one process draws.

A plain PyTorch loop reproduces a raytorch run by computing step `s` (counted from 0 over the whole
run) on the samples at dataset indices `idx` within it:

    with raytorch.seeded_forward(seed, s, idx):
        loss = loss_fn(model(x[idx]), y[idx])

What it places per sample: `F.dropout` (so `nn.Dropout`), `dropout1d/2d/3d`, `alpha_dropout`,
`feature_alpha_dropout`, `torch.dropout`, the dropout between the layers of `nn.LSTM`, `nn.GRU`
and `nn.RNN` (run a layer at a time while it is on; not on a PackedSequence), and the attention
dropout of `F.scaled_dot_product_attention` (computed in its math form while dropout_p > 0) and of
`nn.MultiheadAttention`. Which dimension of
a tensor holds the samples: for attention, dim 0 (samples, or samples times heads); for any other
dropout, the one dimension whose size is the forward's number of samples (dim 0 where several are,
or the one this call site used when it was unambiguous); none where no dimension has that size
(a weight: every replica then draws the same mask, as one process does once). Other random draws
(torch.rand, randn_like, bernoulli, ...) are not placed: they run as before and are named in
`unplaced`, so the run can say so.

Cost: about twenty integer passes over each dropout mask (docs/performance.md has the figures).
Activation checkpointing that recomputes a forward outside this context draws other masks.
"""

from __future__ import annotations

import math
import types
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

M32 = 0xFFFFFFFF
SELU_ALPHA = 1.7580993408473766  # alpha_dropout's constant, as ATen's _dropout_impl has it


def mix32(x):
    """A 32-bit integer hash (lowbias32, from Wellons' hash prospector) of a Python int or of an
    int64 tensor of values in [0, 2**32): exact in int64, on any device."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & M32
    return x ^ (x >> 16)


def site_key(seed: int, step: int, site: int) -> int:
    """The key of a run's `site`-th random call in the forward of global step `step`."""
    key = mix32((seed & M32) ^ mix32((seed >> 32) & M32))
    key = mix32(key ^ mix32(step & M32) ^ ((step >> 32) & M32))
    return mix32(key ^ mix32(site & M32))


def kept(key: int, samples: Optional[torch.Tensor], per_sample: int, p: float, device) -> torch.Tensor:
    """Which of (rows, per_sample) elements dropout keeps (bool), with probability 1 - p each: a row
    per sample in `samples` (dataset indices, int64), or one row for the whole tensor (None). Element
    j of a sample's row depends on (key, the sample's index, j) alone."""
    rows = (torch.zeros(1, dtype=torch.int64, device=device) if samples is None
            else samples.to(device=device, dtype=torch.int64))
    first = mix32(key ^ mix32(rows & M32) ^ ((rows >> 32) & M32))[:, None]
    second = mix32(first ^ 0x9E3779B9)
    j = torch.arange(per_sample, dtype=torch.int64, device=device)[None, :]
    drawn = mix32(mix32((j & M32) ^ first) ^ second ^ (j >> 32))
    return drawn >= int(p * 2 ** 32)


Layout = Optional[int]  # the dimension that holds the samples (as many rows each), or None: no sample there


class SeededForward(TorchFunctionMode):
    """The context `seeded_forward` returns: a torch function mode over one training forward."""

    def __init__(self, seed: int, step: int, samples, layouts: Optional[dict[int, int]] = None):
        """layouts: the dimension each call site held its samples in when that was unambiguous,
        kept across forwards (a dict the caller holds); unplaced: the random functions called
        within that are not placed per sample, by name."""
        super().__init__()
        self.seed, self.step = int(seed), int(step)
        self.samples = (samples.detach().to("cpu", torch.int64) if isinstance(samples, torch.Tensor)
                        else torch.from_numpy(np.array(samples, dtype=np.int64)))  # a copy: numpy's may be read-only
        self.site = 0
        self.layouts = {} if layouts is None else layouts
        self.unplaced: set[str] = set()
        self.on_device: dict[torch.device, torch.Tensor] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = HANDLERS.get(func)
        if handler is not None:
            return handler(self, *args, **kwargs)
        if func in UNPLACED:
            self.unplaced.add(UNPLACED[func])
        return func(*args, **kwargs)

    # -- which dimension holds the samples

    def layout(self, shape: torch.Size, attention: bool = False) -> Layout:
        """Where the samples are in a tensor of `shape`: attention's (samples or samples x heads at
        dim 0), or the one dimension of the forward's sample count (see the module's docstring)."""
        n = len(self.samples)
        if attention:
            return 0 if len(shape) >= 3 and shape[0] % n == 0 else None
        candidates = [d for d, size in enumerate(shape) if size == n]
        if len(candidates) == 1:
            self.layouts[self.site] = candidates[0]
        elif len(candidates) > 1:
            remembered = self.layouts.get(self.site)
            return remembered if remembered in candidates else candidates[0]
        return candidates[0] if candidates else None

    def keep(self, shape: torch.Size, p: float, device, dim: Layout) -> torch.Tensor:
        """The kept elements (bool, of `shape`) of this call site's dropout at rate `p`."""
        key = site_key(self.seed, self.step, self.site)
        self.site += 1
        if dim is None:
            return kept(key, None, math.prod(shape), p, device).view(shape)
        moved = (shape[dim], *shape[:dim], *shape[dim + 1:])
        samples = self.on_device.setdefault(torch.device(device), self.samples.to(device))
        mask = kept(key, samples, math.prod(moved) // len(self.samples), p, device)
        return mask.view(moved).movedim(0, dim)

    def dropout(self, input, p: float, attention: bool = False, inplace: bool = False):
        """input with dropout at rate p (a training forward), its samples' masks placed."""
        if p == 1.0:
            return input.mul_(0) if inplace else input * 0
        scale = self.keep(input.shape, p, input.device, self.layout(input.shape, attention)).to(input.dtype) / (1 - p)
        return input.mul_(scale) if inplace else input * scale


def _dropout(mode: SeededForward, input, p=0.5, training=True, inplace=False):
    if not training or p == 0.0 or not 0.0 < p <= 1.0:  # torch's own call (and its error for a bad p)
        return F.dropout(input, p, training, inplace)
    return mode.dropout(input, p, inplace=inplace)


def _torch_dropout(mode: SeededForward, input, p, train):
    return _dropout(mode, input, p, train)


def _feature(spatial: int, alpha: bool = False):
    """dropout{spatial}d (or feature_alpha_dropout): one draw per (sample, channel)."""
    def handler(mode: SeededForward, input, p=0.5, training=not alpha, inplace=False):
        if not training or p == 0.0 or not 0.0 < p < 1.0 or input.dim() < 2:
            return FEATURE[spatial, alpha](input, p, training, inplace)
        # as torch's: dropout2d takes a 3-D input as (N, C, L); 1d and 3d take (C, ...) as one sample
        batched = input.dim() > spatial + 1 if spatial in (1, 3) else True
        channels = input.shape[:2] if batched else input.shape[:1]
        layout = mode.layout(channels) if batched else None
        keep = mode.keep(channels, p, input.device, layout).to(input.dtype)
        keep = keep.view(*channels, *[1] * (input.dim() - len(channels)))
        return _noise(input, keep, p, alpha, inplace)
    return handler


def _alpha(mode: SeededForward, input, p=0.5, training=False, inplace=False):
    if not training or p == 0.0 or not 0.0 < p < 1.0:
        return F.alpha_dropout(input, p, training, inplace)
    keep = mode.keep(input.shape, p, input.device, mode.layout(input.shape)).to(input.dtype)
    return _noise(input, keep, p, True, inplace)


def _noise(input, keep, p: float, alpha: bool, inplace: bool):
    """input times its dropout noise, as ATen's _dropout_impl applies it (alpha: SELU's)."""
    if not alpha:
        scale = keep / (1 - p)
        return input.mul_(scale) if inplace else input * scale
    a = 1.0 / math.sqrt((SELU_ALPHA * SELU_ALPHA * p + 1) * (1 - p))
    b = (keep - 1) * (SELU_ALPHA * a) + SELU_ALPHA * a * p
    return (input.mul_(keep * a) if inplace else input * (keep * a)) + b


def _attention(mode: SeededForward, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
               scale=None, enable_gqa=False):
    """scaled_dot_product_attention; with dropout, its math form (PyTorch's documented reference)
    with the attention weights' dropout placed per sample."""
    if dropout_p == 0.0:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=0.0,
                                              is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    L, S = query.size(-2), key.size(-2)
    weights = query @ _repeated(key, query, enable_gqa).transpose(-2, -1)
    weights = weights * (1 / math.sqrt(query.size(-1)) if scale is None else scale)
    if is_causal:
        causal = torch.ones(L, S, dtype=torch.bool, device=query.device).tril(0)
        weights = weights.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        weights = (weights.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool
                   else weights + attn_mask)
    weights = mode.dropout(torch.softmax(weights, dim=-1), dropout_p, attention=True)
    return weights @ _repeated(value, query, enable_gqa)


def _repeated(kv, query, enable_gqa: bool):
    """Keys or values repeated over grouped query heads (enable_gqa)."""
    return kv.repeat_interleave(query.size(-3) // kv.size(-3), -3) if enable_gqa else kv


def _multi_head(mode: SeededForward, *args, **kwargs):
    """F.multi_head_attention_forward (nn.MultiheadAttention in training) with its attention
    dropout placed: PyTorch's own function, run with the two names it draws dropout through bound
    to ours (tests/test_seeded_forward.py fails if a torch release renames them)."""
    function = F.multi_head_attention_forward
    names = dict(function.__globals__,
                 dropout=lambda input, p=0.5, training=True, inplace=False: (
                     mode.dropout(input, p, attention=True, inplace=inplace) if training and p > 0 else input),
                 scaled_dot_product_attention=lambda *a, **k: _attention(mode, *a, **k))
    placed = types.FunctionType(function.__code__, names, function.__name__, function.__defaults__,
                                function.__closure__)
    placed.__kwdefaults__ = function.__kwdefaults__
    return placed(*args, **kwargs)


def _recurrent(func: Callable, name: str, cell: bool):
    """torch.lstm / gru / rnn_tanh / rnn_relu (nn.LSTM, GRU, RNN): with dropout between layers in
    training, one layer at a time (torch's own call, dropout 0) with the dropout between placed."""
    def handler(mode: SeededForward, *args):
        packed = not isinstance(args[1 if cell else 2], (list, tuple))  # (data, batch_sizes, hx, params, ...)
        if packed:
            _, _, hx, params, biases, layers, dropout, train, bidirectional = args
        else:
            input, hx, params, biases, layers, dropout, train, bidirectional, batch_first = args
        if not (train and dropout > 0 and layers > 1):
            return func(*args)
        if packed:  # a PackedSequence's layers are not split here: torch's generator draws its dropout
            mode.unplaced.add(f"{name} dropout on a PackedSequence")
            return func(*args)
        directions = 2 if bidirectional else 1
        per_layer = len(params) // (layers * directions)
        states = list(hx) if cell else [hx]
        finals: list[list[torch.Tensor]] = [[] for _ in states]
        for layer in range(layers):
            rows = slice(layer * directions, (layer + 1) * directions)
            weights = params[layer * directions * per_layer:(layer + 1) * directions * per_layer]
            state = [s[rows] for s in states] if cell else states[0][rows]
            out = func(input, state, weights, biases, 1, 0.0, train, bidirectional, batch_first)
            input = out[0] if layer == layers - 1 else mode.dropout(out[0], dropout)
            for kept_state, final in zip(finals, out[1:]):
                kept_state.append(final)
        return (input, *(torch.cat(final) for final in finals))
    return handler


FEATURE: dict[tuple[int, bool], Callable] = {
    (1, False): F.dropout1d, (2, False): F.dropout2d, (3, False): F.dropout3d, (0, True): F.feature_alpha_dropout}
HANDLERS: dict[Callable, Callable] = {
    F.dropout: _dropout, torch.dropout: _torch_dropout, F.alpha_dropout: _alpha,
    F.dropout1d: _feature(1), F.dropout2d: _feature(2), F.dropout3d: _feature(3),
    F.feature_alpha_dropout: _feature(0, alpha=True),
    F.scaled_dot_product_attention: _attention, F.multi_head_attention_forward: _multi_head,
    torch.lstm: _recurrent(torch.lstm, "nn.LSTM", cell=True), torch.gru: _recurrent(torch.gru, "nn.GRU", cell=False),
    torch.rnn_tanh: _recurrent(torch.rnn_tanh, "nn.RNN", cell=False),
    torch.rnn_relu: _recurrent(torch.rnn_relu, "nn.RNN", cell=False),
}
# random draws a forward may make that are not placed per sample: named at the run's start
UNPLACED: dict[Callable, str] = {f: f"{owner}.{f.__name__}" for owner, fs in {
    "torch": (torch.rand, torch.rand_like, torch.randn, torch.randn_like, torch.randint, torch.randint_like,
              torch.randperm, torch.bernoulli, torch.multinomial, torch.normal, torch.poisson, torch.rrelu),
    "Tensor": (torch.Tensor.uniform_, torch.Tensor.normal_, torch.Tensor.bernoulli, torch.Tensor.bernoulli_,
               torch.Tensor.exponential_, torch.Tensor.geometric_, torch.Tensor.cauchy_, torch.Tensor.log_normal_,
               torch.Tensor.random_, torch.Tensor.multinomial),
    "F": (F.rrelu, F.gumbel_softmax),
}.items() for f in fs}


def seeded_forward(seed: int, step: int, samples, layouts: Optional[dict[int, int]] = None) -> SeededForward:
    """Within: the training forward of global step `step` of a run seeded `seed`, on the samples
    at dataset indices `samples` (in the batch's order), draws its dropout per sample (the module's
    docstring says what and how). Use one context per forward; `.unplaced` names the random calls
    it could not place."""
    return SeededForward(seed, step, samples, layouts)
