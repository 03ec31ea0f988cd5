# shellcheck shell=bash
# CHANGED is read by the scripts that source this file:
# shellcheck disable=SC2034
# Shared by install-linux.sh and install-macos.sh; sourced, not run.
#
# Written for bash 3.2 (what macOS ships): no associative arrays, no ${x,,}, no mapfile.
#
# The helpers report through CHANGED / FILE_CHANGED rather than their exit status, so
# that they are never called in an `if` or `||` context, where bash ignores `set -e`.
#
# Every path the scripts write is "$ROOT$path": REMOTELLM_ROOT stages the whole
# install under another directory (tests, packaging), like DESTDIR. Paths written
# *into* files (units, plists, configs) stay the real ones. External commands
# (systemctl, useradd, launchctl, dscl, chown, uv) are looked up on PATH, so a test
# can put recording fakes first.

ROOT="${REMOTELLM_ROOT:-}"
ROOT="${ROOT%/}"
CHANGED=0      # set to 1 by the helpers below whenever they change a file
FILE_CHANGED=0 # 1 if the last install_file / render_file / new_config changed its file
TMP_DIR=""

info() { printf '==> %s\n' "$*"; }
note() { printf '    %s\n' "$*"; }
warn() { printf 'warning: %s\n' "$*" >&2; }
die() {
    printf 'error: %s\n' "$*" >&2
    exit 1
}

# parse_args ARGS...: the command line both install scripts take. Sets BROKER, CONNECTOR,
# UNINSTALL, PURGE, START, PREFIX, WHEEL, PYTHON_SPEC and SRC_DIR; calls the script's usage.
# Reads HERE and DEFAULT_PREFIX.
parse_args() {
    BROKER=0
    CONNECTOR=0
    UNINSTALL=0
    PURGE=0
    START=1
    PREFIX=$DEFAULT_PREFIX
    WHEEL=""
    PYTHON_SPEC=">=3.11"
    SRC_DIR=$(cd "$HERE/.." && pwd)

    while [[ $# -gt 0 ]]; do
        case "$1" in
        --broker) BROKER=1 ;;
        --connector) CONNECTOR=1 ;;
        --prefix)
            [[ $# -ge 2 ]] || die "--prefix needs a directory"
            PREFIX=${2%/}
            shift
            ;;
        --prefix=*) PREFIX=${1#--prefix=} PREFIX=${PREFIX%/} ;;
        --wheel)
            [[ $# -ge 2 ]] || die "--wheel needs a file"
            WHEEL=$2
            shift
            ;;
        --wheel=*) WHEEL=${1#--wheel=} ;;
        --python)
            [[ $# -ge 2 ]] || die "--python needs a version or a path"
            PYTHON_SPEC=$2
            shift
            ;;
        --python=*) PYTHON_SPEC=${1#--python=} ;;
        --no-start) START=0 ;;
        --uninstall) UNINSTALL=1 ;;
        --purge) PURGE=1 ;;
        -h | --help)
            usage
            exit 0
            ;;
        *)
            usage >&2
            die "unknown argument: $1"
            ;;
        esac
        shift
    done

    check_prefix "$PREFIX"
    if [[ $PURGE -eq 1 && $UNINSTALL -eq 0 ]]; then
        die "--purge only goes with --uninstall"
    fi
    if [[ $UNINSTALL -eq 0 && $BROKER -eq 0 && $CONNECTOR -eq 0 ]]; then
        usage >&2
        die "say what to install: --broker, --connector or both"
    fi
    if [[ $UNINSTALL -eq 1 && $BROKER -eq 0 && $CONNECTOR -eq 0 ]]; then
        BROKER=1
        CONNECTOR=1
    fi
}

cleanup_tmp() {
    if [[ -n $TMP_DIR && -d $TMP_DIR ]]; then
        rm -rf "$TMP_DIR"
    fi
}

make_tmp() {
    TMP_DIR=$(mktemp -d "${TMPDIR:-/tmp}/remotellm-install.XXXXXX")
    trap cleanup_tmp EXIT
}

# need_cmd NAME HINT: fail with HINT when NAME is not on PATH.
need_cmd() {
    command -v "$1" >/dev/null 2>&1 || die "$1 not found on PATH. $2"
}

# find_uv: set UV to the uv binary ($UV, else PATH, else the usual install places).
find_uv() {
    local candidate
    if [[ -n ${UV:-} ]]; then
        [[ -x $UV ]] || die "UV=$UV is not an executable file."
        return
    fi
    UV=$(command -v uv 2>/dev/null || true)
    if [[ -z $UV ]]; then
        for candidate in "${SUDO_HOME:-}/.local/bin/uv" "${HOME:-/root}/.local/bin/uv" \
            /usr/local/bin/uv /opt/homebrew/bin/uv; do
            if [[ -x $candidate ]]; then
                UV=$candidate
                break
            fi
        done
    fi
    [[ -n $UV ]] || die "uv not found. Install it (https://docs.astral.sh/uv/), e.g.
    curl -LsSf https://astral.sh/uv/install.sh | sh
then run this script again; under sudo, which resets PATH, pass it along:
    sudo UV=\"\$(command -v uv)\" $0 ${SCRIPT_ARGS:-}"
}

