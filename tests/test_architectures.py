"""Different architectures per site: the registry, the server building each site from its own record, mixed ensembles."""

from __future__ import annotations

import copy
import json
from dataclasses import asdict
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
torch.set_num_threads(1)

from safetensors.torch import save_file  # noqa: E402
from torch import nn  # noqa: E402

from secure_oneshot.client.site_config import site_config_from_text  # noqa: E402
from secure_oneshot.errors import ConfigError  # noqa: E402
from secure_oneshot.models.classifier import ClassifierConfig, build_classifier  # noqa: E402
from secure_oneshot.models.specs import classifier_layout, default_architecture  # noqa: E402
from secure_oneshot.server.distill import DistillConfig, distill  # noqa: E402
from secure_oneshot.server.ensemble import Ensemble, architecture_groups, batching_for  # noqa: E402
from secure_oneshot.server.execution import Execution  # noqa: E402
from secure_oneshot.server.study import load_model_dirs  # noqa: E402
from secure_oneshot.server.synthesis import BNStatHooks, InversionConfig, synthesize_batch  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

MIXED = ("small-cnn", "small-cnn", "resnet18-cifar", "vgg11-bn", "wrn-16-2")


def _site(architecture: str, seed: int, classes: int = 2) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_classifier(ClassifierConfig(architecture, 1, classes))
    with torch.no_grad():   # running statistics that differ between sites, so the BN prior is not trivially zero
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture(scope="module")
def mixed_sites() -> list[torch.nn.Module]:
    return [_site(a, seed) for seed, a in enumerate(MIXED)]


def test_size_defaults_follow_the_method() -> None:
    assert [default_architecture(s) for s in (28, 64, 128, 224)] == ["resnet18-cifar", "resnet18-cifar", "resnet18", "resnet18"]
    with pytest.raises(ValueError, match="image_size"):
        default_architecture(0)


@pytest.mark.parametrize("architecture", ["vgg11-bn", "wrn-16-2", "resnet34-cifar"])
def test_opacus_fix_gives_the_group_norm_variant(architecture: str) -> None:
    """DP training swaps BatchNorm for GroupNorm with Opacus's fix: the result is what norm="group" describes."""
    from opacus.validators import ModuleValidator

    fixed = ModuleValidator.fix(build_classifier(ClassifierConfig(architecture, 3, 4)))
    assert not ModuleValidator.validate(fixed, strict=False)
    layout = classifier_layout(architecture, 3, 4, "group")
    assert {k: tuple(v.shape) for k, v in fixed.state_dict().items()} == {k: e.shape for k, e in layout.entries.items()}


@pytest.mark.parametrize("architecture", ["vgg11-bn", "wrn-16-2", "resnet34", "resnet34-cifar"])
def test_a_site_chooses_its_architecture_in_its_config(architecture: str) -> None:
    assert site_config_from_text(f'[model]\narchitecture = "{architecture}"\n').model.architecture == architecture
    with pytest.raises(ConfigError, match="architecture"):
        site_config_from_text('[model]\narchitecture = "vgg19"\n')


@pytest.mark.parametrize("size", [28, 64])
def test_new_architectures_take_small_inputs(size: int) -> None:
    for architecture in ("vgg11-bn", "wrn-16-2"):
        assert build_classifier(ClassifierConfig(architecture, 3, 5)).eval()(torch.zeros(2, 3, size, size)).shape == (2, 5)


# --- the server: each site from its own record ----------------------------------------------------


def _model_dir(root: Path, architecture: str, seed: int) -> Path:
    root.mkdir(parents=True)
    torch.manual_seed(seed)
    cfg = ClassifierConfig(architecture, 1, 2)
    save_file({k: v.contiguous() for k, v in build_classifier(cfg).state_dict().items()}, root / "classifier.safetensors")
    record = {"format": "secure-oneshot-model/v1", "site": root.name, "dp": {}, "training": {"epochs": 1},
              "artifacts": {"classifier": {**asdict(cfg), "image_size": 28}}}
    (root / "record.json").write_text(json.dumps(record))
    return root


