"""Tiny randomly initialised Hugging Face models of every supported family, built from configs (no downloads)."""

from __future__ import annotations

import torch
import transformers as tf

VOCAB = 64
HIDDEN = 32
LAYERS = 3


def _decoder_kwargs(**extra):
    return dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        **extra,
    )


def _bert_kwargs():
    return dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=0,
    )


def _bart_kwargs():
    return dict(
        vocab_size=VOCAB,
        d_model=HIDDEN,
        encoder_layers=LAYERS,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=2,
    )


def _opt_kwargs(**extra):
    return dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        ffn_dim=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        **extra,
    )


BUILDERS = {
    "gpt2": lambda: tf.GPT2LMHeadModel(
        tf.GPT2Config(
            vocab_size=VOCAB,
            n_embd=HIDDEN,
            n_layer=LAYERS,
            n_head=4,
            n_positions=64,
            bos_token_id=1,
            eos_token_id=2,
        )
    ),
    "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**_decoder_kwargs())),
    "qwen2": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**_decoder_kwargs())),
    "mistral": lambda: tf.MistralForCausalLM(tf.MistralConfig(**_decoder_kwargs())),
    "opt": lambda: tf.OPTForCausalLM(tf.OPTConfig(**_opt_kwargs())),
    # OPT-350m layout: post-norm, no final norm, last hidden state projected to word_embed_proj_dim
    "opt_project_out": lambda: tf.OPTForCausalLM(
        tf.OPTConfig(**_opt_kwargs(do_layer_norm_before=False, word_embed_proj_dim=16))
    ),
    "bert": lambda: tf.BertForSequenceClassification(tf.BertConfig(**_bert_kwargs(), num_labels=3)),
    "roberta": lambda: tf.RobertaForMaskedLM(tf.RobertaConfig(**_bert_kwargs())),
    "bart": lambda: tf.BartForConditionalGeneration(tf.BartConfig(**_bart_kwargs())),
    "mbart": lambda: tf.MBartForConditionalGeneration(tf.MBartConfig(**_bart_kwargs())),
    # no registered family: exercises the generic fallback
    "gpt_neox": lambda: tf.GPTNeoXForCausalLM(
        tf.GPTNeoXConfig(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            num_hidden_layers=LAYERS,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=64,
            bos_token_id=1,
            eos_token_id=2,
        )
    ),
}

SEQ2SEQ = ("bart", "mbart")


def build(name: str) -> torch.nn.Module:
    return BUILDERS[name]().eval()


def padded_batch(
    batch_size: int = 3, length: int = 9, *, seq2seq: bool = False, generator=None
) -> dict:
    """Random token ids, right padding of random length in every row but the first, labels = ids (-100 on pads)."""
    ids = torch.randint(3, VOCAB, (batch_size, length), generator=generator)
    mask = torch.ones(batch_size, length, dtype=torch.long)
    for row in range(1, batch_size):
        keep = int(torch.randint(2, length, (1,), generator=generator))
        mask[row, keep:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    batch = {"input_ids": ids, "attention_mask": mask}
    labels = ids.masked_fill(mask == 0, -100)
    if seq2seq:
        target = torch.randint(3, VOCAB, (batch_size, length - 2), generator=generator)
        target[-1, -2:] = -100
        batch["labels"] = target
    else:
        batch["labels"] = labels
    return batch


def batch_for(name: str, batch_size: int = 3, length: int = 9) -> dict:
    """A padded batch with labels of the kind ``BUILDERS[name]``'s head expects."""
    batch = padded_batch(batch_size, length, seq2seq=name in SEQ2SEQ)
    if name == "bert":  # sequence classification
        batch["labels"] = torch.randint(0, 3, (batch_size,))
    return batch
