"""The torch-free reader against torch.load(weights_only=True): same values bit for bit, same refusals."""

from __future__ import annotations

import argparse
import collections
import os
import pickle
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from resnet_flax import torchfile
from resnet_flax.errors import WeightsError

REPO = Path(__file__).resolve().parents[1]


def same(ours, ref, where="root"):
    """Recursively: containers alike, every tensor the same dtype, shape, strides and bytes."""
    if isinstance(ref, torch.Tensor):
        assert isinstance(ours, np.ndarray), where
        assert ours.dtype.name == str(ref.dtype).removeprefix("torch."), where
        assert ours.shape == tuple(ref.shape), where
        if ref.numel() > 1:
            assert tuple(s // ours.itemsize for s in ours.strides) == ref.stride(), where
        assert np.ascontiguousarray(ours).tobytes() == ref.contiguous().flatten().view(torch.uint8).numpy().tobytes(), \
            where
    elif isinstance(ref, argparse.Namespace):
        assert isinstance(ours, torchfile.Namespace), where
        assert vars(ours).keys() == vars(ref).keys(), where
        for k in vars(ref):
            same(getattr(ours, k), getattr(ref, k), f"{where}.{k}")
    elif isinstance(ref, dict):
        assert type(ours) is type(ref) and list(ours) == list(ref), where
        for k in ref:
            same(ours[k], ref[k], f"{where}[{k!r}]")
    elif isinstance(ref, list | tuple):
        assert type(ours) is type(ref) and len(ours) == len(ref), where
        for i, (a, b) in enumerate(zip(ours, ref)):
            same(a, b, f"{where}[{i}]")
    else:
        assert type(ours) is type(ref) and ours == ref, where


def all_dtypes() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 6, generator=g)
    out = {str(dt).removeprefix("torch."): base.to(dt) for dt in (
        torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
        torch.int8, torch.uint8, torch.bool, torch.complex64)}
    out["float8_e4m3fn"] = base.to(torch.float8_e4m3fn)
    out["transposed"] = base.t()                      # strides (1, 6)
    out["column"] = base[:, 2]                         # offset and stride into a shared storage
    out["scalar"] = torch.tensor(3.5)
    out["empty"] = torch.zeros(0, 3)
    out["param"] = torch.nn.Parameter(torch.ones(2, 2))
    return out


def sample_objects(r18_sd) -> dict[str, object]:
    return {
        "plain": r18_sd,
        "wrapped": {"epoch": 3, "state_dict": r18_sd, "optimizer": {"state": {0: {"step": torch.tensor(4.0)}},
                                                                   "param_groups": [{"lr": 0.1, "params": [0]}]}},
        "dtypes": all_dtypes(),
        "lightning": {"epoch": 1, "global_step": 8, "pytorch-lightning_version": "2.4.0",
                      "state_dict": collections.OrderedDict((f"model.backbone.{k}", v) for k, v in r18_sd.items()),
                      "hyper_parameters": {"lr": 1e-3, "name": "r18", "sizes": (224, 224), "tags": ["a"],
                                           "flags": {True, False}, "blob": b"\x00\xffbytes", "none": None}},
        "timm": {"arch": "resnet18", "args": argparse.Namespace(model="resnet18", lr=0.1, epochs=3, amp=True,
                                                                  mean=None, smoothing=0.1, sched="cosine"),
                 "epoch": 2, "metric": 71.5, "version": 2, "state_dict": r18_sd,
                 "state_dict_ema": {k: v.clone() for k, v in r18_sd.items()}},
        "shared": {"a": (t := torch.arange(10.0)), "b": t, "c": t[3:7]},
    }


@pytest.fixture(scope="module")
def r18_sd():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=3).state_dict()


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_same_as_torch_load(tmp_path, r18_sd, legacy):
    for name, obj in sample_objects(r18_sd).items():
        if legacy and name == "dtypes":  # torch cannot read back float8 (an untyped storage) in the legacy format
            obj = {k: v for k, v in obj.items() if not k.startswith("float8")}
        path = tmp_path / f"{name}.pth"
        torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
        with torch.serialization.safe_globals([argparse.Namespace]):
            ref = torch.load(path, weights_only=True)
        same(torchfile.load(path), ref, name)


