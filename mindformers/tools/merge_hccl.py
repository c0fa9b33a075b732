"""Merge per-server HCCL rank tables into the cluster's RANK_TABLE_FILE, as MindFormers' ``merge_hccl.py``.

Usage (from the repository root)::

    python ./mindformers/tools/merge_hccl.py hccl_8p_01234567_10.0.0.1.json hccl_8p_01234567_10.0.0.2.json

Servers are concatenated in argument order and ``rank_id`` is renumbered 0..N-1 across them, so the
order must match the ``[START,END)`` ranges given to ``run_multinode.sh`` on each server. Writes
``hccl_<servers>s_<ranks>p.json`` in the current directory. Every input and the result are validated
(well-formed JSON, counts consistent, device ids unique per server, ranks unique, no server given
twice, e.g. an earlier merge result caught by ``hccl*.json``); problems are reported in one line.
"""
import argparse
import json
import os
import sys

_PLUGIN = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "research",
                                        "baichuan2"))
if os.path.isdir(_PLUGIN) and _PLUGIN not in sys.path:
    sys.path.insert(0, _PLUGIN)       # baichuan2_cli: the one CLI error format

from baichuan2_cli import run_main  # noqa: E402  pylint: disable=wrong-import-position


TOP_KEYS = ("version", "server_count", "server_list", "status")
DEVICE_KEYS = ("device_id", "device_ip", "rank_id")


class RankTableError(ValueError):
    """A rank table that is malformed or inconsistent."""


def _digits(value, what):
    if not isinstance(value, str) or not value.isdigit():
        raise RankTableError(f"{what} must be a string of digits, got {value!r}")
    return int(value)


def validate_table(table, source="rank table"):
    """Raise ``RankTableError`` naming ``source`` and the field unless ``table`` is a consistent rank table."""
    if not isinstance(table, dict):
        raise RankTableError(f"{source}: top level must be a JSON object")
    missing = [key for key in TOP_KEYS if key not in table]
    if missing:
        raise RankTableError(f"{source}: missing field(s) {', '.join(missing)}")
    servers = table["server_list"]
    if not isinstance(servers, list) or not servers:
        raise RankTableError(f"{source}: server_list must be a non-empty list")
    count = _digits(table["server_count"], f"{source}: server_count")
    if count != len(servers):
        raise RankTableError(f"{source}: server_count is {count} but server_list has {len(servers)} server(s)")
    if table["status"] != "completed":
        raise RankTableError(f"{source}: status is {table['status']!r}, expected 'completed'")
    ranks = {}
    for index, server in enumerate(servers):
        where = f"{source}: server_list[{index}]"
        if not isinstance(server, dict) or "server_id" not in server or "device" not in server:
            raise RankTableError(f"{where} needs server_id and device")
        devices = server["device"]
        if not isinstance(devices, list) or not devices:
            raise RankTableError(f"{where} (server {server['server_id']}) has no device")
        seen = set()
        for position, device in enumerate(devices):
            here = f"{where}.device[{position}]"
            if not isinstance(device, dict):
                raise RankTableError(f"{here} must be an object")
            absent = [key for key in DEVICE_KEYS if key not in device]
            if absent:
                raise RankTableError(f"{here}: missing field(s) {', '.join(absent)}")
            device_id = _digits(device["device_id"], f"{here}.device_id")
            rank = _digits(device["rank_id"], f"{here}.rank_id")
            if device_id in seen:
                raise RankTableError(f"{where} (server {server['server_id']}): device_id {device_id} appears twice")
            seen.add(device_id)
            if rank in ranks:
                raise RankTableError(f"{source}: rank_id {rank} appears twice ({ranks[rank]} and {here})")
            ranks[rank] = here
    if sorted(ranks) != list(range(len(ranks))):
        gaps = sorted(set(range(len(ranks))) - set(ranks))
        raise RankTableError(f"{source}: rank_ids must be 0..{len(ranks) - 1}; missing {gaps[:8]}")
    return len(ranks)


def _server_key(server):
    return server["server_id"], tuple((d["device_id"], d["device_ip"]) for d in server["device"])


def merge_tables(tables):
    """Merge ``[(source, table), ...]``; returns the merged table (ranks renumbered in order)."""
    merged = {"version": "1.0", "server_count": "0", "server_list": []}
    origin = {}
    rank = 0
    for source, table in tables:
        validate_table(table, source)
        for server in table["server_list"]:
            key = _server_key(server)
            if key in origin:
                raise RankTableError(f"server {server['server_id']} with the same devices is in both {origin[key]} "
                                     f"and {source} (an earlier merge result among the inputs?); "
                                     "pass each server's own file once")
            origin[key] = source
            devices = [{"device_id": d["device_id"], "device_ip": d["device_ip"], "rank_id": str(rank + i)}
                       for i, d in enumerate(server["device"])]
            rank += len(devices)
            entry = dict(server)
            entry["device"] = devices
            merged["server_list"].append(entry)
    merged["server_count"] = str(len(merged["server_list"]))
    merged["status"] = "completed"
    validate_table(merged, "merged table")
    return merged


def load_table(path):
    if not os.path.isfile(path):
        raise RankTableError(f"rank table not found: {path}")
    with open(path, encoding="utf-8") as handle:
        try:
            return json.load(handle)
        except json.JSONDecodeError as error:
            raise RankTableError(f"{path} is not valid JSON ({error})") from None


def run(file_list, out_dir=None):
    """Merge the files; returns the written path."""
    merged = merge_tables([(path, load_table(path)) for path in file_list])
    ranks = sum(len(server["device"]) for server in merged["server_list"])
    path = os.path.join(out_dir or os.getcwd(), f"hccl_{merged['server_count']}s_{ranks}p.json")
    if os.path.abspath(path) in {os.path.abspath(p) for p in file_list}:
        raise RankTableError(f"the result {path} would overwrite an input; run from another folder")
    servers = [server["server_id"] for server in merged["server_list"]]
    if len(set(servers)) != len(servers):
        print(f"warning: server_id repeated ({', '.join(servers)}): fine for a loopback test, "
              "wrong on a real cluster (pass --server_ip to hccl_tools.py on each server)", file=sys.stderr)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(merged, handle, indent=4)
    print("Completed: hccl file was save in :", path, flush=True)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n", 1)[1])
    parser.add_argument("file_list", type=str, nargs="+", help="per-server rank tables, in node order")
    args = parser.parse_args(argv)
    return run_main(run, "merge_hccl.py", args.file_list)


if __name__ == "__main__":
    sys.exit(main())
