"""mindformers/tools/hccl_tools.py and merge_hccl.py: documented JSON, ranges, device IPs, validation.

The expected tables are the two RANK_TABLE_FILE samples of the original Baichuan2 documentation
(single server with 8 devices; two servers with 16), produced here from the given device IPs.
"""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(ROOT, "mindformers", "tools")
HCCL_TOOLS = os.path.join(TOOLS, "hccl_tools.py")
MERGE_HCCL = os.path.join(TOOLS, "merge_hccl.py")

DOC_8P_IPS = ["192.1.27.6", "192.2.27.6", "192.3.27.6", "192.4.27.6",
              "192.1.27.7", "192.2.27.7", "192.3.27.7", "192.4.27.7"]
DOC_16P_IPS = [["192.168.0.0", "192.168.1.0", "192.168.2.0", "192.168.3.0",
                "192.168.0.1", "192.168.1.1", "192.168.2.1", "192.168.3.1"],
               ["192.168.0.1", "192.168.1.1", "192.168.2.1", "192.168.3.1",
                "192.168.0.2", "192.168.1.2", "192.168.2.2", "192.168.3.2"]]


def doc_table(server_ips, first_rank=0):
    """The documented format: key order and all values as strings."""
    servers = []
    rank = first_rank
    for ips in server_ips:
        devices = []
        for device, ip in enumerate(ips):
            devices.append({"device_id": str(device), "device_ip": ip, "rank_id": str(rank)})
            rank += 1
        servers.append({"server_id": "xx.xx.xx.xx", "device": devices, "host_nic_ip": "reserve"})
    return {"version": "1.0", "server_count": str(len(servers)), "server_list": servers, "status": "completed"}


