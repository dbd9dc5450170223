"""Get the tutorial's data: the real TCIA slices of the 2019 tutorial, or the synthetic phantom.

    python data_download.py                  # real slices (look locally, else download), else phantom
    python data_download.py --dest DIR       # put / look for them in DIR
    python data_download.py --synthetic [--seed N] [--dest DIR]   # build the phantom set

The real archive is looked for in: --dest, the Kaggle mount /kaggle/input/learn2reg, the
cache ($L2R_DATA_DIR, default ~/.cache/l2r-discrete); then downloaded from $L2R_DATA_URL
(default: the 2019 tutorial's public link), validated and unpacked atomically.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tutorial_utils import data_files
from tutorial_utils.checks import argument_type, check_int


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dest", default=None, help="folder to look in / write to (default: the cache)")
    parser.add_argument("--synthetic", action="store_true", help="build the synthetic phantom set only")
    parser.add_argument("--seed", type=argument_type(check_int, minimum=0), default=0,
                        help="phantom seed, an integer >= 0 (a new seed gives new patients)")
    parser.add_argument("--url", default=None, help="archive address (default $L2R_DATA_URL or the 2019 link)")
    parser.add_argument("--no-fallback", action="store_true",
                        help="fail instead of building the phantom when the real data cannot be had")
    args = parser.parse_args(argv)
    if args.dest is not None and Path(args.dest).expanduser().is_file():
        parser.error(f"--dest must be a folder, but {args.dest} is a file")

    if not args.synthetic:
        folder = data_files.find_tcia(args.dest)
        if folder is None:
            try:
                folder = data_files.download_tcia(args.dest, url=args.url)
            except data_files.DataError as exc:
                print(f"Real TCIA slices unavailable: {exc}", file=sys.stderr)
                if args.no_fallback:
                    return 1
        if folder is not None:
            try:
                data_files.read_slices(folder)
            except data_files.DataError as exc:
                print(f"Found {folder}, but it is not valid: {exc}", file=sys.stderr)
                return 1
            print(f"Real TCIA slices ready in {folder}")
            return 0
        print("Falling back to the synthetic phantom.")
    folder = data_files.make_synthetic(args.dest, seed=args.seed)
    print(f"Synthetic phantom (seed {args.seed}) ready in {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
