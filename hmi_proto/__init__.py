"""The wire protocol's Python stubs, generated from protos/ by `make protos` (protos/generate.py).

A package of its own, so services and clients import the protocol without importing each other.
"""
