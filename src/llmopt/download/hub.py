"""Real weights from the Hugging Face hub (``source: hub`` at ``scale: real``).

    HF_TOKEN=... llmopt download qwen2.5-7b-instruct --scale real -o results/qwen2.5-7b-instruct/source

``huggingface_hub.snapshot_download`` fetches the pinned ``revision`` of ``hf_repo`` (only the files matching
``allow_patterns``) into the blob cache ``$LLMOPT_CACHE/hub`` (a file already there is never fetched again; a
transfer cut off mid-file is continued with a Range request, not restarted); the token comes
from the environment (``HF_TOKEN``, read by huggingface_hub) and the endpoint from ``HF_ENDPOINT`` (read at call time,
so tests point it at a local stand-in server). Every LFS file is checked against the sha256 the hub lists for it and
every safetensors header is parsed; only then is the folder linked into ``out_dir`` (atomically) with its manifest.
"""

from __future__ import annotations

import os
from pathlib import Path

from llmopt.download.cache import cache_root, link_or_copy
from llmopt.download.manifest import check_safetensors, folder_manifest
from llmopt.errors import LlmoptError
from llmopt.fsutil import atomic_path, sha256_file, write_json

ALLOW_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt"]
DEFAULT_ENDPOINT = "https://huggingface.co"


def fetch_hub(model_id: str, entry: dict, out_dir: Path, cache_dir: Path | None = None) -> dict:
    """Snapshot ``entry['hf_repo']`` at ``entry['revision']`` into ``out_dir``; return the manifest."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    repo, revision = entry.get("hf_repo"), entry.get("revision")
    if not repo or not revision:
        raise LlmoptError(f"models.yaml: {model_id} needs 'hf_repo' and 'revision' for source 'hub'")
    patterns = entry.get("allow_patterns", ALLOW_PATTERNS)
    endpoint = os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT).rstrip("/")
    where = f"{endpoint}/{repo}@{revision}"
    try:
        snapshot = Path(snapshot_download(repo, revision=revision, allow_patterns=patterns, endpoint=endpoint,
                                          cache_dir=cache_root(cache_dir) / "hub"))
        listing = {f.path: f for f in HfApi(endpoint=endpoint).list_repo_tree(repo, revision=snapshot.name,
                                                                             recursive=True)}
    except GatedRepoError:
        raise LlmoptError(f"{where}: gated repo; accept its licence on the hub and set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise LlmoptError(f"{where}: repository not found (or private: set HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise LlmoptError(f"{where}: revision not found (models.yaml: {model_id}.revision)") from None
    except LocalEntryNotFoundError:
        raise LlmoptError(f"{where}: hub unreachable and nothing cached (network, HF_ENDPOINT, HF_HUB_OFFLINE)") from None
    except (HfHubHTTPError, OSError) as err:
        raise LlmoptError(f"{where}: download failed ({type(err).__name__}: {str(err).splitlines()[0]})") from None

    files = sorted(p for p in snapshot.rglob("*") if p.is_file())
    if not (snapshot / "config.json").is_file():
        raise LlmoptError(f"{where}: no config.json among the downloaded files (allow_patterns {patterns})")
    for path in files:
        rel = path.relative_to(snapshot).as_posix()
        lfs = getattr(listing.get(rel), "lfs", None)
        if lfs is not None and sha256_file(path) != lfs.sha256:
            raise LlmoptError(f"{path}: sha256 differs from the hub's ({lfs.sha256}) for {rel}")
        if rel.endswith(".safetensors"):
            check_safetensors(path)

    provenance = {"hf_repo": repo, "revision": revision, "commit": snapshot.name, "endpoint": endpoint,
                  "allow_patterns": patterns}
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        for path in files:
            dest = tmp / path.relative_to(snapshot)
            dest.parent.mkdir(parents=True, exist_ok=True)
            link_or_copy(path.resolve(), dest)  # snapshot entries are symlinks into the blob cache
        manifest = folder_manifest(tmp, model_id, "hub", "real", provenance)
        write_json(tmp / "manifest.json", manifest)
    return manifest

