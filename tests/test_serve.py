"""The Serve application end to end over HTTP on 127.0.0.1: every route, every bad input, the web page
in headless Chromium, and a replica killed while requests flow."""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from support import encode, multipart

from ferray.testing import free_port, png_bytes, post

pytestmark = pytest.mark.slow
BODY_LIMIT = 300_000
MAX_FACES = 6
MAX_REQUEST_PIXELS = 250_000
BODY_TIMEOUT_S = 4  # a body not received whole by then: 408
MAX_BATCH = 8  # images in one /predict/batch (above MAX_FACES + 1: the faces' limit is tested with a batch)


@pytest.fixture(scope="module")
def server(ray_session, tiny_bundle):
    from ray import serve

    from ferray.distributed.serving import start

    overrides = [
        f"max_body_bytes={BODY_LIMIT}",
        f"max_faces_per_request={MAX_FACES}",
        f"max_request_pixels={MAX_REQUEST_PIXELS}",
        f"max_batch_images={MAX_BATCH}",
        f"body_timeout_s={BODY_TIMEOUT_S}",
        "layout=split",  # A and B apart: the replica-kill test kills B's
        "members=a,b",  # the split layout's members (the bundle's third, c, is served fused below)
        "ingress.num_cpus=0.25",
        "model_a.num_cpus=0.5",
        "model_b.num_cpus=0.5",
        "model_a.max_replicas=1",
        "model_b.max_replicas=1",
    ]
    url = start(tiny_bundle, port=free_port(), overrides=overrides)
    yield url
    serve.shutdown()


def get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.status, response.read()


def get_with_headers(url: str) -> tuple[int, dict, bytes]:
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.status, {name.lower(): value for name, value in response.headers.items()}, response.read()


def check_probs(face: dict) -> None:
    for probs in (face["probs"], face["members"]["a"], face["members"]["b"]):
        assert len(probs) == 7 and abs(sum(probs.values()) - 1) < 1e-5
    assert face["label"] == max(face["probs"], key=face["probs"].get)


def test_info_routes(server, tiny_bundle):
    assert json.loads(get(f"{server}/healthz")[1]) == {"status": "ok"}
    assert json.loads(get(f"{server}/labels")[1])["labels"][3] == "happy"
    card = json.loads(get(f"{server}/model")[1])
    assert card["fusion"] == json.loads((tiny_bundle / "bundle.json").read_text())["fusion"]
    assert "data" not in card  # no server paths leak

    def strings(node):
        if isinstance(node, dict):
            yield from (s for value in node.values() for s in strings(value))
        elif isinstance(node, list):
            yield from (s for value in node for s in strings(value))
        elif isinstance(node, str):
            yield node

    assert not [s for s in strings(card) if "/" in s and not s.startswith("ferray.")], "a path or version leaked"
    assert card["members"]["a"]["parameters"] > 0 and card["evaluations"]  # the science stays
    paths = json.loads(get(f"{server}/openapi.json")[1])["paths"]
    assert {"/predict", "/predict/batch", "/predict/pixels", "/healthz", "/labels", "/model"} <= set(paths)
    assert get(f"{server}/docs")[0] == 200 and b"<canvas" in get(f"{server}/")[1]


def test_the_served_card_shows_only_the_fields_it_lists(tiny_bundle, monkeypatch):
    """A field added to the card later is private until listed (GET /model serves public_card)."""
    from ferray.bundle import read_bundle_card
    from ferray.bundle.card import BundleCard, public_card

    card = read_bundle_card(tiny_bundle)
    plain = card.to_dict()
    plain["new_field"] = "/srv/secret"
    plain["members"]["a"]["new_field"] = "/srv/secret"
    plain["members"]["a"]["run"] = {"name": "debug_a", "epochs": 2, "new_field": "/srv/secret"}
    plain["sr"] = {"checkpoint": "sr.pt", "source": "/srv/sr.pt", "content_loss": "mse", "new_field": 1}
    monkeypatch.setattr(BundleCard, "to_dict", lambda self: plain)
    shown = public_card(card)
    assert "new_field" not in shown and "data" not in shown and shown["fusion"] == plain["fusion"]
    assert "new_field" not in shown["members"]["a"] and "checkpoint" not in shown["members"]["a"]
    assert shown["members"]["a"]["run"] == {"name": "debug_a", "epochs": 2}
    assert shown["sr"] == {"content_loss": "mse"} and shown["members"]["a"]["parameters"] > 0


