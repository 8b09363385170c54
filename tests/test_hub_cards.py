"""hub_cards: model cards, the push CLI against a local fake Hub, and the reference checkpoint converter.

huggingface_hub reads HF_ENDPOINT when it is imported, and this process imported it already, so everything
that talks to the fake Hub runs in ONE subprocess (`HUB_SESSION` below) started with HF_ENDPOINT, HF_TOKEN,
HF_HUB_DISABLE_XET=1 and a temporary HF_HOME; the tests then check what it reports and what the fake Hub
(served from a thread of this process) holds.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from peft import get_peft_model

from hub_cards import convert_reference as conv
from hub_cards.cards import python_snippets, render_card
from tests.fake_hub import FakeHubServer
from hub_cards.push import main as push_main
from modeling_uniperceiver_moe import UniPerceiverMoEForGenericPerception, UniPerceiverMoEProcessor, fold_experts
from prompt_tuning.adapter import PEFT_TYPE, DeepPromptConfig
from tests.conftest import IMAGE_INPUT, make_batch, tiny_config
from training.tasks import ATTRIBUTES

REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL_REPO, ADAPTER_REPO, FOLDED_REPO = "user/tiny-moe", "user/tiny-moe-prompt", "user/tiny-moe-folded"

REPORT = {
    "steps": 12, "processes": 1, "device": "cpu", "mixed_precision": "no", "routing": "attribute",
    "parameters": 0, "data_slice": "tiny", "median_tokens_per_second": 1234.5, "skipped_samples": 0,
    "tasks": [
        {"task": "fashion_mnist_classification", "family": "image_classification", "metric": "accuracy",
         "value": 0.3125, "trivial_baseline": 0.125, "chance": 0.1, "eval_loss": 2.1, "evaluated": 32},
        {"task": "austen_mlm", "family": "mlm", "metric": "token_accuracy", "value": 0.0546875,
         "chance": 0.0009765625, "eval_loss": 6.0, "evaluated": 64},
        {"task": "emoji_retrieval", "family": "retrieval", "metric": "i2t_R@1", "value": 0.0625,
         "chance": 0.03125, "eval_loss": 3.4, "evaluated": 32},
    ],
    "full_metrics": {},
}
RESULTS = {"task": "fashion_mnist_classification", "method": "prompt", "train_samples": 13, "eval_samples": 32,
           "data_fraction": 0.01, "before": {"accuracy": 0.1875}, "after": {"accuracy": 0.40625},
           "trainable_parameters": 1000, "total_parameters": 2000000, "train_loss": [2.3, 2.0]}

# Runs in a subprocess with HF_ENDPOINT pointing at the fake Hub: pushes, reloads, runs the cards' snippets.
HUB_SESSION = r'''
import contextlib, io, json, os, sys
import torch
torch.set_num_threads(1)
from huggingface_hub import hf_hub_download
from hub_cards.cards import python_snippets
from hub_cards.push import main as push

work = sys.argv[1]
spec = json.load(open(os.path.join(work, "spec.json")))
summary = {}
summary["push_main"] = push([spec["model"], "--repo-id", spec["model_repo"]])
summary["push_dev"] = push([spec["model_b"], "--repo-id", spec["model_repo"], "--revision", "dev"])
summary["push_adapter"] = push([spec["adapter"], "--repo-id", spec["adapter_repo"], "--base-model", spec["model_repo"]])
summary["push_folded"] = push([spec["folded"], "--repo-id", spec["folded_repo"], "--base-model", spec["model_repo"],
                               "--private"])

import modeling_uniperceiver_moe
from peft import PeftModel
import prompt_tuning
from transformers import AutoModel
from modeling_uniperceiver_moe import UniPerceiverMoEForGenericPerception

inputs = torch.load(os.path.join(work, "inputs.pt"))
encoder_inputs = {k: inputs[k] for k in ("input_ids", "attention_mask", "pixel_values", "attribute_vectors")}
folded_inputs = torch.load(os.path.join(work, "folded_inputs.pt"))
outputs = {}
with torch.no_grad():
    model = UniPerceiverMoEForGenericPerception.from_pretrained(spec["model_repo"]).eval()
    outputs["main_logits"] = model(**inputs).logits
    outputs["main_encoder"] = AutoModel.from_pretrained(spec["model_repo"]).eval()(**encoder_inputs).last_hidden_state
    dev = UniPerceiverMoEForGenericPerception.from_pretrained(spec["model_repo"], revision="dev").eval()
    outputs["dev_logits"] = dev(**inputs).logits
    base = UniPerceiverMoEForGenericPerception.from_pretrained(spec["model_repo"])
    tuned = PeftModel.from_pretrained(base, spec["adapter_repo"]).eval()
    outputs["adapter_logits"] = tuned(**inputs).logits
    outputs["folded"] = AutoModel.from_pretrained(spec["folded_repo"]).eval()(**folded_inputs).last_hidden_state
torch.save(outputs, os.path.join(work, "outputs.pt"))

snippets = {}
for repo, revision in ((spec["model_repo"], None), (spec["model_repo"], "dev"), (spec["adapter_repo"], None),
                       (spec["folded_repo"], None)):
    readme = hf_hub_download(repo, "README.md", revision=revision)
    for n, code in enumerate(python_snippets(open(readme, encoding="utf-8").read())):
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(compile(code, f"{repo}@{revision}:snippet{n}", "exec"), {"__name__": "__snippet__"})
        snippets[f"{repo}@{revision or 'main'}#{n}"] = printed.getvalue().strip()
summary["snippets"] = snippets

os.environ["HF_TOKEN"] = "hf_not_a_valid_token"
try:
    push([spec["model"], "--repo-id", "user/other"])
    summary["bad_token"] = None
except SystemExit as error:
    summary["bad_token"] = str(error)
json.dump(summary, open(os.path.join(work, "summary.json"), "w"), indent=1)
'''


# =============================================================================================== fixtures
def classification_inputs() -> dict:
    inputs = make_batch(batch=2, words=4)
    inputs.update(target_input_ids=torch.randint(0, 49000, (3, 3), generator=torch.Generator().manual_seed(1)),
                  target_attribute_vectors=ATTRIBUTES["class_name_target"].to_tensor().expand(3, -1),
                  target_task_ids=torch.zeros(3, dtype=torch.long), task_family="image_classification")
    return inputs


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory):
    """A tiny pre-trained run (final/ + report.json), a second model, a prompt-tuning run and a folded export."""
    root = tmp_path_factory.mktemp("hub_artefacts")
    torch.manual_seed(0)
    model = UniPerceiverMoEForGenericPerception(tiny_config("attribute")).eval()
    processor = UniPerceiverMoEProcessor.build(image_size=16)
    model.save_pretrained(root / "run" / "final")
    processor.save_pretrained(root / "run" / "final")
    parameters = sum(p.numel() for p in model.parameters())
    (root / "run" / "report.json").write_text(json.dumps(dict(REPORT, parameters=parameters)))
    torch.manual_seed(1)
    model_b = UniPerceiverMoEForGenericPerception(tiny_config("attribute")).eval()
    model_b.save_pretrained(root / "run_b" / "final")
    processor.save_pretrained(root / "run_b" / "final")

    base = UniPerceiverMoEForGenericPerception.from_pretrained(root / "run" / "final")
    tuned = get_peft_model(base, DeepPromptConfig(num_prompts=2, num_labels=3)).eval()
    with torch.no_grad():  # make every adapter tensor matter (the label prompt starts at zero)
        for name, parameter in tuned.named_parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * 0.05)
    tuned.save_pretrained(root / "tuning" / "adapter")
    (root / "tuning" / "results.json").write_text(json.dumps(RESULTS))

    folded = fold_experts(model, IMAGE_INPUT.to_tensor()[None])
    folded.save_pretrained(root / "folded")

    inputs = classification_inputs()
    folded_inputs = {"pixel_values": inputs["pixel_values"], "attribute_vectors": IMAGE_INPUT.to_tensor().expand(2, -1)}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            expected = {
                "main_logits": model(**inputs).logits,
                "main_encoder": model.uniperceiver(**{k: inputs[k] for k in (
                    "input_ids", "attention_mask", "pixel_values", "attribute_vectors")}).last_hidden_state,
                "dev_logits": model_b(**inputs).logits,
                "adapter_logits": tuned(**inputs).logits,
                "folded": folded.uniperceiver(**folded_inputs).last_hidden_state,
            }
    finally:
        torch.set_num_threads(threads)
    torch.save(inputs, root / "inputs.pt")
    torch.save(folded_inputs, root / "folded_inputs.pt")
    return {"root": root, "model": root / "run" / "final", "model_b": root / "run_b" / "final",
            "adapter": root / "tuning" / "adapter", "folded": root / "folded", "expected": expected}


@pytest.fixture(scope="module")
def fake_hub():
    with FakeHubServer() as server:
        yield server


def hub_env(server: FakeHubServer, home: Path, token: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE"))}
    env.update(HF_ENDPOINT=server.url, HF_HUB_DISABLE_XET="1", HF_HOME=str(home), HF_HUB_OFFLINE="0",
               HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1", TRANSFORMERS_VERBOSITY="error",
               TOKENIZERS_PARALLELISM="false", PYTHONPATH=os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]))
    if token:
        env["HF_TOKEN"] = token
    return env


@pytest.fixture(scope="module")
def hub_session(artefacts, fake_hub, tmp_path_factory):
    """Run HUB_SESSION once; returns its summary and the outputs it computed from the downloaded models."""
    work = tmp_path_factory.mktemp("hub_session")
    spec = {"model": str(artefacts["model"]), "model_b": str(artefacts["model_b"]), "adapter": str(artefacts["adapter"]),
            "folded": str(artefacts["folded"]), "model_repo": MODEL_REPO, "adapter_repo": ADAPTER_REPO,
            "folded_repo": FOLDED_REPO}
    (work / "spec.json").write_text(json.dumps(spec))
    for name in ("inputs.pt", "folded_inputs.pt"):
        (work / name).write_bytes((artefacts["root"] / name).read_bytes())
    (work / "session.py").write_text(HUB_SESSION)
    run = subprocess.run([sys.executable, str(work / "session.py"), str(work)], cwd=REPO_ROOT, capture_output=True,
                         text=True, timeout=300, env=hub_env(fake_hub, work / "hf_home", fake_hub.token))
    assert run.returncode == 0, f"hub session failed:\n{run.stdout[-4000:]}\n{run.stderr[-8000:]}"
    return {"summary": json.loads((work / "summary.json").read_text()), "outputs": torch.load(work / "outputs.pt")}


def card_metadata(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text[4:text.index("\n---", 4)])


def model_index_values(metadata: dict) -> dict[tuple[str, str], float]:
    """(dataset type, metric type) -> value, from a card's model-index."""
    out = {}
    for entry in metadata["model-index"][0]["results"]:
        for metric in entry["metrics"]:
            out[(entry["dataset"]["type"], metric["type"])] = metric["value"]
    return out


