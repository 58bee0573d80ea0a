"""``secure-oneshot distill`` (server) and ``secure-oneshot demo`` (the whole study on one machine)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from .._internal.threads import add_threads_option, apply_threads, prefer_passive_openmp

prefer_passive_openmp()   # before the imports below load torch: OpenMP reads it once, at load (see _internal/threads.py)

from ..errors import ConfigError  # noqa: E402
from ..server.execution import Execution  # noqa: E402
from ..server.snapshot_store import DEFAULT_SNAPSHOT_MEMORY_MIB  # noqa: E402
from ..server.sources import METHODS, SynthesisMethod  # noqa: E402
from ..server.study import PRESETS, DistillJob  # noqa: E402
from ..server.weighting import WEIGHTINGS  # noqa: E402
from .output import Result  # noqa: E402

if TYPE_CHECKING:
    from ..demo import DemoConfig, DemoResult
    from ..keys import Identity
    from ..server.distributed import Distributed
    from ..server.site_models import SiteModel

__all__ = ["register", "PRESET_HELP"]

PRESET_HELP = ("auto: gpu on CUDA, else cpu. gpu is a REDUCED preset (200 inversion steps, every 2nd snapshot, 40 epochs), "
               "not the published method; paper: the method's own settings (500 steps, every snapshot, 100 epochs; "
               "GPU-sized); cpu: minutes on 2 cores")


def _execution(args: argparse.Namespace) -> Execution:
    return Execution(device=args.device, precision=args.precision, channels_last=not args.no_channels_last, batched=args.batched,
                     compile=args.compile)


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _sites(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from ..keys import load_trust_store
    from ..policy.load import load_ingest_policy
    from ..server.ingest import IngestFolders
    from ..server.site_models import load_accepted, load_model_dirs
    from .keys_cmd import trust_path
    from .secrets import load_private_identity

    if args.model:
        return load_model_dirs([Path(m) for m in args.model]), None
    if not (args.server_dir and args.key):
        raise ConfigError("say where the site models are", hint="--server-dir DIR --key SERVER.key (accepted bundles), or --model DIR ... (research)")
    identity = load_private_identity(args.key, args.passphrase_env)
    folders = IngestFolders.under(Path(args.server_dir))
    policy = load_ingest_policy(args.policy) if args.policy else None
    return load_accepted(folders, identity, load_trust_store(trust_path(args)), policy), (folders.audit_log, identity)


def _distill(args: argparse.Namespace) -> Result:
    from ..server.distributed import Distributed

    dist = Distributed.from_env(args.ddp_mode)   # torchrun's environment; a world of one otherwise
    apply_threads(args.threads if args.threads is not None or not dist.active else dist.threads())
    out = _run_folder(args)
    sites, audit_to = _sites(args)
    execution = _execution(args)
    with dist.failures_as_errors(out):   # another rank's death: one error line here, not a traceback
        if dist.active:
            execution = dataclasses.replace(execution, device=dist.device(args.device))
            dist.start(execution.torch_device)
        try:
            return _distill_job(args, dist, out, sites, audit_to, execution)
        finally:
            dist.stop()


def _run_folder(args: argparse.Namespace) -> Path:
    """``--out`` (default SERVER_DIR/global, or ./global); ``--resume RUN_DIR`` names it too, and must agree."""
    out = Path(args.out) if args.out else (Path(args.server_dir) / "global" if args.server_dir else Path("global"))
    if args.resume:   # "" (no folder given): the --out folder
        if args.out and Path(args.resume).resolve() != out.resolve():
            raise ConfigError(f"--resume {args.resume} and --out {args.out} name different run folders", hint="give one of them")
        out = Path(args.resume)
        if not out.is_dir():
            raise ConfigError(f"no run folder {out} to resume", hint="give the --out folder of the run to continue")
    return out


class _SilentResult(Result):
    """A result that prints nothing: under torchrun only rank 0 speaks (one report, one JSON object on stdout)."""

    def print(self, as_json: bool) -> None:
        pass


def _distill_job(args: argparse.Namespace, dist: Distributed, out: Path, sites: list[SiteModel],
                 audit_to: tuple[Path, Identity] | None, execution: Execution) -> Result:
    from ..data import load_medmnist, to_dataset
    from ..server.study import run_distillation

    preset = args.preset if args.preset != "auto" else ("gpu" if execution.torch_device.type == "cuda" else "cpu")
    job = DistillJob(preset=preset, student_arch=args.student, execution=execution, seed=args.seed, epochs=args.epochs,
                     noise_adapted=args.noise_adapted, image_size=args.image_size, teacher_weighting=args.teacher_weighting,
                     method=SynthesisMethod(args.synthesis, args.generator_share, args.generator_steps, args.proxy_share),
                     imagenet_weights=args.imagenet_weights or "", proxy_images=args.proxy_images or "", data_root=args.data_root,
                     snapshot_memory_mib=args.snapshot_memory_mib, prior_matching=not args.no_prior_matching,
                     prior_target=args.prior_target, site_recalibration=not args.no_site_recalibration,
                     class_evidence=args.class_evidence, student_init=args.student_init)
    test = to_dataset(load_medmnist(args.eval, "test", size=args.image_size, root=args.data_root)) if args.eval and dist.is_main else None
    if dist.is_main:
        _say(f"distilling from {len(sites)} site models ({', '.join(s.name for s in sites)}): preset {preset}, "
             f"synthesis {args.synthesis}, {execution.describe()}"
             + (f", {dist.world_size} ranks ({dist.mode})" if dist.active else ""))
    run = run_distillation(sites, out, job, test_set=test, progress=not args.json, audit_to=audit_to if dist.is_main else None,
                           resume=args.resume is not None, distributed=dist)
    if not dist.is_main:
        return _SilentResult({"rank": dist.rank})   # rank 0 reports (and wrote everything)
    lines = [f"global model -> {run.outputs['global.safetensors']} (sha256 {run.report['global_sha256'][:16]}...)"]
    matched = run.report.get("prior_matching")
    if matched:
        lines.append(f"  prior matched on {matched['images']} public images: class offsets "
                     + ", ".join(f"{v:+.3f}" for v in matched["offsets"])
                     + (" (to the sites' pooled label counts)" if matched.get("target") == "label_counts" else " (to the teacher)")
                     if matched["applied"]
                     else f"  prior matching not applied: {matched['reason']}")
    calibration = run.report.get("site_recalibration")
    if calibration:
        lines.append("  site decision points moved to the pooled label counts' class shares on the public images"
                     if calibration["applied"] else f"  site recalibration not applied: {calibration['reason']}")
    if run.metrics:
        from ..demo import metrics_table

        lines += [f"evaluated on {args.eval} test (last epoch; nothing selected on test):", *metrics_table(run.metrics)]
    lines += [f"  report  {run.outputs['report.md']}", f"  images  {run.outputs['synthetic.png']}"]
    if audit_to:
        lines.append(f"  audit   recorded in {audit_to[0]}")
    return Result({"outputs": run.outputs, "metrics": run.metrics, "history": run.history, "global_sha256": run.report["global_sha256"],
                   "execution": run.report["execution"], "prior_matching": matched, "site_recalibration": calibration}, lines)


def _demo(args: argparse.Namespace) -> Result:
    from ..demo import DemoConfig, run_demo, summary_lines
    from ..server.distributed import Distributed

    if Distributed.from_env().active:   # every rank would train and write its own hospitals
        raise ConfigError("the demo runs as one process, not under torchrun with several ranks",
                          hint="run `secure-oneshot demo --stop-after ingest --out RUN`, then the torchrun distill command it "
                               "prints (README, \"several GPUs\")")
    apply_threads(args.threads)
    out = Path(args.out) if args.out else Path(f"secure-oneshot-demo-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}")
    cfg = DemoConfig(out=out, flag=args.flag, data_root=args.data_root, preset=args.preset, sites=args.sites, alpha=args.alpha,
                     seed=args.seed, tamper=not args.no_tamper, centralised=not args.no_centralised, execution=_execution(args),
                     dp_epsilon=args.dp_epsilon, stats_epsilon=args.stats_epsilon, teacher_weighting=args.teacher_weighting,
                     class_evidence=args.class_evidence,
                     threshold_epsilon=args.threshold_epsilon, public_fraction=args.public_fraction, synthesis=args.synthesis,
                     stop_after=args.stop_after, size=args.size)
    result = run_demo(cfg, say=_say)
    if result.distill is None:
        return _server_half(args, cfg, result)
    data = {"run": str(result.out), "metrics": result.metrics, "seconds": result.seconds, "paths": result.paths,
            "outcomes": [o.__dict__ for o in result.outcomes]}
    return Result(data, summary_lines(result))


def _server_half(args: argparse.Namespace, cfg: DemoConfig, result: DemoResult) -> Result:
    """After ``demo --stop-after ingest``: the exact command for the server's half, on N processes under torchrun."""
    import shlex

    import torch

    from ..demo import server_command

    distill = [*server_command(cfg), *_execution_arguments(args)]
    nproc = max(1, torch.cuda.device_count()) if args.device != "cpu" else 1
    torchrun = ["torchrun", "--standalone", "--nproc-per-node", str(nproc), "-m", "secure_oneshot", *distill]
    lines = [f"hospitals done, bundles ingested under {result.paths['server']}; the server half (N processes: "
             "--nproc-per-node N; one process: `secure-oneshot` instead of `torchrun ... -m secure_oneshot`):",
             "  " + shlex.join(torchrun)]
    return Result({"run": str(result.out), "outcomes": [o.__dict__ for o in result.outcomes], "seconds": result.seconds,
                   "server_argv": distill, "torchrun": torchrun}, lines)


