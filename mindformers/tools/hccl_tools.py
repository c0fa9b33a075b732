"""Generate the HCCL rank table (RANK_TABLE_FILE) of this server, as MindFormers' ``hccl_tools.py``.

Usage (from the repository root)::

    python ./mindformers/tools/hccl_tools.py --device_num "[0,8)" [--server_ip xx.xx.xx.xx]

Writes ``hccl_<n>p_<device ids>_<server_ip>.json`` in the current directory, in the documented format
(``version``, ``server_count``, ``server_list[{server_id, device[{device_id, device_ip, rank_id}],
host_nic_ip}]``, ``status``). ``[a,b)`` and ``[a,b]`` both mean devices a..b-1.

Device IPs come from ``hccn_tool -i <id> -ip -g``, else from ``/etc/hccn.conf`` (``address_<id>=<ip>``).
A machine without Ascend NPUs has neither: pass them with ``--device_ips`` (``ip0,ip1,...`` in device
order, or ``id:ip,...``) to write a table for another machine or for tests.
"""
import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys

_PLUGIN = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "research",
                                        "baichuan2"))
if os.path.isdir(_PLUGIN) and _PLUGIN not in sys.path:
    sys.path.insert(0, _PLUGIN)       # baichuan2_cli: the one CLI error format

from baichuan2_cli import run_main  # noqa: E402  pylint: disable=wrong-import-position


_RANGE = re.compile(r"^\s*\[\s*(\d+)\s*,\s*(\d+)\s*[\])]\s*$")
_IPV4 = re.compile(r"^(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})$")


class RankTableError(ValueError):
    """Bad arguments, or no way to find the device IPs."""


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n", 1)[1])
    parser.add_argument("--device_num", type=str, default="[0,8)",
                        help="device range [a,b) (or [a,b]): devices a..b-1, e.g. \"[0,8)\"")
    parser.add_argument("--visible_devices", type=str, default="0,1,2,3,4,5,6,7",
                        help="logical -> physical device ids (as in ASCEND_VISIBLE_DEVICES), default 0..7")
    parser.add_argument("--server_ip", type=str, default="",
                        help="this server's IP (default: the host name's address)")
    parser.add_argument("--device_num_per_node", type=int, default=8, help="devices per server")
    parser.add_argument("--device_ips", type=str, default="",
                        help="device IPs when there is no hccn_tool or /etc/hccn.conf: "
                             "'ip0,ip1,...' in the order of the range, or 'id:ip,...' by physical device id")
    parser.add_argument("--hccn_conf", type=str, default="/etc/hccn.conf", help=argparse.SUPPRESS)
    return parser


def parse_device_range(text, per_node=8):
    """``(start, end)`` of ``[a,b)``/``[a,b]`` (end exclusive), checked as the original does."""
    match = _RANGE.match(text or "")
    if not match:
        raise RankTableError(f"--device_num {text!r} is not a range like \"[0,8)\" (or \"[0,8]\"); "
                             "both mean devices 0..7")
    start, end = int(match.group(1)), int(match.group(2))
    if end > per_node:
        raise RankTableError(f"--device_num {text}: end {end} is beyond --device_num_per_node {per_node}")
    if start >= end:
        raise RankTableError(f"--device_num {text}: no device (start {start} must be less than end {end})")
    if start < 4 < end and not (start == 0 and end in (8, 16)):
        raise RankTableError(f"--device_num {text} crosses the 4-device group boundary; use a range inside "
                             "[0,4) or [4,8), or the whole [0,8)")
    return start, end


def _check_ip(ip, what):
    match = _IPV4.match(ip)
    if not match or any(int(part) > 255 for part in match.groups()):
        raise RankTableError(f"{what}: {ip!r} is not an IPv4 address")
    return ip


