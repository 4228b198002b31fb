"""The container image (Dockerfile, compose.yaml, docs/deploy.md): built from a plain Debian
base, `kiln train` in it writes a run directory owned by the user it ran as, `kiln serve` in
it runs a job with its store in PostgreSQL, and the image runs as non-root and holds no
secret nor this machine's pip settings.

podman builds and runs it (apt-get installs podman, runc and debootstrap when missing, as
root). The base image comes from `debootstrap --variant=minbase bookworm` (Debian's python3
3.11), built once a day and kept in podman's store; `KILN_TEST_IMAGE_BASE=python:3.11-slim`
names another. As root the containers run as uid 1234, so that a file root would have
written shows; as another user, rootless with `--userns=keep-id`, as that user.
"""

from __future__ import annotations

import ast
import configparser
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
IMAGE = "localhost/kiln-test:latest"
BASE_REPO = "localhost/kiln-test-base"
TOKEN = "image-test-token-5f3a9c"
UID = 1234  # as root: the containers' user, neither root nor the image's default
TINY = (
    "train.max_steps=2",
    "train.batch_size=2",
    "model.hidden_size=32",
    "model.num_layers=1",
    "model.num_heads=2",
    "tokenizer.vocab_size=300",
    "data.max_length=64",
    "eval.max_batches=1",
    "eval.generate.num_samples=1",
    "eval.generate.max_new_tokens=8",
    "eval.sample_max_new_tokens=8",
)


