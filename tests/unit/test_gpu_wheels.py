"""The wheel set carried to the GPU machine (tools/gpu_wheels.lock -> .whl/) resolves there. CPU only, ~20 s
(~15 s more the first time, when the fixture builds .whl/ with ``bash tools/gpu_wheels.sh``: needs the registry).

The GPU machine has no network: `import megatron.core, deepspeed` there works only if .whl/ plus the packages
already in its image (the lock's ``image`` lines) form a consistent set. Checked here without that machine:

* ``tools/gpu_wheels.sh --check``: each lock wheel is in .whl/ with its sha256, name and version, nothing else
  is, and the set is under 20 MiB (it travels with every device call).
* pip's resolver, run by a real CPython 3.12 (the image's minor; pyenv's here and on CI) in a throwaway venv whose
  site-packages holds stub ``.dist-info`` directories for the image's packages, so pip treats them as installed:
  ``pip install --dry-run --no-index --find-links .whl -r <lock>`` must plan to install exactly the lock's wheels,
  nothing more (no image package upgraded, nothing missing). Two negative controls prove the check is not
  vacuous: without the pydantic-core wheel, and with an image typing-extensions too old for pydantic, it fails.
* each lock wheel's Requires-Dist (markers evaluated for CPython 3.12.3 on x86-64 Linux, extras off) is met by
  the lock or the image, and every lock entry is needed by megatron-core or deepspeed (no wandb & co.).

Importing the set is not tried: that needs a torch for CPython 3.12, which this machine lacks.
A missing python3.12 FAILS (CI machines have it under pyenv); point DLM_PYTHON312 at one to override.
"""
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
LOCK = REPO / "tools" / "gpu_wheels.lock"
WHL = REPO / ".whl"
LIMIT = 20 * 2**20
ROOTS = ("megatron-core", "deepspeed")  # what tools/gpu_check.sh imports
# Marker environment of the GPU machine's python3 (CPython 3.12.3, x86-64 Linux); extras off.
TARGET_ENV = {
    "implementation_name": "cpython", "implementation_version": "3.12.3", "os_name": "posix",
    "platform_machine": "x86_64", "platform_python_implementation": "CPython", "platform_release": "",
    "platform_system": "Linux", "platform_version": "", "python_full_version": "3.12.3",
    "python_version": "3.12", "sys_platform": "linux", "extra": "",
}


def parse_lock(path=LOCK):
    """{kind: [dict(name, version, sha256, file)]}, kinds: wheel, sdist, built, backend, image."""
    out = {}
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        f = line.split("#", 1)[0].split()
        if not f:
            continue
        assert f[0] in ("wheel", "sdist", "built", "backend", "image"), f"{path}:{n}: unknown kind {f[0]!r}"
        name, _, version = f[1].partition("==")
        assert name and version, f"{path}:{n}: expected NAME==VERSION, got {f[1]!r}"
        rec = {"name": canonicalize_name(name), "version": version}
        if f[0] in ("wheel", "sdist", "built"):
            assert len(f) == 4 and re.fullmatch(r"sha256=[0-9a-f]{64}", f[2]), f"{path}:{n}: expected sha256=HEX FILE"
            rec.update(sha256=f[2][7:], file=f[3])
        out.setdefault(f[0], []).append(rec)
    return out


def carried(lock):
    return lock.get("wheel", []) + lock.get("built", [])


