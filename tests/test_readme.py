"""README.md as a newcomer meets it: every fenced block runs, top to bottom, in a fresh folder, offline.

``bash`` blocks run with bash (``python`` is this interpreter, the repository's ``examples/`` is reachable as
from a clone); ``python`` blocks run in this process; ``text`` blocks are shown, not run (commands for machines
the tests do not have: a TPU pod slice). Two kinds of line are checked instead of run: ``pip
install`` lines (their extras must exist in pyproject.toml; ``.ci/run`` performs the install) and ``python -m
pytest -q --slow`` (it must be what ``.ci/run`` runs). Nothing is downloaded: ``weights="DEFAULT"`` finds the
converted file its first call would have cached, put in a fresh cache (random weights) beforehand.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
PIP = re.compile(r'^pip install -e (\.|"\.\[(\w+)\]")(\s+#.*)?$')
TEST_COMMAND = "python -m pytest -q --slow"


def blocks() -> list[tuple[str, str]]:
    """(language, text) of every fenced block, in order."""
    return [(m[1], m[2]) for m in FENCE.finditer(README)]


def runnable(text: str) -> str:
    """A bash block without the lines that are checked instead of run."""
    return "\n".join(line for line in text.splitlines()
                     if not (PIP.match(line.strip()) or line.strip() == TEST_COMMAND))


def test_every_block_is_bash_or_python():
    assert blocks() and {lang for lang, _ in blocks()} <= {"bash", "python", "text"}, [lang for lang, _ in blocks()]


def test_install_and_test_commands_match_the_project():
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    bash = "\n".join(text for lang, text in blocks() if lang == "bash")
    pip_lines = [line for line in bash.splitlines() if line.startswith("pip ")]
    assert pip_lines, "the README installs nothing"
    for line in pip_lines:
        m = PIP.match(line)
        assert m, f"{line!r}: not a `pip install -e .` / `pip install -e \".[extra]\"` line"
        assert m[2] is None or m[2] in extras, f"{line!r}: pyproject.toml has no extra {m[2]!r}"
    for extra in re.findall(r"`\[(\w+)\]`", README):  # extras named in the prose
        assert extra in extras, extra
    assert TEST_COMMAND in bash.splitlines()
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert TEST_COMMAND in ci, "the README's test command is not what .ci/run runs"


@pytest.mark.slow
def test_readme_runs_top_to_bottom(tmp_path, monkeypatch):
    """Each block in order; what a block writes is what the next ones read (checkpoint, dataset, workdir)."""
    import resnet_flax

    work, home = tmp_path / "work", tmp_path / "home"
    work.mkdir()
    (work / "examples").symlink_to(REPO / "examples")
    # The file resnet50(weights="DEFAULT") converts and caches on its first call, here with random weights.
    url = resnet_flax.ResNet50_Weights.DEFAULT.url
    cached = home / "converted" / (url.rsplit("/", 1)[1].removesuffix(".pth") + ".flax.safetensors")
    cached.parent.mkdir(parents=True)
    resnet_flax.save(resnet_flax.resnet50(), cached)
    env = {**os.environ, "RESNET_FLAX_HOME": str(home), "TORCH_HOME": str(tmp_path / "torch"),
           "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get(
               "PYTHONPATH")])), "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])}
    for key in ("RESNET_FLAX_HOME", "TORCH_HOME", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(key, env[key])
    monkeypatch.chdir(work)

    timings, scopes, outputs = [], [], []
    for index, (lang, text) in enumerate(blocks()):
        t0 = time.perf_counter()
        if lang == "python":
            scope: dict = {"__name__": "__readme__"}
            exec(compile(text, f"README.md block {index + 1}", "exec"), scope)
            scopes.append(scope)
        elif lang == "bash" and runnable(text).strip():
            proc = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", runnable(text)], cwd=work, env=env,
                                  capture_output=True, text=True, timeout=900)
            assert proc.returncode == 0, f"README block {index + 1} failed:\n{text}\n{proc.stdout}\n{proc.stderr}"
            outputs.append(proc.stdout)
        timings.append((index + 1, lang, round(time.perf_counter() - t0, 1)))
    print("README blocks (index, language, seconds):", timings)

    pretrained, loaded = scopes[0], scopes[1]
    assert pretrained["logits"].shape == (2, 1000) and pretrained["features"].shape == (2, 2048)
    assert loaded["model"].config.num_classes == 1000
    convert_out, train_out = outputs
    assert "-> OK" in convert_out, convert_out
    assert (work / "resnet18.flax.safetensors").is_file() and (work / "resnet18_back.pth").is_file()
    assert (work / "runs" / "shapes" / "metrics.jsonl").is_file()
    predictions = [line for line in train_out.splitlines() if re.match(r"\s+\d\. ", line)]
    assert len(predictions) == 5, train_out  # top-5 of the five shape classes


def model_table() -> list[list[str]]:
    section = README.split("## Models", 1)[1].split("\n## ", 1)[0]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in section.splitlines() if line.startswith("| `")]
    assert rows
    return rows


def test_model_table_is_the_code():
    """The README's table lists every model, with its parameter count and its default weights' accuracy."""
    import jax
    from flax import nnx

    import resnet_flax

    rows = model_table()
    names = [r[0].strip("`") for r in rows]
    assert sorted(names) == sorted(resnet_flax.list_models())
    for name, (_, _, params, top1) in zip(names, rows):
        try:
            weights = resnet_flax.get_weights(name, "DEFAULT")
        except Exception:  # timm's variants: no torchvision weights, count the parameters here
            model = nnx.eval_shape(lambda name=name: resnet_flax.create_model(name))
            count = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
            assert top1.startswith("timm's"), (name, top1)
        else:
            count = weights.meta["num_params"]
            assert top1 == f"{weights.meta['_metrics']['ImageNet-1K']['acc@1']:.3f}", (name, top1)
        assert params == f"{count / 1e6:.1f}M", (name, params, count)


def test_links_resolve():
    """Every relative link of README.md and docs/ points at a file of the repository."""
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" not in target:
                assert (page.parent / target).exists(), f"{page.name}: {target}"


def test_cached_file_name_is_the_documented_layout():
    """The test above seeds the cache as documented (converted/NAME.flax.safetensors); the guard against drift."""
    docs = (REPO / "docs" / "models-and-weights.md").read_text()
    assert "converted/resnet50-11ad3fa6.flax.safetensors" in docs
    import resnet_flax

    assert resnet_flax.ResNet50_Weights.DEFAULT.url.endswith("/resnet50-11ad3fa6.pth")
