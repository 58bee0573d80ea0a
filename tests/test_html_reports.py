"""The HTML reports a reviewer opens (demo, study, privacy audit, audit log): escaped, self-contained, structured
for screen readers, and rendered by headless Chromium with no console message, no network request, and every
table and image visible.

The inputs are small fakes (a run folder's JSON files, a study's rows, tiny PNGs, a real signed audit log), so
nothing is trained.  Browser tests skip when Chromium is not installed, unless ``SECURE_ONESHOT_REQUIRE_BROWSER=1``
(CI), which turns the skip into a failure.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from secure_oneshot.audit import AuditEvent, append_event
from secure_oneshot.cli.audit_cmd import register
from secure_oneshot.errors import AuditLogError
from secure_oneshot.keys import Identity
from secure_oneshot.research.html_audit import attack_verdict, privacy_audit_html
from secure_oneshot.research.html_report import Markup, esc, png_image, table
from secure_oneshot.research.html_study import demo_report_html, study_report_html, write_demo_report, write_study_report
from secure_oneshot.research.study_table import ROW_FIELDS

from .browser_helpers import Rendered, find_chromium, render

HOSTILE = '<script>alert("x")</script><img src=http://evil.example/p.png onerror=alert(1)>'
"""A string from data (site name, reason, file name) that must come out as text."""
NOW = datetime(2026, 11, 26, 12, 0, tzinfo=timezone.utc)


def png(width: int = 48, height: int = 32, seed: int = 0) -> bytes:
    """A small RGB PNG (a gradient), written with the standard library."""
    rows = b"".join(b"\x00" + bytes(v for x in range(width) for v in ((x * 5 + seed) % 256, (y * 7) % 256, ((x + y) * 3) % 256))
                    for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


# --- inputs --------------------------------------------------------------------------------------


def fake_demo_run(run: Path, *, dp: bool = False) -> Path:
    metrics = {"hospital-1": {"acc": 0.81, "auc": 0.88, "balanced_acc": 0.77}, "ensemble (teacher)": {"acc": 0.85, "auc": 0.92, "balanced_acc": 0.8},
               "global (distilled)": {"acc": 0.84, "auc": 0.9, "balanced_acc": 0.79}, HOSTILE: {"acc": 0.5, "auc": float("nan"), "balanced_acc": 0.5}}
    outcomes = [{"file": "hospital-1.sob", "outcome": "accepted", "bundle_id": "ab" * 16, "sender": "hospital-1", "error": "", "reason": ""},
                {"file": f"0-tampered-{HOSTILE}.sob", "outcome": "quarantined", "sender": "", "error": "BundleAuthError",
                 "reason": f"decryption failed {HOSTILE}"}]
    results = {"flag": "pneumoniamnist", "preset": "smoke", "sites": 2, "alpha": 0.5, "seed": 0, "dp_epsilon": 8.0 if dp else None,
               "stats_epsilon": 0.8 if dp else None, "metrics": metrics, "outcomes": outcomes, "seconds": {"train": 12.3, "distill": 4.0},
               "paths": {"run": str(run), "report": str(run / "server/global/report.md"), HOSTILE: "x"}}
    report = {"preset": "smoke", "method": {"method": "inversion"}, "teacher_weighting": {"scheme": "label-counts"},
              "sites": [{"name": "hospital-1", "bundle_id": "ab" * 16, "architecture": "small-cnn", "generator": False, "feature_stats": dp,
                         "bn_statistics": not dp, "label_counts": True},
                        {"name": HOSTILE, "bundle_id": "cd" * 16, "architecture": "small-cnn", "generator": True, "feature_stats": False,
                         "bn_statistics": None, "label_counts": False}],
              "privacy": {"global_model": "The global model is computed from the site releases alone (post-processing).",
                          "sites": [{"site": "hospital-1", "bundle_id": "ab" * 16, "summary": "record-level DP, epsilon 8", "dp": True,
                                     "worst_epsilon": 8.0},
                                    {"site": HOSTILE, "bundle_id": "cd" * 16, "summary": f"no DP {HOSTILE}", "dp": False,
                                     "worst_epsilon": None}],
                          "sites_without_dp": [HOSTILE]}}
    partition = {"flag": "pneumoniamnist", "partition": {"n_sites": 2, "scheme": "dirichlet", "alpha": 0.5, "seed": 0},
                 "sites": [{"site": 0, "records": 30, "label_counts": [10, 20]}, {"site": 1, "records": 25, "label_counts": [20, 5]}]}
    (run / "server" / "global").mkdir(parents=True)
    (run / "results.json").write_text(json.dumps(results))
    (run / "partition.json").write_text(json.dumps(partition))
    (run / "server" / "global" / "report.json").write_text(json.dumps(report))
    (run / "server" / "global" / "synthetic.png").write_bytes(png(64, 64))
    return run


def fake_rows(method: str = HOSTILE) -> list[dict[str, Any]]:
    rows = []
    for eps in ("inf", 8.0, 2.0):
        for seed in (0, 1):
            row: dict[str, Any] = {f: None for f in ROW_FIELDS}
            row.update(flag="pneumoniamnist", alpha=0.5, epsilon=eps, generator_epsilon="none", withheld="none", method=method, seed=seed)
            for model in ("sites", "ensemble", "ensemble_equal", "fedavg", "global"):
                for metric in ("acc", "auc", "balanced_acc"):
                    row[f"{model}_{metric}"] = 0.7 + 0.01 * seed + (0.1 if eps == "inf" else 0.0)
            row.update(epsilon_composed_max=None if eps == "inf" else eps, mia_sites_auc_max=0.52 + 0.01 * seed, mia_global_auc=0.5,
                       mia_sites_epsilon_max=0.1)
            rows.append(row)
    return rows


def fake_plots(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, stem in enumerate(("privacy-utility-pneumoniamnist-a0.5-inversion", "labels-pneumoniamnist-a0.5-s0",
                              "trajectory-pneumoniamnist-a0.5-eps8-inversion")):
        paths.append(folder / f"{stem}.png")
        paths[-1].write_bytes(png(120, 60, seed=i))
        (folder / f"{stem}.svg").write_text("<svg/>")  # beside every PNG; not embedded
    return paths


def fake_audit(pairs: Path | None = None) -> dict[str, Any]:
    attack = {"name": "loss threshold", "auc": 0.63, "tpr_at_1pct_fpr": 0.04, "tpr_at_01pct_fpr": 0.01, "epsilon_lower_bound": 0.42,
              "members": 200, "non_members": 200}
    generator = {"attacks": [{**attack, "name": "denoising loss", "auc": 0.51}], "membership": attack, "lira_skipped": HOSTILE,
                 "memorisation": {"near_copies": 1, "images": 64, "copy_distance": 0.1, "ratio": 0.5, "median_train_distance": 0.4,
                                  "median_ratio": 1.1}}
    return {"model": f"sites/{HOSTILE}/model", "site": HOSTILE, "members": 200, "non_members": 200, "accountant_epsilon": None,
            "delta": 1e-5, "attacks": [attack], "generator": generator,
            "inversion": [{"prior": "bn", "images": 32, "median_train_distance": 0.5, "median_ratio_train_to_unseen": 0.97, "near_copies": 0}],
            "protocol": "members: training records; non-members: validation slice + test split; same count per class"}


def audit_cli(*argv: str | os.PathLike[str]) -> Any:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"), argparse.ArgumentParser(add_help=False))
    args = parser.parse_args(["audit", *(os.fspath(a) for a in argv)])
    return args.handler(args)


def signed_log(folder: Path) -> tuple[Path, Path]:
    """A site's log of three events (one reason hostile) and the site's public identity file."""
    folder.mkdir(parents=True, exist_ok=True)
    site = Identity.generate("site-a")
    log = folder / "audit.jsonl"
    events = [AuditEvent("policy-sign", "ok", reason="approved by the privacy office", policy_id="pneumonia-export", policy_version=3),
              AuditEvent("export", "refused", reason=f"denied {HOSTILE}", details={"denied": ["bn1.running_mean"], "rule": 4}),
              AuditEvent("export", "ok", bundle_id="0123456789abcdef0123456789abcdef", policy_id="pneumonia-export", policy_version=3,
                         dp={"classifier": "7.9"})]
    for i, event in enumerate(events):
        append_event(log, site, event, now=NOW + timedelta(minutes=i))
    signer = folder / "site-a.pub"
    signer.write_text(site.public.to_text())
    return log, signer


# --- structure (html.parser) ---------------------------------------------------------------------


class Structure(HTMLParser):
    """What a screen reader and the no-network rule care about."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.attrs: list[tuple[str, dict[str, str | None]]] = []
        self.headings: list[tuple[str, str]] = []
        self.tables = 0
        self.captions = 0
        self.th_without_scope = 0
        self.text: list[str] = []
        self._heading: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.attrs.append((tag, dict(attrs)))
        if tag in ("h1", "h2", "h3"):
            self._heading = tag
            self.headings.append((tag, ""))
        self.tables += tag == "table"
        self.captions += tag == "caption"
        self.th_without_scope += tag == "th" and dict(attrs).get("scope") not in ("col", "row")

    def handle_endtag(self, tag: str) -> None:
        if tag == self._heading:
            self._heading = None

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._heading:
            tag, text = self.headings[-1]
            self.headings[-1] = (tag, text + data)


