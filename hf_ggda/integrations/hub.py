"""Publishing scored datasets: stage on disk, then push the card and the data to the Hub.

:func:`push_scored_dataset` first writes everything it will upload into a local staging folder
(``save_to_disk`` of the dataset, the card folder made by
:func:`~hf_ggda.integrations.cards.write_attribution_card`), so that the upload is exactly
what is on disk and can be inspected with ``dry_run=True`` before any network call.

Upload order: the repository is created (private by default), the card (README.md and its
PNG plots) is uploaded, and ``Dataset.push_to_hub`` runs last: it keeps the README text and
adds its own ``dataset_info`` / ``configs`` metadata to the card's YAML header.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from datasets import Dataset

from ..errors import OutputPathError
from ..logging import get_logger

logger = get_logger(__name__)

CARD_FILE = "README.md"
#: Written into every dataset folder :func:`save_dataset_atomic` saves: only a folder that
#: carries it (or an empty one) is ever replaced, so a user's own folder is never deleted.
OUTPUT_MARKER = ".hf_ggda_output"
_CARD_SUFFIXES = (".png", ".jpg", ".jpeg", ".svg")


def check_replaceable(target: Path) -> None:
    """Refuse to replace anything at ``target`` that hf_ggda did not write.

    Raises:
        OutputPathError: ``target`` is a file or a link, or a non-empty folder without the
            :data:`OUTPUT_MARKER` of an earlier hf_ggda save.
    """
    if not os.path.lexists(target):
        return
    if target.is_symlink() or not target.is_dir():
        raise OutputPathError(
            f"The output path {str(target)!r} exists and is not a folder hf_ggda wrote (it is "
            "a file or a link). hf_ggda never deletes what it did not write: move it away or "
            "choose another output folder.")
    entries = sorted(os.listdir(target))
    if entries and OUTPUT_MARKER not in entries:
        shown = ", ".join(entries[:6]) + (f" and {len(entries) - 6} more"
                                          if len(entries) > 6 else "")
        raise OutputPathError(
            f"The output folder {str(target)!r} already holds files hf_ggda did not write "
            f"({shown}); saving there would delete them. hf_ggda never deletes what it did not "
            "write: move the folder away or choose another output folder.")


def save_dataset_atomic(dataset: Dataset, path: str | os.PathLike[str]) -> Path:
    """``save_to_disk`` into a temporary sibling folder, then move it into place.

    A reader never sees a half-written folder under ``path``: it sees the old complete folder,
    nothing (for the instant between the two renames when replacing), or the new one. Only a
    folder an earlier call wrote (it carries :data:`OUTPUT_MARKER`) or an empty one is
    replaced.

    Args:
        dataset: The rows to save.
        path: Target folder.

    Returns:
        The target folder.

    Raises:
        OutputPathError: ``path`` is a file, a link, or a folder of files hf_ggda did not
            write (nothing is written then).
        OSError: The folder cannot be written; a previous folder at ``path`` is kept.
    """
    target = Path(path)
    check_replaceable(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        dataset.save_to_disk(str(tmp))
        (tmp / OUTPUT_MARKER).write_text("Saved by hf_ggda (save_dataset_atomic); a later save "
                                         "may replace this folder.\n")
        check_replaceable(target)  # again: another process may have put files there
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


@dataclass
class PushPlan:
    """What :func:`push_scored_dataset` uploads (or would upload, in a dry run).

    Attributes:
        repo_id: Target dataset repository.
        private: Whether the repository is created private.
        staging_dir: Local folder holding everything that is uploaded.
        dataset_dir: ``save_to_disk`` copy of the dataset inside ``staging_dir``.
        card_path: The staged README.md (None: no card).
        card_files: Staged files uploaded beside the card (plots), relative names.
        num_rows: Rows of the dataset.
        columns: Its column names.
        fingerprint: Its ``datasets`` fingerprint.
        commit_message: Commit message of the uploads.
        dry_run: True when nothing was sent.
        pushed: True once every upload returned.
        results: What each upload call returned (commit info), by step name.
    """

    repo_id: str
    private: bool
    staging_dir: Path
    dataset_dir: Path
    card_path: Optional[Path]
    card_files: list[str]
    num_rows: int
    columns: list[str]
    fingerprint: str
    commit_message: str
    dry_run: bool
    pushed: bool = False
    results: dict[str, Any] = field(default_factory=dict)


def _check_repo_id(repo_id: str) -> None:
    parts = repo_id.split("/")
    if len(parts) > 2 or not all(parts) or any(c.isspace() for c in repo_id):
        raise ValueError(f"repo_id must look like 'name' or 'owner/name', got {repo_id!r}.")


def _stage_card(card_dir: Path, staging: Path) -> tuple[Path, list[str]]:
    card = card_dir / CARD_FILE
    if not card.exists():
        raise FileNotFoundError(f"No {CARD_FILE} in {str(card_dir)!r}; write one with "
                                "hf_ggda.integrations.cards.write_attribution_card().")
    out = staging / "card"
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy2(card, out / CARD_FILE)
    files = sorted(p.name for p in card_dir.iterdir()
                   if p.is_file() and p.suffix.lower() in _CARD_SUFFIXES)
    for name in files:
        shutil.copy2(card_dir / name, out / name)
    return out / CARD_FILE, files


def push_scored_dataset(dataset: Dataset, repo_id: str,
                        card_dir: Optional[str | os.PathLike[str]] = None,
                        token: Optional[str] = None, private: bool = True,
                        dry_run: bool = False,
                        staging_dir: Optional[str | os.PathLike[str]] = None,
                        commit_message: str = "Upload GGDA-scored dataset",
                        api: Optional[Any] = None) -> PushPlan:
    """Stage a scored dataset (and its attribution card) and push it to the Hub.

    Args:
        dataset: The dataset to publish (e.g. the output of
            :meth:`~hf_ggda.scores.GroupScores.to_dataset_columns`).
        repo_id: Dataset repository, ``"owner/name"`` or ``"name"``.
        card_dir: Folder with README.md and plots (from ``write_attribution_card``); None
            pushes the data only (``datasets`` then writes a minimal card).
        token: Hub token (None: the locally stored one).
        private: Create the repository private (an existing repository keeps its setting).
        dry_run: Stage everything and return the plan without any network call.
        staging_dir: Where to stage (default: a fresh temporary folder, kept so it can be
            inspected).
        commit_message: Commit message of the uploads.
        api: An ``huggingface_hub.HfApi``-like object (default: ``HfApi(token=token)``).

    Returns:
        The :class:`PushPlan`; ``pushed`` is True after a real push.

    Raises:
        ValueError: Malformed ``repo_id`` or an empty dataset.
        FileNotFoundError: ``card_dir`` has no README.md.
        OSError: The staging folder cannot be written.
        huggingface_hub.errors.HfHubHTTPError: An upload failed (real push only).
    """
    _check_repo_id(repo_id)
    if len(dataset) == 0:
        raise ValueError("Refusing to push an empty dataset.")
    staging = Path(staging_dir) if staging_dir is not None else \
        Path(tempfile.mkdtemp(prefix="ggda-push-"))
    staging.mkdir(parents=True, exist_ok=True)
    dataset_dir = save_dataset_atomic(dataset, staging / "dataset")
    card_path, card_files = (None, [])
    if card_dir is not None:
        card_path, card_files = _stage_card(Path(card_dir), staging)
    plan = PushPlan(repo_id=repo_id, private=private, staging_dir=staging,
                    dataset_dir=dataset_dir, card_path=card_path, card_files=card_files,
                    num_rows=len(dataset), columns=list(dataset.column_names),
                    fingerprint=dataset._fingerprint, commit_message=commit_message,
                    dry_run=dry_run)
    if dry_run:
        logger.info("Dry run: would push %d rows (%s) and %s to %s; staged in %s.",
                    plan.num_rows, plan.columns, "a card" if card_path else "no card",
                    repo_id, staging)
        return plan
    from huggingface_hub import DatasetCard, HfApi

    api = api if api is not None else HfApi(token=token)
    plan.results["create_repo"] = api.create_repo(repo_id, repo_type="dataset",
                                                  private=private, exist_ok=True, token=token)
    if card_path is not None:
        card = DatasetCard.load(card_path)
        plan.results["card"] = card.push_to_hub(repo_id, token=token, repo_type="dataset",
                                                commit_message=f"{commit_message} (card)")
        for name in card_files:
            plan.results[name] = api.upload_file(
                path_or_fileobj=str(card_path.parent / name), path_in_repo=name,
                repo_id=repo_id, repo_type="dataset", token=token,
                commit_message=f"{commit_message} ({name})")
    staged = Dataset.load_from_disk(str(dataset_dir))  # upload exactly what was staged
    plan.results["dataset"] = staged.push_to_hub(repo_id, private=private, token=token,
                                                 commit_message=commit_message)
    plan.pushed = True
    logger.info("Pushed %d rows to https://huggingface.co/datasets/%s.", plan.num_rows, repo_id)
    return plan
