import json
import tarfile

import numpy as np
import pytest
import torch

from clipshield.data import shards
from clipshield.data.shards import DataError


def make_samples(n, size=4):
    rng = np.random.default_rng(0)
    return [(f"s{i:04d}", rng.integers(0, 256, (size, size, 3), dtype=np.uint8), f"caption number {i}",
             {"class": i % 10, "index": i}) for i in range(n)]


@pytest.fixture
def dataset(tmp_path):
    samples = make_samples(10)
    sizes = shards.write_shards(samples, tmp_path / "ds", prefix="train", per_shard=4)
    return tmp_path / "ds", samples, sizes


def test_write_sizes_and_files(dataset):
    d, samples, sizes = dataset
    assert sizes == {"train-000000.tar": 4, "train-000001.tar": 4, "train-000002.tar": 2}
    assert json.loads((d / "sizes.json").read_text()) == sizes
    assert sorted(p.name for p in d.iterdir()) == ["sizes.json", "train-000000.tar", "train-000001.tar",
                                                    "train-000002.tar"]
    assert not (d.parent / "ds.partial").exists()
    assert shards.num_samples(d) == 10


def test_round_trip_exact(dataset):
    d, samples, _ = dataset
    got = list(shards.iter_samples(d))
    assert [g["key"] for g in got] == [s[0] for s in samples]
    for g, (key, img, cap, meta) in zip(got, samples):
        assert g["image"].dtype == np.uint8
        assert np.array_equal(g["image"], img)
        assert g["caption"] == cap
        assert g["meta"] == meta


def test_undecoded_gives_the_encoded_bytes(dataset):
    d, samples, _ = dataset
    first = next(shards.iter_samples(d, decode=False))
    assert first["image"] == b"P6\n4 4\n255\n" + samples[0][1].tobytes()  # small images are stored raw
    assert np.array_equal(shards.decode_image(first["image"]), samples[0][1])


def test_images_are_raw_up_to_64_px_png_above(tmp_path):
    rng = np.random.default_rng(1)
    for side, ext in ((64, "ppm"), (65, "png")):
        img = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        shards.write_shards([("k", img, "a caption", {})], tmp_path / str(side))
        assert shards.tar_members(tmp_path / str(side) / "shard-000000.tar") == ["k.json", f"k.{ext}", "k.txt"]
        assert np.array_equal(next(shards.iter_samples(tmp_path / str(side)))["image"], img)


def test_ppm_is_the_standard_format_and_reads_back_writable():
    from io import BytesIO

    from PIL import Image
    img = np.random.default_rng(2).integers(0, 256, (3, 5, 3), dtype=np.uint8)  # 5 wide, 3 high
    data = shards.encode_ppm(img)
    assert np.array_equal(np.asarray(Image.open(BytesIO(data))), img)  # any PPM reader sees the same pixels
    out = shards.decode_image(data)
    assert np.array_equal(out, img) and out.flags.writeable
    commented = b"P6\n# made elsewhere\n5 3\n255\n" + img.tobytes()  # a header PIL parses for us
    assert np.array_equal(shards.decode_image(commented), img)
    with pytest.raises(ValueError, match="a 5x3 PPM holds 45 pixel bytes, this one 44"):
        shards.decode_image(data[:-1])
    with pytest.raises(ValueError, match="image_format 'gif'"):
        shards.write_shard("unused.tar", [], image_format="gif")


def test_writes_are_byte_identical(tmp_path):
    samples = make_samples(7)
    shards.write_shards(samples, tmp_path / "a", per_shard=3)
    shards.write_shards(samples, tmp_path / "b", per_shard=3)
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_rewrite_replaces_folder(tmp_path):
    shards.write_shards(make_samples(7), tmp_path / "a", per_shard=3)
    shards.write_shards(make_samples(2), tmp_path / "a", per_shard=3)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["shard-000000.tar", "sizes.json"]
    assert shards.num_samples(tmp_path / "a") == 2


