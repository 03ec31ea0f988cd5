#!/usr/bin/env bash
# Install (or remove) the RemoteLLM broker and/or connector as systemd services.
# For Debian 12+ / Ubuntu 22.04+ and other systemd distributions. Safe to run again:
# it updates the code and units and never overwrites your configuration.
#
#   sudo deploy/install-linux.sh --broker               # the cloud side
#   sudo deploy/install-linux.sh --connector            # next to the LLM
#   sudo deploy/install-linux.sh --uninstall [--purge]  # remove (and delete config/data)
#
# What goes where:
#   /opt/remotellm/venv          the program (a uv venv, dependencies pinned by uv.lock)
#   /etc/remotellm/*.env         settings (broker.env, connector.env) and connectors.yaml
#   /var/lib/remotellm/broker    the broker's data dir
#   /etc/systemd/system/remotellm-{broker,connector}.service
#
# REMOTELLM_ROOT=/some/dir stages everything under that directory instead (for tests and
# packaging); the commands it calls (systemctl, useradd, chown, uv) are taken from PATH.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=SCRIPTDIR/lib/common.sh
. "$HERE/lib/common.sh"
SCRIPT_ARGS="$*"

SERVICE_USER=remotellm
ROOT_GROUP=root
CONF_DIR=/etc/remotellm
DATA_DIR=/var/lib/remotellm
UNIT_DIR=/etc/systemd/system
DEFAULT_PREFIX=/opt/remotellm

usage() {
    cat <<EOF
Usage: $0 [--broker] [--connector] [options]
       $0 --uninstall [--broker] [--connector] [--purge]

Install RemoteLLM as systemd services (run as root; safe to run again).

  --broker          install the broker service (remotellm-broker.service)
  --connector       install the connector service (remotellm-connector.service)
                    (give both to install both)
  --prefix DIR      where the program goes (default: $DEFAULT_PREFIX)
  --wheel FILE      install this remotellm wheel instead of building one from the source tree
  --python SPEC     Python for the venv, a version or a path (default: >=3.11)
  --no-start        install and enable, but do not start or restart anything
  --uninstall       stop, disable and remove the services (both unless one is named) and
                    the program; configuration and data are kept
  --purge           with --uninstall: also delete configuration, data and the user
  -h, --help        show this help

Environment: UV (path of uv), REMOTELLM_ROOT (stage under this directory).
EOF
}

parse_args "$@"

need_root
need_cmd systemctl "This script is for systemd-based systems (Debian, Ubuntu, Fedora...)."

unit_file() { printf '%s/remotellm-%s.service' "$UNIT_DIR" "$1"; }

# --- install ---------------------------------------------------------------------------

ensure_user() {
    if getent passwd "$SERVICE_USER" >/dev/null 2>&1; then
        note "user $SERVICE_USER exists"
        return
    fi
    need_cmd useradd "Install the passwd package (apt-get install passwd)."
    local nologin=/usr/sbin/nologin
    [[ -x $nologin ]] || nologin=/bin/false
    useradd --system --user-group --home-dir "$DATA_DIR" --no-create-home \
        --shell "$nologin" --comment "RemoteLLM service" "$SERVICE_USER"
    note "created system user $SERVICE_USER"
}

# connector_configured: does connector.env name a broker token, a token file or a YAML config?
connector_configured() {
    grep -Eq '^(REMOTELLM_BROKER_TOKEN=.|REMOTELLM_BROKER_TOKEN_FILE=.|REMOTELLM_CONFIG=.)' \
        "$ROOT$CONF_DIR/connector.env" 2>/dev/null
}

install_broker_config() {
    local env="$TMP_DIR/broker.env"
    cp "$HERE/examples/broker.env.example" "$env"
    if [[ ! -e $ROOT$CONF_DIR/broker.env ]]; then
        new_config "$env" "$CONF_DIR/broker.env" 0640 root "$SERVICE_USER"
        # First install: the broker makes its first key and token, stored hashed.
        init_credentials
    else
        note "kept $CONF_DIR/broker.env (not overwritten)"
    fi
    new_config "$HERE/examples/connectors.yaml.example" "$CONF_DIR/connectors.yaml" 0640 \
        root "$SERVICE_USER"
    rm -f "$env"
}

install_connector_config() {
    local env="$TMP_DIR/connector.env"
    cp "$HERE/examples/connector.env.example" "$env"
    if [[ ! -e $ROOT$CONF_DIR/connector.env && -n ${REMOTELLM_NEW_CONNECTOR_TOKEN:-} ]]; then
        # Broker and connector installed together: point the connector at this broker.
        export REMOTELLM_LOCAL_BROKER_URL=http://127.0.0.1:8443
        set_option "$env" "#REMOTELLM_BROKER_URL=" "REMOTELLM_BROKER_URL=" \
            REMOTELLM_LOCAL_BROKER_URL
        set_option "$env" "#REMOTELLM_BROKER_TOKEN=" "REMOTELLM_BROKER_TOKEN=" \
            REMOTELLM_NEW_CONNECTOR_TOKEN
    fi
    new_config "$env" "$CONF_DIR/connector.env" 0640 root "$SERVICE_USER"
    rm -f "$env"
}

