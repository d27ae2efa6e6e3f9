"""Upload a built repo folder to the Hugging Face Hub as a dataset repo.

    cadmtl data push REPO_DIR --repo-id ORG/NAME [--private] [--revision main]

The folder is checked first (every config's shards complete and consistent) and its card is regenerated
from the shards, so the uploaded YAML always matches the data. The Parquet shards go up first, in commits of at
most ``--files-per-commit`` files and ``--max-commit-gb`` GB (CAD 100K is far too large for one commit), shards
already on the Hub with the same size skipped, so an interrupted or refused push resumes where it stopped when
run again. The last commit holds ``README.md`` and the validation reports and deletes the remote shards that no
longer exist locally (a split that was re-sharded): the card never describes shards that are not there yet.
Afterwards the data loads with ``load_dataset("ORG/NAME", "<config>", streaming=True)`` and
``cadmtl.data.pipeline.load_split``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
from huggingface_hub.errors import HfHubHTTPError
from tqdm.auto import tqdm

from .card import RepoLayoutError, scan_repo, write_card
from .options import exit_status

UPLOAD_PATTERNS = ["README.md", "*/*.parquet", "reports/*/*.json", "reports/*/*.md"]
FILES_PER_COMMIT = 50
MAX_COMMIT_BYTES = 2 * 1024**3


class PushRefusedError(RuntimeError):
    """The Hub refused a commit; what was committed before it stays, and running the push again resumes."""


def shard_batches(
    shards: Sequence[Path], files_per_commit: int = FILES_PER_COMMIT, max_commit_bytes: int = MAX_COMMIT_BYTES
) -> list[list[Path]]:
    """Shards grouped in order into commits of at most ``files_per_commit`` files and ``max_commit_bytes``
    (a single larger shard gets a commit of its own)."""
    batches: list[list[Path]] = []
    size = 0
    for shard in shards:
        shard_size = shard.stat().st_size
        if not batches or len(batches[-1]) >= files_per_commit or size + shard_size > max_commit_bytes:
            batches.append([])
            size = 0
        batches[-1].append(shard)
        size += shard_size
    return batches


def _remote_sizes(api: HfApi, repo_id: str, revision: str | None) -> dict[str, int]:
    """{path: size} of the files already in the dataset repo (empty for a new repo)."""
    try:
        entries = api.list_repo_tree(repo_id, recursive=True, repo_type="dataset", revision=revision)
        return {entry.path: entry.size for entry in entries if getattr(entry, "size", None) is not None}
    except HfHubHTTPError as error:
        if getattr(getattr(error, "response", None), "status_code", None) == 404:
            return {}
        raise


def _commit(api: HfApi, repo_id: str, operations: list, message: str, revision: str | None) -> str:
    try:
        info = api.create_commit(
            repo_id, operations, commit_message=message, repo_type="dataset", revision=revision
        )
    except HfHubHTTPError as error:
        raise PushRefusedError(
            f"the Hub refused the commit {message!r} to {repo_id}: {error}. Everything committed before it is "
            "kept: fix the cause (token, permissions, quota, repo size) and run the same command again to resume."
        ) from error
    return str(getattr(info, "commit_url", info))


def push_repo(
    repo_dir: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    api: HfApi | None = None,
    files_per_commit: int = FILES_PER_COMMIT,
    max_commit_bytes: int = MAX_COMMIT_BYTES,
) -> str:
    """Check, re-card and upload ``repo_dir`` to the dataset repo ``repo_id`` (shards first, in several resumable
    commits, then the card); returns the URL of the last commit."""
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
    remote = _remote_sizes(api, repo_id, revision)
    local_shards = sorted(repo_dir.glob("*/*.parquet"))
    local_paths = {shard.relative_to(repo_dir).as_posix() for shard in local_shards}
    missing = [s for s in local_shards if remote.get(s.relative_to(repo_dir).as_posix()) != s.stat().st_size]
    batches = shard_batches(missing, files_per_commit, max_commit_bytes)
    summary = ", ".join(f"{name} ({', '.join(c.splits)})" for name, c in configs.items())
    url = ""
    with tqdm(
        total=sum(s.stat().st_size for s in missing), unit="B", unit_scale=True, desc="uploading"
    ) as bar:
        for number, batch in enumerate(batches, start=1):
            operations = [CommitOperationAdd(s.relative_to(repo_dir).as_posix(), str(s)) for s in batch]
            url = _commit(api, repo_id, operations, f"Upload shards {number}/{len(batches)}", revision)
            bar.update(sum(s.stat().st_size for s in batch))
    finishing = [
        CommitOperationAdd(path.relative_to(repo_dir).as_posix(), str(path))
        for pattern in ("README.md", "reports/*/*.json", "reports/*/*.md")
        for path in sorted(repo_dir.glob(pattern))
    ]
    stale = sorted(p for p in remote if p.endswith(".parquet") and p.count("/") == 1 and p not in local_paths)
    finishing += [CommitOperationDelete(path) for path in stale]
    message = commit_message or f"Upload {len(configs)} config(s): {summary}"
    return _commit(api, repo_id, finishing, message, revision) or url


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
    parser.add_argument("--files-per-commit", type=int, default=FILES_PER_COMMIT)
    parser.add_argument("--max-commit-gb", type=float, default=MAX_COMMIT_BYTES / 1024**3)
    args = parser.parse_args(argv)

    def run() -> None:
        url = push_repo(
            args.repo_dir,
            args.repo_id,
            private=args.private,
            revision=args.revision,
            commit_message=args.commit_message,
            token=args.token,
            files_per_commit=args.files_per_commit,
            max_commit_bytes=int(args.max_commit_gb * 1024**3),
        )
        print(f"pushed {args.repo_dir} to https://huggingface.co/datasets/{args.repo_id} ({url})")

    return exit_status(run, (ValueError, FileNotFoundError, PushRefusedError), error_status=1)


if __name__ == "__main__":
    sys.exit(main())
