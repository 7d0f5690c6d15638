"""The release as a user gets it: the built sdist and wheel, installed into a fresh venv.

An editable install sees the whole repository, so it cannot show that a template, a migration
or a static file is missing from the wheel. Here the wheel is built with ``python -m build``,
checked with ``twine check``, installed (not editable) into a new virtual environment outside
the repository, and a small project there runs ``migrate``, ``check``, ``collectstatic``,
``runapscheduler`` with ``/metrics`` answering, renders the admin pages and writes the
monitoring files.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest

import django_apscheduler_obs
from tests.conftest import CHILD_WARNINGS, wait_for
from tests.demo_process import free_port, http_get

pytestmark = [pytest.mark.slow, pytest.mark.once]

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "django_apscheduler_obs"
VERSION = django_apscheduler_obs.__version__


# Build tools and pip run as a user runs them, without the tests' warnings-as-errors.
TOOLS_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}


def run(*args: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        env=TOOLS_ENV if env is None else env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"{args} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("dist")
    # No --sdist/--wheel: build makes the sdist, then the wheel from the unpacked sdist, so a
    # file missing from the sdist fails here too.
    run(sys.executable, "-m", "build", "--outdir", out, ROOT)
    wheel = out / f"django_apscheduler_obs-{VERSION}-py3-none-any.whl"
    sdist = out / f"django_apscheduler_obs-{VERSION}.tar.gz"
    assert wheel.exists() and sdist.exists(), sorted(p.name for p in out.iterdir())
    return {"wheel": wheel, "sdist": sdist}


def test_twine_check_passes(dist):
    output = run(sys.executable, "-m", "twine", "check", "--strict", dist["wheel"], dist["sdist"])
    assert output.count("PASSED") == 2


def test_the_wheel_holds_the_app_and_nothing_of_the_repository(dist):
    names = set(zipfile.ZipFile(dist["wheel"]).namelist())
    top = {name.split("/")[0] for name in names}
    assert top == {PACKAGE, f"django_apscheduler_obs-{VERSION}.dist-info"}, top
    in_package = {name.removeprefix(f"{PACKAGE}/") for name in names}
    for needed in (
        "py.typed",
        "migrations/0001_initial.py",
        "migrations/0003_sign_job_state.py",
        "templates/admin/django_apscheduler_obs/djangojob/change_list.html",
        "templates/admin/django_apscheduler_obs/scheduler_banner.html",
        "static/django_apscheduler_obs/admin.css",
        "management/commands/runapscheduler.py",
        "management/commands/apscheduler_monitoring.py",
        "monitoring/__init__.py",
    ):
        assert needed in in_package, needed
    # Every migration of the source tree is shipped.
    for migration in (ROOT / PACKAGE / "migrations").glob("0*.py"):
        assert f"migrations/{migration.name}" in in_package
    metadata = zipfile.ZipFile(dist["wheel"]).read(
        f"django_apscheduler_obs-{VERSION}.dist-info/METADATA"
    )
    text = metadata.decode()
    assert f"Version: {VERSION}" in text
    assert "Requires-Dist: django<6.2,>=5.2" in text
    assert "Classifier: Framework :: Django :: 6.1" in text
    assert "Project-URL: Changelog" in text


def test_the_sdist_holds_the_sources(dist):
    with tarfile.open(dist["sdist"]) as sdist:
        names = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    for needed in ("pyproject.toml", "README.md", "CHANGELOG.md", "LICENSE", f"{PACKAGE}/py.typed"):
        assert needed in names, needed


SETTINGS = """
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent
SECRET_KEY = "release-check"
DEBUG = False
ALLOWED_HOSTS = ["testserver", "127.0.0.1"]
INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_apscheduler_obs",
]
MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]
ROOT_URLCONF = "urls"
TEMPLATES = [{
    "BACKEND": "django.template.backends.django.DjangoTemplates",
    "APP_DIRS": True,
    "OPTIONS": {"context_processors": [
        "django.template.context_processors.request",
        "django.contrib.auth.context_processors.auth",
        "django.contrib.messages.context_processors.messages",
    ]},
}]
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": BASE_DIR / "db.sqlite3"}}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
USE_TZ = True
STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "static"
APSCHEDULER_JOBS = [{"id": "tick", "func": "jobs:tick", "trigger": "interval", "seconds": 1}]
"""

URLS = """
from django.contrib import admin
from django.urls import path