def test_tar_members_sorted_with_mtime_zero(dataset):
    d, samples, _ = dataset
    path = d / "train-000000.tar"
    expected = [f"{k}.{ext}" for k, *_ in samples[:4] for ext in ("json", "ppm", "txt")]
    assert shards.tar_members(path) == expected
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            assert m.mtime == 0
            assert m.uname == "clipshield" and m.gname == "clipshield"
        meta = json.loads(tf.extractfile("s0001.json").read())
        assert meta == {"class": 1, "index": 1}
        assert tf.extractfile("s0001.txt").read() == b"caption number 1"


def test_json_is_key_sorted(tmp_path):
    shards.write_shards([("k", np.zeros((2, 2, 3), np.uint8), "c", {"z": 1, "a": 2})], tmp_path / "d")
    with tarfile.open(tmp_path / "d" / "shard-000000.tar") as tf:
        assert tf.extractfile("k.json").read() == b'{"a": 2, "z": 1}'


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_key_with_dot_raises_and_keeps_old_dataset(dataset):
    d, samples, _ = dataset
    bad = [("ok", samples[0][1], "c", {}), ("a.b", samples[0][1], "c", {})]
    with pytest.raises(ValueError, match="dot"):
        shards.write_shards(bad, d)
    # the failed write must not have touched the existing data set
    assert [s["key"] for s in shards.iter_samples(d)] == [s[0] for s in samples]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_failed_write_leaves_no_partial(tmp_path):
    bad = [("a.b", np.zeros((2, 2, 3), np.uint8), "c", {})]
    with pytest.raises(ValueError):
        shards.write_shards(bad, tmp_path / "ds")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_missing_dir(tmp_path):
    with pytest.raises(DataError, match=r"does not exist.*dvc repro"):
        shards.shard_paths(tmp_path / "nope")
    with pytest.raises(DataError):
        list(shards.iter_samples(tmp_path / "nope"))


def test_missing_sizes_json(dataset):
    d, _, _ = dataset
    (d / "sizes.json").unlink()
    with pytest.raises(DataError, match=r"sizes\.json.*dvc repro"):
        list(shards.iter_samples(d))


def test_missing_shard(dataset):
    d, _, _ = dataset
    (d / "train-000001.tar").unlink()
    with pytest.raises(DataError) as e:
        list(shards.iter_samples(d))
    assert "train-000001.tar" in str(e.value)
    assert "dvc repro" in str(e.value) and "dvc pull" in str(e.value)


def test_empty_write_raises(tmp_path):
    with pytest.raises(DataError, match="no samples"):
        shards.write_shards([], tmp_path / "empty")
    assert not (tmp_path / "empty").exists()


def test_empty_dataset_raises(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    shards.write_sizes(d, {})
    with pytest.raises(DataError, match="no samples"):
        list(shards.iter_samples(d))


def test_empty_dataset_message_names_fix(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    shards.write_sizes(d, {})
    with pytest.raises(DataError, match="dvc repro"):
        shards.shard_paths(d)


def test_corrupt_sizes_json(dataset):
    d, _, _ = dataset
    (d / "sizes.json").write_text("{not json")
    with pytest.raises(DataError):
        shards.shard_paths(d)


@pytest.mark.parametrize("cut", ["half", "header"])
def test_truncated_shard_raises_when_iterated(dataset, cut):
    d, _, _ = dataset
    p = d / "train-000001.tar"
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2] if cut == "half" else data[:100])
    it = shards.iter_samples(d)
    with pytest.raises(DataError):
        list(it)


def test_sample_lacking_part_message_names_fix(dataset):
    d, _, _ = dataset
    p = d / "train-000001.tar"
    p.write_bytes(p.read_bytes()[:4096 + 100])  # cut inside the second sample's PNG header
    with pytest.raises(DataError, match="dvc"):
        list(shards.iter_samples(d))


def test_garbage_shard_raises(dataset):
    d, _, _ = dataset
    (d / "train-000000.tar").write_bytes(b"this is not a tar file" * 10)
    with pytest.raises(DataError):
        list(shards.iter_samples(d))