def check_structure(text: str) -> Structure:
    s = Structure()
    s.feed(text)
    assert text.startswith("<!DOCTYPE html>")
    assert ("html", {"lang": "en"}) in s.attrs
    assert [t for t, _ in s.headings].count("h1") == 1 and s.headings[0][0] == "h1"
    assert any(t == "h2" for t, _ in s.headings)
    levels = [int(t[1]) for t, _ in s.headings]
    assert all(b - a <= 1 for a, b in zip(levels, levels[1:])), f"a heading level is skipped: {levels}"
    assert s.tables >= 1 and s.captions == s.tables, "every table has a caption"
    assert s.th_without_scope == 0, "every th says whether it heads a column or a row"
    assert "th" in s.tags
    for tag, attrs in s.attrs:
        assert tag not in ("script", "link", "iframe", "object", "embed", "base", "form", "frame", "audio", "video", "source")
        if tag == "img":
            assert (attrs.get("alt") or "").strip(), "every image has alt text"
            assert (attrs.get("src") or "").startswith("data:image/png;base64,")
        for name, value in attrs.items():
            assert not name.startswith("on"), f"event handler attribute {name}"
            if name in ("src", "href", "srcset", "poster", "action", "data") and value is not None:
                assert value.startswith("data:"), f"{tag} {name}={value[:40]!r} would be fetched"
    assert ("meta", {"http-equiv": "Content-Security-Policy",
                     "content": "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"}) in s.attrs
    style = text[text.index("<style>"):text.index("</style>")].lower()
    assert "url(" not in style and "@import" not in style and "http" not in style
    return s