# =============================================================================================== push + load
def test_pushed_model_loads_from_the_hub_with_identical_outputs(hub_session, artefacts):
    outputs, expected = hub_session["outputs"], artefacts["expected"]
    for key in ("main_logits", "main_encoder"):
        assert torch.equal(outputs[key], expected[key]), key


# Runs in a process that cannot import this package: everything comes from the Hub's copy of the code.
REMOTE_CODE_SESSION = r'''
import json, os, sys
sys.modules["modeling_uniperceiver_moe"] = None  # importing the package now raises ImportError
import torch
torch.set_num_threads(1)  # as the expected outputs were computed
from transformers import AutoModel, AutoModelForPreTraining, AutoProcessor

work, repo = sys.argv[1], sys.argv[2]
inputs = torch.load(os.path.join(work, "inputs.pt"))
encoder_inputs = {k: inputs[k] for k in ("input_ids", "attention_mask", "pixel_values", "attribute_vectors")}
with torch.no_grad():
    head = AutoModelForPreTraining.from_pretrained(repo, trust_remote_code=True).eval()
    encoder = AutoModel.from_pretrained(repo, trust_remote_code=True).eval()
    outputs = {"main_logits": head(**inputs).logits, "main_encoder": encoder(**encoder_inputs).last_hidden_state}
processor = AutoProcessor.from_pretrained(repo, trust_remote_code=True)
outputs["input_ids"] = processor(text=["a red shoe"])["input_ids"]
outputs["modules"] = [type(head).__module__, type(encoder).__module__, type(processor).__module__]
torch.save(outputs, os.path.join(work, "remote_outputs.pt"))
'''


