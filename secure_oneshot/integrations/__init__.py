"""Adapters to federated platforms that move bundles; they call the same export and ingest code and add no policy.

Each adapter lives in its own subpackage with its platform as an optional extra (``pip install -e ".[flower]"``);
nothing in the core imports them.
"""
