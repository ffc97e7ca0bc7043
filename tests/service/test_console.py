"""The web console (/ui/) in a real browser against the real service.

Headless Chromium (Debian's ``chromium`` + ``chromium-driver``) driven by Selenium; the
service is the real one (Ray, HTTP on 127.0.0.1, SQLite), one for the module, with two
tenants. Covers: a wrong token is refused on the page; a tenant sees exactly its jobs (the
ids the API lists), a job's loss curve drawn from its metrics, its spec and log; a hostile
job name and spec show as text; cancel and download from the page (the file equals the
API's adapter bytes); the token never appears in a URL or a cookie; another tenant's
browser sees none of it. Screenshots go to the test's tmp_path and, with
``FERRYTUNE_TEST_ARTIFACTS`` set, to ``$FERRYTUNE_TEST_ARTIFACTS/console/``.

Skipped (saying why) without selenium, /usr/bin/chromium or /usr/bin/chromedriver (other
paths: ``FERRYTUNE_CHROMIUM``, ``FERRYTUNE_CHROMEDRIVER``), unless ``FERRYTUNE_REQUIRE_BROWSER=1``
(CI), which makes that a failure.
"""

import contextlib
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests
import yaml
from service_testlib import add_tenant, free_port, job_spec, wait_for, write_classification

pytest.importorskip("ray")

from ferrytune.service._client import Client
from ferrytune.service._controller import ControllerSettings
from ferrytune.service._service import Service, ServiceConfig

CHROMIUM = os.environ.get("FERRYTUNE_CHROMIUM", "/usr/bin/chromium")  # Debian's chromium
CHROMEDRIVER = os.environ.get("FERRYTUNE_CHROMEDRIVER", "/usr/bin/chromedriver")  # Debian's chromium-driver
PAGE_WAIT_S = 30.0
HOSTILE = '<img src=x onerror="window.__pwned=1">'
HOSTILE_COMMENT = "# </pre><script>window.__pwned=2</script><b onmouseover=alert(1)>x</b>"
TRAIN_RGB = (0x1F, 0x6F, 0xEB)  # console.css --accent: the train loss line


def _browser_missing() -> str | None:
    missing = []
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium is not installed (pip install selenium)")
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not os.access(path, os.X_OK):
            missing.append(f"{path} is absent (apt-get install {package})")
    return "; ".join(missing) or None


@pytest.fixture(scope="module")
def browser_available():
    missing = _browser_missing()
    if missing:
        if os.environ.get("FERRYTUNE_REQUIRE_BROWSER") == "1":  # CI: the browser test must run
            pytest.fail(f"FERRYTUNE_REQUIRE_BROWSER=1 but {missing}")
        pytest.skip(missing)




@pytest.fixture(scope="module")
def svc(browser_available, ray_session, tiny, tmp_path_factory):
    d, base = tiny
    state = tmp_path_factory.mktemp("console") / "state"
    tokens = {name: add_tenant(state, name) for name in ("alice", "bob")}
    settings = ControllerSettings(worker_memory_gib=1.0, max_workers=1, max_jobs_per_worker=4, token_capacity=512,
                                  checkpoint_every_steps=2, worker_num_cpus=1.0, worker_slice_s=0.3, tick_s=0.05)
    service = Service(ServiceConfig(state_dir=str(state), bases={"tiny": str(base)}, port=free_port(),
                                    controller=settings)).start()
    try:
        alice, bob = Client(service.url, tokens["alice"]), Client(service.url, tokens["bob"])
        alice.upload(d / "cls.jsonl", "train.jsonl")
        bob.upload(d / "cmp.jsonl", "train.jsonl")
        # a hostile name, and HTML in the spec text (a YAML comment is kept verbatim by /spec)
        hostile_spec = HOSTILE_COMMENT + "\n" + yaml.safe_dump({**job_spec("tiny", "train.jsonl", steps=6),
                                                                "name": HOSTILE})
        hostile = alice.submit_text(hostile_spec)["id"]
        plain = alice.submit_text(yaml.safe_dump({**job_spec("tiny", "train.jsonl", steps=4),
                                                  "name": "alice-plain-job"}))["id"]
        bobs = bob.submit_text(yaml.safe_dump({**job_spec("tiny", "train.jsonl", steps=4), "name": "bob-job"}))["id"]
        for client, job_id in ((alice, hostile), (alice, plain), (bob, bobs)):
            wait_for(client, job_id, lambda j: j["state"] == "succeeded")
        yield SimpleNamespace(url=service.url, tokens=tokens, alice=alice, bob=bob, hostile=hostile, plain=plain,
                              bobs=bobs, hostile_spec=hostile_spec)
    finally:
        service.stop()


