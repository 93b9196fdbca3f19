"""DataLoader: shapes, determinism, process sharding, exact resume, corrupt files, threads, no TensorFlow."""

import logging
import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
from PIL import Image

from lidiff.data import sources, transforms
from lidiff.data.pipeline import DataLoader, epoch_permutation, flip_decisions

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class IndexSource(sources.Source):
    """Example i is a 4x4 image whose channel 0 is i and channel 1 a left-to-right ramp (to see flips);
    label i % 3. Indices in ``bad`` are unreadable (None)."""

    num_classes = 3

    def __init__(self, n, bad=()):
        self.n, self.bad = n, set(bad)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if i in self.bad:
            return None
        image = np.zeros((4, 4, 3), np.uint8)
        image[..., 0] = i
        image[..., 1] = np.arange(4) * 60
        return {"image": image, "label": i % 3}


def decode(batch):
    """Source indices and flip flags of a batch of IndexSource images."""
    u8 = transforms.to_uint8(batch["image"])
    return u8[:, 0, 0, 0].astype(int), u8[:, 0, 0, 1] > u8[:, 0, -1, 1]


def stream(loader, start, num):
    return [(s, b) for s, b in loader.iterate(start, num)]


def assert_batches_equal(a, b):
    assert [s for s, _ in a] == [s for s, _ in b]
    for (_, x), (_, y) in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def _data_threads():
    return [t for t in threading.enumerate() if t.name.startswith("lidiff-data")]


def test_shapes_dtypes_range_and_labels():
    src = sources.SyntheticSource(20, 24, num_classes=5)
    with DataLoader(src, global_batch_size=4, resolution=16, random_flip=True, num_threads=2) as loader:
        (s0, b0), (s1, b1) = stream(loader, 0, 2)
    assert (s0, s1) == (0, 1)
    assert b0.keys() == {"image", "label"}
    assert b0["image"].shape == (4, 16, 16, 3) and b0["image"].dtype == np.float32
    assert b0["image"].min() >= -1.0 and b0["image"].max() <= 1.0 and b0["image"].std() > 0.05
    assert b0["label"].dtype == np.int32 and b0["label"].shape == (4,)
    assert np.all((b0["label"] >= 0) & (b0["label"] < 5))
    with DataLoader(sources.SyntheticSource(5, 8), global_batch_size=2, resolution=8) as loader:
        assert loader.batch_at(0).keys() == {"image"}


def test_sizes_and_argument_checks():
    src = IndexSource(10)
    loader = DataLoader(src, global_batch_size=4, resolution=4, num_threads=0)
    assert loader.dataset_size == 10 and loader.steps_per_epoch == 2 and loader.local_batch_size == 4
    assert loader.epoch_at(5) == 2.0
    with pytest.raises(ValueError, match="not divisible"):
        DataLoader(src, global_batch_size=6, resolution=4, process_count=4)
    with pytest.raises(ValueError, match="process_index"):
        DataLoader(src, global_batch_size=8, resolution=4, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="resample"):
        DataLoader(src, global_batch_size=8, resolution=4, resample="cubic")


def test_each_epoch_is_a_seeded_permutation():
    n, g = 12, 4
    loader = DataLoader(IndexSource(n), global_batch_size=g, resolution=4, seed=3, num_threads=2)
    with loader:
        idx = np.concatenate([decode(b)[0] for _, b in stream(loader, 0, 6)])
    np.testing.assert_array_equal(idx[:n], epoch_permutation(3, 0, n))
    np.testing.assert_array_equal(idx[n:], epoch_permutation(3, 1, n))
    assert sorted(idx[:n]) == list(range(n)) and sorted(idx[n:]) == list(range(n))
    assert not np.array_equal(idx[:n], idx[n:])


def test_same_seed_same_batches_different_seed_different_batches():
    src = sources.SyntheticSource(16, 12, num_classes=3)
    kw = dict(global_batch_size=4, resolution=8, random_flip=True)
    with DataLoader(src, seed=1, **kw) as a, DataLoader(src, seed=1, num_threads=1, **kw) as b, \
            DataLoader(src, seed=2, **kw) as c:
        sa, sb, sc = stream(a, 0, 5), stream(b, 0, 5), stream(c, 0, 5)
    assert_batches_equal(sa, sb)
    assert not all(np.array_equal(x["image"], y["image"]) for (_, x), (_, y) in zip(sa, sc))


