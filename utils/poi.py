"""Item inputs of the ranker, built from a ranking row exactly as SPEC section 5 says.

For one item (``title``, ``poi_names``):
- ``pois_text``: the text whose vector is ``pois_feature`` — the whole
  ``poi_names`` string when ``poi_names.strip()`` is non-empty (the ``< 1`` rule),
  else the title;
- the POI sequence: none when ``len(poi_names.strip()) <= 1``; otherwise
  ``poi_names.split(",")``, stable-sorted by descending pic-num weight
  ``n0 + 5*n1 + 3*n2`` (looked up by the stripped name, missing = [0, 0, 0]),
  first 5 kept; vectors looked up by the *unstripped* name, zeros when missing.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_POIS = 5


def pic_num_weight(counts) -> float:
    n = list(counts) + [0, 0, 0]
    return float(n[0]) + 5 * float(n[1]) + 3 * float(n[2])


def poi_sequence(poi_names: str, pic_num: dict, max_pois: int = MAX_POIS) -> list[str]:
    """The ordered POI names (unstripped, as split) that enter the attention."""
    if len(poi_names.strip()) <= 1:
        return []
    names = poi_names.split(",")
    names.sort(key=lambda n: -pic_num_weight(pic_num.get(n.strip(), (0, 0, 0))))
    return names[:max_pois]


def pois_text(title: str, poi_names: str) -> str:
    return poi_names if len(poi_names.strip()) >= 1 else title


@dataclass
class ItemInputs:
    pois_text: str            # text encoded into pois_feature
    poi_names: list[str]      # the POI sequence (<= 5 names)
    poi_img: np.ndarray       # 5 x D float32, zero rows for unused/unknown
    poi_txt: np.ndarray       # 5 x D float32
    poi_len: int
    unknown: list[str]        # names of the sequence missing from a vector table


def build_item_inputs(title: str, poi_names: str, pic_num: dict, img_vectors: dict,
                      name_vectors: dict, dim: int = 512) -> ItemInputs:
    seq = poi_sequence(poi_names, pic_num)
    poi_img = np.zeros((MAX_POIS, dim), dtype=np.float32)
    poi_txt = np.zeros((MAX_POIS, dim), dtype=np.float32)
    unknown = []
    for i, name in enumerate(seq):
        iv, tv = img_vectors.get(name), name_vectors.get(name)
        if iv is None or tv is None:
            unknown.append(name)
        if iv is not None:
            poi_img[i] = np.asarray(iv, dtype=np.float32).reshape(-1)
        if tv is not None:
            poi_txt[i] = np.asarray(tv, dtype=np.float32).reshape(-1)
    return ItemInputs(pois_text(title, poi_names), seq, poi_img, poi_txt, len(seq), unknown)
