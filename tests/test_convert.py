"""The converter: every input format, the reverse direction, and one-line errors on bad input."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from conftest import nchw_to_nhwc, rel_err

import convert
import resnet_flax
from convert.__main__ import main as cli
from resnet_flax.registry import list_models

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def r18():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=7).eval()


@pytest.fixture(scope="module")
def r18_logits(r18):
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return x, r18(x).numpy()


def assert_same_outputs(model, r18_logits):
    x, ref = r18_logits
    assert rel_err(model(nchw_to_nhwc(x)), ref) <= 1e-5


def run_cli(capsys, *args):
    code = cli([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def files_in(d: Path) -> set[str]:
    return {p.name for p in d.iterdir()}


# --- what it reads -----------------------------------------------------------------------------

def test_plain_state_dict_cli(tmp_path, capsys, r18, r18_logits):
    src = tmp_path / "resnet18.pth"
    torch.save(r18.state_dict(), src)
    code, out, err = run_cli(capsys, src)
    assert code == 0, err
    assert "resnet18" in out and "7 classes" in out
    model = resnet_flax.load(tmp_path / "resnet18.flax.safetensors")
    assert model.config == resnet_flax.arch_config("resnet18", num_classes=7)
    assert_same_outputs(model, r18_logits)


@pytest.mark.parametrize("wrap", ["state_dict", "module_prefix", "lightning"])
def test_wrapped_state_dicts(tmp_path, r18, r18_logits, wrap):
    sd = r18.state_dict()
    obj = {
        "state_dict": {"epoch": 3, "state_dict": sd, "optimizer": {"lr": torch.tensor(0.1)}},
        "module_prefix": {f"module.{k}": v for k, v in sd.items()},
        "lightning": {"state_dict": {f"model.backbone.{k}": v for k, v in sd.items()}},
    }[wrap]
    torch.save(obj, tmp_path / "w.pth")
    assert_same_outputs(convert.load_model(tmp_path / "w.pth"), r18_logits)


def test_safetensors_and_torchscript(tmp_path, r18, r18_logits):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in r18.state_dict().items()}, tmp_path / "r.safetensors")
    assert_same_outputs(convert.load_model(tmp_path / "r.safetensors"), r18_logits)
    torch.jit.script(r18).save(str(tmp_path / "r.pt"))
    assert_same_outputs(convert.load_model(tmp_path / "r.pt"), r18_logits)


def test_tutorial_spellings(tmp_path, r18, r18_logits):
    """conv_1 / bn_1 / layer_1 / down_sample / shortcut are the same structure."""
    def respell(k: str) -> str:
        k = k.replace("conv1", "conv_1").replace("bn1", "bn_1").replace("layer1", "layer_1")
        return k.replace("layer2.0.downsample", "layer2.0.shortcut").replace("downsample", "down_sample")

    sd = {respell(k): v for k, v in r18.state_dict().items()}
    assert "layer_1.0.conv_1.weight" in sd and "layer2.0.shortcut.0.weight" in sd
    torch.save(sd, tmp_path / "tut.pth")
    assert_same_outputs(convert.load_model(tmp_path / "tut.pth"), r18_logits)


def test_old_checkpoint_without_num_batches_tracked(r18, r18_logits):
    sd = {k: v for k, v in r18.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert_same_outputs(convert.build_model(convert.from_state_dict(sd)), r18_logits)


@pytest.mark.parametrize("name", ["resnext50_32x4d", "wide_resnet50_2"])
def test_architecture_inferred(name):
    tmodel = getattr(torchvision.models, name)(num_classes=3)
    ckpt = convert.from_state_dict(tmodel.state_dict())
    assert ckpt.arch == name
    assert ckpt.config == resnet_flax.arch_config(name, num_classes=3)
    assert ckpt.num_params == sum(p.numel() for p in tmodel.parameters())


def test_custom_structure_and_input_channels():
    tm = torchvision.models.resnet.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1], num_classes=4)
    tm.conv1 = torch.nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    tm.eval()
    ckpt = convert.from_state_dict(tm.state_dict())
    assert ckpt.arch == "custom" and ckpt.config.layers == (1, 1, 1, 1) and ckpt.config.in_channels == 1
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        ref = tm(x).numpy()
    assert rel_err(convert.build_model(ckpt)(nchw_to_nhwc(x)), ref) <= 1e-5


def test_dilation_flag(tmp_path, capsys):
    tm = torchvision.models.resnet50(num_classes=5, replace_stride_with_dilation=[False, True, True]).eval()
    torch.save(tm.state_dict(), tmp_path / "dil.pth")
    code, out, err = run_cli(capsys, tmp_path / "dil.pth", "--dilation", "0,1,1", "--verify", "--verify-size", "64")
    assert code == 0 and "OK" in out, err
    model = resnet_flax.load(tmp_path / "dil.flax.safetensors")
    assert model.config.replace_stride_with_dilation == (False, True, True)


# --- the reverse direction ---------------------------------------------------------------------

def test_round_trip_is_exact(tmp_path, capsys, r18):
    torch.save(r18.state_dict(), tmp_path / "a.pth")
    assert run_cli(capsys, tmp_path / "a.pth")[0] == 0
    code, _out, err = run_cli(capsys, tmp_path / "a.flax.safetensors", "--out", tmp_path / "back.pth")
    assert code == 0, err
    back = torch.load(tmp_path / "back.pth", weights_only=True)
    fresh = torchvision.models.resnet18(num_classes=7)
    fresh.load_state_dict(back, strict=True)
    orig = r18.state_dict()
    assert list(back) == list(orig)
    for k, v in orig.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k


def test_load_without_torch(tmp_path, r18):
    torch.save(r18.state_dict(), tmp_path / "a.pth")
    resnet_flax.save(convert.load_model(tmp_path / "a.pth"), tmp_path / "a.flax.safetensors")
    code = ("import sys; sys.modules['torch'] = None; import resnet_flax, numpy as np;"
            "m = resnet_flax.load(sys.argv[1]); print(m(np.zeros((1, 64, 64, 3), np.float32)).shape);"
            "assert 'torchvision' not in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "a.flax.safetensors")],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "(1, 7)"


# --- bad input: one line on stderr, exit code 2, nothing written --------------------------------

class Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def _bad_inputs(tmp_path: Path, r18) -> dict[str, tuple[Path, list[str], str]]:
    sd = r18.state_dict()
    cases = {}

    def case(name, make, args=(), expect=""):
        path = tmp_path / f"{name}.pth"
        make(path)
        cases[name] = (path, list(args), expect)

    case("missing", lambda p: None, expect="no such file")
    case("empty", lambda p: p.write_bytes(b""), expect="empty")

    def truncated(p):
        torch.save(sd, p)
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 3])
    case("truncated", truncated, expect="truncated")
    case("text", lambda p: p.write_text("hello, I am not a checkpoint\n"), expect="not a PyTorch checkpoint")
    case("mlp", lambda p: torch.save(torch.nn.Sequential(torch.nn.Linear(3, 4)).state_dict(), p),
         expect="not a ResNet state dict")
    case("missing_key", lambda p: torch.save({k: v for k, v in sd.items() if k != "layer2.1.bn2.weight"}, p),
         expect="missing 1 key(s): layer2.1.bn2.weight")
    case("extra_key", lambda p: torch.save({**sd, "layer1.0.extra.weight": torch.zeros(3)}, p),
         expect="unexpected 1 key(s): layer1.0.extra.weight")
    case("bad_shape", lambda p: torch.save({**sd, "layer3.0.conv2.weight": torch.zeros(256, 256, 5, 5)}, p),
         expect="layer3.0.conv2.weight: checkpoint has (256, 256, 5, 5), the architecture needs (256, 256, 3, 3)")
    case("wrong_arch", lambda p: torch.save(sd, p), args=["--arch", "resnet50"],
         expect="--arch resnet50 contradicts the tensors")
    case("evil", lambda p: torch.save({"state_dict": sd, "payload": Evil()}, p), expect="refused")
    return cases


def test_bad_inputs(tmp_path, capsys, r18, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name, (path, args, expect) in _bad_inputs(tmp_path, r18).items():
        before = files_in(tmp_path)
        code, out, err = run_cli(capsys, path, *args)
        assert code == 2, (name, out, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (name, err)
        assert expect in lines[0], (name, lines[0])
        assert files_in(tmp_path) == before, (name, files_in(tmp_path) - before)
    assert not (tmp_path / "PWNED").exists()


def test_bad_input_exit_code_from_shell(tmp_path):
    (tmp_path / "empty.pth").write_bytes(b"")
    proc = subprocess.run([sys.executable, "-m", "convert", str(tmp_path / "empty.pth")],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "empty" in proc.stderr


def test_existing_output_is_not_overwritten(tmp_path, capsys, r18):
    torch.save(r18.state_dict(), tmp_path / "a.pth")
    (tmp_path / "a.flax.safetensors").write_text("precious")
    code, _, err = run_cli(capsys, tmp_path / "a.pth")
    assert code == 2 and "--overwrite" in err
    assert (tmp_path / "a.flax.safetensors").read_text() == "precious"
    assert run_cli(capsys, tmp_path / "a.pth", "--overwrite")[0] == 0
    assert resnet_flax.load(tmp_path / "a.flax.safetensors").config.num_classes == 7


def test_damaged_zip_detected(tmp_path):
    p = tmp_path / "z.pth"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
    with pytest.raises(resnet_flax.WeightsError):
        convert.load_model(p)


def test_converted_file_truncated(tmp_path, r18):
    torch.save(r18.state_dict(), tmp_path / "a.pth")
    out = tmp_path / "a.flax.safetensors"
    resnet_flax.save(convert.load_model(tmp_path / "a.pth"), out)
    out.write_bytes(out.read_bytes()[:-1000])
    with pytest.raises(resnet_flax.WeightsError, match="not a readable safetensors"):
        resnet_flax.load(out)


def test_inference_shapes_arrays(r18):
    model = convert.build_model(convert.from_state_dict(r18.state_dict()))
    assert np.asarray(model(np.zeros((3, 32, 32, 3), np.float32))).shape == (3, 7)


# --- outputs: exclusive, umask mode, no leftovers, one line on write errors ----------------------

def temporaries(d: Path) -> list[str]:
    return [p.name for p in d.iterdir() if resnet_flax.atomic.TMP_MARK in p.name]


def test_two_conversions_to_one_out_exactly_one_wins(tmp_path, r18):
    torch.save(r18.state_dict(), tmp_path / "a.pth")
    out = tmp_path / "o.flax.safetensors"
    cmd = [sys.executable, "-m", "convert", str(tmp_path / "a.pth"), "--out", str(out)]
    procs = [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = sorted((p.wait(), p.stderr.read()) for p in procs)
    assert [code for code, _ in results] == [0, 2], results
    loser = results[1][1].strip().splitlines()
    assert len(loser) == 1 and "exists" in loser[0] and "--overwrite" in loser[0]
    assert resnet_flax.load(out).config.num_classes == 7
    assert temporaries(tmp_path) == []


def test_exclusive_write_never_replaces_a_file_that_appears_meanwhile(tmp_path):
    out = tmp_path / "o.bin"

    def write(tmp):  # another process creates OUT while this one is writing
        Path(tmp).write_bytes(b"mine")
        out.write_bytes(b"theirs")

    with pytest.raises(resnet_flax.WeightsError, match="exists"):
        resnet_flax.atomic.atomic_write(out, write, exclusive=True)
    assert out.read_bytes() == b"theirs" and temporaries(tmp_path) == []


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_outputs_get_the_umask_mode(tmp_path, capsys, r18, umask):
    torch.save(r18.state_dict(), tmp_path / "a.pth")
    old = os.umask(umask)
    try:
        assert run_cli(capsys, tmp_path / "a.pth")[0] == 0
        resnet_flax.atomic.atomic_write(tmp_path / "run.json", lambda tmp: Path(tmp).write_text("{}"))  # train's path
    finally:
        os.umask(old)
    for name in ("a.flax.safetensors", "run.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def test_nonfinite_weights_refused_unless_allowed(tmp_path, capsys, r18):
    sd = {k: v.clone() for k, v in r18.state_dict().items()}
    sd["layer2.1.bn1.running_var"][3] = float("nan")
    sd["fc.weight"][0, 0] = float("inf")
    torch.save(sd, tmp_path / "nan.pth")
    code, _, err = run_cli(capsys, tmp_path / "nan.pth")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "non-finite" in err and "layer2.1.bn1.running_var" in err and "--allow-nonfinite" in err
    assert not (tmp_path / "nan.flax.safetensors").exists()
    assert run_cli(capsys, tmp_path / "nan.pth", "--allow-nonfinite")[0] == 0


def _fail_writes(monkeypatch, err: int, where: Path, after_bytes: bool):
    """Make file creation (EACCES/EROFS) or the data write (ENOSPC, after some bytes) fail inside ``where``."""
    real_open = os.open

    def fake_open(path, flags, *args, **kwargs):
        if not after_bytes and Path(path).parent == where and flags & os.O_CREAT:
            raise OSError(err, os.strerror(err), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", fake_open)


@pytest.mark.parametrize("err,after_bytes", [(13, False), (30, False)], ids=["permission", "read_only_fs"])
def test_write_errors_one_line(tmp_path, capsys, r18, monkeypatch, err, after_bytes):
    torch.save(r18.state_dict(), tmp_path / "a.pth")
    outdir = tmp_path / "out"
    outdir.mkdir()
    _fail_writes(monkeypatch, err, outdir, after_bytes)
    code, _, stderr = run_cli(capsys, tmp_path / "a.pth", "--out", outdir / "a.flax.safetensors")
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1 and os.strerror(err) in lines[0], stderr
    assert list(outdir.iterdir()) == []


def convert_onto_tmpfs(tmp_path: Path, r18, options: str) -> tuple[int, list[str], list[str]]:
    """``python -m convert`` writing onto a tmpfs mounted with ``options`` in a mount namespace (a real mount
    gives real ENOSPC/EROFS, which root's file modes would not): (exit code, stderr lines, what the tmpfs holds
    afterwards)."""
    torch.save(r18.state_dict(), tmp_path / "a.pth")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = (f"mount -t tmpfs -o {options} none {mnt} || exit 9; {sys.executable} -m convert {tmp_path / 'a.pth'} "
              f"--out {mnt / 'a.flax.safetensors'}; rc=$?; echo LEFT; ls -A {mnt}; exit $rc")
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, cwd=REPO)
    return proc.returncode, proc.stderr.strip().splitlines(), proc.stdout.split("LEFT")[-1].split()


@pytest.mark.parametrize("options,reason", [("size=1m", "No space left on device"), ("ro", "Read-only file system")],
                         ids=["full_disk", "read_only"])
def test_real_full_or_read_only_file_system(tmp_path, r18, options, reason):
    """A 1 MiB tmpfs fills while the 45 MB file is written; a read-only one refuses it: one line, nothing left."""
    code, lines, left = convert_onto_tmpfs(tmp_path, r18, options)
    assert code == 2 and len(lines) == 1 and reason in lines[0], lines
    assert left == [] and files_in(tmp_path) == {"a.pth", "mnt"}


def test_verify_finds_a_mapping_error_and_writes_nothing(tmp_path, capsys, r18, monkeypatch):
    """--verify compares for real: one wrongly mapped tensor (fc.bias off by 1) fails it, exit 1, no file."""
    import resnet_flax.loading

    torch.save(r18.state_dict(), tmp_path / "a.pth")
    mapped = resnet_flax.loading.torch_to_flax

    def off_by_one(sd, expected):
        arrays = mapped(sd, expected)
        return {**arrays, "fc.bias": arrays["fc.bias"] + 1}

    monkeypatch.setattr(resnet_flax.loading, "torch_to_flax", off_by_one)
    code, out, err = run_cli(capsys, tmp_path / "a.pth", "--verify", "--verify-size", "32")
    assert code == 1 and "MISMATCH" in out and "nothing written" in err, (out, err)
    assert files_in(tmp_path) == {"a.pth"}
    monkeypatch.undo()
    code, out, err = run_cli(capsys, tmp_path / "a.pth", "--verify", "--verify-size", "32")
    assert code == 0 and "OK" in out and files_in(tmp_path) == {"a.pth", "a.flax.safetensors"}, (out, err)


def _unet_state_dict(encoder) -> dict:
    """segmentation_models_pytorch's ``Unet("resnet34")`` key layout: the encoder (no fc) under ``encoder.``,
    decoder blocks whose Conv2dReLU convs are named ``conv1.0`` like a deep stem, and a segmentation head."""
    sd = {f"encoder.{k}": v for k, v in encoder.state_dict().items() if not k.startswith("fc.")}
    g = torch.Generator().manual_seed(2)
    for i, (cin, cout) in enumerate([(768, 256), (384, 128), (192, 64), (128, 32), (32, 16)]):
        for j, c_in in ((1, cin), (2, cout)):
            sd[f"decoder.blocks.{i}.conv{j}.0.weight"] = torch.randn(cout, c_in, 3, 3, generator=g)
            for leaf in ("weight", "bias", "running_mean", "running_var"):
                sd[f"decoder.blocks.{i}.conv{j}.1.{leaf}"] = torch.rand(cout, generator=g)
            sd[f"decoder.blocks.{i}.conv{j}.1.num_batches_tracked"] = torch.tensor(1)
    sd["segmentation_head.0.weight"] = torch.randn(1, 16, 3, 3, generator=g)
    sd["segmentation_head.0.bias"] = torch.zeros(1)
    return sd


def test_resnet_found_by_structure_in_a_unet(tmp_path, capsys):
    from conftest import torch_model_with_bn_state

    encoder = torch_model_with_bn_state("resnet34")
    torch.save(_unet_state_dict(encoder), tmp_path / "unet.pth")
    code, out, err = run_cli(capsys, tmp_path / "unet.pth")
    assert code == 0, err
    assert "took the ResNet under 'encoder.'" in out and "decoder.blocks" in out and "segmentation_head" in out
    model = resnet_flax.load(tmp_path / "unet.flax.safetensors")
    assert resnet_flax.arch_name(model.config) == "resnet34" and model.config.num_classes == 0
    encoder.fc = torch.nn.Identity()  # smp's encoder has no head: compare the pooled features
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = encoder(x).numpy()
    assert rel_err(model(nchw_to_nhwc(x)), ref) <= 1e-5


def test_several_resnets_need_prefix(tmp_path, capsys, r18, r18_logits):
    torch.manual_seed(1)
    student = torchvision.models.resnet18(num_classes=7).eval()
    sd = {**{f"teacher.{k}": v for k, v in r18.state_dict().items()},
          **{f"student.{k}": v for k, v in student.state_dict().items()}}
    torch.save(sd, tmp_path / "distill.pth")
    code, _, err = run_cli(capsys, tmp_path / "distill.pth")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "'student.', 'teacher.'" in lines[0] and "--prefix" in lines[0]
    code, out, err = run_cli(capsys, tmp_path / "distill.pth", "--prefix", "teacher")
    assert code == 0 and "took the ResNet under 'teacher.'" in out, err
    assert_same_outputs(resnet_flax.load(tmp_path / "distill.flax.safetensors"), r18_logits)
    code, _, err = run_cli(capsys, tmp_path / "distill.pth", "--prefix", "decoder.", "--overwrite")
    assert code == 2 and "no complete ResNet under --prefix 'decoder.'" in err


def test_unreadable_source_one_line(tmp_path, capsys, r18, monkeypatch):
    import resnet_flax.reader

    torch.save(r18.state_dict(), tmp_path / "a.pth")

    def denied(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(resnet_flax.reader, "open", denied, raising=False)
    code, _, err = run_cli(capsys, tmp_path / "a.pth")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "cannot read" in err and "Permission denied" in err
    monkeypatch.undo()
    code, _, err = run_cli(capsys, tmp_path)  # a folder given as the source
    assert code == 2 and "a folder, not a file" in err


SLOW_CONVERT = """
import sys, time
from pathlib import Path
import resnet_flax.io
def slow(arrays, filename, metadata=None):
    Path(filename).write_bytes(b"\\0" * 1_000_000)
    print("WRITING", flush=True)
    time.sleep(60)