@pytest.mark.parametrize("process_count", [2, 4])
def test_processes_load_disjoint_rows_whose_union_is_the_global_batch(process_count):
    src = IndexSource(40)
    kw = dict(global_batch_size=8, resolution=4, random_flip=True, seed=5, num_threads=2)
    with DataLoader(src, **kw) as single:
        whole = stream(single, 0, 4)
    parts = []
    for p in range(process_count):
        with DataLoader(src, process_index=p, process_count=process_count, **kw) as loader:
            parts.append(stream(loader, 0, 4))
            assert loader.local_batch_size == 8 // process_count
    for step, (_, full) in enumerate(whole):
        pieces = [part[step][1] for part in parts]
        for key in ("image", "label"):
            np.testing.assert_array_equal(np.concatenate([x[key] for x in pieces]), full[key])
        ids = [set(decode(x)[0].tolist()) for x in pieces]
        assert sum(len(i) for i in ids) == 8 and len(set.union(*ids)) == 8  # disjoint (8 of 40 in one epoch)
    flips = np.concatenate([decode(b)[1] for _, b in whole])
    np.testing.assert_array_equal(flips, np.concatenate([flip_decisions(5, s, 8) for s in range(4)]))


def test_resume_from_step_k_equals_the_uninterrupted_stream():
    src = IndexSource(10)  # G=4 does not divide N: batches straddle epoch boundaries
    kw = dict(global_batch_size=4, resolution=4, random_flip=True, seed=11, num_threads=2, prefetch=3)
    with DataLoader(src, **kw) as loader:
        full = stream(loader, 0, 9)
    with DataLoader(src, **kw) as loader:  # a fresh process resuming at step 6
        resumed = stream(loader, 6, 3)
        single = loader.batch_at(7)
    assert_batches_equal(full[6:], resumed)
    np.testing.assert_array_equal(single["image"], full[7][1]["image"])
    idx = np.concatenate([decode(b)[0] for _, b in full])
    assert sorted(idx[10:20]) == list(range(10))  # epoch 1 spans steps 2..4 intact


def test_flips_follow_the_seeded_decisions():
    src = IndexSource(16)
    with DataLoader(src, global_batch_size=8, resolution=4, random_flip=True, seed=2) as loader:
        batches = stream(loader, 0, 4)
    flips = np.concatenate([decode(b)[1] for _, b in batches])
    assert 0 < flips.sum() < len(flips)
    np.testing.assert_array_equal(flips, np.concatenate([flip_decisions(2, s, 8) for s in range(4)]))
    with DataLoader(src, global_batch_size=8, resolution=4, random_flip=False, seed=2) as loader:
        assert not decode(loader.batch_at(0))[1].any()


def test_unreadable_example_is_replaced_by_the_next_readable_one_in_the_stream():
    n, bad = 12, {3, 7, 8}
    with DataLoader(IndexSource(n, bad=bad), global_batch_size=4, resolution=4, seed=0, num_threads=2) as loader:
        got = np.concatenate([decode(b)[0] for _, b in stream(loader, 0, 6)])
        expected, skipped = [], 0
        for position in range(24):
            k = 0
            while loader.index_at(position + k) in bad:
                k += 1
            expected.append(loader.index_at(position + k))
            skipped += k
        assert loader.num_skipped == skipped >= 6  # each bad index sits in both epochs
    np.testing.assert_array_equal(got, expected)
    assert not set(got.tolist()) & bad