def test_pushed_model_loads_with_remote_code_where_the_package_is_not_installed(hub_session, artefacts, fake_hub,
                                                                                tmp_path):
    """save_pretrained writes an auto_map and copies the code files, push uploads them, and a process that
    cannot import the package loads the head, the encoder and the processor from the Hub with
    trust_remote_code, with outputs equal to the local models'."""
    assert {"modeling_uniperceiver_moe.py", "routing.py", "moe_implementations.py", "merge_kernels.py"} <= set(
        fake_hub.files(MODEL_REPO, "main"))
    (tmp_path / "inputs.pt").write_bytes((artefacts["root"] / "inputs.pt").read_bytes())
    (tmp_path / "session.py").write_text(REMOTE_CODE_SESSION)
    env = hub_env(fake_hub, tmp_path / "hf_home", fake_hub.token)
    env["PYTHONPATH"] = ""  # not even the repository's folder
    run = subprocess.run([sys.executable, str(tmp_path / "session.py"), str(tmp_path), MODEL_REPO], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-6000:]
    outputs = torch.load(tmp_path / "remote_outputs.pt")
    assert all(module.startswith("transformers_modules.") for module in outputs["modules"]), outputs["modules"]
    for key in ("main_logits", "main_encoder"):
        assert torch.equal(outputs[key], artefacts["expected"][key]), key
    assert outputs["input_ids"].tolist() == [[49406, 320, 736, 7342, 49407]]


def test_push_to_a_branch_lands_on_that_branch_only(hub_session, artefacts, fake_hub):
    assert torch.equal(hub_session["outputs"]["dev_logits"], artefacts["expected"]["dev_logits"])
    repo = fake_hub.hub.repos[MODEL_REPO]
    assert set(repo.branches) == {"main", "dev"}
    main_files, dev_files = fake_hub.files(MODEL_REPO, "main"), fake_hub.files(MODEL_REPO, "dev")
    assert main_files["model.safetensors"] == (artefacts["model"] / "model.safetensors").read_bytes()
    assert dev_files["model.safetensors"] == (artefacts["model_b"] / "model.safetensors").read_bytes()
    assert 'revision="dev"' in dev_files["README.md"].decode() and "revision=" not in main_files["README.md"].decode()


def test_adapter_and_folded_export_load_from_the_hub(hub_session, artefacts, fake_hub):
    outputs, expected = hub_session["outputs"], artefacts["expected"]
    assert torch.equal(outputs["adapter_logits"], expected["adapter_logits"])
    assert torch.equal(outputs["folded"], expected["folded"])
    staged_config = json.loads(fake_hub.files(ADAPTER_REPO)["adapter_config.json"])
    assert staged_config["base_model_name_or_path"] == MODEL_REPO and staged_config["peft_type"] == PEFT_TYPE
    assert fake_hub.hub.repos[FOLDED_REPO].private and not fake_hub.hub.repos[MODEL_REPO].private


def test_every_card_usage_snippet_runs_against_the_hub(hub_session):
    snippets = hub_session["summary"]["snippets"]
    assert set(snippets) == {f"{MODEL_REPO}@main#0", f"{MODEL_REPO}@dev#0", f"{ADAPTER_REPO}@main#0", f"{FOLDED_REPO}@main#0"}
    assert snippets[f"{MODEL_REPO}@main#0"].startswith("tensor([[")  # class probabilities were printed
    assert snippets[f"{FOLDED_REPO}@main#0"] == "torch.Size([1, 32])"


@pytest.mark.parametrize("name, folder, extra", [
    ("main", "model", []), ("dev", "model_b", ["--revision", "dev"]),
    ("adapter", "adapter", ["--base-model", MODEL_REPO]), ("folded", "folded", ["--base-model", MODEL_REPO]),
])
def test_dry_run_folder_equals_what_was_uploaded(name, folder, extra, hub_session, artefacts, fake_hub, tmp_path):
    repo = {"main": MODEL_REPO, "dev": MODEL_REPO, "adapter": ADAPTER_REPO, "folded": FOLDED_REPO}[name]
    out = tmp_path / "staged"
    push_main([str(artefacts[folder]), "--repo-id", repo, "--dry-run", str(out), *extra])
    staged = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    uploaded = fake_hub.files(repo, "dev" if name == "dev" else "main")
    assert sorted(staged) == sorted(uploaded)
    assert all(staged[path] == uploaded[path] for path in staged)


def test_push_without_a_token_with_a_bad_one_or_to_no_hub_is_refused(hub_session, artefacts, fake_hub, tmp_path):
    assert "refused the push to user/other" in hub_session["summary"]["bad_token"]
    assert "Invalid credentials" in hub_session["summary"]["bad_token"]
    command = [sys.executable, "-m", "hub_cards.push", str(artefacts["model"]), "--repo-id", "user/x"]
    run = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                         env=hub_env(fake_hub, tmp_path / "home", token=None))
    assert run.returncode != 0 and "error: no Hugging Face token: set HF_TOKEN" in run.stderr
    assert "user/x" not in fake_hub.hub.repos
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}"
    env = dict(hub_env(fake_hub, tmp_path / "home", token=fake_hub.token), HF_ENDPOINT=closed)
    run = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode != 0 and f"error: cannot reach the Hub at {closed}" in run.stderr, run.stderr[-2000:]


