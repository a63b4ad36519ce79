"""docs/deployment.md's systemd units: each one passes `systemd-analyze verify`, with no warning.

The units are the ```ini blocks of that file whose first line names where they go
(`# /etc/systemd/system/NAME`). They are written to a temporary directory with the documented
install path (/srv/mailroom) replaced by this checkout, whose .venv/bin/python exists: systemd
then checks the commands too, not only the syntax.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEPLOYMENT = ROOT / "docs" / "deployment.md"
INSTALL_PATH = "/srv/mailroom"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze") or "/usr/bin/systemd-analyze"

# A unit: an ```ini block that starts with the comment naming its file.
UNIT_BLOCK = re.compile(r"^```ini\n# /etc/systemd/system/(?P<name>\S+)\n(?P<body>.*?)^```$", re.MULTILINE | re.DOTALL)

needs_systemd_analyze = pytest.mark.skipif(
    not Path(SYSTEMD_ANALYZE).exists(), reason="systemd-analyze is not installed (Debian: apt-get install systemd)"
)


def documented_units() -> dict[str, str]:
    """File name -> text of every unit in docs/deployment.md, in the order they appear."""
    units = {m["name"]: m["body"] for m in UNIT_BLOCK.finditer(DEPLOYMENT.read_text())}
    assert units, "no ```ini block starting with '# /etc/systemd/system/NAME' in docs/deployment.md"
    return units


def directives(text: str) -> dict[str, dict[str, list[str]]]:
    """Section -> key -> values (a key may repeat) of a unit file."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
        else:
            key, _, value = line.partition("=")
            current.setdefault(key.strip(), []).append(value.strip())
    return sections


def test_the_units_are_documented():
    units = documented_units()
    assert set(units) == {
        "mailroom-web.service", "mailroom-worker@.service", "mailroom-relay.service",
        "mailroom-prune.service", "mailroom-prune.timer",
    }
    for name, text in units.items():
        if not name.endswith(".service"):
            continue
        service = directives(text)["Service"]
        assert service["EnvironmentFile"] == ["/etc/mailroom/mailroom.env"], name
        assert service["Restart"] == ["on-failure"], name
        assert service["User"] == ["mailroom"], name
        assert service["KillSignal"] == ["SIGTERM"], name
        assert service["ExecStart"][0].startswith(f"{INSTALL_PATH}/.venv/bin/python "), name
        assert service["NoNewPrivileges"] == ["true"] and service["ProtectSystem"] == ["strict"], name
        # Secrets live in the environment file, never in a unit.
        assert "Environment" not in service and "://" not in text, name
    worker = directives(units["mailroom-worker@.service"])["Service"]
    assert worker["ExecStart"] == [f"{INSTALL_PATH}/.venv/bin/python manage.py consume %I --queue-type quorum"]
    timer = directives(units["mailroom-prune.timer"])["Timer"]
    assert timer["Unit"] == ["mailroom-prune.service"]
    assert timer["Persistent"] == ["true"]
    assert "manage.py prune" in directives(units["mailroom-prune.service"])["Service"]["ExecStart"][0]


@needs_systemd_analyze
def test_systemd_analyze_verifies_every_unit(tmp_path):
    paths = []
    for name, text in documented_units().items():
        path = tmp_path / name
        path.write_text(text.replace(INSTALL_PATH, str(ROOT)))
        paths.append(path)
    # The template as it is enabled (`mailroom-worker@hello`): %I expanded into the command line.
    instance = tmp_path / "mailroom-worker@hello.service"
    instance.write_text((tmp_path / "mailroom-worker@.service").read_text())
    paths.append(instance)

    out = subprocess.run([SYSTEMD_ANALYZE, "verify", "--man=no", *map(str, paths)], check=False,
                         capture_output=True, text=True, timeout=120)
    output = out.stdout + out.stderr
    # The host's own units may draw warnings of their own: only lines about ours count.
    ours = [line for line in output.splitlines() if "mailroom-" in line or str(tmp_path) in line]
    assert out.returncode == 0, output
    assert ours == [], "\n".join(ours)


@needs_systemd_analyze
def test_systemd_analyze_would_catch_a_broken_unit(tmp_path):
    """The verification is real: a missing binary and an unknown key are reported for our unit."""
    text = documented_units()["mailroom-relay.service"]
    path = tmp_path / "mailroom-relay.service"
    path.write_text(text.replace("[Service]\n", "[Service]\nNoSuchKey=1\n"))  # the path left at /srv/mailroom
    out = subprocess.run([SYSTEMD_ANALYZE, "verify", "--man=no", str(path)], check=False,
                         capture_output=True, text=True, timeout=120)
    output = out.stdout + out.stderr
    assert out.returncode != 0, output
    assert "NoSuchKey" in output and f"{INSTALL_PATH}/.venv/bin/python" in output, output
