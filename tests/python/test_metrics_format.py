"""tandem's Prometheus text (common/metrics.c) read by a real parser.

`test_metrics --dump` prints a registry with counters, gauges, histograms
(with and without labels), a callback gauge, a labelled family with no child
yet, escapes in help text and label values, and special floats; the
prometheus_client parser must read it back to exactly what was set.

Environment: TANDEM_BIN (its folder holds test_metrics; default
<repo>/build/bin/tandem). A missing test_metrics skips with the reason.
"""

import math
import os
import subprocess

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import REPO


@pytest.fixture(scope="module")
def families():
    tandem = os.environ.get("TANDEM_BIN") or os.path.join(REPO, "build", "bin", "tandem")
    path = os.path.join(os.path.dirname(tandem), "test_metrics")
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        pytest.skip("no test_metrics at %s (build it with `make`, or set TANDEM_BIN)" % path)
    text = subprocess.run([path, "--dump"], check=True, capture_output=True, text=True,
                          timeout=60).stdout
    assert text.endswith("\n")
    return {f.name: f for f in text_string_to_metric_families(text)}


def samples(family):
    return [(s.name, s.labels, s.value) for s in family.samples]


def test_counter_and_gauge(families):
    # The parser names a counter family without its _total suffix.
    f = families["vllm:prompt_tokens"]
    assert f.type == "counter" and f.documentation == "Prompt tokens processed."
    assert samples(f) == [("vllm:prompt_tokens_total", {}, 42.0)]
    f = families["vllm:num_requests_running"]
    assert f.type == "gauge"
    assert samples(f) == [("vllm:num_requests_running", {}, 3.0)]
    assert samples(families["tandem_kvstore_bytes_used"]) == [
        ("tandem_kvstore_bytes_used", {}, 1048576.0)]
    f = families["tandem_nohelp"]
    assert f.documentation == "" and samples(f) == [("tandem_nohelp_total", {}, 0.0)]


def test_escapes(families):
    f = families["tandem_pool_free_blocks"]
    assert f.documentation == "Free blocks \\ per pool.\nSecond line"
    assert samples(f) == [("tandem_pool_free_blocks", {"pool": "a\\b", "tier": 'q"x\ny'}, 1.5)]


def test_histograms(families):
    f = families["vllm:time_to_first_token_seconds"]
    assert f.type == "histogram"
    assert samples(f) == [
        ("vllm:time_to_first_token_seconds_bucket", {"le": "0.125"}, 2.0),
        ("vllm:time_to_first_token_seconds_bucket", {"le": "0.5"}, 3.0),
        ("vllm:time_to_first_token_seconds_bucket", {"le": "1"}, 3.0),
        ("vllm:time_to_first_token_seconds_bucket", {"le": "+Inf"}, 4.0),
        ("vllm:time_to_first_token_seconds_sum", {}, 2.4375),
        ("vllm:time_to_first_token_seconds_count", {}, 4.0),
    ]
    f = families["tandem_lat_seconds"]
    assert samples(f) == [
        ("tandem_lat_seconds_bucket", {"tier": "fast", "le": "1"}, 1.0),
        ("tandem_lat_seconds_bucket", {"tier": "fast", "le": "+Inf"}, 1.0),
        ("tandem_lat_seconds_sum", {"tier": "fast"}, 0.5),
        ("tandem_lat_seconds_count", {"tier": "fast"}, 1.0),
    ]


def test_family_without_children(families):
    f = families["tandem_errors"]
    assert f.type == "counter" and f.documentation == "Errors by kind." and f.samples == []


def test_floats_round_trip(families):
    got = {s.labels["v"]: s.value for s in families["tandem_special"].samples}
    assert math.isnan(got.pop("nan"))
    assert got == {
        "inf": math.inf,
        "ninf": -math.inf,
        "tenth": 0.1,
        "third": 1.0 / 3,
        "tiny": 5e-324,
        "big": 1.7976931348623157e308,
        "neg": -2.5e-7,
        "e21": 1e21,
    }