# =============================================================================================== cards
def test_model_card_metadata_has_licence_tags_sources_and_measured_numbers(artefacts):
    card = render_card(artefacts["model"], MODEL_REPO)
    metadata = card_metadata(str(card))
    assert metadata["license"] == "apache-2.0"
    assert {"uniperceiver-moe", "mixture-of-experts", "multimodal", "attribute-routing"} <= set(metadata["tags"])
    assert metadata["datasets"] == ["austen", "emoji", "fashion_mnist"]
    assert "base_model" not in metadata  # a pre-trained model has none
    assert model_index_values(metadata) == {
        ("fashion_mnist", "accuracy"): 0.3125, ("austen", "token_accuracy"): 0.0546875, ("emoji", "i2t_R@1"): 0.0625}
    text = str(card)
    assert "| `moe_layers` | `all` | MoE in layers [0, 1] of 2 (counted from 0) |" in text
    assert "| `moe_num_experts` | 4 |" in text and "| `moe_top_k` | 2 |" in text
    assert "12 optimizer steps" in text and "data slice `tiny`" in text
    # each task beside its trivial baseline (empty where the report has none)
    assert "| trivial baseline | chance |" in text
    assert "| fashion_mnist_classification | image_classification | accuracy | 0.3125 | 0.1250 | 0.1000 | 32 |" in text


def test_adapter_card_metadata_names_the_base_model_and_the_tuned_numbers(artefacts):
    metadata = card_metadata(str(render_card(artefacts["adapter"], ADAPTER_REPO, base_model=MODEL_REPO)))
    assert metadata["base_model"] == MODEL_REPO and metadata["base_model_relation"] == "adapter"
    assert metadata["license"] == "apache-2.0" and metadata["library_name"] == "peft"
    assert {"uniperceiver-moe", "peft", "prompt-tuning"} <= set(metadata["tags"])
    assert metadata["datasets"] == ["fashion_mnist"]
    assert model_index_values(metadata) == {("fashion_mnist", "accuracy"): RESULTS["after"]["accuracy"]}


def test_adapter_card_renders_usage_and_both_measurements(artefacts):
    text = str(render_card(artefacts["adapter"], ADAPTER_REPO, base_model=MODEL_REPO))
    assert "| fashion_mnist_classification | accuracy | 0.1875 | 0.4062 |" in text
    (snippet,) = python_snippets(text)
    assert "import prompt_tuning" in snippet and f'PeftModel.from_pretrained(base, "{ADAPTER_REPO}")' in snippet


def test_folded_card_renders_routes_and_claims_no_measurement(artefacts):
    text = str(render_card(artefacts["folded"], FOLDED_REPO, base_model=MODEL_REPO))
    metadata = card_metadata(text)
    assert metadata["base_model"] == MODEL_REPO and "model-index" not in metadata
    assert {"folded-experts", "merged-dense"} <= set(metadata["tags"])
    assert "| 0 | `10011000` | input_vision, target_text, token_vision |" in text
    assert "no `model-index`" in text


def test_folded_card_shows_given_base_results_outside_the_metadata(artefacts):
    text = str(render_card(artefacts["folded"], FOLDED_REPO, base_model=MODEL_REPO,
                           results=artefacts["root"] / "run" / "report.json"))
    assert "model-index" not in card_metadata(text)
    assert "Measured on the MoE model before folding" in text and "| 0.3125 |" in text


