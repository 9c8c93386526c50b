#!/usr/bin/env bash
# Prepare (or check) .whl/: the pinned wheels that tools/gpu_check.sh installs on the GPU machine.
#
#   bash tools/gpu_wheels.sh            # fetch/build exactly the set in tools/gpu_wheels.lock (needs the registry)
#   bash tools/gpu_wheels.sh --check    # only verify an existing .whl/ against the lock (no network, changes nothing)
#
# Options:
#   --check        verify only: every lock wheel present with its sha256, name and version, no other file in
#                  the directory, total size under the limit; exit 1 otherwise. Downloads, builds, deletes nothing.
#   --lax-build    for the locally built wheel (deepspeed) check name and version but not its sha256; for a machine
#                  whose build gives other bytes (the build is reproducible with the pinned backend, so normally
#                  not needed). Downloaded wheels and the sdist are always hash-checked.
#   --lock FILE    the lock file (default: tools/gpu_wheels.lock; its header documents the format).
#   --dir DIR      where the wheels go (default: .whl, listed in .git/info/exclude so it never gets committed;
#                  the device tool carries it with carry=[".whl"]).
#   --python PY    the Python whose pip downloads and builds (default: $PYTHON, else python3); any version works,
#                  the downloads target CPython 3.12 manylinux x86-64 whatever PY is.
#   -h, --help     print this help.
#
# Without --check: downloads each `wheel` entry missing from DIR (or with a wrong hash), downloads the `sdist`
# entry into .cache/gpu_wheels/ and builds the `built` wheel from it with DS_BUILD_OPS=0 (pure Python, no CUDA
# ops), SOURCE_DATE_EPOCH=315532800, PYTHONHASHSEED=0, git hidden, no pip cache and the `backend` pins, so the
# built wheel's bytes are reproducible; then deletes any file in DIR that the lock does not list, verifies
# everything as --check does, and prints the total size (limit: 20 MiB). Wheels already right are kept, so a
# rerun is fast. The GPU image's own packages (`image` lines) are never carried.
set -euo pipefail
cd "$(dirname "$0")/.."

LOCK=tools/gpu_wheels.lock
DIR=.whl
CACHE=.cache/gpu_wheels
PY="${PYTHON:-python3}"
CHECK=0
LAX=0
LIMIT_MIB=20

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    --check) CHECK=1 ;;
    --lax-build) LAX=1 ;;
    --lock) LOCK="${2:?--lock needs a file}"; shift ;;
    --dir) DIR="${2:?--dir needs a directory}"; shift ;;
    --python) PY="${2:?--python needs an interpreter}"; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_wheels.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
[ -f "$LOCK" ] || { echo "gpu_wheels.sh: no lock file $LOCK" >&2; exit 2; }

# records KIND -> lines "NAME==VERSION HEX FILENAME" (comments stripped)
records() { sed -e 's/#.*//' "$LOCK" | awk -v k="$1" 'NF && $1 == k { h = $3; sub(/^sha256=/, "", h); print $2, h, $4 }'; }
sha() { "$PY" -c 'import hashlib,sys; print(hashlib.sha256(open(sys.argv[1],"rb").read()).hexdigest())' "$1"; }

# verify DIR against the lock; MODE=check reports stray files, MODE=prune deletes them
verify() {
  "$PY" - "$LOCK" "$DIR" "$LAX" "$1" "$LIMIT_MIB" <<'PYEOF'
import hashlib, os, re, sys, zipfile
lock, d, lax, mode, limit = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4], float(sys.argv[5])
canon = lambda n: re.sub(r"[-_.]+", "-", n).lower()
want = {}  # filename -> (kind, name, version, sha256)
for line in open(lock):
    f = line.split("#", 1)[0].split()
    if f and f[0] in ("wheel", "built"):
        name, version = f[1].split("==")
        want[f[3]] = (f[0], name, version, f[2].removeprefix("sha256="))
bad = []
for fn in sorted(os.listdir(d)) if os.path.isdir(d) else []:
    if fn not in want:
        p = os.path.join(d, fn)
        if mode == "prune" and os.path.isfile(p):
            os.remove(p)
            print(f"removed stray {p}")
        else:
            bad.append(f"stray {p}: not in {lock} (gpu_check.sh would install it)")