@pytest.fixture
def open_browser(browser_available, tmp_path):
    """``open_browser(name)`` -> a headless Chromium (downloads into ``tmp_path/NAME-downloads``).

    Every browser and its chromedriver is quit on every exit path, after a last screenshot.
    """
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as DriverService

    drivers = []
    stack = contextlib.ExitStack()  # quits every browser even if quitting one raises

    def open_one(name: str):
        downloads = tmp_path / f"{name}-downloads"
        downloads.mkdir()
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--window-size=1280,1600", f"--user-data-dir={tmp_path / f'{name}-profile'}",
                    "--no-first-run", "--disable-extensions", "--disable-background-networking"):
            options.add_argument(arg)
        options.add_experimental_option("prefs", {
            "download.default_directory": str(downloads), "download.prompt_for_download": False,
            "download.directory_upgrade": True, "safebrowsing.enabled": False})
        service = DriverService(executable_path=CHROMEDRIVER, log_output=str(tmp_path / f"{name}-chromedriver.log"))
        driver = webdriver.Chrome(options=options, service=service)  # quits its chromedriver itself if this fails
        stack.callback(driver.quit)  # the browser, then its chromedriver
        drivers.append((name, driver))
        driver.set_script_timeout(PAGE_WAIT_S)
        driver.downloads = downloads
        return driver

    with stack:
        try:
            yield open_one
        finally:
            for name, driver in drivers:
                with contextlib.suppress(Exception):  # the page as it was at the end, pass or fail
                    screenshot(driver, tmp_path, f"{name}-last")


def screenshot(driver, tmp_path: Path, name: str) -> None:
    path = tmp_path / f"{name}.png"
    driver.save_screenshot(str(path))
    artifacts = os.environ.get("FERRYTUNE_TEST_ARTIFACTS")
    if artifacts:
        out = Path(artifacts) / "console"
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, out / path.name)


def wait_page(driver, predicate, what: str, timeout_s: float = PAGE_WAIT_S):
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout_s, poll_frequency=0.1).until(lambda d: predicate(d))
    except Exception as e:
        raise AssertionError(f"the page never showed {what}: {type(e).__name__}\n"
                             f"{driver.execute_script('return document.body.innerText')}") from None


def js(driver, script: str, *args):
    return driver.execute_script(script, *args)


def sign_in(driver, url: str, token: str) -> None:
    from selenium.webdriver.common.by import By

    driver.get(f"{url}/ui/")
    box = driver.find_element(By.ID, "token")
    box.clear()
    box.send_keys(token)
    driver.find_element(By.ID, "signin-button").click()


def listed_ids(driver) -> list[str]:
    return js(driver, "return [...document.querySelectorAll('#jobs-body tr')].map(tr => tr.dataset.jobId)")


def signed_in_with_list(driver) -> bool:
    return js(driver, "return !document.getElementById('jobs-section').hidden && "
                      "document.getElementById('jobs-status').textContent.includes('refreshed')")


def row_cells(driver, job_id: str) -> dict:
    return js(driver, """
        const tr = [...document.querySelectorAll('#jobs-body tr')].find(tr => tr.dataset.jobId === arguments[0]);
        return Object.fromEntries([...tr.cells].map((td, i) =>
            [document.querySelectorAll('#jobs thead th')[i].textContent, td.textContent]));""", job_id)


def open_job(driver, job_id: str) -> None:
    from selenium.webdriver.common.by import By

    row = [tr for tr in driver.find_elements(By.CSS_SELECTOR, "#jobs-body tr")
           if tr.get_attribute("data-job-id") == job_id]
    assert row, f"{job_id} is not listed"
    row[0].find_element(By.CSS_SELECTOR, "button.job-link").click()
    wait_page(driver, lambda d: js(d, "return document.getElementById('detail-id').textContent") == job_id
              and js(d, "return document.getElementById('detail-summary').dataset.state || ''") != "",
              f"job {job_id}'s details")


def test_wrong_token_is_refused_on_the_page(svc, open_browser, tmp_path):
    driver = open_browser("wrong")
    sign_in(driver, svc.url, "ftk_000000000000_" + "x" * 43)
    message = wait_page(driver, lambda d: js(d, "return document.getElementById('signin-error').textContent"),
                        "an error for a wrong token")
    screenshot(driver, tmp_path, "wrong-token")
    assert "not accepted" in message and "401" in message, message
    assert js(driver, "return document.getElementById('jobs-section').hidden") is True
    assert js(driver, "return sessionStorage.length") == 0  # a refused token is not kept
    assert listed_ids(driver) == []