def test_card_without_results_has_no_model_index_and_says_so(artefacts, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((artefacts["model"] / name).read_bytes())
    text = str(render_card(bare, MODEL_REPO))
    assert "model-index" not in card_metadata(text) and "datasets" not in card_metadata(text)
    assert "no `model-index` and makes no claim" in text
    (snippet,) = python_snippets(text)
    assert "UniPerceiverMoEProcessor.build(image_size=16)" in snippet  # no processor files in the folder


# =============================================================================================== errors
def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.mark.parametrize("case, message", [
    ("missing", "checkpoint folder not found"),
    ("not_checkpoint", "is not a checkpoint folder: it has neither config.json"),
    ("corrupt", "is not valid JSON: Expecting"),
    ("other_model", "has model_type='bert'"),
    ("invalid", "is not a valid UniPerceiverMoEConfig: UniPerceiverMoEConfig.moe_routing"),
    ("no_weights", "has no weights"),
])
def test_bad_folders_give_clear_errors(case, message, tmp_path, artefacts):
    folder = tmp_path / "ckpt"
    if case == "not_checkpoint":
        write(folder / "notes.txt", "hello")
    elif case == "corrupt":
        write(folder / "config.json", '{"model_type": "uniperceiver_moe", "hidden_size": 3')
        (folder / "model.safetensors").write_bytes(b"")
    elif case == "other_model":
        write(folder / "config.json", json.dumps({"model_type": "bert"}))
        (folder / "model.safetensors").write_bytes((artefacts["model"] / "model.safetensors").read_bytes())
    elif case == "invalid":
        config = json.loads((artefacts["model"] / "config.json").read_text())
        write(folder / "config.json", json.dumps(dict(config, moe_routing="bogus")))
        (folder / "model.safetensors").write_bytes((artefacts["model"] / "model.safetensors").read_bytes())
    elif case == "no_weights":
        write(folder / "config.json", (artefacts["model"] / "config.json").read_text())
    with pytest.raises(SystemExit, match=message):
        push_main([str(folder), "--repo-id", MODEL_REPO, "--dry-run", str(tmp_path / "out")])


@pytest.mark.parametrize("args, message", [
    (["adapter"], "give the Hub repo id of the pre-trained model"),
    (["folded"], "a folded export needs the Hub repo id"),
    (["model", "--kind", "adapter"], "holds a model checkpoint, not the adapter that was asked for"),
    (["model", "--kind", "folded"], "is not a folded export"),
    (["model", "--results", "RESULTS"], "holds prompt-tuning results; a model card needs a pre-training report.json"),
    (["adapter", "--base-model", "not-a-repo-id"], "base model must be a Hub repo id"),
])
def test_inconsistent_arguments_give_clear_errors(args, message, artefacts, tmp_path):
    folder, *rest = args
    rest = [str(artefacts["root"] / "tuning" / "results.json") if a == "RESULTS" else a for a in rest]
    with pytest.raises(SystemExit, match=message):
        push_main([str(artefacts[folder]), "--repo-id", MODEL_REPO, "--dry-run", str(tmp_path / "out"), *rest])


def test_a_report_of_another_model_is_rejected_or_skipped(artefacts, tmp_path):
    other = write(tmp_path / "report.json", json.dumps(dict(REPORT, routing="token")))
    with pytest.raises(SystemExit, match="reports routing 'token', the checkpoint has 'attribute'"):
        push_main([str(artefacts["model"]), "--repo-id", MODEL_REPO, "--results", str(other),
                   "--dry-run", str(tmp_path / "out")])
    run = tmp_path / "run"  # the same report found next to the checkpoint is not used
    for name in ("config.json", "model.safetensors"):
        write(run / "final" / name, "").write_bytes((artefacts["model"] / name).read_bytes())
    (run / "report.json").write_text(other.read_text())
    assert "model-index" not in card_metadata(str(render_card(run / "final", MODEL_REPO)))


def test_dry_run_refuses_a_non_empty_output_folder(artefacts, tmp_path):
    write(tmp_path / "out" / "keep.txt", "x")
    with pytest.raises(SystemExit, match="already exists and is not empty"):
        push_main([str(artefacts["model"]), "--repo-id", MODEL_REPO, "--dry-run", str(tmp_path / "out")])


# =============================================================================================== converter
def reference_state_dict(depth=2, width=32, ffn=128, experts=4, vocab=49411, positions=32, frames=4, image=16,
                         patch=8, attributes=8, seed=0, posembed_scale=1.0) -> dict[str, torch.Tensor]:
    """What the reference `MultiTaskTransformerEncoder` registers for an attribute-MoE config (the reference repository's MoE
    settings: UNIFY_QKV, LAYER_SCALE, SHARE_LAYERNORM, OUTPUT_PROJ, LEARN_TEMP, TAG_Transform without activation,
    TOKEN_EMBED.TYPE_VOCAB_SIZE=2, VIDEO_EMBED.TYPE_SIZE=1 with DIVIDE_ST_POS, MOE_EXPERT_LOCATION='odd' (layers
    with index % 2 == 0), MOE_EXPERT_TYPE='FFN,SA') plus one memory-bank queue; every tensor distinct."""
    g = torch.Generator().manual_seed(seed)
    sd = {}

    def add(key, *shape):
        sd[key] = torch.randn(*shape, generator=g)

    add("token_embed.embeddings.weight", vocab, width)
    add("token_embed.embeddings_norm.weight", width)
    add("token_embed.embeddings_norm.bias", width)
    add("token_embed.embeddings_pos.position_embeddings.weight", positions, width)
    add("token_embed.embeddings_token_type.weight", 2, width)
    add("video_embed.embeddings.weight", width, 3, patch, patch)
    add("video_embed.embeddings.bias", width)
    sd["video_embed.embeddings_norm.weight"] = sd["token_embed.embeddings_norm.weight"]  # one shared module
    sd["video_embed.embeddings_norm.bias"] = sd["token_embed.embeddings_norm.bias"]
    add("video_embed.embeddings_type.weight", 1, width)
    # build_2d_sincos_position_embedding of the reference (POSEMBEDFIX: frozen), written out independently
    side = image // patch
    grid_w, grid_h = torch.meshgrid(torch.arange(side, dtype=torch.float32), torch.arange(side, dtype=torch.float32),
                                    indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(width // 4, dtype=torch.float32) / (width // 4))
    if posembed_scale != 1.0:  # MODEL.POSEMBED_SCALE
        grid_w, grid_h = grid_w * posembed_scale, grid_h * posembed_scale
    out_w, out_h = grid_w.flatten()[:, None] * omega, grid_h.flatten()[:, None] * omega
    sd[conv.SPATIAL_POSITIONS] = torch.cat([out_w.sin(), out_w.cos(), out_h.sin(), out_h.cos()], dim=1)
    add("video_embed.embeddings_st_pos.temporal_pos_embed.weight", frames, width)
    shapes = {"self_attn.qkv_proj": (3 * width, width), "self_attn.dense": (width, width),
              "linear1": (ffn, width), "linear2": (width, ffn)}
    for i in range(depth):
        layer = f"fused_encoder.layers.{i}."
        for name in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "gamma_1", "gamma_2"):
            add(layer + name, width)
        for module, (out_features, in_features) in shapes.items():
            if i % 2 == 0:
                for e in range(experts):
                    add(f"{layer}{module}.experts.deepspeed_experts.{e}.weight", out_features, in_features)
                    add(f"{layer}{module}.experts.deepspeed_experts.{e}.bias", out_features)
                add(f"{layer}{module}.gate.tag_transform.0.weight", width, attributes)
                add(f"{layer}{module}.gate.tag_transform.0.bias", width)
                add(f"{layer}{module}.gate.tag_transform.1.weight", width)
                add(f"{layer}{module}.gate.tag_transform.1.bias", width)
                add(f"{layer}{module}.gate.wg.weight", experts, width)
            else:
                add(f"{layer}{module}.weight", out_features, in_features)
                add(f"{layer}{module}.bias", out_features)
    for name in ("img_cls", "video_cls", "text_mlm", "text_caption", "caption", "mlm", "retrieve", "tqa_mlm",
                 "tqa_caption", "tqa_retrieve", "downstream"):
        sd[f"loss_prepare.logit_scale_{name}"] = torch.randn((), generator=g)
    add("loss_prepare.ln_post.weight", width)
    add("loss_prepare.ln_post.bias", width)
    add("loss_prepare.proj.weight", width, width)
    add("loss_prepare.proj.bias", width)
    add("loss_prepare.queue_h1_mscoco_retrieve", 16, width)
    add("loss_prepare.queue_h2_mscoco_retrieve", 16, width)
    sd["loss_prepare.queue_ptr1_mscoco_retrieve"] = torch.zeros(1, dtype=torch.long)
    sd["loss_prepare.queue_ptr2_mscoco_retrieve"] = torch.zeros(1, dtype=torch.long)
    return sd


@pytest.fixture(scope="module")
def reference():
    sd = reference_state_dict()
    config = conv.infer_config(sd, num_attention_heads=2)
    return sd, config


def test_infer_config_reads_the_reference_layout(reference):
    _, config = reference
    assert (config.hidden_size, config.num_hidden_layers, config.intermediate_size) == (32, 2, 128)
    assert config.moe_layer_indices() == [0]  # 'odd' in the reference = 0-based even layers
    assert (config.moe_routing, config.moe_num_experts, config.moe_top_k, config.attribute_dim) == ("attribute", 4, 2, 8)
    assert sorted(config.moe_projections) == ["attn_out", "attn_qkv", "ffn_fc1", "ffn_fc2"]
    assert (config.image_size, config.patch_size, config.num_frames, config.max_position_embeddings) == (16, 8, 4, 32)


def test_every_reference_tensor_lands_where_it_should(reference):
    sd, config = reference
    report = {}
    ours = conv.convert_state_dict(sd, config, report=report)
    model = UniPerceiverMoEForGenericPerception(config)
    assert set(ours) == set(model.state_dict())
    model.load_state_dict(ours, strict=True)
    ref, our = "fused_encoder.layers.{}.", "uniperceiver.encoder.layers.{}."
    pairs = {"self_attn.qkv_proj": "attention.qkv", "self_attn.dense": "attention.out_proj",
             "linear1": "mlp.fc1", "linear2": "mlp.fc2"}
    for theirs, mine in pairs.items():
        for e in range(4):
            for p in ("weight", "bias"):
                assert torch.equal(ours[f"{our.format(0)}{mine}.{p}"][e],
                                   sd[f"{ref.format(0)}{theirs}.experts.deepspeed_experts.{e}.{p}"])
            assert torch.equal(ours[f"{our.format(1)}{mine}.weight"], sd[f"{ref.format(1)}{theirs}.weight"])
    for gate, module in (("attn_gate", "self_attn.qkv_proj"), ("ffn_gate", "linear1")):
        router, source = f"{our.format(0)}{gate}.router.", f"{ref.format(0)}{module}.gate."
        assert torch.equal(ours[router + "embed.weight"], sd[source + "tag_transform.0.weight"])
        assert torch.equal(ours[router + "norm.bias"], sd[source + "tag_transform.1.bias"])
        assert torch.equal(ours[router + "gate.weight"], sd[source + "wg.weight"])
    for i in range(2):
        assert torch.equal(ours[our.format(i) + "layer_scale2.gamma"], sd[ref.format(i) + "gamma_2"])
        assert torch.equal(ours[our.format(i) + "norm1.weight"], sd[ref.format(i) + "norm1.weight"])
    m = "uniperceiver.embeddings."
    assert torch.equal(ours[m + "word_embeddings.weight"], sd["token_embed.embeddings.weight"])
    assert torch.equal(ours[m + "position_embeddings.weight"], sd["token_embed.embeddings_pos.position_embeddings.weight"])
    assert torch.equal(ours[m + "modality_embeddings.weight"][0], sd["token_embed.embeddings_token_type.weight"][0])
    assert not ours[m + "modality_embeddings.weight"][1:].any()  # ADD_TYPE_EMBED off: no vision type embedding
    assert torch.equal(ours[m + "patch_embedding.weight"], sd["video_embed.embeddings.weight"])
    assert torch.equal(ours[m + "temporal_embeddings.weight"], sd["video_embed.embeddings_st_pos.temporal_pos_embed.weight"])
    assert torch.equal(ours[m + "layer_norm.bias"], sd["token_embed.embeddings_norm.bias"])
    assert config.share_projection_head and not any(key.startswith("target_head.") for key in ours)
    assert config.text_distance_bias == "none"  # the reference's attention has no bias between words
    assert not config.word_logit_bias
    assert config.bos_token_id is None  # the reference's texts start with their first word
    assert torch.equal(ours["input_head.norm.weight"], sd["loss_prepare.ln_post.weight"])
    assert torch.equal(ours["input_head.proj.weight"], sd["loss_prepare.proj.weight"])
    two_heads = copy.deepcopy(config)  # a --config with a head per side gets the reference's head in both
    two_heads.share_projection_head = False
    separate = conv.convert_state_dict(sd, two_heads)
    assert torch.equal(separate["target_head.proj.weight"], sd["loss_prepare.proj.weight"])
    scales = dict(zip(config.task_families, ours["logit_scales.log_scale"]))
    assert scales["image_classification"] == sd["loss_prepare.logit_scale_img_cls"]
    assert scales["retrieval"] == sd["loss_prepare.logit_scale_retrieve"]
    assert scales["text_classification"] == scales["mlm"] == sd["loss_prepare.logit_scale_text_mlm"]
    assert "fused_encoder.layers.0.linear2.gate.wg.weight" in report["dropped"]
    assert "loss_prepare.queue_ptr1_mscoco_retrieve" in report["dropped"]
    assert conv.SPATIAL_POSITIONS in report["checked"]
    with torch.no_grad():  # the converted model runs
        out = model.eval()(**classification_inputs())
    assert torch.isfinite(out.logits).all()


def test_vision_type_embedding_option_copies_it_to_the_image_and_video_rows(reference):
    sd, config = reference
    ours = conv.convert_state_dict(sd, config, vision_type_embedding=True)
    rows = ours["uniperceiver.embeddings.modality_embeddings.weight"]
    assert torch.equal(rows[1], sd["video_embed.embeddings_type.weight"][0]) and torch.equal(rows[2], rows[1])


def test_extra_and_missing_reference_keys_are_listed(reference):
    sd, config = reference
    extra = dict(sd, **{"fused_encoder.layers.0.self_attn.bogus.weight": torch.zeros(2)})
    with pytest.raises(conv.ConversionError, match=r"have no place in our layout[^\n]*\n  fused_encoder\.layers\.0\.self_attn\.bogus\.weight"):
        conv.convert_state_dict(extra, config)
    assert conv.convert_state_dict(extra, config, ignore=["*.bogus.*"]).keys() == conv.convert_state_dict(sd, config).keys()
    missing = {k: v for k, v in sd.items() if k != "fused_encoder.layers.0.linear1.experts.deepspeed_experts.2.weight"}
    with pytest.raises(conv.ConversionError, match=r"linear1\.experts\.deepspeed_experts\.2\.weight -> "
                                                   r"uniperceiver\.encoder\.layers\.0\.mlp\.fc1\.weight\[2\]"):
        conv.convert_state_dict(missing, config)


def test_a_position_table_at_the_stage_2_scale_converts_with_that_scale():
    """The reference's 224 px stage-2 / zero-shot / prompt-tuning configs store positions at POSEMBED_SCALE =
    160/224: the converter reads the scale off the table, checks the table against ours at that scale, and
    the converted model computes those positions."""
    from modeling_uniperceiver_moe.modeling_uniperceiver_moe import sincos_2d_position_embedding

    sd = reference_state_dict(image=48, posembed_scale=160 / 224)
    config = conv.infer_config(sd, num_attention_heads=2)
    assert config.vision_position_scale == pytest.approx(160 / 224, abs=1e-6)
    report = {}
    conv.convert_state_dict(sd, config, report=report)
    assert conv.SPATIAL_POSITIONS in report["checked"]
    ours = sincos_2d_position_embedding(6, 6, 32, scale=config.vision_position_scale)
    torch.testing.assert_close(ours, sd[conv.SPATIAL_POSITIONS], atol=1e-5, rtol=0)
    unscaled = copy.deepcopy(config)
    unscaled.vision_position_scale = 1.0
    with pytest.raises(conv.ConversionError, match="fixed 2-D sin-cos spatial positions"):
        conv.convert_state_dict(sd, unscaled)
    assert conv.infer_config(reference_state_dict(image=48), num_attention_heads=2).vision_position_scale == 1.0


def test_tensors_without_a_place_must_match_what_we_compute(reference):
    sd, config = reference
    learned = dict(sd, **{conv.SPATIAL_POSITIONS: sd[conv.SPATIAL_POSITIONS] + 0.1})
    with pytest.raises(conv.ConversionError, match="fixed 2-D sin-cos spatial positions"):
        conv.convert_state_dict(learned, config)
    conv.convert_state_dict(learned, config, ignore=[conv.SPATIAL_POSITIONS])  # accepted when asked for
    unshared = dict(sd, **{"video_embed.embeddings_norm.weight": sd["video_embed.embeddings_norm.weight"] + 1})
    with pytest.raises(conv.ConversionError, match="the shared embedding LayerNorm"):
        conv.convert_state_dict(unshared, config)
    wrong_shape = dict(sd, **{"fused_encoder.layers.1.linear1.weight": torch.zeros(64, 32)})
    with pytest.raises(conv.ConversionError, match=r"linear1\.weight \(64, 32\) -> .*mlp\.fc1\.weight \(128, 32\)"):
        conv.convert_state_dict(wrong_shape, config)


def test_a_config_that_disagrees_with_the_reference_is_rejected(reference):
    sd, _ = reference
    every_other = tiny_config("attribute", moe_layers="every_other")  # ours: layer 1; the reference: layer 0
    with pytest.raises(conv.ConversionError, match="deepspeed_experts"):
        conv.convert_state_dict(sd, every_other)
    with pytest.raises(conv.ConversionError, match="attribute routing only"):
        conv.convert_state_dict(sd, tiny_config("token", moe_layers=[0]))


def test_converter_cli_writes_a_loadable_checkpoint(reference, tmp_path):
    sd, config = reference
    torch.save({"model": sd}, tmp_path / "reference.pth")
    conv.main([str(tmp_path / "reference.pth"), str(tmp_path / "out"), "--num-attention-heads", "2", "--no-processor"])
    loaded = UniPerceiverMoEForGenericPerception.from_pretrained(tmp_path / "out")
    expected = conv.convert_state_dict(sd, config)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in expected.items())
    assert loaded.config.moe_layers == [0] and loaded.config.num_attention_heads == 2
    with pytest.raises(SystemExit, match="reference checkpoint not found"):
        conv.main([str(tmp_path / "nope.pth"), str(tmp_path / "out3")])


def deepspeed_layout(reference_sd: dict) -> dict:
    """The names a raw DeepSpeed `mp_rank_00_model_states.pt` module holds for the reference's tensors (its
    tools/convertmoe.ipynb renames them the other way), residual scales as [1, 1, d], plus an unused
    visual_embed."""
    raw = {"visual_embed.patch_embed.weight": torch.zeros(4, 3)}
    for key, value in reference_sd.items():
        key = key.replace("fused_encoder.", "encoder.").replace("loss_prepare.", "predictor.")
        key = key.replace("self_attn.qkv_proj", "attention.self.qkv_proj").replace("self_attn.dense", "attention.output.dense")
        key = key.replace(".gate.", ".deepspeed_moe.gate.").replace(".experts.", ".deepspeed_moe.experts.")
        key = key.replace("linear1.", "ffn.dense.").replace("linear2.", "ffn.dense2.")
        key = key.replace("norm1.", "LayerNormModules.0.").replace("norm2.", "LayerNormModules.1.")
        if key.endswith(("gamma_1", "gamma_2")):
            key = key.replace("gamma_1", "attention_output.residual_scale").replace("gamma_2", "ffn_output.residual_scale")
            value = value[None, None]
        raw[key] = value
    return raw


def test_a_raw_deepspeed_file_converts_like_the_renamed_reference_checkpoint(reference, tmp_path):
    """The released MoE checkpoints are DeepSpeed model-state files; they convert directly, to exactly the
    weights the reference's renamed checkpoint gives."""
    sd, config = reference
    raw = deepspeed_layout(sd)
    assert any(".deepspeed_moe.experts." in k for k in raw) and "encoder.layers.0.LayerNormModules.1.bias" in raw
    torch.save({"module": raw, "global_steps": 89999}, tmp_path / "mp_rank_00_model_states.pt")
    assert conv.load_reference_checkpoint(tmp_path / "mp_rank_00_model_states.pt").keys() == sd.keys()
    conv.main([str(tmp_path / "mp_rank_00_model_states.pt"), str(tmp_path / "out"), "--num-attention-heads", "2",
               "--no-processor"])
    loaded = UniPerceiverMoEForGenericPerception.from_pretrained(tmp_path / "out")
    expected = conv.convert_state_dict(sd, config)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in expected.items())
    bad = dict(raw, **{"encoder.layers.0.attention_output.residual_scale": torch.zeros(2, 32)})
    torch.save({"module": bad}, tmp_path / "bad.pt")
    with pytest.raises(SystemExit, match=r"residual_scale has shape \(2, 32\); a residual scale is \[1, 1, d\]"):
        conv.main([str(tmp_path / "bad.pt"), str(tmp_path / "out2")])


