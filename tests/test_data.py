import gzip
import os
import pickle
import random
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ticketlab.data import (
    DATASETS,
    BatchSampler,
    augment_crop_flip,
    batch_indices,
    describe_datasets,
    from_tensors,
    load,
)
from ticketlab.data.augment import crop_flip
from ticketlab.data.formats import read_idx
from ticketlab.errors import DataError, UsageError

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def no_env_data(monkeypatch):
    monkeypatch.delenv("TICKETLAB_DATA", raising=False)


def raw(ds, scale=255.0):
    """Undo the normalisation: back to raw pixel values."""
    shape = [1, -1] + [1] * (ds.x_train.dim() - 2)
    return lambda x: (x * ds.std.view(shape) + ds.mean.view(shape)) * scale


# ---------------------------------------------------------------- file writers (real formats)


def idx_bytes(a: np.ndarray) -> bytes:
    a = np.ascontiguousarray(a, dtype=np.uint8)
    return (
        struct.pack(">BBBB", 0, 0, 0x08, a.ndim)
        + struct.pack(f">{a.ndim}I", *a.shape)
        + (a.tobytes())
    )


def write_idx_dir(d: Path, arrays: dict, gz: bool) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for stem, a in arrays.items():
        data = idx_bytes(a)
        if gz:
            (d / f"{stem}.gz").write_bytes(gzip.compress(data))
        else:
            (d / stem).write_bytes(data)
    return d


def small_idx_arrays(seed=0, n_train=20, n_test=6):
    rng = np.random.default_rng(seed)
    return {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }


CIFAR_STEMS = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def small_cifar(per_file=2, seed=0):
    rng = np.random.default_rng(seed)
    return {
        stem: (
            rng.integers(0, 256, (per_file, 3072), dtype=np.uint8),
            [int(v) for v in rng.integers(0, 10, per_file)],
        )
        for stem in CIFAR_STEMS
    }


def write_cifar_bin(d: Path, batches) -> Path:
    d.mkdir(parents=True)
    for stem, (data, labels) in batches.items():
        records = np.concatenate([np.array(labels, np.uint8)[:, None], data], axis=1)
        (d / f"{stem}.bin").write_bytes(records.tobytes())
    return d


def write_cifar_py(d: Path, batches, protocol=2) -> Path:
    d.mkdir(parents=True)
    for stem, (data, labels) in batches.items():
        batch = {b"batch_label": stem.encode(), b"labels": labels, b"data": data}
        batch[b"filenames"] = [b"img%d.png" % i for i in range(len(labels))]
        (d / stem).write_bytes(pickle.dumps(batch, protocol=protocol))
    return d


# ---------------------------------------------------------------- Fashion-MNIST (real files)