@pytest.mark.parametrize("how", ["script", "trace"])
def test_torchscript_same_as_torch_state_dict(tmp_path, how):
    torch.manual_seed(0)
    m = torchvision.models.resnet18(num_classes=3).eval()
    sm = torch.jit.script(m) if how == "script" else torch.jit.trace(m, torch.zeros(1, 3, 32, 32))
    sm.save(str(tmp_path / "m.pt"))
    ours = torchfile.script_tensors(torchfile.load(tmp_path / "m.pt"))
    same(ours, dict(torch.jit.load(str(tmp_path / "m.pt")).state_dict()))


@pytest.mark.parametrize("protocol", [3, 4, 5])
@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_other_pickle_protocols(tmp_path, protocol, legacy):
    """torch.save(pickle_protocol=...) files; compared with the saved tensors (torch.load refuses protocol 3+ bytes)."""
    obj = {**all_dtypes(), "blob": b"\x00xy", "nested": {"n": None, "t": (1, 2.5, "s")}}
    if legacy:
        obj = {k: v for k, v in obj.items() if not k.startswith("float8")}
    torch.save(obj, tmp_path / "p.pth", pickle_protocol=protocol, _use_new_zipfile_serialization=not legacy)
    same(torchfile.load(tmp_path / "p.pth"), obj)


def test_arrays_are_memory_mapped_views(tmp_path, r18_sd):
    torch.save(r18_sd, tmp_path / "a.pth")
    w = torchfile.load(tmp_path / "a.pth")["layer1.0.conv1.weight"]
    assert not w.flags.writeable and not w.flags.owndata


# --- code-carrying files: refused by both readers, nothing executed ------------------------------

class Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class Exec:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('x')",))


def test_code_carrying_pickles_refused_like_torch(tmp_path, r18_sd):
    marker = tmp_path / "PWNED"
    cases = {
        "os_system": {"state_dict": r18_sd, "x": Evil(str(marker))},
        "exec": [Exec(str(marker))],
        "module_object": torchvision.models.resnet18(num_classes=3),
        "numpy_array": {"w": np.zeros(3)},
    }
    for name, obj in cases.items():
        for legacy in (False, True):
            path = tmp_path / f"{name}{legacy}.pth"
            torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
            with pytest.raises(pickle.UnpicklingError):
                torch.load(path, weights_only=True)
            with pytest.raises(torchfile.Refused):
                torchfile.load(path)
    assert not marker.exists()


SETSTATE_MODULE = '''
import torch

class Evil(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(2))

    def forward(self, x):
        return x * self.w

    @torch.jit.export
    def __getstate__(self):
        return (self.w, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, bool]):
        self.w = state[0]
        self.training = state[1]
        print("SETSTATE RAN")  # TorchScript has no open(); printing proves the archive's code runs
'''


