"""The benchmark's bookkeeping (no timing): case round-trips, contention rule, table arithmetic, CLI plan."""

from __future__ import annotations

from benchmarks.__main__ import batches_for, comparison_cases, lever_cases, parse_args, workloads
from benchmarks.config import FLAX_FAST_INFER, FLAX_FAST_TRAIN, YNN_OFF, Case, FlaxOptions, conv_lever_applies
from benchmarks.harness import Result, Sample, Timing
from benchmarks.report import comparison_rows, foreign_cpu, lever_rows


def test_case_json_round_trip_keeps_flax_options():
    case = Case("flax-fast", "flax", "resnet50", "infer", 16, flax=FLAX_FAST_INFER)
    back = Case.from_json(case.to_json())
    assert back == case
    assert dict(back.flax.cpu_compiler_options) == YNN_OFF and back.flax.fold_bn


def test_burst_rule_retries_bursts_but_not_a_steady_neighbour():
    timing = Timing(max_foreign=0.15, burst_margin=0.15)
    assert not timing.is_burst(0.10, [])
    assert not timing.is_burst(None, [0.5])
    assert timing.is_burst(0.60, [])  # nothing to compare with yet
    assert not timing.is_burst(0.55, [0.50, 0.48, 0.52])  # the usual level of this run
    assert timing.is_burst(0.90, [0.50, 0.48, 0.52])


def result(impl: str, seconds: list[float], batch: int = 8, foreign: float = 0.5, **ready) -> Result:
    framework = "torch" if impl.startswith("torch") else "flax"
    case = Case(impl, framework, "resnet18", "train", batch, flax=FlaxOptions())
    return Result(case, ok=True, samples=[Sample(s, foreign) for s in seconds], ready=ready,
                  memory={"peak_rss_mb": 1000.0, "device_peak_mb": None})


def test_comparison_row_uses_medians_and_ratios():
    group = [result("torch", [2.0, 4.0, 100.0]), result("flax", [8.0, 8.0, 8.0], compile_s=10.0),
             result("flax-fast", [1.0, 2.0, 3.0], compile_s=12.5)]
    assert group[0].images_per_s == 2.0  # median 4 s for 8 images
    header, rows = comparison_rows([group], with_compile=False)
    row = dict(zip(header, rows[0]))
    assert row["torch img/s"] == "2.0" and row["flax img/s"] == "1.0" and row["flax-fast img/s"] == "4.0"
    assert row["flax/torch"] == "0.50" and row["fast/torch"] == "2.00"
    assert row["compile s (flax, flax-fast)"] == "10.0, 12.5"
    assert row["other procs CPU"] == "50%"
    assert foreign_cpu(group) == 0.5


def test_failed_implementation_reads_na():
    failed = Result(Case("torch.compile", "torch", "resnet18", "train", 8), ok=False, error="boom")
    group = [result("torch", [1.0]), result("flax-fast", [0.5]), failed]
    header, rows = comparison_rows([group], with_compile=True)
    row = dict(zip(header, rows[0]))
    assert row["torch.compile img/s"] == "n/a" and row["fast/compile"] == "n/a"
    assert "flax img/s" not in row and "flax/torch" not in row  # no plain-Flax result: column dropped
    _, lever = lever_rows([[result("torch", [1.0]), result("plain", [2.0])]])
    assert [r[5:7] for r in lever] == [["1.00", "2.00"], ["0.50", "1.00"]]


def test_cli_plan():
    quick = parse_args(["--quick"])
    assert batches_for(quick, "resnet50", "train") == (8,)
    assert [c.impl for c in comparison_cases(quick, "resnet18", "infer", 8, "float32")] == ["torch", "flax-fast"]
    full = parse_args(["--batch", "4", "32", "--torch-compile"])
    assert batches_for(full, "resnet18", "train") == (4, 32)
    cases = comparison_cases(full, "resnet18", "train", 4, "float32")
    assert [c.impl for c in cases] == ["torch", "flax", "flax-fast", "torch.compile"]
    assert cases[2].flax == FLAX_FAST_TRAIN and cases[3].torch_compile
    levers = lever_cases(parse_args(["--levers", "ynn-off"]), "resnet18", "train", 8, "float32")
    assert [c.impl for c in levers] == ["torch", "plain", "ynn-off"]


