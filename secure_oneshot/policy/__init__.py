"""Policies: what may leave a site (export) and what a server accepts (ingest)."""
