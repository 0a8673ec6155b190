"""Prepare TFDS datasets in array_record format (once, with network access), and export VTAB-1k as
the NOAH-style JPEG image folder the PEFT papers trained on.

    python -m jax_peft.data.prepare vtab/cifar100 vtab/dtd --data_dir ~/tensorflow_datasets
    python -m jax_peft.data.prepare vtab                      # all 19 VTAB-1k tasks
    python -m jax_peft.data.prepare fgvc/cub200 fewshot/food101
    python -m jax_peft.data.prepare --list                    # what each name needs
    python -m jax_peft.data.prepare vtab --export /data/vtab-1k   # + JPEG export (train800, val200,
                                                                  #   train800val200, test)

Preparation runs the TFDS builders (`download_and_prepare(file_format="array_record")`): it needs
the network and, for most image builders, TensorFlow (`pip install tensorflow`); training afterwards
reads the records with `tfds.data_source` and needs neither. Manual downloads: resisc45 and
diabetic_retinopathy (the message says where to put the files). NABirds, FGVC-Aircraft and VPT's
FGVC train/val split files are not in TFDS: see `jax_peft.data.fgvc` / `jax_peft.data.fewshot`.
"""

from __future__ import annotations

import argparse
import os
import sys

from jax_peft.data import fewshot, fgvc, vtab


def tfds_targets(name: str) -> list[tuple[str, str, str]]:
    """[(dataset name, TFDS builder spec, note)] for a name, a family ("vtab", "fgvc", "fewshot") or
    "all". Datasets without a TFDS builder get spec "" and a note saying what to provide."""
    if name in ("all", "vtab", "fgvc", "fewshot"):
        names = {"vtab": vtab.vtab_tasks(), "fgvc": fgvc.names(), "fewshot": fewshot.names()}
        picked = sum(names.values(), []) if name == "all" else names[name]
        return [t for n in picked for t in tfds_targets(n)]
    family = name.split("/", 1)[0]
    if family == "vtab":
        task = vtab.get_task(name)
        return [(f"vtab/{task.name}", task.builder, task.manual)]
    if family == "fgvc":
        ds = fgvc.get_dataset(name)
        note = ("not in TFDS: provide VPT's train/val/test.json and the images "
                f"(<data_dir>/{ds.directory}/)") if ds.tfds_builder is None else \
            "VPT's train/val split files are separate downloads (see jax_peft.data.fgvc)"
        return [(f"fgvc/{ds.name}", ds.tfds_builder or "", note)]
    if family == "fewshot":
        ds = fewshot.get_dataset(name)
        note = ("not in TFDS: provide NOAH's list files and the images "
                f"(<data_dir>/few-shot_split/{ds.dirs[0]}/annotations/, <data_dir>/{ds.dirs[0]}/)"
                if ds.tfds_builder is None else "")
        return [(f"fewshot/{ds.name}", ds.tfds_builder or "", note)]
    raise ValueError(f"unknown dataset {name!r}; use vtab/<task>, fgvc/<dataset>, fewshot/<dataset>, "
                     f"or one of all, vtab, fgvc, fewshot. VTAB tasks: {', '.join(vtab.vtab_tasks())}")


# Modules TFDS's builders import while preparing that a plain install may lack (declared in
# pyproject.toml; checked up front so a fresh install fails in one clear line, not mid-way).
PREPARE_MODULES = ("importlib_resources",)
NETWORK_PROBE = ("storage.googleapis.com", 443)  # TFDS's GCS mirror and metadata
DOWNLOAD_RETRIES = 2  # TFDS retries 10 times with exponential backoff (minutes without network)


def missing_requirements() -> str | None:
    """A one-line fix when a module preparation needs is not installed, else None."""
    import importlib.util

    missing = [m for m in PREPARE_MODULES if importlib.util.find_spec(m) is None]
    if not missing:
        return None
    return (f"preparing TFDS datasets needs {', '.join(missing)}, which is not installed: "
            f"pip install {' '.join(missing)}")


def network_error(timeout: float = 5.0) -> str | None:
    """None when the download mirror answers within `timeout` seconds (or a proxy is configured),
    else the network error in one line."""
    import socket

    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    try:
        socket.create_connection(NETWORK_PROBE, timeout=timeout).close()
    except OSError as e:
        return (f"no network: cannot reach {NETWORK_PROBE[0]}:{NETWORK_PROBE[1]} ({type(e).__name__}: {e}). "
                "Preparing downloads the datasets: run it on a machine with network access and copy the "
                "data_dir, or pass --skip_network_check if downloads go another way")
    return None