def test_torchscript_setstate_never_runs(tmp_path):
    (tmp_path / "evil_mod.py").write_text(SETSTATE_MODULE)
    evil = tmp_path / "evil.pt"
    make = ("import sys, torch; sys.path.insert(0, sys.argv[1]); import evil_mod; "
            "torch.jit.script(evil_mod.Evil()).save(sys.argv[2])")
    subprocess.run([sys.executable, "-c", make, str(tmp_path), str(evil)], check=True, capture_output=True)
    # control: torch.jit.load runs the archive's __setstate__
    ran = subprocess.run([sys.executable, "-c", "import sys, torch; torch.jit.load(sys.argv[1])", str(evil)],
                         capture_output=True, text=True)
    assert "SETSTATE RAN" in ran.stdout
    before = set(tmp_path.iterdir())
    proc = subprocess.run([sys.executable, "-m", "convert", str(evil)], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2, proc.stderr
    assert "SETSTATE RAN" not in proc.stdout
    assert len(proc.stderr.strip().splitlines()) == 1 and "refused" in proc.stderr and "__setstate__" in proc.stderr
    assert set(tmp_path.iterdir()) == before
    # the same archive through the Python API (train --init-from, predict --checkpoint take this path)
    import convert
    with pytest.raises(WeightsError, match="__setstate__"):
        convert.load_model(evil)


def test_pt2_refused_as_unsupported(tmp_path):
    ep = torch.export.export(torch.nn.Linear(2, 3), (torch.zeros(1, 2),))
    torch.export.save(ep, tmp_path / "m.pt2")
    with pytest.raises(WeightsError, match=r"unsupported torch\.export archive"):
        torchfile.load(tmp_path / "m.pt2")


# --- without torch -----------------------------------------------------------------------------

HIDE_TORCH = ("import runpy, sys; sys.modules['torch'] = None; sys.modules['torchvision'] = None; "
              "sys.argv = ['convert', *sys.argv[1:]]; runpy.run_module('convert', run_name='__main__')")


def test_cli_without_torch(tmp_path, r18_sd):
    for name, kwargs in {"zip": {}, "legacy": {"_use_new_zipfile_serialization": False}}.items():
        torch.save({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in r18_sd.items()},
                   tmp_path / f"{name}.pth", **kwargs)
        proc = subprocess.run([sys.executable, "-c", HIDE_TORCH, str(tmp_path / f"{name}.pth")],
                              capture_output=True, text=True, cwd=REPO)
        assert proc.returncode == 0, proc.stderr
        assert "resnet18" in proc.stdout
    torch.jit.script(torchvision.models.resnet18(num_classes=3)).save(str(tmp_path / "s.pt"))
    proc = subprocess.run([sys.executable, "-c", HIDE_TORCH, str(tmp_path / "s.pt")], capture_output=True,
                          text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    # --verify and writing .pth need torch: one line naming the extra, exit 2
    for args in ([str(tmp_path / "zip.pth"), "--verify", "--out", str(tmp_path / "v.flax.safetensors")],
                 [str(tmp_path / "zip.flax.safetensors")]):
        proc = subprocess.run([sys.executable, "-c", HIDE_TORCH, *args], capture_output=True, text=True, cwd=REPO)
        assert proc.returncode == 2, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and "resnet-flax[torch]" in proc.stderr
    assert not (tmp_path / "v.flax.safetensors").exists() and not (tmp_path / "zip.pth.pth").exists()


# --- small files that declare huge things ------------------------------------------------------

def _zip_checkpoint(path: Path, pkl: bytes, storage: bytes) -> None:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")
        z.writestr("archive/data/0", storage)


def _s(text: str) -> bytes:
    b = text.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def _n(x: int) -> bytes:
    k = (x.bit_length() + 8) // 8
    return b"\x8a" + bytes([k]) + x.to_bytes(k, "little", signed=True)


def _tensors_pickle(numel: int, size: tuple[int, ...], stride: tuple[int, ...], count: int = 1) -> bytes:
    """data.pkl of {"w0": tensor, ...}, all over float storage "0" of ``numel`` declared elements, opcode by
    opcode as torch.save writes it (protocol 2)."""
    def tup(xs):
        return b"(" + b"".join(_n(x) for x in xs) + b"t"
    tensor = (b"ctorch._utils\n_rebuild_tensor_v2\n((" + _s("storage") + b"ctorch\nFloatStorage\n" + _s("0")
              + _s("cpu") + _n(numel) + b"tQ" + _n(0) + tup(size) + tup(stride)
              + b"\x89ccollections\nOrderedDict\n)RtR")
    return b"\x80\x02}(" + b"".join(_s(f"w{i}") + tensor for i in range(count)) + b"u."


MB = 1 << 20


def crafted_files(d: Path) -> dict[str, Path]:
    """~1 MB files that declare gigabytes: each would need >= 1 GB if what it declares were allocated."""
    storage = bytes(MB)  # 262144 float32 zeros
    n = MB // 4
    files = {}

    def zipped(name, pkl):
        files[name] = d / f"{name}.pth"
        _zip_checkpoint(files[name], pkl, storage)

    zipped("storage_larger_than_member", _tensors_pickle(1 << 38, (1 << 38,), (1,)))
    zipped("tensor_beyond_storage", _tensors_pickle(n, (n, 1000), (1000, 1)))
    zipped("stride_zero_repeat", _tensors_pickle(n, (1 << 20, 1 << 20), (0, 0)))
    zipped("many_views", _tensors_pickle(n, (n,), (1,), count=2000))
    zipped("memo_index", b"\x80\x02]r\xf0\xff\xff\x7f.")                       # LONG_BINPUT 2**31 - 16
    zipped("bytes8_length", b"\x80\x04\x8e" + struct.pack("<Q", 1 << 40) + bytes(MB // 4) + b".")  # BINBYTES8 1 TB
    zipped("deep_nesting", b"\x80\x02" + b"]" * 300_000 + b"a" * 299_999 + b".")
    # the legacy format: a real file whose first storage's element count is patched to 2**40
    legacy = d / "legacy_count.pth"
    torch.save({"w": torch.zeros(n)}, legacy, _use_new_zipfile_serialization=False)
    raw = bytearray(legacy.read_bytes())
    at = len(raw) - 8 - 4 * n
    assert struct.unpack("<q", raw[at:at + 8])[0] == n
    raw[at:at + 8] = struct.pack("<q", 1 << 40)
    legacy.write_bytes(bytes(raw))
    files["legacy_count"] = legacy
    return files


def test_crafted_benign_control_reads(tmp_path):
    """The hand-written pickle is what torch writes: the same file with honest numbers loads in both readers."""
    _zip_checkpoint(tmp_path / "ok.pth", _tensors_pickle(6, (2, 3), (3, 1), count=2), struct.pack("<6f", *range(6)))
    same(torchfile.load(tmp_path / "ok.pth"), torch.load(tmp_path / "ok.pth", weights_only=True))


RSS_PROBE = """
import sys
from resnet_flax import torchfile
from resnet_flax.errors import WeightsError

def status(field):
    return int(next(line.split()[1] for line in open("/proc/self/status") if line.startswith(field)))

open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS, after the imports
base = status("VmHWM:")
for path in sys.argv[1:]:
    try:
        torchfile.load(path)
        print("ACCEPTED", path)
    except WeightsError as e:
        assert len(str(e).splitlines()) == 1, e
        print("refused", path, str(e)[:100])
print("GROWTH_KB", status("VmHWM:") - base)
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak RSS reset needs Linux /proc")
def test_small_crafted_files_refused_with_little_memory(tmp_path):
    files = crafted_files(tmp_path)
    assert max(p.stat().st_size for p in files.values()) < 2 * MB
    proc = subprocess.run([sys.executable, "-c", RSS_PROBE, *map(str, files.values())], capture_output=True,
                          text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "ACCEPTED" not in proc.stdout, proc.stdout
    growth_mb = int(proc.stdout.split("GROWTH_KB")[1]) / 1024
    # Each file declares >= 1 GB (deep_nesting: 300k nested lists, ~32 MB, built before the stack cap). Measured
    # peak growth refusing all of them one after the other: 1.7 MB (the largest single file: 0.9 MB). 32 MB leaves
    # room for allocator noise and stays far below any allocation of what the files declare.
    assert growth_mb < 32, (growth_mb, proc.stdout)


@pytest.mark.slow
def test_tampered_header_refused_in_one_line(tmp_path, r18_sd):
    from safetensors.numpy import load_file, save_file

    import convert
    import resnet_flax

    torch.save(r18_sd, tmp_path / "a.pth")
    good = tmp_path / "a.flax.safetensors"
    resnet_flax.save(convert.load_model(tmp_path / "a.pth"), good)
    meta = resnet_flax.io.read_metadata(good)
    arrays = load_file(str(good))
    config = __import__("json").loads(meta["config"])
    tampered = {
        "huge_layers": {**config, "layers": [10**6, 10**6, 10**6, 10**6]},
        "many_layers": {**config, "layers": [40, 40, 40, 40]},
        "huge_width": {**config, "width_per_group": 10**12},
        "negative_classes": {**config, "num_classes": -5},
        "not_a_number": {**config, "groups": "many"},
    }
    for name, cfg in tampered.items():
        path = tmp_path / f"{name}.flax.safetensors"
        save_file(arrays, str(path), metadata={**meta, "config": __import__("json").dumps(cfg)})
        # a subprocess with a time limit: the old loader spent hours building 4 million blocks
        proc = subprocess.run([sys.executable, "-m", "convert", str(path), "--out", str(tmp_path / f"{name}.pth")],
                              capture_output=True, text=True, cwd=REPO, timeout=120)
        assert proc.returncode == 2, (name, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "header" in lines[0], (name, proc.stderr)
        assert not (tmp_path / f"{name}.pth").exists()