need_root() {
    if [[ -n $ROOT ]]; then
        return # staging into REMOTELLM_ROOT: no system change, root not required
    fi
    [[ $(id -u) -eq 0 ]] || die "run this as root, e.g.: sudo $0 ${SCRIPT_ARGS:-}"
}

check_prefix() {
    [[ $1 =~ ^/[A-Za-z0-9._/-]*[A-Za-z0-9._-]$ ]] ||
        die "--prefix must be an absolute path of letters, digits and ._-/ (got '$1')."
    case "$1" in
    / | /usr | /usr/local | /opt | /etc | /var | /home | /root | /Users | /Library)
        die "--prefix $1 is a system directory: give a directory of its own, e.g. /opt/remotellm."
        ;;
    esac
}

# ensure_dir PATH MODE OWNER GROUP
ensure_dir() {
    local dir="$ROOT$1"
    if [[ ! -d $dir ]]; then
        mkdir -p "$dir"
        CHANGED=1
    fi
    chmod "$2" "$dir"
    chown "$3:$4" "$dir"
}

# _place TMPFILE DEST MODE OWNER GROUP: move a prepared file into place.
_place() {
    chmod "$3" "$1"
    chown "$4:$5" "$1"
    mv -f "$1" "$2"
}

# install_file SRC DEST MODE OWNER GROUP: copy when the content differs.
install_file() {
    local dest="$ROOT$2" tmp
    FILE_CHANGED=0
    if [[ -f $dest ]] && cmp -s "$1" "$dest"; then
        chmod "$3" "$dest"
        return 0
    fi
    mkdir -p "$(dirname "$dest")"
    tmp=$(mktemp "$dest.XXXXXX")
    cat "$1" >"$tmp"
    _place "$tmp" "$dest" "$3" "$4" "$5"
    CHANGED=1
    FILE_CHANGED=1
}

# render_file SRC DEST MODE OWNER GROUP FROM TO: install SRC with every FROM replaced by TO.
render_file() {
    local out="$TMP_DIR/render.$$"
    sed "s|$6|$7|g" "$1" >"$out"
    install_file "$out" "$2" "$3" "$4" "$5"
    rm -f "$out"
}

# new_config SRC DEST MODE OWNER GROUP: create DEST from SRC unless it exists (never
# overwrite an operator's file). SRC may hold secrets: the copy is made mode 0600 first
# and given its final mode and owner before it is moved into place.
new_config() {
    local dest="$ROOT$2" tmp
    FILE_CHANGED=0
    if [[ -e $dest ]]; then
        note "kept $2 (not overwritten)"
        return 0
    fi
    mkdir -p "$(dirname "$dest")"
    tmp=$(umask 077 && mktemp "$dest.XXXXXX")
    cat "$1" >"$tmp"
    _place "$tmp" "$dest" "$3" "$4" "$5"
    CHANGED=1
    FILE_CHANGED=1
    note "created $2"
}

# set_option FILE PATTERN LINE_PREFIX VAR: in FILE, replace the first line that starts
# with PATTERN by LINE_PREFIX followed by the value of the environment variable VAR.
# The value goes through the environment, not argv, so it never shows in ps.
set_option() {
    local tmp
    tmp=$(umask 077 && mktemp "$1.XXXXXX")
    PATTERN=$2 LINE=$3 VAR=$4 awk '
        !done && index($0, ENVIRON["PATTERN"]) == 1 {
            print ENVIRON["LINE"] ENVIRON[ENVIRON["VAR"]]; done = 1; next
        }
        { print }
        END { if (!done) print ENVIRON["LINE"] ENVIRON[ENVIRON["VAR"]] }
    ' "$1" >"$tmp"
    cat "$tmp" >"$1"
    rm -f "$tmp"
}

# init_credentials: the broker's first user API key and connector token, made by the broker
# itself into its data dir (only their hashes, in credentials.yaml, as its own first start
# does) unless it has some. Nothing goes into a settings file in plain text. Sets
# CREDENTIALS_TEXT (what the broker printed, secrets included, to show this once at the end)
# and REMOTELLM_NEW_CONNECTOR_TOKEN (for a connector installed alongside). Uses PREFIX,
# DATA_DIR and SERVICE_USER.
init_credentials() {
    local data="$ROOT$DATA_DIR/broker"
    CREDENTIALS_TEXT=$("$ROOT$PREFIX/venv/bin/remotellm-broker" init-credentials \
        --data-dir "$data") || die "the broker could not create its credentials (see above)."
    if [[ -e $data/credentials.yaml ]]; then
        chown "$SERVICE_USER:$SERVICE_USER" "$data/credentials.yaml"
    fi
    REMOTELLM_NEW_CONNECTOR_TOKEN=$(printf '%s\n' "$CREDENTIALS_TEXT" |
        sed -n 's/^ *Connector token: *//p')
    export REMOTELLM_NEW_CONNECTOR_TOKEN
}

