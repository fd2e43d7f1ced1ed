"""The catalog on both backends (an SQLite file, a real redis-server): writes, reads, the change log, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import redis

from srcid.index.catalog import open_catalog
from srcid.index.errors import (
    BadEmbeddingError,
    BadItemError,
    CatalogMismatchError,
    ChangeLogGapError,
    DuplicateIdError,
    ItemNotFoundError,
    NotDurableError,
)
from srcid.index.items import make_item

DIM = 16


@pytest.fixture(params=["sqlite", "redis"])
def catalog_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite://{tmp_path}/catalog.db"
    return request.getfixturevalue("redis_server").url()


def _item(item_id: str, modality: str = "audio", seed: int = 0, **extra):
    vec = np.random.default_rng(seed).normal(size=DIM)
    return make_item(item_id, modality, vec, DIM, **extra)


def test_metadata_reads_many_items_in_order_whatever_their_metadata_holds(catalog_url, monkeypatch):
    import srcid.index.redis_catalog as redis_catalog

    monkeypatch.setattr(redis_catalog, "METADATA_CHUNK", 3)  # several script calls for one read
    odd = {"title": 'say "hi" \\ / \u00e9\u4e2d \U0001f600', "n": [1, 2.5, None, True], "nested": {"": {}}}
    with open_catalog(catalog_url, DIM, "b1") as cat:
        cat.add([_item(f"i{k}", ("audio", "video", "text")[k % 3], seed=k, metadata={"k": k}) for k in range(8)]
                + [_item('quote"d/\\id', metadata=odd)])
        ids = ["i7", "missing", 'quote"d/\\id', "i0", "i7", *[f"i{k}" for k in range(1, 7)]]
        got = cat.metadata_many(ids)
        assert got[:5] == [("video", {"k": 7}), None, ("audio", odd), ("audio", {"k": 0}), ("video", {"k": 7})]
        assert got[5:] == [(("audio", "video", "text")[k % 3], {"k": k}) for k in range(1, 7)]
        assert cat.metadata_many([]) == []
        if catalog_url.startswith("redis"):  # a restarted Redis has forgotten the script: it is loaded again
            redis.Redis.from_url(catalog_url).script_flush()
            assert cat.metadata_many(["i0"]) == [("audio", {"k": 0})]


def test_add_get_delete_and_change_log(catalog_url):
    with open_catalog(catalog_url, DIM, "b1") as cat:
        codes = {"layer1": [1, 2, 3], "layer2": [4, 5, 6]}
        v = cat.add([_item("a", metadata={"title": "dog"}, codes=codes), _item("t", "text", seed=1)])
        assert v == 2 and cat.version() == 2
        got = cat.get("a")
        assert got.modality == "audio" and got.metadata == {"title": "dog"} and got.codes == codes and got.key == 1
        assert np.allclose(got.embedding, _item("a").embedding) and abs(np.linalg.norm(got.embedding) - 1) < 1e-6
        assert cat.counts() == {"audio": 1, "video": 0, "text": 1}
        assert cat.metadata_many(["t", "gone", "a", "t"]) == [("text", {}), None, ("audio", {"title": "dog"}), ("text", {})]
        assert cat.delete("a") == 3
        assert cat.metadata_many(["a"]) == [None]
        assert cat.get_many(["a", "t"])[0] is None and cat.get_many(["a", "t"])[1].id == "t"
        # Re-adding a deleted id makes a new key, so an index can tell the versions apart.
        cat.add([_item("a", "video", seed=2)])
        assert cat.get("a").key == 4 and cat.get("a").modality == "video"
        changes = cat.changes_since(0)
        assert [(c.seq, c.op, c.id, c.modality, c.key) for c in changes] == [
            (1, "add", "a", "audio", 1), (2, "add", "t", "text", 2), (3, "delete", "a", "audio", 1), (4, "add", "a", "video", 4),
        ]
        assert [c.seq for c in cat.changes_since(2, limit=1)] == [3]
        assert cat.ids("video") == {"a": 4}
        scanned = list(cat.scan_embeddings("text", batch_size=1))
        assert len(scanned) == 1 and scanned[0][1] == ["t"] and scanned[0][2].shape == (1, DIM)


def test_scan_pages_through_everything(catalog_url):
    with open_catalog(catalog_url, DIM, "b1") as cat:
        cat.add([_item(f"i{n}", seed=n) for n in range(57)])
        keys = np.concatenate([k for k, _, _ in cat.scan_embeddings("audio", batch_size=10)])
        assert sorted(keys.tolist()) == list(range(1, 58))


def _unchanged(cat, before):
    assert (cat.version(), cat.counts()) == before


def test_bad_input_is_refused_and_nothing_changes(catalog_url):
    with open_catalog(catalog_url, DIM, "b1") as cat:
        cat.add([_item("a")])
        before = (cat.version(), cat.counts())
        bad_vectors = {
            "wrong size": np.ones(DIM + 1),
            "NaN": np.r_[np.ones(DIM - 1), np.nan],
            "inf": np.r_[np.ones(DIM - 1), np.inf],
            "zero": np.zeros(DIM),
        }
        for what, vec in bad_vectors.items():
            with pytest.raises(BadEmbeddingError) as err:
                make_item("x", "audio", vec, DIM)
            assert err.value.code == "bad_embedding" and "'x'" in str(err.value), what
        with pytest.raises(BadEmbeddingError, match=f"expected size {DIM}"):
            make_item("x", "audio", np.ones(DIM + 1), DIM)
        with pytest.raises(BadItemError, match="modality"):
            make_item("x", "smell", np.ones(DIM), DIM)
        with pytest.raises(BadItemError, match="codes"):
            make_item("x", "audio", np.ones(DIM), DIM, codes={"layer1": [1, -2], "layer2": [1, 2]})
        with pytest.raises(BadItemError, match="metadata"):
            make_item("x", "audio", np.ones(DIM), DIM, metadata=["not", "an", "object"])
        with pytest.raises(BadItemError, match="id"):
            make_item("", "audio", np.ones(DIM), DIM)
        # A duplicate anywhere in a batch rejects the whole batch: "b" must not be written either.
        with pytest.raises(DuplicateIdError) as err:
            cat.add([_item("b"), _item("a")])
        assert err.value.code == "duplicate_id" and err.value.http_status == 409 and "'a'" in str(err.value)
        with pytest.raises(DuplicateIdError, match="twice"):
            cat.add([_item("c"), _item("c")])
        with pytest.raises(ItemNotFoundError) as err:
            cat.get("nope")
        assert err.value.code == "not_found" and err.value.http_status == 404
        with pytest.raises(ItemNotFoundError):
            cat.delete("nope")
        # An item built for another E cannot slip in through add().
        with pytest.raises(BadEmbeddingError):
            cat.add([make_item("y", "audio", np.ones(DIM * 2), DIM * 2)])
        _unchanged(cat, before)
        assert cat.get_many(["b", "c"]) == [None, None]
        cat.add([_item("b")])
        assert cat.version() == before[0] + 1 and cat.count("audio") == 2


def test_binding_to_embedding_size_and_bundle(catalog_url):
    open_catalog(catalog_url, DIM, "b1").close()
    with pytest.raises(CatalogMismatchError, match=f"size {DIM}, not {DIM + 1}"):
        open_catalog(catalog_url, DIM + 1, "b1")
    with pytest.raises(CatalogMismatchError, match="bundle 'b1', not 'b2'"):
        open_catalog(catalog_url, DIM, "b2")
    with open_catalog(catalog_url) as cat:  # an existing catalog tells its own binding
        assert (cat.dim, cat.bundle_version) == (DIM, "b1")


def test_new_catalog_needs_its_binding(tmp_path):
    with pytest.raises(CatalogMismatchError, match="--dim"):
        open_catalog(f"sqlite://{tmp_path}/new.db")
    with pytest.raises(ValueError, match="expected sqlite"):
        open_catalog("postgres://x/y", DIM, "b1")


def test_change_log_gap_is_detected(tmp_path):
    url = f"sqlite://{tmp_path}/catalog.db"
    with open_catalog(url, DIM, "b1") as cat:
        cat.add([_item(f"i{n}", seed=n) for n in range(5)])
        cat._db.execute("DELETE FROM changes WHERE seq = 3")  # what a compaction of the log would leave
        assert [c.seq for c in cat.changes_since(3)] == [4, 5]
        with pytest.raises(ChangeLogGapError):
            cat.changes_since(1)


def test_redis_without_aof_is_refused(redis_server):
    redis.Redis(port=redis_server.port).config_set("appendonly", "no")
    with pytest.raises(NotDurableError, match="appendonly"):
        open_catalog(redis_server.url(), DIM, "b1")
    with open_catalog(redis_server.url() + "?durability=none", DIM, "b1") as cat:
        assert cat.add([_item("a")]) == 1


def test_redis_prefixes_and_dbs_are_separate_catalogs(redis_server):
    with open_catalog(redis_server.url(0), DIM, "b1") as one, open_catalog(redis_server.url(0) + "?prefix=other:", DIM, "b2") as two:
        one.add([_item("a")])
        assert two.count() == 0 and two.version() == 0 and one.uid != two.uid


def test_acknowledged_redis_writes_survive_a_redis_crash(redis_server):
    with open_catalog(redis_server.url(), DIM, "b1") as cat:
        cat.add([_item(f"i{n}", seed=n) for n in range(20)])
        cat.delete("i3")
    redis_server.kill()  # SIGKILL: no shutdown save, only the AOF remains
    redis_server.start()
    with open_catalog(redis_server.url(), DIM, "b1") as cat:
        assert cat.version() == 21 and cat.count("audio") == 19 and cat.get_many(["i3"]) == [None]
        assert np.allclose(cat.get("i7").embedding, _item("i7", seed=7).embedding)
