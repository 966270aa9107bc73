#!/usr/bin/env bash
# =============================================================================
# OFFLINE TEST DOUBLE OF THE MINICONDA INSTALLER. THIS IS NOT MINICONDA.
#
# CI for this project cannot reach Anaconda's servers, so the real installer
# cannot be downloaded there. This script stands in for it, and the role takes it
# through the same air-gapped option a user would use
# (mlflow_miniconda_installer_local_path + mlflow_miniconda_installer_sha256).
# Users never need it: by default the role downloads the real, pinned Miniconda.
#
# It honours the installer's batch options (-b -p PREFIX, -u, -f) and installs a
# `conda` that implements only what the role calls (`conda --version` and
# `conda create --yes --prefix P --override-channels --channel C python=X.Y pip`)
# and refuses anything else, including a Python version it cannot provide: the
# env is a venv of the host's own python3, so python=X.Y must match it.
# =============================================================================
set -euo pipefail

DOUBLE_VERSION="25.1.1-2-offline-test-double"

usage() {
  echo "usage: $0 -b [-u] [-f] [-p PREFIX]   (offline test double of the Miniconda installer)"
}

batch=0 update=0 force=0 prefix="${HOME:-/root}/miniconda3"
while getopts "bfhkp:su" opt; do
  case "$opt" in
    b) batch=1 ;;
    f) force=1 ;;
    u) update=1 ;;
    p) prefix="$OPTARG" ;;
    s|k) ;;
    h) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
  esac
done

if [ "$batch" != 1 ]; then
  echo "ERROR: the Miniconda test double runs in batch mode only (-b)." >&2
  exit 2
fi
case "$prefix" in
  /*) ;;
  *) echo "ERROR: prefix must be an absolute path: $prefix" >&2; exit 2 ;;
esac
if [ -e "$prefix" ] && [ "$update" != 1 ] && [ "$force" != 1 ]; then
  echo "ERROR: File or directory already exists: '$prefix'" >&2
  echo "If you want to update an existing installation, use the -u option." >&2
  exit 1
fi
if ! /usr/bin/python3 -c 'import venv, ensurepip' 2>/dev/null; then
  echo "ERROR: the Miniconda test double needs /usr/bin/python3 with venv and ensurepip (python3-venv)." >&2
  exit 1
fi

echo "PREFIX=$prefix"
echo "Unpacking payload (offline test double $DOUBLE_VERSION) ..."
mkdir -p "$prefix/bin" "$prefix/condabin" "$prefix/conda-meta" "$prefix/envs" "$prefix/pkgs"

cat > "$prefix/bin/conda" <<'CONDA'
#!/usr/bin/env bash
# OFFLINE TEST DOUBLE OF conda, installed by Miniconda3-offline-test-double.sh. NOT conda.
set -euo pipefail
die() { echo "conda (offline test double): $*" >&2; exit 2; }

case "${1:-}" in
  --version|-V) echo "conda 25.1.1 (offline test double)"; exit 0 ;;
  create) shift ;;
  *) die "unsupported command '${*:-}': this double implements only 'create' and '--version'" ;;
esac

yes=0 prefix="" override=0 offline=0
channels=() specs=()
while [ $# -gt 0 ]; do
  case "$1" in
    --yes|-y) yes=1 ;;
    --quiet|-q) ;;
    --prefix|-p) prefix="${2:?--prefix needs a value}"; shift ;;
    --prefix=*) prefix="${1#*=}" ;;
    --override-channels) override=1 ;;
    --offline) offline=1 ;;
    --channel|-c) channels+=("${2:?--channel needs a value}"); shift ;;
    --channel=*) channels+=("${1#*=}") ;;
    -*) die "unsupported option $1" ;;
    *) specs+=("$1") ;;
  esac
  shift
done

[ "$yes" = 1 ] || die "refusing to prompt: pass --yes"
[ -n "$prefix" ] || die "--prefix is required (named envs are not implemented)"
[ "$override" = 1 ] || die "refusing to read channels from .condarc: pass --override-channels"
[ "${#channels[@]}" -gt 0 ] || die "no --channel given"
# Offline, the channels are not contacted (nothing is, by this double); still checked for policy.
for c in "${channels[@]}"; do
  case "$c" in
    conda-forge) ;;
    defaults|main|r|msys2|https://repo.anaconda.com/*)
      [ "${CONDA_PLUGINS_AUTO_ACCEPT_TOS:-}" = yes ] \
        || die "CondaToSNonInteractiveError: Terms of Service have not been accepted for channel $c" ;;
    *) die "channel '$c' is unknown to this double" ;;
  esac
done

python=""
for s in "${specs[@]}"; do
  case "$s" in
    python=*) python="${s#python=}" ;;
    pip) ;;
    *) die "PackagesNotFoundError: $s (this double provides only python and pip)" ;;
  esac
done
[ -n "$python" ] || die "no python=X.Y in the specification"
host_python=$(/usr/bin/python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
[ "$python" = "$host_python" ] \
  || die "PackagesNotFoundError: python=$python (this double can only provide python=$host_python)"
[ ! -e "$prefix" ] || die "CondaValueError: prefix already exists: $prefix"

/usr/bin/python3 -m venv "$prefix"
mkdir -p "$prefix/conda-meta"
echo "# created by the conda offline test double: python=$python pip (offline=$offline)" > "$prefix/conda-meta/history"
echo "Preparing transaction: done (offline test double)"
CONDA
chmod 0755 "$prefix/bin/conda"
ln -sfn ../bin/conda "$prefix/condabin/conda"
echo "# installed by the Miniconda offline test double $DOUBLE_VERSION" > "$prefix/conda-meta/history"
echo "installation finished."
