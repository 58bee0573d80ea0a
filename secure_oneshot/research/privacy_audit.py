"""``secure-oneshot audit-privacy``: membership inference against a site's released classifier, at the site.

The site re-derives its own records from the model directory's training
record (flag, partition, site, validation fraction, seed; the data fingerprint
must match, so the audit runs on exactly the records the model saw):

* **members**: a random sample of the training records (half of them at most
  when shadow models are asked for);
* **non-members**: records of the site's validation slice (never trained on)
  and the public test split, **with the same number of records of every class
  as the members** (:func:`matched_candidates`): a non-IID site's label mix
  differs from the test split's, and an attack must not win on labels alone;
* **loss-threshold attack** on the released classifier; with ``shadows = K``
  also **offline LiRA**, its K shadow models trained exactly like the site's
  model (the recorded recipe, DP included) on random halves of the site's
  training records that are not candidates.

When the model directory holds a generator, the same candidates attack it too
(:mod:`~secure_oneshot.research.generator_audit`: denoising-loss membership)
and its samples are checked for near-copies of the site's records.

With ``inversion_steps`` it also runs the server's model inversion against
the model (:mod:`~secure_oneshot.research.inversion_attack`), with and without
the BatchNorm prior, and reports how close the reconstructions come to the
site's training images.

The report holds attack AUC, TPR at 1% and 0.1% FPR, the empirical epsilon
lower bound (:mod:`secure_oneshot.research.membership`) next to the
accountant's epsilon from the training record.  Nothing leaves the site: the
report is a set of numbers.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn
from torch.utils.data import Dataset

from ..client.train import DataConfig, TrainConfig, site_data, train_classifier
from ..data import Partition, to_dataset
from ..errors import ConfigError, DataError
from ..models.classifier import ClassifierConfig
from ..server.site_models import load_model_dirs
from .membership import lira_offline, loss_attack

__all__ = ["audit_model_dir"]


def _record(model_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((model_dir / "record.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {model_dir / 'record.json'} ({e})", hint="pass a model directory written by `train`") from e


def _site_records(record: dict[str, Any], data_root: str | None):  # type: ignore[no-untyped-def]
    """The exact records the model trained on, checked against the record's fingerprint."""
    data, config = record["training"]["data"], record["training"]["config"]
    cfg = DataConfig(flag=data["flag"], size=data["size"], root=data_root, site=data["site"], partition=Partition(**data["partition"]))
    site = site_data(cfg, config["val_fraction"], config["seed"])
    if site.train.fingerprint() != data["fingerprint"]:
        raise DataError("the re-derived training records do not match the model's fingerprint",
                        hint="point --data-root at the same MedMNIST files the site trained on")
    return site


def audit_model_dir(model_dir: str | Path, *, data_root: str | None = None, shadows: int = 0, seed: int = 0,
                    delta: float = 1e-5, inversion_steps: int = 0, pairs_png: str | None = None, generator: bool = True) -> dict[str, Any]:
    """Run the membership audit of the module docstring and return its report (JSON-able); ``generator=False``
    leaves a generator in the directory unaudited (it was not released)."""
    model_dir = Path(model_dir)
    record = _record(model_dir)
    (site_model,) = load_model_dirs([model_dir])
    site = _site_records(record, data_root)
    rng = np.random.default_rng(seed)
    pool_split = _concat_splits(site.val, site.test)
    member_idx, non_member_idx = matched_candidates(site.train.labels, pool_split.labels, rng, half=bool(shadows))
    members = to_dataset(site.train.subset(np.sort(member_idx)))
    non_members: Dataset = to_dataset(pool_split.subset(np.sort(non_member_idx)))
    attacks = [loss_attack(site_model.model, members, non_members, delta)]
    halves = []  # each shadow's records: the classifier's and the generator's shadows train on the same ones
    if shadows:
        rest = np.setdiff1d(np.arange(len(site.train)), member_idx)
        if len(rest) < 20:
            raise ConfigError(f"only {len(rest)} non-candidate training records left for shadow models",
                              hint="use --shadows 0 (loss attack only) for so small a site")
        halves = [_half(site, rest, rng) for _ in range(shadows)]
        recipe = TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in record["training"]["config"].items()})
        models = [_shadow(site_model.config, replace(recipe, seed=seed + 1 + k), half) for k, half in enumerate(halves)]
        attacks.append(lira_offline(site_model.model, models, members, non_members, delta))
    dp = record.get("dp", {}).get("classifier")
    inversion = _inversion(site_model.model, site, inversion_steps, seed) if inversion_steps else []
    generator_report = None
    if generator and site_model.generator:
        recipe = record.get("artifacts", {}).get("generator", {}).get("training")
        generator_report = _generator(site_model.generator, site, members, non_members, seed, delta, pairs_png, halves, recipe)
    return {"model": str(model_dir), "site": record.get("site", ""), "members": len(member_idx), "non_members": len(non_member_idx),
            "accountant_epsilon": float(dp["epsilon"]) if dp else None, "delta": delta,
            "attacks": [a.to_json() for a in attacks], "inversion": inversion, "generator": generator_report,
            "protocol": "members: training records; non-members: validation slice + test split; same count per class"}


