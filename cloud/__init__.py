"""tandem.cloud."""
