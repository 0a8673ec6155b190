"""Checkpoint sources: short names, `gs://` and `https://` URLs, and a download cache.

Standard library only for HTTP (urllib). Downloads go to a temporary file next to the destination
and are renamed into place only after the byte count matches `Content-Length` and the file opens
as a zip archive (every `.npz` is one); a JSON sidecar `<file>.sha256.json` records the size and
SHA-256 so later corruption of the cached copy is detected.

Cache directory: the `cache_dir` argument, else `$JAX_PEFT_CACHE`, else `~/.cache/jax_peft`. A URL
`https://host/a/b.npz` is cached as `<cache>/host/a/b.npz`.

Short names (case-insensitive; `/` inside the model name may be written `_`)::

    "ViT-B_16", "ViT-B/16"                 -> gs://vit_models/imagenet21k/ViT-B_16.npz
    "imagenet21k/ViT-L_16"                 -> gs://vit_models/imagenet21k/ViT-L_16.npz
    "imagenet21k+imagenet2012/ViT-B_16"    -> gs://vit_models/imagenet21k+imagenet2012/ViT-B_16.npz
    "sam/ViT-B_16"                         -> gs://vit_models/sam/ViT-B_16.npz
    "augreg/ViT-B_16", "augreg/B_16"       -> the recommended AugReg i21k upstream file (vit_jax README)
    "augreg/<file>.npz"                    -> gs://vit_models/augreg/<file>.npz
    "SigLIP So400m/14 224", "siglip/B_16-256" -> a SigLIP two-tower file in gs://big_vision/siglip/
                                              (load_checkpoint keeps its image tower)
    "hf-hub:timm/<name>"                   -> https://huggingface.co/timm/<name>/resolve/main/model.safetensors

Swin Transformer files (see `SWIN`): Microsoft's releases by file name, with or without `.pth`
("swin_base_patch4_window7_224_22k.pth", a local file of that name wins), and timm's Hugging Face
files as "timm/<model>.<tag>" (e.g. "timm/swin_base_patch4_window7_224.ms_in22k" -> its
model.safetensors). `.safetensors` downloads are checked by their header instead of as a zip.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import http.client
import json
import os
import re
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path

GCS_HTTPS = "https://storage.googleapis.com/"
ENV_CACHE = "JAX_PEFT_CACHE"
DEFAULT_CACHE = "~/.cache/jax_peft"
SIDECAR_SUFFIX = ".sha256.json"

# Files in gs://vit_models/<dir>/ (checkpoints.md section 6).
VIT_MODELS: dict[str, tuple[str, ...]] = {
    "imagenet21k": ("ViT-B_16", "ViT-B_32", "ViT-B_8", "ViT-L_16", "ViT-L_32", "ViT-H_14",
                    "R50+ViT-B_16", "R26+ViT-B_32", "R50+ViT-L_32"),
    "imagenet21k+imagenet2012": ("ViT-B_16", "ViT-B_32", "ViT-B_8", "ViT-L_16", "ViT-L_32",
                                 "R50+ViT-B_16", "ViT-B_16-224", "ViT-L_16-224"),
    "sam": ("ViT-B_16", "ViT-B_32", "ViT-L_16", "ViT-L_32", "ViT-S_16"),
}

# Recommended AugReg upstream (ImageNet-21k) checkpoints, from the vit_jax README table; B_8 is not
# in that table and uses the file timm's `vit_base_patch8_224.augreg_in21k` points to.
AUGREG: dict[str, str] = {
    "Ti_16": "Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0.npz",
    "S_16": "S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0.npz",
    "S_32": "S_32-i21k-300ep-lr_0.001-aug_none-wd_0.1-do_0.0-sd_0.0.npz",
    "B_16": "B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz",
    "B_32": "B_32-i21k-300ep-lr_0.001-aug_light1-wd_0.1-do_0.0-sd_0.0.npz",
    "B_8": "B_8-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz",
    "L_16": "L_16-i21k-300ep-lr_0.001-aug_strong1-wd_0.1-do_0.0-sd_0.0.npz",
    "R_Ti_16": "R_Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0.npz",
    "R26_S_32": "R26_S_32-i21k-300ep-lr_0.001-aug_light1-wd_0.1-do_0.0-sd_0.0.npz",
    "R50_L_32": "R50_L_32-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.1-sd_0.1.npz",
}


# Microsoft's released Swin files (github.com/microsoft/Swin-Transformer, release v1.0.0), in their
# layout (merging at the end of each stage, head `head`); "_22k" = ImageNet-22k heads (21841 classes).
SWIN_RELEASE = "https://github.com/SwinTransformer/storage/releases/download/v1.0.0/"
SWIN: tuple[str, ...] = (
    "swin_tiny_patch4_window7_224", "swin_small_patch4_window7_224",
    "swin_base_patch4_window7_224_22k", "swin_base_patch4_window7_224_22kto1k",
    "swin_base_patch4_window12_384_22k", "swin_base_patch4_window12_384_22kto1k",
    "swin_large_patch4_window7_224_22k", "swin_large_patch4_window7_224_22kto1k",
    "swin_large_patch4_window12_384_22k", "swin_large_patch4_window12_384_22kto1k",
)
_TIMM_HUB = re.compile(r"timm/(swin_[a-z0-9_]+\.[a-z0-9_]+)", re.IGNORECASE)

# Public SigLIP checkpoints (big_vision's SigLIP demo colab and its vit.py VANITY_NAMES):
# (image tower, resolution) -> file in gs://big_vision/siglip/. Image towers use pool_type="map".
SIGLIP: dict[tuple[str, int], str] = {
    ("B/16", 224): "webli_en_b16_224_63724782.npz",
    ("B/16", 256): "webli_en_b16_256_60500360.npz",
    ("B/16", 384): "webli_en_b16_384_68578854.npz",
    ("B/16", 512): "webli_en_b16_512_68580893.npz",
    ("L/16", 256): "webli_en_l16_256_60552751.npz",
    ("L/16", 384): "webli_en_l16_384_63634585.npz",
    ("So400m/14", 224): "webli_en_so400m_224_57633886.npz",
    ("So400m/14", 384): "webli_en_so400m_384_58765454.npz",
    ("B/16-i18n", 256): "webli_i18n_b16_256_66117334.npz",
}
HF_HUB = "https://huggingface.co/"


class DownloadError(OSError):
    """A checkpoint could not be fetched (network, HTTP status, truncated transfer).

    `url`, `dest` (the cache file it was going to) and `reason` (one line) let a caller word its own
    fix, as the training CLI does (`--config.model.checkpoint=PATH`)."""

    def __init__(self, message: str, *, url: str | None = None, dest: str | os.PathLike | None = None,
                 reason: str | None = None):
        super().__init__(message)
        self.url, self.dest, self.reason = url, None if dest is None else Path(dest), reason


def _manual_hint(url: str) -> str:
    return (f"Download it manually (e.g. `curl -L -o {Path(urllib.parse.urlparse(url).path).name} {url}`) "
            "and pass the local path to load_checkpoint instead.")


def gs_to_https(url: str) -> str:
    """`gs://bucket/path` -> `https://storage.googleapis.com/bucket/path` (public buckets only)."""
    if not url.startswith("gs://"):
        return url
    rest = url[len("gs://"):]
    if "/" not in rest.strip("/"):
        raise ValueError(f"{url!r} names a bucket, not a file; use gs://bucket/path/to/file.npz")
    return GCS_HTTPS + rest


def known_names() -> list[str]:
    """Every short name `resolve_name` accepts (besides `augreg/<file>.npz`)."""
    names = list(VIT_MODELS["imagenet21k"])
    names += [f"{d}/{m}" for d, models in VIT_MODELS.items() for m in models]
    names += [f"augreg/{m}" for m in AUGREG]
    names += [f"{m}.pth" for m in SWIN] + ["timm/swin_base_patch4_window7_224.ms_in22k"]
    names += siglip_names()
    return names


def siglip_names() -> list[str]:
    return [f"SigLIP {v} {r}" for v, r in SIGLIP]


def _resolve_siglip(name: str) -> str | None:
    """URL of a SigLIP short name in any spelling ('SigLIP So400m/14 224', 'siglip/so400m_14-224')."""
    key = re.sub(r"[^a-z0-9]", "", name.lower())
    if not key.startswith("siglip") or name.lower().endswith((".npz", ".safetensors", ".pth", ".bin")):
        return None
    for (variant, res), file in SIGLIP.items():
        if key == re.sub(r"[^a-z0-9]", "", f"siglip{variant}{res}".lower()):
            return f"{GCS_HTTPS}big_vision/siglip/{file}"
    raise ValueError(f"unknown SigLIP checkpoint {name!r}; known: {', '.join(siglip_names())} "
                     "(image tower and resolution in pixels)")


def hf_hub_url(name: str) -> str | None:
    """`hf-hub:<org>/<repo>` -> the Hub's download URL of the repository's `model.safetensors`
    (as timm's `hf-hub:` names); None for other strings."""
    if not name.startswith("hf-hub:"):
        return None
    repo = name[len("hf-hub:"):].strip("/")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise ValueError(f"{name!r} is not a Hub model name; write hf-hub:<org>/<repo>, e.g. "
                         "hf-hub:timm/vit_base_patch16_224.augreg2_in21k_ft_in1k")
    return f"{HF_HUB}{repo}/resolve/main/model.safetensors"


def _fold(name: str) -> str:
    """Case-, separator- and 'ViT-'-insensitive form of a model name: 'ViT-B/16' -> 'b_16'."""
    return re.sub(r"^vit[-_]", "", name.lower().replace("/", "_").replace("+", "_"))


def resolve_name(name: str) -> str | None:
    """The https URL of a short checkpoint name, or None if `name` is not a known short name."""
    s = name.strip()
    swin = s[:-4] if s.lower().endswith(".pth") else s
    if swin.lower() in SWIN:
        return f"{SWIN_RELEASE}{swin.lower()}.pth"
    if _TIMM_HUB.fullmatch(s):
        return f"https://huggingface.co/{s}/resolve/main/model.safetensors"
    url = hf_hub_url(s) or _resolve_siglip(s)
    if url is not None:
        return url
    is_file = s.lower().endswith(".npz")
    base = s[:-4] if is_file else s
    directory, _, model = base.partition("/")
    directory = directory.lower()
    if directory not in VIT_MODELS and directory != "augreg":  # bare model name: ImageNet-21k file
        if is_file:  # "ViT-B_16.npz" is a (missing) local file, not a name
            return None
        directory, model = "imagenet21k", base
    if directory == "augreg":
        for short, file in AUGREG.items():
            if _fold(short) == _fold(model):
                return f"{GCS_HTTPS}vit_models/augreg/{file}"
        return f"{GCS_HTTPS}vit_models/augreg/{model}.npz" if is_file and "/" not in model else None
    for m in VIT_MODELS[directory]:
        if _fold(m) == _fold(model):
            return f"{GCS_HTTPS}vit_models/{directory}/{m}.npz"
    return None


def resolve(path_or_url: str | os.PathLike) -> tuple[str, str]:
    """Classifies a checkpoint source: ("file", local path) or ("url", https URL).

    Raises FileNotFoundError for a path-like string that does not exist and ValueError for an
    unknown short name.
    """
    s = os.fspath(path_or_url)
    local = os.path.expanduser(s)
    if os.path.exists(local):
        return "file", local
    if s.startswith("gs://"):
        return "url", gs_to_https(s)
    if re.match(r"(?i)^https?://", s):
        return "url", s
    url = resolve_name(s)
    if url is not None:
        return "url", url
    examples = "'ViT-B_16', 'imagenet21k/ViT-L_16', 'imagenet21k+imagenet2012/ViT-B_16', 'augreg/B_16'"
    if s.lower().endswith((".npz", ".safetensors", ".pth", ".bin")) or os.sep in s or s.startswith((".", "~")):
        raise FileNotFoundError(
            f"checkpoint file {s!r} does not exist. Pass an existing .npz path, an https:// or gs:// URL, "
            f"or a known name such as {examples}."
        )
    close = difflib.get_close_matches(s, known_names(), n=3, cutoff=0.6)
    guess = f"Did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    raise ValueError(
        f"unknown checkpoint name {s!r}. {guess}Known names: {', '.join(known_names())}; "
        "also 'augreg/<file>.npz', https:// and gs:// URLs, and local .npz paths "
        "(Ti and S models exist only under augreg/ and sam/)."
    )


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The download cache directory (argument, else $JAX_PEFT_CACHE, else ~/.cache/jax_peft)."""
    root = cache_dir if cache_dir is not None else os.environ.get(ENV_CACHE) or DEFAULT_CACHE
    return Path(os.path.expanduser(os.fspath(root)))


def cache_path(url: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where `url` is cached: `<cache>/<host>/<path>` (a short hash is added for query strings)."""
    parsed = urllib.parse.urlparse(gs_to_https(url))
    host = re.sub(r"[^A-Za-z0-9.+-]", "_", parsed.netloc) or "local"
    parts = [p for p in urllib.parse.unquote(parsed.path).split("/") if p not in ("", ".", "..")]
    if not parts:
        raise ValueError(f"URL {url!r} has no file name; point it at a .npz file")
    if parsed.query:
        digest = hashlib.sha256(parsed.query.encode()).hexdigest()[:8]
        parts[-1] = f"{parts[-1]}.{digest}"
    return cache_root(cache_dir).joinpath(host, *parts)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def check_zip(path: str | os.PathLike, what: str | None = None) -> None:
    """Raises ValueError unless `path` is a complete zip archive (the container of every .npz)."""
    what = what or str(path)
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:2] != b"PK":
        kind = "an HTML page" if head.lstrip()[:1] == b"<" else "a single .npy array" \
            if head == b"\x93NUM" else f"not a zip archive (starts with {head!r})"
        raise ValueError(
            f"{what} is not a .npz checkpoint: it is {kind}. Pass a .npz file written by numpy.savez "
            "(the Google ViT checkpoints are), or download the file again."
        )
    try:
        with zipfile.ZipFile(path) as z:
            z.infolist()
    except zipfile.BadZipFile as e:
        raise ValueError(
            f"{what} is a truncated or corrupted .npz archive ({e}). Delete it and download it again."
        ) from None