def matched_candidates(train_labels: np.ndarray, pool_labels: np.ndarray, rng: np.random.Generator,
                       half: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Members and non-members with the same number of records of every class.

    A site's label mix differs from the test split's (non-IID sites); unmatched, an attack could tell members
    from non-members by their label alone (measured: loss-attack AUC 0.72 against epsilon-2 DP sites of a
    Dirichlet-0.5 split, from the label shift, not from membership).  With ``half``, at most half of each
    class's training records become candidates (the rest feed shadow models).
    """
    members, non_members = [], []
    for c in np.unique(train_labels):
        train_c, pool_c = np.flatnonzero(train_labels == c), np.flatnonzero(pool_labels == c)
        k = min(len(train_c) // 2 if half else len(train_c), len(pool_c))
        members.append(rng.choice(train_c, size=k, replace=False))
        non_members.append(rng.choice(pool_c, size=k, replace=False))
    return np.concatenate(members), np.concatenate(non_members)


def _concat_splits(a, b):  # type: ignore[no-untyped-def]
    from ..data.medmnist_data import MedMNISTSplit

    return MedMNISTSplit(a.flag, "val+test", np.concatenate([a.images, b.images]), np.concatenate([a.labels, b.labels]),
                         a.n_classes, a.n_channels, a.task)


def _half(site, rest: np.ndarray, rng: np.random.Generator):  # type: ignore[no-untyped-def]
    """A shadow's data: a random half of the non-candidate training records (validation: one record)."""
    from ..data.medmnist_data import SiteData

    part = site.train.subset(np.sort(rng.choice(rest, size=len(rest) // 2, replace=False)))
    return SiteData(part, part.subset(np.arange(1)), None)


def _shadow(model_cfg: ClassifierConfig, cfg: TrainConfig, data):  # type: ignore[no-untyped-def]
    # Built as the site built it: BatchNorm, which DP training (when the recipe has it) turns into GroupNorm.
    return train_classifier(replace(model_cfg, norm="batch"), cfg, data).model.eval()


def _inversion(model, site, steps: int, seed: int) -> list[dict[str, Any]]:  # type: ignore[no-untyped-def]
    """The server's inversion against this model, with the BN prior (when it has one) and without."""
    from ..server.synthesis import InversionConfig
    from .inversion_attack import inversion_attack

    train, unseen = to_dataset(site.train).tensors[0], to_dataset(site.test).tensors[0]
    cfg = InversionConfig(batch_size=32, steps=steps, seed=seed, channels=site.train.n_channels, num_classes=site.train.n_classes,
                          image_size=int(site.train.images.shape[1]))
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    return [inversion_attack(model, train, unseen, cfg, prior) for prior in (("bn", "none") if has_bn else ("none",))]


def _generator(generator, site, members: Dataset, non_members: Dataset, seed: int, delta: float,  # type: ignore[no-untyped-def]
               pairs_png: str | None, halves: list[Any], recipe: dict[str, Any] | None) -> dict[str, Any]:
    """Membership against the released generator (same candidates; with shadow records, offline LiRA too, its
    shadow generators trained with the recorded recipe) and memorisation of its samples."""
    from .generator_audit import generator_lira, generator_membership, generator_memorisation

    train, unseen = to_dataset(site.train).tensors[0], to_dataset(site.test).tensors[0]
    attacks = [generator_membership(generator, members, non_members, delta).to_json()]
    skipped = None
    if halves and recipe is None:
        skipped = "no generator training recipe in the model directory (trained before it was recorded): retrain to run it"
    elif halves:
        shadows = [_shadow_generator(generator, recipe, half, seed + 1 + k) for k, half in enumerate(halves)]
        attacks.append(generator_lira(generator, shadows, members, non_members, delta).to_json())
    return {"membership": attacks[0], "attacks": attacks, "lira_skipped": skipped,
            "memorisation": generator_memorisation(generator, train, unseen, num_classes=site.train.n_classes, seed=seed,
                                                   pairs_png=pairs_png)}


def _shadow_generator(generator, recipe: dict[str, Any], half, seed: int):  # type: ignore[no-untyped-def]
    """A generator trained exactly like the site's (architecture, recipe, DP) on a shadow's records."""
    from ..client.generator import GeneratorTraining, train_generator
    from ..server.sources import SiteGenerator

    training = GeneratorTraining(**{**recipe, "seed": seed, "dataset_fingerprint": half.train.fingerprint()})
    trained = train_generator(generator.config, training, to_dataset(half.train))
    return SiteGenerator(trained.model.eval(), trained.scheduler, generator.config)


def markdown_report(report: dict[str, Any]) -> str:
    """The audit as a page a privacy officer can attach to a data-protection impact assessment."""
    eps = report["accountant_epsilon"]
    lines = [f"# Privacy audit: {report['site'] or report['model']}", "",
             f"Model directory: `{report['model']}`. Accountant epsilon of the classifier: "
             f"{'%.3g (delta %.0e), an upper bound' % (eps, report['delta']) if eps is not None else 'none (not trained with DP)'}.", "",
             "## Membership inference", "",
             f"Candidates: {report['members']} members and {report['non_members']} non-members ({report['protocol']}).", "",
             "| target | attack | AUC | TPR at 1% FPR | TPR at 0.1% FPR | empirical epsilon >= |", "| --- | --- | --- | --- | --- | --- |"]
    attacks = [("classifier", a) for a in report["attacks"]]
    if report.get("generator"):
        attacks += [("generator", a) for a in report["generator"]["attacks"]]
    lines += [f"| {target} | {a['name']} | {a['auc']:.3f} | {a['tpr_at_1pct_fpr']:.3f} | {a['tpr_at_01pct_fpr']:.3f} | "
              f"{a['epsilon_lower_bound']:.2f} |" for target, a in attacks]
    if report.get("generator") and report["generator"]["lira_skipped"]:
        lines += ["", f"Generator LiRA not run: {report['generator']['lira_skipped']}."]
    lines += ["", "AUC 0.5 is chance. The empirical epsilon is what this attack proves with 95% confidence "
              "(Clopper-Pearson, Bonferroni over thresholds): a lower bound, to be read next to the accountant's upper bound."]
    if report.get("inversion"):
        lines += ["", "## Model inversion by the server", "", "| prior | images | median distance to nearest training image | "
                  "ratio to nearest unseen image | near-copies |", "| --- | --- | --- | --- | --- |"]
        lines += [f"| {r['prior']} | {r['images']} | {r['median_train_distance']:.3f} | {r['median_ratio_train_to_unseen']:.2f} | "
                  f"{r['near_copies']} |" for r in report["inversion"]]
        lines += ["", "Distances are RMS pixel differences on the [-1, 1] scale; a ratio below 1 means reconstructions are "
                  "closer to the site's records than to unseen images."]
    if report.get("generator"):
        m = report["generator"]["memorisation"]
        lines += ["", "## Generator samples", "", f"{m['near_copies']} of {m['images']} samples are near-copies of a training image "
                  f"(distance < {m['copy_distance']} and ratio < {m['ratio']}); median distance {m['median_train_distance']:.3f}, "
                  f"median ratio to unseen images {m['median_ratio']:.2f}."]
    return "\n".join(lines) + "\n"
