#!/usr/bin/env bash
# Installs everything tlsgate needs on a Debian bookworm host, idempotently:
#   apt packages (bcc, kernel headers, nftables, test peers), the kernel-header links bcc
#   needs, a virtualenv in .venv with Debian's bcc module exposed (and nothing else from
#   the system site-packages), and tlsgate itself.
# Usage: scripts/setup.sh [run|test]   ("test" adds the development tools)
# A second run only checks and returns in about a second.
set -euo pipefail

profile=${1:-run}
here=$(cd "$(dirname "$0")/.." && pwd)
venv="$here/.venv"
# Debian's interpreter by default: its standard library is readable by every user, which the
# workers need after they drop root (an interpreter under /root, e.g. pyenv's, is not).
python=${TLSGATE_PYTHON:-/usr/bin/python3}

say() { printf 'setup: %s\n' "$*" >&2; }
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

apt_packages=(python3 python3-venv python3-bpfcc linux-headers-amd64 nftables iproute2 curl
  openssl ca-certificates)
if [ "$profile" = test ]; then
  # Real peers for the tests: servers, clients and the packet decoder.
  apt_packages+=(nginx-light wrk tshark bpftool nghttp2-client)
fi

missing=()
for p in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing apt packages: ${missing[*]}"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 update -qq
  # tshark asks whether non-root users may capture; answer no without a prompt.
  echo 'wireshark-common wireshark-common/install-setuid boolean false' | as_root debconf-set-selections
  as_root env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# bcc compiles against /lib/modules/$(uname -r)/{build,source}. This kernel ships no headers,
# so point those at Debian's (networking programs do not depend on the exact version).
kdir="/lib/modules/$(uname -r)"
if [ ! -e "$kdir/build" ] || [ ! -e "$kdir/source" ]; then
  hdr=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1 || true)
  common=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n 1 || true)
  if [ -n "$hdr" ] && [ -n "$common" ]; then
    say "linking kernel headers for bcc: $kdir/build -> $hdr"
    as_root mkdir -p "$kdir"
    [ -e "$kdir/build" ] || as_root ln -sfn "$hdr" "$kdir/build"
    [ -e "$kdir/source" ] || as_root ln -sfn "$common" "$kdir/source"
  else
    say "warning: no kernel headers under /usr/src; eBPF steering will be unavailable"
  fi
fi

want_home=$(dirname "$(readlink -f "$(command -v "$python")")")
if [ -f "$venv/pyvenv.cfg" ] && ! grep -qx "home = $want_home" "$venv/pyvenv.cfg"; then
  say "recreating $venv for $python"
  rm -rf "$venv"
fi
if [ ! -x "$venv/bin/python" ]; then
  say "creating virtualenv $venv"
  "$python" -m venv "$venv"
fi

# Expose Debian's bcc package, and only it (a --system-site-packages venv would also expose
# Debian's old cryptography and pyOpenSSL, which would then satisfy our requirements silently).
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if [ -d /usr/lib/python3/dist-packages/bcc ]; then
  mkdir -p "$site/_tlsgate_system"
  ln -sfn /usr/lib/python3/dist-packages/bcc "$site/_tlsgate_system/bcc"
  echo "$site/_tlsgate_system" > "$site/tlsgate-system-bcc.pth"
fi

extras=""
[ "$profile" = test ] && extras="[dev]"
stamp="$venv/.tlsgate-installed$extras"
want=$(cat "$here/pyproject.toml"| sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || ! "$venv/bin/python" -c 'import tlsgate' 2>/dev/null; then
  say "installing tlsgate$extras into $venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -e "$here$extras"
  echo "$want" > "$stamp"
fi
