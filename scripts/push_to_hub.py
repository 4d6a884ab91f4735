#!/usr/bin/env python
"""Upload an export directory (runs/<run>/export/lean or .../full) to the Hugging Face Hub.

    python scripts/push_to_hub.py runs/llama8b_swiftkv/export/lean my-org/Llama-3.1-SwiftKV-8B-Instruct
    python scripts/push_to_hub.py runs/smollm2_swiftkv/export/lean me/smollm2-swiftkv --dry-run

The token comes from --token, $HF_TOKEN or the cached `huggingface-cli login`; it is never printed or logged.
"""

import argparse
import json
import sys
from pathlib import Path

REQUIRED = ("config.json", "README.md")


def check_export(folder: Path) -> list[Path]:
    """The files that would be uploaded; raises SystemExit with a clear message for a bad export dir."""
    if not folder.is_dir():
        raise SystemExit(f"export directory {folder} does not exist: pass runs/<run>/export/lean or .../full.")
    missing = [name for name in REQUIRED if not (folder / name).is_file()]
    weights = list(folder.glob("*.safetensors"))
    if missing or not weights:
        what = ", ".join(missing + ([] if weights else ["*.safetensors"]))
        raise SystemExit(f"{folder} is not a complete export (missing {what}); was the run finished?")
    config = json.loads((folder / "config.json").read_text())
    for module in (config.get("auto_map") or {}).values():
        code = folder / (module.split(".")[0] + ".py")
        if not code.is_file():
            raise SystemExit(f"{folder}: auto_map names {code.name}, which is missing: trust_remote_code would fail.")
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export_dir", type=Path)
    parser.add_argument("repo_id", help="org/name on the Hub")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--revision", default=None, help="branch to push to (default: main)")
    parser.add_argument("--token", default=None, help="Hub token (default: $HF_TOKEN or the cached login)")
    parser.add_argument("--dry-run", action="store_true", help="check and list what would be uploaded, upload nothing")
    args = parser.parse_args(argv)

    files = check_export(args.export_dir)
    total = sum(p.stat().st_size for p in files)
    print(f"{'would upload' if args.dry_run else 'uploading'} {len(files)} files ({total / 1e6:.1f} MB) "
          f"from {args.export_dir} to {args.repo_id}:")
    for path in files:
        print(f"  {path.name}  {path.stat().st_size / 1e6:.2f} MB")
    if args.dry_run:
        return 0
    from huggingface_hub import HfApi

    api = HfApi(token=args.token)
    api.create_repo(args.repo_id, private=args.private, exist_ok=True, repo_type="model")
    commit = api.upload_folder(folder_path=str(args.export_dir), repo_id=args.repo_id, revision=args.revision,
                               commit_message="Upload swiftkv_train export")
    print(f"done: {commit.commit_url if hasattr(commit, 'commit_url') else commit}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
