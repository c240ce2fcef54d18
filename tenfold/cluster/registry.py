"""What every replica of one cluster must agree on, in one Ray actor: the replicas' engine URLs (admin calls that
reach every replica), adapter paths given at runtime (a replica that loads the name later uses the same files),
pinned names (a replica started later pins them too; Serve's evictions never unload them), and each replica's engine
process group (node, group id): stopping the cluster stops what a replica did not stop itself."""

from __future__ import annotations

REGISTRY_NAME = "tenfold-registry"
REGISTRY_NAMESPACE = "tenfold"  # Serve runs replicas in a namespace of its own: they look the registry up here


class ClusterRegistry:
    def __init__(self, pins: list[str]):
        self._replicas: dict[str, str] = {}
        self._paths: dict[str, str] = {}
        self._pins: set[str] = set(pins)
        self._engines: dict[str, tuple[str, int]] = {}

    def add_replica(self, replica_id: str, url: str) -> None:
        self._replicas[replica_id] = url

    def remove_replica(self, replica_id: str) -> None:
        self._replicas.pop(replica_id, None)

    def replicas(self) -> dict[str, str]:
        return dict(self._replicas)

    def add_engine(self, replica_id: str, node_id: str, pgid: int) -> None:
        self._engines[replica_id] = (node_id, pgid)

    def remove_engine(self, replica_id: str) -> None:
        self._engines.pop(replica_id, None)

    def engines(self) -> dict[str, tuple[str, int]]:
        return dict(self._engines)

    def path_of(self, name: str) -> str | None:
        return self._paths.get(name)

    def set_path(self, name: str, path: str | None) -> None:
        if path is None:
            self._paths.pop(name, None)
        else:
            self._paths[name] = path

    def pins(self) -> list[str]:
        return sorted(self._pins)

    def set_pin(self, name: str, pinned: bool) -> None:
        if pinned:
            self._pins.add(name)
        else:
            self._pins.discard(name)
