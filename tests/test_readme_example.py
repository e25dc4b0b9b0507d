"""The README's training-step example runs as written on tiny GPT-2 models."""

import re
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel


def readme_training_step() -> str:
    text = (Path(__file__).parent.parent / "README.md").read_text()
    block = text.split("## The feature loss in a training step", 1)[1]
    return re.search(r"```python\n(.*?)```", block, re.S).group(1)


def test_readme_training_step_runs():
    torch.manual_seed(0)
    teacher = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=50, n_positions=16))
    student = GPT2LMHeadModel(GPT2Config(n_embd=8, n_layer=1, n_head=2, vocab_size=50, n_positions=16))
    ids = torch.randint(0, 50, (3, 2, 10))
    batches = [dict(input_ids=x, attention_mask=torch.ones_like(x), labels=x) for x in ids]
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    before = [p.detach().clone() for p in student.parameters()]
    namespace = dict(teacher=teacher, student=student, scoring_batches=batches, loader=batches,
                     optimizer=optimizer)
    exec(compile(readme_training_step(), "README.md", "exec"), namespace)
    assert namespace["feature"].item() > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters(), strict=True))
