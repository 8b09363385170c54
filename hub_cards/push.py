"""Push a checkpoint folder with its model card to the Hugging Face Hub.

    python -m hub_cards.push outputs/pretrain-tiny/final --repo-id user/uniperceiver-moe-tiny
    python -m hub_cards.push outputs/prompt-tuning/emoji_captioning-prompt/adapter \\
        --repo-id user/uniperceiver-moe-tiny-emoji-captioning --base-model user/uniperceiver-moe-tiny
    python -m hub_cards.push outputs/quickstart/folded --repo-id user/uniperceiver-moe-ti-folded \\
        --base-model user/uniperceiver-moe-ti --revision image-route
    python -m hub_cards.push outputs/pretrain-tiny/final --repo-id user/x --dry-run staged/   # uploads nothing

Steps: copy the checkpoint's own files into a staging folder (an allow-list per kind: config, safetensors
weights, processor files; never pickles, subfolders, other files or an existing README.md, and never a link
out of the folder), write the card as README.md (`hub_cards.cards`), then `create_repo(exist_ok=True)`, `create_branch` when `--revision`
names a branch other than main, and `upload_folder(revision=...)` of the staging folder: one commit. For an
adapter the staged `adapter_config.json` records the base model's Hub id as `base_model_name_or_path`.
`--dry-run OUT_DIR` writes the staging folder to OUT_DIR (byte for byte what would be uploaded) and stops.

The Hub is reached through `huggingface_hub`, which reads `HF_ENDPOINT` (default https://huggingface.co) and
the token (`HF_TOKEN`, or the one saved by `hf auth login`). `--private` only applies when the repository is
created; files already on the branch that the folder does not have are kept.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .cards import KINDS, CheckpointError, detect_kind, render_card

# What a checkpoint of each kind may upload (top-level files only; glob patterns). Anything else in the
# folder (pickles such as *.bin / *.pt / *.pkl, tokens, notes, subfolders, an existing README.md) stays behind.
PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "added_tokens.json", "processor_config.json", "preprocessor_config.json")
# The package's modules that save_pretrained copies beside the weights (loading with trust_remote_code).
CODE_FILES = ("configuration_uniperceiver_moe.py", "modeling_uniperceiver_moe.py", "routing.py", "moe_implementations.py",
              "merge_kernels.py", "processing_uniperceiver_moe.py", "tokenization_uniperceiver_moe.py")
ALLOWED_FILES = {
    "model": ("config.json", "generation_config.json", "model.safetensors", "model-*-of-*.safetensors",
              "model.safetensors.index.json", *PROCESSOR_FILES, *CODE_FILES),
    "adapter": ("adapter_config.json", "adapter_model.safetensors", *PROCESSOR_FILES),
}
ALLOWED_FILES["folded"] = ALLOWED_FILES["model"]


class PushError(RuntimeError):
    """The push cannot go ahead or the Hub refused it (the message says why)."""


# ============================================================================================ staging
def staged_files(folder: Path, kind: str) -> tuple[list[Path], list[str]]:
    """(files uploaded, entries left out) of a checkpoint folder of `kind`: the top-level files that match
    ALLOWED_FILES[kind]. A symbolic link is never followed out of the folder: an allowed name that links
    outside it raises a PushError; links inside it are uploaded as the file they point to."""
    from fnmatch import fnmatchcase

    root = folder.resolve()
    files, left_out = [], []
    for path in sorted(folder.iterdir()):
        allowed = path.name != "README.md" and any(fnmatchcase(path.name, p) for p in ALLOWED_FILES[kind])
        if not allowed or path.is_dir():
            left_out.append(path.name + ("/" if path.is_dir() else ""))
            continue
        if path.is_symlink() and root not in path.resolve().parents:
            raise PushError(f"{path} is a link to {path.resolve()}, outside the checkpoint folder: links are not "
                            f"followed out of the folder; copy the file in (cp -L) if it belongs to the checkpoint")
        if path.is_file():
            files.append(Path(path.name))
    return files, left_out


def check_repo_id(repo_id: str) -> None:
    """`name` or `namespace/name` as the Hub accepts it; raises a PushError otherwise."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise PushError(f"--repo-id {repo_id!r} is not a Hub repository id: {error}") from None