def test_sweep_plan_and_conv_lever_column():
    sweep = parse_args(["--sweep"])
    assert workloads(sweep, "resnet50", "train") == [(32, 64), (64, 64), (112, 64), (224, 16)]
    # The conv lever changes the program only where the last stage's map is 2x2 or smaller (<= 64 px).
    assert [conv_lever_applies(s) for s in (32, 64, 65, 112, 224)] == [True, True, False, False, False]
    small = comparison_cases(sweep, "resnet18", "train", 64, "float32", 64)
    assert [c.impl for c in small] == ["torch", "flax-fast", "flax-fast-xlaconv"]
    assert small[1].flax.conv == "auto" and small[2].flax.conv == "xla"
    assert small[2].flax.cpu_compiler_options == small[1].flax.cpu_compiler_options
    assert [c.impl for c in comparison_cases(sweep, "resnet18", "train", 16, "float32", 224)] == ["torch", "flax-fast"]
    two_sizes = parse_args(["--image-size", "64", "96", "--batch", "4"])
    assert workloads(two_sizes, "resnet18", "infer") == [(64, 4), (96, 4)]
    group = [result("torch", [1.0]), result("flax-fast", [0.5]), result("flax-fast-xlaconv", [2.0])]
    header, rows = comparison_rows([group], with_compile=False)
    row = dict(zip(header, rows[0]))
    assert row["fast/torch"] == "2.00" and row["conv lever"] == "4.00" and row["px"] == "224"
    header, _ = comparison_rows([group[:2]], with_compile=False)
    assert "conv lever" not in header
    assert group[2].to_dict()["flax_options"]["conv"] == "auto" and group[0].to_dict()["flax_options"] is None


def test_pipeline_and_end_to_end_tables():
    from benchmarks.pipeline import summarise
    from benchmarks.report import end_to_end_rows, pipeline_rows

    rounds = [{"epoch_s": [3.0, 1.0, 1.0], "epoch_images": [96, 96, 96], "peak_rss_mb": 10.0},
              {"epoch_s": [2.0, 2.0, 2.0], "epoch_images": [96, 96, 96], "peak_rss_mb": 12.0}]
    grain = summarise(rounds)
    assert grain["steady_images_per_s"] == 72.0 and grain["first_epoch_s"] == 2.5  # median of 96 and 48
    assert "error" in summarise([{"error": "rc=1: boom"}])
    torch = {"steady_images_per_s": 48.0, "first_epoch_s": 4.0}
    header, rows = pipeline_rows({"rows": [{"num_workers": 2, "grain": grain, "torch": torch}]})
    row = dict(zip(header, rows[0]))
    assert row["grain/torch"] == "1.50" and row["grain-per-epoch img/s"] == "n/a"
    header, rows = end_to_end_rows({"summary": {"torch": {"wall_s": 86.0, "val_top1": 97.8},
                                                "flax": {"wall_s": 43.0, "val_top1": 98.3}}})
    assert [r[3] for r in rows] == ["1.00", "2.00"] and rows[1][2] == "98.30"
    summary = {"torch": {"wall_s": 172.0, "val_top1": 97.8}, "torch-in-memory": {"wall_s": 86.0, "val_top1": 97.5},
               "flax": {"wall_s": 129.0, "val_top1": 98.3}}
    header, rows = end_to_end_rows({"summary": summary})  # the fastest PyTorch script is the baseline
    assert [r[3] for r in rows] == ["0.50", "1.00", "0.67"]
    from benchmarks.results import end_to_end_rows as result_rows
    assert [r["impl"] for r in result_rows({"summary": summary})] == ["torch", "torch-in-memory", "flax"]
    assert [round(r["torch_wall_over_this"], 2) for r in result_rows({"summary": summary})] == [0.5, 1.0, 0.67]


def test_tpu_table_renders_the_committed_compiles_and_labels_what_was_not_measured():
    import json
    from pathlib import Path

    from benchmarks import tpu_table

    rows = json.loads((Path(__file__).resolve().parents[1] / "benchmarks/results/tpu_table.json").read_text())
    names = {v: k for k, v in tpu_table.SLICES.items()}
    single = [(names[r["topology"]], r) for r in rows if r["topology"] in names]
    pod = next(r for r in rows if r["topology"] == tpu_table.POD[2])
    text = tpu_table.markdown(single, pod)
    lines = text.splitlines()
    assert len([x for x in lines if x.startswith("| resnet")]) == len(single)
    for name, r in single:  # compiled for float32 batches (before runs fed uint8): marked, never silently mixed
        line = next(x for x in lines if x.startswith(f"| {r['arch']} | {name} "))
        assert ("†" in line) == (r["batch_dtypes"]["image"] != "uint8"), line
        assert ("(est.)" in line) == ("largest_fitting_batch" not in r), line  # an estimate says so
    assert "**Pod scale**" in text and f"{pod['global_batch']:,}" in text
    stale = {r["arch"] + r["topology"] for r in rows if r["batch_dtypes"] != tpu_table.batch_dtypes()}
    assert stale == {r["arch"] + r["topology"] for r in rows if r["batch_dtypes"]["image"] == "float32"}


