"""Two-stage family, stage 2: one vertebra's slice sequence -> one fracture logit.

Thesis section 4.5.2: the 3*L slices chosen for a vertebra become L 2.5D images; a shared
CNN backbone encodes each step, a bidirectional sequence head relates the steps, attention
pooling weighs them, and a linear layer gives one logit per (study, vertebra) sample.

With `vertebra_embedding=True` a learned embedding of the vertebra index (0 = C1 .. 6 = C7)
is added to every step's features, so one model serves all seven vertebrae while still
knowing which one it looks at.

With `step_head=True` a second linear layer scores every step of the sequence (does this
step show the fracture?), trained on the fracture boxes' slices where a study has them: a
denser signal than one label per vertebra. The vertebra's own logit still comes from the
attention-pooled sequence.
"""

from __future__ import annotations

import torch
from torch import nn

from cspine_ray.models.backbone import create_backbone
from cspine_ray.models.heads import PriorLogit, linear_head
from cspine_ray.models.registry import register_model
from cspine_ray.models.sequence import AttentionPooling, create_sequence_head


@register_model("sequence_classifier")
class SequenceClassifier(nn.Module):
    """Steps (B, L, in_chans, H, W) -> logits (B,), or (logits (B,), attention (B, L)), or
    (logits (B,), step logits (B, L)).

    forward(steps, vertebra=None, mask=None, return_attention=False, return_steps=False):
      vertebra: int64 (B,) in 0..num_vertebrae-1, required exactly when vertebra_embedding;
      mask: bool (B, L), True for real steps (recurrent heads need padding at the end).
    sequence_head is "lstm", "gru" or "transformer"; hidden, num_layers and dropout configure
    it, num_heads and max_len matter for "transformer" only. return_steps needs step_head.
    """

    def __init__(self, backbone: str = "convnext_tiny", pretrained: bool = False,
                 weights: str | None = None, in_chans: int = 3, drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, sequence_head: str = "lstm", hidden: int = 256,
                 num_layers: int = 2, dropout: float = 0.1, num_heads: int = 4, max_len: int = 64,
                 vertebra_embedding: bool = False, num_vertebrae: int = 7,
                 prior_logit: PriorLogit = -2.0, step_head: bool = False):
        super().__init__()
        self.backbone, num_features = create_backbone(backbone, pretrained, in_chans, drop_rate,
                                                      drop_path_rate, weights=weights)
        self.vertebra_embedding = None
        if vertebra_embedding:
            self.vertebra_embedding = nn.Embedding(num_vertebrae, num_features)
            # small start: the embedding should nudge the image features, not drown them
            nn.init.normal_(self.vertebra_embedding.weight, std=0.02)
        self.sequence = create_sequence_head(sequence_head, num_features, hidden, num_layers,
                                             dropout, num_heads, max_len)
        self.pool = AttentionPooling(self.sequence.out_features)
        self.dropout = nn.Dropout(dropout)
        self.head = linear_head(self.sequence.out_features, 1, prior_logit)
        # most steps of most vertebrae show no fracture: start it at the same prior
        self.step_head = linear_head(self.sequence.out_features, 1, prior_logit) if step_head else None

    def forward(self, steps: torch.Tensor, vertebra: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, return_attention: bool = False,
                return_steps: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if steps.ndim != 5:
            raise ValueError(f"sequence_classifier expects (B, L, C, H, W), "
                             f"got shape {tuple(steps.shape)}")
        if return_steps and (self.step_head is None or return_attention):
            raise ValueError("return_steps needs a model built with step_head=True, and "
                             "cannot be combined with return_attention")
        batch, length = steps.shape[:2]
        # every step goes through the same backbone as one big batch of B*L images
        features = self.backbone(steps.flatten(0, 1)).unflatten(0, (batch, length))
        features = features + self._vertebra_features(vertebra, batch)
        context = self.sequence(features, mask)
        pooled, weights = self.pool(context, mask)
        logits = self.head(self.dropout(pooled)).squeeze(-1)
        if return_steps:
            return logits, self.step_head(self.dropout(context)).squeeze(-1)
        return (logits, weights) if return_attention else logits

    def _vertebra_features(self, vertebra: torch.Tensor | None, batch: int) -> torch.Tensor | float:
        """(B, 1, F) embedding to add to every step, or 0 without vertebra embedding."""
        if self.vertebra_embedding is None:
            if vertebra is not None:
                raise ValueError("a vertebra index was given but the model was built with "
                                 "vertebra_embedding=False")
            return 0.0
        if vertebra is None:
            raise ValueError("this model was built with vertebra_embedding=True: pass the "
                             "vertebra index (0 = C1 .. 6 = C7) as the second argument")
        count = self.vertebra_embedding.num_embeddings
        if vertebra.shape != (batch,) or vertebra.dtype != torch.long:
            raise ValueError(f"vertebra must be int64 of shape ({batch},), "
                             f"got {vertebra.dtype} {tuple(vertebra.shape)}")
        if bool((vertebra < 0).any() | (vertebra >= count).any()):
            raise ValueError(f"vertebra indices must lie in 0..{count - 1}")
        return self.vertebra_embedding(vertebra).unsqueeze(1)
