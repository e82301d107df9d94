"""A finished run's model at work: loading its export, merging a LoRA adapter, generating, classifying.

Nothing is downloaded: the export (and, for an adapter, the base model it names, a local directory) only. Loading
goes through the transformers and peft auto classes of the run's task (``launcher.train.modeling.model_class``), the
same way a user would load the export by hand.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

from launcher.rundir import TMP_SUFFIX
from launcher.train.exported import Export

for _name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_name, "1")

import torch  # noqa: E402 - after the offline switches

PEFT_CLASSES = {"causal_lm": "AutoPeftModelForCausalLM", "classification": "AutoPeftModelForSequenceClassification"}


@dataclass
class Loaded:
    model: Any
    tokenizer: Any
    weights: str  # "full", "adapter" or "merged"
    device: torch.device


def load(export: Export, choice: str = "auto", device: Optional[str] = None) -> Loaded:
    """The run's model in eval mode (``choice``: auto, adapter or merged; see ``Export.weights``) and tokenizer."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from launcher.train.modeling import model_class

    hf_logging.disable_progress_bar()
    weights = export.weights(choice)
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if target.type == "cuda" else torch.float32
    if weights == "adapter":
        import peft

        model = getattr(peft, PEFT_CLASSES[export.task]).from_pretrained(str(export.directory), dtype=dtype,
                                                                         local_files_only=True)
    else:
        directory = export.merged if weights == "merged" else export.directory
        model = model_class(export.task).from_pretrained(str(directory), dtype=dtype, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(str(export.directory), local_files_only=True)
    return Loaded(model.to(target).eval(), tokenizer, weights, target)


def merge(export: Export) -> Path:
    """Fold the adapter into the base weights (peft ``merge_and_unload``) and write a standalone model (with the
    tokenizer) to ``export/merged``, through a temporary directory renamed when complete."""
    if not export.is_adapter:
        from launcher.errors import UserError

        raise UserError("RUN_DIR", str(export.run_dir), "the export is a full model, not a LoRA adapter",
                        "--merge is for peft=lora runs; the export is already standalone")
    loaded = load(export, "adapter", device="cpu")
    merged = loaded.model.merge_and_unload()
    tmp = export.merged.with_name(export.merged.name + TMP_SUFFIX)
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp)
    loaded.tokenizer.save_pretrained(tmp)
    if export.merged.exists():
        shutil.rmtree(export.merged)
    tmp.rename(export.merged)
    return export.merged


def prompt_text(export: Export, tokenizer: Any, prompt: str) -> str:
    """What the model sees for ``prompt``, as in training: the chat template (one user turn and the assistant's
    opening) for chat runs, the instruction template for instruction runs, the text itself otherwise."""
    if export.data_format == "chat":
        from launcher.train.tokenizer import CHAT_TEMPLATE

        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True,
                                             chat_template=None if tokenizer.chat_template else CHAT_TEMPLATE)
    if export.data_format == "instruction":
        from launcher.train.data_formats import instruction_prompt

        return (tokenizer.bos_token or "") + instruction_prompt({"instruction": prompt})
    return prompt


def generate(export: Export, loaded: Loaded, prompts: List[str], options: Dict[str, Any]) -> List[str]:
    """One completion per prompt (transformers ``generate`` with ``options``: max_new_tokens, do_sample, ...)."""
    tokenizer, model = loaded.tokenizer, loaded.model
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    completions = []
    for prompt in prompts:  # one at a time: no padding, so the output does not depend on the batch
        # add_special_tokens=False: training encoded its text so too (templates carry bos/eos as text).
        ids = tokenizer(prompt_text(export, tokenizer, prompt), add_special_tokens=False,
                        return_tensors="pt")["input_ids"].to(loaded.device)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pad_token_id=pad, **options)
        completions.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return completions


def classify(loaded: Loaded, texts: List[str], max_length: Optional[int] = None) -> List[Dict[str, Any]]:
    """{"label", "score"} per text: the most probable class, tokenized as in training (the tokenizer's special
    tokens, cut at ``max_length``: the run's train.seq_len) and as the text-classification pipeline does."""
    config = loaded.model.config
    results = []
    for text in texts:
        batch = loaded.tokenizer(text, truncation=True, max_length=max_length, return_tensors="pt").to(loaded.device)
        with torch.no_grad():
            probs = loaded.model(**batch).logits.float().softmax(-1)[0]
        best = int(probs.argmax())
        results.append({"label": config.id2label[best], "score": float(probs[best])})
    return results
