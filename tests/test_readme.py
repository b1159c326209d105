"""The README's examples: the Python snippet runs as written, and its command lists never collide."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import numpy as np
import pytest

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_python_snippet_runs_as_written(tmp_path, monkeypatch):
    """With the files the commands above it make: resnet50.pth and its conversion (random weights here)."""
    torch = pytest.importorskip("torch")
    import torchvision

    import convert
    import resnet_flax

    torch.manual_seed(0)
    torch.save(torchvision.models.resnet50().state_dict(), tmp_path / "resnet50.pth")
    resnet_flax.save(convert.load_model(tmp_path / "resnet50.pth"), tmp_path / "resnet50.flax.safetensors")
    monkeypatch.chdir(tmp_path)
    snippet = blocks("python")[0]
    scope: dict = {}
    exec(compile(snippet, "README.md", "exec"), scope)
    assert scope["logits"].shape == (1, 1000) and scope["features"].shape == (1, 2048)
    assert np.array_equal(np.asarray(scope["pooled"], np.float32), np.asarray(scope["model"].embed(
        scope["images_nhwc"])))
    assert scope["model"].config.num_classes == 10


def outputs(command: str) -> tuple[list[str], list[str]]:
    """(paths the command reads, paths it writes) for the README's convert / train / predict commands."""
    from convert.core import default_output

    words = shlex.split(command.split("#")[0])
    if words[:2] != ["python", "-m"]:
        return [], []
    module, args = words[2], words[3:]
    flag = {a: b for a, b in zip(args, [*args[1:], ""]) if a.startswith("--")}
    if module == "convert":
        src = Path(args[0])
        return [str(src)], [flag.get("--out") or str(default_output(src, not src.name.endswith(".flax.safetensors")))]
    if module == "train":
        return [flag.get("--init-from", "")], [flag.get("--workdir", "workdir")]
    if module == "train.predict":
        return [flag["--checkpoint"]], []
    return [], []


@pytest.mark.parametrize("index", range(len(blocks("bash"))))
def test_command_lists_run_top_to_bottom_without_collisions(index):
    """No command writes where an earlier one wrote (a workdir is resumed, a file refused) or what one read."""
    written: list[str] = []
    read: list[str] = []
    for command in blocks("bash")[index].replace("\\\n", " ").splitlines():
        reads, writes = outputs(command)
        read += [p for p in reads if p]
        for path in writes:
            assert path not in written, f"{command!r} writes {path}, which an earlier command wrote"
            assert path not in read, f"{command!r} overwrites {path}, an input of this list"
        written += writes
