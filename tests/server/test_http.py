"""The JSON/HTTP face over real HTTP on loopback: the gRPC contract's routes, its statuses mapped as
grpc-gateway maps them, credentials, the OpenAPI document, and the same items as over gRPC."""
import base64
import json
import shutil
import urllib.error
import urllib.request

import pytest

from recsys.client import RecommenderClient
from recsys.server.app import create_server
from recsys.server.catalog import CatalogStore
from recsys.server.options import ServerOptions
from recsys.server.rest import route_of
from recsys.server.wire import SERVICE
from tests.conftest import wait_for
from tests.fake_backend import FakeBackend

TOKEN = "http-test-token"


def call(port: int, route: str, body: dict | None = None, token: str | None = None,
         method: str = "POST") -> tuple[int, dict[str, str], str]:
    """(HTTP status, headers, body text)."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    request = urllib.request.Request(f"http://127.0.0.1:{port}{route}", data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read().decode()


def lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line]


@pytest.fixture()
def http_server(fake_recommender):
    """(gRPC port, HTTP port, server): `fake_recommender` with its HTTP face."""
    recommender, port, _ = fake_recommender
    http_port = recommender.serve_http(0, "127.0.0.1")
    wait_for(recommender.backend.is_ready, 10, "the fake models")
    return port, http_port, recommender


def test_every_rpc_has_a_route_and_the_openapi_document_describes_it(http_server):
    _, http_port, _ = http_server
    status, _, text = call(http_port, "/v1/openapi.json", method="GET")
    document = json.loads(text)
    assert status == 200 and set(document["paths"]) == {route_of(method.name) for method in SERVICE.methods}
    recommend = document["paths"]["/v1/recommend"]["post"]
    assert "application/x-ndjson" in recommend["responses"]["200"]["content"]
    assert "recent_interactions" in recommend["summary"]
    interaction = document["components"]["schemas"]["Interaction"]["properties"]
    assert interaction["timestampSeconds"]["type"] == "string" and "description" in interaction["rating"]
    assert call(http_port, "/v1/health", method="GET")[:1] == (200,)


def test_recommend_streams_the_same_items_as_grpc_and_counts_unknown_interactions(http_server):
    port, http_port, _ = http_server
    body = {"userId": "new", "k": 5, "recentInteractions": [{"itemId": "m3", "rating": 5}, {"itemId": "nope"}]}
    status, headers, text = call(http_port, "/v1/recommend", body)
    assert status == 200 and headers["Content-Type"] == "application/x-ndjson"
    assert headers["unknown-interactions"] == "1"
    items = lines(text)
    with RecommenderClient(f"127.0.0.1:{port}", timeout=10) as client:
        expected = client.recommend("new", k=5, interactions=[("m3", 5.0), ("nope", 0.0)])
    assert [item["itemId"] for item in items] == [item.item_id for item in expected]
    assert [item["rank"] for item in items] == [1, 2, 3, 4, 5] and items[0]["fallback"] is False
    status, _, text = call(http_port, "/v1/recommend-batch", {"requests": [body, {"userId": "u1", "k": 2}]})
    results = json.loads(text)["results"]
    assert [item["itemId"] for item in results[0]["items"]] == [item["itemId"] for item in items]
    assert results[0]["unknownInteractions"] == 1 and len(results[1]["items"]) == 2


def test_the_other_calls_work_over_http(http_server):
    _, http_port, _ = http_server
    status, headers, text = call(http_port, "/v1/similar-items", {"itemId": "m10", "k": 3})
    assert status == 200 and len(lines(text)) == 3 and "m10" not in {item["itemId"] for item in lines(text)}
    assert base64.b64decode(headers["item-title-bin"]).decode() == "Movie m10"
    body = {"userId": "someone", "interactions": [{"itemId": "m7", "rating": 4.5}]}
    assert json.loads(call(http_port, "/v1/record-interactions", body)[2]) == {"recorded": 1}
    assert json.loads(call(http_port, "/v1/forget-user", {"userId": "someone"})[2]) == {"forgotten": 1}
    status, _, text = call(http_port, "/v1/get-model-info", method="GET")
    assert status == 200 and json.loads(text)["maxK"] == 100


@pytest.mark.parametrize("route, body, status, code, named", [
    ("/v1/recommend", {"userId": "u1", "k": 1000}, 400, "INVALID_ARGUMENT", "k"),
    ("/v1/recommend", {"userId": "u1", "k": "many"}, 400, "INVALID_ARGUMENT", "RecommendRequest"),
    ("/v1/recommend", {"noSuchField": 1}, 400, "INVALID_ARGUMENT", "noSuchField"),
    ("/v1/similar-items", {"itemId": "no-such-movie"}, 404, "NOT_FOUND", "no-such-movie"),
    ("/v1/record-interactions", {"userId": "u\u0000", "interactions": [{"itemId": "m1"}]}, 400, "INVALID_ARGUMENT",
     "user_id"),
])
def test_errors_carry_the_grpc_code_and_grpc_gateways_http_status(http_server, route, body, status, code, named):
    _, http_port, _ = http_server
    got, _, text = call(http_port, route, body)
    error = json.loads(text)
    assert (got, error["status"]) == (status, code) and named in error["message"]


def test_credentials_are_the_grpc_services(fake_models):
    recommender, _ = create_server("127.0.0.1:0", FakeBackend(fake_models), fake_models,
                                   ServerOptions(poll_seconds=0.2, auth_token=TOKEN))
    recommender.start()
    http_port = recommender.serve_http(0, "127.0.0.1")
    try:
        wait_for(recommender.backend.is_ready, 10, "the fake models")
        status, _, text = call(http_port, "/v1/recommend", {"userId": "u1"})
        assert (status, json.loads(text)["status"]) == (401, "UNAUTHENTICATED")
        assert call(http_port, "/v1/recommend", {"userId": "u1"}, token=TOKEN)[0] == 200
        assert call(http_port, "/v1/health", method="GET")[0] == 200, "health stays open"
    finally:
        recommender.stop(0).wait(10)


class UnreadyBackend(FakeBackend):
    def is_ready(self) -> bool:
        return False


def test_health_is_readiness_and_live_is_liveness(fake_models):
    recommender, _ = create_server("127.0.0.1:0", UnreadyBackend(fake_models), fake_models,
                                   ServerOptions(poll_seconds=0.2))
    recommender.start()
    http_port = recommender.serve_http(0, "127.0.0.1")
    try:
        status, _, text = call(http_port, "/v1/health", method="GET")
        assert (status, json.loads(text)) == (503, {"status": "NOT_SERVING"})
        status, _, text = call(http_port, "/v1/health/live", method="GET")
        assert (status, json.loads(text)) == (200, {"status": "SERVING"}), "not ready is not dead"
    finally:
        recommender.stop(0).wait(10)


def test_the_same_request_gives_the_same_items_over_http_and_grpc_with_the_real_models(running_server, models_dir):
    recommender, port = running_server
    popular = CatalogStore(models_dir).get("1").popular_item_ids
    http_port = recommender.serve_http(0, "127.0.0.1")
    sent = [(popular[0], 5.0), (popular[4], 1.0)]
    body = {"userId": "42", "k": 10, "recentInteractions": [{"itemId": item, "rating": stars} for item, stars in sent]}
    with RecommenderClient(f"127.0.0.1:{port}", timeout=10) as client:
        expected = client.recommend("42", k=10, interactions=sent)
    status, _, text = call(http_port, "/v1/recommend", body)
    items = lines(text)
    assert status == 200 and [item["itemId"] for item in items] == [item.item_id for item in expected]
    assert [item["becauseTitles"] for item in items] == [list(item.because_titles) for item in expected]
    assert all(item["score"] == pytest.approx(wanted.score) for item, wanted in zip(items, expected))


@pytest.fixture(scope="module")
def browser():
    """Debian's headless chromium, driven through its chromedriver (`make browser` installs both)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.fail("the page's test needs Debian's chromium and chromium-driver: run `make browser`")
    options = Options()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(argument)
    session = webdriver.Chrome(service=Service(driver), options=options)
    try:
        yield session
    finally:
        session.quit()


