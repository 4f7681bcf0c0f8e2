"""Self-Flow (transfusion-pytorch's ``SelfMaskedRepTraining``): the model's own loss plus a representation
loss that makes a small head on the student's hidden state at ``student_layer`` predict an EMA teacher's
hidden state at ``teacher_layer`` for the same input, the student seeing it through more dropout.

Built on public pieces only: the model's ``create_ema``, its ``transformer`` (whose ``layers`` give the
hidden states, read with forward hooks) and its forward. Hidden-state indices follow transfusion-pytorch:
``0`` is the backbone's input, ``i`` the output of block ``i``, ``depth + 1`` (``-1``) the final norm's
output. The teacher replays the student's random draws (dropped text, times, noise), so both see the
same noised input; padding is left out of the representation loss.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._utils import check
from ..backbone.masks import PADDING
from ..backbone.norms import RMSNorm
from ..backbone.transformer import FeedForward


def cosine_rep_loss(prediction: Tensor, target: Tensor) -> Tensor:
    """``1 - mean cosine similarity`` of ``[k, d]`` predictions and targets."""
    return 1.0 - F.cosine_similarity(prediction, target, dim=-1).mean()


class SelfMaskedRepTraining(nn.Module):
    """Wraps a :class:`~mmgen_pytorch.Transfusion` (``net``, the student) with an EMA teacher
    (``net.create_ema(beta=ema_beta, **ema_kwargs)``) and a prediction head (RMSNorm + GELU MLP).

    ``forward(*args, **kwargs)`` takes the model's forward arguments and returns
    ``(total_loss, (student_loss, rep_loss))`` with ``total = student + rep_loss_weight * rep``;
    call :meth:`update_teacher` after each optimiser step. ``use_asymmetric_dropout``: every
    ``nn.Dropout`` of the student runs at ``student_dropout_rate`` and of the teacher at
    ``teacher_dropout_rate`` during the pass (restored after). :meth:`parameters` are the student's and
    the head's (the teacher follows by EMA)."""

    def __init__(self, net: nn.Module, *, ema_beta: float = 0.999, rep_loss_weight: float = 0.1,
                 student_layer: int = -3, teacher_layer: int = -1,
                 loss_fn: Callable[[Tensor, Tensor], Tensor] = cosine_rep_loss, use_asymmetric_dropout: bool = True,
                 student_dropout_rate: float = 0.1, teacher_dropout_rate: float = 0.0,
                 ema_kwargs: Optional[dict] = None):
        super().__init__()
        check(rep_loss_weight >= 0, f"`rep_loss_weight` must be >= 0, got {rep_loss_weight}")
        for name, rate in (("student_dropout_rate", student_dropout_rate), ("teacher_dropout_rate", teacher_dropout_rate)):
            check(0.0 <= rate < 1.0, f"`{name}` must be in [0, 1), got {rate}")
        check(not use_asymmetric_dropout or student_dropout_rate > teacher_dropout_rate,
              f"`student_dropout_rate` ({student_dropout_rate}) must exceed `teacher_dropout_rate` "
              f"({teacher_dropout_rate}) with `use_asymmetric_dropout`: the teacher needs the cleaner view")
        depth = len(net.transformer.layers)
        for name, layer in (("student_layer", student_layer), ("teacher_layer", teacher_layer)):
            check(isinstance(layer, int) and -(depth + 2) <= layer <= depth + 1,
                  f"`{name}` must index the {depth + 2} hidden states (input, {depth} blocks, final norm): an int "
                  f"in [{-(depth + 2)}, {depth + 1}], got {layer!r}")
        self.student = net
        self.teacher = net.create_ema(beta=ema_beta, **(ema_kwargs or {}))
        self.rep_loss_weight, self.loss_fn = rep_loss_weight, loss_fn
        self.student_layer, self.teacher_layer = student_layer % (depth + 2), teacher_layer % (depth + 2)
        self.use_asymmetric_dropout = use_asymmetric_dropout
        self.student_dropout_rate, self.teacher_dropout_rate = student_dropout_rate, teacher_dropout_rate
        dim = net.dim
        self.student_predict_head = nn.Sequential(RMSNorm(dim, eps=1e-6), FeedForward(dim, 4 * dim, kind="gelu"))

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:
        yield from self.student.parameters(recurse)
        yield from self.student_predict_head.parameters(recurse)

    def update_teacher(self) -> None:
        self.teacher.update()

    def forward(self, *args, **kwargs):
        if self.rep_loss_weight == 0:
            loss = self._loss(self.student(*args, **kwargs))
            return loss, (loss, loss.new_zeros(()))
        rng = _rng_state(self.student)
        with self._dropout(self.student, self.student_dropout_rate), \
                capture_hidden(self.student, self.student_layer) as student:
            student_loss = self._loss(self.student(*args, **kwargs))
        teacher_model = self.teacher.ema_model
        mode = teacher_model.training
        teacher_model.train(self.student.training)  # same draws as the student (text dropout happens in training)
        try:
            with torch.no_grad(), _replayed(rng), self._dropout(teacher_model, self.teacher_dropout_rate), \
                    capture_hidden(teacher_model, self.teacher_layer) as teacher:
                teacher_model(*args, **kwargs)
        finally:
            teacher_model.train(mode)
        real = student.layout.segment_ids != PADDING if student.layout is not None else None
        prediction = self.student_predict_head(student.hidden)
        target = teacher.hidden
        if real is not None:
            prediction, target = prediction[real], target[real]
        rep_loss = self.loss_fn(prediction, target)
        return student_loss + self.rep_loss_weight * rep_loss, (student_loss, rep_loss)

    @staticmethod
    def _loss(output) -> Tensor:
        return output[0] if isinstance(output, tuple) else output

    def _dropout(self, model: nn.Module, rate: float):
        return set_dropout(model, rate) if self.use_asymmetric_dropout else contextlib.nullcontext()


class _Captured:
    hidden: Optional[Tensor] = None
    layout = None


@contextlib.contextmanager
def capture_hidden(model: nn.Module, layer: int):
    """Record ``model.transformer``'s hidden state number ``layer`` (0: its input, ``i``: block ``i``'s
    output, ``depth + 1``: its output) and the token layout of its last forward."""
    transformer, captured = model.transformer, _Captured()
    depth = len(transformer.layers)

    def before(module, args, kwargs):
        captured.layout = kwargs.get("layout")
        if layer == 0:
            captured.hidden = args[0] if args else kwargs["x"]

    def keep(module, args, output):
        captured.hidden = output[0] if isinstance(output, tuple) else output

    handles = [transformer.register_forward_pre_hook(before, with_kwargs=True)]
    if 0 < layer <= depth:
        handles.append(transformer.layers[layer - 1].register_forward_hook(keep))
    elif layer == depth + 1:
        handles.append(transformer.register_forward_hook(keep))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def set_dropout(model: nn.Module, rate: float):
    """Every ``nn.Dropout`` of ``model`` at probability ``rate`` inside the block."""
    dropouts: List[nn.Dropout] = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    saved = [m.p for m in dropouts]
    for module in dropouts:
        module.p = rate
    try:
        yield
    finally:
        for module, p in zip(dropouts, saved):
            module.p = p


def _rng_state(model: nn.Module):
    device = next(model.parameters()).device
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), device, cuda


@contextlib.contextmanager
def _replayed(state):
    """Torch's generators reset to ``state`` inside the block and restored after it."""
    cpu, device, cuda = state
    with torch.random.fork_rng(devices=[device] if cuda is not None else []):
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)
        yield
