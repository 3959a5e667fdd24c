"""Training: Trainer gradient accumulation (num_items_in_batch), gradient checkpointing, and the tiny preset learning."""

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from transformers import Trainer, TrainingArguments

from colt5_hf import CoLT5Config, CoLT5ForConditionalGeneration


TINY = Path(__file__).resolve().parent.parent / "configs" / "colt5-tiny.json"


def tiny_model(seed=0, **overrides):
    config = CoLT5Config.from_json_file(str(TINY))
    for key, value in overrides.items():
        setattr(config, key, value)
    assert config.dropout_rate == 0.0
    torch.manual_seed(seed)
    return CoLT5ForConditionalGeneration(config)


def seq2seq_samples(count, seed=0):
    """Samples of different input and label lengths, so that micro-batches hold different numbers of label tokens."""
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(count):
        source_length, target_length = 6 + (7 * i) % 23, 2 + (5 * i) % 13
        samples.append({
            "input_ids": torch.randint(2, 384, (source_length,), generator=generator),
            "labels": torch.randint(2, 384, (target_length,), generator=generator),
        })
    return samples


def collate(samples):
    """Right-pad input_ids with 0 (and mask them) and labels with -100."""
    source_length = max(len(s["input_ids"]) for s in samples)
    target_length = max(len(s["labels"]) for s in samples)
    input_ids = torch.zeros(len(samples), source_length, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    labels = torch.full((len(samples), target_length), -100, dtype=torch.long)
    for row, sample in enumerate(samples):
        input_ids[row, : len(sample["input_ids"])] = sample["input_ids"]
        attention_mask[row, : len(sample["input_ids"])] = 1
        labels[row, : len(sample["labels"])] = sample["labels"]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def train_with_trainer(model, samples, batch_size, accumulation, output_dir):
    sequential = (
        {"train_sampling_strategy": "sequential"}
        if "train_sampling_strategy" in {f.name for f in dataclasses.fields(TrainingArguments)}
        else {}  # older Transformers: the seeded RandomSampler gives both runs the same order
    )
    args = TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        max_steps=len(samples) // (batch_size * accumulation),
        optim="sgd",  # plain SGD: weight differences are the learning rate times gradient differences (Adam would
        learning_rate=1e-2,  # blow up round-off in near-zero gradients)
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=1e9,  # no clipping: compare the raw accumulated gradients
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
        **sequential,
    )
    trainer = Trainer(model=model, args=args, train_dataset=samples, data_collator=collate)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return losses, {name: p.detach().clone() for name, p in model.named_parameters()}


def max_weight_difference(a, b):
    return max((a[name] - b[name]).abs().max().item() for name in a)


def test_gradient_accumulation_matches_a_full_batch(tmp_path):
    samples = seq2seq_samples(16)
    # the test is only sensitive if micro-batches of one step hold different numbers of label tokens
    counts = [len(s["labels"]) for s in samples]
    assert any(sum(counts[i : i + 2]) != sum(counts[i + 2 : i + 4]) for i in range(0, 16, 4))

    full_losses, full_weights = train_with_trainer(tiny_model(), samples, 4, 1, tmp_path / "full")
    accumulated_losses, accumulated_weights = train_with_trainer(tiny_model(), samples, 2, 2, tmp_path / "ga")
    assert len(full_losses) == len(accumulated_losses) == 4
    assert accumulated_losses == pytest.approx(full_losses, rel=1e-4)
    initial = {name: p.detach() for name, p in tiny_model().named_parameters()}
    assert max_weight_difference(full_weights, initial) > 1e-3  # training moved the weights
    assert max_weight_difference(accumulated_weights, full_weights) < 1e-5

    # The first step's loss is the token-level mean over the 4 samples, computed here by hand from the initial model
    model = tiny_model().eval()
    with torch.no_grad():
        batch = collate(samples[:4])
        logits = model(**batch).logits
        token_mean = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten()).item()
        # averaging the two micro-batch means instead (what ignoring num_items_in_batch gives) is measurably different
        micro_means = [model(**collate(samples[i : i + 2])).loss.item() for i in (0, 2)]
    assert full_losses[0] == pytest.approx(token_mean, rel=1e-4)
    assert abs(sum(micro_means) / 2 - token_mean) > 1e-2


