#!/usr/bin/env bash
# Install (or remove) the RemoteLLM broker and/or connector as launchd daemons on macOS.
# Safe to run again: it updates the code and plists and never overwrites your settings.
#
#   sudo deploy/install-macos.sh --connector            # next to Ollama / LM Studio
#   sudo deploy/install-macos.sh --broker
#   sudo deploy/install-macos.sh --uninstall [--purge]  # remove (and delete config/data)
#
# What goes where:
#   /usr/local/remotellm/venv           the program (a uv venv, dependencies pinned by uv.lock)
#   /usr/local/etc/remotellm/*.yaml     settings (broker.yaml, connector.yaml, connectors.yaml)
#   /usr/local/var/remotellm/broker     the broker's data dir
#   /usr/local/var/log/remotellm/*.log  logs
#   /Library/LaunchDaemons/com.remotellm.{broker,connector}.plist
# The daemons run as the hidden system user _remotellm.
#
# REMOTELLM_ROOT=/some/dir stages everything under that directory instead (for tests and
# packaging); the commands it calls (launchctl, dscl, chown, uv) are taken from PATH.
# Written for the bash 3.2 that macOS ships.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=SCRIPTDIR/lib/common.sh
. "$HERE/lib/common.sh"
SCRIPT_ARGS="$*"

SERVICE_USER=_remotellm
ROOT_GROUP=wheel
CONF_DIR=/usr/local/etc/remotellm
DATA_DIR=/usr/local/var/remotellm
LOG_DIR=/usr/local/var/log/remotellm
PLIST_DIR=/Library/LaunchDaemons
DEFAULT_PREFIX=/usr/local/remotellm

usage() {
    cat <<EOF
Usage: $0 [--broker] [--connector] [options]
       $0 --uninstall [--broker] [--connector] [--purge]

Install RemoteLLM as launchd daemons (run with sudo; safe to run again).

  --broker          install the broker daemon (com.remotellm.broker)
  --connector       install the connector daemon (com.remotellm.connector)
                    (give both to install both)
  --prefix DIR      where the program goes (default: $DEFAULT_PREFIX)
  --wheel FILE      install this remotellm wheel instead of building one from the source tree
  --python SPEC     Python for the venv, a version or a path (default: >=3.11)
  --no-start        install, but do not load, start or restart anything
  --uninstall       unload and remove the daemons (both unless one is named) and the
                    program; configuration, data and logs are kept
  --purge           with --uninstall: also delete configuration, data, logs and the user
  -h, --help        show this help

Environment: UV (path of uv), REMOTELLM_ROOT (stage under this directory).
EOF
}

parse_args "$@"

need_root
need_cmd launchctl "This script is for macOS; on Linux use deploy/install-linux.sh."
need_cmd dscl "This script is for macOS; on Linux use deploy/install-linux.sh."

label() { printf 'com.remotellm.%s' "$1"; }
plist_file() { printf '%s/com.remotellm.%s.plist' "$PLIST_DIR" "$1"; }

# --- install ---------------------------------------------------------------------------

# free_id: the lowest id in 300-499 used neither by a user nor by a group.
free_id() {
    local used id
    used=$({
        dscl . -list /Users UniqueID
        dscl . -list /Groups PrimaryGroupID
    } | awk '{print $2}')
    id=300
    while [[ $id -lt 500 ]]; do
        if ! printf '%s\n' "$used" | grep -qx "$id"; then
            printf '%s' "$id"
            return
        fi
        id=$((id + 1))
    done
    die "no free user id between 300 and 499 for $SERVICE_USER"
}

ensure_user() {
    if dscl . -read "/Users/$SERVICE_USER" UniqueID >/dev/null 2>&1; then
        note "user $SERVICE_USER exists"
        return
    fi
    local id
    id=$(free_id)
    dscl . -create "/Groups/$SERVICE_USER"
    dscl . -create "/Groups/$SERVICE_USER" PrimaryGroupID "$id"
    dscl . -create "/Groups/$SERVICE_USER" RealName "RemoteLLM service"
    dscl . -create "/Groups/$SERVICE_USER" Password '*'
    dscl . -create "/Users/$SERVICE_USER"
    dscl . -create "/Users/$SERVICE_USER" UniqueID "$id"
    dscl . -create "/Users/$SERVICE_USER" PrimaryGroupID "$id"
    dscl . -create "/Users/$SERVICE_USER" RealName "RemoteLLM service"
    dscl . -create "/Users/$SERVICE_USER" UserShell /usr/bin/false
    dscl . -create "/Users/$SERVICE_USER" NFSHomeDirectory /var/empty
    dscl . -create "/Users/$SERVICE_USER" Password '*'
    dscl . -create "/Users/$SERVICE_USER" IsHidden 1
    note "created system user $SERVICE_USER (id $id)"
}

