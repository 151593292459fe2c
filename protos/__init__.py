"""tandem.protos."""
