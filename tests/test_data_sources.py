"""A site's own images (folder, CSV manifest, DICOM) load as the same records as MedMNIST, and hostile inputs are refused.

Equivalence uses real PneumoniaMNIST records written out as PNG files and DICOM files; DICOM values are checked
against a hand computation of the rescale and window; a patient name in the header appears in no output.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from secure_oneshot.cli import main
from secure_oneshot.client.site import run_site
from secure_oneshot.client.site_config import site_config_from_text
from secure_oneshot.client.train import DataConfig, site_data
from secure_oneshot.data import load_medmnist
from secure_oneshot.data.image_files import SourceConfig
from secure_oneshot.data.sources import load_source, source_site_data
from secure_oneshot.errors import ConfigError, DataError

pydicom = pytest.importorskip("pydicom")

CLASSES = ("normal", "pneumonia")   # PneumoniaMNIST's label 0 and 1
SECRET_NAME, SECRET_ID = "Doe^Jane^Zyxwvut", "PID-SECRET-4711"


def write_dicom(path: Path, pixels: np.ndarray, *, slope: float | None = None, intercept: float | None = None,
                center=None, width=None, photometric: str = "MONOCHROME2") -> Path:
    """A single-frame grey DICOM written by pydicom, carrying a patient name and id."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID, ds.StudyDescription = SECRET_NAME, SECRET_ID, "CHEST Zyxwvut"
    ds.Modality = "CT"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    signed = pixels.dtype == np.int16
    ds.BitsAllocated = ds.BitsStored = pixels.dtype.itemsize * 8
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = int(signed)
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if center is not None:
        ds.WindowCenter, ds.WindowWidth = center, width
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="module")
def records():
    """200 PneumoniaMNIST training records in label order (the folder source's canonical order)."""
    split = load_medmnist("pneumoniamnist", "train")
    first = split.subset(np.arange(200))
    return first.subset(np.argsort(first.labels, kind="stable"))


@pytest.fixture(scope="module")
def written(records, tmp_path_factory):
    """The same records as a class folder, a CSV manifest of PNGs, a DICOM manifest and a MedMNIST-format file."""
    root = tmp_path_factory.mktemp("own")
    folder, pngs, dicoms = root / "folder", root / "manifest", root / "dicom"
    rows, dicom_rows = ["path,label"], ["file,diagnosis"]
    for i, (image, label) in enumerate(zip(records.images, records.labels)):
        name = CLASSES[label]
        (folder / name).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / name / f"{i:04d}.png")
        (pngs / "img").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(pngs / "img" / f"{i:04d}.png")
        rows.append(f"img/{i:04d}.png,{name}")
        dicoms.mkdir(exist_ok=True)
        # window centre 128, width 256 is the identity on 0..255 under the DICOM linear VOI function
        write_dicom(dicoms / f"{i:04d}.dcm", image.astype(np.uint16), slope=1, intercept=0, center=128, width=256)
        dicom_rows.append(f"{i:04d}.dcm,{name}")
    (pngs / "manifest.csv").write_text("\n".join(rows) + "\n")
    (dicoms / "manifest.csv").write_text("\n".join(dicom_rows) + "\n")
    empty = np.zeros((0, 28, 28), np.uint8)
    np.savez(root / "site.npz", train_images=records.images, train_labels=records.labels[:, None], val_images=empty,
             val_labels=np.zeros((0, 1), np.int64), test_images=records.images[:20], test_labels=records.labels[:20, None])
    return root


def sources(root: Path) -> dict[str, SourceConfig]:
    return {"folder": SourceConfig("folder", CLASSES, root=str(root / "folder")),
            "manifest": SourceConfig("manifest", CLASSES, manifest=str(root / "manifest" / "manifest.csv")),
            "dicom": SourceConfig("dicom", CLASSES, manifest=str(root / "dicom" / "manifest.csv"), path_column="file",
                                  label_column="diagnosis")}


@pytest.mark.parametrize("kind", ["folder", "manifest", "dicom"])
def test_source_loads_the_same_records_as_medmnist(kind, records, written):
    loaded = load_source(sources(written)[kind])
    assert loaded.images.dtype == np.uint8 and loaded.labels.dtype == np.int64
    assert np.array_equal(loaded.images, records.images)
    assert np.array_equal(loaded.labels, records.labels)
    ours = source_site_data(sources(written)[kind], 0.1, seed=3)
    theirs = site_data(DataConfig(file=str(written / "site.npz")), 0.1, seed=3)
    assert ours.train.fingerprint() == theirs.train.fingerprint()
    assert ours.val.fingerprint() == theirs.val.fingerprint()
    assert (ours.train.n_classes, ours.train.n_channels, ours.train.task) == (2, 1, "binary-class")


