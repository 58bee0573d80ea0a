"""A tiny study whose sites also release a diffusion generator (2 sites, 1 seed, classifier epsilon inf and 8, a DP
generator, with and without the BN statistics): its cells, ledgers, audits, report and plots.

Kept apart from ``test_experiment.py``: its study is the suite's longest fixture, and a file of its own lets the other
test worker take the rest of the study tests meanwhile.
"""

from __future__ import annotations

import json

import pytest

from secure_oneshot.errors import ConfigError
from secure_oneshot.research.experiment import study_from_text

from .data_helpers import thinned_root
from .test_data_root import data_root  # noqa: F401
from .test_experiment import TINY

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


GENERATORS = """
[study]
name = "tiny-generators"
flags = ["breastmnist"]
sites = 2
alphas = [1.0]
seeds = [0]

[site]
architecture = "small-cnn"
preset = "cpu"
epochs = 2
epsilons = ["inf", 8.0]
stats_epsilon = 1.0

[generator]
preset = "cpu-small"
epochs = 1
# more than a site's records: every DP step takes them all, and Opacus calibrates the noise in closed form instead of
# summing the subsampled-RDP series (about 50 CPU-s of the study); the release, audit and composition are unchanged
batch_size = 128
epsilons = [8.0]

[policy]
withhold = [[], ["bn_statistics"]]

[server]
preset = "smoke"
methods = ["mixed"]
epochs = 1
class_evidence = "report"   # tiny hospitals: their label counts cannot clear the noise, and these tests need the models

[privacy_audit]
enabled = true
"""


@pytest.fixture(scope="module")
def generator_study(data_root, tmp_path_factory):  # noqa: F811
    from dataclasses import replace

    from secure_oneshot.models.generator import PRESETS as GENERATOR_PRESETS
    from secure_oneshot.research.experiment import run_study

    out = tmp_path_factory.mktemp("generator-study")
    data = thinned_root(data_root, tmp_path_factory.mktemp("generator-data"), "breastmnist", every=6)
    # The cpu-small UNet at a quarter of its width (same three levels, GroupNorm, no attention): these tests check what
    # is released, attacked, composed and reported, none of which depends on how good the generator is, and every
    # generator step (DP training, the audits' 64-sample DDIM memorisation checks, the server's sampling) costs about
    # a seventh as much.  The site's generator config travels in the bundle, so the server and audits use this one.
    narrow = replace(GENERATOR_PRESETS["cpu-small"], block_out_channels=(8, 16, 32), norm_num_groups=4)
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(GENERATOR_PRESETS, "cpu-small", narrow)
        rows = run_study(study_from_text(GENERATORS), out, data_root=str(data), say=lambda line: None)
    return out, {(r["epsilon"], r["withheld"]): r for r in rows}


def test_generator_cells_release_and_attack_a_dp_generator(generator_study) -> None:
    out, rows = generator_study
    assert set(rows) == {("inf", "none"), ("inf", "bn_statistics"), (8.0, "none"), (8.0, "bn_statistics")}
    for row in rows.values():
        assert row["generator_epsilon"] == 8.0 and row["method"] == "mixed"
        assert 0 < row["epsilon_generator_max"] <= 8.0 + 1e-6
        assert 0 <= row["mia_generators_auc_max"] <= 1 and row["generator_near_copies_max"] >= 0
    # A non-DP classifier leaves no composed guarantee, whatever the generator's; DP everything composes above each part.
    assert rows[("inf", "none")]["epsilon_composed_max"] is None
    dp = rows[(8.0, "none")]
    assert dp["epsilon_composed_max"] > max(dp["epsilon_classifier_max"], dp["epsilon_generator_max"])
    for epsilon in ("inf", 8.0):  # the server really received the generators
        cell = "breastmnist-a1-eps{}-gen8-mixed-s0".format("inf" if epsilon == "inf" else "8")
        report = json.loads((out / "cells" / cell / "server" / "global" / "report.json").read_text())
        assert all(site["generator"] for site in report["sites"])


def test_withheld_bn_statistics_never_reach_the_server(generator_study) -> None:
    out, rows = generator_study
    released, withheld = rows[("inf", "none")], rows[("inf", "bn_statistics")]
    assert withheld["bytes_transferred"] < released["bytes_transferred"]
    sites = lambda cell: json.loads((out / "cells" / cell / "server" / "global" / "report.json").read_text())["sites"]  # noqa: E731
    assert [s["bn_statistics"] for s in sites("breastmnist-a1-epsinf-gen8-mixed-s0")] == [True, True]
    assert [s["bn_statistics"] for s in sites("breastmnist-a1-epsinf-gen8-no_bn_statistics-mixed-s0")] == [False, False]
    assert [s["bn_statistics"] for s in sites("breastmnist-a1-eps8-gen8-no_bn_statistics-mixed-s0")] == [None, None]  # DP: GroupNorm
    assert len(list((out / "cache").iterdir())) == 2  # release variants share the site models
    assert len(list((out / "cache").glob("*/sites/*/audit-*.json"))) == 4  # and their audits: one per site model, not per cell
    pairs = out / "cells" / "breastmnist-a1-epsinf-gen8-mixed-s0" / "audit" / "hospital-2-closest-pairs.png"
    assert pairs.read_bytes()[:4] == b"\x89PNG"  # generator samples beside their nearest training images
    report = (out / "report.md").read_text()
    assert "| bn_statistics |" in report and "MIA AUC (worst generator)" in report
    from secure_oneshot.research.plots import study_plots

    plots = sorted(p.name for p in study_plots(list(rows.values()), out / "plots") if p.suffix == ".png")
    assert plots == ["privacy-utility-breastmnist-a1-gen8-mixed.png", "privacy-utility-breastmnist-a1-gen8-no_bn_statistics-mixed.png",
                     "release-method-breastmnist-a1-eps8-gen8.png", "release-method-breastmnist-a1-epsinf-gen8.png"]


def test_generator_methods_need_a_released_generator() -> None:
    with pytest.raises(ConfigError, match="no \\[generator\\]"):
        study_from_text(TINY.replace('["inversion"]', '["generator"]'))
    with pytest.raises(ConfigError, match="leaves at the sites"):
        study_from_text(GENERATORS.replace('[[], ["bn_statistics"]]', '[["generator"]]'))
    with pytest.raises(ConfigError, match="policy.withhold"):
        study_from_text(GENERATORS.replace('[[], ["bn_statistics"]]', '[["classifier"]]'))
    with pytest.raises(ConfigError, match="generator.epsilons"):
        study_from_text(GENERATORS.replace("epsilons = [8.0]", "epsilons = [0]"))
