"""POI tables: restricted unpickler, safe format, conversion, and build_poi_tables.py."""

import logging
import os
import pickle
import shlex
import time

import numpy as np
import numpy.lib.format as npformat
import pytest
import torch
from fixtures import calibrate_image_bn, solid_image, tiny_align, write_image

import build_poi_tables
import poi_tables
from models.align import load_tokenizer
from models.checkpoint import save_align_checkpoint
from models.engine.encode import tokenize
from utils.formats.images import load_image
from utils.formats.npfiles import load_npy
from utils.formats.poi import PoiTableError, load_poi_table, poi_vector_tables, save_tables
from utils.formats.rows import RecallRow

PIC_NUM_NAME = "temp_dataset_item_pois_relation_1129_poi_2_pic_num.npy"


def _save_dict(path, d):
    np.save(path, d, allow_pickle=True)
    return path


def _vector_dict(n=4, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    names = ["西湖", " 灵隐寺", "古镇 ", "Great Wall", "乐园"][:n]
    return {k: rng.normal(size=dim).astype(np.float32) for k in names}


class _Boom:
    """Unpickling this object runs a shell command (the attack the loader must stop)."""

    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


# ---------------------------------------------------------------------------
# restricted loading
# ---------------------------------------------------------------------------
def test_restricted_loader_reads_dict_of_arrays(tmp_path):
    d = _vector_dict()
    path = _save_dict(tmp_path / "vec.npy", d)
    got = load_poi_table(path)
    assert list(got) == list(d)  # order and unstripped names kept
    for k in d:
        assert got[k].dtype == np.float32
        np.testing.assert_array_equal(got[k], d[k])


def test_restricted_loader_reads_dict_of_lists_scalars_and_strings(tmp_path):
    d = {
        "梦幻谷": [81, 0, 8],
        "苗寨": [16, 0, 0],
        "a": [1.5, 2, 3],
        "s": np.float32(2.5),
        "i": np.int64(7),
        "t": "text",
        "nested": {"x": (1, 2)},
        "f64": np.arange(3, dtype=np.float64),
    }
    got = load_poi_table(_save_dict(tmp_path / "pic.npy", d))
    assert got["梦幻谷"] == [81, 0, 8] and got["a"] == [1.5, 2, 3]
    assert got["s"] == np.float32(2.5) and got["s"].dtype == np.float32
    assert got["i"] == 7 and got["t"] == "text" and got["nested"] == {"x": (1, 2)}
    np.testing.assert_array_equal(got["f64"], np.arange(3.0))


def test_restricted_loader_reads_old_protocols(tmp_path):
    """Older numpy wrote protocol 2/3 pickles (bytes via _codecs.encode in protocol 2)."""
    d = {"a": np.ones(3, dtype=np.float32), "b": [1, 2, 3]}
    for proto in (2, 3, 4, 5):
        arr = np.empty((), dtype=object)
        arr[()] = d
        path = tmp_path / f"p{proto}.npy"
        with open(path, "wb") as f:
            npformat.write_array_header_1_0(f, npformat.header_data_from_array_1_0(arr))
            pickle.dump(arr, f, protocol=proto)
        got = load_poi_table(path)
        np.testing.assert_array_equal(got["a"], d["a"])
        assert got["b"] == [1, 2, 3]


def test_malicious_pickle_is_refused_and_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    cmd = f"touch {shlex.quote(str(marker))}"
    d = {"西湖": np.zeros(4, dtype=np.float32), "evil": np.array([_Boom(cmd)], dtype=object)}
    path = _save_dict(tmp_path / "evil.npy", d)

    with pytest.raises(PoiTableError) as e:
        load_poi_table(path)
    msg = str(e.value)
    assert str(path) in msg and f"'{os.system.__module__}.system'" in msg and "--trust-pickle" in msg
    assert not marker.exists()

    # the same file really is an attack: trusting it runs the command
    load_poi_table(path, trust_pickle=True)
    assert marker.exists()


def test_raw_pickle_bytes_with_forbidden_globals_are_refused(tmp_path):
    marker = tmp_path / "pwned2"
    arr_header = npformat.header_data_from_array_1_0(np.empty((), dtype=object))
    payloads = {
        "builtins.eval": b"cbuiltins\neval\n(V__import__('os').system('touch " + str(marker).encode() + b"')\ntR.",
        "subprocess.call": b"csubprocess\ncall\n((Vtouch\nV" + str(marker).encode() + b"\nltR.",
        "numpy.load": b"cnumpy\nload\n(Vx\ntR.",
    }
    for name, payload in payloads.items():
        path = tmp_path / f"{name}.npy"
        with open(path, "wb") as f:
            npformat.write_array_header_1_0(f, arr_header)
            f.write(payload)
        with pytest.raises(PoiTableError, match=rf"{path.name}.*'{name}'"):
            load_poi_table(path)
        assert not marker.exists()


def test_protocol2_codecs_encode_only_latin1(tmp_path):
    arr_header = npformat.header_data_from_array_1_0(np.empty((), dtype=object))
    path = tmp_path / "codec.npy"
    with open(path, "wb") as f:
        npformat.write_array_header_1_0(f, arr_header)
        f.write(b"c_codecs\nencode\n(Vabc\nVrot13\ntR.")
    with pytest.raises(PoiTableError, match="rot13"):
        load_poi_table(path)


def test_bad_files_give_clear_errors(tmp_path):
    with pytest.raises(PoiTableError, match="no such POI table"):
        load_poi_table(tmp_path / "nope.npy")
    junk = tmp_path / "junk.npy"
    junk.write_bytes(b"not numpy at all")
    with pytest.raises(PoiTableError, match="junk.npy: not a .npy file"):
        load_poi_table(junk)
    lst = _save_dict(tmp_path / "list.npy", np.array([[1, 2]], dtype=object))
    with pytest.raises(PoiTableError, match="expected a dict"):
        load_poi_table(lst)
    plain = tmp_path / "plain.npy"
    np.save(plain, np.ones((2, 3)))
    assert load_npy(plain).shape == (2, 3)  # numeric arrays need no pickle
    with pytest.raises(PoiTableError, match="expected a dict"):
        load_poi_table(plain)


# ---------------------------------------------------------------------------
# safe format and conversion
# ---------------------------------------------------------------------------
def test_safe_format_round_trip_and_no_pickle(tmp_path):
    d = _vector_dict()
    path = tmp_path / "vec.npz"
    save_tables({path: d}, source="test")
    with np.load(path, allow_pickle=False) as z:  # readable without pickle
        assert z["values"].dtype == np.float32 and z["values"].shape == (len(d), 8)
        assert str(z["kind"]) == "vectors"
    got = load_poi_table(path)
    assert list(got) == list(d)
    for k in d:
        np.testing.assert_array_equal(got[k], d[k])
    with pytest.raises(PoiTableError, match="'b' has 2 numbers"):
        save_tables({tmp_path / "ragged.npz": {"a": [1, 2, 3], "b": [1, 2]}})
    with pytest.raises(PoiTableError, match="not numeric"):
        save_tables({tmp_path / "text.npz": {"a": "text"}})


def test_convert_cli_round_trip(tmp_path, capsys):
    vec = _vector_dict()
    pic = {"西湖": [5, 1, 0], " 灵隐寺": [0, 0, 2], "古镇 ": [3, 0, 0]}
    src_v = _save_dict(tmp_path / "vec.npy", vec)
    src_p = _save_dict(tmp_path / "pic.npy", pic)
    assert poi_tables.main(["convert", str(src_v), str(tmp_path / "vec.npz")]) == 0
    assert poi_tables.main(["convert", str(src_p), str(tmp_path / "pic.npz")]) == 0
    v2, p2 = load_poi_table(tmp_path / "vec.npz"), load_poi_table(tmp_path / "pic.npz")
    assert list(v2) == list(vec) and list(p2) == list(pic)
    for k in vec:
        np.testing.assert_array_equal(v2[k], vec[k])
    for k in pic:
        assert p2[k].tolist() == pic[k] and p2[k].dtype.kind == "i"
    # and back to the authors' format
    assert poi_tables.main(["convert", str(tmp_path / "vec.npz"), str(tmp_path / "back.npy")]) == 0
    v3 = load_poi_table(tmp_path / "back.npy")
    for k in vec:
        np.testing.assert_array_equal(v3[k], vec[k])
    assert poi_tables.main(["info", str(tmp_path / "pic.npz")]) == 0
    out = capsys.readouterr().out
    assert "3 POIs" in out and "names with leading/trailing spaces: 2" in out

    evil = _save_dict(tmp_path / "evil.npy", {"x": np.array([_Boom("true")], dtype=object)})
    assert poi_tables.main(["convert", str(evil), str(tmp_path / "evil.npz")]) == 2
    assert "refusing to load" in capsys.readouterr().err
    assert not (tmp_path / "evil.npz").exists()


def test_real_pic_num_table(seed_data, tmp_path):
    path = seed_data / PIC_NUM_NAME
    if not path.is_file():
        pytest.skip(f"{path} absent")
    table = load_poi_table(path)
    assert len(table) == 2866
    assert all(isinstance(v, list) and len(v) == 3 for v in table.values())
    trusted = np.load(path, allow_pickle=True).item()
    assert table == trusted
    out = tmp_path / "pic_num.npz"
    assert poi_tables.main(["convert", str(path), str(out)]) == 0
    back = load_poi_table(out)
    assert {k: v.tolist() for k, v in back.items()} == trusted


# ---------------------------------------------------------------------------
# build_poi_tables.py
# ---------------------------------------------------------------------------
def test_build_poi_tables(tmp_path, bert_dir):
    colors = [(220, 30, 30), (30, 200, 40), (30, 60, 220), (230, 220, 20), (10, 10, 10)]
    model = calibrate_image_bn(
        tiny_align(bert_dir, seed=3), [solid_image(c, shape=sh) for c in colors for sh in ("圆", None)]
    )
    ckpt = tmp_path / "align.pth"
    save_align_checkpoint(model, ckpt)
    img_dir = tmp_path / "imgs"
    # poi 1 (西湖): 3 images; poi 2 (古镇): 2 images, one missing; poi 3 shares the name 西湖;
    # poi 4 (山): only an unreadable file
    rows = [
        ("1", "西湖", 1),
        ("1", "西湖", 2),
        ("1", "西湖", 3),
        ("2", " 古镇", 1),
        ("2", " 古镇", 2),
        ("3", "西湖", 1),
        ("4", "山", 1),
    ]
    lines = []
    for k, (pid, name, rank) in enumerate(rows):
        lines.append(f"{pid},{name},http://example.invalid/{pid}_{rank}.jpg,{rank},96,64,")
        if (pid, rank) == ("2", 2):
            continue
        if pid == "4":
            (img_dir / f"{pid}_{rank}.jpg").write_bytes(b"broken")
            continue
        write_image(solid_image(colors[k % 5], seed=k), img_dir / f"{pid}_{rank}.png")
    csv_path = tmp_path / "pois.csv"
    csv_path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    def run(extra, suffix):
        args = [
            "--csv",
            str(csv_path),
            "--image-dir",
            str(img_dir),
            "--checkpoint",
            str(ckpt),
            "--bert-dir",
            str(bert_dir),
            "--out-image-vectors",
            str(tmp_path / f"img{suffix}.npz"),
            "--out-name-vectors",
            str(tmp_path / f"name{suffix}.npz"),
            "--device",
            "cpu",
            "--num-workers",
            "0",
            "--no-progress",
        ] + extra
        assert build_poi_tables.main(args) == 0
        return (load_poi_table(tmp_path / f"img{suffix}.npz"), load_poi_table(tmp_path / f"name{suffix}.npz"))

    img_t, name_t = run(["--also-npy"], "")
    plain_t, _ = run(["--no-normalize-mean"], "_plain")

    with torch.no_grad():

        def img_vec(path):
            x, ok = load_image(path)
            assert ok
            return model.encode_image(x[None])[0].double().numpy()

        xihu = [img_vec(img_dir / f) for f in ("1_1.png", "1_2.png", "1_3.png", "3_1.png")]
        guzhen = [img_vec(img_dir / "2_1.png")]
        tok = load_tokenizer(bert_dir)
        enc = tokenize(tok, ["西湖"])
        name_vec = model.encode_text(enc["input_ids"], enc["attention_mask"])[0].numpy()

    assert set(img_t) == {"西湖", "古镇"}  # names stripped by the CSV reader; 山 has no readable image
    assert set(name_t) == {"西湖", "古镇", "山"}
    m = np.mean(xihu, axis=0)
    np.testing.assert_allclose(img_t["西湖"], m / np.linalg.norm(m), atol=1e-5)
    np.testing.assert_allclose(plain_t["西湖"], m, atol=1e-5)
    assert np.linalg.norm(plain_t["西湖"]) < 0.999  # the images differ, so the plain mean is shorter
    np.testing.assert_allclose(img_t["古镇"], guzhen[0], atol=1e-5)
    np.testing.assert_allclose(name_t["西湖"], name_vec, atol=1e-5)
    assert abs(np.linalg.norm(name_t["山"]) - 1) < 1e-5
    # the pickled-dict copy reads back through the restricted loader
    npy = load_poi_table(tmp_path / "img.npy")
    np.testing.assert_allclose(npy["西湖"], img_t["西湖"])


def test_build_poi_tables_rejects_unsafe_output_name(tmp_path, bert_dir, capsys):
    args = [
        "--csv",
        str(tmp_path / "x.csv"),
        "--image-dir",
        str(tmp_path),
        "--checkpoint",
        "x",
        "--bert-dir",
        str(bert_dir),
        "--out-image-vectors",
        str(tmp_path / "a.npy"),
        "--out-name-vectors",
        str(tmp_path / "b.npz"),
        "--device",
        "cpu",
    ]
    assert build_poi_tables.main(args) == 2
    assert "must end in .npz" in capsys.readouterr().err


def test_mean_vectors_normalised_and_plain(caplog):
    class Model:  # encode_images gives each file's vector and whether it was readable
        def encode_images(self, files, enc, desc):
            v = {"a1": [1, 0, 0], "a2": [0, 1, 0], "a3": [0, 0, 1], "b1": [0, 0, 1]}
            return np.array([v[f] for f in files], dtype=np.float32), [f in ("a1", "a2") for f in files]

        def encode_texts(self, texts, enc):
            return np.zeros((len(texts), 3), dtype=np.float32)

    rows = [RecallRow(i, poi[0], poi[0], "u", poi[1]) for i, poi in enumerate(["a1", "a2", "a3", "b1", "c1"])]
    images = {r.key: r.poi_id + r.rank for r in rows[:4]}  # c has no image at all
    caplog.set_level(logging.WARNING, logger="utils.formats.poi")  # whatever level an earlier test left
    norm, names, summary = poi_vector_tables(Model(), None, rows, images)
    plain, _, _ = poi_vector_tables(Model(), None, rows, images, normalize=False)
    assert set(norm) == {"a"} and set(names) == {"a", "b", "c"}  # unreadable images are left out, not zeros
    assert summary == {"unreadable_images": 2, "missing_images": 1}
    assert "2 POI names have no readable image and get no image vector: 'b', 'c'" in caplog.text
    np.testing.assert_allclose(plain["a"], [0.5, 0.5, 0])
    np.testing.assert_allclose(norm["a"], [2**-0.5, 2**-0.5, 0], rtol=1e-6)


# ---------------------------------------------------------------------------
# value types, tensors, bounds, shapes (issue 14: items 3, 4, 8)
# ---------------------------------------------------------------------------
from utils.formats.npfiles import LIMITS  # noqa: E402
from utils.formats.poi import load_poi_tables  # noqa: E402


def _npy_with_payload(path, payload: bytes):
    with open(path, "wb") as f:
        npformat.write_array_header_1_0(f, npformat.header_data_from_array_1_0(np.empty((), dtype=object)))
        f.write(payload)
    return path


@pytest.mark.parametrize(
    "kind", ["float32", "float64", "list", "numpy_scalars", "torch", "torch64", "torch_bf16", "row_matrix"]
)
def test_vector_tables_of_every_value_type(tmp_path, kind):
    rng = np.random.default_rng(3)
    ref = {n: rng.normal(size=6) for n in ("西湖", " 灵隐寺", "古镇 ")}
    conv = {
        "float32": lambda v: v.astype(np.float32),
        "float64": lambda v: v,
        "list": lambda v: [float(x) for x in v],
        "numpy_scalars": lambda v: [np.float32(x) for x in v],
        "torch": lambda v: torch.tensor(v, dtype=torch.float32),
        "torch64": lambda v: torch.tensor(v, dtype=torch.float64),
        "torch_bf16": lambda v: torch.tensor(v, dtype=torch.bfloat16),
        "row_matrix": lambda v: v.astype(np.float32)[None],  # 1 x D
    }[kind]
    path = _save_dict(tmp_path / "vec.npy", {k: conv(v) for k, v in ref.items()})
    pic = _save_dict(tmp_path / "pic.npy", {"西湖": [np.int64(3), 1, 0], " 灵隐寺": (0, 0, 2.0)})
    tables = load_poi_tables(pic, path, path, dim=6)
    tol = 1e-2 if kind == "torch_bf16" else 1e-6
    for k, v in ref.items():
        got = tables.image_vectors[k]
        assert isinstance(got, np.ndarray) and got.dtype == np.float32 and got.shape == (6,)
        np.testing.assert_allclose(got, v, atol=tol)
    assert tables.pic_num == {"西湖": [3, 1, 0], " 灵隐寺": [0.0, 0.0, 2.0]}
    # the generic reader gives numpy arrays for tensors too, and poi_tables.py converts it
    assert all(not isinstance(v, torch.Tensor) for v in load_poi_table(path).values())
    assert poi_tables.main(["convert", str(path), str(tmp_path / "vec.npz")]) == 0


def test_tensor_table_trusted_and_protocols(tmp_path):
    d = {"a": torch.arange(4, dtype=torch.float32), "b": torch.ones(4)}
    for proto in (2, 4, 5):
        arr = np.empty((), dtype=object)
        arr[()] = d
        path = tmp_path / f"t{proto}.npy"
        with open(path, "wb") as f:
            npformat.write_array_header_1_0(f, npformat.header_data_from_array_1_0(arr))
            pickle.dump(arr, f, protocol=proto)
        for trust in (False, True):
            got = load_poi_table(path, trust_pickle=trust)
            assert isinstance(got["a"], np.ndarray)
            np.testing.assert_array_equal(got["a"], [0, 1, 2, 3])


def test_torch_globals_other_than_tensor_rebuilding_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    # a storage payload that is itself a malicious pickle: torch's weights_only loader refuses it
    evil_storage = pickle.dumps(_Boom(f"touch {shlex.quote(str(marker))}"), protocol=2)
    payload = (
        (b"\x80\x02ctorch.storage\n_load_from_bytes\nq\x00C" + bytes([len(evil_storage)]) + evil_storage + b"\x85R.")
        if len(evil_storage) < 256
        else None
    )
    assert payload is not None
    with pytest.raises(PoiTableError, match="evil_storage.npy"):
        load_poi_table(_npy_with_payload(tmp_path / "evil_storage.npy", payload))
    assert not marker.exists()
    for name in ("torch\nload", "torch.hub\nload", "torch.serialization\nload", "torch._C\n_set_grad_enabled"):
        path = _npy_with_payload(tmp_path / "g.npy", b"c" + name.encode() + b"\n(Vx\ntR.")
        with pytest.raises(PoiTableError, match="refusing to load"):
            load_poi_table(path)
    assert not marker.exists()


def _nested_shared(levels, width):
    x = [0.5] * width
    for _ in range(levels):
        x = [x] * width
    return x


@pytest.mark.parametrize("case", ["deep", "wide", "cycle", "shared_array"])
def test_hostile_small_pickles_fail_fast(tmp_path, case):
    """Item 4: a small pickle of shared references would expand to billions of
    elements; the reader must refuse it at once with a clear message."""
    if case == "deep":
        obj = {"x": _nested_shared(9, 10)}
        want = "nested more than"
    elif case == "wide":  # within the depth limit, 2.5e8 elements once expanded
        level2 = _nested_shared(1, 500)
        obj = {f"k{i}": level2 for i in range(1000)}
        want = "expands to more than"
    elif case == "cycle":
        loop = []
        loop.append(loop)
        obj = {"x": loop}
        want = "reference cycle"
    else:
        big = np.zeros(1_000_000, dtype=np.float32)
        obj = {f"k{i}": big for i in range(LIMITS.elements // 1_000_000 + 1)}
        want = "expands to more than"
    path = _save_dict(tmp_path / f"{case}.npy", obj)
    if case != "shared_array":
        assert path.stat().st_size < 20_000
    for call in (
        lambda: load_poi_table(path),
        lambda: load_poi_tables(path, None, None, dim=4),
        lambda: load_poi_table(path, trust_pickle=True),
    ):
        t0 = time.perf_counter()
        with pytest.raises(PoiTableError, match=want) as e:
            call()
        assert time.perf_counter() - t0 < 2.0
        assert str(path) in str(e.value)
    t0 = time.perf_counter()
    assert poi_tables.main(["info", str(path)]) == 2
    assert time.perf_counter() - t0 < 2.0


def test_entry_limit(tmp_path):
    from utils.formats.npfiles import Limits

    path = _save_dict(tmp_path / "many.npy", {f"p{i}": [1, 2, 3] for i in range(50)})
    with pytest.raises(PoiTableError, match="50 entries"):
        load_poi_table(path, limits=Limits(entries=10))


@pytest.mark.parametrize(
    "table,dim,want",
    [
        ({"a": [1.0, float("nan")], "b": [0.0, 1.0]}, 2, "'a' holds NaN or infinite"),
        ({"a": [1.0, 2.0], "b": [float("inf"), 1.0]}, 2, "'b' holds NaN or infinite"),
        ({"a": [1.0, 2.0], "b": [1.0, 2.0, 3.0]}, 3, "'a' has 2 values but 'b' has 3"),
        ({"a": [1.0, 2.0]}, 3, "vectors have 2 values, the model's embedding has 3"),
        ({"a": "text"}, 4, "not numeric"),
        ({"a": [[1.0, 2.0], [3.0]]}, 2, "not a vector"),
        ({"a": {"x": 1}}, 2, "not numeric"),
        ({"a": np.full(2, 3e39)}, 2, "overflows float32"),
    ],
)
def test_vector_table_shape_checks(tmp_path, table, dim, want):
    path = _save_dict(tmp_path / "vec.npy", table)
    with pytest.raises(PoiTableError, match=want) as e:
        load_poi_tables(None, path, None, dim=dim)
    assert str(e.value).startswith("--poi-image-vectors: ") and str(path) in str(e.value)


@pytest.mark.parametrize(
    "value,want",
    [
        ([1, 2, 3, 4], "4 values, expected up to 3"),
        ([1, float("nan"), 0], "not up to 3 finite counts"),
        (["a", "b", "c"], "not up to 3 finite counts"),
    ],
)
def test_pic_num_shape_checks(tmp_path, value, want):
    path = _save_dict(tmp_path / "pic.npy", {"ok": [1, 2, 3], "bad": value})
    with pytest.raises(PoiTableError, match=want) as e:
        load_poi_tables(path, None, None, dim=4)
    assert str(e.value).startswith("--poi-pic-num: ") and "'bad'" in str(e.value)


def test_nan_safe_table_and_convert_refuse(tmp_path, capsys):
    src = _save_dict(tmp_path / "nan.npy", {"a": np.array([1.0, np.nan], dtype=np.float32)})
    assert poi_tables.main(["convert", str(src), str(tmp_path / "out.npz")]) == 2
    assert "holds NaN" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan.npy"]
    # a .npz written by another tool with NaN rows is refused too
    np.savez(
        tmp_path / "nan.npz",
        names=np.array(["a"]),
        values=np.array([[np.nan, 1.0]], dtype=np.float32),
        kind=np.array("vectors"),
    )
    with pytest.raises(PoiTableError, match="holds NaN"):
        load_poi_tables(None, tmp_path / "nan.npz", None, dim=2)
