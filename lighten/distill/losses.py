"""Distillation losses: each a small function of tensors, registered by name so a recipe can
compose them with weights (``losses: {hinton: 1, attention: 1000}``).

The math lives in plain functions (``hinton_loss``, ``dkd_loss``, ...) that tests check against
hand-computed values; the registry wraps each as ``fn(batch, params) -> scalar`` and says what
it needs from a training step (the teacher's logits, matched features, embeddings, exit heads),
so the objective only hooks what the chosen losses read.

Any step's ``finetune: {distill: 0.5}`` keeps its meaning: cross-entropy plus 0.5 x the
soft-target term (``T^2 KL``) with the recipe's baseline as the teacher.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lighten.errors import ModelError, RecipeError, did_you_mean

# --------------------------------------------------------------------------- the math


def _check_same(student: Tensor, teacher: Tensor) -> None:
    if student.shape != teacher.shape:
        raise ModelError(f"teacher outputs {tuple(teacher.shape)} but the student "
                         f"{tuple(student.shape)}; distillation needs the same classes")


def soft_target_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))``, averaged over the batch.

    The ``T^2`` keeps gradient magnitudes comparable to cross-entropy whatever ``T`` is.
    """
    _check_same(student_logits, teacher_logits)
    t = temperature
    classes = student_logits.shape[-1]  # (B, C), or (B, T, V) per token: one row per position
    log_student = F.log_softmax(student_logits.reshape(-1, classes) / t, dim=-1)
    log_teacher = F.log_softmax(teacher_logits.reshape(-1, classes) / t, dim=-1)
    return F.kl_div(log_student, log_teacher, log_target=True, reduction="batchmean") * t * t


def hinton_loss(student: Tensor, teacher: Tensor, labels: Tensor, *, temperature: float = 4.0,
                alpha: float = 0.9) -> Tensor:
    """Hinton et al. 2015: ``alpha * T^2 * KL(p_T || p_S) + (1 - alpha) * CE(y, p_S)``."""
    ce = F.cross_entropy(student.reshape(-1, student.shape[-1]), labels.reshape(-1))
    return alpha * soft_target_loss(student, teacher, temperature) + (1 - alpha) * ce


def dkd_loss(student: Tensor, teacher: Tensor, labels: Tensor, *, temperature: float = 4.0,
             alpha: float = 1.0, beta: float = 8.0) -> Tensor:
    """Decoupled KD (Zhao et al. 2022): ``alpha * TCKD + beta * NCKD``, each times ``T^2``.

    TCKD is the KL between the binary (target, everything else) distributions of teacher and
    student; NCKD the KL between their distributions over the non-target classes only. Plain KD
    is ``TCKD + (1 - p_T[target]) * NCKD``: the confident teacher's non-target knowledge is
    suppressed exactly where it is most informative, which ``beta`` undoes.
    """
    _check_same(student, teacher)
    t = temperature
    gt = F.one_hot(labels, student.shape[-1]).bool()  # (B, C)
    p_s, p_t = F.softmax(student / t, -1), F.softmax(teacher / t, -1)
    # binary (target, non-target) probabilities, (B, 2)
    b_s = torch.stack([(p_s * gt).sum(-1), (p_s * ~gt).sum(-1)], -1).clamp_min(1e-12)
    b_t = torch.stack([(p_t * gt).sum(-1), (p_t * ~gt).sum(-1)], -1).clamp_min(1e-12)
    tckd = (b_t * (b_t.log() - b_s.log())).sum(-1).mean() * t * t
    # non-target distributions: the target logit pushed to -inf before the softmax
    mask = gt * 1e9
    log_n_s = F.log_softmax(student / t - mask, -1)
    log_n_t = F.log_softmax(teacher / t - mask, -1)
    nckd = (log_n_t.exp() * (log_n_t - log_n_s)).masked_fill(gt, 0).sum(-1).mean() * t * t
    return alpha * tckd + beta * nckd