def test_the_page_loads_and_a_rating_changes_the_list_at_once_with_its_reasons(http_server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    _, http_port, _ = http_server
    wait = WebDriverWait(browser, 15)

    def shown(selector: str, what: str = "dataset.itemId") -> list[str]:
        """Read in one script: the page replaces its lists whole, so elements found earlier go stale."""
        return browser.execute_script(f"return [...document.querySelectorAll(arguments[0])].map(e => e.{what})",
                                      selector)

    browser.get(f"http://127.0.0.1:{http_port}/")
    wait.until(lambda _: len(shown("#list li")) == 10 and len(shown("#to-rate li")) == 30)
    before = shown("#list li")
    assert not shown("#list .why"), "no history, no reasons"
    browser.find_element(By.CSS_SELECTOR, '#to-rate li[data-item-id="m3"] .star[data-stars="5"]').click()
    wait.until(lambda _: shown("#list li") != before and shown("#list .why", "textContent"))
    assert sorted(shown("#list li")[:2]) == ["m2", "m4"], "the rated movie's neighbours lead"
    assert "m3" not in shown("#list li")
    assert set(shown("#list .why", "textContent")) == {"because you watched Movie m3"}
    browser.find_element(By.CSS_SELECTOR, "#list li .more").click()
    wait.until(lambda _: len(shown("#similar li")) == 10)
    assert browser.find_element(By.ID, "similar-title").text == f"More like Movie {shown('#list li')[0]}"
    assert browser.find_element(By.ID, "error").text == ""
