"""Everything that calls Ray."""
