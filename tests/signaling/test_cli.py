"""The `telehealth` command: token, check-config, and the embedded serve with its demo."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import aiohttp

from tests.support import start_server_process, write_config


def telehealth(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "telehealth.cli", *args], capture_output=True,
                          text=True, timeout=60, cwd=cwd)


def test_token_prints_a_token_that_signs_in(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    done = telehealth("--config", str(config), "token", "cardio1")
    assert done.returncode == 0, done.stderr
    token = done.stdout.strip()
    assert token.count(".") == 2
    assert f"#token={token}" in done.stderr
    unknown = telehealth("--config", str(config), "token", "nobody")
    assert unknown.returncode == 2 and "nobody" in unknown.stderr


def test_check_config_validates_the_directory(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    done = telehealth("--config", str(config), "check-config")
    assert done.returncode == 0 and "configuration OK" in done.stdout
    (tmp_path / "directory.toml").write_text(
        '[[sites]]\nid = "a"\nname = "A"\ntier = "capital"\nregion = "01"\n')
    bad = telehealth("--config", str(config), "check-config")
    assert bad.returncode == 2
    assert "sites.0.tier = 'capital'" in bad.stderr


async def test_serve_without_a_directory_creates_the_demo_and_prints_working_links(
    tmp_path: Path,
) -> None:
    config = tmp_path / "embedded.toml"
    config.write_text(f'[server]\nport = 0\n[storage]\ndata_dir = "{tmp_path / "var"}"\n')
    server = start_server_process(config)
    try:
        links = [line.strip() for line in server.output if "#token=" in line]
        assert len(links) == 7  # a clinician of each role across the demo sites
        secret = tmp_path / "var" / "token-secret"
        assert secret.stat().st_mode & 0o777 == 0o600
        token = links[0].split("#token=")[1]
        async with aiohttp.ClientSession() as session:
            headers = {"Authorization": f"Bearer {token}"}
            async with session.get(f"{server.url}/api/me", headers=headers) as response:
                assert response.status == 200
                me = await response.json()
            async with session.get(f"{server.url}/") as response:
                assert response.status == 200
                assert "Telehealth Bridge" in await response.text()
        assert me["site"]["tier"] in ("district", "commune", "central")
    finally:
        server.process.terminate()
        server.process.wait(timeout=10)


def test_token_refuses_a_lifetime_of_zero_or_less(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    for ttl in ("0", "-100"):
        done = telehealth("--config", str(config), "token", "cardio1", f"--ttl={ttl}")
        assert done.returncode == 2, (ttl, done.stdout)
        assert done.stdout == ""
        assert f"--ttl: must be > 0 seconds, got {ttl}" in done.stderr
    done = telehealth("--config", str(config), "token", "cardio1", "--ttl", "60")
    assert done.returncode == 0 and done.stdout.count(".") == 2


def test_serve_stops_with_a_message_when_the_relay_port_is_taken(tmp_path: Path) -> None:


    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        config = write_config(tmp_path, relay={"udp_port": port})
        done = telehealth("--config", str(config), "serve")
    assert done.returncode == 2, done.stderr
    assert f"relay.udp_port {port} cannot be bound" in done.stderr
    assert "Traceback" not in done.stderr