def loss_and_gradients(model, batch):
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")  # 5.24 renamed it
@pytest.mark.parametrize("checkpointing_kwargs", [None, {"use_reentrant": False}, {"use_reentrant": True}])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(checkpointing_kwargs):
    model = tiny_model().train()
    batch = collate(seq2seq_samples(4, seed=1))
    batch["input_ids"] = torch.cat([batch["input_ids"], batch["input_ids"]], dim=1)  # long enough to route
    batch["attention_mask"] = torch.cat([batch["attention_mask"], batch["attention_mask"]], dim=1)
    loss, gradients = loss_and_gradients(model, batch)

    forward_calls = []
    # Hooks of the blocks themselves stay outside the checkpoint, and the recomputation stops as soon as it has what the
    # backward pass needs: count calls into each block's first layer norm.
    for first in (*(b.attention_layer_norm for b in model.encoder.block),
                  *(b.self_attention_layer_norm for b in model.decoder.block)):
        first.register_forward_pre_hook(lambda *_: forward_calls.append(1))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing_kwargs)
    checkpointed_loss, checkpointed_gradients = loss_and_gradients(model, batch)
    # every block ran twice: once in the forward pass, once recomputed in the backward pass
    assert len(forward_calls) == 2 * (len(model.encoder.block) + len(model.decoder.block))

    # equal up to float32 round-off (the reentrant variant runs the first forward pass under no_grad)
    assert checkpointed_loss.item() == pytest.approx(loss.item(), rel=1e-6)
    for name, gradient in gradients.items():
        scale = gradient.abs().max().item()
        torch.testing.assert_close(checkpointed_gradients[name], gradient, rtol=1e-4, atol=1e-5 * scale, msg=name)


def copy_batch(generator, batch_size, length, symbols):
    """Random sequences of `length` symbols (token ids 2 .. symbols + 1) followed by EOS (1); target = input."""
    tokens = torch.randint(2, 2 + symbols, (batch_size, length), generator=generator)
    tokens = torch.cat([tokens, torch.ones(batch_size, 1, dtype=torch.long)], dim=1)
    return {"input_ids": tokens, "labels": tokens.clone()}


@pytest.fixture
def one_thread():
    """The tiny model's matrices are too small to gain from threads; one thread also keeps a loaded machine fast."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_tiny_preset_learns_to_copy(one_thread):
    length, symbols, steps = 6, 32, 1050  # about 30 s of CPU; loss 0.83 at step 700, 0.044 at step 1050
    model = tiny_model().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    generator = torch.Generator().manual_seed(0)
    evaluation = copy_batch(torch.Generator().manual_seed(1), 64, length, symbols)

    def evaluate():
        with torch.no_grad():
            outputs = model(**evaluation)
        return outputs.loss.item(), (outputs.logits.argmax(-1) == evaluation["labels"]).float().mean().item()

    initial, _ = evaluate()
    for _ in range(steps):
        loss = model(**copy_batch(generator, 32, length, symbols)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    final, accuracy = evaluate()

    # A model blind to the input reaches at best length * ln(symbols) / (length + 1) nats per token (uniform symbols,
    # then EOS); one that reads the input's symbols but not their order, about ln(length!) / (length + 1). Going well
    # below both means the model copies the sequence in order.
    blind = length * math.log(symbols) / (length + 1)
    unordered = math.lgamma(length + 1) / (length + 1)
    assert final < 0.3 * initial
    assert final < 0.5 * unordered < 0.2 * blind, (initial, final)
    assert accuracy > 0.8
