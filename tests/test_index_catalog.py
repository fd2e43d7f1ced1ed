"""An index kept equal to its catalog: persistence, refusal and rebuild, catch-up, new processes, replicas, crashes."""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from srcid.cli import main as srcid_main
from srcid.index import persist
from srcid.index.backends import cpu_has_avx512_vnni
from srcid.index.catalog import open_catalog
from srcid.index.catalog_index import open_index_for_catalog
from srcid.index.config import IndexConfig
from srcid.index.errors import BadEmbeddingError, BadQueryError, CatalogMismatchError
from srcid.index.items import MODALITIES, make_item

DIM = 16
CPU = IndexConfig(backend="faiss-cpu")
INT8_NAME = "int8-cpu-exact" if cpu_has_avx512_vnni() else "int8-mlas-cpu-exact"  # the int8 kind's engine on this CPU
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["sqlite", "redis"])
def catalog_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite://{tmp_path}/catalog.db"
    return request.getfixturevalue("redis_server").url()


def vec(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=DIM)


def fill(cat, start: int, stop: int) -> None:
    cat.add([make_item(f"i{n}", MODALITIES[n % 3], vec(n), DIM, metadata={"n": n}) for n in range(start, stop)])


def assert_equal_to_catalog(index, cat) -> None:
    assert index.position == cat.version()
    assert index.counts() == cat.counts()
    for modality in MODALITIES:
        assert index.modalities[modality].key_of == cat.ids(modality)
    assert index.check_against_catalog(sample=30) == []


@pytest.mark.parametrize("config,backend", [(CPU, "faiss-cpu-flat"), (IndexConfig(backend="torch", torch_device="cpu"), "torch-cpu-fp32"),
                                            (IndexConfig(backend="blas"), "blas-cpu-fp32"), (IndexConfig(backend="bf16"), "bf16-cpu-exact"),
                                            (IndexConfig(backend="int8"), INT8_NAME)],
                         ids=["faiss-cpu", "torch-cpu", "blas", "bf16", "int8"])
def test_search_finds_items_and_validates_queries(catalog_url, tmp_path, config, backend):
    with open_catalog(catalog_url, DIM, "b1") as cat:
        fill(cat, 0, 90)
        index = open_index_for_catalog(cat, tmp_path / "ix", "b1", DIM, config)
        assert index.backend_name == backend
        hits = index.search("video", vec(4), k=5)[0]
        assert hits[0][0] == "i4" and hits[0][1] == pytest.approx(1.0, abs=1e-5)
        assert len(hits) == 5 and all(int(i[1:]) % 3 == 1 for i, _ in hits)  # only video items
        assert [h[1] for h in hits] == sorted((h[1] for h in hits), reverse=True)
        cat.delete("i4")
        index.sync()
        assert "i4" not in [i for i, _ in index.search("video", vec(4), k=30)[0]]
        with pytest.raises(BadEmbeddingError, match=f"size {DIM}"):
            index.search("video", np.ones(DIM + 2))
        with pytest.raises(BadEmbeddingError, match="NaN"):
            index.search("video", np.full(DIM, np.nan))
        with pytest.raises(BadQueryError, match="top_k"):
            index.search("video", vec(1), k=0)
        with pytest.raises(BadQueryError, match="modality"):
            index.search("smell", vec(1))
        assert_equal_to_catalog(index, cat)


