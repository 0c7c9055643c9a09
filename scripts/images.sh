#!/usr/bin/env bash
# Builds Mamba's game images locally from Debian packages and imports them into Docker.
#
# No image registry is reachable, so every image is a root filesystem made from .deb files
# (debootstrap --variant=minbase, or a single static busybox for the small test image),
# imported with `docker import` and labelled with a hash of its recipe. An image is rebuilt
# only when the hash of its recipe folder (or of this script) changes.
#
# Usage: scripts/images.sh [NAME...]   (default: every folder under docker/images/)
# Env:   MAMBA_IMAGE_CACHE  where downloaded .deb files are kept (default /var/cache/mamba-images)
#        MAMBA_APT_MIRROR   overrides the mirror read from the machine's apt sources
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
recipes="$repo/docker/images"
cache=${MAMBA_IMAGE_CACHE:-/var/cache/mamba-images}
# The uid/gid every game runs as inside its container; wings' default config uses the same.
container_uid=988
container_gid=988
hash_label=org.mamba.recipe-hash

log() { printf 'images: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root (debootstrap and docker need it)"
command -v docker >/dev/null || die "docker is not installed"

ensure_tools() {
  local missing=()
  command -v debootstrap >/dev/null || missing+=(debootstrap)
  command -v dpkg-deb >/dev/null || missing+=(dpkg)
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

# The Debian suite and mirror this machine's apt already uses (deb822 or one-line format).
suite() { . /etc/os-release; printf '%s\n' "${VERSION_CODENAME:?no VERSION_CODENAME in /etc/os-release}"; }
mirror() {
  if [ -n "${MAMBA_APT_MIRROR:-}" ]; then printf '%s\n' "$MAMBA_APT_MIRROR"; return; fi
  local s found=""
  s=$(suite)
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    # deb822 stanzas: take the URIs of the stanza whose Suites names our suite.
    found=$(awk -v s="$s" '
      /^$/ { if (ok && uri != "") { print uri; exit } ok=0; uri="" }
      /^URIs:/ { uri=$2 }
      /^Suites:/ { for (i=2; i<=NF; i++) if ($i == s) ok=1 }
      END { if (ok && uri != "") print uri }' "$f" | head -n1)
    [ -n "$found" ] && break
  done
  if [ -z "$found" ] && [ -f /etc/apt/sources.list ]; then
    found=$(awk -v s="$s" '$1 == "deb" && $0 ~ " "s" " { for (i=2; i<=NF; i++) if ($i ~ /^(https?|file):/) { print $i; exit } }' /etc/apt/sources.list)
  fi
  [ -n "$found" ] || die "no apt mirror for suite $s found in /etc/apt/sources*; set MAMBA_APT_MIRROR"
  printf '%s\n' "$found"
}

recipe_hash() {
  local dir=$1
  {
    sha256sum "${BASH_SOURCE[0]}" | cut -d' ' -f1
    suite
    (cd "$dir" && find . -type f -print0 | sort -z | xargs -0 sha256sum)
    (cd "$dir" && find . -type f -perm -u+x -print | sort)
  } | sha256sum | cut -c1-32
}

current_hash() {
  docker image inspect --format "{{ index .Config.Labels \"$hash_label\" }}" "$1" 2>/dev/null || true
}

# Adds the unprivileged user every game runs as, and its home folder (the server root mount point).
add_container_user() {
  local root=$1
  mkdir -p "$root/etc" "$root/home/container" "$root/tmp"
  chmod 1777 "$root/tmp"
  grep -q '^root:' "$root/etc/passwd" 2>/dev/null || echo 'root:x:0:0:root:/root:/bin/sh' >>"$root/etc/passwd"
  grep -q '^root:' "$root/etc/group" 2>/dev/null || echo 'root:x:0:' >>"$root/etc/group"
  grep -q '^container:' "$root/etc/passwd" || echo "container:x:$container_uid:$container_gid:game server:/home/container:/bin/sh" >>"$root/etc/passwd"
  grep -q '^container:' "$root/etc/group" || echo "container:x:$container_gid:" >>"$root/etc/group"
  chown "$container_uid:$container_gid" "$root/home/container"
}

build_rootfs_debootstrap() {
  local root=$1 packages=$2
  local include=""
  [ -n "$packages" ] && include="--include=$(echo "$packages" | tr ' ' ',')"
  mkdir -p "$cache/debs"
  # shellcheck disable=SC2086
  debootstrap --variant=minbase --cache-dir="$cache/debs" $include "$(suite)" "$root" "$(mirror)" >"$root.log" 2>&1 \
    || { tail -n 30 "$root.log" >&2; die "debootstrap failed (log above)"; }
  rm -rf "$root/var/lib/apt/lists/"* "$root/var/cache/apt/"*.bin "$root/usr/share/doc" "$root/usr/share/man" "$root/usr/share/info"
}

build_rootfs_busybox() {
  local root=$1
  local debs="$cache/debs"
  mkdir -p "$debs"
  local deb
  deb=$(ls "$debs"/busybox-static_*.deb 2>/dev/null | head -n1 || true)
  if [ -z "$deb" ]; then
    (cd "$debs" && apt-get download busybox-static >/dev/null 2>&1) || { apt-get update -qq && (cd "$debs" && apt-get download busybox-static >/dev/null); }
    deb=$(ls "$debs"/busybox-static_*.deb | head -n1)
  fi
  local x
  x=$(mktemp -d)
  dpkg-deb -x "$deb" "$x"
  mkdir -p "$root/bin" "$root/usr/bin" "$root/sbin" "$root/usr/sbin" "$root/proc" "$root/sys" "$root/dev" "$root/etc"
  cp "$x/bin/busybox" "$root/bin/busybox"
  rm -rf "$x"
  chroot "$root" /bin/busybox --install -s
}

build_one() {
  local name=$1
  local dir="$recipes/$name"
  [ -f "$dir/recipe.env" ] || die "no recipe at $dir/recipe.env"
  local image="mamba/$name:latest" hash
  hash=$(recipe_hash "$dir")
  if [ "$(current_hash "$image")" = "$hash" ]; then
    log "$image is up to date ($hash)"
    return
  fi
  # Recipe variables: KIND (debootstrap|busybox), PACKAGES, CMD (JSON array), ENV (space-separated K=V).
  local KIND="" PACKAGES="" CMD='["/bin/sh"]' ENV=""
  # shellcheck disable=SC1091
  . "$dir/recipe.env"
  log "building $image ($KIND; recipe $hash)"
  local work
  work=$(mktemp -d /var/tmp/mamba-image.XXXXXX)
  local root="$work/rootfs"
  mkdir -p "$root"
  case "$KIND" in
    debootstrap) build_rootfs_debootstrap "$root" "$PACKAGES" ;;
    busybox) build_rootfs_busybox "$root" ;;
    *) die "$name: unknown KIND '$KIND'" ;;
  esac
  if [ -d "$dir/files" ]; then
    cp -a "$dir/files/." "$root/"
  fi
  add_container_user "$root"
  local imported="mamba/$name:import-$hash"
  tar --numeric-owner -C "$root" -c . | docker import - "$imported" >/dev/null
  rm -rf "$root"
  # The build only adds metadata on top of the import, so its context is an empty folder.
  local context="$work/context"
  mkdir -p "$context"
  {
    echo "FROM $imported"
    echo "LABEL $hash_label=\"$hash\" org.mamba.image=\"$name\""
    for kv in $ENV; do echo "ENV $kv"; done
    echo "ENV HOME=/home/container USER=container"
    echo "USER $container_uid:$container_gid"
    echo "WORKDIR /home/container"
    echo "CMD $CMD"
  } >"$context/Dockerfile"
  DOCKER_BUILDKIT=0 docker build -q -t "$image" "$context" >/dev/null 2>"$work/build.err" || { cat "$work/build.err" >&2; die "docker build of $image failed"; }
  docker image rm "$imported" >/dev/null 2>&1 || true
  rm -rf "$work"
  log "built $image"
}

main() {
  ensure_tools
  local names=("$@")
  if [ ${#names[@]} -eq 0 ]; then
    for d in "$recipes"/*/; do names+=("$(basename "$d")"); done
  fi
  for n in "${names[@]}"; do build_one "$n"; done
}

main "$@"
