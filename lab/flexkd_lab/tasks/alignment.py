"""Whether a teacher's and a student's token sequences of one text are position-aligned.

Teacher-side tokenisation (``teacher_input_ids``) needs the two sequences to pair position by position:
the same length, the same piece at every position, the special tokens in the same roles ([CLS] where
MPNet has <s>, [SEP] where it has </s>, ...). BERT-uncased WordPiece (the MiniLM) and MPNet's tokenizer
split text alike and MPNet numbers every WordPiece piece 4 above BERT (its vocabulary is 4 specials, then
BERT's, then <mask>): :func:`alignment_stats` measures both claims on real rows.
"""

from __future__ import annotations

from collections.abc import Sequence

ROLES = ("cls_token_id", "sep_token_id", "pad_token_id", "unk_token_id", "mask_token_id")


def special_roles(tokenizer) -> dict[int, str]:
    return {
        getattr(tokenizer, role): role
        for role in ROLES
        if getattr(tokenizer, role, None) is not None
    }


def aligned(student_ids: Sequence[int], teacher_ids: Sequence[int], student_tokenizer, teacher_tokenizer) -> bool:
    """True when the sequences have one length, the same special role wherever either has a special token,
    and the same piece everywhere else."""
    if len(student_ids) != len(teacher_ids):
        return False
    student_roles, teacher_roles = special_roles(student_tokenizer), special_roles(teacher_tokenizer)
    student_pieces = student_tokenizer.convert_ids_to_tokens(list(student_ids))
    teacher_pieces = teacher_tokenizer.convert_ids_to_tokens(list(teacher_ids))
    for s, t, s_piece, t_piece in zip(student_ids, teacher_ids, student_pieces, teacher_pieces, strict=True):
        s_role, t_role = student_roles.get(s), teacher_roles.get(t)
        if s_role is not None or t_role is not None:
            if s_role != t_role:
                return False
        elif s_piece != t_piece:
            return False
    return True


def alignment_stats(
    student_rows: Sequence[Sequence[int]],
    teacher_rows: Sequence[Sequence[int]],
    student_tokenizer,
    teacher_tokenizer,
) -> dict:
    """``{"rows", "aligned", "offsets"}``: how many row pairs are :func:`aligned`, and the distinct
    ``teacher id - student id`` differences at their non-special positions (``[4]`` for MiniLM -> MPNet)."""
    roles = special_roles(student_tokenizer)
    count, offsets = 0, set()
    for s_ids, t_ids in zip(student_rows, teacher_rows, strict=True):
        if aligned(s_ids, t_ids, student_tokenizer, teacher_tokenizer):
            count += 1
            offsets.update(t - s for s, t in zip(s_ids, t_ids, strict=True) if s not in roles)
    return {"rows": len(student_rows), "aligned": count, "offsets": sorted(offsets)}