def test_result_rows_render_as_the_tables(tmp_path):
    """What a benchmark command writes (rows + host) is what benchmarks.render turns into a table."""
    import json

    from benchmarks import render, results

    group = [result("torch", [1.0]), result("flax-fast", [0.5], compile_s=3.0), result("flax-fast-xlaconv", [2.0])]
    rows = results.model_rows([group])
    assert rows[0]["ratios"] == {"flax-fast/torch": 2.0, "conv_lever": 4.0} and rows[0]["other_cpu"] == 0.5
    rec = results.record("sweep", "python -m benchmarks --sweep", rows, settings={"measured": "float32"})
    assert rec["host"]["cores"] and "isa" in rec["host"] and rec["versions"]["jax"] and rec["date"]
    path = results.write(rec, tmp_path, tag="test-host")
    assert path.name == "sweep-test-host.json" and json.loads(path.read_text())["rows"] == json.loads(
        json.dumps(rows))
    text = render.render_file(path)
    assert "- **Command**: `python -m benchmarks --sweep`" in text and "- **Host**: " in text
    line = next(x for x in text.splitlines() if x.startswith("| resnet18"))
    assert "| 8.0 | 16.0 | **2.00** | 4.0x |" in line, line
    levers = results.lever_rows([[result("torch", [1.0]), result("plain", [2.0]), result("plain+x", [1.0])]])
    assert [r["vs_base"] for r in levers] == [None, None, 2.0]
    assert "2.00x (`plain`)" in render.levers_table(levers)
    page = f"a\n<!-- results: {path.relative_to(tmp_path)} -->\nstale\n<!-- /results -->\nb\n"
    new, used = render.render_page(page, root=tmp_path)
    assert used == {path.resolve()} and new.startswith("a\n<!-- results: ") and new.endswith("<!-- /results -->\nb\n")
    assert "stale" not in new and render.render_page(new, root=tmp_path)[0] == new


def test_host_tags_name_the_isa():
    from benchmarks.results import host_tag

    assert host_tag({"cpu": "AMD EPYC", "isa": ["avx", "avx2", "fma"], "cores": 2}) == "amd-epyc-avx2-2c"
    assert host_tag({"cpu": "Intel(R) Xeon(R) Platinum 8480+", "isa": ["avx2", "avx512f", "amx_tile"],
                     "cores": 8}) == "intel-r-xeon-r-platinum-8480-amx-8c"
    assert host_tag({"gpu": "NVIDIA H200", "cpu": "x", "cores": 16}) == "nvidia-h200"
    zen5 = {"cpu": "AMD EPYC", "cpu_family": 26, "cpu_model_number": 2, "isa": ["avx2", "avx512f"], "cores": 2}
    assert host_tag(zen5) == "amd-epyc-f26m2-avx512-2c"  # a name without a number gets the family and model


def test_committed_results_name_their_host_and_command():
    """Every committed result says where and how it was measured: a benchmark command, or the parity tests."""
    import json
    from pathlib import Path

    from benchmarks.results import KINDS

    files = sorted((Path(__file__).resolve().parents[1] / "benchmarks/results").glob("*-*.json"))
    assert files
    for path in files:
        rec = json.loads(path.read_text())
        assert rec["kind"] in KINDS and path.name.startswith(rec["kind"] + "-"), path.name
        measured_by = "python -m pytest" if rec["kind"].startswith("parity") else "python -m benchmarks"
        assert rec["command"].startswith(measured_by), path.name
        assert not rec["kind"].startswith("parity") or "tests/test_parity.py" in rec["command"], path.name
        host = rec["host"]
        assert host.get("gpu") or (host.get("cpu") and host.get("isa")), path.name
        assert rec["rows"] and rec["versions"], path.name


def test_docs_tables_are_rendered_from_the_committed_results():
    """docs/performance.md, docs/tpu-sizing.md and docs/parity.md are what `python -m benchmarks.render` makes of
    benchmarks/results/, and every result file appears in a page."""
    from benchmarks import render

    assert render.main(["--check"]) == 0, "run: python -m benchmarks.render"