def test_the_server_builds_each_site_from_its_own_record(tmp_path: Path) -> None:
    dirs = [_model_dir(tmp_path / f"site-{i}", a, i) for i, a in enumerate(("small-cnn", "wrn-16-2", "vgg11-bn"))]
    sites = load_model_dirs(dirs)
    assert [s.config.architecture for s in sites] == ["small-cnn", "wrn-16-2", "vgg11-bn"]
    assert type(sites[1].model).__name__ == "WideResNet" and type(sites[2].model).__name__ == "VGG11BN"


def test_a_record_naming_an_unknown_architecture_is_refused_in_one_line(tmp_path: Path) -> None:
    folder = _model_dir(tmp_path / "site-x", "small-cnn", 0)
    record = json.loads((folder / "record.json").read_text())
    record["artifacts"]["classifier"]["architecture"] = "vit-huge\x1b[31m"
    (folder / "record.json").write_text(json.dumps(record))
    with pytest.raises(ConfigError) as caught:
        load_model_dirs([folder])
    error = caught.value
    assert "unknown architecture 'vit-huge\\x1b[31m'" in error.message and "site-x" in error.message
    assert "\n" not in error.message and "\x1b" not in error.message
    assert "wrn-16-2" in error.hint and "vgg11-bn" in error.hint and error.exit_code == 3


# --- mixed ensembles -------------------------------------------------------------------------------


