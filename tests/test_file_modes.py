"""The store's files are private to its account: data dir 0700 and LMDB files 0600, made so at start even for a
store created under a permissive umask, and `hmi serve` creates everything under umask 077."""
from __future__ import annotations

import os
import stat

from services.knowledge_store.layout import StoreLayout


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_a_new_store_is_private_whatever_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        layout = StoreLayout(tmp_path / "data", map_size=1 << 20)
        layout.env.close()
    finally:
        os.umask(old)
    assert mode(tmp_path / "data") == 0o700
    assert mode(tmp_path / "data" / "data.mdb") == 0o600 and mode(tmp_path / "data" / "lock.mdb") == 0o600


def test_an_existing_open_store_is_made_private(tmp_path):
    StoreLayout(tmp_path / "data", map_size=1 << 20).env.close()
    os.chmod(tmp_path / "data", 0o755)
    os.chmod(tmp_path / "data" / "data.mdb", 0o644)
    StoreLayout(tmp_path / "data", map_size=1 << 20).env.close()
    assert mode(tmp_path / "data") == 0o700 and mode(tmp_path / "data" / "data.mdb") == 0o600


def test_running_services_are_private(services):
    """Each service process runs under umask 077, and the store's data dir is 0700."""
    for service in services.services:
        status = open(f"/proc/{service.process.pid}/status").read()
        umask = next(line.split()[1] for line in status.splitlines() if line.startswith("Umask:"))
        assert int(umask, 8) == 0o077, (service.name, umask)
    assert mode(services.data_dir) == 0o700
    assert mode(services.data_dir / "store.lmdb") == 0o700
    assert mode(services.data_dir / "store.lmdb" / "data.mdb") == 0o600
