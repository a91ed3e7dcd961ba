"""Distillation overhead: the teacher adds one forward pass, no backward, no batch copy.

Side by side in one process (same threads, same batch, rounds interleaved, median times),
student CIFAR resnet20, teacher CIFAR resnet56 (the Apprentice CIFAR pairing):

1. student       -- a training step (forward, cross-entropy, backward, SGD step) alone;
2. distill       -- the same step through DistillationCallback's loss hook (scheme B, frozen
                    teacher under torch.no_grad(), eval mode, same input tensor);
3. teacher_fwd   -- the frozen teacher's forward alone (no_grad, eval);
4. naive         -- what an unfrozen teacher would cost: teacher forward with autograd on and
                    the backward through both networks (gradients discarded).

Reports overhead = distill - student and its ratio to teacher_fwd (1.0 means the teacher
costs exactly one forward), the student + teacher_fwd prediction, and checks that the teacher
output has no autograd graph and that the teacher received the student's own input object.

    /work/venv/bin/python benchmarks/bench_distillation.py --batch 32 --rounds 10
"""

from __future__ import annotations

import argparse
import functools
import platform

import torch
from timing import interleaved_times, medians, write_json

from qtrain.callbacks.distillation import DistillationCallback
from qtrain.models.resnet_cifar import cifar_resnet, resnet20
from qtrain.modules.classification import ImageClassifier


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench_distillation.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    module = ImageClassifier(resnet20(num_classes=10), num_classes=10)
    opt = torch.optim.SGD(module.parameters(), lr=0.01, momentum=0.9)
    teacher = cifar_resnet("resnet56", num_classes=10)
    cb = DistillationCallback(teacher=teacher, scheme="B", alpha=1.0, beta=0.5, gamma=0.5)
    cb.teacher = cb._freeze(cb.build_teacher())
    module.train()
    x = torch.randn(args.batch, 3, 32, 32)
    y = torch.randint(0, 10, (args.batch,))
    batch = (x, y)
    seen = {}
    teacher.register_forward_hook(lambda m, a, o: seen.update(t_in=a[0], t_grad=o.requires_grad,
                                                               t_graph=o.grad_fn is not None))
    module.model.register_forward_hook(lambda m, a, o: seen.update(s_in=a[0]))

    def step(hook):
        inputs, targets = module.split_batch(batch)
        opt.zero_grad(set_to_none=True)
        out = module(inputs)
        loss = module.task_loss(out, targets)
        if hook is not None:
            loss = hook(module, batch, out, loss)
        loss.backward()
        opt.step()

    def teacher_fwd():
        with torch.no_grad():
            teacher(x)

    def naive():  # unfrozen teacher: forward with autograd, backward through both
        for p in teacher.parameters():
            p.requires_grad_(True)
        opt.zero_grad(set_to_none=True)
        out = module(x)
        z_t = teacher(x)
        loss = module.task_loss(out, y) + module.task_loss(z_t, y)
        loss.backward()
        opt.step()
        for p in teacher.parameters():
            p.requires_grad_(False)
            p.grad = None

    runs = {"student": functools.partial(step, None), "distill": functools.partial(step, cb.loss_hook),
            "teacher_fwd": teacher_fwd, "naive": naive}
    times = interleaved_times(runs, args.warmup, args.rounds)
    step(cb.loss_hook)  # last call inspected below
    med = medians(times)
    overhead = med["distill"] - med["student"]
    res = {
        "machine": f"{platform.processor() or platform.machine()}, {args.threads} threads",
        "batch": args.batch, "rounds": args.rounds,
        "median_s": med,
        "overhead_s": overhead,
        "overhead_over_teacher_fwd": overhead / med["teacher_fwd"],
        "distill_over_student_plus_teacher_fwd": med["distill"] / (med["student"] + med["teacher_fwd"]),
        "naive_over_distill": med["naive"] / med["distill"],
        "teacher_output_requires_grad": seen["t_grad"],
        "teacher_output_has_graph": seen["t_graph"],
        "teacher_input_is_student_input": seen["t_in"] is seen["s_in"],
    }
    assert not seen["t_grad"] and not seen["t_graph"] and seen["t_in"] is seen["s_in"]
    for k, v in med.items():
        print(f"{k:12s} {v * 1e3:9.1f} ms")
    print(f"overhead = distill - student = {overhead * 1e3:.1f} ms "
          f"= {res['overhead_over_teacher_fwd']:.2f} x teacher forward; "
          f"distill / (student + teacher_fwd) = {res['distill_over_student_plus_teacher_fwd']:.3f}; "
          f"naive (teacher with backward) / distill = {res['naive_over_distill']:.2f}")
    write_json(args.out, res, indent=2)


if __name__ == "__main__":
    main()
