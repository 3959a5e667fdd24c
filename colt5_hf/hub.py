"""Sharing CoLT5 models on the Hugging Face Hub as custom code.

Every `save_pretrained` of a CoLT5 model writes a folder that loads with `trust_remote_code=True` where colt5-hf is
not installed: configuration_colt5.py, modeling_colt5.py and the modules they import, and an `auto_map` for
AutoConfig, AutoModel and AutoModelForSeq2SeqLM (see `CoLT5PreTrainedModel.save_pretrained`). So `model.push_to_hub`
and Trainer checkpoints are loadable custom code too; what they lack is a CoLT5 model card (Transformers writes a
generic one on `push_to_hub`). `save_for_hub` adds the card, `push_to_hub` uploads such a folder.
"""

import tempfile
from fractions import Fraction
from pathlib import Path

from huggingface_hub import HfApi


LORA_TARGET_MODULES = ("q", "k", "v", "o", "wi_0", "wi_1", "wo")
"""Linear layers for PEFT's `target_modules`: attention and feed-forward projections of the encoder's light and
heavy branches and of the decoder (the names of T5's layers; PEFT has no default for the `colt5` model type)."""


def _fraction(value: float) -> str:
    fraction = Fraction(value).limit_denominator(1000)
    return str(fraction) if fraction.denominator > 1 else str(fraction.numerator)


def model_card(model, model_id: str | None = None, description: str | None = None) -> str:
    """The README.md of a CoLT5 model folder: Hub metadata, the architecture in numbers, how to load and fine-tune."""
    config = model.config
    model_id = model_id or "path/to/this/folder"
    auto_map = getattr(config, "auto_map", None) or {}
    seq2seq = "AutoModelForSeq2SeqLM" in auto_map
    auto_class = "AutoModelForSeq2SeqLM" if seq2seq else "AutoModel"
    code_files = sorted(f"`{entry.split('.')[0]}.py`" for entry in auto_map.values())
    rows = [
        ("architecture", type(model).__name__),
        ("parameters", f"{model.num_parameters():,}"),
        ("encoder / decoder layers", f"{config.num_layers} / {config.num_decoder_layers}"),
        ("d_model / d_kv", f"{config.d_model} / {config.d_kv}"),
        ("encoder heads light / heavy", f"{config.num_light_heads} / {config.num_heavy_heads}"),
        ("encoder feed-forward width light / heavy", f"{config.light_d_ff} / {config.heavy_d_ff}"),
        ("local attention radius", str(config.local_radius)),
        ("routed share: attention queries / keys-values / feed-forward",
         " / ".join(_fraction(f) for f in (config.attention_q_fraction, config.attention_kv_fraction,
                                            config.feed_forward_fraction))),
        ("router", f"{config.router_type}, {config.router_iterations} iterations, epsilon {config.router_epsilon}"),
        ("decoder heads / feed-forward width", f"{config.num_heads} / {config.d_ff}"),
        ("cross-attention routes / key-value heads per route / share of encoder tokens",
         f"{config.num_cross_attention_routes} / {config.num_cross_attention_kv_heads} / "
         f"{_fraction(config.cross_attention_fraction)}"),
        ("vocabulary", str(config.vocab_size)),
    ]
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    pipeline = "text2text-generation" if seq2seq else "feature-extraction"
    usage = (
        f'model = {auto_class}.from_pretrained("{model_id}", trust_remote_code=True)\n'
        + ("outputs = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=64)"
           if seq2seq else "hidden_states = model(input_ids, attention_mask=attention_mask).last_hidden_state")
    )
    targets = ", ".join(f'"{name}"' for name in LORA_TARGET_MODULES)
    return f"""---
library_name: transformers
pipeline_tag: {pipeline}
license: apache-2.0
tags:
- colt5
- long-context
- custom_code
---

# {model_id}

{description or "A CoLT5 model saved with colt5-hf."}

CoLT5 ([Ainslie et al. 2023](https://arxiv.org/abs/2303.09752)) is LongT5 with conditional computation: every
encoder layer runs a light branch (local attention, narrow feed-forward) on all tokens and a heavy branch (full
attention, wide feed-forward) only on the tokens its learned routers pick.

| | |
|---|---|
{table}

## Usage

The modeling code ({", ".join(code_files)} and the modules they import) is part of this repository, so the
`colt5-hf` package need not be installed:

```python
from transformers import {auto_class}

{usage}
```

With `colt5-hf` installed and imported (`import colt5_hf`), the same call works without `trust_remote_code` and runs
the installed code.

## Fine-tuning with LoRA

The projections keep T5's names. `target_modules=[{targets}]` puts adapters on the attention and feed-forward layers
of the encoder's light and heavy branches and of the decoder; the routers are not linear layers and stay frozen
unless listed in `modules_to_save`.
"""


def save_for_hub(model, folder, tokenizer=None, model_id: str | None = None, description: str | None = None,
                 **save_kwargs) -> Path:
    """Save `model` (and `tokenizer`) with `save_pretrained` and write the model card: a folder ready for the Hub."""
    folder = Path(folder)
    model.save_pretrained(folder, **save_kwargs)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    (folder / "README.md").write_text(model_card(model, model_id, description))
    return folder


def push_to_hub(model, repo_id: str, tokenizer=None, description: str | None = None, private: bool | None = None,
                token: str | None = None, commit_message: str = "Upload CoLT5 model", revision: str | None = None,
                create_pr: bool = False):
    """Upload the `save_for_hub` folder of `model` to the Hub repository `repo_id` (created if missing)."""
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as folder:
        save_for_hub(model, folder, tokenizer, model_id=repo_id, description=description)
        return api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message,
                                 revision=revision, create_pr=create_pr)


__all__ = ["LORA_TARGET_MODULES", "model_card", "save_for_hub", "push_to_hub"]