def parse_device_ips(text, physical_ids):
    """``{physical id: ip}`` from ``--device_ips`` (plain list in range order, or ``id:ip`` pairs)."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if all(":" in item for item in items):
        ips = {}
        for item in items:
            device, ip = (part.strip() for part in item.split(":", 1))
            ips[device] = _check_ip(ip, f"--device_ips entry {item!r}")
        return ips
    if any(":" in item for item in items):
        raise RankTableError("--device_ips: use either 'ip0,ip1,...' or 'id:ip,...', not a mix")
    if len(items) != len(physical_ids):
        raise RankTableError(f"--device_ips has {len(items)} address(es) but the range has {len(physical_ids)} "
                             f"device(s) ({', '.join(physical_ids)})")
    return {device: _check_ip(ip, "--device_ips") for device, ip in zip(physical_ids, items)}


def ips_from_hccn_tool(physical_ids):
    """``{id: ip}`` from ``hccn_tool -i <id> -ip -g`` (output ``ipaddr:<ip>``), or None without hccn_tool."""
    if shutil.which("hccn_tool") is None:
        return None
    ips = {}
    for device in physical_ids:
        try:
            out = subprocess.run(["hccn_tool", "-i", device, "-ip", "-g"], capture_output=True, text=True,
                                 timeout=30, check=False).stdout
        except (OSError, subprocess.SubprocessError):
            return None
        found = re.search(r"ipaddr\s*:\s*(\S+)", out)
        if not found:
            return None
        ips[device] = found.group(1)
    return ips


def ips_from_hccn_conf(path):
    """``{id: ip}`` from ``address_<id>=<ip>`` lines, or None if the file does not exist."""
    if not os.path.isfile(path):
        return None
    ips = {}
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            line = line.strip()
            if line.startswith("address_") and "=" in line:
                key, ip = line.split("=", 1)
                ips[key[len("address_"):].strip()] = ip.strip()
    return ips


def device_ips(physical_ids, given="", hccn_conf="/etc/hccn.conf"):
    """Device IPs from ``--device_ips``, else hccn_tool, else hccn.conf; a clear error if none has them."""
    if given:
        ips, source = parse_device_ips(given, physical_ids), "--device_ips"
    else:
        ips, source = ips_from_hccn_tool(physical_ids), "hccn_tool"
        if ips is None:
            ips, source = ips_from_hccn_conf(hccn_conf), hccn_conf
        if ips is None:
            raise RankTableError(f"cannot find the device IPs: no hccn_tool on PATH and no {hccn_conf} "
                                 "(this machine has no Ascend NPUs); pass them with "
                                 "--device_ips ip0,ip1,... (or id:ip,...)")
    missing = [device for device in physical_ids if device not in ips]
    if missing:
        raise RankTableError(f"{source} has no IP for device(s) {', '.join(missing)}")
    return ips


def host_ip():
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return None


def build_rank_table(start, end, visible_devices, server_ip, ips):
    """The rank table dict (key order and string values as the original writes them)."""
    devices = []
    for rank, logical in enumerate(range(start, end)):
        physical = visible_devices[logical]
        devices.append({"device_id": physical, "device_ip": ips[physical], "rank_id": str(rank)})
    return {"version": "1.0",
            "server_count": "1",
            "server_list": [{"server_id": server_ip, "device": devices, "host_nic_ip": "reserve"}],
            "status": "completed"}


def table_file_name(start, end, server_ip):
    return f"hccl_{end - start}p_{''.join(str(i) for i in range(start, end))}_{server_ip}.json"


def run(args, out_dir=None):
    """Write the rank table; returns its path."""
    start, end = parse_device_range(args.device_num, args.device_num_per_node)
    visible = [device.strip() for device in args.visible_devices.split(",") if device.strip()]
    if len(visible) < end:
        raise RankTableError(f"--visible_devices lists {len(visible)} device(s) ({args.visible_devices}) but "
                             f"--device_num {args.device_num} needs logical devices up to {end - 1}")
    server_ip = args.server_ip or host_ip()
    if not server_ip:
        raise RankTableError("cannot find this host's IP; pass --server_ip")
    physical = [visible[i] for i in range(start, end)]
    table = build_rank_table(start, end, visible, server_ip,
                             device_ips(physical, args.device_ips, args.hccn_conf))
    path = os.path.join(out_dir or os.getcwd(), table_file_name(start, end, server_ip))
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(table, handle, indent=4)
    for device in table["server_list"][0]["device"]:
        print(f"rank_id:{device['rank_id']}, device_id:{device['device_id']}, device_ip:{device['device_ip']}")
    print("Completed: hccl file was save in :", path, flush=True)
    return path


def main(argv=None):
    args = build_parser().parse_args(argv)
    return run_main(run, "hccl_tools.py", args)


if __name__ == "__main__":
    sys.exit(main())
