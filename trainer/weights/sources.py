"""Where timm's loader finds a model's pretrained weights, and the three things done with that
place: fill it (fetch, online), find it (offline) and load from it (offline).

timm (`timm.models._builder._resolve_pretrained_source`) loads from the Hugging Face hub when the
pretrained cfg names a repo (`hf_hub_id`, optionally `@revision`), else from the cfg's URL through
torch hub's cache. From a repo it takes `hf_hub_filename` if set (default pytorch_model.bin), but
its safetensors twin first (`timm.models._hub.load_state_dict_from_hf`); the lookup here uses
timm's own helpers for that order, so fetch downloads the file verify (and training) will read.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import huggingface_hub.constants as hub
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

from trainer.config import ConfigError

DEFAULT_FILENAME = "pytorch_model.bin"
"""timm's default `filename` for a repo without `hf_hub_filename`."""
CONFIG_FILENAME = "config.json"
"""The repo's model card config: fetched for people and tools; timm does not read it for a
registered model name, so verify does not ask for it."""
FETCH_HINT = "run python -m trainer.weights fetch with the same arguments where there is internet"


class WeightsError(Exception):
    """One model's weights are not where timm looks, or do not load, in one line."""


@dataclass(frozen=True)
class Source:
    name: str
    repo_id: str | None = None
    revision: str | None = None
    filenames: tuple[str, ...] = ()
    """Candidates in the order timm's loader tries them (safetensors first)."""
    url: str | None = None
    """Only for weights timm knows no hub repo for."""


def source_of(name: str) -> Source:
    """From timm's pretrained cfg for the name (its tag, or the default tag). ConfigError when the
    name cannot load pretrained weights at all: that is the config's mistake, found before any
    download starts."""
    import timm  # noqa: PLC0415 - heavy; after the configs parsed
    from timm.models._hub import _get_safe_alternatives, hf_split  # noqa: PLC0415

    if not timm.is_model(name):
        raise ConfigError(f"model.name: {name!r} is not a timm model")
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except RuntimeError as err:  # "Invalid pretrained tag (x) for resnet50."
        raise ConfigError(f"model.name: {name!r}: {err}") from None
    if cfg is not None and cfg.hf_hub_id:
        repo_id, revision = hf_split(cfg.hf_hub_id)
        filename = cfg.hf_hub_filename or DEFAULT_FILENAME
        candidates = (filename,) if filename.endswith(".safetensors") else \
            (*_get_safe_alternatives(filename), filename)
        return Source(name, repo_id, revision, candidates)
    if cfg is not None and cfg.url:
        return Source(name, url=cfg.url)
    raise ConfigError(f"model.name: timm has no pretrained weights for {name!r} "
                      "(set model.pretrained: false, or model.weights=FILE)")


def fetch(source: Source) -> Path:
    """Download into the cache timm reads (nothing is downloaded twice); WeightsError names why not."""
    try:
        if source.url:
            return _fetch_url(source.url)
        path = _hub_file(source, local_only=False)
        with contextlib.suppress(OSError, EntryNotFoundError):
            hf_hub_download(source.repo_id, CONFIG_FILENAME, revision=source.revision)
        return path
    except WeightsError:
        raise
    except Exception as err:  # one model's failure (network, gated repo, disk) must not hide the others'
        hint = " (HF_HUB_OFFLINE is set: unset it where there is internet)" if hub.HF_HUB_OFFLINE else ""
        raise WeightsError(f"download failed{hint}: {_one_line(err)}") from None


def locate(source: Source) -> Path:
    """The cached file timm will read, without touching the network."""
    if source.url:
        path = url_cache_path(source.url)
        if not path.is_file():
            raise WeightsError(f"not in the torch hub cache ({path}); {FETCH_HINT}")
        return path
    with offline():
        return _hub_file(source, local_only=True)


def check_loads(name: str) -> None:
    """`timm.create_model(name, pretrained=True)` with the hub offline, on the meta device: timm
    resolves and reads the cached file exactly as training will, applies its checkpoint filter and
    loads it strictly (the default head: every key and shape must match). The model's own
    parameters take no memory and no time to initialize; only the file's tensors are read (onto
    the CPU, then dropped), so ViT-L costs its 1.2 GB for a moment, not a model build."""
    import timm  # noqa: PLC0415
    import torch  # noqa: PLC0415

    try:
        with offline(), warnings.catch_warnings(), torch.device("meta"):
            warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter")
            timm.create_model(name, pretrained=True)
    except Exception as err:  # whatever stops it here stops the training run on the node
        raise WeightsError(f"cached but does not load: {_one_line(err)}") from None


def url_cache_path(url: str) -> Path:
    """Where torch.hub.load_state_dict_from_url (timm's loader for URL weights) looks first."""
    import torch  # noqa: PLC0415

    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """The hub as a compute node sees it, whatever HF_HUB_OFFLINE says here."""
    saved = hub.HF_HUB_OFFLINE
    hub.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = saved


def _hub_file(source: Source, local_only: bool) -> Path:
    for filename in source.filenames:
        try:
            return Path(hf_hub_download(source.repo_id, filename, revision=source.revision,
                                        local_files_only=local_only))
        except LocalEntryNotFoundError:  # an EntryNotFoundError too: not cached, or no connection
            if not local_only:
                raise
        except EntryNotFoundError:  # the repo has no such file: the next candidate, as timm does
            continue
    files = ", ".join(source.filenames)
    if local_only:
        raise WeightsError(f"not in the Hugging Face cache {hub.HF_HUB_CACHE} "
                           f"({source.repo_id}: {files}); {FETCH_HINT}")
    raise WeightsError(f"{source.repo_id} has none of {files}")


def _fetch_url(url: str) -> Path:
    import torch  # noqa: PLC0415

    path = url_cache_path(url)
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        match = torch.hub.HASH_REGEX.search(path.name)  # resnet10t_176_c3-f3215ab1.pth: a sha256 prefix
        torch.hub.download_url_to_file(url, str(path), match.group(1) if match else None, progress=False)
    return path


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__