connector_configured() {
    grep -Eq '^broker_token(_file)?: *[^ ]' "$ROOT$CONF_DIR/connector.yaml" 2>/dev/null
}

install_broker_config() {
    local cfg="$TMP_DIR/broker.yaml"
    cp "$HERE/examples/broker.yaml.example" "$cfg"
    if [[ ! -e $ROOT$CONF_DIR/broker.yaml ]]; then
        export REMOTELLM_DATA_DIR_VALUE="$DATA_DIR/broker"
        export REMOTELLM_CONNECTORS_VALUE="$CONF_DIR/connectors.yaml"
        set_option "$cfg" "#data_dir:" "data_dir: " REMOTELLM_DATA_DIR_VALUE
        set_option "$cfg" "#connector_config:" "connector_config: " REMOTELLM_CONNECTORS_VALUE
        new_config "$cfg" "$CONF_DIR/broker.yaml" 0640 root "$SERVICE_USER"
        # First install: the broker makes its first key and token, stored hashed.
        init_credentials
    else
        note "kept $CONF_DIR/broker.yaml (not overwritten)"
    fi
    new_config "$HERE/examples/connectors.yaml.example" "$CONF_DIR/connectors.yaml" 0640 \
        root "$SERVICE_USER"
    rm -f "$cfg"
}

install_connector_config() {
    local cfg="$TMP_DIR/connector.yaml"
    cp "$HERE/examples/connector.yaml.example" "$cfg"
    if [[ ! -e $ROOT$CONF_DIR/connector.yaml && -n ${REMOTELLM_NEW_CONNECTOR_TOKEN:-} ]]; then
        # Broker and connector installed together: point the connector at this broker.
        export REMOTELLM_LOCAL_BROKER_URL=http://127.0.0.1:8443
        set_option "$cfg" "#broker_url:" "broker_url: " REMOTELLM_LOCAL_BROKER_URL
        set_option "$cfg" "#broker_token:" "broker_token: " REMOTELLM_NEW_CONNECTOR_TOKEN
    fi
    new_config "$cfg" "$CONF_DIR/connector.yaml" 0640 root "$SERVICE_USER"
    rm -f "$cfg"
}

# ensure_log NAME: the log file launchd appends to, owned by the service user.
ensure_log() {
    local log="$ROOT$LOG_DIR/$1.log"
    if [[ ! -e $log ]]; then
        : >"$log"
        chmod 0640 "$log"
        chown "$SERVICE_USER:$SERVICE_USER" "$log"
    fi
}

# install_plist NAME: install the plist (with the prefix filled in); sets FILE_CHANGED.
install_plist() {
    render_file "$HERE/launchd/com.remotellm.$1.plist" "$(plist_file "$1")" 0644 root \
        "$ROOT_GROUP" "$DEFAULT_PREFIX/" "$PREFIX/"
}

loaded() { launchctl print "system/$(label "$1")" >/dev/null 2>&1; }

# start_daemon NAME PLIST_CHANGED CODE_CHANGED
start_daemon() {
    local name=$1
    if ! loaded "$name"; then
        launchctl enable "system/$(label "$name")"
        launchctl bootstrap system "$(plist_file "$name")"
        note "loaded $(label "$name")"
    elif [[ $2 -eq 1 ]]; then
        # launchd reads a plist only when it is bootstrapped: reload it.
        launchctl bootout "system/$(label "$name")" || true
        launchctl bootstrap system "$(plist_file "$name")"
        note "reloaded $(label "$name")"
    elif [[ $3 -eq 1 ]]; then
        launchctl kickstart -k "system/$(label "$name")"
        note "restarted $(label "$name")"
    fi
}

