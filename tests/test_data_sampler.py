"""EpisodeSampler, EpisodeBatch, FewShotDataset and rotate_classes on synthetic data.

Every synthetic image carries its own identity in its pixels (channel 0, row 0: class index and
image index), so label correctness is checked against the images themselves.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from implicit_meta.data import EpisodeBatch, EpisodeSampler, FewShotDataset, rotate_classes

C, P = 12, 8  # classes, images per class


def tagged_dataset(classes: int = C, per_class: int = P, seed: int = 0) -> FewShotDataset:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(classes, per_class, 2, 5, 5), dtype=np.uint8)
    images[:, :, 0, 0, 0] = np.arange(classes)[:, None]
    images[:, :, 0, 0, 1] = np.arange(per_class)[None, :]
    return FewShotDataset(torch.from_numpy(images), tuple(f"class{c}" for c in range(classes)))


def identities(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Decode (class, image) tags from float images in [0, 1]."""
    pixels = (x * 255).round().to(torch.int64)
    return pixels[..., 0, 0, 0].numpy(), pixels[..., 0, 0, 1].numpy()


def test_shapes_and_dtypes() -> None:
    batch = EpisodeSampler(tagged_dataset(), ways=5, shots=2, queries=3, seed=0).sample(tasks=4)
    assert batch.xs.shape == (4, 10, 2, 5, 5)
    assert batch.xq.shape == (4, 15, 2, 5, 5)
    assert batch.ys.shape == (4, 10) and batch.yq.shape == (4, 15)
    assert batch.classes.shape == (4, 5)
    assert batch.xs.dtype == torch.float32 and batch.xq.dtype == torch.float32
    assert batch.ys.dtype == torch.int64 and batch.yq.dtype == torch.int64
    for t in range(4):
        assert batch.ys[t].tolist() == [c for c in range(5) for _ in range(2)]
        assert batch.yq[t].tolist() == [c for c in range(5) for _ in range(3)]


def test_labels_match_underlying_classes() -> None:
    ds = tagged_dataset()
    batch = EpisodeSampler(ds, ways=4, shots=3, queries=4, seed=7).sample(tasks=16)
    s_cls, s_img = identities(batch.xs)
    q_cls, q_img = identities(batch.xq)
    for t in range(16):
        task_classes = []
        for label in range(4):
            sc = s_cls[t][batch.ys[t].numpy() == label]
            qc = q_cls[t][batch.yq[t].numpy() == label]
            # All support and query images of one label come from one class...
            assert len(set(sc.tolist()) | set(qc.tolist())) == 1
            assert sc[0] == int(batch.classes[t, label])
            task_classes.append(int(sc[0]))
            # ...and are distinct images of it (support and query never share an image).
            used = s_img[t][batch.ys[t].numpy() == label].tolist()
            used += q_img[t][batch.yq[t].numpy() == label].tolist()
            assert len(set(used)) == 7
        assert len(set(task_classes)) == 4  # distinct classes per task


def test_pixels_are_dataset_pixels_over_255() -> None:
    ds = tagged_dataset()
    batch = EpisodeSampler(ds, ways=3, shots=1, queries=2, seed=1).sample(tasks=3)
    cls, img = identities(batch.xs)
    expected = ds.images.numpy()[cls, img].astype(np.float32) / np.float32(255)
    np.testing.assert_array_equal(batch.xs.numpy(), expected)


def test_deterministic_for_a_seed_and_independent_of_global_rng() -> None:
    ds = tagged_dataset()
    a = EpisodeSampler(ds, 5, 1, 2, seed=42)
    first = [a.sample(4) for _ in range(3)]
    torch.manual_seed(123)
    np.random.seed(123)
    b = EpisodeSampler(ds, 5, 1, 2, seed=42)
    torch.manual_seed(999)
    np.random.seed(999)
    for x, y in zip(first, (b.sample(4) for _ in range(3)), strict=True):
        assert torch.equal(x.xs, y.xs) and torch.equal(x.xq, y.xq)
        assert torch.equal(x.classes, y.classes)
    other = EpisodeSampler(ds, 5, 1, 2, seed=43).sample(4)
    assert not torch.equal(other.xs, first[0].xs)


def test_ranks_draw_different_streams() -> None:
    ds = tagged_dataset(classes=40)
    streams = [
        EpisodeSampler(ds, 5, 1, 1, seed=0, rank=r).sample(8).classes.numpy() for r in range(4)
    ]
    for r in range(4):
        for s in range(r + 1, 4):
            assert not np.array_equal(streams[r], streams[s])
    again = EpisodeSampler(ds, 5, 1, 1, seed=0, rank=2).sample(8).classes.numpy()
    assert np.array_equal(again, streams[2])


def test_all_classes_and_images_get_drawn() -> None:
    ds = tagged_dataset()
    batch = EpisodeSampler(ds, 3, 1, 1, seed=5).sample(tasks=200)
    cls, img = identities(batch.xs)
    assert set(cls.ravel().tolist()) == set(range(C))
    assert set(img.ravel().tolist()) == set(range(P))


def test_state_dict_resumes_stream() -> None:
    ds = tagged_dataset()
    sampler = EpisodeSampler(ds, 2, 1, 1, seed=3)
    sampler.sample(2)
    state = sampler.state_dict()
    expected = [sampler.sample(2).classes for _ in range(2)]
    fresh = EpisodeSampler(ds, 2, 1, 1, seed=3)
    fresh.load_state_dict(state)
    assert all(torch.equal(e, fresh.sample(2).classes) for e in expected)


