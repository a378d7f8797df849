"""Tests for ddpm_jax.data: sources, order, per-process slices, prefetch, augmentation.

The 8-device tests need XLA_FLAGS=--xla_force_host_platform_device_count=8 set before jax is
imported (the conftest does it); they are skipped otherwise.
"""

import io
import logging
import time

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from PIL import Image

from ddpm_jax import data
from ddpm_jax.data import InputError, create_datasets, sources, to_model_input

NUM_COLORS = 40  # files in the colour-coded folder


def make_config(**overrides) -> ml_collections.ConfigDict:
    fields = {
        "source": "embedded",
        "name": "lfw_faces",
        "path": "",
        "split": "train",
        "eval_split": "",
        "data_dir": "",
        "image_size": 8,
        "resize": "center_crop",
        "random_flip": True,
        "cache": True,
        "cache_max_gb": 4.0,
        "num_eval_examples": 0,
        # A folder holds out num_eval_examples exactly (unless it has fewer images); the
        # 5% default has its own tests below.
        "folder_eval_fraction": 1.0,
        "prefetch": 2,
        "num_workers": 2,
    }
    fields.update(overrides)
    return ml_collections.ConfigDict(fields)


def create(config, batch, seed=0, **kw):
    return create_datasets(config, seed=seed, global_batch_size=batch, **kw)


def color(i: int) -> tuple[int, int, int]:
    return (i * 5, 255 - i * 5, 7)


def color_ids(images: np.ndarray) -> list[int]:
    """The file index encoded in each solid-colour image of the colour folder."""
    assert (images == images[:, :1, :1]).all(), "colour images must stay solid"
    return [int(r) // 5 for r in images[:, 0, 0, 0]]


@pytest.fixture(scope="module")
def color_folder(tmp_path_factory):
    """NUM_COLORS solid 4x4 PNGs; file i (sorted) has colour(i), so an image names its index."""
    root = tmp_path_factory.mktemp("colors")
    for i in range(NUM_COLORS):
        Image.new("RGB", (4, 4), color(i)).save(root / f"{i:03d}.png")
    return root


def color_config(root, **overrides):
    return make_config(**{"source": "folder", "path": str(root), "image_size": 4, **overrides})


def one_device_sharding() -> NamedSharding:
    return NamedSharding(Mesh(np.array(jax.devices()[:1]), ("data",)), P(None, "data"))


def jpeg_bytes(size=(64, 48), seed=0) -> bytes:
    noise = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, "JPEG")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# Folder source


def write_mixed_folder(root):
    """10 readable images in many modes and formats, one truncated PNG, and files to ignore."""
    (root / "sub" / "nested").mkdir(parents=True)
    Image.new("RGB", (40, 30), (255, 0, 0)).save(root / "a_rgb.jpg", quality=95)
    Image.new("L", (20, 50), 100).save(root / "b_gray.png")
    Image.new("RGBA", (33, 33), (0, 0, 0, 0)).save(root / "c_transparent.png")
    palette = Image.new("P", (12, 12), 0)
    palette.putpalette([0, 0, 255] * 256)
    palette.save(root / "d_palette.png")
    Image.fromarray(np.full((18, 18), 65535, np.uint16)).save(root / "e_16bit.png")
    Image.new("RGB", (16, 24), (0, 255, 0)).save(root / "f.webp", lossless=True)
    Image.new("RGB", (16, 16), (10, 20, 30)).save(root / "g.BMP")
    good = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(good, "PNG")
    (root / "k_corrupt.png").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    Image.new("CMYK", (30, 30), (0, 0, 0, 0)).save(root / "sub" / "i_cmyk.jpg")
    Image.new("RGB", (250, 250), (200, 100, 50)).save(root / "sub" / "j_big.png")
    Image.new("LA", (9, 7), (50, 255)).save(root / "sub" / "nested" / "h_la.png")
    (root / "notes.txt").write_text("not an image")
    (root / "._a_rgb.jpg").write_bytes(b"macOS resource fork")  # hidden: ignored, not skipped


