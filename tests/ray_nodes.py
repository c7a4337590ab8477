"""Adding a node to a `ray.cluster_utils.Cluster` on a loaded machine, and a cluster of shard hosts."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import ray
from ray.cluster_utils import Cluster

TRIES = 3


def add_node(cluster: Cluster, **args):
    """`cluster.add_node(**args)`, started again where its raylet did not register within Ray's fixed 30 s (a loaded
    2-core machine: "The current node timed out during startup"). A late raylet of a failed try still joins the
    cluster with the same resources, and is stopped when this process exits."""
    for attempt in range(TRIES):
        try:
            return cluster.add_node(**args)
        except Exception as e:
            if "timed out during startup" not in str(e) or attempt == TRIES - 1:
                raise
            print(f"add_node: try {attempt + 1} timed out; starting the node again")


@contextmanager
def host_cluster(hosts: int, **head) -> Iterator[Cluster]:
    """A head node (`head`: its node args) and `hosts` nodes of one CPU and one hire_host each, Ray connected to it;
    shut down on leaving."""
    cluster = Cluster(initialize_head=True, head_node_args=head)
    try:
        for _ in range(hosts):
            add_node(cluster, num_cpus=1, resources={"hire_host": 1})
        ray.init(address=cluster.address, include_dashboard=False)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
