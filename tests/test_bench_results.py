import sys
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import common  # noqa: E402

INTEL = "processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 106\nmodel name\t: Intel(R) Xeon(R)\n"
AMD = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\nmodel name\t: AMD EPYC\n\n" \
      "processor\t: 1\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\n"


def test_result_names_tell_cpus_apart_on_one_day(monkeypatch):
    assert common.cpu_tag(INTEL) == "intel-6-106"
    assert common.cpu_tag(AMD) == "amd-25-17"
    monkeypatch.setattr(common, "cpu_tag", lambda: "intel-6-106")
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    assert common.result_stem("preference-") == f"preference-{date.today().isoformat()}-intel-6-106"


def test_a_run_with_onednn_capped_is_named_apart_and_a_second_run_never_overwrites_the_first(monkeypatch, tmp_path):
    monkeypatch.setattr(common, "cpu_tag", lambda: "amd-25-17")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_VNNI")
    stem = f"{date.today().isoformat()}-amd-25-17-onednn-avx512_core_vnni"
    first = common.new_result(folder=tmp_path)
    assert first == tmp_path / stem
    Path(f"{first}.md").write_text("first run", encoding="utf-8")
    second = common.new_result(folder=tmp_path)
    assert second == tmp_path / f"{stem}-2"
    assert common.new_result("serve-", (".md",), folder=tmp_path) == tmp_path / f"serve-{stem}"
    assert (tmp_path / f"{stem}.md").read_text(encoding="utf-8") == "first run"


def test_a_cpuinfo_without_vendor_family_and_model_names_the_architecture():
    tag = common.cpu_tag("processor\t: 0\nBogoMIPS\t: 50.00\n")
    assert tag and "-" not in tag
