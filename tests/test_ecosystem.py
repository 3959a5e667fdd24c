"""CoLT5 with the ecosystem's own engines, on the CPU: the Hub custom-code folder (loaded in a process where colt5_hf
cannot be imported), device_map with disk offload, LoRA through PEFT and Trainer, bf16/fp16, torch.compile, and
DDP / FSDP2 on CPU processes (gloo) against one process.

Environment switches: COLT5_COMPILE=0 skips the torch.compile tests; COLT5_COMPILE=full also runs a training step
through inductor (minutes on 2 cores; the default training step uses the aot_eager backend). COLT5_MULTIPROCESS=0
skips the tests that start CPU process groups.
"""

import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import sysconfig
import textwrap
import types
from pathlib import Path

import pytest
import torch
from accelerate import infer_auto_device_map
from accelerate.utils import compute_module_sizes
from huggingface_hub import ModelCard
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers import Trainer, TrainingArguments

import colt5_hf
from colt5_hf import (
    LORA_TARGET_MODULES,
    CoLT5EncoderModel,
    CoLT5ForConditionalGeneration,
    CoLT5Model,
    save_for_hub,
)
from colt5_hf import modeling_colt5
from tiny import build, relative_error, tiny_config


REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "colt5_hf"
ROUTED_CROSS_ATTENTION = dict(num_cross_attention_routes=2, cross_attention_fraction=0.5)
LENGTHS = (61, 44, 30)  # every router of the tiny preset takes fewer tokens than a sample has
COMPILE = os.environ.get("COLT5_COMPILE", "1")
needs_compile = pytest.mark.skipif(COMPILE == "0", reason="COLT5_COMPILE=0")
needs_processes = pytest.mark.skipif(os.environ.get("COLT5_MULTIPROCESS", "1") == "0", reason="COLT5_MULTIPROCESS=0")


