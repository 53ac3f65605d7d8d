"""sslcompress.runtime.cpu: the CPU's name and vector extensions, read from /proc/cpuinfo text."""

from __future__ import annotations

from sslcompress.runtime.cpu import ISA_FLAGS, cpu_isa, cpu_model, has_vnni

AVX2_HOST = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC
flags\t\t: fpu vme sse2 avx fma avx2 bmi2 sha_ni
processor\t: 1
model name\t: AMD EPYC
flags\t\t: fpu vme sse2 avx fma avx2 bmi2 sha_ni
"""

VNNI_HOST = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: avx2 fma avx512f avx512bw avx512_vnni avx_vnni amx_bf16 amx_int8 amx_tile
"""


def test_model_name_and_extensions_of_an_avx2_host():
    assert cpu_model(AVX2_HOST) == "AMD EPYC"
    assert cpu_isa(AVX2_HOST) == ("avx2", "fma")
    assert not has_vnni(AVX2_HOST)


def test_extensions_of_a_vnni_host_in_a_fixed_order():
    assert cpu_isa(VNNI_HOST) == ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8",
                                  "amx_bf16")
    assert has_vnni(VNNI_HOST)
    assert has_vnni("flags\t: avx2 avx_vnni\n")  # AVX-VNNI alone (client CPUs) counts


def test_no_cpuinfo_gives_a_name_and_no_extensions():
    assert cpu_model("") and isinstance(cpu_model(""), str)
    assert cpu_isa("") == ()
    assert not has_vnni("")


def test_this_host_reads_consistently():
    isa = cpu_isa()
    assert set(isa) <= set(ISA_FLAGS)
    assert has_vnni() == any("vnni" in f for f in isa)
    assert cpu_model()
