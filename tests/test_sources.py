"""Synthesis methods behind one interface: inversion, generator, mixed (tiny models, 8 px)."""

from __future__ import annotations

import pytest
import torch

from secure_oneshot.errors import ConfigError
from secure_oneshot.models.generator import GeneratorConfig, build_generator, scheduler_config
from secure_oneshot.server.distill import DistillConfig, distill
from secure_oneshot.server.ensemble import Ensemble
from secure_oneshot.server.execution import PLAIN_LOOP
from secure_oneshot.server.sources import SiteGenerator, SnapshotSource, SynthesisMethod, generator_labels

from .test_distill import SIZE, inversion, tiny

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_generator(seed: int) -> SiteGenerator:
    torch.manual_seed(seed)
    cfg = GeneratorConfig(image_size=SIZE, block_out_channels=(8, 16), norm_num_groups=4, num_train_timesteps=50)
    return SiteGenerator(build_generator(cfg).eval(), scheduler_config(cfg))


@pytest.fixture(scope="module")
def sites() -> list[torch.nn.Module]:
    return [tiny(1).eval(), tiny(2).eval()]


def source(sites, method: str, generators=(), **kwargs) -> SnapshotSource:
    cfg = inversion(batch_size=8, steps=6, snapshot_every=2, **kwargs)
    return SnapshotSource(sites, Ensemble(sites), cfg, SynthesisMethod(method, generator_steps=2), PLAIN_LOOP, generators)


def test_every_generator_draws_every_class_equally_often() -> None:
    labels, owner = generator_labels(24, 2, 3)
    for g in range(3):
        assert torch.bincount(labels[owner == g], minlength=2).tolist() == [4, 4]
    labels, owner = generator_labels(12, 3, 2)
    assert all(torch.bincount(labels[owner == g], minlength=3).tolist() == [2, 2, 2] for g in range(2))


def test_inversion_snapshots_ramp_from_noise_to_realistic(sites) -> None:
    batches = source(sites, "inversion").epoch(0)
    assert len(batches) == 3 and all(x.shape == (8, 1, SIZE, SIZE) for x, _ in batches)
    assert [float(a[0]) for _, a in batches] == pytest.approx([0, 1 / 3, 2 / 3])


def test_generator_batches_are_labelled_by_the_teacher_only(sites) -> None:
    batches = source(sites, "generator", [tiny_generator(0), tiny_generator(1)]).epoch(0)
    assert len(batches) == 3 and all(x.shape == (8, 1, SIZE, SIZE) and torch.equal(a, torch.ones(8)) for x, a in batches)
    assert all(float(x.abs().max()) <= 1.0 for x, _ in batches)  # DDIM samples in [-1, 1]
    assert all(batches.teacher_only(i) for i in range(len(batches)))   # so the noise-adapted teacher is skipped


def test_mixed_batches_concatenate_inversion_and_generator_images(sites) -> None:
    src = SnapshotSource(sites, Ensemble(sites), inversion(batch_size=8, steps=6, snapshot_every=2),
                         SynthesisMethod("mixed", generator_share=0.25, generator_steps=2), PLAIN_LOOP, [tiny_generator(0)])
    batches = src.epoch(0)
    assert src.n_generated == 2 and len(batches) == 3
    for i, (x, a) in enumerate(batches):
        assert x.shape == (8, 1, SIZE, SIZE)
        assert a[:6].tolist() == pytest.approx([i / 3] * 6) and a[6:].tolist() == [1.0, 1.0]
        assert not batches.teacher_only(i)


def test_generator_methods_need_a_generator(sites) -> None:
    with pytest.raises(ConfigError, match="no site released one"):
        source(sites, "mixed")
    with pytest.raises(ConfigError, match="method must be one of"):
        SynthesisMethod("dreams")


def test_distillation_runs_on_mixed_images(sites) -> None:
    result = distill(tiny(3), sites, inversion(batch_size=8, steps=4), DistillConfig(epochs=1), execution=PLAIN_LOOP,
                     method=SynthesisMethod("mixed", generator_steps=2), generators=[tiny_generator(0)])
    assert len(result.history) == 1 and result.history[0]["loss"] > 0 and result.history[0]["images_per_s"] > 0


def test_ddim_trajectory_ends_at_the_sample() -> None:
    from secure_oneshot.client.generator import sample_images

    g = tiny_generator(0)
    steps: list[torch.Tensor] = []
    final = sample_images(g.model, g.scheduler, torch.tensor([0, 1]), steps=3, seed=5, on_step=steps.append)
    assert len(steps) == 3 and all(x.shape == (2, 1, SIZE, SIZE) for x in steps)
    assert torch.allclose(steps[-1].clamp(-1, 1), final) and not torch.allclose(steps[0], steps[-1])


@pytest.mark.parametrize("method, inverted, generated", [("inversion", 8, 0), ("generator", 0, 8), ("mixed", 4, 4)])
def test_trajectory_grid_shows_each_method(sites, tmp_path, monkeypatch, method: str, inverted: int, generated: int) -> None:
    from PIL import Image

    from secure_oneshot.server import study
    from secure_oneshot.server.study import SiteModel

    site_models = [SiteModel(f"s{i}", m, None, generator=tiny_generator(i)) for i, m in enumerate(sites)]
    columns: dict[str, int] = {}
    for name in ("_inversion_trajectory", "_generator_trajectory"):
        def spy(*args, _original=getattr(study, name), _name=name):
            result = _original(*args)
            assert result.shape[0] == study.TRAJECTORY_ROWS
            columns[_name] = result.shape[1]
            return result

        monkeypatch.setattr(study, name, spy)
    study._trajectory_grid(site_models, inversion(batch_size=8, steps=5), PLAIN_LOOP, tmp_path / "grid.png",
                           SynthesisMethod(method, generator_steps=8))
    assert columns == {k: v for k, v in (("_inversion_trajectory", inverted), ("_generator_trajectory", generated)) if v}
    width, height = Image.open(tmp_path / "grid.png").size
    assert width == height == 2 + 8 * (SIZE + 2)  # 8 columns x 8 rows, torchvision's 2-pixel padding