def test_shard_truncated_at_sample_boundary_raises(dataset):
    d, _, _ = dataset
    p = d / "train-000000.tar"
    # each member is a 512-byte header + data padded to 512 bytes; here 1 sample = 3 members = 3072 bytes
    with tarfile.open(p) as tf:
        second = [m for m in tf.getmembers() if m.name.startswith("s0001")][0]
    p.write_bytes(p.read_bytes()[: second.offset])  # keep sample s0000 only, complete
    with pytest.raises(DataError):
        list(shards.iter_samples(d))


def test_sample_lacking_a_part_raises(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    import io
    with tarfile.open(d / "x.tar", "w") as tf:
        for name, data in (("k.json", b"{}"), ("k.png", shards.encode_png(np.zeros((2, 2, 3), np.uint8)))):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    shards.write_sizes(d, {"x.tar": 1})
    with pytest.raises(DataError, match="txt"):
        list(shards.iter_samples(d))


def test_iter_batches_shape_range_and_labels(tmp_path):
    samples = make_samples(10, size=5)
    shards.write_shards(samples, tmp_path / "d", per_shard=4)
    batches = list(shards.iter_batches(tmp_path / "d", batch_size=4, shuffle=0, epochs=1))
    assert len(batches) == 2  # drop_last: 10 -> 4 + 4
    b = batches[0]
    assert b["images"].shape == (4, 3, 5, 5) and b["images"].dtype == torch.float32
    assert 0.0 <= b["images"].min() and b["images"].max() <= 1.0
    expected = torch.from_numpy(samples[0][1]).permute(2, 0, 1).float() / 255
    assert torch.equal(b["images"][0], expected)
    assert b["captions"] == [s[2] for s in samples[:4]]
    assert b["labels"].tolist() == [0, 1, 2, 3]
    assert b["keys"] == [s[0] for s in samples[:4]]
    last = list(shards.iter_batches(tmp_path / "d", batch_size=4, shuffle=0, epochs=1, drop_last=False))
    assert [len(x["keys"]) for x in last] == [4, 4, 2]


def _orders(d, seed, epochs=2):
    keys = [k for b in shards.iter_batches(d, batch_size=5, shuffle=50, seed=seed, epochs=epochs) for k in b["keys"]]
    return [keys[i * 20:(i + 1) * 20] for i in range(epochs)]


def test_iter_batches_reshuffles_per_epoch_deterministically(tmp_path):
    shards.write_shards(make_samples(20, size=2), tmp_path / "d", per_shard=7)
    e0, e1 = _orders(tmp_path / "d", seed=3)
    all_keys = sorted(f"s{i:04d}" for i in range(20))
    assert sorted(e0) == all_keys and sorted(e1) == all_keys  # each epoch is a permutation
    assert e0 != all_keys  # shuffled
    assert e0 != e1  # reshuffled per epoch
    assert _orders(tmp_path / "d", seed=3) == [e0, e1]  # same seed -> same order
    assert _orders(tmp_path / "d", seed=4) != [e0, e1]


def test_iter_batches_infinite(tmp_path):
    shards.write_shards(make_samples(6, size=2), tmp_path / "d", per_shard=6)
    it = shards.iter_batches(tmp_path / "d", batch_size=4, shuffle=0, epochs=None)
    got = [next(it)["keys"] for _ in range(3)]
    assert got == [["s0000", "s0001", "s0002", "s0003"]] * 3


def test_iter_batches_with_decode_threads_gives_the_same_batches(tmp_path):
    shards.write_shards(make_samples(40, size=6), tmp_path / "d", per_shard=7)
    for start in (0, 3):
        serial = shards.iter_batches(tmp_path / "d", batch_size=6, shuffle=10, seed=5, start=start)
        threaded = shards.iter_batches(tmp_path / "d", batch_size=6, shuffle=10, seed=5, start=start, threads=3,
                                       uint8=True)
        for _ in range(15):  # over two epochs and a half
            a, b = next(serial), next(threaded)
            assert a["keys"] == b["keys"] and a["captions"] == b["captions"]
            assert b["images"].dtype == torch.uint8 and torch.equal(a["images"], shards.as_float_images(b["images"]))
            assert torch.equal(a["labels"], b["labels"])
        threaded.close()


def test_iter_batches_with_decode_threads_reports_a_corrupt_image(tmp_path):
    samples = make_samples(8, size=4)
    d = tmp_path / "d"
    shards.write_shards(samples[:5], d, prefix="train", per_shard=8)
    with tarfile.open(next(d.glob("*.tar")), "a") as tf:  # a sixth sample whose PNG is garbage
        for ext, data in (("png", b"not a png at all"), ("txt", b"caption"), ("json", b'{"class": 1}')):
            ti = tarfile.TarInfo(f"bad.{ext}")
            ti.size = len(data)
            tf.addfile(ti, __import__("io").BytesIO(data))
    shards.write_sizes(d, {next(d.glob("*.tar")).name: 6})
    with pytest.raises(DataError, match="bad.*not a readable PPM, PNG or JPEG"):
        list(shards.iter_batches(d, batch_size=3, shuffle=0, epochs=1, threads=2))


def test_prefetch_keeps_order_raises_where_the_producer_failed_and_stops_with_the_consumer():
    import itertools
    import threading

    def failing():
        yield 1
        yield 2
        raise ValueError("producer broke")
    got = []
    with pytest.raises(ValueError, match="producer broke"):
        for x in shards.prefetch(failing(), depth=1):
            got.append(x)
    assert got == [1, 2]
    endless = shards.prefetch(itertools.count(), depth=2)
    assert [next(endless) for _ in range(5)] == [0, 1, 2, 3, 4]
    endless.close()  # the producer, blocked on a full queue, ends too
    assert not [t for t in threading.enumerate() if t.name == "clipshield-prefetch"]


def test_load_all_limit(dataset):
    d, samples, _ = dataset
    b = shards.load_all(d, limit=5)
    assert b["keys"] == [s[0] for s in samples[:5]]
    assert b["images"].shape == (5, 3, 4, 4)


def _tar(path, members, fmt=tarfile.USTAR_FORMAT):
    import io
    with tarfile.open(path, "w", format=fmt) as tf:
        for name, data in members:
            if data is None:
                tf.addfile(_dir(name))
                continue
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))