class Podman:
    """podman with this test's settings: runc, cgroupfs, no default ulimits (which a
    container here may not set), from a containers.conf of its own (CONTAINERS_CONF)."""

    def __init__(self, conf_dir: Path) -> None:
        conf = conf_dir / "containers.conf"
        conf.write_text(
            '[containers]\ndefault_ulimits = []\n\n[engine]\nruntime = "runc"\n'
            'cgroup_manager = "cgroupfs"\nevents_logger = "file"\n'
        )
        self.env = {**os.environ, "CONTAINERS_CONF": str(conf)}

    def __call__(self, *args: str, timeout: float = 300, check: bool = True) -> str:
        proc = subprocess.run(
            ["podman", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            pytest.fail(f"podman {' '.join(args[:3])} ...: exit {proc.returncode}\n{proc.stderr}")
        return proc.stdout

    def has(self, image: str) -> bool:
        found = subprocess.run(["podman", "image", "exists", image], env=self.env)
        return found.returncode == 0

    def logs(self, container: str) -> str:
        """The container's output, stdout and stderr together."""
        cmd = ["podman", "logs", container]
        return subprocess.run(
            cmd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        ).stdout


def _install(*tools: str) -> None:
    """Debian's podman, runc and debootstrap, with apt-get as root when one is missing."""
    if all(shutil.which(t) for t in tools) or os.geteuid() != 0 or not shutil.which("apt-get"):
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "podman", "runc", "debootstrap"]
    for cmd in (install, ["apt-get", "update", "-q"], install):
        subprocess.run(cmd, env=env, capture_output=True, timeout=900)
        if all(shutil.which(t) for t in tools):
            return


def _debian_mirror() -> str:
    """The Debian mirror apt uses here (deb822 or one-line sources), else deb.debian.org."""
    sources = sorted(Path("/etc/apt/sources.list.d").glob("*.sources"))
    sources += [Path("/etc/apt/sources.list"), *Path("/etc/apt/sources.list.d").glob("*.list")]
    for path in sources:
        text = path.read_text() if path.is_file() else ""
        found = re.findall(r"^URIs:\s*(\S+)|^deb\s+(?:\[[^\]]*\]\s+)?(\S+)", text, re.M)
        for uri in (a or b for a, b in found):
            if "security" not in uri and "debian" in uri:
                return uri
    return "http://deb.debian.org/debian"


def _base_image(podman: Podman, tmp: Path) -> str:
    """A Debian bookworm minbase imported into podman: one debootstrap a day, kept."""
    if given := os.environ.get("KILN_TEST_IMAGE_BASE"):
        return given
    tag = f"{BASE_REPO}:bookworm-{time.strftime('%Y%m%d')}"
    if podman.has(tag):
        return tag
    if os.geteuid() != 0 or not shutil.which("debootstrap"):
        pytest.skip("no base image: debootstrap needs root (or set KILN_TEST_IMAGE_BASE)")
    rootfs = tmp / "rootfs"
    proc = subprocess.run(
        ["debootstrap", "--variant=minbase", "bookworm", str(rootfs), _debian_mirror()],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, f"debootstrap failed:\n{proc.stdout[-3000:]}{proc.stderr}"
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    imported = subprocess.run(
        ["podman", "import", "-q", "-", tag],
        stdin=tar.stdout,
        env=podman.env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    tar.wait()
    shutil.rmtree(rootfs, ignore_errors=True)
    assert imported.returncode == 0, imported.stderr
    _remove_older_bases(podman, tag)
    return tag


def _remove_older_bases(podman: Podman, keep: str) -> None:
    """An earlier day's base image and what was built on it (this test's image, podman's
    build cache of it: whatever holds the base's layer), so that a daily base does not pile
    up gigabytes."""
    ids = podman("images", "--all", "--quiet", "--no-trunc").split()
    images = json.loads(podman("image", "inspect", *ids))
    for image in images:
        image["RepoTags"] = image.get("RepoTags") or []
    tops = {i["RootFS"]["Layers"][-1] for i in images if _is_base(i) and keep not in i["RepoTags"]}
    tops -= {i["RootFS"]["Layers"][-1] for i in images if keep in i["RepoTags"]}
    for image in sorted(images, key=lambda i: i["Created"], reverse=True):  # children first
        built_on = tops & set(image["RootFS"]["Layers"])
        if built_on and (_is_base(image) or image["RepoTags"] in ([], [IMAGE])):
            podman("rmi", image["Id"], check=False)


def _is_base(image: dict[str, Any]) -> bool:
    return any(name.startswith(f"{BASE_REPO}:") for name in image["RepoTags"])


def _pip_config() -> list[tuple[str, str, str]]:
    """(section, key, value) of every pip setting here, from its files and PIP_* variables
    (`pip config list`; the variables' section is global)."""
    listed = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    settings = []
    for line in listed.splitlines():
        scope, _, rest = line.partition(".")
        key, _, value = rest.partition("=")
        if not value:
            continue
        settings.append(("global" if scope == ":env:" else scope, key, ast.literal_eval(value)))
    return settings


def _pip_settings(where: Path) -> list[str]:
    """This machine's pip settings for the build stage, never for the image: written to
    where/pip.conf, every local path they name (find-links, a file:// index, a constraint
    file, a certificate) mounted read-only under /mnt beside it; the `podman build` flags
    that mount where/ at /mnt and name /mnt/pip.conf to pip (docs/deploy.md)."""
    conf = configparser.ConfigParser(interpolation=None)
    mounts: dict[Path, str] = {}
    for section, key, value in _pip_config():
        words = []
        for word in value.split():
            path = Path(word.removeprefix("file://"))
            if not path.is_absolute() or not path.exists():
                words.append(word)
                continue
            # a PEP 503 index's pages link to ../../files: mount the directory above simple/
            source = path.parent if path.name == "simple" else path
            target = mounts.setdefault(source, f"/mnt/{len(mounts)}-{source.name}")
            inside = target + str(path)[len(str(source)) :]
            words.append(("file://" if word.startswith("file://") else "") + inside)
        if not conf.has_section(section):
            conf.add_section(section)
        conf.set(section, key, " ".join(words))
    with (where / "pip.conf").open("w") as out:
        conf.write(out)
    flags = ["-v", f"{where}:/mnt:ro"]
    for source, target in mounts.items():
        mountpoint = where / target.removeprefix("/mnt/")
        if source.is_dir():
            mountpoint.mkdir()
        else:
            mountpoint.touch()
        flags += ["-v", f"{source}:{target}:ro"]
    return [*flags, "--build-arg", "PIP_CONFIG_FILE=/mnt/pip.conf"]


@pytest.fixture(scope="module")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Podman:
    _install("podman", "runc", "debootstrap")
    if not shutil.which("podman"):
        pytest.skip("podman is not installed and apt-get could not install it (needs root)")
    podman = Podman(tmp_path_factory.mktemp("podman"))
    info = subprocess.run(["podman", "info"], env=podman.env, capture_output=True, text=True)
    if info.returncode != 0:
        pytest.skip(f"podman cannot run here: {info.stderr.strip()[-300:]}")
    return podman


@pytest.fixture(scope="module")
def image(podman: Podman, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The image, built from the repo's Dockerfile (podman's layer cache makes a rebuild of
    unchanged files quick); the image it replaces is removed."""
    tmp = tmp_path_factory.mktemp("build")
    base = _base_image(podman, tmp)
    before = podman("image", "inspect", "--format", "{{.Id}}", IMAGE, check=False).strip()
    pip = tmp / "pip"
    pip.mkdir()
    # nice: the rest of the suite runs beside the build on two cores
    cmd = ["nice", "-n", "10", "podman", "build", "--format", "docker", "--network=host"]
    cmd += ["--build-arg", f"BASE={base}", *_pip_settings(pip), "-t", IMAGE, str(ROOT)]
    log = tmp / "build.log"
    with log.open("w") as out:
        built = subprocess.run(
            cmd, env=podman.env, stdout=out, stderr=subprocess.STDOUT, timeout=1500
        )
    assert built.returncode == 0, log.read_text()[-5000:]
    after = podman("image", "inspect", "--format", "{{.Id}}", IMAGE).strip()
    if before and before != after:
        podman("rmi", before, check=False)
    return IMAGE


def _as_caller(*dirs: Path) -> tuple[list[str], int, int]:
    """podman flags to run as the caller (root: as uid 1234, owning `dirs`), and the uid and
    gid that the files written in `dirs` must have."""
    if os.geteuid() == 0:
        for d in dirs:
            os.chown(d, UID, UID)
        return ["--user", f"{UID}:{UID}"], UID, UID
    uid, gid = os.getuid(), os.getgid()
    return ["--userns=keep-id", "--user", f"{uid}:{gid}"], uid, gid


def _owners(root: Path) -> set[tuple[int, int]]:
    return {(p.lstat().st_uid, p.lstat().st_gid) for p in [root, *root.rglob("*")]}


def _healthy(url: str) -> bool:
    """Whether `url` answers 200 now (a server still starting refuses the connection)."""
    import httpx

    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _tiny_quickstart() -> dict[str, Any]:
    """configs/quickstart.yaml with TINY applied, its data the image's copy."""
    raw = yaml.safe_load((ROOT / "configs/quickstart.yaml").read_text())
    for item in TINY:
        key, _, value = item.partition("=")
        *parents, last = key.split(".")
        node = raw
        for part in parents:
            node = node[part]
        node[last] = yaml.safe_load(value)
    raw["data"]["train"] = "/kiln/examples/data/recipes.jsonl"
    raw["data"]["val"] = "/kiln/examples/data/recipes_val.jsonl"
    return raw


def test_the_image_runs_as_non_root_and_holds_no_secret(image: str, podman: Podman) -> None:
    (info,) = json.loads(podman("image", "inspect", image))
    config = info["Config"]
    assert config["User"].split(":")[0] not in ("", "0", "root")
    assert config["Entrypoint"] == ["kiln"]
    assert set(config["Volumes"]) == {"/kiln/runs", "/srv/kiln"}
    healthcheck = config.get("Healthcheck") or info["Healthcheck"]  # podman: beside Config
    assert healthcheck["Test"][0] == "CMD"
    history = podman("history", "--no-trunc", "--format", "{{.CreatedBy}}", image)
    shown = json.dumps(info) + history
    paths = [w for _, _, value in _pip_config() for w in value.split() if "/" in w]
    for secret in (TOKEN, "PIP_CONFIG_FILE", "pip.conf", *paths):
        assert secret not in shown
    probe = (
        "import json, os, torch; "
        "print(json.dumps([torch.__version__, os.listdir('/mnt'), os.listdir('/tmp'), "
        "os.path.exists('/etc/pip.conf')]))"
    )
    out = podman("run", "--rm", "--network=none", "--entrypoint", "python", image, "-c", probe)
    version, *left = json.loads(out)
    assert version.startswith("2.13.0")  # constraints.txt's torch
    assert left == [[], [], False]  # the build's mounts left nothing behind
    size = info["Size"]
    print(f"image size: {size / 1e9:.2f} GB")
    assert size < 3e9  # a CUDA torch would be well over


def test_train_in_a_container_writes_a_run_its_user_owns(
    image: str, podman: Podman, tmp_path: Path
) -> None:
    runs = tmp_path / "runs"
    runs.mkdir()
    user, uid, gid = _as_caller(runs)
    podman(
        "run",
        "--rm",
        "--network=none",  # offline: everything it needs is in the image
        *user,
        "-v",
        f"{runs}:/kiln/runs",
        image,
        "train",
        "configs/quickstart.yaml",
        *TINY,
        timeout=300,
    )
    final = runs / "quickstart" / "final"
    assert json.loads((runs / "quickstart" / "summary.json").read_text())["steps"] == 2
    assert _owners(runs) == {(uid, gid)}
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(final)
    ids = AutoTokenizer.from_pretrained(final)("Title: Lemon rice", return_tensors="pt")
    assert model(**ids).logits.shape == (*ids["input_ids"].shape, model.config.vocab_size)


def test_serve_in_a_container_runs_a_job_with_postgresql(
    image: str, podman: Podman, postgres: str, tmp_path: Path
) -> None:
    """compose.yaml's server command, with a database of its own in this test's PostgreSQL
    and a free port (host network), the token from an env file."""
    import httpx
    import psycopg

    from kiln.client import Client

    database = f"kiln_image_{os.getpid()}"
    with psycopg.connect(postgres.replace("+psycopg", ""), autocommit=True) as db:
        db.execute(f"DROP DATABASE IF EXISTS {database}")
        db.execute(f"CREATE DATABASE {database}")
    db_url = f"{postgres.rpartition('/')[0]}/{database}"

    state = tmp_path / "state"
    state.mkdir()
    user, uid, gid = _as_caller(state)
    env_file = tmp_path / "kiln.env"
    env_file.write_text(f"KILN_SERVE_TOKEN={TOKEN}\n")
    env_file.chmod(0o600)
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    command = [str(x) for x in compose["services"]["kiln"]["command"]]
    port = free_port()
    swap = {"--host": "127.0.0.1", "--port": str(port), "--db": db_url}
    command = [swap.get(prev, arg) for prev, arg in zip(["", *command[:-1]], command, strict=True)]
    name = f"kiln-test-serve-{os.getpid()}"
    volume = f"{state}:/srv/kiln"
    start = ["run", "-d", "--init", "--name", name, "--network=host", *user]
    podman(*start, "--env-file", str(env_file), "-v", volume, image, *command)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while not _healthy(f"{url}/api/health"):  # the server is up
            assert time.monotonic() < deadline, podman.logs(name)[-3000:]
            time.sleep(0.5)
        podman("healthcheck", "run", name)  # the image's healthcheck finds `kiln serve`
        assert httpx.get(f"{url}/api/training/jobs").status_code == 401  # the env's token
        api = Client(url, token=TOKEN)
        job = api.start(config=_tiny_quickstart())
        done = api.wait(job["id"], "succeeded", "failed", "diverged", "lost", timeout_s=300)
        assert done["state"] == "succeeded", api.logs(job["id"])
    finally:
        logs = podman.logs(name)
        podman("rm", "-f", "-v", name, check=False)
    assert "Traceback" not in logs
    run = state / "runs" / job["id"]
    assert (run / "final" / "model.safetensors").is_file()
    assert not list(state.glob("*.db"))  # the store is PostgreSQL's
    assert _owners(state) == {(uid, gid)}
    with psycopg.connect(db_url.replace("+psycopg", "")) as db:
        row = db.execute("SELECT state FROM jobs WHERE id = %s", (job["id"],)).fetchone()
    assert row == ("succeeded",)