# install_unit NAME: install the unit (with the prefix filled in); sets FILE_CHANGED.
install_unit() {
    render_file "$HERE/systemd/remotellm-$1.service" "$(unit_file "$1")" 0644 root \
        "$ROOT_GROUP" "$DEFAULT_PREFIX/" "$PREFIX/"
}

# run_service NAME CHANGED: restart it if something changed, else make sure it runs
# (systemctl start does nothing to a running service).
run_service() {
    if [[ $2 -eq 1 ]]; then
        systemctl restart "remotellm-$1.service"
        note "(re)started remotellm-$1"
    else
        systemctl start "remotellm-$1.service"
    fi
}

do_install() {
    local code_changed units_changed=0 broker_changed=0 connector_changed=0
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
        broker_changed=$CHANGED
    fi
    if [[ $CONNECTOR -eq 1 ]]; then
        CHANGED=0
        install_connector_config
        connector_changed=$CHANGED
    fi
    unset REMOTELLM_NEW_CONNECTOR_TOKEN

    info "systemd units in $UNIT_DIR"
    if [[ $BROKER -eq 1 ]]; then
        install_unit broker
        if [[ $FILE_CHANGED -eq 1 ]]; then
            units_changed=1
            broker_changed=1
            note "installed $(unit_file broker)"
        fi
    fi
    if [[ $CONNECTOR -eq 1 ]]; then
        install_unit connector
        if [[ $FILE_CHANGED -eq 1 ]]; then
            units_changed=1
            connector_changed=1
            note "installed $(unit_file connector)"
        fi
    fi
    if [[ $units_changed -eq 1 ]]; then
        systemctl daemon-reload
    fi

    if [[ $BROKER -eq 1 ]]; then
        systemctl enable --quiet remotellm-broker.service
        if [[ $START -eq 1 ]]; then
            run_service broker $((code_changed | broker_changed))
        fi
    fi
    if [[ $CONNECTOR -eq 1 ]]; then
        systemctl enable --quiet remotellm-connector.service
        if ! connector_configured; then
            CONNECTOR_TODO=1
        elif [[ $START -eq 1 ]]; then
            run_service connector $((code_changed | connector_changed))
        fi
    fi

    info "Done."
    if [[ $code_changed -eq 0 && $broker_changed -eq 0 && $connector_changed -eq 0 ]]; then
        note "Nothing changed: everything was already installed and up to date."
    fi
    if [[ $BROKER -eq 1 ]]; then
        show_credentials
        note "Broker settings: $CONF_DIR/broker.env; connector tokens: $CONF_DIR/connectors.yaml"
        note "Status: systemctl status remotellm-broker; logs: journalctl -u remotellm-broker -f"
        note "Health: curl http://127.0.0.1:8080/ready"
    fi
    if [[ $CONNECTOR -eq 1 ]]; then
        if [[ ${CONNECTOR_TODO:-0} -eq 1 ]]; then
            note "Connector: set REMOTELLM_BROKER_URL and REMOTELLM_BROKER_TOKEN in"
            note "$CONF_DIR/connector.env, then start it: systemctl start remotellm-connector"
            note "(or run this script again)."
        fi
        note "Status: systemctl status remotellm-connector; logs: journalctl -u remotellm-connector -f"
    fi
}

# --- uninstall -------------------------------------------------------------------------

uninstall_component() {
    local name=$1 unit
    unit=$(unit_file "$name")
    if [[ -e $ROOT$unit ]]; then
        systemctl disable --now --quiet "remotellm-$name.service" ||
            warn "could not stop remotellm-$name.service"
        remove_path "$unit"
        RELOAD=1
    fi
}

do_uninstall() {
    RELOAD=0
    info "Removing services"
    if [[ $BROKER -eq 1 ]]; then uninstall_component broker; fi
    if [[ $CONNECTOR -eq 1 ]]; then uninstall_component connector; fi
    if [[ $RELOAD -eq 1 ]]; then systemctl daemon-reload; fi

    local remaining=0
    if [[ -e $ROOT$(unit_file broker) || -e $ROOT$(unit_file connector) ]]; then
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
        note "kept $PREFIX/venv: the other service still uses it"
    fi

    if [[ $PURGE -eq 0 ]]; then
        info "Kept configuration and data (remove them with --uninstall --purge):"
        note "$CONF_DIR  $DATA_DIR  user $SERVICE_USER"
        return
    fi
    info "Purging configuration and data"
    if [[ $BROKER -eq 1 ]]; then
        remove_path "$CONF_DIR/broker.env"
        remove_path "$CONF_DIR/connectors.yaml"
        remove_path "$DATA_DIR/broker"
    fi
    if [[ $CONNECTOR -eq 1 ]]; then
        remove_path "$CONF_DIR/connector.env"
    fi
    if [[ $remaining -eq 0 ]]; then
        remove_dir_if_empty "$CONF_DIR"
        remove_dir_if_empty "$DATA_DIR"
        if getent passwd "$SERVICE_USER" >/dev/null 2>&1; then
            userdel "$SERVICE_USER" && note "removed user $SERVICE_USER"
        fi
    fi
}

if [[ $UNINSTALL -eq 1 ]]; then
    do_uninstall
else
    do_install
fi
