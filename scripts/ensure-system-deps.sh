#!/usr/bin/env bash
# Install the Debian packages that the test suite needs, if any is missing (idempotent).
#   postgresql: the server binaries for the tests' private PostgreSQL cluster (tests/pg.py)
#   chromium:   the headless browser that renders the optuna-dashboard page (tests/test_inspect.py)
# Installs only as root or through sudo; otherwise prints what to install and carries on.
set -euo pipefail

PACKAGES=(postgresql chromium)

missing=()
for pkg in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$pkg")
    fi
done
[ ${#missing[@]} -eq 0 ] && exit 0

if ! command -v apt-get >/dev/null; then
    echo "ensure-system-deps: no apt-get here; please install: ${missing[*]}" >&2
    exit 0
fi
if [ "$(id -u)" -eq 0 ]; then
    SUDO=()
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    SUDO=(sudo -n)
else
    echo "ensure-system-deps: missing packages; run: sudo apt-get install -y ${missing[*]}" >&2
    exit 0
fi

# The PostgreSQL clusters on this machine (Debian's, as VERSION/NAME; none can exist before
# postgresql-common brings pg_lsclusters). Those listed before the install are someone else's,
# never stopped here; if they cannot be listed, this script stops no cluster at all.
clusters() {
    if command -v pg_lsclusters >/dev/null; then
        pg_lsclusters --no-header | awk '{print $1 "/" $2}'
    fi
}
if before=$(clusters); then listed=yes; else listed=no; fi

echo "ensure-system-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -q
"${SUDO[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"

# The Debian package creates and starts a default cluster on port 5432, which the tests do not
# use (they start their own, on a socket in a private folder: tests/pg.py). Stop that one, which
# this install created; a cluster that was there before is left as it is.
if [[ " ${missing[*]} " == *" postgresql "* ]] && [ "$listed" = yes ]; then
    pg_lsclusters --no-header 2>/dev/null | while read -r version name _port status _rest; do
        if [ "$status" = online ] && ! grep -qxF "$version/$name" <<<"$before"; then
            "${SUDO[@]}" pg_ctlcluster "$version" "$name" stop || true
        fi
    done || true
fi
