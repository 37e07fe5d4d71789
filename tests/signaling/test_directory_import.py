"""`telehealth directory import` and `export` (the real CLI on the store while no server runs),
and `POST /api/directory/import` on a running one: 1,000 sites and 3,000 clinicians with
Vietnamese names, every row then found through the search API; a file with bad rows reports
each with its line number and changes nothing, dry run or not."""

from __future__ import annotations

import asyncio
import csv
import io
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from recorder.audit import AUDIT_LOG, AuditLog
from signaling.directory_admin import CSV_COLUMNS
from signaling.directory_api import DIRECTORY_ADMIN
from tests.support import run_server, write_config

SITES = 1000
CLINICIANS = 3000
REGIONS = {"01": "Hà Nội", "04": "Cao Bằng", "11": "Điện Biên", "22": "Quảng Ninh",
           "31": "Hải Phòng", "46": "Huế", "48": "Đà Nẵng", "56": "Khánh Hòa",
           "79": "Hồ Chí Minh", "96": "Cà Mau"}
"""Province codes (General Statistics Office) and names, as IT would import them."""
SURNAMES = ("Nguyễn", "Trần", "Lê", "Phạm", "Hoàng", "Huỳnh", "Phan", "Vũ", "Võ", "Đặng")
GIVEN = ("Thị Hương", "Văn Đức", "Minh Thư", "Quốc Bảo", "Thanh Hà", "Ngọc Ánh", "Đình Khôi")
TIERS = ("commune", "district", "provincial", "central")


def telehealth(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "telehealth.cli", *args], capture_output=True,
                          text=True, timeout=60)


def generated_csv() -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    codes = sorted(REGIONS)
    for code in codes:
        writer.writerow(["region", code, REGIONS[code], "", "", "", "", "", ""])
    for i in range(SITES):
        writer.writerow(["site", f"tyt-{i:04d}", f"Trạm Y tế xã Đồng Tâm số {i}", "",
                         TIERS[i % 4], codes[i % len(codes)], "", "", "true"])
    for i in range(CLINICIANS):
        name = f"BS. {SURNAMES[i % 10]} {GIVEN[i % 7]} {i}"
        roles, specialties = (("specialist", "cardiology;nhi-khoa") if i % 3 == 0
                              else ("referring", ""))
        writer.writerow(["clinician", f"bs-{i:05d}", name, f"tyt-{i % SITES:04d}", "", "",
                         roles, specialties, "true" if i % 50 else "false"])
    return out.getvalue()


