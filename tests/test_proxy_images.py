"""Public proxy images for distillation: loading (MedMNIST set or folder, hostile files), the proxy methods'
batches, and the distill command with them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from secure_oneshot.cli import main
from secure_oneshot.data.proxy_images import load_proxy_images
from secure_oneshot.errors import ConfigError, DataError
from secure_oneshot.server import sources as sources_module
from secure_oneshot.server.distill import DistillConfig, distill
from secure_oneshot.server.ensemble import Ensemble
from secure_oneshot.server.execution import PLAIN_LOOP
from secure_oneshot.server.sources import SnapshotSource, SynthesisMethod
from secure_oneshot.server.study import DistillJob, proxy_tensor

from .model_helpers import make_real_model_dir
from .test_data_root import data_root  # noqa: F401
from .test_distill import SIZE, inversion, tiny

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def png(path: Path, size: tuple[int, int], mode: str = "L", value: int = 128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode == "L" else (value, 0, 255 - value)).save(path)
    return path


# --- loading --------------------------------------------------------------------------------------------------


def test_a_medmnist_split_is_loaded_whole_with_its_digest(data_root) -> None:  # noqa: F811
    proxy = load_proxy_images("breastmnist:val", size=28, channels=1, data_root=data_root)
    with np.load(data_root / "breastmnist.npz") as npz:
        expected = npz["val_images"]
    assert proxy.images.shape == expected.shape and np.array_equal(proxy.images, expected)
    assert proxy.record() == {"source": "breastmnist:val", "images": len(expected), "sha256": proxy.sha256}
    assert load_proxy_images("breastmnist", size=28, channels=1, data_root=data_root).source == "breastmnist:train"
    rgb = load_proxy_images("breastmnist:val", size=28, channels=3, data_root=data_root).images
    assert rgb.shape == (*expected.shape, 3) and np.array_equal(rgb[..., 1], expected)


@pytest.mark.parametrize("spec, message", [("breastmnist:holdout", "not one of train, val, test"),
                                            ("../../etc/passwd", "neither a folder nor a MedMNIST set")])
def test_bad_specs_are_one_line_data_errors(spec: str, message: str, data_root) -> None:  # noqa: F811
    with pytest.raises(DataError, match=message):
        load_proxy_images(spec, size=28, channels=1, data_root=data_root)


def test_a_folder_is_read_recursively_fitted_and_hidden_files_and_links_skipped(tmp_path: Path) -> None:
    folder = tmp_path / "public"
    png(folder / "a.png", (28, 28), value=10)
    png(folder / "deeper" / "b.png", (64, 40), mode="RGB", value=200)   # cropped to a square, resized, made grey
    png(folder / ".hidden.png", (28, 28))
    png(folder / ".cache" / "c.png", (28, 28))
    (folder / "notes.txt").write_text("not an image")
    outside = png(tmp_path / "outside.png", (28, 28), value=255)
    os.symlink(outside, folder / "link.png")
    proxy = load_proxy_images(str(folder), size=28, channels=1)
    assert proxy.images.shape == (2, 28, 28) and proxy.images.dtype == np.uint8
    assert int(proxy.images[0].mean()) == 10 and 0 < int(proxy.images[1].mean()) < 255
    assert proxy.source == "directory public"   # the folder's own name: no server path in reports


def test_a_corrupt_file_in_the_folder_names_it(tmp_path: Path) -> None:
    folder = tmp_path / "public"
    png(folder / "good.png", (28, 28))
    (folder / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    with pytest.raises(DataError, match="bad.png"):
        load_proxy_images(str(folder), size=28, channels=1)


def test_an_empty_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no images"):
        load_proxy_images(str(tmp_path / "empty"), size=28, channels=1)


def test_proxy_tensor_scales_like_the_sites_own_images() -> None:
    from secure_oneshot.data import to_dataset
    from secure_oneshot.data.medmnist_data import MedMNISTSplit
    from secure_oneshot.data.proxy_images import ProxyImages

    for images in (np.array([[[0, 255], [128, 64]]], dtype=np.uint8), np.arange(24, dtype=np.uint8).reshape(2, 2, 2, 3) * 10):
        x = proxy_tensor(ProxyImages(images, "test", ""))
        channels = 1 if images.ndim == 3 else 3
        site_view = to_dataset(MedMNISTSplit("x", "train", images, np.zeros(len(images), dtype=np.int64), 2, channels, "binary-class"))
        assert x.shape == (len(images), channels, 2, 2) and torch.equal(x, site_view.tensors[0])
    assert float(x.min()) == -1.0 and float(proxy_tensor(ProxyImages(np.full((1, 2, 2), 255, np.uint8), "", "")).max()) == 1.0


# --- the proxy methods' batches -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sites() -> list[torch.nn.Module]:
    return [tiny(1).eval(), tiny(2).eval()]


def public(n: int = 20) -> torch.Tensor:
    return torch.linspace(-1, 1, n).view(n, 1, 1, 1).expand(n, 1, SIZE, SIZE).contiguous()


def proxy_source(sites, method: str, images: torch.Tensor | None, share: float = 0.5) -> SnapshotSource:
    cfg = inversion(batch_size=8, steps=6, snapshot_every=2)
    return SnapshotSource(sites, Ensemble(sites), cfg, SynthesisMethod(method, proxy_share=share), PLAIN_LOOP, proxy_images=images)


def test_proxy_batches_are_fresh_public_images_labelled_by_the_teacher_only(sites, monkeypatch) -> None:
    monkeypatch.setattr(sources_module, "synthesize_batch", lambda *a, **k: pytest.fail("proxy must not invert"))
    images = public()
    src = proxy_source(sites, "proxy", images)
    batches = src.epoch(0)
    assert len(batches) == 3
    levels = {round(float(v), 4) for v in images[:, 0, 0, 0]}
    for i, (x, a) in enumerate(batches):
        assert x.shape == (8, 1, SIZE, SIZE) and torch.equal(a, torch.ones(8)) and batches.teacher_only(i)
        # jitter rolls, never changes an image's pixels: every image is one of the public ones, none twice
        drawn = [round(float(v), 4) for v in x[:, 0].mean(dim=(1, 2))]
        assert set(drawn) <= levels and len(set(drawn)) == 8
    assert not all(torch.equal(b1[0], b2[0]) for b1, b2 in zip(batches, batches[1:]))   # a fresh draw per step
    again = proxy_source(sites, "proxy", images).epoch(0)
    assert all(torch.equal(b1[0], b2[0]) for b1, b2 in zip(batches, again))             # reproducible from the seed
    assert not torch.equal(src.epoch(1)[0][0], batches[0][0])                            # and new each epoch


def test_a_proxy_set_smaller_than_the_batch_is_drawn_again(sites) -> None:
    batches = proxy_source(sites, "proxy", public(3)).epoch(0)
    assert all(x.shape == (8, 1, SIZE, SIZE) for x, _ in batches)


def test_inversion_plus_proxy_concatenates_a_snapshot_and_proxy_images(sites) -> None:
    src = proxy_source(sites, "inversion+proxy", public(), share=0.25)
    batches = src.epoch(0)
    assert src.n_proxy == 2 and len(batches) == 3
    for i, (x, a) in enumerate(batches):
        assert x.shape == (8, 1, SIZE, SIZE)
        assert a[:6].tolist() == pytest.approx([i / 3] * 6) and a[6:].tolist() == [1.0, 1.0]
        assert not batches.teacher_only(i)   # the snapshot's images still weigh the noise-adapted teacher


def test_proxy_methods_need_matching_proxy_images(sites) -> None:
    with pytest.raises(ConfigError, match="needs proxy images"):
        proxy_source(sites, "proxy", None)
    with pytest.raises(ConfigError, match="the sites take"):
        proxy_source(sites, "inversion+proxy", torch.zeros(4, 3, SIZE, SIZE))
    with pytest.raises(ConfigError, match="proxy_share"):
        SynthesisMethod("inversion+proxy", proxy_share=1.0)
    with pytest.raises(ConfigError, match="needs public proxy images"):
        DistillJob(preset="smoke", method=SynthesisMethod("proxy"))


def test_distillation_runs_on_proxy_images(sites) -> None:
    result = distill(tiny(3), sites, inversion(batch_size=8, steps=4), DistillConfig(epochs=1), execution=PLAIN_LOOP,
                     method=SynthesisMethod("proxy"), proxy_images=public())
    assert len(result.history) == 1 and result.history[0]["loss"] > 0


# --- the command ----------------------------------------------------------------------------------------------------


def test_distill_command_with_a_proxy_folder_records_the_set(tmp_path: Path, capsys) -> None:
    model = make_real_model_dir(tmp_path / "site-a")
    for i in range(5):
        png(tmp_path / "public" / f"{i}.png", (28, 28), value=40 * i)
    out = tmp_path / "global"
    args = ["--json", "distill", "--model", str(model), "--preset", "smoke", "--epochs", "1", "--synthesis", "proxy",
            "--proxy-images", str(tmp_path / "public"), "--out", str(out), "--threads", "1"]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["method"]["method"] == "proxy"
    assert report["proxy_images"]["source"] == "directory public" and report["proxy_images"]["images"] == 5
    capsys.readouterr()
    assert main([*args[:10], "--out", str(tmp_path / "other")]) == 3   # no --proxy-images: a one-line config error
    err = capsys.readouterr().err
    assert "needs public proxy images" in err and "Traceback" not in err


def test_distill_with_public_images_weighs_the_teacher_by_consensus_on_them(tmp_path: Path, monkeypatch) -> None:
    import secure_oneshot.server.weighting as weighting

    monkeypatch.setattr(weighting, "EQUAL_PRESETS", ("paper",))   # smoke's own default is equal: test the rule on it
    # laid out as `train` writes them: every site's model directory is called "model"
    models = [make_real_model_dir(tmp_path / f"site-{c}" / "model", site=f"site-{c}") for c in "ab"]
    for i in range(6):
        png(tmp_path / "public" / f"{i}.png", (28, 28), value=40 * i)
    out = tmp_path / "global"
    assert main(["--json", "distill", *[a for m in models for a in ("--model", str(m))], "--preset", "smoke", "--epochs", "1",
                 "--synthesis", "proxy", "--proxy-images", str(tmp_path / "public"), "--out", str(out), "--threads", "1"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert [s["name"] for s in report["sites"]] == ["site-a/model", "site-b/model"]   # one row per site, not one "model"
    weighting_record = report["teacher_weighting"]
    assert weighting_record["scheme"] == "consensus"   # the default where the server holds public images
    assert len(weighting_record["weights"]) == 2 and all(len(row) == 2 for row in weighting_record["weights"])


# --- studies ----------------------------------------------------------------------------------------------------------


def test_a_study_names_a_proxy_set_per_flag_and_never_the_hospitals_own() -> None:
    from secure_oneshot.research.experiment import study_from_text

    base = '[study]\nname = "p"\nflags = ["pneumoniamnist"]\n[server]\nmethods = ["inversion", "inversion+proxy"]\n'
    study = study_from_text(base + 'proxy_images = { pneumoniamnist = "breastmnist:train" }\n')
    assert dict(study.proxy_images) == {"pneumoniamnist": "breastmnist:train"}
    assert {c.method for c in study.cells()} == {"inversion", "inversion+proxy"}
    with pytest.raises(ConfigError, match="needs server.proxy_images for pneumoniamnist"):
        study_from_text(base)
    with pytest.raises(ConfigError, match="the hospitals' own data set"):
        study_from_text(base + 'proxy_images = { pneumoniamnist = "pneumoniamnist:val" }\n')


# --- a public set carved out of the pool (demo --public-fraction) ---------------------------------------------------


def test_public_records_go_to_no_site_and_leave_the_site_draw_alone_when_none_are_taken() -> None:
    from secure_oneshot.data.partition import Partition, _site_indices, partition_indices, public_indices

    labels = np.random.default_rng(3).integers(0, 2, 2000)
    plain = Partition(n_sites=5, scheme="dirichlet", alpha=0.5, seed=4)
    assert all(np.array_equal(a, b) for a, b in zip(partition_indices(labels, plain), _site_indices(labels, plain)))
    carved = Partition(n_sites=5, scheme="dirichlet", alpha=0.5, seed=4, public_fraction=0.1)
    parts, public = partition_indices(labels, carved), public_indices(len(labels), carved)
    assert len(public) == 200 and np.array_equal(public, public_indices(len(labels), carved))   # fixed by the seed
    held = np.concatenate(parts)
    assert len(np.intersect1d(held, public)) == 0 and len(held) + len(public) == len(labels) and len(np.unique(held)) == len(held)
    with pytest.raises(ConfigError, match="public_fraction"):
        Partition(public_fraction=1.0)


def test_the_demo_writes_the_public_records_images_only_and_the_server_reads_them(tmp_path: Path, data_root) -> None:  # noqa: F811
    from secure_oneshot.data.partition import public_indices
    from secure_oneshot.demo import DemoConfig, demo_partition, public_images_path

    cfg = DemoConfig(out=tmp_path, data_root=str(data_root), preset="smoke", public_fraction=0.05)
    partition = demo_partition(cfg, cfg.resolved_preset(), tmp_path)
    with np.load(data_root / "pneumoniamnist.npz") as npz:
        pool = np.concatenate([npz["train_images"], npz["val_images"]])
    expected = pool[public_indices(len(pool), partition)]
    with np.load(public_images_path(tmp_path), allow_pickle=False) as npz:
        assert npz.files == ["images"]                                  # no labels reach the server
    proxy = load_proxy_images(str(public_images_path(tmp_path)), size=28, channels=1)
    assert np.array_equal(proxy.images, expected) and proxy.source == "file public-images.npz"
    assert json.loads((tmp_path / "partition.json").read_text())["public_records"] == len(expected) == round(0.05 * len(pool))
    assert cfg.resolved_synthesis == "proxy"


@pytest.mark.parametrize("arrays, message", [({"images": np.zeros((2, 28, 28), np.float32)}, "expected uint8"),
                                             ({"images": np.zeros((2, 14, 14), np.uint8)}, "expected uint8"),
                                             ({"pixels": np.zeros((2, 28, 28), np.uint8)}, "not a proxy image file"),
                                             ({"images": np.array([{"a": 1}], dtype=object)}, "not a proxy image file")])
def test_a_bad_proxy_file_is_refused(tmp_path: Path, arrays, message: str) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=message):
        load_proxy_images(str(path), size=28, channels=1)


def test_a_study_can_take_its_public_set_from_the_pool_and_its_sites_are_cached_apart() -> None:
    from dataclasses import replace

    from secure_oneshot.research.experiment import _cache_key, _site_setup, study_from_text

    text = ('[study]\nname = "p"\nflags = ["pneumoniamnist"]\npublic_fraction = 0.1\n'
            '[site]\nepsilons = [8.0]\n[server]\nmethods = ["inversion", "proxy"]\n')
    study = study_from_text(text)
    cell = study.cells()[0]
    cfg, preset = _site_setup(study, cell, None)
    assert cfg.public_fraction == 0.1
    without = replace(cfg, public_fraction=0.0)
    assert _cache_key(cfg, preset) != _cache_key(without, preset)      # other site models
    plain, plain_preset = _site_setup(study_from_text(text.replace("public_fraction = 0.1\n", "").replace(', "proxy"', "")), cell, None)
    assert _cache_key(plain, plain_preset) == _cache_key(without, preset)   # fraction 0 is a study without a public set


def test_a_stopped_cell_starts_over_instead_of_meeting_its_old_bundles(tmp_path: Path, monkeypatch) -> None:
    """A distillation checkpoint is fingerprinted with the accepted bundles, and a rerun exports new ones: the cell's
    leftovers (inbox, ledger, checkpoint) go, so the rerun neither trips over them nor mixes them in."""
    from secure_oneshot.research import experiment

    study = experiment.study_from_text('[study]\nname = "p"\nflags = ["pneumoniamnist"]\nsites = 2\n')
    cell = study.cells()[0]
    leftover = tmp_path / "cells" / cell.id / "server" / "global" / "checkpoint" / "epoch-000001" / "state.json"
    leftover.parent.mkdir(parents=True)
    leftover.write_text("{}")
    monkeypatch.setattr(experiment, "_cached_sites", lambda *a: [tmp_path / "a", tmp_path / "b"])

    class Stop(Exception):
        pass

    def export_all(*args, **kwargs):
        assert not leftover.exists()
        raise Stop

    monkeypatch.setattr(experiment, "export_all", export_all)
    with pytest.raises(Stop):
        experiment.run_cell(study, cell, tmp_path, None, say=lambda line: None)


def test_site_models_from_directories_get_names_that_tell_them_apart(tmp_path: Path) -> None:
    from secure_oneshot.server.site_models import distinct_names

    assert distinct_names([tmp_path / "h1" / "model", tmp_path / "h2" / "model"]) == ["h1/model", "h2/model"]
    assert distinct_names([tmp_path / "m1", tmp_path / "m2"]) == ["m1", "m2"]
    assert distinct_names([tmp_path / "a" / "x" / "model", tmp_path / "b" / "x" / "model", tmp_path / "y"]) == \
        ["a/x/model", "b/x/model", "y"]
    assert distinct_names([tmp_path / "h1" / "model", tmp_path / "h1" / "model"]) == ["model", "model"]   # the same model twice
