# scripts/ensure-debs.sh — sourced by the build, test and bench scripts.
# ensure_debs PKG...: apt-get install the Debian packages not installed yet
# (with sudo when not root), quietly; nothing when all are there.
ensure_debs() {
    local need=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || need+=("$p")
    done
    ((${#need[@]})) || return 0
    printf '[setup] installing %s\n' "${need[*]}" >&2
    local sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
}