def clean_env():
    """Environment for a pip that must see only what we give it: no PIP_* settings (this machine's set
    find-links and extra indexes), no pip config files, no user site."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PIP_") and k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1", PYTHONNOUSERSITE="1")
    return env


def find_python312():
    cands = [os.environ.get("DLM_PYTHON312", "")]
    for root in {os.environ.get("PYENV_ROOT", ""), os.path.expanduser("~/.pyenv")} - {""}:
        cands += sorted(glob.glob(f"{root}/versions/3.12*/bin/python3.12"), key=lambda p: [
            int(x) if x.isdigit() else -1 for x in re.split(r"[.]", Path(p).parents[1].name.split("-")[0])], reverse=True)
    cands += [shutil.which("python3.12") or "", "/usr/bin/python3.12", "/usr/local/bin/python3.12"]
    for c in cands:
        if not c or not os.path.isfile(c):
            continue
        try:
            r = subprocess.run([c, "-c", "import sys; print(sys.version_info[:2] == (3, 12))"],
                               capture_output=True, text=True, timeout=60, env=clean_env())
        except OSError:
            continue
        if r.returncode == 0 and r.stdout.strip() == "True":
            return c
    return None


def wheel_metadata(path):
    with zipfile.ZipFile(path) as z:
        name = next(n for n in z.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n))
        text = z.read(name).decode("utf-8")
    header = text.split("\n\n", 1)[0]
    fields = {}
    for k, v in re.findall(r"^([A-Za-z-]+): *(.*?)\s*$", header, re.M):
        fields.setdefault(k, []).append(v)
    return fields


@pytest.fixture(scope="module")
def lock():
    return parse_lock()


@pytest.fixture(scope="module")
def wheel_dir(lock):
    """.whl/ as the lock says: checked, and (re)built with tools/gpu_wheels.sh when the check fails."""
    check = ["bash", str(REPO / "tools" / "gpu_wheels.sh"), "--check"]
    r = subprocess.run(check, cwd=REPO, capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        b = subprocess.run(["bash", str(REPO / "tools" / "gpu_wheels.sh")], cwd=REPO, capture_output=True, text=True,
                           timeout=900, env={**os.environ, "PYTHON": os.environ.get("PYTHON", sys.executable)})
        assert b.returncode == 0, f"tools/gpu_wheels.sh failed:\n{b.stdout[-3000:]}\n{b.stderr[-3000:]}"
        r = subprocess.run(check, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"tools/gpu_wheels.sh --check failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return WHL


def write_stub(site, name, version):
    """A .dist-info that pip (importlib.metadata) sees as an installed distribution."""
    d = Path(site) / f"{re.sub(r'[-_.]+', '_', name)}-{version}.dist-info"
    d.mkdir()
    (d / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (d / "INSTALLER").write_text("stub\n")
    (d / "RECORD").write_text("".join(f"{d.name}/{f},,\n" for f in ("METADATA", "INSTALLER", "RECORD")))
    return d


@pytest.fixture(scope="module")
def image_venv(lock, tmp_path_factory):
    """A CPython 3.12 venv with the GPU image's packages present as stubs; returns (python, site-packages)."""
    py312 = find_python312()
    if py312 is None:
        pytest.fail("no CPython 3.12 found (looked at $DLM_PYTHON312, ~/.pyenv/versions/3.12*/bin/python3.12, "
                    "python3.12 on PATH, /usr/bin, /usr/local/bin): the GPU machine runs 3.12, so its wheel set "
                    "is resolved by a 3.12 pip; install one (e.g. `pyenv install 3.12`) or set DLM_PYTHON312")
    venv = tmp_path_factory.mktemp("image") / "venv"
    subprocess.run([py312, "-m", "venv", str(venv)], check=True, timeout=300, env=clean_env())
    py = str(venv / "bin" / "python")
    site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True, env=clean_env()).stdout.strip()
    for rec in lock["image"]:
        write_stub(site, rec["name"], rec["version"])
    return py, site


def resolve(py, find_links, lock, tmp_path):
    req = tmp_path / "requirements.txt"
    req.write_text("".join(f"{r['name']}=={r['version']}\n" for r in carried(lock)))
    report = tmp_path / "report.json"
    report.unlink(missing_ok=True)
    r = subprocess.run([py, "-m", "pip", "install", "--dry-run", "--no-index", "--only-binary=:all:",
                        "--find-links", str(find_links), "--report", str(report), "-r", str(req)],
                       capture_output=True, text=True, timeout=300, env=clean_env())
    return r, (json.loads(report.read_text()) if r.returncode == 0 else None)


def test_lock_is_well_formed(lock):
    names = [r["name"] for r in carried(lock)]
    assert len(names) == len(set(names)), f"two versions of one package in the lock: {names}"
    image = {r["name"] for r in lock["image"]}
    assert not set(names) & image, f"carried and already in the image: {set(names) & image}"
    sdists = {(r["name"], r["version"]) for r in lock.get("sdist", [])}
    for r in carried(lock):
        name, version, _, tags = parse_wheel_filename(r["file"])
        assert (name, version) == (r["name"], Version(r["version"])), r
        # what the image's CPython 3.12 on x86-64 glibc Linux can install (glibc <= 2.28 to be safe)
        ok = [t for t in tags if t.interpreter in ("py3", "cp312") and t.abi in ("none", "abi3", "cp312") and (
            t.platform == "any" or re.fullmatch(r"manylinux(1|2010|2014|_2_(\d+))_x86_64", t.platform)
            and int(re.fullmatch(r"manylinux(?:1|2010|2014|_2_(\d+))_x86_64", t.platform).group(1) or 17) <= 28)]
        assert ok, f"{r['file']}: no tag installable on CPython 3.12 manylinux x86-64"
    for r in lock.get("built", []):
        assert (r["name"], r["version"]) in sdists, f"built {r['name']} has no sdist line"


