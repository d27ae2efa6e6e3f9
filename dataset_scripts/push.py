"""Upload a built repo folder to the Hugging Face Hub as a dataset repo.

    cadmtl data push REPO_DIR --repo-id ORG/NAME [--private] [--revision main]

The folder is checked first (every config's shards complete and consistent) and its card is regenerated
from the shards, so the uploaded YAML always matches the data. The upload is one commit of ``README.md``,
the Parquet shards and the validation reports; remote shards that no longer exist locally (a split that
was re-sharded) are deleted in the same commit. Afterwards the data loads with
``load_dataset("ORG/NAME", "<config>", streaming=True)`` and ``cadmtl.data.pipeline.load_split``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from huggingface_hub import HfApi

from .card import RepoLayoutError, scan_repo, write_card

UPLOAD_PATTERNS = ["README.md", "*/*.parquet", "reports/*/*.json", "reports/*/*.md"]


def push_repo(
    repo_dir: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    api: HfApi | None = None,
) -> str:
    """Check, re-card and upload ``repo_dir`` to the dataset repo ``repo_id``; returns the commit URL."""
    repo_dir = Path(repo_dir)
    if "/" not in repo_id:
        raise ValueError(f"--repo-id {repo_id!r} needs a namespace (ORG/NAME), e.g. cad-mtl/cad100k")
    if not repo_dir.is_dir():
        raise FileNotFoundError(f"{repo_dir}: repo folder not found")
    configs = scan_repo(repo_dir)
    if not configs:
        raise RepoLayoutError(f"{repo_dir}: no <config>/<split>-NNNNN-of-NNNNN.parquet shards to upload")
    write_card(repo_dir, repo_hint=repo_id)
    api = api or HfApi(token=token)
    api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    summary = ", ".join(f"{name} ({', '.join(c.splits)})" for name, c in configs.items())
    info = api.upload_folder(
        repo_id=repo_id,
        folder_path=repo_dir,
        repo_type="dataset",
        revision=revision,
        allow_patterns=UPLOAD_PATTERNS,
        delete_patterns=["*/*.parquet"],
        commit_message=commit_message or f"Upload {len(configs)} config(s): {summary}",
    )
    return str(getattr(info, "commit_url", info))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="cadmtl data push",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("repo_dir", type=Path, help="built repo folder (README.md + <config>/*.parquet)")
    parser.add_argument("--repo-id", required=True, help="dataset repo on the Hub, ORG/NAME")
    parser.add_argument("--private", action="store_true", help="create the repo as private")
    parser.add_argument("--revision", help="branch to commit to (default: main)")
    parser.add_argument("--commit-message")
    parser.add_argument("--token", help="Hub token (default: the logged-in one / HF_TOKEN)")
    args = parser.parse_args(argv)
    try:
        url = push_repo(
            args.repo_dir,
            args.repo_id,
            private=args.private,
            revision=args.revision,
            commit_message=args.commit_message,
            token=args.token,
        )
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"pushed {args.repo_dir} to https://huggingface.co/datasets/{args.repo_id} ({url})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
