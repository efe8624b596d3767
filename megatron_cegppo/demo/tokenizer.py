"""A sentencepiece character tokenizer for the arithmetic task, loadable by transformers.

The task text is ``"37+45=\\boxed{82}"``: digits, ``+``, ``=``, ``}`` and the ``\\boxed{``
marker, which is a single user-defined piece so the policy emits it as one token.  Ids are
fixed: ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, ``<pad>`` 3, ``\\boxed{`` 4, then the characters.

Besides ``tokenizer.model`` the folder gets a ``tokenizer.json``.  transformers 5 picks the
tokenizer class from the model's ``model_type`` when a ``config.json`` sits next to it (a
qwen2 checkpoint gets ``Qwen2Tokenizer`` whatever ``tokenizer_config.json`` says); built from
``tokenizer.model`` alone, that class would mark ``\\boxed{`` special and
``decode(skip_special_tokens=True)`` (what vLLM does) would drop it.  With ``tokenizer.json``
every class sees the same vocabulary, special tokens and (absent) BOS.

Characters outside the vocabulary become ``<unk>`` in sentencepiece but are silently
dropped by the transformers tokenizer; pass such text in ``texts`` when training.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from typing import Iterable, Optional

__all__ = ["BOXED", "TASK_CHARS", "train_task_tokenizer", "load_task_tokenizer"]

BOXED = "\\boxed{"
# Every character the task can produce; always part of the training text so no task
# character can ever be unknown, whatever ``texts`` holds.
TASK_CHARS = "0123456789+=}"

_TOKENIZER_CONFIG = {
    # transformers 5 builds a tokenizers-backed LlamaTokenizer from tokenizer.model.
    "tokenizer_class": "LlamaTokenizer",
    # No BOS, as for Qwen2 models, so every loader encodes a prompt the same way; </s> is
    # appended by the trainer to responses only, never by the tokenizer.
    "add_bos_token": False,
    "add_eos_token": False,
    # The sentencepiece model has no dummy prefix; without this the HF side would prepend
    # "▁" (not in the vocab) and strip a leading space on decode.
    "add_prefix_space": False,
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "pad_token": "<pad>",
    "clean_up_tokenization_spaces": False,
    "model_max_length": 64,
}


def train_task_tokenizer(out_dir: str, texts: Optional[Iterable[str]] = None) -> str:
    """Train the character tokenizer, write ``tokenizer.model``, ``tokenizer.json`` and
    ``tokenizer_config.json`` to ``out_dir`` and return the path of ``tokenizer.model``.

    ``texts`` (optional) are extra training sentences; pieces are ordered by character
    frequency, then code point, so the same input always gives the same bytes.
    """
    import sentencepiece as spm

    corpus = [TASK_CHARS] + [t for t in (texts or []) if t]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=buf,
        model_type="char",
        # every character plus the 4 specials and \boxed{: sentencepiece drops the rarest
        # characters beyond vocab_size, even with hard_vocab_limit=False
        vocab_size=len(set("".join(corpus))) + 5,
        hard_vocab_limit=False,
        character_coverage=1.0,
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        # identity: no NFKC table in the file (keeps it ~1 KB) and no text rewriting.
        normalization_rule_name="identity",
        user_defined_symbols=[BOXED],
        unk_id=0, bos_id=1, eos_id=2, pad_id=3,
        unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>", pad_piece="<pad>",
        num_threads=1,
        minloglevel=2,
    )
    os.makedirs(out_dir, exist_ok=True)
    # Built in a scratch folder: a stale tokenizer.json or a config.json in out_dir would
    # otherwise take part in the conversion.
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "tokenizer.model"), "wb") as f:
            f.write(buf.getvalue())
        with open(os.path.join(tmp, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(_TOKENIZER_CONFIG, f, indent=2, sort_keys=True)
            f.write("\n")
        converted = _converted_json(tmp)
        with open(os.path.join(tmp, "tokenizer.json"), "w", encoding="utf-8") as f:
            f.write(converted)
        for name in ("tokenizer.model", "tokenizer_config.json", "tokenizer.json"):
            shutil.copyfile(os.path.join(tmp, name), os.path.join(out_dir, name))
    return os.path.join(out_dir, "tokenizer.model")


def _converted_json(folder: str) -> str:
    """The tokenizers-library form of the sentencepiece model in ``folder``."""
    from transformers import LlamaTokenizer

    # from_pretrained, not LlamaTokenizer(vocab_file=...): the latter ignores the file in
    # transformers 5 and gives a 3-token vocabulary.
    tok = LlamaTokenizer.from_pretrained(folder)
    _check(tok, folder)
    return tok.backend_tokenizer.to_str(pretty=True)


def load_task_tokenizer(path: str):
    """Load the tokenizer written by :func:`train_task_tokenizer` (a folder, or the
    ``tokenizer.model`` inside it).

    Uses ``AutoTokenizer`` (what vLLM does too) and checks the result against the
    sentencepiece model, so a wrong class or a truncated vocabulary fails loudly.
    """
    from transformers import AutoTokenizer

    folder = os.path.dirname(path) if path.endswith(".model") else path
    tok = AutoTokenizer.from_pretrained(folder)
    _check(tok, folder)
    return tok


def _check(tok, folder: str) -> None:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=os.path.join(folder, "tokenizer.model"))
    if len(tok) != sp.get_piece_size():
        raise RuntimeError(f"tokenizer in {folder} loaded with {len(tok)} tokens, "
                           f"tokenizer.model has {sp.get_piece_size()}")
    ids = tok.encode(BOXED + "1}", add_special_tokens=False)
    if ids != sp.encode(BOXED + "1}"):
        raise RuntimeError(f"tokenizer in {folder} encodes the task text differently "
                           f"from tokenizer.model: {ids}")
    if tok.decode(ids, skip_special_tokens=True) != BOXED + "1}":
        raise RuntimeError(f"tokenizer in {folder} drops {BOXED!r} when skipping special tokens")