total = 0
for fn, (kind, name, version, digest) in sorted(want.items()):
    p = os.path.join(d, fn)
    if not os.path.isfile(p):
        bad.append(f"missing {p} ({name}=={version})")
        continue
    total += os.path.getsize(p)
    got = hashlib.sha256(open(p, "rb").read()).hexdigest()
    if got != digest and not (kind == "built" and lax):
        bad.append(f"sha256 mismatch {p}: {got}, lock says {digest}")
    try:
        with zipfile.ZipFile(p) as z:
            meta = next(n for n in z.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n))
            hdr = z.read(meta).decode("utf-8", "replace").split("\n\n", 1)[0]
        md = dict(re.findall(r"^(Name|Version): *(.*?)\s*$", hdr, re.M))
        if canon(md.get("Name", "")) != canon(name) or md.get("Version") != version:
            bad.append(f"{p}: METADATA says {md.get('Name')}=={md.get('Version')}, lock says {name}=={version}")
    except (zipfile.BadZipFile, StopIteration) as e:
        bad.append(f"{p}: not a wheel with METADATA ({e!r})")
    print(f"  {os.path.getsize(p) / 2**20:6.2f} MiB  {fn}")
print(f"total {total / 2**20:.2f} MiB in {len(want)} wheels (limit {limit:g} MiB)")
if total >= limit * 2**20:
    bad.append(f"total {total / 2**20:.2f} MiB is over the {limit:g} MiB limit")
for b in bad:
    print("ERROR:", b, file=sys.stderr)
sys.exit(1 if bad else 0)
PYEOF
}

if [ "$CHECK" = 1 ]; then
  [ -d "$DIR" ] || { echo "gpu_wheels.sh --check: no $DIR/ (run bash tools/gpu_wheels.sh)" >&2; exit 1; }
  verify check
  exit
fi

mkdir -p "$DIR" "$CACHE"
if [[ "$DIR" != /* && "$DIR" != *..* ]]; then
  EXCLUDE="$(git rev-parse --git-path info/exclude 2>/dev/null || echo .git/info/exclude)"
  mkdir -p "$(dirname "$EXCLUDE")"
  grep -qxF "/${DIR%/}/" "$EXCLUDE" 2>/dev/null || echo "/${DIR%/}/" >> "$EXCLUDE"
fi

# 1. downloaded wheels: fetch the missing or wrong ones (one pip call)
specs=()
while read -r spec digest file; do
  if [ -f "$DIR/$file" ] && [ "$(sha "$DIR/$file")" = "$digest" ]; then continue; fi
  rm -f "$DIR/$file"
  specs+=("$spec")
done < <(records wheel)
if [ ${#specs[@]} -gt 0 ]; then
  echo "downloading ${specs[*]}"
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d "$DIR" "${specs[@]}"
fi

# 2. built wheels: from the sdist of the same name==version, reproducibly
CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
records backend | awk '{print $1}' > "$CONSTRAINTS"
while read -r spec digest file; do
  if [ -f "$DIR/$file" ] && { [ "$LAX" = 1 ] || [ "$(sha "$DIR/$file")" = "$digest" ]; }; then continue; fi
  read -r _ sdigest sfile < <(records sdist | awk -v s="$spec" '$1 == s') || { echo "no sdist line for $spec in $LOCK" >&2; exit 1; }
  if ! { [ -f "$CACHE/$sfile" ] && [ "$(sha "$CACHE/$sfile")" = "$sdigest" ]; }; then
    rm -f "$CACHE/$sfile"
    echo "downloading $spec (sdist)"
    "$PY" -m pip download -q --no-deps --no-binary=:all: -d "$CACHE" "$spec"
    got="$(sha "$CACHE/$sfile")"
    [ "$got" = "$sdigest" ] || { echo "sha256 mismatch $CACHE/$sfile: $got, lock says $sdigest" >&2; exit 1; }
  fi
  echo "building $file from $sfile"
  if "$PY" -m pip wheel --help 2>/dev/null | grep -q -- '--build-constraint'; then
    bc=(--build-constraint "$CONSTRAINTS"); bcenv=()            # pip >= 25.3 ignores PIP_CONSTRAINT for build deps
  else
    bc=(); bcenv=(PIP_CONSTRAINT="$CONSTRAINTS")
  fi
  out="$(mktemp -d)"
  # shellcheck disable=SC2046
  env $(compgen -e | grep '^DS_' | sed 's/^/-u /') "${bcenv[@]}" DS_BUILD_OPS=0 SOURCE_DATE_EPOCH=315532800 \
    PYTHONHASHSEED=0 GIT_DIR=/dev/null "$PY" -m pip wheel -q --no-deps --no-cache-dir "${bc[@]}" -w "$out" "$CACHE/$sfile"
  [ -f "$out/$file" ] || { echo "the build made $(ls "$out"), not $file" >&2; rm -rf "$out"; exit 1; }
  mv -f "$out/$file" "$DIR/$file"
  rm -rf "$out"
done < <(records built)

# 3. delete strays, verify everything, print the size
verify prune
