"""MetricWriter: metrics.jsonl rows, PNG grids, and event files that TensorBoard's own reader understands."""

import glob
import io
import os
import subprocess
import sys

import jax
import numpy as np
from PIL import Image
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader, LegacyEventFileLoader
from tensorboard.util import tensor_util

from lidiff.metrics import writers
from lidiff.metrics.writers import MetricWriter, image_grid, read_metrics

SCALARS = {1: {"loss": 0.5, "lr": 1e-4}, 2: {"loss": 0.25, "lr": 2e-4}, 3: {"loss": 0.125, "lr": 3e-4}}


def _event_file(logdir):
    paths = glob.glob(os.path.join(logdir, "events.out.tfevents.*"))
    assert len(paths) == 1, paths
    return paths[0]


def _tiles(n=5, size=6):
    return np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_scalars_and_image_grid_read_back_with_tensorboard(tmp_path):
    logdir = str(tmp_path)
    grid = image_grid(_tiles())  # 5 tiles -> 2 rows x 3 columns of 6x6, padding 2: [18, 26, 3]
    assert grid.shape == (18, 26, 3)
    writer = MetricWriter(logdir)
    for step, scalars in SCALARS.items():
        writer.write_scalars(step, scalars)
    writer.write_images(2, {"samples": grid})
    writer.close()

    # EventFileLoader migrates events the way TensorBoard's scalar and image dashboards see them.
    # A truncated or corrupt record ends its iteration silently, so the event count is checked too.
    events = list(EventFileLoader(_event_file(logdir)).Load())
    assert len(events) == 1 + len(SCALARS) + 1
    assert events[0].file_version == "brain.Event:2"
    plugin, scalars, images = {}, {}, {}
    for event in events[1:]:
        for value in event.summary.value:
            if value.metadata.plugin_data.plugin_name:  # metadata comes with each tag's first value only
                plugin.setdefault(value.tag, value.metadata.plugin_data.plugin_name)
            array = tensor_util.make_ndarray(value.tensor)
            if plugin[value.tag] == "scalars":
                scalars[(event.step, value.tag)] = float(array)
            else:
                images[(event.step, value.tag)] = array
    assert plugin == {"loss": "scalars", "lr": "scalars", "samples": "images"}
    expected = {(step, tag): v for step, row in SCALARS.items() for tag, v in row.items()}
    assert scalars.keys() == expected.keys()
    np.testing.assert_allclose([scalars[k] for k in expected], list(expected.values()), rtol=1e-7)  # float32

    assert list(images) == [(2, "samples")]
    width, height, png = images[(2, "samples")]
    assert (int(width), int(height)) == (26, 18)
    with Image.open(io.BytesIO(png)) as im:
        assert im.mode == "RGB" and im.size == (26, 18)
        np.testing.assert_array_equal(np.asarray(im), grid)


def test_jsonl_rows_and_png_files(tmp_path):
    logdir = str(tmp_path)
    writer = MetricWriter(logdir)
    for step, scalars in SCALARS.items():
        writer.write_scalars(step, scalars)
    grid = image_grid(_tiles(4))
    writer.write_images(7, {"recon": grid})
    writer.close()
    assert read_metrics(logdir) == [{"step": step, **row} for step, row in SCALARS.items()]
    with Image.open(os.path.join(logdir, "images", "recon_00000007.png")) as im:
        np.testing.assert_array_equal(np.asarray(im), grid)

    # A second writer on the same logdir (a resumed run) appends rows and adds its own event file.
    again = MetricWriter(logdir)
    again.write_scalars(4, {"loss": 1.0})
    again.close()
    assert [r["step"] for r in read_metrics(logdir)] == [1, 2, 3, 4]
    assert len(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))) == 2


def test_each_write_is_on_disk_before_close(tmp_path):
    logdir = str(tmp_path)
    writer = MetricWriter(logdir)
    try:
        writer.write_scalars(5, {"loss": 2.0})
        events = list(LegacyEventFileLoader(_event_file(logdir)).Load())
        assert [(e.step, v.tag, v.simple_value) for e in events for v in e.summary.value] == [(5, "loss", 2.0)]
        assert read_metrics(logdir) == [{"step": 5, "loss": 2.0}]
    finally:
        writer.close()


def test_only_process_zero_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    logdir = tmp_path / "logs"
    writer = MetricWriter(str(logdir))
    writer.write_scalars(1, {"loss": 1.0})
    writer.write_images(1, {"samples": image_grid(_tiles(2))})
    writer.close()
    assert not logdir.exists()


def test_writing_events_does_not_import_tensorflow(tmp_path):
    code = (
        "import sys\n"
        "import numpy as np\n"
        "import lidiff.metrics.writers as w\n"
        f"m = w.MetricWriter({str(tmp_path)!r})\n"
        "m.write_scalars(1, {'loss': 1.0})\n"
        "m.write_images(1, {'g': np.zeros((4, 4, 3), np.uint8)})\n"
        "m.close()\n"
        "print('tensorflow' in sys.modules)\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(writers.__file__))))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"
    assert len(glob.glob(str(tmp_path / "events.out.tfevents.*"))) == 1  # the subprocess did write events
