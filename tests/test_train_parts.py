"""The training command's parts on their own: flags declared once, --help, the progress bar."""

from __future__ import annotations

import dataclasses
import io

import pytest

from train.config import TrainConfig, build_parser, parse_config
from train.steps import OptimConfig


def test_every_flag_default_is_the_dataclass_default():
    assert parse_config([]) == TrainConfig()
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    dests = {a.dest for a in build_parser()._actions if a.dest != "help"}
    assert dests == fields


def test_optim_config_defaults_are_the_command_lines():
    cfg, optim = TrainConfig(lr_scaling="none"), OptimConfig.for_run(TrainConfig(lr_scaling="none"), 100)
    assert OptimConfig(total_steps=100) == optim
    for name in ("optimizer", "lr", "warmup_steps", "weight_decay", "momentum", "nesterov", "label_smoothing"):
        assert getattr(optim, name) == getattr(cfg, name), name
    assert OptimConfig.for_run(TrainConfig(lr=0.1, batch_size=512), 1).lr == pytest.approx(0.2)


@pytest.mark.parametrize(("cpus", "flag", "workers"), [(2, None, 0), (1, None, 0), (8, None, 2), (2, 3, 3)])
def test_loader_workers_default_to_threads_on_two_cpus(monkeypatch, cpus, flag, workers):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(cpus)), raising=False)
    assert TrainConfig(num_workers=flag).resolved_num_workers == workers


def test_help_shows_each_default_once_and_no_placeholders():
    help_text = build_parser().format_help()
    assert "(default: None)" not in help_text and "(default: True)" not in help_text
    assert "(default: False)" not in help_text
    for line in help_text.splitlines():
        assert line.count("default") <= 1, line
    flags = [a for a in build_parser()._actions if a.option_strings and a.nargs != 0]
    for a in flags:  # a placeholder says what to write (N, PATH, X, ...), never the flag's name in capitals
        assert a.metavar or a.choices, a.option_strings
        assert a.metavar != a.dest.upper()


class FakeOutput:
    """Stands for a step's device output: ready once the test says the step finished."""

    def __init__(self):
        self.ready = False

    def is_ready(self) -> bool:
        return self.ready


def test_progress_counts_finished_steps_not_queued(monkeypatch):
    from train import progress as progress_mod

    monkeypatch.setattr(progress_mod.jax.tree, "leaves", lambda x: [x])
    monkeypatch.setattr(progress_mod.jax, "block_until_ready", lambda x: setattr(x, "ready", True))
    monkeypatch.setattr("sys.stderr", io.StringIO())
    bar = progress_mod.Progress(total=10, initial=2)
    outs = [FakeOutput() for _ in range(4)]
    for i, out in enumerate(outs):
        bar.step_queued(3 + i, out)
    assert bar.bar.n == 2  # four steps queued, none finished
    outs[0].ready = outs[1].ready = True
    bar.show(loss="1.0")
    assert bar.bar.n == 4
    outs[3].ready = True  # finished out of order: step 5 is still running, so 6 is not counted yet
    bar.show(loss="1.0")
    assert bar.bar.n == 4
    bar.close()  # waits for the rest
    assert bar.bar is None and all(o.ready for o in outs)


def test_log_lines_print_above_the_bar(capsys):
    import jax.numpy as jnp

    from train.progress import Progress, log

    bar = Progress(total=5)
    bar.step_queued(1, jnp.zeros(()))
    bar.bar.refresh()  # tqdm redraws at most every 0.1 s by itself
    drawn = capsys.readouterr().err
    log("epoch 1/1 step 1: val loss 1.0")
    out, err = capsys.readouterr()
    bar.close()
    assert "1/5" in drawn and out == "epoch 1/1 step 1: val loss 1.0\n"
    cleared, redrawn = err.split("\r")[1], err.split("\r")[-1]
    assert cleared.strip() == "" and len(cleared) > 10 and "1/5" in redrawn  # the bar's line blanked, then redrawn


def test_first_line_of_an_error_is_cut_between_words():
    from resnet_flax.errors import first_line

    assert first_line(ValueError("bad value\nmore detail")) == "ValueError: bad value"
    assert first_line(KeyError()) == "KeyError"
    message = "HTTPConnectionPool(host='download.tensorflow.org', port=80): " * 10
    line = first_line(ConnectionError(message))
    kept = line.removesuffix("...")
    assert len(line) <= 200 and line.endswith("...") and f"ConnectionError: {message}".startswith(kept)
    assert f"ConnectionError: {message}"[len(kept)] in " ,;:("  # cut between words


