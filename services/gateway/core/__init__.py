"""The gateway's core: what a request does, whichever door it came through.

Plain Python with plain request and result records; failures are HMIErrors. Who is calling, until when, and
whether the caller is still there arrive as a `Call` (call.py). The gRPC servicers (services/gateway/servicer.py)
and the HTTP doors (services/gateway/http/) only translate their transport's requests into these calls and the
results and errors back; none of them holds logic of its own.

- inference.py: Classify, Embed, Generate, chat prompts and tokenising, for tenants of every model;
- admin.py: domains, tenants, keys, limits and backups, proxied to the knowledge store with the caller's scope;
- lanes.py: what the gateway holds per base model (an encoder lane or a decoder lane).
"""