def check_safetensors(path: str | os.PathLike, what: str | None = None) -> None:
    """Raises ValueError unless `path` is a complete `.safetensors` file (a little-endian u64 header
    length, a JSON header, then data reaching every tensor's end offset)."""
    what = what or str(path)
    size = os.path.getsize(path)
    fix = "Delete it and download it again."
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n <= 0 or 8 + n > size:
            kind = "an HTML page" if head.lstrip()[:1] == b"<" else "truncated or not a .safetensors file"
            raise ValueError(f"{what} is {kind}. {fix}")
        try:
            header = json.loads(f.read(n))
            end = max([int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"], default=0)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{what} has an unreadable .safetensors header ({e}). {fix}") from None
    if 8 + n + end > size:
        raise ValueError(f"{what} is a truncated .safetensors file ({size} bytes, its header needs "
                         f"{8 + n + end}). {fix}")


def check_file(path: str | os.PathLike, what: str | None = None, *, name: str | None = None) -> None:
    """The completeness check for a checkpoint file, by the suffix of `name` (default: the path):
    `.safetensors` headers and data, zip archives otherwise (`.npz`, and `.pth` written by torch.save)."""
    suffix = Path(name or os.fspath(path)).suffix
    if suffix == ".safetensors":
        check_safetensors(path, what)
    elif suffix != ".json":
        check_zip(path, what)


def public_mode(fd: int) -> None:
    """Gives a mkstemp file (created 0600) the mode a normal open() would: 0666 minus the umask."""
    mask = os.umask(0o022)
    os.umask(mask)
    os.fchmod(fd, 0o666 & ~mask)


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + SIDECAR_SUFFIX)


