"""Every command in README.md and docs/*.md names a real script and arguments that script accepts.

Commands are taken from the ```bash blocks (continuation lines joined, ``cd`` followed). A
``python SCRIPT ARGS`` line is checked by running the script's own ``main(ARGS)`` up to the point
where its argparse parser has accepted the arguments; a launcher line (``bash run_*node.sh``) must
have the launcher's four arguments, and the command it wraps is checked the same way. What the
commands then do is covered by the other tests (demo, preprocessing, conversion, training,
inference, launchers).
"""
import argparse
import glob
import importlib.util
import os
import re
import shlex

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
_BLOCK = re.compile(r"```bash\n(.*?)```", re.S)


class _Accepted(Exception):
    """Raised instead of running the script once its parser accepted the arguments."""


def doc_commands():
    """``(doc, cwd, argv)`` for every python/bash command of the docs."""
    found = []
    for doc in DOCS:
        with open(doc, encoding="utf-8") as handle:
            text = handle.read()
        for block in _BLOCK.findall(text):
            cwd = ROOT
            joined = block.replace("\\\n", " ")
            lines = [part for line in joined.splitlines() for part in line.split(" #")[0].split("&&")]
            for line in lines:
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                argv = shlex.split(line)
                if argv[0] == "cd":
                    cwd = os.path.normpath(os.path.join(cwd, argv[1]))
                elif argv[0] in ("python", "bash"):
                    found.append((os.path.relpath(doc, ROOT), cwd, argv))
    return found


def _load(script):
    spec = importlib.util.spec_from_file_location(f"doc_cmd_{abs(hash(script))}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_python_command(cwd, argv, monkeypatch):
    script = os.path.join(cwd, argv[1])
    assert os.path.isfile(script), f"{argv[1]} does not exist (from {cwd})"
    module = _load(script)
    real_parse = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        real_parse(self, args, namespace)          # exits with status 2 on an unknown/invalid argument
        raise _Accepted()

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    with pytest.raises(_Accepted):
        module.main(argv[2:])


COMMANDS = doc_commands()


def test_docs_have_commands():
    scripts = {os.path.basename(argv[1]) for _, _, argv in COMMANDS}
    for expected in ("belle_preprocess.py", "convert_weight.py", "convert_reversed.py", "run_baichuan2.py",
                     "run_baichuan2_chat.py", "run_baichuan2_generate.py", "run_baichuan2_pipeline.py",
                     "merge_lora.py", "hccl_tools.py", "merge_hccl.py", "transform_ckpt.py", "run_singlenode.sh",
                     "run_multinode.sh", "setup.sh", "demo.sh", "test.sh"):
        assert expected in scripts, f"no documented command uses {expected}"


@pytest.mark.parametrize("doc, cwd, argv", COMMANDS, ids=[f"{d}:{' '.join(a[:2])}" for d, _, a in COMMANDS])
def test_documented_command_is_accepted(doc, cwd, argv, monkeypatch):
    if argv[0] == "python":
        check_python_command(cwd, argv, monkeypatch)
        return
    script = os.path.join(cwd, argv[1])
    assert os.path.isfile(script), f"{doc}: {argv[1]} does not exist (from {cwd})"
    if os.path.basename(script) in ("setup.sh", "demo.sh", "test.sh"):
        assert len(argv) == 2, f"{doc}: {argv[1]} takes no arguments here"
        return
    if os.path.basename(script) in ("run_singlenode.sh", "run_multinode.sh"):
        assert len(argv) == 6, f"{doc}: launcher needs \"<command>\" RANK_TABLE_FILE [START,END] RANK_SIZE"
        assert re.fullmatch(r"[\[(]\d+,\d+[\])]", argv[4]) and argv[5].isdigit()
        check_python_command(cwd, shlex.split(argv[2]), monkeypatch)