def _execution_arguments(args: argparse.Namespace) -> list[str]:
    """The execution options given to this command, as ``distill`` arguments."""
    given = ["--device", args.device]
    if args.precision != "auto":
        given += ["--precision", args.precision]
    if args.no_channels_last:
        given.append("--no-channels-last")
    if args.batched != "auto":
        given += ["--batched", args.batched]
    if args.compile:
        given.append("--compile")
    if args.threads is not None:
        given += ["--threads", str(args.threads)]
    return given


def _add_execution_options(parser: argparse.ArgumentParser, threads_note: str = "") -> None:
    group = parser.add_argument_group("execution")
    group.add_argument("--device", default="auto", help="auto (CUDA when visible), cpu, cuda, cuda:N")
    group.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                       help="bf16 autocast for forward passes (auto: where the device has bf16 arithmetic)")
    group.add_argument("--no-channels-last", action="store_true", help="keep NCHW memory layout")
    group.add_argument("--batched", choices=("auto", "on", "off"), default="auto",
                       help="run same-architecture site models as one vmap computation (auto: on CUDA only)")
    group.add_argument("--compile", action="store_true", help="torch.compile the student's training step (slow to start)")
    add_threads_option(group, threads_note)


def _add_weighting_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--teacher-weighting", choices=WEIGHTINGS,
                        help="how each site counts in the teacher, per class: agreement (data-free: each site's agreement "
                             "with the classes of one synthetic batch; the default), consensus (each site's agreement with "
                             "the teacher on the --proxy-images; the default where they are given), equal (the published "
                             "method; the default of --preset paper and smoke), label-counts (the sites' released DP class counts)")


