"""A real corpus larger than the shipped text: the Python source of the installed packages.

    python3 experiments/python_corpus.py --output /tmp/pycorpus --max-train-mb 60 --max-heldout-mb 6

Writes ``train.txt`` and ``heldout.txt`` (and ``manifest.json``) under ``--output``: every
``.py`` file of the interpreter's site-packages, grouped by top-level package and split **by
package**, so no file, and no package's idioms, leak from training into the held-out text.
The held-out packages are those named by ``--heldout-packages`` (default: a fixed list of
packages that are usually installed; the ones present are used), in sorted path order; the
rest train until ``--max-train-mb``, their files shuffled (``--seed``; a pretraining corpus
is a shuffle of its documents: in package order every stretch of training would see one
package's code, ``--in-package-order``). Files are separated by a blank line; files that are
not UTF-8 are skipped and counted.

The text is real, permissively licensed code (BSD, MIT, Apache 2.0, PSF: the licences of the
packages it is read from; see ``manifest.json`` for which packages went where). It is built on
the machine that trains (nothing is shipped with curtail), so its size is not bounded by what a
repository may carry. On the GPU machine the site-packages hold ~390 MB of Python.
"""

from __future__ import annotations

import argparse
import json
import random
import site
import sysconfig
from pathlib import Path

DEFAULT_HELDOUT = ("sympy", "pandas")  # large, self-contained, present on the GPU machine


def package_files(roots: list[Path]) -> dict[str, list[Path]]:
    """``.py`` files under each root's top-level entries, by package name (sorted paths)."""
    packages: dict[str, list[Path]] = {}
    for root in roots:
        if not root.is_dir():
            continue
        for entry in sorted(root.iterdir()):
            if entry.name.startswith((".", "_")) or entry.name.endswith((".dist-info", ".egg-info")):
                continue
            files = sorted(entry.rglob("*.py")) if entry.is_dir() else [entry] if entry.suffix == ".py" else []
            if files:
                packages.setdefault(entry.name.removesuffix(".py"), []).extend(files)
    return packages


def write_text(path: Path, files: list[Path], max_bytes: int) -> tuple[int, int, int]:
    """Append ``files`` to ``path`` until ``max_bytes``; (bytes, files written, files skipped)."""
    written = used = skipped = 0
    with path.open("w", encoding="utf-8") as out:
        for source in files:
            try:
                text = source.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                skipped += 1
                continue
            size = len(text.encode("utf-8")) + 2
            if written + size > max_bytes:
                break
            out.write(text)
            out.write("\n\n")
            written += size
            used += 1
    return written, used, skipped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", type=Path, required=True, help="folder for train.txt, heldout.txt, manifest.json")
    parser.add_argument("--max-train-mb", type=float, default=60.0)
    parser.add_argument("--max-heldout-mb", type=float, default=6.0)
    parser.add_argument("--heldout-packages", nargs="*", default=list(DEFAULT_HELDOUT))
    parser.add_argument("--seed", type=int, default=0, help="the training files' shuffle")
    parser.add_argument("--in-package-order", action="store_true", help="no shuffle: the training files by package")
    parser.add_argument("--root", type=Path, action="append",
                        help="site-packages folder(s) to read (default: this interpreter's)")
    args = parser.parse_args()
    roots = args.root or [Path(p) for p in {*site.getsitepackages(), sysconfig.get_paths()["purelib"]}]
    packages = package_files(sorted(set(roots)))
    heldout = [name for name in args.heldout_packages if name in packages]
    if not heldout:
        raise SystemExit(f"none of the held-out packages {args.heldout_packages} is installed under {roots}; "
                         "name installed ones with --heldout-packages")
    train = sorted(name for name in packages if name not in heldout)
    args.output.mkdir(parents=True, exist_ok=True)
    mb = 1 << 20
    train_files = [(name, f) for name in train for f in packages[name]]
    if not args.in_package_order:
        random.Random(args.seed).shuffle(train_files)
    train_stats = write_text(args.output / "train.txt", [f for _, f in train_files], int(args.max_train_mb * mb))
    train = sorted({name for name, _ in train_files[:train_stats[1] + train_stats[2]]})  # those the cap reached
    heldout_stats = write_text(args.output / "heldout.txt", [f for name in heldout for f in packages[name]],
                               int(args.max_heldout_mb * mb))
    manifest = {
        "roots": [str(r) for r in roots],
        "train": {"packages": train, "order": "packages" if args.in_package_order else f"shuffled, seed {args.seed}",
                  "bytes": train_stats[0], "files": train_stats[1], "skipped": train_stats[2]},
        "heldout": {"packages": heldout, "bytes": heldout_stats[0], "files": heldout_stats[1],
                    "skipped": heldout_stats[2]},
    }
    (args.output / "manifest.json").write_text(json.dumps(manifest, indent=1))
    print(f"train: {train_stats[0] / mb:.1f} MB from {train_stats[1]} files of {len(train)} packages; "
          f"held out: {heldout_stats[0] / mb:.1f} MB from {heldout_stats[1]} files of {', '.join(heldout)}")


if __name__ == "__main__":
    main()
