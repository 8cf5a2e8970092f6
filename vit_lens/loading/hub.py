"""Downloads the source libraries make: fail fast, naming the file and the fix, when one cannot succeed.

open_clip, timm and transformers fetch weights from the Hugging Face Hub (or a plain URL) on
first use. Without a network they retry for about half a minute and then raise an error that
names neither the model nor the file; with ``HF_HUB_OFFLINE=1`` they fail at once, still without
saying what was missing. :func:`check_downloads` runs before the library call: a file that is
in the local cache is fine; one that is not raises :class:`HubUnavailableError` at once when the
hub is offline or its host cannot be reached within two seconds.
"""

import os
import socket
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import urlparse

PROBE_TIMEOUT_S = 2.0

_NO_NETWORK_FIX = (
    "pass a local checkpoint file instead (pretrained='path/to/file'), and set HF_HUB_OFFLINE=1 so that "
    "hub libraries read only their local cache instead of retrying"
)


class HubUnavailableError(OSError):
    """A file a model needs is not in the local cache and cannot be downloaded now."""


@dataclass(frozen=True)
class Download:
    """A file a source library will fetch: one of ``filenames`` from the hub ``repo``, or ``url``.

    Attributes:
        repo: Hugging Face Hub repository id (``"timm/vit_base_patch16_224.augreg_in21k"``).
        filenames: Names the library accepts from ``repo``, in the order it tries them (any one
            of them cached is enough).
        revision: Hub revision, if the library pins one.
        url: A plain URL the library downloads with urllib (open_clip's OpenAI weights).
        cached_path: Where the library keeps the file downloaded from ``url``.
    """

    repo: str | None = None
    filenames: tuple[str, ...] = ()
    revision: str | None = None
    url: str | None = None
    cached_path: str | None = None

    def describe(self) -> str:
        if self.repo is not None:
            names = " or ".join(self.filenames)
            return f"{names} from the Hugging Face Hub repository {self.repo}"
        return f"{self.url} (cached as {self.cached_path})"

    def host(self) -> str:
        """The URL whose host serves this file."""
        return hub_endpoint() if self.repo is not None else str(self.url)

    def is_cached(self, cache_dir: str | os.PathLike | None = None) -> bool:
        if self.repo is None:
            return self.cached_path is not None and os.path.isfile(self.cached_path)
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            return False
        return any(
            isinstance(try_to_load_from_cache(self.repo, name, cache_dir=cache_dir, revision=self.revision), str)
            for name in self.filenames
        )


def hub_offline() -> bool:
    """Whether the hub libraries are in offline mode (``HF_HUB_OFFLINE``), as huggingface_hub reads it."""
    try:
        from huggingface_hub import constants
    except ImportError:
        return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    return bool(constants.HF_HUB_OFFLINE)


def hub_endpoint() -> str:
    """The hub URL the libraries use (``HF_ENDPOINT``, default https://huggingface.co)."""
    try:
        from huggingface_hub import constants
    except ImportError:
        return os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    return constants.ENDPOINT


def unreachable_reason(url: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """None when a TCP connection to ``url``'s host opens within ``timeout`` seconds, else why not."""
    parts = urlparse(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname, port), timeout=timeout):
            return None
    except OSError as error:
        return str(error) or type(error).__name__


def check_downloads(
    model: str, downloads: Sequence[Download], cache_dir: str | os.PathLike | None = None
) -> bool:
    """Raise :class:`HubUnavailableError` if a download ``model`` needs cannot succeed now.

    Args:
        model: What is being loaded, for the message (``"timm:vit_base_patch16_224 (pretrained=True)"``).
        downloads: The files the library will fetch.
        cache_dir: The library's ``cache_dir`` argument, if one was given.

    Returns:
        True when every file is cached but the hub cannot be reached: the caller should run the
        library under :func:`hub_offline_mode` so that it reads its cache without retrying.
    """
    missing = [d for d in downloads if not d.is_cached(cache_dir)]
    if missing:
        from_hub = [d for d in missing if d.repo is not None]
        if from_hub and hub_offline():
            raise HubUnavailableError(
                f"{model} needs {from_hub[0].describe()}, which is not in the local cache, and HF_HUB_OFFLINE=1 "
                "forbids downloading it: run once with network access and without HF_HUB_OFFLINE to cache it, or "
                "pass a local checkpoint file (pretrained='path/to/file')."
            )
        for download in missing:
            reason = unreachable_reason(download.host())
            if reason is not None:
                raise HubUnavailableError(
                    f"{model} needs {download.describe()}, which is not in the local cache, and "
                    f"{urlparse(download.host()).hostname} cannot be reached ({reason}): {_NO_NETWORK_FIX}."
                )
        return False
    uses_hub = any(d.repo is not None for d in downloads)
    return uses_hub and not hub_offline() and unreachable_reason(hub_endpoint()) is not None


@contextmanager
def hub_offline_mode(active: bool = True) -> Iterator[None]:
    """Run hub libraries in offline mode for the duration of the block (when ``active``).

    huggingface_hub reads ``constants.HF_HUB_OFFLINE`` at each request, so setting it here makes
    a library that finds its files cached skip the network instead of retrying an unreachable host.
    """
    if not active:
        yield
        return
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before