def _add_class_evidence_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--class-evidence", choices=("require", "report"), default="require",
                        help="when every site released label counts and none shows records of both sides of a class beyond "
                             "the counts' noise, no site model can rank that class: require (the default) refuses with exit "
                             "status 17 before any work, report distils anyway and says so in the report")


def register(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:  # type: ignore[type-arg]
    from .keys_cmd import add_trust_option
    from .secrets import add_passphrase_option

    distill = commands.add_parser("distill", help="distil one global model from the accepted site models (server)", parents=[common],
                                  description="FedISCA-style synthesis + distillation from the site models alone.")
    source = distill.add_argument_group("site models (one of)")
    source.add_argument("--server-dir", metavar="DIR", help="server folder of `ingest`: uses only the bundles its registry in DIR/accepted lists and its ledger "
                        "accepted, each re-verified (audits to DIR/audit.jsonl)")
    source.add_argument("--model", action="append", metavar="DIR", help="research: a model directory (repeatable)")
    distill.add_argument("--key", metavar="FILE.key", help="the server's private key (with --server-dir)")
    distill.add_argument("--policy", metavar="POLICY.toml",
                         help="with --server-dir: the ingest policy every accepted bundle must pass again (default: the policy file "
                              "that accepted each bundle, as recorded in the registry; refused if that file changed since)")
    distill.add_argument("--out", metavar="DIR", help="output folder (default SERVER_DIR/global, or ./global)")
    distill.add_argument("--preset", choices=("auto", *PRESETS), default="auto", help=PRESET_HELP)
    distill.add_argument("--synthesis", choices=METHODS, default="inversion", help="where the images come from (default inversion)")
    distill.add_argument("--generator-share", type=float, default=0.5, help="mixed: fraction of each batch from the generators")
    distill.add_argument("--generator-steps", type=int, default=25, help="DDIM steps per generator sample")
    distill.add_argument("--proxy-images", metavar="FLAG:SPLIT|DIR",
                         help="proxy, inversion+proxy: public unlabelled images the server holds (a MedMNIST set under "
                              "--data-root, e.g. breastmnist:train, or a folder of PNG/JPEG/TIFF); labelled by the site models")
    distill.add_argument("--no-prior-matching", action="store_true",
                         help="with --proxy-images: keep the student's class offsets as trained (by default they are fitted "
                              "on the public images to the prior of --prior-target; AUC unchanged)")
    distill.add_argument("--prior-target", choices=("teacher", "label_counts"), default=None,
                         help="what prior matching copies: the teacher's mean class probabilities, or the class shares of "
                              "the sites' pooled label counts as shares of decisions (default: label_counts when every "
                              "site released them, else teacher)")
    distill.add_argument("--no-site-recalibration", action="store_true",
                         help="consensus teacher with every site's label counts: judge and pool the sites at their own "
                              "decision points (by default each site's is first moved to the pooled counts' class shares "
                              "on the public images; rankings unchanged)")
    distill.add_argument("--proxy-share", type=float, default=0.5, help="inversion+proxy: fraction of each batch from the proxy images")
    distill.add_argument("--student", metavar="ARCH", help="student architecture (default: the sites')")
    distill.add_argument("--student-init", choices=("random", "site"), default=None,
                         help="where the student's weights start: random (the published method), or the weights of the "
                              "site holding the largest share of the teacher's weight (same architecture needed; nothing "
                              "more is learnt about the site). Default: site with --synthesis proxy, inversion+proxy or "
                              "inversion (not with --preset paper) when that site trained without DP (measured: "
                              "benchmarks/RESULTS.md), else random")
    distill.add_argument("--epochs", type=int, help="override the preset's epochs")
    distill.add_argument("--noise-adapted", choices=("train-mode", "eval", "none"), help="override the noise-adapted teacher")
    _add_weighting_option(distill)
    _add_class_evidence_option(distill)
    distill.add_argument("--eval", metavar="FLAG", help="report metrics on this MedMNIST set's test split each epoch (never selects)")
    distill.add_argument("--data-root", metavar="DIR", help="MedMNIST folder for --eval and a MedMNIST --proxy-images set")
    distill.add_argument("--image-size", type=int, default=28,
                         help="image size of the site models (default 28); paper above 128 px: 50 images per batch, 1,000 "
                              "inversion steps, jitter 30 px and an ImageNet-initialised student, as published")
    distill.add_argument("--imagenet-weights", metavar="FILE.safetensors",
                         help="initialise the student from this local file of ImageNet weights (torchvision's resnet18 state "
                              "dict saved as safetensors; required by paper above 128 px). Nothing is downloaded at run time: "
                              "make the file once on a machine with internet access (README, \"224 px\")")
    distill.add_argument("--snapshot-memory-mib", type=float, default=DEFAULT_SNAPSHOT_MEMORY_MIB, metavar="MIB",
                         help="keep an epoch's synthetic snapshots in (device) memory up to this many MiB, the rest in a "
                              f"private temporary file read back one at a time; same results (default {DEFAULT_SNAPSHOT_MEMORY_MIB}: "
                              "every 28 px preset stays in memory; 224 px at the method's 1,000 steps needs the file)")
    distill.add_argument("--seed", type=int, default=0)
    distill.add_argument("--resume", nargs="?", const="", metavar="RUN_DIR",
                         help="continue the run in RUN_DIR (default: the --out folder) from its newest complete checkpoint "
                              "(none yet: from the start); the same options and site models are required (fingerprint)")
    distill.add_argument("--ddp-mode", choices=("faithful", "throughput"), default="faithful",
                         help="under torchrun: faithful splits the method's batch over the ranks (same global batch and "
                              "schedule), throughput gives every rank the full batch (README, \"several GPUs\")")
    _add_execution_options(distill)
    add_trust_option(distill)
    add_passphrase_option(distill)
    distill.set_defaults(handler=_distill)

    demo = commands.add_parser("demo", help="the whole study end to end on one machine: keys, sites, bundles, ingest, distillation",
                               parents=[common], description="Simulate hospitals and a server on PneumoniaMNIST; every artifact goes under one folder.")
    demo.add_argument("--data-root", metavar="DIR", help="MedMNIST folder (default $SECURE_ONESHOT_DATA, else ~/.medmnist)")
    demo.add_argument("--out", metavar="DIR", help="run folder (default ./secure-oneshot-demo-<UTC time>); must not exist or be empty")
    demo.add_argument("--flag", default="pneumoniamnist", help="MedMNIST dataset (default pneumoniamnist)")
    demo.add_argument("--size", type=int, choices=(28, 64, 128, 224), default=28,
                      help="MedMNIST+ image size (default 28): reads FLAG_SIZE.npz above 28 px; sites train ResNet-18 there")
    demo.add_argument("--preset", choices=("auto", "smoke", "cpu", "gpu", "paper"), default="auto",
                      help="smoke: about a minute; " + PRESET_HELP.replace("paper: ", "paper: sites with the published recipe "
                                                                           "(100 epochs, best-validation checkpoint) and "))
    demo.add_argument("--sites", type=int, help="number of hospitals (default: the preset's, 5)")
    demo.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration of the label split (default 0.5)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--dp-epsilon", type=float, metavar="EPS",
                      help="train the hospitals with DP-SGD (Opacus, the dp recipe) to this epsilon, every release included")
    demo.add_argument("--threshold-epsilon", type=float, metavar="EPS",
                      help="with --dp-epsilon on a binary task: budget of each hospital's DP decision threshold, taken out of "
                           "its epsilon (default a tenth of it; 0: none)")
    demo.add_argument("--stats-epsilon", type=float, metavar="EPS",
                      help="with --dp-epsilon: budget of the released DP feature statistics, taken out of it "
                           "(default a tenth of it)")
    demo.add_argument("--public-fraction", type=float, default=None, metavar="F",
                      help="set this fraction of the records aside, held by no hospital, as the server's public unlabelled "
                           "images (a simulation of a public set of the same modality; the distillation then uses them). "
                           "Default: 0.1 with --dp-epsilon on the cpu preset (data-free students from DP hospitals lose "
                           "their decision point: benchmarks/RESULTS.md), else 0; 0 runs the data-free method")
    demo.add_argument("--synthesis", choices=METHODS, help="the server's images (default: proxy with --public-fraction, "
                                                           "else inversion; generator methods need hospital generators)")
    demo.add_argument("--no-tamper", action="store_true", help="do not deliver the tampered bundle copy")
    demo.add_argument("--no-centralised", action="store_true", help="skip the pooled-data reference training")
    demo.add_argument("--stop-after", choices=("ingest",),
                      help="ingest: stop once the server has accepted the bundles and print the `torchrun ... distill` "
                           "command for the server half (N GPUs or CPU processes; README, \"several GPUs\")")
    _add_weighting_option(demo)
    _add_class_evidence_option(demo)
    _add_execution_options(demo, threads_note="; the demo also trains its hospitals in up to N worker processes of one "
                                         "thread each (1: one after another in this process, the same model files)")
    demo.set_defaults(handler=_demo)
