"""``debian-synopsis``: long description -> one-line synopsis, as causal language modelling.

A training sequence is ``<s> description <sep> synopsis </s>``; the loss covers only the
synopsis and ``</s>`` (labels are -100 elsewhere). Tokenizer: the byte-level BPE committed
with the snapshot (8k vocabulary, trained on the train split), which keeps the softmax small
enough to train on CPUs. Teacher: a GPT-2 with hidden 384 trained here from scratch;
student: a GPT-2 with hidden 96-128. Decoding is greedy; the metric is ROUGE-L."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from flexkd.training.data import pad_sequences
from flexkd_lab.data import SNAPSHOT_DIR, synopsis_tokenizer_file
from flexkd_lab.data.bpe import BOS, EOS, PAD, SEP

from .base import DebianTask
from .metrics import rouge_l
from .student_init import EMBEDDING_INITS, init_embeddings_from_teacher
from .training import FitConfig


@dataclass(frozen=True)
class SynopsisConfig:
    max_source_length: int = 64
    max_target_length: int = 24
    teacher_hidden: int = 384
    teacher_layers: int = 4
    student_hidden: int = 128
    student_layers: int = 2
    student_init: str = "teacher_pca"
    # One epoch (313 steps, about 2.4 CPU-s each) left the teacher at validation ROUGE-L 0.096,
    # collapsing onto frequent synopsis templates ("Perl module for ..."); three epochs follow.
    teacher_fit: FitConfig = field(
        default_factory=lambda: FitConfig(epochs=3.0, batch_size=32, lr=1e-3, warmup_ratio=0.05)
    )

    def __post_init__(self):
        for name in ("max_source_length", "max_target_length", "teacher_layers", "student_layers"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: expected > 0, got {getattr(self, name)}")
        for name in ("teacher_hidden", "student_hidden"):
            if getattr(self, name) <= 0 or getattr(self, name) % 32:
                raise ValueError(
                    f"{name}: expected a positive multiple of 32, got {getattr(self, name)}"
                )
        if self.student_init not in EMBEDDING_INITS:
            raise ValueError(
                f"student_init: expected one of {EMBEDDING_INITS}, got {self.student_init!r}"
            )

    @property
    def max_positions(self) -> int:
        return self.max_source_length + self.max_target_length + 3  # <s>, <sep>, </s>


def _cache_argument(model) -> str:
    """The forward() keyword for the KV cache: ``cache`` (transformers >= 5.x) or
    ``past_key_values`` (earlier)."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _returned_cache(output):
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


@torch.no_grad()
def greedy_generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
) -> list[list[int]]:
    """Greedy continuation of left-padded prompts with a KV cache. Returns each row's new
    tokens up to (not including) ``eos_token_id``."""
    if input_ids.shape != attention_mask.shape or input_ids.ndim != 2:
        raise ValueError(
            f"attention_mask: expected the shape of input_ids {tuple(input_ids.shape)}, got {tuple(attention_mask.shape)}"
        )
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens: expected > 0, got {max_new_tokens}")
    cache_argument = _cache_argument(model)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=True,
    )
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    generated: list[torch.Tensor] = []
    for _ in range(max_new_tokens):
        next_tokens = out.logits[:, -1].argmax(-1)
        next_tokens = torch.where(finished, torch.full_like(next_tokens, pad_token_id), next_tokens)
        finished |= next_tokens == eos_token_id
        generated.append(next_tokens)
        if bool(finished.all()):
            break
        attention_mask = torch.cat(
            [attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)], dim=1
        )
        position_ids = position_ids[:, -1:] + 1
        out = model(
            input_ids=next_tokens[:, None],
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            **{cache_argument: _returned_cache(out)},
        )
    rows = torch.stack(generated, dim=1).tolist()
    return [row[: row.index(eos_token_id)] if eos_token_id in row else row for row in rows]