@pytest.mark.asyncio
async def test_import_of_thousands_then_every_row_is_found(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    source = tmp_path / "directory.csv"
    source.write_text(generated_csv(), encoding="utf-8")
    started = time.monotonic()
    done = telehealth("--config", str(config), "directory", "import", str(source))
    wall = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    print(f"CLI import of {SITES} sites and {CLINICIANS} clinicians: {done.stdout.strip()} "
          f"({wall:.2f} s with the process start)")
    assert f"created {SITES} sites and {CLINICIANS} clinicians" in done.stdout
    # Importing the same file again changes nothing; the export gives the rows back.
    again = telehealth("--config", str(config), "directory", "import", str(source))
    assert again.returncode == 0 and f"{SITES + CLINICIANS + len(REGIONS)} unchanged" in \
        again.stdout, again.stdout
    exported = tmp_path / "export.csv"
    assert telehealth("--config", str(config), "directory", "export", "--out",
                      str(exported)).returncode == 0
    assert set(source.read_text(encoding="utf-8").splitlines()) <= \
        set(exported.read_text(encoding="utf-8").splitlines())
    # `telehealth token` reads the store too.
    token = telehealth("--config", str(config), "token", "bs-00001")
    assert token.returncode == 0, token.stderr

    async with run_server(config) as server, aiohttp.ClientSession() as session:
        headers = {"Authorization": f"Bearer {server.token('admin')}"}

        async def get(path: str, **params: str) -> dict[str, Any]:
            async with session.get(server.url + path, params=params,
                                   headers=headers) as response:
                assert response.status == 200, await response.text()
                answer: dict[str, Any] = await response.json()
                return answer

        started = time.monotonic()
        seen: dict[str, dict[str, Any]] = {}
        for kind in ("sites", "clinicians"):
            page = 1
            while page <= 20:
                found = await get(f"/api/directory/{kind}", per_page="500", page=str(page))
                seen.update({f"{kind}:{row['id']}": row for row in found[kind]})
                if page >= found["pages"]:
                    break
                page += 1
        print(f"every row listed through the API in {time.monotonic() - started:.2f} s")
        assert {f"sites:tyt-{i:04d}" for i in range(SITES)} <= set(seen)
        assert {f"clinicians:bs-{i:05d}" for i in range(CLINICIANS)} <= set(seen)
        assert seen["sites:tyt-0002"]["region_name"] == "Điện Biên"
        assert seen["clinicians:bs-00003"]["name"] == "BS. Phạm Quốc Bảo 3"
        assert seen["clinicians:bs-00050"]["active"] is False
        # Each row by a text search, sampled across the file; diacritics optional.
        started = time.monotonic()
        for i in range(0, CLINICIANS, 97):
            found = await get("/api/directory/clinicians", q=f"bs-{i:05d}")
            assert [c["id"] for c in found["clinicians"]] == [f"bs-{i:05d}"]
        for i in range(0, SITES, 41):
            found = await get("/api/directory/sites", q=f"dong tam so {i}", per_page="500")
            assert f"tyt-{i:04d}" in {s["id"] for s in found["sites"]}
        print(f"{len(range(0, CLINICIANS, 97)) + len(range(0, SITES, 41))} searches over HTTP "
              f"in {time.monotonic() - started:.2f} s")
        found = await get("/api/directory/clinicians", q="nguyen thi huong", role="specialist",
                          region="01", active="true")
        assert found["total"] > 0 and all(
            c["name"].startswith("BS. Nguyễn Thị Hương") and c["region"] == "01"
            for c in found["clinicians"])
        admin = server.app[DIRECTORY_ADMIN] if server.app else None
        assert admin is not None
        me = server.tokens.verify(server.token("admin"))
        started = time.perf_counter()
        for _ in range(20):
            admin.search_clinicians(me, q="tran van duc", per_page=50)
        each = (time.perf_counter() - started) / 20 * 1000
        print(f"search over {len(admin.directory.all_clinicians)} clinicians in memory: "
              f"{each:.1f} ms")
        assert each < 200


BAD_ROWS = [
    ("site", 'site,tyt-x,"Trạm Y tế xã X,,commune,01,,,true', "malformed CSV"),
    ("site", "site,tyt-y,Trạm Y tế xã Y,,commune,01,,true", "malformed CSV"),
    ("site", "site,tyt-ok,Trạm Y tế xã Ổn,,commune,01,,,true", ""),
    ("site", "site,tyt-ok,Trạm Y tế xã Ổn lần hai,,commune,01,,,true", "duplicate_id"),
    ("clinician", "clinician,bs-lost,BS. Lạc,nowhere,,,referring,,true", "unknown_site"),
    ("clinician", "clinician,bs-role,BS. Vai,tyt-ok,,,surgeon,,true", "surgeon"),
    ("clinician", "clinician,bs-flag,BS. Cờ,tyt-ok,,,referring,,maybe", "active"),
    ("clinician", "clinician,ref1,Referring One,d1,,,referring,,true", "duplicate_id"),
    ("clinician", "clinician,ref1,Referring Again,d1,,,referring,,true", ""),
    ("site", "hospital,h1,H,,central,01,,,true", "kind"),
    ("site", "site,tyt-z,Z,d1,commune,01,,,true", "site"),
]


def test_bad_rows_are_each_reported_and_nothing_changes(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    lines = [",".join(CSV_COLUMNS)] + [row for _, row, _ in BAD_ROWS]
    # The duplicate clinician id is the second ref1 row (line 10), reported against line 9.
    expected = {number: what for number, (_, _, what) in enumerate(BAD_ROWS, start=2) if what}
    expected[10] = expected.pop(9)
    source = tmp_path / "bad.csv"
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    before = telehealth("--config", str(config), "directory", "export")
    assert before.returncode == 0
    audit = AuditLog(Path(tmp_path / "data" / "archive" / AUDIT_LOG))
    for flags in (["--dry-run"], []):
        done = telehealth("--config", str(config), "directory", "import", str(source), *flags)
        assert done.returncode == 2, done.stdout
        reported = [line for line in done.stderr.splitlines() if line.startswith("line ")]
        numbers = [int(line.split(":")[0].removeprefix("line ")) for line in reported]
        assert numbers == sorted(expected), done.stderr
        for line in reported:
            number = int(line.split(":")[0].removeprefix("line "))
            assert expected[number] in line, line
        assert f"{len(expected)} bad rows" in done.stderr and "nothing was imported" in \
            done.stderr
        after = telehealth("--config", str(config), "directory", "export")
        assert after.stdout == before.stdout
    assert not [e for e in audit.entries() if e["action"] == "directory.import"]
    # A clean dry run says what it would do, and does nothing either.
    good = tmp_path / "good.csv"
    good.write_text("\n".join([lines[0], BAD_ROWS[2][1], BAD_ROWS[8][1]]) + "\n",
                    encoding="utf-8")
    dry = telehealth("--config", str(config), "directory", "import", str(good), "--dry-run")
    assert dry.returncode == 0 and "would create 1 sites" in dry.stdout, dry.stdout
    assert "updated 0 sites and 1 clinicians" in dry.stdout
    assert telehealth("--config", str(config), "directory", "export").stdout == before.stdout


@pytest.mark.asyncio
async def test_toml_file_and_http_import(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    toml = tmp_path / "more.toml"
    toml.write_text('[[regions]]\nid = "11"\nname = "Điện Biên"\n\n'
                    '[[sites]]\nid = "ttyt-muongnhe"\nname = "Trung tâm Y tế huyện Mường Nhé"\n'
                    'tier = "district"\nregion = "11"\n\n'
                    '[[clinicians]]\nid = "bs-lan"\nname = "BS. Nguyễn Thị Lan"\n'
                    'site = "ttyt-muongnhe"\nroles = ["referring"]\n\n'
                    '[[clinicians]]\nid = "bs-bad"\nname = "X"\nsite = "ttyt-muongnhe"\n'
                    'roles = ["surgeon"]\n', encoding="utf-8")
    bad = telehealth("--config", str(config), "directory", "import", str(toml))
    assert bad.returncode == 2 and "clinicians[1]" in bad.stderr and "surgeon" in bad.stderr
    toml.write_text(toml.read_text(encoding="utf-8").replace('"surgeon"', '"specialist"'),
                    encoding="utf-8")
    done = telehealth("--config", str(config), "directory", "import", str(toml))
    assert done.returncode == 0, done.stderr
    async with run_server(config) as server, aiohttp.ClientSession() as session:
        assert server.tokens.issue("bs-lan")
        url = server.url + "/api/directory/import"
        header = ",".join(CSV_COLUMNS)
        body = f"{header}\nclinician,bs-an,BS. Đỗ An,ttyt-muongnhe,,,referring,,true\n"
        admin = {"Authorization": f"Bearer {server.token('admin')}"}
        async with session.post(url, data=(body + "clinician,bs-b,B,nowhere,,,referring,,\n"
                                           ).encode(), headers=admin) as response:
            answer = await response.json()
            assert response.status == 422 and answer["error"]["code"] == "import_invalid"
            assert answer["error"]["problems"] == [answer["error"]["problems"][0]]
            assert answer["error"]["problems"][0].startswith("line 3: unknown_site")
        async with session.post(url, data=body.encode(), params={"dry_run": "1"},
                                headers=admin) as response:
            assert (await response.json())["import"]["clinicians_created"] == 1
        with pytest.raises(KeyError):
            server.tokens.issue("bs-an")
        async with session.post(url, data=body.encode(), headers=admin) as response:
            assert response.status == 200
        assert server.tokens.verify(server.tokens.issue("bs-an")).site.id == "ttyt-muongnhe"
        referring = {"Authorization": f"Bearer {server.token('ref1')}"}
        async with session.post(url, data=body.encode(), headers=referring) as response:
            assert response.status == 403
        async with session.get(server.url + "/api/directory/regions", headers=admin) as response:
            assert {"id": "11", "name": "Điện Biên"} in (await response.json())["regions"]
        # Wherever a site is shown, its province's name comes with the code.
        async with session.get(server.url + "/api/sites", headers=referring) as response:
            shown = {s["id"]: s for s in (await response.json())["sites"]}
        assert shown["ttyt-muongnhe"]["region_name"] == shown["d1"]["region_name"] == \
            "Điện Biên"
        assert shown["c1"]["region_name"] == "01"  # no name imported for it: the code

        # The CLI into the running server (the TOML file as it is; then a bad CSV).
        async def cli(*args: str) -> tuple[int, str, str]:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "telehealth.cli", "--config", str(config), "directory",
                "import", *args, "--server", server.url, "--token", server.token("admin"),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            out, err = await asyncio.wait_for(process.communicate(), 60)
            return process.returncode or 0, out.decode(), err.decode()

        toml.write_text(toml.read_text(encoding="utf-8").replace("BS. Nguyễn Thị Lan",
                                                                 "BS. Nguyễn Thị Lan Anh"),
                        encoding="utf-8")
        code, out, err = await cli(str(toml))
        assert code == 0 and "updated 0 sites and 1 clinicians" in out, err
        assert server.tokens.verify(server.token("bs-lan")).clinician.name == \
            "BS. Nguyễn Thị Lan Anh"
        bad_csv = tmp_path / "bad.csv"
        bad_csv.write_text(body + "clinician,bs-c,C,d1,,,doctor,,\n", encoding="utf-8")
        code, out, err = await cli(str(bad_csv), "--dry-run")
        assert code == 2 and err.startswith("line 3: clinician 'bs-c'") and "doctor" in err
