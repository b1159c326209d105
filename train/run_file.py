"""``run.json``: the model structure, class names and flags of a training run, and the resume check."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path, PurePath
from typing import Any

from resnet_flax.model import ResNetConfig
from resnet_flax.registry import arch_name
from train import recipes
from train.config import TrainConfig
from train.errors import RunError
from train.storage import AnyPath, as_path, atomic_write

RUN_FILE = "run.json"  # model config + class names: what predict needs to rebuild the model


def read_run_file(workdir: AnyPath) -> dict[str, Any]:
    """The ``run.json`` of ``workdir``: ``model`` (a ResNetConfig dict), ``class_names``, ``dtype``, ``flags`` and,
    with ``--recipe``, ``recipe`` (the preset, the values it set, those overridden)."""
    return json.loads((as_path(workdir) / RUN_FILE).read_text())


def flags_of(cfg: TrainConfig) -> dict[str, Any]:
    """``cfg`` as JSON-ready values (paths and URLs as strings)."""
    return {k: (str(v) if isinstance(v, PurePath) else v) for k, v in dataclasses.asdict(cfg).items()}


def write_run_file(cfg: TrainConfig, model_config: ResNetConfig, class_names: list[str],
                   changed: dict[str, tuple[Any, Any]] | None = None, step: int = 0) -> None:
    """Write ``run.json`` for predict and for resume checks; ``changed`` flags (allowed on resume at ``step``)
    are appended to its ``flag_changes`` history, so nothing is rewritten silently."""
    path = cfg.workdir / RUN_FILE
    history = read_run_file(cfg.workdir).get("flag_changes", []) if path.exists() else []
    if changed:
        history.append({"step": step, "changed": {k: list(v) for k, v in changed.items()}})
    record = {"model": model_config.to_dict(), "class_names": class_names, "dtype": cfg.dtype, "flags": flags_of(cfg)}
    if cfg.recipe is not None:
        record["recipe"] = recipes.describe(cfg.recipe, record["flags"])
    if history:
        record["flag_changes"] = history
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1)))


def check_same_run(cfg: TrainConfig, class_names: list[str]) -> dict[str, tuple[Any, Any]]:
    """The run-defining flags whose values differ from the workdir's run (allowed by --allow-changed-flags).

    Refused in one line: any such change without that flag, and always a change the checkpoint cannot take
    (another architecture, optimizer or class list).
    """
    if not (cfg.workdir / RUN_FILE).exists():
        return {}
    try:
        run = read_run_file(cfg.workdir)
        old, old_arch = run["flags"], arch_name(ResNetConfig.from_dict(run["model"]))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RunError(f"{cfg.workdir / RUN_FILE} is unreadable or damaged ({type(e).__name__}: {e}); "
                       "use a new --workdir") from None
    new = flags_of(cfg)
    kinds = {f.name: f.metadata["on_resume"] for f in dataclasses.fields(TrainConfig)}
    changed = {k: (old[k], new[k]) for k in new if kinds[k] != "free" and k in old and old[k] != new[k]}
    fixed = {k: v for k, v in changed.items() if kinds[k] == "fixed"}
    if cfg.arch is None or cfg.arch == old_arch:  # the model comes from run.json: only an explicit other --arch
        fixed.pop("arch", None)
        changed.pop("arch", None)
    if run.get("class_names") != class_names:
        fixed["classes"] = (_short(run.get("class_names")), _short(class_names))
    if fixed:
        raise RunError(f"{cfg.workdir} holds a run whose {describe_changes(fixed)} cannot change on resume (its "
                       "checkpoints depend on it); use a new --workdir or the original flags and data")
    if changed and not cfg.allow_changed_flags:
        raise RunError(f"{cfg.workdir} holds a run with other settings ({describe_changes(changed)}); rerun with the "
                       "original flags, pass --allow-changed-flags to resume with the new values, or use a new "
                       "--workdir")
    return changed


def describe_changes(changed: dict[str, tuple[Any, Any]]) -> str:
    """``--lr 0.001 -> 0.002, ...``"""
    return ", ".join(f"{'--' + k.replace('_', '-') if k != 'classes' else 'classes'} {a} -> {b}"
                     for k, (a, b) in changed.items())


def _short(names: Any) -> str:
    names = list(names or [])
    return "[" + ", ".join(map(str, names[:5])) + (f", ... ({len(names)})" if len(names) > 5 else "") + "]"