def batch(lengths=LENGTHS, target_length=7, seed=1):
    """Right-padded inputs (random tokens under the padding: the mask alone hides them) and decoder inputs."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(2, 384, (len(lengths), max(lengths)), generator=generator)
    attention_mask = (torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]).long()
    decoder_input_ids = torch.randint(2, 384, (len(lengths), target_length), generator=generator)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "decoder_input_ids": decoder_input_ids}


def labelled(lengths=LENGTHS, target_length=7, seed=1):
    inputs = batch(lengths, target_length, seed)
    inputs["labels"] = inputs.pop("decoder_input_ids")
    return inputs


@torch.no_grad()
def logits_of(model, inputs):
    return model(**inputs).logits


@torch.no_grad()
def greedy(model, inputs, new_tokens=8):
    return model.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                          max_new_tokens=new_tokens, do_sample=False)


def reverse_task(count, source_length=40, target_length=6, seed=0):
    """Trainer samples of equal shapes: labels are the first tokens of the input, reversed."""
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(count):
        length = int(torch.randint(target_length, source_length + 1, (), generator=generator))
        input_ids = torch.zeros(source_length, dtype=torch.long)
        input_ids[:length] = torch.randint(2, 384, (length,), generator=generator)
        samples.append({"input_ids": input_ids, "attention_mask": (input_ids != 0).long(),
                        "labels": input_ids[:target_length].flip(0)})
    return samples


def training_arguments(output_dir, **overrides):
    values = dict(output_dir=str(output_dir), per_device_train_batch_size=4, max_steps=3, learning_rate=1e-3,
                  lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                  seed=0, disable_tqdm=True)
    return TrainingArguments(**{**values, **overrides})


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------------------------------------------------------------
# Hub custom code


def relative_import_closure(*names):
    """Modules of colt5_hf reachable from `names` through `from .module import ...` lines (guarded ones included):
    what a custom-code folder must hold."""
    found, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name not in found:
            found.add(name)
            source = (PACKAGE / f"{name}.py").read_text()
            todo += re.findall(r"^\s*from\s+\.(\w+)\s+import", source, flags=re.MULTILINE)
    return {f"{name}.py" for name in found}


@pytest.fixture(scope="module")
def hub_folder(tmp_path_factory):
    """A seq2seq model with routed cross-attention saved by `save_for_hub`, and the model itself."""
    model = build(**ROUTED_CROSS_ATTENTION)
    folder = tmp_path_factory.mktemp("hub") / "colt5-tiny"
    save_for_hub(model, folder, model_id="someone/colt5-tiny", description="A tiny CoLT5 for tests.")
    return folder, model


def test_save_pretrained_writes_custom_code_folder(hub_folder):
    folder, model = hub_folder
    code_files = relative_import_closure("configuration_colt5", "modeling_colt5")
    assert {"configuration_colt5.py", "modeling_colt5.py", "routing.py"} <= code_files
    assert {path.name for path in folder.glob("*.py")} == code_files
    for name in code_files:  # verbatim copies of the package's flat modules
        assert (folder / name).read_bytes() == (PACKAGE / name).read_bytes()
        source = (folder / name).read_text()
        assert not re.search(r"^\s*(from|import)\s+colt5_hf", source, flags=re.MULTILINE), name
        assert not re.search(r"^\s*from\s+\.\s+import", source, flags=re.MULTILINE), name
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_colt5.CoLT5Config",
        "AutoModel": "modeling_colt5.CoLT5Model",
        "AutoModelForSeq2SeqLM": "modeling_colt5.CoLT5ForConditionalGeneration",
    }
    assert config["architectures"] == ["CoLT5ForConditionalGeneration"]
    assert (folder / "model.safetensors").is_file() and (folder / "generation_config.json").is_file()


def test_model_card(hub_folder):
    folder, model = hub_folder
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "text2text-generation"
    assert {"colt5", "custom_code"} <= set(card.data.tags)
    text = card.text
    assert "# someone/colt5-tiny" in text and "A tiny CoLT5 for tests." in text
    assert 'AutoModelForSeq2SeqLM.from_pretrained("someone/colt5-tiny", trust_remote_code=True)' in text
    assert f"| parameters | {sum(p.numel() for p in model.parameters()):,} |" in text
    assert "| routed share: attention queries / keys-values / feed-forward | 1/16 / 1/8 / 1/16 |" in text
    assert "| cross-attention routes / key-value heads per route / share of encoder tokens | 2 / 1 / 1/2 |" in text
    assert 'target_modules=["q", "k", "v", "o", "wi_0", "wi_1", "wo"]' in text


def test_encoder_model_folder_maps_only_automodel(hub_folder, tmp_path):
    folder, _ = hub_folder
    encoder = CoLT5EncoderModel.from_pretrained(folder)  # its config comes with the seq2seq auto_map
    encoder.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["auto_map"] == {
        "AutoConfig": "configuration_colt5.CoLT5Config",
        "AutoModel": "modeling_colt5.CoLT5EncoderModel",
    }
    assert {path.name for path in tmp_path.glob("*.py")} == relative_import_closure(
        "configuration_colt5", "modeling_colt5"
    )


REMOTE_CHILD = textwrap.dedent('''
    import importlib.util, json, sys
    from pathlib import Path

    report = {"spec": importlib.util.find_spec("colt5_hf") is not None}
    try:
        import colt5_hf
        report["import_error"] = None
    except ImportError as error:
        report["import_error"] = repr(error)

    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForSeq2SeqLM

    folder, work = sys.argv[1], Path(sys.argv[2])
    inputs = torch.load(work / "inputs.pt")
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    seq2seq = AutoModelForSeq2SeqLM.from_pretrained(folder, trust_remote_code=True).eval()
    bare = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    with torch.no_grad():
        outputs = {
            "logits": seq2seq(**inputs).logits,
            "hidden": bare(**inputs).last_hidden_state,
            "generated": seq2seq.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                          max_new_tokens=8, do_sample=False),
        }
    torch.save(outputs, work / "outputs.pt")
    seq2seq.save_pretrained(work / "resaved")
    report["classes"] = [f"{type(obj).__module__}.{type(obj).__name__}" for obj in (config, seq2seq, bare)]
    report["module_files"] = sorted({getattr(module, "__file__", None) or "" for module in list(sys.modules.values())})
    (work / "report.json").write_text(json.dumps(report))
''')


def test_custom_code_copy_of_the_kernels_imports_beside_colt5_hf(hub_folder, monkeypatch):
    """The folder's kernel modules, imported as Transformers imports custom code (another package name) in a process
    that has colt5_hf loaded, register their Triton ops under their own namespace instead of failing on colt5::.
    Without Triton they raise ImportError, which the model's guards catch."""
    folder, _ = hub_folder
    package = types.ModuleType("colt5_tiny_copy")
    package.__path__ = [str(folder)]
    monkeypatch.setitem(sys.modules, "colt5_tiny_copy", package)
    if importlib.util.find_spec("triton") is None:
        with pytest.raises(ImportError):
            importlib.import_module("colt5_tiny_copy.coordinate_descent_kernel")
        return
    copy = importlib.import_module("colt5_tiny_copy.coordinate_descent_kernel")
    assert importlib.import_module("colt5_hf.kernel_layout").OP_NAMESPACE == "colt5"
    assert copy.OP_NAMESPACE == "colt5_colt5_tiny_copy"
    assert hasattr(torch.ops.colt5, "coordinate_descent")
    assert hasattr(torch.ops.colt5_colt5_tiny_copy, "coordinate_descent")


