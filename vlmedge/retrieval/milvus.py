"""Image embeddings in Milvus, through pymilvus's `MilvusClient(uri)`: a file path is Milvus Lite (embedded,
no server), an http(s) URI a Milvus server or cluster. One code path for both.

Policy. A collection holds one row per image: its absolute path (the primary key), its embedding and the
model that made it (a fingerprint of the bundle's source weights and width, so an FP16 or INT8 variant
of the same model can search an FP32 index, and a different model is refused). Rows are written with
`upsert`, keyed by path, batch by batch; after each batch the rows are flushed. A run that is killed
therefore leaves whole batches behind, the next run reads the paths already there and embeds only the
others, and a batch written twice (killed between upsert and the next run's read) is still one row per
image: no duplicates by construction. A Milvus Lite index file a kill cut short is rebuilt from the rows.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from vlmedge.errors import DependencyError, InputError, VlmedgeError, first_line

DEFAULT_COLLECTION = "images"
PATH_MAX = 4096  # the primary key's VARCHAR length


class RetrievalError(VlmedgeError):
    """Milvus refused or failed an operation; the message names the database and what failed."""


@dataclass(frozen=True)
class Hit:
    path: str
    score: float  # cosine similarity of the query and the image's embedding


def model_fingerprint(manifest) -> str:
    """Which embedding space a bundle writes: its source weights' hashes and width (not its precision)."""
    prov = manifest.provenance
    key = json.dumps({"family": manifest.family, "weights": prov.get("source_sha256", {}), "source": prov.get("source"),
                      "dim": manifest.dims["embed_dim"]}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://", "tcp://", "grpc://"))


def connect(uri: str):
    """A MilvusClient for `uri`: a Milvus Lite file (*.db; its folder must exist) or a server's URI."""
    try:
        from pymilvus import MilvusClient
    except ImportError as e:
        raise DependencyError(f"--db: Milvus needs pymilvus ({e.name} is missing): pip install 'vlmedge[milvus]'") from None
    if not is_server(uri):
        path = Path(uri)
        if path.suffix != ".db":
            raise InputError(f"--db {uri}: a Milvus Lite database is a file ending in .db (or give http://HOST:19530 for a server)")
        if not path.parent.is_dir():
            raise InputError(f"--db {uri}: folder {path.parent} does not exist")
        import importlib.util

        if importlib.util.find_spec("milvus_lite") is None:  # (pymilvus starts it for a file URI)
            raise DependencyError(f"--db {uri}: Milvus Lite is not installed: pip install 'vlmedge[milvus]' "
                                  "(or give http://HOST:19530 for a Milvus server)")
    import logging

    # pymilvus logs every failed call with its traceback, and warns of a client-side timestamp on Milvus Lite;
    # our errors say what failed in one line
    logging.getLogger("pymilvus").setLevel(logging.CRITICAL)
    for attempt in range(2):
        try:
            return MilvusClient(uri)
        except Exception as e:
            # gRPC's "Too many pings" (a GOAWAY while the connection starts) is transient: tried once more
            if attempt or "too many pings" not in str(e).lower():
                raise RetrievalError(f"--db {uri}: cannot open ({first_line(e)[:300]})") from None


class Collection:
    """One collection of image embeddings in a Milvus database."""

    def __init__(self, client, uri: str, name: str, dim: int, model: str):
        self.client, self.uri, self.name, self.dim, self.model = client, uri, name, dim, model

    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except VlmedgeError:
            raise
        except Exception as e:
            raise RetrievalError(f"--db {self.uri}: {what} of collection {self.name!r} failed ({first_line(e)[:300]})") from None

    @classmethod
    def open(cls, uri: str, name: str, dim: int, model: str, create: bool) -> "Collection":
        """The collection `name`, created (when `create`) for embeddings of `dim`; one that holds another
        model's embeddings or another width is refused."""
        if not name.replace("_", "").isalnum() or not name[0].isalpha() or len(name) > 255:
            raise InputError(f"--collection {name!r}: expected letters, digits and underscores, starting with a letter")
        client = connect(uri)
        c = cls(client, uri, name, dim, model)
        exists = c._call("listing", client.has_collection, name)
        if not exists:
            if not create:
                raise InputError(f"--db {uri}: no collection {name!r}; index images first (vlmedge index BUNDLE DIR --db {uri})")
            c._create()
            return c
        fields = {f["name"]: f for f in c._call("describing", client.describe_collection, name)["fields"]}
        vec = fields.get("embedding")
        if vec is None or "path" not in fields or "model" not in fields:
            raise InputError(f"--db {uri}: collection {name!r} was not written by vlmedge index (no path/embedding/model fields)")
        have = int(vec.get("params", {}).get("dim", 0))
        if have != dim:
            raise InputError(f"--db {uri}: collection {name!r} holds embeddings of {have}, this bundle makes {dim}; "
                             "use another --collection")
        c._load()
        rows = c._call("reading", client.query, name, filter="", output_fields=["model"], limit=1)
        if rows and rows[0]["model"] != model:
            raise InputError(f"--db {uri}: collection {name!r} holds another model's embeddings; use the bundle that "
                             "indexed it, or another --collection")
        return c

    def _load(self) -> None:
        """Load the collection (a closed client leaves it released). Milvus Lite builds a segment's index file after
        a flush returns, so a run killed right then leaves that file cut short and the collection will not load:
        the index is rebuilt from the rows, which are whole (a server keeps its indexes itself)."""
        try:
            self.client.load_collection(self.name)
            return
        except Exception as e:
            if is_server(self.uri):
                raise RetrievalError(f"--db {self.uri}: loading of collection {self.name!r} failed ({first_line(e)[:300]})") from None
        for index in self._call("listing indexes", self.client.list_indexes, self.name):
            self._call("dropping a damaged index", self.client.drop_index, self.name, index_name=index)
        params = self.client.prepare_index_params()
        params.add_index(field_name="embedding", index_type="FLAT", metric_type="COSINE")
        self._call("rebuilding the index", self.client.create_index, self.name, params)
        self._call("loading", self.client.load_collection, self.name)

    def _create(self) -> None:
        from pymilvus import DataType, MilvusClient

        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("path", DataType.VARCHAR, is_primary=True, max_length=PATH_MAX)
        schema.add_field("embedding", DataType.FLOAT_VECTOR, dim=self.dim)
        schema.add_field("model", DataType.VARCHAR, max_length=64)
        index = self.client.prepare_index_params()
        # Milvus Lite: exact search (FLAT); a server picks its own index (AUTOINDEX)
        index.add_index(field_name="embedding", index_type="AUTOINDEX" if is_server(self.uri) else "FLAT", metric_type="COSINE")
        self._call("creating", self.client.create_collection, self.name, schema=schema, index_params=index)

    def paths(self) -> set[str]:
        """Every path the collection holds."""
        it = self._call("reading", self.client.query_iterator, self.name, batch_size=1000, output_fields=["path"])
        out: set[str] = set()
        while True:
            rows = self._call("reading", it.next)
            if not rows:
                it.close()
                return out
            out.update(r["path"] for r in rows)

    def write(self, paths: list[str], embeddings) -> None:
        """Upsert one batch (keyed by path) and flush it, so that a kill after this loses nothing written."""
        rows = [{"path": p, "embedding": [float(x) for x in e], "model": self.model} for p, e in zip(paths, embeddings)]
        self._call("writing", self.client.upsert, self.name, rows)
        self._call("flushing", self.client.flush, self.name)

    def count(self) -> int:
        if is_server(self.uri):
            # a server's collection statistics still count the rows an upsert replaced (until a compaction):
            # count the live rows instead
            rows = self._call("counting", self.client.query, self.name, filter="", output_fields=["count(*)"],
                              consistency_level="Strong")
            return int(rows[0]["count(*)"])
        stats = self._call("counting", self.client.get_collection_stats, self.name)
        return int(stats.get("row_count", 0))

    def search(self, queries: Iterable[Any], k: int) -> list[list[Hit]]:
        data = [[float(x) for x in q] for q in queries]
        res = self._call("searching", self.client.search, self.name, data=data, limit=k, output_fields=["path"],
                         anns_field="embedding", search_params={"metric_type": "COSINE"})
        return [[Hit(h["entity"]["path"], float(h["distance"])) for h in row] for row in res]

    def close(self) -> None:
        try:
            self.client.close()
        except Exception:  # closing a client that failed is not worth a second error
            pass
