"""Site side: export (and, with a later issue, local training)."""