def _write_sidecar(path: Path, url: str | None, size: int, digest: str) -> None:
    record = {"url": url, "size": size, "sha256": digest}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    public_mode(fd)
    with os.fdopen(fd, "w") as f:
        json.dump(record, f)
    os.replace(tmp, _sidecar(path))


def verify_cached(path: str | os.PathLike, *, full: bool = True, url: str | None = None) -> None:
    """Checks a cached file against its sidecar (size always, SHA-256 when `full`).

    A file without a sidecar (e.g. copied in by hand) must open as a zip; its sidecar is then written.
    """
    path = Path(path)
    side = _sidecar(path)
    fix = (f"Delete {path} (and {side.name}) or pass force_download=True to load_checkpoint to fetch "
           "it again.")
    if not side.exists():
        check_file(path, f"cached file {path}")
        _write_sidecar(path, url, path.stat().st_size, sha256_file(path))
        return
    try:
        record = json.loads(side.read_text())
        size, digest = int(record["size"]), str(record["sha256"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"unreadable cache record {side} ({e}). {fix}") from None
    actual = path.stat().st_size
    if actual != size:
        raise ValueError(f"cached file {path} is corrupted: {actual} bytes, {size} when downloaded. {fix}")
    if full and sha256_file(path) != digest:
        raise ValueError(f"cached file {path} is corrupted: its SHA-256 differs from the one recorded "
                         f"at download. {fix}")


@contextlib.contextmanager
def _progress(total: int | None, desc: str, enabled: bool) -> Iterator:
    try:
        from tqdm.auto import tqdm
    except ImportError:  # progress bars are optional
        enabled = False
    if not enabled:
        class _Null:
            def update(self, n: int) -> None:
                pass
        yield _Null()
        return
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc) as bar:
        yield bar


