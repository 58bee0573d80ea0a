"""Policy files: every field has a valid example (the files in policies/) and invalid
examples that are refused with the exact ``file:line: key.path`` location."""

from __future__ import annotations

from pathlib import Path

import pytest

from secure_oneshot.errors import ConfigError
from secure_oneshot.policy.load import load_export_policy, load_ingest_policy, load_policy, policy_from_text
from secure_oneshot.policy.model import ExportPolicy, IngestPolicy

POLICIES = Path(__file__).resolve().parents[1] / "policies"
STRICT = (POLICIES / "hospital-strict.toml").read_text()
INGEST = (POLICIES / "server-ingest.toml").read_text()


def mutate(text: str, section: str, key: str, value: str | None) -> tuple[str, int]:
    """Replace ``key``'s value in ``[section]`` ("" = top level); ``None`` deletes the line. Returns (text, line)."""
    lines = text.splitlines()
    start = 0 if not section else next(i for i, line in enumerate(lines) if line.split("#")[0].strip() == section) + 1
    index = next(i for i in range(start, len(lines)) if lines[i].split("=")[0].strip() == key)
    if lines[index].split("#")[0].rstrip().endswith("["):  # a multi-line array: drop its continuation lines
        while not lines[index + 1].startswith("]"):
            del lines[index + 1]
        del lines[index + 1]
    if value is None:
        del lines[index]
    else:
        lines[index] = f"{key} = {value}"
    return "\n".join(lines) + "\n", index + 1


def test_examples_are_valid() -> None:
    strict = load_export_policy(POLICIES / "hospital-strict.toml")
    research = load_export_policy(POLICIES / "research-study.toml")
    ingest = load_ingest_policy(POLICIES / "server-ingest.toml")
    assert strict.artifacts["bn_statistics"] == "deny" and strict.approvals_required == 2
    assert strict.dp["classifier"].max_epsilon == 8.0 and strict.composed_dp.max_epsilon == 10.0
    assert research.artifacts["bn_statistics"] == "allow" and research.dp == {}
    assert ingest.required_artifacts == ("classifier",) and "resnet18-cifar" in ingest.architectures
    assert len({strict.sha256, research.sha256, ingest.sha256}) == 3


EXPORT_CASES = [
    # (section, key, bad value, expected path, message fragment)
    ("", "schema", '"secure-oneshot/site-export-policy/v2"', "schema", "must be"),
    ("", "id", '"has spaces in it"', "id", "1-128 characters"),
    ("", "version", "0", "version", "must be positive"),
    ("", "version", '"3"', "version", "must be an integer"),
    ("", "owner", "42", "owner", "must be a string"),
    ("", "effective", '"2026-11-01"', "effective", "date-time"),
    ("", "expires", "2026-01-01T00:00:00Z", "expires", "must be after effective"),
    ("", "expires", "2027-05-01T00:00:00", "expires", "time zone"),
    ("[study]", "title", "[]", "study.title", "must be a string"),
    ("[study]", "irb", "2026", "study.irb", "must be a string"),
    ("[study]", "dua", "true", "study.dua", "must be a string"),
    ("[approval]", "required", "4", "approval.required", "between 0 and the number of approvers"),
    ("[approval]", "approvers", '["not-a-key-id"]', "approval.approvers", "not key ids"),
    ("[recipients]", "allowed", '["89E3EED729EE75714D1B11419EF405C2"]', "recipients.allowed", "not key ids"),
    ("[artifacts]", "classifier", '"maybe"', "artifacts.classifier", "must be one of allow, deny, allow-with-dp"),
    ("[artifacts]", "bn_statistics", '"allow-with-dp"', "artifacts.bn_statistics", "no [dp.bn_statistics] table"),
    ("[artifacts]", "generator", '"Allow"', "artifacts.generator", "must be one of"),
    ("[artifacts]", "dp_feature_statistics", "1", "artifacts.dp_feature_statistics", "must be a string"),
    ("[[tensors]]", "artifact", '"weights"', "tensors[0].artifact", "must be one of"),
    ("[[tensors]]", "names", "[]", "tensors[0].names", "at least one pattern"),
    ("[[tensors]]", "dtypes", '["F8_E4M3"]', "tensors[0].dtypes", "unknown value"),
    ("[[tensors]]", "max_bytes", "-5", "tensors[0].max_bytes", "must be positive"),
    ("[dp.classifier]", "max_epsilon", '"eight"', "dp.classifier.max_epsilon", "must be a number"),
    ("[dp.classifier]", "max_delta", "1.5", "dp.classifier.max_delta", "between 0 and 1"),
    ("[dp.classifier]", "accountants", '["moments"]', "dp.classifier.accountants", "unknown value"),
    ("[dp.classifier]", "require_poisson", '"yes"', "dp.classifier.require_poisson", "must be a boolean"),
    ("[dp.composed]", "max_epsilon", "0", "dp.composed.max_epsilon", "must be positive"),
    ("[dp.composed]", "max_delta", "0", "dp.composed.max_delta", "between 0 and 1"),
    ("[bundle]", "max_bytes", "1.5e8", "bundle.max_bytes", "must be an integer"),
    ("[bundle]", "valid_days", "400", "bundle.valid_days", "(one hour) and 365 days"),
    # Under a second of validity passed `policy check` and then crashed `export`: refused at load time now.
    ("[bundle]", "valid_days", "0.000001", "bundle.valid_days", "(one hour) and 365 days"),
    ("[bundle]", "valid_days", "0.04", "bundle.valid_days", "(one hour) and 365 days"),
    ("[bundle]", "valid_days", "nan", "bundle.valid_days", "must be a number"),
    ("[bundle]", "valid_days", "inf", "bundle.valid_days", "must be a number"),
    ("[bundle]", "valid_days", "-7", "bundle.valid_days", "(one hour) and 365 days"),
]


