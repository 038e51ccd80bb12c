import pytest

from overnight._registry import LazyRegistry
from overnight.errors import StorageError, StoreError
from overnight.storage import open_storage
from overnight.store import connect_store, register_store


def test_unknown_scheme_names_the_known_ones():
    with pytest.raises(StoreError, match="unknown store 'cassandra'.*sqlite"):
        connect_store("cassandra://x")
    with pytest.raises(StorageError, match="unknown storage 'gs'"):
        open_storage("gs://bucket")


def test_missing_extra_gives_the_install_hint():
    reg = LazyRegistry("store", StoreError, {"x": ("overnight_missing_module:X", "pip install 'overnight[x]'")})
    with pytest.raises(StoreError, match=r"pip install 'overnight\[x\]'"):
        reg.load("x")


def test_no_silent_overwrite():
    with pytest.raises(ValueError, match="already registered"):
        register_store("sqlite", "somewhere:Else")


def test_driver_suffix_selects_the_base_scheme():
    from overnight.store.postgres import PostgresStore

    assert isinstance(connect_store("postgresql+asyncpg://u@h/db"), PostgresStore)