def download(url: str, dest: str | os.PathLike, *, progress: bool = True, timeout: float = 60.0) -> Path:
    """Downloads `url` to `dest` atomically (temp file + rename), checks it, writes the sidecar."""
    url = gs_to_https(url)
    dest = Path(dest)
    request = urllib.request.Request(url, headers={"User-Agent": "jax_peft"})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        extra = " (bucket paths are case-sensitive, e.g. 'imagenet21k', not 'imagenet21K')" \
            if e.code == 404 else ""
        raise DownloadError(f"cannot download {url}: HTTP {e.code} {e.reason}{extra}. {_manual_hint(url)}",
                            url=url, dest=dest, reason=f"HTTP {e.code} {e.reason}{extra}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise DownloadError(f"cannot download {url}: {reason}. Check the URL and the network. "
                            f"{_manual_hint(url)}", url=url, dest=dest, reason=str(reason)) from None
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError:
        response.close()
        raise
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".", suffix=".part")
    public_mode(fd)
    received = 0
    digest = hashlib.sha256()
    try:
        with response:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            with os.fdopen(fd, "wb") as f, _progress(total, dest.name, progress) as bar:
                try:
                    while True:
                        chunk = response.read(1 << 20)
                        if not chunk:
                            break
                        f.write(chunk)
                        digest.update(chunk)
                        received += len(chunk)
                        bar.update(len(chunk))
                except (OSError, http.client.HTTPException) as e:
                    raise DownloadError(f"download of {url} was interrupted after {received} bytes ({e}). "
                                        f"Try again. {_manual_hint(url)}", url=url, dest=dest,
                                        reason=f"interrupted after {received} bytes") from None
        if total is not None and received != total:
            raise DownloadError(f"download of {url} is truncated: received {received} of {total} bytes. "
                                f"Try again. {_manual_hint(url)}", url=url, dest=dest,
                                reason=f"truncated: {received} of {total} bytes")
        try:
            check_file(tmp, f"the file downloaded from {url}", name=dest.name)
        except ValueError as e:
            raise DownloadError(f"{e} {_manual_hint(url)}", url=url, dest=dest,
                                reason="the server did not send a .npz file") from None
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _write_sidecar(dest, url, received, digest.hexdigest())
    return dest


def fetch(path_or_url: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None,
          progress: bool = True, force_download: bool = False, verify: bool = True,
          timeout: float = 60.0) -> Path:
    """A local path for a checkpoint source, downloading URLs and short names into the cache.

    Cached files are checked against their sidecar (size; SHA-256 too when `verify`).
    """
    kind, where = resolve(path_or_url)
    if kind == "file":
        return Path(where)
    dest = cache_path(where, cache_dir)
    if dest.exists() and not force_download:
        verify_cached(dest, full=verify, url=where)
        return dest
    return download(where, dest, progress=progress, timeout=timeout)
