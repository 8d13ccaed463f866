"""The Python client as the CLI, the demo, training and the tests use it: the slim `hmi_client.HMIClient`
(grpcio and protobuf only; clients/python) plus what needs numpy, PLOT lookups for `hmi tenant train`.

`from hmi.client import HMIClient` keeps working; programs that only call the API can depend on the slim
package alone. Retries on UNAVAILABLE and request ids for writes come from the slim client."""
from __future__ import annotations

import numpy as np

from hmi_client import HMIClient as SlimClient
from hmi_client import Prediction, is_serving
from hmi_client.errors import translated
from hmi_client.v1 import catalog_pb2 as catalog
from services.knowledge_store.client import lookup_request, read_lookup_stream

__all__ = ["HMIClient", "Prediction", "is_serving"]


class HMIClient(SlimClient):
    def lookup(self, domain: str, sequences: list[np.ndarray], bridged: bool = False) -> list[np.ndarray]:
        """PLOT vectors (fp16 [len, hidden]) of each token-id sequence; `bridged`: through the domain's bridge
        when it has one (fp32), exactly what compute's upper layers receive."""
        offsets = np.concatenate([[0], np.cumsum([len(s) for s in sequences])]).astype(np.int64)
        request = lookup_request(domain, np.concatenate(sequences), offsets)
        with translated():
            reply = self._retrying(lambda left: read_lookup_stream(self.admin.Lookup(request, timeout=left)))
        rows = [reply.vectors[offsets[i]:offsets[i + 1]] for i in range(len(sequences))]
        if not bridged or not reply.bridge_revision:
            return rows
        from models.bridge import bridge_rows
        return bridge_rows(self.bridge(domain, reply.bridge_revision, reply.vectors.shape[1]), rows)

    def bridge(self, domain: str, revision: int, hidden: int):
        """The domain's bridge module (models/bridge.py), fetched once per revision."""
        from models.bridge import parse_bridge
        cache = self.__dict__.setdefault("_bridges", {})
        if (domain, revision) not in cache:
            request = catalog.GetBridgeRequest(domain=domain, revision=revision)
            with translated():
                data = self._retrying(lambda left: b"".join(chunk.data for chunk in
                                                            self.admin.GetBridge(request, timeout=left)))
            cache[(domain, revision)] = parse_bridge(data, hidden)
        return cache[(domain, revision)]
