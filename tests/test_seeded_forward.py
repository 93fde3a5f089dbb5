"""Dropout placed per sample (core/seeded_forward.py), without Ray: a sample's output depends on
(seed, step, its index) alone, never on the batch it is computed in, so cutting a batch into parts
(W replicas, any split, accumulate) gives what the whole batch gives."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from raytorch import seeded_forward
from raytorch.core.seeded_forward import kept, mix32

SAMPLES = [7, 3, 11, 5, 2, 9]
PARTS = [[0, 1], [2], [3, 4, 5]]  # a cut of the batch into parts of 2, 1 and 3 samples


class DropoutMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 32), nn.ReLU(),
                                 nn.AlphaDropout(0.2), nn.Linear(32, 3))

    def forward(self, x):
        return F.dropout(self.net(x), 0.1, self.training)


class DropoutConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.drop1, self.drop2 = nn.Conv2d(2, 4, 3, padding=1), nn.Dropout1d(0.3), nn.Dropout2d(0.4)
        self.drop3 = nn.Dropout3d(0.2)

    def forward(self, x):
        h = self.drop2(self.conv(x))
        h = self.drop3(h.unsqueeze(2)).squeeze(2)
        return self.drop1(h.flatten(2)).sum(-1)


class SeqFirstLSTM(nn.Module):
    """pytorch/examples' word-language-model layout: (sequence, batch, features), dropout between."""

    def __init__(self):
        super().__init__()
        self.lstm, self.drop = nn.LSTM(4, 8, num_layers=2, dropout=0.5), nn.Dropout(0.5)

    def forward(self, x):  # x: (batch, seq, 4)
        out, _ = self.lstm(self.drop(x.transpose(0, 1)))
        return self.drop(out).transpose(0, 1)