def _dir(name):
    ti = tarfile.TarInfo(name)
    ti.type = tarfile.DIRTYPE
    return ti


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tar_files_reads_what_tarfile_reads(tmp_path, fmt):
    long_dir = "d" * 120  # over ustar's 100-byte name field: ustar splits it into prefix/name, GNU and pax extend
    unicode = "ete" if fmt == tarfile.USTAR_FORMAT else "\u00e9t\u00e9"  # pax writes a non-ASCII name as an extended header
    members = [("a.txt", b"x" * 513), ("sub", None), (f"{long_dir}/k0.png", b""), (f"{long_dir}/k0.txt", b"caption"),
               (f"{unicode}.json", b"{}")]
    path = tmp_path / "x.tar"
    _tar(path, members, fmt)
    with tarfile.open(path) as tf:
        expected = [(m.name, tf.extractfile(m).read()) for m in tf if m.isreg()]
    assert list(shards.tar_files(str(path))) == expected
    assert len(expected) == 4


def test_tar_files_checks_the_header_checksum(tmp_path):
    path = tmp_path / "x.tar"
    _tar(path, [("a.txt", b"hello")])
    data = bytearray(path.read_bytes())
    data[0] = ord("b")  # rename a.txt -> b.txt without fixing the checksum
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match="checksum"):
        list(shards.tar_files(str(path)))


def test_tar_files_refuses_an_empty_file(tmp_path):
    (tmp_path / "x.tar").write_bytes(b"")
    with pytest.raises(DataError, match="x.tar: the file is empty"):
        list(shards.tar_files(str(tmp_path / "x.tar")))
