"""Stage 2: the siamese CTR ranker with attention over the item's POIs (SPEC section 5).

One image's score for one item:
    v      = align.encode_image(img)                       B x E  (normalised)
    P      = linear1(concat(poi_img_vecs, poi_text_vecs))  B x 5 x E
    w      = attention(v, P) * mask(position < poi_len)    B x 5 x 1  (no softmax)
    pooled = w^T @ P                                       B x E
    score  = linear2(relu(linear4(relu(linear3(concat(v, pois_feature, pooled))))))

The two images of a pair are scored by the same network; the pair's prediction is
``s_a > s_b``. Module names reproduce the released checkpoint's keys
(``attention_layer.local_att.fc1.fc.0`` ...); do not rename them.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .align import AlignModel


class Dice(nn.Module):
    """Dice activation as released: ``sigmoid(BN(x)) * x``, BN over the channel axis
    of a B x T x C input. (The authors' ``alpha`` term is a constant zero.)"""

    def __init__(self, channels: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(channels, eps=1e-9)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = torch.sigmoid(self.bn(x.transpose(1, 2))).transpose(1, 2)
        return p * x


class _MLP(nn.Module):
    """``fc`` = Linear, then (Dice, Dropout(0.2), Linear) per further layer."""

    def __init__(self, sizes: list[int]):
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(sizes[0], sizes[1])]
        for i in range(1, len(sizes) - 1):
            layers += [Dice(sizes[i]), nn.Dropout(0.2), nn.Linear(sizes[i], sizes[i + 1])]
        self.fc = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class LocalActivationUnit(nn.Module):
    """Weight of each POI for a query image: MLP over [q, p, q - p, q * p]."""

    def __init__(self, dim: int, hidden: tuple[int, int] = (64, 16)):
        super().__init__()
        self.fc1 = _MLP([4 * dim, hidden[0], hidden[1]])
        self.fc2 = _MLP([hidden[1], 1])

    def forward(self, query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        q = query.unsqueeze(1).expand_as(keys)
        return self.fc2(self.fc1(torch.cat([q, keys, q - keys, q * keys], dim=-1)))


class AttentionPooling(nn.Module):
    """Masked, un-normalised attention pooling of the POI sequence."""

    def __init__(self, dim: int):
        super().__init__()
        self.local_att = LocalActivationUnit(dim)

    def forward(self, query: torch.Tensor, keys: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        weights = self.local_att(query, keys).transpose(1, 2)  # B x 1 x T
        positions = torch.arange(keys.shape[1], device=keys.device)
        mask = (positions[None, :] < lengths.reshape(-1, 1)).to(weights.dtype)
        return torch.bmm(weights * mask.unsqueeze(1), keys).squeeze(1)  # B x E


class SiameseRanker(nn.Module):
    """The ranker: its own (frozen) copy of the recall model plus the head. Scripts score
    ready image vectors with :meth:`score_many`; :meth:`forward` runs the whole model."""

    def __init__(self, align_model: AlignModel, dropout: float = 0.1):
        super().__init__()
        d = align_model.arch.embed_dim
        self.align_model = align_model
        self.linear1 = nn.Linear(2 * d, d)
        self.linear3 = nn.Linear(3 * d, d)
        self.linear4 = nn.Linear(d, d // 2)
        self.linear2 = nn.Linear(d // 2, 1)
        self.dropout = nn.Dropout(dropout)
        self.attention_layer = AttentionPooling(d)

    def score_embeddings(
        self,
        image_emb: torch.Tensor,
        pois_feature: torch.Tensor,
        poi_img_vecs: torch.Tensor,
        poi_text_vecs: torch.Tensor,
        poi_len: torch.Tensor,
    ) -> torch.Tensor:
        """Score from a ready (normalised) image vector: B x 1. Used when image
        vectors are computed once and cached, since the recall model is frozen."""
        pois = self.dropout(self.linear1(torch.cat([poi_img_vecs, poi_text_vecs], dim=-1)))
        pooled = self.attention_layer(image_emb, pois, poi_len)
        h = torch.cat([image_emb, pois_feature, pooled], dim=1)
        h = self.dropout(F.relu(self.linear3(h)))
        h = self.dropout(F.relu(self.linear4(h)))
        return self.linear2(h)

    @torch.inference_mode()
    def score_many(
        self,
        image_emb: torch.Tensor,
        pois_feature: torch.Tensor,
        poi_img_vecs: torch.Tensor,
        poi_text_vecs: torch.Tensor,
        poi_len: torch.Tensor,
        batch_size: int = 256,
    ) -> torch.Tensor:
        """:meth:`score_embeddings` of N rows in batches of ``batch_size``, in eval mode
        (its previous mode restored): N float32 scores on the CPU. Inputs may be on the
        CPU; each batch is moved to the model's device."""
        device = self.linear2.weight.device
        was = self.training
        self.eval()
        try:
            out = [
                self.score_embeddings(
                    *(
                        t[a : a + batch_size].to(device)
                        for t in (image_emb, pois_feature, poi_img_vecs, poi_text_vecs, poi_len)
                    )
                )
                .float()
                .reshape(-1)
                .cpu()
                for a in range(0, image_emb.shape[0], batch_size)
            ]
        finally:
            self.train(was)
        return torch.cat(out) if out else torch.zeros(0)

    def forward(self, images, pois_feature, poi_img_vecs, poi_text_vecs, poi_len) -> torch.Tensor:
        return self.score_embeddings(
            self.align_model.encode_image(images), pois_feature, poi_img_vecs, poi_text_vecs, poi_len
        )