def test_predict_routes_and_cli_agree(server, tiny_bundle, synth_faces, tmp_path):
    from ferray.predict import predict_files

    face = synth_faces[0][5]
    status, raw = post(f"{server}/predict", png_bytes(face), "image/png")
    assert status == 200 and raw["width"] == 48 and len(raw["faces"]) == 1
    check_probs(raw["faces"][0])
    path = tmp_path / "face.png"
    path.write_bytes(png_bytes(face))
    (local,) = predict_files(tiny_bundle, [path], members="a,b")  # the set the module's app serves
    assert np.allclose(list(local["faces"][0]["probs"].values()), list(raw["faces"][0]["probs"].values()), atol=1e-5)

    body, content_type = multipart([("file", "face.png", png_bytes(face))])
    status, form = post(f"{server}/predict", body, content_type)
    assert status == 200 and form["faces"][0]["probs"] == pytest.approx(raw["faces"][0]["probs"], abs=1e-6)

    photo = np.stack([np.kron(face, np.ones((3, 3), np.uint8))] * 3, axis=-1)  # 144x144 color, no detection
    status, whole = post(f"{server}/predict?detect=false", encode(photo, "JPEG"), "image/jpeg")
    assert status == 200 and whole["faces"][0]["box"] == [0, 0, 144, 144]

    files = [(f"f{i}", f"face{i}.png", png_bytes(synth_faces[0][i])) for i in range(3)]
    status, batch = post(f"{server}/predict/batch", *multipart(files))
    assert status == 200 and [r["image"] for r in batch["results"]] == ["face0.png", "face1.png", "face2.png"]
    assert batch["results"][0]["faces"][0]["probs"] == pytest.approx(
        post(f"{server}/predict", png_bytes(synth_faces[0][0]), "image/png")[1]["faces"][0]["probs"], abs=1e-6
    )

    rows = [synth_faces[0][i].reshape(-1).tolist() for i in (5, 6)]
    status, pixels = post(f"{server}/predict/pixels", json.dumps({"pixels": rows}).encode(), "application/json")
    assert status == 200 and len(pixels["faces"]) == 2
    assert pixels["faces"][0]["probs"] == pytest.approx(raw["faces"][0]["probs"], abs=1e-6)


