"""Every option of `repa data fetch`: its default, its help text and its checks, declared once."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from stages.core.options import option

REPO_TYPES = ("dataset", "model")
DEFAULT_INCLUDE = ("*.tar",)


@dataclass
class FetchConfig:
    repo: str = option("pixparse/cc12m-wds", "Hub repository holding the webdataset shards.", metavar="ID")
    include: list[str] = option(
        [], "Files of the repository to fetch: a glob over paths in it (repeat for several).", metavar="PATTERN",
        default_text="every *.tar (of pixparse/cc12m-wds: its train and validation shards)",
    )
    out: Path = option(Path("data/cc12m"), "Folder to download into (the repository's layout is kept).",
                       metavar="DIR")
    revision: str = option("main", "Branch, tag or commit; a branch is pinned to its commit for the whole fetch.")
    repo_type: str = option("dataset", "Kind of repository: dataset or model.", choices=REPO_TYPES)
    workers: int = option(8, "Files downloaded at once.", gt=0)
    endpoint: str | None = option(
        None, "Hub endpoint (a mirror, or a local Hub-compatible server).", default_text="HF_ENDPOINT, else the Hub",
        metavar="URL",
    )
    dry_run: bool = option(False, "List the files, their size and the space needed; download nothing.",
                           flags=("--dry-run",))

    def patterns(self) -> list[str]:
        return list(self.include) or list(DEFAULT_INCLUDE)