def test_batches_iterator() -> None:
    sampler = EpisodeSampler(tagged_dataset(), 2, 1, 1, seed=0)
    assert [b.num_tasks for b in sampler.batches(tasks=3, count=4)] == [3, 3, 3, 3]


def test_validation_errors() -> None:
    ds = tagged_dataset()
    with pytest.raises(ValueError, match="13-way"):
        EpisodeSampler(ds, ways=C + 1, shots=1, queries=1)
    with pytest.raises(ValueError, match="per class"):
        EpisodeSampler(ds, ways=2, shots=5, queries=4)
    EpisodeSampler(ds, ways=C, shots=4, queries=4)  # exactly at the limits is fine
    with pytest.raises(ValueError):
        EpisodeSampler(ds, ways=2, shots=0, queries=1)
    with pytest.raises(ValueError):
        EpisodeSampler(ds, ways=2, shots=1, queries=1, seed=-1)
    with pytest.raises(ValueError):
        EpisodeSampler(ds, ways=2, shots=1, queries=1, dtype=torch.int64)
    with pytest.raises(ValueError):
        EpisodeSampler(ds, ways=2, shots=1, queries=1).sample(0)


def test_zero_queries_and_float_dataset_and_dtype() -> None:
    ds = tagged_dataset()
    floats = FewShotDataset(ds.images.float() / 255, ds.class_names)
    a = EpisodeSampler(ds, 3, 2, 0, seed=9, dtype=torch.float64).sample(2)
    b = EpisodeSampler(floats, 3, 2, 0, seed=9, dtype=torch.float64).sample(2)
    assert a.xq.shape == (2, 0, 2, 5, 5) and a.xs.dtype == torch.float64
    torch.testing.assert_close(a.xs, b.xs, rtol=0, atol=1e-7)


def test_device_is_explicit() -> None:
    sampler = EpisodeSampler(tagged_dataset(), 2, 1, 1, seed=0, device="cpu")
    assert sampler.device == torch.device("cpu")
    batch = sampler.sample(1)
    assert all(
        t.device.type == "cpu" for t in (batch.xs, batch.ys, batch.xq, batch.yq, batch.classes)
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    ds = tagged_dataset()
    cpu = EpisodeSampler(ds, 4, 2, 3, seed=11, device="cpu").sample(5)
    gpu = EpisodeSampler(ds, 4, 2, 3, seed=11, device="cuda").sample(5)
    assert gpu.xs.device.type == "cuda" and gpu.ys.device.type == "cuda"
    for name in ("xs", "ys", "xq", "yq", "classes"):
        assert torch.equal(getattr(cpu, name), getattr(gpu, name).cpu())
    assert gpu.to("cpu").xs.device.type == "cpu"


def test_episode_batch_accessors() -> None:
    batch = EpisodeSampler(tagged_dataset(), 3, 1, 2, seed=0).sample(tasks=2)
    assert len(batch) == 2 and batch.num_tasks == 2
    (xs, ys), (xq, yq) = batch.task(1)
    assert torch.equal(xs, batch.xs[1]) and torch.equal(ys, batch.ys[1])
    assert torch.equal(xq, batch.xq[1]) and torch.equal(yq, batch.yq[1])
    assert torch.equal(batch.support(0)[0], batch.xs[0])
    assert torch.equal(batch.query(0)[1], batch.yq[0])
    tasks = list(batch)
    assert len(tasks) == 2 and torch.equal(tasks[1][1][0], batch.xq[1])
    moved = batch.to("cpu")
    assert isinstance(moved, EpisodeBatch) and torch.equal(moved.xs, batch.xs)


def test_dataset_validation_and_select() -> None:
    ds = tagged_dataset()
    with pytest.raises(ValueError):
        FewShotDataset(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), ("a", "b"))
    with pytest.raises(ValueError):
        FewShotDataset(torch.zeros(2, 3, 1, 4, 4, dtype=torch.uint8), ("a",))
    with pytest.raises(ValueError):
        FewShotDataset(torch.zeros(2, 3, 1, 4, 4, dtype=torch.int32), ("a", "b"))
    sub = ds.select([5, 2])
    assert sub.class_names == ("class5", "class2")
    assert torch.equal(sub.images[0], ds.images[5]) and torch.equal(sub.images[1], ds.images[2])
    with pytest.raises(IndexError):
        ds.select([C])
    assert (len(ds), ds.images_per_class, ds.image_shape) == (C, P, (2, 5, 5))


def test_rotate_classes_matches_pil() -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(2, 3, 1, 6, 6), dtype=np.uint8)
    ds = FewShotDataset(torch.from_numpy(images), ("a", "b"))
    rotated = rotate_classes(ds, (0, 90, 180, 270))
    assert rotated.class_names == ("a", "a/rot90", "a/rot180", "a/rot270", "b", "b/rot90",
                                   "b/rot180", "b/rot270")  # fmt: skip
    for c in range(2):
        for r, angle in enumerate((0, 90, 180, 270)):
            for i in range(3):
                reference = np.asarray(Image.fromarray(images[c, i, 0]).rotate(angle))
                assert np.array_equal(rotated.images[4 * c + r, i, 0].numpy(), reference)
    with pytest.raises(ValueError):
        rotate_classes(ds, (0, 0))
    with pytest.raises(ValueError):
        rotate_classes(ds, ())
    with pytest.raises(ValueError):
        rotate_classes(FewShotDataset(torch.zeros(1, 1, 1, 2, 3), ("x",)), (90,))