def test_training_from_a_folder_gives_the_same_weights_as_from_the_medmnist_records(written, tmp_path):
    train = "[model]\narchitecture = \"small-cnn\"\n[train]\nepochs = 1\nbatch_size = 64\nseed = 5\n"
    own = site_config_from_text(f'[data]\nsource = "folder"\nroot = "{written / "folder"}"\nclasses = ["normal", "pneumonia"]\n'
                                f'[output]\ndir = "{tmp_path / "a"}"\n' + train)
    npz = site_config_from_text(f'[data]\nfile = "{written / "site.npz"}"\n[output]\ndir = "{tmp_path / "b"}"\n' + train)
    a, b = run_site(own), run_site(npz)
    for name, tensor in a.classifier.model.state_dict().items():
        assert tensor.equal(b.classifier.model.state_dict()[name]), name
    data = a.record["training"]["data"]
    assert data["source"] == "folder" and data["classes"] == list(CLASSES) and "flag" not in data
    assert data["fingerprint"] == b.record["training"]["data"]["fingerprint"]
    assert str(written) not in (tmp_path / "a" / "record.json").read_text()   # no local path leaves in the record


def test_rgb_and_resize_to_the_configured_size(tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (50, 80), np.uint8)).save(tmp_path / "a" / "wide.png")
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), np.uint8)).save(tmp_path / "b" / "rgb.jpg")
    Image.fromarray((rng.integers(0, 65536, (30, 30))).astype(np.uint16)).save(tmp_path / "b" / "deep.png")
    loaded = load_source(SourceConfig("folder", ("a", "b"), root=str(tmp_path), size=64, channels=3))
    assert loaded.images.shape == (3, 64, 64, 3) and loaded.labels.tolist() == [0, 1, 1]


# ---- DICOM -----------------------------------------------------------------------------------------------------


def test_dicom_rescale_and_first_window_match_a_hand_computation(tmp_path):
    pixels = np.zeros((4, 4), np.int16)
    pixels[0, :4] = [0, 532, 700, 512]     # modality values -1024, 40, 376, 0 under slope 2, intercept -1024
    write_dicom(tmp_path / "ct.dcm", pixels, slope=2, intercept=-1024, center=[40, 400], width=[400, 1500])
    (tmp_path / "m.csv").write_text("path,label\nct.dcm,a\nct.dcm,b\n")
    image = load_source(SourceConfig("dicom", ("a", "b"), manifest=str(tmp_path / "m.csv"), size=28)).images[0]
    small = load_source(SourceConfig("dicom", ("a", "b"), manifest=str(tmp_path / "m.csv"), size=28))
    assert small.images.shape == (2, 28, 28)
    # Window centre 40, width 400 (the first of each): below -160 -> 0, above 239 -> 255, else ((v - 39.5) / 399 + 0.5) * 255.
    from secure_oneshot.data.dicom_files import decode_dicom

    grey = np.asarray(decode_dicom((tmp_path / "ct.dcm").read_bytes(), "ct.dcm"))
    assert grey[0, :4].tolist() == [0, 128, 255, 102]   # 127.82 -> 128; 102.26 -> 102
    assert grey[1, 0] == 0                               # stored 0 -> -1024
    assert image.dtype == np.uint8


def test_dicom_without_a_window_uses_min_max_and_monochrome1_is_inverted(tmp_path):
    from secure_oneshot.data.dicom_files import decode_dicom

    pixels = np.array([[100, 200], [300, 500]], np.uint16)
    write_dicom(tmp_path / "a.dcm", pixels)
    assert np.asarray(decode_dicom((tmp_path / "a.dcm").read_bytes(), "a.dcm")).tolist() == [[0, 64], [128, 255]]  # 63.75, 127.5
    write_dicom(tmp_path / "b.dcm", pixels, photometric="MONOCHROME1")
    assert np.asarray(decode_dicom((tmp_path / "b.dcm").read_bytes(), "b.dcm")).tolist() == [[255, 191], [127, 0]]