def test_mixed_ensemble_batches_identical_architectures_and_matches_the_loop(mixed_sites) -> None:
    assert architecture_groups(mixed_sites) == [(0, 1), (2,), (3,), (4,)]
    grouped, looped = Ensemble(mixed_sites), Ensemble(mixed_sites, batched=False)
    assert not grouped.batched and [sites for _, sites in grouped.hook_groups()] == [(0, 1), (2,), (3,), (4,)]
    assert type(grouped.hook_modules()[0]).__name__ == "SmallCNN" and next(grouped.hook_modules()[0].parameters()).is_meta
    x = torch.randn(4, 1, 28, 28)
    per_site = grouped.per_site_logits(x)
    assert per_site.shape == (5, 4, 2)
    torch.testing.assert_close(per_site, looped.per_site_logits(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grouped(x), torch.stack([m(x) for m in mixed_sites]).mean(0), rtol=1e-5, atol=1e-5)
    weights = torch.rand(5, 2)
    torch.testing.assert_close(Ensemble(mixed_sites, weights=weights)(x), Ensemble(mixed_sites, batched=False, weights=weights)(x),
                               rtol=1e-5, atol=1e-5)


def test_noise_adapted_mixed_ensemble_matches_the_loop(mixed_sites) -> None:
    grouped, looped = Ensemble(mixed_sites, adapt_bn=True), Ensemble(mixed_sites, batched=False, adapt_bn=True)
    x = torch.randn(4, 1, 28, 28)
    torch.testing.assert_close(grouped.per_site_logits(x), looped.per_site_logits(x), rtol=1e-5, atol=1e-5)


def test_a_request_to_batch_mixed_sites_batches_per_group(mixed_sites) -> None:
    assert batching_for(True, mixed_sites) is None and batching_for(True, mixed_sites[:2]) is True
    assert batching_for(False, mixed_sites) is False and batching_for(None, mixed_sites) is None


def test_bn_loss_is_normalised_per_model_in_a_mixed_ensemble(mixed_sites) -> None:
    x = torch.randn(4, 1, 28, 28)
    bn_layers = [sum(isinstance(m, torch.nn.BatchNorm2d) for m in site.modules()) for site in mixed_sites]
    assert bn_layers[0] == 3 and len(set(bn_layers)) == 4   # small-cnn 3, resnet18 20, vgg 8, wrn 14
    results = []
    for ensemble in (Ensemble(mixed_sites), Ensemble(mixed_sites, batched=False)):
        with BNStatHooks(ensemble) as hooks:
            assert hooks.layer_counts == bn_layers
            results.append(hooks.site_losses(x))
            weighted = hooks.weighted(results[-1][1])
            torch.testing.assert_close(weighted, results[-1][1].sum() * sum(bn_layers) / 5)
    (logits_a, losses_a), (logits_b, losses_b) = results
    torch.testing.assert_close(logits_a, logits_b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(losses_a, losses_b, rtol=1e-5, atol=1e-5)
    # Each entry is that site's mean over its own layers: recomputed by hand for the lone VGG site.
    vgg = mixed_sites[3]
    inputs = {}
    handles = [m.register_forward_pre_hook(lambda mod, a, n=n: inputs.__setitem__(n, a[0]))
               for n, m in vgg.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    vgg(x)
    for h in handles:
        h.remove()
    named = dict(vgg.named_modules())
    terms = [torch.linalg.vector_norm(t.mean((0, 2, 3)) - named[n].running_mean)
             + torch.linalg.vector_norm(t.var((0, 2, 3), unbiased=False) - named[n].running_var) for n, t in inputs.items()]
    torch.testing.assert_close(losses_a[3], torch.stack(terms).mean(), rtol=1e-4, atol=1e-5)


def test_one_inversion_step_and_one_distillation_epoch_run_mixed(mixed_sites) -> None:
    execution = Execution(device="cpu", precision="fp32", channels_last=False, batched="on")
    synth = InversionConfig(batch_size=4, steps=2, image_size=28, channels=1, num_classes=2, snapshot_every=1, jitter=1)
    x, y = synthesize_batch(mixed_sites, None, synth, execution=execution)
    assert x.shape == (4, 1, 28, 28) and torch.isfinite(x).all() and y.tolist() == [0, 1, 0, 1]
    # channels_last applies to the sites run as themselves; the stacked group's 5-D weights keep their layout.
    x_cl, _ = synthesize_batch(mixed_sites, None, synth, execution=Execution(device="cpu", precision="fp32", batched="on"))
    assert x_cl.shape == x.shape and torch.isfinite(x_cl).all()   # (Adam's first steps amplify layout rounding: no equality)
    student = build_classifier(ClassifierConfig("small-cnn", 1, 2))
    before = {k: v.clone() for k, v in student.state_dict().items()}
    result = distill(student, mixed_sites, synth, DistillConfig(epochs=1), execution=execution)
    assert len(result.history) == 1 and torch.isfinite(torch.tensor(result.history[0]["loss"]))
    assert any(not torch.equal(before[k], v) for k, v in result.student.state_dict().items())


def test_the_servers_student_architecture_is_checked_up_front() -> None:
    from secure_oneshot.server.study import DistillJob

    assert DistillJob(student_arch="wrn-16-2").student_arch == "wrn-16-2"
    with pytest.raises(ConfigError, match="unknown student architecture 'vgg19'") as caught:
        DistillJob(student_arch="vgg19")
    assert "vgg11-bn" in caught.value.hint and caught.value.exit_code == 3


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_small_cnn_pools_before_its_relu_and_computes_exactly_conv_norm_relu_pool(norm: str) -> None:
    """The same weights in the textbook order give bit-equal logits and gradients (input and every parameter), in
    training mode (batch statistics) and in eval mode: models trained with either order are interchangeable."""
    torch.manual_seed(0)
    model = build_classifier(ClassifierConfig("small-cnn", 1, 2, norm))
    kinds = [type(m).__name__ for m in model.features]
    assert kinds[2:4] == ["MaxPool2d", "ReLU"]
    reference = copy.deepcopy(model)
    layers = list(reference.features)
    for i in range(0, len(layers), 4):   # conv, norm, pool, relu -> conv, norm, relu, pool
        layers[i + 2], layers[i + 3] = layers[i + 3], layers[i + 2]
    reference.features = nn.Sequential(*layers)
    assert [type(m).__name__ for m in reference.features][2:4] == ["ReLU", "MaxPool2d"]
    x = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    for train in (True, False):
        model.train(train), reference.train(train)
        outputs, grads = [], []
        for m in (model, reference):
            xi = x.clone().requires_grad_(True)
            y = m(xi)
            outputs.append(y)
            grads.append(torch.autograd.grad((y * torch.arange(1.0, 3.0)).sum(), [xi, *m.parameters()]))
        assert torch.equal(outputs[0], outputs[1])
        assert all(torch.equal(a, b) for a, b in zip(*grads))