def standardize(logits: Tensor, eps: float = 1e-7) -> Tensor:
    """Z-score each row of logits over the classes: ``(z - mean) / std`` (unbiased std)."""
    mean = logits.mean(-1, keepdim=True)
    return (logits - mean) / (logits.std(-1, keepdim=True) + eps)


def hinton_ls_loss(student: Tensor, teacher: Tensor, labels: Tensor, *,
                   temperature: float = 2.0, alpha: float = 0.9) -> Tensor:
    """Hinton KD on standardized logits (Sun et al., CVPR 2024, "Logit Standardization in KD").

    Plain KD asks the student to match the teacher's logits in range and spread as well as in
    their relations; a small student cannot, and the shared temperature punishes it for that.
    Z-scoring both sides before the softmax keeps only the relations (the effective
    temperature becomes ``T * std`` of each sample's own logits). The label term reads the raw
    logits: ``alpha * T^2 * KL(p_T~ || p_S~) + (1 - alpha) * CE(y, p_S)``.
    """
    ce = F.cross_entropy(student.reshape(-1, student.shape[-1]), labels.reshape(-1))
    soft = soft_target_loss(standardize(student), standardize(teacher), temperature)
    return alpha * soft + (1 - alpha) * ce


def dkd_ls_loss(student: Tensor, teacher: Tensor, labels: Tensor, *, temperature: float = 2.0,
                alpha: float = 1.0, beta: float = 8.0) -> Tensor:
    """Decoupled KD on standardized logits (Sun et al. 2024 report DKD gains most from it):
    both parts of :func:`dkd_loss` compare z-scored rows, so the student matches the teacher's
    target / non-target relations without matching its logit scale."""
    return dkd_loss(standardize(student), standardize(teacher), labels,
                    temperature=temperature, alpha=alpha, beta=beta)


def _pearson(a: Tensor, b: Tensor, dim: int, eps: float = 1e-8) -> Tensor:
    """Pearson correlation of ``a`` and ``b`` along ``dim``."""
    a, b = a - a.mean(dim, keepdim=True), b - b.mean(dim, keepdim=True)
    return (a * b).sum(dim) / (a.norm(dim=dim) * b.norm(dim=dim) + eps)


def dist_loss(student: Tensor, teacher: Tensor, *, temperature: float = 1.0,
              inter: float = 1.0, intra: float = 1.0) -> Tensor:
    """DIST (Huang et al., NeurIPS 2022): ``T^2 (inter (1 - rho_rows) + intra (1 - rho_cols))``.

    KL asks for the teacher's exact probabilities; a much weaker student gains more from
    matching their *relations*: per sample, the Pearson correlation of the class
    probabilities (inter-class: which classes look alike), and per class, the correlation over
    the batch (intra-class: which samples are more of that class). Correlation ignores shift
    and scale, so the student is free to be less (or more) confident than the teacher.
    """
    _check_same(student, teacher)
    classes = student.shape[-1]
    t = temperature
    p_s = F.softmax(student.reshape(-1, classes) / t, -1)  # (B, C)
    p_t = F.softmax(teacher.reshape(-1, classes) / t, -1)
    rows = 1 - _pearson(p_s, p_t, 1).mean()
    cols = 1 - _pearson(p_s, p_t, 0).mean()
    return t * t * (inter * rows + intra * cols)


def hint_loss(student_feature: Tensor, teacher_feature: Tensor) -> Tensor:
    """FitNets (Romero et al. 2015): mean squared error between the (adapted) student feature
    and the teacher's; a larger map is average-pooled to the smaller one's size."""
    s, t = _same_size(student_feature, teacher_feature)
    if s.shape != t.shape:
        raise ModelError(f"hint: student feature {tuple(s.shape)} and teacher feature "
                         f"{tuple(t.shape)} differ after the adapter")
    return F.mse_loss(s, t)


