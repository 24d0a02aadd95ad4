"""LoRA files from the Hugging Face Hub: list a repo's `.safetensors` files and download one.

Calls act as the visitor: `token` is the visitor's token or None. None means anonymous (`token=False` to
huggingface_hub), so a Space never reads a private or gated repo with its owner's own token.
Every Hub failure becomes a one-line `LoraError`: `hub_errors` (the one mapping of huggingface_hub's errors,
`HUB_ERRORS`) serves these reads and `lora_ops.hub`'s pushes.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    HTTPError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

from lora_ops.errors import LoraError
from lora_ops.page_text import size as page_size
from lora_ops.scales import PEFT_CONFIG_NAME
from lora_ops.sizes import format_size

SUFFIX = ".safetensors"
# Seconds the Hub gets to accept a connection and to send each part of its answer, for the one request (model_info:
# a plain GET without retries) that resolves a repo's commit before a listing or a download. The listing
# (`list_repo_tree`, through `http_backoff`) and the download (`hf_hub_download`) retry a refused or dropped
# connection 5 times, waiting 1 + 2 + 4 + 8 + 8 s: 23 s before an unreachable Hub is reported. Resolving the commit
# first reports it at once, and bounds a Hub that never answers, without changing huggingface_hub's settings
# for the rest of the process.
HUB_TIMEOUT = 5.0

# huggingface_hub's errors -> our one-line messages, for reading (listing, downloading) and for pushing alike.
# Most specific first: the first row whose class the error is an instance of, and whose HTTP status (int) or
# text fragment (str) it has where the row names one, gives the message. Placeholders: {action} (what we were
# doing, e.g. "download x.safetensors from owner/name"), {repo}, {file}, {status}, {access} ("read" or
# "write"), {retry} and {detail} (a local OS error's reason, e.g. "No space left on device"; never the error's
# own text, which may hold a request's URL).
HUB_ERRORS: tuple[tuple[type[BaseException], int | str | None, str], ...] = (
    (OfflineModeIsEnabled, None, "cannot reach the Hub to {action}: this machine is offline (HF_HUB_OFFLINE is set)"),
    (GatedRepoError, None, "{repo} is gated: sign in with an account that accepted its conditions on huggingface.co"),
    (
        RepositoryNotFoundError,
        None,
        "no Hub model repo {repo} (if it is private, sign in with an account that can read it)",
    ),
    (RevisionNotFoundError, None, "{repo} has no such revision"),
    (EntryNotFoundError, None, "{repo} has no file {file}"),
    (HfHubHTTPError, 401, "the Hub refused your token while trying to {action} (HTTP 401): sign in again"),
    (
        HfHubHTTPError,
        403,
        "your token may not {action} (HTTP 403): it needs {access} access; sign in again granting {access} access"
        " to your repos, or use a {access} token",
    ),
    (HfHubHTTPError, None, "the Hub failed to {action} (HTTP {status}); {retry}"),
    (HTTPError, None, "network failure while trying to {action}: could not reach the Hub; try again"),
    (ValueError, "Invalid metadata in README.md", "the Hub rejected the model card's metadata; nothing was published"),
    (OSError, None, "cannot {action}: {detail}"),
)


def _hub_error_message(exc: BaseException, **fields: str) -> str | None:
    """The `HUB_ERRORS` message for `exc` with `fields` filled in; None when no row matches."""
    status = getattr(getattr(exc, "response", None), "status_code", None)
    for kind, condition, template in HUB_ERRORS:
        if isinstance(exc, kind) and (
            condition is None or condition == status or (isinstance(condition, str) and condition in str(exc))
        ):
            return template.format(status=status, detail=getattr(exc, "strerror", None) or type(exc).__name__, **fields)
    return None


@contextmanager
def hub_errors(action: str, repo: str = "", file: str = "", *, write: bool = False) -> Iterator[None]:
    """Turn huggingface_hub and network errors raised inside into one-line `LoraError`s (see `HUB_ERRORS`).

    `action` completes "while trying to ..."; `write` is True for the steps of a push (messages then ask for
    write access and say that nothing was published). The original error is not chained, so request
    details never reach a log or a page. Other errors, `LoraError`s included, pass through.
    """
    try:
        yield
    except LoraError:
        raise
    except Exception as exc:
        message = _hub_error_message(
            exc,
            action=action,
            repo=repo,
            file=file,
            access="write" if write else "read",
            retry="nothing was published, try again later" if write else "try again later",
        )
        if message is None:
            raise
        raise LoraError(message) from None


@dataclass(frozen=True)
class HubFile:
    """One `.safetensors` file of a Hub repo; `size` in bytes (None when the Hub does not say)."""

    path: str
    size: int | None

    @property
    def label(self) -> str:
        return self.path if self.size is None else f"{self.path} · {page_size(self.size)}"


def _checked_repo_id(repo_id: str) -> str:
    repo_id = repo_id.strip()
    if not repo_id:
        raise LoraError("no Hub repo given: enter an id like owner/name")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise LoraError(f"{repo_id!r} is not a valid Hub repo id (expected owner/name)") from exc
    if "/" not in repo_id:
        raise LoraError(f"{repo_id!r} is not a valid Hub repo id (expected owner/name)")
    return repo_id


def _checked_file_name(repo_id: str, filename: str) -> str:
    """A file path inside a repo as the Hub writes them: ``/``-separated, relative, without ``.`` or ``..`` parts."""
    filename = filename.strip()
    if filename.startswith("/") or "\\" in filename or {"", ".", ".."} & set(filename.split("/")):
        raise LoraError(f"{repo_id} has no file {filename!r}: give a path inside the repo, like dir/lora.safetensors")
    return filename


def _commit(api: HfApi, repo_id: str, token: str | None) -> str:
    """The commit `main` of model repo `repo_id` points to, read in one request without retries that fails within
    `HUB_TIMEOUT` seconds when the Hub cannot be reached (huggingface_hub's errors pass through)."""
    return api.model_info(repo_id, token=token or False, timeout=HUB_TIMEOUT).sha


def list_lora_files(repo_id: str, token: str | None = None) -> list[HubFile]:
    """The `.safetensors` files of model repo `repo_id` (recursively, at the commit `main` points to), sorted by
    path. An unreachable Hub is a `LoraError` within `HUB_TIMEOUT` seconds."""
    repo_id = _checked_repo_id(repo_id)
    with hub_errors(f"list the files of {repo_id}", repo_id):
        api = HfApi()
        revision = _commit(api, repo_id, token)
        entries = list(api.list_repo_tree(repo_id, revision=revision, recursive=True, token=token or False))
    files = sorted(
        (HubFile(entry.path, getattr(entry, "size", None)) for entry in entries if entry.path.endswith(SUFFIX)),
        key=lambda hub_file: hub_file.path,
    )
    if not files:
        raise LoraError(f"{repo_id} has no {SUFFIX} files")
    return files


def repo_license(repo_id: str, token: str | None = None) -> str | None:
    """The license id in a Hub model repo's card metadata (e.g. "apache-2.0"); None when the repo has none or
    cannot be read: the license is carried over where known, and never blocks anything."""
    try:
        card = HfApi().model_info(_checked_repo_id(repo_id), token=token or False, timeout=HUB_TIMEOUT).card_data
    except (LoraError, HTTPError, OSError):
        return None
    license_id = getattr(card, "license", None)
    return license_id if isinstance(license_id, str) else None


def download_lora(
    repo_id: str, filename: str, directory: str | Path, token: str | None = None, max_bytes: int | None = None
) -> Path:
    """Download `filename` of model repo `repo_id` into `directory` and return its local path.

    Refuses names that are not `.safetensors` and, before downloading, files larger than `max_bytes`. The commit
    `main` points to is resolved first, once (an unreachable Hub is a `LoraError` within `HUB_TIMEOUT` seconds),
    and both the size check and the download read that commit, so a push between them cannot slip a larger file
    past the check.
    """
    repo_id = _checked_repo_id(repo_id)
    filename = _checked_file_name(repo_id, filename)
    if not filename.endswith(SUFFIX):
        raise LoraError(f"pick a {SUFFIX} file of {repo_id}, not {filename!r}")
    try:
        with hub_errors(f"download {filename} from {repo_id}", repo_id, filename):
            api = HfApi()
            revision = _commit(api, repo_id, token)
            if max_bytes is not None:
                infos = api.get_paths_info(repo_id, [filename], revision=revision, token=token or False)
                size = next((getattr(info, "size", None) for info in infos), None)
                if size is None and not infos:
                    raise LoraError(f"{repo_id} has no file {filename}")
                if size is not None and size > max_bytes:
                    raise LoraError(
                        f"{filename} is {format_size(size)}, over this app's {format_size(max_bytes)} limit"
                    )
            local = hf_hub_download(
                repo_id,
                filename,
                revision=revision,
                local_dir=directory,
                token=token or False,
                etag_timeout=HUB_TIMEOUT,
            )
    finally:
        shutil.rmtree(Path(directory) / ".cache", ignore_errors=True)  # huggingface_hub's download bookkeeping
    return Path(local)


def download_peft_config(repo_id: str, filename: str, directory: str | Path, token: str | None = None) -> Path | None:
    """The PEFT `adapter_config.json` beside `filename` in model repo `repo_id` (PEFT saves it in the adapter's
    folder), downloaded into `directory`; None when the repo has none there."""
    repo_id = _checked_repo_id(repo_id)
    parent = str(Path(_checked_file_name(repo_id, filename)).parent)
    config = PEFT_CONFIG_NAME if parent == "." else f"{parent}/{PEFT_CONFIG_NAME}"
    try:
        with hub_errors(f"download {config} from {repo_id}", repo_id, config):
            revision = _commit(HfApi(), repo_id, token)  # fails fast offline, where a missing file would look absent
            try:
                return Path(
                    hf_hub_download(
                        repo_id,
                        config,
                        revision=revision,
                        local_dir=directory,
                        token=token or False,
                        etag_timeout=HUB_TIMEOUT,
                    )
                )
            except EntryNotFoundError:
                return None
    finally:
        shutil.rmtree(Path(directory) / ".cache", ignore_errors=True)  # huggingface_hub's download bookkeeping
