"""Client authentication: credentials, the gate's tokens, login limits, upload ids."""