@pytest.mark.parametrize("section, key, value, path, fragment", EXPORT_CASES, ids=[f"{c[3]}={c[2]}" for c in EXPORT_CASES])
def test_invalid_export_field_names_file_line_and_key(section, key, value, path, fragment) -> None:
    assert_located(STRICT, "strict.toml", section, key, value, path, fragment)


def assert_located(policy: str, source: str, section: str, key: str, value: str, path: str, fragment: str) -> None:
    """The mutated field is refused with ``source:line: path:`` and the expected reason."""
    text, line = mutate(policy, section, key, value)
    with pytest.raises(ConfigError) as caught:
        policy_from_text(text, source)
    assert f"{source}:{line}: {path}: " in caught.value.message, caught.value.message
    assert fragment in caught.value.message


@pytest.mark.parametrize("section, key", [("", "owner"), ("[study]", "dua"), ("[bundle]", "valid_days"), ("[dp.classifier]", "max_delta")])
def test_missing_required_field(section: str, key: str) -> None:
    text, _ = mutate(STRICT, section, key, None)
    with pytest.raises(ConfigError, match=f"{key}: missing"):
        policy_from_text(text, "strict.toml")


def test_unknown_keys_are_errors_with_their_line() -> None:
    text, line = mutate(STRICT, "[bundle]", "valid_days", "7\nmax_byte = 5")
    with pytest.raises(ConfigError) as caught:
        policy_from_text(text, "strict.toml")
    assert f"strict.toml:{line + 1}: bundle.max_byte: unknown key" in caught.value.message


def test_label_counts_absent_from_artifacts_means_deny() -> None:
    """Policies written before the label histogram existed stay valid and still refuse it (fail closed)."""
    text, _ = mutate(STRICT, "[artifacts]", "label_counts", None)
    assert policy_from_text(text, "strict.toml").artifacts["label_counts"] == "deny"
    assert policy_from_text(STRICT, "strict.toml").artifacts["label_counts"] == "allow-with-dp"


def without_table(text: str, header: str) -> str:
    """``text`` without the TOML table ``header`` (its lines up to the next blank line)."""
    out, skipping = [], False
    for line in text.splitlines():
        skipping = (skipping or line.startswith(header)) and bool(line.strip())
        if not skipping:
            out.append(line)
    return "\n".join(out) + "\n"


@pytest.mark.parametrize("value, fragment", [('"allow-with-dp"', "no [dp.label_counts] table"), ('"maybe"', "must be one of")])
def test_label_counts_mode_is_checked_like_the_others(value: str, fragment: str) -> None:
    text, _ = mutate(without_table(STRICT, "[dp.label_counts]"), "[artifacts]", "label_counts", value)
    with pytest.raises(ConfigError) as caught:
        policy_from_text(text, "strict.toml")
    assert "artifacts.label_counts" in caught.value.message and fragment in caught.value.message, caught.value.message