def hostile_escaped(text: str, structure: Structure) -> None:
    assert "<script>" not in text and "<img src=http" not in text
    assert "&lt;script&gt;" in text
    assert any(HOSTILE in chunk for chunk in structure.text) or HOSTILE in "".join(structure.text)


# --- the writer and each page --------------------------------------------------------------------


def test_markup_escapes_everything_not_built_here() -> None:
    assert esc(HOSTILE) == HOSTILE.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")
    assert esc(Markup("<b>x</b>")) == "<b>x</b>"
    cell = table(HOSTILE, [HOSTILE], [[HOSTILE, 1]])
    assert "<script>" not in cell and cell.count("&lt;script&gt;") == 3


def test_images_need_alt_text_and_png_bytes() -> None:
    with pytest.raises(ValueError, match="alt"):
        png_image(png(), " ")
    with pytest.raises(ValueError, match="not a PNG"):
        png_image(b"<svg onload=alert(1)>", "an image")
    assert 'width="48" height="32"' in png_image(png(), "a gradient")


def test_demo_report_structure_and_escaping(tmp_path: Path) -> None:
    run = fake_demo_run(tmp_path / "run")
    text = demo_report_html(run, plot_labels=False)
    s = check_structure(text)
    hostile_escaped(text, s)
    assert [h for _, h in s.headings[1:]] == ["Results", "Settings", "What each hospital released", "Labels held by each hospital",
                                              "Synthetic images: from noise to realistic", "Privacy position", "Files of this run"]
    assert "No differential privacy in this run" in text and "1 bundle(s) accepted, 1 quarantined" in text
    assert "signed privacy statement" in text and "record-level DP, epsilon 8" in text and "(post-processing)." in text
    assert text.count("<img ") == 1  # the synthetic grid (label plot off)