@pytest.fixture(scope="module")
def fashion():
    if not (FASHION_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    return load("fashion_mnist")


def test_fashion_shapes_and_normalisation(fashion):
    ds = fashion
    assert (len(ds.x_train), len(ds.x_val), len(ds.x_test)) == (55000, 5000, 10000)
    assert ds.input_shape == (1, 28, 28) and ds.num_classes == 10
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert ds.augment is None
    mean = ds.x_train.mean(dim=(0, 2, 3))
    std = ds.x_train.std(dim=(0, 2, 3))
    assert torch.allclose(mean, torch.zeros(1), atol=1e-4)
    assert torch.allclose(std, torch.ones(1), atol=1e-4)
    assert set(ds.y_train.unique().tolist()) == set(range(10))


def row_keys(images: torch.Tensor, labels: torch.Tensor) -> Counter:
    a = images.reshape(len(images), -1).numpy()
    return Counter(zip(labels.tolist(), (r.tobytes() for r in a)))


def test_fashion_val_split_partitions_train_and_depends_on_seed(fashion):
    x_raw = torch.from_numpy(read_idx(FASHION_DIR / "train-images-idx3-ubyte.gz"))
    y_raw = torch.from_numpy(read_idx(FASHION_DIR / "train-labels-idx1-ubyte.gz")).long()

    def pixels(ds, x):
        return raw(ds)(x).round().clamp(0, 255).to(torch.uint8)

    ds0, ds1 = fashion, load("fashion_mnist", split_seed=1)
    for ds in (ds0, ds1):
        kept = row_keys(pixels(ds, ds.x_train), ds.y_train)
        val = row_keys(pixels(ds, ds.x_val), ds.y_val)
        # Together the two parts are exactly the original training set (as a multiset).
        assert kept + val == row_keys(x_raw[:, None], y_raw)
    assert not torch.equal(ds0.x_val, ds1.x_val)
    # The test split does not depend on the validation split, only on its normalisation.
    assert torch.equal(pixels(ds0, ds0.x_test), pixels(ds1, ds1.x_test))


# ---------------------------------------------------------------- IDX files


def test_idx_plain_and_gz_load_the_same(tmp_path):
    arrays = small_idx_arrays()
    plain = write_idx_dir(tmp_path / "plain", arrays, gz=False)
    gz = write_idx_dir(tmp_path / "gz" / "mnist", arrays, gz=True)
    a = load("mnist", data_dir=str(plain), val_size=5)
    b = load("mnist", data_dir=str(tmp_path / "gz"), val_size=5)  # finds data_dir/mnist
    assert gz.is_dir()
    for name in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.x_train.shape == (15, 1, 28, 28) and a.x_test.shape == (6, 1, 28, 28)
    expected = torch.from_numpy(arrays["t10k-images-idx3-ubyte"]).float()[:, None]
    assert torch.allclose(raw(a)(a.x_test), expected, atol=1e-3)
    assert a.y_test.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()


def test_fashion_found_under_fashion_mnist_subdir(tmp_path):
    write_idx_dir(tmp_path / "fashion-mnist", small_idx_arrays(), gz=True)
    ds = load("fashion_mnist", data_dir=str(tmp_path), val_size=0)
    assert len(ds.x_train) == 20 and len(ds.x_val) == 0


def test_data_found_through_env(tmp_path, monkeypatch):
    write_idx_dir(tmp_path / "mnist", small_idx_arrays(), gz=False)
    monkeypatch.setenv("TICKETLAB_DATA", str(tmp_path))
    assert len(load("mnist", val_size=2).x_train) == 18


@pytest.mark.parametrize("gz", [False, True])
def test_truncated_idx_is_corrupt(tmp_path, gz):
    d = write_idx_dir(tmp_path, small_idx_arrays(), gz=gz)
    f = d / ("train-images-idx3-ubyte" + (".gz" if gz else ""))
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(DataError, match="corrupt") as e:
        load("mnist", data_dir=str(d))
    assert str(f) in str(e.value) and "\n" not in str(e.value)


def test_idx_bad_magic_and_incomplete_dir(tmp_path):
    d = write_idx_dir(tmp_path / "a", small_idx_arrays(), gz=False)
    (d / "t10k-labels-idx1-ubyte").write_bytes(b"\x01\x02\x08\x01" + bytes(10))
    with pytest.raises(DataError, match="corrupt"):
        load("mnist", data_dir=str(d))
    (d / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match="incomplete.*t10k-labels-idx1-ubyte"):
        load("mnist", data_dir=str(d))


# ---------------------------------------------------------------- CIFAR-10 files


def test_cifar_bin_and_py_load_identical(tmp_path):
    batches = small_cifar()
    write_cifar_bin(tmp_path / "b" / "cifar-10-batches-bin", batches)
    py_dir = write_cifar_py(tmp_path / "p" / "cifar-10-batches-py", batches)
    py5_dir = write_cifar_py(tmp_path / "p5" / "cifar-10-batches-py", batches, protocol=5)
    a = load("cifar10", data_dir=str(tmp_path / "b"), val_size=2)  # parent directory
    b = load("cifar10", data_dir=str(py_dir), val_size=2)  # the batches directory itself
    c = load("cifar10", data_dir=str(py5_dir), val_size=2)
    for name in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
        assert torch.equal(getattr(a, name), getattr(c, name)), name
    assert a.x_train.shape == (8, 3, 32, 32) and a.x_test.shape == (2, 3, 32, 32)
    assert a.augment == "crop_flip" and a.mean.shape == (3,)
    data, labels = batches["test_batch"]
    # Records are R, G, B planes of 32x32 in row-major order.
    expected = torch.from_numpy(data).float().view(2, 3, 32, 32)
    assert torch.allclose(raw(a)(a.x_test), expected, atol=1e-3)
    assert a.y_test.tolist() == labels
    assert load("cifar10", data_dir=str(py_dir), val_size=0, augment=False).augment is None


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_cifar_py_refuses_unsafe_pickle(tmp_path):
    d = write_cifar_py(tmp_path / "cifar-10-batches-py", small_cifar())
    marker = tmp_path / "pwned"
    data, labels = small_cifar()["data_batch_1"]
    evil = {b"data": data, b"labels": labels, b"x": _Exploit(marker)}
    (d / "data_batch_1").write_bytes(pickle.dumps(evil, protocol=2))
    with pytest.raises(DataError, match="refusing to unpickle unsafe content") as e:
        load("cifar10", data_dir=str(tmp_path))
    assert "system" in str(e.value) and "data_batch_1" in str(e.value)
    assert not marker.exists()


def test_cifar_corrupt_files(tmp_path):
    d = write_cifar_bin(tmp_path / "cifar-10-batches-bin", small_cifar())
    f = d / "data_batch_3.bin"
    f.write_bytes(f.read_bytes()[:-1])
    with pytest.raises(DataError, match="data_batch_3.bin is corrupt"):
        load("cifar10", data_dir=str(tmp_path))
    p = write_cifar_py(tmp_path / "py" / "cifar-10-batches-py", small_cifar())
    (p / "test_batch").write_bytes((p / "test_batch").read_bytes()[:50])
    with pytest.raises(DataError, match="test_batch is corrupt"):
        load("cifar10", data_dir=str(p))


# ---------------------------------------------------------------- names and messages


def test_missing_dataset_lists_places_on_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("TICKETLAB_DATA", str(tmp_path / "env"))
    with pytest.raises(DataError) as e:
        load("cifar10", data_dir=str(tmp_path / "mine"))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("dataset 'cifar10' not found; looked in: ")
    for place in ("mine", "mine/cifar10", "env/cifar10", "env"):
        assert str(tmp_path / place) in msg
    assert "CIFAR-10 binary version" in msg and "--data-dir" in msg
    monkeypatch.delenv("TICKETLAB_DATA")
    with pytest.raises(DataError, match=r"looked in: .*/usr/share/datasets/mnist; ") as e:
        load("mnist", data_dir=str(tmp_path))
    assert "\n" not in str(e.value)
    with pytest.raises(DataError) as e:
        load("mnist", data_dir=str(tmp_path), download_hint=False)
    assert "MNIST site" not in str(e.value)


def test_unknown_name_lists_choices():
    with pytest.raises(DataError) as e:
        load("foo")
    assert str(e.value) == (
        "unknown dataset 'foo'; choose from: cifar10, fashion_mnist, imagefolder, mnist, "
        "mnist1d, xor"
    )
    assert isinstance(e.value, UsageError)


def test_registry_and_description_rows():
    rows = {r["name"]: r for r in describe_datasets()}
    assert set(rows) == set(DATASETS)
    assert (rows["fashion_mnist"]["train"], rows["fashion_mnist"]["val"]) == (55000, 5000)
    assert rows["mnist1d"]["shape"] == (1, 40) and rows["xor"]["classes"] == 2


# ---------------------------------------------------------------- generated datasets


def test_mnist1d_shapes_and_global_rng_untouched():
    np.random.seed(123)
    random.seed(123)
    np_before, py_before = np.random.get_state()[1].copy(), random.getstate()
    ds = load("mnist1d")
    assert np.array_equal(np.random.get_state()[1], np_before) and random.getstate() == py_before
    assert (len(ds.x_train), len(ds.x_val), len(ds.x_test)) == (3500, 500, 1000)
    assert ds.input_shape == (1, 40) and ds.num_classes == 10
    assert abs(float(ds.x_train.mean())) < 1e-4 and abs(float(ds.x_train.std()) - 1) < 1e-3
    again = load("mnist1d")
    assert torch.equal(ds.x_train, again.x_train) and ds.x_train is not again.x_train


def test_xor_labels_follow_rule():
    ds = load("xor", val_size=0)
    assert ds.input_shape == (2,) and ds.num_classes == 2 and len(ds.x_val) == 0
    for x, y in ((ds.x_train, ds.y_train), (ds.x_test, ds.y_test)):
        p = raw(ds, 1.0)(x)
        assert p.abs().max() <= 1 + 1e-5
        assert torch.equal(y, ((p[:, 0] > 0) ^ (p[:, 1] > 0)).long())
    assert 0.4 < ds.y_train.float().mean() < 0.6
    assert not torch.equal(ds.x_train[:1000], ds.x_test)


def test_bad_val_size_and_augment():
    with pytest.raises(DataError, match="val_size"):
        load("xor", val_size=4000)
    with pytest.raises(DataError, match="image"):
        load("xor", augment=True)


def test_from_tensors():
    x = torch.arange(40.0).view(20, 2)
    y = torch.arange(20) % 3
    ds = from_tensors(x, y, x[:4], y[:4], val_size=5, split_seed=3)
    assert ds.num_classes == 3 and len(ds.x_val) == 5 and len(ds.x_train) == 15
    assert not set(ds.x_train[:, 0].tolist()) & set(ds.x_val[:, 0].tolist())
    assert sorted(ds.x_train[:, 0].tolist() + ds.x_val[:, 0].tolist()) == x[:, 0].tolist()
    ds.x_test.add_(1)
    assert torch.equal(x[:4, 0], torch.tensor([0.0, 2, 4, 6]))  # inputs never modified
    given = from_tensors(x, y, x, y, x_val=x[:2], y_val=y[:2], normalize=True, num_classes=5)
    assert given.num_classes == 5 and len(given.x_val) == 2
    assert torch.allclose(given.x_train.mean(0), torch.zeros(2), atol=1e-6)
    with pytest.raises(DataError):
        from_tensors(x, y.float(), x, y)
    with pytest.raises(DataError):
        from_tensors(x, y, x, y, x_val=x, y_val=y, val_size=2)


# ---------------------------------------------------------------- batching


def test_batch_indices_deterministic_and_sampler_agrees():
    n, bs, seed = 103, 10, 7
    sampler = BatchSampler(n, bs, seed)
    assert sampler.steps_per_epoch == 10
    steps = list(range(35))
    random.Random(0).shuffle(steps)
    for step in steps:
        expected = batch_indices(n, bs, seed, step)
        assert expected.dtype == torch.int64 and expected.shape == (bs,)
        assert torch.equal(sampler.indices(step), expected)
        assert torch.equal(batch_indices(n, bs, seed, step), expected)
    assert not torch.equal(batch_indices(n, bs, seed, 0), batch_indices(n, bs, seed + 1, 0))


def test_each_index_at_most_once_per_epoch():
    n, bs = 53, 8
    sampler = BatchSampler(n, bs, seed=1)
    spe = sampler.steps_per_epoch
    epochs = []
    for e in range(3):
        idx = torch.cat([sampler.indices(e * spe + i) for i in range(spe)])
        assert len(idx) == spe * bs and len(idx.unique()) == len(idx)
        assert idx.min() >= 0 and idx.max() < n
        epochs.append(idx)
    assert not torch.equal(epochs[0], epochs[1])


def test_batch_size_errors():
    with pytest.raises(DataError):
        BatchSampler(5, 8, 0)
    with pytest.raises(DataError):
        batch_indices(5, 0, 0, 0)


# ---------------------------------------------------------------- augmentation


def test_augment_deterministic_and_shape():
    x = torch.randn(16, 3, 8, 8)
    a = augment_crop_flip(x, torch.Generator().manual_seed(5))
    b = augment_crop_flip(x, torch.Generator().manual_seed(5))
    c = augment_crop_flip(x, torch.Generator().manual_seed(6))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)