def test_wheel_dir_matches_lock_and_is_small(wheel_dir, lock):
    files = sorted(p.name for p in wheel_dir.iterdir())
    assert files == sorted(r["file"] for r in carried(lock))
    for r in carried(lock):
        assert hashlib.sha256((wheel_dir / r["file"]).read_bytes()).hexdigest() == r["sha256"], r["file"]
    total = sum((wheel_dir / f).stat().st_size for f in files)
    assert total < LIMIT, f"{total / 2**20:.2f} MiB of wheels; keep the set under 20 MiB"


def test_set_resolves_against_image(wheel_dir, image_venv, lock, tmp_path):
    py, _ = image_venv
    r, report = resolve(py, wheel_dir, lock, tmp_path)
    assert r.returncode == 0, f"pip cannot resolve the lock against the image:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    planned = {(canonicalize_name(i["metadata"]["name"]), i["metadata"]["version"]) for i in report["install"]}
    assert planned == {(x["name"], x["version"]) for x in carried(lock)}, (
        "pip would install something other than exactly the lock (an image package upgraded, or one missing): "
        f"{sorted(planned)}")
    files = {i["download_info"]["url"].rsplit("/", 1)[-1] for i in report["install"]}
    assert files == {x["file"] for x in carried(lock)}


def test_resolver_catches_conflicts(wheel_dir, image_venv, lock, tmp_path):
    """Negative controls: the resolution above would fail on a broken set, so its passing means something."""
    py, site = image_venv
    # 1. pydantic pins pydantic-core exactly; without that wheel nothing resolves
    partial = tmp_path / "partial"
    partial.mkdir()
    for x in carried(lock):
        if x["name"] != "pydantic-core":
            shutil.copy(wheel_dir / x["file"], partial)
    r, _ = resolve(py, partial, lock, tmp_path)
    assert r.returncode != 0 and "pydantic" in (r.stdout + r.stderr).lower(), r.stdout + r.stderr
    # 2. the image's packages are constraints: a typing-extensions older than pydantic needs must fail
    stub = next(Path(site).glob("typing_extensions-*.dist-info"))
    moved = stub.with_name(stub.name + ".off")
    stub.rename(moved)
    try:
        old = write_stub(site, "typing-extensions", "4.10.0")
        try:
            r, _ = resolve(py, wheel_dir, lock, tmp_path)
        finally:
            shutil.rmtree(old)
    finally:
        moved.rename(stub)
    assert r.returncode != 0 and "typing" in (r.stdout + r.stderr).lower(), r.stdout + r.stderr


def test_requires_dist_closed_and_minimal(wheel_dir, lock):
    have = {r["name"]: r["version"] for r in carried(lock)}
    image = {r["name"]: r["version"] for r in lock["image"]}
    needs, unmet = {}, []
    for x in carried(lock):
        meta = wheel_metadata(wheel_dir / x["file"])
        assert [canonicalize_name(meta["Name"][0]), meta["Version"][0]] == [x["name"], x["version"]], x["file"]
        for rp in meta.get("Requires-Python", []):
            assert Requirement(f"python{rp}").specifier.contains("3.12.3"), f"{x['file']}: Requires-Python {rp}"
        needs[x["name"]] = set()
        for line in meta.get("Requires-Dist", []):
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate(TARGET_ENV):
                continue  # extras, other platforms or Pythons
            name = canonicalize_name(req.name)
            needs[x["name"]].add(name)
            version = have.get(name) or image.get(name)
            if version is None or not req.specifier.contains(version, prereleases=True):
                unmet.append(f"{x['name']} needs {line!r}: lock {have.get(name)}, image {image.get(name)}")
    assert not unmet, "\n".join(unmet)
    reach, todo = set(), list(ROOTS)
    while todo:
        n = todo.pop()
        if n in have and n not in reach:
            reach.add(n)
            todo += needs[n]
    assert reach == set(have), f"lock entries nothing in {ROOTS} needs: {sorted(set(have) - reach)}"