resnet_flax.io.save_file = slow
from convert.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGKILL"])
def test_killed_mid_write_leaves_no_temporary(tmp_path, capsys, r18, sig):
    import signal

    torch.save(r18.state_dict(), tmp_path / "a.pth")
    proc = subprocess.Popen([sys.executable, "-c", SLOW_CONVERT, str(tmp_path / "a.pth")], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().startswith("found ")  # the model is read and built before anything is written
    assert proc.stdout.readline().strip() == "WRITING"
    assert len(temporaries(tmp_path)) == 1  # named .a.flax.safetensors.partial-PID-RANDOM
    proc.send_signal(getattr(signal, sig))
    proc.wait(timeout=30)
    assert not (tmp_path / "a.flax.safetensors").exists()
    if sig == "SIGTERM":  # cleaned up on the way out
        assert temporaries(tmp_path) == []
    else:  # nothing runs on SIGKILL: the next write to that output removes the dead process's temporary
        assert len(temporaries(tmp_path)) == 1
    assert run_cli(capsys, tmp_path / "a.pth")[0] == 0
    assert temporaries(tmp_path) == []


def test_cli_flag_errors_one_line(tmp_path, r18):
    torch.save(r18.state_dict(), tmp_path / "a.pth")
    (tmp_path / "f").write_text("a file")
    cases = {
        "bad_arch": ["--arch", "resnet19"],
        "bad_dilation": ["--dilation", "1,1"],
        "bad_verify_size": ["--verify", "--verify-size", "0"],
        "out_under_a_file": ["--out", str(tmp_path / "f" / "x.flax.safetensors")],
        "out_is_a_folder": ["--out", str(tmp_path), "--overwrite"],
        "unknown_flag": ["--frobnicate"],
    }
    for name, args in cases.items():
        proc = subprocess.run([sys.executable, "-m", "convert", str(tmp_path / "a.pth"), *args], capture_output=True,
                              text=True, cwd=REPO)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (name, proc.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pth", "f"]


# --- timm's ResNet-D/T and SE models -----------------------------------------------------------

def small_timm(**kwargs):
    """A small timm ResNet (one block a stage); by default with all three options: tiered stem, avg_down, SE."""
    import timm.models.resnet as tr

    args = {"stem_type": "deep_tiered", "stem_width": 32, "avg_down": True, "block_args": {"attn_layer": "se"},
            "num_classes": 5, **kwargs}
    torch.manual_seed(0)
    return tr.ResNet(tr.BasicBlock, [1, 1, 1, 1], **args).eval()


@pytest.mark.parametrize("name", list_models("timm"))
def test_timm_checkpoint_converts_with_no_flags(tmp_path, capsys, name):
    import timm

    torch.manual_seed(0)
    sd = timm.create_model(name, num_classes=6).state_dict()
    torch.save(sd, tmp_path / f"{name}.pth")
    code, out, err = run_cli(capsys, tmp_path / f"{name}.pth")
    assert code == 0, err
    assert out.startswith(f"found {name} (") and "6 classes" in out
    model = resnet_flax.load(tmp_path / f"{name}.flax.safetensors")
    assert model.config == resnet_flax.arch_config(name, num_classes=6)
    back = convert.to_torch_state_dict(model)
    assert list(back) == list(sd)  # timm's names, in timm's order
    assert all(torch.equal(back[k], v) for k, v in sd.items())


@pytest.mark.slow
def test_timm_checkpoint_cli_verify_and_back(tmp_path):
    """python -m convert itself, with --verify against timm, then back to a .pth timm loads strictly."""
    tm = small_timm()
    torch.save({"state_dict": tm.state_dict()}, tmp_path / "t.pth")
    proc = subprocess.run([sys.executable, "-m", "convert", str(tmp_path / "t.pth"), "--verify", "--verify-size", "40"],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "custom ResNet (basic blocks [1, 1, 1, 1]" in proc.stdout and "deep tiered stem 24-32-64" in proc.stdout
    assert "avg-pool shortcuts, SE" in proc.stdout and "OK" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "convert", str(tmp_path / "t.flax.safetensors"), "--out",
                           str(tmp_path / "back.pth")], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    back = torch.load(tmp_path / "back.pth", weights_only=True)
    fresh = small_timm()
    fresh.load_state_dict(back, strict=True)
    assert list(back) == list(tm.state_dict())
    assert all(torch.equal(back[k], v) for k, v in tm.state_dict().items())


def test_timm_options_inferred_separately():
    """Each option alone, and a wider deep stem (as timm's resnet50s: 64-64-128), is read off the tensors."""
    for kwargs, expect in [
        ({"stem_type": "", "avg_down": False}, {"se": True}),
        ({"stem_type": "deep", "stem_width": 64, "block_args": None}, {"stem_type": "deep", "stem_width": 64,
                                                                        "avg_down": True}),
        ({"stem_type": "", "block_args": None}, {"avg_down": True}),
    ]:
        tm = small_timm(**kwargs)
        config = convert.from_state_dict(tm.state_dict()).config
        want = resnet_flax.ResNetConfig("basic", (1, 1, 1, 1), num_classes=5, **expect)
        assert config == want, kwargs
        x = torch.randn(2, 3, 40, 40)
        with torch.no_grad():
            ref = tm(x).numpy()
        assert rel_err(convert.build_model(convert.from_state_dict(tm.state_dict()))(nchw_to_nhwc(x)), ref) <= 1e-5


def test_timm_checkpoints_that_cannot_be_mapped_are_named(tmp_path, capsys):
    from functools import partial

    from timm.layers import SEModule

    sd = small_timm().state_dict()
    cases = {
        "se_reduction": (small_timm(block_args={"attn_layer": partial(SEModule, rd_ratio=1 / 4)}).state_dict(),
                         "SE blocks with 16 reduced channels for 64, with bias, are not supported (tensor "
                         "layer1.0.se.fc1.weight); timm's 'se' has 8, with bias"),
        "eca": (small_timm(block_args={"attn_layer": "eca"}).state_dict(),
                "ECA attention (timm's ecaresnet*) is not supported (tensor layer1.0.se.conv.weight)"),
        "stem_pool_conv": (small_timm(replace_stem_pool=True).state_dict(),
                           "a strided conv in place of the stem max-pool (timm's replace_stem_pool) is not supported"),
        "odd_stem": ({**sd, "conv1.0.weight": torch.zeros(16, 3, 3, 3), "conv1.1.weight": torch.zeros(16)},
                     "a deep stem with 16, 32, 64 channels is not supported"),
        "half_stem": ({k: v for k, v in sd.items() if not k.startswith("conv1.6")},
                      "a deep stem without conv1.6.weight is not supported"),
        "wrong_arch": (sd, "--arch resnet10t contradicts the tensors, which describe a custom ResNet"),
    }
    for name, (state, expect) in cases.items():
        torch.save(state, tmp_path / f"{name}.pth")
        args = ["--arch", "resnet10t"] if name == "wrong_arch" else []
        code, out, err = run_cli(capsys, tmp_path / f"{name}.pth", *args)
        assert code == 2, (name, out)
        assert len(err.strip().splitlines()) == 1 and expect in err, (name, err)
        assert "not a ResNet" not in err
        assert not (tmp_path / f"{name}.flax.safetensors").exists()


@pytest.mark.parametrize("first_byte", [0x80, 0x28])  # header lengths are padded to 8: '}' and ']' cannot occur
def test_safetensors_whose_header_length_looks_like_a_pickle(tmp_path, first_byte):
    """A safetensors header length whose low byte is a pickle opcode (0x80 PROTO, '(' MARK) is still safetensors."""
    from safetensors.numpy import save_file

    from resnet_flax.reader import detect_format

    path = tmp_path / "x.safetensors"
    for pad in range(300):
        save_file({"w": np.zeros(1, np.float32)}, str(path), metadata={"p": "x" * pad})
        if path.read_bytes()[0] == first_byte:
            break
    assert path.read_bytes()[0] == first_byte
    assert detect_format(path) == "safetensors"
