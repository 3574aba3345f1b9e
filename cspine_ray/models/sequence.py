"""Sequence heads over per-step features, and attention pooling (two-stage family, stage 2).

A head maps step features (B, L, F) to contextual features (B, L, head.out_features); an
optional boolean mask (B, L) marks the real steps (True) when a batch is padded.

    "lstm"         bidirectional LSTM (the thesis's choice; out = 2 * hidden)
    "gru"          bidirectional GRU (the challenge's 2nd place; out = 2 * hidden)
    "transformer"  nn.TransformerEncoder on a projection to `hidden`, with a learned
                   positional embedding for up to `max_len` steps (out = hidden)

`AttentionPooling` then turns (B, L, F) into one vector per sample (additive attention),
returning the weights too so they can be drawn over the slices later.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

SEQUENCE_HEADS = ("lstm", "gru", "transformer")


def check_mask(mask: torch.Tensor | None, batch: int, length: int) -> None:
    """A mask must be boolean (B, L) with at least one real step per sample."""
    if mask is None:
        return
    if mask.dtype != torch.bool or tuple(mask.shape) != (batch, length):
        raise ValueError(f"mask must be bool of shape ({batch}, {length}), "
                         f"got {mask.dtype} {tuple(mask.shape)}")
    if not mask.any(dim=1).all():
        raise ValueError("every sample needs at least one unmasked step")


class RecurrentHead(nn.Module):
    """Bidirectional LSTM or GRU. With a mask, padding must come after the real steps.

    The recurrence always runs in float32, also inside an autocast region: oneDNN has no
    bf16 LSTM/GRU kernel on CPUs without AVX-512 (autocast would raise there), and a long
    recurrence accumulates rounding error in half precision on any device. The head is tiny
    next to the backbone, so the cost is negligible; its output is float32.
    """

    def __init__(self, kind: str, in_features: int, hidden: int = 256, num_layers: int = 2,
                 dropout: float = 0.1):
        super().__init__()
        rnn = {"lstm": nn.LSTM, "gru": nn.GRU}[kind]
        self.rnn = rnn(in_features, hidden, num_layers=num_layers, batch_first=True,
                       bidirectional=True, dropout=dropout if num_layers > 1 else 0.0)
        self.out_features = 2 * hidden

    def forward(self, steps: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        batch, length = steps.shape[:2]
        check_mask(mask, batch, length)
        with torch.autocast(steps.device.type, enabled=False):
            return self._recur(steps.float(), mask, length)

    def _recur(self, steps: torch.Tensor, mask: torch.Tensor | None, length: int) -> torch.Tensor:
        if mask is None or bool(mask.all()):
            return self.rnn(steps)[0]
        # pack so the backward direction starts at each sample's last real step, not at padding
        lengths = mask.sum(dim=1)
        if not torch.equal(mask, torch.arange(length, device=mask.device) < lengths[:, None]):
            raise ValueError("recurrent heads need the real steps first and padding at the end")
        packed = pack_padded_sequence(steps, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.rnn(packed)
        return pad_packed_sequence(out, batch_first=True, total_length=length)[0]


class TransformerHead(nn.Module):
    """Pre-norm transformer encoder with a learned positional embedding (up to max_len steps)."""

    def __init__(self, in_features: int, hidden: int = 256, num_layers: int = 2,
                 dropout: float = 0.1, num_heads: int = 4, max_len: int = 64):
        super().__init__()
        if hidden % num_heads:
            raise ValueError(f"hidden ({hidden}) must be divisible by num_heads ({num_heads})")
        self.project = nn.Linear(in_features, hidden)
        self.position = nn.Parameter(torch.zeros(1, max_len, hidden))
        nn.init.trunc_normal_(self.position, std=0.02)
        layer = nn.TransformerEncoderLayer(hidden, num_heads, 4 * hidden, dropout,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers, norm=nn.LayerNorm(hidden),
                                             enable_nested_tensor=False)
        self.out_features = hidden

    def forward(self, steps: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        batch, length = steps.shape[:2]
        check_mask(mask, batch, length)
        if length > self.position.shape[1]:
            raise ValueError(f"sequence of {length} steps is longer than max_len "
                             f"{self.position.shape[1]}")
        x = self.project(steps) + self.position[:, :length]
        return self.encoder(x, src_key_padding_mask=None if mask is None else ~mask)


def create_sequence_head(name: str, in_features: int, hidden: int = 256, num_layers: int = 2,
                         dropout: float = 0.1, num_heads: int = 4, max_len: int = 64) -> nn.Module:
    """Build sequence head `name` (one of SEQUENCE_HEADS); num_heads and max_len are
    used by "transformer" only."""
    if name in ("lstm", "gru"):
        return RecurrentHead(name, in_features, hidden, num_layers, dropout)
    if name == "transformer":
        return TransformerHead(in_features, hidden, num_layers, dropout, num_heads, max_len)
    raise ValueError(f"unknown sequence head {name!r}; choose one of {', '.join(SEQUENCE_HEADS)}")


class AttentionPooling(nn.Module):
    """Additive attention over time steps: (B, L, F) -> pooled (B, F), weights (B, L).

    score_t = v . tanh(W h_t); weights = softmax over the real steps (masked steps get exactly
    0); pooled = sum_t weights_t h_t. The softmax runs in float32 so weights sum to 1 under
    mixed precision too.
    """

    def __init__(self, in_features: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or in_features
        self.project = nn.Linear(in_features, hidden)
        self.score = nn.Linear(hidden, 1, bias=False)

    def forward(self, steps: torch.Tensor,
                mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        batch, length = steps.shape[:2]
        check_mask(mask, batch, length)
        scores = self.score(torch.tanh(self.project(steps))).squeeze(-1).float()
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        weights = scores.softmax(dim=-1)
        pooled = (weights.unsqueeze(-1).to(steps.dtype) * steps).sum(dim=1)
        return pooled, weights
