"""Server side: ingest (and, with a later issue, synthesis and distillation)."""