def prepare(spec: str, data_dir: str | None, manual_dir: str | None = None, *,
            check_network: bool = True) -> None:
    """download_and_prepare one TFDS builder in array_record format. When it is not prepared yet
    and `check_network`, the download mirror is probed first (ConnectionError in seconds)."""
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core.download import downloader

    downloader.MAX_RETRIES = min(downloader.MAX_RETRIES, DOWNLOAD_RETRIES)  # fail in seconds, not minutes

    builder = tfds.builder(spec, data_dir=data_dir, file_format="array_record")
    if check_network and not builder.is_prepared():
        problem = network_error()
        if problem:
            raise ConnectionError(problem)
    config = tfds.download.DownloadConfig(manual_dir=manual_dir) if manual_dir else None
    builder.download_and_prepare(download_config=config, file_format="array_record")


def export_vtab(name: str, out_root: str, *, data_dir: str | None = None,
                splits=("train800", "val200", "train800val200", "test"), quality: int = 75) -> dict:
    """Writes the NOAH-style export of one VTAB task from TFDS: `<out_root>/<export_dir>/images/
    <split>/<i:06d>.jpg` (labels and image fixes applied, native resolution, JPEG `quality`, PIL's
    default 75 as the NOAH export) and `<out_root>/<export_dir>/<split>.txt`. Returns {split: count}."""
    from PIL import Image

    task = vtab.get_task(name)
    counts = {}
    for split in splits:
        src = vtab.get_source(task.name, split, data_dir=data_dir)
        if not isinstance(src, vtab.TaskSource):
            raise ValueError(f"data_dir already holds an export of vtab/{task.name}; pass the TFDS data_dir")
        d = os.path.join(out_root, task.export_dir)
        os.makedirs(os.path.join(d, "images", split), exist_ok=True)
        lines = []
        for i in range(len(src)):
            ex = src[i]
            rel = f"images/{split}/{i:06d}.jpg"
            image = ex["image"]
            Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(
                os.path.join(d, rel), quality=quality)
            lines.append(f"{rel} {ex['label']}")
        tmp = os.path.join(d, f"{split}.txt.tmp")
        with open(tmp, "w") as f:
            f.write("\n".join(lines) + "\n")
        os.replace(tmp, os.path.join(d, f"{split}.txt"))
        counts[split] = len(lines)
    return counts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jax_peft.data.prepare", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("names", nargs="*", help="vtab/<task>, fgvc/<dataset>, fewshot/<dataset>, vtab, fgvc, "
                                            "fewshot or all")
    p.add_argument("--data_dir", default=None, help="TFDS data_dir (default: TFDS's, ~/tensorflow_datasets)")
    p.add_argument("--manual_dir", default=None,
                   help="directory with manually downloaded files (default <data_dir>/downloads/manual)")
    p.add_argument("--export", default=None, metavar="DIR",
                   help="also write the NOAH-style JPEG export of the VTAB tasks to DIR")
    p.add_argument("--list", action="store_true", help="print what each name needs and exit")
    p.add_argument("--skip_network_check", action="store_true",
                   help=f"do not probe {NETWORK_PROBE[0]} before preparing")
    args = p.parse_args(argv)
    if not args.names and not args.list:
        p.error("give at least one dataset name (or --list)")
    targets, seen = [], set()
    for n in args.names or ["all"]:
        for t in tfds_targets(n):
            if t[0] not in seen:
                seen.add(t[0])
                targets.append(t)
    if args.list:
        for name, spec, note in targets:
            print(f"{name:32s} {spec or '(not in TFDS)':55s} {note}")
        return 0
    problem = missing_requirements() if any(spec for _, spec, _ in targets) else None
    if problem:
        print(f"[fail] {problem}", file=sys.stderr)
        return 1
    failed, done_specs = [], set()
    for name, spec, note in targets:
        if not spec:
            print(f"[skip] {name}: {note}")
            continue
        if spec in done_specs:
            print(f"[ok]   {name}: {spec} (prepared above)")
        else:
            print(f"[..]   {name}: preparing {spec} ...", flush=True)
            try:
                prepare(spec, args.data_dir, args.manual_dir, check_network=not args.skip_network_check)
                done_specs.add(spec)
                print(f"[ok]   {name}: {spec}")
            except Exception as e:  # report and continue with the other datasets
                failed.append(name)
                print(f"[fail] {name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                      file=sys.stderr)
                if note:
                    print(f"       {note}", file=sys.stderr)
                print("       Preparing needs network access and usually TensorFlow "
                      "(pip install tensorflow).", file=sys.stderr)
                continue
        if args.export and name.startswith("vtab/"):
            counts = export_vtab(name, args.export, data_dir=args.data_dir)
            print(f"[ok]   {name}: exported {counts} to {args.export}")
    if failed:
        print(f"{len(failed)} dataset(s) failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
