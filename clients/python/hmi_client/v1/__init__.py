"""Generated stubs of the public protos (`make protos`); never edited by hand."""
