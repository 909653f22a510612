"""The Hub side of `repa data fetch`, through huggingface_hub: list a repository's files, download one file.

Everything goes through ``HfApi(endpoint=...)`` and ``hf_hub_download(..., endpoint=...)``, so the same code
talks to huggingface.co, a mirror, or a local Hub-compatible server (the tests use one). Downloads go into
``local_dir`` with huggingface_hub's own resumable transfer (an interrupted file continues from its
``.incomplete`` part). Each failure becomes one ``FetchError`` line naming the repository or file and the fix.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path

from stages.core.errors import UsageError


class FetchError(UsageError):
    """The corpus cannot be fetched; the message says why and what to do."""


@dataclass(frozen=True)
class RemoteFile:
    path: str  # inside the repository
    size: int
    sha256: str | None  # the LFS object id, when the file is stored with LFS


@dataclass(frozen=True)
class Listing:
    commit: str  # the revision resolved once, so every file comes from the same commit
    files: list[RemoteFile]


def _api(endpoint: str | None):
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint)


def list_files(repo: str, repo_type: str, revision: str, patterns: list[str], endpoint: str | None) -> Listing:
    """The files of ``repo`` at ``revision`` whose path matches any of ``patterns`` (globs), with sizes and
    LFS checksums, in path order."""
    api = _api(endpoint)
    try:
        commit = api.repo_info(repo, repo_type=repo_type, revision=revision).sha
        entries = api.list_repo_tree(repo, repo_type=repo_type, revision=commit, recursive=True)
        files = [RemoteFile(e.path, int(e.size), e.lfs.sha256 if e.lfs else None) for e in entries
                 if hasattr(e, "size") and any(fnmatch.fnmatch(e.path, p) for p in patterns)]
    except Exception as e:
        raise describe_error(e, repo, repo_type, revision, api.endpoint) from None
    return Listing(commit, sorted(files, key=lambda f: f.path))


def download(repo: str, repo_type: str, commit: str, path: str, out: Path, endpoint: str | None) -> Path:
    """Fetch one file into ``out`` (resuming a partial download); its local path."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo, path, repo_type=repo_type, revision=commit, local_dir=out,
                                    endpoint=endpoint))
    except Exception as e:
        raise describe_error(e, repo, repo_type, commit, endpoint or _api(None).endpoint, path, out) from None


def describe_error(e: Exception, repo: str, repo_type: str, revision: str, endpoint: str, path: str | None = None,
                   out: Path | None = None) -> Exception:
    """A one-line FetchError for what went wrong (auth, missing repo or file, network, disk), else ``e``."""
    import errno

    from huggingface_hub import errors

    what = f"{path} of {repo}" if path else repo
    page = f"{endpoint.rstrip('/')}/{'datasets/' if repo_type == 'dataset' else ''}{repo}"
    login = "log in with `hf auth login` or set HF_TOKEN"
    if isinstance(e, errors.GatedRepoError):
        return FetchError(f"{repo} is gated: accept its terms on {page} and {login}")
    if isinstance(e, errors.RevisionNotFoundError):
        return FetchError(f"--revision {revision}: no such branch, tag or commit in {repo}")
    if isinstance(e, errors.RepositoryNotFoundError):
        return FetchError(f"--repo {repo}: not found at {endpoint}, or private and this machine is not logged in; "
                          f"check the id and --repo-type {repo_type}, or {login}")
    if isinstance(e, errors.EntryNotFoundError):
        return FetchError(f"{what}: not in the repository at {revision[:12]}; fix --include")
    if isinstance(e, errors.HfHubHTTPError) and e.response is not None and e.response.status_code in (401, 403):
        return FetchError(f"{what}: access refused ({e.response.status_code}); {login} with a token that may read it")
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return FetchError(f"{out}: disk full while fetching {path}; free space or choose another --out, then rerun "
                          "(finished files are kept, the partial one resumes)")
    if isinstance(e, errors.OfflineModeIsEnabled):
        return FetchError(f"{what}: HF_HUB_OFFLINE is set; unset it to download")
    if isinstance(e, (OSError, errors.LocalEntryNotFoundError)) or "connect" in type(e).__name__.lower():
        first_line = str(e).splitlines()[0][:160] if str(e) else ""
        return FetchError(f"{what}: cannot reach {endpoint} ({type(e).__name__}: {first_line}); "
                          "check the network, --endpoint or HF_ENDPOINT, then rerun (finished files are kept)")
    return e
