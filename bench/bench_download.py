"""Download throughput from the loopback Hub (tests/hubserver.py): Easel's downloader (what
`easel models pull` and a first Run use: exact files, sha256 verified while streaming, resume,
lock) against the unchanged ``huggingface_hub.snapshot_download`` of the same files.

    .venv/bin/python bench/bench_download.py [--mb 512] [--files 2] [--repeats 3]

Prints one line per method with the median MB/s (1 MB = 10^6 bytes) and the ratio.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from hubserver import HubFile, HubRepo, HubServer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=512, help="total size of the repo's weights, MB")
    ap.add_argument("--files", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="easel-bench-dl-"))
    try:
        files = {}
        per = args.mb * 1_000_000 // args.files
        for i in range(args.files):
            p = work / f"w{i}.safetensors"
            with open(p, "wb") as fh:
                for _ in range(per // (1 << 20)):
                    fh.write(os.urandom(1 << 20))
                fh.write(os.urandom(per % (1 << 20)))
            files[f"unet/diffusion_pytorch_model-0000{i + 1}-of-0000{args.files}.safetensors"] = HubFile(
                f"unet/w{i}", p)
        files["unet/config.json"] = HubFile("unet/config.json", _write(work / "config.json", b'{"a": 1}'))
        hub = HubServer([HubRepo("bench/weights", {"main": files})]).start()
        os.environ["HF_ENDPOINT"] = hub.url
        total = sum(f.size for f in files.values())
        source = {"repo": "bench/weights", "files": sorted(files)}

        def easel(dest: Path) -> None:
            from easel.weights.download import hub_plan, run_plan

            run_plan(hub_plan(dest, source), dest)

        def raw(dest: Path) -> None:
            from huggingface_hub import snapshot_download

            snapshot_download("bench/weights", cache_dir=dest, endpoint=hub.url, allow_patterns=sorted(files))

        results = {}
        for name, fn in (("easel pull (downloader)", easel), ("huggingface_hub.snapshot_download", raw)):
            rates = []
            for _ in range(args.repeats):
                dest = work / f"dest-{name[:5]}"
                shutil.rmtree(dest, ignore_errors=True)
                t0 = time.perf_counter()
                fn(dest)
                rates.append(total / (time.perf_counter() - t0) / 1e6)
            results[name] = statistics.median(rates)
            print(f"{name:36s} {results[name]:8.1f} MB/s  (median of {args.repeats}, {total / 1e6:.0f} MB, "
                  f"{len(files)} files)")
        a, b = results.values()
        print(f"ratio easel / snapshot_download: {a / b:.3f}")
        hub.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


if __name__ == "__main__":
    main()
