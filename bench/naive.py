"""The authors' image preprocessing, written out as SPEC section 3 gives it, for the
benches' naive baselines: Pillow decode, ``cv2.resize`` on uint8, float64 normalisation.
(The package's own path gives the same bits with less work: utils/images.py.)"""

from __future__ import annotations

import cv2
import numpy as np
import torch
from PIL import Image

MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def authors_image(path) -> torch.Tensor:
    """3 x 224 x 224 float32; the zero image (before normalisation) when unreadable."""
    try:
        img = np.array(Image.open(path).convert("RGB"))
    except Exception:  # noqa: BLE001  (the authors' scripts fell back to a blank image)
        img = np.zeros((224, 224, 3), dtype=np.uint8)
    img = (cv2.resize(img, (224, 224)) / 255.0 - MEAN) / STD
    return torch.from_numpy(np.transpose(img, (2, 0, 1)).astype(np.float32))


def authors_text_encoder(align_model, bert_dir):
    """``f(texts) -> normalised vectors`` the authors' way: transformers' ``BertModel``
    (the same weights as ``align_model.text_model``) and ``BertTokenizer``, padding to the
    longest, truncation at 50 tokens, [CLS] -> ``text_hidden_layer``. Importing
    transformers is part of the cost, as it was in their scripts."""
    import torch.nn.functional as F
    from transformers import BertConfig, BertModel, BertTokenizer

    cfg = BertConfig.from_json_file(f"{bert_dir}/config.json")
    cfg.num_hidden_layers = align_model.arch.text_layers
    bert = BertModel(cfg, add_pooling_layer=True).eval()
    bert.load_state_dict(align_model.text_model.state_dict())
    tok = BertTokenizer(f"{bert_dir}/vocab.txt")

    def encode(texts):
        enc = tok(list(texts), padding="longest", truncation=True, max_length=50, return_tensors="pt")
        cls = bert(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state[:, 0]
        return F.normalize(align_model.text_hidden_layer(cls), p=2, dim=1)

    return encode