def test_tenant_sees_its_jobs_curve_spec_and_log_and_hostile_text_stays_text(svc, open_browser, tmp_path):
    from PIL import Image
    from selenium.webdriver.common.by import By

    driver = open_browser("alice")
    sign_in(driver, svc.url, svc.tokens["alice"])
    wait_page(driver, signed_in_with_list, "the job list")
    api_ids = [j["id"] for j in svc.alice.jobs()]
    assert set(api_ids) >= {svc.hostile, svc.plain}
    wait_page(driver, lambda d: listed_ids(d) == [j["id"] for j in svc.alice.jobs()], "exactly alice's jobs")
    assert svc.bobs not in listed_ids(driver)
    screenshot(driver, tmp_path, "alice-jobs")

    job = svc.alice.status(svc.hostile)
    cells = row_cells(driver, svc.hostile)
    assert cells["Name"] == HOSTILE  # the markup is shown as its characters
    assert cells["State"] == "succeeded" and cells["Step"] == "6 / 6"
    assert float(cells["Loss"]) == pytest.approx(job["loss"], rel=1e-3)
    assert float(cells["Tokens/s"]) > 0
    for column, key in (("Eval accuracy", "eval_accuracy"), ("Eval loss", "eval_loss")):
        if job.get(key) is None:
            assert cells[column] == "\u2014", cells
        else:
            assert float(cells[column]) == pytest.approx(job[key], rel=1e-3)

    open_job(driver, svc.hostile)
    rows = svc.alice.metrics(svc.hostile)["metrics"]
    assert len(rows) == 6
    # the loss curve: one line through every metrics row, a dot per row, actually painted
    line = driver.find_element(By.CSS_SELECTOR, "#loss-chart path.series.train")
    assert line.get_attribute("data-points") == str(len(rows))
    assert line.get_attribute("d").count(",") == len(rows)
    assert len(driver.find_elements(By.CSS_SELECTOR, "#loss-chart circle.pt.train")) == len(rows)
    chart_png = tmp_path / "alice-loss-chart.png"
    driver.find_element(By.ID, "loss-chart").screenshot(str(chart_png))
    pixels = Image.open(chart_png).convert("RGB").getdata()
    painted = sum(1 for p in pixels if all(abs(a - b) < 40 for a, b in zip(p, TRAIN_RGB)))
    assert painted > 200, f"only {painted} pixels of the loss line's colour"
    # no data.eval in this job: the eval chart says so (test_eval_curves draws one)
    assert not svc.alice.metrics(svc.hostile).get("evals")
    assert "no evaluation" in js(driver, "return document.getElementById('eval-chart').textContent")

    assert js(driver, "return document.getElementById('spec').textContent") == svc.hostile_spec
    logs = svc.alice.logs(svc.hostile)
    assert "admitted to worker" in logs
    wait_page(driver, lambda d: js(d, "return document.getElementById('logs').textContent") == logs, "the log")
    assert HOSTILE in js(driver, "return document.getElementById('detail-name').textContent")
    screenshot(driver, tmp_path, "alice-job")

    # nothing of the hostile text became markup or ran (checked in the DOM, not only by the CSP)
    assert js(driver, "return document.querySelectorAll('img, b, iframe, object, embed').length") == 0
    assert js(driver, "return [...document.scripts].map(s => s.getAttribute('src'))") == ["console.js"]
    assert js(driver, "return typeof window.__pwned") == "undefined"
    # and the browser got the CSP: an inline script put into the page does not run
    ran = js(driver, "const s = document.createElement('script'); s.textContent = 'window.__inline = 1'; "
                     "document.body.append(s); return typeof window.__inline")
    assert ran == "undefined"
    # the token went only into headers: not in a URL the page fetched, not in a cookie
    token = svc.tokens["alice"]
    fetched = js(driver, "return performance.getEntriesByType('resource').map(e => e.name)")
    assert any("/v1/jobs" in u for u in fetched) and not any(token in u for u in fetched), fetched
    assert token not in driver.current_url and js(driver, "return document.cookie") == ""


def test_download_from_the_page_is_the_api_adapter(svc, open_browser, tmp_path):
    from selenium.webdriver.common.by import By

    driver = open_browser("download")
    sign_in(driver, svc.url, svc.tokens["alice"])
    wait_page(driver, signed_in_with_list, "the job list")
    open_job(driver, svc.plain)
    button = driver.find_element(By.ID, "download-button")
    wait_page(driver, lambda d: button.is_enabled(), "an enabled download button")
    button.click()

    def downloaded(_d):
        files = [p for p in driver.downloads.iterdir() if not p.name.endswith((".crdownload", ".tmp"))]
        return files[0] if files else None

    path = wait_page(driver, downloaded, "a downloaded file")
    screenshot(driver, tmp_path, "download")
    want = requests.get(f"{svc.url}/v1/jobs/{svc.plain}/adapter",
                        headers={"Authorization": f"Bearer {svc.tokens['alice']}"}, timeout=30)
    assert want.status_code == 200
    assert path.name == f"{svc.plain}-adapter.tar"
    assert path.read_bytes() == want.content
    assert "Downloaded" in driver.find_element(By.ID, "action-message").text