def test_commands_write_result_files(tmp_path, monkeypatch):
    """`python -m benchmarks` and `python -m benchmarks.pipeline` write their result files (measuring faked)."""
    import json

    import benchmarks.__main__ as bench
    from benchmarks import pipeline

    def fake_measure(cases, timing, log):
        return [result(c.impl, [1.0 if c.framework == "torch" else 0.5], batch=c.batch) for c in cases]

    monkeypatch.setattr(bench, "measure", fake_measure)
    monkeypatch.setattr(bench, "has_gpu", lambda: False)
    argv = ["--arch", "resnet18", "--mode", "infer", "--batch", "4", "--quick", "--skip", "pipeline", "converter",
            "end-to-end", "--out", str(tmp_path / "all.json"), "--results-dir", str(tmp_path), "--results-tag", "t"]
    assert bench.main(argv) == 0
    rec = json.loads((tmp_path / "models-t.json").read_text())
    assert rec["command"] == "python -m benchmarks " + " ".join(argv)
    assert rec["rows"][0]["images_per_s"] == {"torch": 4.0, "flax-fast": 8.0} and rec["raw"]["results"]
    assert rec["settings"]["timed_calls"] == 3 and rec["host"]["cpu"]

    report = {"images": 4, "jpeg_sizes": "320-500 px", "batch_size": 2, "image_size": 32, "epochs": 3, "rounds": 1,
              "rows": [{"num_workers": 0, "grain": {"steady_images_per_s": 3.0, "first_epoch_s": 1.0},
                        "torch": {"steady_images_per_s": 2.0, "first_epoch_s": 2.0}}]}
    monkeypatch.setattr(pipeline, "run", lambda *a, **k: report)
    assert pipeline.main(["--rounds", "1", "--results-dir", str(tmp_path), "--results-tag", "t"]) == 0
    rec = json.loads((tmp_path / "pipeline-t.json").read_text())
    assert rec["rows"][0]["grain/torch"] == 1.5
    assert rec["command"].startswith("python -m benchmarks.pipeline --rounds 1")


def test_flax_train_workloads_run_the_real_train_step():
    """The Flax train workload compiles and calls train.steps' current train step (it measures nothing here)."""
    import jax

    from benchmarks import flax_work

    work = flax_work.build(Case("plain", "flax", "resnet10t", "train", 2, image_size=32, flax=FlaxOptions()))
    work.run()
    work.run()  # the donated state came back and is accepted again
    assert work.compile_s > 0 and work.device == str(jax.devices()[0])


def test_first_step_rows_and_table():
    from benchmarks.first_step import rows
    from benchmarks.render import TABLES

    report = {"command": "python -m train ...", "samples": {"cold/2": [24.5, 22.5], "warm/2": [8.33, 8.17, 8.42],
                                                            "warm/0": [6.82, 6.52]}}
    got = rows(report)
    assert [(r["cache"], r["workers"], r["median_s"]) for r in got] == [("cold", 2, 23.5), ("warm", 2, 8.33),
                                                                        ("warm", 0, 6.67)]
    text = TABLES["first-step"](got)
    assert "| warm | 2 processes | 8.33, 8.17, 8.42 | **8.3** |" in text and "cold (empty folder)" in text


def test_a_call_of_several_steps_counts_their_images():
    from benchmarks.config import Case
    from benchmarks.harness import Result, Sample

    case = Case("flax-fast", "flax", "resnet18", "train", batch=8, steps_per_call=3)
    assert Case.from_json(case.to_json()) == case  # it reaches the worker
    result = Result(case, True, samples=[Sample(0.5, None), Sample(0.6, None), Sample(0.4, None)])
    assert result.images_per_s == 8 * 3 / 0.5


def test_step_profile_rows_rank_kinds_and_sum_the_rest():
    from benchmarks.render import TABLES
    from benchmarks.step_profile import rows

    got = rows({"dot": 30.0, "transpose_copy_fusion": 60.0, "convolution": 6.0, "copy": 4.0}, top=2)
    assert [r["kind"] for r in got] == ["transpose_copy_fusion", "dot", "other (2 kinds)"]
    assert [r["ms_per_step"] for r in got] == [60.0, 30.0, 10.0] and abs(sum(r["share"] for r in got) - 1.0) < 1e-12
    assert "| `transpose_copy_fusion` | 60.0 | 60 % |" in TABLES["step-profile"](got)


def test_the_checkpointing_torch_script_keeps_the_last_three_epochs(tmp_path):
    import subprocess

    import numpy as np
    import torch
    from PIL import Image

    from benchmarks.end_to_end import ROOT, torch_impl_command

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for label in ("a", "b"):
            (tmp_path / "data" / split / label).mkdir(parents=True)
            for i in range(8):
                Image.fromarray(rng.integers(0, 256, (32, 32), np.uint8), mode="L").save(
                    tmp_path / "data" / split / label / f"{i}.png")
    command = torch_impl_command("torch-in-memory-checkpoints", tmp_path / "data", 4, None, tmp_path / "ckpt")
    assert "--in-memory" in command and "--checkpoint-dir" in command
    command[command.index("--batch-size") + 1] = "4"
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, timeout=300)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [f"checkpoint_{e}.pth" for e in (1, 2, 3)]
    saved = torch.load(tmp_path / "ckpt" / "checkpoint_3.pth", weights_only=True)
    assert saved["epoch"] == 3 and {"model", "optimizer", "lr_scheduler"} <= saved.keys()
    assert "--checkpoint-dir" not in torch_impl_command("torch-in-memory", tmp_path, 4, None, tmp_path / "ckpt")
