"""-q means the same in every command: a quieter standard error, never fewer records.

The README's pipes run from cron with -q; each stage still hands every record to the next.
Real commands on real pipes, the Maildir relay, DCMTK's storescp and storescu.
"""

from __future__ import annotations

import os

from conftest import require_tool, run
from dcmtk import free_port, output, run_tool, start_dserve, start_storescp, stop
from dtools.sample import generate
from mailsites import make_sites

N = 4  # instances in the study


def quiet(name: str, *args: str, input: bytes | None = None, kinds: tuple[str, ...] = ("instance",)):
    r = run(name, "-q", *args, input=input)
    assert r.returncode == 0, f"{name}: {r.stderr}"
    assert r.stderr == "", f"{name} -q printed on stderr: {r.stderr}"
    assert r.records and {x["kind"] for x in r.records} <= set(kinds), (name, r.records)
    return r


def test_every_command_with_q_still_prints_its_records(tmp_path):
    sites = make_sites(tmp_path, f"maildir:{tmp_path}/relay")
    a, b = str(sites["site-a"]), str(sites["site-b"])
    pacs = tmp_path / "pacs"
    generate(pacs, studies=1, series=2, instances=2)

    assert len(quiet("dindex", "--home", a, str(pacs)).records) == N
    found = quiet("dsearch", "--home", a, "--level", "instance")
    assert len(found.records) == N
    sealed = quiet("dseal", "--home", a, "--to", "site-b", input=found.stdout, kinds=("envelope",))
    assert len(sealed.records) == 1
    sent = quiet("dmail-send", "--home", a, input=sealed.stdout, kinds=("message",))
    assert [m["status"] for m in sent.records] == ["sent"]
    got = quiet("dmail-recv", "--home", b, kinds=("envelope",))
    opened = quiet("dseal", "--home", b, "--open", input=got.stdout)
    assert len(opened.records) == N
    indexed = quiet("dindex", "--home", b, input=opened.stdout)
    assert len(indexed.records) == N and {r["envelope_id"] for r in indexed.records} == {sealed.records[0]["envelope_id"]}
    receipts = quiet("dmail-send", "--home", b, "--receipts", input=indexed.stdout, kinds=("message", "receipt"))
    assert receipts.records
    back = quiet("dmail-recv", "--home", a, kinds=("receipt",))
    assert [r["status"] for r in back.records] == ["delivered"]

    # dstore pushes to a PACS
    port = free_port()
    scp = start_storescp(require_tool("storescp"), tmp_path / "pacs-recv", port, "PACS")
    try:
        stored = quiet("dstore", f"PACS@127.0.0.1:{port}", input=found.stdout)
    finally:
        stop(scp)
    assert [r["status"] for r in stored.records] == ["stored"] * N

    # dserve stores what a modality sends
    storescu = require_tool("storescu")
    port = free_port()
    server = start_dserve(tmp_path / "node", port, "-q", "--aet", "DTOOLS")
    try:
        res = run_tool(storescu, "-aec", "DTOOLS", "127.0.0.1", str(port), *map(str, sorted(pacs.rglob("*.dcm"))))
        assert res.returncode == 0, res.stderr
    finally:
        stop(server)
    out, err = output(server)
    assert len([line for line in out.splitlines() if line.strip()]) == N, err
    assert os.path.exists(tmp_path / "node" / "index.db")
