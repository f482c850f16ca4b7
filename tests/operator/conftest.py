"""A control plane with the chart's RBAC, three registered and approved agents (Test Case v1's
labels) and the operator, all as processes with their ServiceAccounts' tokens; plus the
single-node baseline the distributed tokens must equal."""
from __future__ import annotations

import pytest

from consortium import testbed

MAX_TOKENS = testbed.TEST_MAX_TOKENS


@pytest.fixture(scope="session")
def bed(cluster, tmp_path_factory):
    b = testbed.Testbed(cluster, tmp_path_factory.mktemp("bed"), threads=1)
    b.install()
    try:
        for name, labels in testbed.NODE_LABELS.items():
            b.start_agent(name, labels)
        b.approve(*testbed.NODE_LABELS)
        b.start_operator()
        yield b
    finally:
        b.close()


@pytest.fixture(scope="session")
def baseline():
    from consortium import kubecase

    prompt = testbed.sky_is_blue(MAX_TOKENS)["spec"]["prompt"]
    return kubecase.baseline(MAX_TOKENS, prompt, threads=1).tokens
