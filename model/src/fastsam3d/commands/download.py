"""``fastsam3d download``: fetch named weights (or a URL) into the cache, list or remove them."""

from __future__ import annotations

import argparse
import os

from fastsam3d import hub, weights
from fastsam3d.errors import EXIT_INTERRUPTED, CommandError, UsageError


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "download",
        help="download model weights into the per-user cache",
        description=(
            "Download registered weights (or any http(s)/file URL) into the cache. No checksums "
            "are published for these weights: the SHA-256 of the first download is recorded "
            "and every later use re-checks it. Pin a known hash with --sha256."
        ),
    )
    p.add_argument("name", nargs="?", help="registry name (see --list) or a URL")
    p.add_argument("--sha256", metavar="HEX", help="expected SHA-256; a mismatch is discarded")
    p.add_argument(
        "--force",
        action="store_true",
        help="download again even if cached (the old file stays until the new one verifies)",
    )
    p.add_argument(
        "--cache-dir",
        metavar="DIR",
        help=f"directory to use instead of the cache (default: ${hub.ENV_CACHE} or the "
        "user cache directory)",
    )
    p.add_argument("--list", action="store_true", help="list registered weights and cache state")
    p.add_argument("--remove", metavar="NAME", help="delete a cached file and its hash record")
    p.add_argument("--verify", action="store_true", help="with --list: re-hash cached files")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def format_size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def state_text(status: hub.CacheStatus) -> str:
    """One phrase for a cache entry; says plainly whether the file was re-hashed."""
    if not status.present:
        return "not downloaded"
    if status.verified is True:
        return "present, SHA-256 verified"
    if status.verified is False:
        return f"present, NOT usable: {status.error}"
    return "present, SHA-256 recorded (not re-hashed)"


def _print_list(cache_dir: str | None, verify: bool) -> int:
    where = cache_dir or hub.cache_dir(create=False)
    print(f"cache directory: {where}")
    for info in weights.list_weights():
        st = hub.cache_status(info.name, verify=verify, dest_dir=cache_dir)
        print(f"\n{info.name}  (config {info.config}, file {info.filename})")
        print(f"  {info.description}")
        if st.present:
            print(f"  state:   {state_text(st)}; size {format_size(st.size)}")
        else:  # --list makes no network request, so the size is not known yet
            print(
                f"  state:   {state_text(st)} (`fastsam3d download {info.name}` shows its size "
                "as it starts)"
            )
        if st.recorded_sha256:
            print(f"  sha256:  {st.recorded_sha256}")
        print(f"  url:     {info.url}")
        print(f"  licence: {info.license_note}")
    extra = hub.url_downloads(cache_dir)
    if extra:
        print(
            "\ndownloaded from URLs (load by path, e.g. `segment --checkpoint PATH`; "
            "remove with `download --remove URL`):"
        )
        for url, path in extra:
            print(f"  {url}\n    {path}")
    return 0


def run(args: argparse.Namespace) -> int:
    chosen = [args.name is not None, args.list, args.remove is not None]
    if sum(chosen) != 1:
        raise UsageError("give exactly one of NAME, --list, --remove NAME")
    if args.list:
        return _print_list(args.cache_dir, args.verify)
    if args.remove is not None:
        if hub.remove(args.remove, dest_dir=args.cache_dir):
            print(f"removed {args.remove}")
        else:
            print(f"{args.remove}: nothing cached")
        return 0
    try:
        path = hub.download(
            args.name,
            sha256=args.sha256,
            force=args.force,
            dest_dir=args.cache_dir,
            progress=not args.quiet,
        )
    except KeyboardInterrupt:
        raise CommandError("interrupted; no partial file was kept", EXIT_INTERRUPTED) from None
    st = hub.cache_status(args.name, dest_dir=args.cache_dir)
    print(f"path:   {path}")
    print(f"sha256: {st.recorded_sha256}")
    print(f"size:   {format_size(st.size)}")
    if args.cache_dir and os.environ.get(hub.ENV_CACHE) != args.cache_dir:
        print(f"(not the default cache: load it by path, or set {hub.ENV_CACHE}={args.cache_dir})")
    return 0
