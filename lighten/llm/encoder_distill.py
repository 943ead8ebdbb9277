"""Distillation of a pruned or layer-dropped encoder from the original (``llm.encoder_prune``'s
``distill:``).

The loss is ``1 - cosine`` of each sentence's embedding to the original's, plus optional denser
signals (weights; 0 = off):

* ``tokens``: the same on every real token's last hidden state (T targets per sentence, not 1);
* ``layers`` (TinyBERT, Jiao et al. 2020): student layer ``k``'s output states against teacher
  layer ``layer_map[k]`` (default: the uniform map ``(k + 1) * N / M - 1``, so a 3-layer student
  of 6 layers learns layers 1, 3, 5 and its last layer the teacher's last) -- an embedding loss
  alone tells a layer-dropped student only what its *last* layer should produce, and on
  all-MiniLM-L6-v2 it left a 3-layer student at cosine 0.81 with the loss still falling;
* ``relations`` (MiniLMv2, Wang et al. 2021): the self-attention relations ``softmax(Q Q^T /
  sqrt(d))``, ``K K^T`` and ``V V^T`` of the mapped layers, split into ``gcd(student heads,
  teacher heads)`` relation heads so that a student with fewer heads still compares; KL
  divergence from the teacher's, padded keys masked, mean over real query tokens.

With ``layers`` or ``relations`` the teacher runs beside the student on every step (its states
of every mapped layer would not fit in memory for a large corpus); otherwise its embeddings are
computed once. Each batch is cut to its longest real sentence (exact for a masked encoder, and
short sentences cost less). The learning rate warms up linearly over ``warmup`` of the steps,
then decays linearly to 0.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lighten.errors import ModelError, RecipeError
from lighten.llm.slicing import find_layer_stack
from lighten.llm.train_loop import train_steps

__all__ = ["DistillTaps", "default_layer_map", "distill_embeddings_", "relation_loss"]


def _layers(model: nn.Module) -> nn.ModuleList:
    """The ``*.encoder.layer`` list (its Linears may be wrapped by ``fake_int8``)."""
    return find_layer_stack(model, "encoder.layer", lambda _: True,
                            "distillation of hidden states (tokens, layers, relations) needs a "
                            "BERT-family encoder ('*.encoder.layer'); set them to 0 for other "
                            "models (the embedding loss alone works for any encoder)")[1]


def default_layer_map(teacher_layers: int, student_layers: int) -> list[int]:
    """TinyBERT's uniform map: student layer ``k`` learns teacher layer ``(k+1)*N/M - 1``."""
    return [max(0, round((k + 1) * teacher_layers / student_layers) - 1)
            for k in range(student_layers)]


def _check_map(layer_map: list[int], teacher_layers: int, student_layers: int) -> list[int]:
    if len(layer_map) != student_layers or not all(
            0 <= t < teacher_layers for t in layer_map):
        raise RecipeError(f"layer_map {layer_map} must give one teacher layer (0.."
                          f"{teacher_layers - 1}) for each of the student's {student_layers} "
                          "layers; leave it out for the uniform map")
    return list(layer_map)


def _trim(ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Cut the batch to its longest real sentence (padding changes nothing in a masked
    encoder)."""
    n = max(1, int(mask.sum(1).max()))
    return ids[:, :n], mask[:, :n]


class DistillTaps:
    """Forward hooks on chosen layers of an encoder: each one's output states ``(B, T, D)``
    (``states``) and its query/key/value projections ``(B, T, H*d)`` (``qkv``)."""

    def __init__(self, model: nn.Module, which: list[int], *, states: bool, qkv: bool):
        layers = _layers(model) if which else []
        self.states: dict[int, Tensor] = {}
        self.qkv: dict[tuple[int, str], Tensor] = {}
        self.heads: dict[int, int] = {}
        self.handles = []
        for i in which:
            layer = layers[i]
            if states:
                self.handles.append(layer.register_forward_hook(self._state(i)))
            if qkv:
                attn = layer.attention.self
                self.heads[i] = getattr(attn, "num_attention_heads", 1)
                for name in ("query", "key", "value"):
                    self.handles.append(getattr(attn, name).register_forward_hook(
                        self._proj(i, name)))

    def _state(self, i: int):
        def hook(module, args, output):
            self.states[i] = output[0] if isinstance(output, (tuple, list)) else output
        return hook

    def _proj(self, i: int, name: str):
        def hook(module, args, output):
            self.qkv[(i, name)] = output
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _state_loss(student: Tensor, teacher: Tensor, mask: Tensor) -> Tensor:
    """Mean ``1 - cosine`` of the token states over the real (unmasked) tokens."""
    cos = F.cosine_similarity(student, teacher, dim=-1)  # (B, T)
    weights = mask.to(cos.dtype)
    return ((1 - cos) * weights).sum() / weights.sum().clamp_min(1)


def _relation_logp(x: Tensor, heads: int, mask: Tensor) -> Tensor:
    """``log softmax(x_r x_r^T / sqrt(d_r))`` per relation head, padded keys masked out:
    ``(B, heads, T, T)``."""
    b, t, width = x.shape
    d = width // heads
    xr = x.reshape(b, t, heads, d).transpose(1, 2)  # (B, R, T, d)
    scores = xr @ xr.transpose(-1, -2) / math.sqrt(d)  # (B, R, T, T)
    scores = scores.masked_fill(~mask.bool()[:, None, None, :], torch.finfo(scores.dtype).min)
    return scores.log_softmax(-1)


def relation_loss(student: dict[str, Tensor], teacher: dict[str, Tensor], mask: Tensor, *,
                  student_heads: int, teacher_heads: int) -> Tensor:
    """MiniLMv2's Q-Q, K-K and V-V relation KL (teacher to student), mean over real queries."""
    heads = math.gcd(student_heads, teacher_heads)
    weights = mask.to(torch.float32)[:, None, :]  # (B, 1, T): real queries
    total = 0.0
    for name in ("query", "key", "value"):
        s, t = student[name], teacher[name].to(student[name].dtype)
        if s.shape[-1] % heads or t.shape[-1] % heads:
            raise ModelError(f"relation heads: widths {s.shape[-1]} and {t.shape[-1]} do not "
                             f"split into {heads} heads")
        t_logp = _relation_logp(t, heads, mask)
        s_logp = _relation_logp(s, heads, mask)
        kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1)  # (B, R, T)
        total = total + (kl * weights).sum() / (weights.sum() * heads).clamp_min(1)
    return total / 3


