"""Test-support layer: real upstream registries, token issuer, deterministic images."""
