"""Adding a node to a `ray.cluster_utils.Cluster` on a loaded machine."""
from __future__ import annotations

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
