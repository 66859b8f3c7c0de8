#!/usr/bin/env bash
# Build (once) and locate an aarch64 root filesystem for running exported artifacts
# under qemu-user emulation: Debian bookworm's python3.11 (arm64 .debs unpacked with
# dpkg-deb, no maintainer scripts, no chroot, no binfmt) plus the aarch64 wheels of
# numpy, onnxruntime and ai-edge-litert at the same versions as the host's Python.
#
# Usage: build_rootfs.sh [--cpu CORE] [--python HOST_PYTHON] [--force]
#   --cpu     neoverse-n1 (default), cortex-a72, cortex-a76, cortex-a57, cortex-a53
#   --python  host Python whose installed numpy/onnxruntime/ai-edge-litert versions are
#             pinned (default: $EDGESR_ARM64_HOST_PYTHON or python3); needs pip
#   --force   rebuild even if the cached tarball exists
# Pins may also be given as EDGESR_ARM64_NUMPY / _ONNXRUNTIME / _LITERT.
#
# The only line printed on stdout is the directory to pass to `qemu-aarch64-static -L`;
# everything else goes to stderr. Any failure exits non-zero with an "error:" line.
#
# Cache: ${EDGESR_ARM64_CACHE:-$HOME/.cache/edgesr/arm64}
#   arm64-rootfs-<pins>.tar.zst   the built tree (the thing a CI cache should keep)
#   rootfs-<pins>/                that tarball extracted (python at usr/bin/python3.11)
#   rootfs-<pins>.cpu/<core>/     the -L prefix for one core: fake /proc/cpuinfo and
#                                 /sys/devices/system/cpu/{possible,present}, symlinks
#                                 to the tree for everything else
set -euo pipefail

RECIPE=1                # bump when the recipe changes: it is part of the cache key
DEBIAN_PACKAGES=(python3.11 libstdc++6 libgcc-s1)

log() { printf "[arm64 rootfs %3ds] %s\n" "$SECONDS" "$*" >&2; }
die() { printf 'error: arm64 rootfs: %s\n' "$*" >&2; exit 1; }

CPU=neoverse-n1
HOST_PY=${EDGESR_ARM64_HOST_PYTHON:-python3}
FORCE=0
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) [ $# -ge 2 ] || die "--cpu needs a value"; CPU=$2; shift 2 ;;
    --python) [ $# -ge 2 ] || die "--python needs a value"; HOST_PY=$2; shift 2 ;;
    --force) FORCE=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done

# Fake /proc/cpuinfo per core. MIDR fields are the ones qemu 7.2 gives that core;
# features are the Linux names of what qemu advertises in AT_HWCAP for it.
V80="fp asimd evtstrm aes pmull sha1 sha2 crc32 cpuid"
V82="fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp ssbs"
case "$CPU" in
  neoverse-n1) MIDR="0x4 0xd0c 1"; FEATURES=$V82 ;;
  cortex-a76)  MIDR="0x4 0xd0b 1"; FEATURES=$V82 ;;
  cortex-a72)  MIDR="0x0 0xd08 3"; FEATURES=$V80 ;;
  cortex-a57)  MIDR="0x1 0xd07 0"; FEATURES=$V80 ;;
  cortex-a53)  MIDR="0x0 0xd03 4"; FEATURES=$V80 ;;
  *) die "unsupported --cpu '$CPU' (choose neoverse-n1, cortex-a76, cortex-a72, cortex-a57, cortex-a53)" ;;
esac

CACHE=${EDGESR_ARM64_CACHE:-$HOME/.cache/edgesr/arm64}
mkdir -p "$CACHE" || die "cannot create cache directory $CACHE"
CACHE=$(cd "$CACHE" && pwd -P)

# ---- host tools ---------------------------------------------------------------
need_host_packages() {
  local missing=()
  command -v qemu-aarch64-static >/dev/null || missing+=(qemu-user-static)
  command -v zstd >/dev/null || missing+=(zstd)
  command -v flock >/dev/null || missing+=(util-linux)
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    die "missing host packages: ${missing[*]} (install them as root: apt-get install -y ${missing[*]})"
  fi
  log "installing host packages: ${missing[*]}"
  local aptlog; aptlog=$(mktemp)
  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"; } >"$aptlog" 2>&1; then
    tail -n 20 "$aptlog" >&2; rm -f "$aptlog"; die "apt-get install ${missing[*]} failed"
  fi
  rm -f "$aptlog"
}
need_host_packages