def bad_requests(face: np.ndarray) -> list:
    good_png = png_bytes(face)
    sky = np.tile(np.linspace(40, 220, 200, dtype=np.uint8), (150, 1))
    row = face.reshape(-1).tolist()
    return [  # (route, body, content type, expected status, words in the error)
        ("/predict", b"", "image/png", 400, "empty body"),
        ("/predict", b"definitely not an image", "image/png", 415, "not an image"),
        ("/predict", good_png[: len(good_png) // 2], "image/png", 400, "truncated"),
        ("/predict", bytes(BODY_LIMIT + 10), "image/png", 413, "over the limit"),
        ("/predict", bytes(BODY_LIMIT - 10), "image/png", 415, "first bytes 00 00"),  # refused on its first bytes
        ("/predict", good_png, "text/plain", 415, "content type 'text/plain'"),
        ("/predict", png_bytes(sky), "image/png", 422, "no face found"),
        ("/predict", *multipart([("a", "a.png", good_png), ("b", "b.png", good_png)]), 422, "/predict/batch"),
        ("/predict", *multipart([("note", None, b"hello")]), 422, "no file part"),
        ("/predict/batch", *multipart([("a", "a.png", good_png), ("b", "b.txt", b"zzz")]), 415, "b.txt"),
        ("/predict/pixels", b"{not json", "application/json", 400, "malformed JSON"),
        ("/predict/pixels", json.dumps({"pixels": row[:100]}).encode(), "application/json", 422, "100 values"),
        ("/predict/pixels", json.dumps({"pixels": row[:-1] + [300]}).encode(), "application/json", 422, "out of range"),
        (
            "/predict/pixels",
            (json.dumps({"pixels": row[:-1]})[:-2] + ", NaN]}").encode(),
            "application/json",
            422,
            "not an integer",
        ),
    ]


def test_every_bad_input_is_a_4xx_and_the_server_goes_on(server, synth_faces):
    face = synth_faces[0][5]
    for route, body, content_type, expected, words in bad_requests(face):
        status, answer = post(f"{server}{route}", body, content_type)
        assert (status, route) == (expected, route), answer
        assert words in answer["error"], (route, answer)
    status, answer = post(f"{server}/predict?detect=maybe", png_bytes(face), "image/png")
    assert status == 422  # FastAPI's own validation of the query
    status, answer = post(f"{server}/predict", png_bytes(face), "image/png")
    assert status == 200 and len(answer["faces"]) == 1


def post_chunked(url: str, chunks: list[bytes], content_type: str) -> tuple[int, dict]:
    """POST with Transfer-Encoding: chunked (no length declared); the server may answer, and close,
    before the last chunk is sent."""
    import http.client
    from urllib.parse import urlsplit

    where = urlsplit(url)
    connection = http.client.HTTPConnection(where.hostname, where.port, timeout=30)
    connection.putrequest("POST", where.path)
    connection.putheader("Content-Type", content_type)
    connection.putheader("Transfer-Encoding", "chunked")
    connection.endheaders()
    try:
        for chunk in chunks:
            connection.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        connection.send(b"0\r\n\r\n")
    except OSError:
        pass  # refused mid-body: the answer is waiting
    response = connection.getresponse()
    return response.status, json.loads(response.read())


def test_each_limit_is_a_413_naming_the_limit_and_the_value(server, synth_faces):
    face = synth_faces[0][5]
    row = face.reshape(-1).tolist()
    rows = json.dumps({"pixels": [row] * (MAX_FACES + 1)}).encode()
    status, answer = post(f"{server}/predict/pixels", rows, "application/json")
    assert status == 413 and answer["limit"] == "max_faces_per_request"
    assert (answer["value"], answer["allowed"]) == (MAX_FACES + 1, MAX_FACES) and "max_faces_per_request" in answer[
        "error"
    ]
    wide = encode(np.zeros((400, 400), np.uint8), "PNG")  # 160,000 pixels each: two are over the request's budget
    status, answer = post(f"{server}/predict/batch", *multipart([("a", "a.png", wide), ("b", "b.png", wide)]))
    assert status == 413 and (answer["limit"], answer["value"]) == ("max_request_pixels", 320_000), answer
    status, answer = post(f"{server}/predict", bytes(BODY_LIMIT + 10), "image/png")
    assert status == 413 and (answer["limit"], answer["value"], answer["allowed"]) == (
        "max_body_bytes",
        BODY_LIMIT + 10,
        BODY_LIMIT,
    )
    # a body sent in chunks, with no length declared: refused once what arrived passes the limit
    png_start = b"\x89PNG\r\n\x1a\n" + bytes(100_000 - 8)  # it starts like an image: read until the limit
    status, answer = post_chunked(f"{server}/predict", [png_start] + [bytes(100_000)] * 3, "image/png")
    assert status == 413 and answer["limit"] == "max_body_bytes" and answer["value"] > BODY_LIMIT, answer
    for sent, value in ((MAX_BATCH + 1, MAX_BATCH + 1), (MAX_BATCH + 6, MAX_BATCH + 2)):  # the second: "at least"
        files = [("f", f"f{i}.png", png_bytes(face)) for i in range(sent)]
        status, answer = post(f"{server}/predict/batch?detect=false", *multipart(files))
        assert status == 413 and (answer["limit"], answer["value"], answer["allowed"]) == (
            "max_batch_images",
            value,
            MAX_BATCH,
        ), answer
    many = [("f", f"f{i}.png", png_bytes(face)) for i in range(MAX_FACES + 1)]  # one face each, with detection off
    status, answer = post(f"{server}/predict/batch?detect=false", *multipart(many))
    assert status == 413 and answer["limit"] == "max_faces_per_request", answer


def test_a_slow_upload_gets_a_json_408_after_the_body_deadline(server):
    """A client that declares a body and sends it slowly holds a slot only until body_timeout_s."""
    import http.client
    from urllib.parse import urlsplit

    where = urlsplit(server)
    connection = http.client.HTTPConnection(where.hostname, where.port, timeout=60)
    connection.putrequest("POST", "/predict")
    connection.putheader("Content-Type", "image/png")
    connection.putheader("Content-Length", "100000")
    connection.endheaders()
    connection.send(b"\x89PNG\r\n\x1a\n")  # and then nothing more
    t0 = time.monotonic()
    response = connection.getresponse()
    waited, answer = time.monotonic() - t0, json.loads(response.read())
    assert response.status == 408 and "not received within" in answer["error"], answer
    assert BODY_TIMEOUT_S - 0.5 < waited < BODY_TIMEOUT_S + 20


def test_crafted_requests_get_json_4xx_never_a_500(server, synth_faces):
    row = synth_faces[0][5].reshape(-1).tolist()
    crafted = [
        ("/predict/pixels", b"[" * 100_000 + b"]" * 100_000, "application/json", 400, "nested too deep"),
        ("/predict/pixels", json.dumps({"pixels": row[:-1] + [10**40]}).encode(), "application/json", 422, "range"),
        ("/predict/pixels", json.dumps({"pixels": row[:-1] + ["7"]}).encode(), "application/json", 422, "'7'"),
        ("/predict/pixels", json.dumps({"pixels": {"a": 1}}).encode(), "application/json", 422, "non-empty list"),
        ("/predict/pixels", json.dumps([1, 2]).encode(), "application/json", 422, "expected a JSON object"),
        # an integer of more digits than Python converts: a JSON 400, not a 503 with a trace in the log
        ("/predict/pixels", b'{"pixels": [' + b"9" * 5000 + b"]}", "application/json", 400, "4300 digits"),
        # a form's or a cross-site page's simple POST may not spend the models' compute
        ("/predict/pixels", json.dumps({"pixels": row}).encode(), "text/plain", 415, "application/json"),
        ("/predict/pixels", json.dumps({"pixels": row}).encode(), "application/x-www-form-urlencoded", 415, "json"),
        ("/predict", encode(np.zeros((2, 900), np.uint8), "PNG"), "image/png", 422, "not a photo of faces"),
        ("/predict", b"GIF89a" + bytes(40), "image/png", 415, "GIF"),
        ("/predict", encode(np.zeros((60, 60), np.uint8), "TIFF"), "image/tiff", 415, "send PNG, JPEG, BMP or WebP"),
    ]
    for route, body, content_type, expected, words in crafted:
        status, answer = post(f"{server}{route}", body, content_type)
        assert (status, route) == (expected, route), answer
        assert words in answer["error"], (route, answer)
    status, answer = post(
        f"{server}/predict/pixels", json.dumps({"pixels": [row] * MAX_FACES}).encode(), "application/json"
    )
    assert status == 200 and len(answer["faces"]) == MAX_FACES  # at the limit is fine; the server goes on


def test_readyz_says_ready_only_when_every_member_answers(server):
    from concurrent.futures import ThreadPoolExecutor

    from ferray.serve_app.app import READY_CACHE_S

    time.sleep(READY_CACHE_S + 0.1)  # no answer left from an earlier probe: this GET runs one
    status, headers, body = get_with_headers(f"{server}/readyz")
    assert headers["cache-control"] == "max-age=1", headers  # a ready answer may be repeated for a second
    fresh = json.loads(body)
    assert status == 200 and {k: fresh[k] for k in ("status", "members")} == {
        "status": "ready",
        "members": {"a": "ready", "b": "ready"},
    }
    time.sleep(0.3)
    # polling within READY_CACHE_S is answered from that probe, not by another forward of every member
    with ThreadPoolExecutor(8) as pool:
        polled = list(pool.map(lambda _: get_with_headers(f"{server}/readyz"), range(8)))
    for status, headers, body in polled:  # by the ingress from its probe, or by HAProxy's cache (below)
        assert status == 200 and json.loads(body)["status"] == "ready"
        assert "age" in headers or json.loads(body)["checked_s_ago"] >= 0.3, (headers, body)
    # in the fast mode (ferray's own Ray unless FERRAY_SERVE_FAST=0), HAProxy stores a ready answer as
    # it passes and repeats it for its second: the ingress never sees those GETs (an Age header; the
    # stored answer's body and request id)
    if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1":
        repeated = [get_with_headers(f"{server}/readyz") for _ in range(3)]
        assert "age" in repeated[-1][1] and repeated[-1][2] == repeated[-2][2], repeated


def test_a_flooding_address_is_held_and_answered_429_while_others_are_served(server):
    """ferray's own Ray renders HAProxy's config with the limits per client address: GETs of /readyz
    from one address past its rate (the default, over 10 s) are held, then answered with a JSON 429
    naming the address; another address meanwhile gets its answer at once."""
    import http.client
    from urllib.parse import urlsplit

    from ferray.distributed import client_limits

    if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") != "1":  # set when the session's Ray starts
        pytest.skip("the limits are kept by HAProxy (Serve's fast mode; FERRAY_SERVE_FAST=0 turns it off)")
    where = urlsplit(server)

    def get_from(source: str):
        connection = http.client.HTTPConnection(where.hostname, where.port, source_address=(source, 0), timeout=30)
        started = time.monotonic()
        try:
            connection.request("GET", "/readyz")
            response = connection.getresponse()
            return response.status, response.headers, response.read(), time.monotonic() - started
        finally:
            connection.close()

    most = round(client_limits.limits_from_environment().requests_per_s * client_limits.RATE_WINDOW_S)
    answered = 0  # 200s before the first other status
    while answered <= most:
        status, headers, body, seconds = get_from("127.0.0.2")
        if status != 200:
            break
        answered += 1
    assert (status, answered) == (429, most), (status, answered, body)
    answer = json.loads(body)
    assert "requests a second from 127.0.0.2" in answer["error"] and headers["Retry-After"] == "10"
    assert seconds >= client_limits.TARPIT_S - 0.2
    status, _, body, seconds = get_from("127.0.0.1")
    assert status == 200 and json.loads(body)["status"] == "ready" and seconds < 2


def test_web_page_in_headless_chromium(server, synth_faces, tmp_path):
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("Debian's chromium and chromium-driver are not installed (.ci/run installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    image = tmp_path / "face.png"
    image.write_bytes(png_bytes(synth_faces[0][5]))
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
    ):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(driver), options=options)
    try:
        browser.get(f"{server}/")
        browser.find_element(By.ID, "file").send_keys(str(image))
        drawn = "return document.getElementById('photo').width"
        WebDriverWait(browser, 30).until(
            lambda b: b.find_elements(By.CSS_SELECTOR, "#results .face") and b.execute_script(drawn)
        )
        face = browser.find_element(By.CSS_SELECTOR, "#results .face")
        bars = face.find_elements(By.CSS_SELECTOR, ".bar")
        expected = post(f"{server}/predict", image.read_bytes(), "image/png")[1]["faces"][0]["label"]
        assert len(bars) == 7 and face.get_attribute("data-label") == expected
        assert browser.execute_script(drawn) == 48
        assert browser.find_element(By.ID, "error").text == ""
        # the webcam's live mode tracks faces across frames and smooths their probabilities, as
        # ferray/video.py does: the same face (boxes overlapping) keeps its track, its label held by the
        # moving average through one frame that disagrees
        tracked = browser.execute_script(
            "const s = {tracks: [], next: 1};"
            "const a = track(s, [{box: [0, 0, 50, 50], probs: {happy: 1, sad: 0}}]);"
            "const b = track(s, [{box: [5, 0, 50, 50], probs: {happy: 0.2, sad: 0.8}},"
            "                    {box: [300, 0, 50, 50], probs: {happy: 0, sad: 1}}]);"
            "return [a[0].track, b[0].track, b[1].track, b[0].probs.happy, b[0].label];"
        )
        assert tracked[:3] == [1, 1, 2] and abs(tracked[3] - 0.6) < 1e-9 and tracked[4] == "happy"
        # an image the server reads but this browser cannot decode: the answer, and a line saying so,
        # never "classifying..." for ever
        browser.get(f"{server}/")
        browser.execute_script("window.createImageBitmap = () => Promise.reject(new Error('cannot decode'));")
        browser.find_element(By.ID, "file").send_keys(str(image))
        WebDriverWait(browser, 30).until(lambda b: b.find_element(By.ID, "error").text)
        assert "cannot draw the image (cannot decode)" in browser.find_element(By.ID, "error").text
        assert (
            browser.find_elements(By.CSS_SELECTOR, "#results .face")
            and "classifying" not in browser.find_element(By.ID, "results").text
        )
    finally:
        browser.quit()


def test_overload_gets_fast_json_503s_and_the_server_recovers(server, tiny_bundle, synth_faces):
    """A second app on the same Serve, its members holding one request and queueing one: a burst of
    24 concurrent requests is answered at once, 200 or a JSON 503 with Retry-After, never a wait for
    the HTTP timeout; after the burst the app answers as before."""
    from concurrent.futures import ThreadPoolExecutor

    from ray import serve

    tight = [
        f"ensemble.{k}"
        for k in ("max_ongoing_requests=1", "max_batch_size=1", "max_queued_requests=1", "num_cpus=0.25")
    ] + ["ensemble.min_replicas=1", "ensemble.max_replicas=1"]
    url = second_app(server, tiny_bundle, "overload", ["layout=fused", "members=a,b", *tight])
    assert get(f"{server}/readyz")[0] == 200
    body = png_bytes(synth_faces[0][5])

    def one(_):
        started = time.monotonic()
        status, answer = _post_with_headers(f"{url}/predict", body)
        return status, answer, time.monotonic() - started

    try:
        with ThreadPoolExecutor(24) as pool:
            outcomes = list(pool.map(one, range(24)))
        statuses = [status for status, _, _ in outcomes]
        assert set(statuses) <= {200, 503} and statuses.count(503) > 0, statuses
        for status, (answer, headers), seconds in outcomes:
            if status == 503:
                assert "at capacity" in answer["error"] and headers.get("retry-after") == "1"
                assert seconds < 20, seconds  # refused at once, not after the 60 s HTTP timeout
        status, (fused, _) = _post_with_headers(f"{url}/predict", body)
        assert status == 200  # recovered
        _, split = post(f"{server}/predict", body, "image/png")  # the module's app: the split layout
        assert fused["faces"][0]["probs"] == pytest.approx(split["faces"][0]["probs"], abs=1e-6)
        assert fused["faces"][0]["members"]["b"] == pytest.approx(split["faces"][0]["members"]["b"], abs=1e-6)
    finally:
        serve.delete("overload")


@pytest.mark.parametrize("members, answering", [("fast", {"a"}), ("all", {"a", "b", "c"})])
def test_a_set_is_served_by_one_fused_deployment_of_its_members(server, tiny_bundle, synth_faces, members, answering):
    """members: fast (`ferray serve --members fast`): Model A alone, no B in the answers; all: the three
    members of the bundle in one replica. The probabilities are those of `ferray.load(members=...)`."""
    from ray import serve

    import ferray

    url = second_app(server, tiny_bundle, members, ["layout=fused", f"members={members}", "ensemble.num_cpus=0.25"])
    try:
        assert json.loads(get(f"{url}/readyz")[1])["members"] == {"ensemble": "ready"}
        face = synth_faces[0][6]
        status, (answer, _) = _post_with_headers(f"{url}/predict", png_bytes(face))
        (found,) = answer["faces"]
        assert status == 200 and set(found["members"]) == answering
        expected = ferray.load(tiny_bundle, members=members).predict(face)["faces"][0]
        assert found["probs"] == pytest.approx(expected["probs"], abs=1e-5)
        for name in answering:
            assert found["members"][name] == pytest.approx(expected["members"][name], abs=1e-5)
    finally:
        serve.delete(members)


def second_app(server: str, tiny_bundle, name: str, overrides: list[str]) -> str:
    """Another app of the bundle on the module's Serve, at /NAME, once its /readyz says ready; its URL.
    The caller deletes it (serve.delete(name))."""
    from ray import serve

    from ferray.distributed.serving import app_args
    from ferray.serve_app.app import build

    args, _ = app_args(tiny_bundle, None, ["ingress.num_cpus=0.25", *overrides])
    serve.run(build(args), name=name, route_prefix=f"/{name}", blocking=False)
    url = f"{server}/{name}"
    deadline = time.monotonic() + 120
    while _status(f"{url}/readyz") != 200:
        assert time.monotonic() < deadline, f"the app {name} never became ready"
        time.sleep(0.5)
    return url


def _status(url: str) -> int:
    try:
        return get(url)[0]
    except urllib.error.HTTPError as error:
        return error.code


def _post_with_headers(url: str, body: bytes) -> tuple[int, tuple[dict, dict]]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "image/png"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=90) as response:
            return response.status, (json.loads(response.read()), {k.lower(): v for k, v in response.headers.items()})
    except urllib.error.HTTPError as error:
        return error.code, (json.loads(error.read() or b"{}"), {k.lower(): v for k, v in error.headers.items()})