def test_remote_code_loads_where_colt5_hf_cannot_be_imported(hub_folder, tmp_path):
    folder, model = hub_folder
    inputs = batch()
    torch.save(inputs, tmp_path / "inputs.pt")
    (tmp_path / "child.py").write_text(REMOTE_CHILD)
    # A clean interpreter: -S skips site-packages' .pth files (the editable install of colt5_hf is one), PYTHONPATH
    # gives the installed libraries only, and the working directory holds no colt5_hf.
    libraries = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    assert not any((Path(path) / "colt5_hf").exists() for path in libraries)
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PYTHON", "HF_"))}
    env.update(PYTHONPATH=os.pathsep.join(sorted(libraries)), HF_MODULES_CACHE=str(tmp_path / "modules"),
               HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", HF_HUB_DISABLE_PROGRESS_BARS="1")
    result = subprocess.run([sys.executable, "-S", str(tmp_path / "child.py"), str(folder), str(tmp_path)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())

    # colt5_hf really was out of reach, and the classes came from the folder's copy of the code
    assert not report["spec"] and "colt5_hf" in report["import_error"]
    assert all(name.startswith("transformers_modules.") for name in report["classes"]), report["classes"]
    assert [name.rsplit(".", 1)[-1] for name in report["classes"]] == [
        "CoLT5Config", "CoLT5ForConditionalGeneration", "CoLT5Model"
    ]
    assert not [path for path in report["module_files"] if path.startswith(str(PACKAGE))]
    assert any(path.startswith(str(tmp_path / "modules")) for path in report["module_files"])

    outputs = torch.load(tmp_path / "outputs.pt")
    bare = CoLT5Model.from_pretrained(folder).eval()
    torch.testing.assert_close(outputs["logits"], logits_of(model, inputs), rtol=0, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(outputs["hidden"], bare(**inputs).last_hidden_state, rtol=0, atol=1e-5)
    assert torch.equal(outputs["generated"], greedy(model, inputs))

    # a model loaded as remote code saves remote code again
    resaved = tmp_path / "resaved"
    assert json.loads((resaved / "config.json").read_text())["auto_map"] == json.loads(
        (folder / "config.json").read_text()
    )["auto_map"]
    assert {path.name for path in resaved.glob("*.py")} == {path.name for path in folder.glob("*.py")}


def test_push_to_hub_uploads_the_hub_folder(hub_folder, tmp_path, monkeypatch):
    """Everything up to the network: the repository is created and the saved folder uploaded (a fake HfApi)."""
    folder, model = hub_folder
    calls = {}

    class FakeApi:
        def __init__(self, token=None):
            calls["token"] = token

        def create_repo(self, repo_id, private=None, exist_ok=False):
            calls["create_repo"] = (repo_id, private, exist_ok)
            return type("RepoUrl", (), {"repo_id": "someone/" + repo_id})()

        def upload_folder(self, repo_id, folder_path, commit_message, revision, create_pr):
            calls["upload"] = (repo_id, commit_message)
            shutil.copytree(folder_path, tmp_path / "uploaded")
            return "commit-info"

    monkeypatch.setattr(colt5_hf.hub, "HfApi", FakeApi)
    assert colt5_hf.push_to_hub(model, "colt5-tiny", private=True, token="secret") == "commit-info"
    assert calls["token"] == "secret" and calls["create_repo"] == ("colt5-tiny", True, True)
    assert calls["upload"] == ("someone/colt5-tiny", "Upload CoLT5 model")
    uploaded = tmp_path / "uploaded"
    assert sorted(path.name for path in uploaded.iterdir()) == sorted(path.name for path in folder.iterdir())
    assert "# someone/colt5-tiny" in (uploaded / "README.md").read_text()
    assert (uploaded / "model.safetensors").read_bytes() == (folder / "model.safetensors").read_bytes()


# ---------------------------------------------------------------------------------------------------------------------
# device_map and offload


def block_names(model):
    return {name for name, module in model.named_modules() if type(module).__name__ in model._no_split_modules}


def assert_offloaded(model):
    """Modules mapped to "disk" hold no weights in memory (meta tensors until their forward loads them)."""
    modules = dict(model.named_modules())
    on_disk = [key for key, device in model.hf_device_map.items() if device == "disk"]
    assert on_disk and all(parameter.device.type == "meta" for key in on_disk
                           for parameter in modules[key].parameters())


def test_no_split_modules_keep_blocks_whole():
    model = build()
    budget = int(2.5 * compute_module_sizes(model)["encoder.block.0"])
    blocks = block_names(model)
    assert len(blocks) == 4

    def cut_blocks(device_map):
        return [key for key in device_map if any(key.startswith(block + ".") for block in blocks)]

    whole = infer_auto_device_map(model, max_memory={"cpu": budget}, no_split_module_classes=model._no_split_modules)
    assert set(whole.values()) == {"cpu", "disk"}  # the budget does split the model
    assert cut_blocks(whole) == []
    # every block lands on one device: itself or an ancestor is a key
    assert all(any(block == key or block.startswith(key + ".") or key == "" for key in whole) for block in blocks)
    # the same budget without `_no_split_modules` cuts through a block: the property above is not an accident
    assert cut_blocks(infer_auto_device_map(model, max_memory={"cpu": budget})) != []


def test_device_map_auto_with_disk_offload_matches_unsplit_model(hub_folder, tmp_path):
    folder, model = hub_folder
    budget = int(2.5 * compute_module_sizes(model)["encoder.block.0"])
    offloaded = CoLT5ForConditionalGeneration.from_pretrained(
        folder, device_map="auto", max_memory={"cpu": budget}, offload_folder=tmp_path
    ).eval()
    device_map = offloaded.hf_device_map
    assert set(device_map.values()) == {"cpu", "disk"}
    assert not [key for key in device_map if any(key.startswith(block + ".") for block in block_names(model))]
    assert_offloaded(offloaded)
    inputs = batch()
    torch.testing.assert_close(logits_of(offloaded, inputs), logits_of(model, inputs), rtol=0, atol=1e-6)
    assert torch.equal(greedy(offloaded, inputs), greedy(model, inputs))


ALL_ON_CPU = {"encoder.embed_tokens": "cpu", "encoder.relative_attention_bias": "cpu", "encoder.block": "cpu",
              "encoder.final_layer_norm": "cpu", "decoder.relative_attention_bias": "cpu", "decoder.block": "cpu",
              "decoder.final_layer_norm": "cpu", "lm_head": "cpu"}
MANUAL_MAPS = {
    # parents read these tables (the encoder's bias table serves every block), so they must go through module calls
    "bias-tables-on-disk": {**ALL_ON_CPU, "encoder.relative_attention_bias": "disk",
                            "decoder.relative_attention_bias": "disk"},
    "embedding-and-head-on-disk": {**ALL_ON_CPU, "encoder.embed_tokens": "disk", "lm_head": "disk"},
    "some-blocks-on-disk": {key: value for key, value in {**ALL_ON_CPU, "encoder.block.0": "cpu",
                            "encoder.block.1": "disk", "decoder.block.0": "disk", "decoder.block.1": "cpu"}.items()
                            if key not in ("encoder.block", "decoder.block")},
    "everything-on-disk": {"": "disk"},
}


@pytest.mark.parametrize("device_map", MANUAL_MAPS.values(), ids=MANUAL_MAPS.keys())
def test_manual_device_map_with_disk_offload_matches_unsplit_model(hub_folder, tmp_path, device_map):
    folder, model = hub_folder  # routed cross-attention: the decoder gathers routed keys/values
    offloaded = CoLT5ForConditionalGeneration.from_pretrained(folder, device_map=device_map, offload_folder=tmp_path)
    assert_offloaded(offloaded)
    inputs = batch()
    torch.testing.assert_close(logits_of(offloaded.eval(), inputs), logits_of(model, inputs), rtol=0, atol=1e-6)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_device_map_auto_across_two_gpus_matches_one_gpu(hub_folder):
    folder, model = hub_folder
    budget = int(2.5 * compute_module_sizes(model)["encoder.block.0"])  # GPU 0 holds about two blocks
    split = CoLT5ForConditionalGeneration.from_pretrained(
        folder, device_map="auto", max_memory={0: budget, 1: 100 * budget}
    ).eval()
    device_map = split.hf_device_map
    assert set(device_map.values()) == {0, 1}
    assert not [key for key in device_map if any(key.startswith(block + ".") for block in block_names(model))]
    whole = CoLT5ForConditionalGeneration.from_pretrained(folder, device_map={"": 0}).eval()
    inputs = {key: value.to("cuda:0") for key, value in batch().items()}
    torch.testing.assert_close(logits_of(split, inputs), logits_of(whole, inputs), rtol=0, atol=1e-5)
    assert torch.equal(greedy(split, inputs), greedy(whole, inputs))


# ---------------------------------------------------------------------------------------------------------------------
# PEFT


def test_lora_through_trainer_saves_reloads_and_merges(tmp_path):
    base = build(**ROUTED_CROSS_ATTENTION)
    base.save_pretrained(tmp_path / "base")
    lora = LoraConfig(task_type=TaskType.SEQ_2_SEQ_LM, r=4, lora_alpha=8, lora_dropout=0.0,
                      target_modules=list(LORA_TARGET_MODULES))
    model = get_peft_model(base, lora)

    # the adapters sit on every attention and feed-forward projection of both branches and of the decoder
    adapted = {name.removeprefix("base_model.model.") for name, module in model.named_modules()
               if isinstance(module, LoraLayer)}
    expected = {name for name, module in build(**ROUTED_CROSS_ATTENTION).named_modules()
                if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in LORA_TARGET_MODULES}
    assert adapted == expected and len(expected) == 2 * 14 + 2 * 11
    for part in ("light_attention.q", "heavy_attention.o", "light_feed_forward.wi_1", "heavy_feed_forward.wo",
                 "self_attention.v", "cross_attention.k"):
        assert any(name.endswith(part) for name in adapted), part
    frozen = {name: parameter.detach().clone() for name, parameter in model.named_parameters()
              if not parameter.requires_grad}
    assert all("lora_" in name for name, parameter in model.named_parameters() if parameter.requires_grad)

    samples = reverse_task(8)
    train_batch = {key: torch.stack([sample[key] for sample in samples]) for key in samples[0]}
    with torch.no_grad():
        loss_before = model(**train_batch).loss.item()
    Trainer(model=model, args=training_arguments(tmp_path / "run", max_steps=8, learning_rate=1e-2),
            train_dataset=samples).train()
    model.eval()
    with torch.no_grad():
        loss_after = model(**train_batch).loss.item()
    assert loss_after < 0.9 * loss_before
    assert all(torch.equal(parameter, frozen[name]) for name, parameter in model.named_parameters()
               if name in frozen)
    lora_b = {name: parameter for name, parameter in model.named_parameters() if "lora_B" in name}
    assert lora_b and all(parameter.abs().sum() > 0 for parameter in lora_b.values())  # all start at zero

    inputs = batch()
    adapted_logits = logits_of(model, inputs)
    assert not torch.allclose(adapted_logits, logits_of(CoLT5ForConditionalGeneration.from_pretrained(
        tmp_path / "base").eval(), inputs), atol=1e-3)

    model.save_pretrained(tmp_path / "adapter")
    assert {path.name for path in (tmp_path / "adapter").iterdir()} >= {"adapter_config.json",
                                                                        "adapter_model.safetensors"}
    assert not (tmp_path / "adapter" / "model.safetensors").exists()
    reloaded = PeftModel.from_pretrained(CoLT5ForConditionalGeneration.from_pretrained(tmp_path / "base"),
                                         tmp_path / "adapter").eval()
    # the round trip loses nothing: every weight comes back bit for bit
    trained_weights = model.state_dict()
    assert trained_weights.keys() == reloaded.state_dict().keys()
    assert all(torch.equal(weight, trained_weights[name]) for name, weight in reloaded.state_dict().items())
    # The same weights need not give bit-identical float32 logits: loaded weights are views into the safetensors file
    # (8-byte aligned, not 64), and on some CPUs (AVX2 and older) MKL picks its matmul kernel, hence the order of each
    # dot product's sum, by the operands' alignment. A reordered float32 sum of K terms moves by up to about K * 2^-24
    # of the sum of |terms| (1.5e-5 for the tiny preset's K <= 256), typically sqrt(K) * 2^-24; measured with
    # MKL_ENABLE_INSTRUCTIONS=AVX: 3.4e-7 relative error (1.3e-5 at the worst logit). A lost or mis-loaded adapter
    # moves the logits by 1e-3 or more (the comparison with the base model above).
    assert relative_error(logits_of(reloaded, inputs), adapted_logits) < 1e-5

    merged = reloaded.merge_and_unload()
    assert type(merged) is CoLT5ForConditionalGeneration
    assert not any(isinstance(module, LoraLayer) for module in merged.modules())
    torch.testing.assert_close(logits_of(merged, inputs), adapted_logits, rtol=1e-4, atol=1e-4)


def test_lora_on_routed_cross_attention_keys_and_values_takes_effect():
    """Routed cross-attention computes keys/values through the k/v modules, so their adapters count (and merge)."""
    model = build(**ROUTED_CROSS_ATTENTION)
    inputs = batch()
    base_logits = logits_of(model, inputs)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=r".*cross_attention\.(k|v)",
                                                  init_lora_weights=False)).eval()
    adapted_logits = logits_of(peft_model, inputs)
    assert (adapted_logits - base_logits).abs().max() > 1e-2
    torch.testing.assert_close(logits_of(peft_model.merge_and_unload(), inputs), adapted_logits, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------------------
# Mixed precision


def finite_gradients(model):
    gradients = [parameter.grad for parameter in model.parameters() if parameter.grad is not None]
    return bool(gradients) and all(torch.isfinite(gradient).all() for gradient in gradients)


def test_bf16_autocast_training_steps_on_cpu():
    model = build().train()
    inputs = labelled()
    with torch.no_grad():
        fp32_loss = model(**inputs).loss.item()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    start = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    for step in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outputs = model(**inputs)
        assert outputs.logits.dtype == torch.bfloat16  # autocast is on
        assert torch.isfinite(outputs.loss)
        if step == 0:
            assert outputs.loss.item() == pytest.approx(fp32_loss, rel=2e-2)
        outputs.loss.backward()
        assert finite_gradients(model)
        optimizer.step()
        optimizer.zero_grad()
    assert all(parameter.dtype == torch.float32 for parameter in model.parameters())
    assert all(not torch.equal(parameter, start[name]) for name, parameter in model.named_parameters())


def test_trainer_bf16_on_cpu(tmp_path):
    model = build().train()
    output_dtypes = set()
    model.lm_head.register_forward_hook(lambda module, args, output: output_dtypes.add(output.dtype))
    trainer = Trainer(model=model, args=training_arguments(tmp_path, bf16=True), train_dataset=reverse_task(12))
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert output_dtypes == {torch.bfloat16}  # Trainer really ran under bf16 autocast
    assert all(parameter.dtype == torch.float32 for parameter in model.parameters())


def test_fp16_forward_and_backward_on_cpu():
    inputs = labelled()
    reference = build()
    with torch.no_grad():
        fp32_loss = reference(**inputs).loss.item()
    half = build().half().train()  # pure fp16 weights and activations
    outputs = half(**inputs)
    assert outputs.logits.dtype == torch.float16 and torch.isfinite(outputs.loss)
    assert outputs.loss.item() == pytest.approx(fp32_loss, rel=2e-2)
    outputs.loss.backward()
    assert finite_gradients(half)
    autocast = build().train()  # fp32 weights under fp16 autocast
    with torch.autocast("cpu", dtype=torch.float16):
        outputs = autocast(**inputs)
    assert outputs.logits.dtype == torch.float16 and torch.isfinite(outputs.loss)
    outputs.loss.backward()
    assert finite_gradients(autocast)


def test_fp16_clamp_keeps_overflowing_activations_finite(monkeypatch):
    """T5's fp16 guard in the blocks: a feed-forward that pushes the residual stream past the fp16 range."""
    model = build().half()
    with torch.no_grad():
        weight = model.encoder.block[0].feed_forward.light_feed_forward.wo.weight
        weight.mul_(3e4)
    assert torch.isfinite(weight).all()  # finite weights, overflowing products
    inputs = labelled()

    def encoder_output():
        with torch.no_grad():
            return model.encoder(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                 output_hidden_states=True).hidden_states

    clamped = encoder_output()
    assert clamped[1].abs().max() >= 60000  # the residual did reach the edge of the fp16 range
    assert all(torch.isfinite(hidden).all() for hidden in clamped)
    assert torch.isfinite(model(**inputs).loss)
    monkeypatch.setattr(modeling_colt5, "clamp_fp16", lambda hidden_states: hidden_states)
    assert not torch.isfinite(encoder_output()[1]).all()  # without the clamp the same input overflows


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Trainer fp16 needs CUDA (on the CPU it trains in fp32)")
@pytest.mark.skipif(torch.cuda.device_count() > 1, reason="with several GPUs visible, Trainer wraps the model in "
                    "nn.DataParallel, which runs without autocast: run with CUDA_VISIBLE_DEVICES=0")
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_trainer_mixed_precision_on_cuda(tmp_path, precision):
    model = build().train()
    output_dtypes = set()
    model.lm_head.register_forward_hook(lambda module, args, output: output_dtypes.add(output.dtype))
    arguments = training_arguments(tmp_path, use_cpu=False, max_steps=5, **{precision: True})
    trainer = Trainer(model=model, args=arguments, train_dataset=reverse_task(20))
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 5 and all(torch.isfinite(torch.tensor(losses)))
    accelerator = trainer.accelerator
    assert output_dtypes == {torch.float16 if precision == "fp16" else torch.bfloat16}, (
        f"accelerator mixed_precision={accelerator.mixed_precision} native_amp={accelerator.native_amp} "
        f"model device={next(model.parameters()).device} forward wrapped={hasattr(model, '_original_forward')}"
    )
    assert all(torch.isfinite(parameter).all() for parameter in model.parameters())


# ---------------------------------------------------------------------------------------------------------------------
# torch.compile


def small_model():
    return build(num_layers=1, num_decoder_layers=1, router_iterations=5, **ROUTED_CROSS_ATTENTION)


@needs_compile
def test_compile_inference_matches_eager():
    model = small_model()
    inputs = batch(lengths=(40, 29))
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)  # one graph: no graph breaks in the model
    torch.testing.assert_close(logits_of(compiled, inputs), logits_of(model, inputs), rtol=1e-4, atol=1e-4)


@needs_compile
def test_compile_training_step_matches_eager():
    backend = "inductor" if COMPILE == "full" else "aot_eager"
    inputs = labelled(lengths=(40, 29))
    eager, to_compile = small_model().train(), small_model().train()
    torch._dynamo.reset()
    compiled = torch.compile(to_compile, backend=backend, fullgraph=True)
    eager_loss, compiled_loss = eager(**inputs).loss, compiled(**inputs).loss
    eager_loss.backward()
    compiled_loss.backward()
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-5)
    for (name, parameter), reference in zip(to_compile.named_parameters(), eager.parameters()):
        torch.testing.assert_close(parameter.grad, reference.grad, rtol=1e-4, atol=1e-5, msg=name)
    optimizer = torch.optim.AdamW(to_compile.parameters(), lr=1e-3)
    optimizer.step()
    optimizer.zero_grad()
    assert torch.isfinite(compiled(**inputs).loss)