def test_a_converted_checkpoint_gets_the_reference_s_image_preprocessing(reference, tmp_path):
    """ImageNet statistics and the 256/224 resize before the centre crop, and texts without the start token,
    which a fine-tuning or prompt-tuning run of the converted folder then reads from it."""
    from modeling_uniperceiver_moe.processing_uniperceiver_moe import checkpoint_processor

    sd, _ = reference
    torch.save({"model": sd}, tmp_path / "reference.pth")
    conv.main([str(tmp_path / "reference.pth"), str(tmp_path / "out"), "--num-attention-heads", "2"])
    processor = checkpoint_processor(str(tmp_path / "out"), image_size=16, add_bos_token=False)
    assert list(processor.image_processor.image_mean) == [0.485, 0.456, 0.406]
    assert list(processor.image_processor.image_std) == [0.229, 0.224, 0.225]
    assert processor.image_processor.size["shortest_edge"] == int(256 / 224 * 16)
    assert processor(text=["a cat"])["input_ids"].tolist() == [[320, 2368, 49407]]  # `text + " <|endoftext|>"`
    from modeling_uniperceiver_moe import UniPerceiverMoEConfig

    assert UniPerceiverMoEConfig.from_pretrained(tmp_path / "out").bos_token_id is None
    with pytest.raises(ValueError, match="start token"):  # a model whose texts start with it would be fed wrong texts
        checkpoint_processor(str(tmp_path / "out"), image_size=16)