def test_folder_modes_sizes_and_a_corrupt_file(tmp_path, caplog):
    write_mixed_folder(tmp_path)
    with caplog.at_level(logging.WARNING):
        ds, eval_images = create(
            color_config(tmp_path, image_size=16, num_eval_examples=2), batch=4
        )
    # Sorted relative paths: a b c d e f g k_corrupt sub/i sub/j sub/nested/h.
    corrupt = 7
    assert ds.skipped_files == 1
    assert [r.levelno for r in caplog.records if "k_corrupt.png" in r.getMessage()] == [
        logging.WARNING
    ]
    assert ds.num_examples == 8 and ds.image_shape == (16, 16, 3)
    assert eval_images.shape == (2, 16, 16, 3) and eval_images.dtype == np.uint8
    assert corrupt not in ds.train_indices and corrupt not in ds.eval_indices
    batch = ds.local_batch(0)
    assert batch.shape == (4, 16, 16, 3) and batch.dtype == np.uint8
    np.testing.assert_array_equal(eval_images, ds.images(ds.eval_indices))

    readable = [i for i in range(11) if i != corrupt]
    images = dict(zip(readable, ds.images(np.array(readable)), strict=True))
    expected = {
        1: (100, 100, 100),  # L
        2: (255, 255, 255),  # transparent RGBA: composited on white
        3: (0, 0, 255),  # palette
        4: (255, 255, 255),  # 16-bit white is scaled, not clipped
        5: (0, 255, 0),  # lossless webp
        6: (10, 20, 30),  # bmp, upper-case extension
        9: (200, 100, 50),  # 250x250, downscaled
        10: (50, 50, 50),  # opaque LA
    }
    for i, rgb in expected.items():
        np.testing.assert_array_equal(images[i], np.broadcast_to(rgb, (16, 16, 3)), f"index {i}")
    assert np.abs(images[0].astype(int) - (255, 0, 0)).max() <= 3  # jpeg
    assert images[8].min() >= 250  # CMYK with no ink: white


def test_load_image_reads_a_file_exactly_as_training_does(tmp_path):
    """data.load_image is the public way to read one image file (e.g. a mask) for the model."""
    noise = np.random.default_rng(0).integers(0, 256, (48, 64, 3), np.uint8)
    Image.fromarray(noise).save(tmp_path / "a.jpg")
    sixteen_bit = (np.arange(600).reshape(30, 20) * 100).astype(np.uint16)
    Image.fromarray(sixteen_bit).save(tmp_path / "b.png")
    for channels, resize in ((3, "center_crop"), (1, "stretch")):
        config = color_config(tmp_path, image_size=(6, 10), channels=channels, resize=resize)
        ds, _ = create(config, batch=1)
        for i, name in enumerate(["a.jpg", "b.png"]):
            image = data.load_image(str(tmp_path / name), (6, 10), resize, channels)
            assert image.shape == (6, 10, channels) and image.dtype == np.uint8
            np.testing.assert_array_equal(image, ds.images([i])[0])


def test_resize_policies(tmp_path):
    # 60x20: red, green and blue vertical thirds.
    stripes = np.zeros((20, 60, 3), np.uint8)
    for k in range(3):
        stripes[:, 20 * k : 20 * (k + 1), k] = 255
    Image.fromarray(stripes).save(tmp_path / "stripes.png")
    crop, _ = create(color_config(tmp_path, image_size=10), batch=1)
    stretch, _ = create(color_config(tmp_path, image_size=10, resize="stretch"), batch=1)
    # Only the green middle survives the crop (up to Lanczos ringing from the neighbours).
    cropped = crop.local_batch(0)[0].astype(int)
    assert (cropped[..., 1] >= 230).all() and (cropped[..., [0, 2]] <= 30).all()
    squashed = stretch.local_batch(0)[0]
    assert tuple(squashed[5, 0]) == (255, 0, 0) and tuple(squashed[5, -1]) == (0, 0, 255)