def record_base_model(adapter_config: Path, base_model: str) -> None:
    """Point an adapter's `base_model_name_or_path` at the base model's Hub id (PEFT's auto classes read it)."""
    config = json.loads(adapter_config.read_text(encoding="utf-8"))
    if config.get("base_model_name_or_path") != base_model:
        config["base_model_name_or_path"] = base_model
        adapter_config.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def stage(folder: str | Path, out_dir: str | Path, repo_id: str, kind: str | None = None,
          results: str | None = None, base_model: str | None = None, revision: str | None = None) -> Path:
    """Write the folder exactly as it will be uploaded into `out_dir` (which must not exist or be empty)."""
    folder, out_dir = Path(folder), Path(out_dir)
    check_repo_id(repo_id)
    card = render_card(folder, repo_id, kind=kind, results=results, base_model=base_model, revision=revision)
    files, left_out = staged_files(folder, kind or detect_kind(folder))
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise PushError(f"staging folder {out_dir} already exists and is not empty; give a new or empty folder")
    if out_dir.resolve() == folder.resolve() or folder.resolve() in out_dir.resolve().parents:
        raise PushError(f"staging folder {out_dir} must lie outside the checkpoint folder {folder}")
    out_dir.mkdir(parents=True, exist_ok=True)
    if left_out:
        print(f"not uploaded (not part of a {kind or detect_kind(folder)} checkpoint): {', '.join(left_out)}")
    for relative in files:
        target = out_dir / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(folder / relative, target)
    if (out_dir / "adapter_config.json").is_file():
        recorded = card.data.to_dict().get("base_model")
        if recorded:
            record_base_model(out_dir / "adapter_config.json", recorded)
    (out_dir / "README.md").write_text(str(card), encoding="utf-8")
    return out_dir


# ============================================================================================ upload
def require_token() -> str:
    """The token huggingface_hub will send (HF_TOKEN or the saved login); none raises a PushError."""
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise PushError("no Hugging Face token: set HF_TOKEN or log in with `hf auth login` (pushing needs "
                        "write access; --dry-run needs no token)")
    return token


def upload(staging: Path, repo_id: str, revision: str | None, private: bool, commit_message: str):
    """create_repo (exist_ok) -> create_branch (non-main revision) -> upload_folder; returns the CommitInfo."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError

    require_token()
    api = HfApi()
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        if revision and revision != constants.DEFAULT_REVISION:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        commit = api.upload_folder(repo_id=repo_id, folder_path=staging, revision=revision,
                                   commit_message=commit_message)
    except HfHubHTTPError as error:
        raise PushError(f"the Hub at {api.endpoint} refused the push to {repo_id}: {error}") from None
    except Exception as error:
        if is_transport_error(error):
            raise PushError(f"cannot reach the Hub at {api.endpoint} (HF_ENDPOINT): {error}") from None
        raise
    return url, commit


def is_transport_error(error: BaseException) -> bool:
    """Connection refused, DNS failure, timeout: an OSError or an error of the HTTP client library."""
    root = type(error).__module__.split(".")[0]
    return isinstance(error, OSError) or root in ("httpx", "httpx2", "httpcore", "requests", "urllib3")


# ============================================================================================ CLI
@dataclass
class PushArguments:
    folder: str = field(metadata={"positional": True,
                                  "help": "checkpoint folder: a model (config.json), a folded export or an adapter"})
    repo_id: str = field(metadata={"help": "namespace/name on the Hub"})
    revision: Optional[str] = field(default=None, metadata={"help": "branch to push to (created from main if missing)"})
    kind: Optional[str] = field(default=None, metadata={"choices": KINDS, "help": "default: detected from the folder"})
    results: Optional[str] = field(default=None, metadata={
        "help": "report.json (model) or results.json (adapter); default: the one next to the folder"})
    base_model: Optional[str] = field(default=None, metadata={"help": "Hub id of the base model (adapters, folded exports)"})
    private: bool = field(default=False, metadata={"help": "create the repository as private"})
    commit_message: Optional[str] = field(default=None, metadata={"help": "default: names the folder and this script"})
    dry_run: Optional[str] = field(default=None, metadata={
        "metavar": "OUT_DIR", "help": "write the folder as it would be uploaded to OUT_DIR and upload nothing"})


def parse_args(argv=None) -> PushArguments:
    from modeling_uniperceiver_moe.command_line import parse_script_arguments

    return parse_script_arguments(PushArguments, argv, prog="python -m hub_cards.push", description=__doc__)


def main(argv=None) -> dict:
    """Run the CLI; errors end with SystemExit("error: ...")."""
    args = parse_args(argv)
    message = args.commit_message or f"Upload {Path(args.folder).name} with its model card (hub_cards.push)"
    try:
        if args.dry_run is not None:
            out = stage(args.folder, args.dry_run, args.repo_id, args.kind, args.results, args.base_model, args.revision)
            files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
            print(f"dry run: wrote {len(files)} files to {out} (nothing uploaded): {', '.join(files)}")
            return {"dry_run": str(out), "files": files}
        check_repo_id(args.repo_id)
        require_token()  # fail before any work when pushing is impossible
        with tempfile.TemporaryDirectory(prefix="hub_cards_") as tmp:
            staging = stage(args.folder, Path(tmp) / "staging", args.repo_id, args.kind, args.results,
                            args.base_model, args.revision)
            files = sorted(str(p.relative_to(staging)) for p in staging.rglob("*") if p.is_file())
            url, commit = upload(staging, args.repo_id, args.revision, args.private, message)
    except (CheckpointError, PushError) as error:
        raise SystemExit(f"error: {error}") from None
    print(f"pushed {len(files)} files to {url} (revision {args.revision or 'main'}): {commit.commit_url}")
    return {"repo_url": str(url), "commit": commit.oid, "files": files}


if __name__ == "__main__":
    main(sys.argv[1:])
