"""The index server speaks dspy.ColBERTv2's protocol; ColBERTServe works as DSPy's rm."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import dspy
import httpx
import pytest
import torch
from dspy.clients.cache import Cache

from plait.retrievers import ColBERTServe, build_index
from plait.retrievers.server import create_app
from tests.retrieval_fixtures import EXPECTED_TOP1, TINY_CORPUS, ServerThread, write_jsonl

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="module")
def rm(tmp_path_factory) -> ColBERTServe:
    root = tmp_path_factory.mktemp("srv")
    idx = build_index(write_jsonl(root / "tiny.jsonl", TINY_CORPUS), root / "idx")
    r = ColBERTServe.open(idx)
    r.warmup()
    yield r
    r.close()


@pytest.fixture(scope="module")
def server(rm):
    with ServerThread(create_app(rm)) as srv:
        yield srv


@pytest.fixture
def no_dspy_cache(monkeypatch):
    """dspy.ColBERTv2 caches responses on disk by URL; a test must see the live server."""
    monkeypatch.setattr(dspy, "cache", Cache(False, False, None))


@pytest.mark.parametrize("post", [False, True])
def test_dspy_colbertv2_client_against_index_serve(server, rm, no_dspy_cache, post):
    client = dspy.ColBERTv2(url=server.url, post_requests=post)
    for query, want in EXPECTED_TOP1.items():
        got = client(query, k=3)
        local = rm(query, k=3)
        assert [p["pid"] for p in got] == [p.pid for p in local]
        assert got[0]["id"] == want and got[0]["title"] == local[0].title
        assert [p["score"] for p in got] == pytest.approx([p.score for p in local], abs=1e-5)
    assert client("iron tower in Paris", k=2, simplify=True)[0].startswith("The Eiffel Tower")


@pytest.mark.parametrize("post", [False, True])
def test_passage_text_is_title_bar_body_as_colbertv2_servers_send_it(server, no_dspy_cache, post):
    """DSPy's tutorials split a ColBERTv2 passage on " | " to get its title (the wiki17 server
    sends "Title | Body"); a document without a title is its body alone."""
    client = dspy.ColBERTv2(url=server.url, post_requests=post)
    hamlet = client("who wrote the tragedy Hamlet", k=1)[0]
    body = next(r["text"] for r in TINY_CORPUS if r.get("_id") == "hamlet")
    assert hamlet["text"] == hamlet["long_text"] == f"Hamlet | {body}"
    assert hamlet["long_text"].split(" | ", 1) == ["Hamlet", body] and hamlet["title"] == "Hamlet"
    eiffel = client("iron tower in Paris", k=1)[0]
    assert eiffel["text"] == eiffel["long_text"] == TINY_CORPUS[3]["text"] and eiffel["title"] == ""


def test_stage_parameter_and_healthz(server):
    r = httpx.get(server.url + "/", params={"query": "iron tower in Paris", "k": 2, "stage": "bm25"})
    assert r.status_code == 200 and r.json()["topk"][0]["id"] == "eiffel"
    h = httpx.get(server.url + "/healthz").json()
    assert h["status"] == "ok" and h["docs"] == len(TINY_CORPUS)


@pytest.mark.parametrize(
    "method,kwargs,status",
    [
        ("get", {"params": {"k": 3}}, 400),  # no query
        ("get", {"params": {"query": "  ", "k": 3}}, 400),
        ("get", {"params": {"query": "x", "k": 0}}, 400),
        ("get", {"params": {"query": "x", "k": "ten"}}, 422),
        ("get", {"params": {"query": "x", "stage": "dense"}}, 400),
        ("post", {"json": {"k": 3}}, 400),
        ("post", {"json": {"query": "x", "k": 100000}}, 400),
        ("post", {"content": b"not json", "headers": {"content-type": "application/json"}}, 422),
    ],
)
def test_bad_parameters_are_4xx_json(server, method, kwargs, status):
    r = getattr(httpx, method)(server.url + "/", **kwargs)
    assert r.status_code == status
    body = r.json()
    assert body["error"] is True and body["message"]


def test_concurrent_http_clients_get_correct_results(server):
    queries = list(EXPECTED_TOP1.items()) * 4

    def ask(item):
        q, want = item
        r = httpx.get(server.url + "/", params={"query": q, "k": 1}, timeout=30)
        return r.json()["topk"][0]["id"] == want

    with ThreadPoolExecutor(16) as pool:
        assert all(pool.map(ask, queries))


def test_colbert_serve_as_dspy_rm(rm):
    with dspy.context(rm=rm):
        out = dspy.Retrieve(k=2)("who wrote the tragedy Hamlet")
    assert len(out.passages) == 2 and "Shakespeare" in out.passages[0]