def test_persisted_index_is_loaded_caught_up_or_rebuilt(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="srcid.index")
    ix = tmp_path / "ix"
    with open_catalog(f"sqlite://{tmp_path}/c.db", DIM, "b1") as cat:
        fill(cat, 0, 60)
        first = open_index_for_catalog(cat, ix, "b1", DIM, CPU)
        saved_at = json.loads((ix / "manifest.json").read_text())
        assert saved_at["position"] == 60 and saved_at["bundle_version"] == "b1" and saved_at["dim"] == DIM
        assert {m: e["count"] for m, e in saved_at["modalities"].items()} == {"audio": 20, "video": 20, "text": 20}

        # Changes after the save: adds, deletes, an id deleted and re-added in another modality.
        fill(cat, 60, 75)
        cat.delete("i5")
        cat.delete("i6")
        cat.add([make_item("i6", "audio", vec(600), DIM)])
        caplog.clear()
        second = open_index_for_catalog(cat, ix, "b1", DIM, CPU)
        assert "caught up 18 changes" in caplog.text and "rebuilding" not in caplog.text
        assert_equal_to_catalog(second, cat)
        assert second.search("audio", vec(600), 1)[0][0][0] == "i6"
        assert json.loads((ix / "manifest.json").read_text())["position"] == cat.version()
        # One set of data files: older generations are removed once the new manifest is in place.
        assert len(list(ix.glob("audio-*.vectors.npy"))) == 1 and not list(ix.glob(".*.tmp"))

        def tamper(**fields):
            manifest = json.loads((ix / "manifest.json").read_text())
            manifest.update(fields)
            (ix / "manifest.json").write_text(json.dumps(manifest))

        for fields, reason in [
            ({"bundle_version": "b0"}, "built for bundle 'b0', the catalog holds bundle 'b1'"),
            ({"dim": DIM * 2}, f"size {DIM * 2}, the catalog holds size {DIM}"),
            ({"position": 10_000}, "ahead of the catalog"),
            ({"catalog_uid": "someone-else"}, "built from another catalog"),
            ({"format_version": 99}, "format_version 99"),
        ]:
            tamper(**fields)
            caplog.clear()
            rebuilt = open_index_for_catalog(cat, ix, "b1", DIM, CPU)
            assert reason in caplog.text and "rebuilding from catalog" in caplog.text
            assert_equal_to_catalog(rebuilt, cat)

        manifest = json.loads((ix / "manifest.json").read_text())
        (ix / manifest["modalities"]["text"]["vectors"]).write_bytes(b"not an npy file")
        caplog.clear()
        assert_equal_to_catalog(open_index_for_catalog(cat, ix, "b1", DIM, CPU), cat)
        assert "unreadable" in caplog.text

        with pytest.raises(CatalogMismatchError, match="bundle 'b1'"):
            open_index_for_catalog(cat, ix, "b2", DIM, CPU)
        with pytest.raises(CatalogMismatchError, match="size 16"):
            open_index_for_catalog(cat, ix, "b1", DIM + 1, CPU)
        assert first.counts() == {"audio": 20, "video": 20, "text": 20}


def test_ivf_index_persists_its_centroids_and_nprobe(tmp_path):
    config = IndexConfig(kind="ivf", backend="faiss-cpu", ivf_min_items=1000)
    with open_catalog(f"sqlite://{tmp_path}/c.db", DIM, "b1") as cat:
        cat.add([make_item(f"a{n}", "audio", vec(n), DIM) for n in range(1500)] + [make_item("t", "text", vec(1), DIM)])
        built = open_index_for_catalog(cat, tmp_path / "ix", config=config)
        entry = json.loads((tmp_path / "ix" / "manifest.json").read_text())["modalities"]["audio"]
        assert built.modalities["audio"].backend.name == "faiss-cpu-ivf" and built.modalities["text"].backend.name == "faiss-cpu-flat"
        assert entry["nprobe"] == built.modalities["audio"].ivf.nprobe and entry["recall_at_10"] >= 0.95
        loaded = open_index_for_catalog(cat, tmp_path / "ix", config=config)
        assert np.array_equal(loaded.modalities["audio"].ivf.centroids, built.modalities["audio"].ivf.centroids)
        assert loaded.search("audio", vec(7), 1)[0][0][0] == "a7"
        # A modality that grows past ivf_min_items gets its IVF at the next start.
        cat.add([make_item(f"t{n}", "text", vec(5000 + n), DIM) for n in range(999)])
        grown = open_index_for_catalog(cat, tmp_path / "ix", config=config)
        assert grown.modalities["text"].backend.name == "faiss-cpu-ivf"
        # Asking for exact search refuses the IVF index and rebuilds a flat one.
        flat = open_index_for_catalog(cat, tmp_path / "ix", config=CPU)
        assert flat.modalities["audio"].backend.name == "faiss-cpu-flat"


