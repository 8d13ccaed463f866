"""The Python client as the CLI, the demo, training and the tests use it: the slim `hmi_client.HMIClient`
(grpcio and protobuf only; clients/python) plus what needs numpy, PLOT lookups for `hmi tenant train`.

`from hmi.client import HMIClient` keeps working; programs that only call the API can depend on the slim
package alone. Retries on UNAVAILABLE and request ids for writes come from the slim client."""
from __future__ import annotations

import numpy as np

from hmi_client import HMIClient as SlimClient
from hmi_client import Prediction, is_serving
from hmi_client.errors import translated
from services.knowledge_store.client import lookup_request, read_lookup_stream

__all__ = ["HMIClient", "Prediction", "is_serving"]


class HMIClient(SlimClient):
    def lookup(self, domain: str, sequences: list[np.ndarray]) -> list[np.ndarray]:
        """PLOT vectors (fp16 [len, hidden]) of each token-id sequence, as compute would receive them."""
        offsets = np.concatenate([[0], np.cumsum([len(s) for s in sequences])]).astype(np.int64)
        request = lookup_request(domain, np.concatenate(sequences), offsets)
        with translated():
            reply = self._retrying(lambda left: read_lookup_stream(self.admin.Lookup(request, timeout=left)))
        return [reply.vectors[offsets[i]:offsets[i + 1]] for i in range(len(sequences))]
