"""Where the global student's weights start: random (the published method) or one site's released weights.

Why a site: a student started from a site's weights ends near that site's function, moved towards the teacher's.
Where the chosen site trained without DP it was about as good as the teacher, and the student gained (measured in
benchmarks/RESULTS.md, "The student's starting point": ``proxy``, ``consensus``, five seeds each).  On BreastMNIST
no-DP federations (62 public images) the global AUC went from 0.035 below the teacher to 0.012 below; on
PneumoniaMNIST no-DP federations (523 public images) from 0.951 to 0.958, with ACC >= 0.837 on every seed.  A
DP-trained site can be much weaker than the teacher built from several of them (epsilon 8, one seed: 0.883 against
0.919 AUC), and the student stayed near it (0.891): at epsilon 8 on PneumoniaMNIST the mean AUC fell by 0.004.  So
a *default* start (``explicit=False``) uses the chosen site only when it trained without DP; ``site`` asked for
explicitly starts from it either way.  On the data-free route (``inversion``, ``agreement`` teacher, no DP, five
seeds each, 6 server epochs) the site start raised every mean: on BreastMNIST the global AUC from 0.777 to 0.847
(teacher 0.856) and ACC from 0.653 to 0.696; on PneumoniaMNIST ACC from 0.819 to 0.835 and AUC from 0.957 to 0.959
(RESULTS, "The student started from the heaviest site on the data-free route").

Which site: the one with the largest mean over classes of its normalised teacher weight
(:func:`~.ensemble.normalise_weights`), among the sites the student can start from: the same architecture, input
channels, classes and normalisation as the student, and the same tensors (a BatchNorm site whose running
statistics were withheld has fewer).  Ties go to the first site given, so with equal weights it is the first
compatible site.  The site's weights are part of its release, so starting from them costs no privacy; under DP
the student is post-processing of the DP models either way.

What this module does not do: train, or choose between ``random`` and ``site`` (:class:`~.study.DistillJob`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..models.classifier import ClassifierConfig
from .ensemble import normalise_weights, same_architecture
from .site_models import SiteModel

__all__ = ["STUDENT_INITS", "StudentStart", "starting_site", "start_student"]

STUDENT_INITS = ("random", "site")


@dataclass(frozen=True)
class StudentStart:
    """The student's starting point, for the report: ``random``, ``imagenet`` or ``site`` (with its name and share)."""

    kind: str
    site: str = ""
    share: float = 0.0
    note: str = ""

    def record(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind}
        if self.kind == "site":
            out.update(site=self.site, teacher_weight_share=round(self.share, 4))
        if self.note:
            out["note"] = self.note
        return out


def _compatible(site: SiteModel, student_cfg: ClassifierConfig, student: nn.Module) -> bool:
    """Same config (which also names the normalisation's variant) and the same module tree, tensor names and shapes
    (a BatchNorm site whose running statistics were withheld has fewer buffers)."""
    return site.config == student_cfg and same_architecture([student, site.model])


def starting_site(sites: Sequence[SiteModel], weights: torch.Tensor | None, student_cfg: ClassifierConfig,
                  student: nn.Module) -> tuple[int, float] | None:
    """``(index, share)`` of the site to start from (module docstring), or ``None`` when no site is compatible.

    ``weights``: the teacher's ``(sites, classes)`` weights, ``None`` for equal weights.  ``share`` is the site's
    mean normalised weight over classes (1.0 when it alone is the teacher).
    """
    if weights is None:
        shares = torch.full((len(sites),), 1.0 / len(sites))
    else:
        shares = normalise_weights(weights, len(sites)).mean(dim=1)
    candidates = [i for i, site in enumerate(sites) if _compatible(site, student_cfg, student)]
    if not candidates:
        return None
    best = max(candidates, key=lambda i: (float(shares[i]), -i))   # the largest share; ties to the first site
    return best, float(shares[best])


def start_student(student: nn.Module, choice: str, sites: Sequence[SiteModel], weights: torch.Tensor | None,
                  student_cfg: ClassifierConfig, *, explicit: bool) -> StudentStart:
    """Load the chosen starting point into ``student`` (in place) and say what it was.

    ``choice``: ``random`` (leave the student as built) or ``site``.  A ``site`` start that no site can give is an
    error when it was asked for (``explicit``), else the student stays random and the report says why; so does a
    default start whose chosen site trained with DP (module docstring).

    Raises:
        ConfigError: ``explicit`` ``site`` start and no site has the student's architecture and tensors.
    """
    if choice == "random":
        return StudentStart("random")
    found = starting_site(sites, weights, student_cfg, student)
    if found is None:
        why = (f"no site has the student's architecture ({student_cfg.architecture}, {student_cfg.norm} norm) "
               "and tensors")
        if explicit:
            raise ConfigError(f"cannot start the student from a site: {why}",
                              hint="pass --student-init random, or --student ARCH naming a site's architecture")
        return StudentStart("random", note=why)
    index, share = found
    if sites[index].dp_classifier and not explicit:
        return StudentStart("random", note=f"the heaviest site, {sites[index].name}, trained with DP: a student started "
                                           "from DP weights stays near them")
    with torch.no_grad():
        student.load_state_dict(sites[index].model.state_dict())
    return StudentStart("site", site=sites[index].name, share=share)
