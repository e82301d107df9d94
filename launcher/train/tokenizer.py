"""The run's tokenizer: a local pretrained one, or a byte-level BPE trained once on the data by rank 0.

Never touches the hub: compute nodes are offline, so a tokenizer is either a local directory or built here. The
functions take the ``model`` section (``ModelConfig``; a plain mapping of its values is merged into it).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Callable, Iterable

from transformers import AutoTokenizer, PreTrainedTokenizerFast

from launcher.config.load import section
from launcher.config.schema import ModelConfig

log = logging.getLogger(__name__)

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
# Byte-level BPE starts from the 256 byte symbols; the special tokens come first so their ids are 0, 1, 2.
SPECIAL_TOKENS = [PAD, BOS, EOS]
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)
# A role-tagged template (tags as in data_formats.ROLE_TAG): every message ends with eos, so the model learns to
# stop after its own turn, and rendering n messages gives a prefix of rendering n+1 (the data code relies on that to
# mask prompt turns).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def tokenizer_source(model: ModelConfig) -> Path | None:
    """The local directory to load from (model.tokenizer, else model.pretrained), or None to train one."""
    model = section(model, ModelConfig)
    for key, value in (("tokenizer", model.tokenizer), ("pretrained", model.pretrained)):
        if value:
            path = Path(value).expanduser()
            if not path.is_dir():
                raise FileNotFoundError(
                    f"model.{key}={value!r}: no such directory (compute nodes are offline: "
                    "give a local directory holding tokenizer files, staged on the login node)"
                )
            return path
    return None


def load_or_build_tokenizer(
    model: ModelConfig,
    texts_for_training: Callable[[], Iterable[str]],
    save_dir: Path,
    *,
    is_main: bool,
    barrier: Callable[[], None],
) -> PreTrainedTokenizerFast:
    """Load the configured tokenizer, or train one on rank 0 into ``save_dir`` and load it everywhere.

    Every rank calls ``barrier()`` exactly once on the training path and never on the pretrained path (the
    choice depends on the config only, so all ranks take the same branch and cannot deadlock).
    """
    model = section(model, ModelConfig)
    source = tokenizer_source(model)
    if source is not None:
        return _load(source, f"model.tokenizer/model.pretrained directory {source}")
    save_dir = Path(save_dir)
    if is_main and not has_saved_tokenizer(save_dir):
        start = time.perf_counter()
        tokenizer = train_bpe_tokenizer(
            texts_for_training(), model.vocab_size, max_length=model.max_position_embeddings
        )
        save_atomically(tokenizer, save_dir)
        log.info("trained a %d-token byte-level BPE in %.2f s -> %s", len(tokenizer), time.perf_counter() - start,
                 save_dir)
    barrier()  # unconditional: a rank that skipped it while rank 0 waits here would hang the job
    if not has_saved_tokenizer(save_dir):
        raise FileNotFoundError(f"{save_dir}: rank 0 saved no tokenizer here; is it on a file system all nodes share?")
    return _load(save_dir, f"the run's tokenizer in {save_dir}")


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, *, max_length: int | None = None
                        ) -> PreTrainedTokenizerFast:
    """A byte-level BPE on ``texts`` with <s>, </s>, <pad> and the chat template; same texts -> same tokenizer."""
    from tokenizers import ByteLevelBPETokenizer

    if vocab_size < MIN_VOCAB:
        raise ValueError(f"model.vocab_size={vocab_size}: a byte-level BPE needs at least {MIN_VOCAB}")
    bpe = ByteLevelBPETokenizer()
    # min_frequency=2: a pair seen once is noise; the vocabulary may end below vocab_size on small data.
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
                            show_progress=False)
    if bpe.get_vocab_size() <= MIN_VOCAB:
        raise ValueError("the data gave the tokenizer nothing to learn from (no text, or no repeated byte pairs)")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=BOS, eos_token=EOS, pad_token=PAD)
    tokenizer.chat_template = CHAT_TEMPLATE
    if max_length:
        tokenizer.model_max_length = max_length
    return tokenizer


def has_saved_tokenizer(save_dir: Path) -> bool:
    return (Path(save_dir) / "tokenizer_config.json").is_file()


def save_atomically(tokenizer: PreTrainedTokenizerFast, save_dir: Path) -> None:
    """save_pretrained into a sibling temp dir, then rename: no rank or later run ever sees half a tokenizer."""
    save_dir = Path(save_dir)
    save_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = save_dir.with_name(f".{save_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, save_dir)  # replaces an empty save_dir; fails (and we say so) on a non-empty one
    except OSError as e:
        raise OSError(f"cannot move the new tokenizer into {save_dir} ({e}); remove that directory") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load(path: Path, what: str) -> PreTrainedTokenizerFast:
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise OSError(f"cannot load a tokenizer from {what}: {e}") from e

