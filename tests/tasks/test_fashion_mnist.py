"""Fashion-MNIST: idx parsing and its errors, the user's folder, the Debian package (installed,
cached, fetched from a locally built .deb), float tensors and the seeded batch sampler.

Every file is generated here (12 training and 5 test images); nothing touches the network.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import pytest
import torch

from subq.tasks import packages
from subq.tasks.fashion_mnist import (
    CLASSES,
    FASHION_MNIST_DIR,
    FASHION_MNIST_MARKER,
    FASHION_MNIST_PACKAGE,
    IDX_FILES,
    ImageSampler,
    encode_idx,
    load_fashion_mnist,
    parse_idx,
    read_idx,
    to_uint8,
)

from .test_packages import FakeDownload, build_deb, needs_dpkg

N_TRAIN, N_TEST = 12, 5


def idx_bytes(values: torch.Tensor) -> bytes:
    """The idx encoding written out from the format's definition (not the code under test):
    ``>HBB`` zero, type 0x08, rank; ``>I`` per size; the bytes row-major."""
    header = struct.pack(">HBB", 0, 0x08, values.dim())
    header += struct.pack(f">{values.dim()}I", *values.shape)
    return header + bytes(values.flatten().tolist())


def make_split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8)
    images[0, 0, 0], images[0, 0, 1] = 0, 255            # both ends of the range occur
    labels = torch.arange(n, dtype=torch.uint8) % 10     # every class when n >= 10
    return images, labels[torch.randperm(n)]


def write_folder(folder: Path, gzipped: dict[str, bool] | None = None,
                 overrides: dict[str, bytes] | None = None) -> dict[str, torch.Tensor]:
    """The four idx files in ``folder`` (gzipped unless ``gzipped[key]`` is False, raw bytes
    from ``overrides``); returns the tensors written."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = dict(zip(("train_images", "train_labels"), make_split(N_TRAIN), strict=True))
    tensors.update(zip(("test_images", "test_labels"), make_split(N_TEST), strict=True))
    for key, stem in IDX_FILES.items():
        data = (overrides or {}).get(key, idx_bytes(tensors[key]))
        if (gzipped or {}).get(key, True):
            (folder / f"{stem}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / stem).write_bytes(data)
    return tensors


def assert_matches(ds, tensors: dict[str, torch.Tensor]) -> None:
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        images, labels = ds.split(split)
        assert images.dtype == torch.uint8 and images.shape == (n, 28, 28)
        assert labels.dtype == torch.int64 and labels.shape == (n,)
        assert torch.equal(images, tensors[f"{split}_images"])
        assert torch.equal(labels, tensors[f"{split}_labels"].long())
    assert ds.classes == CLASSES and len(CLASSES) == 10


@pytest.fixture(autouse=True)
def no_package(tmp_path, monkeypatch):
    """Not installed and not cached: an empty system root and an empty cache."""
    (tmp_path / "system").mkdir()
    monkeypatch.setattr(packages, "SYSTEM_ROOT", tmp_path / "system")
    monkeypatch.setenv("SUBQ_CACHE", str(tmp_path / "cache"))
    return tmp_path


def offline(package: str, dest: Path) -> Path:
    raise FileNotFoundError("no network here")


def test_idx_round_trip_raw_and_gzipped(tmp_path):
    for shape in [(N_TRAIN, 28, 28), (N_TEST,), (3, 4, 5, 2), (0, 28, 28)]:
        values = torch.randint(0, 256, shape, dtype=torch.uint8)
        data = idx_bytes(values)
        assert encode_idx(values) == data
        assert torch.equal(parse_idx(data), values)
        (tmp_path / "raw").write_bytes(data)
        (tmp_path / "packed.gz").write_bytes(gzip.compress(data))
        for name in ("raw", "packed.gz"):
            read = read_idx(tmp_path / name)
            assert read.dtype == torch.uint8 and read.shape == shape
            assert torch.equal(read, values)
    # gzip is recognised by content, not by name
    (tmp_path / "plain-name").write_bytes(gzip.compress(idx_bytes(values)))
    assert torch.equal(read_idx(tmp_path / "plain-name"), values)


@pytest.mark.parametrize(("damage", "message"), [
    (lambda d: b"\x00\x00\x09" + d[3:], "bad idx magic"),          # signed bytes, not 0x08
    (lambda d: b"\x01" + d[1:], "bad idx magic"),
    (lambda d: d[:-1], "truncated"),
    (lambda d: d[:10], "truncated"),                               # inside the header
    (lambda d: d[:3], "too short"),
    (lambda d: d + b"\x00", "trailing bytes"),
    (lambda d: d[:3] + b"\x00", "truncated or empty"),             # zero dimensions
])
def test_bad_files_raise_value_error_naming_the_file(tmp_path, damage, message):
    data = damage(idx_bytes(torch.randint(0, 256, (4, 28, 28), dtype=torch.uint8)))
    for path, content in [(tmp_path / "bad-ubyte", data),
                          (tmp_path / "bad-ubyte.gz", gzip.compress(data))]:
        path.write_bytes(content)
        with pytest.raises(ValueError, match=message) as err:
            read_idx(path)
        assert str(path) in str(err.value)


def test_broken_gzip_stream_names_the_file(tmp_path):
    packed = gzip.compress(idx_bytes(torch.zeros(6, 28, 28, dtype=torch.uint8)))
    path = tmp_path / "cut-ubyte.gz"
    path.write_bytes(packed[:len(packed) // 2])
    with pytest.raises(ValueError, match="gzip") as err:
        read_idx(path)
    assert str(path) in str(err.value)


def test_user_folder_gzipped_raw_or_mixed(tmp_path):
    folder = tmp_path / "gz"
    tensors = write_folder(folder)
    ds = load_fashion_mnist(folder, fetch=False, download=offline)
    assert_matches(ds, tensors)
    assert ds.source == str(folder)
    mixed = {"train_images": False, "test_labels": False}
    tensors = write_folder(tmp_path / "mixed", gzipped=mixed)
    assert_matches(load_fashion_mnist(str(tmp_path / "mixed")), tensors)
    raw = {key: False for key in IDX_FILES}
    tensors = write_folder(tmp_path / "raw", gzipped=raw)
    assert_matches(load_fashion_mnist(tmp_path / "raw"), tensors)


def test_user_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="--data DIR"):
        load_fashion_mnist(tmp_path / "missing")
    write_folder(tmp_path / "d")
    (tmp_path / "d" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        load_fashion_mnist(tmp_path / "d")
    bad = {
        "test_labels": (torch.zeros(N_TEST + 1, dtype=torch.uint8), "one per image"),
        "train_labels": (torch.full((N_TRAIN,), 10, dtype=torch.uint8), "labels reach 10"),
        "train_images": (torch.zeros(N_TRAIN, 27, 28, dtype=torch.uint8), r"\(N, 28, 28\)"),
    }
    for key, (values, message) in bad.items():
        folder = tmp_path / key
        write_folder(folder, overrides={key: idx_bytes(values)})
        with pytest.raises(ValueError, match=message):
            load_fashion_mnist(folder)
    folder = tmp_path / "cut"
    good = idx_bytes(torch.zeros(N_TRAIN, 28, 28, dtype=torch.uint8))
    write_folder(folder, overrides={"train_images": good[:-5]})
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz: truncated"):
        load_fashion_mnist(folder)


def test_installed_package_is_read_without_download(no_package):
    tensors = write_folder(no_package / "system" / FASHION_MNIST_DIR)

    def download(package, dest):
        raise AssertionError("an installed package must not be downloaded")

    ds = load_fashion_mnist(download=download)
    assert_matches(ds, tensors)
    assert FASHION_MNIST_PACKAGE in ds.source and FASHION_MNIST_DIR in ds.source


def test_cached_package_is_read_with_fetch_off(no_package):
    root = no_package / "cache" / "debian" / FASHION_MNIST_PACKAGE
    tensors = write_folder(root / FASHION_MNIST_DIR, gzipped={"test_images": False})
    assert_matches(load_fashion_mnist(fetch=False), tensors)


@needs_dpkg
def test_package_is_fetched_once_into_the_cache(no_package, tmp_path):
    tensors = write_folder(tmp_path / "files")
    files = {f"{FASHION_MNIST_DIR}/{stem}.gz": (tmp_path / "files" / f"{stem}.gz").read_bytes()
             for stem in IDX_FILES.values()}
    assert FASHION_MNIST_MARKER in files   # the real package's layout
    files[f"usr/share/doc/{FASHION_MNIST_PACKAGE}/copyright"] = b"Expat"
    download = FakeDownload(build_deb(tmp_path, files, package=FASHION_MNIST_PACKAGE))
    ds = load_fashion_mnist(download=download)
    assert_matches(ds, tensors)
    assert download.calls == [FASHION_MNIST_PACKAGE]
    cached = no_package / "cache" / "debian" / FASHION_MNIST_PACKAGE / FASHION_MNIST_DIR
    assert str(cached) in ds.source
    assert_matches(load_fashion_mnist(download=download), tensors)
    assert download.calls == [FASHION_MNIST_PACKAGE]


def test_missing_data_names_the_package_and_the_flag():
    for kwargs in ({"fetch": False}, {"download": offline}):
        with pytest.raises(FileNotFoundError) as err:
            load_fashion_mnist(**kwargs)
        message = str(err.value)
        assert f"apt-get install {FASHION_MNIST_PACKAGE}" in message
        assert "--data DIR" in message and "t10k-images-idx3-ubyte" in message
    assert "no network here" in message


def test_as_tensors_scale_shape_and_inverse(tmp_path):
    tensors = write_folder(tmp_path / "d")
    ds = load_fashion_mnist(tmp_path / "d")
    images, labels = ds.as_tensors("train")
    assert images.dtype == torch.float32 and images.shape == (N_TRAIN, 1, 28, 28)
    assert labels.dtype == torch.int64 and torch.equal(labels, tensors["train_labels"].long())
    pixels = tensors["train_images"].double().unsqueeze(1)
    assert torch.allclose(images.double(), pixels / 127.5 - 1, atol=1e-6)
    assert images.min() == -1 and images.max() == 1
    unit, _ = ds.as_tensors("test", normalise=False, device="cpu")
    assert unit.shape == (N_TEST, 1, 28, 28) and unit.min() >= 0 and unit.max() <= 1
    assert torch.allclose(unit.double(), tensors["test_images"].double().unsqueeze(1) / 255,
                          atol=1e-6)
    assert torch.equal(to_uint8(images), tensors["train_images"].unsqueeze(1))
    assert torch.equal(to_uint8(unit, normalised=False), tensors["test_images"].unsqueeze(1))
    assert to_uint8(torch.tensor([-3.0, 0.0, 5.0])).tolist() == [0, 128, 255]
    with pytest.raises(ValueError, match="split"):
        ds.as_tensors("valid")


def sampler_data(n: int = N_TRAIN) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose first pixel is their row index, so a batch tells which rows it drew."""
    images = torch.randn(n, 1, 28, 28)
    images[:, 0, 0, 0] = torch.arange(n, dtype=torch.float32)
    return images, torch.randint(0, 10, (n,))


def test_sampler_is_a_function_of_seed_and_step(fresh_seed):
    images, labels = sampler_data()
    a, b = ImageSampler(images, labels, seed=fresh_seed), ImageSampler(images, labels, fresh_seed)
    for step in (0, 9, 3, 1):
        a.batch(step, 5)
    for step in (4, 0, 17):
        xa, ya = a.batch(step, 5)
        xb, yb = b.batch(step, 5)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert xa.shape == (5, 1, 28, 28) and ya.shape == (5,)
        rows = xa[:, 0, 0, 0].long()
        assert torch.equal(xa, images[rows]) and torch.equal(ya, labels[rows])
    other = ImageSampler(images, labels, seed=fresh_seed + 1)
    steps = range(6)
    assert any(not torch.equal(b.indices(s, 5), other.indices(s, 5)) for s in steps)
    assert any(not torch.equal(b.indices(s, 5), b.indices(s + 1, 5)) for s in steps)


def test_sampler_epochs_show_every_image_once():
    images, labels = sampler_data()
    sampler = ImageSampler(images, labels, seed=7)
    stream = torch.cat([sampler.indices(step, 5) for step in range(12)])   # 60 = 5 epochs
    for epoch in range(5):
        assert sorted(stream[epoch * N_TRAIN:(epoch + 1) * N_TRAIN].tolist()) == list(
            range(N_TRAIN))
    assert any(not torch.equal(stream[:N_TRAIN], stream[e * N_TRAIN:(e + 1) * N_TRAIN])
               for e in range(1, 5))
    # a batch larger than the data spans several epochs, in the same stream
    assert torch.equal(ImageSampler(images, labels, seed=7).indices(1, 30), stream[30:60])


@pytest.mark.parametrize(("start", "count"), [(0, 8), (0, 3), (3, 3), (6, 2), (7, 1), (2, None)])
def test_sampler_rows_are_rows_of_the_global_batch(start, count):
    sampler = ImageSampler(*sampler_data(), seed=11)
    full_x, full_y = sampler.batch(5, 8)
    part_x, part_y = sampler.batch(5, 8, start=start, count=count)
    stop = 8 if count is None else start + count
    assert torch.equal(part_x, full_x[start:stop]) and torch.equal(part_y, full_y[start:stop])


def test_sampler_rejects_bad_input():
    images, labels = sampler_data()
    with pytest.raises(ValueError, match="labels"):
        ImageSampler(images, labels[:-1], seed=0)
    with pytest.raises(ValueError, match="at least one image"):
        ImageSampler(images[:0], labels[:0], seed=0)
    sampler = ImageSampler(images, labels, seed=0)
    for start, count in [(-1, 2), (3, 6), (0, 0)]:
        with pytest.raises(ValueError, match="start"):
            sampler.batch(0, 8, start=start, count=count)
    with pytest.raises(ValueError, match="batch"):
        sampler.batch(0, 0)
    with pytest.raises(ValueError, match="step"):
        sampler.indices(-1, 4)