class CausalAttention(nn.Module):
    """GPT-2's attention as Hugging Face writes it with SDPA: dropout_p in training."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(8, 24)

    def forward(self, x):  # (batch, seq, 8)
        q, k, v = self.qkv(x).view(x.shape[0], x.shape[1], 3, 2, 4).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v, dropout_p=0.2 if self.training else 0.0, is_causal=True)


class MultiheadWeights(nn.Module):
    def __init__(self, need_weights: bool):
        super().__init__()
        self.attention, self.need_weights = nn.MultiheadAttention(8, 2, dropout=0.3, batch_first=True), need_weights

    def forward(self, x):
        return self.attention(x, x, x, need_weights=self.need_weights)[0]


def transformer(batch_first: bool):
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.1, batch_first=batch_first)
    encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    return encoder if batch_first else SeqFirst(encoder)


class SeqFirst(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x.transpose(0, 1)).transpose(0, 1)


class GRUs(nn.Module):
    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(4, 8, num_layers=3, dropout=0.4, batch_first=True, bidirectional=True)
        self.rnn = nn.RNN(16, 4, num_layers=2, dropout=0.3, nonlinearity="relu", batch_first=True)

    def forward(self, x):
        out, h = self.gru(x)
        return self.rnn(out)[0] + h.sum((0, 2))[:, None, None]  # h: (layers x directions, batch, 8)


MODELS = {
    "gru-rnn": (GRUs, (6, 4)),
    "mlp": (DropoutMLP, (4,)),
    "conv": (DropoutConv, (2, 5, 5)),
    "lstm-seq-first": (SeqFirstLSTM, (5, 4)),  # a sequence as long as the batch: the tie test below
    "sdpa-causal": (CausalAttention, (5, 8)),
    "multihead-weights": (lambda: MultiheadWeights(True), (5, 8)),
    "multihead-fast": (lambda: MultiheadWeights(False), (5, 8)),
    "transformer": (lambda: transformer(True), (5, 8)),
    "transformer-seq-first": (lambda: transformer(False), (5, 8)),
}


def forward(model, x, samples, step=3, seed=0):
    with seeded_forward(seed, step, samples):
        return model(x)


@pytest.mark.parametrize("name", MODELS)
def test_a_samples_output_does_not_depend_on_the_batch_it_is_computed_in(name):
    build, shape = MODELS[name]
    torch.manual_seed(0)
    model = build().train()
    x = torch.randn(len(SAMPLES), *shape)
    whole = forward(model, x, SAMPLES)
    parts = torch.cat([forward(model, x[part], [SAMPLES[i] for i in part]) for part in PARTS])
    torch.testing.assert_close(parts, whole, rtol=1e-5, atol=1e-6)
    # and dropout did drop: another step draws other masks, eval draws none
    assert not torch.allclose(forward(model, x, SAMPLES, step=4), whole)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(forward(model, x, SAMPLES), model(x))


def test_a_recurrent_stack_run_a_layer_at_a_time_is_torchs_stack():
    torch.manual_seed(0)
    lstm, x = nn.LSTM(4, 8, num_layers=3, dropout=1e-12, proj_size=5), torch.randn(6, 3, 4)
    h0, c0 = torch.randn(3, 3, 5), torch.randn(3, 3, 8)
    expected = lstm(x, (h0, c0))
    got = forward(lambda t: lstm(t, (h0, c0)), x, range(3))
    for a, b in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(expected)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_gradients_through_placed_dropout_are_the_whole_batchs():
    torch.manual_seed(0)
    model, x = DropoutMLP(), torch.randn(len(SAMPLES), 4)
    forward(model, x, SAMPLES).square().sum().backward()
    whole = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    for part in PARTS:
        forward(model, x[part], [SAMPLES[i] for i in part]).square().sum().backward()
    for a, b in zip((p.grad for p in model.parameters()), whole):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_masks_depend_on_seed_step_and_sample_and_keep_the_asked_fraction():
    ones = torch.ones(4, 250_000)
    out = forward(lambda t: F.dropout(t, 0.1), ones, [0, 1, 2, 3])
    kept_fraction = (out != 0).float().mean().item()
    assert abs(kept_fraction - 0.9) < 0.002  # 1e6 draws: the standard error is 0.0003
    assert torch.allclose(out[out != 0], torch.tensor(1 / 0.9))  # kept elements scaled, as torch's dropout does
    rows = [(out[i] != 0) for i in range(4)]
    assert all((rows[i] != rows[j]).any() for i in range(4) for j in range(i))  # each sample its own mask
    again = forward(lambda t: F.dropout(t, 0.1), ones[:1], [0])
    other_seed = forward(lambda t: F.dropout(t, 0.1), ones[:1], [0], seed=1)
    assert torch.equal(again[0], out[0]) and not torch.equal(other_seed[0], out[0])


def test_alpha_dropout_keeps_selus_mean_and_variance():
    x = torch.randn(8, 100_000, generator=torch.Generator().manual_seed(0))
    out = forward(lambda t: F.alpha_dropout(t, 0.2, training=True), x, range(8))
    assert abs(out.mean().item()) < 0.01 and abs(out.var().item() - 1) < 0.01


def test_attention_in_its_math_form_is_torchs_attention():
    # a rate so small that nothing is dropped: the math form must then be torch's kernel's answer
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 4, 5, 8, generator=g) for _ in range(3))
    mask = torch.randn(5, 5, generator=g)
    for kwargs in ({"is_causal": True}, {"attn_mask": mask}, {"attn_mask": mask > 0}, {"scale": 0.3}):
        expected = F.scaled_dot_product_attention(q, k, v, **kwargs)
        got = forward(lambda t: F.scaled_dot_product_attention(t, k, v, dropout_p=1e-12, **kwargs), q, range(3))
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    kv = torch.randn(3, 2, 5, 8, generator=g)  # grouped-query attention: 4 query heads over 2
    expected = F.scaled_dot_product_attention(q, kv, kv, enable_gqa=True)
    got = forward(lambda t: F.scaled_dot_product_attention(t, kv, kv, dropout_p=1e-12, enable_gqa=True), q, range(3))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_multihead_attention_still_draws_dropout_through_the_names_seeded_forward_binds():
    # nn.MultiheadAttention's dropout is placed by running torch's function with these two names
    # bound to seeded_forward's: a torch release that renames them must fail here
    names = F.multi_head_attention_forward.__code__.co_names
    assert "dropout" in names and "scaled_dot_product_attention" in names


def test_random_draws_it_cannot_place_are_named():
    def noisy(x):
        return F.dropout(x, 0.5) + torch.randn_like(x) + x.clone().bernoulli_(0.5)

    with seeded_forward(0, 0, range(2)) as drawn:
        noisy(torch.ones(2, 3))
    assert drawn.unplaced == {"torch.randn_like", "Tensor.bernoulli_"}


def test_a_sequence_first_call_site_keeps_its_layout_when_the_sizes_tie():
    # (sequence 4, batch 4, features): both leading dims have the forward's sample count; the
    # site saw (4, 2, 3) unambiguously before, so it keeps dim 1 as the samples' dimension
    layouts = {}
    x = torch.ones(4, 4, 3)
    with seeded_forward(0, 1, [10, 11], layouts):
        F.dropout(torch.ones(4, 2, 3), 0.5)
    with seeded_forward(0, 1, [10, 11, 12, 13], layouts):
        tied = F.dropout(x, 0.5)
    with seeded_forward(0, 1, [10, 11], layouts):
        halves = F.dropout(x[:, :2], 0.5)
    assert layouts == {0: 1} and torch.equal(tied[:, :2], halves)


def test_the_hash_is_exact_on_python_ints_and_tensors():
    values = [0, 1, 2 ** 31, 2 ** 32 - 1, 123456789]
    assert mix32(torch.tensor(values)).tolist() == [mix32(v) for v in values]
    assert all(0 <= mix32(v) < 2 ** 32 for v in values)
    assert kept(5, None, 10, 0.0, "cpu").all() and not kept(5, None, 10, 1.0 - 2 ** -33, "cpu").any()
    assert math.isclose(kept(5, torch.arange(100), 1000, 0.5, "cpu").float().mean().item(), 0.5, abs_tol=0.01)
