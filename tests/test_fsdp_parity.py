"""A teacher and student sharded with FSDP2 (2 gloo processes) give what the unsharded models give:
the weights fingerprint (of a plain teacher in three dtypes and of a PEFT teacher with trained LoRA
adapters), the scores and top-k (ranks holding different numbers of batches), and every Distiller term
and student gradient, with and without the teacher's early exit and the feature term. The sharded
student takes the fused logit path, with its head in a unit of its own (resharded after forward or
not) and tied to the embeddings in the root unit.

Run as a test, or as the worker: ``torchrun --nproc_per_node 2 tests/test_fsdp_parity.py OUT_FILE``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import _scoring_rows as rows_of  # noqa: E402
import _tiny_hf as tiny  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers as tf  # noqa: E402
from _torchrun import run_two_processes  # noqa: E402

import flexkd  # noqa: E402
from flexkd.adapters.identity import weights_fingerprint  # noqa: E402
from flexkd.distill import Distiller  # noqa: E402
from flexkd.distributed import end_launched_rank  # noqa: E402

LAYERS, K = [1, -1], 16
WEIGHTS = {
    "early-exit": {"task": 1.0, "logit": 0.0, "feature": 1.0},
    "logits": {"task": 1.0, "logit": 0.5, "feature": 1.0},
    "no-feature": {"task": 1.0, "logit": 0.5, "feature": 0.0},
}
# (tied head, reshard_after_forward) of the sharded student
STUDENTS = {"own-unit": (False, False), "own-unit-resharded": (False, True), "tied": (True, True)}


def models(dtype=torch.float32, tied=False):
    torch.manual_seed(0)
    teacher = tiny.build("llama").to(dtype)
    config = tf.LlamaConfig(
        **{**tiny._decoder_kwargs(), "hidden_size": K, "num_hidden_layers": 2},
        tie_word_embeddings=tied,
    )
    student = tf.LlamaForCausalLM(config)
    return teacher, student


def lora_teacher():
    """The tiny teacher with LoRA adapters on an attention and an MLP projection, B drawn as if trained."""
    import peft

    teacher, _ = models()
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "up_proj"])
    model = peft.get_peft_model(teacher, config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return model


def scoring_rows():
    rows = rows_of.causal_rows(11, 10, vocab=tiny.VOCAB)
    return rows, rows_of.batches_of(rows, [3, 1, 2])  # 5 batches: 3 on rank 0, 2 on rank 1


def distill_batch():
    return tiny.padded_batch(4, 9, generator=torch.Generator().manual_seed(3))


def distil(teacher, student, selection, weights, batch):
    """Every term, the student's gradients (full tensors) and the logit path of one Distiller forward +
    backward."""
    distiller = Distiller(teacher, student, selection=selection, weights=weights)
    loss, terms = distiller(batch)
    loss.backward()
    grads = {}
    for name, param in student.named_parameters():
        grad = param.grad
        grads[name] = grad.full_tensor() if hasattr(grad, "full_tensor") else grad.clone()
        param.grad = None
    return {name: float(value) for name, value in terms.items()}, grads, distiller.logit_kd_path


def worker(out_file: str) -> None:
    import torch.distributed as dist

    from flexkd.distributed import shard_model

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    result = {"fingerprint": {}}
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        teacher, _ = models(dtype)
        result["fingerprint"][str(dtype)] = weights_fingerprint(shard_model(teacher))
    sharded_lora = shard_model(lora_teacher())
    assert all(hasattr(p, "full_tensor") for p in sharded_lora.parameters())  # DTensors, LoRA included
    result["fingerprint"]["lora"] = weights_fingerprint(sharded_lora)
    teacher, _ = models()
    shard_model(teacher)
    _, batches = scoring_rows()
    selection = flexkd.score(teacher, batches[rank::2], layers=LAYERS, k=K, progress=False)
    selection.validate(teacher)
    result["scores"] = {layer: selection.scores(layer) for layer in selection.layers}
    result["index"] = {layer: selection.index(layer) for layer in selection.layers}
    result["tokens"] = selection.tokens_seen
    for student_name, (tied, reshard) in STUDENTS.items():
        student = shard_model(models(tied=tied)[1], reshard_after_forward=reshard)
        for name, weights in WEIGHTS.items():
            result[student_name, name] = distil(teacher, student, selection, weights, distill_batch())
    if rank == 0:
        torch.save(result, out_file)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.slow
def test_sharded_teacher_and_student_match_unsharded(tmp_path):
    out = tmp_path / "result.pt"
    run_two_processes(__file__, str(out), timeout=300)
    got = torch.load(out, weights_only=False)

    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert got["fingerprint"][str(dtype)] == weights_fingerprint(models(dtype)[0])
    # a sharded PEFT teacher is the same teacher as unsharded, and not its base model
    assert got["fingerprint"]["lora"] == weights_fingerprint(lora_teacher())
    assert got["fingerprint"]["lora"] != got["fingerprint"][str(torch.float32)]
    teacher, student = models()
    rows, _ = scoring_rows()
    expected = flexkd.score(teacher, [rows_of.collate(rows)], layers=LAYERS, k=K, progress=False)
    assert got["tokens"] == expected.tokens_seen
    for layer in expected.layers:
        torch.testing.assert_close(got["scores"][layer], expected.scores(layer), rtol=1e-5, atol=0)
        assert torch.equal(got["index"][layer], expected.index(layer))
    for student_name, (tied, _) in STUDENTS.items():
        student = models(tied=tied)[1]
        for name, weights in WEIGHTS.items():
            terms, grads, path = distil(teacher, student, expected, weights, distill_batch())
            got_terms, got_grads, got_path = got[student_name, name]
            assert (got_path, path) == ("fused", "fused"), (student_name, name)
            assert set(got_terms) == set(terms)
            for term, value in terms.items():
                assert float(got_terms[term]) == pytest.approx(float(value), rel=1e-5), (student_name, name, term)
            assert set(got_grads) == set(grads)
            for param, grad in grads.items():
                torch.testing.assert_close(got_grads[param], grad, rtol=1e-5, atol=1e-7)


if __name__ == "__main__":
    worker(sys.argv[1])
    end_launched_rank()
