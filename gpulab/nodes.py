"""``gpulab nodes``: enrol, list and remove the GPU nodes that may attest themselves.

Like ``gpulab users`` it calls the running platform with the ``gpulab-cli`` service's token (readable
only by the account that runs ``gpulab up``), here gpulab-jobs' ``/attestation/enrolments``.
``enroll`` prints the node's credential once, on a line of its own (``credential: node:<name>:<secret>``):
only its hash is kept, so a lost credential is replaced by ``remove`` and ``enroll`` again. Put it in
the node's ``--token-file`` for ``gpulab attest collect``.
"""

import argparse
import os
from pathlib import Path

from .config import instances, load_config
from .users import Hub

JOBS_API = "/services/gpulab-jobs/api/v1/attestation/enrolments"


def enroll(hub: Hub, args) -> int:
    body = {"node": args.name, **({"ueids": args.ueid} if args.ueid else {"gpus": args.gpus})}
    answer = hub.call("POST", "", json=body, api=JOBS_API).json()
    print(f"gpulab: enrolled node {answer['node']} with {_gpus(answer)}; its credential, shown only now:")
    print(f"credential: {answer['credential']}")
    return 0


def list_nodes(hub: Hub, args) -> int:
    rows = [("NODE", "GPUS", "ENROLLED", "BY")]
    for node in hub.call("GET", "", api=JOBS_API).json()["nodes"]:
        rows.append((node["node"], _gpus(node), node["enrolled_at"], node["enrolled_by"]))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


def remove(hub: Hub, args) -> int:
    hub.call("DELETE", f"/{args.name}", api=JOBS_API)
    print(f"gpulab: removed node {args.name}; its credential no longer works and its attestation is gone")
    return 0


def _gpus(node: dict) -> str:
    pinned = "pinned" if node["ueids"] else "pinned by its first attestation"
    return f"{node['gpus']} GPU{'' if node['gpus'] == 1 else 's'} ({pinned})"


def main(args) -> int:
    if args.data_dir:
        os.environ["GPULAB_DATA_DIR"] = str(Path(args.data_dir).expanduser().resolve())
    data_dir = Path(instances(load_config())["Platform"].data_dir).expanduser().resolve()
    return args.action(Hub(data_dir), args)


def add_parser(sub) -> None:
    """``gpulab nodes ...`` on the ``gpulab`` parser's subcommands ``sub``."""
    p = sub.add_parser("nodes", help="GPU nodes that attest themselves: enroll, list, remove")
    p.set_defaults(func=main)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data-dir", help="the platform's data dir (default: as gpulab up)")
    nodes = p.add_subparsers(dest="nodes_command", required=True)
    p_enroll = nodes.add_parser("enroll", parents=[common], help="enrol a node and print its credential (once)")
    p_enroll.add_argument("name")
    gpus = p_enroll.add_mutually_exclusive_group(required=True)
    gpus.add_argument("--gpus", type=int, metavar="N", help="the node has N GPUs; its first attestation pins them")
    gpus.add_argument("--ueid", action="append", metavar="U", help="a GPU's UEID, as NRAS reports it (repeat)")
    p_enroll.set_defaults(action=enroll)
    nodes.add_parser("list", parents=[common], help="every enrolled node and its GPUs").set_defaults(action=list_nodes)
    p_remove = nodes.add_parser("remove", parents=[common], help="remove a node: its credential stops working")
    p_remove.add_argument("name")
    p_remove.set_defaults(action=remove)