def attention_map(feature: Tensor, p: float = 2.0) -> Tensor:
    """Zagoruyko & Komodakis 2017: ``normalize(mean_c |A|^p)`` flattened, (B, H*W)."""
    return F.normalize(feature.abs().pow(p).mean(1).flatten(1), dim=1)


def attention_loss(student_feature: Tensor, teacher_feature: Tensor, p: float = 2.0) -> Tensor:
    """Attention transfer: mean squared difference of the normalized attention maps (the
    channel counts may differ; a larger map is average-pooled to the smaller one's size)."""
    s, t = _same_size(student_feature, teacher_feature)
    return (attention_map(s, p) - attention_map(t, p)).pow(2).mean()


def rkd_loss(student_embedding: Tensor, teacher_embedding: Tensor, *,
             distance_weight: float = 25.0, angle_weight: float = 50.0) -> Tensor:
    """Relational KD (Park et al. 2019): smooth-L1 between the students' and teachers' pairwise
    distances (each normalized by its mean) plus between the cosines of the angles each
    triplet of samples forms. Widths may differ: only relations between samples are compared."""
    s, t = student_embedding.flatten(1), teacher_embedding.flatten(1)

    def distances(e: Tensor) -> Tensor:
        d = torch.cdist(e, e)  # (B, B)
        off = ~torch.eye(len(e), dtype=torch.bool, device=e.device)
        return d / d[off].mean().clamp_min(1e-12)

    def angles(e: Tensor) -> Tensor:
        diff = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)  # (B, B, D): j - i
        return torch.bmm(diff, diff.transpose(1, 2)).flatten()  # cos of angle at i, (B*B*B)

    with torch.no_grad():
        t_dist, t_angle = distances(t), angles(t)
    dist = F.smooth_l1_loss(distances(s), t_dist)
    angle = F.smooth_l1_loss(angles(s), t_angle)
    return distance_weight * dist + angle_weight * angle