urlpatterns = [path("admin/", admin.site.urls)]
"""

JOBS = """
def tick():
    return "tock"
"""

ADMIN_CHECK = """
import django

django.setup()
from django.contrib.auth.models import User
from django.test import Client

import django_apscheduler_obs
from django_apscheduler_obs.models import DjangoJob, DjangoJobExecution

print(django_apscheduler_obs.__file__)
user = User.objects.create_superuser("admin", "admin@example.com", "pw")
client = Client()
client.force_login(user)
job = DjangoJob.objects.get(id="tick")
assert DjangoJobExecution.objects.filter(job_id="tick", status="Executed").exists()
for url, marker in (
    ("/admin/django_apscheduler_obs/djangojob/", "tick"),
    (f"/admin/django_apscheduler_obs/djangojob/{job.pk}/change/", 'id="dao-run-now"'),
    ("/admin/django_apscheduler_obs/djangojobexecution/", "Executed"),
):
    response = client.get(url)
    page = response.content.decode()
    assert response.status_code == 200, (url, response.status_code, page[:2000])
    assert marker in page, (url, marker)
    assert "django_apscheduler_obs/admin.css" in page, url
print("admin ok")
"""


def scrape(url: str) -> str | None:
    """The page, or None while the server does not answer yet."""
    try:
        return http_get(url)[1].decode()
    except OSError:
        return None


def ran_tick(body: str | None) -> str | None:
    """The scrape, once it counts a successful run of the project's job."""
    for line in (body or "").splitlines():
        if (
            line.startswith("apscheduler_job_runs_total{")
            and 'job_id="tick"' in line
            and 'outcome="success"' in line
            and float(line.rsplit(" ", 1)[1]) >= 1
        ):
            return body
    return None


def test_the_installed_wheel_runs_a_project(dist, tmp_path):
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv)
    python = venv / "bin" / "python"
    run(python, "-m", "pip", "install", "-q", dist["wheel"])

    project = tmp_path / "project"
    project.mkdir()
    for name, text in (("settings.py", SETTINGS), ("urls.py", URLS), ("jobs.py", JOBS)):
        (project / name).write_text(textwrap.dedent(text))
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "PYTHON"))},
        "DJANGO_SETTINGS_MODULE": "settings",
        "PYTHONPATH": str(project),
        # The installed package raises no deprecation warning either.
        "PYTHONWARNINGS": CHILD_WARNINGS,
    }

    def manage(*args: str) -> str:
        return run(python, "-m", "django", *args, cwd=project, env=env)

    where = run(python, "-c", f"import {PACKAGE}; print({PACKAGE}.__file__)", cwd=project, env=env)
    assert where.startswith(str(venv)), where
    manage("migrate", "--no-input", "-v0")
    assert "no issues" in manage("check")
    manage("collectstatic", "--no-input", "-v0")
    assert (project / "static" / PACKAGE / "admin.css").is_file()

    port = free_port()
    scheduler = subprocess.Popen(
        [python, "-m", "django", "runapscheduler", "--metrics-port", str(port)],
        cwd=project,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        metrics = wait_for(
            lambda: ran_tick(scrape(f"http://127.0.0.1:{port}/metrics")),
            timeout=60,
            interval=0.2,
            message="/metrics with a recorded run of the wheel's scheduler",
        )
        assert "apscheduler_scheduler_state" in metrics
        assert http_get(f"http://127.0.0.1:{port}/readyz")[0] == 200
    finally:
        scheduler.send_signal(signal.SIGTERM)
        output, _ = scheduler.communicate(timeout=60)
    assert scheduler.returncode == 0, output

    (project / "admin_check.py").write_text(textwrap.dedent(ADMIN_CHECK))
    output = run(python, "admin_check.py", cwd=project, env=env)
    assert str(venv) in output and "admin ok" in output

    monitoring = tmp_path / "monitoring"
    manage("apscheduler_monitoring", "--out", str(monitoring), "--selector", 'job="billing"')
    rules = (monitoring / "alerts" / "apscheduler.rules.yaml").read_text()
    assert 'job="billing"' in rules
    assert sorted(p.name for p in (monitoring / "dashboards").iterdir()) == [
        "apscheduler-job.json",
        "apscheduler-overview.json",
    ]
