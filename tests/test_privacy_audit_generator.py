"""Offline LiRA against a diffusion generator that memorises its records (real PneumoniaMNIST images).

Kept apart from ``test_privacy_audit.py``: its three generator trainings are the suite's longest single test, and
a file of its own lets the other test worker take the rest of the privacy audit tests meanwhile.
"""

from __future__ import annotations

import numpy as np
from torch.utils.data import Subset

from secure_oneshot.data import load_medmnist, to_dataset

from .test_data_root import data_root  # noqa: F401


def test_generator_lira_sees_a_memorising_generator(data_root) -> None:  # noqa: F811
    """A tiny UNet trained 300 steps on 16 records (true labels: a generator memorises images, not labels).
    Measured on data draws 0 / 1 / 2 (the permutation's seed): denoising-loss attack AUC 0.535 / 0.527 / 0.672,
    offline LiRA with 2 shadows (trained the same way on other records) 0.926 / 0.930 / 0.922, TPR 0.56 / 0.81 /
    0.69 at 1% FPR: the per-record calibration is what finds it.  (Draw 0 at 400 steps: 0.621 and 0.926; at 200
    steps LiRA falls to 0.781.  At 1500 steps both reach 1.0; at 300 steps the cpu-small preset on 32 records is
    at chance, 0.52: CPU budgets do not memorise.)"""
    from secure_oneshot.client.generator import GeneratorTraining, train_generator
    from secure_oneshot.models.generator import GeneratorConfig
    from secure_oneshot.research.generator_audit import generator_lira, generator_membership
    from secure_oneshot.server.sources import SiteGenerator

    n = 16
    split = load_medmnist("pneumoniamnist", "train", root=str(data_root))
    data = to_dataset(split.subset(np.random.default_rng(0).permutation(len(split))))
    cfg = GeneratorConfig(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8)

    def train(start: int, seed: int) -> SiteGenerator:
        training = GeneratorTraining(epochs=300, batch_size=n, seed=seed, lr=2e-3, weight_decay=0.0)
        g = train_generator(cfg, training, Subset(data, range(start, start + n)))
        return SiteGenerator(g.model.eval(), g.scheduler, cfg)

    members, non_members = Subset(data, range(n)), Subset(data, range(n, 2 * n))
    target = train(0, 0)
    loss = generator_membership(target, members, non_members)
    lira = generator_lira(target, [train((2 + k) * n, k + 1) for k in range(2)], members, non_members)
    assert lira.auc >= 0.8 and lira.auc > loss.auc, (loss, lira)