def load_module(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


merge_hccl = load_module("merge_hccl_under_test", MERGE_HCCL)
hccl_tools = load_module("hccl_tools_under_test", HCCL_TOOLS)


def run(script, args, cwd, path_env=None):
    env = dict(os.environ)
    if path_env is not None:
        env["PATH"] = path_env
    return subprocess.run([sys.executable, script, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=60, check=False)


def no_hccn_path():
    """PATH without any hccn_tool (none exists here anyway)."""
    return os.path.dirname(sys.executable) + os.pathsep + "/usr/bin" + os.pathsep + "/bin"


@pytest.mark.parametrize("rng", ["[0,8)", "[0,8]"])
def test_single_server_matches_documented_json(tmp_path, rng):
    result = run(HCCL_TOOLS, ["--device_num", rng, "--server_ip", "xx.xx.xx.xx", "--device_ips", ",".join(DOC_8P_IPS),
                              "--hccn_conf", str(tmp_path / "none")], tmp_path, no_hccn_path())
    assert result.returncode == 0, result.stderr
    path = tmp_path / "hccl_8p_01234567_xx.xx.xx.xx.json"
    text = path.read_text()
    expected = doc_table([DOC_8P_IPS])
    assert json.loads(text) == expected
    assert text == json.dumps(expected, indent=4)          # key order and layout of the original writer


def test_two_servers_merge_matches_documented_json(tmp_path):
    files = []
    for node, ips in enumerate(DOC_16P_IPS):
        folder = tmp_path / f"node{node}"
        folder.mkdir()
        pairs = ",".join(f"{device}:{ip}" for device, ip in enumerate(ips))      # the id:ip form
        result = run(HCCL_TOOLS, ["--device_num", "[0,8)", "--server_ip", "xx.xx.xx.xx", "--device_ips", pairs,
                                  "--hccn_conf", str(tmp_path / "none")], folder, no_hccn_path())
        assert result.returncode == 0, result.stderr
        files.append(str(folder / "hccl_8p_01234567_xx.xx.xx.xx.json"))
    result = run(MERGE_HCCL, files, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "server_id repeated" in result.stderr               # documented placeholders: warned, not refused
    text = (tmp_path / "hccl_2s_16p.json").read_text()
    expected = doc_table(DOC_16P_IPS)
    assert json.loads(text) == expected
    assert text == json.dumps(expected, indent=4)
    assert [d["rank_id"] for s in expected["server_list"] for d in s["device"]] == [str(i) for i in range(16)]


def test_partial_range_and_visible_devices(tmp_path):
    result = run(HCCL_TOOLS, ["--device_num", "[4,6)", "--visible_devices", "0,1,2,3,4,5,6,7",
                              "--server_ip", "10.0.0.1", "--device_ips", "4:1.1.1.4,5:1.1.1.5",
                              "--hccn_conf", str(tmp_path / "none")], tmp_path, no_hccn_path())
    assert result.returncode == 0, result.stderr
    table = json.loads((tmp_path / "hccl_2p_45_10.0.0.1.json").read_text())
    assert table["server_list"][0]["device"] == [{"device_id": "4", "device_ip": "1.1.1.4", "rank_id": "0"},
                                                 {"device_id": "5", "device_ip": "1.1.1.5", "rank_id": "1"}]


def test_device_ips_from_hccn_tool(tmp_path):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    tool = fake_bin / "hccn_tool"
    tool.write_text('#!/bin/sh\necho "ipaddr:192.$(( $2 + 1 )).27.6"\n')   # hccn_tool -i <id> -ip -g
    tool.chmod(0o755)
    result = run(HCCL_TOOLS, ["--device_num", "[0,2)", "--server_ip", "10.0.0.1"], tmp_path,
                 str(fake_bin) + os.pathsep + no_hccn_path())
    assert result.returncode == 0, result.stderr
    table = json.loads((tmp_path / "hccl_2p_01_10.0.0.1.json").read_text())
    assert [d["device_ip"] for d in table["server_list"][0]["device"]] == ["192.1.27.6", "192.2.27.6"]


def test_device_ips_from_hccn_conf(tmp_path):
    conf = tmp_path / "hccn.conf"
    conf.write_text("address_0=192.1.27.6\nnetmask_0=255.255.255.0\naddress_1=192.2.27.6\n")
    result = run(HCCL_TOOLS, ["--device_num", "[0,2]", "--server_ip", "10.0.0.1", "--hccn_conf", str(conf)],
                 tmp_path, no_hccn_path())
    assert result.returncode == 0, result.stderr
    table = json.loads((tmp_path / "hccl_2p_01_10.0.0.1.json").read_text())
    assert [d["device_ip"] for d in table["server_list"][0]["device"]] == ["192.1.27.6", "192.2.27.6"]


def test_no_device_ip_source_is_a_clear_error(tmp_path):
    result = run(HCCL_TOOLS, ["--device_num", "[0,2)", "--server_ip", "10.0.0.1", "--hccn_conf",
                              str(tmp_path / "none")], tmp_path, no_hccn_path())
    assert result.returncode == 2
    assert result.stderr.startswith("hccl_tools.py: error: cannot find the device IPs: no hccn_tool on PATH")
    assert "--device_ips" in result.stderr
    assert not list(tmp_path.glob("hccl_*.json"))


@pytest.mark.parametrize("rng, message", [
    ("0,8", "is not a range"), ("[0,8", "is not a range"), ("[a,8)", "is not a range"),
    ("[0,9)", "beyond --device_num_per_node 8"), ("[3,3)", "no device"), ("[5,2)", "no device"),
    ("[3,6)", "crosses the 4-device group boundary")])
def test_bad_ranges(rng, message):
    with pytest.raises(hccl_tools.RankTableError, match=message.replace("-", r"\-")):
        hccl_tools.parse_device_range(rng)


def test_bad_device_ips():
    with pytest.raises(hccl_tools.RankTableError, match="has 1 address"):
        hccl_tools.parse_device_ips("1.1.1.1", ["0", "1"])
    with pytest.raises(hccl_tools.RankTableError, match="not an IPv4 address"):
        hccl_tools.parse_device_ips("1.1.1.1,1.1.1.300", ["0", "1"])
    with pytest.raises(hccl_tools.RankTableError, match="not a mix"):
        hccl_tools.parse_device_ips("0:1.1.1.1,1.1.1.2", ["0", "1"])
    with pytest.raises(hccl_tools.RankTableError, match="no IP for device"):
        hccl_tools.device_ips(["0", "1"], "0:1.1.1.1")


# --------------------------------------------------------------------------------------- merge checks

def small_table(server, ids, ranks=None):
    ranks = ranks if ranks is not None else list(range(len(ids)))
    return {"version": "1.0", "server_count": "1",
            "server_list": [{"server_id": server,
                             "device": [{"device_id": str(d), "device_ip": f"10.9.0.{d}", "rank_id": str(r)}
                                        for d, r in zip(ids, ranks)],
                             "host_nic_ip": "reserve"}],
            "status": "completed"}


def test_merge_renumbers_and_validates():
    merged = merge_hccl.merge_tables([("a", small_table("10.0.0.1", [0, 1])), ("b", small_table("10.0.0.2", [0, 1]))])
    assert merged["server_count"] == "2"
    assert [d["rank_id"] for s in merged["server_list"] for d in s["device"]] == ["0", "1", "2", "3"]
    assert merge_hccl.validate_table(merged) == 4


@pytest.mark.parametrize("mutate, message", [
    (lambda t: t.pop("server_list"), "missing field"),
    (lambda t: t.update(server_count="2"), "server_count is 2 but server_list has 1"),
    (lambda t: t.update(server_count="two"), "server_count must be a string of digits"),
    (lambda t: t.update(status="pending"), "status is 'pending'"),
    (lambda t: t["server_list"][0]["device"][1].update(device_id="0"), "device_id 0 appears twice"),
    (lambda t: t["server_list"][0]["device"][1].update(rank_id="0"), "rank_id 0 appears twice"),
    (lambda t: t["server_list"][0]["device"][1].update(rank_id="5"), r"missing \[1\]"),
    (lambda t: t["server_list"][0]["device"][0].pop("device_ip"), "missing field.*device_ip"),
    (lambda t: t["server_list"][0].update(device=[]), "has no device"),
])
def test_bad_tables_are_refused(mutate, message):
    table = small_table("10.0.0.1", [0, 1])
    mutate(table)
    with pytest.raises(merge_hccl.RankTableError, match=message):
        merge_hccl.merge_tables([("node1.json", table)])


def test_merge_refuses_a_server_given_twice():
    table = small_table("10.0.0.1", [0, 1])
    earlier = merge_hccl.merge_tables([("a.json", table), ("b.json", small_table("10.0.0.2", [0, 1]))])
    with pytest.raises(merge_hccl.RankTableError, match="both a.json and hccl_2s_4p.json"):
        merge_hccl.merge_tables([("a.json", table), ("hccl_2s_4p.json", earlier)])


def test_merge_cli_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    result = run(MERGE_HCCL, [str(bad)], tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith(f"merge_hccl.py: error: {bad} is not valid JSON")
    assert result.stderr.count("\n") == 1
    result = run(MERGE_HCCL, [str(tmp_path / "missing.json")], tmp_path)
    assert result.returncode == 2 and "rank table not found" in result.stderr


# ------------------------------------------------------------------------- no shadowing of mindformers

def test_repository_mindformers_folder_does_not_shadow_the_package():
    assert not os.path.exists(os.path.join(ROOT, "mindformers", "__init__.py"))
    assert not os.path.exists(os.path.join(TOOLS, "__init__.py"))
    code = ("import mindformers, mindformers.tools, os; "
            "print(mindformers.__file__); print(os.path.dirname(mindformers.tools.__file__))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            check=False, env={**os.environ, "GLOG_v": "3"})
    assert result.returncode == 0, result.stderr
    package_file, tools_dir = result.stdout.strip().splitlines()[-2:]
    assert "site-packages" in package_file and not package_file.startswith(ROOT + os.sep + "mindformers")
    assert "site-packages" in tools_dir
