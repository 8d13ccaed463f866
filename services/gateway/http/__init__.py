"""The gateway's HTTP front door: an OpenAI-compatible API (/v1/models, /v1/embeddings, /v1/completions,
/v1/chat/completions), /v1/classify, /health, /ready and OpenAPI docs at /docs, served by uvicorn inside the
gateway process.

Every request runs through the gRPC servicers' own methods, called in process with a call context of this
package (calls.py): both doors share one request path, so validation, the tenant directory, the batcher,
the router and the status codes are the same, and so will be any check a servicer makes (authentication
once it exists; the HTTP side's one hook for it is auth.py)."""
