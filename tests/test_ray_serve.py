"""Serve on Ray: warm actors answer a stream; an actor killed mid-stream fails one request,
named by id and device, within the timeout; the actor is rebuilt and the next request succeeds."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest

from conftest import EXAMPLE, run_folder
from lcpc.pipeline import convert as convert_model
from ray_fixture import local_ray  # noqa: F401 - the module-scoped fixture

pytest.importorskip("ray", reason="Ray is not installed (pip install 'lcpc[ray]')")

from lcpc.runtime.deployment import Deployment, Request  # noqa: E402


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("serve") / "digits"
    convert_model(EXAMPLE, out, 4, "none")
    return out


def test_killed_actor_fails_one_request_then_recovers(local_ray, folder):  # noqa: F811
    x = np.load(EXAMPLE.parent / "sample.npy")[:6]
    want, _, _ = run_folder(folder, {"input": x})
    with Deployment(folder, "ray", timeout=30) as dep:
        def stream():
            for i in range(6):
                if i == 3:  # the actor of dev2 dies between requests 2 and 3
                    os.kill(dep.engine.actor_pid(2), signal.SIGKILL)
                yield Request(f"req-{i}", {"input": x[i:i + 1]})

        answers = {}
        report = dep.serve(stream(), on_result=lambda rid, out, _: answers.__setitem__(rid, out))
    assert [f.request for f in report.failures] == ["req-3"]
    failure = report.failures[0]
    assert "request req-3" in failure.message and "dev2" in failure.message, failure.message
    assert failure.rebuilt == ("dev2",)
    assert report.answered == 5
    for i in (0, 1, 2, 4, 5):
        np.testing.assert_allclose(answers[f"req-{i}"]["logits"], want["logits"][i:i + 1], rtol=1e-5, atol=1e-5)


def test_python_calls_and_percentiles(local_ray, folder):  # noqa: F811
    x = np.load(EXAMPLE.parent / "sample.npy")[:4]
    want, _, _ = run_folder(folder, {"input": x})
    with Deployment(folder, "ray", timeout=30) as dep:
        np.testing.assert_allclose(dep(x)["logits"], want["logits"], rtol=1e-5, atol=1e-5)
        report = dep.serve(x[i:i + 1] for i in range(4))
    assert report.answered == 4 and not report.failures
    assert report.percentile(50) <= report.percentile(99)
    data = report.as_dict()
    assert set(data) >= {"p50_ms", "p90_ms", "p99_ms", "throughput_per_s"}