def _schedule(step: int, steps: int, warmup: float) -> float:
    """Linear warm-up over ``warmup`` of the steps, then linear decay to 0."""
    ramp = int(warmup * steps)
    if step < ramp:
        return (step + 1) / ramp
    return max(0.0, 1.0 - (step - ramp) / max(1, steps - ramp))


def distill_embeddings_(student: nn.Module, teacher: nn.Module,
                        batches: list[tuple[Tensor, Tensor]], *, epochs: float = 1.0,
                        lr: float = 1e-4, tokens: float = 0.0, layers: float = 0.0,
                        relations: float = 0.0, layer_map: list[int] | None = None,
                        warmup: float = 0.0, seed: int = 0) -> list[float]:
    """Train ``student`` in place so its embeddings match ``teacher``'s (see the module doc for
    ``tokens``, ``layers``, ``relations``, ``layer_map``, ``warmup``); dropout stays off.
    Returns the mean loss of each epoch (a fraction: the last is partial)."""
    if not batches:
        raise ModelError("distillation needs sentences; give at least one (ids, mask) batch")
    if not 0 <= warmup < 1:
        raise RecipeError(f"warmup {warmup} is a fraction of the steps, in [0, 1)")
    mapped = bool(layers or relations)
    s_n = len(_layers(student)) if (mapped or tokens) else 0
    t_n = len(_layers(teacher)) if (mapped or tokens) else 0
    pairs = []
    if mapped:
        pairs = list(enumerate(_check_map(layer_map, t_n, s_n) if layer_map is not None
                               else default_layer_map(t_n, s_n)))
    s_which = sorted({k for k, _ in pairs} | ({s_n - 1} if tokens else set()))
    t_which = sorted({t for _, t in pairs} | ({t_n - 1} if tokens else set()))
    s_taps = DistillTaps(student, s_which, states=bool(layers or tokens), qkv=bool(relations))
    t_taps = DistillTaps(teacher, t_which, states=bool(layers or tokens), qkv=bool(relations))
    trimmed = [_trim(ids, mask) for ids, mask in batches]
    cache: dict[int, tuple] = {}

    def targets(j: int):
        if j in cache:
            return cache[j]
        with torch.no_grad():
            out = teacher(*trimmed[j])
        found = (out, dict(t_taps.states), dict(t_taps.qkv))
        if not mapped:  # embeddings (+ last states) are small: compute them once
            cache[j] = found
        return found

    def loss_of(j: int) -> Tensor:
        emb, t_states, t_qkv = targets(j)
        ids, mask = trimmed[j]
        loss = (1 - F.cosine_similarity(student(ids, mask), emb, dim=-1)).mean()
        if tokens:
            loss = loss + tokens * _state_loss(s_taps.states[s_n - 1], t_states[t_n - 1], mask)
        if layers:
            loss = loss + layers * sum(_state_loss(s_taps.states[k], t_states[t], mask)
                                       for k, t in pairs) / len(pairs)
        if relations:
            loss = loss + relations * sum(relation_loss(
                {n: s_taps.qkv[(k, n)] for n in ("query", "key", "value")},
                {n: t_qkv[(t, n)] for n in ("query", "key", "value")}, mask,
                student_heads=s_taps.heads[k], teacher_heads=t_taps.heads[t])
                for k, t in pairs) / len(pairs)
        return loss

    was_training, t_training = student.training, teacher.training
    student.eval()  # no dropout: the target is a deterministic embedding
    teacher.eval()
    try:
        history = train_steps([p for p in student.parameters() if p.requires_grad], loss_of,
                              len(batches), epochs=epochs, lr=lr, seed=seed,
                              schedule=lambda s, steps: _schedule(s, steps, warmup))
    finally:
        s_taps.remove()
        t_taps.remove()
        student.train(was_training)
        teacher.train(t_training)
    return history