def test_push_uploads_only_the_checkpoint_s_own_files_and_follows_no_link_out(artefacts, tmp_path):
    """A pickle, a token linked in from outside, notes and subfolders stay behind; a weight file that links
    out of the folder is refused; a malformed repo id is refused before anything is written."""
    import shutil

    folder = tmp_path / "final"
    shutil.copytree(artefacts["model"], folder)
    secret = write(tmp_path / "home" / "token", "hf_secret")
    (folder / "token").symlink_to(secret)
    (folder / "optimizer.bin").write_bytes(b"\x80\x04pickle")
    write(folder / "notes.txt", "draft")
    write(folder / "checkpoints" / "step_1" / "random_states_0.pkl", "x")
    out = tmp_path / "staged"
    push_main([str(folder), "--repo-id", MODEL_REPO, "--dry-run", str(out)])
    staged = sorted(p.name for p in out.rglob("*") if p.is_file())
    assert staged == sorted(["README.md", *(p.name for p in artefacts["model"].iterdir() if p.name != "README.md")])
    assert not any(b"hf_secret" in p.read_bytes() for p in out.rglob("*") if p.is_file())
    (folder / "model.safetensors").rename(tmp_path / "elsewhere.safetensors")
    (folder / "model.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    with pytest.raises(SystemExit, match="model.safetensors is a link to .* outside the checkpoint folder"):
        push_main([str(folder), "--repo-id", MODEL_REPO, "--dry-run", str(tmp_path / "staged2")])
    for bad in ("user/x y", "a/b/c", "../etc"):
        with pytest.raises(SystemExit, match="is not a Hub repository id"):
            push_main([str(artefacts["model"]), "--repo-id", bad, "--dry-run", str(tmp_path / "staged3")])
    assert not (tmp_path / "staged2").exists() and not (tmp_path / "staged3").exists()



def test_every_module_the_saved_code_imports_is_uploaded():
    """save_pretrained copies the modeling and processing files and every module they import relatively;
    the push's allow-list must name each, or a remote-code load fails on the missing import."""
    from transformers.dynamic_module_utils import get_relative_import_files

    from hub_cards.push import CODE_FILES

    package = Path(REPO_ROOT) / "modeling_uniperceiver_moe"
    entry_points = ["modeling_uniperceiver_moe.py", "processing_uniperceiver_moe.py", "configuration_uniperceiver_moe.py"]
    needed = set(entry_points)
    for name in entry_points:
        needed |= {Path(f).name for f in get_relative_import_files(str(package / name))}
    assert needed <= set(CODE_FILES), needed - set(CODE_FILES)