do_install() {
    local code_changed broker_changed=0 connector_changed=0 broker_plist=0 connector_plist=0
    CREDENTIALS_TEXT=""
    find_uv
    if [[ -z $WHEEL && ! -f $SRC_DIR/pyproject.toml ]]; then
        die "no source tree at $SRC_DIR (run the script from a RemoteLLM checkout, or give --wheel)."
    fi
    make_tmp

    info "Service user"
    ensure_user

    info "Directories"
    ensure_dir "$CONF_DIR" 0750 root "$SERVICE_USER"
    ensure_dir "$DATA_DIR" 0750 root "$SERVICE_USER"
    ensure_dir "$LOG_DIR" 0750 "$SERVICE_USER" "$SERVICE_USER"
    ensure_dir "$PREFIX" 0755 root "$ROOT_GROUP"

    info "Program"
    CHANGED=0
    install_program
    code_changed=$CHANGED

    info "Configuration in $CONF_DIR"
    if [[ $BROKER -eq 1 ]]; then
        CHANGED=0
        ensure_dir "$DATA_DIR/broker" 0700 "$SERVICE_USER" "$SERVICE_USER"
        install_broker_config
        ensure_log broker
        broker_changed=$CHANGED
    fi
    if [[ $CONNECTOR -eq 1 ]]; then
        CHANGED=0
        install_connector_config
        ensure_log connector
        connector_changed=$CHANGED
    fi
    unset REMOTELLM_NEW_CONNECTOR_TOKEN

    info "launchd daemons in $PLIST_DIR"
    if [[ $BROKER -eq 1 ]]; then
        install_plist broker
        if [[ $FILE_CHANGED -eq 1 ]]; then
            broker_plist=1
            note "installed $(plist_file broker)"
        fi
    fi
    if [[ $CONNECTOR -eq 1 ]]; then
        install_plist connector
        if [[ $FILE_CHANGED -eq 1 ]]; then
            connector_plist=1
            note "installed $(plist_file connector)"
        fi
    fi

    if [[ $START -eq 1 && $BROKER -eq 1 ]]; then
        start_daemon broker "$broker_plist" $((code_changed | broker_changed))
    fi
    if [[ $CONNECTOR -eq 1 ]]; then
        if ! connector_configured; then
            CONNECTOR_TODO=1
        elif [[ $START -eq 1 ]]; then
            start_daemon connector "$connector_plist" $((code_changed | connector_changed))
        fi
    fi

    info "Done."
    if [[ $code_changed -eq 0 && $broker_changed -eq 0 && $connector_changed -eq 0 &&
        $broker_plist -eq 0 && $connector_plist -eq 0 ]]; then
        note "Nothing changed: everything was already installed and up to date."
    fi
    if [[ $BROKER -eq 1 ]]; then
        show_credentials
        note "Broker settings: $CONF_DIR/broker.yaml; connector tokens: $CONF_DIR/connectors.yaml"
        note "Logs: tail -f $LOG_DIR/broker.log; health: curl http://127.0.0.1:8080/ready"
    fi
    if [[ $CONNECTOR -eq 1 ]]; then
        if [[ ${CONNECTOR_TODO:-0} -eq 1 ]]; then
            note "Connector: set broker_url and broker_token in $CONF_DIR/connector.yaml,"
            note "then run this script again to start it."
        fi
        note "Logs: tail -f $LOG_DIR/connector.log"
    fi
}

# --- uninstall -------------------------------------------------------------------------

uninstall_component() {
    local name=$1
    if loaded "$name"; then
        launchctl bootout "system/$(label "$name")" || warn "could not unload $(label "$name")"
    fi
    remove_path "$(plist_file "$name")"
}

do_uninstall() {
    info "Removing daemons"
    if [[ $BROKER -eq 1 ]]; then uninstall_component broker; fi
    if [[ $CONNECTOR -eq 1 ]]; then uninstall_component connector; fi

    local remaining=0
    if [[ -e $ROOT$(plist_file broker) || -e $ROOT$(plist_file connector) ]]; then
        remaining=1
    fi
    if [[ $remaining -eq 0 ]]; then
        info "Removing the program in $PREFIX"
        remove_path "$PREFIX/venv"
        remove_path "$PREFIX/dist"
        remove_path "$PREFIX/examples"
        remove_path "$PREFIX/python"
        remove_path "$PREFIX/requirements.txt"
        remove_dir_if_empty "$PREFIX"
    else
        note "kept $PREFIX/venv: the other daemon still uses it"
    fi

    if [[ $PURGE -eq 0 ]]; then
        info "Kept configuration, data and logs (remove them with --uninstall --purge):"
        note "$CONF_DIR  $DATA_DIR  $LOG_DIR  user $SERVICE_USER"
        return
    fi
    info "Purging configuration, data and logs"
    if [[ $BROKER -eq 1 ]]; then
        remove_path "$CONF_DIR/broker.yaml"
        remove_path "$CONF_DIR/connectors.yaml"
        remove_path "$DATA_DIR/broker"
        remove_path "$LOG_DIR/broker.log"
    fi
    if [[ $CONNECTOR -eq 1 ]]; then
        remove_path "$CONF_DIR/connector.yaml"
        remove_path "$LOG_DIR/connector.log"
    fi
    if [[ $remaining -eq 0 ]]; then
        remove_dir_if_empty "$CONF_DIR"
        remove_dir_if_empty "$DATA_DIR"
        remove_dir_if_empty "$LOG_DIR"
        if dscl . -read "/Users/$SERVICE_USER" UniqueID >/dev/null 2>&1; then
            dscl . -delete "/Users/$SERVICE_USER"
            dscl . -delete "/Groups/$SERVICE_USER" || true
            note "removed user $SERVICE_USER"
        fi
    fi
}

if [[ $UNINSTALL -eq 1 ]]; then
    do_uninstall
else
    do_install
fi