class SynopsisTask(DebianTask):
    name = "debian-synopsis"
    kind = "summarization"

    def __init__(self, config: SynopsisConfig | None = None, data_dir: str = SNAPSHOT_DIR):
        super().__init__(config or SynopsisConfig(), data_dir)
        self._tokenizer = None

    @property
    def teacher_fit(self) -> FitConfig:
        return self.config.teacher_fit

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import PreTrainedTokenizerFast

            self._tokenizer = PreTrainedTokenizerFast(
                tokenizer_file=synopsis_tokenizer_file(self.data_dir),
                bos_token=BOS,
                eos_token=EOS,
                pad_token=PAD,
                sep_token=SEP,
            )
        return self._tokenizer

    def extra_data_files(self) -> list[str]:
        return ["synopsis-tokenizer.json"]

    def _ids(self, text: str, max_length: int) -> list[int]:
        return self.tokenizer(
            text, add_special_tokens=False, truncation=True, max_length=max_length
        )["input_ids"]

    def prompt_ids(self, text: str) -> list[int]:
        """``<s> description <sep>``: what the model continues."""
        tok = self.tokenizer
        return [tok.bos_token_id, *self._ids(text, self.config.max_source_length), tok.sep_token_id]

    def encode_row(self, row: dict) -> dict:
        prompt = self.prompt_ids(row["text"])
        target = [
            *self._ids(row["summary"], self.config.max_target_length),
            self.tokenizer.eos_token_id,
        ]
        return {"prompt": prompt, "target": target, "summary": row["summary"]}

    def collate(self, features: list[dict]) -> dict[str, torch.Tensor]:
        """Right-padded ``prompt + target`` with labels only on the target."""
        pad = self.tokenizer.pad_token_id
        sequences = [f["prompt"] + f["target"] for f in features]
        label_rows = [[-100] * len(f["prompt"]) + f["target"] for f in features]
        input_ids = pad_sequences(sequences, pad)
        attention_mask = torch.zeros_like(input_ids)
        for row, seq in enumerate(sequences):
            attention_mask[row, : len(seq)] = 1
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": pad_sequences(label_rows, -100),
        }

    def _gpt2(self, hidden: int, layers: int, seed: int):
        from transformers import GPT2Config, GPT2LMHeadModel

        tok = self.tokenizer
        torch.manual_seed(seed)
        return GPT2LMHeadModel(
            GPT2Config(
                vocab_size=len(tok),
                n_positions=self.config.max_positions,
                n_embd=hidden,
                n_layer=layers,
                n_head=hidden // 32,
                bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
            )
        )

    def teacher_settings(self) -> dict:
        c = self.config
        return {
            "max_source_length": c.max_source_length,
            "max_target_length": c.max_target_length,
            "teacher_hidden": c.teacher_hidden,
            "teacher_layers": c.teacher_layers,
        }

    teacher_eval_limit = 300  # greedy decoding is the slow part of evaluation

    def load_teacher(self, path: str):
        from transformers import GPT2LMHeadModel

        return GPT2LMHeadModel.from_pretrained(path)

    def build_teacher(self, seed: int = 0):
        """A randomly initialised GPT-2 (hidden 384 by default), trained by ``get_teacher``."""
        return self._gpt2(self.config.teacher_hidden, self.config.teacher_layers, seed)

    def build_student(
        self,
        teacher=None,
        *,
        hidden_size: int | None = None,
        num_layers: int | None = None,
        init: str | None = None,
        seed: int = 0,
    ):
        """A small GPT-2 on the same tokenizer; ``init="teacher_pca"`` (default) needs ``teacher``."""
        init = init or self.config.student_init
        if init not in EMBEDDING_INITS:
            raise ValueError(f"init: expected one of {EMBEDDING_INITS}, got {init!r}")
        hidden = hidden_size or self.config.student_hidden
        if hidden <= 0 or hidden % 32:
            raise ValueError(f"hidden_size: expected a positive multiple of 32, got {hidden}")
        if init == "teacher_pca" and teacher is None:
            raise ValueError(
                "teacher: init='teacher_pca' projects the teacher's embeddings; pass the teacher"
            )
        student = self._gpt2(hidden, num_layers or self.config.student_layers, seed)
        if init == "teacher_pca":
            init_embeddings_from_teacher(student, teacher)
        return student

    def generate(self, model, texts: list[str], *, batch_size: int = 64) -> list[str]:
        """Greedy synopses for raw descriptions."""
        tok = self.tokenizer
        device = next(model.parameters()).device
        outputs: list[str] = []
        for start in range(0, len(texts), batch_size):
            prompts = [self.prompt_ids(t) for t in texts[start : start + batch_size]]
            input_ids = pad_sequences(prompts, tok.pad_token_id, left=True).to(device)
            mask = torch.zeros_like(input_ids)
            for row, prompt in enumerate(prompts):
                mask[row, input_ids.shape[1] - len(prompt) :] = 1
            new_tokens = greedy_generate(
                model,
                input_ids,
                mask,
                max_new_tokens=self.config.max_target_length + 1,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
            )
            outputs += [tok.decode(ids, skip_special_tokens=True).strip() for ids in new_tokens]
        return outputs

    @torch.no_grad()
    def evaluate(
        self,
        model,
        split: str = "validation",
        *,
        limit: int | None = None,
        batch_size: int = 64,
        progress: bool = False,
        return_predictions: bool = False,
    ) -> dict:
        """``{"rouge_l", "n"}`` (plus ``"predictions"`` on request) of greedy synopses."""
        from tqdm.auto import tqdm

        was_training = model.training
        model.eval()
        rows = self.dataset(split, limit)
        texts, references = list(rows["text"]), list(rows["summary"])
        predictions: list[str] = []
        for start in tqdm(
            range(0, len(texts), batch_size),
            desc=f"generate {split}",
            disable=not progress,
            leave=False,
        ):
            predictions += self.generate(
                model, texts[start : start + batch_size], batch_size=batch_size
            )
        model.train(was_training)
        result = {"rouge_l": rouge_l(predictions, references), "n": len(references)}
        if return_predictions:
            result["predictions"] = predictions
        return result