def test_demo_report_dp_position_and_label_plot(tmp_path: Path) -> None:
    run = fake_demo_run(tmp_path / "run", dp=True)
    path = write_demo_report(run)
    text = path.read_text(encoding="utf-8")
    check_structure(text)
    assert path == run / "report.html" and not list(run.glob(".report.html*"))  # atomic: no temporary left
    assert "Differential privacy: epsilon 8 per hospital" in text and "no patient-level guarantee" in text
    assert "DP feature statistics at epsilon 0.8" in text
    assert text.count("<img ") == 2 and (run / "plots" / "label-distribution.png").is_file()


def test_demo_report_of_a_partial_run_says_what_is_missing(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text(json.dumps({"flag": "x", "metrics": {"global": {"acc": 1, "auc": 1, "balanced_acc": 1}}}))
    text = demo_report_html(run, plot_labels=False)
    check_structure(text)
    assert "No synthetic.png in this run" in text and "No partition.json in this run" in text and "<img" not in text


def test_study_report(tmp_path: Path) -> None:
    plots = fake_plots(tmp_path / "plots")
    text = study_report_html(HOSTILE, fake_rows(), [*plots, *(p.with_suffix(".svg") for p in plots)], privacy_audit=True)
    s = check_structure(text)
    hostile_escaped(text, s)
    assert "0.805 ± 0.005" in text and "0.705 ± 0.005" in text  # global AUC over seeds 0 and 1, without and with DP
    assert "Privacy evidence" in text and "0.525 ± 0.005" in text
    assert text.count("<img ") == 3  # the PNGs; SVGs are not embedded
    assert ["Privacy-utility trade-off", "Labels held by each site", "Synthesis trajectories"] == \
        [h for t, h in s.headings if h in ("Privacy-utility trade-off", "Labels held by each site", "Synthesis trajectories")]


def test_privacy_audit_page(tmp_path: Path) -> None:
    pairs = tmp_path / "pairs.png"
    pairs.write_bytes(png())
    text = privacy_audit_html(fake_audit(), pairs)
    s = check_structure(text)
    hostile_escaped(text, s)
    assert "leaks membership" in text and "none: the classifier was not trained with differential privacy" in text
    assert text.count("<img ") == 1 and "0.42" in text


@pytest.mark.parametrize(("auc", "kind"), [(0.5, "ok"), (0.549, "ok"), (0.57, "warn"), (0.6, "bad"), (0.95, "bad")])
def test_attack_verdict_bands(auc: float, kind: str) -> None:
    assert attack_verdict(auc)[0] == kind


def test_audit_show_html_verified(tmp_path: Path) -> None:
    log, signer = signed_log(tmp_path)
    out = tmp_path / "log.html"
    result = audit_cli("show", log, "--signer", signer, "--html", out)
    assert result.data["verified"] is True and result.data["html"] == str(out)
    text = out.read_text(encoding="utf-8")
    s = check_structure(text)
    hostile_escaped(text, s)
    assert "VERIFIED: chain intact" in text and "NOT VERIFIED" not in text and "FAILED" not in text
    assert "DP epsilon classifier 7.9" in text and "policy pneumonia-export v3" in text and "2026-11-26T12:02:00Z" in text


def test_audit_show_html_unverified_without_signer(tmp_path: Path) -> None:
    log, _ = signed_log(tmp_path)
    out = tmp_path / "log.html"
    result = audit_cli("show", log, "--html", out, "--last", "2")
    assert result.data["verified"] is False
    text = out.read_text(encoding="utf-8")
    check_structure(text)
    assert "NOT VERIFIED" in text and "2 shown of 3" in text


def test_audit_show_html_tampered_log_fails_and_says_so(tmp_path: Path) -> None:
    log, signer = signed_log(tmp_path)
    lines = log.read_bytes().split(b"\n")
    lines[1] = lines[1].replace(b"denied", b"allowed", 1)  # an edited reason: the signature no longer verifies
    log.write_bytes(b"\n".join(lines))
    out = tmp_path / "log.html"
    with pytest.raises(AuditLogError, match="line 2") as info:
        audit_cli("show", log, "--signer", signer, "--html", out)
    assert info.value.exit_code == 14
    text = out.read_text(encoding="utf-8")
    check_structure(text)
    assert "VERIFICATION FAILED" in text and "line 2" in text and "allowed" in text


def test_audit_show_html_wrong_signer_fails(tmp_path: Path) -> None:
    log, _ = signed_log(tmp_path)
    other = tmp_path / "other.pub"
    other.write_text(Identity.generate("someone-else").public.to_text())
    with pytest.raises(AuditLogError):
        audit_cli("show", log, "--signer", other, "--html", tmp_path / "log.html")
    assert "VERIFICATION FAILED" in (tmp_path / "log.html").read_text(encoding="utf-8")


# --- in the browser ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chromium() -> str:
    found = find_chromium()
    if found is None:
        reason = "Chromium not found (install Debian's `chromium` package, or set SECURE_ONESHOT_CHROMIUM)"
        if os.environ.get("SECURE_ONESHOT_REQUIRE_BROWSER") == "1":
            pytest.fail(f"{reason}; SECURE_ONESHOT_REQUIRE_BROWSER=1 forbids skipping")
        pytest.skip(reason)
    return found


@pytest.fixture(scope="module")
def rendered(chromium: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Rendered]]:
    """Each report written to disk and rendered, two browsers side by side (they mostly wait)."""
    root = tmp_path_factory.mktemp("html")
    pages: dict[str, Path] = {"demo": write_demo_report(fake_demo_run(root / "run", dp=True))}
    plots = fake_plots(root / "study" / "plots")
    pages["study"] = write_study_report(root / "study", "quick", fake_rows(), plots, privacy_audit=True)
    (root / "pairs.png").write_bytes(png())
    pages["privacy-audit"] = root / "audit.html"
    pages["privacy-audit"].write_text(privacy_audit_html(fake_audit(), root / "pairs.png"), encoding="utf-8")
    log, signer = signed_log(root / "log")
    pages["audit-log"] = root / "audit-log.html"
    audit_cli("show", log, "--signer", signer, "--html", pages["audit-log"])
    bad = root / "bad.html"  # what the checks must catch: a fetched image, a console error
    bad.write_text('<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>bad</title></head><body><h1>bad</h1>'
                   '<table class="main"><caption>c</caption><tr><th scope="col">a</th></tr></table>'
                   '<img alt="remote" src="http://evil.example/p.png"><script>console.error("broken")</script></body></html>')
    pages["bad"] = bad
    with ThreadPoolExecutor(max_workers=2) as pool:  # two at a time: the machines running this are small
        futures = {name: pool.submit(render, chromium, path, root / "browser", name) for name, path in pages.items()}
        return {name: (pages[name], f.result()) for name, f in futures.items()}