def test_corrupt_jpg_is_skipped_counted_logged_once_and_training_continues(tmp_path, caplog):
    rng = np.random.default_rng(0)
    for i in range(7):
        Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).save(tmp_path / f"img{i}.png")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(200))
    src = sources.ImageFolderSource(str(tmp_path))
    caplog.set_level(logging.WARNING)
    with DataLoader(src, global_batch_size=4, resolution=4, num_threads=2) as loader:
        batches = stream(loader, 0, 6)  # 3 epochs of 8 files
        assert loader.num_skipped == 3  # once per epoch
    assert all(b["image"].shape == (4, 4, 4, 3) for _, b in batches)
    warnings = [r.getMessage() for r in caplog.records if "broken.jpg" in r.getMessage()]
    assert len(warnings) == 1 and "unreadable" in warnings[0]


def test_all_unreadable_raises_with_a_message(tmp_path):
    for i in range(3):
        (tmp_path / f"x{i}.jpg").write_bytes(b"not a jpeg at all")
    with DataLoader(sources.ImageFolderSource(str(tmp_path)), global_batch_size=2, resolution=4) as loader:
        with pytest.raises(RuntimeError) as err:
            loader.batch_at(0)
    msg = str(err.value)
    assert "none of the 3 examples" in msg and str(tmp_path) in msg


def test_mostly_unreadable_raises_on_skip_fraction():
    src = IndexSource(50, bad=range(0, 50, 5))  # 20% bad: fine
    with DataLoader(src, global_batch_size=8, resolution=4) as loader:
        stream(loader, 0, 10)
        assert 0 < loader.num_skipped < 0.5 * loader.num_reads
    src = IndexSource(50, bad=[i for i in range(50) if i % 5 != 0])  # 80% bad
    with DataLoader(src, global_batch_size=8, resolution=4) as loader:
        with pytest.raises(RuntimeError, match="max_skip_fraction"):
            stream(loader, 0, 10)


def test_threaded_and_inline_loading_agree_and_threads_stop():
    before = len(_data_threads())
    src = sources.SyntheticSource(30, 20, num_classes=2)
    kw = dict(global_batch_size=6, resolution=8, random_flip=True)
    with DataLoader(src, num_threads=0, **kw) as inline:
        a = stream(inline, 3, 4)
    assert len(_data_threads()) == before  # inline mode starts no threads
    with DataLoader(src, num_threads=3, prefetch=2, **kw) as threaded:
        b = stream(threaded, 3, 4)
        it = threaded.iterate(0)  # abandoned mid-way, with batches in flight
        next(it)
        assert len(_data_threads()) > before
        it.close()
    assert_batches_equal(a, b)
    assert len(_data_threads()) == before
    with pytest.raises(RuntimeError, match="closed"):
        next(threaded.iterate(0))


def _run_python(code):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_folder_training_path_never_imports_tensorflow(tmp_path):
    Image.fromarray(np.zeros((5, 5, 3), np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.full((5, 5, 3), 255, np.uint8)).save(tmp_path / "b.png")
    out = _run_python(f"""
        import sys
        from lidiff.data import pipeline, sources, transforms
        src = sources.make_source("folder", path={str(tmp_path)!r})
        with pipeline.DataLoader(src, global_batch_size=2, resolution=4) as loader:
            for step, batch in loader.iterate(0, 2):
                assert batch["image"].shape == (2, 4, 4, 3)
        sources.make_source("digits"); sources.make_source("synthetic", num_examples=2, resolution=4)
        print(sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "tensorflow_datasets")))
    """)
    assert out.strip() == "[]"


def test_works_when_tensorflow_cannot_be_imported(tmp_path):
    Image.fromarray(np.zeros((5, 5, 3), np.uint8)).save(tmp_path / "a.png")
    out = _run_python(f"""
        import sys
        sys.modules["tensorflow"] = None  # any import of TensorFlow now raises ImportError
        sys.modules["tensorflow_datasets"] = None
        import lidiff.data.pipeline, lidiff.data.sources, lidiff.data.transforms
        from lidiff.data import pipeline, sources
        src = sources.ImageFolderSource({str(tmp_path)!r})
        with pipeline.DataLoader(src, global_batch_size=2, resolution=4) as loader:
            assert loader.batch_at(0)["image"].shape == (2, 4, 4, 3)
        try:
            sources.TfdsSource("mnist", "train")
        except ImportError as e:
            print("tfds:", e)
    """)
    assert "tfds: TfdsSource needs tensorflow-datasets" in out