def test_augment_identity_without_padding_or_flip():
    x = torch.randn(6, 2, 5, 7)
    out = augment_crop_flip(x, torch.Generator().manual_seed(0), padding=0, flip_prob=0.0)
    assert torch.equal(out, x)


def test_crop_flip_matches_reference():
    x = torch.randn(4, 3, 6, 5)
    top, left = torch.tensor([0, 2, 8, 5]), torch.tensor([8, 3, 0, 1])
    flip = torch.tensor([True, False, True, True])
    out = crop_flip(x, top, left, flip, padding=4, fill=-1.5)
    padded = F.pad(x, (4, 4, 4, 4), value=-1.5)
    for i in range(4):
        crop = padded[i, :, top[i] : top[i] + 6, left[i] : left[i] + 5]
        assert torch.equal(out[i], torch.flip(crop, dims=[-1]) if flip[i] else crop)


def test_dataset_augment_pads_with_raw_zero():
    x = torch.rand(8, 3, 6, 6) * 200 + 50  # no raw zeros inside the images
    ds = from_tensors(x, torch.zeros(8, dtype=torch.long), x, torch.zeros(8, dtype=torch.long))
    ds = from_tensors(x, ds.y_train, x, ds.y_test, normalize=True, augment="crop_flip")
    out = ds.augment_batch(ds.x_train, torch.Generator().manual_seed(0))
    restored = raw(ds, 1.0)(out)
    # Every output pixel is either a raw zero (padding) or an original pixel value.
    padding = restored.abs() < 1e-3
    assert padding.any() and (restored[~padding] > 49).all()
    none = from_tensors(x, ds.y_train, x, ds.y_test)
    assert none.augment_batch(x, torch.Generator()) is x