def test_a_killed_replica_is_replaced(server, synth_faces):
    import ray
    from ray.util.state import list_actors

    body = png_bytes(synth_faces[0][5])
    outcomes: list[int] = []
    stop = threading.Event()

    def client():
        while not stop.is_set():
            outcomes.append(post(f"{server}/predict", body, "image/png")[0])

    thread = threading.Thread(target=client)
    thread.start()
    try:
        time.sleep(1.0)
        replicas = [
            a
            for a in list_actors(address=ray.get_runtime_context().gcs_address, filters=[("state", "=", "ALIVE")])
            if "ModelB" in (a.class_name or "") and a.name
        ]
        assert replicas, "no ModelB replica found"
        ray.kill(ray.get_actor(replicas[0].name, namespace="serve"), no_restart=True)
        killed_at = len(outcomes)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and outcomes[killed_at:].count(200) < 5:
            time.sleep(0.5)
    finally:
        stop.set()
        thread.join(timeout=60)
    after = outcomes[killed_at:]
    assert after.count(200) >= 5, f"the service did not answer again after the kill: {after[-10:]}"
    assert set(after) <= {200, 503}, f"only retries or 503s are acceptable while a replica restarts: {set(after)}"
    alive = [
        a
        for a in list_actors(address=ray.get_runtime_context().gcs_address, filters=[("state", "=", "ALIVE")])
        if "ModelB" in (a.class_name or "")
    ]
    assert alive and alive[0].name != replicas[0].name


