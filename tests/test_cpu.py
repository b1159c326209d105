"""The host CPU's description (resnet_flax.cpu), which the compilation cache's folder and the benchmark results name."""

from __future__ import annotations

from resnet_flax import cpu

ZEN4 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC
flags\t\t: fpu sse4_2 avx avx2 fma avx512f avx512dq avx512bw avx512_vnni avx512_bf16

processor\t: 1
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: Some other name
flags\t\t: fpu
"""
ZEN1 = ZEN4.replace("25", "23").replace("17", "1").replace(" avx512f avx512dq avx512bw avx512_vnni avx512_bf16", "")
ARM = "processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd sve\nCPU part\t: 0xd40\n"


def test_cpuinfo_is_parsed_from_the_first_processor():
    zen4 = cpu.parse(ZEN4, "x86_64")
    assert zen4.model == "AMD EPYC" and (zen4.family, zen4.model_number) == (25, 17)
    assert zen4.has("avx512f", "avx512_bf16") and not zen4.has("amx_tile") and "fpu" in zen4.flags
    zen1 = cpu.parse(ZEN1, "x86_64")
    assert (zen1.family, zen1.model_number) == (23, 1) and zen1.has("avx2") and not zen1.has("avx512f")
    arm = cpu.parse(ARM, "aarch64")
    assert arm.family is None and arm.has("asimd", "sve") and arm.model == "0xd40"
    assert cpu.parse("").flags == frozenset()


def test_compile_cache_folder_and_result_files_name_the_cpu(monkeypatch):
    """Two CPUs of one model name but different ISAs get different cache folders; results record family/model."""
    from benchmarks import render, results
    from train import compile_cache

    keys = []
    for text in (ZEN4, ZEN1):
        monkeypatch.setattr(cpu, "host", lambda text=text: cpu.parse(text, "x86_64"))
        keys.append(compile_cache.host_key())
    assert keys[0] != keys[1]
    host = results.host()  # ZEN1's, as faked last
    assert (host["cpu"], host["cpu_family"], host["cpu_model_number"]) == ("AMD EPYC", 23, 1)
    assert host["isa"] == ["sse4_2", "avx", "avx2", "fma"]
    assert render.host_line(host).startswith("AMD EPYC (family 23, model 1), ")
    assert results.host_tag({**host, "cores": 2}) == "amd-epyc-f23m1-avx2-2c"  # "AMD EPYC" names every generation
