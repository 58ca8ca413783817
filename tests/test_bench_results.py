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
    assert common.result_stem("preference-") == f"preference-{date.today().isoformat()}-intel-6-106"


def test_a_cpuinfo_without_vendor_family_and_model_names_the_architecture():
    tag = common.cpu_tag("processor\t: 0\nBogoMIPS\t: 50.00\n")
    assert tag and "-" not in tag
