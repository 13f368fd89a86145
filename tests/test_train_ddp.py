"""Two processes under torchrun (gloo, CPU) reach what one process reaches with the
same global batch.

BatchNorm: in training mode each process would normalise its own half of the batch,
so a 2-process run cannot equal a 1-process one (SyncBatchNorm needs a GPU); dropout
and drop-connect draw different masks in each process, so they are set to 0. The
recall equivalence test therefore trains with --bn-eval: the image tower's weights
train (their gradients cross the all-gather and DDP's averaging) while BatchNorm uses
its running statistics. The ranker's Dice BatchNorm and dropout have the same issue,
so rank_train.py under torchrun is checked to run and produce a loadable checkpoint,
not for equality.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from fixtures import tiny_align
from test_train import TRAIN_ARCH, make_rank_data, make_recall_data, train_losses

import recall_train
from models.checkpoint import load_align_model, load_ranker, save_align_checkpoint
from utils.formats.images import load_image
from utils.training import read_metrics

# dropout and drop-connect draw different random masks in each process: off here
NO_DROPOUT_ARCH = replace(
    TRAIN_ARCH, image_overrides=TRAIN_ARCH.image_overrides | {"dropout_rate": 0.0, "drop_connect_rate": 0.0}
)
ROOT = Path(__file__).resolve().parent.parent
COMMON = ["--workers", "0", "--device", "cpu"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script: str, args: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        str(ROOT / script),
        *args,
    ]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stderr[-4000:]
    return p


def test_recall_two_processes_equal_one(tmp_path, bert_dir):
    csv, img, _ = make_recall_data(tmp_path, owners_per_combo=1, images_per_owner=2)
    # a random model whose BatchNorm running statistics fit these images (one pass in
    # training mode with a cumulative average), so that --bn-eval features are informative
    model = tiny_align(bert_dir, seed=2, arch=NO_DROPOUT_ARCH).train()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    with torch.no_grad():
        model.encode_image(torch.stack([load_image(p)[0] for p in sorted(img.iterdir())]))
    init = tmp_path / "init.pth"
    save_align_checkpoint(model, init)
    args = [
        "--csv",
        str(csv),
        "--image-dir",
        str(img),
        "--bert-dir",
        str(bert_dir),
        "--init",
        str(init),
        "--epochs",
        "2",
        "--batch-size",
        "8",
        "--lr",
        "3e-3",
        "--warmup-steps",
        "1",
        "--val-owners",
        "8",
        "--bn-eval",
        *COMMON,
    ]
    one, two = tmp_path / "one", tmp_path / "two"
    assert recall_train.main(args + ["--out-dir", str(one)]) == 0
    p = torchrun("recall_train.py", args + ["--out-dir", str(two)])
    assert "on 2 process(es)" in p.stderr
    l1, l2 = train_losses(one), train_losses(two)
    assert len(l1) == len(l2) == 4  # 16 training pairs / 8 per step x 2 epochs
    np.testing.assert_allclose(l2, l1, rtol=0, atol=1e-4)
    # held-out evaluation (rank 0 only) sees the same model
    v1 = [r for r in read_metrics(one / "metrics.csv") if r["split"] == "val"]
    v2 = [r for r in read_metrics(two / "metrics.csv") if r["split"] == "val"]
    assert [r["recall@5"] for r in v1] == [r["recall@5"] for r in v2]
    w1 = load_align_model(one / "last.pth", bert_dir).state_dict()
    w2 = load_align_model(two / "last.pth", bert_dir).state_dict()
    w0 = model.state_dict()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=0, atol=1e-4, msg=k)
    # both towers and the scale really trained (Adam moves each weight ~lr a step)
    for k in (
        "image_model._conv_stem.weight",
        "image_hidden_layer.weight",
        "text_model.embeddings.word_embeddings.weight",
        "text_hidden_layer.weight",
        "logit_scale",
    ):
        assert (w1[k] - w0[k]).abs().max() > 3e-3, k


def test_rank_under_torchrun(tmp_path, bert_dir):
    data = make_rank_data(tmp_path, n_train=16, n_val=8)
    init = tmp_path / "init.pth"
    save_align_checkpoint(tiny_align(bert_dir, seed=1), init)
    out = tmp_path / "run"
    p = torchrun(
        "rank_train.py",
        data
        + [
            "--bert-dir",
            str(bert_dir),
            "--init",
            str(init),
            "--out-dir",
            str(out),
            "--epochs",
            "2",
            "--batch-size",
            "8",
            "--no-augment",
            "--cache-embeddings",
            *COMMON,
        ],
    )
    assert "on 2 process(es)" in p.stderr and "[rank 1] INFO" not in p.stderr  # rank-0 logs
    rows = read_metrics(out / "metrics.csv")
    assert [r["split"] for r in rows] == ["train"] * 2 + ["val"] + ["train"] * 2 + ["val"]
    assert int(rows[2]["n"]) == 8
    load_ranker(out / "best.ckpt", bert_dir)


def test_locked_out_dir_under_torchrun(tmp_path, bert_dir):
    """Rank 0 takes --out-dir's lock and tells rank 1: both stop at once with the one-line
    error (no hang in a collective), and nothing is written."""
    from utils.io import exclusive_lock

    data = make_rank_data(tmp_path, n_train=16, n_val=8)
    init = tmp_path / "init.pth"
    save_align_checkpoint(tiny_align(bert_dir, seed=1), init)
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        str(ROOT / "rank_train.py"),
        *data,
        "--bert-dir",
        str(bert_dir),
        "--init",
        str(init),
        "--out-dir",
        str(out),
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--no-augment",
        "--cache-embeddings",
        *COMMON,
    ]
    with exclusive_lock(out):
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
        assert sorted(x.name for x in out.iterdir()) == [".lock"]
    assert p.returncode != 0
    lines = [x for x in p.stderr.splitlines() if x.startswith("rank_train: error: another run holds")]
    assert len(lines) == 2, p.stderr[-3000:]