@pytest.mark.parametrize("cache,num_workers", [(True, 2), (False, 1)])
def test_truncated_jpeg_found_late_is_replaced(tmp_path, caplog, cache, num_workers):
    for i in (0, 1, 2, 4, 5):
        Image.new("RGB", (4, 4), color(i)).save(tmp_path / f"{i}.png")
    whole = jpeg_bytes()
    (tmp_path / "3.jpg").write_bytes(whole[: len(whole) // 2])  # header fine, data cut short
    config = color_config(tmp_path, cache=cache, num_workers=num_workers)
    ds, _ = create(config, batch=3)
    assert ds.skipped_files == 0  # the header probe cannot tell

    with caplog.at_level(logging.WARNING):
        for step in range(4):  # two epochs
            ids, images = ds.global_indices(step), ds.local_batch(step)
            # Index 3 is served as the next training example, 4; the rest as themselves.
            assert color_ids(images) == [4 if i == 3 else i for i in ids]
    assert ds.skipped_files == 1
    assert sum("3.jpg" in r.getMessage() for r in caplog.records) == 1


# ---------------------------------------------------------------------------------------------
# Order, processes, resumption


def test_process_slices_partition_the_global_batch(color_folder):
    config = color_config(color_folder, num_eval_examples=8)
    ref, eval_images = create(config, batch=8, process_index=0, process_count=1)
    train, held_out = set(ref.train_indices.tolist()), set(ref.eval_indices.tolist())
    assert len(train) == ref.num_examples == 32 and len(held_out) == 8
    assert train.isdisjoint(held_out) and train | held_out == set(range(NUM_COLORS))
    assert color_ids(eval_images) == ref.eval_indices.tolist()

    for epoch in range(2):  # 4 steps per epoch: each training example exactly once
        ids = np.concatenate([ref.global_indices(s) for s in range(4 * epoch, 4 * epoch + 4)])
        assert sorted(ids.tolist()) == sorted(train)
        assert color_ids(ref.local_batch(4 * epoch)) == ref.global_indices(4 * epoch).tolist()

    for count in (2, 4):
        procs = [
            create(config, batch=8, process_index=i, process_count=count)[0] for i in range(count)
        ]
        for step in (0, 3, 4, 9):
            slices = [p.local_batch(step) for p in procs]
            assert all(s.shape == (8 // count, 4, 4, 3) for s in slices)
            np.testing.assert_array_equal(np.concatenate(slices), ref.local_batch(step))
            per_process = [set(color_ids(s)) for s in slices]
            assert sum(len(s) for s in per_process) == 8 == len(set().union(*per_process))
            assert color_ids(np.concatenate(slices)) == ref.global_indices(step).tolist()
            assert held_out.isdisjoint(ref.global_indices(step).tolist())


def test_same_seed_same_batches_and_resume(color_folder):
    config = color_config(color_folder, num_eval_examples=8)
    a, _ = create(config, batch=8, seed=3)
    b, _ = create(config, batch=8, seed=3)
    c, _ = create(config, batch=8, seed=4)
    steps = range(10)
    assert all((a.global_indices(s) == b.global_indices(s)).all() for s in steps)
    assert any((a.global_indices(s) != c.global_indices(s)).any() for s in steps)
    np.testing.assert_array_equal(a.eval_indices, c.eval_indices)  # hold-out ignores the seed

    sharding = one_device_sharding()
    with a.iterate(0, sharding) as uninterrupted:
        run = [np.asarray(next(uninterrupted)) for _ in range(7)]
    with b.iterate(5, sharding) as resumed:
        np.testing.assert_array_equal(np.asarray(next(resumed)), run[5])
        np.testing.assert_array_equal(np.asarray(next(resumed)), run[6])
    with b.iterate(5, sharding, steps_per_call=2) as fused:
        np.testing.assert_array_equal(np.asarray(next(fused))[:, None], np.stack(run[5:7]))
    np.testing.assert_array_equal(run[3][0], a.local_batch(3))


def test_iterate_on_8_devices(color_folder):
    if jax.device_count() < 8:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
    ds, _ = create(color_config(color_folder, num_eval_examples=8), batch=16)
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    sharding = NamedSharding(mesh, P(None, "data"))
    with ds.iterate(3, sharding, steps_per_call=2) as batches:
        for first in (3, 5, 7):
            arr = next(batches)
            assert arr.shape == (2, 16, 4, 4, 3) and arr.dtype == np.uint8
            assert arr.sharding == sharding
            assert {s.data.shape for s in arr.addressable_shards} == {(2, 2, 4, 4, 3)}
            expected = np.stack([ds.local_batch(first), ds.local_batch(first + 1)])
            np.testing.assert_array_equal(np.asarray(arr), expected)
        thread = batches._thread
    assert not thread.is_alive()


def test_iterate_reraises_errors_from_the_prefetch_thread(color_folder):
    ds, _ = create(color_config(color_folder), batch=8)

    def broken(ids):
        raise RuntimeError("disk gone")

    ds.images = broken
    batches = ds.iterate(0, one_device_sharding())
    with pytest.raises(RuntimeError, match="disk gone"):
        next(batches)
    with pytest.raises(StopIteration):
        next(batches)


# ---------------------------------------------------------------------------------------------
# On-device augmentation


def test_to_model_input_range_and_flips():
    images = np.random.default_rng(0).integers(0, 256, (16, 6, 5, 3), np.uint8)
    images[0], images[1] = 0, 255
    fn = jax.jit(to_model_input, static_argnames="random_flip")
    plain = images.astype(np.float32) / 127.5 - 1.0

    out = np.asarray(fn(images, jax.random.key(0), True))
    assert out.dtype == np.float32 and out.min() == -1.0 and out.max() == 1.0
    flipped = [np.allclose(o, p[:, ::-1], atol=1e-6) for o, p in zip(out, plain, strict=True)]
    kept = [np.allclose(o, p, atol=1e-6) for o, p in zip(out[2:], plain[2:], strict=True)]
    assert all(
        f != k for f, k in zip(flipped[2:], kept, strict=True)
    )  # every image: one or the other
    assert 0 < sum(flipped) < 16
    np.testing.assert_allclose(np.asarray(fn(images, jax.random.key(0), False)), plain, atol=1e-6)
    assert fn(images[None], jax.random.key(0), True).shape == (1, 16, 6, 5, 3)
    with pytest.raises(TypeError, match="uint8"):
        to_model_input(plain, jax.random.key(0), True)


def test_to_model_input_ignores_sharding():
    if jax.device_count() < 8:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
    images = np.random.default_rng(1).integers(0, 256, (2, 16, 8, 8, 3), np.uint8)
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    fn = jax.jit(to_model_input, static_argnames="random_flip")
    key = jax.random.key(7)
    sharded = fn(jax.device_put(images, NamedSharding(mesh, P(None, "data"))), key, True)
    single = fn(jax.device_put(images, jax.devices()[0]), key, True)
    assert len(sharded.sharding.device_set) == 8
    np.testing.assert_array_equal(np.asarray(sharded), np.asarray(single))


# ---------------------------------------------------------------------------------------------
# TFDS and embedded sources


def test_tfds_cifar10_with_eval_split_and_hold_out():
    tfds = pytest.importorskip("tensorflow_datasets")
    config = make_config(source="tfds", name="cifar10", image_size=16, num_eval_examples=4)
    with tfds.testing.mock_data(num_examples=20):
        config.eval_split = "test"
        split_ds, split_eval = create(config, batch=8)
        config.eval_split = ""
        held_ds, held_eval = create(config, batch=8)
    assert split_ds.num_examples == 20 and len(split_ds.eval_indices) == 0
    assert held_ds.num_examples == 16 and len(held_ds.eval_indices) == 4
    for eval_images in (split_eval, held_eval):
        assert eval_images.shape == (4, 16, 16, 3) and eval_images.dtype == np.uint8
    batch = held_ds.local_batch(2)
    assert batch.shape == (8, 16, 16, 3) and batch.dtype == np.uint8 and batch.std() > 0


@pytest.mark.parametrize("name,eval_split", [("celeb_a", "validation"), ("lfw", "")])
def test_tfds_faces_non_square_and_png_sources(name, eval_split):
    tfds = pytest.importorskip("tensorflow_datasets")
    config = make_config(source="tfds", name=name, eval_split=eval_split, num_eval_examples=2)
    with tfds.testing.mock_data(num_examples=6):
        ds, eval_images = create(config, batch=4)
    assert eval_images.shape == (2, 8, 8, 3)
    assert ds.local_batch(1).shape == (4, 8, 8, 3)


def test_tfds_failure_is_one_line_with_a_way_out():
    pytest.importorskip("tensorflow_datasets")
    config = make_config(source="tfds", name="no_such_dataset_xyz")
    with pytest.raises(InputError, match="no_such_dataset_xyz") as err:
        create(config, batch=8)
    assert "--config.data.source=folder" in str(err.value) and "\n" not in str(err.value)
    assert err.value.__suppress_context__


def test_tfds_download_offline_fails_in_seconds_with_a_way_out(tmp_path, monkeypatch):
    """Offline, tfds would retry the download for minutes; one quick check fails first."""
    pytest.importorskip("tensorflow_datasets")
    asked = []
    monkeypatch.setattr(sources, "_reachable", lambda url, timeout_s: asked.append(url))
    config = make_config(source="tfds", name="celeb_a", data_dir=str(tmp_path))
    with pytest.raises(InputError) as err:
        create(config, batch=8)
    message = str(err.value)
    assert asked == ["https://drive.google.com/"]
    assert "does not answer" in message and "celeb_a" in message and "\n" not in message
    assert "--config.data.source=folder" in message and "--config.data.path=" in message


def test_prepared_tfds_data_needs_no_network(monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")

    def no_network(url, timeout_s):
        raise AssertionError(f"asked {url} for a prepared dataset")

    monkeypatch.setattr(sources, "_reachable", no_network)
    with tfds.testing.mock_data(num_examples=4):  # a prepared dataset, as tfds.load sees it
        ds, _ = create(make_config(source="tfds", name="celeb_a", num_eval_examples=2), batch=2)
    assert ds.num_examples == 2


@pytest.mark.parametrize("url", ["http://192.0.2.1/", "https://nothing.invalid/"])
def test_unreachable_servers_are_reported_within_the_timeout(url):
    # 192.0.2.0/24 is reserved for documentation (RFC 5737) and .invalid never resolves (RFC 2606).
    start = time.monotonic()
    assert not sources._reachable(url, timeout_s=0.5)
    assert time.monotonic() - start < 2.0


def test_embedded_lfw_faces_offline():
    ds, eval_images = create(make_config(image_size=16, num_eval_examples=10), batch=10)
    assert ds.num_examples == 90 and eval_images.shape == (10, 16, 16, 3)
    assert set(ds.train_indices) | set(ds.eval_indices) == set(range(100))
    batch = ds.local_batch(0)
    assert batch.shape == (10, 16, 16, 3) and batch.dtype == np.uint8
    assert (batch[..., 0] == batch[..., 2]).all()  # greyscale faces
    assert batch.std() > 20 and len({b.tobytes() for b in batch}) == 10


def test_greyscale_channel_is_pil_luma(color_folder):
    ds, _ = create(color_config(color_folder, channels=1), batch=NUM_COLORS)
    assert ds.image_shape == (4, 4, 1)
    images = ds.images(np.arange(NUM_COLORS))
    assert images.shape == (NUM_COLORS, 4, 4, 1) and images.dtype == np.uint8
    for i, image in enumerate(images):
        luma = Image.new("RGB", (1, 1), color(i)).convert("L").getpixel((0, 0))
        assert (image == luma).all(), (i, image[0, 0], luma)
    # Greyscale faces: the one channel is what RGB decoding repeats three times.
    grey, _ = create(make_config(channels=1), batch=10)
    rgb, _ = create(make_config(channels=3), batch=10)
    np.testing.assert_array_equal(grey.local_batch(3)[..., 0], rgb.local_batch(3)[..., 1])


# ---------------------------------------------------------------------------------------------
# Errors


def test_folder_errors_name_the_path_and_count(tmp_path):
    missing = tmp_path / "missing"
    with pytest.raises(InputError, match=rf"{missing}.*does not exist \(0 images\)"):
        create(color_config(missing), batch=4)

    a_file = tmp_path / "file.png"
    Image.new("RGB", (4, 4)).save(a_file)
    with pytest.raises(InputError, match=rf"{a_file}.*not a directory"):
        create(color_config(a_file), batch=4)

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    with pytest.raises(InputError, match=rf"{empty}.*0 images found"):
        create(color_config(empty), batch=4)

    few = tmp_path / "few"
    few.mkdir()
    for i in range(5):
        Image.new("RGB", (4, 4), color(i)).save(few / f"{i}.png")
    (few / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(InputError, match=rf"{few}.*: 5 usable images \(of 6; 1 unreadable\) "
                       r"leave no training image after num_eval_examples=5$"):
        create(color_config(few, num_eval_examples=5), batch=8)


# ---------------------------------------------------------------------------------------------
# Non-square sizes

QUARTERS = [(0, 255, 0), (255, 0, 0), (0, 0, 255), (0, 255, 0)]  # green red blue green


def quarters_image(width: int, height: int) -> Image.Image:
    """Four vertical bands of equal width, colours QUARTERS from left to right."""
    x = np.arange(width) * 4 // width
    return Image.fromarray(np.broadcast_to(np.array(QUARTERS, np.uint8)[x], (height, width, 3)))


def band_colours(image: np.ndarray, bands: int) -> list[tuple[int, ...]]:
    """The colour at the middle of each of `bands` equal vertical bands (away from the ringing
    Lanczos leaves at colour edges), rounded to 0 or 255."""
    w = image.shape[1]
    cols = [(2 * i + 1) * w // (2 * bands) for i in range(bands)]
    return [tuple(int(v > 127) * 255 for v in image[image.shape[0] // 2, c]) for c in cols]


@pytest.mark.parametrize("size_hw, resize, expected", [
    ((16, 32), "center_crop", QUARTERS),  # 2:1 like the image: nothing cropped
    ((16, 64), "center_crop", QUARTERS),  # wider: rows cropped, all four bands kept
    ((16, 16), "center_crop", QUARTERS[1:3]),  # square: the middle half of the width
    ((32, 16), "center_crop", QUARTERS[1:3]),  # taller than wide: the middle quarter
    ((16, 16), "stretch", QUARTERS),  # the whole image squashed
])
def test_a_wide_photo_keeps_its_aspect_and_crops_the_middle(tmp_path, size_hw, resize, expected):
    quarters_image(100, 50).save(tmp_path / "wide.png")
    ds, _ = create(color_config(tmp_path, image_size=size_hw, resize=resize), batch=1)
    image = ds.local_batch(0)[0]
    assert image.shape == (*size_hw, 3) and ds.image_shape == (*size_hw, 3)
    assert band_colours(image, len(expected)) == expected
    # The crop is the middle: at (32, 16) the kept quarter of the width is red then blue.
    if size_hw == (32, 16):
        assert band_colours(image, 4) == [QUARTERS[1]] * 2 + [QUARTERS[2]] * 2


@pytest.mark.parametrize("size, hw", [(32, (32, 32)), ((48, 64), (48, 64)), ([48, 64], (48, 64))])
def test_image_size_is_an_int_or_height_and_width(size, hw):
    assert data.image_hw(size) == hw
    assert data.image_shape(make_config(image_size=size, channels=1)) == (*hw, 1)


@pytest.mark.parametrize("size", [(32,), (32, 0), (32, 48, 3), "32", (32.0, 48), True])
def test_a_bad_image_size_is_named(size):
    with pytest.raises(InputError, match=r"^data\.image_size=.* must be an integer >= 1 or a "
                                         r"\(height, width\) pair of them$"):
        data.image_hw(size)


# ---------------------------------------------------------------------------------------------
# Small folders


@pytest.mark.parametrize("n, held", [(1, 0), (19, 0), (20, 1), (24, 1), (972, 48),
                                     (100_000, 256)])
def test_a_folder_holds_out_five_percent_at_most_num_eval_examples(n, held):
    config = color_config("/photos", num_eval_examples=256, folder_eval_fraction=0.05)
    assert data.eval_hold_out(config, n) == held
    # tfds and the embedded faces hold out num_eval_examples whatever their size.
    assert data.eval_hold_out(make_config(num_eval_examples=256), n) == 256


def test_a_folder_smaller_than_a_batch_trains_with_repeats(tmp_path, caplog):
    for i in range(5):
        Image.new("RGB", (4, 4), color(i)).save(tmp_path / f"{i}.png")
    config = color_config(tmp_path, num_eval_examples=256, folder_eval_fraction=0.05)
    with caplog.at_level(logging.INFO):
        ds, eval_images = create(config, batch=8)
    messages = [r.getMessage() for r in caplog.records]
    assert any("5 usable images, 0 held out for the validation loss" in m for m in messages)
    assert any("5 training images, fewer than global_batch_size=8: images repeat" in m
               for m in messages)
    assert len(eval_images) == 0 and ds.num_examples == 5
    # 8 per batch from 5 images: every image once per epoch of 5 positions, in order.
    ids = np.concatenate([ds.global_indices(s) for s in range(5)])  # 40 positions, 8 epochs
    for epoch in range(8):
        assert sorted(ids[5 * epoch: 5 * epoch + 5].tolist()) == list(range(5))
    assert color_ids(ds.local_batch(3)) == ds.global_indices(3).tolist()
    # One image: a batch of 8 copies of it.
    one = tmp_path / "one"
    one.mkdir()
    Image.new("RGB", (4, 4), color(9)).save(one / "only.png")
    ds, eval_images = create(color_config(one, folder_eval_fraction=0.05), batch=8)
    assert len(eval_images) == 0 and color_ids(ds.local_batch(0)) == [9] * 8


@pytest.mark.parametrize(
    "overrides,batch,kw,match",
    [
        ({"image_size": 0}, 4, {}, "data.image_size=0"),
        ({"image_size": 2.5}, 4, {}, "data.image_size=2.5"),
        ({"image_size": "32"}, 4, {}, "data.image_size='32'"),
        ({"resize": "crop"}, 4, {}, "data.resize='crop'"),
        ({"channels": 2}, 4, {}, "data.channels=2"),
        ({"source": "web"}, 4, {}, "data.source='web'"),
        ({"name": "mnist"}, 4, {}, "data.name='mnist'"),
        ({"source": "folder"}, 4, {}, "data.path is empty"),
        ({"num_eval_examples": -1}, 4, {}, "num_eval_examples=-1"),
        ({}, 6, {"process_index": 0, "process_count": 4}, "global_batch_size=6 .* 4 processes"),
        ({}, 0, {}, "global_batch_size=0"),
    ],
)
def test_bad_settings(overrides, batch, kw, match):
    with pytest.raises(InputError, match=match):
        create(make_config(**overrides), batch=batch, **kw)
