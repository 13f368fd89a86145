"""Stage 2, the siamese ranker (SPEC 5): an image vector ``v`` attends (masked, no softmax) over the POIs'
``linear1([poi_img, poi_text])``; score ``linear2(relu(linear4(relu(linear3([v, pois_feature, pooled])))))``.
The prediction is ``s_a > s_b``. Module names are the released checkpoint's keys."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .align import AlignModel


class Dice(nn.Module):
    """Dice as released: ``sigmoid(BN(x)) * x`` over the channels of B x T x C (its ``alpha`` term is zero)."""

    def __init__(self, channels: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(channels, eps=1e-9)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.bn(x.transpose(1, 2))).transpose(1, 2) * x


def _mlp(sizes: list[int]) -> nn.ModuleDict:
    """``fc``: Linear, then (Dice, Dropout(0.2), Linear) per further layer; xavier-normal weights."""
    layers: list[nn.Module] = [nn.Linear(sizes[0], sizes[1])]
    for a, b in zip(sizes[1:-1], sizes[2:]):
        layers += [Dice(a), nn.Dropout(0.2), nn.Linear(a, b)]
    for m in layers:
        if isinstance(m, nn.Linear) and not m.weight.is_meta:  # on meta, as BertEncoder: no init, no _dynamo
            nn.init.xavier_normal_(m.weight)
            nn.init.zeros_(m.bias)
    return nn.ModuleDict({"fc": nn.Sequential(*layers)})


class AttentionPooling(nn.Module):
    """Masked, un-normalised attention pooling; a POI's weight: an MLP over ``[q, p, q - p, q * p]``."""

    def __init__(self, dim: int, hidden: tuple[int, int] = (64, 16)):
        super().__init__()
        self.local_att = nn.ModuleDict({"fc1": _mlp([4 * dim, *hidden]), "fc2": _mlp([hidden[1], 1])})

    def forward(self, query: torch.Tensor, keys: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        q = query.unsqueeze(1).expand_as(keys)
        pairs = torch.cat([q, keys, q - keys, q * keys], dim=-1)
        weights = self.local_att.fc2.fc(self.local_att.fc1.fc(pairs)).transpose(1, 2)  # B x 1 x T
        mask = torch.arange(keys.shape[1], device=keys.device)[None, :] < lengths.reshape(-1, 1)
        return torch.bmm(weights * mask.to(weights.dtype).unsqueeze(1), keys).squeeze(1)  # B x E


class SiameseRanker(nn.Module):
    """Its own (frozen) copy of the recall model plus the head; :meth:`score_many` scores ready image vectors."""

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

    def score_embeddings(self, image_emb, pois_feature, poi_img_vecs, poi_text_vecs, poi_len) -> torch.Tensor:
        """B x 1 scores from normalised image vectors (the recall model is frozen: computed once)."""
        pois = self.dropout(self.linear1(torch.cat([poi_img_vecs, poi_text_vecs], dim=-1)))
        pooled = self.attention_layer(image_emb, pois, poi_len)
        h = self.dropout(F.relu(self.linear3(torch.cat([image_emb, pois_feature, pooled], dim=1))))
        return self.linear2(self.dropout(F.relu(self.linear4(h))))

    @torch.inference_mode()
    def score_many(self, *inputs, batch_size=256) -> torch.Tensor:
        """:meth:`score_embeddings` of N rows in batches, in eval mode: N float32 on the CPU."""
        device, was = self.linear2.weight.device, self.training
        self.eval()
        try:
            out = [
                self.score_embeddings(*(t[a : a + batch_size].to(device) for t in inputs)).float().reshape(-1).cpu()
                for a in range(0, inputs[0].shape[0], batch_size)
            ]
        finally:
            self.train(was)
        return torch.cat(out) if out else torch.zeros(0)

    def forward(self, images, pois_feature, poi_img_vecs, poi_text_vecs, poi_len) -> torch.Tensor:
        v = self.align_model.encode_image(images)
        return self.score_embeddings(v, pois_feature, poi_img_vecs, poi_text_vecs, poi_len)
