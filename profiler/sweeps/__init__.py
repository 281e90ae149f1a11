"""Running many cases: TOML matrices, the subprocess-per-case sweep and the one-call
campaign of persistent workers."""