def assert_clean_render(page: Path, result: Rendered, images: int) -> None:
    layout = result.layout
    assert "error" not in layout, (layout, result.stderr[-3000:])
    assert result.console == [], "the page logged to the console"
    assert result.page_requests == [], "the page asked for something over the network"
    main = [t for t in layout["tables"] if "main" in t["cls"].split()]
    assert len(main) == 1 and main[0]["width"] > 100 and main[0]["height"] > 30
    assert all(t["display"] != "none" and t["visibility"] == "visible" and t["width"] > 0 for t in layout["tables"])
    assert len(layout["images"]) == images
    for img in layout["images"]:
        assert img["complete"] and img["natural_width"] > 0, "the image decoded"
        assert img["width"] > 10 and img["height"] > 10 and img["visibility"] == "visible" and img["display"] != "none"
        assert float(img["opacity"]) > 0.5 and img["alt"]
    assert layout["title"] and layout["h1"] == [layout["title"]]
    assert result.screenshot.is_file() and result.screenshot.stat().st_size > 1000
    from PIL import Image

    with Image.open(result.screenshot) as shot:
        assert shot.size[0] >= 1000
        extrema = shot.convert("L").getextrema()
        assert extrema[1] - extrema[0] > 100, "the screenshot is not blank"


@pytest.mark.parametrize(("name", "images"), [("demo", 2), ("study", 3), ("privacy-audit", 1), ("audit-log", 0)])
def test_report_renders_in_chromium(rendered: dict[str, tuple[Path, Rendered]], name: str, images: int) -> None:
    page, result = rendered[name]
    assert_clean_render(page, result, images)
    print(f"{name}: page load {result.layout['load_ms']:.0f} ms, browser process {result.wall_s:.1f} s, screenshot {result.screenshot}")


