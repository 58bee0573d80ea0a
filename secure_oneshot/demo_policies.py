"""The demo's two policy files: the sites' export policy and the server's ingest policy, as TOML text.

Same shape as ``policies/research-study.toml``; the key ids are the demo's freshly generated identities."""

from __future__ import annotations

from datetime import timedelta

from ._internal.encoding import format_time, utc_now
from .keys import Identity

__all__ = ["export_policy_text", "ingest_policy_text"]


def export_policy_text(ids: dict[str, Identity]) -> str:
    now = utc_now()
    effective, expires = format_time(now - timedelta(days=1)), format_time(now + timedelta(days=30))
    return f'''# Site export policy written by `secure-oneshot demo` (same shape as policies/research-study.toml).
schema = "secure-oneshot/site-export-policy/v1"
id = "demo/site-export"
version = 1
owner = "Demo research data office"
effective = {effective}
expires = {expires}

[study]
title = "secure-oneshot demo (simulated hospitals)"
irb = "none (public MedMNIST data)"
dua = "none (CC BY 4.0 data)"

[approval]
required = 1
approvers = ["{ids['dpo'].key_id}"]  # dpo

[recipients]
allowed = ["{ids['server'].key_id}"]  # server

[artifacts]
classifier = "allow"
generator = "allow"
bn_statistics = "allow"        # FedISCA's synthesis matches them
dp_feature_statistics = "allow"
label_counts = "allow"         # DP sites release a DP label histogram (its own epsilon, in the composed budget)

[[tensors]]
artifact = "classifier"
names = ["classifier/*"]
dtypes = ["F32"]
max_bytes = 200_000_000

[[tensors]]
artifact = "bn_statistics"
names = ["classifier/*.running_mean", "classifier/*.running_var", "classifier/*.num_batches_tracked"]
dtypes = ["F32", "I64"]
max_bytes = 1_000_000

[[tensors]]
artifact = "generator"
names = ["generator/*"]
dtypes = ["F32"]
max_bytes = 200_000_000

[[tensors]]
artifact = "dp_feature_statistics"
names = ["feature_stats/*"]
dtypes = ["F32"]
max_bytes = 10_000_000

[[tensors]]
artifact = "label_counts"
names = ["label_counts/counts"]
dtypes = ["F32"]
max_bytes = 40_000

[bundle]
max_bytes = 500_000_000
valid_days = 2
'''


def ingest_policy_text(ids: dict[str, Identity], site_names: list[str]) -> str:
    senders = ", ".join(f'"{ids[n].key_id}"' for n in site_names)
    return f'''# Server ingest policy written by `secure-oneshot demo`.
schema = "secure-oneshot/server-ingest-policy/v1"
id = "demo/server-ingest"
version = 1
owner = "Demo study server"
# Every bundle must carry the site's signed export policy, approved by the data protection officer.
require_site_policy = true
min_site_policy_approvals = 1

[senders]
allowed = [{senders}]

[artifacts]
required = ["classifier"]
denied = []
require_dp = []

[models]
architectures = ["resnet18-cifar", "resnet18", "small-cnn", "scatternet", "unet2d-small"]

[limits]
max_bundle_bytes = 500_000_000
max_tensors = 2000
max_tensor_bytes = 200_000_000
'''