# ---- pins: the host Python's versions, so both architectures run the same releases ----
command -v "$HOST_PY" >/dev/null || die "host Python '$HOST_PY' not found (pass --python)"
read -r HOST_NP HOST_ORT HOST_LITERT < <("$HOST_PY" -c 'import importlib.metadata as m
def v(d):
    try: return m.version(d)
    except m.PackageNotFoundError: return "-"
print(v("numpy"), v("onnxruntime"), v("ai-edge-litert"))' 2>/dev/null || echo "- - -")
NUMPY_V=${EDGESR_ARM64_NUMPY:-${HOST_NP#-}}
ORT_V=${EDGESR_ARM64_ONNXRUNTIME:-${HOST_ORT#-}}
LITERT_V=${EDGESR_ARM64_LITERT:-${HOST_LITERT#-}}
if [ -z "$NUMPY_V" ] || [ -z "$ORT_V" ] || [ -z "$LITERT_V" ]; then die \
  "cannot pin versions: '$HOST_PY' lacks numpy/onnxruntime/ai-edge-litert (got '${NUMPY_V}' '${ORT_V}' '${LITERT_V}'); pass --python or set EDGESR_ARM64_NUMPY/_ONNXRUNTIME/_LITERT"
fi
TAG="np${NUMPY_V}-ort${ORT_V}-litert${LITERT_V}-r${RECIPE}"
TARBALL=$CACHE/arm64-rootfs-$TAG.tar.zst
TREE=$CACHE/rootfs-$TAG
PREFIX=$CACHE/rootfs-$TAG.cpu/$CPU

# ---- per-core -L prefix ------------------------------------------------------------
make_prefix() {  # $1 = tree, $2 = prefix dir to create
  local tree=$1 dest=$2 tmp entry variant part rev
  [ -f "$dest/proc/cpuinfo" ] && return 0
  read -r variant part rev <<<"$MIDR"
  tmp=$(mktemp -d "$(dirname "$dest")/.prefix.XXXXXX")
  mkdir -p "$tmp/proc" "$tmp/sys/devices/system/cpu"
  for entry in "$tree"/*; do
    case "${entry##*/}" in proc|sys) ;; *) ln -s "$entry" "$tmp/${entry##*/}" ;; esac
  done
  printf 'processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: %s\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: %s\nCPU part\t: %s\nCPU revision\t: %s\n\n' \
    "$FEATURES" "$variant" "$part" "$rev" >"$tmp/proc/cpuinfo"
  # one CPU: with more, cpuinfo reads per-CPU cache files that fall through to the
  # host's x86 /sys, and `import onnxruntime` segfaults (see shared/notes/arm64_emulation.md)
  echo 0 >"$tmp/sys/devices/system/cpu/possible"
  echo 0 >"$tmp/sys/devices/system/cpu/present"
  chmod 755 "$tmp"
  mv -T "$tmp" "$dest" 2>/dev/null || rm -rf "$tmp"   # lost a race: the other one is identical
}

emu_python() {  # $1 = tree, $2 = -L prefix, rest = python args
  local tree=$1 prefix=$2; shift 2
  env -i QEMU_CPU="$CPU" LC_ALL=C.UTF-8 qemu-aarch64-static -L "$prefix" "$tree/usr/bin/python3.11" -I "$@"
}

# fast path: already extracted (the marker is written last)
if [ "$FORCE" = 0 ] && [ -f "$TREE/.edgesr-complete" ]; then
  mkdir -p "$(dirname "$PREFIX")"
  make_prefix "$TREE" "$PREFIX"
  echo "$PREFIX"
  exit 0
fi

exec 9>"$CACHE/.lock"
flock 9 || die "cannot lock $CACHE/.lock"
rm -rf "$CACHE"/.build.* "$CACHE"/.extract.*   # left by a killed run (we hold the lock)

# ---- build the tarball ---------------------------------------------------------------
build_tarball() {
  local t0 work tree apt
  t0=$(date +%s)
  if ! command -v apt-get >/dev/null || ! command -v dpkg-deb >/dev/null; then
    die "building needs apt-get and dpkg-deb (a Debian/Ubuntu host); or provide $TARBALL"
  fi
  "$HOST_PY" -m pip --version >/dev/null 2>&1 || die "'$HOST_PY -m pip' does not work (pip is needed to fetch the aarch64 wheels)"
  work=$(mktemp -d "$CACHE/.build.XXXXXX")
  trap 'rm -rf "$work"' EXIT
  tree=$work/tree apt=$work/apt
  mkdir -p "$tree/usr/bin" "$tree/usr/lib" "$tree/usr/sbin" "$apt/lists/partial" "$apt/cache/archives/partial"
  ln -s usr/bin "$tree/bin"; ln -s usr/lib "$tree/lib"; ln -s usr/sbin "$tree/sbin"
  : >"$apt/status"

  # 1. arm64 .debs: a private apt state (host's sources and keys, arm64 architecture,
  #    nothing installed), so apt resolves the closure without touching the host's dpkg.
  log "downloading arm64 packages: ${DEBIAN_PACKAGES[*]}"
  local aptopts=(-o APT::Architecture=arm64 -o APT::Architectures::=arm64
    -o Dir::State="$apt" -o Dir::State::Lists="$apt/lists" -o Dir::State::status="$apt/status"
    -o Dir::Cache="$apt/cache" -o Dir::Cache::pkgcache= -o Dir::Cache::srcpkgcache=
    -o Debug::NoLocking=1 -o APT::Sandbox::User=root -o APT::Install-Recommends=false)
  apt-get "${aptopts[@]}" -qq update >"$work/apt.log" 2>&1 \
    || { tail -n 20 "$work/apt.log" >&2; die "apt-get update (arm64 lists) failed"; }
  apt-get "${aptopts[@]}" -y -qq --download-only install "${DEBIAN_PACKAGES[@]}" >>"$work/apt.log" 2>&1 \
    || { tail -n 20 "$work/apt.log" >&2; die "apt-get download of arm64 ${DEBIAN_PACKAGES[*]} failed"; }
  local debs=("$apt"/cache/archives/*.deb)
  [ -f "${debs[0]}" ] || die "apt-get downloaded no .deb files"
  log "unpacking ${#debs[@]} .debs"
  for d in "${debs[@]}"; do
    dpkg-deb --fsys-tarfile "$d" | tar -x --keep-directory-symlink -C "$tree" \
      || die "unpacking $(basename "$d") failed"
  done
  # absolute symlinks would resolve on the host's filesystem: make them relative
  find "$tree" -type l -lname '/*' -print0 | while IFS= read -r -d '' l; do
    ln -sfn "$(realpath -m --relative-to="$(dirname "$l")" "$tree$(readlink "$l")")" "$l"
  done
  [ -x "$tree/usr/bin/python3.11" ] || die "python3.11 missing after unpacking"

  # 2. aarch64 wheels with the host's pip. Every manylinux tag is listed because pip
  #    does not expand manylinux_2_X (ai-edge-litert >= 2.0 ships only _2_27).
  local site=$tree/usr/lib/python3/dist-packages plat=(--platform manylinux2014_aarch64) m
  for m in $(seq 17 39); do plat+=(--platform "manylinux_2_${m}_aarch64"); done
  log "installing aarch64 wheels numpy==$NUMPY_V onnxruntime==$ORT_V ai-edge-litert==$LITERT_V"
  "$HOST_PY" -m pip install --disable-pip-version-check --no-warn-script-location --no-compile \
      --only-binary=:all: "${plat[@]}" --python-version 3.11 --implementation cp --abi cp311 \
      --target "$site" "numpy==$NUMPY_V" "onnxruntime==$ORT_V" "ai-edge-litert==$LITERT_V" \
      >"$work/pip.log" 2>&1 \
    || { grep -v '^WARNING: Location' "$work/pip.log" | tail -n 20 >&2; die "pip could not fetch the aarch64 wheels"; }
  rm -rf "${site:?}/bin"

  # 3. smoke test in emulation; its imports also leave .pyc files of what runs import
  #    (compiling everything instead costs ~40 s of emulated CPU for ~1 s per start)
  make_prefix "$tree" "$work/prefix"
  log "smoke-testing under qemu ($CPU)"
  emu_python "$tree" "$work/prefix" -c '
import argparse, json, platform, sys, time, importlib.metadata as m
import numpy, onnxruntime
from ai_edge_litert import interpreter
assert platform.machine() == "aarch64", platform.machine()
v = {d: m.version(d) for d in ("numpy", "onnxruntime", "ai-edge-litert", "protobuf", "flatbuffers", "ml_dtypes")}
want = dict(zip(("numpy", "onnxruntime", "ai-edge-litert"), sys.argv[1:]))
assert all(v[k] == want[k] for k in want), (v, want)
print(json.dumps({"machine": platform.machine(), "python": platform.python_version(), "packages": v}, indent=1))
' "$NUMPY_V" "$ORT_V" "$LITERT_V" >"$tree/edgesr-manifest.json" 2>"$work/smoke.log" \
    || { tail -n 20 "$work/smoke.log" >&2; die "smoke test (import numpy/onnxruntime/ai_edge_litert under qemu) failed"; }

  log "compressing to $TARBALL"
  rm -rf "$tree/var/cache/apt" "$tree/var/lib/apt" "$tree/usr/share/doc" "$tree/usr/share/man"
  tar -C "$tree" -cf - . | zstd -q -T0 -6 -o "$work/rootfs.tar.zst" || die "writing the tarball failed"
  mv -f "$work/rootfs.tar.zst" "$TARBALL"
  rm -rf "$work"; trap - EXIT
  log "built in $(( $(date +%s) - t0 )) s: $(du -h "$TARBALL" | cut -f1) $TARBALL"
}

if [ "$FORCE" = 1 ] || [ ! -f "$TARBALL" ]; then
  build_tarball
else
  log "using cached $TARBALL"
fi

# ---- extract --------------------------------------------------------------------------
rm -rf "$TREE" "$TREE.cpu"
tmp=$(mktemp -d "$CACHE/.extract.XXXXXX")
zstd -q -dc "$TARBALL" | tar -C "$tmp" -xf - || { rm -rf "$tmp"; die "extracting $TARBALL failed (delete it to rebuild)"; }
[ -f "$tmp/edgesr-manifest.json" ] || { rm -rf "$tmp"; die "$TARBALL is not a complete rootfs (delete it to rebuild)"; }
mv -T "$tmp" "$TREE"
touch "$TREE/.edgesr-complete"
mkdir -p "$(dirname "$PREFIX")"
make_prefix "$TREE" "$PREFIX"
log "ready: $TREE ($(tr -d '\n ' <"$TREE/edgesr-manifest.json"))"
echo "$PREFIX"
