"""tandem.stages."""
