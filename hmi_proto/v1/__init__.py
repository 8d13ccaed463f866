"""Generated stubs of protos/hmi/v1/*.proto (wire package `hmi.v1`); do not edit, run `make protos`."""
