"""tandem.emulator."""
