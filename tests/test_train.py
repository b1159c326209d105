"""The training job end to end, small and on CPU: learning, resuming after SIGKILL, data parallelism."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import BUCKET, free_port
from PIL import Image

import resnet_flax
from train.__main__ import main as train_main
from train.metrics import read_metrics
from train.predict import load_from_workdir

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("red", "green", "blue")
SMALL = ["--arch", "resnet18", "--image-size", "32", "--batch-size", "8", "--num-workers", "0", "--no-progress",
         "--optimizer", "adamw", "--lr", "1e-3", "--lr-scaling", "none", "--warmup-steps", "2", "--weight-decay", "0",
         "--label-smoothing", "0"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A learnable image folder: three colour classes of noisy 48x40 JPEGs, plus one corrupt file."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        (root / name).mkdir()
        for i in range(16):
            img = rng.integers(0, 90, (40, 48, 3), dtype=np.uint8)
            img[..., c] += 150
            Image.fromarray(img).save(root / name / f"{i}.jpg", quality=90)
    (root / "red" / "broken.jpg").write_bytes(b"\xff\xd8 this is not really a jpeg")
    return root


def cli(*args, env=None, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "train", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, **(env or {})}, timeout=timeout)


def with_workers(args: list, n: int) -> list:
    """``args`` with ``--num-workers n``."""
    args = list(args)
    args[args.index("--num-workers") + 1] = str(n)
    return args


def final_params(workdir: Path) -> dict[str, np.ndarray]:
    model, _, _ = load_from_workdir(workdir)
    return resnet_flax.flat_state(model)


def losses(workdir: Path) -> dict[int, float]:
    return {r["step"]: r["train_loss"] for r in read_metrics(workdir / "metrics.jsonl") if "train_loss" in r}


@pytest.mark.slow
def test_learns_on_image_folder_and_predicts(folder, tmp_path, capsys):
    wd = tmp_path / "wd"
    code = train_main([*SMALL, "--data-dir", str(folder), "--epochs", "6", "--log-every", "1",
                       "--checkpoint-every", "4", "--workdir", str(wd)])
    out, err = capsys.readouterr()
    assert code == 0, err
    records = read_metrics(wd / "metrics.jsonl")
    train = [r["train_loss"] for r in records if "train_loss" in r]
    evals = [r for r in records if "val_top1" in r]
    assert len(train) == 6 * 5  # 49 files, 9 held out (3 per class): 40 train images -> 5 batches of 8
    assert np.mean(train[-5:]) < 0.5 * train[0], train  # from ~ln(3) to well below
    assert len(evals) == 6 and evals[-1]["val_top1"] >= 80.0, evals[-1]
    assert {"step", "epoch", "train_loss", "lr"} <= set(records[0])
    assert {"val_loss", "val_top1", "val_top5"} <= set(evals[0])
    assert "skipped 6 unreadable training image(s)" in out  # the corrupt file, once per epoch
    assert records[-2]["skipped_images"] == 6
    assert (wd / "curves.png").stat().st_size > 10_000
    assert list((wd / "tb").iterdir())
    kept = sorted(int(p.name) for p in (wd / "checkpoints").iterdir() if p.name.isdigit())
    assert len(kept) <= 4 and kept[-1] == 30  # last 3 + the best

    photo = folder / "green" / "3.jpg"
    proc = subprocess.run([sys.executable, "-m", "train.predict", str(photo), "--checkpoint", str(wd)],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == str(photo) and lines[1].split()[1] == "green" and len(lines) == 4  # 3 classes


@pytest.mark.slow
def test_tfds_mock_data(tmp_path, capsys):
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=24):
        code = train_main([*SMALL, "--dataset", "tf_flowers", "--max-steps", "3", "--log-every", "1",
                           "--dtype", "bfloat16", "--workdir", str(tmp_path / "wd")])
    _out, err = capsys.readouterr()
    assert code == 0, err
    assert len(losses(tmp_path / "wd")) == 3 and all(np.isfinite(v) for v in losses(tmp_path / "wd").values())
    run = json.loads((tmp_path / "wd" / "run.json").read_text())
    assert run["class_names"] == ["dandelion", "daisy", "tulips", "sunflowers", "roses"]


INTERRUPTED = [*SMALL, "--max-steps", "12", "--log-every", "1"]  # + --data-dir: the runs that are stopped


@pytest.fixture(scope="module")
def uninterrupted(folder, tmp_path_factory) -> Path:
    """The workdir of INTERRUPTED run to its end without a stop, reading in-process: what every interrupted and
    resumed run must end equal to. Made once per test run, also under xdist (the first worker to ask makes it
    under a lock in the run's shared folder; the others wait and read it)."""
    import fcntl

    base = tmp_path_factory.getbasetemp()
    shared = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "uninterrupted"
    shared.mkdir(exist_ok=True)
    with open(shared / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (shared / "done").exists():
            # the folder fixture is per worker, but its images are the same (seeded): the data-dir differs only
            ref = cli(*INTERRUPTED, "--data-dir", folder, "--workdir", shared / "wd")
            assert ref.returncode == 0, ref.stderr
            (shared / "done").touch()
    return shared / "wd"


def assert_ends_as(wd: Path, ref: Path) -> None:
    """``wd``'s run logged the same losses and ended with the same parameters as ``ref``'s (to 1e-6)."""
    assert losses(wd) == pytest.approx(losses(ref), rel=1e-6)
    a, b = final_params(wd), final_params(ref)
    assert a.keys() == b.keys()
    worst = max(float(np.max(np.abs(a[k] - b[k]))) for k in a)
    assert worst <= 1e-6, worst


@pytest.mark.slow
def test_sigkill_leaves_no_worker_and_resume_equals_uninterrupted(folder, tmp_path, uninterrupted):
    """SIGKILL mid-run (no clean-up possible): the worker processes die with the run instead of living on with ppid
    1; a half-written later checkpoint is ignored; the rerun ends where the uninterrupted run ends. The killed and
    resumed runs read through worker processes (the default), the reference in-process: the batches must not
    depend on how they are read, and a full run with workers leaks nothing (Python's resource tracker prints
    "leaked shared_memory" / "leaked semaphore" into the run's stderr otherwise)."""
    args = [*with_workers(INTERRUPTED, 2), "--data-dir", folder, "--checkpoint-every", "2"]
    wd = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "train", *map(str, args), "--workdir", str(wd)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (wd / "checkpoints" / "4").is_dir() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    workers = descendants(proc.pid)
    assert workers, "no worker processes were started"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    deadline = time.time() + 10
    while alive(workers) and time.time() < deadline:
        time.sleep(0.05)
    assert alive(workers) == set(), "worker processes outlived a SIGKILLed run"
    killed_at = max(int(p.name) for p in (wd / "checkpoints").iterdir() if p.name.isdigit())
    assert killed_at < 12
    # a half-written checkpoint of a later step, as a crash during a save leaves it
    (wd / "checkpoints" / f"{killed_at + 2}.orbax-checkpoint-tmp-1234").mkdir()

    resumed = cli(*args, "--workdir", wd)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout and "leaked" not in resumed.stderr, resumed.stderr
    assert_ends_as(wd, uninterrupted)


@pytest.mark.slow
def test_ctrl_c_with_worker_processes_stops_in_one_line_leaving_nothing_behind(folder, tmp_path):
    """The default reader (worker processes): Ctrl-C mid-run ends in one line, exit 130, no leaked semaphores or
    shared memory (Python's resource tracker would print "leaked ..." into the run's stderr), and the checkpoint
    already written is kept."""
    wd = tmp_path / "wd"
    cmd = [*with_workers(SMALL, 2), "--data-dir", str(folder), "--max-steps", "6", "--checkpoint-every", "2",
           "--workdir", str(wd)]
    # as a terminal would deliver it: SIGINT raises KeyboardInterrupt, whatever this test process does with it
    start = "import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); " \
            "runpy.run_module('train', run_name='__main__', alter_sys=True)"
    proc = subprocess.Popen([sys.executable, "-c", start, *cmd], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (wd / "checkpoints" / "2").is_dir() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    lines = err.strip().splitlines()
    assert all(line.startswith(f"skipping unreadable image {folder / 'red' / 'broken.jpg'}: UnidentifiedImageError:")
               for line in lines[:-1]), err
    assert lines[-1] == "interrupted: rerun the same command to resume from the last checkpoint", err
    assert (wd / "checkpoints" / "2").is_dir()


def descendants(pid: int) -> set[int]:
    """Every living process started by ``pid``, its children's children included (read from /proc)."""
    found, todo = set(), [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                kids = {int(c) for c in (task / "children").read_text().split()}
            except OSError:
                continue
            todo += list(kids - found)
            found |= kids
    return found


def alive(pids: set[int]) -> set[int]:
    """Those of ``pids`` still running (a zombie has finished)."""
    living = set()
    for p in pids:
        try:
            if Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                living.add(p)
        except OSError:
            pass
    return living


def wait_for_step(proc: subprocess.Popen, wd: Path, step: int, timeout: float = 300) -> None:
    """Until the run has logged ``step`` in metrics.jsonl (with --log-every 1)."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if step in losses(wd) if (wd / "metrics.jsonl").exists() else False:
            return
        time.sleep(0.02)
    raise AssertionError(f"the run did not reach step {step} (exit {proc.poll()})")


@pytest.mark.slow
def test_sigterm_checkpoints_exits_75_and_resumes_exactly_leaving_no_process(folder, tmp_path, uninterrupted):
    """Preemption: SIGTERM mid-epoch finishes the step in flight, writes a checkpoint at it, says so in one line,
    exits 75, and ends its worker processes; the rerun ends where an uninterrupted run ends."""
    args = [*with_workers(INTERRUPTED, 2), "--data-dir", folder, "--checkpoint-every", "100"]
    wd = tmp_path / "preempted"
    proc = subprocess.Popen([sys.executable, "-m", "train", *map(str, args), "--workdir", str(wd)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_step(proc, wd, 5)
    workers = descendants(proc.pid)
    assert workers, "no worker processes were started"
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    exit_seconds = time.time() - sent
    assert proc.returncode == 75 and "leaked" not in err, err
    stopped = int(err.strip().splitlines()[-1].split("preempted at step ")[1].split(":")[0])
    assert err.strip().splitlines()[-1] == (f"preempted at step {stopped}: checkpoint written; rerun the same "
                                            "command to resume"), err
    assert 5 <= stopped < 12 and (wd / "checkpoints" / str(stopped)).is_dir()
    deadline = time.time() + 5  # workers and the resource tracker finish exiting just after the run does
    while alive(workers) and time.time() < deadline:
        time.sleep(0.05)
    assert alive(workers) == set(), "worker processes outlived the run"
    print(f"SIGTERM to exit: {exit_seconds:.1f} s (stopped at step {stopped})")
    resumed = cli(*args, "--workdir", wd)
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stderr
    assert_ends_as(wd, uninterrupted)


def reordering_noise(perms: list[np.ndarray]) -> float:
    """Largest final-parameter change from reordering each batch's examples: the same maths summed in another order.

    The run below in-process (one device, the CLI's synthetic data, init and recipe of MULTI_HOST), once as is and
    once per permutation. A permutation changes only the order of the float32 reductions (BatchNorm statistics,
    loss mean, weight gradients), as splitting the batch over devices does; four AdamW steps from scratch amplify
    that rounding (Adam normalises near-zero gradients to steps of about lr whichever sign they take).
    """
    import jax

    from train.pipeline import make_loader
    from train.sources import load_splits
    from train.steps import OptimConfig, create_train_state, jit_steps, make_optimizer

    splits = load_splits("synthetic")
    cfg = OptimConfig(optimizer="adamw", lr=1e-3, warmup_steps=2, total_steps=4, weight_decay=0.0,
                      label_smoothing=0.0)
    loader = make_loader(splits.train, batch_size=8, image_size=32, train=True, seed=0)
    batches = [{k: v for k, v in b.items() if k != "corrupt"} for _, b in zip(range(4), loader)]
    tx = make_optimizer(cfg)
    graphdef, _ = create_train_state(resnet_flax.create_model("resnet10t", num_classes=splits.num_classes), tx)
    step, _ = jit_steps(graphdef, cfg)  # compiled once, for every ordering

    def final(perm: np.ndarray | None) -> np.ndarray:
        _, state = create_train_state(resnet_flax.create_model("resnet10t", num_classes=splits.num_classes, seed=0),
                                      tx)
        for b in batches:
            state, _ = step(state, {k: v if perm is None else v[perm] for k, v in b.items()})
        return np.concatenate([np.ravel(x) for x in jax.tree.leaves(jax.device_get(state.params))])

    ref = final(None)
    return max(float(np.max(np.abs(final(p) - ref))) for p in perms)


# The multi-device tests share one recipe, so that each device layout compiles its steps once (the run's length is
# an argument of the compiled step) and the other runs load them from the compilation cache.
MULTI_HOST = [*SMALL, "--arch", "resnet10t", "--dataset", "synthetic", "--batch-size", "8", "--log-every", "1"]


@pytest.fixture(scope="module")
def reorder_noise() -> float:
    """What merely reordering a batch does to 4 steps' parameters: the bar for any change of device layout."""
    rng = np.random.default_rng(0)
    noise = reordering_noise([np.arange(8)[::-1], np.r_[4:8, 0:4], rng.permutation(8), rng.permutation(8)])
    assert 0 < noise < 4e-3, noise  # four AdamW steps at lr <= 1e-3 move a parameter by at most about 4e-3
    return noise


def start_processes(args: list, n: int = 2, devices_each: int = 2) -> list[subprocess.Popen]:
    """``python -m train ARGS`` as ``n`` processes of one run on this machine (process 0 coordinates)."""
    port, env = free_port(), {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_each}",
                              "JAX_PLATFORMS": "cpu"}
    return [subprocess.Popen([sys.executable, "-m", "train", *map(str, args), "--coordinator", f"127.0.0.1:{port}",
                              "--num-processes", str(n), "--process-id", str(i)], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(n)]


def finish(procs: list[subprocess.Popen], timeout: float = 600) -> list[tuple[int, str, str]]:
    """(exit code, stdout, stderr) of each process, once it has ended."""
    outputs = [p.communicate(timeout=timeout) for p in procs]
    return [(p.returncode, *out) for p, out in zip(procs, outputs)]


@pytest.mark.slow
def test_devices_and_processes_train_as_one_and_share_checkpoints_both_ways(tmp_path, reorder_noise, gcs):
    """One process of four devices trains as one device does; two processes of two devices each (Gloo over
    127.0.0.1), sharing a gs:// workdir on the local GCS server, train as the one process of four devices does;
    every host writes its part of each checkpoint, process 0 alone logs and writes metrics and run.json; each
    run's step-3 checkpoint resumes in the other layout and gives its step 4 again. The bar for parameters is
    measured, as the parity tests measure theirs against float64: splitting the batch over devices must change the
    result no more than 3x what merely reordering the batch does."""
    from etils import epath

    from train.metrics import read_metrics as read

    args = [*MULTI_HOST, "--max-steps", "4", "--checkpoint-every", "3"]  # step 3 to resume from, and the end
    four_devices = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    bucket_wd = f"gs://{BUCKET}/two"
    two = epath.Path(bucket_wd)
    single = cli(*args, "--workdir", tmp_path / "single")
    one = cli(*args, "--workdir", tmp_path / "one", env=four_devices)
    assert single.returncode == 0 and one.returncode == 0, single.stderr + one.stderr
    assert "1 device(s)" in single.stdout and "4 device(s) on 1 host(s)" in one.stdout
    assert losses(tmp_path / "one") == pytest.approx(losses(tmp_path / "single"), rel=1e-5)
    a, b = final_params(tmp_path / "one"), final_params(tmp_path / "single")
    diff = max(float(np.max(np.abs(a[k] - b[k]))) for k in a)
    print(f"four devices vs one: {diff:.1e}; reordering noise {reorder_noise:.1e}")
    assert diff <= 3 * reorder_noise, (diff, reorder_noise)

    (c0, out0, err0), (c1, out1, err1) = finish(start_processes([*args, "--workdir", bucket_wd]))
    assert c0 == 0 and c1 == 0, err0 + err1
    assert "4 device(s) on 2 host(s)" in out0
    # Gloo's own lines only. Two of its contexts may print their connection line at once, splitting one across
    # lines ("[Gloo] Rank 1[Gloo] Rank 1 is connected ... : 3" then " is connected ... : 3"): its tail is Gloo's too.
    gloo_tail = re.compile(r"^ is connected to \d+ peer ranks\. Expected number of connected peer ranks is : \d+$")
    assert [line for line in out1.splitlines() if not line.startswith("[Gloo]") and not gloo_tail.match(line)] == []
    assert [r["step"] for r in read(two / "metrics.jsonl") if "train_loss" in r] == [1, 2, 3, 4]  # by process 0
    assert json.loads((two / "run.json").read_text())["flags"]["workdir"] == bucket_wd
    assert losses(two) == pytest.approx(losses(tmp_path / "one"), rel=1e-5)
    a, b = final_params(two), final_params(tmp_path / "one")
    diff = max(float(np.max(np.abs(a[k] - b[k]))) for k in a)
    print(f"two processes of two devices vs one of four: {diff:.1e}")
    assert diff <= 3 * reorder_noise, (diff, reorder_noise)

    step4 = losses(tmp_path / "one")[4]
    shutil.rmtree(tmp_path / "one" / "checkpoints" / "4")  # as if each run had stopped after step 3
    epath.Path(f"{bucket_wd}/checkpoints/4").rmtree()  # through the server
    on_one = cli(*args, "--workdir", bucket_wd, env=four_devices)
    (c0, out0, err0), (c1, _, err1) = finish(start_processes([*args, "--workdir", tmp_path / "one"]))
    assert on_one.returncode == 0 and c0 == 0 and c1 == 0, on_one.stderr + err0 + err1
    for out, wd in ((on_one.stdout, two), (out0, tmp_path / "one")):
        assert "resumed from" in out and "at step 3" in out, out
        assert losses(wd)[4] == pytest.approx(step4, rel=1e-5)


@pytest.mark.slow
def test_preempted_and_killed_hosts(tmp_path):
    """Two processes of one run. SIGTERM reaches one host: JAX's preemption sync point stops both after the same
    step, with one checkpoint, exit 75. The rerun resumes from it; then one host is SIGKILLed: the other exits
    once --host-timeout (JAX's heartbeat timeout) passes, instead of hanging in the next collective, and
    rerunning both resumes from the last checkpoint."""
    wd = tmp_path / "wd"
    args = [*MULTI_HOST, "--checkpoint-every", "2", "--host-timeout", "10", "--max-steps", "500", "--workdir", wd]

    def preempt(procs: list[subprocess.Popen], after: int) -> tuple[int, str]:
        """SIGTERM to process 0 once the checkpoint of step ``after`` is written: both stop at one step with exit
        75; that step and process 0's output."""
        deadline = time.time() + 300
        while not (wd / "checkpoints" / str(after)).is_dir() and time.time() < deadline and procs[0].poll() is None:
            time.sleep(0.02)
        procs[0].send_signal(signal.SIGTERM)
        results = finish(procs, timeout=300)
        assert [code for code, _, _ in results] == [75, 75], results
        stopped = {int(err.split("preempted at step ")[1].split(":")[0]) for _, _, err in results}
        assert len(stopped) == 1, stopped  # the same step on both hosts
        assert (wd / "checkpoints" / str(min(stopped))).is_dir()
        return stopped.pop(), results[0][1]

    step, _ = preempt(start_processes(args), 2)
    procs = start_processes(args)
    wait_for_step(procs[0], wd, step + 3)
    procs[1].kill()
    killed = time.time()
    code, out, _ = finish(procs[:1], timeout=300)[0]
    waited = time.time() - killed
    print(f"the surviving host exited {waited:.0f} s after its peer was killed (exit {code}, --host-timeout 10)")
    assert f"at step {step}" in out and "resumed from" in out
    assert code != 0 and waited < 60
    procs[1].communicate()
    saved = max(int(p.name) for p in (wd / "checkpoints").iterdir() if p.name.isdigit())
    _, out = preempt(start_processes(args), saved + 2)
    assert "resumed from" in out and f"at step {saved}" in out, out


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_last_good_checkpoint(folder, tmp_path):
    wd = tmp_path / "wd"
    args = [a if a != "1e-3" else "1e12" for a in SMALL]
    proc = cli(*args, "--data-dir", folder, "--max-steps", "20", "--checkpoint-every", "1", "--log-every", "1",
               "--warmup-steps", "0", "--workdir", wd)
    assert proc.returncode == 1, proc.stderr
    err = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "loss became non-finite" in err[0], err
    bad = int(err[0].split("at step ")[1].split(";")[0])
    # the weights that gave the non-finite loss at step `bad` are those after step bad-1: no checkpoint of them
    steps = sorted(int(p.name) for p in (wd / "checkpoints").iterdir() if p.name.isdigit())
    assert all(s < bad - 1 for s in steps), (steps, bad)
    good = [r["step"] for r in read_metrics(wd / "metrics.jsonl") if np.isfinite(r.get("train_loss", 0))]
    assert not steps or ("last good checkpoint" in err[0] and max(steps) <= max(good))


@pytest.mark.slow
def test_fine_tune_from_pytorch_weights_and_eval_only(folder, tmp_path):
    import torch
    import torchvision

    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), tmp_path / "r18.pth")
    args = [a for a in SMALL if a not in ("--arch", "resnet18")]
    proc = cli(*args, "--data-dir", folder, "--init-from", tmp_path / "r18.pth", "--max-steps", "2",
               "--workdir", tmp_path / "ft")
    assert proc.returncode == 0, proc.stderr
    assert "re-initialised the head (fc): the checkpoint has 10 classes, the data has 3" in proc.stdout
    # rerunning resumes the fine-tuned resnet18 (not the default resnet34) and trains on
    more = cli(*args, "--data-dir", folder, "--init-from", tmp_path / "r18.pth", "--max-steps", "3",
               "--workdir", tmp_path / "ft")
    assert more.returncode == 0, more.stderr
    assert "resumed from" in more.stdout and max(losses(tmp_path / "ft")) > 0 and 3 in losses(tmp_path / "ft")
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), tmp_path / "r18_3.pth")  # its head is used
    ev = cli(*args, "--data-dir", folder, "--init-from", tmp_path / "r18_3.pth", "--eval-only",
             "--workdir", tmp_path / "ev")
    assert ev.returncode == 0, ev.stderr
    (result,) = read_metrics(tmp_path / "ev" / "metrics.jsonl")
    expected = torchvision_eval(tmp_path / "r18_3.pth", folder, crop=32)
    assert result["val_examples"] == expected["val_examples"] and result["val_top1"] == expected["val_top1"]
    assert result["val_loss"] == pytest.approx(expected["val_loss"], rel=1e-4)
    assert f"top-1 {expected['val_top1']:.2f}%" in ev.stdout


def torchvision_eval(weights: Path, folder: Path, crop: int) -> dict[str, float]:
    """What --eval-only must report, computed by torchvision on the run's validation split: its resize
    (crop * 256 / 224) and centre crop, the model in eval mode, mean cross-entropy and top-1 over readable images."""
    import io

    import torch
    import torchvision
    from torchvision import transforms as T

    from train.sources import load_splits

    model = torchvision.models.resnet18(num_classes=3)
    model.load_state_dict(torch.load(weights, weights_only=True))
    model.eval()
    tf = T.Compose([T.Resize(crop * 256 // 224), T.CenterCrop(crop), T.ToTensor(),
                    T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    val = load_splits(data_dir=folder).val
    images, labels = [], []
    for i in range(len(val)):
        example = val[i]
        data = example["image"]
        try:
            img = Image.open(io.BytesIO(data) if isinstance(data, bytes | bytearray | memoryview) else data)
            images.append(tf(img.convert("RGB")))
        except OSError:
            continue  # unreadable: left out of the evaluation, as the run does
        labels.append(int(example["label"]))
    with torch.no_grad():
        logits = model(torch.stack(images))
    y = torch.tensor(labels)
    return {"val_examples": len(labels), "val_loss": float(torch.nn.functional.cross_entropy(logits, y)),
            "val_top1": 100.0 * float((logits.argmax(-1) == y).float().mean())}


def test_cli_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train_main(["--arch", "resnet19"])
    assert e.value.code == 2 and "resnet18" in capsys.readouterr().err
    code = train_main([*SMALL, "--data-dir", str(tmp_path / "nope"), "--workdir", str(tmp_path / "wd")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error:")
    code = train_main([*SMALL, "--dataset", "synthetic", "--resume", "--workdir", str(tmp_path / "wd2")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "--resume: no checkpoint" in err[0]
    help_text = subprocess.run([sys.executable, "-m", "train", "--help"], capture_output=True, text=True,
                               cwd=REPO).stdout
    for flag in ("--arch", "--dataset", "--data-dir", "--image-size", "--batch-size", "--epochs", "--optimizer",
                 "--lr", "--warmup-steps", "--weight-decay", "--label-smoothing", "--dtype", "--workdir",
                 "--resume", "--init-from", "--seed", "--eval-only"):
        assert flag in help_text


@pytest.mark.slow
def test_timm_variant_trains_and_evaluates_a_timm_checkpoint(folder, tmp_path, capsys):
    """--arch takes timm's names; --init-from takes a timm checkpoint of one (structure read off the tensors)."""
    import timm
    import torch

    args = [a for a in SMALL if a not in ("--arch", "resnet18")]
    code = train_main([*args, "--arch", "resnet10t", "--data-dir", str(folder), "--max-steps", "2", "--log-every", "1",
                       "--workdir", str(tmp_path / "wd")])
    assert code == 0, capsys.readouterr().err
    assert len(losses(tmp_path / "wd")) == 2 and all(np.isfinite(v) for v in losses(tmp_path / "wd").values())
    model, _, _ = load_from_workdir(tmp_path / "wd")
    assert model.config == resnet_flax.arch_config("resnet10t", num_classes=3)

    torch.manual_seed(0)
    torch.save(timm.create_model("resnet10t", num_classes=3).state_dict(), tmp_path / "t.pth")
    code = train_main([*args, "--arch", "resnet10t", "--data-dir", str(folder), "--init-from", str(tmp_path / "t.pth"),
                       "--eval-only", "--workdir", str(tmp_path / "ev")])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "top-1" in out


@pytest.mark.slow
def test_a_resume_and_an_evaluation_compile_nothing_twice(folder, tmp_path):
    """With a compilation cache, everything a run compiles is kept: resuming it (the same command after a crash)
    and evaluating its checkpoint add no entry (each entry is a program compiled anew; every program is cached,
    however quick to compile)."""
    cache, wd = tmp_path / "cache", tmp_path / "wd"
    args = [*SMALL, "--arch", "resnet10t", "--data-dir", folder, "--epochs", "2", "--compile-cache", cache,
            "--workdir", wd]
    first = cli(*args)
    assert first.returncode == 0, first.stderr

    def entries() -> list[str]:
        return sorted(p.name for p in cache.rglob("*-cache"))

    compiled = entries()
    assert any(name.startswith("jit_train_step-") for name in compiled), compiled
    shutil.rmtree(wd / "checkpoints" / str(max(int(p.name) for p in (wd / "checkpoints").iterdir())))
    for extra in ([], ["--eval-only"]):  # as after a crash in the second epoch; then an evaluation
        again = cli(*args, *extra)
        assert again.returncode == 0, again.stderr
        assert entries() == compiled, extra
        assert extra or "resumed from" in again.stdout, again.stdout
