"""Recover quality by distilling an MoE model from the dense model it was cut from.

The student (the MoE model) learns to reproduce the frozen teacher (the dense original) on unlabelled
text. The loss per step is a weighted sum of

* ``hidden``: per-layer hidden-state error, ``sum ||h_s - h_t||^2 / sum ||h_t||^2`` over real tokens,
  averaged over the transformer blocks (layer-wise distillation, as MoEBERT does);
* ``logits``: ``KL(teacher || student)`` of the output distributions, where the model has a head or
  is a causal LM (temperature ``T``, scaled by ``T^2``);
* ``pooled``: ``1 - cosine`` of mean-pooled outputs, for a bare encoder (a sentence-embedding model);
* ``balance`` and ``router``: each MoE layer's Switch load-balancing loss and its router's
  cross-entropy to the experts' measured output shares (see :class:`~densetomoe.moe.MoEFeedForward`).

How the router learns. The forward stays what inference computes, an *unweighted* sum of the
selected experts, so that a distilled model needs no gate weights and the dense equivalence at
``top_k == experts`` holds. Gradients reach the router two ways: a straight-through gate
``1 + p - stopgrad(p)`` on each selected expert (the end-to-end signal: does more of this expert help
the loss?) and the router loss, which keeps it ranking experts by what they actually contribute as
the experts change. A straight-through gate was chosen over learned gate weights because gate
weights change the function the experts were cut from and must first be learned back to 1.
A native folder trains under the engines' own math instead: softmax-weighted top-k, nothing from
the unselected experts, its routers in float32 whatever the autocast, frozen unless ``gates: learn``
(see :mod:`.gates`).

The teacher holds no second copy of what the student does not train. With ``train: moe`` (the
default) attention, embeddings, norms and the layers left dense are frozen, so teacher and student
share them: :func:`dense_teacher` makes the teacher before conversion changes the dense model, as a
second module tree over the very same parameters, and keeps the dense FFNs that the MoE modules
replace; :func:`share_frozen` does the same for a teacher loaded apart from its student. Memory is
one model plus its dense FFNs, not two models. With ``train: all`` every weight learns and the
teacher is a full copy; :func:`distill_model` refuses a teacher that shares a weight the student
trains. ``train: blocks`` sits between them: every weight but the embeddings and the output layer
learns (attention and norms may then make up for what the split lost), and the teacher shares
those, so that the KL still goes through the one output layer.

A causal LM reads its text as it was pretrained: the documents joined into one token stream, cut
into windows of ``seq_len`` (:func:`~densetomoe.data.packed`), so that every position of a batch is
a token to learn from (documents cut to ``seq_len`` and padded to the longest left about half of
each SmolLM2 batch padding); its held-out points are scored on windows too. Its logits' KL is
computed from the final hidden states through the output layer that student and teacher share
(:func:`head_kl`), a chunk of tokens at a time. An encoder reads each document alone.

Training runs through ``accelerate``: one CPU process by default, the same code under
``accelerate launch`` on several GPUs or machines, mixed precision where the hardware has it.
FSDP shards the student in place; it comes back whole, as a new module filled into a copy of its
structure taken before training (:func:`~.fsdp.skeleton`, :func:`~.fsdp.unsharded`), which is why
:func:`~.loop.distill_model` returns the student it trained. Budgets are steps and/or wall-clock minutes;
checkpoints (``accelerate`` state plus the loss history) let ``resume`` continue an interrupted run
with the same budget.

The parts: :mod:`.losses` (the losses and the fused head KL), :mod:`.teacher` (the teacher and what
learns), :mod:`.fsdp` (the student gathered whole again), :mod:`.data` (text, batches, checkpoints)
and :mod:`.loop` (the training loop). Dynamic top-k's coverage, set again after training, is
:mod:`densetomoe.stages.coverage`'s.
"""

from .data import CALIBRATION_TEXT, check_sources, latest_checkpoint, training_texts
from .fsdp import filled, skeleton, unsharded
from .loop import History, distill_model, lr_factor
from .losses import fused_head, head_kl, losses, total
from .teacher import dense_teacher, moe_blocks, share_frozen, trainable

__all__ = [
    "CALIBRATION_TEXT", "History", "check_sources", "dense_teacher", "distill_model", "filled", "fused_head", "head_kl",
    "latest_checkpoint", "losses", "lr_factor", "moe_blocks", "share_frozen", "skeleton", "total", "trainable",
    "training_texts", "unsharded",
]  # fmt: skip