def test_unknown_artifact_table_under_dp() -> None:
    text = STRICT + "\n[dp.weights]\nmax_epsilon = 1.0\nmax_delta = 1e-5\n"
    with pytest.raises(ConfigError, match=r"dp\.weights: unknown artifact"):
        policy_from_text(text, "strict.toml")


def test_all_problems_are_reported_together() -> None:
    text, _ = mutate(STRICT, "", "version", "0")
    text, _ = mutate(text, "[bundle]", "valid_days", "0")
    text, _ = mutate(text, "[artifacts]", "generator", '"sometimes"')
    with pytest.raises(ConfigError) as caught:
        policy_from_text(text, "strict.toml")
    message = caught.value.message
    assert "3 problems" in message and "version" in message and "bundle.valid_days" in message and "artifacts.generator" in message


def test_invalid_toml_syntax() -> None:
    with pytest.raises(ConfigError, match="invalid TOML"):
        policy_from_text(STRICT.replace('id = "st-example/strict"', 'id = "st-example/strict'), "strict.toml")


INGEST_CASES = [
    ("", "require_site_policy", '"yes"', "require_site_policy", "must be a boolean"),
    ("", "min_site_policy_approvals", "17", "min_site_policy_approvals", "between 0 and 16"),
    ("", "min_site_policy_approvals", "-1", "min_site_policy_approvals", "between 0 and 16"),
    ("[senders]", "allowed", '"be7e9df39748eb156e1b78f2b0a6234b"', "senders.allowed", "list of strings"),
    ("[artifacts]", "required", '["weights"]', "artifacts.required", "unknown value"),
    ("[artifacts]", "denied", '"bn_statistics"', "artifacts.denied", "list of strings"),
    ("[artifacts]", "require_dp", '["generator"]', "artifacts.require_dp", "no [dp.generator] table"),
    ("[dp.classifier]", "max_epsilon", "-1", "dp.classifier.max_epsilon", "must be positive"),
    ("[models]", "architectures", "[1, 2]", "models.architectures", "list of strings"),
    ("[limits]", "max_bundle_bytes", "0", "limits.max_bundle_bytes", "must be positive"),
    ("[limits]", "max_tensors", "true", "limits.max_tensors", "must be an integer"),
    ("[limits]", "max_tensor_bytes", '"big"', "limits.max_tensor_bytes", "must be an integer"),
]


@pytest.mark.parametrize("section, key, value, path, fragment", INGEST_CASES, ids=[f"{c[3]}={c[2]}" for c in INGEST_CASES])
def test_invalid_ingest_field(section, key, value, path, fragment) -> None:
    assert_located(INGEST, "ingest.toml", section, key, value, path, fragment)


def test_kind_is_checked_where_one_kind_is_expected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a site export policy"):
        load_export_policy(POLICIES / "server-ingest.toml")
    with pytest.raises(ConfigError, match="not a server ingest policy"):
        load_ingest_policy(POLICIES / "hospital-strict.toml")
    assert isinstance(load_policy(POLICIES / "research-study.toml"), ExportPolicy)
    assert isinstance(load_policy(POLICIES / "server-ingest.toml"), IngestPolicy)


def test_site_policy_keys_default_to_compatible_values() -> None:
    ingest = load_ingest_policy(POLICIES / "server-ingest.toml")
    assert (ingest.require_site_policy, ingest.min_site_policy_approvals) == (False, 1)
    text, _ = mutate(INGEST, "", "require_site_policy", "true")
    assert policy_from_text(text).require_site_policy is True
    text, _ = mutate(INGEST, "", "min_site_policy_approvals", None)
    assert policy_from_text(text).min_site_policy_approvals == 1


def test_an_oversized_policy_file_is_refused_before_parsing(tmp_path: Path) -> None:
    big = tmp_path / "big.toml"
    big.write_text(STRICT + "#" + "x" * (64 * 1024) + "\n")
    with pytest.raises(ConfigError, match="larger than 65536 bytes"):
        load_policy(big)


def test_empty_allow_lists_allow_nothing_but_are_valid() -> None:
    text, _ = mutate(STRICT, "[recipients]", "allowed", "[]")
    assert policy_from_text(text).recipients == ()