def _same_size(s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """Average-pool the larger of two (B, C, H, W) maps to the smaller's spatial size."""
    if s.dim() == 4 and t.dim() == 4 and s.shape[-2:] != t.shape[-2:]:
        size = (min(s.shape[-2], t.shape[-2]), min(s.shape[-1], t.shape[-1]))
        s, t = F.adaptive_avg_pool2d(s, size), F.adaptive_avg_pool2d(t, size)
    return s, t


# --------------------------------------------------------------------------- the registry


@dataclass
class Batch:
    """What one training step offers the losses (only what they asked for is filled in)."""

    student: Tensor                      # student logits (B, C)
    labels: Tensor                       # (B,)
    task_loss: Callable[[Tensor, Tensor], Tensor]  # the task's loss (cross-entropy)
    teacher: Tensor | None = None        # teacher logits (an ensemble: T * log of its probs)
    pairs: list[tuple[Tensor, Tensor]] = field(default_factory=list)  # (student, teacher) maps
    adapted: list[tuple[Tensor, Tensor]] = field(default_factory=list)  # the same, student adapted
    embeddings: tuple[Tensor, Tensor] | None = None  # (student, teacher) penultimate features
    exits: list[Tensor] = field(default_factory=list)  # logits of the student's exit heads
    peers: list[Tensor] = field(default_factory=list)  # other students' logits (detached)
    ramp: float = 1.0  # warm-up factor in [0, 1] for losses that start gently (dkd)


@dataclass(frozen=True)
class LossParams:
    """The losses' knobs; defaults as the ``distill`` step's (chosen on Fashion-MNIST, see
    :class:`lighten.distill.step.DistillConfig`); the functions above keep the papers'."""

    temperature: float = 2.0
    alpha: float = 0.5    # hinton: weight of the soft targets (1 - alpha on the labels)
    dkd_alpha: float = 1.0
    dkd_beta: float = 2.0


@dataclass(frozen=True)
class LossSpec:
    name: str
    fn: Callable[[Batch, LossParams], Tensor]
    # "teacher", "features", "adapters", "embeddings", "exits", "peers"; "class_logits": the
    # loss takes a softmax of the outputs, so the task's outputs must be class logits
    needs: frozenset[str]
    summary: str


LOSSES: dict[str, LossSpec] = {}


def register_loss(name: str, *needs: str):
    """Decorator: make ``fn(batch, params) -> scalar`` a distillation loss named ``name``."""

    def decorate(fn):
        doc = (fn.__doc__ or "").strip().splitlines()
        LOSSES[name] = LossSpec(name, fn, frozenset(needs), doc[0] if doc else "")
        return fn

    return decorate


def get_loss(name: str) -> LossSpec:
    if name not in LOSSES:
        raise RecipeError(f"unknown distillation loss {name!r}; known: {', '.join(LOSSES)}"
                          f"{did_you_mean(name, LOSSES)}")
    return LOSSES[name]


def _need(value, what: str, loss: str):
    if value is None or (isinstance(value, list) and not value):
        raise ModelError(f"distillation loss {loss!r} needs {what}; none was prepared")
    return value


@register_loss("ce")
def _ce(b: Batch, p: LossParams) -> Tensor:
    """The task's own loss on the labels (cross-entropy)."""
    return b.task_loss(b.student, b.labels)


@register_loss("kd", "teacher", "class_logits")
def _kd(b: Batch, p: LossParams) -> Tensor:
    """Soft targets alone: ``T^2 KL(p_T || p_S)``."""
    return soft_target_loss(b.student, _need(b.teacher, "a teacher", "kd"), p.temperature)


@register_loss("hinton", "teacher", "class_logits")
def _hinton(b: Batch, p: LossParams) -> Tensor:
    """``alpha T^2 KL(p_T || p_S) + (1 - alpha) CE`` (Hinton et al. 2015)."""
    # the label part through the task's loss: a mixed view's label is mixed too
    teacher = _need(b.teacher, "a teacher", "hinton")
    return p.alpha * soft_target_loss(b.student, teacher, p.temperature) \
        + (1 - p.alpha) * b.task_loss(b.student, b.labels)


@register_loss("dkd", "teacher", "class_logits")
def _dkd(b: Batch, p: LossParams) -> Tensor:
    """Decoupled KD: ``alpha TCKD + beta NCKD`` (Zhao et al. 2022), ramped in (``warmup``)."""
    return b.ramp * dkd_loss(b.student, _need(b.teacher, "a teacher", "dkd"), b.labels,
                    temperature=p.temperature, alpha=p.dkd_alpha, beta=p.dkd_beta)


@register_loss("dkd_ls", "teacher", "class_logits")
def _dkd_ls(b: Batch, p: LossParams) -> Tensor:
    """Decoupled KD on z-scored logits (logit standardization), ramped in like ``dkd``."""
    return b.ramp * dkd_ls_loss(b.student, _need(b.teacher, "a teacher", "dkd_ls"), b.labels,
                                temperature=p.temperature, alpha=p.dkd_alpha, beta=p.dkd_beta)


@register_loss("hinton_ls", "teacher", "class_logits")
def _hinton_ls(b: Batch, p: LossParams) -> Tensor:
    """Hinton KD on z-scored logits (logit standardization, Sun et al. 2024)."""
    teacher = _need(b.teacher, "a teacher", "hinton_ls")
    soft = soft_target_loss(standardize(b.student), standardize(teacher), p.temperature)
    return p.alpha * soft + (1 - p.alpha) * b.task_loss(b.student, b.labels)


@register_loss("dist", "teacher", "class_logits")
def _dist(b: Batch, p: LossParams) -> Tensor:
    """DIST: inter- + intra-class Pearson relations of the probabilities (Huang et al. 2022)."""
    return dist_loss(b.student, _need(b.teacher, "a teacher", "dist"),
                     temperature=p.temperature)


@register_loss("hint", "features", "adapters")
def _hint(b: Batch, p: LossParams) -> Tensor:
    """FitNets hints: MSE between adapted student features and the teacher's."""
    pairs = _need(b.adapted, "matched feature layers with adapters", "hint")
    return sum(hint_loss(s, t) for s, t in pairs) / len(pairs)


@register_loss("attention", "features")
def _attention(b: Batch, p: LossParams) -> Tensor:
    """Attention transfer between matched feature maps (Zagoruyko & Komodakis 2017).

    The student's own map, never an adapted one: a learned adapter could match the teacher's
    attention for it, and the channel mean makes the widths irrelevant anyway."""
    pairs = _need(b.pairs, "matched feature layers", "attention")
    return sum(attention_loss(s, t) for s, t in pairs) / len(pairs)


@register_loss("relational", "embeddings")
def _relational(b: Batch, p: LossParams) -> Tensor:
    """RKD distance + angle between the penultimate embeddings (Park et al. 2019)."""
    s, t = _need(b.embeddings, "penultimate embeddings", "relational")
    return rkd_loss(s, t)


@register_loss("self", "exits", "class_logits")
def _self(b: Batch, p: LossParams) -> Tensor:
    """Self-distillation: each exit head learns the labels and the final head's soft targets."""
    exits = _need(b.exits, "exit heads", "self")
    final = b.student.detach()
    return sum(b.task_loss(e, b.labels) + soft_target_loss(e, final, p.temperature)
               for e in exits) / len(exits)


@register_loss("mutual", "peers", "class_logits")
def _mutual(b: Batch, p: LossParams) -> Tensor:
    """Deep mutual learning: ``KL(p_peer || p_self)`` averaged over the other peers (T = 1)."""
    peers = _need(b.peers, "peers", "mutual")
    return sum(soft_target_loss(b.student, q, 1.0) for q in peers) / len(peers)


def gated_mutual_loss(student: Tensor, peers: list[Tensor], labels: Tensor) -> Tensor:
    """Mutual learning where a peer teaches a sample only as far as it knows it better:
    ``mean_i sum_j g_ij KL_i(p_j || p_self) / n_peers`` with ``g_ij = max(0, p_j[y_i] -
    p_self[y_i])`` (both at T = 1, detached). A random or weaker peer (a fresh peer beside a
    trained student) then cannot pull the learner toward its mistakes, while equal peers still
    teach each other wherever one is ahead."""
    log_self = F.log_softmax(student, -1)
    own = log_self.detach().exp().gather(1, labels[:, None]).squeeze(1)
    total = student.new_zeros(())
    for peer in peers:
        _check_same(student, peer)
        log_peer = F.log_softmax(peer.detach(), -1)
        gate = (log_peer.exp().gather(1, labels[:, None]).squeeze(1) - own).clamp_min(0)
        kl = (log_peer.exp() * (log_peer - log_self)).sum(-1)
        total = total + (gate * kl).mean()
    return total / len(peers)


@register_loss("mutual_gated", "peers", "class_logits")
def _mutual_gated(b: Batch, p: LossParams) -> Tensor:
    """Mutual learning, each peer teaching only where it gives the true class more mass."""
    return gated_mutual_loss(b.student, _need(b.peers, "peers", "mutual_gated"), b.labels)


# --------------------------------------------------------------------------- finetune: distill


def teacher_term(teacher: nn.Module, *, weight: float, temperature: float):
    """A ``LossTerm`` adding ``weight * soft_target_loss``; the teacher is frozen in eval mode."""
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)

    def term(model: nn.Module, x: Tensor, logits: Tensor, y: Tensor) -> Tensor:
        with torch.no_grad():
            target = teacher(*x) if isinstance(x, tuple) else teacher(x)  # multi-input: tuple
        return weight * soft_target_loss(logits, target, temperature)

    return term
