"""``--recipe NAME``: every preset flag is a flag, the docs' tables are the presets, explicit flags win, the
effective learning rate is the published one at the published batch, and a run records what the preset set."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from train import recipes
from train.config import TrainConfig, build_parser, parse_config
from train.steps import OptimConfig

DOCS = Path(__file__).resolve().parent.parent / "docs" / "training.md"
PUBLISHED_LR = {"tv-resnet50-v2": (0.5, 1024), "rsb-a1": (5e-3, 2048), "rsb-a2": (5e-3, 2048),
                "rsb-a3": (8e-3, 2048)}


def test_docs_tables_are_the_presets_and_every_value_is_a_flag_with_a_source():
    docs = DOCS.read_text()
    assert re.findall(r"^### `([a-z0-9-]+)`", docs.split("## Recipe presets")[1].split("\n## ")[0],
                      re.M) == list(recipes.RECIPES)
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for name, recipe in recipes.RECIPES.items():
        assert recipes.markdown_table(name) in docs, name
        for key, setting in recipe.settings.items():
            assert key in fields, (name, key)
            assert fields[key].metadata["group"] != "run", (name, key)  # recipe flags define the run
            assert all(src in recipes.SOURCES for src in setting.source.split(", ")), (name, key)
        assert recipes.markdown_table(name).count("\n") == len(recipe.settings) + 1
    for key in recipes.SOURCES:
        assert f"**{key}**" in docs


@pytest.mark.parametrize("name", list(recipes.RECIPES))
def test_preset_sets_its_values_and_the_peak_lr_is_the_published_one_at_its_batch(name):
    cfg = parse_config(["--recipe", name])
    for key, setting in recipes.RECIPES[name].settings.items():
        assert getattr(cfg, key) == setting.value, key
    lr, batch = PUBLISHED_LR[name]
    assert cfg.batch_size == batch
    assert OptimConfig.for_run(cfg, 100, 10).lr == pytest.approx(lr, rel=1e-12)
    assert OptimConfig.for_run(cfg, 100, 10).warmup_steps == 5 * 10  # 5 warm-up epochs of 10 steps


def test_flags_given_override_the_preset():
    cfg = parse_config(["--recipe", "rsb-a3", "--batch-size", "16", "--lr", "0.01", "--epochs", "3",
                        "--model-ema", "--ra-magnitude", "9"])
    assert (cfg.batch_size, cfg.lr, cfg.epochs, cfg.model_ema, cfg.ra_magnitude) == (16, 0.01, 3, True, 9)
    assert (cfg.optimizer, cfg.loss, cfg.image_size) == ("lamb", "bce", 160)  # the rest is the preset's
    explicit_default = parse_config(["--recipe", "tv-resnet50-v2", "--label-smoothing", "0.1", "--image-size", "224"])
    assert explicit_default.image_size == 224  # given on the command line, even at its default value
    assert parse_config(["--recipe", "tv-resnet50-v2", "--init-from", "x.pth"]).arch is None
    warm = parse_config(["--recipe", "tv-resnet50-v2", "--warmup-steps", "7"])
    assert (warm.warmup_steps, warm.lr_warmup_epochs) == (7, None)


def test_warmup_given_twice_is_refused_in_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(["--warmup-steps", "3", "--lr-warmup-epochs", "1"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "--lr-warmup-epochs" in err


def test_help_lists_each_preset_and_its_flags():
    text = build_parser().format_help()
    for name, recipe in recipes.RECIPES.items():
        assert f"  {name}: {recipe.title}" in text
    assert "--ra-reps 4" in text and "--optimizer lamb" in text


def test_run_file_and_start_line_record_what_the_preset_set(tmp_path):
    import resnet_flax
    from train.run_file import flags_of, read_run_file, write_run_file

    cfg = dataclasses.replace(parse_config(["--recipe", "rsb-a2", "--batch-size", "32"]), workdir=tmp_path)
    write_run_file(cfg, resnet_flax.create_model("resnet10t", num_classes=2).config, ["a", "b"])
    recorded = read_run_file(tmp_path)["recipe"]
    assert recorded["name"] == "rsb-a2" and recorded["overridden"] == {"batch_size": {"recipe": 2048, "used": 32}}
    assert recorded["set"]["optimizer"] == "lamb"
    assert len(recorded["set"]) == len(recipes.RECIPES["rsb-a2"].settings) - 1
    json.dumps(recorded)
    line = recipes.summary("rsb-a2", flags_of(cfg))
    assert line.startswith("recipe rsb-a2 (") and "--optimizer lamb" in line
    assert line.endswith("overridden: --batch-size 32 (recipe: 2048)")
