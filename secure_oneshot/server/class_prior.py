"""Match the global model's class prior to its teacher's on the server's public images (post-processing).

Why: on five seeds without DP (PneumoniaMNIST, 5 hospitals, public-image distillation, ``consensus`` teacher;
``benchmarks/RESULTS.md``), the distilled student ranked the test images as well as its teacher (AUC within
0.012) but called more of them "pneumonia" than the teacher did (74-82 % of the test images against 71-78 %),
which cost it 0.02-0.05 accuracy.  The ranking is right and the decision point is off: a per-class offset on the
logits moves the decision point and leaves every ranking (AUC) unchanged.

What is fitted: one offset ``b`` per class, added to the student's logits, by maximum likelihood against the
teacher's predicted class probabilities on the public images,

    b = argmin_b  mean_i  CE( softmax(teacher_i),  softmax(student_i + b) ).

The loss is convex in ``b`` (a log-sum-exp of an affine map), so the minimum is unique up to a constant added to
every class (which changes no probability; ``b`` is reported with mean 0); at the minimum the student's mean
predicted probability of each class equals the teacher's.  It is the bias half of bias-corrected temperature
scaling (Alexandari et al., ICML 2020) with the teacher in place of labels: no label, no site record, no privacy
budget; the teacher is the same weighted ensemble the student was distilled from.  Measured alternatives on the
same five seeds (RESULTS): matching the hard rate of the teacher's decisions did as well without DP, fitting to
the teacher's hard decisions broke epsilon-8 students (their logits are small, so the offsets overshot: ACC fell
to 0.625 and 0.671 on two of five seeds).

Matching copies the teacher's decision point, so it helps where the teacher decides better than the student: on
BreastMNIST (62 public images, teachers at 0.75 balanced accuracy) it left accuracy unchanged over five seeds and
cost 0.03 balanced accuracy (RESULTS); ``DistillJob.prior_matching`` turns it off.

**With the sites' label counts** (every site released its DP ``label_counts`` artifact) the target is the
federation's class shares, the released counts pooled, instead of the teacher (:func:`match_class_shares`).  Why:
DP sites move their decision point to the one that maximises *balanced* accuracy on their own records
(``client.threshold``), so their teacher calls about half of the public images "pneumonia" where three quarters
of the hospitals' records are; the student copied that point.  For accuracy on the hospitals' population the
decision point belongs where the model's class shares equal the population's.  What is matched there is the share
of *decisions* (for two classes the quantile of the logit margin), not the mean probability: DP students are
unconfident (margins within +-0.4), and moving their mean probability to 0.75 called every image positive on both
draws measured (RESULTS, "The DP demo's decision point").  It assumes the public images are a sample of the
hospitals' population (the demo's are: a random tenth of the records).  The pooled counts are post-processing of
DP releases: no further privacy budget.

``b`` is folded into the bias of the student's last linear layer, so the global model's file and architecture
stay as they are; the fold is checked on the public images (the logits must move by exactly ``b``), and when a
model's logits do not come from such a layer nothing is changed and the report says why.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

FIT_TOLERANCE = 1e-6        # largest |mean student probability - mean teacher probability| accepted after the fit
FOLD_TOLERANCE = 1e-4       # largest |logit change - b| accepted after folding b into the last layer (float32)


TEACHER = "teacher"            # target: the teacher's mean class probabilities on the public images
LABEL_COUNTS = "label_counts"  # target: the pooled released label counts' class shares, as shares of decisions
PRIOR_TARGETS = (TEACHER, LABEL_COUNTS)


@dataclass
class PriorMatch:
    """What matching did: the fitted offsets, the target, and the student's values before and after on the public
    images (mean class probabilities against the teacher; shares of decisions against the label counts)."""

    images: int
    offsets: list[float]
    target_values: list[float]
    before: list[float]
    after: list[float]
    target: str = TEACHER
    applied: bool = True
    reason: str = ""

    def record(self) -> dict[str, Any]:
        def rounded(values: list[float]) -> list[float]:
            return [round(v, 6) for v in values]
        out: dict[str, Any] = {"images": self.images, "applied": self.applied, "target": self.target,
                               "offsets": rounded(self.offsets)}
        if self.target == TEACHER:
            out.update(teacher_mean_probability=rounded(self.target_values),
                       student_mean_probability_before=rounded(self.before), student_mean_probability_after=rounded(self.after))
        else:
            out.update(label_count_shares=rounded(self.target_values),
                       student_decision_shares_before=rounded(self.before), student_decision_shares_after=rounded(self.after))
        if self.reason:
            out["reason"] = self.reason
        return out


def fit_class_offsets(student_logits: Tensor, teacher_probs: Tensor, max_iter: int = 200) -> Tensor:
    """The per-class offsets ``b`` (mean 0) minimising ``mean CE(teacher_probs, softmax(student_logits + b))``.

    Newton's method in float64 on the convex loss, from ``b = 0``; the Hessian is singular along the all-ones
    direction (adding a constant changes nothing), so the step is solved in the space of mean-0 offsets.
    """
    z = student_logits.detach().double()
    target = teacher_probs.detach().double().mean(dim=0)
    k = z.shape[1]
    b = torch.zeros(k, dtype=torch.float64)
    centre = torch.eye(k, dtype=torch.float64) - 1.0 / k       # projection onto mean-0 offsets
    for _ in range(max_iter):
        p = torch.softmax(z + b, dim=1)
        grad = p.mean(dim=0) - target
        if grad.abs().max() < FIT_TOLERANCE / 10:
            break
        hess = (torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)).mean(dim=0)
        step = torch.linalg.lstsq(centre @ hess @ centre + 1e-12 * torch.eye(k, dtype=torch.float64),
                                  centre @ grad).solution
        b = b - _damped(z, target, b, centre @ step)
    return b - b.mean()


def _damped(z: Tensor, target: Tensor, b: Tensor, step: Tensor) -> Tensor:
    """The Newton step, halved until the loss does not rise (far from the minimum a full step can overshoot)."""
    def loss(offsets: Tensor) -> Tensor:
        return -(target * torch.log_softmax(z + offsets, dim=1).mean(dim=0)).sum()
    start = loss(b)
    for _ in range(30):
        if loss(b - step) <= start:
            return step
        step = step / 2
    return step


def last_linear(model: nn.Module, num_classes: int) -> nn.Linear | None:
    """The model's last ``nn.Linear`` with ``num_classes`` outputs and a bias (where its logits come from), if any."""
    found = None
    for module in model.modules():
        if isinstance(module, nn.Linear) and module.out_features == num_classes and module.bias is not None:
            found = module
    return found


