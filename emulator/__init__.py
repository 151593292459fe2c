"""tandem.emulator: Offsite-Tuning emulators (uniform layer drop, distillation, the package and its loader)."""
