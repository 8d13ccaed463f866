"""The gateway's HTTP doors, served by uvicorn inside the gateway process: an OpenAI-compatible API
(openai_api.py), /v1/classify (hmi_api.py), the Open Inference Protocol of KServe and Triton (kserve.py), Text
Embeddings Inference's routes (tei.py), /health, /ready and /metrics (app.py).

Every door calls the gateway's core (services/gateway/core) exactly as the gRPC servicers do, so validation,
the tenant directory, the batcher, the router and the errors are the same through every door; a door only
translates its protocol (door.py: calling the core off the event loop; errors.py: one HTTP status per error
code)."""