def decision_shares(logits: Tensor) -> Tensor:
    """``(N, K)`` logits -> each class's share of the argmax decisions ``(K,)`` (float64)."""
    return torch.bincount(logits.argmax(dim=1), minlength=logits.shape[1]).double() / len(logits)


def fit_decision_shares(student_logits: Tensor, shares: Tensor, max_iter: int = 500) -> Tensor:
    """The per-class offsets ``b`` (mean 0) after which the student's argmax decisions fall into the classes in the
    proportions ``shares`` (as nearly as ``N`` images allow).

    Two classes: exact, from the quantile of the logit margin.  More: proportional updates
    ``b += (log shares - log decided shares) / 2``, keeping the offsets with the smallest total deviation.
    """
    z = student_logits.detach().double()
    target = shares.detach().double().clamp(min=0)
    target = target / target.sum()
    n, k = z.shape
    if k == 2:
        margin = z[:, 1] - z[:, 0]
        # positive exactly when margin > t, where t leaves target[1] of the margins above it
        t = torch.quantile(margin, float(1 - target[1])) if target[1] < 1 else margin.min() - 1
        return torch.stack([t / 2, -t / 2])
    b = torch.zeros(k, dtype=torch.float64)
    best, best_gap = b.clone(), float("inf")
    floor = 0.5 / n   # a class no image is given yet still has a finite log share
    for _ in range(max_iter):
        decided = decision_shares(z + b)
        gap = (decided - target).abs().sum().item()
        if gap < best_gap:
            best, best_gap = b.clone(), gap
        if gap <= 1.0 / n:
            break
        b = b + 0.5 * (target.clamp(min=floor).log() - decided.clamp(min=floor).log())
    return best - best.mean()


def match_class_prior(student: nn.Module, images: Tensor, teacher_probs: Tensor, chunk: int = 512) -> PriorMatch:
    """Fit the class offsets of ``student`` (eval mode) to ``teacher_probs`` on ``images`` and fold them in.

    ``images`` are the public images as the student sees them, ``teacher_probs`` the teacher's ``(N, K)`` class
    probabilities on them.  ``student`` is changed in place (only its last layer's bias) when the fold checks out.
    """
    student.eval()
    before = _logits(student, images, chunk)
    offsets = fit_class_offsets(before, teacher_probs)
    target = teacher_probs.double().mean(dim=0).tolist()
    return _fold(student, images, before, offsets, target, TEACHER, chunk,
                 lambda logits: torch.softmax(logits.double(), dim=1).mean(dim=0).tolist())


def match_class_shares(student: nn.Module, images: Tensor, shares: Tensor, chunk: int = 512) -> PriorMatch:
    """Fit the class offsets of ``student`` (eval mode) so that its decisions on ``images`` fall into the classes in
    the proportions ``shares`` (the pooled label counts), and fold them in as :func:`match_class_prior` does."""
    student.eval()
    before = _logits(student, images, chunk)
    offsets = fit_decision_shares(before, shares)
    target = (shares.double().clamp(min=0) / shares.double().clamp(min=0).sum()).tolist()
    return _fold(student, images, before, offsets, target, LABEL_COUNTS, chunk, lambda logits: decision_shares(logits).tolist())


def _fold(student: nn.Module, images: Tensor, before: Tensor, offsets: Tensor, target: list[float], kind: str,
          chunk: int, measure: Any) -> PriorMatch:
    """Add ``offsets`` to the bias of the student's last linear layer if its logits then move by exactly them."""
    k = before.shape[1]
    measured_before = measure(before)
    layer = last_linear(student, k)
    if layer is None:
        return PriorMatch(len(images), offsets.tolist(), target, measured_before, measured_before, kind, applied=False,
                          reason=f"no final linear layer with {k} outputs and a bias to fold the offsets into")
    with torch.no_grad():
        original = layer.bias.detach().clone()
        layer.bias.add_(offsets.to(layer.bias.dtype))
    after = _logits(student, images, chunk)
    moved = (after.double() - before.double() - offsets).abs().max().item()
    if moved > FOLD_TOLERANCE:
        with torch.no_grad():
            layer.bias.copy_(original)
        return PriorMatch(len(images), offsets.tolist(), target, measured_before, measured_before, kind, applied=False,
                          reason=f"the logits do not come straight from the last linear layer (moved {moved:.3g} off the offsets)")
    return PriorMatch(len(images), offsets.tolist(), target, measured_before, measure(after), kind)


def _logits(model: nn.Module, images: Tensor, chunk: int) -> Tensor:
    device = next(model.parameters()).device
    with torch.no_grad():
        return torch.cat([model(images[i:i + chunk].to(device)).float().cpu() for i in range(0, len(images), chunk)])