def test_console_scripts_point_at_the_command_line_mains():
    import importlib
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    scripts = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == {"resnet-flax-train", "resnet-flax-convert", "resnet-flax-predict"}
    for target in scripts.values():
        module, name = target.split(":")
        main = getattr(importlib.import_module(module), name)
        with pytest.raises(SystemExit) as e:
            main(["--help"])
        assert e.value.code == 0


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path):
    """A 16-bit PNG reads as its 8-bit equivalent (v / 257); PIL's convert("RGB") would clip all v > 255 to white."""
    import numpy as np
    from PIL import Image

    from train.transforms import load_image

    wide = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)
    Image.fromarray(wide).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    rgb = np.asarray(load_image(tmp_path / "g16.png"))
    expected = np.rint(wide / 257).astype(np.uint8)
    assert rgb.shape == (64, 64, 3) and np.array_equal(rgb[..., 0], expected) and np.array_equal(rgb[..., 2], expected)
    eight = tmp_path / "g8.png"
    Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16)).save(eight)
    assert np.array_equal(np.asarray(load_image(eight))[..., 1], np.arange(256).reshape(16, 16))  # 8-bit unchanged


def test_predict_top_k_below_one_is_one_line(tmp_path, capsys):
    from train.predict import main

    assert main([str(tmp_path / "x.png"), "--checkpoint", str(tmp_path), "--top-k", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--top-k 0" in err[0] and "at least 1" in err[0]


def test_the_training_log_imports_no_torch(tmp_path):
    """tensorboardX imports torch when it is installed (about 2 s of a run's start); the run's log does not."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys, pathlib; from train.metrics import MetricsLog; "
            f"MetricsLog(pathlib.Path({str(tmp_path)!r})).close(); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout
    assert out.strip() == "False" and list((tmp_path / "tb").iterdir())


@pytest.fixture
def restore_compile_cache():
    """Put this process's compilation cache settings back after a test that changes them."""
    import jax

    from train import compile_cache

    saved = {k: jax.config.values[k] for k in ("jax_compilation_cache_dir", "jax_compilation_cache_max_size",
                                              "jax_persistent_cache_min_compile_time_secs")}
    yield compile_cache
    compile_cache._use(saved.pop("jax_compilation_cache_dir"))
    for k, v in saved.items():
        jax.config.update(k, v)


def test_compile_cache_folder_per_cpu_private_and_refused_when_others_can_write(tmp_path, capsys,
                                                                               restore_compile_cache):
    import jax

    cc = restore_compile_cache
    key = cc.host_key()
    assert len(key) == 16 and key == cc.host_key()
    used = cc.enable(tmp_path / "cache")
    assert used == tmp_path / "cache" / key and jax.config.jax_compilation_cache_dir == str(used)
    assert used.stat().st_mode & 0o777 == 0o700
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.0
    assert cc.enable("off") is None and jax.config.jax_compilation_cache_dir is None

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    assert cc.enable(shared) is None and jax.config.jax_compilation_cache_dir is None
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and f"{shared} is writable by other users" in err[0], err

    (tmp_path / "file").write_text("")
    assert cc.enable(tmp_path / "file") is None
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("warning: no compilation cache"), err


def test_a_ctrl_c_swallowed_by_a_finalizer_reaches_the_main_thread(monkeypatch):
    """Python prints and drops an exception raised in a ``__del__`` (the unraisable hook); a Ctrl-C landing in
    one of grain's or Orbax's finalizers on the main thread would leave the run going. ``python -m train``
    redelivers it: the main thread gets KeyboardInterrupt once the hook has returned. Other unraisable
    exceptions still go to the hook that was there before."""
    import gc
    import sys
    import time

    from train.__main__ import redeliver_interrupts

    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(type(u.exc_value)))
    redeliver_interrupts(sys.unraisablehook)

    class Raises:
        def __init__(self, exc: type[BaseException]):
            self.exc = exc

        def __del__(self):
            raise self.exc()

    Raises(ValueError)  # collected at once: the earlier hook sees it, nothing else happens
    gc.collect()
    assert seen == [ValueError]
    with pytest.raises(KeyboardInterrupt):
        Raises(KeyboardInterrupt)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # the redelivered interrupt ends this wait
            time.sleep(0.01)
    assert seen == [ValueError]
