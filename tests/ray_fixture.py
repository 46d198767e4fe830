"""One local Ray instance per test module (2 CPUs, device resources), always shut down."""

from __future__ import annotations

import pytest

RAY_RESOURCES = {f"dev{i}": 8.0 for i in range(8)}


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'lcpc[ray]')")
    ray.init(num_cpus=2, resources=RAY_RESOURCES, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    try:
        yield ray
    finally:
        ray.shutdown()