def start_ferray_serve(bundle, port: int, **popen):
    """`ferray serve` in a process of its own, returned once it says ready (with its stderr so far)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"FERRAY_NUM_CPUS": "4"}
    overrides = ["--set", "model_a.max_replicas=1", "--set", "model_b.max_replicas=1"]
    process = subprocess.Popen(
        [sys.executable, "-m", "ferray.cli", "serve", "--bundle", str(bundle), "--port", str(port), *overrides],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )
    lines = []
    for line in process.stderr:  # the command says when it is ready, after its own health check
        lines.append(line)
        if "serve: ready at" in line:
            break
    assert f"ready at http://127.0.0.1:{port}" in "".join(lines), "".join(lines)
    return process


def test_ferray_serve_starts_answers_and_leaves_no_process_on_sigterm(tiny_bundle, synth_faces):
    import signal

    from support import alive, descendants, listening_addresses

    from ferray.distributed.leftovers import process_table

    port = free_port()
    process = start_ferray_serve(tiny_bundle, port)
    try:
        status, answer = post(f"http://127.0.0.1:{port}/predict", png_bytes(synth_faces[0][5]), "image/png")
        assert status == 200 and len(answer["faces"]) == 1
        family = descendants(process.pid)
        assert family, "the embedded Ray's processes should be children of `ferray serve`"
        table = process_table()
        haproxy = [pid for pid in family if table.get(pid) and Path(table[pid][0]).name == "haproxy"]
        listening = set().union(*(listening_addresses(pid) for pid in haproxy))
        # the front, the stats page and the metrics: all three on loopback, none on every interface
        assert len(listening) == 3 and all(a.startswith("127.0.0.1:") for a in listening), listening
        process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        _, stderr = process.communicate(timeout=120)
        stopped_in = time.monotonic() - signalled
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, stderr
    assert "serve: stopped" in stderr, stderr
    assert stopped_in < 10, f"SIGTERM took {stopped_in:.1f} s"
    assert "failed to shut down" not in stderr and "Traceback" not in stderr, stderr
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and alive(family):
        time.sleep(0.5)
    assert not alive(family), f"processes left behind: {sorted(alive(family))}"


def test_a_killed_ferray_serve_leaves_no_haproxy_and_the_next_one_starts_on_its_port(tiny_bundle):
    """SIGKILL of the server's whole process group, as an out-of-memory killer or a crash ends it:
    HAProxy (outside that group, as Ray starts it) is ended by the server's watchdog within seconds,
    and a new `ferray serve` on the same port starts and answers."""
    import os
    import signal

    from support import alive, descendants

    from ferray.distributed.leftovers import process_table

    port = free_port()
    process = start_ferray_serve(tiny_bundle, port, start_new_session=True)
    family = descendants(process.pid)
    table = process_table()
    haproxy = {pid for pid in family if table.get(pid) and Path(table[pid][0]).name == "haproxy"}
    try:
        assert haproxy, "the fast serving mode runs HAProxy"
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and alive(haproxy):
            time.sleep(0.2)
        assert not alive(haproxy), f"HAProxy outlived its server: {sorted(alive(haproxy))}"
    finally:
        if process.poll() is None:
            process.kill()
    again = start_ferray_serve(tiny_bundle, port)
    try:
        assert get(f"http://127.0.0.1:{port}/readyz")[0] == 200
    finally:
        again.terminate()
        again.communicate(timeout=120)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and alive(family):
        time.sleep(0.5)
    assert not alive(family), f"processes left behind: {sorted(alive(family))}"


def test_a_request_the_model_cannot_take_fails_alone(tiny_bundle, caplog):
    """One poisoned request in a merged batch: it gets an error id (the exception's text only in the
    server's log, under that id), the others their answers."""
    import torch

    from ferray.serve_app.app import Member

    replica = Member.func_or_class(str(tiny_bundle), ["a"], {"threads": torch.get_num_threads()})
    forward = replica._forward

    def picky(faces):
        if (faces == 7).all(dim=(1, 2)).any():
            raise RuntimeError("this face breaks the model")
        return forward(faces)

    replica._forward = picky
    good = np.random.default_rng(0).integers(0, 256, (2, 48, 48), dtype=np.uint8)
    poisoned = np.full((1, 48, 48), 7, np.uint8)
    with caplog.at_level("ERROR", logger="ferray.serve"):
        answers = replica.run_requests([good, poisoned, good[:1]])
    assert isinstance(answers[1], str) and "breaks" not in answers[1]
    error_id = re.fullmatch(r"error id ([0-9a-f]{12})", answers[1]).group(1)
    logged = [r for r in caplog.records if error_id in r.getMessage()]
    assert logged and "this face breaks the model" in str(logged[0].exc_info[1])
    assert answers[0].shape == (2, 7) and answers[2].shape == (1, 7)
    assert np.allclose(answers[2], answers[0][:1], atol=1e-6)


def test_the_fused_ingress_merges_concurrent_requests_and_gives_each_its_own_answer(server, tiny_bundle, synth_faces):
    """The fused layout batches at the ingress (one call to the models per group of requests): 12
    different faces sent at once each get the answer the split app gives that face alone."""
    from concurrent.futures import ThreadPoolExecutor

    from ray import serve

    merged = ["ensemble.max_batch_size=8", "ensemble.batch_wait_timeout_s=0.2", "ensemble.num_cpus=0.25"]
    url = second_app(
        server, tiny_bundle, "merged", ["layout=fused", "members=a,b", f"max_faces_per_request={MAX_FACES}", *merged]
    )
    faces = synth_faces[0][:12]

    def ask(base, face):
        body = json.dumps({"pixels": face.reshape(-1).tolist()}).encode()
        status, answer = post(f"{base}/predict/pixels", body, "application/json")
        assert status == 200, answer
        return answer["faces"][0]

    try:
        with ThreadPoolExecutor(12) as pool:
            together = list(pool.map(lambda face: ask(url, face), faces))
        for face, answer in zip(faces, together):
            alone = ask(server, face)  # the module's app: the split layout, one request at a time
            assert answer["probs"] == pytest.approx(alone["probs"], abs=1e-5)
            assert answer["members"]["a"] == pytest.approx(alone["members"]["a"], abs=1e-5)
    finally:
        serve.delete("merged")


def test_a_merged_group_is_spread_over_the_replicas_and_answered_in_order():
    """The fused ingress sends a group in one part per replica (a whole group kept one replica busy
    while the other idled); every request gets its own answer back in order, and a part that fails
    fails only its own requests."""
    import asyncio
    from types import SimpleNamespace

    from ferray.serve_app.app import Ingress, MemberUnavailable

    calls = []

    async def member(which, requests, method):
        calls.append(len(requests))
        if any(int(request[0]) == 13 for request in requests):
            raise MemberUnavailable("the models are at capacity; retry shortly")
        return [request * 10 for request in requests]

    ingress = Ingress.func_or_class
    fake = SimpleNamespace(_replicas=2, _member=member)
    fake._part_call = lambda requests: ingress._part_call(fake, requests)
    requests = [np.array([i]) for i in range(5)]
    answers = asyncio.run(ingress._group_call(fake, requests))
    assert sorted(calls) == [2, 3]  # both replicas get a part, of near-equal size
    assert [int(answer[0]) for answer in answers] == [0, 10, 20, 30, 40]

    calls.clear()
    answers = asyncio.run(ingress._group_call(fake, [np.array([1]), np.array([2]), np.array([13])]))
    assert [int(answers[0][0]), int(answers[1][0])] == [10, 20]
    assert isinstance(answers[2], MemberUnavailable) and "capacity" in str(answers[2])

    calls.clear()
    asyncio.run(ingress._group_call(fake, [np.array([4])]))
    assert calls == [1]  # one request: one call, no empty parts


def test_queue_bounds_are_checked_for_the_ingress_as_for_the_replicas():
    from ferray.config import ConfigError
    from ferray.serve_app.settings import parse_settings

    for part in ("ingress", "ensemble"):
        with pytest.raises(ConfigError, match=f"{part}: max_queued_requests must be >= 1, or -1"):
            parse_settings({part: {"max_queued_requests": 0}})
    assert parse_settings({"ingress": {"max_queued_requests": -1}}).ingress.max_queued_requests == -1


class ScriptedReplicas:
    """A member's handle whose calls fail as scripted (an exception per call), then answer."""

    def __init__(self, failures: list[Exception]):
        self.failures, self.calls = list(failures), 0
        self.predict = self

    def remote(self, faces):
        self.calls += 1
        failure = self.failures.pop(0) if self.failures else None

        class Response:
            def __await__(self):
                if failure is not None:
                    raise failure
                return faces
                yield  # noqa: B901 - a generator, so that awaiting it works

            def cancel(self):
                pass

        return Response()


def test_a_call_is_retried_only_when_no_replica_ran_it():
    """Retried on another replica when none ran it; never after the replica died running it."""
    import asyncio
    from types import SimpleNamespace

    from ray.exceptions import ActorDiedError
    from ray.serve.exceptions import ReplicaUnavailableError

    from ferray.serve_app.app import Ingress, MemberUnavailable

    def call(replicas, faces):
        """Ingress._member on an ingress of only what it reads (settings, members)."""
        settings = SimpleNamespace(member_retries=2, member_timeout_s=5.0)
        ingress = SimpleNamespace(settings=settings, members={"a": replicas})
        return asyncio.run(Ingress.func_or_class._member(ingress, "a", faces))

    faces = np.zeros((1, 48, 48), np.uint8)  # the scripted replicas answer with what they were sent
    unavailable = ScriptedReplicas([ReplicaUnavailableError("r1")])
    assert call(unavailable, faces) is faces and unavailable.calls == 2
    died = ScriptedReplicas([ActorDiedError()])
    with pytest.raises(MemberUnavailable, match="stopped while answering this request.*not retried"):
        call(died, faces)
    assert died.calls == 1
