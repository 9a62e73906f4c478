import pytest

from bench import peers


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """The truth and the stored runs in a fresh directory, not the repository's cache."""
    monkeypatch.setattr(peers, "CACHE", tmp_path / "cache")
    return tmp_path / "cache"
