"""`sparsecraft push DIR REPO_ID [--private]`: upload a model directory (with its model card) to the hub."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("push", help="upload a model directory to the Hugging Face hub",
                       description="Upload DIR (a trained, crafted, exported or converted model) as the model repo "
                                   "REPO_ID, through huggingface_hub (log in with `hf auth login` or set HF_TOKEN).")
    p.add_argument("directory", help="model directory")
    p.add_argument("repo_id", help="hub repo ID, org/name")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--message", default=None, help="commit message")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..checkpoint.push import push_to_hub

    url = push_to_hub(args.directory, args.repo_id, private=args.private, commit_message=args.message)
    print(f"pushed {args.directory} to {args.repo_id}: {url}")
    return 0