def test_no_dicom_header_value_leaves_through_train_check_or_errors(tmp_path, capsys):
    rng = np.random.default_rng(1)
    rows = ["path,label"]
    for i in range(24):
        write_dicom(tmp_path / f"{i}.dcm", rng.integers(0, 4096, (32, 32)).astype(np.uint16), slope=1, intercept=-1000,
                    center=1000, width=2000)
        rows.append(f"{i}.dcm,{CLASSES[i % 2]}")
    good = tmp_path / "good.bin"
    good.write_bytes((tmp_path / "0.dcm").read_bytes())
    (tmp_path / "broken.dcm").write_bytes((tmp_path / "1.dcm").read_bytes()[:700])   # header kept, pixel data cut
    (tmp_path / "manifest.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "bad.csv").write_text("\n".join(rows + ["broken.dcm,normal"]) + "\n")
    config = tmp_path / "site.toml"
    config.write_text(f'[data]\nsource = "dicom"\nmanifest = "{tmp_path / "manifest.csv"}"\nclasses = ["normal", "pneumonia"]\n'
                      f'[train]\nepochs = 1\n[output]\ndir = "{tmp_path / "model"}"\n')
    assert main(["train", "--config", str(config)]) == 0
    assert main(["data", "check", "--config", str(config), "--json"]) == 0
    assert main(["data", "check", "--config", str(config), "--manifest", str(tmp_path / "bad.csv")]) == 15
    with pytest.raises(DataError) as caught:
        load_source(SourceConfig("dicom", CLASSES, manifest=str(tmp_path / "bad.csv")))
    assert "broken.dcm" in caught.value.message and "\n" not in caught.value.message
    printed = capsys.readouterr()
    assert "broken.dcm" in printed.out
    outputs = printed.out + printed.err + caught.value.message + caught.value.hint
    outputs += "".join(p.read_text(errors="replace") for p in (tmp_path / "model").iterdir() if p.suffix == ".json")
    outputs += "".join(p.read_bytes().decode("latin-1") for p in (tmp_path / "model").iterdir())
    for secret in ("Zyxwvut", "SECRET", "4711", "Doe"):
        assert secret not in outputs


def test_a_non_dicom_file_in_a_dicom_manifest_is_one_line_naming_it(tmp_path):
    (tmp_path / "x.dcm").write_bytes(b"not a dicom file at all" * 10)
    (tmp_path / "m.csv").write_text("path,label\nx.dcm,a\n")
    with pytest.raises(DataError, match=r"^x\.dcm: not a readable DICOM image") as caught:
        load_source(SourceConfig("dicom", ("a", "b"), manifest=str(tmp_path / "m.csv")))
    assert caught.value.exit_code == 15


# ---- hostile inputs --------------------------------------------------------------------------------------------


def _folder(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    for name in CLASSES:
        (root / name).mkdir(parents=True)
        Image.fromarray(np.full((28, 28), 7, np.uint8)).save(root / name / "ok.png")
    return root


def _refused(cfg: SourceConfig, pattern: str) -> DataError:
    with pytest.raises(DataError, match=pattern) as caught:
        load_source(cfg)
    assert "\n" not in caught.value.message and caught.value.exit_code == 15
    return caught.value


def test_a_symlink_in_the_folder_is_refused(tmp_path):
    root = _folder(tmp_path)
    os.symlink("/etc/hostname", root / "normal" / "leak.png")
    _refused(SourceConfig("folder", CLASSES, root=str(root)), r"^normal/leak\.png: is a symbolic link")


def test_a_symlinked_class_folder_is_refused(tmp_path):
    root = _folder(tmp_path)
    os.symlink(tmp_path, root / "other")
    _refused(SourceConfig("folder", CLASSES + ("other",), root=str(root)), r"^other: is a symbolic link")


def test_a_fifo_with_an_image_name_is_refused_without_blocking(tmp_path):
    root = _folder(tmp_path)
    os.mkfifo(root / "normal" / "pipe.png")
    _refused(SourceConfig("folder", CLASSES, root=str(root)), r"^normal/pipe\.png: is not a regular file")


def test_a_socket_is_refused(tmp_path):
    root = _folder(tmp_path)
    path = root / "normal" / "s.png"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
        _refused(SourceConfig("folder", CLASSES, root=str(root)), r"^normal/s\.png: (is not a regular file|cannot open)")


def test_a_non_image_with_a_png_name_is_refused(tmp_path):
    root = _folder(tmp_path)
    (root / "pneumonia" / "notes.png").write_text("this is a text file")
    _refused(SourceConfig("folder", CLASSES, root=str(root)), r"^pneumonia/notes\.png: not a readable PNG, JPEG or TIFF image")


def test_a_truncated_png_is_refused(tmp_path):
    root = _folder(tmp_path)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 200), np.uint8)).save(root / "normal" / "cut.png")
    blob = (root / "normal" / "cut.png").read_bytes()
    (root / "normal" / "cut.png").write_bytes(blob[: len(blob) // 2])
    _refused(SourceConfig("folder", CLASSES, root=str(root)), r"^normal/cut\.png: corrupt image")


def test_a_decompression_bomb_is_refused_before_decoding(tmp_path):
    root = _folder(tmp_path)
    Image.new("1", (10_000, 6_000)).save(root / "normal" / "bomb.png")   # 60 Mpixel, a few kB on disk
    _refused(SourceConfig("folder", CLASSES, root=str(root)), r"^normal/bomb\.png: 10000 x 6000 pixels, over the")


def test_odd_file_names_are_escaped_on_one_line(tmp_path):
    root = _folder(tmp_path)
    try:
        (root / "normal" / os.fsdecode(b"bad\nname\xff.png")).write_bytes(b"garbage")
    except (OSError, UnicodeError):
        pytest.skip("the file system refuses such names")
    error = _refused(SourceConfig("folder", CLASSES, root=str(root)), r"^normal/bad\\x0aname\\xff\.png: not a readable")
    assert "\n" not in error.message


@pytest.mark.parametrize("cell, problem", [
    ("../outside.png", r"leaves the manifest's folder"),
    ("img/../../outside.png", r"leaves the manifest's folder"),
    ("/etc/passwd", r"absolute path"),
    ("C:\\\\data\\\\x.png", r"absolute path"),
    ("missing.png", r"cannot open"),
])
def test_manifest_paths_outside_its_folder_are_refused(tmp_path, cell, problem):
    (tmp_path / "outside.png").write_bytes(b"")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "manifest.csv").write_text(f"path,label\n{cell},normal\n")
    _refused(SourceConfig("manifest", CLASSES, manifest=str(tmp_path / "m" / "manifest.csv")), problem)


def test_a_manifest_path_through_a_symlinked_folder_is_refused(tmp_path):
    (tmp_path / "m").mkdir()
    os.symlink("/etc", tmp_path / "m" / "sub")
    (tmp_path / "m" / "manifest.csv").write_text("path,label\nsub/hostname,normal\n")
    _refused(SourceConfig("manifest", CLASSES, manifest=str(tmp_path / "m" / "manifest.csv")), r"sub on the way is a symbolic link")


def test_manifest_problems(tmp_path):
    m = tmp_path / "manifest.csv"
    m.write_text("file,label\nx.png,normal\n")
    _refused(SourceConfig("manifest", CLASSES, manifest=str(m)), r"no column 'path'")
    m.write_bytes(b"path,label\n\xff\xfe.png,normal\n")
    _refused(SourceConfig("manifest", CLASSES, manifest=str(m)), r"not UTF-8")
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(tmp_path / "x.png")
    m.write_text("path,label\nx.png,cat\n")
    _refused(SourceConfig("manifest", CLASSES, manifest=str(m)), r"label 'cat' is not in the label map")


def test_cli_errors_are_one_line_without_traceback(tmp_path, capsys):
    root = _folder(tmp_path)
    (root / "normal" / "notes.png").write_text("text")
    config = tmp_path / "site.toml"
    config.write_text(f'[data]\nsource = "folder"\nroot = "{root}"\nclasses = ["normal", "pneumonia"]\n[train]\nepochs = 1\n'
                      f'[output]\ndir = "{tmp_path / "model"}"\n')
    assert main(["train", "--config", str(config)]) == 15
    err = capsys.readouterr().err
    assert "Traceback" not in err and "normal/notes.png: not a readable" in err and "data check" in err
    assert not (tmp_path / "model").exists()   # refused before training: nothing written


def test_site_config_keys_are_checked_per_source():
    with pytest.raises(ConfigError) as caught:
        site_config_from_text('[data]\nsource = "folder"\nflag = "pneumoniamnist"\nchannels = 2\n')
    text = caught.value.message
    assert "data.flag: applies to source medmnist only" in text and "data.channels: must be one of 1, 3" in text
    assert "data.root: source folder needs root" in text and "data.classes: missing" in text
    with pytest.raises(ConfigError, match="data.classes: applies to sources folder, manifest and dicom only"):
        site_config_from_text('[data]\nclasses = ["a", "b"]\n')
    with pytest.raises(ConfigError):
        site_config_from_text('[data]\nsource = "manifest"\nmanifest = "m.csv"\nclasses = ["a", "a"]\n')
    assert site_config_from_text("[data]\n").source is None   # MedMNIST stays the default
