"""Model weights and builders: resolved offline from local files, loaded once per worker."""