# show_credentials: print what init_credentials made (the only time the secrets are shown).
show_credentials() {
    if [[ -z ${CREDENTIALS_TEXT:-} ]]; then
        return
    fi
    info "Broker credentials"
    printf '%s\n' "$CREDENTIALS_TEXT"
    CREDENTIALS_TEXT=""
}

# base_python_dir VENV: the prefix of the Python the venv was made from.
base_python_dir() {
    "$1/bin/python" -c 'import sys; print(sys.base_prefix)'
}

# build_venv: create or update "$ROOT$PREFIX/venv" with remotellm and its locked
# dependencies. Uses SRC_DIR (source tree with uv.lock), WHEEL (optional prebuilt
# wheel), PYTHON_SPEC and UV. Sets CHANGED=1 when it installed anything.
build_venv() {
    local venv="$ROOT$PREFIX/venv" dist="$ROOT$PREFIX/dist" wheel base req
    export UV_LINK_MODE=copy UV_NO_PROGRESS=1
    # A Python that uv has to download goes under the prefix, readable by the service user.
    export UV_PYTHON_INSTALL_DIR="$ROOT$PREFIX/python"

    mkdir -p "$TMP_DIR/dist"
    if [[ -n $WHEEL ]]; then
        [[ -f $WHEEL ]] || die "--wheel $WHEEL: no such file."
        cp "$WHEEL" "$TMP_DIR/dist/"
    else
        info "Building the remotellm wheel from $SRC_DIR"
        "$UV" build --quiet --wheel --out-dir "$TMP_DIR/dist" "$SRC_DIR" ||
            die "uv build failed (see above)."
    fi
    wheel=$(find "$TMP_DIR/dist" -name 'remotellm-*.whl' | head -n 1)
    [[ -n $wheel ]] || die "no remotellm wheel was built."

    if [[ ! -x $venv/bin/python ]]; then
        info "Creating the virtual environment $PREFIX/venv"
        "$UV" venv --quiet --python "$PYTHON_SPEC" "$venv" ||
            die "uv venv failed: no Python $PYTHON_SPEC found or downloadable (use --python)."
        CHANGED=1
    fi
    base=$(base_python_dir "$venv")
    case "$base" in
    /root/* | /home/* | /Users/*)
        if [[ -z $ROOT ]]; then
            die "the venv's Python lives in $base, which the service user cannot read.
Install a system Python $PYTHON_SPEC (Debian: apt-get install python3), or pass
--python with the path of one outside home directories, then remove $PREFIX/venv
and run this script again."
        fi
        warn "the venv's Python lives in $base (fine for a staged install only)"
        ;;
    esac

    if [[ -f $SRC_DIR/uv.lock ]]; then
        req="$TMP_DIR/requirements.txt"
        "$UV" export --quiet --project "$SRC_DIR" --frozen --no-dev --no-emit-project --no-header \
            --output-file "$req" >/dev/null || die "uv export failed: is uv.lock up to date?"
        # Pinned and hash-checked; a no-op when everything is already installed.
        "$UV" pip install --quiet --python "$venv/bin/python" --compile-bytecode \
            --require-hashes --requirement "$req" || die "installing the dependencies failed."
        install_file "$req" "$PREFIX/requirements.txt" 0644 root "$ROOT_GROUP"
    fi

    if [[ -f $dist/$(basename "$wheel") ]] && cmp -s "$wheel" "$dist/$(basename "$wheel")"; then
        note "remotellm is up to date in $PREFIX/venv"
        return
    fi
    info "Installing $(basename "$wheel") into $PREFIX/venv"
    if [[ -f $SRC_DIR/uv.lock ]]; then
        "$UV" pip install --quiet --python "$venv/bin/python" --compile-bytecode --no-deps \
            --reinstall-package remotellm "$wheel" || die "installing remotellm failed."
    else
        "$UV" pip install --quiet --python "$venv/bin/python" --compile-bytecode \
            --reinstall-package remotellm "$wheel" || die "installing remotellm failed."
    fi
    rm -rf "$dist"
    mkdir -p "$dist"
    cp "$wheel" "$dist/"
    CHANGED=1
}

# install_program: the venv (build_venv) and the examples next to it. Sets CHANGED=1 when
# anything changed. Uses HERE, PREFIX and ROOT_GROUP.
install_program() {
    local example
    build_venv
    ensure_dir "$PREFIX/examples" 0755 root "$ROOT_GROUP"
    for example in "$HERE"/examples/*.example; do
        install_file "$example" "$PREFIX/examples/$(basename "$example")" 0644 root \
            "$ROOT_GROUP"
    done
}

# remove_path PATH: remove "$ROOT$PATH" if it exists, saying so.
remove_path() {
    case "$1" in
    /?*) ;;
    *) die "refusing to remove '$1'" ;;
    esac
    if [[ -e $ROOT$1 || -L $ROOT$1 ]]; then
        rm -rf -- "$ROOT$1"
        note "removed $1"
    fi
}

# remove_dir_if_empty PATH
remove_dir_if_empty() {
    if [[ -d $ROOT$1 ]] && rmdir "$ROOT$1" 2>/dev/null; then
        note "removed $1"
    fi
}
