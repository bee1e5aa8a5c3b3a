"""``cryodask demo`` (filled in below)."""