# ---------------------------------------------------------------------------------------------------------------------
# Several processes on the CPU (gloo): the DDP and FSDP code paths of the multi-GPU recipes


def run_processes(arguments, count=2):
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={count}",
               f"--master_port={free_port()}", *arguments]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error", "TQDM_DISABLE": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-4000:])
    return result


def load_example():
    spec = importlib.util.spec_from_file_location("train_multi_gpu", REPO / "examples" / "train_multi_gpu.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    return example


def test_accelerate_configs():
    """The configs parse with accelerate's own loader; FSDP wraps exactly the blocks `_no_split_modules` names."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    ddp = load_config_from_file(str(REPO / "accelerate_configs" / "ddp.yaml"))
    fsdp = load_config_from_file(str(REPO / "accelerate_configs" / "fsdp.yaml"))
    assert (ddp.distributed_type, ddp.num_processes) == (DistributedType.MULTI_GPU, 2)
    assert (fsdp.distributed_type, fsdp.num_processes) == (DistributedType.FSDP, 2)
    wrapped = fsdp.fsdp_config["fsdp_transformer_layer_cls_to_wrap"].split(",")
    assert wrapped == CoLT5ForConditionalGeneration._no_split_modules
    assert all(isinstance(getattr(modeling_colt5, name), type) for name in wrapped)
    assert fsdp.fsdp_config["fsdp_version"] == 2 and fsdp.fsdp_config["fsdp_reshard_after_forward"] is True
    assert fsdp.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"  # a checkpoint that loads anywhere


@needs_processes
def test_example_ddp_on_two_cpu_processes_matches_one_process(tmp_path):
    """examples/train_multi_gpu.py: 2 DDP processes x 2 samples train like 1 process x 2 samples x 2 accumulation
    steps (same global batches, same loss normalisation), and the checkpoints load on the CPU."""
    common = ["--per-device-batch", "2", "--max-steps", "3", "--source-length", "48", "--target-length", "6", "--cpu"]
    example = load_example()
    example.main(["train", "--output-dir", str(tmp_path / "one"), "--grad-accum", "2", *common])
    run_processes([str(REPO / "examples" / "train_multi_gpu.py"), "train", "--output-dir", str(tmp_path / "ddp"),
                   *common])
    one, ddp = (json.loads((tmp_path / name / "run.json").read_text()) for name in ("one", "ddp"))
    assert (one["distributed_type"], one["num_processes"]) == ("NO", 1)
    assert (ddp["distributed_type"], ddp["num_processes"]) == ("MULTI_CPU", 2)
    assert one["global_batch"] == ddp["global_batch"] == 4
    assert len(one["losses"]) == 3 and one["losses"] == pytest.approx(ddp["losses"], rel=1e-4)
    inputs = labelled(lengths=(48, 30), target_length=6)
    one_model, ddp_model = (CoLT5ForConditionalGeneration.from_pretrained(tmp_path / name / "final").eval()
                            for name in ("one", "ddp"))
    torch.testing.assert_close(logits_of(ddp_model, inputs), logits_of(one_model, inputs), rtol=1e-4, atol=1e-4)
    example.main(["compare", str(tmp_path / "one"), str(tmp_path / "ddp"), "--source-length", "48",
                  "--target-length", "6"])


def one_process_and_two(tmp_path, capsys, common):
    """The command `common` run here with 2 accumulation steps and on 2 processes (one per rank, gloo): the summary
    line of each, the two processes' result, and the two saved models."""
    from colt5_hf import cli

    cli.main([*common, "--output-dir", str(tmp_path / "one"), "--gradient-accumulation-steps", "2"])
    one = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    result = run_processes(["-m", "colt5_hf.cli", *common, "--output-dir", str(tmp_path / "ddp")])
    reports = [line for line in result.stdout.splitlines() if line.startswith('{"output_dir"')]
    assert len(reports) == 1  # the first process reports
    models = [CoLT5ForConditionalGeneration.from_pretrained(tmp_path / name).eval() for name in ("one", "ddp")]
    return one, json.loads(reports[0]), result, models


@needs_processes
def test_colt5_hf_train_on_two_cpu_processes_matches_one_process(tmp_path, capsys):
    """`colt5-hf train` with one process per rank (as `accelerate launch` starts it; gloo on the CPU here): 2 processes
    x 8 examples train like 1 process x 8 examples x 2 accumulation steps, the run reports once, and its model loads."""
    common = ["train", "--model", "colt5-tiny", "--demo-task", "--steps", "3", "--eval-steps", "3", "--eval-examples",
              "16", "--batch-size", "8", "--cpu"]
    one, ddp, result, (one_model, ddp_model) = one_process_and_two(tmp_path, capsys, common)
    assert result.stderr.count("training examples") == 1  # the first process reports
    assert one["steps"] == ddp["steps"] == 3
    assert ddp["train_loss"] == pytest.approx(one["train_loss"], rel=1e-4)
    assert ddp["eval_loss"] == pytest.approx(one["eval_loss"], rel=1e-4)
    inputs = labelled(lengths=(48, 30), target_length=6)
    # the two runs add the same gradients in another order, and Adam magnifies that in weights whose gradient is ~0:
    # elementwise, logits differ by up to ~1e-4 (of ~30), as a whole by ~2e-6 (measured on this machine)
    assert relative_error(logits_of(ddp_model, inputs), logits_of(one_model, inputs)) < 1e-4


@needs_processes
def test_colt5_hf_uptrain_on_two_cpu_processes_matches_one_process(tmp_path, capsys):
    """`colt5-hf uptrain` with one process per rank: 2 processes x 4 denoised examples train like 1 process x 4 x 2
    accumulation steps (the same packed examples in the same global batches), each denoiser's evaluation loss too."""
    words = "the a routed heavy light token layer branch attention local global span input target".split()
    text = " ".join(words[(7 * i) % len(words)] for i in range(900)) + "."
    (tmp_path / "train.txt").write_text(text)
    (tmp_path / "eval.txt").write_text(text[:1200])
    common = ["uptrain", "colt5-tiny", "--train-files", str(tmp_path / "train.txt"), "--eval-files",
              str(tmp_path / "eval.txt"), "--length", "96", "--max-target-length", "32", "--batch-size", "4",
              "--steps", "3", "--eval-steps", "3", "--eval-examples", "4", "--learning-rate", "3e-3",
              "--warmup-steps", "0", "--seed", "0", "--quiet", "--cpu"]
    one, ddp, _, (one_model, ddp_model) = one_process_and_two(tmp_path, capsys, common)
    assert one["steps"] == ddp["steps"] == 3
    assert [key for key in one if key.startswith("eval_")] == ["eval_R3_loss", "eval_R8_loss", "eval_X64_loss",
                                                               "eval_S_loss"]
    for key in one:
        if key.endswith("loss"):
            assert ddp[key] == pytest.approx(one[key], rel=1e-4), key
    inputs = labelled(lengths=(48, 30), target_length=6)
    assert relative_error(logits_of(ddp_model, inputs), logits_of(one_model, inputs)) < 1e-4


FSDP_WORKER = textwrap.dedent('''
    """FSDP2 (fully_shard, one unit per CoLT5 block, resharded after forward) on CPU processes: the sharding the
    accelerate FSDP config asks for, without accelerate (its FSDP path needs GPUs)."""
    import gc, json, sys
    import torch
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard
    from colt5_hf import CoLT5Config, CoLT5ForConditionalGeneration
    from colt5_hf.modeling_colt5 import CoLT5DecoderBlock, CoLT5EncoderBlock

    config_file, samples_file, output = sys.argv[1:4]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = CoLT5ForConditionalGeneration(CoLT5Config.from_json_file(config_file))
    for module in model.modules():
        if isinstance(module, (CoLT5EncoderBlock, CoLT5DecoderBlock)):
            fully_shard(module, reshard_after_forward=True)
    fully_shard(model, reshard_after_forward=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    steps = torch.load(samples_file)  # per step, the global batch
    losses = []
    for step in steps:
        local = {key: value.chunk(world)[rank] for key, value in step.items()}
        count = (step["labels"] != -100).sum()
        # the global mean: local sum / global count, times world because FSDP averages gradients over ranks
        loss = model(**local, num_items_in_batch=count).loss * world
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        total = loss.detach() / world
        dist.all_reduce(total)
        losses.append(total.item())
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:  # as Trainer saves under FSDP: the wrapped model writes the gathered full state dict
        sharded = sum(type(p).__name__ == "DTensor" for p in model.parameters())
        model.save_pretrained(output, state_dict=state)
        run = {"losses": losses, "sharded": sharded, "class": type(model).__name__}
        json.dump(run, open(f"{output}/run.json", "w"))
    # leave together, the sharded model freed first: a rank exiting while its peer still writes, or while sharded
    # tensors still hold the group at interpreter exit, can abort in gloo's threads
    dist.barrier()
    del model, optimizer, state
    gc.collect()
    dist.destroy_process_group()
''')


@needs_processes
def test_fsdp2_on_two_cpu_processes_matches_one_process(hub_folder, tmp_path):
    config = tiny_config()
    config.to_json_file(tmp_path / "config.json")
    samples = reverse_task(12, source_length=48, target_length=6, seed=3)
    steps = [{key: torch.stack([sample[key] for sample in samples[i:i + 4]]) for key in samples[0]}
             for i in range(0, 12, 4)]
    torch.save(steps, tmp_path / "steps.pt")
    (tmp_path / "worker.py").write_text(FSDP_WORKER)
    run_processes([str(tmp_path / "worker.py"), str(tmp_path / "config.json"), str(tmp_path / "steps.pt"),
                   str(tmp_path / "fsdp")])
    run = json.loads((tmp_path / "fsdp" / "run.json").read_text())
    assert run["sharded"] == sum(1 for _ in CoLT5ForConditionalGeneration(config).parameters())
    # FSDP2 swapped in a subclass defined in torch; the folder still holds CoLT5's code and names
    assert run["class"] == "FSDPCoLT5ForConditionalGeneration"
    saved = json.loads((tmp_path / "fsdp" / "config.json").read_text())
    assert saved["architectures"] == ["CoLT5ForConditionalGeneration"]
    assert saved["auto_map"] == json.loads((hub_folder[0] / "config.json").read_text())["auto_map"]
    assert {path.name for path in (tmp_path / "fsdp").glob("*.py")} == relative_import_closure(
        "configuration_colt5", "modeling_colt5"
    )

    # the reference: one process, plain model, the same global batches
    torch.manual_seed(0)
    model = CoLT5ForConditionalGeneration(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for step in steps:
        loss = model(**step).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert run["losses"] == pytest.approx(losses, rel=1e-4)
    gathered = CoLT5ForConditionalGeneration.from_pretrained(tmp_path / "fsdp").eval()
    inputs = labelled(lengths=(48, 30), target_length=6)
    torch.testing.assert_close(logits_of(gathered, inputs), logits_of(model.eval(), inputs), rtol=1e-4, atol=1e-4)