def test_cli_build_stats_verify(tmp_path, capsys):
    url, ix = f"sqlite://{tmp_path}/c.db", tmp_path / "ix"
    common = ["--catalog", url, "--index-dir", str(ix), "--backend", "faiss-cpu"]
    with open_catalog(url, DIM, "b1") as cat:
        fill(cat, 0, 40)
    assert srcid_main(["index", "verify", *common]) == 1
    assert "no manifest.json" in capsys.readouterr().out
    assert srcid_main(["index", "build", *common, "--bundle-version", "b1", "--dim", str(DIM)]) == 0
    assert json.loads(capsys.readouterr().out)["built"]["counts"] == {"audio": 14, "video": 13, "text": 13}
    assert srcid_main(["index", "stats", *common]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["catalog"]["version"] == 40 and stats["manifest"]["position"] == 40
    assert srcid_main(["index", "verify", *common]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True

    with open_catalog(url) as cat:  # the catalog moves on: verify catches up in memory and still agrees
        fill(cat, 40, 45)
    assert srcid_main(["index", "verify", *common]) == 0
    assert json.loads(capsys.readouterr().out)["behind_catalog_by"] == 5

    manifest = json.loads((ix / "manifest.json").read_text())
    vectors_file = ix / manifest["modalities"]["audio"]["vectors"]
    vectors = np.load(vectors_file)
    np.save(vectors_file, np.roll(vectors, 1, axis=0))  # same shape, vectors under the wrong ids
    assert srcid_main(["index", "verify", *common]) == 1
    assert "differs from the catalog" in capsys.readouterr().out
    assert srcid_main(["index", "stats", *common, "--dim", "8"]) == 2
    assert "size 16, not 8" in capsys.readouterr().err


REOPEN = """
import json, logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
import numpy as np
from srcid.index.catalog import open_catalog
from srcid.index.catalog_index import open_index_for_catalog
from srcid.index.config import IndexConfig
url, ix = sys.argv[1], sys.argv[2]
cat = open_catalog(url)
index = open_index_for_catalog(cat, ix, config=IndexConfig(backend="faiss-cpu"), save=False)
item = cat.get("i7")
print(json.dumps({
    "counts": index.counts(), "position": index.position, "metadata": item.metadata,
    "top": index.search(item.modality, item.embedding, 3)[0], "problems": index.check_against_catalog(50),
}))
"""


def test_everything_is_found_again_by_a_new_process(catalog_url, tmp_path):
    with open_catalog(catalog_url, DIM, "b1") as cat:
        fill(cat, 0, 50)
        cat.delete("i10")
        index = open_index_for_catalog(cat, tmp_path / "ix", config=CPU)
        expected_top = index.search("video", vec(7), 3)[0]
    out = subprocess.run([sys.executable, "-c", REOPEN, catalog_url, str(tmp_path / "ix")],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout)
    assert "loaded at position 51" in out.stderr  # the persisted index was used, not rebuilt
    assert seen["counts"] == {"audio": 17, "video": 16, "text": 16} and seen["position"] == 51
    assert seen["metadata"] == {"n": 7} and seen["problems"] == []
    assert [tuple(h) for h in seen["top"]] == [(i, pytest.approx(s, abs=1e-6)) for i, s in expected_top]


def test_two_replicas_converge(catalog_url, tmp_path):
    with open_catalog(catalog_url, DIM, "b1") as cat_a, open_catalog(catalog_url, DIM, "b1") as cat_b:
        replica_a = open_index_for_catalog(cat_a, tmp_path / "ix-a", config=CPU)
        replica_b = open_index_for_catalog(cat_b, tmp_path / "ix-b", config=CPU)
        fill(cat_a, 0, 30)
        fill(cat_b, 30, 50)
        cat_b.delete("i3")
        cat_a.delete("i40")
        cat_a.add([make_item("i3", "text", vec(333), DIM)])
        replica_a.sync()
        replica_b.sync()
        for replica, cat in [(replica_a, cat_a), (replica_b, cat_b)]:
            assert_equal_to_catalog(replica, cat)
        for modality in MODALITIES:
            assert replica_a.modalities[modality].key_of == replica_b.modalities[modality].key_of
        assert replica_a.search("text", vec(333), 1) == replica_b.search("text", vec(333), 1)
        assert replica_b.search("text", vec(333), 1)[0][0][0] == "i3"


CHILD = """
import random, sys
import numpy as np
from srcid.index.catalog import open_catalog
from srcid.index.catalog_index import open_index_for_catalog
from srcid.index.config import IndexConfig
from srcid.index.items import make_item
url, ix, run = sys.argv[1], sys.argv[2], int(sys.argv[3])
rng = random.Random(run)
cat = open_catalog(url, 16, "b1")
index = open_index_for_catalog(cat, ix, config=IndexConfig(backend="faiss-cpu"))
print("ready", flush=True)
mine = []
for n in range(10**6):
    item_id = f"r{run}-{n}"
    cat.add([make_item(item_id, ("audio", "video", "text")[n % 3], np.random.default_rng(n).normal(size=16), 16)])
    index.sync()
    print("+" + item_id, flush=True)
    mine.append(item_id)
    if n % 4 == 3:
        gone = mine.pop(rng.randrange(len(mine)))
        print("?" + gone, flush=True)  # from here on the delete may take effect even if never acknowledged
        cat.delete(gone)
        index.sync()
        print("-" + gone, flush=True)
    if n % 5 == 4:
        index.save(ix)
"""


def test_acknowledged_writes_survive_sigkill(catalog_url, tmp_path, request):
    ix = tmp_path / "ix"
    added: set[str] = set()
    deleted: set[str] = set()
    doomed: set[str] = set()  # deletes begun, acknowledged or not
    rng = random.Random(1234)
    redis_server = request.getfixturevalue("redis_server") if catalog_url.startswith("redis") else None
    for run in range(10):
        child = subprocess.Popen([sys.executable, "-c", CHILD, catalog_url, str(ix), str(run)],
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO)
        ready = ""
        if run % 3 == 2:
            time.sleep(rng.uniform(0.2, 1.2))  # may land during start-up: opening, catching up, saving
        else:
            ready = child.stdout.readline()
            time.sleep(rng.uniform(0.02, 0.4))  # while it writes
        os.kill(child.pid, signal.SIGKILL)
        if redis_server is not None and run in (3, 7):
            redis_server.kill()  # Redis dies too: only what its AOF fsynced remains
            redis_server.start()
        output = ready + child.stdout.read()
        child.wait()
        for line in output.splitlines(keepends=True):
            if line.endswith("\n") and line[0] in "+-?":  # a line cut by the kill was not acknowledged
                {"+": added, "-": deleted, "?": doomed}[line[0]].add(line[1:-1])
        with open_catalog(catalog_url) as cat:
            index = open_index_for_catalog(cat, ix, config=CPU)
            live = added - doomed
            found = cat.get_many(sorted(live | deleted))
            present = {item.id for item in found if item is not None}
            assert live <= present, f"run {run}: acknowledged adds lost: {sorted(live - present)[:5]}"
            assert not (deleted & present), f"run {run}: acknowledged deletes came back"
            assert index.counts() == cat.counts()
            assert sum(index.counts().values()) == cat.count()
            in_index = set().union(*(ix_.key_of for ix_ in index.modalities.values()))
            assert live <= in_index and not (deleted & in_index)
            assert index.check_against_catalog(sample=20) == []
    assert len(added) >= 30 and len(deleted) >= 5, f"the children acknowledged only {len(added)} adds: the test did not exercise writes"


def _save_repeatedly(index_dir: str, seed: int, rounds: int) -> int:
    """Saves of random snapshots, as a worker process sharing the folder would make them."""
    rng = np.random.default_rng(seed)
    for position in range(rounds):
        snapshots = {m: (np.arange(3000, dtype=np.int64), [f"{m}-{seed}-{i}" for i in range(3000)],
                         rng.normal(size=(3000, 16)).astype(np.float32), None) for m in MODALITIES}
        persist.write_index(Path(index_dir), {"position": position, "dim": 16, "writer": seed}, snapshots)
    return rounds


def _load_repeatedly(index_dir: str, rounds: int) -> int:
    """Loads under the shared lock, as a starting worker does; every file its manifest names must be there."""
    loaded = 0
    for _ in range(rounds):
        with persist.locked(Path(index_dir), exclusive=False):
            manifest, _ = persist.read_manifest(Path(index_dir))
            if manifest is not None:
                for entry in manifest["modalities"].values():
                    persist.read_modality(Path(index_dir), entry, 16)
                loaded += 1
    return loaded


def test_processes_sharing_an_index_folder_never_delete_each_others_files(tmp_path):
    """Two uvicorn workers (or replicas on one volume) saving into one folder: without the folder lock a save's
    clean-up deleted the other's half-written files (FileNotFoundError) and a load could lose files mid-read."""
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(3) as pool:
        saves = [pool.submit(_save_repeatedly, str(tmp_path), seed, 40) for seed in (1, 2)]
        loads = pool.submit(_load_repeatedly, str(tmp_path), 80)
        assert [s.result() for s in saves] == [40, 40]
        loads.result()  # re-raises a load that found a named file gone
    manifest, reason = persist.read_manifest(tmp_path)
    assert reason is None and manifest["position"] == 39
    named = {name for entry in manifest["modalities"].values() for name in entry.values() if isinstance(name, str)}
    data = {p.name for p in tmp_path.iterdir() if p.name not in (persist.MANIFEST, persist.LOCK)}
    assert data == named, "a save left files its manifest does not name, or lost some"