def test_browser_checks_catch_a_page_that_fetches_and_logs(rendered: dict[str, tuple[Path, Rendered]]) -> None:
    """The checks above can fail: a remote image and a console message are both seen."""
    _, result = rendered["bad"]
    assert result.page_requests == ["http://evil.example/p.png"]
    assert any('"broken"' in line for line in result.console)
    assert not result.layout["images"][0]["natural_width"]
    with pytest.raises(AssertionError):
        assert_clean_render(rendered["bad"][0], result, 1)


# --- the commands that write the pages (their heavy work replaced by fixed results) ---------------


def test_audit_privacy_out_html(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from secure_oneshot.cli import main
    from secure_oneshot.research import privacy_audit

    out = tmp_path / "dpia.html"
    (tmp_path / "dpia-closest-pairs.png").write_bytes(png())  # what the generator audit draws beside the report
    monkeypatch.setattr(privacy_audit, "audit_model_dir", lambda *a, **k: fake_audit())
    assert main(["audit-privacy", "--model", str(tmp_path), "--out", str(out)]) == 0
    text = out.read_text(encoding="utf-8")
    check_structure(text)
    assert "Membership inference" in text and text.count("<img ") == 1 and str(out) in capsys.readouterr().out


def test_experiment_writes_report_html(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from secure_oneshot.cli import main
    from secure_oneshot.research import experiment

    study = SimpleNamespace(name="tiny", privacy_audit=True, cells=lambda: [None] * 6)
    monkeypatch.setattr(experiment, "load_study", lambda path: study)
    monkeypatch.setattr(experiment, "run_study", lambda *a, **k: fake_rows("inversion"))  # a real method: it names the plot files
    assert main(["experiment", str(tmp_path / "study.toml"), "--out", str(tmp_path / "out")]) == 0
    text = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    check_structure(text)
    assert "Study tiny" in text and "Privacy-utility trade-off" in text
    assert text.count("<img ") == 1 and 'alt="pneumoniamnist-a0.5-inversion: test AUC (left) and ACC (right)' in text  # drawn by plots
