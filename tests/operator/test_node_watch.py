"""NodeWatch's judgment of Leases on a real API server: one its agent could not renew while the API
was away is not taken for a dead node until the agent has had a lease duration to renew it; one
renewed by an agent whose clock runs behind is live while renewals are seen; and a read the API held
for seconds counts as the API having been away."""
import datetime as dt
import threading
import time

import pytest

from consortium import kube, testbed

pytestmark = pytest.mark.k8s


def test_a_lease_left_unrenewed_while_the_api_was_away_is_not_a_dead_node(cluster):
    from kubernetes import client, config

    from consortium_operator import failover

    ns, node, duration = "node-watch", "away", 6
    cluster.kubectl("create", "namespace", ns, check=False)
    old = client.Configuration.get_default_copy()
    config.load_kube_config(config_file=cluster.kubeconfig)
    try:
        kube.coordination().create_namespaced_lease(ns, {
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": kube.lease_name(node)},
            "spec": {"holderIdentity": node, "leaseDurationSeconds": duration,
                     "renewTime": kube.micro_time(kube.now() - dt.timedelta(seconds=60))}})
        watch = failover.NodeWatch(ns)
        assert watch._expired([node]) == [node]   # the API answered all along: its node is gone

        # Read all along from another thread (the cluster's processes die with the thread that
        # started them, so the restart stays on this one).
        reads, done = [], threading.Event()

        def read():
            while not done.is_set():
                reads.append((time.monotonic(), watch._expired([node])))
                time.sleep(0.1)
        reader = threading.Thread(target=read)
        reader.start()
        try:
            cluster.restart_apiserver(down_s=1.0)
            back = time.monotonic()   # up to a second or two after it first answered (/readyz comes later)
            time.sleep(duration - 3.0)
        finally:
            done.set()
            reader.join()
        # While the API was away, and for a lease duration after it answered again, the node is not
        # taken for dead: its agent could not renew.
        after = [expired for t, expired in reads if t > back]
        assert after and all(expired == [] for expired in after), [(round(t - back, 2), e) for t, e in reads]
        # Then it is, as before.
        testbed.wait_until(lambda: watch._expired([node]) == [node], 3 * duration, "the Lease to count again")
    finally:
        client.Configuration.set_default(old)


def test_an_agent_whose_clock_runs_behind_is_live_while_it_renews(cluster):
    """A Lease renewed every second by an agent whose clock is 60 s behind the operator's (a
    laptop's): by its renewTime it expired long ago at every renewal, and the node was failed over
    and never placed. Seen renewed, it is live; once no renewal is seen for its duration, dead. A
    Lease never renewed stays dead."""
    from kubernetes import client, config

    from consortium_operator import failover

    ns, duration, behind_s = "lease-clock", 3, 60.0
    cluster.kubectl("create", "namespace", ns, check=False)
    old = client.Configuration.get_default_copy()
    config.load_kube_config(config_file=cluster.kubeconfig)

    def renew(node: str, create: bool = False) -> None:
        spec = {"holderIdentity": node, "leaseDurationSeconds": duration,
                "renewTime": kube.micro_time(kube.now() - dt.timedelta(seconds=behind_s))}
        if create:
            kube.coordination().create_namespaced_lease(ns, {
                "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": kube.lease_name(node)}, "spec": spec})
        else:
            kube.coordination().patch_namespaced_lease(kube.lease_name(node), ns, {"spec": spec})
    try:
        renew("behind", create=True)
        renew("dead", create=True)
        watch = failover.NodeWatch(ns)
        # First look: nothing but the renewTimes to go by.
        assert sorted(watch._expired(["behind", "dead"])) == ["behind", "dead"]
        for _ in range(5):
            time.sleep(1.0)
            renew("behind")
            assert watch._expired(["behind", "dead"]) == ["dead"]
        stopped = time.monotonic()
        testbed.wait_until(lambda: watch._expired(["behind"]) == ["behind"], 3 * duration,
                           "the Lease to count as expired once not renewed")
        assert time.monotonic() - stopped >= duration - 1.0
    finally:
        client.Configuration.set_default(old)


def test_a_read_held_for_seconds_gives_the_agents_a_lease_duration_to_renew():
    """An API server that hung answers the LIST it held once it goes on: the agents' renewals hung
    with it, so the Leases it returns are as old as the hang. Judged at once, a hang longer than a
    lease duration would fail every node over; a read that took over SLOW_ANSWER_S counts as the
    API having been away."""
    from kubernetes import client

    clock = kube.LeaseClock()
    lease = client.V1Lease(metadata=client.V1ObjectMeta(name="n", namespace="ns"),
                           spec=client.V1LeaseSpec(lease_duration_seconds=10,
                                                   renew_time=kube.now() - dt.timedelta(seconds=12)))
    clock.reachable(took_s=0.01)
    assert clock.expired(lease)   # answered at once: not renewed for longer than its duration
    clock.reachable(took_s=clock.SLOW_ANSWER_S + 10)
    assert not clock.expired(lease)
