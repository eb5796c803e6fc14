"""A notice and a short reachability check before anything asks the Hugging Face hub.

Without ``HF_HUB_OFFLINE`` and without a network, the hub client retries for minutes before
it gives up (over 180 s, silently, for ``train t5-lora``). :func:`before_hub_access` is called
before every hub access of the experiments (a model, a tokenizer, a data set given by hub
name): unless offline mode is set, it says on stderr what is about to be fetched from where,
then asks the endpoint (``HF_ENDPOINT``, default https://huggingface.co) for a reply within
``NGDREF_HUB_TIMEOUT`` seconds (default 5). No reply: :class:`HubUnreachableError`, naming
what was wanted and the two ways out (offline mode with the local cache, or a local path).
Any HTTP reply, an error status included, counts as reachable. One check per endpoint and
process.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request

from validation.experiments.progress import notice

__all__ = ["DEFAULT_TIMEOUT", "HubUnreachableError", "before_hub_access", "offline"]

#: seconds to wait for the hub's reply (``NGDREF_HUB_TIMEOUT`` overrides it)
DEFAULT_TIMEOUT = 5.0
_TRUE = ("1", "on", "yes", "true")
_reached: set[str] = set()


class HubUnreachableError(OSError):
    """The hub did not answer in time; the message names what was wanted and what to do."""


def offline(dataset: bool = False) -> bool:
    """Whether ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``; for a data set also
    ``HF_DATASETS_OFFLINE``) asks for the local cache only."""
    names = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", *(("HF_DATASETS_OFFLINE",) * dataset))
    return any(os.environ.get(name, "").strip().lower() in _TRUE for name in names)


def _timeout() -> float:
    text = os.environ.get("NGDREF_HUB_TIMEOUT")
    try:
        value = DEFAULT_TIMEOUT if text is None else float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"NGDREF_HUB_TIMEOUT must be a number of seconds > 0, got {text!r}")
    return value


def before_hub_access(key: str, name: str, *, dataset: bool = False) -> None:
    """Say that ``key``=``name`` comes from the hub and check that the hub answers quickly.

    Parameters
    ----------
    key : str
        The configuration key or argument that names it ("model.name", "data.source", ...).
    name : str
        The hub id.
    dataset : bool
        A data set (``HF_DATASETS_OFFLINE`` then counts as offline mode too).

    Raises
    ------
    HubUnreachableError
        No reply within the timeout (nothing was downloaded or changed).
    """
    if offline(dataset):
        return
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    if endpoint in _reached:
        return
    timeout = _timeout()
    notice(f"{key}={name!r}: asking the Hugging Face hub at {endpoint} (up to {timeout:g} s; "
           "set HF_HUB_OFFLINE=1 to use the local cache only)")
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout)
    except urllib.error.HTTPError:
        pass  # it answered
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise HubUnreachableError(
            f"{key}={name!r}: the Hugging Face hub at {endpoint} did not answer within "
            f"{timeout:g} s ({reason}); with the files in the local cache set HF_HUB_OFFLINE=1 "
            f"(and HF_DATASETS_OFFLINE=1), else set {key} to a local path"
        ) from None
    _reached.add(endpoint)
