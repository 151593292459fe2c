"""tandem.client."""