def test_cancel_from_the_page(svc, open_browser, tmp_path):
    from selenium.webdriver.common.by import By

    long = svc.alice.submit_text(yaml.safe_dump({**job_spec("tiny", "train.jsonl", steps=100_000), "name": "long"}))
    wait_for(svc.alice, long["id"], lambda j: j["state"] == "running" and j["step"] >= 1)  # training, not loading
    driver = open_browser("cancel")
    sign_in(driver, svc.url, svc.tokens["alice"])
    wait_page(driver, signed_in_with_list, "the job list")
    wait_page(driver, lambda d: long["id"] in listed_ids(d), "the new job")
    open_job(driver, long["id"])
    button = driver.find_element(By.ID, "cancel-button")
    assert button.is_enabled()
    assert driver.find_element(By.ID, "download-button").is_enabled() is False  # no adapter yet
    screenshot(driver, tmp_path, "cancel-before")
    button.click()
    job = wait_for(svc.alice, long["id"], lambda j: j["state"] == "cancelled", timeout_s=60)
    assert job["cancel_requested"] and 1 <= job["step"] < 100_000
    assert "cancel requested" in svc.alice.logs(long["id"])
    wait_page(driver, lambda d: row_cells(d, long["id"])["State"] == "cancelled", "the job as cancelled")
    wait_page(driver, lambda d: js(d, "return document.getElementById('detail-summary').dataset.state")
              == "cancelled", "the detail as cancelled")
    assert not button.is_enabled()
    screenshot(driver, tmp_path, "cancel-after")


def test_another_tenant_sees_none_of_them(svc, open_browser, tmp_path):
    driver = open_browser("bob")
    sign_in(driver, svc.url, svc.tokens["bob"])
    wait_page(driver, signed_in_with_list, "the job list")
    assert listed_ids(driver) == [j["id"] for j in svc.bob.jobs()] == [svc.bobs]
    html, text = js(driver, "return [document.documentElement.outerHTML, document.body.textContent]")
    for other in [j["id"] for j in svc.alice.jobs()] + ["alice-plain-job", "onerror"]:
        assert other not in html and other not in text, other
    screenshot(driver, tmp_path, "bob-jobs")
    # signing out forgets the token: a reload shows the sign-in form, not bob's jobs
    js(driver, "document.getElementById('signout').click()")
    driver.refresh()
    wait_page(driver, lambda d: js(d, "return !document.getElementById('signin').hidden"), "the sign-in form")
    assert js(driver, "return sessionStorage.length") == 0 and listed_ids(driver) == []


def test_eval_curves_and_columns(svc, open_browser, tmp_path):
    """A job with data.eval: its eval accuracy and loss in the list, its eval curves drawn point for point."""
    from selenium.webdriver.common.by import By

    write_classification(tmp_path / "eval.jsonl", 12, seed=7)
    svc.alice.upload(tmp_path / "eval.jsonl", "eval.jsonl")
    spec = job_spec("tiny", "train.jsonl", steps=6)
    spec["data"]["eval"] = "eval.jsonl"
    spec["train"]["eval_every_steps"] = 2
    job_id = svc.alice.submit_text(yaml.safe_dump({**spec, "name": "with-eval"}))["id"]
    job = wait_for(svc.alice, job_id, lambda j: j["state"] == "succeeded")
    evals = svc.alice.metrics(job_id)["evals"]
    assert len(evals) >= 3 and job["eval_accuracy"] is not None and job["eval_loss"] is not None

    driver = open_browser("eval")
    sign_in(driver, svc.url, svc.tokens["alice"])
    wait_page(driver, lambda d: job_id in listed_ids(d), "the job with evaluation")
    cells = row_cells(driver, job_id)
    assert float(cells["Eval accuracy"]) == pytest.approx(job["eval_accuracy"], rel=1e-3)
    assert float(cells["Eval loss"]) == pytest.approx(job["eval_loss"], rel=1e-3)
    open_job(driver, job_id)
    accuracy = driver.find_element(By.CSS_SELECTOR, "#eval-chart path.series.eval")
    assert accuracy.get_attribute("data-points") == str(sum(r["eval_accuracy"] is not None for r in evals))
    assert len(driver.find_elements(By.CSS_SELECTOR, "#eval-chart circle.pt.eval")) == len(evals)
    eval_loss = driver.find_element(By.CSS_SELECTOR, "#loss-chart path.series.eval")
    assert eval_loss.get_attribute("data-points") == str(len(evals))
    train = driver.find_element(By.CSS_SELECTOR, "#loss-chart path.series.train")
    assert train.get_attribute("data-points") == str(len(svc.alice.metrics(job_id)["metrics"]))
    screenshot(driver, tmp_path, "eval-job")
